"""``LearnedOptimizer``: a thin ``torch.optim.Optimizer`` shell around the functional core.

State layout (a standard optimizer state dict; tensors and numbers only):

* per parameter, created lazily at its first gradient: ``mom`` and ``rms`` (``(*shape, 5)``
  accumulators, fp32, or fp64 for fp64 parameters), ``lstm_h``, ``lstm_c`` and ``from_mlp``;
* optimizer-wide values, kept (as ``torch.optim.LBFGS`` does) in the state of the first
  parameter of the first group: ``step``, the running loss statistics, the gradient clipper,
  the shared LSTM message ``from_lstm``, ``nonfinite_skips`` (an int64 tensor, which the
  step's custom op increments in place; states saved with a Python int load), and the identity of the
  meta-network weights (``weights_checksum``, an int, ``weights_name`` and ``weights_config``,
  the architecture as JSON, both UTF-8 bytes in uint8 tensors). Loading a state dict made with
  other weights, or with the same tensors read under another architecture config, raises.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Dict, Optional, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import functional as F
from . import ops
from .network import MetaNetwork
from .weights import WeightsInfo, checksum, load_weights


def _as_bytes(text: str) -> Tensor:
    return torch.tensor(list(text.encode()), dtype=torch.uint8)


def _from_bytes(t: Tensor) -> str:
    return bytes(t.tolist()).decode(errors="replace")


_TENSOR_KEYS = ("mom", "rms", "lstm_h", "lstm_c", "from_mlp")
_GLOBAL_KEYS = {  # state key -> GlobalState field
    "step": "step", "train_loss_mean": "train_mean", "train_loss_var": "train_var",
    "train_loss_count": "train_count", "valid_loss_mean": "valid_mean",
    "valid_loss_var": "valid_var", "valid_loss_count": "valid_count",
    "clip_t": "clip_t", "clip_value": "clip_value", "from_lstm": "from_lstm", "grad_ref": "grad_ref",
}
# the GlobalState fields' state keys, in the fields' order (the custom op's argument order)
_GLOBAL_ORDER = tuple({f: k for k, f in _GLOBAL_KEYS.items()}[f] for f in F.GlobalState._fields)
_UNSUPPORTED = ("foreach", "fused", "capturable", "differentiable")


_INVALID = {"lr": "Invalid learning rate: {}", "weight_decay": "Invalid weight_decay value: {}"}


def _check_number(name: str, value: Any) -> None:
    """torch.optim's checks and wording: a float or a 1-element Tensor (any shape), >= 0; and
    finite, which torch does not check."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element")
        v = float(value.detach())
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        v = float(value)
    else:
        raise TypeError(f"{name} must be a float or a one-element Tensor, got {type(value).__name__}")
    if not math.isfinite(v) or v < 0:
        raise ValueError(_INVALID[name].format(value) + " (must be finite and >= 0)")


def _not_compiled(fn):
    """``torch.compiler.disable`` with its reason where this torch takes one."""
    reason = ("LearnedOptimizer's step on DTensor (FSDP2) or complex parameters runs eagerly: a custom "
              "op cannot take DTensors, nor mutate a complex parameter's real view under the compiler")
    try:
        return torch.compiler.disable(fn, reason=reason)
    except TypeError:  # torch before the reason argument
        return torch.compiler.disable(fn)


def _is_process_group(x) -> bool:
    return torch.distributed.is_available() and isinstance(x, torch.distributed.ProcessGroup)


def _is_dtensor(x) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed
        return False
    return isinstance(x, DTensor)


def _local_piece(p, g):
    """A DTensor parameter's local piece, its gradient's, and (full shape, whether sharded,
    process group of the shards). Takes FSDP2's layouts: a 1-D mesh with ``Shard(dim)`` or
    ``Replicate``, and HSDP's 2-D mesh (``Replicate`` over the first dimension, ``Shard(dim)``
    over the second: the replicas hold equal pieces, so the statistics are reduced over the
    second dimension's group only). Refuses layouts whose statistics this step cannot reduce."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    mesh, placements = p.device_mesh, tuple(p.placements)
    for pl in placements:
        if not (isinstance(pl, Replicate) or (isinstance(pl, Shard) and pl.dim >= 0)):
            raise NotImplementedError(f"LearnedOptimizer takes Shard(dim) or Replicate placements, got {pl}")
    if mesh.ndim == 1:
        group = mesh.get_group()
    elif mesh.ndim == 2 and isinstance(placements[0], Replicate):
        group = mesh.get_group(1)  # HSDP: the statistics over the shard dimension
    else:
        raise NotImplementedError(f"LearnedOptimizer takes DTensor parameters on a 1-D device mesh (FSDP2's "
                                  f"fully_shard) or a 2-D one replicated over its first dimension (HSDP), got "
                                  f"placements {placements} on a {mesh.ndim}-D mesh")
    if p.is_complex():
        raise NotImplementedError("LearnedOptimizer does not take complex DTensor parameters")
    if not isinstance(g, DTensor) or g.placements != p.placements:
        raise RuntimeError("the gradient of a DTensor parameter must be a DTensor with the parameter's placements")
    sharded = any(isinstance(pl, Shard) for pl in placements)
    return p.to_local(), g.to_local(), (p.shape, sharded, group)


def _sharded_like(p, local: Tensor) -> Tensor:
    """``local`` (this rank's piece of a per-element state of shape (*p.shape, D)) as a DTensor
    laid out like the parameter ``p``, so that distributed checkpoints save it sharded."""
    from torch.distributed.tensor import DTensor

    shape = torch.Size((*p.shape, local.shape[-1]))
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=shape, stride=stride)


class LearnedOptimizer(Optimizer):
    """A learned optimizer (per-tensor LSTM + per-parameter MLP) as a drop-in for Adam.

    Args:
        params: iterable of parameters, of (name, parameter) pairs, or of param-group dicts.
        lr: multiplier on the network's update (default 1e-3, Adam's scale); ``lr=0`` is a
            no-op. Read from each param group at every step, so schedulers work.
        weight_decay: decoupled weight decay, ``p <- p * (1 - lr * weight_decay)``.
        maximize: maximise the objective instead of minimising it.
        weights: name of shipped weights (see ``learned_opt.available_weights()``), path to a
            ``.safetensors`` file, or a :class:`MetaNetwork`. Default: the shipped default.
        impl: ``"fast"`` (default) or ``"reference"`` (readable, slow; same results).
        chunk_size: elements per chunk of the fast path (bounds its transient memory).
            Default: 2^14 on the CPU (cache-sized), 2^20 on CUDA (fewer kernel launches).
        loss_group: the data-parallel group over which a loss given to ``step`` is averaged
            before it reaches the loss features, so that replicas with the same gradients
            (DDP, Lightning's DDP, accelerate) take the same step. ``"auto"`` (default): the
            default group whenever ``torch.distributed`` is initialised with more than one
            process; ``None``: never; or a ``ProcessGroup``. Every rank must then pass a loss
            at the same steps (the average is a collective call).

    ``step(closure=None, *, loss=None)``: the training loss feeds the optimizer's loss
    features; pass it as ``loss=`` or return it from the closure. Without it the
    training-loss feature is 0. Feed validation losses with :meth:`report_validation_loss`.

    Non-finite gradients: if any gradient holds NaN or inf, the whole step is skipped
    (parameters and state untouched), a ``RuntimeWarning`` is issued and the state's
    ``nonfinite_skips`` counter is incremented.
    """

    def __init__(self, params, lr: Union[float, Tensor] = 1e-3, weight_decay: float = 0.0, *,
                 maximize: bool = False, weights: Union[str, MetaNetwork, None] = None,
                 impl: str = "fast", chunk_size: Optional[int] = None,
                 loss_group: Any = "auto",
                 foreach: Optional[bool] = None, fused: Optional[bool] = None,
                 capturable: bool = False, differentiable: bool = False):
        for flag, val in (("foreach", foreach), ("fused", fused), ("capturable", capturable),
                          ("differentiable", differentiable)):
            if val:
                raise ValueError(f"LearnedOptimizer does not support {flag}=True "
                                 "(it always processes all tensors together)")
        if impl not in ("fast", "reference"):
            raise ValueError(f"impl must be 'fast' or 'reference', got {impl!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        _check_number("lr", lr)
        _check_number("weight_decay", weight_decay)
        if not (loss_group is None or loss_group == "auto" or _is_process_group(loss_group)):
            raise ValueError(f"loss_group must be 'auto', None or a torch.distributed ProcessGroup, got {loss_group!r}")
        self.impl = impl
        self.chunk_size = chunk_size
        self.loss_group = loss_group
        self._observed = None  # (sum, count) of the losses given to observe_loss since the last step
        self._set_weights(weights)
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, maximize=maximize))

    # ------------------------------------------------------------------ weights
    def _set_weights(self, weights) -> None:
        if isinstance(weights, MetaNetwork):
            net = weights
            tensors = {k: v.detach() for k, v in net.weights().items()}
            info = WeightsInfo("<in-memory>", checksum(tensors), net.config, None, {})
        else:
            net, info = load_weights(weights)
        self.meta_config = net.config
        self.weights_info = info
        self._config_json = net.config.to_json()
        # the identity saved with the state, made here once (the step may be traced)
        self._identity = (_as_bytes(info.name), _as_bytes(self._config_json))
        self._weights = {k: v.detach().clone() for k, v in net.weights().items()}
        self._weights_cache: Dict[Any, Dict[str, Tensor]] = {}

    def _weights_on(self, device) -> Dict[str, Tensor]:
        key = str(device)
        if key not in self._weights_cache:
            self._weights_cache[key] = {k: v.to(device) for k, v in self._weights.items()}
        return self._weights_cache[key]

    # ------------------------------------------------------------ param groups
    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        for flag in _UNSUPPORTED:
            if param_group.get(flag):
                raise ValueError(f"LearnedOptimizer does not support {flag}=True")
        for key in ("lr", "weight_decay"):
            if key in param_group:
                _check_number(key, param_group[key])
        if "maximize" in param_group and not isinstance(param_group["maximize"], bool):
            raise ValueError(f"maximize must be a bool, got {param_group['maximize']!r}")
        params = param_group.get("params")
        if params is not None and not isinstance(params, (Tensor, set)):
            params = list(params)
            param_group = dict(param_group, params=params)
            tensors = [p[1] if isinstance(p, tuple) else p for p in params]
            if len({id(t) for t in tensors}) != len(tensors):
                # torch.optim warns and keeps them (stepping such a parameter twice); one learned
                # step per tensor is all this optimizer can mean, so it warns and keeps the first
                warnings.warn("optimizer contains a parameter group with duplicate parameters; "
                              "LearnedOptimizer keeps the first of each", UserWarning, stacklevel=3)
                seen, unique = set(), []
                for p, t in zip(params, tensors):
                    if id(t) not in seen:
                        seen.add(id(t))
                        unique.append(p)
                param_group = dict(param_group, params=unique)
        super().add_param_group(param_group)

    # --------------------------------------------------------------- state I/O
    def _anchor(self) -> Tensor:
        return self.param_groups[0]["params"][0]

    def _global_state(self, create: bool = True) -> Optional[Dict[str, Any]]:
        st = self.state[self._anchor()]
        if "step" not in st:
            if not create:
                return None
            g = F.init_global_state(self._weights, self.meta_config, self._anchor().device)
            for key, field in _GLOBAL_KEYS.items():
                st[key] = getattr(g, field)
            st["nonfinite_skips"] = torch.zeros((), dtype=torch.int64, device=self._anchor().device)
            st["weights_checksum"] = self.weights_info.checksum_int
            st["weights_name"] = self._identity[0].clone()
            st["weights_config"] = self._identity[1].clone()
        return st

    @staticmethod
    def _to_global(st) -> F.GlobalState:
        return F.GlobalState(**{field: st[key] for key, field in _GLOBAL_KEYS.items()})

    @staticmethod
    def _from_global(g: F.GlobalState, st) -> None:
        for key, field in _GLOBAL_KEYS.items():
            st[key] = getattr(g, field)

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        # torch.optim casts floating state to each parameter's dtype; our accumulators stay
        # fp32 for low-precision params and the running statistics fp64, so keep the saved dtypes.
        saved = state_dict["state"]
        for st in saved.values():
            if "weights_checksum" in st and int(st["weights_checksum"]) != self.weights_info.checksum_int:
                name = _from_bytes(st["weights_name"]) if "weights_name" in st else "?"
                raise ValueError(
                    f"this state dict was made with meta-network weights {name!r} "
                    f"(checksum {int(st['weights_checksum']):015x}), but this optimizer uses "
                    f"{self.weights_info.name!r} ({self.weights_info.checksum_int:015x})")
            if "weights_config" in st and _from_bytes(st["weights_config"]) != self.meta_config.to_json():
                raise ValueError(
                    f"this state dict was made with the same meta-network tensors under another "
                    f"architecture config ({_from_bytes(st['weights_config'])}), but this optimizer "
                    f"uses {self.weights_info.name!r} with {self.meta_config.to_json()}")
        originals = {k: dict(v) for k, v in saved.items()}
        super().load_state_dict(state_dict)
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            if i in originals:
                for key, val in originals[i].items():
                    if isinstance(val, Tensor):
                        self.state[p][key] = val.to(p.device).clone()

    def __getstate__(self):
        st = super().__getstate__()
        st.update(impl=self.impl, chunk_size=self.chunk_size, meta_config=self.meta_config,
                  weights_info=self.weights_info, _weights=self._weights,
                  # a ProcessGroup does not pickle: a copy averages over the default group
                  loss_group=self.loss_group if self.loss_group in (None, "auto") else "auto")
        return st

    def _reduce_loss(self, loss):
        """The loss averaged over ``loss_group`` (see the class docstring), as float64."""
        group = self.loss_group
        if group is None or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return loss
        if group == "auto":
            group = None  # the default group
        dist = torch.distributed
        world = dist.get_world_size(group)
        if world <= 1:
            return loss
        dev = self._anchor().device if "nccl" in str(dist.get_backend(group)) else torch.device("cpu")
        t = torch.as_tensor(loss, dtype=torch.float64).detach().to(dev).reshape(()).clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        return t / world

    def __setstate__(self, state):
        super().__setstate__(state)
        self._weights_cache = {}
        self._config_json = self.meta_config.to_json()
        self._identity = (_as_bytes(self.weights_info.name), _as_bytes(self._config_json))
        self._observed = None
        self.__dict__.setdefault("loss_group", "auto")
        # as torch.optim.Adam does: groups saved without an option get its default, and
        # counters saved as Python numbers become the tensors the step expects
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("weight_decay", 0.0)
        for st in self.state.values():
            for key, field in _GLOBAL_KEYS.items():
                if key in st and field != "from_lstm" and not torch.is_tensor(st[key]):
                    st[key] = torch.tensor(float(st[key]), dtype=torch.float64)
            if "nonfinite_skips" in st and not torch.is_tensor(st["nonfinite_skips"]):  # saved as a number
                st["nonfinite_skips"] = torch.tensor(int(st["nonfinite_skips"]), dtype=torch.int64,
                                                     device=st["step"].device if "step" in st else None)
            if "step" in st and "grad_ref" not in st:  # a state saved before grad_ref existed
                st["grad_ref"] = torch.zeros((), dtype=torch.float64, device=st["step"].device)

    # ------------------------------------------------------------------- step
    @torch.no_grad()
    def report_validation_loss(self, loss: Union[float, Tensor]) -> None:
        """Feed one validation loss to the optimizer's validation-loss feature.

        Call it as often as you evaluate (e.g. every few hundred steps); it does not change
        parameters or advance the step count. Non-finite values are ignored.
        """
        st = self._global_state()
        state = F.LOptState(self._to_global(st), [])
        state = F.observe_validation_loss(state, loss, self.meta_config)
        self._from_global(state.glob, st)

    @torch.no_grad()
    def observe_loss(self, loss: Union[float, Tensor]) -> None:
        """Remember a training loss for the next ``step()`` that is called without one.

        For frameworks that call ``optimizer.step()`` themselves (HF Trainer, timm's scripts,
        accelerate): call this where the loss is computed. Several calls before one step (as
        with gradient accumulation) are averaged; the next step uses the average and forgets
        it. A loss given to ``step`` itself, or returned by its closure, takes precedence.
        ``learned_opt.observe_loss(optimizer, loss)`` finds this optimizer inside a
        framework's wrapper."""
        if isinstance(loss, Tensor):
            if loss.numel() != 1:
                raise ValueError(f"loss must be a scalar, got shape {tuple(loss.shape)}")
            loss = loss.detach().to(torch.float64).reshape(())
        else:
            loss = torch.tensor(float(loss), dtype=torch.float64)
        total, count = self._observed if self._observed is not None else (0.0, 0)
        self._observed = (total + loss, count + 1)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None, *, loss=None):
        """One optimisation step. Returns the loss (the closure's, or the one passed).

        The step itself is one custom op (``learned_opt::step_``, :mod:`learned_opt.ops`), so
        ``torch.compile(opt.step)``, or a compiled training step that calls it, traces it
        without a graph break (``fullgraph=True`` included); the op runs eagerly inside the
        compiled code, at eager speed. A ``Tensor`` lr lets a scheduler change it without a
        recompile, as with torch's own optimizers. DTensor (FSDP2) parameters take an eager
        step that ``torch.compile`` leaves out of the graph."""
        if closure is not None:
            if loss is not None:
                raise ValueError("pass the loss either through the closure or as loss=, not both")
            with torch.enable_grad():
                loss = closure()
        observed, self._observed = self._observed, None
        if loss is None and observed is not None:
            loss = observed[0] / observed[1]
        if loss is not None:
            if isinstance(loss, Tensor):
                if loss.numel() != 1:
                    raise ValueError(f"loss must be a scalar, got shape {tuple(loss.shape)}")
                loss_value = loss.detach()
            else:
                loss_value = torch.tensor(float(loss), dtype=torch.float64)
            # maximising: the features must see the objective the step descends on
            groups = [g for g in self.param_groups if g["params"]]
            if groups and all(g["maximize"] for g in groups):
                loss_value = -loss_value
            loss_value = self._reduce_loss(loss_value)
        else:
            loss_value = None

        entries = []  # (parameter, its group), for the parameters that have a gradient
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LearnedOptimizer does not support sparse gradients")
                if not p.is_floating_point() and not p.is_complex():
                    raise RuntimeError(f"cannot optimise a parameter of dtype {p.dtype}")
                entries.append((p, group))
        if not entries:
            return loss
        devices = {p.device for p, _ in entries}
        if len(devices) > 1:
            raise RuntimeError(f"LearnedOptimizer needs all parameters on one device, got {devices}")
        if any(_is_dtensor(p) or p.is_complex() for p, _ in entries):
            self._step_eager(entries, loss_value)
            return loss
        grads = [-p.grad if group["maximize"] else p.grad for p, group in entries]
        self._run(entries, [p for p, _ in entries], grads, loss_value, None)
        return loss

    @_not_compiled
    def _step_eager(self, entries, loss_value) -> None:
        """The step where some parameters are DTensors or complex, outside torch.compile's
        graphs: each rank steps its local pieces of DTensors, with every per-tensor statistic
        reduced over the shards' process group; complex parameters step their real views (a
        view mutated by a custom op is what the compiler's functionalization cannot carry)."""
        params, grads, layout = [], [], []
        for p, group in entries:
            if _is_dtensor(p):
                pr, g, where = _local_piece(p, p.grad)
            elif p.is_complex():
                pr, g, where = torch.view_as_real(p), torch.view_as_real(p.grad), None
            else:
                pr, g, where = p, p.grad, None
            layout.append(where if where is not None else (pr.shape, False, None))
            params.append(pr)
            grads.append(-g if group["maximize"] else g)
        self._run(entries, params, grads, loss_value, _sharding_of(layout))

    def _run(self, entries, params, grads, loss_value, shard) -> None:
        """Creates missing state, then runs the step on ``params`` (the tensors the step
        writes: the parameters, their real views or their local pieces) through the custom op,
        or, for sharded tensors, its body with the sharding."""
        weights = self._weights_on(params[0].device)
        glob_st = self._global_state()
        for (p, _), pr in zip(entries, params):
            st = self.state[p]
            if "mom" not in st:
                fresh = F.init_tensor_state(weights, self.meta_config, pr)
                for key in _TENSOR_KEYS:
                    st[key] = getattr(fresh, key)
                if shard is not None and _is_dtensor(p):  # the accumulators sharded like the parameter
                    st["mom"], st["rms"] = _sharded_like(p, st["mom"]), _sharded_like(p, st["rms"])
        if shard is None:
            states = [[self.state[p][key] for p, _ in entries] for key in _TENSOR_KEYS]
        else:
            states = [[_local(self.state[p][key]) for p, _ in entries] for key in _TENSOR_KEYS]
        args = (params, grads, *states, [glob_st[key] for key in _GLOBAL_ORDER], glob_st["nonfinite_skips"],
                list(weights.values()), ",".join(weights), loss_value, *_group_values(self.param_groups, entries),
                self._config_json, self.impl, self.chunk_size or 0)
        if shard is None:
            torch.ops.learned_opt.step_(*args)
        else:
            ops.apply_step(*args, shard=shard)


def _local(t: Tensor) -> Tensor:
    return t.to_local() if _is_dtensor(t) else t


def _group_values(groups, entries):
    """(lr, weight decay, group of each entry): each group's lr and weight decay as float64
    CPU tensors of one value per group, and each entry's group index. Python numbers make
    constants; Tensor values (the way to change lr under torch.compile without a recompile)
    are stacked as tensors."""
    out = []
    for key in ("lr", "weight_decay"):
        values = [group[key] for group in groups]
        if any(isinstance(v, Tensor) for v in values):
            out.append(torch.stack([torch.as_tensor(v, dtype=torch.float64).detach().reshape(()).cpu() for v in values]))
        else:
            out.append(torch.tensor(values, dtype=torch.float64))
    index = {id(group): i for i, group in enumerate(groups)}
    return out[0], out[1], [index[id(group)] for _, group in entries]


def _sharding_of(layout) -> Optional[F.Sharding]:
    """The sharding of a step's tensors (``(full shape, sharded, group)`` each), or None where no
    parameter is a DTensor. All DTensor parameters must share one process group."""
    groups = {id(g): g for _, _, g in layout if g is not None}
    if not groups:
        return None
    if len(groups) > 1:
        raise NotImplementedError("LearnedOptimizer takes DTensor parameters of one device mesh only")
    return F.Sharding(next(iter(groups.values())), tuple(torch.Size(s) for s, _, _ in layout),
                      tuple(sh for _, sh, _ in layout))


def observe_loss(optimizer, loss: Union[float, Tensor]) -> None:
    """``LearnedOptimizer.observe_loss`` on ``optimizer`` or on the optimizer a framework wraps
    it in (accelerate's ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``: anything
    that keeps it as ``.optimizer``, followed down a few levels). Raises ``TypeError`` if none is a
    ``LearnedOptimizer``."""
    opt = optimizer
    for _ in range(5):
        if isinstance(opt, LearnedOptimizer):
            opt.observe_loss(loss)
            return
        opt = getattr(opt, "optimizer", None) or getattr(opt, "_optimizer", None)
        if opt is None:
            break
    raise TypeError(f"no LearnedOptimizer in {type(optimizer).__name__}")
