"""The one way a plan becomes SE blocks in a model, for every entry point.

``inject_se``, ``apply_plan``, the command line and ``se_inject.load`` all call :func:`build`:
it attaches the SE blocks of attached sites (``inject.attach``: the owner's code is untouched,
nothing to prove), rebuilds the owners of the other sites (``inject.rebuilt``), runs the
post-build check on what it rebuilt (``inject.verify``), and only then changes the model. A
plan that does not fit, or a rebuilt block that computes another function, changes nothing.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ..analysis.owners import OwnerTraces
from ..analysis.sandbox import collection_paused, preserved_state
from ..errors import PlanMismatchError
from ..plan import PLAN_ATTR, Plan, Site
from ..sites import example_args
from ..sites.mechanism import has_placeholder
from .attach import PLACEHOLDER_FLAG, attach, guard, placement, se_block_for
from .rebuilt import RebuiltBlock, guard_loads
from .rewrite import alias_paths, build_blocks, replace_module
from .verify import check_rebuilt, record_owner_calls

__all__ = ["build", "Attachment"]

#: One attached site, checked against the model: (site, owner module, module whose output it scales).
Attachment = tuple[Site, nn.Module, nn.Module]


def build(
    model: nn.Module, plan: Plan, *, example_input: Any = None, traces: OwnerTraces | None = None
) -> nn.Module:
    """Put ``plan``'s SE blocks into ``model`` (in place): attach where the plan says, rebuild and
    verify the other owners, then install everything, or change nothing.

    ``example_input`` is what rebuilt blocks are checked on (default: one random sample at the
    model's declared input size); ``traces``: the owner traces made while planning. Returns
    ``model``, or the rebuilt root when the root's own code holds a site.

    Raises:
        PlanMismatchError: an owner, module, node or name in the plan does not exist in ``model``.
        UnfaithfulRebuildError: a rebuilt block computes something else than its original.
    """
    with collection_paused():
        points = [_attachment(model, site) for site in plan.sites if site.attached]
        rebuild = tuple(site for site in plan.sites if not site.attached)
        rebuilt = build_blocks(model, replace(plan, sites=rebuild), traces=traces) if rebuild else {}
        if rebuilt:
            _verify(model, rebuilt, example_input)
        with preserved_state(model, on_error_only=True):  # a failure part-way leaves the model as it was
            return _install(model, plan, points, rebuilt)


def _attachment(model: nn.Module, site: Site) -> Attachment:
    """The owner and the module a site attaches to, checked (nothing is changed here)."""
    try:
        owner = model.get_submodule(site.owner) if site.owner else model
        module = owner.get_submodule(site.attach) if site.attach else owner  # slot: the owner
    except AttributeError as e:
        where = f"{site.owner}.{site.attach}" if site.owner and site.attach else site.owner or site.attach
        raise PlanMismatchError(
            f"the plan attaches {site.name} to {where!r}, which {type(model).__name__} does not have", owner=site.owner
        ) from e
    if site.slot != has_placeholder(owner, site.attr) or (not site.slot and hasattr(owner, site.attr)):
        wanted = "a placeholder (None)" if site.slot else "no attribute"
        raise PlanMismatchError(
            f"the plan expects {wanted} {site.attr!r} on {site.owner or 'the model'}, which it does not have",
            owner=site.owner,
        )
    return site, owner, module


def check_args(model: nn.Module, example_input: Any) -> tuple[Any, ...]:
    """The inputs of the post-build check: the user's example, else one sample of random
    values at the analysis input's size (an empty tensor may hold NaNs and infinities; one
    sample halves the check's cost, and a rebuilt block is just as wrong at batch 1)."""
    args = example_args(model, example_input)
    if example_input is not None and not any(isinstance(a, torch.Tensor) and a.is_meta for a in args):
        return args
    generator = torch.Generator(device="cpu").manual_seed(0)
    return tuple(
        torch.randn((1, *a.shape[1:]), generator=generator, dtype=a.dtype).to(placement(model)[0])
        if isinstance(a, torch.Tensor) and a.is_floating_point() else a
        for a in args
    )


def _on_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in [*model.parameters(), *model.buffers()])


def _verify(model: nn.Module, rebuilt: dict[str, RebuiltBlock], example_input: Any) -> None:
    """The post-build check (a plan is a promise): each rebuilt block computes what its original
    computes on the example input, before anything is swapped in. A model on the meta device
    holds no values to compare: it is not checked, and a warning says so."""
    if _on_meta(model):
        warnings.warn(
            f"{len(rebuilt)} rebuilt block(s) of {type(model).__name__} were not checked against their "
            "originals: the model is on the meta device, which holds no values. Attached sites need no check; "
            "check rebuilt ones with inject_se on the model once it holds weights",
            UserWarning,
            stacklevel=3,
        )
        return
    with preserved_state(model):  # a real forward: its caches, counters and RNG use are undone
        calls = record_owner_calls(model, list(rebuilt), check_args(model, example_input))
        check_rebuilt(rebuilt, calls)


def _install(model: nn.Module, plan: Plan, points: list[Attachment], rebuilt: dict[str, RebuiltBlock]) -> nn.Module:
    # Attaching changes modules in place (a new child on the owner, a hook on the module), so it
    # holds whichever root ends up returned; rebuilt blocks are then swapped in under every name.
    for site, owner, module in points:
        se = se_block_for(site, owner)
        if site.slot:  # the owner's code calls its placeholder: filling it is all there is to do
            owner.__dict__.pop(site.attr, None)
            owner._modules[site.attr] = se
            se.__dict__[PLACEHOLDER_FLAG] = True
            continue
        owner.add_module(site.attr, se)
        attach(module, se, first=module is owner)
        if module is not owner:
            guard(owner, site.name, site.attach or "", se)
    result = rebuilt.get("", model)
    aliases = alias_paths(model)
    for path in sorted((p for p in rebuilt if p), key=lambda p: (p.count("."), p)):
        # A block registered under several names (``m.block`` and ``m.path[0]``) is replaced
        # under all, so hooks and freezing through any name reach the rebuilt one; a rebuilt
        # root holds its own copy of the root's children, so they are replaced there.
        for alias in aliases.get(id(model.get_submodule(path)), [path]):
            replace_module(result, alias, rebuilt[path])
            if result is not model:
                replace_module(model, alias, rebuilt[path])
    earlier = getattr(model, PLAN_ATTR, None)
    recorded = earlier.merged(plan) if isinstance(earlier, Plan) else plan
    object.__setattr__(result, PLAN_ATTR, recorded)  # plain attribute: no module, no state_dict key
    guard_loads(result)
    return result
