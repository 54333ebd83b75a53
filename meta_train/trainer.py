"""The meta-training loop: antithetic truncated ES or PES over a population of inner
trajectories, an outer optimizer, atomic checkpoints with exact resume, JSON-lines logs, and
optional data-parallel workers (``torch.distributed``; only scalars are exchanged).

Gradient estimate, with ``z_j ~ N(0, I)`` the direction of pair ``j`` and ``L+-`` its members'
meta-losses (the mean over the truncation of the transformed inner loss)::

    TES: g = mean_j  z_j (L+_j - L-_j) / (2 sigma)
    PES: g = mean_j  A_j (L+_j - L-_j) / (2 sigma),  A_j = sum of z_j since the pair's task reset

(``sigma z`` is the perturbation ``eps``, so this is ``eps (L+ - L-) / (2 sigma^2)``.) Pairs
whose meta-losses are not finite are left out of the mean and counted; a group whose
parameters became non-finite is reset.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from learned_opt import ArchConfig, MetaNetwork, load_weights, save_weights
from learned_opt.atomic import atomic_torch_save

from .estimators import ESTIMATORS, make_estimator
from .loop import run_loop, trim_log
from .outer import OuterOptimizer
from .population import Group, UnrollSettings
from .tasks import get_family
from .tasks.base import generator

CHECKPOINT_VERSION = 1
# The ArchConfig fields a run may set on its starting weights (MetaTrainConfig.arch; how each is
# applied: initial_theta), with the value that means "leave the starting weights' own". The
# command line's flags carry the same names.
ARCH_FIELDS = {"snr_stats": False, "absolute_snr": False, "dual_snr": False, "magnitude_rate": 0.0, "rms_eps": 0.0,
               "freeze_untouched": False, "scale_free": False, "unit_rms_update": False, "sign_tolerance": None}


def arch_changes(values: Dict[str, Any]) -> Dict[str, Any]:
    """The entries of ``values`` (ARCH_FIELDS names) that change something: the canonical
    ``MetaTrainConfig.arch`` (two configs that ask for the same architecture compare equal)."""
    return {k: v for k, v in values.items() if k in ARCH_FIELDS and v != ARCH_FIELDS[k] and v is not None}


@dataclasses.dataclass
class MetaTrainConfig:
    family: str = "mnist1d_mlp"
    scale_augment: bool = False
    # each task's loss multiplied by a factor drawn log-uniformly from [1e-2, 1e2] (tasks.scale_loss)
    loss_scale_augment: bool = False
    estimator: str = "pes"  # "tes" or "pes"
    sigma: float = 0.01
    pairs: int = 8  # antithetic pairs in the whole population
    groups: int = 2  # tasks trained at once; pairs are split evenly among them
    outer: str = "adam"  # "adam", "self", or a name/path of saved weights
    outer_lr: float = 3e-4
    steps: int = 200  # outer steps
    init: str = "adam-like-init-v0"  # starting weights: a name, a path, or "random"
    # the learned optimizer's architecture: the ArchConfig fields (ARCH_FIELDS) this run sets on
    # its starting weights; every other field is the starting weights' own. snr_stats,
    # absolute_snr and dual_snr move weights without those inputs onto them (the new inputs at
    # zero weight: the same updates at first); magnitude_rate > 0 rescales the weights to that
    # rate with the same updates; rms_eps > 0, freeze_untouched, scale_free, unit_rms_update
    # and sign_tolerance keep the weights' values (not always the same updates)
    arch: Dict[str, Any] = dataclasses.field(default_factory=dict)
    # comma-separated names of the weight tensors that are perturbed and trained ("": all). The
    # others keep their starting values. Fewer dimensions make each ES/PES estimate far less
    # noisy (its variance grows with the number of perturbed weights)
    train_only: str = ""
    seed: int = 0
    checkpoint_every: int = 10
    # decay of an exponential moving average of theta, written beside the weights as
    # weights-ema.safetensors (0: none). It does not change training, so it may be switched on
    # or changed on resume; the average then restarts from theta at that step.
    ema: float = 0.0
    unroll: UnrollSettings = dataclasses.field(default_factory=UnrollSettings)

    def trained_names(self) -> Tuple[str, ...]:
        """The names in ``train_only`` (empty: every tensor is trained)."""
        return tuple(n.strip() for n in self.train_only.split(",")) if self.train_only else ()

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "MetaTrainConfig":
        raw = json.loads(text)
        raw["unroll"] = UnrollSettings(**raw["unroll"])
        # runs begun before ``arch`` kept its entries as fields of their own
        raw["arch"] = arch_changes({**{k: raw.pop(k) for k in ARCH_FIELDS if k in raw}, **raw.get("arch", {})})
        return cls(**raw)

    def validate(self) -> None:
        for name in ("loss_prob", "valid_prob"):
            if not 0.0 <= getattr(self.unroll, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self.unroll, name)}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {sorted(ESTIMATORS)}, got {self.estimator!r}")
        if self.groups < 1 or self.pairs < self.groups or self.pairs % self.groups:
            raise ValueError(f"pairs ({self.pairs}) must be a positive multiple of groups ({self.groups})")
        if not self.sigma > 0:
            raise ValueError("sigma must be > 0")
        if self.unroll.meta_loss not in ("train", "valid"):
            raise ValueError("meta_loss must be 'train' or 'valid'")
        if self.unroll.loss_transform not in ("log", "none"):
            raise ValueError("loss_transform must be 'log' or 'none'")
        if not (self.unroll.min_horizon <= self.unroll.max_horizon):
            raise ValueError("min_horizon must be <= max_horizon")
        if not (0.0 <= self.unroll.late_weight < float("inf")):
            raise ValueError(f"late_weight must be >= 0 and finite, got {self.unroll.late_weight}")
        u = self.unroll
        if not (0.0 <= u.versus_adam < float("inf")):
            raise ValueError(f"versus_adam must be >= 0 and finite, got {u.versus_adam}")
        if u.versus_adam:
            if u.loss_transform != "log":
                raise ValueError("versus_adam compares log losses: it needs loss_transform 'log'")
            if not (0.0 < u.adam_lr < float("inf")) or not math.isfinite(u.adam_margin):
                raise ValueError(f"adam_lr must be positive and finite and adam_margin finite, "
                                 f"got {u.adam_lr}, {u.adam_margin}")
        if self.loss_scale_augment and self.unroll.loss_transform != "log":
            raise ValueError("loss_scale_augment needs loss_transform 'log' (under which the factor cancels "
                             "in the meta-loss); with 'none' it would weigh the tasks by their factors")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {self.ema}")
        unknown = sorted(set(self.arch) - set(ARCH_FIELDS))
        if unknown:
            raise ValueError(f"arch sets {unknown}; a run may set only {sorted(ARCH_FIELDS)}")
        for name in ("magnitude_rate", "rms_eps", "sign_tolerance"):
            value = self.arch.get(name, 0.0)
            if not (0.0 <= value < float("inf")):
                raise ValueError(f"{name} must be >= 0 and finite, got {value}")
        if self.train_only and not all(self.trained_names()):
            raise ValueError(f"train_only must name weight tensors separated by commas, got {self.train_only!r}")


def initial_theta(init: str, snr_stats: bool = False, absolute_snr: bool = False,
                  dual_snr: bool = False, magnitude_rate: float = 0.0,
                  rms_eps: float = 0.0, freeze_untouched: bool = False,
                  scale_free: bool = False, unit_rms_update: bool = False,
                  sign_tolerance: Optional[float] = None) -> Tuple[Dict[str, Tensor], ArchConfig]:
    """The starting weights and their architecture. With ``snr_stats`` or ``dual_snr``, weights
    without those inputs get them at zero weight (the same updates as the weights given); with
    ``absolute_snr``, the weights move to the architecture with unscaled m/sqrt(v) columns.
    Weights that have one of these cannot start a run that leaves it out. A positive
    ``magnitude_rate`` moves the weights to that rate with the same updates; a positive
    ``rms_eps`` puts them on that eps of the features (not the same updates);
    ``freeze_untouched``, ``scale_free`` and ``unit_rms_update`` switch those options on
    (``MetaNetwork.with_options``; starting weights that have one cannot start a run that leaves
    it out); ``sign_tolerance`` (None: the weights' own) sets that tolerance."""
    if init == "random":
        rate = {"magnitude_rate": magnitude_rate} if magnitude_rate else {}
        eps = {"rms_eps": rms_eps} if rms_eps else {}
        net = MetaNetwork.random(ArchConfig(snr_stats=snr_stats, absolute_snr=absolute_snr, dual_snr=dual_snr,
                                            **rate, **eps))
    else:
        net = load_weights(init)[0]
        for flag, wanted, move in (("snr-stats", snr_stats, MetaNetwork.with_snr_stats),
                                   ("absolute-snr", absolute_snr, MetaNetwork.with_absolute_snr),
                                   ("dual-snr", dual_snr, MetaNetwork.with_dual_snr)):
            if wanted:
                net = move(net)
            elif getattr(net.config, flag.replace("-", "_")):
                raise ValueError(f"the starting weights {init!r} are on the {flag} architecture: pass --{flag}")
        if magnitude_rate:
            net = net.with_magnitude_rate(magnitude_rate)
        if rms_eps:
            net = net.with_rms_eps(rms_eps)
        for flag, wanted in (("freeze_untouched", freeze_untouched), ("scale_free", scale_free),
                             ("unit_rms_update", unit_rms_update)):
            if getattr(net.config, flag) and not wanted:
                raise ValueError(f"the starting weights {init!r} have {flag}: pass --{flag.replace('_', '-')}")
    tolerance = {} if sign_tolerance is None else {"sign_tolerance": sign_tolerance}
    net = net.with_options(freeze_untouched=freeze_untouched, scale_free=scale_free, unit_rms_update=unit_rms_update,
                           **tolerance)
    return {k: v.detach().clone() for k, v in net.weights().items()}, net.config


def _read_checkpoint(path: Path) -> Dict[str, Any]:
    try:
        obj = torch.load(path, weights_only=True)
    except Exception as e:  # a damaged file must not pass silently
        raise RuntimeError(f"{path}: cannot read checkpoint: {e}") from None
    if obj.get("version") != CHECKPOINT_VERSION:
        raise RuntimeError(f"{path}: checkpoint version {obj.get('version')} is not supported")
    return obj


class MetaTrainer:
    def __init__(self, config: MetaTrainConfig, out_dir: str, resume: bool = False,
                 rank: int = 0, world: int = 1, progress: bool = True):
        config.validate()
        self.c = config
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.rank, self.world = rank, world
        self.progress = progress and rank == 0
        self.family = get_family(config.family, config.scale_augment, config.loss_scale_augment)
        self.theta, self.lopt_cfg = initial_theta(config.init, **config.arch)
        self.names = list(self.theta)
        self.shapes = [self.theta[k].shape for k in self.names]
        self.sizes = [self.theta[k].numel() for k in self.names]
        self.n_theta = sum(self.sizes)
        # the coordinates of the flat theta that are perturbed (None: all of them)
        self.trained: Optional[Tensor] = None
        if config.train_only:
            unknown = sorted(set(config.trained_names()) - set(self.names))
            if unknown:
                raise ValueError(f"train_only names {unknown}, which the weights do not have; "
                                 f"they have {self.names}")
            mask = torch.cat([torch.full((n,), k in config.trained_names()) for k, n in zip(self.names, self.sizes)])
            self.trained = mask.nonzero().squeeze(1)
        self.outer = OuterOptimizer(config.outer, self.theta, config.outer_lr, self.lopt_cfg)
        per_group = config.pairs // config.groups
        self.pairs_per_group = per_group
        self.my_groups = [g for g in range(config.groups) if g % world == rank]
        self.groups: Dict[int, Group] = {}
        self.estimator = make_estimator(config.estimator, config.pairs, self.n_theta)
        self.step = 0
        self.ema: Optional[Dict[str, Tensor]] = None  # the moving average of theta (config.ema > 0)
        self.ema_since = 0  # the outer step the average started from
        ckpt = self._resume_point() if resume else None
        if ckpt is not None:
            self._load(*ckpt)
        else:
            if resume and rank == 0:
                print(f"[meta_train] no checkpoint in {self.out}; starting fresh", file=sys.stderr)
            for g in self.my_groups:
                self.groups[g] = self._new_group(g)
            self._start_ema()
            if rank == 0:
                (self.out / "config.json").write_text(self.c.to_json())
                log = self.out / "log.jsonl"
                if log.exists():
                    log.unlink()

    def _start_ema(self) -> None:
        if self.c.ema > 0:
            self.ema = {k: v.detach().clone() for k, v in self.theta.items()}
            self.ema_since = self.step

    def _update_ema(self) -> None:
        if self.ema is not None:
            with torch.no_grad():
                for k, v in self.theta.items():
                    self.ema[k].lerp_(v, 1.0 - self.c.ema)

    def _new_group(self, g: int) -> Group:
        return Group(self.family, self.c.unroll, self.lopt_cfg, self.c.seed, g,
                     self.pairs_per_group, per_member=self.estimator.per_member)

    # ---------------------------------------------------------------- vectors
    def _flat(self, d: Dict[str, Tensor]) -> Tensor:
        return torch.cat([d[k].reshape(-1) for k in self.names])

    def _unflat(self, v: Tensor) -> Dict[str, Tensor]:
        return {k: x.view(*v.shape[:-1], *s) for k, x, s in
                zip(self.names, v.split(self.sizes, dim=-1), self.shapes)}

    def directions(self, step: int) -> Tensor:
        """(pairs, n_theta): the same on every worker (a function of the seed and step); zero
        outside the trained coordinates (``train_only``)."""
        n = self.n_theta if self.trained is None else self.trained.numel()
        z = torch.stack([torch.randn(n, generator=generator(self.c.seed, 9, step, j)) for j in range(self.c.pairs)])
        if self.trained is None:
            return z
        full = torch.zeros(self.c.pairs, self.n_theta)
        full[:, self.trained] = z
        return full

    # ---------------------------------------------------------------- one step
    def outer_step(self) -> Dict[str, Any]:
        c, P = self.c, self.pairs_per_group
        t0 = time.perf_counter()
        z = self.directions(self.step)
        theta_vec = self._flat(self.theta)
        losses = torch.zeros(c.pairs, 2, dtype=torch.float64)
        finite = torch.zeros(c.pairs, dtype=torch.float64)
        resets = torch.zeros(c.groups, dtype=torch.float64)
        nonfinite_members = torch.zeros((), dtype=torch.float64)
        inner_steps = torch.zeros((), dtype=torch.float64)
        gap = torch.zeros(2, dtype=torch.float64)  # sum over finite members of log L - log Adam, count
        for g in self.my_groups:
            grp = self.groups[g]
            zj = z[g * P:(g + 1) * P]
            members = torch.stack([theta_vec + c.sigma * zj, theta_vec - c.sigma * zj], dim=1)
            members = self._unflat(members.reshape(2 * P, self.n_theta))
            pass_loss = torch.rand((), generator=generator(c.seed, 10, self.step, g)).item() < c.unroll.loss_prob
            meta, params_ok = grp.unroll(members, pass_loss)
            inner_steps += 2 * P * c.unroll.unroll
            ok = torch.isfinite(meta).view(P, 2).all(1)
            losses[g * P:(g + 1) * P] = torch.where(torch.isfinite(meta), meta, 0.0).view(P, 2)
            finite[g * P:(g + 1) * P] = ok.to(torch.float64)
            nonfinite_members += (~torch.isfinite(meta)).sum() + (~params_ok).sum()
            if grp.last_gap is not None:
                keep = torch.isfinite(grp.last_gap)
                gap += torch.stack([grp.last_gap[keep].sum(), keep.sum().to(torch.float64)])
            if grp.done or not bool(params_ok.all()):
                resets[g] = 1.0
        if self.world > 1:
            packed = torch.cat([losses.flatten(), finite, resets, gap, nonfinite_members.view(1),
                                inner_steps.view(1)])
            dist.all_reduce(packed)
            n = c.pairs * 2
            losses = packed[:n].view(c.pairs, 2)
            finite = packed[n:n + c.pairs]
            resets = packed[n + c.pairs:n + c.pairs + c.groups]
            gap = packed[n + c.pairs + c.groups:n + c.pairs + c.groups + 2]
            nonfinite_members, inner_steps = packed[-2], packed[-1]

        # the estimate (identical on every worker)
        grad_vec, est_var, n_ok = self.estimator.estimate(z, losses[:, 0], losses[:, 1], c.sigma, finite > 0)
        meta_loss = float(losses[finite > 0].mean()) if n_ok else float("nan")
        if n_ok:
            self.outer.step(self.theta, self._unflat(grad_vec.to(torch.float32)), meta_loss)
        self._update_ema()

        # groups that finished their horizon (or went non-finite) start a new task
        for g in range(c.groups):
            if resets[g] > 0:
                if g in self.groups:
                    self.groups[g].reset()
                self.estimator.reset(slice(g * P, (g + 1) * P))
        self.step += 1
        dt = time.perf_counter() - t0
        rec = {"step": self.step, "meta_loss": meta_loss, "grad_norm": float(grad_vec.norm()),
               "estimator_var": est_var, "nonfinite_pairs": int(c.pairs - n_ok),
               "nonfinite_members": int(nonfinite_members), "resets": int(resets.sum()),
               "time": dt, "inner_steps_per_s": float(inner_steps) / dt}
        if c.unroll.versus_adam:  # mean log(L / L_Adam) over the truncation's steps and members
            rec["log_gap_vs_adam"] = float(gap[0] / gap[1]) if gap[1] > 0 else float("nan")
        return rec

    # ------------------------------------------------------------------ loop
    def run(self, steps: Optional[int] = None) -> None:
        total = steps if steps is not None else self.c.steps
        run_loop(self, total, self.out / "log.jsonl" if self.rank == 0 else None, self.c.checkpoint_every,
                 desc="meta_train", progress=self.progress, print_every=10 if self.progress else 0,
                 shown=lambda r: {"meta_loss": f"{r['meta_loss']:.4f}", "nonfinite": str(r["nonfinite_pairs"]),
                                  "inner_steps/s": f"{r['inner_steps_per_s']:.0f}"})

    # ------------------------------------------------------------ checkpoints
    def _ckpt_path(self) -> Path:
        return self.out / f"checkpoint-rank{self.rank}.pt"

    def _prev_path(self) -> Path:
        return self.out / f"checkpoint-rank{self.rank}.prev.pt"

    def _resume_point(self) -> Optional[Tuple[Path, Dict[str, Any]]]:
        """(path, contents) of the checkpoint this worker resumes from, the same outer step on
        every worker.

        Workers save independently, so one that dies can leave its newest checkpoint one save
        behind the others'. With several workers each keeps its previous checkpoint too; the
        workers exchange the steps they hold and all resume from the newest one every worker
        has (or all start fresh when there is none).
        """
        held: Dict[int, Tuple[Path, Dict[str, Any]]] = {}
        other_world = 0
        for path in (self._prev_path(), self._ckpt_path()):
            if path.exists():
                obj = _read_checkpoint(path)
                held[obj["step"]] = (path, obj)
                if obj["world"] != self.world:
                    other_world = obj["world"]
        if self.world == 1:
            return held[max(held)] if held else None  # _load reports a different world
        mine = torch.full((3,), -1, dtype=torch.int64)
        for i, step in enumerate(sorted(held)[-2:]):
            mine[i] = step
        mine[2] = other_world
        every = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(every, mine)
        worlds = {int(other[2]) for other in every} - {0}
        if worlds:
            raise RuntimeError(f"{self.out}: checkpoints made with {sorted(worlds)} workers, "
                               f"resumed with {self.world}")
        common = set(held)
        for other in every:
            common &= {int(x) for x in other[:2] if x >= 0}
        if common:
            return held[max(common)]
        if any(bool((other[:2] >= 0).any()) for other in every) and self.rank == 0:
            print(f"[meta_train] the workers' checkpoints in {self.out} share no outer step; "
                  "starting fresh", file=sys.stderr)
        return None

    def save(self) -> None:
        """Write this worker's checkpoint atomically, and (rank 0) the current weights.

        With several workers the checkpoint it replaces is kept as ``.prev.pt`` (see
        ``_resume_point``).
        """
        obj = {
            "version": CHECKPOINT_VERSION, "config": self.c.to_json(), "step": self.step,
            "rank": self.rank, "world": self.world, "theta": {k: v.clone() for k, v in self.theta.items()},
            "outer": self.outer.state_dict(),
            "pes_accum": self.estimator.state_dict(),  # (the key predates the estimator objects)
            "groups": {g: grp.state_dict() for g, grp in self.groups.items()},
            "ema": {k: v.clone() for k, v in self.ema.items()} if self.ema is not None else None,
            "ema_since": self.ema_since,
        }
        if self.world > 1 and self._ckpt_path().exists():
            os.replace(self._ckpt_path(), self._prev_path())
        atomic_torch_save(obj, self._ckpt_path())
        self._write_weights()

    def _write_weights(self) -> None:
        if self.rank != 0:
            return
        meta = {"outer_steps": str(self.step), "meta_train_config": self.c.to_json()}
        save_weights(self.theta, self.out / "weights.safetensors", f"meta-trained-{self.c.family}",
                     config=self.lopt_cfg, metadata={**meta, "note": "intermediate meta-training weights"})
        if self.ema is not None:
            save_weights(self.ema, self.out / "weights-ema.safetensors", f"meta-trained-{self.c.family}-ema",
                         config=self.lopt_cfg,
                         metadata={**meta, "ema_decay": str(self.c.ema), "ema_since": str(self.ema_since),
                                   "note": "exponential moving average of the meta-training weights"})

    def _load(self, path: Path, obj: Dict[str, Any]) -> None:
        saved = MetaTrainConfig.from_json(obj["config"])
        if dataclasses.replace(saved, steps=0, ema=0.0) != dataclasses.replace(self.c, steps=0, ema=0.0):
            raise RuntimeError(f"{path}: the checkpoint was made with another configuration "
                               f"({obj['config']}); only --steps and --ema may change on resume")
        if obj["world"] != self.world:
            raise RuntimeError(f"{path}: made with {obj['world']} workers, resumed with {self.world}")
        self.step = obj["step"]
        with torch.no_grad():
            for k in self.names:
                self.theta[k].copy_(obj["theta"][k])
        self.outer.load_state_dict(obj["outer"])
        self.estimator.load_state_dict(obj["pes_accum"])
        for g in self.my_groups:
            grp = self._new_group(g)
            grp.load_state_dict(obj["groups"][g])
            self.groups[g] = grp
        if self.c.ema > 0 and saved.ema == self.c.ema and obj.get("ema") is not None:
            self.ema = {k: obj["ema"][k].clone() for k in self.names}
            self.ema_since = obj["ema_since"]
        else:
            if self.c.ema > 0 and self.rank == 0:
                print(f"[meta_train] moving average of theta (decay {self.c.ema}) starts at step {self.step}",
                      file=sys.stderr)
            self._start_ema()
        self._write_weights()  # weights.safetensors may be ahead of the step resumed from
        if self.rank == 0:
            trim_log(self.out / "log.jsonl", self.step)
