"""The eps of ``1/sqrt(v + eps)`` in the features (``ArchConfig.rms_eps``): it travels with saved
weights, every implementation of the step uses it, it decides whether small gradients look like
a noise floor, and meta-training can start on another one."""

import json

import pytest
import torch
from torch.utils._pytree import tree_flatten, tree_map

from helpers import random_weights
from learned_opt import ArchConfig, load_weights, native, save_weights
from learned_opt.functional import population_step
from learned_opt.features import element_columns
from learned_opt.functional import init_state, lopt_step

V2 = "rnn-mlp-pes-abs-v2"
SMALL = 1e-10
SHAPES = [(4097,), (70, 65), (7, 3), ()]


def test_another_eps_keeps_the_weights_and_is_saved(tmp_path):
    net = load_weights(V2)[0]
    moved = net.with_rms_eps(SMALL)
    assert moved.config.rms_eps == SMALL and net.config.rms_eps == 1e-6
    assert moved.with_rms_eps(SMALL) is moved
    w0, w1 = net.weights(), moved.weights()
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    save_weights(moved, tmp_path / "w.safetensors", "eps-test")
    back, info = load_weights(tmp_path / "w.safetensors")
    assert info.config.rms_eps == SMALL == back.config.rms_eps


@pytest.mark.parametrize("bad", [0.0, -1e-8, float("inf"), float("nan")])
def test_bad_eps_are_refused(bad):
    with pytest.raises(ValueError, match="rms_eps"):
        ArchConfig(rms_eps=bad)
    with pytest.raises(ValueError, match="norm_eps"):
        ArchConfig(norm_eps=bad)
    with pytest.raises(ValueError, match="rms_eps"):
        random_weights(seed=1).with_rms_eps(bad)


def test_small_gradients_look_like_noise_only_under_a_large_eps():
    # a gradient of 1e-4 that never changes: its averaged gradient stands fully above its noise,
    # m/sqrt(v) = sqrt(1 - b^t) without eps; with eps 1e-6 the column reads at least 9x less
    # (v = (1 - b^t) 1e-8 is at most 1e-8 against eps 1e-6; at least 3.9e-9 against 1e-10)
    b = torch.tensor(ArchConfig().decays, dtype=torch.float64)
    g = torch.full((5,), 1e-4, dtype=torch.float64)
    t = 5000  # the accumulators after t steps of it, in closed form
    m = (1 - b ** t) * g.unsqueeze(-1)
    v = (1 - b ** t) * (g * g).unsqueeze(-1)
    exact = torch.sqrt(1 - b ** t)
    for eps, lo, hi in ((1e-6, 0.0, 0.11), (SMALL, 0.98, 1.0)):
        cfg = ArchConfig(rms_eps=eps)
        a, z = cfg.snr_column_range
        ratio = element_columns(g, g, m, v, cfg)[:, a:z] / exact
        assert lo < ratio.min() and ratio.max() <= hi, (eps, ratio)


def _worst(a, b):
    """Largest relative difference between two pytrees' floating tensors."""
    fa, _ = tree_flatten(a)
    fb, _ = tree_flatten(b)
    return max(((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item()
               for x, y in zip(fa, fb) if y.numel() and x.is_floating_point())


def _step(w, ps, grads, st, impl, native_on, monkeypatch, cfg):
    monkeypatch.setenv("LEARNED_OPT_NATIVE", "auto" if native_on else "0")
    st = tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, st)
    with torch.no_grad():
        return lopt_step(w, [p.clone() for p in ps], grads, st, loss=torch.tensor(1e-4), impl=impl,
                         chunk_size=1000, cfg=cfg)


@pytest.mark.parametrize("native_on", [False, True])
def test_fast_paths_equal_the_reference_on_small_gradients(native_on, monkeypatch):
    if native_on and (not native.enabled() or native.get() is None):
        pytest.skip("the native kernel is off or did not build here")
    gen = torch.Generator().manual_seed(0)
    ps = [torch.randn(s, generator=gen) * 0.1 for s in SHAPES]
    outs = {}
    for eps in (1e-6, SMALL):
        net = load_weights(V2)[0].with_rms_eps(eps)
        w = {k: v.detach() for k, v in net.weights().items()}
        cfg = net.config
        st_f = st_r = init_state(w, ps, cfg)
        pf = pr = ps
        worst = 0.0
        for t in range(8):
            g = torch.Generator().manual_seed(100 + t)
            grads = [3e-5 * torch.randn(s, generator=g) for s in SHAPES]  # v ~ 1e-9: below 1e-6
            pf, st_f = _step(w, pf, grads, st_f, "fast", native_on, monkeypatch, cfg)
            pr, st_r = _step(w, pr, grads, st_r, "reference", False, monkeypatch, cfg)
            worst = max(worst, _worst((pf, st_f), (pr, st_r)))
        assert worst < 1e-5, (eps, worst)
        outs[eps] = pf
    # the eps reached the update: the two networks moved the parameters differently
    change = max((a - b).abs().max().item() for a, b in zip(outs[1e-6], outs[SMALL]))
    moved = max((a - b).abs().max().item() for a, b in zip(outs[SMALL], ps))
    assert change > 0.05 * moved > 0


@pytest.mark.parametrize("use_native", [False, True])
def test_the_population_step_uses_the_eps(use_native):
    net = load_weights(V2)[0].with_rms_eps(SMALL)
    cfg = net.config
    gen = torch.Generator().manual_seed(3)
    M = 3
    ws = [{k: (v.detach() + 0.02 * torch.randn(v.shape, generator=gen)).double()
           for k, v in net.weights().items()} for _ in range(M)]
    ps = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES] for _ in range(M)]
    ss = [init_state(ws[i], ps[i], cfg) for i in range(M)]
    stack = lambda trees: tree_map(lambda *xs: torch.stack(xs), *trees)  # noqa: E731
    W, P, S = stack(ws), stack(ps), stack(ss)
    for step in range(4):
        G = [1e-5 * torch.randn(M, *s, generator=gen, dtype=torch.float64) for s in SHAPES]
        P, S = population_step(W, P, G, S, loss=None, lr=1e-3, cfg=cfg, native=use_native)
        for i in range(M):
            ps[i], ss[i] = lopt_step(ws[i], ps[i], [x[i] for x in G], ss[i], lr=1e-3, cfg=cfg,
                                     impl="reference")
    tol = 1e-5 if use_native else 1e-11  # the kernel computes in float32
    assert _worst((P, S), (stack(ps), stack(ss))) < tol


def test_meta_training_starts_on_another_eps():
    from meta_train.__main__ import _add_train_args
    from meta_train.distributed import config_from_args
    from meta_train.trainer import MetaTrainConfig, initial_theta
    import argparse

    theta, cfg = initial_theta(V2, snr_stats=True, absolute_snr=True, rms_eps=SMALL)
    assert cfg.rms_eps == SMALL and cfg.absolute_snr
    assert all(torch.equal(theta[k], v) for k, v in load_weights(V2)[0].weights().items())
    assert initial_theta(V2, snr_stats=True, absolute_snr=True)[1].rms_eps == 1e-6  # 0: the weights' own
    assert initial_theta("random", rms_eps=1e-9)[1].rms_eps == 1e-9
    with pytest.raises(ValueError, match="rms_eps"):
        MetaTrainConfig(arch={"rms_eps": -1.0}).validate()
    # configs written before the option existed read as "the weights' own eps"
    old = json.loads(MetaTrainConfig().to_json())
    del old["arch"]
    assert "rms_eps" not in MetaTrainConfig.from_json(json.dumps(old)).arch
    ap = argparse.ArgumentParser()
    _add_train_args(ap)
    args = ap.parse_args(["--out", "x", "--rms-eps", "1e-10"])
    assert config_from_args(args).arch == {"rms_eps": SMALL}
