"""Data parallel training with 2 gloo processes: a loss given to ``step`` is averaged over the
group, so DDP replicas (which hold the same averaged gradients) stay bit-identical."""

import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from learned_opt import LearnedOptimizer


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out, loss_group, mode):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)))
        kw = {} if loss_group == "default" else {"loss_group": None}
        opt = LearnedOptimizer(model.parameters(), **kw)
        compiled = torch.compile(opt.step, fullgraph=True) if mode == "compiled" else None
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
        for _ in range(25):
            x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)

            def closure():
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                return loss
            if mode == "closure":
                opt.step(closure)
            elif mode == "compiled":  # the loss average traced into the compiled step
                loss = closure()
                compiled(loss=loss.detach())
            else:
                loss = closure()
                opt.step(loss=loss)
        torch.save([p.detach() for p in model.parameters()], os.path.join(out, f"rank{rank}.pt"))
        # every rank's gloo work done, and DDP's reducer gone, before the group: tearing a
        # reducer down after its group can deadlock gloo's worker thread on the GIL at exit
        dist.barrier()
        del model, opt
    finally:
        dist.destroy_process_group()


def _run(tmp_path, loss_group, mode="loss"):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), loss_group, mode), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("mode", ["loss", "closure", "compiled"])
def test_ddp_replicas_stay_identical_with_the_loss_passed(tmp_path, mode):
    a, b = _run(tmp_path, "default", mode)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_without_the_average_the_replicas_drift(tmp_path):
    # the same run with each rank's own loss in the features: this is what the average prevents
    a, b = _run(tmp_path, None)
    assert max((x - y).abs().max().item() for x, y in zip(a, b)) > 1e-7


def test_loss_group_is_checked():
    with pytest.raises(ValueError, match="loss_group"):
        LearnedOptimizer([nn.Parameter(torch.zeros(2))], loss_group="world")
