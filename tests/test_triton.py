"""The Triton kernels of the two per-element passes (learned_opt/triton_kernels.py) against the
same passes in plain PyTorch. Without a GPU they run in Triton's interpreter on the CPU
(conftest.py sets TRITON_INTERPRET=1 before anything imports triton); with one, compiled on it.
Skipped where Triton is not installed (the ``gpu`` extra)."""

import os

import pytest
import torch

pytest.importorskip("triton")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"
pytestmark = pytest.mark.skipif(not INTERPRETED and not torch.cuda.is_available(),
                                reason="Triton needs a GPU, or its interpreter (TRITON_INTERPRET=1)")

from helpers import random_weights  # noqa: E402
from learned_opt import ArchConfig  # noqa: E402
from learned_opt.features import column_scale, element_columns, fold_first_layer  # noqa: E402


def _case(n, cfg, seed=0, dead=0):
    g = torch.Generator().manual_seed(seed)
    D = cfg.n_decays
    grad = 1e-2 * torch.randn(n, generator=g)
    p = 0.1 * torch.randn(n, generator=g)
    m = 1e-2 * torch.randn(n, D, generator=g)
    v = 1e-4 * torch.rand(n, D, generator=g)
    grad[:dead], m[:dead], v[:dead] = 0, 0, 0  # elements that never had a gradient
    w = {k: x.detach() for k, x in random_weights(seed=seed + 1, config=cfg).weights().items()}
    cols = element_columns(torch.clamp(grad, -0.05, 0.05), p, m, v, cfg)
    scale = column_scale((cols * cols).mean(0, keepdim=True), cfg)
    w0s, w0c = fold_first_layer(w["mlp_w0"], scale, cfg)
    bias0 = torch.randn(cfg.n_const_cols, generator=g) @ w0c + w["mlp_b0"]
    to = lambda x: x.to(DEVICE)  # noqa: E731
    return to(grad), to(p), to(m), to(v), {k: to(x) for k, x in w.items()}, to(w0s[0]), to(bias0)


def _torch_pass(grad, p, m, v, w, w0s, bias0, cfg, lr, decay):
    L = cfg.mlp_layers
    cols = element_columns(torch.clamp(grad, -0.05, 0.05), p, m, v, cfg)
    h = torch.relu(cols @ w0s + bias0)
    for i in range(1, L):
        h = torch.relu(h @ w[f"mlp_w{i}"] + w[f"mlp_b{i}"])
    out = h @ w[f"mlp_w{L}"][:, :2] + w[f"mlp_b{L}"][:2]
    d = out[:, 0]
    if cfg.freeze_untouched:
        d = torch.where((v != 0).any(-1), d, torch.zeros_like(d))
    return p * decay - lr * d * torch.exp(cfg.magnitude_rate * out[:, 1]), h.sum(0)


@pytest.mark.parametrize("cfg", [ArchConfig(), ArchConfig(freeze_untouched=True, absolute_snr=True, rms_eps=1e-10),
                                 ArchConfig(mlp_layers=3, magnitude_rate=0.5)],
                         ids=["default", "freeze+absolute_snr", "3 layers, fast magnitude"])
@pytest.mark.parametrize("n", [1, 100, 1000])
def test_the_kernel_equals_the_pytorch_pass(cfg, n):
    from learned_opt.triton_kernels import mlp_pass

    grad, p, m, v, w, w0s, bias0 = _case(n, cfg, dead=min(n, 7))
    L = cfg.mlp_layers
    want_p, want_h = _torch_pass(grad, p, m, v, w, w0s, bias0, cfg, lr=1e-2, decay=0.999)
    got_p = p.clone()
    got_h = mlp_pass(grad, got_p, m, v, 0.05, cfg.rms_eps, w0s, bias0,
                     [w[f"mlp_w{i}"] for i in range(1, L)], [w[f"mlp_b{i}"] for i in range(1, L)],
                     w[f"mlp_w{L}"][:, 0], w[f"mlp_w{L}"][:, 1], float(w[f"mlp_b{L}"][0]), float(w[f"mlp_b{L}"][1]),
                     cfg.magnitude_rate, 1e-2, 0.999, cfg.freeze_untouched)
    moved = (want_p - p).abs().max()
    assert moved > 0
    assert (got_p - want_p).abs().max() <= 1e-5 * moved + 1e-7
    torch.testing.assert_close(got_h, want_h, rtol=1e-5, atol=1e-5)
    if cfg.freeze_untouched:
        assert torch.equal(got_p[:7], p[:7] * 0.999)  # untouched elements: weight decay only


def test_the_kernel_refuses_what_it_cannot_take():
    from learned_opt.triton_kernels import mlp_pass

    cfg = ArchConfig()
    grad, p, m, v, w, w0s, bias0 = _case(10, cfg)
    with pytest.raises(TypeError, match="float32"):
        mlp_pass(grad.double(), p, m, v, 0.05, 1e-6, w0s, bias0, [], [], w0s[0], w0s[0], 0.0, 0.0, 1e-3, 1e-3, 1.0, False)


def test_one_launch_over_a_tensor_table_equals_one_launch_per_tensor():
    """Tensors of several sizes (one of a single element, one not a multiple of the block) with
    their own lr, weight decay and folded first layer, through one launch of each kernel."""
    from learned_opt.triton_kernels import mlp_pass, mlp_pass_table, stats_pass, stats_pass_table

    cfg = ArchConfig(freeze_untouched=True, rms_eps=1e-10)
    L = cfg.mlp_layers
    cases = [_case(n, cfg, seed=s, dead=min(n, 3)) for s, n in enumerate((1, 200, 64, 1000))]
    w = cases[0][4]
    hidden = ([w[f"mlp_w{i}"] for i in range(1, L)], [w[f"mlp_b{i}"] for i in range(1, L)])
    out = (w[f"mlp_w{L}"][:, 0], w[f"mlp_w{L}"][:, 1], w[f"mlp_b{L}"][:2])
    lrs, decays = [1e-2, 3e-3, 1e-3, 2e-2], [0.999, 1.0, 0.99, 0.9999]
    grads, ps, ms, vs = ([c[i].clone() for c in cases] for i in range(4))
    rows, sq, owner = stats_pass_table(grads, ps, ms, vs, 0.05, cfg.rms_eps, cfg.decays)
    hs = mlp_pass_table(grads, ps, ms, vs, 0.05, cfg.rms_eps, torch.stack([c[5] for c in cases]),
                        torch.stack([c[6] for c in cases]), *hidden, out[0], out[1], out[2], cfg.magnitude_rate,
                        torch.tensor(lrs, device=DEVICE), torch.tensor(decays, device=DEVICE), cfg.freeze_untouched)
    for i, (grad, p, m, v, _, w0s, bias0) in enumerate(cases):
        p, m, v = p.clone(), m.clone(), v.clone()
        r1, q1 = stats_pass(grad, p, m, v, 0.05, cfg.rms_eps, cfg.decays)
        h1 = mlp_pass(grad, p, m, v, 0.05, cfg.rms_eps, w0s, bias0, *hidden, out[0], out[1], float(out[2][0]),
                      float(out[2][1]), cfg.magnitude_rate, lrs[i], decays[i], cfg.freeze_untouched)
        mine = owner == i
        assert torch.equal(rows[mine], r1) and torch.equal(sq[mine], q1)
        assert torch.equal(ms[i], m) and torch.equal(vs[i], v)
        assert torch.equal(ps[i], p)
        torch.testing.assert_close(hs[i], h1, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n", [1, 100, 1000])
def test_the_statistics_kernel_equals_the_fast_path(n):
    from learned_opt import fast
    from learned_opt.triton_kernels import stats_pass

    cfg = ArchConfig(rms_eps=1e-10)
    grad, p, m, v, *_ = _case(n, cfg, seed=3, dead=min(n, 5))
    grad[-1:] = 10.0  # clipped
    m2, v2 = m.clone(), v.clone()
    work, want = fast.tensor_statistics([p], [grad], [m.clone()], [v.clone()], torch.tensor(0.05, device=DEVICE), cfg,
                                        chunk_size=64)
    rows, sq = stats_pass(grad, p, m2, v2, 0.05, cfg.rms_eps, cfg.decays)
    got = fast.combine_rows(rows, torch.zeros(rows.shape[0], dtype=torch.long, device=DEVICE),
                            torch.tensor([float(n)], dtype=torch.float64, device=DEVICE), cfg.n_decays)
    b, gc = torch.tensor(cfg.decays, device=DEVICE), torch.clamp(grad, -0.05, 0.05).unsqueeze(-1)
    torch.testing.assert_close(m2, b * m + (1 - b) * gc, rtol=0, atol=0)  # the accumulators, in place
    torch.testing.assert_close(v2, b * v + (1 - b) * (gc * gc), rtol=0, atol=0)  # as the fast path rounds
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-12)
    want_scale = fast.column_scale(sq.sum(0) / n, cfg)
    torch.testing.assert_close(want_scale.unsqueeze(0), work.scale, rtol=1e-5, atol=0)


@pytest.mark.parametrize("cfg", [ArchConfig(), ArchConfig(snr_stats=True, absolute_snr=True, freeze_untouched=True,
                                                          scale_free=True, rms_eps=1e-10)],
                         ids=["default", "v4's options"])
def test_steps_through_the_kernels_equal_the_pytorch_path(cfg, monkeypatch):
    """lopt_step with triton=True (the large tensors through both kernels, the small ones packed
    in PyTorch) against triton=False and the compiled CPU kernel off, over a few steps."""
    from learned_opt import triton_kernels
    from learned_opt.functional import init_state, lopt_step

    calls = []  # (kernel, how many tensors in its table)
    for name in ("stats_pass_table", "mlp_pass_table"):
        real = getattr(triton_kernels, name)
        monkeypatch.setattr(triton_kernels, name,
                            lambda *a, _real=real, _name=name, **kw: calls.append((_name, len(a[0]))) or _real(*a, **kw))
    monkeypatch.setenv("LEARNED_OPT_NATIVE", "0")
    w = {k: x.detach().to(DEVICE) for k, x in random_weights(seed=4, config=cfg).weights().items()}
    g = torch.Generator().manual_seed(9)
    shapes = [(60, 20), (1500,), (7,), ()]
    start = [(0.1 * torch.randn(s, generator=g)).to(DEVICE) for s in shapes]
    out = {}
    for use in (True, False):
        ps = [p.clone() for p in start]
        st = init_state(w, ps, cfg)
        gg = torch.Generator().manual_seed(10)
        for t in range(3):
            grads = [(1e-2 * torch.randn(s, generator=gg)).to(DEVICE) for s in shapes]
            grads[0][:3] = 0  # rows that never had a gradient
            with torch.no_grad():
                ps, st = lopt_step(w, ps, grads, st, loss=2.0 - 0.1 * t, cfg=cfg, inplace=True, chunk_size=1024,
                                   triton=use)
        out[use] = ps
    # one launch of each kernel per step, its table holding the two large tensors
    assert calls == [("stats_pass_table", 2), ("mlp_pass_table", 2)] * 3
    for a, b, s in zip(out[True], out[False], start):
        moved = (b - s).abs().max()
        assert moved > 0
        assert (a - b).abs().max() <= 1e-4 * moved, ((a - b).abs().max() / moved).item()
