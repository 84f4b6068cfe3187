"""Fine-tuning helpers: SE parameters by type, parameter groups, freezing, and exact unloading."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torchvision
from torch import nn

from se_inject import SEBlock, apply_plan, find_sites, remove_se
from se_inject.errors import SEInjectError
from se_inject.inject.finetune import (
    HeadNotFoundError,
    find_head,
    freeze_except_se,
    norm_modules,
    param_groups,
    se_modules,
    se_parameters,
    se_state_dict_keys,
)

X64 = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _inject(model: nn.Module, x: torch.Tensor = X64) -> tuple[nn.Module, int]:
    plan = find_sites(model, example_input=x)
    assert plan.sites
    return apply_plan(model, plan), plan.added_params


def _timm(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def test_se_parameters_are_selected_by_type_not_by_name():
    # timm's MobileNetV3 has `.se.` modules of its own; only the inserted SEBlock counts.
    model, added = _inject(_timm("mobilenetv3_small_050"))
    named_se = [n for n, _ in model.named_parameters() if ".se." in n]
    assert named_se, "the backbone should have SE modules of its own"
    ours = {id(p) for p in se_parameters(model)}
    expected = {id(p) for _, m in model.named_modules() if isinstance(m, SEBlock) for p in m.parameters()}
    assert ours == expected
    assert sum(p.numel() for p in se_parameters(model)) == added
    assert all(isinstance(m, SEBlock) for _, m in se_modules(model))
    keys = se_state_dict_keys(model)
    assert keys and all(k.split(".")[-2] in ("fc1", "fc2") for k in keys)
    assert not set(keys) & set(named_se)  # the backbone's own `.se.` weights are not ours


def test_param_groups_give_se_its_own_learning_rate():
    model, _ = _inject(_timm("resnet10t"))
    groups = param_groups(model, lr=1e-3, se_lr=1e-2, se_weight_decay=0.0)
    assert [g["name"] for g in groups] == ["se", "base"]
    se_group, base = groups
    assert {id(p) for p in se_group["params"]} == {id(p) for p in se_parameters(model)}
    assert se_group["lr"] == 1e-2 and se_group["weight_decay"] == 0.0 and base["lr"] == 1e-3
    every = [id(p) for g in groups for p in g["params"]]
    assert sorted(every) == sorted(id(p) for p in model.parameters())  # each parameter exactly once
    optimizer = torch.optim.SGD(groups, lr=0.5, momentum=0.9)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-2, 1e-3]
    # after freezing, frozen parameters are left out
    freeze_except_se(model, norms=False)
    assert [g["name"] for g in param_groups(model, se_lr=1e-2)] == ["se"]
    freeze_except_se(model)  # the default also trains the norms' affine parameters: in the base group
    se_group, base = param_groups(model, se_lr=1e-2)
    norm_ids = {id(p) for _, m in norm_modules(model) for p in m.parameters()}
    assert norm_ids and {id(p) for p in base["params"]} == norm_ids


def test_param_groups_default_se_lr_is_the_base_lr():
    # benchmarks/results/efficacy.md: a 10x SE learning rate saturates late gates under AdamW
    model, _ = _inject(_timm("resnet10t"))
    se_group, base = param_groups(model, lr=3e-4)
    assert se_group["lr"] == base["lr"] == 3e-4
    optimizer = torch.optim.AdamW(param_groups(model), lr=2e-3)  # neither given: the optimizer's default
    assert [g["lr"] for g in optimizer.param_groups] == [2e-3, 2e-3]
    assert [g["name"] for g in optimizer.param_groups] == ["se", "base"]


@pytest.mark.parametrize(
    "make, head_attr",
    [
        (lambda: _timm("resnet10t", zero_init_last=False), "fc"),  # random init zeroes the branches otherwise
        (lambda: torchvision.models.resnet18(), "fc"),
        (lambda: torchvision.models.mobilenet_v3_small(), "classifier"),
    ],
    ids=["timm-resnet10t", "tv-resnet18", "tv-mobilenet_v3_small"],
)
@pytest.mark.parametrize("norms", [None, True, False], ids=["default", "norms", "no-norms"])
def test_freeze_except_se_and_head_trains_only_those(make, head_attr, norms):
    torch.manual_seed(0)
    model, _ = _inject(make().eval())
    head = getattr(model, head_attr)
    assert find_head(model) is head
    if norms is None:
        freeze_except_se(model, head=True)  # default: norms=True (benchmarks/results/efficacy.md, se_bn vs se_adapter)
    else:
        freeze_except_se(model, head=True, norms=norms)
    se_ids = {id(p) for p in se_parameters(model)}
    head_ids = {id(p) for p in head.parameters()}
    norm_ids = {id(p) for _, m in norm_modules(model) for p in m.parameters()}
    assert norm_ids and all(isinstance(m, nn.BatchNorm2d) for _, m in norm_modules(model))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == se_ids | head_ids | (norm_ids if norms is not False else set())
    buffers = {n: b.clone() for n, b in model.named_buffers()}

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    out = model(X64)
    nn.functional.cross_entropy(out, torch.tensor([1, 2])).backward()
    for p in model.parameters():
        assert (p.grad is not None) == (id(p) in trainable)
    optimizer.step()
    for n, p in model.named_parameters():
        if id(p) not in trainable:
            assert torch.equal(p, before[n]), f"{n} is frozen but changed"
    # the zero-initialised last SE layer is what moves first
    assert any(not torch.equal(m.fc2.weight, before[f"{n}.fc2.weight"]) for n, m in se_modules(model))
    assert any(not torch.equal(p, before[n]) for n, p in head.named_parameters(prefix=head_attr))
    norm_moved = any(not torch.equal(p, before[f"{name}.{k}"]) for name, m in norm_modules(model)
                     for k, p in m.named_parameters())
    assert norm_moved == (norms is not False)
    # running statistics are buffers: only requires_grad changed, train() mode still updates them
    assert any(not torch.equal(b, buffers[n]) for n, b in model.named_buffers() if n.endswith("running_mean"))


def test_freeze_norms_covers_layer_and_group_norms():
    # ConvNeXt-style LayerNorm2d (timm) and GroupNorm are norms too; their affine parameters train
    model = nn.Sequential(nn.Conv2d(3, 8, 3), timm.layers.LayerNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                          nn.GroupNorm(2, 8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    model.add_module("se", SEBlock(8, 2))
    freeze_except_se(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"1.weight", "1.bias", "4.weight", "4.bias"} | {f"se.{n}" for n, _ in model.se.named_parameters()}
    freeze_except_se(model, norms=False)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {f"se.{n}" for n, _ in model.se.named_parameters()}


def test_freeze_head_options():
    model, _ = _inject(_timm("resnet10t"))
    freeze_except_se(model, head="fc")
    assert model.fc.weight.requires_grad and not model.conv1[0].weight.requires_grad
    freeze_except_se(model)
    assert not model.fc.weight.requires_grad
    assert all(p.requires_grad for p in se_parameters(model))
    freeze_except_se(model, head=model.fc)
    assert model.fc.weight.requires_grad
    with pytest.raises(HeadNotFoundError, match="no submodule 'nope'"):
        freeze_except_se(model, head="nope")
    with pytest.raises(TypeError, match="head must be"):
        freeze_except_se(model, head=3)  # type: ignore[arg-type]


def test_head_not_found_is_an_se_inject_error():
    headless = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    with pytest.raises(HeadNotFoundError, match="pass the module itself") as info:
        freeze_except_se(headless, head=True)
    assert isinstance(info.value, SEInjectError) and isinstance(info.value, LookupError)


# --- remove_se: the original blocks come back exactly -----------------------------------------

# timm's ResNets zero their last BatchNorm per block at random init, which makes the residual
# branch (and so any SE on it) vanish: turned off here so that moved SE weights show.
UNLOAD_FAMILIES = {
    "resnet": ("resnet10t", {"zero_init_last": False}, 64),
    "convnext": ("convnext_atto", {}, 64),
    "efficientnet": ("efficientnet_lite0", {}, 64),
    "densenet": ("densenet121", {"block_config": (2, 2, 2, 2)}, 64),
    "res2net": ("res2net50_14w_8s", {"layers": [1, 1, 1, 1], "zero_init_last": False}, 64),
    # inception_v3 is left out for time (40 s here); test_timm_contract covers its injection.
}


@pytest.mark.parametrize("family", list(UNLOAD_FAMILIES))
def test_remove_se_restores_the_original_exactly(family):
    name, kwargs, px = UNLOAD_FAMILIES[family]
    model = _timm(name, **kwargs)
    x = torch.randn(2, 3, px, px, generator=torch.Generator().manual_seed(1))
    original = copy.deepcopy(model)
    classes = [(n, type(m)) for n, m in model.named_modules()]
    keys = list(model.state_dict())
    with torch.no_grad():
        y0 = model(x)
    model, _ = _inject(model, x)
    # an identity block would pass trivially: move every SE weight first
    with torch.no_grad():
        for p in se_parameters(model):
            p.copy_(torch.randn_like(p))
        assert not torch.equal(model(x), y0)
    restored = remove_se(model)
    assert type(restored) is type(original)
    assert not any(isinstance(m, SEBlock) for m in restored.modules())
    assert [(n, type(m)) for n, m in restored.named_modules()] == classes
    assert list(restored.state_dict()) == keys
    assert all(torch.equal(v, original.state_dict()[k]) for k, v in restored.state_dict().items())
    with torch.no_grad():
        assert torch.equal(restored(x), y0)
