"""Architecture constants of the RNN-MLP learned optimizer (Metz et al. 2020, arXiv 2009.11243).

Everything the meta-network's shapes and the feature computation depend on lives in
:class:`ArchConfig`. The config travels with saved weights (as safetensors metadata), so a
weights file can always be checked against the code that reads it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Tuple

# Number of per-tensor statistics fed to the LSTM (see ``functional.lstm_statistics``), and the
# number added by ``ArchConfig.snr_stats``.
N_LSTM_STATS = 18
N_SNR_STATS = 2
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
    # Two more LSTM inputs per tensor, both free of the gradient's scale: log E[m^2]/E[v] (how
    # much of the gradient survives averaging: low on a noise floor) and log E[g^2]/E[v] (the
    # current gradient against its running average). The 18 base statistics clip log
    # magnitudes to [-5, 5], where most models' second moments (1e-6 and below) sit at the
    # floor, and the MLP sees m/sqrt(v) only after per-tensor normalisation, so without these
    # neither part of the network can tell a noisy gradient from a clean one.
    snr_stats: bool = False
    # The D m/sqrt(v) MLP columns enter unscaled. Every other column is divided by its RMS over
    # the tensor, which keeps the MLP's inputs at a common scale whatever the gradient's size;
    # these columns are already free of that scale and lie in [-1, 1] (|m| <= sqrt(v) for two
    # averages with the same decay). Scaling them too hides how far each element's averaged
    # gradient stands above its noise: on a noise floor they shrink towards 0 unscaled, as
    # Adam's m/sqrt(v) does, but come out with RMS 1 scaled. Same weights, a different network.
    absolute_snr: bool = False
    # The D m/sqrt(v) columns enter the MLP twice: scaled among the element columns, as in the
    # base architecture, and unscaled as D more inputs after the per-tensor constants. The
    # scaled copy carries the pattern over the tensor that weights of the base architecture use;
    # the unscaled one says how far the averaged gradient stands above its noise. Existing
    # weights move here with the new inputs at zero weight (``MetaNetwork.with_dual_snr``), which
    # changes no update, so meta-training can start from weights that already work.
    dual_snr: bool = False
    # An element whose accumulators are all exactly zero has never had a non-zero gradient: with
    # this flag its update is zero (weight decay still applies). Without it the MLP's bias and
    # its p columns move such elements (a padding row of an embedding drifts, and every unused
    # weight with it), which inflates weights that no loss asked to change.
    freeze_untouched: bool = False
    # Make the step independent of the loss's scale, as Adam's is: every gradient is multiplied
    # by grad_reference / s, with s the RMS of the first non-zero gradient the optimizer saw
    # (over all its tensors; kept in the state as ``grad_ref``). A loss k times larger gives
    # gradients k times larger at every step and an s k times larger, so the network reads
    # exactly the same inputs (the loss features' variance floor is made relative to the loss
    # as well). The gradients keep their course over the run relative to that start, which the
    # network uses (how much they have shrunk); a running normaliser would erase it. The
    # network then sees gradients of RMS grad_reference at the start, about what the
    # meta-training tasks start with (0.005 to 0.5, most near 0.02).
    scale_free: bool = False
    grad_reference: float = 0.02
    # Divide each tensor's direction output d by its RMS over the tensor's elements (those that
    # ever had a gradient) before the update, so that a step's size is set by lr and the
    # magnitude path, not by how large d came out: p <- p - lr * (d / rms(d)) * exp(rate * mag).
    # Celo2 (Moudgil et al., 2026) found this normalisation its most important stabiliser; it
    # bounds how fast weights can grow. The compiled CPU kernel does not implement it (the
    # step runs in plain PyTorch).
    unit_rms_update: bool = False
    # The LSTM reads the sign of each tensor's mean of m, v and p. Where a mean is zero in exact
    # arithmetic (the mean gradient of a softmax output's bias), its sign is decided by rounding,
    # and a flip moves that input by 2: a relative change of 1e-6 in the gradients then changes
    # the run by orders of magnitude more than Adam's. With a tolerance > 0 the sign reads 0
    # where |mean| <= sign_tolerance * RMS (over the tensor's elements, and decays for m and v).
    sign_tolerance: float = 0.0

    def __post_init__(self):
        for name in ("magnitude_rate", "rms_eps", "norm_eps", "grad_reference"):
            value = getattr(self, name)
            if not (0 < value < float("inf")):
                raise ValueError(f"{name} must be positive and finite, got {value}")
        if not (0 <= self.sign_tolerance < 1):
            raise ValueError(f"sign_tolerance must be in [0, 1), got {self.sign_tolerance}")
        if self.absolute_snr and self.dual_snr:
            raise ValueError("absolute_snr and dual_snr exclude each other (dual_snr already has "
                             "the unscaled m/sqrt(v) columns, beside the scaled ones)")

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
    def n_dual_cols(self) -> int:
        # the unscaled m/sqrt(v) copies of ``dual_snr``, last among the MLP's inputs
        return self.n_decays if self.dual_snr else 0

    @property
    def mlp_in(self) -> int:
        return self.n_element_cols + self.n_const_cols + self.n_dual_cols

    @property
    def mlp_out(self) -> int:
        return 2 + self.from_mlp

    @property
    def n_lstm_stats(self) -> int:
        return N_LSTM_STATS + (N_SNR_STATS if self.snr_stats else 0)

    @property
    def lstm_in(self) -> int:
        return self.n_lstm_stats + self.from_mlp + self.from_lstm

    @property
    def snr_column_range(self) -> Tuple[int, int]:
        """The [start, stop) indices of the m/sqrt(v) columns among the element columns."""
        return N_ELEMENT_BASE + 2 * self.n_decays, N_ELEMENT_BASE + 3 * self.n_decays

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
