"""The population step (learned_opt/batched.py) against ``vmap(lopt_step)`` and against the
readable reference run member by member, on both of its per-element paths (batched PyTorch
matmuls and the compiled kernel's member loop)."""

import pytest
import torch
from torch.func import vmap
from torch.utils._pytree import tree_flatten, tree_map

from learned_opt import ArchConfig, load_weights, native
from learned_opt.functional import population_step
from learned_opt.functional import init_state, lopt_step

CFG = ArchConfig()
# element counts off the kernel's 3-row groups, 24-row tiles and 2048-row blocks; a 0-d tensor
SHAPES = [(20, 30), (31,), (7, 3, 5), (), (5000,)]
M = 4


def _stack(trees):
    return tree_map(lambda *xs: torch.stack(xs), *trees)


def _population(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = load_weights("adam-like-init-v0")[0].weights()
    ws = [{k: (v.detach() + 0.05 * torch.randn(v.shape, generator=g)).to(dtype) for k, v in base.items()}
          for _ in range(M)]
    ps = [[torch.randn(s, generator=g, dtype=dtype) for s in SHAPES] for _ in range(M)]
    return ws, ps, [init_state(ws[i], ps[i], CFG) for i in range(M)]


def _grads(step, dtype):
    g = torch.Generator().manual_seed(100 + step)
    grads = [torch.randn(M, *s, generator=g, dtype=dtype) * (step + 1) for s in SHAPES]
    losses = torch.rand(M, generator=g, dtype=torch.float64) + 3.0 / (step + 1)
    return grads, losses


def _worst(a, b):
    la, _ = tree_flatten(a)
    lb, _ = tree_flatten(b)
    assert len(la) == len(lb)
    return max(float((x - y).abs().max() / (y.abs().max() + 1e-30)) for x, y in zip(la, lb))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("use_native", [False, True])
@pytest.mark.parametrize("pass_loss", [True, False])
def test_population_step_equals_vmap_of_lopt_step(dtype, tol, use_native, pass_loss):
    ws, ps, ss = _population(dtype)
    W, P, S = _stack(ws), _stack(ps), _stack(ss)
    Pv, Sv = P, S
    f = vmap(lambda w, p, g, s, loss: lopt_step(w, p, g, s, loss=loss if pass_loss else None, lr=1e-2, cfg=CFG))
    for step in range(5):
        G, losses = _grads(step, dtype)
        with torch.no_grad():
            P, S = population_step(W, P, G, S, loss=losses if pass_loss else None, lr=1e-2, cfg=CFG,
                                   native=use_native)
        Pv, Sv = f(W, Pv, G, Sv, losses)
        assert _worst((P, S), (Pv, Sv)) < tol, step
        assert all(x.dtype == dtype for x in P)


def test_population_step_equals_the_reference_member_by_member():
    ws, ps, ss = _population(torch.float64, seed=1)
    W, P, S = _stack(ws), _stack(ps), _stack(ss)
    for step in range(4):
        G, losses = _grads(step, torch.float64)
        loss = losses if step % 2 == 0 else None  # with and without the loss
        P, S = population_step(W, P, G, S, loss=loss, lr=3e-3, cfg=CFG)
        for i in range(M):
            ps[i], ss[i] = lopt_step(ws[i], ps[i], [x[i] for x in G], ss[i], lr=3e-3, cfg=CFG,
                                     loss=None if loss is None else loss[i], impl="reference")
    assert _worst((P, S), (_stack(ps), _stack(ss))) < 1e-11


@pytest.mark.parametrize("use_native", [False, True])
def test_weight_decay_and_maximize_take_the_drop_in_steps_meaning(use_native):
    """One orchestration serves both steps: with weight decay, per-tensor lr and maximize the
    population step equals the drop-in step member by member, on the fast path and (the same
    signature, impl="reference") on the reference."""
    ws, ps, ss = _population(torch.float32, seed=4)
    W, P, S = _stack(ws), _stack(ps), _stack(ss)
    R = (P, S)
    lrs = [1e-3 * (t + 1) for t in range(len(SHAPES))]
    kw = dict(lr=lrs, weight_decay=0.1, maximize=True, cfg=CFG)
    for step in range(3):
        G, losses = _grads(step, torch.float32)
        with torch.no_grad():
            P, S = population_step(W, P, G, S, loss=losses, native=use_native, **kw)
            R = population_step(W, *R[:1], G, R[1], loss=losses, impl="reference", **kw)
        for i in range(M):
            ps[i], ss[i] = lopt_step(ws[i], ps[i], [x[i] for x in G], ss[i], loss=losses[i], **kw)
    assert _worst((P, S), (_stack(ps), _stack(ss))) < 1e-5
    assert _worst(R, (_stack(ps), _stack(ss))) < 1e-5


@pytest.mark.parametrize("use_native", [False, True])
def test_population_step_leaves_its_inputs_alone(use_native):
    ws, ps, ss = _population(torch.float32, seed=2)
    W, P, S = _stack(ws), _stack(ps), _stack(ss)
    before = tree_map(torch.clone, (W, P, S))
    G, losses = _grads(0, torch.float32)
    with torch.no_grad():
        population_step(W, P, G, S, loss=losses, cfg=CFG, native=use_native)
    assert _worst((W, P, S), before) == 0


def test_the_compiled_member_loop_is_used_and_matches_the_batched_matmuls():
    if not native.enabled() or native.get() is None:
        pytest.skip("no compiled kernel here: " + native.status())
    ws, ps, ss = _population(torch.float32, seed=3)
    W, P, S = _stack(ws), _stack(ps), _stack(ss)
    G, losses = _grads(1, torch.float32)
    calls = []
    kernel = native.get()

    class Spy:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(kernel, name)

    import learned_opt.batched as batched
    real = batched.native.get
    batched.native.get = lambda wait=True: Spy()
    try:
        with torch.no_grad():
            fast = population_step(W, P, G, S, loss=losses, cfg=CFG, native=True)
    finally:
        batched.native.get = real
    with torch.no_grad():
        plain = population_step(W, P, G, S, loss=losses, cfg=CFG, native=False)
    assert calls.count("mlp_pass_members") == len(SHAPES) and calls.count("stats_pass_members") == len(SHAPES)
    assert _worst(fast, plain) < 1e-5


def test_bad_population_inputs_are_refused():
    ws, ps, ss = _population(torch.float32)
    W, P, S = _stack(ws), _stack(ps), _stack(ss)
    G, _ = _grads(0, torch.float32)
    with pytest.raises(ValueError, match="member dimension"):
        population_step(W, P, [G[0][:2]] + G[1:], S, cfg=CFG)
    with pytest.raises(ValueError, match="params"):
        population_step(W, P, G[:-1], S, cfg=CFG)
    with pytest.raises(ValueError, match="lr has"):
        population_step(W, P, G, S, lr=[1e-3, 1e-3], cfg=CFG)
