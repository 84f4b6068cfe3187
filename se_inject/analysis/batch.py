"""Batch axes: which axis of a node's output holds the samples of the batch, found by running
the graph's shapes once more on inputs with one sample more and seeing which axis grew.

Sizes alone cannot tell a time-first sequence ``[T, B, D]`` from a batch-first one ``[B, T, D]``
when ``T == B``, and the layers in between (attention, recurrent layers, library helpers) are
too many to follow one by one; a second shape propagation follows all of them. The batch is
dim 0 of the example input (the length of a list of samples, the first dim of each tensor of a
dict batch); a block analysed on its own gets its inputs' grown values from its caller.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.fx as fx

from .shapes import RecordedInputs, propagate_shapes, record_module_inputs

__all__ = [
    "grown_args", "grown_values", "grown_call_args", "batch_axis", "once", "grown_record", "grown_part", "grown_under",
]

T = TypeVar("T")

#: What shape propagation writes into ``node.meta``: saved and put back around the second run.
_META_KEYS = ("val", "tensor_meta")


def _grown_tensor(t: torch.Tensor) -> torch.Tensor:
    if not t.is_floating_point() and not t.is_meta and t.numel():
        return torch.cat([t, t[-1:]])  # values that may decide sizes (lengths): the last sample again
    return torch.empty((t.shape[0] + 1, *t.shape[1:]), dtype=t.dtype, device=t.device)


def _grown_arg(value: Any) -> Any:
    """One positional argument with one sample more, or None when it holds no batch to grow."""
    if isinstance(value, torch.Tensor):
        return _grown_tensor(value) if value.dim() else None
    if isinstance(value, list) and value and all(isinstance(v, torch.Tensor) for v in value):
        return [*value, value[-1]]  # a list of samples (torchvision detectors' images)
    if isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) and v.dim() for v in value.values()):
        return {k: _grown_tensor(v) for k, v in value.items()}
    return None


def grown_args(args: Sequence[Any]) -> tuple[Any, ...] | None:
    """The model's example arguments with one sample more (tensors one longer on dim 0), or
    None when no argument holds a batch (nothing could be told from growing it)."""
    grown = [_grown_arg(a) for a in args]
    if all(g is None for g in grown):
        return None
    return tuple(a if g is None else g for a, g in zip(args, grown, strict=True))


def grown_values(
    module: torch.nn.Module, graph: fx.Graph, constants: dict[str, Any] | None, args: Sequence[Any]
) -> dict[fx.Node, Any] | None:
    """Each node's value with ``graph`` run (shapes only) on ``args``, the unit's inputs with one
    sample more; ``node.meta`` keeps the values of the first run. None when the graph does
    not run on them (a batch size fixed in the model's code)."""
    saved = {n: {k: n.meta[k] for k in _META_KEYS if k in n.meta} for n in graph.nodes}
    try:
        propagate_shapes(module, args, graph=graph, constants=constants)
        return {n: n.meta.get("val") for n in graph.nodes}
    except Exception:  # noqa: BLE001 - any failure means the batch axis stays unknown
        return None
    finally:
        for n, meta in saved.items():
            for k in _META_KEYS:
                n.meta.pop(k, None)
            n.meta.update(meta)


def grown_call_args(node: fx.Node, grown: dict[fx.Node, Any] | None) -> tuple[Any, ...] | None:
    """The arguments of the call ``node`` with one sample more, from its graph's grown values."""
    if grown is None:
        return None
    missing: list[fx.Node] = []

    def value(a: fx.Node) -> Any:
        if a not in grown:
            missing.append(a)
        return grown.get(a)

    args = tuple(fx.node.map_arg(tuple(node.args), value))
    return None if missing else args


def batch_axis(before: Any, after: Any) -> int | None:
    """The one axis whose size differs between a node's value and its grown value; None when
    none does (the value holds no batch), several do, or either is not a tensor."""
    if not isinstance(before, torch.Tensor) or not isinstance(after, torch.Tensor) or before.dim() != after.dim():
        return None
    changed = [d for d in range(before.dim()) if before.shape[d] != after.shape[d]]
    return changed[0] if len(changed) == 1 else None


def once(make: Callable[[], T]) -> Callable[[], T]:
    """``make``, called on first need only; later calls return its first result."""
    return functools.cache(make)



def grown_record(
    module: torch.nn.Module,
    grown: Callable[[], Sequence[Any] | None] | None,
    enough: Callable[[RecordedInputs], bool],
) -> Callable[[], RecordedInputs | None]:
    """The inputs of ``module``'s parts in a forward on its grown inputs (``record_module_inputs``
    once more, with one sample more), on first need; None when its grown inputs are not known."""

    def record() -> RecordedInputs | None:
        args = grown() if grown is not None else None
        return None if args is None else record_module_inputs(module, args, enough)

    return record


def grown_part(record: Callable[[], RecordedInputs | None], rel: str) -> Callable[[], tuple[Any, ...] | None]:
    """The grown inputs of the part ``rel`` from a grown recording."""
    return lambda: (record() or {}).get(rel)


def grown_under(record: Callable[[], RecordedInputs | None], rel: str) -> Callable[[], RecordedInputs | None]:
    """The grown recording of the parts under ``rel``, relative to it."""
    return lambda: None if (held := record()) is None else held.under(rel)
