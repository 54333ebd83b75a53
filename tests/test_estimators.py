"""ES and PES estimates agree with known gradients; antithetic pairs share data."""

import pytest
import torch

from learned_opt import ArchConfig, MetaNetwork
from meta_train.estimators import PES, TruncatedES, antithetic_estimate, make_estimator
from meta_train.population import Group, UnrollSettings
from meta_train.tasks import get_family


def _cos(a, b):
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


def test_truncated_es_matches_gradient_of_a_quadratic():
    torch.manual_seed(0)
    d, n, sigma = 12, 4000, 0.01
    A = torch.randn(d, d, dtype=torch.float64)
    H = A @ A.T / d + torch.eye(d, dtype=torch.float64)
    theta, target = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    loss = lambda th: 0.5 * (th - target) @ H @ (th - target)  # noqa: E731
    true = H @ (theta - target)
    z = torch.randn(n, d, dtype=torch.float64)
    lp = torch.stack([loss(theta + sigma * zz) for zz in z])
    ln = torch.stack([loss(theta - sigma * zz) for zz in z])
    est, var, used = antithetic_estimate(z, lp, ln, sigma)
    assert used == n and var > 0
    assert _cos(est, true) > 0.9


def test_pes_is_unbiased_for_the_whole_unroll_where_truncated_es_is_not():
    """Inner problem s_{t+1} = a * s_t + theta over T truncations of one step each; the
    meta-objective is the sum of per-truncation losses (s_t - c)^2. Its gradient through the
    whole unroll is known (autograd); PES recovers it, truncated ES only sees one step."""
    torch.manual_seed(1)
    d, T, n, sigma, a = 4, 6, 6000, 1e-3, 0.8
    theta = torch.randn(d, dtype=torch.float64)
    c = torch.randn(d, dtype=torch.float64)

    th = theta.clone().requires_grad_()
    s, total = torch.zeros(d, dtype=torch.float64), 0.0
    for _ in range(T):
        s = a * s + th
        total = total + ((s - c) ** 2).sum()
    true = torch.autograd.grad(total, th)[0]

    pes, tes = make_estimator("pes", n, d), make_estimator("tes", n, d)
    assert isinstance(pes, PES) and pes.per_member and isinstance(tes, TruncatedES) and not tes.per_member
    s_pos = torch.zeros(n, d, dtype=torch.float64)
    s_neg = torch.zeros(n, d, dtype=torch.float64)
    est_pes = torch.zeros(d, dtype=torch.float64)
    est_tes = torch.zeros(d, dtype=torch.float64)
    s_shared = torch.zeros(n, d, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    for _ in range(T):
        z = torch.randn(n, d, generator=g, dtype=torch.float64)
        s_pos = a * s_pos + (theta + sigma * z)
        s_neg = a * s_neg + (theta - sigma * z)
        lp, ln = ((s_pos - c) ** 2).sum(-1), ((s_neg - c) ** 2).sum(-1)
        est_pes += pes.estimate(z.float(), lp, ln, sigma)[0]
        # truncated ES: both members start from the shared state, the + state is kept
        tp, tn = a * s_shared + (theta + sigma * z), a * s_shared + (theta - sigma * z)
        est_tes += tes.estimate(z, ((tp - c) ** 2).sum(-1), ((tn - c) ** 2).sum(-1), sigma)[0]
        s_shared = tp
    assert _cos(est_pes, true) > 0.9
    assert torch.allclose(est_pes, true, rtol=0.15, atol=0.15 * float(true.abs().max()))
    assert (est_tes - true).norm() > 3 * (est_pes - true).norm()  # truncation bias shows


def test_nonfinite_pairs_are_dropped():
    z = torch.eye(3)
    est, _, used = antithetic_estimate(z, torch.tensor([1.0, float("nan"), 2.0]),
                                       torch.tensor([0.0, 0.0, float("inf")]), 0.5)
    assert used == 1 and torch.equal(est, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    est, var, used = antithetic_estimate(z, torch.full((3,), float("nan")), torch.zeros(3), 0.5)
    assert used == 0 and torch.equal(est, torch.zeros(3, dtype=torch.float64))


def test_members_of_a_pair_share_data_and_randomness():
    fam = get_family("teacher_student")
    for per_member in (False, True):
        grp = Group(fam, UnrollSettings(unroll=3, min_horizon=10, max_horizon=10), ArchConfig(),
                    run_seed=0, index=0, pairs=3, per_member=per_member)
        b = grp._batches("train", 0)
        for j in range(3):
            assert all(torch.equal(x[2 * j], x[2 * j + 1]) for x in b)
        assert not torch.equal(b[0][0], b[0][2])  # different pairs see different data
        w = {k: v.detach() for k, v in MetaNetwork.random(seed=1).weights().items()}
        members = {k: v.unsqueeze(0).repeat(6, *([1] * v.dim())) for k, v in w.items()}
        meta, ok = grp.unroll(members, pass_loss=True)
        assert ok.all()
        # with equal weights the two members of each pair compute exactly the same thing
        assert torch.equal(meta[0::2], meta[1::2])
        assert len(set(meta[0::2].tolist())) == 3


def test_late_weight_weighs_each_step_of_a_truncation():
    from meta_train.population import step_weight
    fam = get_family("teacher_student")
    w = {k: v.detach() for k, v in MetaNetwork.random(seed=1).weights().items()}
    members = {k: v.unsqueeze(0).repeat(4, *([1] * v.dim())) for k, v in w.items()}

    def group(unroll, late):
        g = Group(fam, UnrollSettings(unroll=unroll, min_horizon=10, max_horizon=10, late_weight=late),
                  ArchConfig(), run_seed=0, index=0, pairs=2, per_member=True)
        g.horizon = 10  # a run's first horizon is cut at random; here both run the whole of it
        return g

    # the per-step meta-losses, one truncation of one step at a time, weighed by hand
    one = group(1, 0.0)
    H = one.horizon
    per_step = torch.stack([one.unroll(members, pass_loss=True)[0] for _ in range(6)])
    s = UnrollSettings(late_weight=2.0)
    weights = torch.tensor([3.0 * ((t + 1) / H) ** 2 for t in range(6)], dtype=torch.float64)
    assert [step_weight(s, t, H) for t in range(6)] == weights.tolist()
    assert step_weight(UnrollSettings(), 5, H) == 1.0
    three = group(3, 2.0)
    for k in range(2):  # two truncations of three steps
        meta, _ = three.unroll(members, pass_loss=True)
        rows = slice(3 * k, 3 * k + 3)
        torch.testing.assert_close(meta, (weights[rows, None] * per_step[rows]).mean(0), rtol=1e-12, atol=1e-12)
    # late steps count more than early ones
    assert weights[-1] > 1.0 > weights[0]
    from meta_train.trainer import MetaTrainConfig
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="late_weight"):
            MetaTrainConfig(unroll=UnrollSettings(late_weight=bad)).validate()


def test_unknown_estimators_are_refused_and_pes_resets_per_pair():
    with pytest.raises(ValueError, match="estimator"):
        make_estimator("es", 2, 3)
    pes = make_estimator("pes", 3, 2)
    pes.estimate(torch.ones(3, 2), torch.ones(3), torch.zeros(3), 1.0)
    pes.reset(slice(1, 2))
    assert pes.state_dict().tolist() == [[1.0, 1.0], [0.0, 0.0], [1.0, 1.0]]
