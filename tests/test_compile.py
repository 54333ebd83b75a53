"""torch.compile and the step's custom op (``learned_opt::step_``): the step traces without a
graph break, ``fullgraph=True`` included, gives the eager result, recompiles neither for a
Tensor lr a scheduler changes nor from step to step, and skips non-finite steps as eagerly."""

import pytest
import torch
import torch._dynamo.testing
from torch import nn

import learned_opt.ops  # noqa: F401  (registers the op)
from learned_opt import LearnedOptimizer


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _backward(model, x):
    loss = model(x).pow(2).mean()
    model.zero_grad()
    loss.backward()
    return loss


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
def test_fullgraph_compiled_step_equals_eager_without_recompiles(lr_kind):
    a, b = _model(), _model()
    lr = (lambda v: v) if lr_kind == "float" else (lambda v: torch.tensor(v))
    oa, ob = LearnedOptimizer(a.parameters(), lr=lr(1e-3)), LearnedOptimizer(b.parameters(), lr=lr(1e-3))
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(ob.step, fullgraph=True, backend=counter)
    g = torch.Generator().manual_seed(1)
    for t in range(6):
        # a schedule set by hand: torch's schedulers wrap opt.step in a function that
        # torch.compile refuses to trace, for torch's own optimizers too
        for o in (oa, ob):
            group = o.param_groups[0]
            if lr_kind == "float":
                group["lr"] = 1e-3 / (1 + t)
            else:
                group["lr"].fill_(1e-3 / (1 + t))
        x = torch.randn(16, 6, generator=g)
        oa.step(loss=_backward(a, x))
        compiled(loss=_backward(b, x))
        if t == 1:  # the first call made the state, the second saw it
            frames = counter.frame_count
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    for p, q in zip(a.parameters(), b.parameters()):
        for key, val in oa.state[p].items():
            if torch.is_tensor(val):
                assert torch.equal(val, ob.state[q][key]), key
    if lr_kind == "tensor":  # a changing Tensor lr recompiles nothing (a Python float does, as
        assert counter.frame_count == frames  # it does for torch's own optimizers)


def test_the_step_has_no_graph_break():
    m = _model()
    opt = LearnedOptimizer(m.parameters())
    loss = _backward(m, torch.randn(8, 6))
    opt.step(loss=loss)
    loss = _backward(m, torch.randn(8, 6))
    explained = torch._dynamo.explain(opt.step)(loss=loss)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_a_compiled_update_with_clipping_and_no_loss_traces_whole():
    a, b = _model(), _model()
    oa, ob = LearnedOptimizer(a.parameters()), LearnedOptimizer(b.parameters())

    def update(opt):
        params = opt.param_groups[0]["params"]
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        opt.step()

    compiled = torch.compile(update, fullgraph=True)
    g = torch.Generator().manual_seed(2)
    for _ in range(4):
        x = torch.randn(16, 6, generator=g)
        for m in (a, b):
            m.zero_grad()
            m(x).pow(2).mean().backward()
        update(oa)
        compiled(ob)
    assert all(torch.allclose(p, q, rtol=1e-6, atol=1e-7) for p, q in zip(a.parameters(), b.parameters()))


def test_compiled_step_skips_a_nonfinite_step_and_counts_it():
    m = _model()
    opt = LearnedOptimizer(m.parameters())
    compiled = torch.compile(opt.step, fullgraph=True)
    compiled(loss=_backward(m, torch.randn(8, 6)))
    loss = _backward(m, torch.randn(8, 6))
    before = [p.detach().clone() for p in m.parameters()]
    step_before = opt.state[m[0].weight]["step"].clone()
    m[2].bias.grad[0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        compiled(loss=loss)
    assert all(torch.equal(p, q) for p, q in zip(before, m.parameters()))
    assert int(opt.state[m[0].weight]["nonfinite_skips"]) == 1
    assert torch.equal(opt.state[m[0].weight]["step"], step_before)


def test_the_op_passes_torch_library_opcheck():
    m = _model()
    opt = LearnedOptimizer(m.parameters())
    opt.step(loss=_backward(m, torch.randn(8, 6)))  # make the state
    _backward(m, torch.randn(8, 6))
    captured = {}
    real = torch.ops.learned_opt.step_

    class Spy:
        def __call__(self, *args):
            captured["args"] = args
            return real(*args)

    torch.ops.learned_opt.step_ = Spy()
    try:
        opt.step(loss=torch.tensor(0.5))
    finally:
        torch.ops.learned_opt.step_ = real
    # schema (declared mutations), fake tensor, autograd registration and AOT dispatch
    torch.library.opcheck(real.default, captured["args"],
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration",
                                      "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("kind", ["closure", "maximize", "complex"])
def test_compiled_step_equals_eager_with_a_closure_maximize_or_complex_parameters(kind):
    # complex parameters take the eager step (a graph break): their real views, mutated by a
    # custom op, are what the compiler's functionalization cannot carry
    def run(compiled):
        m = _model()
        extra = nn.Parameter(torch.randn(3, dtype=torch.complex64, generator=torch.Generator().manual_seed(3)))
        params = list(m.parameters()) + ([extra] if kind == "complex" else [])
        opt = LearnedOptimizer(params, maximize=kind == "maximize")
        step = torch.compile(opt.step) if compiled else opt.step
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            x = torch.randn(16, 6, generator=g)

            def closure():
                opt.zero_grad()
                loss = m(x).pow(2).mean() + (extra.abs().pow(2).sum() if kind == "complex" else 0)
                loss.backward()
                return loss
            step(closure) if kind == "closure" else step(loss=closure())
        return [p.detach().clone() for p in params]

    eager, compiled = run(False), run(True)
    if kind == "closure":  # the closure's forward is compiled too: rounding may differ
        for a, b in zip(eager, compiled):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    else:
        assert all(torch.equal(a, b) for a, b in zip(eager, compiled))
