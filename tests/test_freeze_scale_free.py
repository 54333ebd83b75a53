"""Two architecture options against weight inflation and loss-scale dependence:
``ArchConfig.freeze_untouched`` (an element that never had a non-zero gradient takes no step)
and ``ArchConfig.scale_free`` (the step does not depend on the loss's scale). Every
implementation of the step computes both, and equals the reference."""


import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from helpers import random_weights
from learned_opt import ArchConfig, LearnedOptimizer, native
from learned_opt.functional import population_step
from learned_opt.functional import init_state, lopt_step

EPS = dict(rms_eps=1e-10)  # the default weights' eps
BOTH = ArchConfig(snr_stats=True, absolute_snr=True, freeze_untouched=True, scale_free=True, **EPS)
SHAPES = [(4097,), (70, 65), (7, 3), ()]


def _net(cfg=BOTH, seed=5):
    return random_weights(seed=seed, config=cfg)


def _worst(a, b):
    fa, _ = tree_flatten(a)
    fb, _ = tree_flatten(b)
    return max(((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item()
               for x, y in zip(fa, fb) if y.numel() and x.is_floating_point())


def _grads(t, scale=1.0, dead=True):
    """Gradients where row 0..9 of the matrix and the first 100 entries of the vector are
    always exactly zero."""
    g = torch.Generator().manual_seed(100 + t)
    out = [scale * 1e-3 * torch.randn(s, generator=g) for s in SHAPES]
    if dead:
        out[0][:100] = 0
        out[1][:10] = 0
    return out


def _params():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=gen) * 0.1 for s in SHAPES]


def _run(w, cfg, impl, native_on, monkeypatch, steps=6, scale=1.0, loss=True):
    monkeypatch.setenv("LEARNED_OPT_NATIVE", "auto" if native_on else "0")
    ps = _params()
    st = init_state(w, ps, cfg)
    for t in range(steps):
        with torch.no_grad():
            ps, st = lopt_step(w, ps, _grads(t, scale), st, impl=impl, chunk_size=1000, cfg=cfg, inplace=True,
                               loss=torch.tensor(scale * (2.0 - 0.1 * t)) if loss else None)
    return ps, st


UNIT = ArchConfig(snr_stats=True, absolute_snr=True, freeze_untouched=True, scale_free=True, unit_rms_update=True,
                  **EPS)


@pytest.mark.parametrize("cfg", [BOTH, UNIT], ids=["freeze+scale_free", "with unit_rms_update"])
@pytest.mark.parametrize("native_on", [False, True])
def test_fast_paths_equal_the_reference(native_on, cfg, monkeypatch):
    if native_on and (not native.enabled() or native.get() is None):
        pytest.skip("the native kernel is off or did not build here")
    w = {k: v.detach() for k, v in _net(cfg).weights().items()}
    pf, sf = _run(w, cfg, "fast", native_on, monkeypatch)
    pr, sr = _run(w, cfg, "reference", False, monkeypatch)
    assert _worst((pf, sf), (pr, sr)) < 1e-5


def test_unit_rms_steps_have_rms_lr_per_tensor(monkeypatch):
    w = {k: v.detach() for k, v in _net(UNIT).weights().items()}
    start = _params()
    ps, _ = _run(w, UNIT, "fast", True, monkeypatch, steps=1)
    for a, b, dead in zip(ps, start, (100, 10, 0, 0)):
        moved = (a - b).flatten()[dead:] if a.dim() < 2 else (a - b)[dead:].flatten()
        if moved.numel() > 1:  # magnitude path at rate 1e-3: within a few percent of lr
            assert moved.pow(2).mean().sqrt().item() == pytest.approx(1e-3, rel=0.05)


def test_untouched_elements_do_not_move_and_the_others_do(monkeypatch):
    w = {k: v.detach() for k, v in _net().weights().items()}
    start = _params()
    for impl in ("reference", "fast"):
        ps, _ = _run(w, BOTH, impl, True, monkeypatch)
        assert torch.equal(ps[0][:100], start[0][:100]) and torch.equal(ps[1][:10], start[1][:10])
        assert (ps[0][100:] != start[0][100:]).float().mean() > 0.99
        assert (ps[1][10:] != start[1][10:]).float().mean() > 0.99
    # the option is what freezes them: without it the same network moves them
    loose = _net(ArchConfig(snr_stats=True, absolute_snr=True, scale_free=True, **EPS))
    ps, _ = _run({k: v.detach() for k, v in loose.weights().items()}, loose.config, "fast", True, monkeypatch)
    assert (ps[0][:100] != start[0][:100]).all()


@pytest.mark.parametrize("cfg", [BOTH, UNIT], ids=["freeze+scale_free", "with unit_rms_update"])
@pytest.mark.parametrize("use_native", [False, True])
def test_the_population_step_equals_the_reference(use_native, cfg):
    if use_native and (not native.enabled() or native.get() is None):
        pytest.skip("the native kernel is off or did not build here")
    BOTH = cfg  # noqa: N806 - the configuration under test
    net = _net(cfg)
    gen = torch.Generator().manual_seed(3)
    M = 3
    ws = [{k: v.detach() + 0.02 * torch.randn(v.shape, generator=gen) for k, v in net.weights().items()}
          for _ in range(M)]
    ps = [_params() for _ in range(M)]
    ss = [init_state(ws[i], ps[i], BOTH) for i in range(M)]
    stack = lambda trees: tree_map(lambda *xs: torch.stack(xs), *trees)  # noqa: E731
    W, P, S = stack(ws), stack(ps), stack(ss)
    for t in range(4):
        G = [torch.stack(x) for x in zip(*[_grads(t, scale=10.0 ** i) for i in range(M)])]
        loss = torch.tensor([1.0, 0.5, 2.0]) * (1 - 0.1 * t)
        with torch.no_grad():
            P, S = population_step(W, P, G, S, loss=loss, lr=1e-3, cfg=BOTH, native=use_native)
            for i in range(M):
                ps[i], ss[i] = lopt_step(ws[i], ps[i], [x[i] for x in G], ss[i], lr=1e-3, cfg=BOTH,
                                         loss=loss[i], impl="reference")
    assert _worst((P, S), (stack(ps), stack(ss))) < 1e-5
    assert torch.equal(P[0][:, :100], stack(_params() for _ in range(M))[0][:, :100])


@pytest.mark.parametrize("scale", [1e-2, 1e2])
def test_scale_free_steps_do_not_depend_on_the_loss_scale(scale, monkeypatch):
    w = {k: v.detach() for k, v in _net().weights().items()}
    base, _ = _run(w, BOTH, "fast", False, monkeypatch, steps=10)
    scaled, _ = _run(w, BOTH, "fast", False, monkeypatch, steps=10, scale=scale)
    start = _params()
    moved = max((b - s).abs().max().item() for b, s in zip(base, start))
    diff = max((b - s).abs().max().item() for b, s in zip(base, scaled))
    assert moved > 1e-4 and diff < 1e-4 * moved, (moved, diff)
    # the same network without the option does depend on it
    plain_cfg = ArchConfig(snr_stats=True, absolute_snr=True, freeze_untouched=True, **EPS)
    plain = {k: v.detach() for k, v in _net(plain_cfg).weights().items()}
    a, _ = _run(plain, plain_cfg, "fast", False, monkeypatch, steps=10)
    b, _ = _run(plain, plain_cfg, "fast", False, monkeypatch, steps=10, scale=scale)
    assert max((x - y).abs().max().item() for x, y in zip(a, b)) > 0.05 * moved


def test_scale_free_gradients_are_in_units_of_the_first_non_zero_one():
    from learned_opt.features import gradient_factor
    net = _net()
    p = [torch.zeros(100), torch.zeros(10)]
    st = init_state(net, p, BOTH)
    assert st.glob.grad_ref.item() == 0
    _, st = lopt_step(net, p, [torch.zeros(100), torch.zeros(10)], st)  # all zero: no scale yet
    assert st.glob.grad_ref.item() == 0
    g = [torch.full((100,), 3e-7), torch.full((10,), 4e-7)]
    _, st = lopt_step(net, p, g, st)
    assert st.glob.grad_ref.item() == pytest.approx(((9e-14 + 16e-14) / 2) ** 0.5, rel=1e-6)
    _, st2 = lopt_step(net, p, [x * 100 for x in g], st)  # later gradients do not move it
    assert torch.equal(st2.glob.grad_ref, st.glob.grad_ref)
    glob, factor = gradient_factor(st.glob, torch.tensor(1.0, dtype=torch.float64), BOTH)
    assert factor.item() == pytest.approx(BOTH.grad_reference / st.glob.grad_ref.item())


@pytest.mark.parametrize("default", [False, True], ids=["random weights with the option", "the shipped default"])
def test_optimizer_with_zero_gradients_changes_nothing(default):
    net = None if default else _net()  # None: LearnedOptimizer's default weights
    model = nn.Sequential(nn.Embedding(20, 8, padding_idx=0), nn.Flatten(), nn.Linear(24, 3))
    before = [p.detach().clone() for p in model.parameters()]
    opt = LearnedOptimizer(model.parameters(), weights=net)
    for _ in range(20):
        opt.zero_grad()
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step(loss=1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # the padding row of an embedding trained on real data keeps its (zero) value
    gen = torch.Generator().manual_seed(1)
    for _ in range(30):
        x = torch.randint(0, 20, (16, 3), generator=gen)
        loss = nn.functional.cross_entropy(model(x), torch.randint(0, 3, (16,), generator=gen))
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss)
    emb = model[0].weight
    assert torch.equal(emb[0], torch.zeros(8)) and not torch.equal(emb[1:], before[0][1:])


def test_options_travel_with_the_weights(tmp_path):
    from learned_opt import load_weights, save_weights
    net = random_weights(seed=2).with_options(freeze_untouched=True, scale_free=True)
    assert net.config.freeze_untouched and net.config.scale_free
    with pytest.raises(ValueError, match="grad_reference"):
        ArchConfig(scale_free=True, grad_reference=0.0)
    assert net.with_options(scale_free=True) is net
    with pytest.raises(ValueError, match="with_options"):
        net.with_options(rms_eps=1.0)
    save_weights(net, tmp_path / "w.safetensors", "options")
    back, info = load_weights(tmp_path / "w.safetensors")
    assert back.config == net.config


def test_meta_training_takes_the_options():
    import argparse

    from meta_train.__main__ import _add_train_args
    from meta_train.distributed import config_from_args
    from meta_train.trainer import initial_theta
    ap = argparse.ArgumentParser()
    _add_train_args(ap)
    c = config_from_args(ap.parse_args(["--out", "x", "--freeze-untouched", "--scale-free"]))
    assert c.arch == {"freeze_untouched": True, "scale_free": True}
    _, cfg = initial_theta("random", freeze_untouched=True, scale_free=True)
    assert cfg.freeze_untouched and cfg.scale_free
