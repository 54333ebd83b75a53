"""The meta-network: the weights of the learned optimizer, as an ordinary ``nn.Module``.

The module only *holds* weights; the computation lives in :mod:`learned_opt.functional`, which
takes the weights as a plain ``dict[str, Tensor]`` so that it can run under ``torch.func.vmap``
over a population of perturbed weights. ``MetaNetwork.weights()`` returns that dict.

Matrices are stored as ``(fan_in, fan_out)`` so the per-element hot path is ``x @ w``.

    lstm_w (lstm_in + H, 4H), lstm_b (4H,)   one linear map on [input, h] to the gates i, g, f, o
    lstm_h0, lstm_c0 (H,)                     learnable initial LSTM state (zeros at init)
    to_mlp_w (H, 17), to_mlp_b                LSTM -> this tensor's MLP
    to_shared_w (H, 18), to_shared_b          LSTM -> shared message (averaged over tensors)
    init_from_mlp (16,), init_from_lstm (18,) messages used before the first step
    mlp_w0 (54, 32) mlp_b0, mlp_w1 (32, 32) mlp_b1, mlp_w2 (32, 18) mlp_b2   the per-parameter MLP

``ArchConfig.snr_stats`` adds 2 rows to ``lstm_w`` (after the 18 statistics); ``ArchConfig.dual_snr``
adds 5 rows at the end of ``mlp_w0`` (59 in all).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, Optional

import torch
from torch import nn

from .config import ArchConfig


def parameter_shapes(cfg: ArchConfig) -> Dict[str, tuple]:
    """Name -> shape of every meta-network tensor, in a fixed order."""
    H = cfg.lstm_hidden
    shapes = {
        "lstm_w": (cfg.lstm_in + H, 4 * H),
        "lstm_b": (4 * H,),
        "lstm_h0": (H,),
        "lstm_c0": (H,),
        "to_mlp_w": (H, cfg.lstm_to_mlp),
        "to_mlp_b": (cfg.lstm_to_mlp,),
        "to_shared_w": (H, cfg.from_lstm),
        "to_shared_b": (cfg.from_lstm,),
        "init_from_mlp": (cfg.from_mlp,),
        "init_from_lstm": (cfg.from_lstm,),
    }
    widths = [cfg.mlp_in] + [cfg.mlp_hidden] * cfg.mlp_layers + [cfg.mlp_out]
    for i in range(len(widths) - 1):
        shapes[f"mlp_w{i}"] = (widths[i], widths[i + 1])
        shapes[f"mlp_b{i}"] = (widths[i + 1],)
    return shapes


def _fan_in_normal(shape, generator) -> torch.Tensor:
    """Truncated normal (at 2 std) with std 1/sqrt(fan_in), the usual variance-scaling init."""
    fan_in = shape[0]
    std = 1.0 / math.sqrt(fan_in)
    t = torch.empty(shape)
    # Truncation by resampling is awkward with a generator; use the inverse-CDF method.
    u = torch.rand(shape, generator=generator) * 0.9544997 + 0.0227501  # Phi(-2)..Phi(2)
    t.copy_(torch.special.ndtri(u) * std / 0.87962566)  # std of N(0,1) truncated at 2
    return t


class MetaNetwork(nn.Module):
    """Holds the learned optimizer's weights. Build one with :meth:`random` or :meth:`adam_like`,
    or load one with :func:`learned_opt.weights.load_weights`."""

    def __init__(self, config: Optional[ArchConfig] = None):
        super().__init__()
        self.config = config or ArchConfig()
        for name, shape in parameter_shapes(self.config).items():
            self.register_parameter(name, nn.Parameter(torch.zeros(shape)))

    def weights(self) -> Dict[str, torch.Tensor]:
        """The weights as a name -> tensor dict, the form :mod:`learned_opt.functional` takes."""
        return {name: p for name, p in self.named_parameters()}

    # ----------------------------------------------------------------- initialisations
    @classmethod
    def random(cls, config: Optional[ArchConfig] = None, seed: int = 0) -> "MetaNetwork":
        """Variance-scaling initialisation, biases zero, LSTM initial state zero.

        This is the reference's initialisation: its update is a random function of the
        features and does not train anything until meta-trained.
        """
        net = cls(config)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in net.named_parameters():
                if name.startswith("init_from"):
                    p.copy_(_fan_in_normal(p.shape, gen))
                elif p.dim() == 2:
                    p.copy_(_fan_in_normal(p.shape, gen))
                else:
                    p.zero_()
        return net

    @classmethod
    def adam_like(cls, config: Optional[ArchConfig] = None, seed: int = 0,
                  column: int = None) -> "MetaNetwork":
        """A hand-built starting point whose update is exactly one normalised input column.

        The first two hidden units of each layer carry ``relu(x)`` and ``relu(-x)`` of the
        chosen per-element column ``x`` and the direction output is their difference, so
        ``d == x`` exactly while the magnitude output is 0. By default ``x`` is
        ``m_0.9 / sqrt(v_0.9 + eps)`` scaled by its RMS over the tensor: a momentum-RMSprop
        (Adam-like, without bias correction) step whose RMS over each tensor is ``lr``.
        Every other weight keeps its random initialisation and does not reach ``d`` or the
        magnitude, so meta-training can start from here without symmetry problems.
        Not meta-trained.
        """
        net = cls.random(config, seed)
        cfg = net.config
        if column is None:
            k = cfg.decays.index(0.9) if 0.9 in cfg.decays else 0
            column = 3 + 2 * cfg.n_decays + k  # the m_k / sqrt(v_k) block
        last = cfg.mlp_layers
        with torch.no_grad():
            w0, b0 = net.mlp_w0, net.mlp_b0
            w0[:, :2] = 0.0
            w0[column, 0], w0[column, 1] = 1.0, -1.0
            b0[:2] = 0.0
            for i in range(1, last):
                w, b = getattr(net, f"mlp_w{i}"), getattr(net, f"mlp_b{i}")
                w[:, :2] = 0.0
                w[0, 0] = w[1, 1] = 1.0
                b[:2] = 0.0
            w, b = getattr(net, f"mlp_w{last}"), getattr(net, f"mlp_b{last}")
            w[:, :2] = 0.0
            w[0, 0], w[1, 0] = 1.0, -1.0
            b[:2] = 0.0
        return net

    def with_absolute_snr(self) -> "MetaNetwork":
        """This network's weights on the architecture with unscaled m/sqrt(v) columns
        (``ArchConfig.absolute_snr``): the same shapes, so the same weights, but not the same
        updates. A starting point for meta-training. Returns ``self`` if it is one already."""
        if self.config.absolute_snr:
            return self
        return self._same_weights_under(dataclasses.replace(self.config, absolute_snr=True))

    def with_dual_snr(self) -> "MetaNetwork":
        """This network with the unscaled m/sqrt(v) MLP inputs (``ArchConfig.dual_snr``) added at
        zero weight: exactly the same updates, and meta-training can then learn to use them.
        Returns ``self`` if it has them (``ArchConfig`` refuses it with ``absolute_snr``)."""
        if self.config.dual_snr:
            return self
        # the new inputs follow all the old ones
        return self._with_zero_rows(dataclasses.replace(self.config, dual_snr=True), "mlp_w0", self.config.mlp_in)

    def with_snr_stats(self) -> "MetaNetwork":
        """This network with the two signal-to-noise LSTM inputs (``ArchConfig.snr_stats``)
        added at zero weight: the new network computes exactly the same updates, and
        meta-training can then learn to use the new inputs. Returns ``self`` if it has them."""
        if self.config.snr_stats:
            return self
        # the new statistics follow the old ones in the LSTM input
        return self._with_zero_rows(dataclasses.replace(self.config, snr_stats=True), "lstm_w",
                                    self.config.n_lstm_stats)

    def with_magnitude_rate(self, rate: float) -> "MetaNetwork":
        """This network with the step's magnitude path at ``rate``
        (``update = lr * d * exp(rate * mag)``, ``ArchConfig.magnitude_rate``), and the weights
        that produce ``mag`` divided by ``rate / old rate``: exactly the same updates, but a
        change of those weights now moves the step's log-size ``rate / old rate`` times as much.
        At the reference's rate of 0.001 the default weights' magnitude output moves the step
        by at most 0.03% (5-95% range over a run, ``benchmarks/magnitude_probe.py``), so
        meta-training has, in effect, no way to scale a step multiplicatively; a larger rate
        gives it one. Returns ``self`` at the same rate; ``ArchConfig`` refuses a rate that is
        not positive and finite."""
        rate = float(rate)
        if rate == self.config.magnitude_rate:
            return self
        net = MetaNetwork(dataclasses.replace(self.config, magnitude_rate=rate))
        ratio = self.config.magnitude_rate / rate
        net.load_state_dict(self.state_dict())
        last = self.config.mlp_layers
        with torch.no_grad():  # column 1 of the last layer is the magnitude output
            getattr(net, f"mlp_w{last}")[:, 1] *= ratio
            getattr(net, f"mlp_b{last}")[1] *= ratio
        return net

    def with_step_scale(self, scale: float) -> "MetaNetwork":
        """This network with every update multiplied by ``scale``: the direction output ``d``
        (column 0 of the last layer) scaled, the rest unchanged. Under ``unit_rms_update`` the
        direction is normalised, so there the scale goes into the magnitude output's bias
        instead. Used to move a meta-training run's starting point to a different step size
        while the optimizer's ``lr`` keeps its default. Returns ``self`` for a scale of 1."""
        scale = float(scale)
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be positive and finite, got {scale}")
        if scale == 1.0:
            return self
        net = self._same_weights_under(self.config)
        last = self.config.mlp_layers
        with torch.no_grad():
            if self.config.unit_rms_update:
                getattr(net, f"mlp_b{last}")[1] += math.log(scale) / self.config.magnitude_rate
            else:
                getattr(net, f"mlp_w{last}")[:, 0] *= scale
                getattr(net, f"mlp_b{last}")[0] *= scale
        return net

    def with_rms_eps(self, eps: float) -> "MetaNetwork":
        """This network's weights with ``1/sqrt(v + eps)`` in its features
        (``ArchConfig.rms_eps``): the same weights, not the same updates. With the reference's
        1e-6 an element whose gradient is below about 1e-3 has ``m/sqrt(v + eps)`` well under
        its true ``m/sqrt(v)``, so on small gradients the network sees a noise floor where
        there is none; a smaller ``eps`` keeps that ratio free of the gradient's scale down to
        ``sqrt(eps)``. A starting point for meta-training. Returns ``self`` at the same eps;
        ``ArchConfig`` refuses one that is not positive and finite."""
        eps = float(eps)
        if eps == self.config.rms_eps:
            return self
        return self._same_weights_under(dataclasses.replace(self.config, rms_eps=eps))

    def with_options(self, **changes) -> "MetaNetwork":
        """This network's weights under a config with some boolean options changed that keep
        every shape (``freeze_untouched``, ``scale_free``, ``unit_rms_update``, ``sign_tolerance``): the same weights, not always the
        same updates. A starting point for meta-training. Returns ``self`` if nothing changes."""
        flags = {"freeze_untouched", "scale_free", "unit_rms_update"}
        allowed = flags | {"sign_tolerance"}
        unknown = set(changes) - allowed
        if unknown:
            raise ValueError(f"with_options changes only {sorted(allowed)}, got {sorted(unknown)}")
        changes = {k: bool(v) if k in flags else float(v) for k, v in changes.items()}
        if all(getattr(self.config, k) == v for k, v in changes.items()):
            return self
        return self._same_weights_under(dataclasses.replace(self.config, **changes))

    def _same_weights_under(self, cfg: ArchConfig) -> "MetaNetwork":
        """A network of ``cfg`` (same parameter shapes) holding a copy of this one's weights."""
        net = MetaNetwork(cfg)
        net.load_state_dict(self.state_dict())
        return net

    def _with_zero_rows(self, cfg: ArchConfig, name: str, at: int) -> "MetaNetwork":
        """A network of ``cfg`` holding this one's weights, where ``cfg`` gives the input matrix
        ``name`` more rows, inserted at row ``at`` and left at zero."""
        net = MetaNetwork(cfg)
        with torch.no_grad():  # the new network starts all zeros: copy around the new rows
            for key, p in self.named_parameters():
                q = getattr(net, key)
                if key == name:
                    new = q.shape[0] - p.shape[0]
                    q[:at].copy_(p[:at])
                    q[at + new:].copy_(p[at:])
                else:
                    q.copy_(p)
        return net
