"""The meta-objective measured against Adam run beside the members (UnrollSettings.versus_adam)."""

import math

import pytest
import torch

from learned_opt import ArchConfig, MetaNetwork
from meta_train.inner import AdamInner
from meta_train.population import Group, UnrollSettings, versus_adam_transform
from meta_train.tasks import get_family
from meta_train.tasks.base import _mix
from meta_train.trainer import MetaTrainConfig, MetaTrainer


def test_the_adam_inner_optimizer_matches_torch_adam():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    inner = AdamInner(3e-3)
    state = inner.init(params)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for t in range(1, 8):
        x = torch.randn(16, 5)
        model.zero_grad()
        model(x).pow(2).mean().backward()
        grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
        opt.step()
        params, state = inner.step(params, grads, state, t=t - 1)
        for k, p in model.named_parameters():
            torch.testing.assert_close(params[k], p.detach(), rtol=1e-6, atol=1e-7)


def test_transform_is_a_soft_hinge_on_the_log_gap():
    a = torch.zeros(())
    k, margin = 4.0, 0.1
    far_ahead = versus_adam_transform(torch.tensor(-5.0), a, k, margin)
    far_behind = versus_adam_transform(torch.tensor(5.0), a, k, margin)
    assert 0 < far_ahead < 1e-7  # far below Adam: almost nothing left to gain
    assert abs(far_behind - (5.0 + margin)) < 1e-7  # far above: the log gap itself, slope 1
    # the slope (the weight a step gets in the meta-gradient) rises from 0 to 1 through the hinge
    x = torch.linspace(-2, 2, 41, requires_grad=True)
    versus_adam_transform(x, a, k, margin).sum().backward()
    slope = x.grad
    assert torch.all(slope[1:] >= slope[:-1]) and slope[0] < 1e-3 and slope[-1] > 0.999
    assert abs(slope[20] - torch.sigmoid(torch.tensor(k * margin))) < 1e-6  # at L = A


def _members(n):
    w = {k: v.detach() for k, v in MetaNetwork.random(seed=1).weights().items()}
    return {k: v.unsqueeze(0).repeat(n, *([1] * v.dim())) for k, v in w.items()}


def _group(settings, per_member=True):
    g = Group(get_family("teacher_student"), settings, ArchConfig(), run_seed=0, index=0, pairs=2,
              per_member=per_member)
    g.horizon = 10  # a run's first horizon is cut at random; here every truncation runs whole
    return g


def _adam_by_hand(group, lr, steps, valid=False):
    """torch.optim.Adam from each pair's initialisation on that pair's batches: the log of each
    step's training loss before the step, or with ``valid`` of the validation loss after it,
    (steps, pairs); and the final parameters of each pair."""
    task = group.task
    log_a = torch.zeros(steps, 2, dtype=torch.float64)
    finals = []
    for j in range(2):
        init = task.init(_mix(group.task_seed, 5, j))
        params = {n: t.detach().clone().requires_grad_(True) for n, t in init.items()}
        opt = torch.optim.Adam(params.values(), lr=lr)
        for t in range(steps):
            opt.zero_grad()
            loss = task.loss(params, task.batch("train", group.data_seeds[j], t))
            loss.backward()
            opt.step()
            if valid:
                with torch.no_grad():
                    loss = task.loss(params, task.batch("valid", group.data_seeds[j], t))
            log_a[t, j] = math.log(loss.item())
        finals.append(params)
    return log_a, finals


@pytest.mark.parametrize("per_member", [True, False])
def test_adam_runs_and_meta_loss_match_a_hand_computation(per_member):
    k, margin, lr = 3.0, 0.05, 2e-3
    s = UnrollSettings(unroll=3, min_horizon=10, max_horizon=10, versus_adam=k, adam_lr=lr, adam_margin=margin)
    plain = _group(UnrollSettings(unroll=1, min_horizon=10, max_horizon=10), per_member)
    vs = _group(s, per_member)
    members = _members(4)
    # the members' log losses, one step at a time, without Adam
    log_l = torch.stack([plain.unroll(members, pass_loss=True)[0] for _ in range(6)])  # (6, 4)
    log_a, finals = _adam_by_hand(vs, lr, 6)
    expect = versus_adam_transform(log_l, log_a.repeat_interleave(2, dim=1), k, margin)
    for r in range(2):  # two truncations of three steps
        meta, ok = vs.unroll(members, pass_loss=True)
        assert ok.all()
        rows = slice(3 * r, 3 * r + 3)
        torch.testing.assert_close(meta, expect[rows].mean(0), rtol=1e-5, atol=1e-6)
        gap = (log_l[rows] - log_a[rows].repeat_interleave(2, dim=1)).mean(0)
        torch.testing.assert_close(vs.last_gap, gap, rtol=1e-5, atol=1e-6)
    for j in range(2):
        for n, p in finals[j].items():
            torch.testing.assert_close(vs.adam["params"][n][j], p.detach(), rtol=1e-5, atol=1e-6)
    # a new task starts Adam afresh from the new initialisations
    vs.reset()
    init = vs.task.init(_mix(vs.task_seed, 5, 1))
    for n, p in init.items():
        assert torch.equal(vs.adam["params"][n][1], p)
        assert not vs.adam["m"][n].any()


def test_against_adams_validation_loss_with_the_validation_meta_loss():
    k, margin, lr = 2.0, 0.1, 1e-3
    common = dict(unroll=3, min_horizon=6, max_horizon=6, meta_loss="valid")
    plain = _group(UnrollSettings(**common))
    vs = _group(UnrollSettings(**common, versus_adam=k, adam_lr=lr, adam_margin=margin))
    members = _members(4)
    log_l = torch.cat([plain.unroll(members, pass_loss=True)[0].unsqueeze(0) for _ in range(2)])  # (2, 4)
    log_a, _ = _adam_by_hand(vs, lr, 6, valid=True)
    # the plain group's meta-loss is the mean log validation loss of a truncation; recover the
    # per-step values with one-step truncations
    one = _group(UnrollSettings(**dict(common, unroll=1)))
    per_step = torch.stack([one.unroll(members, pass_loss=True)[0] for _ in range(6)])  # (6, 4)
    torch.testing.assert_close(per_step.reshape(2, 3, 4).mean(1), log_l, rtol=1e-6, atol=1e-7)
    expect = versus_adam_transform(per_step, log_a.repeat_interleave(2, dim=1), k, margin)
    for r in range(2):
        meta, ok = vs.unroll(members, pass_loss=True)
        assert ok.all()
        torch.testing.assert_close(meta, expect[3 * r:3 * r + 3].mean(0), rtol=1e-5, atol=1e-6)


def test_versus_adam_resumes_exactly(tmp_path):
    def config():
        return MetaTrainConfig(family="teacher_student", pairs=2, groups=2, steps=6, checkpoint_every=3,
                               init="random", unroll=UnrollSettings(unroll=4, min_horizon=8, max_horizon=12,
                                                                    versus_adam=2.0, adam_margin=0.1))
    whole = MetaTrainer(config(), tmp_path / "whole", progress=False)
    whole.run()
    part = MetaTrainer(config(), tmp_path / "part", progress=False)
    part.run(3)
    resumed = MetaTrainer(config(), tmp_path / "part", resume=True, progress=False)
    resumed.run()
    for k in whole.theta:
        assert torch.equal(whole.theta[k], resumed.theta[k])
    log = [ln for ln in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 6 and all("log_gap_vs_adam" in ln for ln in log)
    # a checkpoint made without Adam runs cannot resume a run that needs them
    plain = MetaTrainer(MetaTrainConfig(family="teacher_student", pairs=2, groups=2, init="random",
                                        unroll=UnrollSettings(unroll=4, min_horizon=8, max_horizon=12)),
                        tmp_path / "plain", progress=False)
    sd = plain.groups[0].state_dict()
    grp = _group(UnrollSettings(unroll=4, min_horizon=8, max_horizon=12, versus_adam=1.0))
    with pytest.raises(RuntimeError, match="no Adam runs"):
        grp.load_state_dict(sd)


@pytest.mark.parametrize("bad", [
    dict(versus_adam=-1.0), dict(versus_adam=float("nan")), dict(versus_adam=1.0, loss_transform="none"),
    dict(versus_adam=1.0, adam_lr=0.0),
    dict(versus_adam=1.0, adam_margin=float("inf")),
])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError, match="versus_adam|adam_lr"):
        MetaTrainConfig(unroll=UnrollSettings(**bad)).validate()


def test_command_line_sets_versus_adam(tmp_path):
    from meta_train.__main__ import main
    out = tmp_path / "run"
    main(["train", "--out", str(out), "--family", "teacher_student", "--pairs", "2", "--groups", "1",
          "--steps", "2", "--init", "random", "--unroll", "2", "--min-horizon", "4", "--max-horizon", "4",
          "--versus-adam", "2", "--adam-lr", "0.003", "--adam-margin", "0.1"])
    cfg = MetaTrainConfig.from_json((out / "config.json").read_text())
    assert (cfg.unroll.versus_adam, cfg.unroll.adam_lr, cfg.unroll.adam_margin) == (2.0, 0.003, 0.1)
