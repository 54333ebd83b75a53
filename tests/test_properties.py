"""Property tests: finite parameters and state over shapes, dtypes, gradient scales and step
counts; a step is a deterministic function of the state."""

import copy

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import random_weights
from learned_opt import ArchConfig, LearnedOptimizer

shapes = st.lists(st.lists(st.integers(0, 4), min_size=0, max_size=5).map(tuple),
                  min_size=1, max_size=5)
dtypes = st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16])
MAX_EXP = {torch.float16: 4, torch.bfloat16: 8, torch.float32: 8, torch.float64: 8}

_NETS = {"default": None, "random": random_weights(seed=7),
         "random-snr": random_weights(seed=8, config=ArchConfig(snr_stats=True)),
         "random-abs-snr": random_weights(seed=9, config=ArchConfig(absolute_snr=True)),
         "random-dual-snr": random_weights(seed=10, config=ArchConfig(dual_snr=True, snr_stats=True))}


def _state_tensors(opt):
    for st_ in opt.state.values():
        for v in st_.values():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                yield v


@settings(max_examples=40, deadline=None)
@given(shapes=shapes, dtype=dtypes, exp=st.integers(-8, 8), steps=st.integers(1, 6),
       net=st.sampled_from(sorted(_NETS)), impl=st.sampled_from(["fast", "reference"]),
       seed=st.integers(0, 2 ** 16), with_loss=st.booleans())
def test_params_and_state_stay_finite(shapes, dtype, exp, steps, net, impl, seed, with_loss):
    exp = max(min(exp, MAX_EXP[dtype]), -MAX_EXP[dtype])
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]
    kw = {} if _NETS[net] is None else {"weights": _NETS[net]}
    opt = LearnedOptimizer(ps, impl=impl, chunk_size=7, **kw)
    for t in range(steps):
        for p in ps:
            p.grad = (torch.randn(p.shape, generator=g) * 10.0 ** exp).to(dtype)
        opt.step(loss=float(t) * 10.0 ** exp if with_loss else None)
        if t % 2:
            opt.report_validation_loss(1.0)
    for p in ps:
        assert torch.isfinite(p).all()
    for v in _state_tensors(opt):
        assert torch.isfinite(v).all()


@settings(max_examples=20, deadline=None)
@given(shapes=shapes, dtype=dtypes, exp=st.integers(-8, 8), seed=st.integers(0, 2 ** 16))
def test_step_is_deterministic_given_state(shapes, dtype, exp, seed):
    exp = max(min(exp, MAX_EXP[dtype]), -MAX_EXP[dtype])
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]
    opt = LearnedOptimizer(ps, weights=_NETS["random"])
    for _ in range(2):
        for p in ps:
            p.grad = (torch.randn(p.shape, generator=g) * 10.0 ** exp).to(dtype)
        opt.step(loss=1.0)
    ps2, opt2 = copy.deepcopy((ps, opt))
    for p, q in zip(ps, ps2):
        q.grad = p.grad.clone()
    opt.step(loss=0.5)
    opt2.step(loss=0.5)
    for p, q in zip(ps, ps2):
        assert torch.equal(p, q)
    for a, b in zip(_state_tensors(opt), _state_tensors(opt2)):
        assert torch.equal(a, b)
