"""Whether the tensor a candidate scales fits an SE block: a channel axis, spatial extent, layout."""

from __future__ import annotations

import torch.fx as fx

from ..analysis.axes import channel_axis
from ..analysis.ops import is_conv, is_layout, is_unary_elementwise, tensor_shape
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
    batch = cand.unit.batch_axis(node)
    if batch is None or batch == axis:
        what = "grew no single axis other than the channels" if cand.unit.grown_values() is not None else "did not run"
        skip(cand, SkipReason.UNKNOWN_BATCH_AXIS, f"shape {list(shape)}: one more sample {what}")
        return False
    flattened = _flattened_map(cand, shape) if len(shape) == 3 and axis == 2 and batch == 0 else None
    if flattened is not None:
        cand.map_size = flattened
    elif len(shape) == 3 and axis == 2 and not _convolution_map(cand, node):
        if policy is None or not policy.tokens:
            skip(cand, SkipReason.TOKEN_SEQUENCE, f"shape {list(shape)}, channels last")
            return False
        cand.prefix_tokens = cand.unit.prefix_tokens(1 - batch)
    if axis not in (1, len(shape) - 1):
        skip(cand, SkipReason.UNKNOWN_CHANNEL_AXIS, f"channels on axis {axis} of {list(shape)}")
        return False
    cand.shape, cand.channels, cand.batch_axis = shape, shape[axis], batch
    cand.axis = 1 if axis == 1 else -1
    return True


_FLATTENING = frozenset({"reshape", "view", "flatten"})

#: How many layout and pointwise ops may separate a convolution from the tensor it makes.
_MAX_HOPS = 16


def _convolution_map(cand: Candidate, node: fx.Node) -> bool:
    """A 1-D convolution's map ``[B, C, T]`` viewed channels last ``[B, T, C]`` (a conv wrapper
    transposing around ``Conv1d``, a speech front end), through layout ops, norms and
    activations only: a feature map squeezed over T, as its 2-D counterpart is, not a token
    sequence."""
    flow = cand.unit.flow
    for _ in range(_MAX_HOPS):
        if is_conv(cand.unit.module, node):
            return len(tensor_shape(node) or ()) == 3
        live = flow.live_inputs(node)
        if len(live) != 1 or not (is_layout(flow, node) or is_unary_elementwise(flow, node)):
            return False
        node = live[0]
    return False


def _flattened_map(cand: Candidate, shape: tuple[int, ...]) -> tuple[int, int] | None:
    """The tokens ``[B, H*W, C]`` of a residual whose fork is a feature map ``[B, H, W, C]``
    flattened in the same block (timm's Swin MLP): no class token, so squeezing over the tokens
    is squeezing over the map, and the site is a spatial one as on the map itself."""
    fork = cand.unit.flow.idom.get(cand.anchor)
    while fork is not None and _name(fork) == "contiguous":
        fork = fork.args[0] if isinstance(fork.args[0], fx.Node) else None
    if fork is None or _name(fork) not in _FLATTENING or not isinstance(fork.args[0], fx.Node):
        return None
    source = tensor_shape(fork.args[0])
    if source is None or len(source) != 4 or tensor_shape(fork) != shape:
        return None
    axis = channel_axis(fork.args[0], cand.unit.flow)
    fits = axis == 3 and source[0] == shape[0] and source[1] * source[2] == shape[1] and source[3] == shape[2]
    return (source[1], source[2]) if fits else None


def _name(node: fx.Node) -> str:
    target = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return str(target)
