"""Channel axes: which axis of a node's output holds the channels, from the layer that made them
and the permutes, reshapes and slices since; channel slices and chunks of a tensor."""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .dataflow import DataFlow
from .indexing import indexed_axis, reshaped_axis
from .opaque import opaque_function_axes, opaque_output_axes
from .ops import (
    SPATIAL_ONLY_FUNCTIONS,
    SPATIAL_ONLY_MODULES,
    is_builtin,
    is_cat,
    module_of,
    op_key,
    tensor_shape,
)

__all__ = ["channel_axis", "channel_slice_of"]


_CHANNEL_FIRST_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LocalResponseNorm,
)
_CHANNEL_LAST_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.LayerNorm, nn.RMSNorm)
_CHANNEL_FIRST_FUNCTIONS = {
    F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
    F.batch_norm, F.group_norm, F.instance_norm,
}
_CHANNEL_LAST_FUNCTIONS = {F.linear, F.layer_norm, F.rms_norm}
#: Gated linear units: one half of ``dim`` times a gate of the other, so ``dim`` halves and every
#: axis stays where it was (a convolution's 2C channels become C).
_HALVING_MODULES: tuple[type[nn.Module], ...] = (nn.GLU,)
_HALVING_FUNCTIONS = {F.glu, torch._C._nn.glu}


def channel_axis(node: fx.Node, flow: DataFlow, _memo: dict[fx.Node, int | None] | None = None, _depth: int = 0) -> int | None:
    """Non-negative index of the channel axis of ``node``'s output, inferred from the layer that
    produced the channels and the permutes since; ``None`` when the graph does not tell."""
    memo = {} if _memo is None else _memo
    if node in memo:
        return memo[node]
    memo[node] = None  # guards against cycles through bad metadata
    result = _channel_axis(node, flow, memo, _depth)
    memo[node] = result
    return result


def _is_library_function(target: object) -> bool:
    """A plain Python function of a model library (not torch's, not an operator)."""
    module = getattr(target, "__module__", None) or ""
    return isinstance(target, types.FunctionType) and not module.startswith(("torch", "operator", "builtins", "_operator"))


def _channel_axis(node: fx.Node, flow: DataFlow, memo: dict[fx.Node, int | None], depth: int) -> int | None:
    shape = tensor_shape(node)
    if shape is None or depth > 200:
        return None
    ndim = len(shape)
    module = module_of(flow.root, node)
    if module is not None and is_builtin(module):
        if isinstance(module, _CHANNEL_FIRST_MODULES):
            return 1
        if isinstance(module, _CHANNEL_LAST_MODULES):
            return ndim - 1
    if module is not None and (not is_builtin(module) or isinstance(module, nn.Sequential)):
        # A part kept as one call (it did not trace, or is a leaf): its own layers say. When
        # it made channels and they do not say where they went, no size may decide.
        said = opaque_output_axes(node, module, lambda p: channel_axis(p, flow, memo, depth + 1))
        if said is not None and (isinstance(said.axes, int) or said.made_channels):
            return said.axes if isinstance(said.axes, int) else None
    if node.op == "call_function" and _is_library_function(node.target):
        # A helper the tracer kept as one call (timm's notrace functions): run it on meta
        # tensors and follow the channel axis through its ops, as for an opaque module.
        said = opaque_function_axes(node, lambda p: channel_axis(p, flow, memo, depth + 1))
        if said is not None and isinstance(said.axes, int):
            return said.axes
    if node.op == "call_function" and node.target in _CHANNEL_FIRST_FUNCTIONS:
        return 1
    if node.op == "call_function" and node.target in _CHANNEL_LAST_FUNCTIONS:
        return ndim - 1

    inputs = [p for p in node.all_input_nodes if flow.data.get(p)]
    first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    spatial_only = (node.op == "call_function" and node.target in SPATIAL_ONLY_FUNCTIONS) or isinstance(
        module, SPATIAL_ONLY_MODULES
    )
    if spatial_only and first is not None:
        return channel_axis(first, flow, memo, depth + 1)  # pooling, resizing, padding keep channels
    halving = (node.op == "call_function" and node.target in _HALVING_FUNCTIONS) or isinstance(module, _HALVING_MODULES)
    if halving and first is not None and len(tensor_shape(first) or ()) == ndim:
        return channel_axis(first, flow, memo, depth + 1)

    def axis_of(p: fx.Node) -> int | None:
        return channel_axis(p, flow, memo, depth + 1)

    target = node.target if node.op == "call_method" else getattr(node.target, "__name__", None)
    if target == "permute" and first is not None:
        dims = node.args[1:] if node.op == "call_method" else node.args[1]
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = dims[0]
        a = axis_of(first)
        if a is None:
            return None
        dims = [int(d) % ndim for d in dims]  # type: ignore[call-overload]
        return dims.index(a) if a in dims else None
    if target in ("transpose", "swapaxes", "swapdims") and first is not None and len(node.args) >= 3:
        a = axis_of(first)
        if a is None:
            return None
        d0, d1 = (int(node.args[1]) % ndim, int(node.args[2]) % ndim)  # type: ignore[call-overload]
        return d1 if a == d0 else d0 if a == d1 else a
    if target in ("getitem", "narrow") and first is not None and isinstance(first.meta.get("val"), torch.Tensor):
        return _sliced_axis(node, first, axis_of(first))
    if target == "getitem" and first is not None and not isinstance(first.meta.get("val"), torch.Tensor):
        # An element of a tuple (chunk, split, a module returning several outputs).
        axis = _opaque_item_axis(node, first, flow)
        if axis is not None:
            return axis
        for p in flow.live_inputs(first) or [p for p in first.all_input_nodes if flow.data.get(p)]:
            p_shape = tensor_shape(p)
            if p_shape is not None and len(p_shape) == ndim:
                return axis_of(p)
        return None
    if target in ("flatten", "reshape", "view", "unflatten") and first is not None:
        in_shape = tensor_shape(first)
        a = axis_of(first)
        if a is None or in_shape is None:
            return None
        return reshaped_axis(in_shape, tuple(shape), a)
    if is_cat(node):
        for p in inputs:
            a = axis_of(p)
            if a is not None:
                return a
        return None
    # Shape-preserving ops (activations, norms traced as functions, adds, products, unknown
    # leaves that keep the shape): the axis of an input of the same shape.
    for p in inputs:
        if tensor_shape(p) == shape:
            a = axis_of(p)
            if a is not None:
                return a
    return None


def _opaque_item_axis(node: fx.Node, first: fx.Node, flow: DataFlow) -> int | None:
    """The channel axis of ``first[i]`` when ``first`` is an opaque module call returning
    several tensors, from that module's own layers."""
    module = module_of(flow.root, first)
    if module is None or (is_builtin(module) and not isinstance(module, nn.Sequential)) or len(node.args) < 2:
        return None
    said = opaque_output_axes(first, module, lambda p: channel_axis(p, flow))
    try:
        axis = said.axes[node.args[1]]  # type: ignore[union-attr,index]
    except (AttributeError, TypeError, KeyError, IndexError):
        return None
    return axis if isinstance(axis, int) else None


def _sliced_axis(node: fx.Node, first: fx.Node, axis: int | None) -> int | None:
    """The channel axis after indexing ``first`` (``x[:, :k]``, ``x[..., None]``, ``narrow``):
    slices keep an axis, integers drop one, ``None`` inserts one (placement rule 4)."""
    in_shape = tensor_shape(first)
    if axis is None or in_shape is None:
        return None
    if op_key(node) == "narrow":
        return axis
    index = node.args[1] if len(node.args) > 1 else None
    return indexed_axis(len(in_shape), index, axis, _is_int_index)


def _is_int_index(item: Any) -> bool:
    return isinstance(item, int) or (isinstance(item, fx.Node) and not isinstance(item.meta.get("val"), torch.Tensor))


def channel_slice_of(flow: DataFlow, node: fx.Node) -> fx.Node | None:
    """The tensor that ``node`` is a channel slice or chunk of (``x[:, :k]``, ``narrow``,
    ``split``/``chunk`` items); ``None`` for anything else. Slices along other axes are no
    channel slices."""
    live = flow.live_inputs(node)
    if len(live) != 1:
        return None
    key = op_key(node)
    first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if first is None:
        return None
    if key == "getitem" and not isinstance(first.meta.get("val"), torch.Tensor):
        # An item of split/chunk: the tuple's own input is what was sliced.
        if op_key(first) in ("split", "chunk", "tensor_split", "split_with_sizes"):
            source = flow.live_inputs(first)
            if len(source) == 1 and _split_dim(first) == channel_axis(source[0], flow):
                return source[0]
        return None
    if key == "getitem" and first is live[0]:
        axis, shape, in_shape = channel_axis(first, flow), tensor_shape(node), tensor_shape(first)
        if axis is None or shape is None or in_shape is None or len(shape) != len(in_shape):
            return None
        changed = [d for d in range(len(shape)) if shape[d] != in_shape[d]]
        return first if changed == [axis] else None
    if key == "narrow" and first is live[0]:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        in_shape = tensor_shape(first)
        if isinstance(dim, int) and in_shape is not None and dim % len(in_shape) == channel_axis(first, flow):
            return first
    return None


def _split_dim(node: fx.Node) -> int | None:
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    source = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    shape = tensor_shape(source) if source is not None else None
    return dim % len(shape) if isinstance(dim, int) and shape else None
