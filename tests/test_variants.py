"""Issue 6 on the API: placement variants, stage selection, squeeze/excitation variants,
plain networks and token sequences."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from nets import Inception, conv_bn
from torch import nn

from se_inject import SEBlock, find_sites, inject_se
from se_inject.errors import ConfigError


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def _inject_is_identity(model: nn.Module, x: torch.Tensor, **kwargs) -> nn.Module:
    model = copy.deepcopy(model)
    with torch.no_grad():
        before = model(x)
        injected = inject_se(model, **kwargs)
        assert torch.equal(injected(x), before)
    return injected


def _delta(plan) -> int:
    return sum(2 * s.channels * s.hidden + s.hidden + s.channels for s in plan.sites)


@pytest.mark.parametrize(
    ("placement", "source", "targets", "channels"),
    [
        # standard: end of the branch (bn2), before the sum
        ("standard", "layer2.0.bn2", ("layer2.0.add",), 128),
        # pre: the block's input, read unscaled by the downsample shortcut, scaled for conv1
        ("pre", "layer2.0.<input0>", ("layer2.0.conv1",), 64),
        # inner: after the last spatial conv (conv2, 3x3) and its norm; in a BasicBlock that is bn2
        ("inner", "layer2.0.bn2", ("layer2.0.add",), 128),
    ],
)
def test_resnet18_placements(resnet18: nn.Module, placement: str, source: str, targets: tuple, channels: int) -> None:
    plan = find_sites(resnet18, placement=placement)
    site = next(s for s in plan.sites if s.owner == "layer2.0")
    assert (site.source, site.targets, site.channels) == (source, targets, channels)
    assert plan.added_params == _delta(plan)
    _inject_is_identity(resnet18, torch.randn(2, 3, 32, 32), placement=placement)


def test_pre_placement_leaves_the_shortcut_unscaled(resnet18: nn.Module) -> None:
    model = _inject_is_identity(resnet18, torch.randn(2, 3, 32, 32), placement="pre")
    block = model.layer2[0]
    graph = block.graph
    se = next(n for n in graph.nodes if n.op == "call_module" and n.target == "se")
    downsample = next(n for n in graph.nodes if n.op == "call_module" and n.target == "downsample")
    assert se.args[0].op == "placeholder" and downsample.args[0] is se.args[0]
    assert [u.target for u in se.users] == ["conv1"]


def test_inner_placement_in_a_bottleneck_has_fewer_parameters() -> None:
    model = torchvision.models.resnet50().eval()
    standard, inner = find_sites(model), find_sites(model, placement="inner")
    site = inner.sites[0]
    # conv2 (3x3) -> bn2 -> relu, then conv3: the block squeezes the 64 mid channels.
    assert (site.source, site.targets, site.channels) == ("layer1.0.relu_1", ("layer1.0.conv3",), 64)
    assert inner.added_params < standard.added_params / 10
    _inject_is_identity(model, torch.randn(1, 3, 32, 32), placement="inner")


@pytest.mark.parametrize("placement", ["standard", "pre", "inner"])
def test_inception_placements(placement: str) -> None:
    model = nn.Sequential(conv_bn(3, 8), Inception(8, (4, 6), pool_branch=True)).eval()
    (site,) = find_sites(model, placement=placement).sites
    if placement == "pre":  # the module's input, for every branch (the whole module is F_tr)
        assert (site.source, site.targets, site.channels) == (
            "1.<input0>", ("1.branches.0", "1.branches.1", "1.max_pool2d"), 8
        )
    else:  # "inner" is a residual-branch variant: an Inception module keeps the standard place
        assert (site.source, site.targets, site.channels) == ("1.cat", (), 18)
    _inject_is_identity(model, torch.randn(2, 3, 8, 8), placement=placement)


@pytest.mark.parametrize("placement", ["post", "identity"])
def test_trunk_placements_are_refused_with_the_reason(resnet18: nn.Module, placement: str) -> None:
    with pytest.raises(ConfigError, match="scales the trunk"):
        find_sites(resnet18, placement=placement)


@pytest.mark.parametrize(
    ("stage", "added"), [(0, 24_576), (1, 131_072), (2, 786_432), (3, 1_572_864), (None, 2_514_944)]
)
def test_resnet50_stage_ablation_matches_table_13(stage: int | None, added: int) -> None:
    model = torchvision.models.resnet50()
    plan = find_sites(model, bias=False, stages=None if stage is None else [stage])
    assert plan.added_params == added
    if stage is not None:
        assert {s.owner.split(".")[0] for s in plan.sites} == {f"layer{stage + 1}"}
        assert all(s.reason == "excluded" for s in plan.skipped)
    # Table 13's column, in millions, as the paper rounds it: conv2_x 25.6, conv3_x 25.7,
    # conv4_x 26.4 (exactly 26.34 here), all 28.1; conv5_x alone is not in the table.
    total = sum(p.numel() for p in model.parameters()) + added
    paper = {0: 25.6, 1: 25.7, 2: 26.4, 3: 27.1, None: 28.1}[stage]
    assert abs(total / 1e6 - paper) <= 0.1


def test_selection_by_resolution() -> None:
    plan = find_sites(torchvision.models.resnet50(), resolutions=[14])  # layer3 at 224 px
    assert {s.owner.split(".")[0] for s in plan.sites} == {"layer3"} and {s.spatial for s in plan.sites} == {(14, 14)}


@pytest.mark.parametrize(
    ("kwargs", "identity"),
    [
        ({"pool": "max"}, True),
        ({"gate": "one_plus_tanh"}, True),
        ({"hidden": 4}, True),
        ({"identity_init": False}, False),
        ({"identity_init": False, "gate": "tanh"}, False),
    ],
)
def test_squeeze_and_excitation_variants(resnet18: nn.Module, kwargs: dict, identity: bool) -> None:
    model = copy.deepcopy(resnet18)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        inject_se(model, **kwargs)
        assert torch.equal(model(x), before) is identity
    blocks = [m for m in model.modules() if isinstance(m, SEBlock)]
    assert len(blocks) == 8
    if "hidden" in kwargs:
        assert {b.hidden for b in blocks} == {4}
    if "pool" in kwargs:
        assert {b.pool_name for b in blocks} == {"max"}


def test_identity_start_needs_an_identity_gate(resnet18: nn.Module) -> None:
    with pytest.raises(ConfigError, match="cannot start as an identity"):
        find_sites(resnet18, gate="sigmoid")


@pytest.mark.parametrize(("name", "sites"), [("vgg11", 8), ("alexnet", 5)])
def test_plain_networks_opt_in(name: str, sites: int) -> None:
    model = torchvision.models.get_model(name).eval()
    assert find_sites(model).sites == ()
    plan = find_sites(model, plain=True)
    assert len(plan.sites) == sites and {str(s.kind) for s in plan.sites} == {"plain"}
    # after the non-linearity that follows the convolution
    assert plan.sites[0].source == "features.1" and isinstance(model.features[1], nn.ReLU)
    _inject_is_identity(model, torch.randn(1, 3, 64 if name == "vgg11" else 96, 64 if name == "vgg11" else 96), plain=True)


def test_plain_mode_leaves_residual_networks_to_the_default_policy(resnet18: nn.Module) -> None:
    plain, default = find_sites(resnet18, plain=True), find_sites(resnet18)
    assert (plain.sites, plain.skipped) == (default.sites, default.skipped)
    assert plain.selection.plain and not default.selection.plain  # each plan records what was asked


def test_token_sequences_opt_in_with_class_token_left_out() -> None:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=5
    ).eval()
    assert find_sites(model).sites == ()
    plan = find_sites(model, tokens=True)
    assert len(plan.sites) == 4
    assert {(s.channel_axis, s.prefix_tokens, s.channels) for s in plan.sites} == {(-1, 1, 16)}
    injected = _inject_is_identity(model, torch.randn(2, 3, 32, 32), tokens=True)
    block = next(m for m in injected.modules() if isinstance(m, SEBlock))
    nn.init.normal_(block.fc2.weight)
    tokens = torch.randn(2, 17, 16)
    changed = tokens.clone()
    changed[:, 0] += 100.0  # the class token must not move the gate
    gate_ratio = block(tokens)[:, 1:] / tokens[:, 1:]
    assert torch.allclose(block(changed)[:, 1:] / changed[:, 1:], gate_ratio)


def test_timm_vit_tokens_with_optional_forward_arguments() -> None:
    # timm's blocks take attn_mask=None by keyword and the model's forward has optional
    # arguments too: they must be traced as the defaults they are, not as inputs.
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", depth=2, num_classes=3).eval()
    assert [s.reason for s in find_sites(model).skipped] == ["token-sequence"] * 4
    plan = find_sites(model, tokens=True)
    assert [(s.owner, s.prefix_tokens, s.channels) for s in plan.sites] == [("blocks.0", 1, 192)] * 2 + [("blocks.1", 1, 192)] * 2
    _inject_is_identity(model, torch.randn(1, 3, 224, 224), tokens=True)
