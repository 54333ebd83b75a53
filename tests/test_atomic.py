"""Atomic file writes shared by the meta-training checkpoints and the Omniglot cache."""

import os
import threading

import pytest
import torch

from learned_opt.atomic import atomic_torch_save


def test_concurrent_writers_to_one_file_all_succeed(tmp_path):
    # Two runs started together both build the same data cache: each writer needs its own
    # temporary file, or one renames the other's away and fails.
    path = tmp_path / "cache.pt"
    errors = []

    def writer(i):
        try:
            for _ in range(20):
                atomic_torch_save({"who": i, "data": torch.full((256,), float(i))}, path)
        except Exception as e:  # collected: a thread's exception would not fail the test
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    obj = torch.load(path, weights_only=True)
    assert torch.equal(obj["data"], torch.full((256,), float(obj["who"])))
    assert os.listdir(tmp_path) == ["cache.pt"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "ckpt.pt"
    atomic_torch_save({"step": 1}, path)
    with pytest.raises(Exception):
        atomic_torch_save({"step": 2, "bad": lambda: None}, path)  # lambdas cannot be pickled
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert os.listdir(tmp_path) == ["ckpt.pt"]
