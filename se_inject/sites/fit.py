"""Whether the tensor a candidate scales fits an SE block: a channel axis, spatial extent, layout."""

from __future__ import annotations

import torch.fx as fx

from ..analysis.axes import channel_axis
from ..analysis.ops import tensor_shape
from ..plan import SkipReason
from .records import Candidate, Policy, skip

__all__ = ["check_tensor"]


def check_tensor(cand: Candidate, node: fx.Node, policy: Policy | None = None) -> bool:
    """Channel axis and layout of the tensor to scale; records a skip and returns False if unfit."""
    shape = tensor_shape(node)
    if shape is None:
        skip(cand, SkipReason.UNKNOWN_CHANNEL_AXIS, "no shape recorded")
        return False
    if len(shape) <= 2:
        skip(cand, SkipReason.NO_SPATIAL_EXTENT, f"shape {list(shape)}")
        return False
    axis = channel_axis(node, cand.unit.flow)
    if axis is None:
        skip(cand, SkipReason.UNKNOWN_CHANNEL_AXIS, f"shape {list(shape)}")
        return False
    if len(shape) == 3 and axis == 2:
        if policy is None or not policy.tokens:
            skip(cand, SkipReason.TOKEN_SEQUENCE, f"shape {list(shape)}, channels last")
            return False
        cand.prefix_tokens = cand.unit.prefix_tokens()
    if axis not in (1, len(shape) - 1):
        skip(cand, SkipReason.UNKNOWN_CHANNEL_AXIS, f"channels on axis {axis} of {list(shape)}")
        return False
    cand.shape, cand.channels = shape, shape[axis]
    cand.axis = 1 if axis == 1 else -1
    return True
