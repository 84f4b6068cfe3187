"""timm contract: an injected timm model is still the same timm model, plus SE blocks.

One model per family (resnet, convnext, efficientnet, inception, densenet, res2net), random
init, 64-96 px inputs. DenseNet and Res2Net use fewer blocks per stage than their registered
configurations (same classes, same code paths) to keep the suite fast.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

from se_inject import SEBlock, apply_plan, find_sites

# id -> (timm name, create kwargs, input px)
FAMILIES: dict[str, tuple[str, dict, int]] = {
    "resnet": ("resnet10t", {}, 64),
    "convnext": ("convnext_atto", {"drop_path_rate": 0.1}, 64),
    "efficientnet": ("efficientnet_lite0", {}, 64),
    "inception": ("inception_v3", {}, 75),
    "densenet": ("densenet121", {"block_config": (2, 2, 2, 2)}, 64),
    "res2net": ("res2net50_14w_8s", {"layers": [1, 1, 1, 1]}, 64),
}


def _create(family: str, **extra) -> tuple[nn.Module, torch.Tensor]:
    name, kwargs, px = FAMILIES[family]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs, **extra).eval()
    x = torch.randn(2, 3, px, px, generator=torch.Generator().manual_seed(1))
    return model, x


def _se_keys(model: nn.Module) -> set[str]:
    """SE state_dict keys, found by type (never by the substring "se")."""
    keys = set()
    for name, module in model.named_modules():
        if isinstance(module, SEBlock):
            keys |= {f"{name}.{k}" for k in module.state_dict()}
    return keys


def _features_and_heads(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        feats = model.forward_features(x)
        return feats, model.forward_head(feats), model.forward_head(feats, pre_logits=True)


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request):
    """(original copy, injected model, input, number of sites, outputs before, outputs after)."""
    model, x = _create(request.param)
    original = copy.deepcopy(model)
    plan = find_sites(model, example_input=x)
    assert plan.sites, f"{request.param}: expected SE sites"
    before = _features_and_heads(model, x)
    injected = apply_plan(model, plan)
    return original, injected, x, len(plan.sites), before, _features_and_heads(injected, x)


def test_class_kept_and_blocks_inserted(pair):
    original, injected, _, n_sites, _, _ = pair
    assert type(injected) is type(original)
    assert sum(isinstance(m, SEBlock) for m in injected.modules()) == n_sites


def test_forward_features_and_head(pair):
    """forward_features, forward_head and forward_head(pre_logits=True) are bit-for-bit unchanged."""
    *_, before, after = pair
    for a, b in zip(before, after, strict=True):
        assert torch.equal(a, b)


def test_pretrained_cfg_and_feature_info(pair):
    original, injected, *_ = pair
    assert injected.pretrained_cfg == original.pretrained_cfg
    assert injected.default_cfg == original.default_cfg
    assert injected.feature_info == original.feature_info
    assert injected.num_classes == original.num_classes


def test_reset_classifier(pair):
    _, injected, _, n_sites, before, _ = pair
    model = copy.deepcopy(injected)
    model.reset_classifier(5)
    assert model.get_classifier().out_features == 5
    with torch.no_grad():
        assert model.forward_head(before[0]).shape == (2, 5)
    assert sum(isinstance(m, SEBlock) for m in model.modules()) == n_sites


def test_original_checkpoint_loads_with_only_se_keys_missing(pair):
    original, injected, *_ = pair
    checkpoint = copy.deepcopy(original.state_dict())  # stands in for the pretrained file
    se_keys = _se_keys(injected)
    assert se_keys
    result = injected.load_state_dict(checkpoint, strict=False)
    assert set(result.missing_keys) == se_keys
    assert result.unexpected_keys == []
    # every original key kept its name and shape
    state = injected.state_dict()
    assert {k: v.shape for k, v in checkpoint.items()} == {k: state[k].shape for k in checkpoint}


@pytest.mark.parametrize("family", ["resnet", "convnext", "densenet"])
def test_features_only_models(family):
    model, x = _create(family, features_only=True)
    original = copy.deepcopy(model)
    plan = find_sites(model, example_input=x)
    assert plan.sites
    injected = apply_plan(model, plan)
    assert type(injected) is type(original)
    assert injected.feature_info.channels() == original.feature_info.channels()
    assert injected.feature_info.reduction() == original.feature_info.reduction()
    with torch.no_grad():
        before, after = original(x), injected(x)
    assert len(before) == len(after) == len(original.feature_info.channels())
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_train_and_eval_mode_behaviour_preserved():
    """DropPath and dropout are active in train(), off in eval(), exactly as in the original."""
    model, x = _create("convnext", drop_rate=0.3)
    model.train()
    original = copy.deepcopy(model)
    injected = apply_plan(model, find_sites(model, example_input=x))
    se_names = [n for n, m in injected.named_modules() if isinstance(m, SEBlock)]
    modes = {n: m.training for n, m in injected.named_modules() if not any(n.startswith(s) for s in se_names)}
    assert modes == {n: m.training for n, m in original.named_modules()}

    def run(m: nn.Module, seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        with torch.no_grad():
            return m(x)

    assert torch.equal(run(original, 0), run(injected, 0))
    assert not torch.equal(run(injected, 0), run(injected, 1)), "drop-path should be random in train mode"
    original.eval()
    injected.eval()
    assert not any(m.training for m in injected.modules())
    assert torch.equal(run(original, 0), run(injected, 1))
    injected.train()
    original.train()
    assert torch.equal(run(original, 2), run(injected, 2))


def test_injection_keeps_device_dtype_and_requires_grad():
    model, x = _create("resnet")
    model = model.double()
    model.conv1.requires_grad_(False)
    injected = apply_plan(model, find_sites(model, example_input=x.double()))
    se = [m for m in injected.modules() if isinstance(m, SEBlock)]
    assert se and all(p.dtype == torch.float64 for b in se for p in b.parameters())
    assert not any(p.requires_grad for p in injected.conv1.parameters())
    assert all(p.requires_grad for b in se for p in b.parameters())
