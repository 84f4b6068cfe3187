"""Shape shortcuts give what the op itself gives: same type, shape, strides, dtype and device.

Analysis reads shapes only, so ``se_inject.analysis.shortcuts`` computes the outputs of costly
layers instead of running them on meta or fake tensors. A shortcut that got a layout wrong
would change what a later ``view`` accepts and, through it, a plan; each case here compares a
shortcut with the op it stands in for.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from se_inject.analysis.shortcuts import ShapeShortcuts, recurrent_output


def _layout(t: torch.Tensor) -> tuple:
    return type(t), tuple(t.shape), t.stride(), t.dtype, t.device.type


def _flat(value) -> list[torch.Tensor]:
    return [value] if isinstance(value, torch.Tensor) else [t for v in value for t in _flat(v)]


def _meta_run(module: nn.Module, x: torch.Tensor):
    state = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in module.state_dict().items()}
    return torch.func.functional_call(module, state, (x,))


@pytest.mark.parametrize(
    ("cls", "batch_first", "bidirectional", "layers", "proj", "unbatched"),
    [
        c
        for c in itertools.product((nn.LSTM, nn.GRU, nn.RNN), (False, True), (False, True), (1, 2), (0, 3), (False, True))
        if not (c[4] and c[0] is not nn.LSTM)
    ],
)
def test_recurrent_output_matches_the_meta_kernel(cls, batch_first, bidirectional, layers, proj, unbatched):
    extra = {"proj_size": proj} if cls is nn.LSTM else {}
    module = cls(6, 5, num_layers=layers, batch_first=batch_first, bidirectional=bidirectional, **extra)
    x = torch.empty((4, 6) if unbatched else (4, 3, 6), device="meta")
    expected, got = _meta_run(module, x), recurrent_output(module, (x,), {})
    assert type(got) is type(expected)
    assert [_layout(t) for t in _flat(got)] == [_layout(t) for t in _flat(expected)]


def test_recurrent_output_declines_what_it_does_not_cover():
    lstm = nn.LSTM(6, 5)
    x = torch.empty(4, 3, 6, device="meta")
    assert recurrent_output(lstm, (x, (x, x)), {}) is None  # an initial state is given
    assert recurrent_output(lstm, (torch.empty(4, 3, 7, device="meta"),), {}) is None  # wrong width: let torch raise
    assert recurrent_output(nn.Linear(6, 5), (x,), {}) is None


def _layouts(mode: FakeTensorMode | None) -> dict[str, torch.Tensor]:
    if mode is None:
        base = torch.empty(2, 8, 5, 7, device="meta")
    else:
        with mode:
            base = torch.empty(2, 8, 5, 7)
    return {
        "contiguous": base,
        "channels_last": base.contiguous(memory_format=torch.channels_last),
        "permuted": base.permute(0, 2, 3, 1),
        "transposed": base.transpose(2, 3),
        "sliced": base[:, :, 1:4],
    }


def _cases(x: torch.Tensor) -> dict[str, object]:
    c, w = x.shape[1], x.shape[-1]
    vec, lw, ns = torch.randn(c, device=x.device), torch.randn(3, w, device=x.device), (w,)
    return {
        "batch_norm": lambda t: F.batch_norm(t, vec, vec.abs(), vec, vec, False),
        "batch_norm, no affine": lambda t: F.batch_norm(t, vec, vec.abs()),
        "batch_norm, training": lambda t: F.batch_norm(t, vec.clone(), vec.abs(), vec, vec, True),
        "batch_norm, batch statistics": lambda t: F.batch_norm(t, None, None, vec, None, True, 0.0, 1e-5),
        "linear": lambda t: F.linear(t, lw, torch.randn(3, device=x.device)),
        "linear, no bias": lambda t: F.linear(t, lw),
        "layer_norm": lambda t: F.layer_norm(t, ns, torch.randn(ns, device=x.device), torch.randn(ns, device=x.device)),
        "layer_norm, two axes": lambda t: F.layer_norm(t, tuple(t.shape[-2:])),
        "add": lambda t: t + t,
        "mul": lambda t: torch.mul(t, t),
        "sub": lambda t: t.sub(t),
        "scaled": lambda t: t * 0.5,
        "divided": lambda t: t / 3,
        "per-channel gain": lambda t: t * vec.view(-1, 1, 1),
        "per-column bias": lambda t: torch.add(t, torch.randn(w, device=x.device)),
    }


@torch.no_grad()
@pytest.mark.parametrize("fake", [True, False], ids=["fake", "meta"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "permuted", "transposed", "sliced"])
def test_shortcuts_match_the_ops(layout, fake):
    x = _layouts(FakeTensorMode(allow_non_fake_inputs=True) if fake else None)[layout]
    for name, op in _cases(x).items():
        expected = op(x)
        with ShapeShortcuts():
            got = op(x)
        assert _layout(got) == _layout(expected), name


def test_shortcuts_need_autograd_off():
    weight = torch.randn(3, 7, requires_grad=True)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        x = torch.empty(2, 7)
    del mode
    with ShapeShortcuts():
        assert F.linear(x, weight).requires_grad  # the op ran: its result is part of a graph


@torch.no_grad()
def test_shortcuts_leave_real_tensors_and_errors_alone():
    x = torch.randn(2, 8, 5, 7)
    weight = torch.randn(3, 7)
    with ShapeShortcuts():
        assert torch.equal(F.linear(x, weight), F.linear(x, weight))  # real values are computed
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        with mode:
            fake = torch.empty(2, 8, 5, 6)
        with pytest.raises(RuntimeError):
            F.linear(fake, weight)  # a shape that does not fit still raises, from torch itself
        with pytest.raises(RuntimeError):
            F.batch_norm(fake, torch.zeros(3), torch.ones(3))
        with pytest.raises(ValueError):
            F.batch_norm(fake, torch.zeros(8), torch.ones(8), eps=-1.0)
        with mode:
            single = torch.empty(1, 8, 1, 1)
        with pytest.raises(ValueError):
            F.batch_norm(single, None, None, training=True)  # one value per channel


def _same_or_same_error(op, *args) -> None:
    def run():
        try:
            return op(*args)
        except RuntimeError as e:  # both raise: the shortcut let torch check
            return type(e)

    expected = run()
    with ShapeShortcuts():
        got = run()
    if isinstance(expected, type):
        assert got is expected
    else:
        assert _layout(got) == _layout(expected)


@torch.no_grad()
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize(
    "layout", ["contiguous", "channels_last", "transposed", "channel slice", "channels-last slice", "batch-major"]
)
def test_fake_convolutions_match_the_op(dims, layout):
    convs = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
    last = {2: torch.channels_last, 3: torch.channels_last_3d}
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    for groups, kernel, stride, padding, dilation, size, last_weight in itertools.product(
        (1, 2), (1, 3), (1, 2), (0, 1, "same", "valid"), (1, 2), (1, 6), (False, True)
    ):
        with mode:
            x = torch.empty((2, 8) + (size,) * dims)
            if layout == "batch-major":
                x = torch.empty((4, 2) + (size,) * dims).transpose(0, 1)
        if layout in ("channels_last", "channels-last slice") and dims > 1:
            x = x.contiguous(memory_format=last[dims])
        if layout in ("channel slice", "channels-last slice"):
            x = x[:, 2:6]
        elif layout != "batch-major":
            x = x[:, :4].contiguous(memory_format=last[dims] if layout == "channels_last" and dims > 1 else torch.contiguous_format)
        if layout == "transposed":
            x = x.transpose(-1, -2)
        weight = torch.randn((6, 4 // groups) + (kernel,) * dims)
        if last_weight and dims > 1:
            weight = weight.contiguous(memory_format=last[dims])
        _same_or_same_error(convs[dims], x, weight, torch.randn(6), stride, padding, dilation, groups)


@torch.no_grad()
@pytest.mark.parametrize("fake", [True, False], ids=["fake", "meta"])
def test_matmul_matches_the_op(fake):
    mode = FakeTensorMode(allow_non_fake_inputs=True)

    def make(shape, transposed):
        if transposed:
            shape = (*shape[:-2], shape[-1], shape[-2])
        if fake:
            with mode:
                t = torch.empty(shape)
        else:
            t = torch.empty(shape, device="meta")
        return t.transpose(-1, -2) if transposed else t

    for a, b, ta, tb in itertools.product(
        [(3, 4), (2, 3, 4), (2, 5, 3, 4), (5, 1, 3, 4)], [(4, 6), (2, 4, 6), (2, 1, 4, 6), (3, 6)], (False, True), (False, True)
    ):
        _same_or_same_error(torch.matmul, make(a, ta), make(b, tb))
        _same_or_same_error(lambda x, y: x @ y, make(a, ta), make(b, tb))


@torch.no_grad()
@pytest.mark.parametrize("mode", ["linear", "bilinear", "bicubic", "trilinear"])
def test_meta_interpolation_matches_the_op(mode):
    import warnings

    for shape, layout, (size, scale), corners, recompute in itertools.product(
        [(2, 3, 7), (2, 3, 5, 7), (2, 3, 1, 1), (1, 3, 4, 5, 6)],
        ("contiguous", "channels_last", "transposed"),
        [(None, 2.0), (None, 0.5), (None, 0.34), (13, None), (None, None)],
        (None, True),
        (None, True),
    ):
        x = torch.empty(shape, device="meta")
        if layout == "channels_last" and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        elif layout == "transposed":
            x = x.transpose(-1, -2)

        def op(t, size=size, scale=scale, corners=corners, recompute=recompute):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return F.interpolate(t, size, scale, mode, corners, recompute)

        try:
            expected = _layout(op(x))
        except (RuntimeError, ValueError, NotImplementedError, ZeroDivisionError) as e:
            expected = type(e)
        try:
            with ShapeShortcuts():
                got = _layout(op(x))
        except (RuntimeError, ValueError, NotImplementedError, ZeroDivisionError) as e:
            got = type(e)
        assert got == expected, (shape, layout, size, scale, corners, recompute)
