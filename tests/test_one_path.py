"""One injection path: ``inject_se``, ``apply_plan``, the CLI and ``load`` (whole model and SE-only
adapter) build through ``inject.build``, so they refuse the same rebuilt block, or attach the
same faithful SE block.

The test models branch on ``torch.fx`` tracing, as library code does (``is_fx_tracing()``): a
block rebuilt from its trace computes another function than the user's code. Where the branch
ends in a function the owner must be rebuilt, and every entry point refuses it; where it ends in
a module the SE block is attached, the user's code runs, and every entry point gives the
original outputs.
"""

from __future__ import annotations

import pytest
import timm.models._registry as timm_registry
import torch
from cli_helpers import SMALL, fails, ok, run  # noqa: F401 - the fixture isolates each test
from cli_helpers import _isolated as _isolated  # noqa: F401
from torch import nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

from se_inject import UnfaithfulRebuildError, apply_plan, find_sites, inject_se, load, save
from se_inject.se_block import SEBlock

X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


class RebuiltDiffers(nn.Module):
    """The branch ends in a function; only the traced code doubles it."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(self.conv(x))
        if is_fx_symbolic_tracing():
            y = torch.tanh(y)
        return x + y


class AttachedFaithful(nn.Module):
    """The branch ends in a module; only the traced code changes the trunk."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = torch.tanh(x) if is_fx_symbolic_tracing() else x
        return shortcut + self.bn(self.conv(x))


def _net(block: type[nn.Module], **kwargs: object) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), block(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()


@pytest.fixture
def registered(monkeypatch):
    """Both nets as timm registry names, for the CLI and ``load`` (taken out again after)."""
    for name, block in (("onepath_rebuilt", RebuiltDiffers), ("onepath_attached", AttachedFaithful)):
        def make(pretrained: bool = False, block: type[nn.Module] = block, **kwargs: object) -> nn.Module:
            return _net(block)

        make.__module__ = "onepath"
        monkeypatch.setitem(timm_registry._model_entrypoints, name, make)
        monkeypatch.setitem(timm_registry._model_to_module, name, "onepath")
    return True


def test_every_entry_point_refuses_the_rebuilt_block_that_differs(registered, tmp_path) -> None:
    model = _net(RebuiltDiffers)
    want = model(X)
    plan = find_sites(model)
    assert [s.mechanism for s in plan.sites] == ["rebuilt"]
    with pytest.raises(UnfaithfulRebuildError):
        inject_se(model)
    with pytest.raises(UnfaithfulRebuildError):
        apply_plan(model, plan)
    assert not any(isinstance(m, SEBlock) for m in model.modules()) and torch.equal(model(X), want)

    fails(run("onepath_rebuilt", "--weights", "random", "--input-size", "32", "--reduction", "1", "-o", "m.pt"),
          "computes other outputs", tmp_path)

    # A checkpoint of the same plan, written without the check (as an older se-inject did), is
    # refused on load, for a whole model and for an SE-only adapter.
    for se_only in (False, True):
        healthy = _net(RebuiltDiffers)
        injected = _install_unchecked(healthy, plan)
        path = tmp_path / f"old-{se_only}.pt"
        save(injected, path, se_only=se_only, plan=plan)
        with pytest.raises(UnfaithfulRebuildError):
            load(path, base_model=_net(RebuiltDiffers), force=True)
        path.unlink()


def _install_unchecked(model: nn.Module, plan) -> nn.Module:
    from se_inject.inject.build import _install
    from se_inject.inject.rewrite import build_blocks

    return _install(model, plan, [], build_blocks(model, plan))


def test_every_entry_point_attaches_the_same_faithful_block(registered, tmp_path) -> None:
    model = _net(AttachedFaithful)
    want = model(X)
    plan = find_sites(model)
    assert [s.mechanism for s in plan.sites] == ["attached"]
    assert torch.equal(inject_se(_copy(model))(X), want)
    assert torch.equal(apply_plan(_copy(model), plan)(X), want)

    ok(run("onepath_attached", "--weights", "random", "--input-size", "32", "--reduction", "1", "-o", "m.pt"))
    loaded = load(tmp_path / "m.pt").eval()
    assert [s.mechanism for s in loaded.se_inject_plan.sites] == ["attached"]
    base = loaded[1]
    assert type(base) is AttachedFaithful and isinstance(base.se, SEBlock)
    x = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        assert torch.equal(base(x), x + base.bn(base.conv(x)))  # the user's forward, SE on bn

    save(inject_se(_copy(model)), tmp_path / "se.pt", se_only=True)
    adapted = load(tmp_path / "se.pt", base_model=_copy(model), force=True)
    assert torch.equal(adapted(X), want) and isinstance(adapted[1].se, SEBlock)


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)
