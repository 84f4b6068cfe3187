"""Rebuilt owners: build every one a plan needs (nothing swapped in yet), and take SE out again.

A rebuilt owner is replaced, under every name it has in the model, by its
:class:`~se_inject.inject.rebuilt.RebuiltBlock` (``inject.build`` swaps them in, after the
check); every block is built before any is swapped in, so a plan that does not fit leaves the
model untouched. :func:`remove_se` undoes both mechanisms: rebuilt blocks give their originals
back, attached SE blocks come off their modules. Nothing here decides placement.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import replace

from torch import nn

from ..analysis.owners import OwnerTraces
from ..errors import PlanMismatchError
from ..plan import PLAN_ATTR, Plan, Site
from .attach import take_off
from .rebuilt import RebuiltBlock, rebuild_block

__all__ = ["alias_paths", "build_blocks", "replace_module", "remove_se"]


def build_blocks(model: nn.Module, plan: Plan, *, traces: OwnerTraces | None = None) -> dict[str, RebuiltBlock]:
    """Rebuild every block that owns a site of ``plan``, by owner path; ``model`` is unchanged.

    Raises:
        PlanMismatchError: an owner, node or name in the plan does not exist in ``model``.
    """
    by_owner: dict[str, list[Site]] = {}
    for site in plan.sites:
        by_owner.setdefault(site.owner, []).append(site)
    rebuilt: dict[str, RebuiltBlock] = {}
    traces = OwnerTraces() if traces is None else traces
    for owner_path, sites in by_owner.items():
        try:
            owner = model.get_submodule(owner_path) if owner_path else model
        except AttributeError as e:
            raise PlanMismatchError(f"the plan names {owner_path!r}, which {type(model).__name__} does not have") from e
        for site in sites:
            if getattr(owner, site.attr, None) is not None:
                raise PlanMismatchError(f"{owner_path or 'the model'} already has an attribute {site.attr!r}")
        try:
            rebuilt[owner_path] = rebuild_block(owner, owner_path, sites, traces)
        except Exception as e:
            detail = str(e) if isinstance(e, PlanMismatchError) else f"{type(e).__name__}: {e}"
            raise PlanMismatchError(f"could not rebuild {owner_path or 'the model'}: {detail}", owner=owner_path) from e
    return rebuilt


def alias_paths(model: nn.Module) -> dict[int, list[str]]:
    """Every name of every submodule, by object (``named_modules`` gives each object once)."""
    paths: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if path:
            paths.setdefault(id(module), []).append(path)
    return paths


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at ``path`` (torch's ``set_submodule``, strict: the name must exist)."""
    model.set_submodule(path, new, strict=True)


def remove_se(model: nn.Module, *, include: Sequence[str] | None = None) -> nn.Module:
    """Take SE blocks out of ``model`` in place: attached ones come off their modules, rebuilt
    blocks give their originals back.

    ``include``: module-name globs choosing which SE blocks go, matched against the owning
    block (``"layer1.*"``) or its SE modules (``"layer1.0.se"``); the others stay, and the plan
    recorded on the model lists only what is left. Default: every block. Returns ``model`` (or
    the original root, if the root had been rebuilt and is chosen). Original keys, parameters
    (the same objects, with any training they received) and outputs come back.

    Example:
        >>> model = remove_se(model, include=["layer1.*", "layer2.*"])  # SE stays in layer3-4
    """
    globs = None if include is None else tuple(include)

    def chosen(path: str, attrs: Sequence[str]) -> bool:
        if globs is None:
            return True
        names = [path, *(f"{path}.{attr}" if path else attr for attr in attrs)]
        return any(fnmatch.fnmatchcase(name, glob) for name in names for glob in globs)

    plan = getattr(model, PLAN_ATTR, None)
    removed: set[str] = take_off(model, chosen)  # names of the SE modules taken out
    aliases = alias_paths(model)
    for path, module in sorted(model.named_modules(), key=lambda item: -item[0].count(".")):
        if isinstance(module, RebuiltBlock) and path and chosen(path, _rebuilt_attrs(module)):
            removed.update(f"{path}.{attr}" for attr in _rebuilt_attrs(module))
            original = module.restore()
            for alias in aliases[id(module)]:
                replace_module(model, alias, original)
    if isinstance(model, RebuiltBlock) and chosen("", _rebuilt_attrs(model)):
        removed.update(_rebuilt_attrs(model))
        model = model.restore()
    left = () if not isinstance(plan, Plan) else tuple(s for s in plan.sites if s.name not in removed)
    if left:
        object.__setattr__(model, PLAN_ATTR, replace(plan, sites=left))
    else:
        model.__dict__.pop(PLAN_ATTR, None)
    return model


def _rebuilt_attrs(block: RebuiltBlock) -> list[str]:
    _, sites = block.__dict__.get("_se_sites", ("", ()))
    return [site.attr for site in sites]
