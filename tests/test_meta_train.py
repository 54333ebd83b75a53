"""Meta-training: task API, exact resume, outer optimizers, non-finite guards, workers."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from learned_opt import load_weights
from meta_train.population import UnrollSettings
from meta_train.tasks import Task, TaskFamily, get_family

LARGEST_META_TRAINING_TASK = 52_234  # mnist1d_wide at width 1024; the bound compare.py's rule uses
from meta_train.trainer import MetaTrainConfig, MetaTrainer

ROOT = Path(__file__).resolve().parents[1]


def small_config(**kw):
    unroll = UnrollSettings(unroll=3, min_horizon=6, max_horizon=12, valid_every=2)
    base = dict(family="teacher_student+logistic_regression", pairs=4, groups=2, steps=6,
                checkpoint_every=3, unroll=unroll, seed=3)
    base.update(kw)
    return MetaTrainConfig(**base)


def _records(out):
    recs = [json.loads(x) for x in (Path(out) / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("time", "wall", "inner_steps_per_s")} for r in recs]


@pytest.mark.parametrize("estimator,outer", [("pes", "adam"), ("tes", "self")])
def test_resumed_run_equals_uninterrupted_run_bit_for_bit(tmp_path, estimator, outer):
    cfg = small_config(estimator=estimator, outer=outer)
    full = MetaTrainer(cfg, tmp_path / "full", progress=False)
    full.run()
    assert sum(r["resets"] for r in _records(tmp_path / "full")) > 0, "no task reset exercised"

    part = MetaTrainer(cfg, tmp_path / "part", progress=False)
    part.run(steps=3)
    del part
    resumed = MetaTrainer(cfg, tmp_path / "part", resume=True, progress=False)
    assert resumed.step == 3
    resumed.run()
    for k in full.theta:
        assert torch.equal(full.theta[k], resumed.theta[k]), k
    assert _records(tmp_path / "full") == _records(tmp_path / "part")
    start = load_weights("adam-like-init-v0")[0].weights()
    assert any(not torch.equal(full.theta[k], start[k]) for k in start)


def test_resume_refuses_a_different_configuration(tmp_path):
    MetaTrainer(small_config(steps=3), tmp_path, progress=False).run()
    with pytest.raises(RuntimeError, match="another configuration"):
        MetaTrainer(small_config(sigma=0.05), tmp_path, resume=True, progress=False)
    # only the budget may change
    MetaTrainer(small_config(steps=4), tmp_path, resume=True, progress=False).run()
    assert len(_records(tmp_path)) == 4


def test_moving_average_of_theta_follows_its_definition_and_resumes_exactly(tmp_path):
    decay = 0.6
    tr = MetaTrainer(small_config(ema=decay, checkpoint_every=2), tmp_path / "a", progress=False)
    expect = {k: v.clone().double() for k, v in tr.theta.items()}
    for _ in range(5):
        tr.outer_step()
        for k, v in tr.theta.items():
            expect[k] = decay * expect[k] + (1 - decay) * v.double()
    for k in expect:
        torch.testing.assert_close(tr.ema[k].double(), expect[k], rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(tr.ema[k], tr.theta[k]) for k in expect)

    full = MetaTrainer(small_config(ema=decay), tmp_path / "full", progress=False)
    full.run()
    part = MetaTrainer(small_config(ema=decay), tmp_path / "part", progress=False)
    part.run(steps=3)
    resumed = MetaTrainer(small_config(ema=decay), tmp_path / "part", resume=True, progress=False)
    resumed.run()
    for k in full.theta:
        assert torch.equal(full.ema[k], resumed.ema[k]), k
    net, info = load_weights(str(tmp_path / "part" / "weights-ema.safetensors"))
    for k, v in net.weights().items():
        assert torch.equal(v, full.ema[k]), k
    assert info.metadata["outer_steps"] == "6" and info.metadata["ema_since"] == "0"
    assert json.loads(info.metadata["meta_train_config"])["ema"] == decay


def test_moving_average_can_be_switched_on_at_resume(tmp_path):
    MetaTrainer(small_config(steps=3), tmp_path, progress=False).run()
    assert not (tmp_path / "weights-ema.safetensors").exists()
    tr = MetaTrainer(small_config(steps=4, ema=0.9), tmp_path, resume=True, progress=False)
    for k in tr.theta:  # it starts from theta at the step resumed from
        assert torch.equal(tr.ema[k], tr.theta[k]), k
    tr.run()
    info = load_weights(str(tmp_path / "weights-ema.safetensors"))[1]
    assert info.metadata["ema_since"] == "3" and info.metadata["outer_steps"] == "4"
    with pytest.raises(ValueError, match="ema"):
        MetaTrainer(small_config(ema=1.0), tmp_path / "bad", progress=False)


def test_damaged_checkpoint_fails_loudly(tmp_path):
    MetaTrainer(small_config(steps=3), tmp_path, progress=False).run()
    ck = tmp_path / "checkpoint-rank0.pt"
    ck.write_bytes(ck.read_bytes()[:100])
    with pytest.raises(RuntimeError, match="cannot read checkpoint"):
        MetaTrainer(small_config(), tmp_path, resume=True, progress=False)


def test_outer_optimizer_from_saved_weights(tmp_path):
    tr = MetaTrainer(small_config(outer="adam-like-init-v0", steps=2), tmp_path, progress=False)
    before = {k: v.clone() for k, v in tr.theta.items()}
    tr.run()
    assert any(not torch.equal(before[k], tr.theta[k]) for k in before)
    w, info = load_weights(tmp_path / "weights.safetensors")
    assert info.metadata["outer_steps"] == "2"


def _nan_family():
    """A task whose loss turns NaN once its parameter leaves (-0.2, 0.2)."""
    def sample(seed):
        def init(s):
            return {"x": torch.full((3,), 0.15)}

        def loss(params, batch):
            x = params["x"]
            return (x ** 2).sum() + torch.where(x.abs().max() > 0.2, torch.tensor(float("nan")), torch.tensor(0.0))

        return Task("nan-task", init, loss, lambda split, s, step: (torch.zeros(1),))
    return TaskFamily("nan", sample)


def test_nonfinite_losses_are_counted_and_dropped(tmp_path, monkeypatch):
    import meta_train.trainer as trainer_mod
    monkeypatch.setattr(trainer_mod, "get_family", lambda name, *augmentations: _nan_family())
    cfg = small_config(family="nan", steps=3)
    cfg.unroll.inner_lr = 0.1  # large steps leave the safe region quickly
    tr = MetaTrainer(cfg, tmp_path, progress=False)
    tr.run()
    recs = _records(tmp_path)
    assert any(r["nonfinite_pairs"] > 0 for r in recs)
    assert any(r["resets"] > 0 for r in recs)
    assert all(torch.isfinite(v).all() for v in tr.theta.values())


def test_unknown_family_and_missing_extra(monkeypatch):
    with pytest.raises(ValueError, match="unknown task family"):
        get_family("imagenet")
    import builtins
    import meta_train.tasks.mnist1d as m
    m.load_mnist1d.cache_clear()
    real_import = builtins.__import__

    def fake(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and name.startswith("mnist1d"):
            raise ImportError("no")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ImportError, match=r"learned_opt\[data\]"):
        get_family("mnist1d_mlp").sample(0)
    m.load_mnist1d.cache_clear()


def test_docs_private_task_set_runs(tmp_path):
    text = (ROOT / "docs" / "meta-training.md").read_text()
    start = text.index("<!-- private-task-example -->")
    block = text[start:].split("```python", 1)[1].split("```", 1)[0]
    assert len(block.strip().splitlines()) <= 30
    ns = {}
    exec(compile(block, "README-example", "exec"), ns)
    fam = ns["family"]
    task = fam.sample(0)
    params = task.init(0)
    assert torch.isfinite(task.loss(params, task.batch("train", 0, 0)))
    tr = MetaTrainer(small_config(steps=2), tmp_path, progress=False)
    tr.family = fam
    tr.groups = {g: tr._new_group(g) for g in tr.my_groups}
    tr.run()


# ------------------------------------------------------------------------ several workers

CLI = [sys.executable, "-m", "meta_train", "train", "--family", "teacher_student", "--pairs", "4",
       "--groups", "2", "--unroll", "3", "--min-horizon", "6", "--max-horizon", "12",
       "--checkpoint-every", "2", "--seed", "5", "--threads", "1"]


def _run(args, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(CLI + args, env=env, capture_output=True, text=True, timeout=300, **kw)


def _theta(out):
    return load_weights(Path(out) / "weights.safetensors")[1].checksum


def test_two_workers_reach_the_same_meta_parameters_as_one(tmp_path):
    one = _run(["--out", str(tmp_path / "one"), "--steps", "4"])
    assert one.returncode == 0, one.stderr[-2000:]
    two = _run(["--out", str(tmp_path / "two"), "--steps", "4", "--workers", "2"])
    assert two.returncode == 0, two.stderr[-2000:]
    assert _theta(tmp_path / "one") == _theta(tmp_path / "two")
    assert (tmp_path / "two" / "checkpoint-rank1.pt").exists()

    # Worker 1 died after worker 0 saved step 4 but before it saved its own: its newest
    # checkpoint is step 2. Resuming must bring both workers back to step 2, not mix steps.
    two = tmp_path / "two"
    os.replace(two / "checkpoint-rank1.prev.pt", two / "checkpoint-rank1.pt")
    assert torch.load(two / "checkpoint-rank0.pt", weights_only=True)["step"] == 4
    assert torch.load(two / "checkpoint-rank1.pt", weights_only=True)["step"] == 2
    again = _run(["--out", str(two), "--steps", "6", "--workers", "2", "--resume"])
    assert again.returncode == 0, again.stderr[-2000:]
    one = _run(["--out", str(tmp_path / "one"), "--steps", "6", "--resume"])
    assert one.returncode == 0, one.stderr[-2000:]
    assert _theta(tmp_path / "one") == _theta(two)
    assert [json.loads(x)["step"] for x in (two / "log.jsonl").read_text().splitlines()] == list(range(1, 7))


def _children(pid):
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids = (task / "children").read_text().split()
        out += [int(k) for k in kids]
    return out


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc")
def test_a_dying_worker_fails_the_run_and_resume_recovers(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(CLI + ["--out", str(out), "--steps", "400", "--workers", "2"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 3):
        time.sleep(0.2)
    kids = [k for k in _children(proc.pid)]
    workers = [k for k in kids if "spawn" in Path(f"/proc/{k}/cmdline").read_text()
               or "multiprocessing" in Path(f"/proc/{k}/cmdline").read_text()]
    assert workers, kids
    os.kill(workers[-1], signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, "a dead worker must fail the run"
    assert "terminated" in err or "exit" in err.lower() or "signal" in err.lower(), err[-2000:]
    done = len(log.read_text().splitlines())
    assert done < 400
    again = _run(["--out", str(out), "--steps", str(done + 2), "--workers", "2", "--resume"])
    assert again.returncode == 0, again.stderr[-2000:]
    steps = [json.loads(x)["step"] for x in log.read_text().splitlines()]
    assert steps == list(range(1, done + 3))


@pytest.mark.parametrize("name", ["mnist1d_mlp", "mnist1d_wide", "mnist1d_cnn", "mnist1d_small_batch", "deep_classifier",
                                  "teacher_student",
                                  "logistic_regression", "markov_lm", "quadratic", "overfit_mlp", "overfit_teacher"])
def test_built_in_families_give_finite_losses_within_their_size(name):
    """Each family used for the shipped weights samples tasks with a finite loss and a gradient,
    no larger than the size that benchmarks/compare.py's held-out rule is measured against."""
    pytest.importorskip("mnist1d")
    fam = get_family(name)
    biggest = 0
    for seed in range(12):
        task = fam.sample(seed)
        params = task.init(seed)
        biggest = max(biggest, sum(v.numel() for v in params.values()))
        if seed < 2:
            params = {k: v.requires_grad_() for k, v in params.items()}
            loss = task.loss(params, task.batch("train", seed, 0))
            grads = torch.autograd.grad(loss, list(params.values()))
            assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads), task.name
    assert biggest <= LARGEST_META_TRAINING_TASK, (name, biggest)


def test_deep_classifier_is_reproducible_and_apart_from_the_held_out_deep_task():
    """The family's tasks are a function of the seed (data included), their labels use several
    classes, and no task shares depth, width or batch size with compare.py's deep GELU task
    (5 hidden layers of 64, batch 16), which must stay held out."""
    fam = get_family("deep_classifier")
    for seed in range(30):
        a, b = fam.sample(seed), fam.sample(seed)
        xa, ya = a.batch("train", 3, 7)
        xb, yb = b.batch("train", 3, 7)
        assert a.name == b.name and torch.equal(xa, xb) and torch.equal(ya, yb)
        p = a.init(0)
        weights = [v for k, v in p.items() if k.endswith("weight")]
        hidden = len(weights) - 1
        width = weights[0].shape[0]
        assert hidden in (4, 6) and width != 64 and a.meta["batch_size"] != 16, a.name
        assert weights[0].shape[1] != 40, a.name  # not MNIST-1D's input size either
    ys = torch.cat([fam.sample(0).batch("train", 0, i)[1] for i in range(50)])
    assert ys.unique().numel() >= 3


def test_loss_scale_augmentation_multiplies_loss_and_gradients_by_one_factor_per_task():
    from meta_train.tasks import scale_loss
    base = get_family("teacher_student").sample(3)
    factors = []
    for seed in range(20):
        task = scale_loss(base, seed)
        f = task.meta["loss_scale"]
        assert 1e-2 <= f <= 1e2 and scale_loss(base, seed).meta["loss_scale"] == f
        factors.append(f)
        params = {k: v.requires_grad_() for k, v in task.init(0).items()}
        batch = task.batch("train", 0, 5)
        loss = task.loss(params, batch)
        ref = base.loss(params, batch)
        torch.testing.assert_close(loss, f * ref)
        g, g_ref = (torch.autograd.grad(x, list(params.values())) for x in (loss, ref))
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a, f * b)
    assert min(factors) < 0.3 and max(factors) > 3  # spread over the range, not one value
    fam = get_family("teacher_student", loss_scale_augment=True)
    assert "loss_scale" in fam.sample(0).meta and fam.name.endswith("+loss-scaled")


def test_loss_scale_augmentation_needs_the_log_transform():
    cfg = MetaTrainConfig(loss_scale_augment=True, unroll=UnrollSettings(loss_transform="none"))
    with pytest.raises(ValueError, match="loss_scale_augment"):
        cfg.validate()
    MetaTrainConfig(loss_scale_augment=True).validate()


def test_command_line_runs_with_loss_scale_augmentation(tmp_path):
    from meta_train.__main__ import main
    out = tmp_path / "run"
    main(["train", "--out", str(out), "--family", "teacher_student", "--pairs", "2", "--groups", "1",
          "--steps", "2", "--init", "random", "--unroll", "2", "--min-horizon", "4", "--max-horizon", "4",
          "--loss-scale-augment"])
    assert MetaTrainConfig.from_json((out / "config.json").read_text()).loss_scale_augment
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["meta_loss"]) for r in rows)


@pytest.mark.parametrize("prob", [0.0, 1.0])
def test_valid_prob_decides_per_task_whether_validation_losses_reach_the_optimizer(prob):
    from learned_opt import ArchConfig, load_weights
    from meta_train.population import Group, UnrollSettings
    s = UnrollSettings(unroll=10, min_horizon=20, max_horizon=20, valid_every=5, valid_prob=prob)
    grp = Group(get_family("teacher_student"), s, ArchConfig(), run_seed=1, index=0, pairs=1, per_member=True)
    w = {k: v.detach() for k, v in load_weights("adam-like-init-v0")[0].weights().items()}
    members = {k: v.unsqueeze(0).expand(2, *v.shape).clone() for k, v in w.items()}
    grp.unroll(members, pass_loss=True)
    assert grp.report_valid == (prob == 1.0)
    assert (grp.lstate.glob.valid_count > 0).all().item() == (prob == 1.0)
    with pytest.raises(ValueError, match="valid_prob"):
        MetaTrainConfig(unroll=UnrollSettings(valid_prob=1.5)).validate()


def test_train_only_moves_the_named_tensors_and_no_other(tmp_path):
    names = "mlp_w2,mlp_b2"
    trainer = MetaTrainer(small_config(steps=3, train_only=names), tmp_path, progress=False)
    z = trainer.directions(0)
    flat = trainer._unflat(z)
    assert all(bool((flat[k] == 0).all()) == (k not in names.split(",")) for k in trainer.names)
    trainer.run()
    start = load_weights("adam-like-init-v0")[0].weights()
    for k in start:
        assert torch.equal(trainer.theta[k], start[k]) == (k not in names.split(",")), k


def test_train_only_refuses_names_the_weights_do_not_have(tmp_path):
    with pytest.raises(ValueError, match="mlp_w9"):
        MetaTrainer(small_config(train_only="mlp_w2,mlp_w9"), tmp_path, progress=False)
    with pytest.raises(ValueError, match="train_only"):
        small_config(train_only="mlp_w2,").validate()


def test_run_loop_checkpoints_on_schedule_and_trim_log_cuts_back_to_the_checkpoint(tmp_path):
    from meta_train.loop import run_loop, trim_log

    class Counter:
        def __init__(self):
            self.step, self.saved = 0, []

        def outer_step(self):
            self.step += 1
            return {"step": self.step, "x": self.step * 2}

        def save(self):
            self.saved.append(self.step)

    log = tmp_path / "log.jsonl"
    c = Counter()
    run_loop(c, 7, log, 3, desc="t", shown=lambda r: {}, progress=False)
    assert c.saved == [3, 6, 7]
    kept = trim_log(log, 6)  # as if the run had stopped after its checkpoint at step 6
    assert [r["step"] for r in kept] == list(range(1, 7))
    assert [json.loads(x)["x"] for x in log.read_text().splitlines()] == [2, 4, 6, 8, 10, 12]
    c2 = Counter()
    run_loop(c2, 10, None, 100, desc="t", shown=lambda r: {}, progress=False, stop=lambda: c2.step >= 4)
    assert c2.step == 4 and c2.saved == [4]


def test_architecture_is_one_arch_entry_and_older_flat_configs_read_into_it():
    import argparse

    from meta_train.__main__ import _add_train_args
    from meta_train.distributed import config_from_args
    ap = argparse.ArgumentParser()
    _add_train_args(ap)
    args = ap.parse_args(["--out", "x", "--snr-stats", "--scale-free", "--sign-tolerance", "1e-4", "--rms-eps", "0"])
    cfg = config_from_args(args)
    assert cfg.arch == {"snr_stats": True, "scale_free": True, "sign_tolerance": 1e-4}
    assert MetaTrainConfig.from_json(cfg.to_json()) == cfg
    # a run begun when each option was a field of its own resumes under the same configuration
    flat = json.loads(cfg.to_json())
    del flat["arch"]
    flat.update(snr_stats=True, absolute_snr=False, scale_free=True, rms_eps=0.0, magnitude_rate=0.0,
                sign_tolerance=1e-4)
    assert MetaTrainConfig.from_json(json.dumps(flat)) == cfg
    with pytest.raises(ValueError, match="lstm_hidden"):
        MetaTrainConfig(arch={"lstm_hidden": 8}).validate()
    with pytest.raises(ValueError, match="sign_tolerance"):
        MetaTrainConfig(arch={"sign_tolerance": -1.0}).validate()


def test_sign_tolerance_reaches_the_starting_weights(tmp_path):
    cfg = small_config(steps=1, arch={"sign_tolerance": 1e-3})
    assert MetaTrainer(cfg, tmp_path, progress=False).lopt_cfg.sign_tolerance == 1e-3
