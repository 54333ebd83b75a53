"""Where a user could tell LearnedOptimizer from a torch.optim optimizer: tensor hyper-parameters
of any 1-element shape, state dicts with Python-number counters or without an option, maximize
with the loss passed, duplicate parameters, error wording."""

import copy

import pytest
import torch
from torch import nn

from learned_opt import LearnedOptimizer


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))


def _train(model, opt, steps=5, sign=1.0, maximize_loss=False):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 6, generator=g)
        loss = sign * model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("shape", [(), (1,), (1, 1)])
def test_tensor_hyper_parameters_of_any_one_element_shape(shape):
    ref = _model()
    _train(ref, LearnedOptimizer(ref.parameters(), lr=2e-3, weight_decay=0.1))
    m = _model()
    opt = LearnedOptimizer(m.parameters(), lr=torch.full(shape, 2e-3), weight_decay=torch.full(shape, 0.1))
    _train(m, opt)
    assert all(torch.equal(a, b) for a, b in zip(_params(ref), _params(m)))
    with pytest.raises(ValueError, match="1-element"):
        LearnedOptimizer(m.parameters(), lr=torch.tensor([1e-3, 1e-3]))


def test_error_wording_follows_torch():
    p = [nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="Invalid learning rate: -1"):
        LearnedOptimizer(p, lr=-1.0)
    with pytest.raises(ValueError, match="Invalid weight_decay value: -0.5"):
        LearnedOptimizer(p, weight_decay=-0.5)


def test_state_with_python_number_counters_resumes():
    a, b = _model(), _model()
    oa = LearnedOptimizer(a.parameters())
    _train(a, oa, 3)
    sd = copy.deepcopy(oa.state_dict())
    first = sd["state"][0]
    for key in ("step", "train_loss_count", "clip_t", "valid_loss_count"):
        first[key] = float(first[key])  # as a hand-written or converted checkpoint may hold them
    first["nonfinite_skips"] = 2  # a Python int, as states saved before the step was a custom op hold it
    if not oa.meta_config.scale_free:  # unused without scale_free: a state saved before the field existed
        del first["grad_ref"]
    b.load_state_dict(a.state_dict())
    ob = LearnedOptimizer(b.parameters())
    ob.load_state_dict(sd)
    _train(a, oa, 3)
    _train(b, ob, 3)
    assert all(torch.equal(x, y) for x, y in zip(_params(a), _params(b)))
    skips = ob.state[next(b.parameters())]["nonfinite_skips"]
    assert torch.is_tensor(skips) and int(skips) == 2


def test_a_group_saved_without_an_option_gets_its_default():
    a = _model()
    oa = LearnedOptimizer(a.parameters())
    _train(a, oa, 2)
    sd = copy.deepcopy(oa.state_dict())
    for g in sd["param_groups"]:
        del g["maximize"], g["weight_decay"]
    ob = LearnedOptimizer(_model().parameters())
    ob.load_state_dict(sd)
    assert ob.param_groups[0]["maximize"] is False and ob.param_groups[0]["weight_decay"] == 0.0


def test_maximize_with_the_loss_equals_minimising_the_negated_objective():
    a, b = _model(), _model()
    _train(a, LearnedOptimizer(a.parameters(), maximize=True), 6, sign=-1.0)  # maximise -f
    _train(b, LearnedOptimizer(b.parameters()), 6, sign=1.0)  # minimise f
    assert all(torch.equal(x, y) for x, y in zip(_params(a), _params(b)))


def test_duplicate_parameters_warn_as_torch_does_and_step_once():
    p = nn.Parameter(torch.ones(4))
    with pytest.warns(UserWarning, match="duplicate parameters"):
        opt = LearnedOptimizer([p, p, nn.Parameter(torch.zeros(2))])
    assert len(opt.param_groups[0]["params"]) == 2
    q = nn.Parameter(torch.ones(4))
    ref = LearnedOptimizer([q, nn.Parameter(torch.zeros(2))])
    for o, t in ((opt, p), (ref, q)):
        t.grad = torch.full((4,), 0.5)
        o.step(loss=1.0)
    assert torch.equal(p, q)
