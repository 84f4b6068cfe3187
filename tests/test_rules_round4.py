"""Placement rules, round 4 (issue 30): the classic families. A residual branch that leaves its
resolution and comes back (hourglass units, self-calibrated convolutions, decoder units that
upsample on both operands), normalised halves concatenated (IBN layers), sparse aggregation
(SparseNet), ``plain=True`` on a network that already has squeeze-excitation, and control
flow on sizes (a cropped identity)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from nets import PlainResidual, conv_bn, conv_bn_relu, se_inputs
from torch import nn

from se_inject import SkipReason, find_sites, inject_se
from se_inject.plan import Plan

X = torch.randn(2, 3, 16, 16)


def _exact(model: nn.Module, x: torch.Tensor, **options: object) -> tuple[Plan, dict[str, torch.Tensor]]:
    """Plan, inject, and check: the plan is what is built, outputs are bit-exact at insertion,
    a train-mode forward runs; returns the plan and each SE block's input (eval mode)."""
    model.eval()
    plan = find_sites(model, example_input=x, **options)
    with torch.no_grad():
        before = model(x)
        injected = inject_se(model, example_input=x, **options)
    after, seen = se_inputs(injected, x)
    assert sorted(seen) == sorted(s.name for s in plan.sites)  # a plan is a promise
    assert torch.equal(before, after)
    injected.train()
    out = injected(x)
    out.float().mean().backward()
    return plan, seen


def _outputs(model: nn.Module, x: torch.Tensor, *paths: str) -> dict[str, torch.Tensor]:
    """What the modules at ``paths`` return in one eval forward of the plain model."""
    got: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(p).register_forward_hook(lambda m, a, o, p=p: got.__setitem__(p, o)) for p in paths]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return got


def _sites(plan: Plan) -> list[tuple[str, str, str]]:
    return [(s.name, str(s.kind), s.source) for s in plan.sites]


def _skips(plan: Plan) -> list[tuple[str, SkipReason]]:
    return [(s.node, s.reason) for s in plan.skipped]


# --- A. a branch that leaves its resolution and comes back ------------------------------------


class RoundTrip(nn.Module):
    """``x + up(f(pool(x)))``: an hourglass unit, a self-calibrated convolution's branch. ``up``:
    ``interpolate`` to the input's size, or an ``nn.Upsample``; ``inner``: a residual block at
    the coarse resolution (an encoder-decoder skip, no unit); ``lateral``: a projection trunk at
    the input's resolution (an FPN merge)."""

    def __init__(self, c: int = 8, up: str = "interpolate", inner: bool = False, lateral: bool = False) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn_relu(c, c), PlainResidual(c) if inner else nn.Identity(), conv_bn(c, c))
        self.up = nn.Upsample(scale_factor=2) if up == "upsample" else None
        self.lateral = nn.Conv2d(c, c, 1) if lateral else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(F.avg_pool2d(x, 2))
        y = self.up(y) if self.up is not None else F.interpolate(y, size=x.shape[-2:])
        trunk = self.lateral(x) if self.lateral is not None else x
        return torch.relu(trunk + y)


class UpUnit(nn.Module):
    """A decoder residual unit: the branch and the projection trunk both upsample (transposed
    convolutions), the mirror of a downsampling ResNet unit."""

    def __init__(self, cin: int = 16, cout: int = 8) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            nn.ConvTranspose2d(cin, cout, 2, 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(), conv_bn(cout, cout)
        )
        self.proj = nn.Sequential(nn.ConvTranspose2d(cin, cout, 2, 2, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.proj(x) + self.branch(x))


@pytest.mark.parametrize("up", ["interpolate", "upsample"])
def test_a_branch_that_pools_and_comes_back_is_a_residual_branch(up: str) -> None:
    model = nn.Sequential(conv_bn(3, 8), RoundTrip(up=up), RoundTrip(up=up))
    plan = find_sites(model, example_input=X)
    end = "up" if up == "upsample" else "interpolate"
    assert _sites(plan) == [(f"{i}.se", "residual", f"{i}.{end}") for i in (1, 2)]
    assert plan.skipped == ()
    bodies = _outputs(model, X, "1.body", "2.body")
    _, seen = _exact(model, X)
    for i in (1, 2):  # the SE scales the branch back at the input's resolution, not the trunk
        assert torch.equal(seen[f"{i}.se"], F.interpolate(bodies[f"{i}.body"], size=(16, 16)))


def test_a_decoder_unit_upsampling_on_both_operands_is_a_residual_like_its_mirror() -> None:
    model = nn.Sequential(conv_bn(3, 16), UpUnit(), nn.Conv2d(8, 16, 1), UpUnit())
    plan = find_sites(model, example_input=X)
    assert _sites(plan) == [("1.se", "residual", "1.branch"), ("3.se", "residual", "3.branch")]
    branches = _outputs(model, X, "1.branch", "3.branch")
    _, seen = _exact(model, X)
    assert torch.equal(seen["1.se"], branches["1.branch"]) and torch.equal(seen["3.se"], branches["3.branch"])


@pytest.mark.parametrize("why", ["inner", "lateral"])
def test_a_merge_of_scales_stays_a_fusion(why: str) -> None:
    # A finished block at the coarse resolution (an encoder-decoder skip) or a projection at the
    # sum's resolution (an FPN lateral): the operands meet at no nearby fork.
    model = nn.Sequential(conv_bn(3, 8), RoundTrip(**{why: True}))
    plan = find_sites(model, example_input=X)
    assert ("1.add", SkipReason.FUSION) in _skips(plan)
    assert all(s.owner != "1" or s.name.startswith("1.body.") for s in plan.sites)
    if why == "inner":  # the inner block keeps its own site
        assert _sites(plan) == [("1.body.1.se", "residual", "1.body.1.conv2")]


# --- B. normalised halves concatenated (IBN) --------------------------------------------------


class IBN(nn.Module):
    """IBN-Net's layer: instance norm on the first half of the channels, batch norm on the rest."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.half = c // 2
        self.IN = nn.InstanceNorm2d(self.half, affine=True)
        self.BN = nn.BatchNorm2d(c - self.half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.IN(x[:, : self.half]), self.BN(x[:, self.half :])], 1)


class IBNDenseLayer(nn.Module):
    """A DenseNet layer whose first norm is an IBN layer, called with the list of features."""

    def __init__(self, cin: int, growth: int, ibn: bool = True) -> None:
        super().__init__()
        self.norm1 = IBN(cin) if ibn else nn.BatchNorm2d(cin)
        self.conv1, self.norm2 = nn.Conv2d(cin, 2 * growth, 1, bias=False), nn.BatchNorm2d(2 * growth)
        self.conv2 = nn.Conv2d(2 * growth, growth, 3, 1, 1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(features, 1)
        return self.conv2(F.relu(self.norm2(self.conv1(F.relu(self.norm1(x))))))


class IBNDenseBlock(nn.Module):
    def __init__(self, cin: int, growth: int, layers: int, ibn: bool = True) -> None:
        super().__init__()
        self.layers = nn.ModuleList(IBNDenseLayer(cin + i * growth, growth, ibn) for i in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(features))
        return torch.cat(features, 1)


class IBNBottleneck(nn.Module):
    """IBN-Net-a's bottleneck: the first norm of the branch is an IBN layer."""

    def __init__(self, c: int, width: int, ibn: bool = True) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, width, 1, bias=False), IBN(width) if ibn else nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, c, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        return F.relu(x + self.bn3(self.conv3(y)))


@pytest.mark.parametrize("kind", ["dense", "bottleneck"])
def test_normalised_halves_concatenated_are_no_inception_point(kind: str) -> None:
    def make(ibn: bool) -> nn.Module:
        torch.manual_seed(0)
        if kind == "dense":
            return nn.Sequential(conv_bn(3, 8), IBNDenseBlock(8, 4, 3, ibn))
        return nn.Sequential(conv_bn(3, 16), IBNBottleneck(16, 8, ibn), IBNBottleneck(16, 8, ibn))

    model = make(ibn=True)
    plan = find_sites(model, example_input=X)
    # The enclosing block keeps exactly the sites it has with a plain batch norm there.
    assert _sites(plan) == _sites(find_sites(make(ibn=False), example_input=X))
    assert plan.sites and not any(".norm1" in s.source or ".bn1" in s.source for s in plan.sites)
    ibn_cats = [s for s in plan.skipped if s.node.endswith(("norm1.cat", "bn1.cat"))]
    assert len(ibn_cats) == (3 if kind == "dense" else 2)
    if kind == "dense":  # no block encloses a dense layer's IBN: the reason is its own
        assert all(s.reason is SkipReason.LINEAR_BLOCK and "normalisation" in s.detail for s in ibn_cats)
    _exact(model, X)


def test_a_chain_of_ibn_layers_is_plain_not_inception() -> None:
    # An IBN layer between a convolution and its activation is the convolution's norm: no site
    # by default, and plain=True puts SE after the activation as for a batch norm.
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), IBN(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), IBN(8), nn.ReLU())
    plan = find_sites(model, example_input=X)
    assert plan.sites == () and [r for _, r in _skips(plan)] == [SkipReason.LINEAR_BLOCK] * 2
    plain = find_sites(model, example_input=X, plain=True)
    assert [(str(s.kind), s.source) for s in plain.sites] == [("plain", "2"), ("plain", "5")]
    _exact(model, X, plain=True)


def test_a_densenet_built_with_ibn_layers_keeps_its_dense_sites() -> None:
    import torchvision

    def make(ibn: bool) -> nn.Module:
        model = torchvision.models.densenet121(weights=None)
        if ibn:
            for name, m in list(model.named_modules()):
                if name.endswith(".norm1") and isinstance(m, nn.BatchNorm2d):
                    model.set_submodule(name, IBN(m.num_features))
        return model.eval()

    x = torch.randn(1, 3, 64, 64)
    model = make(True)
    plan, plain = find_sites(model, example_input=x), find_sites(make(False), example_input=x)
    layers = sum(isinstance(m, IBN) for m in model.modules())  # one dense site per layer, no more
    assert len(plan.sites) == layers and [(s.name, s.source) for s in plan.sites] == [(s.name, s.source) for s in plain.sites]
    assert {s.reason for s in plan.skipped if s.node.endswith("norm1.cat")} == {SkipReason.LINEAR_BLOCK}


# --- C. sparse aggregation (SparseNet) --------------------------------------------------------


def _sparse(n: int) -> list[int]:
    """The exponentially spaced features before the ``n``-th: ``n-1, n-2, n-4, n-8, ...``."""
    out, k = [], 1
    while k <= n:
        out.append(n - k)
        k *= 2
    return out


class SparseBlock(nn.Module):
    """SparseNet's aggregation: layer ``i`` reads only the outputs of layers ``i-1, i-2, i-4,
    ...`` (the block input counted as layer 0), and so does the block's output."""

    def __init__(self, cin: int, growth: int, layers: int) -> None:
        super().__init__()
        widths = [cin] + [growth] * layers
        self.out_channels = sum(widths[j] for j in _sparse(layers + 1))
        self.layers = nn.ModuleList()
        for i in range(layers):
            c = sum(widths[j] for j in _sparse(i + 1))
            self.layers.append(nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, growth, 3, 1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            picked = [features[j] for j in _sparse(len(features))]
            features.append(layer(torch.cat(picked, 1) if len(picked) > 1 else picked[0]))
        return torch.cat([features[j] for j in _sparse(len(features))], 1)


def test_sparse_aggregation_gets_one_se_per_new_input() -> None:
    first, second = SparseBlock(8, 4, 12), SparseBlock(8, 4, 9)
    model = nn.Sequential(conv_bn(3, 8), first, conv_bn(first.out_channels, 8), second, nn.Conv2d(second.out_channels, 8, 1))
    plan = find_sites(model, example_input=X)
    expected = [f"{b}.layers.{i}" for b, n in ((1, 12), (3, 9)) for i in range(n)]
    assert [(str(s.kind), s.source) for s in plan.sites] == [("dense", e) for e in expected]
    # Each SE scales a layer's output for every concatenation that reads it; the block inputs
    # (carried features) are never scaled, nothing is an Inception site.
    reads = {f"1.layers.{i}": sum(i + 1 in _sparse(n) for n in range(i + 2, 14)) for i in range(12)}
    for site in plan.sites[:12]:
        assert len(site.targets) == reads[site.source]
    assert plan.skipped == ()
    layers = _outputs(model, X, *expected)
    _, seen = _exact(model, X)
    for site in plan.sites:
        assert torch.equal(seen[site.name], layers[site.source])


# --- D. plain=True on a network that already has squeeze-excitation --------------------------


class Swish(nn.Module):
    """A hand-written Swish, traced through: ``x * sigmoid(x)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


class Squeeze(nn.Module):
    """An existing squeeze-excitation, its activation the network's shared one."""

    def __init__(self, c: int, act: nn.Module) -> None:
        super().__init__()
        self.reduce, self.expand, self.act = nn.Conv2d(c, c // 2, 1), nn.Conv2d(c // 2, c, 1), act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.expand(self.act(self.reduce(x.mean((2, 3), keepdim=True)))))


class MBConv(nn.Module):
    """An inverted residual without shortcut, with its own SE and the network's one activation."""

    def __init__(self, cin: int, cout: int, act: nn.Module, stride: int = 1) -> None:
        super().__init__()
        mid = 2 * cin
        self.conv_pw, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv_dw, self.bn2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid)
        self.se, self.act = Squeeze(mid, act), act
        self.conv_pwl, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn1(self.conv_pw(x)))
        y = self.act(self.bn2(self.conv_dw(y)))
        return self.bn3(self.conv_pwl(self.se(y)))


class SharedActNet(nn.Module):
    """One activation instance used by the stem, every block and every squeeze (as the
    EfficientNet ports that keep one ``Swish`` do)."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.swish = act
        self.stem, self.bn = nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8)
        self.blocks = nn.Sequential(MBConv(8, 8, act), MBConv(8, 16, act, 2), MBConv(16, 16, act))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.swish(self.bn(self.stem(x))))


@pytest.mark.parametrize("act", [nn.SiLU, Swish])
def test_plain_with_a_shared_activation_builds_what_it_lists_outside_the_squeezes(act: type[nn.Module]) -> None:
    model = SharedActNet(act())
    plan = find_sites(model, example_input=X, plain=True)
    assert all(str(s.kind) == "plain" and ".se." not in s.source for s in plan.sites)
    # The stem and both convolutions of every block, each at its own width: the one module
    # called everywhere owns no SE block, its callers are rebuilt around each call.
    assert [(s.owner, s.channels) for s in plan.sites] == [
        ("", 8), ("blocks.0", 16), ("blocks.0", 16), ("blocks.1", 16), ("blocks.1", 16), ("blocks.2", 32), ("blocks.2", 32)
    ]
    inside = [s for s in plan.skipped if ".se." in s.node]
    assert len(inside) == 6 and all(s.reason is SkipReason.ALREADY_ATTENDED for s in inside)
    _exact(model, X, plain=True)


def test_plain_on_efficientnet_stays_out_of_its_squeeze_excitation() -> None:
    import torchvision
    from torchvision.ops import Conv2dNormActivation, SqueezeExcitation

    model = torchvision.models.efficientnet_b0(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    plan = find_sites(model, example_input=x, plain=True)
    squeezes = [n for n, m in model.named_modules() if isinstance(m, SqueezeExcitation)]
    convs = [n for n, m in model.named_modules() if isinstance(m, Conv2dNormActivation) and isinstance(m[-1], nn.SiLU)]
    assert squeezes and [s.source for s in plan.sites] == [f"{n}.2" for n in convs]
    assert not any(s.source.startswith(tuple(f"{q}." for q in squeezes)) for s in plan.sites)
    assert all(max(s.spatial) > 1 for s in plan.sites)
    _exact(model, x, plain=True)


def test_plain_puts_nothing_on_maps_without_spatial_extent() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, 8, 1), nn.ReLU())
    plan = find_sites(model, example_input=X, plain=True)
    assert [s.source for s in plan.sites] == ["1"]
    assert [(s.node, s.reason) for s in plan.skipped] == [("4", SkipReason.NO_SPATIAL_EXTENT)]
    _exact(model, X, plain=True)


# --- E. control flow on sizes -----------------------------------------------------------------


class CroppedIdentity(nn.Module):
    """A residual unit with unpadded convolutions: the identity is cropped when sizes differ."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if out.size(-1) != identity.size(-1):
            identity = identity[..., 1:-1, 1:-1]
        return F.relu(out + identity)


def test_control_flow_on_sizes_is_decided_at_the_analysis_input() -> None:
    model = nn.Sequential(conv_bn(3, 8), CroppedIdentity(8), CroppedIdentity(8))
    plan = find_sites(model, example_input=X)
    assert _sites(plan) == [("1.se", "residual", "1.bn2"), ("2.se", "residual", "2.bn2")]
    assert plan.unanalysed == () and plan.skipped == ()
    # The plan says it was decided for this input size.
    assert len(plan.specialised) == 1 and "CroppedIdentity.forward branches on sizes" in plan.specialised[0]
    assert type(plan).from_dict(plan.to_dict()).specialised == plan.specialised
    branches = _outputs(model, X, "1.bn2", "2.bn2")
    _, seen = _exact(model, X)
    assert torch.equal(seen["1.se"], branches["1.bn2"]) and torch.equal(seen["2.se"], branches["2.bn2"])
    # Attached: the block's own code runs, so the injected model still works at other sizes.
    injected = inject_se(model, example_input=X).eval()
    with torch.no_grad():
        assert injected(torch.randn(1, 3, 21, 21)).shape == model(torch.randn(1, 3, 21, 21)).shape


def test_control_flow_on_data_stays_unanalysed() -> None:
    class OnData(CroppedIdentity):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
            if out.mean() > 0:  # reads values, not sizes: no trace can decide it
                out = out * 2
            return F.relu(out + x[..., 1:-1, 1:-1])

    plan = find_sites(nn.Sequential(conv_bn(3, 8), OnData(8)), example_input=X)
    assert [u.path for u in plan.unanalysed] == ["1"] and plan.specialised == ()


# --------------------------------------------------------------------------------------------
# Reversible couplings (RevNet): y1 = x1 + F(x2), y2 = x2 + G(y1), in an autograd.Function in
# train mode that frees its input (``x.data.set_()``)


class _Coupling(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, f: nn.Module, g: nn.Module) -> torch.Tensor:  # type: ignore[override]
        x1, x2 = x.chunk(2, 1)
        with torch.no_grad():
            y1 = x1 + f(x2)
            out = torch.cat([y1, x2 + g(y1)], 1)
        ctx.f, ctx.g = f, g
        ctx.save_for_backward(out)
        x.data.set_()  # freed: a reversible net recomputes it from the output in backward
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        (out,) = ctx.saved_tensors
        y1, y2 = out.chunk(2, 1)
        with torch.no_grad():  # the input, recomputed from the output
            x2 = y2 - ctx.g(y1)
            x = torch.cat([y1 - ctx.f(x2), x2], 1)
        x.requires_grad_()
        with torch.enable_grad():
            a, b = x.chunk(2, 1)
            z1 = a + ctx.f(b)
            z = torch.cat([z1, b + ctx.g(z1)], 1)
        (dx,) = torch.autograd.grad(z, [x], grad)
        return dx, None, None


class _RevBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.f, self.g = conv_bn_relu(c // 2, c // 2), conv_bn_relu(c // 2, c // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return _Coupling.apply(x.clone(), self.f, self.g)
        x1, x2 = x.chunk(2, 1)
        y1 = x1 + self.f(x2)
        return torch.cat([y1, x2 + self.g(y1)], 1)


def test_reversible_couplings_get_one_se_on_the_second_function_and_none_after_a_sum() -> None:
    # x2 is the shortcut of y2 = x2 + G(y1) (no parametric layer from the fork), not a block's
    # side output; F's sum lies in G's branch (nested, one SE per block); y2 is a sum, never scaled.
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), _RevBlock(16), _RevBlock(16))
    plan, seen = _exact(model, X)
    assert [(s.name, s.kind, s.source) for s in plan.sites] == [
        ("1.se", "residual", "1.g"), ("2.se", "residual", "2.g")]
    assert {(s.node, s.reason) for s in plan.skipped} == {
        ("1.add", "nested"), ("2.add", "nested"), ("1.cat", "no-computed-branch"), ("2.cat", "no-computed-branch")}



class _FreeingCoupling(torch.autograd.Function):
    """A reversible coupling run in both modes that frees its input after the call, as memory-
    saving RevNets do (``x.set_()``: the caller's tensor is then of size [0]); no backward here."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, f: nn.Module, g: nn.Module) -> torch.Tensor:  # type: ignore[override]
        x1, x2 = x.chunk(2, 1)
        y1 = x1 + f(x2)
        out = torch.cat([y1, x2 + g(y1)], 1)
        x.set_()
        return out


class _FreeingRevBlock(_RevBlock):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FreeingCoupling.apply(x, self.f, self.g)  # frees the caller's tensor


class _ProjectedCoupling(nn.Module):
    """RevNet's downsampling unit, not reversible: y1 = P1(x1) + F(x2), y2 = P2(x2) + G(y1),
    strided F and projections P."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        h, o = cin // 2, cout // 2
        self.f = nn.Sequential(conv_bn_relu(h, o, 3, 2), conv_bn(o, o))
        self.g = nn.Sequential(conv_bn_relu(o, o), conv_bn(o, o))
        self.p1, self.p2 = conv_bn(h, o, 1, 2), conv_bn(h, o, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, 1)
        y1 = self.p1(x1) + self.f(x2)
        return torch.cat([y1, self.p2(x2) + self.g(y1)], 1)


class _RevNet(nn.Module):
    """Reversible stages around a projected unit; the top level does not trace (it branches on
    data first), so its blocks are analysed from the inputs a real forward gave them."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.stage1 = nn.ModuleList([_FreeingRevBlock(16), _FreeingRevBlock(16)])
        self.down = _ProjectedCoupling(16, 32)
        self.stage2 = nn.ModuleList([_FreeingRevBlock(32), _FreeingRevBlock(32)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 1e9:  # data first: recorded on a real forward, whose inputs the blocks free
            x = x / 2
        x = self.stem(x)
        for block in [*self.stage1, self.down, *self.stage2]:
            x = block(x)
        return x


def test_a_reversible_net_freeing_its_inputs_keeps_the_shapes_its_blocks_were_called_with() -> None:
    # Each block's input is recorded as it was at the call: freed afterwards, it was analysed
    # as a tensor of size [0] and every reversible block was lost.
    model = _RevNet().eval()
    plan = find_sites(model, example_input=X)
    assert [u.path for u in plan.unanalysed] == [""]
    assert [(s.name, s.source, s.mechanism) for s in plan.sites] == [
        ("stage1.0.se", "stage1.0.g", "attached"), ("stage1.1.se", "stage1.1.g", "attached"),
        ("down.se", "down.g", "attached"),
        ("stage2.0.se", "stage2.0.g", "attached"), ("stage2.1.se", "stage2.1.g", "attached")]


def test_a_projected_coupling_is_a_residual_on_g_like_the_reversible_ones() -> None:
    # P2(x2) reads x2, which F also reads: a slice of the fork, not something F's branch
    # computed, so it is G's projected shortcut (it was taken for a skip sum, a fusion, and
    # the sum y2 itself got an SE as a dense input).
    model = nn.Sequential(nn.Conv2d(3, 16, 1), _ProjectedCoupling(16, 32))
    plan, _ = _exact(model, X)
    assert [(s.name, s.kind, s.source) for s in plan.sites] == [("1.se", "residual", "1.g")]
    assert {(s.node, s.reason) for s in plan.skipped} == {("1.add", "nested"), ("1.cat", "no-computed-branch")}

# --------------------------------------------------------------------------------------------
# Train-mode code that does not trace (issue 30, pattern 7): stochastic depth drawing a Python
# number, a shake-shake mix, drop-connect. Where the branch ends in a module the SE block is
# attached and the block's own train-mode code runs; where it ends in a function the block is
# rebuilt, and a rebuilt block must train as its original does, or its site is refused.


def _trains_alike(model: nn.Module, reference: nn.Module, x: torch.Tensor) -> None:
    """In train mode, from the same random numbers, ``model`` computes what ``reference`` does,
    and a backward pass runs (the gates start at 1: the outputs are the same)."""
    import random

    model.train()
    reference.train()
    for seed in range(4):
        outs = []
        for m in (reference, model):
            torch.manual_seed(seed)
            random.seed(seed)
            outs.append(m(x))
        assert torch.equal(outs[0], outs[1]), seed
    outs[1].mean().backward()


class _ShakeShake(nn.Module):
    """``x + alpha * b1(x) + (1 - alpha) * b2(x)``, alpha drawn per call in train mode; with
    ``functional_end`` the mix passes a ``tanh``, so the block is rebuilt."""

    def __init__(self, c: int, functional_end: bool = False) -> None:
        super().__init__()
        self.b1 = nn.Sequential(conv_bn(c, c), nn.ReLU(), conv_bn(c, c))
        self.b2 = nn.Sequential(conv_bn(c, c), nn.ReLU(), conv_bn(c, c))
        self.functional_end = functional_end

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = float(torch.rand(1)) if self.training else 0.5
        if self.functional_end:
            return torch.relu(x + torch.tanh(alpha * self.b1(x) + (1 - alpha) * self.b2(x)))
        return torch.relu(x + alpha * self.b1(x) + (1 - alpha) * self.b2(x))


class _DroppedBlock(nn.Module):
    """``x + tanh(conv2(relu(conv1(x))))``, its branch dropped in train mode as ``drop`` says."""

    def __init__(self, c: int, drop: str) -> None:
        super().__init__()
        self.conv1, self.conv2, self.drop = conv_bn(c, c), conv_bn(c, c), drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import random

        if self.training and self.drop == "torch.rand" and float(torch.rand(1)) < 0.5:
            return x  # stochastic depth decided by a number drawn on a real tensor
        if self.training and self.drop == "random" and random.random() < 0.5:
            return x  # ... or in Python
        out = torch.tanh(self.conv2(torch.relu(self.conv1(x))))
        if self.training and self.drop == "mask from sizes":  # drop-connect: sizes read while tracing
            out = out * (torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.8) / 0.8
        if self.training and self.drop == "bernoulli":  # drop-connect: a mask the graph draws
            out = out * x.new_empty(x.shape[0], 1, 1, 1).bernoulli_(0.8) / 0.8
        return x + out


def test_shake_shake_ending_in_modules_is_attached_and_trains_as_before() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 1), _ShakeShake(8), _ShakeShake(8))
    reference = copy.deepcopy(model)
    plan, _ = _exact(model, X)  # injects ``model`` in place
    assert [(s.name, s.source, s.mechanism) for s in plan.sites] == [
        ("1.se_b1", "1.b1", "attached"), ("1.se_b2", "1.b2", "attached"),
        ("2.se_b1", "2.b1", "attached"), ("2.se_b2", "2.b2", "attached")]
    _trains_alike(model, reference, X)


@pytest.mark.parametrize(
    ("block", "why"),
    [
        (lambda: _ShakeShake(8, functional_end=True), "draws random numbers outside the graph (torch's"),
        (lambda: _DroppedBlock(8, "torch.rand"), "draws random numbers outside the graph (torch's"),
        (lambda: _DroppedBlock(8, "random"), "draws random numbers outside the graph (Python's"),
        (lambda: _DroppedBlock(8, "mask from sizes"), "train-mode forward does not trace (TypeError"),
    ],
    ids=["shake-shake", "stochastic depth, torch", "stochastic depth, Python", "drop-connect from sizes"],
)
def test_a_rebuilt_block_whose_train_mode_code_does_not_trace_is_refused_with_why(block, why: str) -> None:
    # A trace draws a Python-side random number once and bakes it in; rebuilt from that graph,
    # the block would train with one mix (or one drop decision) forever. Its site is refused.
    model = nn.Sequential(nn.Conv2d(3, 8, 1), block(), block()).eval()
    reference = copy.deepcopy(model)
    plan = find_sites(model, example_input=X)
    assert plan.sites == ()
    refused = [s for s in plan.skipped if s.reason is SkipReason.NOT_REWRITABLE]
    assert [s.node[0] for s in refused] == ["1", "2"]
    assert all(s.detail.startswith("TrainModeError: its ") and why in s.detail for s in refused), refused
    with pytest.warns(UserWarning, match="no SE site"):
        injected = inject_se(model, example_input=X)
    _trains_alike(injected, reference, X)


def test_a_drop_connect_mask_the_graph_draws_keeps_its_site_in_both_modes() -> None:
    # ``out * mask`` feeds the sum in train mode only: the SE block scales ``out`` for all its
    # readers in both graphs, and the rebuilt block draws the mask as its original does.
    model = nn.Sequential(nn.Conv2d(3, 8, 1), _DroppedBlock(8, "bernoulli"), _DroppedBlock(8, "bernoulli"))
    reference = copy.deepcopy(model)
    plan, _ = _exact(model, X)  # injects ``model`` in place
    assert [(s.name, s.source, s.mechanism) for s in plan.sites] == [
        ("1.se", "1.tanh", "rebuilt"), ("2.se", "2.tanh", "rebuilt")]
    _trains_alike(model, reference, X)
    graphs = model[1].__dict__["_se_graphs"]
    assert graphs[1] is not None and "se" in graphs[1].python_code("self").src


def test_a_rebuilt_block_that_trains_otherwise_is_caught_by_the_post_build_check(monkeypatch) -> None:
    # The plan's refusal is the first guard; the post-build check runs each block with a train
    # graph of its own in train mode, from the same random numbers as its original, and refuses.
    import contextlib

    import se_inject.analysis.owners as owners
    from se_inject.analysis.draws import RandomDraws
    from se_inject.errors import UnfaithfulRebuildError

    monkeypatch.setattr(owners, "watch_random_draws", lambda: contextlib.nullcontext(RandomDraws()))
    model = nn.Sequential(nn.Conv2d(3, 8, 1), _ShakeShake(8, functional_end=True)).eval()
    assert [s.mechanism for s in find_sites(model, example_input=X).sites] == ["rebuilt"]
    with pytest.raises(UnfaithfulRebuildError, match="in train mode"):
        inject_se(model, example_input=X)
    assert type(model[1]) is _ShakeShake
