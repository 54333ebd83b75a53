"""timm builds LearnedOptimizer through its optimizer factory after ``register_timm``.

timm needs torchvision; where it does not import (as on the CPU-only CI machine, which has no
torchvision for its torch), the test is skipped."""

import pytest
import torch
from torch import nn

from learned_opt import LearnedOptimizer

timm_optim = pytest.importorskip("timm.optim", reason="timm (and torchvision) not importable here", exc_type=ImportError)


def test_create_optimizer_v2_builds_it_with_timms_parameter_groups():
    from learned_opt.integrations import register_timm
    register_timm()
    register_timm()  # a second registration is a no-op
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    opt = timm_optim.create_optimizer_v2(model, opt="learnedopt", lr=2e-3, weight_decay=0.05, eps=1e-8,
                                         betas=(0.9, 0.99))
    assert isinstance(opt, LearnedOptimizer)
    decays = sorted(g["weight_decay"] for g in opt.param_groups)
    assert decays == [0.0, 0.05]  # biases and norm weights get none, as timm does for Adam
    assert all(g["lr"] == 2e-3 for g in opt.param_groups)
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    before = [p.detach().clone() for p in model.parameters()]
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_names_timm_would_split_are_refused():
    from learned_opt.integrations import timm_optim_info
    with pytest.raises(ValueError, match="_"):
        timm_optim_info("learned_opt")
