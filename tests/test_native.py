"""The compiled CPU kernel (learned_opt/csrc/mlp_pass.cpp) against the plain-PyTorch fast path
and the readable reference, and its fallback when it cannot be built.

Shapes are chosen to hit the kernel's edges: element counts that are not multiples of its
3-row groups, of its 24-row tiles or of its 2048-row blocks, and a tensor spanning several
blocks; small tensors stay on the PyTorch path beside them. The kernel's own vector log and
exp are checked at the edges of their ranges, where it hands lanes to the C library."""

import warnings

import pytest
import torch
from torch.utils._pytree import tree_flatten, tree_map

from helpers import random_weights
from learned_opt import ArchConfig, LearnedOptimizer, load_weights, native
from learned_opt.functional import init_state, lopt_step, observe_validation_loss

SHAPES = [(4097,), (70, 65), (3, 1531), (5000,), (33,), (7, 3), ()]

pytestmark = pytest.mark.skipif(not native.enabled(), reason="LEARNED_OPT_NATIVE=0")


def _kernel():
    mod = native.get()
    if mod is None:
        pytest.skip("the native kernel did not build on this machine: " + native.status())
    return mod


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g) * 0.1 for s in SHAPES]
    targets = [torch.randn(s, generator=g) * 0.1 for s in SHAPES]
    scales = [torch.rand(s, generator=g) * 3 + 0.1 for s in SHAPES]
    return params, targets, scales


def _grads(ps, targets, scales, t):
    g = torch.Generator().manual_seed(100 + t)
    return [s * (p - q) + 0.01 * torch.randn(p.shape, generator=g) for p, q, s in zip(ps, targets, scales)]


def _step(w, ps, grads, st, loss, impl, inplace, native_on, monkeypatch, cfg=None):
    monkeypatch.setenv("LEARNED_OPT_NATIVE", "auto" if native_on else "0")
    ps = [p.clone() for p in ps]
    st = tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, st)  # in place: use copies
    with torch.no_grad():
        return lopt_step(w, ps, grads, st, loss=loss, impl=impl, inplace=inplace, chunk_size=1000, cfg=cfg)


@pytest.mark.parametrize("which", ["default", "random", "random-dual-snr", "random-magnitude-rate"])
def test_kernel_step_equals_torch_path_and_reference_along_a_trajectory(which, monkeypatch):
    _kernel()
    net = {"default": lambda: load_weights()[0], "random": random_weights,
           "random-dual-snr": lambda: random_weights(config=ArchConfig(dual_snr=True)),
           "random-magnitude-rate": lambda: random_weights(config=ArchConfig(magnitude_rate=0.5))}[which]()
    w = {k: v.detach() for k, v in net.weights().items()}
    ps, targets, scales = _problem()
    cfg = net.config
    st = init_state(w, ps, cfg)
    worst_ref = worst_torch = 0.0
    for t in range(30):
        grads = _grads(ps, targets, scales, t)
        loss = torch.tensor(1.0 / (1 + t))
        nat = _step(w, ps, grads, st, loss, "fast", True, True, monkeypatch, cfg)
        tor = _step(w, ps, grads, st, loss, "fast", True, False, monkeypatch, cfg)
        ref = _step(w, ps, grads, st, loss, "reference", False, False, monkeypatch, cfg)
        (_, sn), (_, s_t), (pr, sr) = nat, tor, ref
        # the accumulators are updated with the same roundings: bit for bit
        for a, b in zip(sn.tensors, s_t.tensors):
            assert torch.equal(a.mom, b.mom) and torch.equal(a.rms, b.rms)
        fn, _ = tree_flatten(nat)
        ft, _ = tree_flatten(tor)
        fr, _ = tree_flatten(ref)
        rel = lambda a, b: max(((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item()  # noqa: E731
                               for x, y in zip(a, b) if y.numel() and x.is_floating_point())
        worst_torch, worst_ref = max(worst_torch, rel(fn, ft)), max(worst_ref, rel(fn, fr))
        ps, st = pr, sr
        if t % 10 == 0:
            st = observe_validation_loss(st, loss * 1.1, cfg)
    moved = max((a - b).abs().max().item() for a, b in zip(ps, _problem()[0]))
    assert moved > 1e-3
    assert worst_torch < 1e-5, worst_torch
    assert worst_ref < 1e-5, worst_ref


def test_optimizer_uses_the_kernel_and_matches_it_switched_off(monkeypatch):
    _kernel()
    out = {}
    for mode in ("auto", "0"):
        monkeypatch.setenv("LEARNED_OPT_NATIVE", mode)
        ps, targets, scales = _problem(1)
        ps = [torch.nn.Parameter(p) for p in ps]
        opt = LearnedOptimizer(ps)
        for t in range(5):
            for p, g in zip(ps, _grads([p.detach() for p in ps], targets, scales, t)):
                p.grad = g
            opt.step(loss=1.0)
        out[mode] = [p.detach().clone() for p in ps]
    # compared in units of how far each tensor moved: the kernel and PyTorch sum the MLP's
    # products in different orders, so their updates agree to float32 rounding of the update
    # (about 1e-6 of it per step, up to 1.4e-5 measured over these 5 steps with either shipped
    # default), not of the parameter
    for a, b, start in zip(out["auto"], out["0"], _problem(1)[0]):
        moved = (b - start).abs().max()
        assert moved > 1e-4
        assert (a - b).abs().max() <= 5e-5 * moved, ((a - b).abs().max() / moved).item()


def test_kernel_is_not_used_under_autograd_or_for_float64(monkeypatch):
    calls = []
    mod = _kernel()

    class Spy:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(mod, name)

    monkeypatch.setattr(native, "get", lambda wait=True: Spy())
    net = load_weights()[0]
    w, cfg = {k: v.detach() for k, v in net.weights().items()}, net.config
    ps, targets, scales = _problem()
    grads = _grads(ps, targets, scales, 0)
    lopt_step(w, ps, grads, init_state(w, ps, cfg), inplace=False, cfg=cfg)  # functional: never the kernel
    ps64 = [p.double() for p in ps]
    with torch.no_grad():
        lopt_step({k: v.double() for k, v in w.items()}, ps64, [g.double() for g in grads],
                  init_state(w, ps64, cfg), inplace=True, cfg=cfg)
    assert calls == []
    with torch.no_grad():
        lopt_step(w, [p.clone() for p in ps], grads, init_state(w, ps, cfg), inplace=True, cfg=cfg)
    assert "mlp_pass" in calls and "stats_pass" in calls


def test_a_failed_build_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setenv("LEARNED_OPT_NATIVE", "auto")
    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setattr(native, "_failed", None)

    def broken():
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(native, "_build", broken)
    ps, targets, scales = _problem(2)
    ps = [torch.nn.Parameter(p) for p in ps]
    opt = LearnedOptimizer(ps)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in range(2):
            for p, g in zip(ps, _grads([p.detach() for p in ps], targets, scales, t)):
                p.grad = g
            opt.step()
    msgs = [str(c.message) for c in caught if "native CPU kernel" in str(c.message)]
    assert len(msgs) == 1 and "no compiler here" in msgs[0]
    assert native.status().startswith("failed")
    assert all(torch.isfinite(p).all() for p in ps)

    monkeypatch.setattr(native, "_failed", None)
    monkeypatch.setenv("LEARNED_OPT_NATIVE", "1")  # asked for explicitly: an error, not a fallback
    with pytest.raises(RuntimeError, match="did not build"):
        opt.step()


def test_a_nan_gradient_spreads_as_in_the_torch_path(monkeypatch):
    """The optimizer skips steps with non-finite gradients, but the functional step must still
    treat NaN as the PyTorch path does (the clip lets it through) rather than hide it."""
    _kernel()
    net = load_weights()[0]
    w, cfg = {k: v.detach() for k, v in net.weights().items()}, net.config
    ps, targets, scales = _problem(3)
    grads = _grads(ps, targets, scales, 0)
    grads[0][17] = float("nan")
    st = init_state(w, ps, cfg)
    (pn, sn), (pt, s_t) = [_step(w, ps, grads, st, None, "fast", True, on, monkeypatch, cfg) for on in (True, False)]
    for a, b in zip(sn.tensors, s_t.tensors):
        assert torch.equal(a.mom.isnan(), b.mom.isnan()) and torch.equal(a.rms.isnan(), b.rms.isnan())
    assert sn.tensors[0].mom[17].isnan().all()
    for a, b in zip(pn, pt):
        assert torch.equal(a.isnan(), b.isnan())


@pytest.mark.parametrize("mag_bias", [0.0, 8.6e4, -8.6e4, 9e4, -9e4, 1.2e5])
def test_extreme_parameters_and_step_sizes_match_the_torch_path(mag_bias, monkeypatch):
    """Parameters of every magnitude (zero, subnormal, tiny, large) go through the kernel's
    vector log; magnitude outputs that push exp past float's range (rate 0.001 times
    a bias near 9e4) go through its fallback, to inf or a subnormal as in PyTorch."""
    _kernel()
    net = load_weights()[0]
    w, cfg = {k: v.detach().clone() for k, v in net.weights().items()}, net.config
    w["mlp_b2"][1] += mag_bias
    ps, targets, scales = _problem(5)
    special = torch.tensor([0.0, -0.0, 1e-45, -1e-40, 1e-38, 1e15, -1e15, 1e-8, 1.0, -7.5])
    ps[0][: special.numel()] = special
    grads = _grads(ps, targets, scales, 0)
    st = init_state(w, ps, cfg)
    (pn, sn), (pt, s_t) = [_step(w, ps, grads, st, None, "fast", True, on, monkeypatch, cfg) for on in (True, False)]
    for a, b in zip(pn, pt):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf())
        fin = a.isfinite() & b.isfinite()
        if fin.any():  # as in the trajectory test: error relative to the tensor's largest value
            err = ((a[fin] - b[fin]).abs().max() / b[fin].abs().max().clamp_min(1e-30)).item()
            assert err < 1e-5, err
    if abs(mag_bias) < 8e4:
        assert all(bool(torch.isfinite(a).all()) for a in pn[1:])


def test_the_native_argument_overrides_the_environment(monkeypatch):
    """One place decides: lopt_step's ``native`` argument, the environment variable only when it
    is None."""
    kernel = _kernel()
    calls = []

    class Spy:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(kernel, name)

    monkeypatch.setattr(native, "get", lambda wait=True: Spy())
    w = {k: v.detach() for k, v in load_weights()[0].weights().items()}
    ps, targets, scales = _problem(2)
    used = {}
    for env, arg in (("0", True), ("auto", False), ("auto", None), ("0", None)):
        monkeypatch.setenv("LEARNED_OPT_NATIVE", env)
        calls.clear()
        st = init_state(w, ps, load_weights()[0].config)
        with torch.no_grad():
            lopt_step(w, [p.clone() for p in ps], _grads(ps, targets, scales, 0), st, loss=1.0, inplace=True,
                      chunk_size=1000, cfg=load_weights()[0].config, native=arg)
        used[(env, arg)] = "stats_pass" in calls
    assert used == {("0", True): True, ("auto", False): False, ("auto", None): True, ("0", None): False}
