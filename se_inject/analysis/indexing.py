"""Where an axis goes when a tensor is indexed (``x[:, :k]``, ``x[..., None]``, ``x[0]``) or
reshaped: one rule each, shared by the graph (fx nodes) and by meta forwards of opaque calls
(tensors)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["indexed_axis", "reshaped_axis"]


def indexed_axis(ndim: int, index: Any, axis: int, is_int: Callable[[Any], bool]) -> int | None:
    """Index of ``axis`` of an ``ndim``-dim tensor after indexing it with ``index``: slices keep
    an axis, integers (``is_int``) drop one, ``None`` inserts one; ``None`` when ``axis`` itself
    is indexed away or the index holds anything else (advanced indexing with a tensor)."""
    items = list(index) if isinstance(index, tuple) else [index]
    consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
    in_dim = out_dim = 0
    for item in items:
        if item is Ellipsis:
            span = ndim - consumed
            if in_dim <= axis < in_dim + span:
                return out_dim + axis - in_dim
            in_dim, out_dim = in_dim + span, out_dim + span
        elif item is None:
            out_dim += 1
        elif isinstance(item, slice):
            if in_dim == axis:
                return out_dim
            in_dim, out_dim = in_dim + 1, out_dim + 1
        elif is_int(item):
            if in_dim == axis:
                return None  # the channel axis itself is indexed away
            in_dim += 1
        else:
            return None  # advanced indexing with a tensor: the layout is not known
    return out_dim + axis - in_dim if axis >= in_dim else None


def reshaped_axis(in_shape: tuple[int, ...], shape: tuple[int, ...], axis: int) -> int | None:
    """The channel axis after a reshape: kept when the dims up to it, or from it on, are kept."""
    if len(shape) > axis and in_shape[: axis + 1] == shape[: axis + 1]:
        return axis
    tail = len(in_shape) - axis
    if len(shape) >= tail and in_shape[axis:] == shape[len(shape) - tail:]:
        return len(shape) - tail
    return None
