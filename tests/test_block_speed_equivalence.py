"""SEBlock.forward, however it is written for speed, computes the reference SE formula.

The reference below is the block as the paper states it (docs/se-paper.md, "The block"), written out with plain
tensor algebra: pool over every axis but batch and channel, ``fc2(relu(fc1(s)))``, the gate,
and a channel-wise product. Any faster formulation of ``SEBlock.forward`` must match it (values
and gradients) on random inputs and weights, for every channel axis, rank, memory format, gate
and pool, and must keep the exact identity at insertion. No timing here: benchmarks/ does that.
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.fx

from se_inject.se_block import GATES, POOLS, SEBlock

REF_GATES = {
    "scaled_sigmoid": lambda z: 2.0 * torch.sigmoid(z),
    "sigmoid": torch.sigmoid,
    "one_plus_tanh": lambda z: 1.0 + torch.tanh(z),
    "tanh": torch.tanh,
}


def reference(block: SEBlock, x: torch.Tensor) -> torch.Tensor:
    """The SE formula, independent of SEBlock's own code paths."""
    axis = block.channel_axis % x.ndim
    dims = [d for d in range(1, x.ndim) if d != axis]
    s = x.mean(dims) if block.pool_name == "avg" else x.amax(dims)
    w1, b1, w2, b2 = block.fc1.weight, block.fc1.bias, block.fc2.weight, block.fc2.bias
    h = s @ w1.t() + (b1 if b1 is not None else 0)
    z = torch.relu(h) @ w2.t() + (b2 if b2 is not None else 0)
    g = REF_GATES[block.gate_name](z)
    shape = [1] * x.ndim
    shape[0], shape[axis] = x.shape[0], x.shape[axis]
    return x * g.reshape(shape)


def _randomise(block: SEBlock, seed: int) -> SEBlock:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * 0.5)
    return block


def _input(shape: tuple[int, ...], axis: int, dtype: torch.dtype, layout: str, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    if layout == "channels_last" and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "channels_last_3d" and x.ndim == 5:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    elif layout == "strided":
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, non-contiguous strides
    return x


# (input shape, channel axis): NCL, NCHW, NCDHW, channels-last maps [B, H, W, C], [B, L, C].
SHAPES = [
    ((3, 24, 17), 1),
    ((2, 32, 9, 7), 1),
    ((2, 16, 3, 5, 4), 1),
    ((2, 6, 5, 40), -1),
    ((3, 11, 24), -1),
    ((2, 6, 5, 40), 3),
]
CASES = [
    (shape, axis, layout)
    for shape, axis in SHAPES
    for layout in ("contiguous", "strided", "channels_last", "channels_last_3d")
    if layout in ("contiguous", "strided")
    or (layout == "channels_last" and len(shape) == 4)
    or (layout == "channels_last_3d" and len(shape) == 5)
]
CASE_IDS = [f"{shape}-axis{axis}-{layout}" for shape, axis, layout in CASES]
# every gate with average pooling, and every pool with the default gate
GATE_POOL = sorted({(g, "avg") for g in GATES} | {("scaled_sigmoid", p) for p in POOLS})


@pytest.mark.parametrize(("shape", "axis", "layout"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize(("gate", "pool"), GATE_POOL)
def test_forward_and_gradients_match_reference_fp64(shape, axis, layout, gate, pool) -> None:
    channels = shape[axis]
    block = SEBlock(
        channels, max(channels // 4, 1), channel_axis=axis, gate=gate, pool=pool, identity_init=False
    )
    block = _randomise(block.double(), seed=zlib.crc32(repr((shape, gate, pool)).encode()) % 1000)
    x = _input(shape, axis, torch.float64, layout, seed=7).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    out, ref = block(x), reference(block, x_ref)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn(out.shape, dtype=out.dtype)
    got = torch.autograd.grad(out, [x, *block.parameters()], grad)
    want = torch.autograd.grad(ref, [x_ref, *block.parameters()], grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_low_precision_matches_fp64_reference(dtype, layout) -> None:
    block = _randomise(SEBlock(64, 8, identity_init=False, gate="sigmoid"), seed=3)
    x = _input((4, 64, 7, 9), 1, dtype, layout, seed=5)
    out = block.to(dtype)(x)
    ref = reference(block.double(), x.double())
    assert out.dtype == dtype
    rel = (out.double() - ref).norm() / ref.norm()
    assert rel < (1e-5 if dtype == torch.float32 else 2e-2), rel


def test_bf16_autocast_matches_reference() -> None:
    block = _randomise(SEBlock(32, 8, identity_init=False), seed=9)
    x = _input((2, 32, 6, 6), 1, torch.float32, "channels_last", seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x)
        ref_dtype = reference(block, x).dtype
    ref = reference(block.double(), x.double())
    assert out.dtype == ref_dtype
    rel = (out.double() - ref).norm() / ref.norm()
    assert rel < 2e-2, rel


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("shape", "axis", "layout"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("gate", [g for g, (_, exact) in GATES.items() if exact])
def test_identity_init_is_bit_exact(dtype, shape, axis, layout, gate) -> None:
    block = SEBlock(shape[axis], 4, channel_axis=axis, gate=gate).to(dtype)
    x = _input(shape, axis, dtype, layout, seed=11) * 1e3
    out = block(x)
    assert out.dtype == x.dtype
    assert torch.equal(out, x)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_identity_under_bf16_autocast_and_in_training(layout) -> None:
    block = SEBlock(48, 8).train()
    x = _input((3, 48, 5, 5), 1, torch.float32, layout, seed=2).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.nn.functional.conv2d(x, torch.eye(48).view(48, 48, 1, 1))
        out = block(y)
    assert torch.equal(out, y)
    out.sum().backward()
    assert all(p.grad is not None for p in block.parameters())


def test_output_keeps_the_memory_format() -> None:
    block = _randomise(SEBlock(16, 4, identity_init=False), seed=4)
    x = _input((2, 16, 5, 6), 1, torch.float32, "channels_last", seed=4)
    assert block(x).is_contiguous(memory_format=torch.channels_last)


def test_symbolic_trace_of_a_model_holding_the_block_matches() -> None:
    # Any faster forward must stay traceable by plain torch.fx (feature extractors, a second inject_se).
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), SEBlock(16, 4, identity_init=False))
    _randomise(model[1], seed=8)
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_hooked_or_replaced_layers_are_called_as_modules() -> None:
    block = _randomise(SEBlock(16, 4, identity_init=False), seed=12)
    x = torch.randn(2, 16, 5, 5, requires_grad=True)
    want = reference(block, x)
    seen: list[str] = []
    handle = block.fc1.register_forward_hook(lambda m, a, out: seen.append("fc1"))
    torch.testing.assert_close(block(x), want)
    handle.remove()
    assert seen == ["fc1"]

    class Doubled(torch.nn.Linear):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(t)

    twice = Doubled(16, 4)
    twice.load_state_dict(block.fc1.state_dict())
    block.fc1 = twice
    with torch.no_grad():
        block.fc1.weight.div_(2)
        block.fc1.bias.div_(2)
    torch.testing.assert_close(block(x), want)


def test_module_wide_hooks_see_the_inner_layers() -> None:
    block = SEBlock(16, 4)
    seen: list[type] = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, out: seen.append(type(m)))
    try:
        block(torch.randn(2, 16, 3, 3))
    finally:
        handle.remove()
    assert seen.count(torch.nn.Linear) == 2


def test_dynamo_captures_the_block_whole() -> None:
    block = _randomise(SEBlock(32, 8, identity_init=False), seed=13).train()
    x = torch.randn(2, 32, 6, 6, requires_grad=True)
    explained = torch._dynamo.explain(block)(x)
    assert explained.graph_break_count == 0
    torch._dynamo.reset()
    compiled = torch.compile(block, backend="eager")
    torch.testing.assert_close(compiled(x), reference(block, x))
    torch._dynamo.reset()
