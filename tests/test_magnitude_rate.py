"""The magnitude path's rate (``ArchConfig.magnitude_rate``): moving weights to another rate keeps
their updates, the rate travels with saved weights, and meta-training can start at a new rate."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import random_weights
from learned_opt import ArchConfig, init_state, lopt_step, load_weights, save_weights

V2 = "rnn-mlp-pes-abs-v2"


def _run(net, impl="fast", steps=6, seed=0):
    """Parameters after a few float64 steps of ``net`` on random gradients of shrinking size."""
    w = {k: v.detach().double() for k, v in net.weights().items()}
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(8, 5, generator=gen, dtype=torch.float64),
              torch.randn(5, generator=gen, dtype=torch.float64)]
    st = init_state(w, params, net.config)
    for t in range(steps):
        grads = [torch.randn(x.shape, generator=gen, dtype=torch.float64) * 10.0 ** (-t) for x in params]
        params, st = lopt_step(w, params, grads, st, loss=1.0 / (t + 1), lr=1e-2, cfg=net.config, impl=impl)
    return params


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_a_new_rate_keeps_the_updates(impl):
    net = load_weights(V2)[0]
    fast = net.with_magnitude_rate(1.0)
    assert fast.config.magnitude_rate == 1.0 and net.config.magnitude_rate == 0.001
    assert fast.with_magnitude_rate(1.0) is fast
    for x, y in zip(_run(net, impl), _run(fast, impl)):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)  # exp(1000 a * b) vs exp(a * 1000 b)
    # only the magnitude output's weights changed, by the ratio of the rates
    w0, w1 = net.weights(), fast.weights()
    for k in w0:
        if k in ("mlp_w2", "mlp_b2"):
            torch.testing.assert_close(w1[k][..., 1] * 1000.0, w0[k][..., 1])
            assert torch.equal(w1[k][..., [0] + list(range(2, w0[k].shape[-1]))],
                               w0[k][..., [0] + list(range(2, w0[k].shape[-1]))])
        else:
            assert torch.equal(w0[k], w1[k]), k


def test_the_same_change_of_weights_moves_the_step_more_at_a_higher_rate():
    base = load_weights(V2)[0]
    for_rate = {}
    for rate in (0.001, 1.0):
        net = base.with_magnitude_rate(rate)
        ref = _run(net, steps=1)
        with torch.no_grad():
            net.mlp_b2[1] += 0.1  # log-step up by rate * 0.1
        moved = _run(net, steps=1)
        for_rate[rate] = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(moved, ref))
    assert for_rate[1.0] > 100 * for_rate[0.001] > 0


def test_bad_rates_are_refused_and_the_rate_is_saved(tmp_path):
    net = random_weights(seed=2)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="magnitude"):
            net.with_magnitude_rate(bad)
        with pytest.raises(ValueError, match="magnitude_rate"):
            ArchConfig(magnitude_rate=bad)
    moved = net.with_magnitude_rate(0.25)
    save_weights(moved, tmp_path / "w.safetensors", "rate-test")
    back, info = load_weights(tmp_path / "w.safetensors")
    assert info.config.magnitude_rate == 0.25 == back.config.magnitude_rate
    for x, y in zip(_run(moved), _run(back)):
        assert torch.equal(x, y)


def test_meta_training_starts_at_a_new_rate_and_resumes_there(tmp_path):
    from meta_train.trainer import MetaTrainConfig, initial_theta
    theta, cfg = initial_theta(V2, snr_stats=True, absolute_snr=True, magnitude_rate=1.0)
    assert cfg.magnitude_rate == 1.0
    expected = load_weights(V2)[0].with_magnitude_rate(1.0).weights()
    assert all(torch.equal(theta[k], v) for k, v in expected.items())
    _, keep = initial_theta(V2, snr_stats=True, absolute_snr=True)  # 0: the weights' own rate
    assert keep.magnitude_rate == 0.001
    _, rnd = initial_theta("random", magnitude_rate=0.5)
    assert rnd.magnitude_rate == 0.5
    with pytest.raises(ValueError, match="magnitude_rate"):
        MetaTrainConfig(arch={"magnitude_rate": -1.0}).validate()
    # configs written before the option existed read as "the weights' own rate"
    old = json.loads(MetaTrainConfig().to_json())
    del old["arch"]
    assert "magnitude_rate" not in MetaTrainConfig.from_json(json.dumps(old)).arch

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "meta_train", "train", "--family", "teacher_student", "--pairs", "2",
           "--groups", "1", "--unroll", "3", "--min-horizon", "6", "--max-horizon", "6",
           "--checkpoint-every", "1", "--threads", "1", "--init", V2, "--snr-stats", "--absolute-snr",
           "--magnitude-rate", "1", "--out", str(tmp_path)]
    env = dict(os.environ, PYTHONPATH=str(root))
    for extra in (["--steps", "1"], ["--steps", "2", "--resume"]):
        res = subprocess.run(cmd + extra, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
    net, info = load_weights(tmp_path / "weights.safetensors")
    assert net.config.magnitude_rate == 1.0 and info.metadata.get("outer_steps") == "2"
    # one outer step moved the magnitude weights from their rescaled start
    start = expected["mlp_w2"][:, 1]
    assert not torch.equal(net.mlp_w2[:, 1].detach(), start)
    assert (net.mlp_w2[:, 1].detach() - start).abs().max() < 1e-2


@pytest.mark.parametrize("unit_rms", [False, True])
def test_a_step_scale_multiplies_every_update(unit_rms):
    net = load_weights(V2)[0].with_options(unit_rms_update=unit_rms)
    assert net.with_step_scale(1.0) is net
    scaled = net.with_step_scale(0.25)
    gen = torch.Generator().manual_seed(3)
    w = {k: v.detach().double() for k, v in net.weights().items()}
    ws = {k: v.detach().double() for k, v in scaled.weights().items()}
    params = [torch.randn(8, 5, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen, dtype=torch.float64)]
    grads = [torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in params]
    one, _ = lopt_step(w, params, grads, init_state(w, params, net.config), loss=1.0, lr=1e-2, cfg=net.config)
    quarter, _ = lopt_step(ws, params, grads, init_state(ws, params, net.config), loss=1.0, lr=1e-2, cfg=net.config)
    for p, a, b in zip(params, one, quarter):
        torch.testing.assert_close(b - p, 0.25 * (a - p), rtol=1e-6, atol=1e-12)
        assert (a - p).abs().max() > 0
    for bad in (0.0, -2.0, float("nan")):
        with pytest.raises(ValueError, match="scale"):
            net.with_step_scale(bad)
