"""Output shapes of costly layers, without running them: analysis reads shapes only.

On meta and fake tensors, torch runs several ops as Python decompositions: a meta ``nn.LSTM``
unrolls every time step (seconds for timm's Sequencer), a fake ``F.linear`` or ``F.batch_norm``
costs 1.5-2.5 ms a call (a convolution 0.4 ms, a matmul 2 ms), a meta bilinear resize 12 ms
and a meta ``a + b`` 0.1 ms. The result's shape, dtype and layout follow from the arguments,
so these are computed here instead (a bilinear resize as the nearest one, whose size and
layout rule is the same); anything outside the plain cases handled (other dtypes, packed
sequences, given hidden states, layouts other than contiguous, shapes that would raise)
returns ``None`` and the op runs as before, with its own checks and errors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.overrides import TorchFunctionMode

__all__ = ["recurrent_output", "ShapeShortcuts"]


def recurrent_output(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """What ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` return for one input tensor and no initial
    state, as empty tensors on the input's device, laid out as torch's own kernels lay them out
    (a ``batch_first`` output is a transposed time-major buffer); None for any other call."""
    if type(module) not in (nn.LSTM, nn.GRU, nn.RNN) or kwargs or len(args) != 1:
        return None
    x = args[0]
    if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3) or x.shape[-1] != module.input_size:
        return None
    params = [p for p in module._flat_weights if p is not None]
    if any(p.dtype != x.dtype for p in params):
        return None
    directions = 2 if module.bidirectional else 1
    out_size = module.proj_size if getattr(module, "proj_size", 0) > 0 else module.hidden_size
    layers = directions * module.num_layers
    dd = {"dtype": x.dtype, "device": x.device}
    if x.dim() == 2:  # unbatched: (L, H_in)
        output = torch.empty(x.shape[0], directions * out_size, **dd)
        h = torch.empty(layers, out_size, **dd)
        c = torch.empty(layers, module.hidden_size, **dd)
    else:
        steps, batch = (x.shape[1], x.shape[0]) if module.batch_first else (x.shape[0], x.shape[1])
        output = torch.empty(steps, batch, directions * out_size, **dd)
        if module.batch_first:
            output = output.transpose(0, 1)
        h = torch.empty(layers, batch, out_size, **dd)
        c = torch.empty(layers, batch, module.hidden_size, **dd)
    return (output, (h, c)) if isinstance(module, nn.LSTM) else (output, h)


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str, default: Any = None) -> Any:
    return args[index] if len(args) > index else kwargs.get(name, default)


def _channel_vector(value: Any, channels: int, dtype: torch.dtype) -> bool:
    return value is None or (isinstance(value, torch.Tensor) and value.shape == (channels,) and value.dtype == dtype)


def _linear(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    x, weight, bias = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
    if not (isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor)) or x.dim() < 2 or weight.dim() != 2:
        return None
    if x.shape[-1] != weight.shape[1] or x.dtype != weight.dtype or not _channel_vector(bias, weight.shape[0], x.dtype):
        return None
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _batch_norm(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    # F.batch_norm's own checks first (eps; in training more than one value per channel), then
    # torch's: running statistics are needed in eval mode, every vector is one per channel.
    x, training = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 5, "training", False)
    eps = _arg(args, kwargs, 7, "eps", 1e-5)
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or type(training) is not bool or not isinstance(eps, (int, float)):
        return None
    if training and (eps <= 0 or math.prod((x.shape[0], *x.shape[2:])) == 1) or eps < 0:
        return None
    channels = x.shape[1]
    vectors = [_arg(args, kwargs, i, n) for i, n in enumerate(("running_mean", "running_var", "weight", "bias"), 1)]
    if not training and (vectors[0] is None or vectors[1] is None):
        return None
    if not all(_channel_vector(v, channels, x.dtype) for v in vectors):
        return None
    return torch.empty_like(x)


def _layer_norm(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    x, shape = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "normalized_shape")
    if not isinstance(x, torch.Tensor) or not isinstance(shape, (tuple, list, torch.Size)):
        return None
    shape = tuple(shape)
    if not shape or not all(type(s) is int for s in shape) or tuple(x.shape[x.dim() - len(shape):]) != shape:
        return None
    for value in (_arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias")):
        if value is not None and (not isinstance(value, torch.Tensor) or value.shape != shape or value.dtype != x.dtype):
            return None
    return x.new_empty(x.shape)


def _elementwise(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    # A contiguous floating meta tensor with a Python number, or with a contiguous tensor of
    # its dtype that broadcasts to its shape (a per-channel gain): the result has the first
    # one's shape, dtype and layout. Fake ones gain nothing: their factory costs as much as the op.
    if kwargs or len(args) != 2:
        return None
    a, b = args
    if not (isinstance(a, torch.Tensor) and a.is_meta and a.is_floating_point() and a.is_contiguous()):
        return None
    if isinstance(b, torch.Tensor):
        if type(b) is not type(a) or not b.is_meta or b.dtype != a.dtype or not b.is_contiguous() or b.dim() > a.dim():
            return None
        if any(n != 1 and n != m for n, m in zip(reversed(b.shape), reversed(a.shape), strict=False)):
            return None
    elif type(b) not in (int, float):
        return None
    return a.new_empty(a.shape)


_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def _ints(value: Any, n: int) -> tuple[int, ...] | None:
    if type(value) is int:
        return (value,) * n
    if isinstance(value, (tuple, list)) and len(value) == n and all(type(v) is int for v in value):
        return tuple(value)
    return None


def _conv(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    # Fake tensors only (a meta convolution is a C++ kernel already), batched; a contiguous
    # weight and an input whose channel axis is outside its spatial axes in memory (contiguous,
    # or a channel slice of a contiguous tensor; sizes of 1 make the order ambiguous, and
    # channels-last inputs give channels-last outputs): the output is then contiguous, of the
    # usual size.
    x, weight, bias = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
    if not (isinstance(x, FakeTensor) and isinstance(weight, torch.Tensor)) or x.dim() != weight.dim():
        return None
    n = x.dim() - 2
    if n not in (1, 2, 3) or x.dtype != weight.dtype or not _channel_vector(bias, weight.shape[0], x.dtype):
        return None
    if not weight.is_contiguous():
        return None
    if x.stride(1) <= max(x.stride()[2:]):
        return None
    stride, dilation = _ints(_arg(args, kwargs, 3, "stride", 1), n), _ints(_arg(args, kwargs, 5, "dilation", 1), n)
    groups, padding = _arg(args, kwargs, 6, "groups", 1), _arg(args, kwargs, 4, "padding", 0)
    if stride is None or dilation is None or type(groups) is not int or groups < 1 or x.shape[1] != weight.shape[1] * groups:
        return None
    if weight.shape[0] % groups or min(stride) < 1 or min(dilation) < 1:
        return None
    kernel = tuple(weight.shape[2:])
    if padding == "same" and max(stride) == 1:
        out = tuple(x.shape[2:])
    else:
        pad = (0,) * n if padding == "valid" else _ints(padding, n)
        if pad is None or min(pad) < 0:
            return None
        out = tuple(
            (size + 2 * p - d * (k - 1) - 1) // s + 1
            for size, p, d, k, s in zip(x.shape[2:], pad, dilation, kernel, stride, strict=True)
        )
    if min(out) < 1:
        return None
    return x.new_empty((x.shape[0], weight.shape[0], *out))


def _matmul(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    # Both at least 2-D (1-D operands squeeze an axis away, with other strides), one dtype:
    # broadcast batch axes, then rows x columns, contiguous.
    if kwargs or len(args) != 2:
        return None
    a, b = args
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and _shapes_only(b)) or type(a) is not type(b):
        return None
    if a.dim() < 2 or b.dim() < 2 or a.dtype != b.dtype or a.device != b.device or a.shape[-1] != b.shape[-2]:
        return None
    try:
        batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except RuntimeError:
        return None
    return a.new_empty((*batch, a.shape[-2], b.shape[-1]))


#: Interpolating modes and the input rank each needs; their output size and layout are
#: nearest's (one rule in F.interpolate and the kernels), which has a cheap meta kernel.
_INTERPOLATING = {"linear": 3, "bilinear": 4, "bicubic": 4, "trilinear": 5}


def _interpolate(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    # Meta tensors only (fake ones have kernels as costly either way); no antialias.
    names = ("input", "size", "scale_factor", "mode", "align_corners", "recompute_scale_factor", "antialias")
    if len(args) > len(names) or any(k not in names for k in kwargs):
        return None
    given = dict(zip(names, args, strict=False)) | kwargs
    x, mode = given["input"], given.get("mode", "nearest")
    if not (isinstance(x, torch.Tensor) and x.is_meta) or _INTERPOLATING.get(mode) != x.dim():
        return None
    if given.get("antialias", False) is not False or given.get("align_corners") not in (None, True, False):
        return None
    try:
        out = F.interpolate(
            x, given.get("size"), given.get("scale_factor"), "nearest", None, given.get("recompute_scale_factor"), False
        )
    except Exception:  # noqa: BLE001 - an empty or invalid size: the mode's own kernel says what happens
        return None
    return out if out.numel() else None


_SHORTCUTS: dict[Callable[..., Any], Callable[[tuple[Any, ...], dict[str, Any]], torch.Tensor | None]] = {
    F.linear: _linear,
    F.batch_norm: _batch_norm,
    F.layer_norm: _layer_norm,
    F.conv1d: _conv,
    F.interpolate: _interpolate,
    torch.matmul: _matmul,
    torch.Tensor.matmul: _matmul,
    torch.Tensor.__matmul__: _matmul,
    F.conv2d: _conv,
    F.conv3d: _conv,
    **dict.fromkeys(
        (torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__, torch.mul, torch.Tensor.mul,
         torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.sub, torch.Tensor.sub, torch.Tensor.__sub__,
         torch.div, torch.Tensor.div, torch.Tensor.__truediv__),
        _elementwise,
    ),
}


def _shapes_only(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and (value.is_meta or isinstance(value, FakeTensor))


class ShapeShortcuts(TorchFunctionMode):
    """On meta and fake tensors (real ones keep their values) and without autograd: linear
    layers, contiguous convolutions, matmuls, batch and layer norms, meta resizes and meta
    arithmetic return an empty tensor of their output's shape, strides and dtype instead of
    running decompositions."""

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        shortcut = _SHORTCUTS.get(func)
        if shortcut is not None and args and _shapes_only(args[0]) and not torch.is_grad_enabled():
            out = shortcut(args, kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)
