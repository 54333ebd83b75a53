"""A step skipped on the device (``lopt_step(..., hold=...)``, what the optimizer does on a GPU
so that the non-finite check makes no host synchronisation): with hold True nothing changes,
whatever the gradients hold; with hold False the step is the ordinary one. Run here on the
CPU through the same code, and through the Triton kernels in Triton's interpreter."""

import functools
import os

import pytest
import torch
from torch import nn

from helpers import random_weights
from learned_opt import ArchConfig, LearnedOptimizer, ops
from learned_opt.functional import init_state, lopt_step

CFGS = [ArchConfig(), ArchConfig(snr_stats=True, absolute_snr=True, freeze_untouched=True, scale_free=True,
                                 rms_eps=1e-10)]
SHAPES = [(60, 20), (1500,), (7,), ()]


def _run(cfg, hold_at, nan_at, triton=False, device="cpu"):
    w = {k: x.detach().to(device) for k, x in random_weights(seed=4, config=cfg).weights().items()}
    g = torch.Generator().manual_seed(9)
    ps = [(0.1 * torch.randn(s, generator=g)).to(device) for s in SHAPES]
    st = init_state(w, ps, cfg)
    gg = torch.Generator().manual_seed(10)
    snapshots = []
    for t in range(4):
        grads = [(1e-2 * torch.randn(s, generator=gg)).to(device) for s in SHAPES]
        if t == nan_at:
            grads[0][1, 2], grads[1][5], grads[2][0] = float("nan"), float("inf"), float("-inf")
        hold = None if hold_at is None else torch.tensor(t == hold_at, device=device)
        with torch.no_grad():
            ps, st = lopt_step(w, ps, grads, st, loss=2.0 - 0.1 * t, cfg=cfg, inplace=True, chunk_size=1024,
                               hold=hold, native=False, triton=triton)
        snapshots.append(([p.clone() for p in ps], [x.clone() for x in st.glob],
                          [[x.clone() for x in ts] for ts in st.tensors]))
    return snapshots


def _same(a, b):
    (pa, ga, ta), (pb, gb, tb) = a, b
    return (all(torch.equal(x, y) for x, y in zip(pa, pb)) and all(torch.equal(x, y) for x, y in zip(ga, gb))
            and all(torch.equal(x, y) for s, r in zip(ta, tb) for x, y in zip(s, r)))


@pytest.mark.parametrize("cfg", CFGS, ids=["default", "scale_free"])
def test_a_held_step_changes_nothing_even_with_nan_and_inf(cfg):
    snaps = _run(cfg, hold_at=2, nan_at=2)
    assert _same(snaps[1], snaps[2])  # step 2 (NaN and infs in it) held: all as after step 1
    assert not _same(snaps[2], snaps[3])
    assert all(torch.isfinite(p).all() for p in snaps[3][0])


@pytest.mark.parametrize("cfg", CFGS, ids=["default", "scale_free"])
def test_hold_false_is_the_ordinary_step(cfg):
    held, plain = _run(cfg, hold_at=-1, nan_at=None), _run(cfg, hold_at=None, nan_at=None)
    for a, b in zip(held[-1][0], plain[-1][0]):  # scale_free's first mean square is summed otherwise
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_hold_is_refused_where_it_cannot_run():
    w = {k: x.detach() for k, x in random_weights(seed=4).weights().items()}
    p = [torch.zeros(3)]
    with pytest.raises(ValueError, match="hold"):
        lopt_step(w, p, [torch.ones(3)], init_state(w, p), impl="reference", hold=torch.tensor(False))


def test_the_optimizer_skips_on_the_device_and_warns_at_the_next_step(monkeypatch):
    # what a CUDA run does, forced here on the CPU
    monkeypatch.setattr(ops, "apply_step", functools.partial(ops.apply_step, on_device=True))
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = LearnedOptimizer(m.parameters())
    x = torch.randn(16, 6)

    def backward():
        opt.zero_grad()
        loss = m(x).pow(2).mean()
        loss.backward()
        return loss
    opt.step(loss=backward())
    before = [p.detach().clone() for p in m.parameters()]
    state = {k: v.clone() for k, v in opt.state[m[0].weight].items() if torch.is_tensor(v)}
    loss = backward()
    m[2].bias.grad[0] = float("nan")
    opt.step(loss=loss)  # held on the device: no warning yet
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    for k, v in state.items():
        if k != "nonfinite_skips":
            assert torch.equal(v, opt.state[m[0].weight][k]), k
    assert int(opt.state[m[0].weight]["nonfinite_skips"]) == 1
    with pytest.warns(RuntimeWarning, match="previous step was skipped"):
        opt.step(loss=backward())
    assert not all(torch.equal(a, b) for a, b in zip(before, m.parameters()))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="Triton needs a GPU, or its interpreter")
def test_a_held_step_through_the_triton_kernels_changes_nothing():
    pytest.importorskip("triton")
    device = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    snaps = _run(CFGS[1], hold_at=2, nan_at=2, triton=True, device=device)
    assert _same(snaps[1], snaps[2])
    assert not _same(snaps[2], snaps[3])
