"""Parameter deltas against the paper's formula (docs/se-paper.md), and idempotence."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torchvision

from se_inject import SEBlock, find_sites, inject_se

# ResNet-50: N_s = 3, 4, 6, 3 blocks with C_s = 256, 512, 1024, 2048 output channels.
STAGES = ((3, 256), (4, 512), (6, 1024), (3, 2048))


def paper_delta(r: int, bias: bool) -> int:
    """(2 / r) * sum N_s C_s^2, plus sum N_s (C_s / r + C_s) for the biases."""
    weights = sum(2 * n * c * c // r for n, c in STAGES)
    return weights + (sum(n * (c // r + c) for n, c in STAGES) if bias else 0)


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def resnet50() -> torch.nn.Module:
    return torchvision.models.resnet50().eval()


def test_formula_pins_the_papers_numbers() -> None:
    assert paper_delta(16, bias=False) == 2_514_944
    assert paper_delta(16, bias=True) == 2_530_992


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("r", [2, 4, 8, 16, 32])
def test_resnet50_delta_matches_the_formula(resnet50: torch.nn.Module, r: int, bias: bool) -> None:
    model = copy.deepcopy(resnet50)
    before = _count(model)
    plan = find_sites(model, r, bias=bias)
    assert plan.added_params == paper_delta(r, bias)
    inject_se(model, r, bias=bias)
    assert _count(model) - before == paper_delta(r, bias)


def test_injected_timm_resnet50_has_exactly_seresnet50s_parameters() -> None:
    model = timm.create_model("resnet50")
    inject_se(model, 16)
    assert _count(model) == _count(timm.create_model("seresnet50")) == 28_088_024


def test_second_injection_adds_nothing(resnet50: torch.nn.Module) -> None:
    model = inject_se(copy.deepcopy(resnet50))
    keys = list(model.state_dict())
    with pytest.warns(UserWarning, match="no SE site"):
        again = inject_se(model)
    assert again is model and list(model.state_dict()) == keys
    plan = find_sites(model)
    assert plan.sites == () and {s.reason for s in plan.skipped} == {"already-attended"} and len(plan.skipped) == 16


@pytest.mark.parametrize(
    ("model", "skipped"),
    [(lambda: timm.create_model("seresnet50"), 16), (lambda: torchvision.models.efficientnet_b0(), 9)],
    ids=["timm-seresnet50", "torchvision-efficientnet_b0"],
)
def test_models_with_channel_attention_get_no_new_blocks(model, skipped: int) -> None:
    net = model()
    plan = find_sites(net)
    assert plan.sites == ()
    assert len(plan.skipped) == skipped
    assert all(s.reason == "already-attended" and s.text == "already has channel attention" for s in plan.skipped)
    assert all(s.detail.startswith("branch gated at") for s in plan.skipped)
    with pytest.warns(UserWarning):
        inject_se(net)
    assert not any(isinstance(m, SEBlock) for m in net.modules())
