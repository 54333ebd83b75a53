"""The learned optimizer's state: one ``TensorState`` per parameter tensor, one ``GlobalState``
for the optimizer, and how both start. The bottom of the package beside :mod:`.config`:
everything else imports it, it imports nothing of the step."""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .config import ArchConfig

if TYPE_CHECKING:
    from .network import MetaNetwork

Number = Union[float, int, Tensor]


class TensorState(NamedTuple):
    """State of one parameter tensor: 10 accumulator floats per element plus LSTM state."""

    mom: Tensor  # (*shape, D) momentum accumulators, one per decay
    rms: Tensor  # (*shape, D) second-moment accumulators
    lstm_h: Tensor  # (H,)
    lstm_c: Tensor  # (H,)
    from_mlp: Tensor  # (from_mlp,) message the MLP sent for this tensor last step


class GlobalState(NamedTuple):
    """Optimizer-wide state (float64 scalars; counts are stored as floats)."""

    step: Tensor
    train_mean: Tensor
    train_var: Tensor
    train_count: Tensor
    valid_mean: Tensor
    valid_var: Tensor
    valid_count: Tensor
    clip_t: Tensor
    clip_value: Tensor
    from_lstm: Tensor  # (from_lstm,) shared message
    # RMS of the first non-zero gradient (ArchConfig.scale_free; 0 until then, unused without it)
    grad_ref: Tensor

    @classmethod
    def from_saved(cls, fields) -> "GlobalState":
        """From a saved list of fields; lists saved before ``grad_ref`` existed get it at 0."""
        fields = list(fields)
        if len(fields) == len(cls._fields) - 1:
            fields.append(torch.zeros_like(fields[0]))
        return cls(*fields)


class LOptState(NamedTuple):
    glob: GlobalState
    tensors: List[TensorState]

    def to_saved(self) -> dict:
        """Plain lists of tensors, for ``torch.save`` (the one serialised form of a state)."""
        return {"glob": list(self.glob), "tensors": [list(t) for t in self.tensors]}

    @classmethod
    def from_saved(cls, saved: dict) -> "LOptState":
        """The inverse of :meth:`to_saved`; states saved before ``grad_ref`` existed load too."""
        return cls(GlobalState.from_saved(saved["glob"]), [TensorState(*t) for t in saved["tensors"]])


# ---------------------------------------------------------------------------- state


def init_global_state(weights: Dict[str, Tensor], cfg: ArchConfig,
                      device=None) -> GlobalState:
    dev = device if device is not None else weights["init_from_lstm"].device
    z = lambda v=0.0: torch.tensor(v, dtype=torch.float64, device=dev)  # noqa: E731
    return GlobalState(
        step=z(), train_mean=z(), train_var=z(), train_count=z(),
        valid_mean=z(), valid_var=z(), valid_count=z(),
        # the clipper starts as if it had seen one gradient of RMS 1 (first clip: +-clip_mult)
        clip_t=z(1.0), clip_value=z(1.0 - cfg.clip_decay), grad_ref=z(),
        from_lstm=weights["init_from_lstm"].detach().to(dev, torch.float64).clone(),
    )


def init_tensor_state(weights: Dict[str, Tensor], cfg: ArchConfig, param: Tensor) -> TensorState:
    """Fresh state for one parameter (accumulators in fp64 for fp64 params, else fp32)."""
    dt = compute_dtype([param])
    dev = param.device
    return TensorState(
        mom=torch.zeros(*param.shape, cfg.n_decays, dtype=dt, device=dev),
        rms=torch.zeros(*param.shape, cfg.n_decays, dtype=dt, device=dev),
        lstm_h=weights["lstm_h0"].detach().to(dev, dt).clone(),
        lstm_c=weights["lstm_c0"].detach().to(dev, dt).clone(),
        from_mlp=weights["init_from_mlp"].detach().to(dev, dt).clone(),
    )


def check_architecture(weights: Dict[str, Tensor], cfg: ArchConfig) -> None:
    """A clear error where the weights were made for another architecture than ``cfg`` (the
    input widths of the LSTM and of the MLP differ): the usual cause is a missing ``cfg``
    argument with weights whose config is not the default one. The config travels in every
    weights file: ``net, _ = load_weights(...)``, then ``cfg=net.config``. (Whether the
    m/sqrt(v) columns are scaled, ``absolute_snr``, does not show in the shapes.)"""
    want = {"lstm_w": cfg.lstm_in + cfg.lstm_hidden, "mlp_w0": cfg.mlp_in}
    for name, rows in want.items():
        if name in weights and weights[name].shape[-2] != rows:
            raise ValueError(f"the weights' {name} has {weights[name].shape[-2]} input rows, the "
                             f"architecture {cfg} takes {rows}: pass the weights' own config "
                             "(cfg=net.config for net, _ = load_weights(...), or pass net itself)")


def resolve_weights(weights, cfg: Optional[ArchConfig]) -> Tuple[Dict[str, Tensor], ArchConfig]:
    """The weights as a dict and their architecture. ``weights`` is a name -> tensor dict (with
    ``cfg``, default ``ArchConfig()``) or a ``MetaNetwork``, which brings its own config (a
    ``cfg`` that differs from it is refused)."""
    from .network import MetaNetwork

    if isinstance(weights, MetaNetwork):
        if cfg is not None and cfg != weights.config:
            raise ValueError(f"cfg {cfg} differs from the network's own config {weights.config}")
        return weights.weights(), weights.config
    cfg = cfg or ArchConfig()
    check_architecture(weights, cfg)
    return weights, cfg


def init_state(weights: Union[Dict[str, Tensor], "MetaNetwork"], params: Sequence[Tensor],
               cfg: Optional[ArchConfig] = None) -> LOptState:
    """The state before the first step: ``weights`` as in :func:`resolve_weights`."""
    weights, cfg = resolve_weights(weights, cfg)
    dev = params[0].device if len(params) else None
    return LOptState(init_global_state(weights, cfg, dev),
                     [init_tensor_state(weights, cfg, p) for p in params])


def compute_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """float64 if any tensor is float64, else float32 (fp16/bf16 are computed in fp32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
