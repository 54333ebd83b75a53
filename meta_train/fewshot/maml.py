"""MAML (second- and first-order), MAML++ and iMAML meta-gradients on ``torch.func``.

The meta-parameters are a dict: ``params`` (the model's initialisation) and, with learned
per-layer per-step inner learning rates (MAML++ LSLR), ``lrs`` ``{name: (steps,)}``. For one
task, :func:`maml_task_loss` adapts on the support set and returns the query loss;
``torch.func.grad`` of it is the task's meta-gradient, and :func:`meta_gradient` averages it
over a batch of tasks either under ``vmap`` or with a Python loop (tested equal).

iMAML (:func:`imaml_task_gradient`) solves the proximal inner problem
``min_phi L_support(phi) + lam/2 |phi - theta|^2`` by gradient descent and obtains the
meta-gradient by conjugate gradient on ``(I + H/lam) x = grad L_query(phi)``, ``H`` the Hessian
of the support loss at ``phi`` (Hessian-vector products by double backward).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp, vmap

from .data import Episode
from .models import FunctionalModel

Meta = Dict[str, Dict[str, Tensor]]


@dataclasses.dataclass
class MAMLConfig:
    inner_steps: int = 5
    inner_lr: float = 0.4
    # MAML++ components (all off: plain MAML)
    multi_step_loss: bool = False  # MSL: weighted query loss after every inner step
    msl_epochs: int = 10  # epochs over which the MSL weights anneal to the last step
    learn_inner_lr: bool = False  # LSLR: per-layer per-step learnable inner lrs
    # (first or second order is chosen per step by the caller: FewShotTrainer.second_order)
    # iMAML
    lam: float = 2.0
    cg_steps: int = 5
    inner_clip: float = 0.0  # > 0: clip the global norm of the inner loss gradient (iMAML "gd" solver)
    # curvature in (I + H/lam): "hessian" (the paper's) or "gauss-newton" (J^T H_loss J, positive
    # semi-definite, so CG never meets negative curvature; exact for models linear in params)
    curvature: str = "hessian"
    # the proximal inner solve: "gd" (gradient steps at inner_lr) or "gauss-newton" (each step
    # solves (G + lam I) d = grad of the proximal loss by inner_cg_steps of CG, G the support
    # loss's Gauss-Newton matrix, and moves inner_lr * d: a Hessian-free solver, as in the
    # iMAML paper's Hessian-free variant; the meta-gradient only needs the solution)
    inner_solver: str = "gd"
    inner_cg_steps: int = 10


def msl_weights(steps: int, epoch: float, msl_epochs: int) -> Tensor:
    """MAML++ multi-step loss weights: uniform at epoch 0; the weights of steps 1..S-1 fall
    linearly to a floor of 0.03/S by ``msl_epochs``, the last step takes the rest."""
    if steps == 1:
        return torch.ones(1)
    floor = 0.03 / steps
    frac = min(1.0, max(0.0, epoch / max(msl_epochs, 1e-9)))
    early = (1.0 / steps) + frac * (floor - 1.0 / steps)
    w = torch.full((steps,), early, dtype=torch.float64)
    w[-1] = 1.0 - early * (steps - 1)
    return w.float()


def init_meta(model: FunctionalModel, cfg: MAMLConfig, seed: int) -> Meta:
    params = model.init(seed)
    meta: Meta = {"params": params}
    if cfg.learn_inner_lr:
        meta["lrs"] = {k: torch.full((cfg.inner_steps,), cfg.inner_lr) for k in model.inner_names(params)}
    return meta


def _pack_stats(seen) -> Tensor:
    """Batch statistics of one forward pass, [(mean, var)] per layer -> (layers, 2, C)."""
    if not seen:
        return torch.zeros(0)
    return torch.stack([torch.stack(list(st)) for st in seen])


def adapt(model: FunctionalModel, meta: Meta, xs: Tensor, ys: Tensor, loss_fn, steps: int, cfg: MAMLConfig,
          second_order: bool, on_step: Optional[Callable] = None, stats: Optional[Tensor] = None):
    """Inner loop: ``steps`` gradient steps on the support set from ``meta['params']``.
    ``on_step(s, params)`` is called after every step (for the multi-step loss). ``stats``:
    per-step batch-norm statistics (steps+1, layers, 2, C) to normalise with instead of the
    batch's own (MAML++ per-step running statistics, at evaluation). Returns the adapted
    parameters and the batch statistics seen at each step (steps, layers, 2, C)."""
    params = meta["params"]
    names = model.inner_names(params)
    fast = {k: params[k] for k in names}
    outer = {k: v for k, v in params.items() if k not in fast}
    seen = []
    for s in range(steps):
        def support_loss(f, s=s):
            out, st = model.forward({**outer, **f}, xs, s, None if stats is None else stats[s])
            return loss_fn(out, ys), _pack_stats(st)
        g, st = grad(support_loss, has_aux=True)(fast)
        seen.append(st)
        if not second_order:
            g = {k: v.detach() for k, v in g.items()}
        if "lrs" in meta:
            lr = {k: meta["lrs"][k][min(s, meta["lrs"][k].shape[0] - 1)] for k in names}
        else:
            lr = {k: cfg.inner_lr for k in names}
        fast = {k: fast[k] - lr[k] * g[k] for k in names}
        if on_step is not None:
            on_step(s, {**outer, **fast})
    return {**outer, **fast}, (torch.stack(seen) if seen else torch.zeros(0))


def maml_task_loss(meta: Meta, episode: Episode, model: FunctionalModel, loss_fn, cfg: MAMLConfig,
                   second_order: bool, weights: Optional[Tensor] = None, metric=None):
    """Query loss of one task after adaptation (with MSL: the weighted sum over steps).
    Returns (meta-loss, (final query loss, metric, batch statistics per step))."""
    xs, ys, xq, yq = episode
    S = cfg.inner_steps
    step_losses: List[Tensor] = []

    def on_step(s, p):
        if weights is not None and s < S - 1:
            out, _ = model.forward(p, xq, s + 1)
            step_losses.append(loss_fn(out, yq))

    adapted, seen = adapt(model, meta, xs, ys, loss_fn, S, cfg, second_order,
                          on_step if weights is not None else None)
    out, st = model.forward(adapted, xq, S)
    final = loss_fn(out, yq)
    if weights is not None:
        total = sum(w * l for w, l in zip(weights[:-1], step_losses)) + weights[-1] * final
    else:
        total = final
    m = metric(out, yq) if metric is not None else final.detach()
    stats = torch.cat([seen, _pack_stats(st).unsqueeze(0)]) if seen.numel() else seen
    return total, (final.detach(), m.detach(), stats.detach())


def meta_gradient(meta: Meta, batch: Episode, model: FunctionalModel, loss_fn, cfg: MAMLConfig,
                  second_order: bool, weights: Optional[Tensor] = None, metric=None, use_vmap: bool = True):
    """Mean over the tasks of ``batch`` (leading task dim) of the meta-gradient.
    Returns (grads like meta, mean query loss, mean metric, mean batch statistics per step)."""
    fn = grad(lambda m, e: maml_task_loss(m, e, model, loss_fn, cfg, second_order, weights, metric), has_aux=True)
    if use_vmap:
        g, (loss, met, st) = vmap(fn, in_dims=(None, 0))(meta, batch)
        g = {grp: {k: v.mean(0) for k, v in d.items()} for grp, d in g.items()}
        return g, loss.mean(), met.mean(), st.mean(0)
    total, losses, mets, sts = None, [], [], []
    n = batch.xs.shape[0]
    for i in range(n):
        gi, (l, m, st) = fn(meta, Episode(*(x[i] for x in batch)))
        total = gi if total is None else {grp: {k: total[grp][k] + v for k, v in d.items()} for grp, d in gi.items()}
        losses.append(l)
        mets.append(m)
        sts.append(st)
    g = {grp: {k: v / n for k, v in d.items()} for grp, d in total.items()}
    return g, torch.stack(losses).mean(), torch.stack(mets).mean(), torch.stack(sts).mean(0)


# ---------------------------------------------------------------------------- iMAML


def conjugate_gradient(matvec: Callable, b: Dict[str, Tensor], steps: int) -> Dict[str, Tensor]:
    """Solve A x = b for symmetric positive-definite A given by ``matvec`` (dicts of tensors).
    Stops early where A shows non-positive curvature along a search direction."""
    def dot(a, c):
        return sum((a[k] * c[k]).sum() for k in a)
    x = {k: torch.zeros_like(v) for k, v in b.items()}
    r = dict(b)
    p = dict(b)
    rs = dot(r, r)
    for i in range(steps):
        ap = matvec(p)
        curv = dot(p, ap)
        if not bool(curv > 0):  # negative curvature (a non-convex inner loss): stop here,
            return {k: v.clone() for k, v in (b if i == 0 else x).items()}  # as truncated CG does
        alpha = rs / curv
        x = {k: x[k] + alpha * p[k] for k in x}
        r = {k: r[k] - alpha * ap[k] for k in r}
        rs_new = dot(r, r)
        p = {k: r[k] + (rs_new / rs.clamp_min(1e-30)) * p[k] for k in p}
        rs = rs_new
    return x


CURVATURES = ("hessian", "gauss-newton")  # the choices for MAMLConfig.curvature


def curvature_product(model: FunctionalModel, loss_fn, kind: str) -> Callable:
    """``(phi, x, y, v) -> C v`` for the support loss ``loss_fn(model(phi, x), y)``, where C is
    its Hessian (``"hessian"``: reverse-over-reverse) or its Gauss-Newton matrix
    ``J^T H_out J`` (``"gauss-newton"``: J the Jacobian of the model's output with respect to
    phi, H_out the loss's Hessian with respect to that output; a forward-mode product, the
    output Hessian's product, and a backward pass). The Gauss-Newton matrix drops the term
    with the model's second derivatives, which is what makes the Hessian indefinite."""
    def task_loss(p, x, y):
        return loss_fn(model.forward(p, x, 0)[0], y)

    def hessian(phi, x, y, v):
        return grad(lambda p: sum((gi * v[k]).sum() for k, gi in grad(task_loss)(p, x, y).items()))(phi)

    def gauss_newton(phi, x, y, v):
        def out_of(p):
            return model.forward(p, x, 0)[0]
        out, jv = jvp(out_of, (phi,), (v,))
        # H_out (J v) by double backward in the output space (small); forward-over-reverse
        # fails there for some losses (mse_loss's backward writes into a zero tensor)
        hjv = grad(lambda o: (grad(lambda q: loss_fn(q, y))(o) * jv).sum())(out)
        return vjp(out_of, phi)[1](hjv)[0]

    if kind not in CURVATURES:
        raise ValueError(f"curvature must be one of {CURVATURES}, got {kind!r}")
    return hessian if kind == "hessian" else gauss_newton


def proximal_step(phi: Dict[str, Tensor], g: Dict[str, Tensor], theta: Dict[str, Tensor], lr: float,
                  lam: float, clip: float = 0.0) -> Dict[str, Tensor]:
    """One gradient step on ``L(phi) + lam/2 |phi - theta|^2`` given ``g = grad L(phi)``. With
    ``clip > 0`` the global norm of ``g`` is first clipped to ``clip``: the iMAML meta-gradient
    depends only on the inner solution, not on the path to it, so a safer solver is allowed."""
    if clip > 0:
        norm = torch.sqrt(sum((v * v).sum() for v in g.values()))
        scale = torch.clamp(clip / (norm + 1e-12), max=1.0)
        g = {k: v * scale for k, v in g.items()}
    return {k: phi[k] - lr * (g[k] + lam * (phi[k] - theta[k])) for k in phi}


INNER_SOLVERS = ("gd", "gauss-newton")  # the choices for MAMLConfig.inner_solver


def proximal_solve(model, theta, xs, ys, loss_fn, cfg: MAMLConfig, inner_steps: int, inner_lr: float):
    """iMAML's inner problem for one task, ``min_phi L(phi) + lam/2 |phi - theta|^2`` with L the
    support loss, from phi = theta by ``inner_steps`` steps of ``cfg.inner_solver``. Returns phi
    (detached: the meta-gradient is implicit)."""
    theta = {k: v.detach() for k, v in theta.items()}

    def support_loss(p):
        return loss_fn(model.forward(p, xs, 0)[0], ys)

    if cfg.inner_solver not in INNER_SOLVERS:
        raise ValueError(f"inner_solver must be one of {INNER_SOLVERS}, got {cfg.inner_solver!r}")
    gn = curvature_product(model, loss_fn, "gauss-newton")
    phi = dict(theta)
    for _ in range(inner_steps):
        g = grad(support_loss)(phi)
        if cfg.inner_solver == "gd":
            phi = proximal_step(phi, g, theta, inner_lr, cfg.lam, cfg.inner_clip)
            continue
        b = {k: g[k] + cfg.lam * (phi[k] - theta[k]) for k in phi}
        d = conjugate_gradient(lambda v, phi=phi: {k: x + cfg.lam * v[k] for k, x in gn(phi, xs, ys, v).items()},
                               b, cfg.inner_cg_steps)
        phi = {k: phi[k] - inner_lr * d[k] for k in phi}
    return {k: v.detach() for k, v in phi.items()}


def batched_proximal_solve(model, theta, xs, ys, loss_fn, cfg: MAMLConfig, inner_steps: int, inner_lr: float):
    """:func:`proximal_solve` for a batch of tasks (leading dim of ``xs``, ``ys``) at once; the
    Gauss-Newton solver advances all tasks' CG systems together. Tested equal to the loop."""
    theta = {k: v.detach() for k, v in theta.items()}

    def task_loss(p, x, y):
        return loss_fn(model.forward(p, x, 0)[0], y)

    if cfg.inner_solver == "gd":  # plain steps: the one-task solve, vectorised over tasks
        return vmap(lambda x, y: proximal_solve(model, theta, x, y, loss_fn, cfg, inner_steps, inner_lr))(xs, ys)
    if cfg.inner_solver not in INNER_SOLVERS:
        raise ValueError(f"inner_solver must be one of {INNER_SOLVERS}, got {cfg.inner_solver!r}")
    gn = vmap(curvature_product(model, loss_fn, "gauss-newton"))
    n = xs.shape[0]
    phis = {k: v.unsqueeze(0).expand(n, *v.shape).clone() for k, v in theta.items()}
    for _ in range(inner_steps):
        g = vmap(grad(task_loss))(phis, xs, ys)
        b = {k: g[k] + cfg.lam * (phis[k] - theta[k]) for k in phis}
        d = batched_conjugate_gradient(
            lambda v, phis=phis: {k: x + cfg.lam * v[k] for k, x in gn(phis, xs, ys, v).items()},
            b, cfg.inner_cg_steps)
        phis = {k: phis[k] - inner_lr * d[k] for k in phis}
    return {k: v.detach() for k, v in phis.items()}


def imaml_task_gradient(theta: Dict[str, Tensor], episode: Episode, model: FunctionalModel, loss_fn,
                        cfg: MAMLConfig, inner_steps: int, inner_lr: float, metric=None):
    """iMAML meta-gradient of one task. Returns (grads like theta, query loss, metric)."""
    xs, ys, xq, yq = episode
    lam = cfg.lam
    theta = {k: v.detach() for k, v in theta.items()}

    def query_loss(p):
        return loss_fn(model.forward(p, xq, 0)[0], yq)

    phi = proximal_solve(model, theta, xs, ys, loss_fn, cfg, inner_steps, inner_lr)
    gq = grad(query_loss)(phi)
    curvature = curvature_product(model, loss_fn, cfg.curvature)

    def matvec(v):  # (I + H/lam) v
        hv = curvature(phi, xs, ys, v)
        return {k: v[k] + hv[k] / lam for k in v}

    x = conjugate_gradient(matvec, gq, cfg.cg_steps)
    with torch.no_grad():
        out = model.forward(phi, xq, 0)[0]
        ql = loss_fn(out, yq)
        m = metric(out, yq) if metric is not None else ql
    return x, ql, m


def batched_conjugate_gradient(matvec: Callable, b: Dict[str, Tensor], steps: int) -> Dict[str, Tensor]:
    """:func:`conjugate_gradient` for a batch of independent systems (leading dim of every tensor of
    ``b``), all advanced together; a system that meets non-positive curvature stops where it is
    (keeping ``b`` if on the first step) while the others go on. Tested equal to the per-system loop."""
    n = next(iter(b.values())).shape[0]

    def dot(a, c):  # one value per system
        return sum((a[k] * c[k]).reshape(n, -1).sum(1) for k in a)

    def bc(t, like):  # a per-system scalar, broadcast against a batched tensor
        return t.reshape((n,) + (1,) * (like.dim() - 1))

    x = {k: torch.zeros_like(v) for k, v in b.items()}
    r = dict(b)
    p = dict(b)
    rs = dot(r, r)
    active = torch.ones(n, dtype=torch.bool, device=rs.device)
    first_stop = torch.zeros(n, dtype=torch.bool, device=rs.device)
    for i in range(steps):
        ap = matvec(p)
        curv = dot(p, ap)
        stop = active & ~(curv > 0)
        if i == 0:
            first_stop = stop
        active = active & ~stop
        alpha = torch.where(active, rs / torch.where(active, curv, torch.ones_like(curv)), torch.zeros_like(curv))
        x = {k: x[k] + bc(alpha, x[k]) * p[k] for k in x}
        r = {k: r[k] - bc(alpha, r[k]) * ap[k] for k in r}
        rs_new = dot(r, r)
        beta = torch.where(active, rs_new / rs.clamp_min(1e-30), torch.zeros_like(rs))
        p = {k: r[k] + bc(beta, p[k]) * p[k] for k in p}
        rs = torch.where(active, rs_new, rs)
    return {k: torch.where(bc(first_stop, v), b[k], v) for k, v in x.items()}


def imaml_meta_gradient(theta, batch: Episode, model, loss_fn, cfg: MAMLConfig, inner_steps, inner_lr, metric=None,
                        use_vmap: bool = True):
    """Mean over the tasks of ``batch`` of the iMAML meta-gradient. Returns (grads, loss, metric).
    ``use_vmap=False`` is the readable reference: :func:`imaml_task_gradient` task by task."""
    n = batch.xs.shape[0]
    if not use_vmap:
        total, losses, mets = None, [], []
        for i in range(n):
            g, l, m = imaml_task_gradient(theta, Episode(*(x[i] for x in batch)), model, loss_fn, cfg,
                                          inner_steps, inner_lr, metric)
            total = g if total is None else {k: total[k] + g[k] for k in g}
            losses.append(l)
            mets.append(m)
        return {k: v / n for k, v in total.items()}, torch.stack(losses).mean(), torch.stack(mets).mean()
    xs, ys, xq, yq = batch
    lam = cfg.lam
    theta = {k: v.detach() for k, v in theta.items()}

    def task_loss(p, x, y):  # support or query loss of one task
        return loss_fn(model.forward(p, x, 0)[0], y)

    phis = batched_proximal_solve(model, theta, xs, ys, loss_fn, cfg, inner_steps, inner_lr)
    gq = vmap(grad(task_loss))(phis, xq, yq)

    curvature = curvature_product(model, loss_fn, cfg.curvature)

    def matvec(v):  # (I + H/lam) v for every task at once
        hv = vmap(curvature)(phis, xs, ys, v)
        return {k: v[k] + hv[k] / lam for k in v}

    x = batched_conjugate_gradient(matvec, gq, cfg.cg_steps)
    with torch.no_grad():
        out = vmap(lambda p, a: model.forward(p, a, 0)[0])(phis, xq)
        ql = torch.stack([loss_fn(out[i], yq[i]) for i in range(n)])
        m = torch.stack([metric(out[i], yq[i]) for i in range(n)]) if metric is not None else ql
    return {k: v.mean(0) for k, v in x.items()}, ql.mean(), m.mean()


def imaml_adapt(model, theta, xs, ys, loss_fn, cfg: MAMLConfig, inner_steps, inner_lr):
    """The proximal inner solve alone (evaluation)."""
    return proximal_solve(model, theta, xs, ys, loss_fn, cfg, inner_steps, inner_lr)


def accuracy(out: Tensor, y: Tensor) -> Tensor:
    return (out.argmax(-1) == y).float().mean()


def mean_ci95(xs: List[float]) -> Tuple[float, float]:
    n = len(xs)
    m = sum(xs) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / max(n - 1, 1))
    return m, 1.96 * sd / math.sqrt(n)
