"""The optimizer on CUDA tensors: the same code as on the CPU (the plain-PyTorch fast path; the
compiled kernel is CPU-only), checked against the CPU reference step by step. Skipped where
no GPU is visible."""

import copy

import pytest
import torch

from helpers import MixedRanks, batch, random_weights
from learned_opt import LearnedOptimizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(autouse=True)
def _exact_matmuls():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("weights", [None, "random"])
@pytest.mark.parametrize("chunk", [None, 29])
def test_cuda_steps_equal_the_cpu_reference(weights, chunk):
    """Gradients computed once on the CPU are fed to both: a CUDA optimizer (fast path) and a
    CPU one (reference); parameters agree to float rounding after every step."""
    kw = {} if weights is None else {"weights": random_weights()}
    cpu = MixedRanks()
    gpu = copy.deepcopy(cpu).cuda()
    opt_c = LearnedOptimizer(cpu.parameters(), impl="reference", **kw)
    opt_g = LearnedOptimizer(gpu.parameters(), impl="fast", chunk_size=chunk, **kw)
    for t in range(40):
        x, y = batch(t)
        opt_c.zero_grad()
        loss = torch.nn.functional.cross_entropy(cpu(x), y)
        loss.backward()
        for pc, pg in zip(cpu.parameters(), gpu.parameters()):
            pg.grad = pc.grad.cuda()
        passed = loss.item() if t % 3 else None
        opt_c.step(loss=passed)
        opt_g.step(loss=passed)
        if t % 10 == 5:
            opt_c.report_validation_loss(1.0 + t / 100)
            opt_g.report_validation_loss(1.0 + t / 100)
        for pc, pg in zip(cpu.parameters(), gpu.parameters()):
            assert pg.device.type == "cuda"
            assert _rel(pg.detach().cpu(), pc.detach()) < 1e-5, t


def test_cuda_large_tensor_state_and_checkpoint_to_cpu():
    """A tensor larger than a chunk, state kept on the device, and a state dict that loads on
    the CPU and continues identically to the CPU fast path."""
    g = torch.Generator().manual_seed(0)
    p_c = torch.nn.Parameter(torch.randn(300, 257, generator=g) * 0.1)
    p_g = torch.nn.Parameter(p_c.detach().cuda())
    opt_c = LearnedOptimizer([p_c], chunk_size=4096)
    opt_g = LearnedOptimizer([p_g], chunk_size=4096)
    for t in range(5):
        grad = torch.randn(p_c.shape, generator=g) * 0.01
        p_c.grad, p_g.grad = grad, grad.cuda()
        opt_c.step(loss=1.0 / (t + 1))
        opt_g.step(loss=1.0 / (t + 1))
    # the working state (accumulators, running statistics) stays on the device; the weights'
    # identity tag (a uint8 name) is metadata and stays on the CPU
    working = {k: v for k, v in opt_g.state[p_g].items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    assert {"mom", "rms"} <= working.keys()
    assert all(v.device.type == "cuda" for v in working.values()), {k: v.device for k, v in working.items()}
    assert _rel(p_g.detach().cpu(), p_c.detach()) < 1e-5
    sd = opt_g.state_dict()
    p_back = torch.nn.Parameter(p_g.detach().cpu())
    opt_back = LearnedOptimizer([p_back], chunk_size=4096)
    opt_back.load_state_dict(sd)
    grad = torch.randn(p_c.shape, generator=g) * 0.01
    p_c.grad, p_back.grad = grad, grad.clone()
    opt_c.step(loss=0.1)
    opt_back.step(loss=0.1)
    assert _rel(p_back.detach(), p_c.detach()) < 1e-5


def test_cuda_population_step_equals_the_cpu_reference():
    """The meta-training population step on CUDA tensors (its batched-matmul path) against the
    readable reference run member by member on the CPU, float64."""
    from test_batched import CFG, M, _grads, _population, _stack, _worst
    from learned_opt.functional import population_step
    from learned_opt.functional import lopt_step

    ws, ps, ss = _population(torch.float64, seed=3)
    to_gpu = lambda tree: torch.utils._pytree.tree_map(lambda x: x.cuda() if isinstance(x, torch.Tensor) else x, tree)
    W, P, S = to_gpu(_stack(ws)), to_gpu(_stack(ps)), to_gpu(_stack(ss))
    for step in range(4):
        G, losses = _grads(step, torch.float64)
        loss = losses if step % 2 == 0 else None
        P, S = population_step(W, P, to_gpu(G), S, loss=None if loss is None else loss.cuda(), lr=3e-3, cfg=CFG)
        for i in range(M):
            ps[i], ss[i] = lopt_step(ws[i], ps[i], [x[i] for x in G], ss[i], lr=3e-3, cfg=CFG,
                                     loss=None if loss is None else loss[i], impl="reference")
    assert all(x.device.type == "cuda" for x in P)
    to_cpu = lambda tree: torch.utils._pytree.tree_map(lambda x: x.cpu() if isinstance(x, torch.Tensor) else x, tree)
    assert _worst(to_cpu((P, S)), (_stack(ps), _stack(ss))) < 1e-11
