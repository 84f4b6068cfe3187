"""The Squeeze-and-Excitation block that se-inject inserts.

Hu et al., "Squeeze-and-Excitation Networks", CVPR 2018 (arXiv:1709.01507): pool each channel
to one number, pass the vector through a two-layer bottleneck, and scale the channels by the
resulting gate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.fx
from torch import nn

from .errors import ConfigError

__all__ = ["SEBlock", "SEConfig", "GATES", "POOLS", "hidden_width"]


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

def _avg_pool(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return x.mean(dims)


def _max_pool(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return x.amax(dims)


#: Squeeze name -> reduction over the given dims (module-level functions, so blocks pickle).
POOLS: dict[str, Callable[[torch.Tensor, tuple[int, ...]], torch.Tensor]] = {
    "avg": _avg_pool,
    "max": _max_pool,
}


def hidden_width(channels: int, reduction: float, min_hidden: int = 8, hidden: int | None = None) -> int:
    """Bottleneck width: ``max(channels // reduction, min_hidden)`` capped at ``channels``.

    A fixed ``hidden`` overrides the ratio (still capped at ``channels``).
    """
    width = hidden if hidden is not None else max(int(channels // reduction), min_hidden)
    return max(1, min(width, channels))


@dataclass(frozen=True)
class SEConfig:
    """How every SE block of one injection is built (recorded in plans and checkpoints)."""

    reduction: float = 16
    min_hidden: int = 8
    hidden: int | None = None
    bias: bool = True
    gate: str = "scaled_sigmoid"
    pool: str = "avg"
    identity_init: bool = True

    def __post_init__(self) -> None:
        if not (isinstance(self.reduction, (int, float)) and math.isfinite(self.reduction)) or self.reduction < 1:
            raise ConfigError(f"reduction must be a number >= 1, got {self.reduction!r}")
        if self.min_hidden < 1:
            raise ConfigError(f"min_hidden must be >= 1, got {self.min_hidden!r}")
        if self.hidden is not None and self.hidden < 1:
            raise ConfigError(f"hidden must be >= 1, got {self.hidden!r}")
        if self.gate not in GATES:
            raise ConfigError(f"unknown gate {self.gate!r}; known gates: {', '.join(GATES)}")
        if self.pool not in POOLS:
            raise ConfigError(f"unknown pool {self.pool!r}; known pools: {', '.join(POOLS)}")
        if self.identity_init and not GATES[self.gate][1]:
            raise ConfigError(
                f"gate {self.gate!r} is not 1 at z = 0, so it cannot start as an identity; "
                f"use identity_init=False or one of: "
                f"{', '.join(name for name, (_, ok) in GATES.items() if ok)}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SEConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class SEBlock(nn.Module):
    """Squeeze-and-Excitation over any channel axis, optionally starting as an exact identity.

    Departures from the paper (and from timm's ``SEModule``):

    * the channel axis is a parameter (1 for NCHW / NCL / NCDHW, -1 for channels-last maps), and
      the squeeze pools over every axis except batch and channel;
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
        dd = {"device": device, "dtype": dtype}
        self.channels = channels
        self.hidden = hidden
        self.channel_axis = channel_axis
        self.gate_name = gate
        self.pool_name = pool
        self.fc1 = nn.Linear(channels, hidden, bias=bias, **dd)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, channels, bias=bias, **dd)
        self._gate = GATES[gate][0]
        if identity_init:
            nn.init.zeros_(self.fc2.weight)
            if self.fc2.bias is not None:
                nn.init.zeros_(self.fc2.bias)
        self.register_load_state_dict_pre_hook(_flatten_conv_weights)

    @classmethod
    def from_config(
        cls,
        channels: int,
        hidden: int,
        channel_axis: int,
        config: SEConfig,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> SEBlock:
        return cls(
            channels,
            hidden,
            channel_axis=channel_axis,
            bias=config.bias,
            gate=config.gate,
            pool=config.pool,
            identity_init=config.identity_init,
            device=device,
            dtype=dtype,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeezed = _squeeze(x, self.channel_axis, self.pool_name)
        z = self.fc2(self.act(self.fc1(squeezed)))
        return _excite(x, self._gate(z), self.channel_axis)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, hidden={self.hidden}, channel_axis={self.channel_axis}, "
            f"gate={self.gate_name}, pool={self.pool_name}"
        )


# Wrapped for torch.fx: they depend on ``x.ndim``, which a symbolic tracer cannot branch on,
# so an injected model stays traceable by any fx tracer (feature extractors included).
@torch.fx.wrap
def _squeeze(x: torch.Tensor, channel_axis: int, pool: str) -> torch.Tensor:
    """[B, C]: ``pool`` over every axis except batch and channel."""
    axis = channel_axis % x.ndim
    return POOLS[pool](x, tuple(d for d in range(1, x.ndim) if d != axis))


@torch.fx.wrap
def _excite(x: torch.Tensor, gate: torch.Tensor, channel_axis: int) -> torch.Tensor:
    """``x`` scaled channel-wise by ``gate`` [B, C]."""
    shape = [1] * x.ndim
    shape[0] = -1
    shape[channel_axis % x.ndim] = gate.shape[-1]
    return x * gate.view(shape)


def _flatten_conv_weights(
    module: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str, *args: Any, **kwargs: Any
) -> None:
    # reason: timm's SEModule stores 1x1-conv weights [out, in, 1, 1]; accept them for our Linear layers.
    for layer in ("fc1", "fc2"):
        key = f"{prefix}{layer}.weight"
        weight = state_dict.get(key)
        if weight is not None and weight.ndim > 2 and all(s == 1 for s in weight.shape[2:]):
            state_dict[key] = weight.reshape(weight.shape[0], weight.shape[1])
