"""Running meta-training on one or several processes.

Several workers split the population's groups among themselves (round robin). Every worker
holds theta, the outer optimizer and the ES directions (all made from shared seeds); after
each truncation they add up only scalars (the members' meta-losses, finite flags, reset flags)
with one ``all_reduce``, so every worker computes the same estimate and the same update.
Launch with ``torchrun --nproc-per-node N -m meta_train train ...`` or ``--workers N`` (local
processes, gloo on 127.0.0.1). A worker that dies ends the run with an error (torchrun and
``torch.multiprocessing.spawn`` stop the others; ``--timeout`` bounds how long a worker waits);
restart it with ``--resume`` and the same number of workers.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch


def config_from_args(args):
    from .population import UnrollSettings
    from .trainer import ARCH_FIELDS, MetaTrainConfig, arch_changes
    return MetaTrainConfig(
        family=args.family, scale_augment=args.scale_augment,
        loss_scale_augment=args.loss_scale_augment, estimator=args.estimator,
        sigma=args.sigma, pairs=args.pairs, groups=args.groups, outer=args.outer,
        outer_lr=args.outer_lr, steps=args.steps, init=args.init, seed=args.seed,
        checkpoint_every=args.checkpoint_every, ema=args.ema, train_only=args.train_only,
        arch=arch_changes({name: getattr(args, name) for name in ARCH_FIELDS}),
        unroll=UnrollSettings(unroll=args.unroll, min_horizon=args.min_horizon,
                              max_horizon=args.max_horizon, inner_lr=args.inner_lr,
                              meta_loss=args.meta_loss, loss_transform=args.loss_transform,
                              valid_every=args.valid_every, valid_prob=args.valid_prob, loss_prob=args.loss_prob,
                              late_weight=args.late_weight, versus_adam=args.versus_adam,
                              adam_lr=args.adam_lr, adam_margin=args.adam_margin))


def worker(rank, world, args, port):
    from .trainer import MetaTrainer
    if args.threads:
        torch.set_num_threads(args.threads)
    if world > 1:
        if port is not None:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ["MASTER_PORT"] = str(port)
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world,
                                             timeout=timedelta(seconds=args.timeout))
    try:
        MetaTrainer(config_from_args(args), args.out, resume=args.resume, rank=rank, world=world).run()
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
