"""Few-shot data: sinusoid regression and Omniglot N-way K-shot episodes.

Every sampler is a pure function of (seed, index), so a run that resumes sees the same
episodes and an evaluation is repeatable.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import math
import os
import zipfile
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from learned_opt.atomic import atomic_torch_save

from ..tasks.base import generator


class Episode(NamedTuple):
    """One task (or a batch of tasks, with a leading task dimension)."""

    xs: Tensor  # support inputs
    ys: Tensor  # support targets
    xq: Tensor  # query inputs
    yq: Tensor  # query targets


def stack_episodes(eps: List[Episode]) -> Episode:
    return Episode(*(torch.stack(parts) for parts in zip(*eps)))


# -------------------------------------------------------------------------- sinusoid


class Sinusoid:
    """y = A sin(x - phi), A ~ U[0.1, 5], phi ~ U[0, pi], x ~ U[-5, 5] (Finn et al. 2017)."""

    def __init__(self, shots: int, queries: int = 10, seed: int = 0):
        self.shots, self.queries, self.seed = shots, queries, seed

    def params(self, index: int) -> Tuple[float, float]:
        g = generator(71, self.seed, index)
        u = torch.rand(2, generator=g, dtype=torch.float64)
        return 0.1 + 4.9 * float(u[0]), math.pi * float(u[1])

    def episode(self, index: int) -> Episode:
        amp, phase = self.params(index)
        g = generator(72, self.seed, index)
        x = torch.rand(self.shots + self.queries, 1, generator=g) * 10 - 5
        y = amp * torch.sin(x - phase)
        return Episode(x[: self.shots], y[: self.shots], x[self.shots:], y[self.shots:])

    def batch(self, index: int, size: int) -> Episode:
        return stack_episodes([self.episode(index * size + i) for i in range(size)])

    def curve(self, index: int, n: int = 200) -> Tuple[Tensor, Tensor]:
        amp, phase = self.params(index)
        x = torch.linspace(-5, 5, n).unsqueeze(-1)
        return x, amp * torch.sin(x - phase)


# -------------------------------------------------------------------------- omniglot


class OmniglotError(RuntimeError):
    pass


ARCHIVES = ("images_background", "images_evaluation")


def _open_sources(root: str):
    """{set name: ('zip', ZipFile) or ('dir', folder)} for both sets, or a clear error."""
    if not os.path.isdir(root):
        raise OmniglotError(f"Omniglot path {root!r} is not a folder; give the folder that holds "
                            "images_background.zip and images_evaluation.zip (or their unpacked folders)")
    out = {}
    for name in ARCHIVES:
        folder = os.path.join(root, name)
        zpath = os.path.join(root, name + ".zip")
        if os.path.isdir(folder):
            out[name] = ("dir", folder)
        elif os.path.isfile(zpath):
            try:
                z = zipfile.ZipFile(zpath)
            except (zipfile.BadZipFile, OSError) as e:
                raise OmniglotError(f"{zpath}: not a readable zip archive ({e}); download it again") from None
            out[name] = ("zip", z)
        else:
            raise OmniglotError(f"Omniglot path {root!r} has neither {name}.zip nor a {name}/ folder")
    return out


def _listing(kind, src, name) -> List[Tuple[str, str, List[str]]]:
    """[(alphabet, character, [image keys sorted])], alphabets sorted, characters in folder order."""
    entries: Dict[Tuple[str, str], List[str]] = {}
    if kind == "zip":
        for n in src.namelist():
            parts = n.split("/")
            if len(parts) == 4 and parts[0] == name and parts[3].endswith(".png"):
                entries.setdefault((parts[1], parts[2]), []).append(n)
    else:
        for alpha in os.listdir(src):
            adir = os.path.join(src, alpha)
            if not os.path.isdir(adir):
                continue
            for ch in os.listdir(adir):
                cdir = os.path.join(adir, ch)
                if os.path.isdir(cdir):
                    entries[(alpha, ch)] = [os.path.join(cdir, f) for f in os.listdir(cdir) if f.endswith(".png")]
    return [(a, c, sorted(v)) for (a, c), v in sorted(entries.items())]


def _decode(kind, src, key: str, size: int) -> Tensor:
    from PIL import Image
    try:
        raw = src.read(key) if kind == "zip" else open(key, "rb").read()
        img = Image.open(io.BytesIO(raw)).convert("L").resize((size, size), Image.LANCZOS)
    except (zipfile.BadZipFile, OSError, ValueError) as e:  # CRC errors, truncated PNGs
        where = getattr(src, "filename", src)
        raise OmniglotError(f"{where}: damaged entry {key!r} ({e}); download the archive again") from None
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size)


def load_omniglot(root: str, size: int = 28, cache_dir: Optional[str] = None) -> Tensor:
    """All 1623 characters as uint8 (1623, 20, size, size), ink = 255, in the order of the
    standard split: background alphabets sorted by name, then evaluation alphabets, characters
    in folder order. Cached (keyed by the archives' names, sizes and times) after the first
    load in ``cache_dir`` (default ``~/.cache/learned_opt``)."""
    if importlib.util.find_spec("PIL") is None:  # check before reading anything
        raise ImportError("Omniglot needs pillow: pip install 'learned_opt[data]'")
    srcs = _open_sources(root)
    ident = []
    for name in ARCHIVES:
        kind, src = srcs[name]
        path = src.filename if kind == "zip" else src
        st = os.stat(path)
        ident.append(f"{os.path.abspath(path)}:{st.st_size}:{int(st.st_mtime)}")
    key = hashlib.sha256(("|".join(ident) + f"|{size}").encode()).hexdigest()[:16]
    cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "learned_opt")
    cache = os.path.join(cache_dir, f"omniglot-{size}-{key}.pt")
    if os.path.exists(cache):
        try:
            return torch.load(cache, weights_only=True)
        except Exception:
            os.remove(cache)  # a damaged cache is rebuilt
    chars = []
    for name in ARCHIVES:
        kind, src = srcs[name]
        listing = _listing(kind, src, name)
        if not listing:
            raise OmniglotError(f"{getattr(src, 'filename', src)}: no character images found")
        for _, _, keys in listing:
            if len(keys) != 20:
                raise OmniglotError(f"{getattr(src, 'filename', src)}: a character has {len(keys)} drawings, expected 20")
            chars.append(torch.stack([255 - _decode(kind, src, k, size) for k in keys]))
    data = torch.stack(chars)
    os.makedirs(cache_dir, exist_ok=True)
    atomic_torch_save(data, cache)
    return data


def vinyals_split(data: Tensor, split: str) -> Tensor:
    """Characters of the standard split ("train": first 1200, "test": last 423), each at the
    4 rotations, as classes: (n_chars * 4, 20, H, W)."""
    if data.shape[0] != 1623:
        raise OmniglotError(f"expected 1623 characters, got {data.shape[0]}")
    chars = data[:1200] if split == "train" else data[1200:] if split == "test" else None
    if chars is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rots = [torch.rot90(chars, k, dims=(-2, -1)) for k in range(4)]
    return torch.stack(rots, dim=1).flatten(0, 1)


class FewShotClasses:
    """N-way K-shot episodes from class-major images (classes, examples, H, W)."""

    def __init__(self, images: Tensor, ways: int, shots: int, queries: int, seed: int = 0):
        if ways > images.shape[0]:
            raise ValueError(f"{ways}-way episodes need at least {ways} classes, have {images.shape[0]}")
        if shots + queries > images.shape[1]:
            raise ValueError(f"{shots} shots + {queries} queries exceed the {images.shape[1]} examples per class")
        self.images, self.ways, self.shots, self.queries, self.seed = images, ways, shots, queries, seed

    def episode(self, index: int) -> Episode:
        g = generator(81, self.seed, index)
        classes = torch.randperm(self.images.shape[0], generator=g)[: self.ways]
        xs, ys, xq, yq = [], [], [], []
        for label, c in enumerate(classes.tolist()):
            pick = torch.randperm(self.images.shape[1], generator=g)[: self.shots + self.queries]
            imgs = self.images[c, pick].float().div(255.0).unsqueeze(1)
            xs.append(imgs[: self.shots])
            xq.append(imgs[self.shots:])
            ys += [label] * self.shots
            yq += [label] * self.queries
        return Episode(torch.cat(xs), torch.tensor(ys), torch.cat(xq), torch.tensor(yq))

    def batch(self, index: int, size: int) -> Episode:
        return stack_episodes([self.episode(index * size + i) for i in range(size)])
