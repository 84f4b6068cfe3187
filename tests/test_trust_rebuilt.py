"""A rebuilt block behaves like the original: forwards with side effects are refused (not
silently dropped), every name of a block reaches the rebuilt one, and copies keep the plan."""

from __future__ import annotations

import copy
import io
import pickle

import torch
from nets import RootResidual, force_rebuild
from torch import nn

import se_inject
from se_inject.inject.rebuilt import RebuiltBlock
from se_inject.plan import PLAN_ATTR

X = torch.randn(2, 3, 16, 16)


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(torch.relu(x))


class _Counting(_Residual):
    """Counts its calls and keeps the last input's shape, as monitoring code does."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.last_shape: torch.Size | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.last_shape = x.shape
        return super().forward(x)


class _Caching(_Residual):
    """Fills a dict cache in eval mode (timm LeViT's attention-bias cache)."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(8))
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            self.cache["bias"] = self.bias[None, :, None, None] * 2
            return x + self.conv(x) + self.cache["bias"]
        return x + self.conv(x) + self.bias[None, :, None, None] * 2


class _Net(nn.Module):
    def __init__(self, block: nn.Module, other: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = block
        self.other = other

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.other(self.block(self.stem(x)))


def test_an_attached_block_keeps_the_side_effects_of_its_forward() -> None:
    # Attached, the block's own forward runs: its counters count, nothing to refuse.
    model = _Net(_Counting(), _Residual()).eval()
    plan = se_inject.find_sites(model, example_input=X)
    assert [(s.owner, s.mechanism) for s in plan.sites] == [("block", "attached"), ("other", "attached")]
    injected = se_inject.inject_se(model, example_input=X)
    before = injected.block.calls
    injected(X)
    assert injected.block.calls == before + 1 and injected.block.last_shape == torch.Size([2, 8, 16, 16])


def test_a_block_whose_forward_assigns_attributes_is_skipped_with_the_reason(monkeypatch) -> None:
    force_rebuild(monkeypatch)  # rebuilt, its graph would drop the assignments
    model = _Net(_Counting(), _Residual()).eval()
    plan = se_inject.find_sites(model, example_input=X)
    assert [s.owner for s in plan.sites] == ["other"]
    (skip,) = [s for s in plan.skipped if s.node.startswith("block.")]
    assert skip.reason is se_inject.SkipReason.NOT_REWRITABLE
    assert "assigns self.calls, self.last_shape" in skip.detail and "side effect" in skip.detail
    injected = se_inject.inject_se(model, example_input=X)
    assert not isinstance(injected.block, RebuiltBlock) and isinstance(injected.other, RebuiltBlock)
    before = injected.block.calls
    injected(X)
    assert injected.block.calls == before + 1 and injected.block.last_shape == torch.Size([2, 8, 16, 16])


def test_a_dict_cache_is_not_a_side_effect_and_is_left_empty() -> None:
    model = _Net(_Caching(), _Residual()).eval()
    reference = copy.deepcopy(model)
    plan = se_inject.find_sites(model, example_input=X)
    assert sorted(s.owner for s in plan.sites) == ["block", "other"]
    assert model.block.cache == {}  # the analysis left nothing in it
    injected = se_inject.inject_se(model, example_input=X)
    with torch.no_grad():
        assert torch.equal(injected(X), reference(X))


class _ClearsOnTrain(nn.Module):
    """A part that does not trace (it branches on ``x.dim()``), so analysis runs it, filling its
    eval-mode cache; its ``train()`` empties the cache by rebinding it (timm EfficientViT's
    attention does both)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bias = nn.Parameter(torch.zeros(8))
        self.cache: dict[str, torch.Tensor] = {}

    def train(self, mode: bool = True) -> _ClearsOnTrain:
        super().train(mode)
        if self.cache:
            self.cache = {}
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            bias = self.bias[None, :, None, None] * 2
        else:
            bias = self.cache.setdefault("bias", self.bias[None, :, None, None] * 2)
        if x.dim() == 4:
            return self.conv(x) + bias
        return x


class _Wrapped(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def test_what_train_itself_changes_is_not_the_forwards_side_effect() -> None:
    # Tracing switches modes with train(): a cache it rebinds there is not a side effect of the
    # forward (this cost timm's efficientvit_m0 6 of its 38 sites).
    model = _Net(_Wrapped(_ClearsOnTrain()), _Residual()).eval()
    reference = copy.deepcopy(model)
    plan = se_inject.find_sites(model, example_input=X)
    assert not [s for s in plan.skipped if s.reason is se_inject.SkipReason.NOT_REWRITABLE], plan.skipped
    assert sorted(s.owner for s in plan.sites) == ["block", "other"]
    injected = se_inject.inject_se(model, example_input=X)
    with torch.no_grad():
        assert torch.equal(injected(X), reference(X))


class _Aliased(nn.Module):
    """The same block registered under two names (U-Net libraries keep such paths)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = _Residual()
        self.path = nn.Sequential(self.block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.path(self.stem(x))


def test_every_name_of_a_block_points_to_the_rebuilt_block_and_back() -> None:
    model = _Aliased().eval()
    original = model.block
    reference = copy.deepcopy(model)
    injected = se_inject.inject_se(model, example_input=X)
    assert isinstance(injected.block, RebuiltBlock) and injected.block is injected.path[0]
    with torch.no_grad():
        assert torch.equal(injected(X), reference(X))
    restored = se_inject.remove_se(injected)
    assert restored.block is original and restored.path[0] is original
    assert list(restored.state_dict()) == list(reference.state_dict())


def _pickled(model: nn.Module) -> nn.Module:
    return pickle.loads(pickle.dumps(model))


def _torch_saved(model: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_copies_of_a_rebuilt_root_keep_the_plan_and_save(tmp_path) -> None:
    model = se_inject.inject_se(RootResidual().eval(), example_input=X)
    with torch.no_grad():
        model.se.fc2.weight.normal_()  # trained SE: the copies must carry it
        expected = model(X)
    for make in (copy.deepcopy, _pickled, _torch_saved):
        duplicate = make(model)
        assert getattr(duplicate, PLAN_ATTR) == getattr(model, PLAN_ATTR)
        path = se_inject.save(duplicate, tmp_path / f"{make.__name__}.pt")
        loaded = se_inject.load(path, base_model=RootResidual())
        with torch.no_grad():
            assert torch.equal(loaded.eval()(X), expected), make.__name__
