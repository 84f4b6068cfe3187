"""Placement rules, round 4 (issue 30): the classic families. A residual branch that leaves its
resolution and comes back (hourglass units, self-calibrated convolutions, decoder units that
upsample on both operands), normalised halves concatenated (IBN layers), sparse aggregation
(SparseNet), ``plain=True`` on a network that already has squeeze-excitation, and control
flow on sizes (a cropped identity)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from nets import PlainResidual, conv_bn, conv_bn_relu
from torch import nn

from se_inject import SEBlock, SkipReason, find_sites, inject_se
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
        seen: dict[str, torch.Tensor] = {}
        hooks = [
            m.register_forward_hook(lambda mod, a, o, name=name: seen.__setitem__(name, a[0]))
            for name, m in injected.named_modules()
            if isinstance(m, SEBlock)
        ]
        after = injected(x)
    for h in hooks:
        h.remove()
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
