"""The signal-to-noise LSTM inputs (``ArchConfig.snr_stats``): what they compute, that adding
them at zero weight changes no update, and that they travel through weights files, the
population step and meta-training."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from learned_opt import ArchConfig, LearnedOptimizer, MetaNetwork, load_weights, save_weights
from learned_opt.functional import population_step
from learned_opt.config import N_LSTM_STATS, N_SNR_STATS
from learned_opt.features import lstm_statistics
from learned_opt.functional import init_state, lopt_step

SNR = ArchConfig(snr_stats=True)
V1 = "rnn-mlp-pes-mix-v1"  # shipped weights on the first architecture (no signal-to-noise inputs)



def raw_statistics(p, g, m, v):
    """(8,) float64 statistics of one tensor: mean/var of m, of v (over elements and decays),
    of p, then the sums of squares of p and of g (the layout ``lstm_statistics`` reads)."""
    m, v, p, g = m.double(), v.double(), p.double(), g.double()
    return torch.stack([m.mean(), m.var(unbiased=False), v.mean(), v.var(unbiased=False),
                        p.mean(), p.var(unbiased=False), (p * p).sum(), (g * g).sum()])

def _raw(m, v, p, g):
    """The (T=1, 8) raw statistics of one tensor, as the reference computes them."""
    return raw_statistics(p, g, m, v).unsqueeze(0)


def _snr_columns(m, v, p, g):
    zero = torch.zeros((), dtype=torch.float64)
    stats = lstm_statistics(_raw(m, v, p, g), [p.shape], zero, zero, SNR)
    assert stats.shape == (1, N_LSTM_STATS + N_SNR_STATS)
    base = lstm_statistics(_raw(m, v, p, g), [p.shape], zero, zero)
    assert torch.equal(stats[:, :N_LSTM_STATS], base)  # the 18 are unchanged and come first
    return stats[0, N_LSTM_STATS:]


def test_snr_columns_are_the_log_ratios_and_free_of_the_gradient_scale():
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(40, 3, generator=gen, dtype=torch.float64)
    m = torch.randn(120, 5, generator=gen, dtype=torch.float64) * 1e-3
    v = torch.rand(120, 5, generator=gen, dtype=torch.float64) * 1e-5 + 1e-6
    g = torch.randn(40, 3, generator=gen, dtype=torch.float64) * 2e-3
    cols = _snr_columns(m, v, p, g)
    want = torch.stack([torch.log((m * m).mean() / v.mean()), torch.log((g * g).mean() / v.mean())])
    torch.testing.assert_close(cols, want, rtol=1e-10, atol=1e-10)
    for s in (1e-4, 1e3):  # gradients, m and v scaled together: the columns stay
        torch.testing.assert_close(_snr_columns(m * s, v * s * s, p, g * s), cols, rtol=1e-8, atol=1e-8)
    # all-zero accumulators (a tensor that never had a gradient) read as the floor, not 0/0
    z = torch.zeros_like(m)
    assert _snr_columns(z, z, p, torch.zeros_like(g)).tolist() == [-10.0, -10.0]


def _accumulators(grads):
    """Run the optimizer's accumulators over a gradient sequence; return the SNR column."""
    net = load_weights("adam-like-init-v0")[0].with_snr_stats()
    w = {k: v.detach().double() for k, v in net.weights().items()}
    p = [torch.zeros(grads[0].shape, dtype=torch.float64)]
    st = init_state(w, p, SNR)
    for g in grads:
        p, st = lopt_step(w, p, [g], st, lr=0.0, cfg=SNR)
    m, v = st.tensors[0].mom, st.tensors[0].rms
    return float(torch.log((m * m).mean() / v.mean()))


def test_snr_is_high_for_a_steady_gradient_and_low_for_noise():
    gen = torch.Generator().manual_seed(1)
    steady = torch.randn(500, generator=gen, dtype=torch.float64)
    noise = [torch.randn(500, generator=gen, dtype=torch.float64) for _ in range(300)]
    assert _accumulators([steady] * 300) > _accumulators(noise) + 1.0


def _run(weights, cfg, steps=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(8, 5, generator=gen, dtype=torch.float64),
              torch.randn(5, generator=gen, dtype=torch.float64)]
    st = init_state(weights, params, cfg)
    for t in range(steps):
        grads = [torch.randn(x.shape, generator=gen, dtype=torch.float64) * 10.0 ** (-t) for x in params]
        params, st = lopt_step(weights, params, grads, st, loss=1.0 / (t + 1), lr=1e-2, cfg=cfg)
    return params


def test_adding_the_inputs_at_zero_weight_changes_no_update():
    net = load_weights(V1)[0]
    wide = net.with_snr_stats()
    assert wide.config.snr_stats and not net.config.snr_stats and wide.with_snr_stats() is wide
    assert wide.lstm_w.shape[0] == net.lstm_w.shape[0] + N_SNR_STATS
    a = _run({k: v.detach().double() for k, v in net.weights().items()}, net.config)
    b = _run({k: v.detach().double() for k, v in wide.weights().items()}, wide.config)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)
    # and the new rows do act once they are not zero
    with torch.no_grad():
        wide.lstm_w[N_LSTM_STATS:N_LSTM_STATS + N_SNR_STATS] = 0.5
    c = _run({k: v.detach().double() for k, v in wide.weights().items()}, wide.config)
    assert any(not torch.allclose(x, y) for x, y in zip(a, c))


def test_weights_file_carries_the_architecture(tmp_path):
    wide = load_weights(V1)[0].with_snr_stats()
    save_weights(wide, tmp_path / "w.safetensors", "snr-test")
    back, info = load_weights(tmp_path / "w.safetensors")
    assert info.config.snr_stats and back.config == wide.config
    model = torch.nn.Linear(4, 2)
    opt = LearnedOptimizer(model.parameters(), weights=tmp_path / "w.safetensors")
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _population_matches_lopt_step(base, cfg, shapes, M, seed):
    """``population_step`` on M perturbed copies of ``base`` equals ``lopt_step`` on each."""
    gen = torch.Generator().manual_seed(seed)
    ws = [{k: (v.detach() + 0.05 * torch.randn(v.shape, generator=gen)).double() for k, v in base.items()}
          for _ in range(M)]
    ps = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(M)]
    ss = [init_state(ws[i], ps[i], cfg) for i in range(M)]
    stack = lambda xs: torch.utils._pytree.tree_map(lambda *t: torch.stack(t), *xs)  # noqa: E731
    W, P, S = stack(ws), stack(ps), stack(ss)
    for t in range(4):
        G = [torch.randn(M, *s, generator=gen, dtype=torch.float64) * 10.0 ** (-t) for s in shapes]
        with torch.no_grad():
            P, S = population_step(W, P, G, S, loss=None, lr=1e-2, cfg=cfg)
        for i in range(M):
            ps[i], ss[i] = lopt_step(ws[i], ps[i], [g[i] for g in G], ss[i], lr=1e-2, cfg=cfg)
    for i in range(M):
        for a, b in zip(ps[i], P):
            torch.testing.assert_close(b[i], a, rtol=1e-11, atol=1e-13)


def test_population_step_uses_the_inputs_like_lopt_step():
    _population_matches_lopt_step(load_weights(V1)[0].with_snr_stats().weights(), SNR, [(6, 4), (4,)], M=3, seed=2)


def test_meta_training_with_the_inputs(tmp_path):
    from meta_train.population import UnrollSettings
    from meta_train.trainer import MetaTrainConfig, MetaTrainer
    cfg = MetaTrainConfig(family="teacher_student", pairs=2, groups=1, steps=2, checkpoint_every=1,
                          unroll=UnrollSettings(unroll=3, min_horizon=6, max_horizon=6), init=V1,
                          arch={"snr_stats": True})
    tr = MetaTrainer(cfg, tmp_path, progress=False)
    start = load_weights(V1)[0].with_snr_stats().weights()
    tr.run()
    net, info = load_weights(tmp_path / "weights.safetensors")
    assert info.config.snr_stats
    moved = net.lstm_w[N_LSTM_STATS:N_LSTM_STATS + N_SNR_STATS]
    assert not torch.equal(moved, start["lstm_w"][N_LSTM_STATS:N_LSTM_STATS + N_SNR_STATS])
    # weights that have the inputs cannot silently start a run without them
    with pytest.raises(ValueError, match="snr-stats"):
        MetaTrainer(MetaTrainConfig(init=str(tmp_path / "weights.safetensors")), tmp_path / "other", progress=False)
    assert math.isfinite(float(net.lstm_w.detach().sum()))


# ------------------------------------------------------------ unscaled m/sqrt(v) columns

ABS = ArchConfig(absolute_snr=True)


def test_column_scale_leaves_only_the_snr_columns_unscaled():
    from learned_opt.features import column_scale
    mean_sq = torch.rand(3, ABS.n_element_cols, dtype=torch.float64) * 4 + 0.01
    a, b = ABS.snr_column_range
    assert (a, b) == (3 + 2 * ABS.n_decays, 3 + 3 * ABS.n_decays)
    scaled = torch.rsqrt(ABS.norm_eps + mean_sq)
    torch.testing.assert_close(column_scale(mean_sq, ArchConfig()), scaled)
    got = column_scale(mean_sq, ABS)
    assert torch.equal(got[:, a:b], torch.ones(3, b - a, dtype=torch.float64))
    assert torch.equal(got[:, :a], scaled[:, :a]) and torch.equal(got[:, b:], scaled[:, b:])


def test_m_over_sqrt_v_is_bounded_so_it_can_go_unscaled():
    # the premise of the flag: |m| <= sqrt(v) element by element, for any gradient sequence
    gen = torch.Generator().manual_seed(4)
    w = {k: v.detach().double() for k, v in load_weights("adam-like-init-v0")[0].weights().items()}
    p = [torch.zeros(300, dtype=torch.float64)]
    st = init_state(w, p, ArchConfig())
    for t in range(50):
        g = torch.randn(300, generator=gen, dtype=torch.float64) * torch.exp(torch.randn(300, generator=gen) * 3)
        p, st = lopt_step(w, p, [g], st, lr=0.0)
        m, v = st.tensors[0].mom, st.tensors[0].rms
        assert bool((m.abs() <= torch.sqrt(v) * (1 + 1e-12)).all())


def test_absolute_snr_network_keeps_weights_and_changes_updates(tmp_path):
    net = load_weights(V1)[0]
    ab = net.with_absolute_snr()
    assert ab.config == ABS and ab.with_absolute_snr() is ab
    for k, v in net.weights().items():
        assert torch.equal(ab.weights()[k], v)
    a = _run({k: v.detach().double() for k, v in net.weights().items()}, net.config)
    b = _run({k: v.detach().double() for k, v in ab.weights().items()}, ab.config)
    assert any(not torch.allclose(x, y) for x, y in zip(a, b))
    save_weights(ab, tmp_path / "w.safetensors", "abs-test")
    back, info = load_weights(tmp_path / "w.safetensors")
    assert info.config.absolute_snr and back.config == ABS


@pytest.mark.parametrize("chunk", [None, 29])
@pytest.mark.parametrize("flag", ["absolute_snr", "dual_snr"])
def test_snr_column_variants_fast_equals_reference(flag, chunk):
    from helpers import MixedRanks, make, random_weights, train
    net = random_weights(seed=5, config=ArchConfig(snr_stats=True, **{flag: True}))
    out = {}
    for impl in ("fast", "reference"):
        model = MixedRanks(torch.float64)
        opt = make(model, impl=impl, chunk_size=chunk, weights=net)
        train(model, opt, 30, dtype=torch.float64)
        out[impl] = [p.detach().clone() for p in model.parameters()]
    start = [p.detach() for p in MixedRanks(torch.float64).parameters()]
    assert max((a - b).abs().max().item() for a, b in zip(out["fast"], start)) > 1e-3
    for x, y in zip(out["fast"], out["reference"]):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-11)


def test_population_step_with_absolute_snr_matches_lopt_step():
    _population_matches_lopt_step(load_weights(V1)[0].with_absolute_snr().weights(), ABS, [(7, 3), (3,)], M=2, seed=6)


def test_meta_training_starts_from_weights_on_the_absolute_snr_architecture(tmp_path):
    from meta_train.trainer import initial_theta
    theta, cfg = initial_theta(V1, absolute_snr=True)
    assert cfg.absolute_snr and not cfg.snr_stats
    start = load_weights(V1)[0].weights()
    assert all(torch.equal(theta[k], v) for k, v in start.items())
    save_weights(load_weights(V1)[0].with_absolute_snr(), tmp_path / "a.safetensors", "a")
    with pytest.raises(ValueError, match="absolute-snr"):
        initial_theta(str(tmp_path / "a.safetensors"))


# ------------------------------------------------ m/sqrt(v) columns both scaled and unscaled

DUAL = ArchConfig(dual_snr=True)


def test_adding_the_unscaled_columns_at_zero_weight_changes_no_update(tmp_path):
    net = load_weights(V1)[0]
    dual = net.with_dual_snr()
    assert dual.config == DUAL and dual.with_dual_snr() is dual
    assert dual.mlp_w0.shape[0] == net.mlp_w0.shape[0] + DUAL.n_decays == DUAL.mlp_in
    a = _run({k: v.detach().double() for k, v in net.weights().items()}, net.config)
    b = _run({k: v.detach().double() for k, v in dual.weights().items()}, dual.config)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)
    with torch.no_grad():  # the new rows act once they are not zero
        dual.mlp_w0[net.config.mlp_in:] = 0.5
    c = _run({k: v.detach().double() for k, v in dual.weights().items()}, dual.config)
    assert any(not torch.allclose(x, y) for x, y in zip(a, c))
    save_weights(dual, tmp_path / "w.safetensors", "dual-test")
    back, info = load_weights(tmp_path / "w.safetensors")
    assert info.config.dual_snr and torch.equal(back.mlp_w0, dual.mlp_w0)


def test_dual_inputs_are_the_unscaled_columns():
    # the reference's extra inputs, checked by hand: a network whose direction output reads
    # only the first unscaled m/sqrt(v) input takes exactly that as its step
    net = MetaNetwork(DUAL)
    E, C = DUAL.n_element_cols, DUAL.n_const_cols
    with torch.no_grad():
        net.mlp_w0[E + C, 0], net.mlp_w0[E + C, 1] = 1.0, -1.0  # relu(x), relu(-x)
        net.mlp_w1[0, 0] = net.mlp_w1[1, 1] = 1.0
        net.mlp_w2[0, 0], net.mlp_w2[1, 0] = 1.0, -1.0
    w = {k: v.detach().double() for k, v in net.weights().items()}
    gen = torch.Generator().manual_seed(3)
    p = [torch.randn(6, 4, generator=gen, dtype=torch.float64)]
    g = [torch.randn(6, 4, generator=gen, dtype=torch.float64) * 1e-3]
    for impl in ("reference", "fast"):
        st = init_state(w, p, DUAL)
        new, st = lopt_step(w, p, g, st, lr=0.1, cfg=DUAL, impl=impl)
        m, v = st.tensors[0].mom[..., 0], st.tensors[0].rms[..., 0]
        torch.testing.assert_close(p[0] - new[0], 0.1 * m * torch.rsqrt(v + DUAL.rms_eps), rtol=1e-10, atol=1e-14)


def test_population_step_with_dual_snr_matches_lopt_step():
    _population_matches_lopt_step(load_weights(V1)[0].with_dual_snr().weights(), DUAL, [(7, 3), (3,)], M=2, seed=7)


def test_dual_snr_excludes_absolute_snr_and_needs_its_flag_to_start_a_run(tmp_path):
    from meta_train.trainer import initial_theta
    with pytest.raises(ValueError, match="exclude"):
        ArchConfig(dual_snr=True, absolute_snr=True)
    with pytest.raises(ValueError, match="absolute_snr"):
        load_weights(V1)[0].with_absolute_snr().with_dual_snr()
    theta, cfg = initial_theta(V1, snr_stats=True, dual_snr=True)
    assert cfg == ArchConfig(snr_stats=True, dual_snr=True)
    assert theta["mlp_w0"].shape[0] == cfg.mlp_in and not theta["mlp_w0"][-cfg.n_decays:].any()
    save_weights(load_weights(V1)[0].with_dual_snr(), tmp_path / "d.safetensors", "d")
    with pytest.raises(ValueError, match="dual-snr"):
        initial_theta(str(tmp_path / "d.safetensors"))


def test_meta_training_command_line_trains_the_dual_inputs(tmp_path):
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "meta_train", "train", "--family", "teacher_student", "--pairs", "2",
           "--groups", "1", "--unroll", "3", "--min-horizon", "6", "--max-horizon", "6", "--steps", "2",
           "--threads", "1", "--init", V1, "--dual-snr", "--out", str(tmp_path)]
    res = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=str(root)), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    net, info = load_weights(tmp_path / "weights.safetensors")
    assert info.config == DUAL
    assert net.mlp_w0[-DUAL.n_decays:].abs().max() > 0  # the new rows left zero
