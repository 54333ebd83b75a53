"""The torch.optim contract (in the spirit of PyTorch's TestOptimRenewed)."""

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn

from helpers import MixedRanks, batch, make, random_weights, train
from learned_opt import DEFAULT_WEIGHTS, LearnedOptimizer


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


# --------------------------------------------------------------------------- construction


def test_constructor_errors():
    with pytest.raises(ValueError, match="empty"):
        LearnedOptimizer([])
    with pytest.raises(TypeError):
        LearnedOptimizer(torch.zeros(3, requires_grad=True))
    p = nn.Parameter(torch.zeros(3))
    with pytest.warns(UserWarning, match="duplicate"):  # as torch.optim does
        assert len(LearnedOptimizer([p, p]).param_groups[0]["params"]) == 1
    with pytest.raises(ValueError, match="more than one"):
        LearnedOptimizer([{"params": [p]}, {"params": [p]}])
    for kw, err in [({"lr": -1.0}, ValueError), ({"lr": float("nan")}, ValueError),
                    ({"lr": "fast"}, TypeError), ({"weight_decay": -0.1}, ValueError),
                    ({"lr": torch.tensor([1e-3, 1e-3])}, ValueError),
                    ({"fused": True}, ValueError), ({"foreach": True}, ValueError),
                    ({"capturable": True}, ValueError), ({"differentiable": True}, ValueError),
                    ({"impl": "turbo"}, ValueError), ({"chunk_size": 0}, ValueError)]:
        with pytest.raises(err):
            LearnedOptimizer([p], **kw)
    with pytest.raises(ValueError, match="maximize"):
        LearnedOptimizer([{"params": [p], "maximize": "yes"}])
    with pytest.raises(ValueError, match="Invalid learning rate"):
        LearnedOptimizer([{"params": [p], "lr": -3}])


def test_default_construction_needs_no_arguments():
    model = MixedRanks()
    opt = LearnedOptimizer(model.parameters())
    assert opt.defaults["lr"] == 1e-3 and opt.defaults["weight_decay"] == 0.0
    losses = train(model, opt, 60)
    assert losses[-1] < losses[0]


def test_named_parameters_and_group_dicts():
    model = MixedRanks()
    opt = LearnedOptimizer(model.named_parameters())
    train(model, opt, 3)
    sd = opt.state_dict()
    assert sd["param_groups"][0]["param_names"] == [n for n, _ in model.named_parameters()]

    model = MixedRanks()
    opt = LearnedOptimizer([{"params": [model.fc, model.fc_b], "lr": 0.0},
                            {"params": [p for n, p in model.named_parameters()
                                        if n not in ("fc", "fc_b")]}], lr=1e-3)
    fc0 = model.fc.detach().clone()
    conv0 = model.conv.detach().clone()
    train(model, opt, 3)
    assert torch.equal(model.fc, fc0)  # per-group lr 0
    assert not torch.equal(model.conv, conv0)


def test_add_param_group_mid_run():
    model = MixedRanks()
    extra = nn.Parameter(torch.ones(5))
    opt = make(model)
    train(model, opt, 3)
    opt.add_param_group({"params": [extra], "lr": 1e-2})
    for t in range(3):
        x, y = batch(t)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) + (extra ** 2).sum()
        loss.backward()
        opt.step(loss=loss)
    assert (extra < 1).all()
    assert opt.param_groups[1]["weight_decay"] == 0.0  # defaults filled in


# ------------------------------------------------------------------------- grads and steps


def test_params_without_grad_are_skipped():
    model = MixedRanks()
    opt = make(model)
    model.odd.requires_grad_(False)
    odd0 = model.odd.detach().clone()
    train(model, opt, 3)
    assert torch.equal(model.odd, odd0)
    assert "mom" not in opt.state[model.odd]


def test_step_with_all_grads_none_changes_nothing():
    model = MixedRanks()
    opt = make(model)
    train(model, opt, 2)
    before = params_of(model)
    sd = copy.deepcopy(opt.state_dict())
    opt.zero_grad(set_to_none=True)
    opt.step(loss=1.0)
    opt.step()
    assert same(before, params_of(model))
    after = opt.state_dict()
    for k, st in sd["state"].items():
        for key, val in st.items():
            assert torch.equal(torch.as_tensor(val), torch.as_tensor(after["state"][k][key]))


def test_sparse_gradients_raise_clearly():
    emb = nn.Embedding(10, 3, sparse=True)
    opt = LearnedOptimizer(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_complex_params_step_like_their_real_view():
    z = nn.Parameter(torch.randn(4, 3, dtype=torch.complex64))
    r = nn.Parameter(torch.view_as_real(z.detach()).clone())
    oz, orr = LearnedOptimizer([z], weights=random_weights()), LearnedOptimizer([r], weights=random_weights())
    target = torch.randn(4, 3, dtype=torch.complex64)
    for _ in range(5):
        for opt, p in ((oz, z), (orr, r)):
            opt.zero_grad()
            zz = p if p.is_complex() else torch.view_as_complex(p)
            loss = (zz - target).abs().pow(2).sum()
            loss.backward()
            opt.step(loss=loss)
    torch.testing.assert_close(torch.view_as_real(z.detach()), r.detach(), rtol=0, atol=0)


def test_odd_shapes_zero_one_five_dim_and_empty():
    ps = [nn.Parameter(torch.randn(s)) for s in [(), (7,), (2, 1, 3, 2, 2), (0,), (0, 4)]]
    opt = LearnedOptimizer(ps, weights=random_weights())
    before = [p.detach().clone() for p in ps]
    for _ in range(5):
        opt.zero_grad()
        loss = sum((p ** 2).sum() for p in ps)
        loss.backward()
        opt.step(loss=loss)
    for p, b in zip(ps, before):
        assert p.shape == b.shape and torch.isfinite(p).all()
        if p.numel():
            assert not torch.equal(p, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_computed_in_fp32(dtype):
    torch.manual_seed(0)
    p_lo = nn.Parameter(torch.randn(6, 5).to(dtype))
    p_32 = nn.Parameter(p_lo.detach().float())
    o_lo = LearnedOptimizer([p_lo], weights=random_weights())
    o_32 = LearnedOptimizer([p_32], weights=random_weights())
    g = torch.randn(6, 5).to(dtype)
    p_lo.grad = g.clone()
    p_32.grad = g.float()
    o_lo.step(loss=1.0)
    o_32.step(loss=1.0)
    assert p_lo.dtype == dtype
    assert o_lo.state[p_lo]["mom"].dtype == torch.float32
    assert torch.equal(p_lo.detach(), p_32.detach().to(dtype))


def test_float64_params_computed_in_float64():
    model = MixedRanks(torch.float64)
    opt = make(model)
    train(model, opt, 3, dtype=torch.float64)
    assert opt.state[model.fc]["mom"].dtype == torch.float64
    assert model.fc.dtype == torch.float64


def test_nonfinite_gradients_skip_the_step_and_are_counted():
    model = MixedRanks()
    opt = make(model)
    train(model, opt, 2)
    before = params_of(model)
    st_before = copy.deepcopy(opt.state_dict())
    x, y = batch(9)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    model.fc.grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step(loss=1.0)
    assert same(before, params_of(model))
    st = opt.state_dict()["state"]
    assert st[0]["nonfinite_skips"] == 1
    for k, s in st_before["state"].items():
        for key in ("mom", "rms", "lstm_h", "step", "train_loss_count"):
            if key in s:
                assert torch.equal(s[key], st[k][key])
    train(model, opt, 2)  # and training goes on
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_huge_finite_gradients_are_stepped_and_inf_is_skipped():
    # the fast finiteness check (fused 2-norms) overflows beyond ~1e19; a finite gradient that
    # large must still be stepped, while a real inf is skipped
    model = MixedRanks()
    opt = make(model)
    train(model, opt, 1)
    before = params_of(model)
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e30)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert not same(before, params_of(model))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.state_dict()["state"][0]["nonfinite_skips"] == 0
    model.fc.grad[0, 0] = float("-inf")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()
    assert opt.state_dict()["state"][0]["nonfinite_skips"] == 1


# ------------------------------------------------------------------ loss, lr, decay, maximize


def test_closure_runs_forward_backward_and_its_loss_is_used():
    model = MixedRanks()
    opt = make(model)
    x, y = batch(0)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with torch.no_grad():  # step must enable grad for the closure itself
        out = opt.step(closure)
    assert isinstance(out, torch.Tensor)
    assert float(opt.state[model.scale]["train_loss_count"]) == 1
    with pytest.raises(ValueError, match="not both"):
        opt.step(closure, loss=1.0)


def test_step_none_positional_and_without_loss():
    model = MixedRanks()
    opt = make(model)
    x, y = batch(0)
    nn.functional.cross_entropy(model(x), y).backward()
    before = params_of(model)
    assert opt.step(None) is None
    assert not same(before, params_of(model))
    assert float(opt.state[model.scale]["train_loss_count"]) == 0


def test_lr_zero_is_a_noop():
    model = MixedRanks()
    opt = make(model, lr=0.0, weights=random_weights())
    before = params_of(model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step(loss=1.0)
    assert same(before, params_of(model))
    train(model, opt, 3)  # nonzero grads, still nothing moves
    assert same(before, params_of(model))


def _one_step(model, **kw):
    opt = make(model, weights=random_weights(), **kw)
    x, y = batch(0)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step(loss=1.0)
    return params_of(model)


def test_tensor_lr_equals_float_lr():
    a = _one_step(MixedRanks(), lr=3e-3)
    b = _one_step(MixedRanks(), lr=torch.tensor(3e-3))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-8)


def test_decoupled_weight_decay():
    start = params_of(MixedRanks())
    plain = _one_step(MixedRanks(), lr=1e-2)
    decayed = _one_step(MixedRanks(), lr=1e-2, weight_decay=0.5)
    for p0, a, b in zip(start, plain, decayed):
        torch.testing.assert_close(b, a - 1e-2 * 0.5 * p0, rtol=1e-6, atol=1e-7)


def test_maximize_equals_minimizing_the_negation():
    m1, m2 = MixedRanks(), MixedRanks()
    o1 = make(m1, weights=random_weights(), maximize=True)
    o2 = make(m2, weights=random_weights())
    for t in range(3):
        x, y = batch(t)
        for m, o, sign in ((m1, o1, -1.0), (m2, o2, 1.0)):
            o.zero_grad()
            loss = sign * nn.functional.cross_entropy(m(x), y)
            loss.backward()
            o.step()
    assert same(params_of(m1), params_of(m2))


# ------------------------------------------------------------------------ state and copies


def _trajectory_after(opt_factory, load_from=None, steps=5, start=10):
    model = MixedRanks()
    opt = opt_factory(model)
    if load_from is not None:
        model.load_state_dict(load_from[0])
        opt.load_state_dict(load_from[1])
    train(model, opt, steps, start=start)
    return params_of(model)


@pytest.mark.parametrize("warm_steps", [0, 10])
def test_state_dict_round_trip_gives_identical_trajectory(warm_steps):
    factory = lambda m: make(m, weights=random_weights())  # noqa: E731
    model = MixedRanks()
    opt = factory(model)
    train(model, opt, warm_steps)
    opt.report_validation_loss(0.7)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    expected = (train(model, opt, 5, start=10), params_of(model))[1]
    got = _trajectory_after(factory, (saved["model"], saved["opt"]))
    assert same(expected, got)


def test_state_dict_is_standard():
    model = MixedRanks()
    opt = make(model)
    train(model, opt, 2)
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    assert all(isinstance(k, int) for k in sd["state"])
    for st in sd["state"].values():
        for v in st.values():
            assert isinstance(v, (torch.Tensor, int, float))
    assert "weights_checksum" in sd["state"][0] and "weights_name" in sd["state"][0]
    name = bytes(sd["state"][0]["weights_name"].tolist()).decode()
    assert name == opt.weights_info.name


def test_load_into_fresh_optimizer_over_cloned_params():
    model = MixedRanks()
    opt = make(model)
    train(model, opt, 4)
    clone = copy.deepcopy(model)
    opt2 = make(clone)
    opt2.load_state_dict(opt.state_dict())
    train(model, opt, 3, start=20)
    train(clone, opt2, 3, start=20)
    assert same(params_of(model), params_of(clone))


def test_state_dict_from_other_weights_is_rejected():
    model = MixedRanks()
    opt = make(model)
    train(model, opt, 1)
    other = make(MixedRanks(), weights=random_weights())
    with pytest.raises(ValueError, match=DEFAULT_WEIGHTS):  # the error names the weights it was made with
        other.load_state_dict(opt.state_dict())


def test_state_dict_from_the_same_tensors_under_another_config_is_rejected():
    net = random_weights()
    model = MixedRanks()
    opt = make(model, weights=net)
    train(model, opt, 1)
    sd = opt.state_dict()
    other = make(MixedRanks(), weights=net.with_rms_eps(1e-10))  # same tensors, same checksum
    assert other.weights_info.checksum == opt.weights_info.checksum
    with pytest.raises(ValueError, match="another architecture config"):
        other.load_state_dict(sd)
    # states saved before the config was recorded still load
    del sd["state"][0]["weights_config"]
    other.load_state_dict(sd)
    make(MixedRanks(), weights=net).load_state_dict(opt.state_dict())


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_deepcopy_and_pickle_keep_a_working_optimizer(how):
    model = MixedRanks()
    opt = make(model, weights=random_weights())
    train(model, opt, 3)
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    else:
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    train(model, opt, 3, start=5)
    train(model2, opt2, 3, start=5)
    assert same(params_of(model), params_of(model2))
    assert opt2.weights_info == opt.weights_info


def test_same_inputs_same_result():
    a = _one_step(MixedRanks())
    b = _one_step(MixedRanks())
    assert same(a, b)


# ------------------------------------------------------------------- hooks and schedulers


def test_step_hooks_and_profiler_label():
    model = MixedRanks()
    opt = make(model)
    calls = []
    h1 = opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    h2 = opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    with torch.profiler.profile() as prof:
        train(model, opt, 1)
    assert calls == ["pre", "post"]
    h1.remove()
    h2.remove()
    train(model, opt, 1)
    assert calls == ["pre", "post"]
    names = {e.name for e in prof.events()}
    assert any("LearnedOptimizer.step" in n for n in names), names


@pytest.mark.parametrize("name", ["lambda", "step", "cosine", "onecycle", "plateau"])
def test_lr_schedulers(name):
    model = MixedRanks()
    opt = make(model, lr=1e-2)
    S = torch.optim.lr_scheduler
    sched = {
        "lambda": lambda: S.LambdaLR(opt, lambda e: 0.5 ** e),
        "step": lambda: S.StepLR(opt, step_size=1, gamma=0.1),
        "cosine": lambda: S.CosineAnnealingLR(opt, T_max=4),
        "onecycle": lambda: S.OneCycleLR(opt, max_lr=1e-2, total_steps=10, cycle_momentum=False),
        "plateau": lambda: S.ReduceLROnPlateau(opt, patience=0, factor=0.1),
    }[name]()
    lrs = []
    for t in range(4):
        train(model, opt, 1, start=t)
        sched.step(1.0) if name == "plateau" else sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert len(set(lrs)) > 1, lrs
    # the group's lr is what the step uses: force it to zero and nothing moves
    opt.param_groups[0]["lr"] = 0.0
    before = params_of(model)
    train(model, opt, 1, start=9)
    assert same(before, params_of(model))


def test_grad_scaler_on_cpu_including_a_skipped_step():
    model = MixedRanks()
    opt = make(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    for t in range(3):
        x, y = batch(t)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        scaler.scale(loss).backward()
        scaler.step(opt, loss=loss.detach())
        scaler.update()
    assert float(opt.state[model.scale]["step"]) == 3
    before = params_of(model)
    st_before = copy.deepcopy(opt.state_dict())
    x, y = batch(7)
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y) * float("inf")
    scaler.scale(loss).backward()
    scale_before = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < scale_before  # the scaler saw the inf and skipped
    assert same(before, params_of(model))
    after = opt.state_dict()
    for k, s in st_before["state"].items():
        for key, val in s.items():
            assert torch.equal(torch.as_tensor(val), torch.as_tensor(after["state"][k][key]))
