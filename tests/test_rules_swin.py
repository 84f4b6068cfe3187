"""Window attention (issue 17, pattern 4): timm's Swin, fixed or dynamic image size, gets the
placement torchvision's Swin gets: one SE per residual branch, attention and MLP."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import timm
import torch
from torchvision.models.swin_transformer import SwinTransformer

import se_inject

SIDE = 112


def _timm_swin(**kwargs) -> torch.nn.Module:
    return timm.create_model(
        "swin_tiny_patch4_window7_224", img_size=SIDE, embed_dim=48, depths=(2, 2), num_heads=(3, 6), **kwargs
    ).eval()


def _placement(plan: se_inject.Plan) -> Counter:
    return Counter((s.channels, s.spatial, s.stage) for s in plan.sites)


def _torchvision_placement() -> Counter:
    model = SwinTransformer(patch_size=[4, 4], embed_dim=48, depths=[2, 2], num_heads=[3, 6], window_size=[7, 7]).eval()
    return _placement(se_inject.find_sites(model, example_input=torch.randn(1, 3, SIDE, SIDE)))


@pytest.mark.parametrize("dynamic", [False, True], ids=["fixed-size", "dynamic-size"])
def test_timm_swin_gets_torchvision_swins_placement(dynamic: bool) -> None:
    x = torch.randn(1, 3, SIDE, SIDE)
    model = _timm_swin(dynamic_img_size=dynamic)
    plan = se_inject.find_sites(model, example_input=x)
    assert not plan.skipped and not plan.unanalysed
    expected = _torchvision_placement()
    assert sum(expected.values()) == 8  # 2 stages x 2 blocks x (attention, MLP)
    assert _placement(plan) == expected  # MLP tokens report the map they flatten: (28, 28)
    reference = copy.deepcopy(model)
    injected = se_inject.inject_se(model, example_input=x)
    assert sorted(n for n, m in injected.named_modules() if isinstance(m, se_inject.SEBlock)) == sorted(
        s.name for s in plan.sites
    )
    with torch.no_grad():
        assert torch.equal(injected(x), reference(x))


def test_dynamic_size_swin_stays_exact_at_another_size() -> None:
    """The attention mask is built for each input's size inside the graph (in-place writes are
    kept as ``operator.setitem``), so the injected model runs at sizes it was not analysed at."""
    model = _timm_swin(dynamic_img_size=True)
    reference = copy.deepcopy(model)
    injected = se_inject.inject_se(model, example_input=torch.randn(1, 3, SIDE, SIDE))
    other = torch.randn(1, 3, 84, 140)
    with torch.no_grad():
        assert torch.equal(injected(other), reference(other))
