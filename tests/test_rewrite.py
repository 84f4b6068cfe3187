"""Rewriting is surgical: class, keys, mode, dtype, device, requires_grad, gradients, tooling."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torchvision
from nets import Residual, conv_bn
from torch import nn

from se_inject import SEBlock, apply_plan, find_sites, inject_se, remove_se, se_modules
from se_inject.errors import PlanMismatchError


def _resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def test_class_and_every_original_key_kept_with_readable_se_keys() -> None:
    model = _resnet18()
    keys = list(model.state_dict())
    injected = inject_se(model)
    assert injected is model and type(model) is torchvision.models.ResNet
    new_keys = list(model.state_dict())
    assert [k for k in new_keys if k in keys] == keys
    assert sorted(set(new_keys) - set(keys))[:4] == [
        "layer1.0.se.fc1.bias", "layer1.0.se.fc1.weight", "layer1.0.se.fc2.bias", "layer1.0.se.fc2.weight"
    ]
    # The rebuilt block still answers for the original's attributes.
    assert model.layer2[0].stride == 2 and model.layer2[0].downsample is not None


def test_train_and_eval_behave_as_the_original() -> None:
    # Residual(dropout=True) calls F.dropout(out, p, self.training): tracing bakes the mode in,
    # so the rebuilt block must keep one graph per mode.
    torch.manual_seed(0)
    model = nn.Sequential(conv_bn(3, 8), Residual(8, dropout=True), Residual(8))
    reference = copy.deepcopy(model)
    inject_se(model)
    x = torch.randn(2, 3, 8, 8)
    for mode in (True, False, True):
        model.train(mode)
        reference.train(mode)
        torch.manual_seed(1)
        expected = reference(x)
        torch.manual_seed(1)
        assert torch.equal(model(x), expected)
        assert all(m.training == mode for m in model.modules())


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtype_kept(dtype: torch.dtype) -> None:
    model = _resnet18().to(dtype)
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    with torch.no_grad():
        before = model(x)
        inject_se(model)
        after = model(x)
    assert torch.equal(before, after)
    assert {p.dtype for p in model.parameters()} == {dtype}


def test_requires_grad_and_training_mode_kept() -> None:
    model = _resnet18().train()
    model.layer1.requires_grad_(False)
    inject_se(model)
    assert not any(p.requires_grad for p in model.layer1[0].conv1.parameters())
    assert model.layer1[0].training and model.layer1[0].se.training


def test_gradients_reach_every_se_block() -> None:
    model = inject_se(_resnet18().train())
    loss = model(torch.randn(4, 3, 32, 32)).logsumexp(1).mean()
    loss.backward()
    blocks = se_modules(model)
    assert len(blocks) == 8
    for _, block in blocks:
        # fc2 starts at zero; its gradient must not (it is what lets the gate move away from 1).
        assert block.fc2.weight.grad is not None and block.fc2.weight.grad.abs().sum() > 0
        assert block.fc1.weight.grad is not None


def test_deepcopy_fx_trace_and_export() -> None:
    model = inject_se(_resnet18())
    for _, block in se_modules(model):
        nn.init.normal_(block.fc2.weight, std=0.1)  # an identity block would hide mistakes
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(copy.deepcopy(model)(x), expected)
        assert torch.equal(torch.fx.symbolic_trace(model)(x), expected)
        exported = torch.export.export(model, (x,))
        assert torch.allclose(exported.module()(x), expected, atol=1e-5)


def test_torch_compile_accepts_an_injected_resnet18() -> None:
    model = inject_se(_resnet18())
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), atol=1e-5)


def test_paper_gate_matches_timm_se_resnet_with_its_weights() -> None:
    torch.manual_seed(0)
    seresnet = timm.create_model("seresnet18", num_classes=10).eval()
    model = timm.create_model("resnet18", num_classes=10).eval()
    inject_se(model, identity_init=False)
    # timm's SE weights are 1x1 convolutions; ours are Linear: the shapes are converted on load.
    model.load_state_dict(seresnet.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), seresnet(x), atol=1e-5)


def test_bad_plan_leaves_the_model_untouched() -> None:
    model = _resnet18()
    plan = find_sites(model)
    last = plan.sites[-1]
    assert last.mechanism == "attached"  # a wrong module to attach to; for a rebuilt site, a wrong node
    broken = type(plan)(plan.sites[:-1] + (type(last)(**{**last.__dict__, "attach": "nope"}),), ())
    with pytest.raises(PlanMismatchError, match="nope"):
        apply_plan(model, broken)
    assert not any(isinstance(m, SEBlock) for m in model.modules())
    assert type(model.layer1[0]) is torchvision.models.resnet.BasicBlock


def test_remove_se_restores_blocks_and_outputs() -> None:
    model = _resnet18()
    keys = list(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        inject_se(model)
        for _, block in se_modules(model):
            nn.init.normal_(block.fc2.weight)
        assert not torch.equal(model(x), before)
        remove_se(model)
        assert torch.equal(model(x), before)
    assert list(model.state_dict()) == keys
    assert type(model.layer1[0]) is torchvision.models.resnet.BasicBlock


def test_remove_se_on_chosen_blocks_gives_their_cost_back(tmp_path) -> None:
    import se_inject
    from se_inject.plan import PLAN_ATTR

    model = _resnet18()
    x = torch.randn(2, 3, 32, 32)
    base = sum(p.numel() for p in model.parameters())
    inject_se(model)
    with torch.no_grad():
        for name, block in se_modules(model):
            if not name.startswith("layer1."):  # layer1 keeps identity gates: removing them changes nothing
                nn.init.normal_(block.fc2.weight)
        before = model(x)
    layer1 = sum(p.numel() for name, b in se_modules(model) if name.startswith("layer1.") for p in b.parameters())
    total = sum(p.numel() for p in model.parameters())
    remove_se(model, include=["layer1.*"])
    assert type(model.layer1[0]) is torchvision.models.resnet.BasicBlock
    assert type(model.layer2[0]) is torchvision.models.resnet.BasicBlock and isinstance(model.layer2[0].se, SEBlock)
    assert not hasattr(model.layer1[0], "se")
    assert layer1 > 0 and sum(p.numel() for p in model.parameters()) == total - layer1 > base
    assert [s.owner for s in getattr(model, PLAN_ATTR).sites] == [f"layer{i}.{j}" for i in (2, 3, 4) for j in (0, 1)]
    with torch.no_grad():
        assert torch.equal(model(x), before)
    # What is left saves and loads as it is.
    se_inject.save(model, tmp_path / "left.pt")
    loaded = se_inject.load(tmp_path / "left.pt", base_model=_resnet18())
    with torch.no_grad():
        assert torch.equal(loaded(x), before)
    remove_se(model, include=["layer4.1.se"])  # an SE module's own name chooses its block
    assert type(model.layer4[1]) is torchvision.models.resnet.BasicBlock
    assert len(getattr(model, PLAN_ATTR).sites) == 5
