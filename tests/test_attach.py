"""Attach, don't rebuild: SE blocks attached to a module's output leave the owner's code alone.

Each test uses a small net of its own whose branch ends in a module call (so its site is
attached) and checks what rebuilding used to lose: keyword calls, hook handles, full-backward
and state-dict hooks, train-mode code that does not trace, every site when the root owns one,
meta models, dataclass outputs; then the doors out (fx, feature extraction, jit.trace, export,
pickle, copies, fusion) with the gates moved off 1, so a dropped SE block shows.
"""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass

import pytest
import torch
from nets import conv_bn, perturb_se
from torch import nn

from se_inject import find_sites, inject_se, remove_se
from se_inject.inject.attach import SEHook, attached_hooks, base_class
from se_inject.plan import PLAN_ATTR
from se_inject.se_block import SEBlock

X = torch.randn(2, 8, 12, 12, generator=torch.Generator().manual_seed(0))


class KeywordBlock(nn.Module):
    """A residual block with a keyword its callers may change; the branch ends in ``bn``."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return x * scale + self.bn(self.conv(torch.relu(x)))


class StochasticDepth(nn.Module):
    """Train-mode code that does not trace: a Python float drawn from a tensor."""

    def __init__(self, c: int = 8, p: float = 0.5) -> None:
        super().__init__()
        self.branch = nn.Sequential(conv_bn(c, c), nn.ReLU(), conv_bn(c, c))
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and float(torch.rand(1)) < self.p:
            return x
        return x + self.branch(x)


class RootOwned(nn.Module):
    """A residual in the root's own forward (its branch ends in ``proj``) beside blocks with sites."""

    def __init__(self) -> None:
        super().__init__()
        self.block1 = KeywordBlock()
        self.block2 = KeywordBlock()
        self.proj = conv_bn(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block2(self.block1(x))
        return y + self.proj(torch.relu(y))


class ScaledRoot(RootOwned):
    """The root's residual ends in a function, not a module (rebuilt), beside attached blocks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block2(self.block1(x))
        return y + torch.tanh(self.proj(torch.relu(y)))  # ends in a function: rebuilt


@dataclass
class Output:
    logits: torch.Tensor
    features: torch.Tensor


class DataclassRoot(ScaledRoot):
    def forward(self, x: torch.Tensor) -> Output:  # type: ignore[override]
        y = super().forward(x)
        return Output(y.mean((2, 3)), y)


def _moved(model: nn.Module) -> nn.Module:
    perturb_se(model)
    return model


def _net() -> nn.Module:
    return nn.Sequential(KeywordBlock(), KeywordBlock()).eval()


def test_attached_sites_keep_the_owners_class_code_and_keys() -> None:
    model = _net()
    keys = list(model.state_dict())
    want = model(X)
    injected = inject_se(model)
    plan = getattr(injected, PLAN_ATTR)
    assert injected is model and [s.mechanism for s in plan.sites] == ["attached", "attached"]
    assert [s.attach for s in plan.sites] == ["bn", "bn"]
    assert all(type(b) is KeywordBlock for b in model)  # the owners are the user's own blocks
    assert isinstance(model[0].bn, nn.BatchNorm2d) and base_class(model[0].bn) is nn.BatchNorm2d
    assert torch.equal(model(X), want)  # the identity start
    assert [k for k in model.state_dict() if k in keys] == keys
    assert [k for k in model.state_dict() if k not in keys][:2] == ["0.se.fc1.weight", "0.se.fc1.bias"]


def test_a_keyword_call_works_after_injection_and_the_se_block_runs() -> None:
    model = _moved(inject_se(_net()))
    block = model[0]
    out = block(X, scale=0.3)
    with torch.no_grad():
        expected = X * 0.3 + block.se(nn.BatchNorm2d.forward(block.bn, block.conv(torch.relu(X))))
    assert torch.equal(out, expected)


def test_hook_handles_registered_before_injection_still_work() -> None:
    model = _net()
    fired: list[str] = []
    forward = model[0].register_forward_hook(lambda m, a, o: fired.append("forward"))
    backward = model[0].register_full_backward_hook(lambda m, gi, go: fired.append("backward"))
    saved = model[0].register_state_dict_post_hook(lambda m, sd, prefix, local: fired.append("state_dict"))
    inject_se(model)
    x = X.clone().requires_grad_()
    model(x).sum().backward()
    model.state_dict()
    assert fired == ["forward", "backward", "state_dict"]
    fired.clear()
    for handle in (forward, backward, saved):
        handle.remove()
    model(X.clone().requires_grad_()).sum().backward()
    model.state_dict()
    assert fired == []


def test_train_mode_code_that_does_not_trace_keeps_its_eval_site() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(StochasticDepth(), StochasticDepth()).eval()
    want = model(X)
    plan = find_sites(model)
    assert [s.mechanism for s in plan.sites] == ["attached", "attached"]
    injected = inject_se(model)
    assert torch.equal(injected(X), want)
    injected.train()
    torch.manual_seed(1)
    injected(X).sum().backward()  # the user's own train-mode code runs, SE inside
    assert injected[0].se.fc2.weight.grad is not None


def test_every_planned_site_is_in_the_returned_model_when_the_root_owns_one() -> None:
    for make in (RootOwned, ScaledRoot):
        model = make().eval()
        want = model(X)
        plan = find_sites(model)
        injected = inject_se(model)
        blocks = [name for name, m in injected.named_modules() if isinstance(m, SEBlock)]
        assert sorted(blocks) == sorted(s.name for s in plan.sites) and len(blocks) == 3, make.__name__
        assert torch.equal(injected(X), want)
        assert getattr(injected, PLAN_ATTR).sites == plan.sites
        moved = _moved(injected)
        assert not torch.equal(moved(X), want)  # each of the three runs


def test_scaled_root_is_rebuilt_and_its_blocks_attached() -> None:
    plan = find_sites(ScaledRoot().eval())
    assert {s.name: s.mechanism for s in plan.sites} == {
        "block1.se": "attached", "block2.se": "attached", "se": "rebuilt"}


def test_a_meta_model_injects_without_running_anything() -> None:
    with torch.device("meta"):
        model = _net()
    injected = inject_se(model, example_input=torch.empty(2, 8, 12, 12, device="meta"))
    assert sum(isinstance(m, SEBlock) for m in injected.modules()) == 2
    assert injected[0].se.fc1.weight.is_meta
    with torch.device("meta"):
        rooted = ScaledRoot().eval()
    with pytest.warns(UserWarning, match="meta device"):
        inject_se(rooted, example_input=torch.empty(2, 8, 12, 12, device="meta"))
    assert sum(isinstance(m, SEBlock) for m in rooted.modules()) + 1 == 3  # the root is a new object


def test_a_root_returning_a_dataclass_is_checked_and_injected() -> None:
    model = DataclassRoot().eval()
    want = model(X)
    injected = inject_se(model)
    got = injected(X)
    assert torch.equal(got.logits, want.logits) and torch.equal(got.features, want.features)


def _doors(model: nn.Module) -> dict[str, nn.Module]:
    doors: dict[str, object] = {
        "deepcopy": copy.deepcopy(model),
        "symbolic_trace": torch.fx.symbolic_trace(model),
        "jit.trace": torch.jit.trace(model, X),
        "export": torch.export.export(model, (X,)).module(),
    }
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    doors["pickle"] = torch.load(buffer, weights_only=False)
    from torchvision.models.feature_extraction import create_feature_extractor

    doors["create_feature_extractor"] = create_feature_extractor(model, return_nodes={"1": "out"})
    return doors


def test_every_door_out_keeps_the_attached_se_blocks_running() -> None:
    model = _moved(inject_se(_net()))
    want = model(X)
    without = remove_se(copy.deepcopy(model))(X)
    assert not torch.allclose(want, without)
    for name, door in _doors(model).items():
        with torch.no_grad():
            got = door(X)
        got = got["out"] if isinstance(got, dict) else got
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=name)


def test_a_copy_and_a_pickle_hold_their_own_se_blocks() -> None:
    model = inject_se(_net())
    twin = copy.deepcopy(model)
    (hook,) = [h for _, h in attached_hooks(twin[0].bn)]
    assert isinstance(hook, SEHook) and hook.se is twin[0].se and hook.se is not model[0].se


def test_fusing_the_attached_batch_norm_refuses_loudly() -> None:
    from torch.ao.quantization import fuse_modules

    model = inject_se(_net())
    with pytest.raises((NotImplementedError, AssertionError, RuntimeError)):
        fuse_modules(model, [["0.conv", "0.bn"]])


def test_remove_se_takes_attached_blocks_off_and_gives_the_classes_back() -> None:
    model = _net()
    want = model(X)
    keys = list(model.state_dict())
    injected = _moved(inject_se(model))
    remove_se(injected, include=["0"])
    assert not hasattr(injected[0], "se") and hasattr(injected[1], "se")
    assert type(injected[0].bn) is nn.BatchNorm2d and not attached_hooks(injected[0].bn)
    assert [s.name for s in getattr(injected, PLAN_ATTR).sites] == ["1.se"]
    remove_se(injected)
    assert list(injected.state_dict()) == keys and torch.equal(injected(X), want)
    assert type(injected[1].bn) is nn.BatchNorm2d


def test_timm_blocks_fill_their_own_placeholder_with_timm_s_key_names() -> None:
    import timm

    model = timm.create_model("resnet18", num_classes=10, zero_init_last=False).eval()
    x = torch.randn(1, 3, 64, 64)
    want = model(x)
    plan = find_sites(model, example_input=x)
    assert {s.mechanism for s in plan.sites} == {"placeholder"}
    injected = inject_se(model, example_input=x)
    assert isinstance(injected.layer1[0].se, SEBlock) and "layer1.0.se.fc1.weight" in injected.state_dict()
    assert torch.equal(injected(x), want)
    assert type(injected.layer1[0].bn2) is nn.BatchNorm2d  # nothing hooked: timm's own code calls self.se
    moved = _moved(injected)
    assert not torch.equal(moved(x), want)
    remove_se(injected)
    assert injected.layer1[0].se is None and torch.equal(injected(x), want)


def test_timm_set_grad_checkpointing_keeps_the_se_blocks() -> None:
    import timm

    model = _moved(inject_se(timm.create_model("resnet18", num_classes=10, zero_init_last=False).eval(),
                                 example_input=torch.randn(1, 3, 64, 64)))
    x = torch.randn(2, 3, 64, 64)
    want = model(x)
    model.set_grad_checkpointing(True)
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    got = model(x.requires_grad_())
    torch.testing.assert_close(got, want)
    got.sum().backward()
    assert model.layer1[0].se.fc2.weight.grad is not None


class CountingTwoSums(nn.Module):
    """Two residual sums in one forward that also counts its calls on ``self`` (a side effect a
    rebuilt block would drop, so the block cannot be rebuilt): the first branch ends in a module
    (attachable), the second in a function (it would need rebuilding)."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.first = conv_bn(c, c)
        self.second = conv_bn(c, c)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls = self.calls + 1
        y = torch.relu(x + self.first(x))
        return torch.relu(y + torch.tanh(self.second(y)))


def test_an_owner_that_cannot_be_rebuilt_keeps_the_sites_that_attach() -> None:
    model = nn.Sequential(conv_bn(8, 8), CountingTwoSums()).eval()
    plan = find_sites(model, example_input=X)
    assert [(s.owner, s.mechanism) for s in plan.sites] == [("1", "attached")]
    refused = [s for s in plan.skipped if s.reason == "not-rewritable"]
    assert len(refused) == 1 and "side effect" in refused[0].detail
    expected = model(X)
    injected = inject_se(model, example_input=X)
    assert torch.equal(injected(X), expected) and injected[1].calls == 2  # its own code ran
    perturb_se(injected)
    assert not torch.equal(injected(X), expected)  # the attached SE block runs
