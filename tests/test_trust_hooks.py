"""Analysis runs none of the user's hooks (issue 31, item 2).

A forward hook that appended its output to a list found an fx Proxy there after
``find_sites``; one that logged ``float(...)`` logged the value of a random sample. Per-module
forward, pre-forward and backward hooks and torch's global module hooks are off while
``find_sites``, ``inject_se`` and ``count`` run the model, and back in place, in order and
firing, afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from nets import Residual
from torch import nn
from torch.nn.modules import module as torch_module

from se_inject import find_sites, inject_se
from se_inject.analysis.hooks import GLOBAL_HOOKS, MODULE_HOOKS
from se_inject.report.complexity import count

SIZE = 16


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Residual(8), Residual(8)).eval()


def _hooked(model: nn.Module, seen: list[Any]) -> list[Any]:
    """Hooks of every kind on ``model``: each notes what it was given in ``seen``."""
    conv = model[1].branch[0][0]
    return [
        conv.register_forward_hook(lambda m, a, out: seen.append(("forward", out))),
        conv.register_forward_hook(lambda m, a, k, out: seen.append(("kw", out)), with_kwargs=True),
        conv.register_forward_hook(lambda m, a, out: seen.append(("always", out)), always_call=True),
        model[1].register_forward_pre_hook(lambda m, a: seen.append(("pre", a[0]))),
        model[2].register_forward_pre_hook(lambda m, a, k: seen.append(("prekw", a[0])), with_kwargs=True),
        model[0].register_full_backward_hook(lambda m, gi, go: seen.append(("backward", go[0]))),
        model[0].register_full_backward_pre_hook(lambda m, go: seen.append(("backward_pre", go[0]))),
        model.register_forward_hook(lambda m, a, out: seen.append(("root", float(out.detach().mean())))),
        torch_module.register_module_forward_hook(lambda m, a, out: seen.append(("global", out))),
        torch_module.register_module_forward_pre_hook(lambda m, a: seen.append(("global_pre", a))),
    ]


def _hook_state(model: nn.Module) -> list[tuple[str, list[Any]]]:
    """Every hook dict's keys and hook objects, per module and global, in order."""
    state = [(name, list(getattr(torch_module, name).items())) for name in GLOBAL_HOOKS]
    for path, m in model.named_modules():
        state += [(f"{path}.{name}", list(m.__dict__[name].items())) for name in MODULE_HOOKS]
    return state


ANALYSES: dict[str, Callable[[nn.Module, torch.Tensor], object]] = {
    "find_sites": lambda model, x: find_sites(model, example_input=x),
    "count": lambda model, x: count(model, tuple(x.shape[1:])),
    "inject_se": lambda model, x: inject_se(model, example_input=x),
}


@pytest.mark.parametrize("analysis", list(ANALYSES))
def test_analysis_runs_no_user_hook_and_leaves_every_hook_in_place(analysis: str) -> None:
    model, x = _net(), torch.randn(2, 3, SIZE, SIZE)
    seen: list[Any] = []
    handles = _hooked(model, seen)
    try:
        before = _hook_state(model)
        ANALYSES[analysis](model, x)
        assert seen == []
        if analysis != "inject_se":  # (inject_se swaps blocks in: their hooks move with them)
            assert _hook_state(model) == before
        out = model(x.requires_grad_())
        out.sum().backward()
    finally:
        for h in handles:
            h.remove()
    kinds = [kind for kind, _ in seen]
    for kind in ("forward", "kw", "always", "pre", "prekw", "root", "global", "global_pre", "backward", "backward_pre"):
        assert kind in kinds, kind
    tensors = [v for kind, v in seen if kind not in ("root", "global_pre")]
    assert all(type(v) is torch.Tensor for v in tensors)
    assert [v for kind, v in seen if kind == "root"] == [float(out.detach().mean())]


def test_hooks_registered_inside_analysis_still_fire() -> None:
    """count's own counters are hooks on the SE blocks: with the user's hooks off they count."""
    model, x = _net(), torch.randn(1, 3, SIZE, SIZE)
    inject_se(model, example_input=x)
    seen: list[Any] = []
    handle = torch_module.register_module_forward_hook(lambda m, a, out: seen.append(m))
    try:
        counted = count(model, (3, SIZE, SIZE))
    finally:
        handle.remove()
    assert seen == []
    assert [c.name for c in counted.se] == ["1.se", "2.se"]
    blocks = dict(model.named_modules())
    for cost in counted.se:  # one call each, on an 8-channel map of SIZE x SIZE
        fc1, fc2 = blocks[cost.name].fc1, blocks[cost.name].fc2
        assert cost.fc_macs == fc1.weight.numel() + fc2.weight.numel()
        assert cost.pool_adds == 8 * SIZE * SIZE
