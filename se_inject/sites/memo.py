"""What analysis remembers across blocks, keyed by what their traces depend on: why a block
failed to trace, and blocks whose trace holds nothing to analyse."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..analysis.owners import trace_signature

__all__ = ["NOTHING", "failure_key", "nothing_key"]

#: The memo's entry for a block whose trace holds nothing to analyse.
NOTHING = "nothing to analyse"


#: Blocks with more submodules than this are not memoised as "nothing inside" (the ones
#: that repeat by the hundred, like timm's BatchNormAct2d, are small; big ones rarely repeat).
_MEMO_MAX_MODULES = 16


def nothing_key(module: nn.Module, args: Sequence[Any]) -> tuple[Any, ...] | None:
    """What "nothing inside" is remembered under: what the block's trace can branch on
    (``trace_signature``, widths left out) and the arguments' kinds (dims and dtypes, not
    sizes), so timm's ``BatchNormAct2d`` of every width is traced once; None for blocks too big
    to repeat, or whose signature is not plain data. Only a trace that did not branch on sizes
    is remembered (``Unit.specialised``): its graph is the same at any width."""
    if sum(1 for _ in itertools.islice(module.modules(), _MEMO_MAX_MODULES + 1)) > _MEMO_MAX_MODULES:
        return None
    signature = trace_signature(module)
    return None if signature is None else ("leaf", signature, _kinds(args))


def _kinds(args: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(
        (a.dim(), a.dtype) if isinstance(a, torch.Tensor) else a if isinstance(a, (bool, int, str)) else type(a).__name__
        for a in args
    )


def failure_key(
    module: nn.Module, args: Sequence[Any], memo: dict[Any, Any], failed: bool = False
) -> tuple[Any, ...] | None:
    """What a failure to trace ``module`` is remembered under: its class, the argument kinds and
    what its trace can branch on (``analysis.owners.trace_signature``: a windowed and a global
    attention block of one class take different paths; a block whose attributes are other data
    shares with none). None while no module of its class has failed, so blocks that trace
    never pay for a signature; ``failed`` marks the class."""
    marker = ("failed class", type(module))
    if not failed and marker not in memo:
        return None
    memo[marker] = True
    signature = trace_signature(module)
    return (type(module), tuple(type(a).__name__ for a in args), signature if signature is not None else id(module))
