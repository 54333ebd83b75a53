"""Weights I/O: shipped weights, round trips, and clear errors for every broken file."""

import json
import struct

import pytest
import torch

from learned_opt import (DEFAULT_WEIGHTS, LearnedOptimizer, MetaNetwork, WeightsError,
                         available_weights, load_weights, save_weights)
from learned_opt.weights import checksum, pretrained_dir


def test_default_weights_are_shipped_and_load():
    assert DEFAULT_WEIGHTS in available_weights()
    net, info = load_weights()
    assert info.name == DEFAULT_WEIGHTS
    assert (pretrained_dir() / f"{DEFAULT_WEIGHTS}.md").is_file(), "every weights file has a model card"
    opt = LearnedOptimizer([torch.nn.Parameter(torch.zeros(2))])
    assert opt.weights_info.checksum == info.checksum


def test_shipped_init_is_reproducible_from_code():
    net, _ = load_weights("adam-like-init-v0")
    fresh = MetaNetwork.adam_like(seed=0)
    assert checksum(net.weights()) == checksum(fresh.weights())


def test_save_load_round_trip_with_metadata(tmp_path):
    net = MetaNetwork.random(seed=4)
    path = tmp_path / "mine.safetensors"
    info = save_weights(net, path, "mine", metadata={"recipe": "test"})
    net2, info2 = load_weights(path)
    assert info2.name == "mine" and info2.checksum == info.checksum
    assert info2.metadata["recipe"] == "test"
    assert json.loads(info2.metadata["config"])["lstm_hidden"] == 64
    for (k, a), (_, b) in zip(net.named_parameters(), net2.named_parameters()):
        assert torch.equal(a, b), k
    opt = LearnedOptimizer([torch.nn.Parameter(torch.zeros(2))], weights=str(path))
    assert opt.weights_info.name == "mine"
    with pytest.raises(ValueError, match="config"):  # would overwrite the architecture
        save_weights(net, tmp_path / "x.safetensors", "x", metadata={"config": "{}"})


def test_missing_and_unknown(tmp_path):
    with pytest.raises(WeightsError, match="no such weights file"):
        load_weights(tmp_path / "nope.safetensors")
    with pytest.raises(WeightsError, match="unknown weights 'nope'.*adam-like-init-v0"):
        LearnedOptimizer([torch.nn.Parameter(torch.zeros(2))], weights="nope")


def _saved(tmp_path):
    path = tmp_path / "w.safetensors"
    save_weights(MetaNetwork.random(seed=1), path, "w")
    return path


def test_truncated_file(tmp_path):
    path = _saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"w\.safetensors.*not a readable safetensors"):
        load_weights(path)


def test_garbage_file(tmp_path):
    path = tmp_path / "g.safetensors"
    path.write_bytes(b"hello world, not weights")
    with pytest.raises(WeightsError, match="g.safetensors"):
        load_weights(path)


def test_corrupted_byte_is_caught_by_checksum(tmp_path):
    path = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01  # flip a bit inside the tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="checksum mismatch"):
        load_weights(path)


def _rewrite_header(path, edit):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def test_foreign_format_and_version(tmp_path):
    path = _saved(tmp_path)
    _rewrite_header(path, lambda h: h["__metadata__"].update(format="something-else"))
    with pytest.raises(WeightsError, match="format"):
        load_weights(path)
    path = _saved(tmp_path)
    _rewrite_header(path, lambda h: h["__metadata__"].update(format_version="99"))
    with pytest.raises(WeightsError, match="version '99'"):
        load_weights(path)


def test_mismatched_architecture(tmp_path):
    from safetensors.torch import save_file
    path = _saved(tmp_path)
    _rewrite_header(path, lambda h: h["__metadata__"].update(
        config=h["__metadata__"]["config"].replace('"lstm_hidden": 64', '"lstm_hidden": 32')))
    with pytest.raises(WeightsError, match="shape"):
        load_weights(path)
    tensors = {k: v.detach() for k, v in MetaNetwork.random().weights().items()}
    del tensors["mlp_b2"]
    meta = dict(format="learned_opt.rnn_mlp", format_version="1", name="x",
                config=MetaNetwork().config.to_json(), checksum=checksum(tensors))
    save_file(tensors, str(tmp_path / "short.safetensors"), metadata=meta)
    with pytest.raises(WeightsError, match="missing \\['mlp_b2'\\]"):
        load_weights(tmp_path / "short.safetensors")


def test_nonfinite_weights_refused(tmp_path):
    net = MetaNetwork.random()
    with torch.no_grad():
        net.mlp_w0[0, 0] = float("nan")
    with pytest.raises(WeightsError, match="NaN"):
        save_weights(net, tmp_path / "nan.safetensors", "nan")
