"""Sequence models and encoders (issue 32): every SE layout squeezes each sample on its own,
time-first token sequences ``[T, B, D]`` included (the batch axis is followed from the example
input by growing its batch), and blocks that would need a guess are refused."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from nets import PlainResidual, perturb_se
from torch import nn

from se_inject import SEBlock, SkipReason, find_sites, inject_se
from se_inject.plan import Plan


class TokenLayer(nn.Module):
    """A pre-norm transformer layer; ``batch_first=False`` runs it on ``[T, B, D]`` (the default
    layout of ``nn.MultiheadAttention``, as in many speech encoders)."""

    def __init__(self, d: int = 16, batch_first: bool = True) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 2, batch_first=batch_first)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 32), nn.ReLU(), nn.Linear(32, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.ff(self.norm2(x))


class TokenEncoder(nn.Module):
    """Features ``[B, T, F]`` in and out; inside, batch first or time first, with an optional
    class token in front of the sequence."""

    def __init__(self, f: int = 8, d: int = 16, batch_first: bool = True, cls: bool = False) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.inp = nn.Linear(f, d)
        self.cls = nn.Parameter(torch.randn(1, 1, d)) if cls else None
        self.layers = nn.ModuleList(TokenLayer(d, batch_first) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        if not self.batch_first:
            x = x.transpose(0, 1)
        if self.cls is not None:
            if self.batch_first:
                x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1)
            else:
                x = torch.cat([self.cls.expand(-1, x.shape[1], -1), x], 0)
        for layer in self.layers:
            x = layer(x)
        return x if self.batch_first else x.transpose(0, 1)


class UntracedEncoder(TokenEncoder):
    """A time-first encoder whose own forward does not trace (it branches on data): its layers
    are analysed on their own, with the inputs a forward gave them, their batch axis with them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 1e9:  # branches on a traced value
            x = x * 0.5
        return super().forward(x)


class ChannelsLastMap(nn.Module):
    """A convolution stem, then an MLP residual on the channels-last map ``[B, H, W, C]``."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.norm = nn.LayerNorm(c)
        self.mlp = nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).permute(0, 2, 3, 1)
        return x + self.mlp(self.norm(x))


class ConvResidual(nn.Module):
    """``x + conv(relu(conv(x)))`` in 1, 2 or 3 spatial dimensions, channels first."""

    def __init__(self, dims: int, c: int = 16) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.stem = conv(3, c, 3, padding=1)
        self.conv1, self.conv2 = conv(c, c, 3, padding=1), conv(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return x + self.conv2(torch.relu(self.conv1(x)))


class FixedBatch(nn.Module):
    """A block whose code fixes the batch size (``reshape(2, ...)``): growing the batch does not
    run, so which axis holds the samples of its sequence cannot be told."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.inp = nn.Linear(8, d)
        self.ff = nn.Sequential(nn.Linear(d, 32), nn.ReLU(), nn.Linear(32, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x).reshape(2, -1, 16)
        return x + self.ff(x)


#: name -> (model, example input of two samples, tokens option, the batch axis of every site).
LAYOUTS = {
    "channels-first map": (lambda: PlainResidual(8), lambda: torch.randn(2, 8, 6, 6), False, 0),
    "channels-last map": (ChannelsLastMap, lambda: torch.randn(2, 3, 6, 6), False, 0),
    "[B, T, D]": (lambda: TokenEncoder(batch_first=True), lambda: torch.randn(2, 5, 8), True, 0),
    "[T, B, D]": (lambda: TokenEncoder(batch_first=False), lambda: torch.randn(2, 5, 8), True, 1),
    # as many time steps as samples: sizes alone cannot tell the axes apart
    "[T, B, D], T == B": (lambda: TokenEncoder(batch_first=False), lambda: torch.randn(2, 2, 8), True, 1),
    "[T, B, D] + class token": (lambda: TokenEncoder(batch_first=False, cls=True), lambda: torch.randn(2, 5, 8), True, 1),
    "[B, T, D] + class token": (lambda: TokenEncoder(batch_first=True, cls=True), lambda: torch.randn(2, 5, 8), True, 0),
    "[T, B, D], layers analysed alone": (
        lambda: UntracedEncoder(batch_first=False), lambda: torch.randn(2, 5, 8), True, 1
    ),
    "1-D map": (lambda: ConvResidual(1), lambda: torch.randn(2, 3, 12), False, 0),
    "3-D map": (lambda: ConvResidual(3), lambda: torch.randn(2, 3, 4, 4, 4), False, 0),
}


def _exact_and_per_sample(model: nn.Module, x: torch.Tensor, **options: bool) -> nn.Module:
    """Inject into ``model`` (eval mode): outputs bit-exact at insertion; with the gates moved,
    each sample's output is the same as when it runs alone. Returns the injected model."""
    before = copy.deepcopy(model)
    injected = inject_se(model, example_input=x, **options)
    with torch.no_grad():
        assert torch.equal(injected(x), before(x))  # identity at insertion, bit for bit
        perturb_se(injected)
        moved = injected(x)
        assert not torch.allclose(moved, before(x))  # the gates do move the output
        for i in range(x.shape[0]):
            alone = injected(x[i : i + 1])
            torch.testing.assert_close(moved[i : i + 1], alone, rtol=1e-5, atol=1e-5)
    return injected


def _trains(model: nn.Module, x: torch.Tensor, **options: bool) -> None:
    """Inject, then one train-mode forward and backward reaches every SE block's last layer."""
    injected = inject_se(model, example_input=x, **options).train()
    injected(x).square().mean().backward()
    blocks = [m for m in injected.modules() if isinstance(m, SEBlock)]
    assert blocks and all(b.fc2.weight.grad is not None and b.fc2.weight.grad.abs().sum() > 0 for b in blocks)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_squeezes_each_sample_on_its_own(layout: str) -> None:
    make, example, tokens, batch_axis = LAYOUTS[layout]
    torch.manual_seed(0)
    model, x = make().eval(), example()
    plan = find_sites(model, example_input=x, tokens=tokens)
    assert plan.sites, plan.skipped
    assert {s.batch_axis for s in plan.sites} == {batch_axis}
    _exact_and_per_sample(model, x, tokens=tokens)


@pytest.mark.parametrize("layout", ["[T, B, D]", "[T, B, D] + class token", "channels-last map", "1-D map"])
def test_trains_forward_and_backward(layout: str) -> None:
    make, example, tokens, _ = LAYOUTS[layout]
    torch.manual_seed(0)
    _trains(make(), example(), tokens=tokens)


def test_time_first_class_token_stays_out_of_the_squeeze() -> None:
    torch.manual_seed(0)
    model, x = TokenEncoder(batch_first=False, cls=True).eval(), torch.randn(2, 5, 8)
    plan = find_sites(model, example_input=x, tokens=True)
    assert {s.prefix_tokens for s in plan.sites} == {1}
    assert {s.spatial for s in plan.sites} == {(6,)}  # the time axis, not the batch


def test_a_fixed_batch_size_refuses_the_site_with_its_reason() -> None:
    plan = find_sites(FixedBatch().eval(), example_input=torch.randn(2, 5, 8), tokens=True)
    assert not plan.sites
    reasons = {s.reason for s in plan.skipped}
    assert reasons == {SkipReason.UNKNOWN_BATCH_AXIS}
    assert "did not run" in plan.skipped[0].detail


def test_se_block_batch_axis_keeps_samples_apart() -> None:
    torch.manual_seed(0)
    x = torch.randn(7, 3, 16)  # [T, B, D]
    block = SEBlock(16, 4, channel_axis=-1, batch_axis=1, identity_init=False, gate="sigmoid")
    module_path = copy.deepcopy(block)
    module_path.fc1.register_forward_hook(lambda m, a, out: None)  # forces the module path
    out = block(x)
    torch.testing.assert_close(out, module_path(x))
    for b in range(x.shape[1]):
        torch.testing.assert_close(out[:, b : b + 1], block(x[:, b : b + 1]))
    # the gate of sample b is computed from that sample's time steps only
    gate = torch.sigmoid(block.fc2(torch.relu(block.fc1(x.mean(0)))))
    torch.testing.assert_close(out, x * gate[None])


def test_channels_before_batch_keeps_samples_apart() -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 16, 3)  # [T, D, B]
    block = SEBlock(16, 4, channel_axis=1, batch_axis=2, identity_init=False, gate="sigmoid")
    gate = torch.sigmoid(block.fc2(torch.relu(block.fc1(x.mean(0).t()))))  # [B, D]
    torch.testing.assert_close(block(x), x * gate.t()[None])


def test_batch_axis_on_the_channel_axis_is_refused() -> None:
    from se_inject.errors import ConfigError

    with pytest.raises(ConfigError, match="batch_axis"):
        SEBlock(16, 4, channel_axis=1, batch_axis=1)


def test_plans_without_a_batch_axis_load_as_batch_first() -> None:
    plan = find_sites(TokenEncoder(batch_first=False).eval(), example_input=torch.randn(2, 5, 8), tokens=True)
    data = plan.to_dict()
    assert {s["batch_axis"] for s in data["sites"]} == {1}
    assert Plan.from_dict(data) == plan
    for s in data["sites"]:
        del s["batch_axis"]
    assert {s.batch_axis for s in Plan.from_dict(data).sites} == {0}


class WaveBlock(nn.Module):
    """A WaveNet / temporal-convolution block returning ``(residual, skip)``; ``functional``
    ends the residual in a function (its owner is then rebuilt, not hooked)."""

    def __init__(self, c: int = 16, dilation: int = 1, functional: bool = False) -> None:
        super().__init__()
        self.functional = functional
        self.filt = nn.Conv1d(c, 2 * c, 3, padding=dilation, dilation=dilation)
        self.res, self.skip = nn.Conv1d(c, c, 1), nn.Conv1d(c, c, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.filt(x).chunk(2, 1)
        h = torch.tanh(a) * torch.sigmoid(b)
        r = self.res(h)
        return (torch.tanh(r) if self.functional else r), self.skip(h)


class WaveNet(nn.Module):
    """``r, s = block(x); x = x + r; skips = skips + s``: residuals and a sum of skip outputs."""

    def __init__(self, c: int = 16, functional: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv1d(1, c, 1)
        self.blocks = nn.ModuleList(WaveBlock(c, 2**i, functional) for i in range(3))
        self.head = nn.Conv1d(c, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        skips = 0
        for block in self.blocks:
            r, s = block(x)
            x = x + r
            skips = skips + s
        return self.head(torch.relu(skips + x))  # the last residual is read too


class PreActBody(nn.Module):
    """A pre-activation ResNet body returning ``(conv_out, pre_activation)``."""

    def __init__(self, c: int = 8, functional: bool = False) -> None:
        super().__init__()
        self.functional = functional
        self.bn1, self.conv1 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1)
        self.bn2, self.conv2 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pre = torch.relu(self.bn1(x))
        y = self.conv2(torch.relu(self.bn2(self.conv1(pre))))
        return (torch.tanh(y) if self.functional else y), pre


class PreActBlock(nn.Module):
    def __init__(self, c: int = 8, functional: bool = False) -> None:
        super().__init__()
        self.body = PreActBody(c, functional)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        y, pre = self.body(x)
        return y + identity


class PreActNet(nn.Module):
    def __init__(self, functional: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(PreActBlock(8, functional), PreActBlock(8, functional))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))


@pytest.mark.parametrize("functional", [False, True], ids=["hooked", "rebuilt"])
def test_blocks_returning_residual_and_skip(functional: bool) -> None:
    torch.manual_seed(0)
    model, x = WaveNet(functional=functional).eval(), torch.randn(2, 1, 32)
    plan = find_sites(model, example_input=x)
    # one SE per block, on the residual element (hooked on ``res`` or after its function)
    assert sorted(s.node for s in plan.sites) == ["add", "add_2", "add_4"]
    assert {s.mechanism for s in plan.sites} == {"rebuilt" if functional else "attached"}
    if not functional:
        assert sorted(s.attach for s in plan.sites) == ["blocks.0.res", "blocks.1.res", "blocks.2.res"]
    # the sums of skip outputs are aggregations of block outputs, no sites
    aggregated = [s for s in plan.skipped if s.reason is SkipReason.FUSION]
    assert len(aggregated) == 2 and all("skip or side output" in s.detail for s in aggregated)
    _exact_and_per_sample(model, x)
    _trains(WaveNet(functional=functional), x)


@pytest.mark.parametrize("functional", [False, True], ids=["hooked", "rebuilt"])
def test_pre_activation_body_returning_its_pre_activation(functional: bool) -> None:
    torch.manual_seed(0)
    model, x = PreActNet(functional).eval(), torch.randn(2, 3, 8, 8)
    plan = find_sites(model, example_input=x)
    assert [s.owner for s in plan.sites] == ["blocks.0", "blocks.1"], plan.skipped
    assert {s.mechanism for s in plan.sites} == {"rebuilt" if functional else "attached"}
    _exact_and_per_sample(model, x)
    _trains(PreActNet(functional), x)


class GluBlock(nn.Module):
    """``x + GLU(conv(x))``: a convolution to 2C channels, halved by a gated linear unit
    (``nn.GLU(dim=1)`` or ``F.glu(dim=1)``)."""

    def __init__(self, c: int = 16, spelling: str = "module") -> None:
        super().__init__()
        self.spelling = spelling
        self.conv = nn.Conv1d(c, 2 * c, 3, padding=1)
        self.glu = nn.GLU(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(torch.relu(x))
        if self.spelling == "function":
            return x + F.glu(h, dim=1)
        return x + self.glu(h)


class GluNet(nn.Module):
    def __init__(self, spelling: str = "module") -> None:
        super().__init__()
        self.stem = nn.Conv1d(4, 16, 3, padding=1)
        self.blocks = nn.Sequential(GluBlock(16, spelling), GluBlock(16, spelling))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))


@pytest.mark.parametrize("spelling", ["module", "function"])
def test_glu_at_the_end_of_a_branch(spelling: str) -> None:
    torch.manual_seed(0)
    model, x = GluNet(spelling).eval(), torch.randn(2, 4, 20)
    plan = find_sites(model, example_input=x)
    assert [(s.owner, s.channels, s.channel_axis) for s in plan.sites] == [("blocks.0", 16, 1), ("blocks.1", 16, 1)]
    assert {s.mechanism for s in plan.sites} == {"attached" if spelling == "module" else "rebuilt"}
    _exact_and_per_sample(model, x)
    _trains(GluNet(spelling), x)


class OpaqueGate(nn.Module):
    """``GLU(conv(x))`` in a part that does not trace (``int()`` on a shape)."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.conv, self.glu = nn.Conv1d(c, 2 * c, 3, padding=1), nn.GLU(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.glu(self.conv(x)) * float(int(x.shape[-1]) > 0)


def test_glu_inside_a_part_that_does_not_trace() -> None:
    """The channel axis of an opaque part's output is followed through its GLU too."""

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.gated = nn.Conv1d(4, 16, 3, padding=1), OpaqueGate(16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.stem(x)
            return x + self.gated(torch.relu(x))

    torch.manual_seed(0)
    model, x = Outer().eval(), torch.randn(2, 4, 20)
    plan = find_sites(model, example_input=x)
    assert [(s.node, s.channels) for s in plan.sites] == [("add", 16)], (plan.skipped, plan.unanalysed)
    assert [u.path for u in plan.unanalysed] == ["gated"]
    _exact_and_per_sample(model, x)


class ChannelsLastConv(nn.Module):
    """A ``Conv1d`` on ``[B, T, C]``: transposed in and out (speech front ends, TTS encoders)."""

    def __init__(self, cin: int, cout: int, k: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv1d(cin, cout, k, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.transpose(1, 2)).transpose(1, 2)


class ChannelsLastConvBlock(nn.Module):
    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.conv1, self.conv2 = ChannelsLastConv(c, c), ChannelsLastConv(c, c)
        self.norm = nn.LayerNorm(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.norm(self.conv2(torch.relu(self.conv1(x))))


class ChannelsLastConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = ChannelsLastConv(8, 16)
        self.blocks = nn.Sequential(ChannelsLastConvBlock(), ChannelsLastConvBlock())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.inp(x))


def test_channels_last_1d_convolution_maps_are_sites_by_default() -> None:
    torch.manual_seed(0)
    model, x = ChannelsLastConvNet().eval(), torch.randn(2, 12, 8)
    plan = find_sites(model, example_input=x)
    assert [(s.owner, s.channel_axis, s.spatial, s.prefix_tokens) for s in plan.sites] == [
        ("blocks.0", -1, (12,), 0), ("blocks.1", -1, (12,), 0)
    ]
    _exact_and_per_sample(model, x)
    _trains(ChannelsLastConvNet(), x)


def test_token_sequences_of_linear_layers_stay_opt_in() -> None:
    """The same layout made by linear layers and attention is a token sequence: no site unless
    ``tokens=True``."""
    plan = find_sites(TokenEncoder().eval(), example_input=torch.randn(2, 5, 8))
    assert not plan.sites
    assert {s.reason for s in plan.skipped} == {SkipReason.TOKEN_SEQUENCE}


class WindowedBlock(nn.Module):
    """``x + conv2(relu(conv1(x)))``; with a window size its forward branches on the input's
    size (padding to whole windows, as windowed ViT encoders do), which does not trace."""

    def __init__(self, c: int = 8, window: int = 0) -> None:
        super().__init__()
        self.window = window
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))
        if self.window > 0 and x.shape[-1] % self.window:  # branches on a traced value
            h = h * 1.0
        return x + self.conv2(h)


class WindowedEncoder(nn.Module):
    """Windowed blocks and global ones (window size 0) of one class, interleaved."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList(WindowedBlock(8, w) for w in (4, 0, 4, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return x


def test_a_trace_failure_is_reused_only_for_blocks_that_take_the_same_path(monkeypatch: pytest.MonkeyPatch) -> None:
    import se_inject.sites.units as units

    traced: list[str] = []
    trace_unit = units._trace_unit

    def counting(module: nn.Module, path: str, *args: object, **kwargs: object) -> object:
        traced.append(path)
        return trace_unit(module, path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(units, "_trace_unit", counting)
    torch.manual_seed(0)
    model, x = WindowedEncoder().eval(), torch.randn(2, 3, 6, 6)
    plan = find_sites(model, example_input=x)
    assert [u.path for u in plan.unanalysed if u.path.startswith("blocks")] == ["blocks.0", "blocks.2"]
    assert [s.owner for s in plan.sites] == ["blocks.1", "blocks.3"]
    # the second windowed block reuses the first one's failure: it is never traced whole
    assert traced.count("blocks.0") >= 1 and "blocks.2" not in traced
    _exact_and_per_sample(model, x)
    _trains(WindowedEncoder(), x)


# --------------------------------------------------------------------------------------------
# Item 6: an existing SE block whose forward does not trace is still existing attention


class _UntracedSE(nn.Module):
    """An SE block with a data-dependent early exit: fx cannot trace it, so the graph calls it whole."""

    def __init__(self, c: int, gate: bool = True) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Conv2d(c, c // 4, 1), nn.ReLU(), nn.Conv2d(c // 4, c, 1)
        self.gate = nn.Sigmoid() if gate else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.abs().sum() == 0):
            return x
        return x * self.gate(self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True)))))


class _UntracedBottleneck(_UntracedSE):
    """The same parts with no gate and no product: a bottleneck, not attention."""

    def __init__(self, c: int) -> None:
        super().__init__(c, gate=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.abs().sum() == 0):
            return x
        return self.fc2(self.act(self.fc1(x)))


class _AttendedBlock(nn.Module):
    def __init__(self, c: int, inner: type[nn.Module]) -> None:
        super().__init__()
        self.conv, self.bn, self.se = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), inner(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.se(self.bn(self.conv(x)))


def test_an_existing_se_that_does_not_trace_is_recognised_by_its_structure() -> None:
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), _AttendedBlock(16, _UntracedSE), _AttendedBlock(16, _UntracedSE))
    plan = find_sites(model.eval(), example_input=torch.randn(1, 3, 16, 16))
    assert [u.path for u in plan.unanalysed] == ["1.se", "2.se"]  # it does not trace ...
    assert plan.sites == ()  # ... and no second SE follows it
    assert [(s.node, s.reason) for s in plan.skipped] == [("1.add", "already-attended"), ("2.add", "already-attended")]


def test_an_untraced_bottleneck_without_a_gate_is_no_attention() -> None:
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), _AttendedBlock(16, _UntracedBottleneck)).eval()
    x = torch.randn(1, 3, 16, 16)
    plan = find_sites(model, example_input=x)
    assert [(s.name, s.attach) for s in plan.sites] == [("1.se_1", "se")]  # on the bottleneck's output
    want = model(x)
    assert torch.equal(inject_se(model, example_input=x)(x), want)


# --------------------------------------------------------------------------------------------
# Item 7: a root whose sizes come from a lengths argument (``lengths.max().item()``)


class _MaskedConvModule(nn.Module):
    """A Conformer-style convolution module checking its padding mask against the input."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv1d(c, c, 3, padding=1), nn.BatchNorm1d(c)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if mask.shape[1] != x.shape[-1]:
            raise ValueError(f"Expected mask.shape[1] to be {x.shape[-1]}, but got {mask.shape[1]}")
        return x + self.bn(self.conv(x.masked_fill(mask[:, None], 0.0)))


class _LengthsEncoder(nn.Module):
    def __init__(self, c: int = 16, layers: int = 3) -> None:
        super().__init__()
        self.inp = nn.Conv1d(8, c, 1)
        self.layers = nn.ModuleList(_MaskedConvModule(c) for _ in range(layers))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        steps = int(lengths.max().item())  # does not trace: the sizes come from the values
        x = self.inp(x[..., :steps])
        mask = torch.arange(steps, device=x.device)[None, :] >= lengths[:, None]
        for layer in self.layers:
            x = layer(x, mask)
        return x


def test_a_root_taking_its_sizes_from_lengths_gets_its_layers_sites() -> None:
    model = _LengthsEncoder().eval()
    x, lengths = torch.randn(2, 8, 20), torch.tensor([20, 15])
    plan = find_sites(model, example_input=(x, lengths))
    assert [s.name for s in plan.sites] == [f"layers.{i}.se" for i in range(3)]
    assert [u.path for u in plan.unanalysed] == [""]  # the root itself, with its reason
    assert "plain Python value" in plan.unanalysed[0].reason
    want = model(x, lengths)
    injected = inject_se(model, example_input=(x, lengths))
    assert torch.equal(injected(x, lengths), want)
    perturb_se(injected)
    injected.train()
    injected(x, lengths).sum().backward()
    assert injected.layers[0].se.fc2.weight.grad is not None
