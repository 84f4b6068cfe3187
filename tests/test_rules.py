"""Golden plans on tiny hand-made modules, one per placement rule (README, "How sites are found")."""

from __future__ import annotations

import pytest
import torch
from nets import (
    ChannelsLast,
    Dense,
    Gated,
    Inception,
    OptionalArg,
    PassesList,
    Res2NetLike,
    Residual,
    Residual1d,
    Residual3d,
    RootResidual,
    Tokens,
    TwoInputFusion,
    Untraceable,
    conv_bn,
)
from torch import nn

from se_inject import SEBlock, SkipReason, find_sites, inject_se
from se_inject.errors import ConfigError


def _identity(model: nn.Module, *inputs: torch.Tensor, **kwargs) -> nn.Module:
    model.eval()
    with torch.no_grad():
        before = model(*inputs)
        injected = inject_se(model, **kwargs)
        after = injected(*inputs)
    assert torch.equal(before, after)
    return injected


@pytest.mark.parametrize("spelling", ["+", "+=", "torch.add", "add_"])
def test_residual_site_on_the_branch_before_the_sum(spelling: str) -> None:
    model = nn.Sequential(conv_bn(3, 8), Residual(8, spelling=spelling))
    plan = find_sites(model)
    assert [(s.name, str(s.kind), s.source, s.channels, s.hidden, s.channel_axis) for s in plan.sites] == [
        ("1.se", "residual", "1.branch", 8, 8, 1)
    ]
    _identity(model, torch.randn(2, 3, 16, 16))


def test_projection_shortcut_is_the_trunk() -> None:
    plan = find_sites(nn.Sequential(Residual(3, 8, stride=2)))
    assert [s.source for s in plan.sites] == ["0.branch"]


@pytest.mark.parametrize(
    ("kwargs", "target"),
    [({"layer_scale": True}, "0.mul"), ({"scale": 0.2}, "0.mul"), ({"dropout": True}, "0.dropout")],
)
def test_site_goes_before_trailing_scalings(kwargs: dict, target: str) -> None:
    model = nn.Sequential(Residual(4, **kwargs))
    (site,) = find_sites(model).sites
    assert (site.source, site.targets) == ("0.branch", (target,))
    _identity(model, torch.randn(2, 4, 8, 8))


def test_inception_site_after_the_concatenation() -> None:
    model = nn.Sequential(Inception(4, (4, 6), pool_branch=True))
    (site,) = find_sites(model).sites
    assert (str(site.kind), site.source, site.targets, site.channels) == ("inception", "0.cat", (), 14)
    _identity(model, torch.randn(2, 4, 8, 8))


def test_dense_sites_on_new_features_only() -> None:
    model = nn.Sequential(Dense(4, 3, layers=3))
    plan = find_sites(model)
    assert [(str(s.kind), s.source, s.channels) for s in plan.sites] == [
        ("dense", "0.layers.0", 3), ("dense", "0.layers.1", 3), ("dense", "0.layers.2", 3)
    ]
    _identity(model, torch.randn(2, 4, 8, 8))


def test_existing_attention_is_skipped_with_evidence() -> None:
    plan = find_sites(nn.Sequential(Gated(8)))
    assert plan.sites == ()
    (skip,) = plan.skipped
    assert skip.reason is SkipReason.ALREADY_ATTENDED and "0.mul" in skip.detail


def test_channels_last_maps_scale_the_last_axis() -> None:
    model = nn.Sequential(ChannelsLast(6))
    (site,) = find_sites(model, example_input=torch.randn(2, 5, 5, 6)).sites
    assert (site.channel_axis, site.channels) == (-1, 6)
    _identity(model, torch.randn(2, 5, 5, 6), example_input=torch.randn(2, 5, 5, 6))


def test_token_sequences_are_skipped_and_parameter_adds_are_no_candidates() -> None:
    plan = find_sites(Tokens(6, 10), example_input=torch.randn(2, 10, 6))
    assert plan.sites == ()
    assert [(s.node, s.reason) for s in plan.skipped] == [("add_1", SkipReason.TOKEN_SEQUENCE)]


def test_sums_of_different_inputs_are_fusions() -> None:
    x = torch.randn(2, 4, 8, 8)
    plan = find_sites(TwoInputFusion(4), example_input=(x, x))
    assert plan.sites == ()
    assert [s.reason for s in plan.skipped] == [SkipReason.FUSION]


def test_hierarchical_sums_inside_a_branch_are_nested() -> None:
    plan = find_sites(nn.Sequential(conv_bn(3, 8), Res2NetLike(8)))
    assert [s.source for s in plan.sites] == ["1.conv3"]
    assert sorted(s.reason for s in plan.skipped) == [SkipReason.NESTED, SkipReason.NESTED]


@pytest.mark.parametrize(("block", "shape"), [(Residual1d(4), (2, 4, 16)), (Residual3d(4), (2, 4, 4, 6, 6))])
def test_1d_and_3d_feature_maps(block: nn.Module, shape: tuple[int, ...]) -> None:
    model = nn.Sequential(block)
    (site,) = find_sites(model).sites
    assert (site.channel_axis, site.channels) == (1, 4)
    _identity(model, torch.randn(shape))


def test_untraceable_top_level_gets_sites_in_its_blocks() -> None:
    model = Untraceable()
    plan = find_sites(model)
    assert [s.name for s in plan.sites] == ["block1.se", "block2.se"]
    assert [u.path for u in plan.unanalysed] == [""]
    injected = _identity(model, torch.randn(2, 3, 16, 16))
    assert injected is model and type(model.block1).__name__ == "Residual"


def test_root_owned_site_is_attached_on_the_root_itself() -> None:
    model = RootResidual()
    keys = set(model.state_dict())
    injected = _identity(model, torch.randn(2, 3, 8, 8))
    assert injected is model and isinstance(injected.se, SEBlock)  # its branch ends in conv2
    assert keys <= set(injected.state_dict())


def test_root_owned_site_returns_the_rebuilt_root() -> None:
    model = RootFunctionEnd()
    injected = _identity(model, torch.randn(2, 3, 8, 8))
    assert injected is not model and isinstance(injected.se, SEBlock)
    assert set(model.state_dict()) <= set(injected.state_dict())


class RootFunctionEnd(RootResidual):
    """The root's own residual, its branch ending in a function: the root is rebuilt."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return x + torch.tanh(self.conv2(torch.relu(self.conv1(x))))


def test_selection_by_glob_and_channels() -> None:
    model = nn.Sequential(Residual(4), Residual(4, 16, stride=2), Residual(16))
    names = lambda plan: [s.name for s in plan.sites]  # noqa: E731
    assert names(find_sites(model)) == ["0.se", "1.se", "2.se"]
    assert names(find_sites(model, include=["1*", "2.se"])) == ["1.se", "2.se"]
    assert names(find_sites(model, exclude=["0"])) == ["1.se", "2.se"]
    plan = find_sites(model, min_channels=8)
    assert names(plan) == ["1.se", "2.se"]
    assert [s.reason for s in plan.skipped] == [SkipReason.TOO_FEW_CHANNELS]
    with pytest.raises(ConfigError, match="include"):
        find_sites(model, include=[""])
    with pytest.raises(ConfigError, match="reduction"):
        find_sites(model, reduction=0.5)


def test_plan_is_plain_data_that_round_trips() -> None:
    from se_inject import Plan

    plan = find_sites(nn.Sequential(Residual(4), Dense(4, 2, 2), Inception(8)))
    assert Plan.from_dict(plan.to_dict()) == plan
    assert [s.stage for s in plan.sites] == [0] * len(plan.sites)


def test_block_called_with_a_list_is_rebuilt_through_its_parent() -> None:
    model = nn.Sequential(PassesList(4))
    (site,) = find_sites(model).sites
    assert (site.owner, site.inline, str(site.kind)) == ("0", ("inner",), "dense")
    _identity(model, torch.randn(2, 4, 8, 8))


def test_optional_arguments_keep_their_defaults_when_rebuilt() -> None:
    model = nn.Sequential(OptionalArg(4))
    (site,) = find_sites(model).sites
    assert site.owner == "0"
    _identity(model, torch.randn(2, 4, 8, 8))


def test_a_block_that_cannot_be_rebuilt_is_skipped_in_the_plan(monkeypatch) -> None:
    """Rule 14: owners are traced as the rewriter will while planning; one that fails is a
    skipped site of the plan itself, and inject_se builds exactly the listed sites."""
    import warnings

    import se_inject.analysis.owners as owners

    model = nn.Sequential(Residual(4, functional_end=True), Residual(4, functional_end=True))
    real = owners.trace

    def failing(module, **kwargs):
        if module is model[0]:
            raise RuntimeError("cannot trace on its own")
        return real(module, **kwargs)

    monkeypatch.setattr(owners, "trace", failing)
    plan = find_sites(model)
    assert [s.name for s in plan.sites] == ["1.se"]
    assert [(s.node, s.reason) for s in plan.skipped] == [("0.add", SkipReason.NOT_REWRITABLE)]
    assert "cannot trace on its own" in plan.skipped[0].detail
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no retry, no warning: the plan already says it
        injected = _identity(model, torch.randn(2, 4, 8, 8))
    assert type(injected[0]) is Residual and isinstance(injected[1].se, SEBlock)
    assert injected.se_inject_plan.sites == plan.sites
