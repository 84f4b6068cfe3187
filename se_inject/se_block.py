"""The Squeeze-and-Excitation block that se-inject inserts.

Hu et al., "Squeeze-and-Excitation Networks", CVPR 2018 (arXiv:1709.01507): pool each channel
to one number, pass the vector through a two-layer bottleneck, and scale the channels by the
resulting gate.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx
from torch import nn

from .errors import ConfigError, GateMismatchError

__all__ = [
    "SEBlock",
    "SEHook",
    "GATES",
    "POOLS",
    "PLACEMENTS",
    "TRUNK_PLACEMENTS",
    "hidden_width",
    "check_se_weights",
]


def _scaled_sigmoid(z: torch.Tensor) -> torch.Tensor:
    # 2 * sigmoid(0) == 1.0 exactly in every float dtype, so a zeroed last layer is an identity.
    return 2.0 * torch.sigmoid(z)


def _one_plus_tanh(z: torch.Tensor) -> torch.Tensor:
    return 1.0 + torch.tanh(z)


#: Gate name -> (function, whether z = 0 gives exactly 1.0).
GATES: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], bool]] = {
    "scaled_sigmoid": (_scaled_sigmoid, True),
    "sigmoid": (torch.sigmoid, False),
    "one_plus_tanh": (_one_plus_tanh, True),
    "tanh": (torch.tanh, False),
}

def _avg_pool(x: torch.Tensor, dims: list[int]) -> torch.Tensor:
    return x.mean(dims)


def _max_pool(x: torch.Tensor, dims: list[int]) -> torch.Tensor:
    return x.amax(dims)


#: Squeeze name -> reduction over the given dims (module-level functions, so blocks pickle).
POOLS: dict[str, Callable[[torch.Tensor, list[int]], torch.Tensor]] = {
    "avg": _avg_pool,
    "max": _max_pool,
}


#: Where on a residual branch the block goes (docs/se-paper.md, "Where the block goes").
PLACEMENTS: dict[str, str] = {
    "standard": "end of the residual branch, before the sum",
    "pre": "start of the residual branch, after the fork, before its first layer",
    "inner": "after the branch's last spatial convolution (the paper's SE 3x3)",
}
#: The paper's variants that scale the trunk: refused.
TRUNK_PLACEMENTS: dict[str, str] = {
    "post": "SE-POST puts the gate after the sum, on the trunk",
    "identity": "SE-Identity puts the gate on the shortcut",
}


def hidden_width(channels: int, reduction: float, min_hidden: int = 8, hidden: int | None = None) -> int:
    """Bottleneck width: ``max(channels // reduction, min_hidden)`` capped at ``channels``.

    A fixed ``hidden`` overrides the ratio (still capped at ``channels``).
    """
    width = hidden if hidden is not None else max(int(channels // reduction), min_hidden)
    return max(1, min(width, channels))


class SEBlock(nn.Module):
    """Squeeze-and-Excitation over any channel axis, optionally starting as an exact identity.

    Departures from the paper (and from timm's ``SEModule``):

    * the channel axis is a parameter (1 for NCHW / NCL / NCDHW, -1 for channels-last maps), and
      so is the batch axis (0, or 1 for time-first sequences ``[T, B, D]``): the squeeze pools
      over every axis except those two, so each sample is squeezed on its own;
    * the excitation layers are ``nn.Linear`` on the pooled vector (timm uses 1x1 convolutions);
      timm-shaped ``[out, in, 1, 1]`` weights still load, so ``seresnet*`` SE weights can be reused;
    * with ``identity_init`` the gate is ``2 * sigmoid(z)`` and the last layer starts at zero, so
      the block returns its input bit for bit until training moves it.
    """

    def __init__(
        self,
        channels: int,
        hidden: int,
        *,
        channel_axis: int = 1,
        bias: bool = True,
        gate: str = "scaled_sigmoid",
        pool: str = "avg",
        identity_init: bool = True,
        prefix_tokens: int = 0,
        batch_axis: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if gate not in GATES:
            raise ConfigError(f"unknown gate {gate!r}; known gates: {', '.join(GATES)}")
        if pool not in POOLS:
            raise ConfigError(f"unknown pool {pool!r}; known pools: {', '.join(POOLS)}")
        if identity_init and not GATES[gate][1]:
            raise ConfigError(f"gate {gate!r} is not 1 at z = 0, so it cannot start as an identity")
        if channels < 1 or hidden < 1:
            raise ConfigError(f"channels and hidden must be >= 1, got {channels} and {hidden}")
        if batch_axis < 0 or (channel_axis >= 0 and batch_axis == channel_axis):
            raise ConfigError(f"batch_axis must be a non-negative axis other than the channel axis, got {batch_axis}")
        dd = {"device": device, "dtype": dtype}
        self.channels = channels
        self.hidden = hidden
        self.channel_axis = channel_axis
        self.gate_name = gate
        self.pool_name = pool
        self.prefix_tokens = prefix_tokens
        self.batch_axis = batch_axis
        self.fc1 = nn.Linear(channels, hidden, bias=bias, **dd)
        self.act = nn.ReLU(inplace=True)
        if identity_init:
            # Zeroed anyway: built on the meta device (no random init), then given zeros.
            self.fc2 = nn.Linear(hidden, channels, bias=bias, device="meta", dtype=dtype)
            self.fc2.weight = nn.Parameter(torch.zeros(channels, hidden, **dd))
            if bias:
                self.fc2.bias = nn.Parameter(torch.zeros(channels, **dd))
        else:
            self.fc2 = nn.Linear(hidden, channels, bias=bias, **dd)
        self.register_load_state_dict_pre_hook(_flatten_conv_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # reason: TorchScript drops the branch below unseen (``is_scripting`` is a compile-time
        # constant there), so the Python-only fast path never has to compile.
        if not torch.jit.is_scripting():
            if not self.prefix_tokens and self._layers_are_stock():
                fc1, fc2 = self.fc1, self.fc2
                return _se(
                    x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, self.channel_axis, self.pool_name, self.gate_name,
                    self.batch_axis,
                )
        # Layers replaced or hooked (adapters, feature hooks), a token sequence, or TorchScript:
        # call them as modules.
        squeezed = _squeeze(x, self.channel_axis, self.pool_name, self.prefix_tokens, self.batch_axis)
        z = self.fc2(self.act(self.fc1(squeezed)))
        return _excite(x, _gate(z, self.gate_name), self.channel_axis, self.batch_axis)

    def _layers_are_stock(self) -> bool:
        """fc1, act and fc2 are the stock layers, unhooked, so their functional form is the same call."""
        return (
            _stock(self.fc1, nn.Linear) and _stock(self.fc2, nn.Linear) and _stock(self.act, nn.ReLU)
        ) and not _global_hooks()

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, hidden={self.hidden}, channel_axis={self.channel_axis}, "
            f"gate={self.gate_name}, pool={self.pool_name}"
            + (f", prefix_tokens={self.prefix_tokens}" if self.prefix_tokens else "")
            + (f", batch_axis={self.batch_axis}" if self.batch_axis else "")
        )


def _pooled_dims(ndim: int, axis: int, batch: int = 0) -> list[int]:
    """Every axis except ``batch`` and ``axis`` (both non-negative)."""
    dims: list[int] = []
    for d in range(ndim):
        if d != axis and d != batch:
            dims.append(d)
    return dims


def _gate_view(x: torch.Tensor, gate: torch.Tensor, axis: int, batch: int) -> torch.Tensor:
    """``gate`` [B, C] shaped to broadcast over ``x``: B on ``batch``, C on ``axis``."""
    shape = [1] * x.dim()
    shape[batch], shape[axis] = gate.shape[0], gate.shape[1]
    # reason: a view keeps the order of gate's axes; channels before batch need them swapped.
    return (gate if batch < axis else gate.t()).reshape(shape)


def _pool(x: torch.Tensor, dims: list[int], pool: str) -> torch.Tensor:
    # reason: TorchScript cannot call through the POOLS dictionary; this mirrors it name for name.
    if pool == "avg":
        return _avg_pool(x, dims)
    if pool == "max":
        return _max_pool(x, dims)
    raise ConfigError("unknown pool " + pool)


def _gate(z: torch.Tensor, gate: str) -> torch.Tensor:
    # reason: TorchScript cannot call through the GATES dictionary; this mirrors it name for name.
    if gate == "scaled_sigmoid":
        return _scaled_sigmoid(z)
    if gate == "sigmoid":
        return torch.sigmoid(z)
    if gate == "one_plus_tanh":
        return _one_plus_tanh(z)
    if gate == "tanh":
        return torch.tanh(z)
    raise ConfigError("unknown gate " + gate)


# Wrapped for torch.fx: they depend on ``x.ndim``, which a symbolic tracer cannot branch on,
# so an injected model stays traceable by any fx tracer (feature extractors included).
@torch.fx.wrap
def _squeeze(
    x: torch.Tensor, channel_axis: int, pool: str, prefix_tokens: int = 0, batch_axis: int = 0
) -> torch.Tensor:
    """[B, C]: ``pool`` over every axis except batch and channel, leaving out the first
    ``prefix_tokens`` positions of the token axis (class and distillation tokens of a token
    sequence: axis 1 of ``[B, N, C]``, axis 0 of ``[N, B, C]``)."""
    axis = channel_axis % x.dim()
    dims = _pooled_dims(x.dim(), axis, batch_axis)
    if prefix_tokens:
        x = x.narrow(dims[0], prefix_tokens, x.shape[dims[0]] - prefix_tokens)
    pooled = _pool(x, dims, pool)
    return pooled if batch_axis < axis else pooled.t()


@torch.fx.wrap
def _excite(x: torch.Tensor, gate: torch.Tensor, channel_axis: int, batch_axis: int = 0) -> torch.Tensor:
    """``x`` scaled channel-wise by ``gate`` [B, C]."""
    return x * _gate_view(x, gate, channel_axis % x.dim(), batch_axis)


def _stock(module: nn.Module, cls: type[nn.Module]) -> bool:
    """``module`` is exactly ``cls`` with no hooks, so calling its functional form is the same call."""
    d = module.__dict__
    return type(module) is cls and not (
        d["_forward_hooks"] or d["_forward_pre_hooks"] or d["_backward_hooks"] or d["_backward_pre_hooks"]
    )


def _global_hooks() -> bool:
    # reason: module-wide hooks (torch.utils.module_tracker, profilers) must see fc1 and fc2 too.
    m = nn.modules.module
    return bool(
        getattr(m, "_global_forward_hooks", None)
        or getattr(m, "_global_forward_pre_hooks", None)
        or getattr(m, "_global_backward_hooks", None)
        or getattr(m, "_global_backward_pre_hooks", None)
    )


def _graph_capture() -> bool:
    """A tracer or compiler records this call: TorchScript tracing (also the legacy ONNX exporter),
    torch.compile, torch.export and the dynamo ONNX exporter."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


@torch.fx.wrap
def _se(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    channel_axis: int,
    pool: str,
    gate: str,
    batch_axis: int = 0,
) -> torch.Tensor:
    """The whole block as functional calls: the same arithmetic as the module path, fewer steps.

    Eager mode pays per operator and per module call, so this path skips the three submodule
    calls and the shape bookkeeping (the SE block's cost in eager inference is mostly that).
    In eager mode the average is a sum times ``1 / n``, whatever the grad mode: ``mean``'s
    backward divides the expanded [B, C] gradient and so writes a full-size tensor, a sum's
    backward is only an expanded view, which saves one pass over the feature map per block in
    training. A tracer or compiler gets ``mean`` itself: one graph in every grad mode, with no
    scale computed from traced shapes (TorchScript tracing records shape reads as graph values;
    the legacy ONNX exporter cannot take them as constants), and compilers fuse it anyway.
    """
    ndim = x.dim()
    axis = channel_axis % ndim
    dims = _pooled_dims(ndim, axis, batch_axis)
    if pool == "avg" and not _graph_capture():
        n = 1
        for d in dims:
            n *= x.shape[d]
        # reason: dtype=x.dtype keeps autocast from promoting the sum to float32 (one cast less).
        s = x.sum(dims, dtype=x.dtype) * (1.0 / n) if n > 0 else x.mean(dims)
    else:
        s = _pool(x, dims, pool)
    if batch_axis > axis:
        s = s.t()
    z = torch.nn.functional.linear(torch.relu_(torch.nn.functional.linear(s, w1, b1)), w2, b2)
    g = _gate(z, gate)
    if axis == 1 and batch_axis == 0:
        return x * g.view((g.shape[0], g.shape[1]) + (1,) * (ndim - 2))
    return x * _gate_view(x, g, axis, batch_axis)


#: The gate of timm's ``SEModule``, whose 1x1-conv weights [out, in, 1, 1] SEBlock accepts.
_TIMM_GATE = "sigmoid"


def _timm_shaped(weight: Any) -> bool:
    return isinstance(weight, torch.Tensor) and weight.ndim > 2 and all(s == 1 for s in weight.shape[2:])


def _refuse_foreign_gate(block: SEBlock, state_dict: Mapping[str, Any], prefix: str) -> None:
    if block.gate_name == _TIMM_GATE:
        return
    for layer in ("fc1", "fc2"):
        if _timm_shaped(state_dict.get(f"{prefix}{layer}.weight")):
            raise GateMismatchError(
                f"{prefix}{layer}.weight is shaped [out, in, 1, 1], the layout of timm's SEModule, which gates "
                f"with a plain sigmoid; {prefix.rstrip('.') or 'this block'} gates with {block.gate_name!r}, so "
                f"these weights would load and compute a different function. Inject with "
                f"identity_init=False (gate {_TIMM_GATE!r}) to reuse timm SE weights."
            )


def check_se_weights(
    module: nn.Module, state_dict: Mapping[str, Any], prefix: str = "", *args: Any, **kwargs: Any
) -> None:
    """Refuse, before anything is copied, SE weights that every SEBlock under ``module`` would
    misread: timm-shaped weights (made for a sigmoid gate) into a block with another gate.

    A ``load_state_dict`` pre-hook for the root of an injected model (``apply_plan`` registers
    it), so a refused checkpoint leaves every weight as it was; each SEBlock checks itself too.

    Raises:
        GateMismatchError: timm-shaped SE weights meet a gate other than ``sigmoid``.
    """
    for name, block in module.named_modules(prefix=prefix.rstrip(".")):
        if isinstance(block, SEBlock):
            _refuse_foreign_gate(block, state_dict, f"{name}." if name else "")


def _flatten_conv_weights(
    module: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str, *args: Any, **kwargs: Any
) -> None:
    # reason: timm's SEModule stores 1x1-conv weights [out, in, 1, 1]; accept them for our Linear
    # layers when the gate is the one they were trained with, refuse them otherwise.
    _refuse_foreign_gate(module, state_dict, prefix)
    for layer in ("fc1", "fc2"):
        key = f"{prefix}{layer}.weight"
        weight = state_dict.get(key)
        if _timm_shaped(weight):
            state_dict[key] = weight.reshape(weight.shape[0], weight.shape[1])


#: What ``torch.jit.script`` is told when it asks a hook of ours for its function name.
NOT_SCRIPTABLE = (
    "se-inject: this model has SE blocks attached by hooks, which TorchScript cannot compile; "
    "use torch.export or torch.jit.trace (both keep them)"
)


class SEHook:
    """Forward hook scaling its module's output with one SE block (``inject.attach`` registers
    it; the analysis reads it, so an attached block counts as existing attention)."""

    #: part of the injected model: analysis, which silences the user's hooks, keeps it
    se_inject_own = True

    @property
    def __name__(self) -> str:
        # reason: TorchScript compiles hooks by function name; an object has none, and its
        # error would not say why. An AttributeError keeps ``getattr(hook, "__name__", d)`` safe.
        raise AttributeError(NOT_SCRIPTABLE)

    def __init__(self, se: SEBlock) -> None:
        self.se = se

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        return self.se(output)

    def __repr__(self) -> str:
        return f"SEHook({self.se.channels} channels)"
