"""Channel axes of opaque module calls: a part that did not trace stays one ``call_module`` node,
so the graph cannot say which layer made its channels. A forward of that module on meta tensors
can: it records the layers that produced channels and follows their outputs through layout ops
and pointwise ops to what the module returns (placement rule 4 applied inside the call)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from .indexing import indexed_axis, reshaped_axis
from .ops import SPATIAL_ONLY_FUNCTIONS
from .shapes import meta_copy

log = logging.getLogger(__name__)

__all__ = ["OpaqueAxes", "opaque_output_axes"]

_CACHE_KEY = "se_inject_opaque_axes"

_CHANNEL_FIRST_FUNCTIONS = {
    F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
    F.batch_norm, F.group_norm, F.instance_norm,
}
_CHANNEL_LAST_FUNCTIONS = {F.linear, F.layer_norm, F.rms_norm}
# Ops that keep the layout but carry no aten ``pointwise`` tag.
_LAYOUT_KEEPING_NAMES = {
    "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
    "contiguous", "clone", "to", "float", "half", "double", "bfloat16", "type", "type_as", "detach",
    "relu6", "hardtanh", "hardswish", "hardsigmoid", "silu", "mish", "gelu", "elu", "leaky_relu",
    "softplus", "local_response_norm",
}
_CAT_NAMES = {"cat", "concat", "concatenate"}
_SPLIT_NAMES = {"chunk", "split", "tensor_split", "split_with_sizes", "unsafe_split", "unsafe_chunk"}


class OpaqueAxes(NamedTuple):
    """What a meta forward of an opaque call says: the channel axis of each tensor it returns
    (same nesting as its output, an int or None per tensor) and whether the module computed
    channels itself (a convolution, linear or norm ran inside)."""

    axes: Any
    made_channels: bool


def opaque_output_axes(node: fx.Node, module: nn.Module, input_axis: Callable[[fx.Node], int | None]) -> OpaqueAxes | None:
    """Channel axes of what the opaque call ``node`` of ``module`` returns, from a forward of
    ``module`` on meta tensors of the shapes recorded for its inputs; ``input_axis`` gives the
    channel axis of each input node (from the graph). ``None`` when the module does not run on
    meta tensors. Cached on the node."""
    if _CACHE_KEY not in node.meta:
        node.meta[_CACHE_KEY] = _run(node, _module_call(module), input_axis)
    return node.meta[_CACHE_KEY]


def opaque_function_axes(node: fx.Node, input_axis: Callable[[fx.Node], int | None]) -> OpaqueAxes | None:
    """As :func:`opaque_output_axes`, for a call of a Python function the tracer kept as one
    call (timm's ``register_notrace_function`` helpers such as Swin's ``window_reverse``)."""
    if _CACHE_KEY not in node.meta:
        function = node.target
        node.meta[_CACHE_KEY] = _run(node, lambda args, kwargs: function(*args, **kwargs), input_axis)  # type: ignore[operator]
    return node.meta[_CACHE_KEY]


def _module_call(module: nn.Module) -> Callable[[tuple[Any, ...], dict[str, Any]], Any]:
    def call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        state = {k: meta_copy(v) for k, v in module.named_parameters()}
        # 0-dim buffers keep their values (a 0-dim tensor mixes with meta tensors as a scalar):
        # sizes the forward reads from them (Encodec's padding, from stride and kernel buffers).
        state.update({k: v if v.dim() == 0 else meta_copy(v) for k, v in module.named_buffers()})
        return torch.func.functional_call(module, state, args, kwargs)

    return call


def _run(node: fx.Node, call: Any, input_axis: Callable[[fx.Node], int | None]) -> OpaqueAxes | None:
    if any("val" not in p.meta for p in node.all_input_nodes):
        return None
    mode = _AxisTracker()

    def meta_input(p: fx.Node) -> Any:
        value = meta_copy(p.meta["val"])
        if isinstance(value, torch.Tensor):
            mode.seed(value, input_axis(p))
        return value

    args = fx.node.map_arg(node.args, meta_input)
    kwargs = fx.node.map_arg(node.kwargs, meta_input)
    try:
        with torch.no_grad(), mode:
            out = call(tuple(args), dict(kwargs))
    except Exception as e:  # noqa: BLE001 - any failure means "the module does not say"
        log.debug("meta forward of opaque %s failed (%s); channel axis unknown", node.target, e)
        return None
    axes = tree_map(lambda v: mode.axis_of(v) if isinstance(v, torch.Tensor) else None, out)
    return OpaqueAxes(axes, mode.made_channels)


def _op_name(func: Any) -> str:
    name = getattr(func, "__name__", "")
    if name.startswith("__") and name.endswith("__"):
        name = name[2:-2]
        if name.startswith("i") and name[1:] in ("add", "sub", "mul", "truediv", "floordiv", "pow", "and", "or"):
            name = name[1:]  # in-place dunders: __iadd__ -> add
        if name.startswith("r") and name[1:] in ("add", "sub", "mul", "truediv", "floordiv", "pow"):
            name = name[1:]  # reflected dunders: __radd__ -> add
        name = {"truediv": "div", "floordiv": "floor_divide"}.get(name, name)
    return name[:-1] if name.endswith("_") and not name.endswith("__") else name


@functools.cache
def _is_pointwise(name: str) -> bool:
    """Whether aten tags the op of this name as pointwise (``add``, ``mul``, ``relu``, ``sigmoid``)."""
    if not name.isidentifier():
        return False
    try:
        packet = getattr(torch.ops.aten, name)
    except (AttributeError, RuntimeError):
        return False
    overloads = [getattr(packet, o) for o in ("Tensor", "default") if o in packet.overloads()]
    return bool(overloads) and torch.Tag.pointwise in overloads[0].tags


class _AxisTracker(TorchFunctionMode):
    """Records the channel axis of every tensor a channel layer returns (and of the inputs, as
    seeded), and of every tensor derived from one by a permute, a transpose, a reshape that
    keeps the channel axis whole, a spatial-only op, a concatenation or an op that keeps the
    layout (pointwise ops, dropouts, activations). Anything else is not followed, so its
    output's axis stays unknown: sizes alone never decide."""

    def __init__(self) -> None:
        super().__init__()
        self._axes: dict[int, tuple[torch.Tensor, int]] = {}  # id -> (tensor kept alive, axis)
        self.made_channels = False

    def seed(self, t: torch.Tensor, axis: int | None) -> None:
        """Give an input tensor the channel axis the graph knows for it."""
        if axis is not None:
            self._axes[id(t)] = (t, axis)

    def axis_of(self, t: torch.Tensor) -> int | None:
        entry = self._axes.get(id(t))
        return entry[1] if entry is not None and entry[0] is t else None

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor) and out.ndim > 0:
            axis = self._derive(func, args, kwargs, out)
            if axis is not None:
                self._axes[id(out)] = (out, axis)
        elif isinstance(out, (tuple, list)) and _op_name(func) in _SPLIT_NAMES and args and isinstance(args[0], torch.Tensor):
            axis = self.axis_of(args[0])  # pieces keep the axes of what was split
            for piece in out if axis is not None else ():
                if isinstance(piece, torch.Tensor) and piece.ndim == args[0].ndim:
                    self._axes[id(piece)] = (piece, axis)
        return out

    def _derive(self, func: Any, args: Any, kwargs: dict[str, Any], out: torch.Tensor) -> int | None:
        if func in _CHANNEL_FIRST_FUNCTIONS:
            self.made_channels = True
            return 1
        if func in _CHANNEL_LAST_FUNCTIONS:
            self.made_channels = True
            return out.ndim - 1
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        axis = self.axis_of(first) if first is not None else None
        name = _op_name(func)
        if name == "permute" and axis is not None:
            rest = args[1:]
            dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
            dims = kwargs.get("dims", dims)
            return [int(d) % out.ndim for d in dims].index(axis) if len(dims) == out.ndim else None
        if name in ("transpose", "swapaxes", "swapdims") and axis is not None and len(args) >= 3:
            d0, d1 = int(args[1]) % out.ndim, int(args[2]) % out.ndim
            return d1 if axis == d0 else d0 if axis == d1 else axis
        if name in ("reshape", "view", "flatten", "unflatten") and axis is not None and first is not None:
            return reshaped_axis(tuple(first.shape), tuple(out.shape), axis)
        if name == "narrow" and axis is not None:
            return axis
        if name == "glu" and axis is not None and first is not None and out.ndim == first.ndim:
            return axis  # a gated linear unit halves its dim; every axis stays where it was
        if name == "getitem" and axis is not None and first is not None and len(args) > 1:
            return indexed_axis(first.ndim, args[1], axis, lambda i: isinstance(i, int) and not isinstance(i, bool))
        if func in SPATIAL_ONLY_FUNCTIONS:
            return axis if first is not None and out.ndim == first.ndim else None
        if name in _CAT_NAMES:
            tensors = args[0] if args and isinstance(args[0], (list, tuple)) else []
            axes = {self.axis_of(t) for t in tensors if isinstance(t, torch.Tensor)}
            return axes.pop() if len(axes) == 1 and all(t.ndim == out.ndim for t in tensors) else None
        if name in _LAYOUT_KEEPING_NAMES or _is_pointwise(name):
            tensors, _ = tree_flatten((args, kwargs))
            same = {self.axis_of(t) for t in tensors if isinstance(t, torch.Tensor) and t.shape == out.shape}
            known = same - {None}
            return known.pop() if len(known) == 1 else None
        return None
