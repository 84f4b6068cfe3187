"""Placement rules that hold beyond the zoo (placement rules 1, 3, 4, 7, 9-12): one small
hand-made net per class of graph, asserting sites, kinds, skip reasons, bit-exact outputs and
that the SE block squeezes the branch, never the trunk."""

from __future__ import annotations

import pytest
import torch
from nets import (
    OSA,
    CrossStage,
    DeepLabDecoder,
    DetectHead,
    DualPath,
    MixedConv,
    MixedInvertedResidual,
    PermutedScale,
    PoolMixer,
    RepBlock,
    Stage,
    SumThenNew,
    Tree,
    TwoTowers,
    UNetLike,
    conv_bn,
    se_inputs,
)
from torch import nn

from se_inject import SEBlock, SkipReason, find_sites, inject_se

X = torch.randn(2, 3, 16, 16)


def _inject(model: nn.Module, **kwargs) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Inject, check outputs are bit-exact, and return the input each SE block received."""
    model.eval()
    with torch.no_grad():
        before = model(X)
        injected = inject_se(model, **kwargs)
    after, seen = se_inputs(injected, X)
    assert torch.equal(before, after)
    return injected, seen


def _outputs(model: nn.Module, *paths: str) -> dict[str, torch.Tensor]:
    """Outputs of the named submodules on ``X`` (the branches SE blocks must squeeze)."""
    got: dict[str, torch.Tensor] = {}
    model.eval()
    hooks = [model.get_submodule(p).register_forward_hook(lambda m, a, o, p=p: got.__setitem__(p, o)) for p in paths]
    with torch.no_grad():
        model(X)
    for h in hooks:
        h.remove()
    return got


def _reasons(plan) -> list[tuple[str, SkipReason]]:
    return [(s.node, s.reason) for s in plan.skipped]


@pytest.mark.parametrize("spelling", ["slice", "narrow", "split"])
def test_channel_slices_keep_the_axis_and_partial_residuals_scale_the_whole_branch(spelling: str) -> None:
    # Rule 4 and 9: dual-path blocks, x[:, :k] + y[:, :k] beside carried x[:, k:] and new y[:, k:].
    model = nn.Sequential(conv_bn(3, 8), DualPath(8, 4, 4, spelling), DualPath(12, 4, 4, spelling))
    plan = find_sites(model)
    assert [(s.name, str(s.kind), s.source, s.channel_axis, s.channels) for s in plan.sites] == [
        ("1.se", "residual", "1.branch", 1, 8), ("2.se", "residual", "2.branch", 1, 8)
    ]
    assert {r for _, r in _reasons(plan)} == {SkipReason.NESTED}  # the new half: same block, same SE
    branches = _outputs(model, "1.branch", "2.branch")
    _, seen = _inject(model)
    assert torch.equal(seen["1.se"], branches["1.branch"]) and torch.equal(seen["2.se"], branches["2.branch"])


def test_shortcut_passed_in_by_the_parent_is_a_residual_and_its_block_is_rebuilt() -> None:
    # Rule 7: DLA trees, blocks called with (x, shortcut), nested trees, an nn.Identity projection.
    model = nn.Sequential(conv_bn(3, 8), Tree(8, levels=2, project=False))
    plan = find_sites(model)
    blocks = ["1.tree1.tree1", "1.tree1.tree2", "1.tree2.tree1", "1.tree2.tree2"]
    assert [(s.name, s.owner, str(s.kind), s.source) for s in plan.sites] == [
        (f"{b}.se", b, "residual", f"{b}.branch") for b in blocks
    ]
    # Rule 9: the roots aggregate finished residual blocks: none of their own.
    assert _reasons(plan) == [(c, SkipReason.NO_COMPUTED_BRANCH) for c in ("1.tree1.cat", "1.tree2.cat", "1.cat")]
    branches = _outputs(model, *(f"{b}.branch" for b in blocks))
    injected, seen = _inject(model)
    for b in blocks:
        assert torch.equal(seen[f"{b}.se"], branches[f"{b}.branch"])
    assert type(injected[1]) is Tree  # the tree itself is not rebuilt: each block is


def test_projection_passed_in_is_the_trunk() -> None:
    model = nn.Sequential(conv_bn(3, 8), Tree(8, levels=1, project=True))
    plan = find_sites(model)
    assert [s.source for s in plan.sites] == ["1.tree1.branch", "1.tree2.branch"]
    _inject(model)


def test_a_sum_inside_a_concatenation_is_trunk_and_the_new_input_is_dense() -> None:
    # Rule 9: cat([x + branch(x), new(x)]) -> a residual site on branch, a dense site on new.
    model = nn.Sequential(conv_bn(3, 8), SumThenNew(8, 4), conv_bn(12, 12))
    plan = find_sites(model)
    assert [(str(s.kind), s.source, s.targets) for s in plan.sites] == [
        ("residual", "1.branch", ("1.add",)), ("dense", "1.new", ("1.cat",))
    ]
    assert plan.skipped == ()
    outs = _outputs(model, "1.branch", "1.new")
    _, seen = _inject(model)
    assert torch.equal(seen["1.se_branch"], outs["1.branch"]) and torch.equal(seen["1.se_new"], outs["1.new"])


@pytest.mark.parametrize("transition", [True, False])
def test_cross_stage_aggregation_gets_no_site_of_its_own(transition: bool) -> None:
    # Rule 9: CSP / C2f: the concatenation of carried channels and finished residual blocks.
    model = nn.Sequential(conv_bn(3, 8), CrossStage(8, transition=transition))
    plan = find_sites(model)
    assert [(s.name, str(s.kind)) for s in plan.sites] == [("1.blocks.0.se", "residual"), ("1.blocks.1.se", "residual")]
    assert _reasons(plan) == [("1.cat", SkipReason.NO_COMPUTED_BRANCH)]
    _inject(model)


def test_blocks_inside_a_stage_with_channel_attention_after_them_are_attended() -> None:
    # Rule 11: the enclosing block's attention (CSPNeXt: on the stage's concatenation, after
    # its residual blocks) counts for the blocks inside it.
    plan = find_sites(nn.Sequential(conv_bn(3, 8), CrossStage(8, attention=True)))
    assert plan.sites == ()
    assert _reasons(plan) == [
        ("1.blocks.0.add", SkipReason.ALREADY_ATTENDED), ("1.blocks.1.add", SkipReason.ALREADY_ATTENDED),
        ("1.cat", SkipReason.NO_COMPUTED_BRANCH),
    ]
    assert "enclosing block gated at 1.mul" in plan.skipped[0].detail


def test_a_sibling_blocks_attention_is_not_the_enclosing_blocks() -> None:
    plan = find_sites(nn.Sequential(conv_bn(3, 8), Stage(8)))
    assert [s.name for s in plan.sites] == ["1.plain.se"]
    assert _reasons(plan) == [("1.attended.add", SkipReason.ALREADY_ATTENDED)]


def test_reparameterisable_blocks_are_one_layer() -> None:
    # Rule 10: conv kxk + conv 1x1 + identity BN, summed: no site inside, with the reason.
    model = nn.Sequential(RepBlock(3), RepBlock(3))
    plan = find_sites(model)
    assert plan.sites == ()
    assert _reasons(plan) == [(f"{i}.{a}", SkipReason.LINEAR_BLOCK) for i in (0, 1) for a in ("add", "add_1")]
    assert "parallel linear paths" in plan.skipped[0].detail and plan.skipped[0].text.startswith("parallel linear")


def test_split_convolution_is_one_layer_and_a_non_linear_one_inside_attention_is_attended() -> None:
    # Rule 10: MixedConv (split -> conv per slice -> cat) is one grouped convolution.
    plan = find_sites(nn.Sequential(conv_bn(3, 8), MixedConv(8), nn.ReLU(), conv_bn(8, 8)))
    assert plan.sites == () and _reasons(plan) == [("1.cat", SkipReason.LINEAR_BLOCK)]
    # Rule 11: with a ReLU per slice it is Inception-like, but its enclosing block has SE.
    model = nn.Sequential(conv_bn(3, 8), MixedInvertedResidual(8))
    plan = find_sites(model)
    assert plan.sites == ()
    assert _reasons(plan) == [("1.conv_dw.cat", SkipReason.ALREADY_ATTENDED)]
    assert "1.mul" in plan.skipped[0].detail


@pytest.mark.parametrize("norm", ["affine", "plain"])
def test_pooling_mixer_is_a_branch_with_a_norm_and_one_layer_without(norm: str) -> None:
    # Rule 1: [x * res_scale] + ls * (pool(norm(x)) - norm(x)): a per-sample norm (with or
    # without weights) makes a branch; the identity side is the trunk and the SE squeezes the
    # mixer output before the layer scale. Rule 10: without the norm the mixer is linear.
    model = nn.Sequential(conv_bn(3, 8), PoolMixer(8, norm), PoolMixer(8, None))
    plan = find_sites(model)
    mul = "1.mul_1" if norm == "affine" else "1.mul"
    assert [(s.name, str(s.kind), s.source, s.targets) for s in plan.sites] == [("1.se", "residual", "1.sub", (mul,))]
    assert _reasons(plan) == [("2.add", SkipReason.LINEAR_BLOCK)]
    block_input = _outputs(model, "0")["0"]
    _, seen = _inject(model)
    mixer = model[1]
    with torch.no_grad():
        y = mixer.norm(block_input)
        assert torch.equal(seen["1.se"], mixer.pool(y) - y)


def test_layer_scale_behind_a_permute_is_stepped_over() -> None:
    # Rule 1: EdgeNeXt: gamma * mlp(x) permuted back before the sum; SE on the MLP output.
    model = nn.Sequential(conv_bn(3, 8), PermutedScale(8))
    (site,) = find_sites(model).sites
    assert (site.source, site.targets, site.channel_axis, site.channels) == ("1.fc2", ("1.mul",), -1, 8)
    fc2 = _outputs(model, "1.fc2")["1.fc2"]
    _, seen = _inject(model)
    assert torch.equal(seen["1.se"], fc2)


@pytest.mark.parametrize(
    ("model", "why"),
    [
        (nn.Sequential(conv_bn(3, 8), UNetLike(8)), "coarser resolution"),
        (nn.Sequential(conv_bn(3, 8), UNetLike(8, transpose=True)), "coarser resolution"),
        (nn.Sequential(conv_bn(3, 8), DeepLabDecoder(8)), "coarser resolution"),
        (nn.Sequential(conv_bn(3, 8), TwoTowers(8)), "6+ parametric layers from 0.1"),
    ],
    ids=["unet-upsample", "unet-transposed-conv", "deeplab-v3plus", "two-deep-towers"],
)
def test_cross_resolution_and_distant_concatenations_are_fusions(model: nn.Module, why: str) -> None:
    # Rule 12: upsampled deep features joined with a skip; inputs that all lie far from the fork.
    plan = find_sites(model)
    assert plan.sites == ()
    assert _reasons(plan) == [("1.cat", SkipReason.FUSION)]
    assert why in plan.skipped[0].detail


def test_shallow_towers_are_an_inception_module() -> None:
    model = nn.Sequential(conv_bn(3, 8), TwoTowers(8, depth=2))
    (site,) = find_sites(model).sites
    assert (str(site.kind), site.source) == ("inception", "1.cat")
    _inject(model)


def test_prediction_concatenation_is_not_a_candidate() -> None:
    # Rule 12: box and class predictions joined as the output, read by no later layer.
    plan = find_sites(DetectHead(8))
    assert plan.sites == () and plan.skipped == ()


def test_osa_chain_gets_one_se_per_new_layer() -> None:
    # Rule 3: every layer computed between the fork and the concatenation is new.
    model = nn.Sequential(conv_bn(3, 8), OSA(8, 4, layers=3))
    plan = find_sites(model)
    # Each SE scales its layer's output where the concatenation reads it; the chain goes on unscaled.
    assert [(str(s.kind), s.source, s.targets) for s in plan.sites] == [
        ("dense", f"1.layers.{i}", ("1.cat",)) for i in range(3)
    ]
    assert plan.skipped == ()
    outs = _outputs(model, "1.layers.0", "1.layers.1", "1.layers.2")
    _, seen = _inject(model)
    for i, name in enumerate(["1.se_layers_0", "1.se_layers_1", "1.se_layers_2"]):
        assert torch.equal(seen[name], outs[f"1.layers.{i}"])


def _conv_calls(model: nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    calls = [0]
    hooks = [
        m.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        for m in model.modules()
        if isinstance(m, nn.Conv2d)
    ]
    with torch.no_grad():
        y = model(x)
    for h in hooks:
        h.remove()
    return calls[0], y


def _check_fusion_after_plain_injection(make: callable, x: torch.Tensor, blocks: int) -> None:
    """plain=True on a re-parameterisable net: SE after each block, outside it; timm's
    ``reparameterize_model`` then fuses every block of the injected model."""
    from timm.utils.model import reparameterize_model

    torch.manual_seed(0)
    model = make().eval()
    plan = find_sites(model, plain=True, example_input=x)
    assert len(plan.sites) == blocks and {str(s.kind) for s in plan.sites} == {"plain"}
    assert all(s.inline == () for s in plan.sites)  # no block is traced through: they stay whole
    with torch.no_grad():
        before = model(x)
        injected = inject_se(model, plain=True, example_input=x)
        assert torch.equal(before, injected(x))
    for se in (m for m in injected.modules() if isinstance(m, SEBlock)):
        for p in se.parameters():
            p.data.normal_(0, 0.2)  # gates away from 1, so they matter
    unfused_calls, unfused = _conv_calls(injected, x)
    fused_calls, fused = _conv_calls(reparameterize_model(injected), x)
    torch.manual_seed(0)
    original_calls, _ = _conv_calls(reparameterize_model(make().eval()), x)
    assert fused_calls == original_calls < unfused_calls
    scale = unfused.abs().max()
    assert (fused - unfused).abs().max() <= 1e-4 * scale


def test_plain_injection_keeps_a_reparameterisable_net_fusable() -> None:
    make = lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), RepBlock(8), RepBlock(8))  # noqa: E731
    _check_fusion_after_plain_injection(make, torch.randn(2, 3, 16, 16), blocks=2)
    plan = find_sites(make(), plain=True)
    assert [(s.name, s.owner, s.source) for s in plan.sites] == [("se_1", "", "1"), ("se_2", "", "2")]


def test_plain_injection_keeps_timm_repvgg_fusable() -> None:
    import timm

    make = lambda: timm.create_model("repvgg_a0", pretrained=False)  # noqa: E731
    _check_fusion_after_plain_injection(make, torch.randn(1, 3, 64, 64), blocks=22)


def test_blocks_called_with_a_shortcut_rebuild_from_a_saved_plan() -> None:
    # Rule 7 and 14: the plan records how many tensors each owner is called with, so a plan
    # read back from plain data rebuilds DLA-style blocks with their shortcut argument.
    from se_inject import Plan, apply_plan

    torch.manual_seed(0)
    model = nn.Sequential(conv_bn(3, 8), Tree(8, levels=2, project=True)).eval()
    plan = find_sites(model)
    assert {s.owner: s.owner_args for s in plan.sites} == {
        "1.tree1.tree1": 2, "1.tree1.tree2": 1, "1.tree2.tree1": 2, "1.tree2.tree2": 1
    }
    copy = Plan.from_dict(plan.to_dict())
    assert copy == plan
    rebuilt = apply_plan(model, copy)
    for se in (m for m in rebuilt.modules() if isinstance(m, SEBlock)):
        for p in se.parameters():
            p.data.normal_(0, 0.2)  # gates away from 1
    block = rebuilt[1].tree1.tree1
    a, shortcut = torch.randn(2, 8, 16, 16), torch.randn(2, 8, 16, 16)
    with torch.no_grad():
        assert torch.equal(block(a, shortcut), torch.relu(shortcut + block.se(block.branch.forward(a))))  # forward: without the hook
