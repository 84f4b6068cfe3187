"""Op tables and predicates: what a node computes (sum, concatenation, convolution, norm,
activation, scaling, layout change, linear op), from its module class, function or method."""

from __future__ import annotations

import operator
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .tracing import mode_dependent_leaves

__all__ = [
    "tensor_shape", "module_of", "is_builtin", "keeps_shape", "op_key", "is_add", "is_cat", "cat_dim", "is_mul",
    "is_div", "is_pool", "is_upsample", "is_activation", "is_norm", "is_conv", "is_spatial_conv",
    "is_unary_elementwise", "trailing_scaling_input", "is_layout", "is_scaling", "is_linear",
    "SHAPE_KEEPING_FUNCTIONS", "SHAPE_KEEPING_MODULES", "SPATIAL_ONLY_FUNCTIONS", "SPATIAL_ONLY_MODULES", "Flow",
]


class Flow(Protocol):
    """What the predicates that follow data edges read of a :class:`~se_inject.analysis.dataflow.DataFlow`.

    A protocol, not the class: the data flow asks these predicates while it is built, so the
    class cannot be imported here without an import cycle.
    """

    root: nn.Module

    def live_inputs(self, node: fx.Node) -> list[fx.Node]: ...


def tensor_shape(node: fx.Node) -> tuple[int, ...] | None:
    """Shape of ``node``'s recorded value, or None when it is not one tensor."""
    value = node.meta.get("val")
    if isinstance(value, torch.Tensor):
        return tuple(int(s) for s in value.shape)
    return None


_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_", "__add__", "__iadd__", "__radd__"}
_CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}
_MUL_FUNCTIONS = {operator.mul, operator.imul, torch.mul}
_MUL_METHODS = {"mul", "mul_", "__mul__", "__rmul__"}
_DIV_FUNCTIONS = {operator.truediv, operator.itruediv, torch.div}
_DIV_METHODS = {"div", "div_", "__truediv__"}
_DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout}
_POOL_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    F.lp_pool1d, F.lp_pool2d,
}
_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d,
)
SHAPE_KEEPING_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm, nn.RMSNorm,
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)
SHAPE_KEEPING_FUNCTIONS = {
    F.batch_norm, F.layer_norm, F.group_norm, F.instance_norm, F.rms_norm,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
    F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.mish, F.elu, F.leaky_relu,
    torch.relu, torch.sigmoid, torch.tanh,
}
_IDENTITY_LIKE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)


#: Within :func:`module_lookups`: per root (by id, the root kept to check it), its submodules by path.
_LOOKUPS: threading.local = threading.local()


@contextmanager
def module_lookups() -> Iterator[None]:
    """Answer :func:`module_of` from one walk of each root's modules, for a phase that changes no
    module tree (the placement rules ask thousands of times: ``get_submodule`` walks the path
    each time, a tenth of a ResNet-152's planning)."""
    outer = getattr(_LOOKUPS, "held", None)
    _LOOKUPS.held = {} if outer is None else outer
    try:
        yield
    finally:
        _LOOKUPS.held = outer


def module_of(root: nn.Module, node: fx.Node) -> nn.Module | None:
    """The submodule a ``call_module`` node calls (None for other nodes)."""
    if node.op != "call_module":
        return None
    held = getattr(_LOOKUPS, "held", None)
    if held is not None:
        entry = held.get(id(root))
        if entry is None or entry[0] is not root:
            entry = held[id(root)] = (root, dict(root.named_modules(remove_duplicate=False)))
        found = entry[1].get(str(node.target))
        if found is not None:
            return found
    try:
        return root.get_submodule(str(node.target))
    except AttributeError:
        return None


def is_pool(root: nn.Module, node: fx.Node) -> bool:
    """A pooling op (max, average, adaptive, LP), as a function or a module."""
    if node.op == "call_function":
        return node.target in _POOL_FUNCTIONS
    return isinstance(module_of(root, node), _POOL_MODULES)


_UPSAMPLE_FUNCTIONS = {
    F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear, F.pixel_shuffle,
    F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
}
_UPSAMPLE_MODULES = (
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.PixelShuffle,
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
)
SPATIAL_ONLY_FUNCTIONS = _POOL_FUNCTIONS | {F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear, F.pad}
SPATIAL_ONLY_MODULES = _POOL_MODULES + (
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReplicationPad2d,
)


def is_upsample(root: nn.Module, node: fx.Node) -> bool:
    """Ops that raise resolution: a branch through one of them fuses scales, it is no residual."""
    if node.op == "call_function":
        return node.target in _UPSAMPLE_FUNCTIONS
    return isinstance(module_of(root, node), _UPSAMPLE_MODULES)


_ACTIVATION_FUNCTIONS = {
    F.relu, F.relu_, F.relu6, F.gelu, F.silu, F.hardswish, F.mish, F.elu, F.leaky_relu, F.selu,
    F.hardtanh, torch.relu, torch.relu_, torch.sigmoid, torch.tanh, F.sigmoid, F.tanh,
}
_ACTIVATION_METHODS = {"relu", "relu_", "sigmoid", "tanh"}


def is_activation(root: nn.Module, node: fx.Node) -> bool:
    """A non-linearity: a module of ``torch.nn.modules.activation`` (not attention) or its function."""
    module = module_of(root, node)
    if module is not None:
        return type(module).__module__ == "torch.nn.modules.activation" and not isinstance(module, nn.MultiheadAttention)
    return (node.op == "call_function" and node.target in _ACTIVATION_FUNCTIONS) or (
        node.op == "call_method" and node.target in _ACTIVATION_METHODS
    )


def is_norm(root: nn.Module, node: fx.Node) -> bool:
    """A batch, group, layer or instance norm, as a module or a function."""
    module = module_of(root, node)
    return isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)) or (
        node.op == "call_function" and node.target in (F.batch_norm, F.group_norm, F.layer_norm, F.instance_norm)
    )


_CONV_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d}


def is_conv(root: nn.Module, node: fx.Node) -> bool:
    """A 1-3-D convolution (any subclass of torch's), as a module or a function."""
    module = module_of(root, node)
    return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) or (
        node.op == "call_function" and node.target in _CONV_FUNCTIONS
    )


def is_spatial_conv(root: nn.Module, node: fx.Node) -> bool:
    """A convolution with a kernel wider than 1 (a 3x3, not a 1x1 projection)."""
    module = module_of(root, node)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return max(module.kernel_size) > 1
    if node.op == "call_function" and node.target in _CONV_FUNCTIONS and len(node.args) > 1:
        weight = node.args[1]
        shape = tensor_shape(weight) if isinstance(weight, fx.Node) else None
        return shape is not None and max(shape[2:], default=1) > 1
    return False


def is_unary_elementwise(flow: Flow, node: fx.Node) -> bool:
    """One data input, same shape out: a norm, an activation, a dropout."""
    live = flow.live_inputs(node)
    if len(live) != 1 or is_add(node) or is_mul(node) or is_cat(node):
        return False
    module = module_of(flow.root, node)
    if module is not None:
        return is_builtin(module) and (keeps_shape(module) or isinstance(module, SHAPE_KEEPING_MODULES))
    return tensor_shape(node) == tensor_shape(live[0]) and tensor_shape(node) is not None


def is_add(node: fx.Node) -> bool:
    """A sum in any of its spellings: ``+``, ``+=``, ``torch.add``, ``Tensor.add``, ``add_``."""
    return (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target in _ADD_METHODS
    )


def is_cat(node: fx.Node) -> bool:
    """A concatenation: ``torch.cat``, ``concat`` or ``concatenate``."""
    return node.op == "call_function" and node.target in _CAT_FUNCTIONS


def cat_dim(node: fx.Node) -> int:
    """The dimension a concatenation joins along (possibly negative)."""
    if len(node.args) > 1:
        return int(node.args[1])  # type: ignore[arg-type]
    return int(node.kwargs.get("dim", node.kwargs.get("axis", 0)))  # type: ignore[arg-type]


def is_mul(node: fx.Node) -> bool:
    """A product in any of its spellings."""
    return (node.op == "call_function" and node.target in _MUL_FUNCTIONS) or (
        node.op == "call_method" and node.target in _MUL_METHODS
    )


def is_div(node: fx.Node) -> bool:
    """A quotient in any of its spellings."""
    return (node.op == "call_function" and node.target in _DIV_FUNCTIONS) or (
        node.op == "call_method" and node.target in _DIV_METHODS
    )


def _mode_dependent_function(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    if node.target in _DROPOUT_FUNCTIONS:
        return True
    name = getattr(node.target, "__name__", "")
    return name in ("stochastic_depth", "drop_path", "drop_block_2d", "drop_block_fast_2d")


def trailing_scaling_input(flow: Flow, node: fx.Node) -> fx.Node | None:
    """If ``node`` is a per-sample or per-channel scaling of one tensor (drop-path, stochastic
    depth, dropout, identity placeholders, layer scale, ``* scale``), the tensor it scales."""
    live = flow.live_inputs(node)
    if len(live) != 1:
        return None
    module = module_of(flow.root, node)
    if module is not None:
        return live[0] if isinstance(module, _IDENTITY_LIKE_MODULES + mode_dependent_leaves()) else None
    if _mode_dependent_function(node):
        return live[0]
    if is_mul(node) or (is_div(node) and node.args and node.args[0] is live[0]):
        return live[0]
    return None


_LAYOUT_METHODS = {
    "permute", "transpose", "swapaxes", "swapdims", "reshape", "view", "flatten", "unflatten",
    "contiguous", "clone", "squeeze", "unsqueeze",
}


def op_key(node: fx.Node) -> str | None:
    """The name of a method or function node's op (``permute``, ``getitem``), else None."""
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_function":
        return getattr(node.target, "__name__", None)
    return None


def is_layout(flow: Flow, node: fx.Node) -> bool:
    """A permute, transpose, reshape or copy of one tensor: same values, another layout."""
    return op_key(node) in _LAYOUT_METHODS and len(flow.live_inputs(node)) == 1 and node.op != "call_module"


def is_scaling(flow: Flow, node: fx.Node) -> bool:
    """A product or quotient of one data tensor with parameters or constants (layer scale,
    ``res_scale``, ``* scale``): per-channel or per-tensor scaling, no layer of its own."""
    if not (is_mul(node) or is_div(node)) or len(flow.live_inputs(node)) != 1:
        return False
    return not is_div(node) or (bool(node.args) and node.args[0] is flow.live_inputs(node)[0])


_LINEAR_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm,
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Flatten, nn.Unflatten,
)
_LINEAR_FUNCTIONS = {
    F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d, F.linear,
    F.batch_norm, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d, F.pad, operator.getitem, operator.sub, operator.neg, torch.sub, torch.neg,
    torch.narrow, torch.split, torch.chunk, torch.flatten, torch.reshape, torch.permute, torch.transpose,
} | _DROPOUT_FUNCTIONS
_LINEAR_METHODS = {"sub", "neg", "narrow", "split", "chunk", "tensor_split", "__getitem__", "sum", "mean"} | _LAYOUT_METHODS


def _linear_module(module: nn.Module) -> bool:
    """Builtin linear layers (and timm's norm-act layers with no activation): foldable."""
    if isinstance(module, mode_dependent_leaves()):
        return True
    if not isinstance(module, _LINEAR_MODULES):
        return False
    return all(_linear_module(child) for child in module.children())


def is_linear(flow: Flow, node: fx.Node) -> bool:
    """An op foldable into one convolution at inference (placement rule 10): convolutions,
    linear layers, BatchNorm, average pooling, padding, slicing, layout changes, sums,
    concatenations and scalings by parameters. Activations, max pooling, per-sample norms,
    softmax and products of two data tensors are not."""
    if is_add(node) or is_cat(node) or is_scaling(flow, node):
        return True
    module = module_of(flow.root, node)
    if module is not None:
        return _linear_module(module)
    if node.op == "call_function":
        return node.target in _LINEAR_FUNCTIONS or _mode_dependent_function(node)
    if node.op == "call_method":
        return str(node.target) in _LINEAR_METHODS
    return False


def is_builtin(module: nn.Module) -> bool:
    """A module class defined by ``torch.nn`` itself (not a subclass from a library)."""
    return type(module).__module__.startswith("torch.nn")


def keeps_shape(module: nn.Module) -> bool:
    """A module whose output has its input's shape: norms, dropouts, identities, activations."""
    if isinstance(module, SHAPE_KEEPING_MODULES):
        return True
    return type(module).__module__ == "torch.nn.modules.activation" and not isinstance(module, nn.MultiheadAttention)
