"""Saving and loading meta-network weights as safetensors, and the shipped ``pretrained/`` set.

A weights file holds the meta-network tensors (float32) and string metadata:

    format          "learned_opt.rnn_mlp"
    format_version  "1"
    name            the weights' name
    config          the ArchConfig as JSON
    checksum        sha256 over the tensors (names, shapes, dtypes and bytes, in name order)
    + any free-form extra fields (description, recipe, date, ...)

Every problem with a file (missing, truncated, not safetensors, foreign format, wrong tensors
or shapes, checksum mismatch, non-finite values) raises :class:`WeightsError` naming the file
and the problem; nothing ever falls back silently to other weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Dict, Mapping, Optional, Union

import torch

from .atomic import atomic_write
from .config import ArchConfig
from .network import MetaNetwork, parameter_shapes

FORMAT = "learned_opt.rnn_mlp"
FORMAT_VERSION = "1"
# The weights ``LearnedOptimizer(params)`` loads when given no ``weights`` argument.
DEFAULT_WEIGHTS = "rnn-mlp-pes-gen-v5"


class WeightsError(ValueError):
    """A weights file or name could not be used."""


@dataclasses.dataclass(frozen=True)
class WeightsInfo:
    name: str
    checksum: str  # sha256 hex
    config: ArchConfig
    path: Optional[str]
    metadata: Dict[str, str]

    @property
    def checksum_int(self) -> int:
        """The first 60 bits of the checksum as an int (how optimizer state records it)."""
        return int(self.checksum[:15], 16)


def pretrained_dir() -> Path:
    """The folder of shipped weights: inside the installed package (wheel) or beside it
    (source checkout / editable install)."""
    here = Path(__file__).resolve().parent
    for cand in (here / "pretrained", here.parent / "pretrained"):
        if cand.is_dir() and any(cand.glob("*.safetensors")):
            return cand
    raise WeightsError(f"no pretrained weights folder found (looked in {here / 'pretrained'} "
                       f"and {here.parent / 'pretrained'}); the installation is incomplete")


def available_weights() -> list:
    """Names of the shipped weights."""
    return sorted(p.stem for p in pretrained_dir().glob("*.safetensors"))


def checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _tensors_of(net: Union[MetaNetwork, Mapping[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    items = net.weights().items() if isinstance(net, MetaNetwork) else net.items()
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in items}


def save_weights(net: Union[MetaNetwork, Mapping[str, torch.Tensor]], path: Union[str, os.PathLike],
                 name: str, config: Optional[ArchConfig] = None,
                 metadata: Optional[Mapping[str, str]] = None) -> WeightsInfo:
    """Write weights atomically (temporary file, then rename). Returns their identity."""
    from safetensors.torch import save_file

    if config is None:
        config = net.config if isinstance(net, MetaNetwork) else ArchConfig()
    tensors = _tensors_of(net)
    _check_tensors(tensors, config, str(path))
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    own = dict(format=FORMAT, format_version=FORMAT_VERSION, name=name, config=config.to_json(),
               checksum=checksum(tensors))
    reserved = sorted(own.keys() & meta.keys())
    if reserved:
        raise ValueError(f"metadata keys {reserved} are written by save_weights itself")
    meta.update(own)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return WeightsInfo(name, own["checksum"], config, str(path), meta)


def _check_tensors(tensors: Mapping[str, torch.Tensor], config: ArchConfig, where: str) -> None:
    expected = parameter_shapes(config)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise WeightsError(f"{where}: tensors do not match the architecture "
                           f"(missing {missing}, unexpected {extra})")
    for k, shape in expected.items():
        if tuple(tensors[k].shape) != tuple(shape):
            raise WeightsError(f"{where}: tensor {k!r} has shape {tuple(tensors[k].shape)}, "
                               f"the architecture needs {tuple(shape)}")
        if not torch.isfinite(tensors[k]).all():
            raise WeightsError(f"{where}: tensor {k!r} holds NaN or inf values")


def resolve(weights: Union[str, os.PathLike, None]) -> Path:
    """A name of shipped weights, or a path to a .safetensors file -> the file's path."""
    if weights is None:
        weights = DEFAULT_WEIGHTS
    path = Path(weights)
    if path.suffix == ".safetensors" or os.sep in str(weights) or path.exists():
        if not path.is_file():
            raise WeightsError(f"{path}: no such weights file")
        return path
    folder = pretrained_dir()
    cand = folder / f"{weights}.safetensors"
    if not cand.is_file():
        raise WeightsError(f"unknown weights {str(weights)!r}: not a file, and not one of the "
                           f"shipped weights {available_weights()} in {folder}")
    return cand


def load_weights(weights: Union[str, os.PathLike, None] = None,
                 verify: bool = True) -> "tuple[MetaNetwork, WeightsInfo]":
    """Load shipped weights by name (default: ``DEFAULT_WEIGHTS``) or a file by path."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = resolve(weights)
    where = str(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise WeightsError(f"{where}: not a readable safetensors file (truncated or "
                           f"corrupted?): {e}") from None
    if meta.get("format") != FORMAT:
        raise WeightsError(f"{where}: metadata format is {meta.get('format')!r}, expected {FORMAT!r}"
                           " (not learned_opt weights?)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise WeightsError(f"{where}: format version {meta.get('format_version')!r} is not "
                           f"supported by this version of learned_opt (reads {FORMAT_VERSION!r})")
    try:
        config = ArchConfig.from_json(meta["config"])
    except (KeyError, ValueError, TypeError) as e:
        raise WeightsError(f"{where}: missing or unreadable architecture config: {e}") from None
    tensors = {k: v.to(torch.float32) for k, v in tensors.items()}
    _check_tensors(tensors, config, where)
    digest = checksum(tensors)
    if verify and meta.get("checksum") != digest:
        raise WeightsError(f"{where}: checksum mismatch (file says {meta.get('checksum')!r}, "
                           f"contents hash to {digest!r}): the file is corrupted or was edited")
    net = MetaNetwork(config)
    with torch.no_grad():
        for k, p in net.named_parameters():
            p.copy_(tensors[k])
    name = meta.get("name") or path.stem
    return net, WeightsInfo(name, digest, config, where, meta)


def describe(info: WeightsInfo) -> str:
    return json.dumps({"name": info.name, "checksum": info.checksum, "path": info.path}, indent=1)
