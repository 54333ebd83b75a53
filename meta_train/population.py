"""A group of inner trajectories on one task, unrolled for all population members at once.

A *group* trains ``pairs`` copies of one sampled task (same architecture; each pair has its
own initialisation and data seed). For an outer step, every pair is evaluated at
``theta + sigma z`` and ``theta - sigma z``: the ``2 * pairs`` members are stacked and each
inner step runs for all of them at once: the task's forward and backward as one
``torch.func.vmap`` call, the learned-optimizer step as
:func:`learned_opt.functional.population_step` (tested equal to ``vmap(lopt_step)``). Both
members of a pair see the same batches.

Truncated ES keeps one state per pair: both members start each truncation from it and the
positive member's state is kept afterwards. PES keeps one state per member, as its estimate
needs. State here is what a checkpoint must hold; all randomness is a function of seeds.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor
from torch.func import grad_and_value, vmap
from torch.utils._pytree import tree_map

from learned_opt import ArchConfig
from learned_opt.functional import LOptState

from .inner import AdamInner, LearnedInner
from .tasks.base import Task, TaskFamily, _mix, generator


def stack(trees: List[Any]):
    return tree_map(lambda *xs: torch.stack(xs), *trees)


def take(tree, idx: Tensor):
    return tree_map(lambda x: x.index_select(0, idx), tree)


@dataclasses.dataclass
class UnrollSettings:
    unroll: int = 20  # inner steps per truncation
    min_horizon: int = 100
    max_horizon: int = 2000
    inner_lr: float = 1e-3
    meta_loss: str = "train"  # "train" or "valid"
    loss_transform: str = "log"  # "log" or "none": what is averaged over the unroll
    valid_every: int = 10  # feed a validation loss to the optimizer every k inner steps (0: never)
    # chance that a task's run feeds those validation losses at all (drawn at each task reset):
    # most users never call report_validation_loss, so the optimizer must also work without it
    valid_prob: float = 1.0
    loss_prob: float = 0.8  # chance a truncation passes the training loss to the optimizer
    # weight of inner step t's loss in the meta-loss, (P + 1) * ((t + 1) / horizon) ** P: 0 gives
    # every step the same weight (the area under the loss curve); larger P moves the objective
    # towards the loss at the end of the run, which is what a user of the optimizer sees.
    # The weights average about 1 over a horizon.
    late_weight: float = 0.0
    # Measure each inner step against Adam (lr ``adam_lr``) run beside the members from the
    # same initialisation on the same batches: with sharpness k = ``versus_adam`` > 0, step t
    # adds softplus(k * (log L_t - log A_t + adam_margin)) / k instead of log L_t. Where the
    # learned optimizer is far ahead of Adam a step counts little; where it trails, about as
    # much as log L_t. The objective leans towards the tasks (and the parts of a run) where
    # Adam wins, which a plain average over a task mix lets the easy wins outvote. Any additive
    # per-task baseline would cancel in the antithetic difference; this one does not, since it
    # enters through a non-linear function. Needs loss_transform "log". With meta_loss "valid"
    # both sides are validation losses (Adam's after its step t, on the members' validation
    # batches of step t), so the hinge weighs the tasks where Adam generalises better.
    versus_adam: float = 0.0
    adam_lr: float = 1e-3
    adam_margin: float = 0.0  # log of the lead over Adam where the hinge turns (0.1: about 10%)


def versus_adam_transform(log_loss: Tensor, log_adam: Tensor, k: float, margin: float) -> Tensor:
    """softplus(k (log L - log A + margin)) / k, elementwise (stable for large arguments)."""
    return torch.nn.functional.softplus(k * (log_loss - log_adam + margin)) / k


def step_weight(s: UnrollSettings, t: int, horizon: int) -> float:
    """The meta-loss weight of inner step ``t`` (from 0) of a run of ``horizon`` steps."""
    if not s.late_weight:
        return 1.0
    return (s.late_weight + 1.0) * min(1.0, (t + 1) / horizon) ** s.late_weight


def sample_horizon(s: UnrollSettings, *seed: int) -> int:
    g = generator(*seed)
    u = torch.rand((), generator=g, dtype=torch.float64).item()
    return int(round(math.exp(math.log(s.min_horizon) + u * (math.log(s.max_horizon) - math.log(s.min_horizon)))))


class Group:
    """Inner trajectories of ``pairs`` antithetic pairs on one task."""

    def __init__(self, family: TaskFamily, settings: UnrollSettings, lopt_cfg: ArchConfig,
                 run_seed: int, index: int, pairs: int, per_member: bool):
        self.family, self.s, self.cfg = family, settings, lopt_cfg
        self.run_seed, self.index, self.pairs, self.per_member = run_seed, index, pairs, per_member
        self.resets = 0
        self.task: Optional[Task] = None
        self._fns = None
        self.reset(first=True)

    # ----------------------------------------------------------------- lifecycle
    @property
    def members(self) -> int:
        return 2 * self.pairs if self.per_member else self.pairs

    def reset(self, first: bool = False) -> None:
        """New task, new initialisations, new horizon. The first horizon of a run is cut at a
        random point so that the groups do not reset in lockstep."""
        self.task_seed = _mix(self.run_seed, 1, self.index, self.resets)
        self.task = self.family.sample(self.task_seed)
        self._fns = None
        self.horizon = sample_horizon(self.s, self.run_seed, 2, self.index, self.resets)
        if first:
            u = torch.rand((), generator=generator(self.run_seed, 3, self.index), dtype=torch.float64).item()
            self.horizon = max(self.s.unroll, int(self.horizon * u))
        self.step = 0
        u = torch.rand((), generator=generator(self.run_seed, 6, self.index, self.resets), dtype=torch.float64).item()
        self.report_valid = u < self.s.valid_prob  # does this run feed validation losses?
        self.data_seeds = [_mix(self.task_seed, 4, j) for j in range(self.pairs)]
        inits = [self.task.init(_mix(self.task_seed, 5, j)) for j in range(self.pairs)]
        self.names = list(inits[0])
        params = stack(inits)
        if self.per_member:
            params = take(params, torch.arange(self.pairs).repeat_interleave(2))
        self.params: Dict[str, Tensor] = params
        self.lstate: Optional[LOptState] = None  # made from each member's weights at first use
        self.last_gap: Optional[Tensor] = None
        # Adam beside the members (UnrollSettings.versus_adam): one run per pair, its params
        # and moments
        self.adam: Optional[Dict[str, Dict[str, Tensor]]] = None
        if self.s.versus_adam:
            first = stack(inits)
            self.adam = {"params": first, **AdamInner(self.s.adam_lr).init(first)}
        self.resets += 1

    @property
    def done(self) -> bool:
        return self.step >= self.horizon

    # --------------------------------------------------------------------- unroll
    def _functions(self):
        if self._fns is None:
            task, names = self.task, self.names
            grad_fn = vmap(grad_and_value(task.loss))
            opt = LearnedInner(self.cfg, names, self.s.inner_lr)

            def inner(w, params, lstate, batch, pass_loss: bool):
                grads, loss = grad_fn(params, batch)
                new_p, new_s = opt.step(params, grads, lstate, w, loss=loss if pass_loss else None)
                return new_p, new_s, loss

            self._fns = {
                True: lambda w, p, s, b: inner(w, p, s, b, True),
                False: lambda w, p, s, b: inner(w, p, s, b, False),
                "loss": vmap(task.loss),
                "observe": opt.observe_validation,
                "init": lambda w, p: opt.init(p, w),
                "grad": grad_fn,
                "adam": AdamInner(self.s.adam_lr),
            }
        return self._fns

    def _pair_batches(self, split: str, step: int):
        return stack([self.task.batch(split, seed, step) for seed in self.data_seeds])

    @staticmethod
    def _to_members(pair_batch):
        return tree_map(lambda x: x.repeat_interleave(2, dim=0), pair_batch)  # member 2j, 2j+1 <- pair j

    def _batches(self, split: str, step: int):
        return self._to_members(self._pair_batches(split, step))

    def _adam_step(self, t: int, pair_batch) -> Tensor:
        """Advance the Adam runs by inner step ``t`` (from 0) on the pairs' training batches
        ``pair_batch``; returns their losses before the step, (pairs,)."""
        a, f = self.adam, self._functions()
        grads, loss = f["grad"](a["params"], pair_batch)
        a["params"], moments = f["adam"].step(a["params"], grads, {"m": a["m"], "v": a["v"]}, t=t)
        a.update(moments)
        return loss.detach()

    def unroll(self, member_weights: Dict[str, Tensor], pass_loss: bool):
        """Run one truncation with the stacked weights of the 2*pairs members (order: pair 0
        +, pair 0 -, pair 1 +, ...). Returns per-member meta-losses (2*pairs,), each the mean
        over the truncation's steps of the (transformed) loss, or with ``versus_adam`` of its
        hinge against the Adam runs' log loss, times ``step_weight``; and whether each member's
        parameters stayed finite."""
        f = self._functions()
        expand = torch.arange(self.pairs).repeat_interleave(2)
        params = self.params if self.per_member else take(self.params, expand)
        if self.lstate is None:
            lstate = f["init"](member_weights, params)
        else:
            lstate = self.lstate if self.per_member else take(self.lstate, expand)
        transform = torch.log if self.s.loss_transform == "log" else (lambda x: x)
        total = torch.zeros(2 * self.pairs, dtype=torch.float64)
        gap = torch.zeros(2 * self.pairs, dtype=torch.float64)
        K = self.s.unroll
        for k in range(K):
            t = self.step + k
            pair_batch = self._pair_batches("train", t)  # made once for the members and Adam
            params, lstate, loss = f[pass_loss](member_weights, params, lstate, self._to_members(pair_batch))
            report = self.report_valid and self.s.valid_every and (t + 1) % self.s.valid_every == 0
            if self.s.meta_loss == "valid" or report:
                vloss = f["loss"](params, self._batches("valid", t))
                if report:
                    lstate = f["observe"](lstate, vloss)
            meta = vloss if self.s.meta_loss == "valid" else loss
            value = transform(meta.detach().to(torch.float64))
            if self.adam is not None:
                adam_loss = self._adam_step(t, pair_batch)
                if self.s.meta_loss == "valid":  # Adam's after its step, on the members' validation batches
                    adam_loss = f["loss"](self.adam["params"], self._pair_batches("valid", t))
                log_adam = torch.log(adam_loss.to(torch.float64)).repeat_interleave(2)
                gap += value - log_adam
                value = versus_adam_transform(value, log_adam, self.s.versus_adam, self.s.adam_margin)
            total += step_weight(self.s, t, self.horizon) * value
        self.step += K
        # mean over the truncation of log L - log A, per member (None without Adam runs)
        self.last_gap = gap / K if self.adam is not None else None
        finite = torch.stack([torch.isfinite(v).flatten(1).all(1) for v in params.values()]).all(0)
        keep = slice(None) if self.per_member else slice(0, None, 2)
        self.params = take(params, torch.arange(params[self.names[0]].shape[0])[keep])
        self.lstate = take(lstate, torch.arange(2 * self.pairs)[keep])
        return total / K, finite

    # --------------------------------------------------------------- checkpoints
    def state_dict(self) -> Dict[str, Any]:
        """Plain containers of tensors and numbers (loadable with weights_only=True)."""
        ls = LearnedInner.to_saved(self.lstate)
        return {"resets": self.resets, "step": self.step, "horizon": self.horizon,
                "params": dict(self.params), "lstate": ls,
                "adam": None if self.adam is None else {k: dict(v) for k, v in self.adam.items()}}

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        self.resets = sd["resets"] - 1
        self.reset()  # rebuild the task of that reset (deterministic from seeds)
        self.step, self.horizon = sd["step"], sd["horizon"]
        self.params = dict(sd["params"])
        self.lstate = LearnedInner.from_saved(sd["lstate"])
        if self.adam is not None:
            if sd.get("adam") is None:
                raise RuntimeError("the checkpoint holds no Adam runs, which versus_adam needs")
            self.adam = {k: dict(v) for k, v in sd["adam"].items()}
