"""FSDP2 (``fully_shard``, DTensor parameters) with 2 gloo processes: every per-tensor statistic
is reduced over the shards, so each element's update equals a one-process run on the whole
tensors; the accumulators are sharded like the parameters, and a distributed checkpoint resumes
exactly. Uneven shards are included: a 3-row weight (2 + 1 rows) and a 1-element parameter that
one rank holds none of. HSDP (a 2-D mesh, replicated over one dimension and sharded over the
other) with 4 processes."""

import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from learned_opt import LearnedOptimizer

pytest.importorskip("torch.distributed.fsdp")
STEPS = 30


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 16)
        self.b = nn.Linear(16, 3)  # 3 rows over 2 ranks: 2 + 1
        self.gain = nn.Parameter(torch.ones(1))  # 1 element: rank 1 holds none of it

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))) * self.gain


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch(t):
    g = torch.Generator().manual_seed(1000 + t)  # the same batch on every rank
    return torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)


def _train(model, opt, steps, start=0):
    for t in range(start, start + steps):
        x, y = _batch(t)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss.detach())


def _full(model):
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in model.state_dict().items()}


def _weights():
    """The default weights, reading the sign of a per-tensor mean as 0 within rounding: without
    it, the other summation order of the sharded reductions flips signs that rounding decides
    and the runs part by far more than rounding (benchmarks/perturbation.py)."""
    from learned_opt import load_weights

    return load_weights()[0].with_options(sign_tolerance=1e-4)


def _worker(rank, world, port, out, task, mesh_shape=None):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        shape = mesh_shape or (world,)
        names = ("replicate", "shard") if len(shape) == 2 else None  # 2-D: HSDP
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)

        def sharded(seed=0):
            torch.manual_seed(seed)
            m = Net()
            fully_shard(m, mesh=mesh)
            return m, LearnedOptimizer(m.parameters(), weights=_weights())

        if task == "equal":
            torch.manual_seed(0)
            whole = Net()  # the one-process run, on every rank
            whole_opt = LearnedOptimizer(whole.parameters(), loss_group=None, weights=_weights())
            model, opt = sharded()
            _train(whole, whole_opt, STEPS)
            _train(model, opt, STEPS)
            mine = _full(model)
            ref = {k: v.detach() for k, v in whole.state_dict().items()}
            worst = max(((mine[k] - ref[k]).norm() / ref[k].norm()).item() for k in ref)
            st = opt.state[model.b.weight]
            torch.save({"worst": worst, "mom_type": type(st["mom"]).__name__,
                        "mom_local": tuple(st["mom"].to_local().shape), "mom_shape": tuple(st["mom"].shape)},
                       os.path.join(out, f"rank{rank}.pt"))
        else:  # resume from a distributed checkpoint
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                                 set_model_state_dict, set_optimizer_state_dict)

            model, opt = sharded()
            _train(model, opt, 10)
            dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                     checkpoint_id=os.path.join(out, "ckpt"))
            _train(model, opt, 10, start=10)
            straight = _full(model)
            model2, opt2 = sharded(seed=5)  # other weights, no state: everything must come from the checkpoint
            sd = {"model": get_model_state_dict(model2), "optim": get_optimizer_state_dict(model2, opt2)}
            dcp.load(sd, checkpoint_id=os.path.join(out, "ckpt"))
            set_model_state_dict(model2, sd["model"])
            set_optimizer_state_dict(model2, opt2, sd["optim"])
            _train(model2, opt2, 10, start=10)
            resumed = _full(model2)
            torch.save({"diff": max((straight[k] - resumed[k]).abs().max().item() for k in straight)},
                       os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, task, mesh_shape=(2,)):
    world = 1
    for n in mesh_shape:
        world *= n
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path), task, mesh_shape), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def test_sharded_updates_equal_a_one_process_run(tmp_path):
    res = _spawn(tmp_path, "equal")
    for r in res:
        assert r["worst"] <= 1e-5, r
        assert r["mom_type"] == "DTensor" and r["mom_shape"] == (3, 16, 5)
    assert sorted(r["mom_local"][0] for r in res) == [1, 2]  # the accumulators sharded like the weight


@pytest.mark.parametrize("mesh_shape", [(2,), (2, 2)], ids=["fsdp", "hsdp"])
def test_a_distributed_checkpoint_resumes_exactly(tmp_path, mesh_shape):
    for r in _spawn(tmp_path, "resume", mesh_shape):
        assert r["diff"] == 0.0


def test_hsdp_replicated_shards_equal_a_one_process_run(tmp_path):
    # 4 processes on a (2 replicas x 2 shards) mesh: statistics reduced over the shard dimension
    res = _spawn(tmp_path, "equal", mesh_shape=(2, 2))
    for r in res:
        assert r["worst"] <= 1e-5, r
        assert r["mom_type"] == "DTensor" and r["mom_shape"] == (3, 16, 5)
    assert sorted(r["mom_local"][0] for r in res) == [1, 1, 2, 2]
