"""Architecture constants of the RNN-MLP learned optimizer (Metz et al. 2020, arXiv 2009.11243).

Everything the meta-network's shapes and the feature computation depend on lives in
:class:`ArchConfig`. The config travels with saved weights (as safetensors metadata), so a
weights file can always be checked against the code that reads it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Tuple

# Number of per-tensor statistics fed to the LSTM (see ``features.lstm_statistics``).
N_LSTM_STATS = 18
# Number of per-element input columns of the MLP (see ``features.element_columns``):
# g, p, log|p|, m x D, v x D, m/sqrt(v) x D, 1/sqrt(v) x D with D decays.
N_ELEMENT_BASE = 3
# Step sinusoid timescales: sin(t / (tau * pi)).
TIMESCALES: Tuple[float, ...] = (1, 3, 10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000)
# Number of shape dimensions given to the LSTM; higher ranks fold their leading dims.
N_SHAPE_DIMS = 4


@dataclasses.dataclass(frozen=True)
class ArchConfig:
    """Sizes and constants of the learned optimizer. Defaults follow the reference."""

    decays: Tuple[float, ...] = (0.5, 0.9, 0.99, 0.999, 0.9999)
    lstm_hidden: int = 64
    mlp_hidden: int = 32
    mlp_layers: int = 2
    from_mlp: int = 16  # per-tensor message, MLP -> LSTM (outputs 2.. of the MLP, averaged)
    from_lstm: int = 18  # shared message, LSTM -> LSTM (averaged over tensors)
    lstm_to_mlp: int = 17  # per-tensor values, LSTM -> this tensor's MLP
    magnitude_rate: float = 0.001  # update = lr * d * exp(magnitude_rate * mag)
    train_loss_decay: float = 0.9
    valid_loss_decay: float = 0.95
    clip_decay: float = 0.99
    clip_mult: float = 10.0
    rms_eps: float = 1e-6  # 1/sqrt(v + rms_eps)
    norm_eps: float = 1e-5  # per-tensor column scaling rsqrt(norm_eps + mean(x^2))

    @property
    def n_decays(self) -> int:
        return len(self.decays)

    @property
    def n_element_cols(self) -> int:
        return N_ELEMENT_BASE + 4 * self.n_decays

    @property
    def n_const_cols(self) -> int:
        # sinusoids, tensor count, log norm of p, log numel, LSTM values
        return len(TIMESCALES) + 3 + self.lstm_to_mlp

    @property
    def mlp_in(self) -> int:
        return self.n_element_cols + self.n_const_cols

    @property
    def mlp_out(self) -> int:
        return 2 + self.from_mlp

    @property
    def lstm_in(self) -> int:
        return N_LSTM_STATS + self.from_mlp + self.from_lstm

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ArchConfig":
        raw = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"unknown architecture fields {sorted(unknown)}")
        if "decays" in raw:
            raw["decays"] = tuple(float(d) for d in raw["decays"])
        return cls(**raw)
