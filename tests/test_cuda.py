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
    assert all(v.device.type == "cuda" for v in opt_g.state[p_g].values() if isinstance(v, torch.Tensor)
               and v.dim() > 0)
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
