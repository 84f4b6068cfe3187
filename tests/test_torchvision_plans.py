"""Expected plans for torchvision's classifiers (the placement rules applied by hand), row by row, with
bit-exact identity."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torchvision

from se_inject import SEBlock, find_sites, inject_se

# model: (sites, {kind: count}, {skip reason: count}), each worked out from the placement rules (vit: 12 blocks x 2 adds).
EXPECTED = {
    "resnet18": (8, {"residual": 8}, {}),
    "resnet34": (16, {"residual": 16}, {}),
    "resnet50": (16, {"residual": 16}, {}),
    "resnet101": (33, {"residual": 33}, {}),
    "resnet152": (50, {"residual": 50}, {}),
    "resnext50_32x4d": (16, {"residual": 16}, {}),
    "wide_resnet50_2": (16, {"residual": 16}, {}),
    "mobilenet_v2": (10, {"residual": 10}, {}),
    "mnasnet1_0": (10, {"residual": 10}, {}),
    "mobilenet_v3_large": (5, {"residual": 5}, {"already-attended": 5}),
    "mobilenet_v3_small": (1, {"residual": 1}, {"already-attended": 5}),
    "efficientnet_b0": (0, {}, {"already-attended": 9}),
    "efficientnet_v2_s": (8, {"residual": 8}, {"already-attended": 27}),
    "regnet_x_400mf": (22, {"residual": 22}, {}),
    "regnet_y_400mf": (0, {}, {"already-attended": 16}),
    "convnext_tiny": (18, {"residual": 18}, {}),
    "densenet121": (58, {"dense": 58}, {}),
    "googlenet": (9, {"inception": 9}, {}),
    "inception_v3": (11, {"inception": 11}, {"nested": 4}),
    "shufflenet_v2_x1_0": (16, {"dense": 13, "inception": 3}, {}),
    "squeezenet1_1": (8, {"inception": 8}, {}),
    "vgg11": (0, {}, {}),
    "alexnet": (0, {}, {}),
    "vit_b_16": (0, {}, {"token-sequence": 24}),
    "swin_t": (24, {"residual": 24}, {}),
}

SLOW = {"resnet101", "resnet152", "wide_resnet50_2", "efficientnet_v2_s", "vit_b_16", "swin_t", "densenet121"}


def _build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
    return torchvision.models.get_model(name, **kwargs).eval()


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in EXPECTED]
)
def test_expected_plan_and_identity(name: str) -> None:
    sites, kinds, reasons = EXPECTED[name]
    model = _build(name)
    plan = find_sites(model)
    assert len(plan.sites) == sites
    assert dict(Counter(str(s.kind) for s in plan.sites)) == kinds
    assert dict(Counter(str(s.reason) for s in plan.skipped)) == reasons
    assert plan.unanalysed == ()
    if not sites:
        return
    size = 80 if name == "inception_v3" else 64
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        before = model(x)
        injected = inject_se(model)
        after = injected(x)
    assert injected is model  # the root is kept: same object, same class
    assert sum(isinstance(m, SEBlock) for m in injected.modules()) == sites
    assert torch.equal(before, after)


def test_swin_sites_are_channels_last() -> None:
    plan = find_sites(_build("swin_t"))
    assert {s.channel_axis for s in plan.sites} == {-1}


def test_convnext_squeezes_before_layer_scale_and_stochastic_depth() -> None:
    plan = find_sites(_build("convnext_tiny"))
    site = plan.sites[0]
    # The branch's feature computation is the `block` Sequential; the SE sits between it and
    # the layer-scale multiply, so neither layer scale nor stochastic depth is squeezed.
    assert site.source == "features.1.0.block"
    assert site.targets == ("features.1.0.mul",)


def test_dense_sites_scale_new_features_once_per_producer() -> None:
    plan = find_sites(_build("densenet121"))
    first_block = [s for s in plan.sites if s.owner == "features.denseblock1"]
    assert [s.name for s in first_block] == [f"features.denseblock1.se_denselayer{k}" for k in range(1, 7)]
    assert [s.source for s in first_block] == [f"features.denseblock1.denselayer{k}" for k in range(1, 7)]
