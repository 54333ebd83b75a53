"""``ArchConfig.sign_tolerance``: the sign of a tensor's mean that rounding decides reads 0, so a
rounding-level change of the gradients stops flipping LSTM inputs; every implementation
computes it and equals the reference."""

import pytest
import torch
from torch.utils._pytree import tree_flatten

from helpers import random_weights
from learned_opt import ArchConfig, native
from learned_opt.features import lstm_statistics
from learned_opt.functional import init_state, lopt_step

TOL = ArchConfig(snr_stats=True, absolute_snr=True, freeze_untouched=True, scale_free=True, rms_eps=1e-10,
                 sign_tolerance=1e-4)
PLAIN = ArchConfig(snr_stats=True, absolute_snr=True, freeze_untouched=True, scale_free=True, rms_eps=1e-10)
SHAPES = [(64, 20), (10,), (5000,)]


def _grads(t, flip=False):
    """Gradients whose second tensor (a softmax output bias) has mean zero up to rounding; with
    ``flip`` that rounding-level mean changes sign."""
    g = torch.Generator().manual_seed(10 + t)
    out = [1e-2 * torch.randn(s, generator=g) for s in SHAPES]
    bias = out[1] - out[1].mean()
    out[1] = bias + (-1e-9 if flip else 1e-9)
    return out


def _run(cfg, impl="fast", flip_at=None, steps=5, native_on=True, monkeypatch=None):
    if monkeypatch is not None:
        monkeypatch.setenv("LEARNED_OPT_NATIVE", "auto" if native_on else "0")
    w = {k: v.detach() for k, v in random_weights(seed=3, config=cfg).weights().items()}
    gen = torch.Generator().manual_seed(0)
    ps = [0.1 * torch.randn(s, generator=gen) for s in SHAPES]
    st = init_state(w, ps, cfg)
    for t in range(steps):
        with torch.no_grad():
            ps, st = lopt_step(w, ps, _grads(t, flip=t == flip_at), st, loss=2.0 - 0.1 * t, cfg=cfg, impl=impl,
                               inplace=impl == "fast")
    return ps, st


def _worst(a, b):
    fa, _ = tree_flatten(a)
    fb, _ = tree_flatten(b)
    return max(((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item()
               for x, y in zip(fa, fb) if y.numel() and x.is_floating_point())


@pytest.mark.parametrize("native_on", [False, True])
def test_fast_paths_equal_the_reference(native_on, monkeypatch):
    if native_on and (not native.enabled() or native.get() is None):
        pytest.skip("the native kernel is off or did not build here")
    fast = _run(TOL, "fast", flip_at=2, native_on=native_on, monkeypatch=monkeypatch)
    ref = _run(TOL, "reference", flip_at=2, monkeypatch=monkeypatch)
    assert _worst(fast, ref) < 1e-5


def test_a_mean_within_rounding_of_zero_reads_sign_zero():
    zero = torch.zeros((), dtype=torch.float64)
    # raw statistics: mean/var of m, of v, of p, sum of squares of p and of g
    raw = torch.tensor([[1e-9, 1e-4, 1e-4, 1e-8, 3e-2, 1e-2, 4.0, 1e-2]], dtype=torch.float64)
    with_tol = lstm_statistics(raw, [torch.Size([10])], zero, zero, TOL)
    without = lstm_statistics(raw, [torch.Size([10])], zero, zero, PLAIN)
    assert without[0, 1] == 1.0 and with_tol[0, 1] == 0.0  # |mean m| = 1e-9 << 1e-4 x RMS 1e-2
    assert with_tol[0, 4] == 1.0 and with_tol[0, 7] == 1.0  # means well above the tolerance keep their sign
    assert torch.equal(torch.cat([with_tol[0, :1], with_tol[0, 2:]]), torch.cat([without[0, :1], without[0, 2:]]))


def test_a_rounding_level_sign_flip_no_longer_changes_the_run():
    """The same run with the bias gradient's rounding-level mean flipped at one step: without
    the tolerance the runs part by far more than the 2e-9 change of the gradients; with it they
    stay together."""
    moved = {}
    for name, cfg in (("plain", PLAIN), ("tol", TOL)):
        base, _ = _run(cfg, flip_at=None)
        flipped, _ = _run(cfg, flip_at=1)
        moved[name] = _worst(flipped, base)
    assert moved["plain"] > 1e-4
    assert moved["tol"] < 1e-6


def test_bad_tolerances_are_refused_and_the_tolerance_travels(tmp_path):
    for bad in (-1e-3, 1.0, float("nan")):
        with pytest.raises(ValueError, match="sign_tolerance"):
            ArchConfig(sign_tolerance=bad)
    from learned_opt import load_weights, save_weights

    net = random_weights(seed=1, config=PLAIN).with_options(sign_tolerance=1e-4)
    save_weights(net, tmp_path / "w.safetensors", "tol")
    assert load_weights(tmp_path / "w.safetensors")[0].config.sign_tolerance == 1e-4
