"""MAML, MAML++ and iMAML: meta-gradients checked against independent computations."""

import importlib.util
import io
import math
import os
import zipfile

import pytest
import torch
from torch import nn
from torch.func import grad, hessian

from meta_train.fewshot.data import (Episode, FewShotClasses, OmniglotError, Sinusoid, load_omniglot,
                                     stack_episodes, vinyals_split)
from meta_train.fewshot.maml import (MAMLConfig, batched_conjugate_gradient, conjugate_gradient, curvature_product,
                                     imaml_adapt,
                                     imaml_meta_gradient, imaml_task_gradient, init_meta, proximal_solve, proximal_step,
                                     maml_task_loss, meta_gradient, msl_weights)
from meta_train.fewshot.models import FunctionalModel, conv4, from_module

OMNIGLOT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "omniglot")
needs_omniglot = pytest.mark.skipif(not os.path.exists(os.path.join(OMNIGLOT, "images_background.zip")),
                                    reason="Omniglot archives not found beside the project (../shared/data/omniglot)")


def tiny_mlp():
    torch.manual_seed(0)
    return from_module(nn.Sequential(nn.Linear(1, 5), nn.Tanh(), nn.Linear(5, 1)).double())


def sine_episode(i, shots=6):
    e = Sinusoid(shots, 7, seed=3).episode(i)
    return Episode(*(x.double() for x in e))


def mse(out, y):
    return ((out - y) ** 2).mean()


def flat(d):
    return torch.cat([v.reshape(-1) for v in d.values()])


def test_maml_second_order_meta_gradient_equals_finite_differences():
    model = tiny_mlp()
    cfg = MAMLConfig(inner_steps=2, inner_lr=0.3)
    meta = {"params": model.init(1)}
    ep = sine_episode(0)
    loss = lambda m: maml_task_loss(m, ep, model, mse, cfg, second_order=True)[0]  # noqa: E731
    g = flat(grad(loss)(meta)["params"])
    names = list(meta["params"])
    fd, h = [], 1e-6
    for k in names:
        base = meta["params"][k]
        for j in range(base.numel()):
            plus, minus = base.clone(), base.clone()
            plus.view(-1)[j] += h
            minus.view(-1)[j] -= h
            lp = loss({"params": {**meta["params"], k: plus}})
            lm = loss({"params": {**meta["params"], k: minus}})
            fd.append((lp - lm) / (2 * h))
    fd = torch.stack(fd)
    assert torch.allclose(g, fd, rtol=1e-6, atol=1e-8), (g - fd).abs().max()
    # and first-order differs from it here (the check has teeth)
    g1 = flat(grad(lambda m: maml_task_loss(m, ep, model, mse, cfg, second_order=False)[0])(meta)["params"])
    assert (g1 - fd).abs().max() > 1e-4


def test_first_order_drops_exactly_the_second_order_term():
    model = tiny_mlp()
    alpha = 0.2
    cfg = MAMLConfig(inner_steps=1, inner_lr=alpha)
    theta = model.init(2)
    ep = sine_episode(1)
    sup = lambda p: mse(model.forward(p, ep.xs)[0], ep.ys)  # noqa: E731
    qry = lambda p: mse(model.forward(p, ep.xq)[0], ep.yq)  # noqa: E731
    gs = grad(sup)(theta)
    phi = {k: theta[k] - alpha * gs[k] for k in theta}
    gq = flat(grad(qry)(phi))
    fo = flat(grad(lambda m: maml_task_loss(m, ep, model, mse, cfg, False)[0])({"params": theta})["params"])
    so = flat(grad(lambda m: maml_task_loss(m, ep, model, mse, cfg, True)[0])({"params": theta})["params"])
    assert torch.allclose(fo, gq, rtol=1e-12, atol=1e-14)
    # second order: (I - alpha H) gq, H the support Hessian at theta
    names = list(theta)
    sizes = [theta[k].numel() for k in names]

    def sup_flat(v):
        parts = dict(zip(names, [x.view(theta[k].shape) for x, k in zip(v.split(sizes), names)]))
        return sup(parts)
    H = hessian(sup_flat)(flat(theta))
    assert torch.allclose(so - fo, -alpha * H @ gq, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("second_order", [True, False])
def test_vmap_over_tasks_equals_loop_with_per_step_batch_norm(second_order):
    S = 2
    model = conv4(ways=3, channels=4, image=16, per_step_bn=S)
    cfg = MAMLConfig(inner_steps=S, inner_lr=0.1, learn_inner_lr=True, multi_step_loss=True)
    meta = init_meta(model, cfg, seed=0)
    meta = {g: {k: v.double() for k, v in d.items()} for g, d in meta.items()}
    gen = torch.Generator().manual_seed(0)
    eps = [Episode(torch.rand(6, 1, 16, 16, generator=gen).double(), torch.tensor([0, 0, 1, 1, 2, 2]),
                   torch.rand(9, 1, 16, 16, generator=gen).double(), torch.tensor([0, 1, 2] * 3)) for _ in range(3)]
    batch = stack_episodes(eps)
    w = msl_weights(S, 0.5, 1).double()
    ce = nn.functional.cross_entropy
    gv, lv, _, sv = meta_gradient(meta, batch, model, ce, cfg, second_order, w, use_vmap=True)
    gl, ll, _, sl = meta_gradient(meta, batch, model, ce, cfg, second_order, w, use_vmap=False)
    assert sv.shape == (S + 1, 4, 2, 4) and torch.allclose(sv, sl)
    assert set(gv) == {"params", "lrs"}
    for grp in gv:
        for k in gv[grp]:
            assert torch.allclose(gv[grp][k], gl[grp][k], rtol=1e-9, atol=1e-12), (grp, k)
    assert torch.allclose(lv, ll)
    assert all(gv["params"][f"bn{i}.weight"].abs().sum() > 0 for i in range(4))  # per-step BN is learned


def test_msl_weights_follow_their_schedule():
    S = 5
    w0 = msl_weights(S, 0, 10)
    assert torch.allclose(w0, torch.full((S,), 1 / S))
    prev = w0
    for e in range(1, 15):
        w = msl_weights(S, e, 10)
        assert abs(float(w.sum()) - 1) < 1e-6
        assert (w[:-1] <= prev[:-1] + 1e-7).all() and w[-1] >= prev[-1] - 1e-7
        prev = w
    end = msl_weights(S, 10, 10)
    assert torch.allclose(end[:-1], torch.full((S - 1,), 0.03 / S))
    assert abs(float(end[-1]) - (1 - (S - 1) * 0.03 / S)) < 1e-6
    assert torch.equal(msl_weights(S, 30, 10), end)


def test_imaml_implicit_gradient_equals_closed_form_on_a_quadratic():
    d, lam = 4, 1.5
    g = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    A = Q @ torch.diag(torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=torch.float64)) @ Q.T
    a = torch.randn(d, generator=g, dtype=torch.float64)
    b = torch.randn(d, generator=g, dtype=torch.float64)
    model = FunctionalModel(lambda s: {"w": torch.zeros(d, dtype=torch.float64)},
                            lambda p, x, step=0, stats=None: (p["w"], []))

    def loss_fn(w, target):  # support: 0.5 (w-a)A(w-a); query: 0.5 |w-b|^2 (target says which)
        return 0.5 * (w - a) @ A @ (w - a) if target == 0 else 0.5 * ((w - b) ** 2).sum()
    theta = {"w": torch.randn(d, generator=g, dtype=torch.float64)}
    ep = Episode(None, 0, None, 1)
    cfg = MAMLConfig(lam=lam, cg_steps=d)
    got, _, _ = imaml_task_gradient(theta, ep, model, loss_fn, cfg, inner_steps=3000, inner_lr=0.1)

    def phi_star(t):  # argmin of the proximal problem, in closed form
        return torch.linalg.solve(A + lam * torch.eye(d, dtype=torch.float64), A @ a + lam * t)
    exact = torch.func.grad(lambda t: 0.5 * ((phi_star(t) - b) ** 2).sum())(theta["w"])
    assert torch.allclose(got["w"], exact, rtol=1e-8, atol=1e-10), (got["w"], exact)


def test_imaml_implicit_gradient_equals_finite_differences_on_a_network():
    """Beyond the quadratic: on a tanh network whose proximal inner problem is solved to
    convergence, the CG implicit gradient equals central differences of the query loss at the
    inner solution. (With an unsolved inner problem the implicit gradient is biased: that is
    a property of iMAML, not a bug; see benchmarks/fewshot_omniglot.py.)"""
    model = tiny_mlp()
    theta = model.init(0)
    ep = sine_episode(0)
    cfg = MAMLConfig(lam=2.0, cg_steps=40)
    steps, lr = 300, 0.1  # the proximal term contracts each step by about 1 - lr * lam
    got, _, _ = imaml_task_gradient(theta, ep, model, mse, cfg, steps, lr)

    def query_at_solution(t):
        phi = imaml_adapt(model, t, ep.xs, ep.ys, mse, cfg, steps, lr)
        return mse(model.forward(phi, ep.xq, 0)[0], ep.yq)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):  # directional derivatives along random directions
        d = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in theta.items()}
        eps = 1e-5
        fd = (query_at_solution({k: v + eps * d[k] for k, v in theta.items()})
              - query_at_solution({k: v - eps * d[k] for k, v in theta.items()})) / (2 * eps)
        implicit = sum((got[k] * d[k]).sum() for k in d)
        assert abs(implicit - fd) < 1e-6 * abs(fd), (implicit, fd)


def test_conjugate_gradient_solves_spd_system():
    g = torch.Generator().manual_seed(1)
    M = torch.randn(6, 6, generator=g, dtype=torch.float64)
    A = M @ M.T + torch.eye(6, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    x = conjugate_gradient(lambda v: {"x": A @ v["x"]}, {"x": b}, 6)["x"]
    assert torch.allclose(A @ x, b, atol=1e-9)


def test_batched_conjugate_gradient_equals_the_loop_even_with_negative_curvature():
    g = torch.Generator().manual_seed(2)
    mats = []
    for i in range(4):
        M = torch.randn(5, 5, generator=g, dtype=torch.float64)
        A = M @ M.T + torch.eye(5, dtype=torch.float64)
        if i == 1:  # indefinite: CG stops part-way
            A = A - 4.0 * torch.eye(5, dtype=torch.float64)
        if i == 2:  # negative definite: CG stops on the first step and keeps b
            A = -A
        mats.append(A)
    As = torch.stack(mats)
    b = torch.randn(4, 5, generator=g, dtype=torch.float64)
    got = batched_conjugate_gradient(lambda v: {"x": torch.einsum("nij,nj->ni", As, v["x"])}, {"x": b}, 5)["x"]
    for i in range(4):
        ref = conjugate_gradient(lambda v: {"x": mats[i] @ v["x"]}, {"x": b[i]}, 5)["x"]
        assert torch.allclose(got[i], ref, rtol=1e-10, atol=1e-12), i
    assert torch.equal(got[2], b[2])


def test_gauss_newton_product_is_the_hessian_for_a_linear_model_and_psd_for_a_network():
    g = torch.Generator().manual_seed(3)
    lin = FunctionalModel(lambda s: {"w": torch.randn(5, 3, generator=g, dtype=torch.float64),
                                     "b": torch.randn(3, generator=g, dtype=torch.float64)},
                          lambda p, x, step=0, stats=None: (x @ p["w"] + p["b"], []))
    ce = nn.functional.cross_entropy
    phi = lin.init(0)
    x, y = torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)
    v = {k: torch.randn(t.shape, generator=g, dtype=torch.float64) for k, t in phi.items()}
    gn = curvature_product(lin, ce, "gauss-newton")(phi, x, y, v)
    hv = curvature_product(lin, ce, "hessian")(phi, x, y, v)
    for k in phi:  # logits linear in the parameters: no second-derivative term to drop
        assert torch.allclose(gn[k], hv[k], rtol=1e-10, atol=1e-12), k
    model = conv4(ways=3, channels=4, image=16)  # batch norm and ReLUs: the Hessian is indefinite
    theta = {k: t.double() for k, t in model.init(0).items()}
    xs, ys = torch.rand(6, 1, 16, 16, generator=g).double(), torch.tensor([0, 0, 1, 1, 2, 2])
    prod = curvature_product(model, ce, "gauss-newton")
    for _ in range(5):
        v = {k: torch.randn(t.shape, generator=g, dtype=torch.float64) for k, t in theta.items()}
        cv = prod(theta, xs, ys, v)
        assert sum((v[k] * cv[k]).sum() for k in v) >= 0
    with pytest.raises(ValueError, match="curvature"):
        curvature_product(model, ce, "fisher")


def test_gauss_newton_product_for_mse_equals_the_explicit_jacobian_form():
    model = tiny_mlp()
    phi = model.init(0)
    ep = sine_episode(0)
    g = torch.Generator().manual_seed(4)
    v = {k: torch.randn(t.shape, generator=g, dtype=t.dtype) for k, t in phi.items()}
    jac = torch.func.jacrev(lambda p: model.forward(p, ep.xs, 0)[0].reshape(-1))(phi)
    J = torch.cat([jac[k].reshape(jac[k].shape[0], -1) for k in phi], 1)
    vec = torch.cat([v[k].reshape(-1) for k in phi])
    want = J.T @ (2.0 / J.shape[0] * (J @ vec))  # mean squared error: output Hessian 2/N
    for loss in (mse, nn.functional.mse_loss):  # PyTorch's own too (its backward broke jvp once)
        got = curvature_product(model, loss, "gauss-newton")(phi, ep.xs, ep.ys, v)
        assert torch.allclose(torch.cat([got[k].reshape(-1) for k in phi]), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("curvature,solver", [("hessian", "gd"), ("gauss-newton", "gd"),
                                              ("gauss-newton", "gauss-newton")])
def test_imaml_vmap_over_tasks_equals_the_per_task_reference(curvature, solver):
    model = conv4(ways=3, channels=4, image=16)
    cfg = MAMLConfig(lam=2.0, cg_steps=3, curvature=curvature, inner_solver=solver, inner_cg_steps=4)
    theta = {k: v.double() for k, v in init_meta(model, cfg, seed=0)["params"].items()}
    gen = torch.Generator().manual_seed(0)
    eps = [Episode(torch.rand(6, 1, 16, 16, generator=gen).double(), torch.tensor([0, 0, 1, 1, 2, 2]),
                   torch.rand(9, 1, 16, 16, generator=gen).double(), torch.tensor([0, 1, 2] * 3)) for _ in range(3)]
    batch = stack_episodes(eps)
    ce = nn.functional.cross_entropy
    gv, lv, _ = imaml_meta_gradient(theta, batch, model, ce, cfg, 3, 0.1, use_vmap=True)
    gl, ll, _ = imaml_meta_gradient(theta, batch, model, ce, cfg, 3, 0.1, use_vmap=False)
    assert set(gv) == set(gl)
    for k in gv:
        assert torch.allclose(gv[k], gl[k], rtol=1e-8, atol=1e-11), k
    assert torch.allclose(lv, ll)


def test_gauss_newton_inner_solver_solves_the_proximal_problem():
    """On least squares with a linear model the Gauss-Newton matrix is the Hessian, so one
    full step with enough CG steps lands on the closed-form proximal solution; on a tanh
    network, Gauss-Newton steps reach the solution that many gradient steps converge to."""
    g = torch.Generator().manual_seed(5)
    d, n, lam = 4, 12, 2.0
    lin = FunctionalModel(lambda s: {"w": torch.randn(d, 1, generator=g, dtype=torch.float64)},
                          lambda p, x, step=0, stats=None: (x @ p["w"], []))
    x, y = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, 1, generator=g, dtype=torch.float64)
    theta = lin.init(0)
    cfg = MAMLConfig(lam=lam, inner_solver="gauss-newton", inner_cg_steps=d)
    got = proximal_solve(lin, theta, x, y, mse, cfg, 1, 1.0)["w"]
    A = 2.0 / n * x.T @ x  # the Hessian of the mean squared error
    want = torch.linalg.solve(A + lam * torch.eye(d, dtype=torch.float64), 2.0 / n * x.T @ y + lam * theta["w"])
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-12)

    model = tiny_mlp()
    theta = model.init(0)
    ep = sine_episode(0)
    by_gd = proximal_solve(model, theta, ep.xs, ep.ys, mse, MAMLConfig(lam=lam), 400, 0.1)
    by_gn = proximal_solve(model, theta, ep.xs, ep.ys, mse,
                           MAMLConfig(lam=lam, inner_solver="gauss-newton", inner_cg_steps=30), 16, 1.0)
    for k in theta:
        assert torch.allclose(by_gn[k], by_gd[k], rtol=1e-6, atol=1e-8), k
    with pytest.raises(ValueError, match="inner_solver"):
        proximal_solve(model, theta, ep.xs, ep.ys, mse, MAMLConfig(inner_solver="newton"), 1, 1.0)


def test_proximal_step_and_its_gradient_clip():
    phi = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0])}
    theta = {"a": torch.zeros(2), "b": torch.zeros(1)}
    g = {"a": torch.tensor([30.0, 40.0]), "b": torch.tensor([0.0])}  # global norm 50
    plain = proximal_step(phi, g, theta, 0.1, 2.0)
    assert torch.allclose(plain["a"], phi["a"] - 0.1 * (g["a"] + 2.0 * phi["a"]))
    assert all(torch.equal(plain[k], proximal_step(phi, g, theta, 0.1, 2.0, clip=100.0)[k]) for k in phi)
    clipped = proximal_step(phi, g, theta, 0.1, 2.0, clip=5.0)  # the loss gradient scaled to norm 5
    assert torch.allclose(clipped["a"], phi["a"] - 0.1 * (g["a"] / 10 + 2.0 * phi["a"]))
    assert torch.allclose(clipped["b"], phi["b"] - 0.1 * 2.0 * phi["b"])


def test_sinusoid_and_episodes_are_seeded():
    s = Sinusoid(5, 10, seed=0)
    a, b = s.episode(3), s.episode(3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(s.episode(4).ys, a.ys)
    amp, ph = s.params(3)
    assert 0.1 <= amp <= 5 and 0 <= ph <= math.pi
    assert a.xs.shape == (5, 1) and a.xq.shape == (10, 1) and (a.xs.abs() <= 5).all()
    imgs = torch.randint(0, 255, (12, 20, 28, 28), dtype=torch.uint8)
    f = FewShotClasses(imgs, ways=5, shots=1, queries=3, seed=0)
    e = f.episode(0)
    assert e.xs.shape == (5, 1, 28, 28) and e.xq.shape == (15, 1, 28, 28)
    assert e.ys.tolist() == [0, 1, 2, 3, 4] and sorted(e.yq.tolist()) == sorted([0, 1, 2, 3, 4] * 3)
    assert all(torch.equal(x, y) for x, y in zip(e, f.episode(0)))
    with pytest.raises(ValueError, match="classes"):
        FewShotClasses(imgs, ways=20, shots=1, queries=1)


def _fake_archive(path, name, alphabets=2, chars=2):
    from PIL import Image
    with zipfile.ZipFile(path, "w") as z:
        for a in range(alphabets):
            for c in range(chars):
                for d in range(20):
                    buf = io.BytesIO()
                    Image.new("1", (105, 105), color=1).save(buf, format="PNG")
                    z.writestr(f"{name}/Alpha{a}/character{c + 1:02d}/{d:04d}_{c:02d}.png", buf.getvalue())


def test_omniglot_without_pillow_says_what_to_install(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "PIL" else real(name, *a))
    with pytest.raises(ImportError, match="pip install 'learned_opt\\[data\\]'"):
        load_omniglot(str(tmp_path))


def test_omniglot_loader_errors_and_layout(tmp_path):
    pytest.importorskip("PIL")
    with pytest.raises(OmniglotError, match="not a folder"):
        load_omniglot(str(tmp_path / "nowhere"))
    with pytest.raises(OmniglotError, match="images_background"):
        load_omniglot(str(tmp_path))
    _fake_archive(tmp_path / "images_background.zip", "images_background")
    (tmp_path / "images_evaluation.zip").write_bytes(b"this is not a zip file")
    with pytest.raises(OmniglotError, match="images_evaluation.zip: not a readable zip"):
        load_omniglot(str(tmp_path), cache_dir=str(tmp_path / "cache"))
    _fake_archive(tmp_path / "images_evaluation.zip", "images_evaluation", alphabets=1)
    data = load_omniglot(str(tmp_path), cache_dir=str(tmp_path / "cache"))
    assert data.shape == (6, 20, 28, 28) and data.dtype == torch.uint8
    assert int(data.max()) == 0  # blank (white) drawings: no ink
    assert len(os.listdir(tmp_path / "cache")) == 1
    with pytest.raises(OmniglotError, match="1623"):
        vinyals_split(data, "train")


@needs_omniglot
def test_real_omniglot_vinyals_split():
    data = load_omniglot(OMNIGLOT)
    assert data.shape == (1623, 20, 28, 28)
    train, test = vinyals_split(data, "train"), vinyals_split(data, "test")
    assert train.shape[0] == 4800 and test.shape[0] == 1692
    assert torch.equal(train[1], torch.rot90(data[0], 1, dims=(-2, -1)))
    assert 0.02 < data.float().mean().item() / 255 < 0.4  # ink is a minority of pixels


def test_fewshot_resume_equals_uninterrupted_and_checks_the_config(tmp_path):
    from meta_train.fewshot.train import FewShotConfig, FewShotTrainer

    def cfg(**kw):
        return FewShotConfig(algorithm="mamlpp", dataset="sinusoid", shots=5, inner_steps=2, meta_batch=3,
                             steps=4, epoch_len=2, msl_epochs=1, checkpoint_every=2, **kw)

    whole = FewShotTrainer(cfg(), str(tmp_path / "whole"))
    whole.run(progress=False)
    part = FewShotTrainer(cfg(), str(tmp_path / "part"))
    for _ in range(2):
        part.outer_step()
    part.save()  # as if the process died right after the step-2 checkpoint
    resumed = FewShotTrainer(cfg(), str(tmp_path / "part"))
    resumed.run(resume=True, progress=False)
    assert resumed.step == 4
    for g, d in whole.meta.items():
        for k, v in d.items():
            assert torch.equal(v, resumed.meta[g][k]), (g, k)

    # a checkpoint written before an option existed resumes when the option is at its default ...
    sd = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    del sd["config"]["inner_clip"]
    torch.save(sd, tmp_path / "part" / "checkpoint.pt")
    FewShotTrainer(cfg(), str(tmp_path / "part")).load()
    # ... and not when it is set otherwise, nor when a saved setting differs
    with pytest.raises(RuntimeError, match="inner_clip"):
        FewShotTrainer(cfg(inner_clip=1.0), str(tmp_path / "part")).load()
    with pytest.raises(RuntimeError, match="inner_lr"):
        FewShotTrainer(cfg(inner_lr=0.5), str(tmp_path / "part")).load()


def test_msl_final_only_drops_the_intermediate_losses_after_the_msl_epochs():
    """With msl_final_only, MAML++ uses the multi-step loss for msl_epochs and then the last
    step's query loss alone: the outer step then equals that of a run without the multi-step
    loss; without the switch the floor weights keep the earlier steps in the meta-loss."""
    from meta_train.fewshot.train import FewShotConfig, FewShotTrainer

    def trainer(**kw):
        cfg = FewShotConfig(algorithm="mamlpp", dataset="sinusoid", shots=5, inner_steps=3, meta_batch=3,
                            steps=6, epoch_len=1, msl_epochs=2, **kw)
        return FewShotTrainer(cfg, "unused")

    final_only, floor, plain = trainer(msl_final_only=True), trainer(), trainer(msl=False)
    assert [final_only.multi_step_loss() for final_only.step in range(4)] == [True, True, False, False]
    assert all(floor.multi_step_loss() for floor.step in range(4))
    for t in (final_only, floor, plain):
        t.step = 2
        rec = t.outer_step()
    assert rec["multi_step_loss"] is False  # the log says what the step did
    for g, d in plain.meta.items():
        for k, v in d.items():
            assert torch.equal(v, final_only.meta[g][k]), (g, k)
    assert not all(torch.equal(v, floor.meta["params"][k]) for k, v in plain.meta["params"].items())


def test_fewshot_time_budget_stops_and_survives_resume(tmp_path):
    from meta_train.fewshot.train import FewShotConfig, FewShotTrainer

    def cfg(**kw):
        return FewShotConfig(algorithm="maml", dataset="sinusoid", shots=5, inner_steps=1, meta_batch=2,
                             steps=50, checkpoint_every=1000, **kw)

    # a budget of ~zero hours: the first step spends it, so training stops there (and saves)
    tr = FewShotTrainer(cfg(hours=1e-12), str(tmp_path / "run"))
    tr.run(progress=False)
    assert tr.step == 1 and tr.seconds > 0
    again = FewShotTrainer(cfg(hours=1e-12), str(tmp_path / "run"))
    again.run(resume=True, progress=False)  # the spent time travels with the checkpoint
    assert again.step == 1 and again.seconds == tr.seconds
    # an older checkpoint without the time: it is summed from the log
    sd = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    del sd["seconds"]
    torch.save(sd, tmp_path / "run" / "checkpoint.pt")
    old = FewShotTrainer(cfg(hours=1e-12), str(tmp_path / "run"))
    old.run(resume=True, progress=False)
    assert old.step == 1 and old.seconds == pytest.approx(tr.seconds, rel=1e-6)
    with pytest.raises(ValueError, match="hours"):
        FewShotTrainer(cfg(hours=-1.0), str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="inner_solver"):
        FewShotTrainer(cfg(inner_solver="newton"), str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="inner_clip"):
        FewShotTrainer(cfg(inner_solver="gauss-newton", inner_clip=1.0), str(tmp_path / "bad"))


def test_median_and_worst_count_a_diverged_task_as_the_worst():
    from meta_train.fewshot.train import median_and_worst
    nan, inf = float("nan"), float("inf")
    # sorted() on a list with NaN would leave it unordered (the median here was once 0.014
    # for a run whose real median was 0.47)
    assert median_and_worst([0.5, nan, 0.1, 0.3, 0.2], higher_is_better=False) == (0.3, inf)
    assert median_and_worst([0.9, nan, 0.8, 1.0], higher_is_better=True) == (0.9, -inf)
    assert median_and_worst([3.0, 1.0, 2.0], higher_is_better=False) == (2.0, 3.0)


def test_test_tasks_take_their_own_query_count():
    from meta_train.fewshot.train import FewShotConfig, FewShotTrainer
    tr = FewShotTrainer(FewShotConfig(dataset="sinusoid", shots=5, queries=3, eval_queries=7), "unused")
    assert tr.train_data.batch(0, 2).xq.shape[1] == 3
    assert tr.test_data.episode(0).xq.shape[0] == 7
    same = FewShotTrainer(FewShotConfig(dataset="sinusoid", shots=5, queries=3), "unused")
    assert same.test_data.episode(0).xq.shape[0] == 3


@needs_omniglot
def test_running_statistics_evaluation_adapts_as_trained(tmp_path):
    """MAML++ evaluation with the per-step running statistics: the inner loop still normalises
    with the support set's own batch statistics (the gradients the initialisation was
    meta-learned for); only the queries are normalised with the running statistics of the
    last step. The default normalises everything with batch statistics."""
    from meta_train.fewshot.train import FewShotConfig, FewShotTrainer
    cfg = FewShotConfig(algorithm="mamlpp", dataset="omniglot", data_root=OMNIGLOT, ways=3, shots=1,
                        inner_steps=2, meta_batch=2, steps=2, channels=8)
    tr = FewShotTrainer(cfg, str(tmp_path / "run"))
    for _ in range(2):
        tr.outer_step()
    assert tr.running is not None and tr.running.shape[0] == cfg.inner_steps + 1
    calls = []
    forward = tr.model.forward

    def spy(params, x, step=0, stats=None):
        calls.append((x.shape[0], step, stats))
        return forward(params, x, step, stats)
    tr.model.forward = spy
    queries = cfg.ways * 15
    for running in (False, True):
        calls.clear()
        tr.use_running_stats = running
        res = tr.evaluate(3)
        assert 0.0 <= res["accuracy"] <= 1.0
        support = [c for c in calls if c[0] == cfg.ways * cfg.shots]
        query = [c for c in calls if c[0] == queries]
        assert len(support) == 3 * cfg.inner_steps and all(c[2] is None for c in support)
        assert len(query) == 3 and all(c[1] == cfg.inner_steps for c in query)
        for c in query:
            if running:
                assert torch.equal(c[2], tr.running[cfg.inner_steps])
            else:
                assert c[2] is None


def test_outer_cosine_anneals_any_algorithm_and_is_off_by_default(tmp_path):
    from meta_train.fewshot.train import FewShotConfig, FewShotTrainer

    def lrs(**kw):
        cfg = FewShotConfig(algorithm="imaml", dataset="sinusoid", shots=5, inner_steps=1, meta_batch=2, steps=4,
                            outer_lr=1e-2, min_outer_lr=1e-4, checkpoint_every=1000, **kw)
        tr = FewShotTrainer(cfg, str(tmp_path / str(kw)))
        out = []
        for _ in range(4):
            out.append(tr.opt.param_groups[0]["lr"])
            tr.outer_step()
        return out

    assert lrs() == [1e-2] * 4  # iMAML keeps its outer learning rate unless asked
    got = lrs(outer_cosine=True)
    want = [1e-4 + (1e-2 - 1e-4) * (1 + math.cos(math.pi * t / 4)) / 2 for t in range(4)]
    assert got == pytest.approx(want, rel=1e-9)


def test_fewshot_progress_shows_the_cpu_budget(tmp_path, capsys):
    from meta_train.fewshot.train import FewShotConfig, FewShotTrainer
    cfg = FewShotConfig(algorithm="maml", dataset="sinusoid", shots=5, inner_steps=1, meta_batch=2, steps=50,
                        checkpoint_every=1000, hours=0.5)
    FewShotTrainer(cfg, str(tmp_path / "plain")).run(progress=False)  # a line every 50 steps
    assert "cpu_h 0.00/0.5" in capsys.readouterr().out
    if importlib.util.find_spec("tqdm") is None:  # the bar needs the progress extra
        return
    FewShotTrainer(cfg, str(tmp_path / "bar")).run(progress=True)
    assert "cpu_h=0.00/0.5" in capsys.readouterr().err


@pytest.mark.parametrize("setting, at_start, at_epoch_2", [(None, False, True), (-1, True, True), (3, False, False)])
def test_derivative_annealing_follows_the_mamlpp_authors_meaning(tmp_path, setting, at_start, at_epoch_2):
    from meta_train.fewshot.train import FewShotConfig, FewShotTrainer
    cfg = FewShotConfig(algorithm="mamlpp", dataset="sinusoid", steps=60, epoch_len=10,
                        derivative_annealing_epochs=setting)
    tr = FewShotTrainer(cfg, str(tmp_path))
    assert tr.second_order() is at_start  # None: a third of 6 epochs; -1: second order at once
    tr.step = 20  # epoch 2
    assert tr.second_order() is at_epoch_2
