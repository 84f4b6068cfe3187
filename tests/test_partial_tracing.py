"""Partial tracing: models whose top level does not trace get SE in the blocks that do.

The plan names what could not be analysed (``plan.unanalysed``), and feature-pyramid or
multi-scale merges are never residual sites. Real torchvision detection and segmentation code
with small backbones, a timm backbone behind data-dependent control flow, and tiny hand-made
modules for the fusion rule.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from nets import PlainResidual
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

from se_inject import SEBlock, SkipReason, apply_plan, find_sites, inject_se


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


# --- tiny modules, one rule each ---------------------------------------------------------------


class _ControlFlowNet(nn.Module):
    """Residual blocks behind data-dependent control flow: the top level cannot be traced."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block1 = PlainResidual(8)
        self.block2 = PlainResidual(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block1(self.stem(x))
        if x.mean() > 0:  # depends on the data: fx cannot follow it
            x = self.block2(x)
        return self.head(x.mean((2, 3)))


class _TinyFPN(nn.Module):
    """A two-level feature pyramid: the top-down merge is a fusion, the blocks are residual."""

    def __init__(self) -> None:
        super().__init__()
        self.c3 = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), PlainResidual(8))
        self.c4 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), PlainResidual(16))
        self.lateral3 = nn.Conv2d(8, 16, 1)
        self.smooth = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c3 = self.c3(x)
        c4 = self.c4(c3)
        p3 = self.lateral3(c3) + F.interpolate(c4, scale_factor=2.0, mode="nearest")
        return self.smooth(p3)



class _Inception(nn.Module):
    """Two convolution branches of one input, concatenated: an inception place on its own."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.b1 = nn.Conv2d(c, c // 2, 1)
        self.b3 = nn.Conv2d(c, c // 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.relu(self.b1(x)), F.relu(self.b3(x))], 1)


class _GatedMixer(nn.Module):
    """Data-dependent control flow around an inception block: it does not trace, so the
    inception block is analysed as a unit of its own."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.inception = _Inception(c)
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inception(x)
        if y.sum() > 0:  # depends on the data: fx cannot follow it
            y = y * 0.5
        return self.proj(y)


class _ResidualAroundUntraceable(nn.Module):
    """A residual block whose branch calls the untraceable mixer."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.mixer = _GatedMixer(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.mixer(F.relu(x))
        return self.head(x.mean((2, 3)))

def test_untraceable_top_level_gets_se_in_its_blocks():
    torch.manual_seed(0)
    model = _ControlFlowNet().eval()
    x = torch.randn(2, 3, 16, 16)
    plan = find_sites(model, example_input=x)
    assert "" in {u.path for u in plan.unanalysed}  # the root itself did not trace, and the plan says so
    assert sorted(s.name for s in plan.sites) == ["block1.se", "block2.se"]
    with torch.no_grad():
        before = model(x)
    injected = apply_plan(model, plan)
    assert type(injected) is _ControlFlowNet
    with torch.no_grad():
        assert torch.equal(injected(x), before)


def test_feature_pyramid_merge_is_a_fusion_not_a_residual():
    plan = find_sites(_TinyFPN(), example_input=torch.randn(2, 3, 32, 32))
    assert sorted(s.name for s in plan.sites) == ["c3.1.se", "c4.1.se"]
    fusions = [s for s in plan.skipped if s.reason is SkipReason.FUSION]
    assert [s.node for s in fusions] == ["add"]


# --- torchvision detection and segmentation -----------------------------------------------------


@pytest.fixture(scope="module")
def detector():
    """Faster R-CNN with a ResNet-18 FPN backbone (torchvision's own detection code), small images."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5)
    model = FasterRCNN(backbone, num_classes=3, min_size=96, max_size=96).eval()
    images = [torch.rand(3, 96, 96, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    return model, images


def test_detection_model_backbone_blocks_get_se(detector):
    model, images = detector
    model = copy.deepcopy(model)
    plan = find_sites(model, example_input=(images,))
    # the detector's own forward (image list, control flow, dict outputs) does not trace, nor do
    # the RPN and RoI heads; the plan names them
    assert "" in {u.path for u in plan.unanalysed}
    assert {"rpn", "roi_heads"} <= {u.path for u in plan.unanalysed}
    names = [s.name for s in plan.sites]
    assert names == [f"backbone.body.layer{i}.{j}.se" for i in range(1, 5) for j in range(2)]
    assert all(s.kind == "residual" for s in plan.sites)
    # the FPN's top-down additions are fusions, never residual sites
    fpn = [s for s in plan.skipped if s.node.startswith("backbone.fpn")]
    assert len(fpn) == 3 and all(s.reason is SkipReason.FUSION for s in fpn)

    batch = torch.stack(images)
    with torch.no_grad():
        features_before = model.backbone(batch)
        detections_before = model(images)
    injected = apply_plan(model, plan)
    assert type(injected) is FasterRCNN
    assert sum(isinstance(m, SEBlock) for m in injected.modules()) == 8
    with torch.no_grad():
        assert _equal(injected.backbone(batch), features_before)
        assert _equal(injected(images), detections_before)


def test_segmentation_model_head_fusion_is_skipped():
    torch.manual_seed(0)
    model = torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None).eval()
    x = torch.randn(2, 3, 64, 64)
    plan = find_sites(model, example_input=x)
    # LR-ASPP merges a low-level and a high-level feature map in its head: a fusion
    head = [s for s in plan.skipped if s.node.startswith("classifier")]
    assert [s.reason for s in head] == [SkipReason.FUSION]
    assert plan.sites and all(s.name.startswith("backbone.") for s in plan.sites)
    with torch.no_grad():
        before = model(x)
    injected = apply_plan(model, plan)
    with torch.no_grad():
        assert _equal(injected(x), before)


def test_timm_backbone_behind_control_flow():
    """A timm ResNet used by a wrapper that branches on the data: blocks still get SE."""

    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = timm.create_model("resnet10t", pretrained=False, num_classes=0)
            self.head = nn.Linear(self.backbone.num_features, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            feats = self.backbone(x)
            if feats.abs().sum() == 0:  # data-dependent: the wrapper does not trace
                return feats[:, :2]
            return self.head(feats)

    torch.manual_seed(0)
    model = Gated().eval()
    x = torch.randn(2, 3, 64, 64)
    plan = find_sites(model, example_input=x)
    assert [u.path for u in plan.unanalysed] == [""]
    assert [s.name for s in plan.sites] == [f"backbone.layer{i}.0.se" for i in range(1, 5)]
    with torch.no_grad():
        before = model(x)
    injected = apply_plan(model, plan)
    assert type(injected.backbone) is type(timm.create_model("resnet10t", pretrained=False))
    with torch.no_grad():
        assert torch.equal(injected(x), before)


def test_place_in_its_own_unit_is_nested_in_the_enclosing_residual_branch():
    """Rule 2 across units: the inception block is analysed on its own (its caller does not
    trace), but its call lies in the residual branch of the enclosing unit, which has a site."""
    torch.manual_seed(0)
    model = _ResidualAroundUntraceable().eval()
    x = torch.randn(2, 3, 16, 16)
    plan = find_sites(model, example_input=x)
    assert "mixer" in {u.path for u in plan.unanalysed}  # the mixer really is opaque
    assert [(s.name, s.kind) for s in plan.sites] == [("se", "residual")]
    nested = [s for s in plan.skipped if s.reason is SkipReason.NESTED]
    assert [s.node for s in nested] == ["mixer.inception.cat"]
    assert plan.sites[0].node in nested[0].detail  # names the enclosing site
    with torch.no_grad():
        before = model(x)
    injected = inject_se(model, example_input=x)
    assert sum(isinstance(m, SEBlock) for m in injected.modules()) == 1
    with torch.no_grad():
        assert torch.equal(injected(x), before)
    # a second injection: the attended outer block still hosts, so the inner place stays nested
    again = find_sites(injected, example_input=x)
    assert not again.sites
    assert {(s.node, s.reason) for s in again.skipped} == {
        ("add", SkipReason.ALREADY_ATTENDED),
        ("mixer.inception.cat", SkipReason.NESTED),
    }
