"""Meta-training and evaluation of the few-shot baselines, with checkpoints and resume.

Algorithms: ``maml`` (second order), ``fomaml`` (first order), ``mamlpp`` (MAML++: every
component on unless switched off), ``imaml``, and ``joint`` (the sinusoid baseline of Finn et
al.: one model trained on all tasks jointly, fine-tuned on each test task's support set).
Episodes are a pure function of (seed, outer step), so ``--resume`` continues exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import nn
from torch.func import grad

from learned_opt.atomic import atomic_torch_save

from ..loop import run_loop, trim_log

from .data import FewShotClasses, Sinusoid, load_omniglot, vinyals_split
from .maml import (CURVATURES, INNER_SOLVERS, MAMLConfig, accuracy, adapt, imaml_adapt, imaml_meta_gradient,
                   init_meta, mean_ci95, meta_gradient, msl_weights)
from .models import conv4, sine_mlp

ALGORITHMS = ("maml", "fomaml", "mamlpp", "imaml", "joint")


@dataclasses.dataclass
class FewShotConfig:
    algorithm: str = "maml"
    dataset: str = "sinusoid"  # "sinusoid" or "omniglot"
    data_root: Optional[str] = None
    ways: int = 5
    shots: int = 1
    queries: int = 0  # 0: 10 for sinusoid, 15 per class for omniglot
    eval_queries: int = 0  # queries of the test tasks; 0: as in training
    inner_steps: int = 1
    inner_lr: float = 0.01
    eval_inner_steps: int = 0  # 0: as in training
    meta_batch: int = 25
    outer_lr: float = 1e-3
    steps: int = 1000  # outer steps: the budget
    hours: float = 0.0  # > 0: also stop once the outer steps have used this many CPU hours in all
    epoch_len: int = 500  # outer steps per "epoch" for the MAML++ schedules
    seed: int = 0
    checkpoint_every: int = 100
    use_vmap: bool = True
    channels: int = 64
    # MAML++ switches (used when algorithm == "mamlpp")
    msl: bool = True
    msl_epochs: int = 10
    # after msl_epochs, count only the last step's query loss and skip the intermediate query
    # passes (the MAML++ authors' code does this); off: the annealed weights stay at their floor
    msl_final_only: bool = False
    lslr: bool = True
    bn_per_step: bool = True  # per-step batch-norm weights and running statistics
    # MAML++ derivative-order annealing: first order for this many epochs, then second order.
    # None: a third of the budget; a negative value: second order from the start, as the MAML++
    # authors' configs mean by first_order_to_second_order_epoch = -1
    derivative_annealing_epochs: Optional[int] = None
    cosine_lr: bool = True
    # any algorithm: anneal the outer learning rate from outer_lr to min_outer_lr on a cosine
    # over `steps` (MAML++ does so already through cosine_lr)
    outer_cosine: bool = False
    min_outer_lr: float = 1e-5
    # iMAML
    lam: float = 2.0
    cg_steps: int = 5
    inner_clip: float = 0.0  # iMAML: clip the inner loss gradient's global norm (0: off)
    curvature: str = "hessian"  # iMAML: "hessian" or "gauss-newton" in the CG system
    inner_solver: str = "gd"  # iMAML's proximal inner solve: "gd" or "gauss-newton" (Hessian-free)
    inner_cg_steps: int = 10  # iMAML, gauss-newton inner solver: CG steps per inner step

    def validate(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        if self.dataset not in ("sinusoid", "omniglot"):
            raise ValueError(f"dataset must be 'sinusoid' or 'omniglot', got {self.dataset!r}")
        if self.dataset == "omniglot" and not self.data_root:
            raise ValueError("omniglot needs --data-root: the folder with images_background.zip and images_evaluation.zip")
        if self.algorithm == "joint" and self.dataset != "sinusoid":
            raise ValueError("the joint baseline is defined for the sinusoid benchmark")
        if self.curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {CURVATURES}, got {self.curvature!r}")
        if self.inner_solver not in INNER_SOLVERS:
            raise ValueError(f"inner_solver must be one of {INNER_SOLVERS}, got {self.inner_solver!r}")
        if self.inner_clip > 0 and self.inner_solver != "gd":
            raise ValueError("inner_clip clips the gradient steps of the 'gd' inner solver; the Gauss-Newton "
                             "solver takes none")
        for k in ("shots", "inner_steps", "meta_batch", "steps", "ways", "inner_cg_steps"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be at least 1")
        for k in ("queries", "eval_queries", "hours"):
            if getattr(self, k) < 0:
                raise ValueError(f"{k} must not be negative")


def median_and_worst(values, higher_is_better: bool):
    """Median and worst of per-task scores, a non-finite score counting as the worst possible
    (sorting a list holding NaN would order it arbitrarily)."""
    bad = float("-inf") if higher_is_better else float("inf")
    srt = sorted(v if math.isfinite(v) else bad for v in values)
    return srt[len(srt) // 2], srt[0] if higher_is_better else srt[-1]


class FewShotTrainer:
    def __init__(self, cfg: FewShotConfig, out: str):
        cfg.validate()
        self.cfg, self.out = cfg, out
        pp = cfg.algorithm == "mamlpp"
        self.mcfg = MAMLConfig(inner_steps=cfg.inner_steps, inner_lr=cfg.inner_lr,
                               multi_step_loss=pp and cfg.msl,
                               msl_epochs=cfg.msl_epochs, learn_inner_lr=pp and cfg.lslr,
                               lam=cfg.lam, cg_steps=cfg.cg_steps, inner_clip=cfg.inner_clip,
                               curvature=cfg.curvature, inner_solver=cfg.inner_solver,
                               inner_cg_steps=cfg.inner_cg_steps)
        if cfg.dataset == "sinusoid":
            q = cfg.queries or 10
            self.train_data = Sinusoid(cfg.shots, q, seed=cfg.seed)
            self.test_data = Sinusoid(cfg.shots, cfg.eval_queries or q, seed=cfg.seed + 1_000_003)
            self.model = sine_mlp()
            self.loss_fn, self.metric = nn.functional.mse_loss, None
        else:
            q = cfg.queries or 15
            images = load_omniglot(cfg.data_root)
            self.train_data = FewShotClasses(vinyals_split(images, "train"), cfg.ways, cfg.shots, q, seed=cfg.seed)
            self.test_data = FewShotClasses(vinyals_split(images, "test"), cfg.ways, cfg.shots,
                                            cfg.eval_queries or q, seed=cfg.seed + 1_000_003)
            self.model = conv4(cfg.ways, cfg.channels, per_step_bn=cfg.inner_steps if pp and cfg.bn_per_step else 0)
            self.loss_fn, self.metric = nn.functional.cross_entropy, accuracy
        self.bn_running = pp and cfg.bn_per_step and self.model.n_stats > 0
        meta = init_meta(self.model, self.mcfg, cfg.seed)
        self.meta = {g: {k: v.clone().requires_grad_() for k, v in d.items()} for g, d in meta.items()}
        self.opt = torch.optim.Adam([v for d in self.meta.values() for v in d.values()], lr=cfg.outer_lr)
        self.sched = (torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=cfg.steps, eta_min=cfg.min_outer_lr)
                      if (pp and cfg.cosine_lr) or cfg.outer_cosine else None)
        self.running: Optional[torch.Tensor] = None  # (S+1, layers, 2, C) per-step BN statistics
        self.use_running_stats = False  # evaluate with them (see evaluate)
        self.step = 0
        # CPU time of the outer steps over all sessions of this run (process time: what the
        # budget means, and not inflated when other work shares the machine)
        self.seconds = 0.0

    # ------------------------------------------------------------------ schedules
    @property
    def epoch(self) -> float:
        return self.step / self.cfg.epoch_len

    def second_order(self) -> bool:
        a = self.cfg.algorithm
        if a in ("fomaml", "imaml", "joint"):
            return False
        if a == "mamlpp":
            da = self.cfg.derivative_annealing_epochs
            da = self.cfg.steps / self.cfg.epoch_len / 3 if da is None else da
            return self.epoch >= da
        return True

    def multi_step_loss(self) -> bool:
        """Whether this step's meta-loss sums the query losses after every inner step."""
        if not self.mcfg.multi_step_loss:
            return False
        return not (self.cfg.msl_final_only and self.epoch >= self.cfg.msl_epochs)

    def out_of_time(self) -> bool:
        return self.cfg.hours > 0 and self.seconds >= self.cfg.hours * 3600

    # ------------------------------------------------------------------ one step
    def outer_step(self) -> Dict:
        cfg = self.cfg
        t0, c0 = time.perf_counter(), time.process_time()
        batch = self.train_data.batch(self.step, cfg.meta_batch)
        second_order, msl = self.second_order(), self.multi_step_loss()  # this step's schedule
        meta = {g: {k: v.detach() for k, v in d.items()} for g, d in self.meta.items()}
        if cfg.algorithm == "imaml":
            g, loss, met = imaml_meta_gradient(meta["params"], batch, self.model, self.loss_fn, self.mcfg,
                                               cfg.inner_steps, cfg.inner_lr, self.metric)
            grads = {"params": g}
        elif cfg.algorithm == "joint":
            def joint_loss(p):
                x = torch.cat([batch.xs, batch.xq], 1).flatten(0, 1)
                y = torch.cat([batch.ys, batch.yq], 1).flatten(0, 1)
                return self.loss_fn(self.model.forward(p, x)[0], y)
            g = grad(joint_loss)(meta["params"])
            loss = met = joint_loss(meta["params"]).detach()
            grads = {"params": g}
        else:
            w = msl_weights(cfg.inner_steps, self.epoch, cfg.msl_epochs) if msl else None
            grads, loss, met, stats = meta_gradient(meta, batch, self.model, self.loss_fn, self.mcfg,
                                                    second_order, w, self.metric, cfg.use_vmap)
            if self.bn_running and stats.numel():
                self.running = stats.clone() if self.running is None else 0.9 * self.running + 0.1 * stats
        finite = all(torch.isfinite(v).all() for d in grads.values() for v in d.values())
        if finite:
            for grp, d in grads.items():
                for k, v in d.items():
                    self.meta[grp][k].grad = v.detach().clone()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            if "lrs" in self.meta:  # inner learning rates stay positive
                with torch.no_grad():
                    for v in self.meta["lrs"].values():
                        v.clamp_(min=1e-6)
        if self.sched is not None:
            self.sched.step()
        self.step += 1
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        self.seconds += cpu
        return {"step": self.step, "query_loss": float(loss), "metric": float(met),
                "second_order": second_order, "multi_step_loss": msl,
                "outer_lr": self.opt.param_groups[0]["lr"],
                "nonfinite": not finite, "time": elapsed, "cpu": cpu}

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, n_tasks: int = 600, inner_steps: Optional[int] = None) -> Dict:
        cfg = self.cfg
        steps = inner_steps or cfg.eval_inner_steps or cfg.inner_steps
        meta = {g: {k: v.detach() for k, v in d.items()} for g, d in self.meta.items()}
        values = []
        for i in range(n_tasks):
            ep = self.test_data.episode(i)
            if cfg.algorithm == "imaml":
                p = imaml_adapt(self.model, meta["params"], ep.xs, ep.ys, self.loss_fn, self.mcfg, steps, cfg.inner_lr)
                out = self.model.forward(p, ep.xq, 0)[0]
            else:
                # The inner loop always normalises with the support set's own batch statistics,
                # as in training: the meta-learned initialisation and inner learning rates expect
                # the gradients that flow through those statistics (with the running statistics
                # held constant instead, a 5-way 1-shot Omniglot model at 92% fell to 24%).
                # The queries are then normalised either with their own batch statistics (the
                # transductive setting of the MAML and MAML++ papers' figures, the default) or,
                # with use_running_stats, with the per-step running statistics of the last step
                # collected in training, so that each query is classified on its own.
                p, _ = adapt(self.model, meta, ep.xs, ep.ys, self.loss_fn, steps, self.mcfg, False)
                final = min(steps, cfg.inner_steps)
                stats = (self.running[final] if self.use_running_stats and self.bn_running
                         and self.running is not None else None)
                out = self.model.forward(p, ep.xq, final, stats)[0]
            with torch.no_grad():
                values.append(float(self.metric(out, ep.yq) if self.metric else self.loss_fn(out, ep.yq)))
        mean, ci = mean_ci95(values)
        name = "accuracy" if self.metric else "mse"
        median, worst = median_and_worst(values, higher_is_better=self.metric is not None)
        return {name: mean, "ci95": ci, "median": median, "worst": worst,
                "tasks": n_tasks, "inner_steps": steps, "outer_steps": self.step}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self):
        return {"config": dataclasses.asdict(self.cfg), "step": self.step,
                "meta": {g: {k: v.detach() for k, v in d.items()} for g, d in self.meta.items()},
                "opt": self.opt.state_dict(), "sched": None if self.sched is None else self.sched.state_dict(),
                "running": self.running, "seconds": self.seconds}

    def save(self):
        os.makedirs(self.out, exist_ok=True)
        atomic_torch_save(self.state_dict(), os.path.join(self.out, "checkpoint.pt"))

    def load(self):
        path = os.path.join(self.out, "checkpoint.pt")
        try:
            sd = torch.load(path, weights_only=True)
        except Exception as e:
            raise RuntimeError(f"{path}: cannot read the checkpoint ({e})") from None
        # an option added after the checkpoint was written is absent from its config: it ran
        # with that option's default, which is what the saved run means
        defaults = {f.name: f.default for f in dataclasses.fields(self.cfg)}
        saved = {k: sd["config"].get(k, defaults[k]) for k in defaults}
        now = dataclasses.asdict(self.cfg)
        diff = {k: (saved[k], now[k]) for k in defaults if saved[k] != now[k]}
        diff.update({k: (sd["config"][k], None) for k in set(sd["config"]) - set(defaults)})
        if diff:
            raise RuntimeError(f"{path}: written with another configuration (saved, now): {diff}")
        with torch.no_grad():
            for g, d in sd["meta"].items():
                for k, v in d.items():
                    self.meta[g][k].copy_(v)
        self.opt.load_state_dict(sd["opt"])
        if self.sched is not None:
            self.sched.load_state_dict(sd["sched"])
        self.running = sd["running"]
        self.step = sd["step"]
        self.seconds = sd.get("seconds", 0.0)  # older checkpoints: filled in from the log by run()

    def run(self, resume: bool = False, progress: bool = True):
        log = Path(self.out) / "log.jsonl"
        os.makedirs(self.out, exist_ok=True)
        if resume and os.path.exists(os.path.join(self.out, "checkpoint.pt")):
            self.load()
            records = trim_log(log, self.step)
            if not self.seconds:
                self.seconds = sum(r.get("cpu", r.get("time", 0.0)) for r in records)
        elif os.path.exists(os.path.join(self.out, "checkpoint.pt")):
            raise RuntimeError(f"{self.out} already holds a checkpoint: pass --resume, or another --out")
        with open(os.path.join(self.out, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(self.cfg), f, indent=2)

        def shown(rec):  # with a CPU-time budget the run usually ends before --steps: show the budget too
            values = {"loss": f"{rec['query_loss']:.4f}", "metric": f"{rec['metric']:.3f}"}
            if self.cfg.hours > 0:
                values["cpu_h"] = f"{self.seconds / 3600:.2f}/{self.cfg.hours:g}"
            return values

        run_loop(self, self.cfg.steps, log, self.cfg.checkpoint_every, desc=self.cfg.algorithm, shown=shown,
                 progress=progress, print_every=50, stop=self.out_of_time)
        if self.step < self.cfg.steps and self.out_of_time():
            print(f"budget of {self.cfg.hours:g} CPU hours spent at outer step {self.step} of {self.cfg.steps}",
                  flush=True)
