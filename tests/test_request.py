"""One request: (SEConfig, Selection) built once, passed unchanged, recorded by the plan."""

from __future__ import annotations

import inspect

import pytest
import torch
from nets import Residual
from torch import nn

from se_inject import ConfigError, SEConfig, Selection, apply_plan, find_sites, inject_se
from se_inject.plan import Plan
from se_inject.request import make_request
from se_inject.workflow import inject_named


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), Residual(32), Residual(32, 64, stride=2)).eval()


X = torch.randn(2, 3, 16, 16)


def test_objects_and_keywords_give_the_same_plan_and_the_plan_records_the_request() -> None:
    config, selection = SEConfig(reduction=4), Selection(include=("1.*",), min_channels=8)
    by_objects = find_sites(_net(), config=config, selection=selection, example_input=X)
    by_keywords = find_sites(_net(), 4, include="1.*", min_channels=8, example_input=X)
    assert by_objects == by_keywords
    assert [s.name for s in by_objects.sites] == ["1.se"]
    assert by_objects.config is config and by_objects.selection is selection
    assert by_keywords.selection == Selection(include=("1.*",), min_channels=8)


def test_the_recorded_request_survives_the_plans_round_trip() -> None:
    plan = find_sites(_net(), 8, exclude=("2*",), example_input=X)
    again = Plan.from_dict(plan.to_dict())
    assert again == plan and again.selection.exclude == ("2*",)
    older = {k: v for k, v in plan.to_dict().items() if k != "selection"}  # plans saved before it was recorded
    assert Plan.from_dict(older).selection == Selection()


def test_an_object_and_keywords_of_its_group_are_refused() -> None:
    with pytest.raises(ConfigError, match="give config= or the keywords reduction, bias, not both"):
        find_sites(_net(), 8, bias=False, config=SEConfig(), example_input=X)
    with pytest.raises(ConfigError, match="give selection= or the keywords plain, not both"):
        inject_se(_net(), plain=True, selection=Selection(), example_input=X)
    with pytest.raises(ConfigError, match="config must be a SEConfig, got dict"):
        find_sites(_net(), config={"reduction": 4}, example_input=X)  # type: ignore[arg-type]
    # the other group's keywords go together with an object
    plan = find_sites(_net(), 4, config=None, selection=Selection(include=("2",)), example_input=X)
    assert plan.config.reduction == 4 and [s.name for s in plan.sites] == ["2.se"]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"include": ("",)}, "include must be module-name globs"),
        ({"exclude": (3,)}, "exclude must be module-name globs"),
        ({"stages": (-1,)}, "stages must be non-negative integers"),
        ({"resolutions": (True,)}, "resolutions must be non-negative integers"),
        ({"min_channels": -1}, "min_channels must be >= 0"),
    ],
)
def test_a_selection_that_exists_is_valid(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Selection(**values)


def test_bare_values_are_normalised_once() -> None:
    assert Selection(include="layer4.*", stages=2) == Selection(include=("layer4.*",), stages=(2,))
    config, selection = make_request(hidden=8, resolutions=16)
    assert config.hidden == 8 and selection.resolutions == (16,)
    with pytest.raises(ConfigError, match="give reduction or hidden, not both"):
        make_request(16, hidden=8)


def test_the_named_workflow_passes_the_objects_through_unchanged() -> None:
    config, selection = SEConfig(reduction=8), Selection(include=("layer4.*",))
    done = inject_named("torchvision:resnet18", weights="random", config=config, selection=selection,
                        input_size=(64,), dry_run=True)
    assert done.report.plan.config is config and done.report.plan.selection is selection
    assert done.report.selection is selection
    assert [s.name for s in done.report.plan.sites] == ["layer4.0.se", "layer4.1.se"]


def test_owner_traces_are_not_public_parameters() -> None:
    for function in (find_sites, inject_se, apply_plan):
        assert "traces" not in inspect.signature(function).parameters, function.__name__
