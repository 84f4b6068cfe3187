"""Plan -> modified model: build every owner's rebuilt block, swap them in, take them out.

Only the owning blocks change: each is replaced, under every name it has in the model, by its
:class:`~se_inject.inject.rebuilt.RebuiltBlock`. Every block is built before any is swapped in,
so a plan that does not fit leaves the model untouched. Nothing here decides placement:
``apply_plan`` replays whatever plan it is given.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import replace

from torch import nn

from ..analysis.owners import OwnerTraces
from ..analysis.sandbox import preserved_state
from ..errors import PlanMismatchError
from ..plan import PLAN_ATTR, Plan, Site
from .rebuilt import RebuiltBlock, guard_loads, rebuild_block

__all__ = ["apply_plan", "build_blocks", "install", "remove_se"]


def apply_plan(model: nn.Module, plan: Plan, *, traces: OwnerTraces | None = None) -> nn.Module:
    """Insert the plan's SE blocks into ``model``, in place; nothing is decided here.

    Every owning block is rebuilt before any is swapped in, so a plan that does not fit leaves
    the model untouched. Returns ``model``, or the rebuilt root when the root owns a site.
    ``traces`` are the owner traces made while planning (``inject_named`` passes them on, so
    nothing is traced twice); each site's block is built with the site's own config.

    Raises:
        PlanMismatchError: an owner, node or name in the plan does not exist in ``model``.
    """
    return install(model, plan, build_blocks(model, plan, traces=traces))


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


def install(model: nn.Module, plan: Plan, rebuilt: dict[str, RebuiltBlock]) -> nn.Module:
    """Swap the rebuilt blocks into ``model`` (outermost first) and record ``plan`` on it;
    returns ``model``, or the rebuilt root when the root owns a site. A swap that fails
    part-way leaves ``model`` as it was."""
    with preserved_state(model, on_error_only=True):
        return _install(model, plan, rebuilt)


def _install(model: nn.Module, plan: Plan, rebuilt: dict[str, RebuiltBlock]) -> nn.Module:
    aliases = _alias_paths(model)
    for path in sorted(rebuilt, key=lambda p: (p.count("."), p) if p else (-1, p)):
        if path:
            # A block registered under several names (``m.block`` and ``m.path[0]``) is
            # replaced under all, so hooks and freezing through any name reach the rebuilt one.
            for alias in aliases.get(id(model.get_submodule(path)), [path]):
                _replace_module(model, alias, rebuilt[path])
    result = rebuilt.get("", model)
    earlier = getattr(model, PLAN_ATTR, None)
    recorded = earlier.merged(plan) if isinstance(earlier, Plan) else plan
    object.__setattr__(result, PLAN_ATTR, recorded)  # plain attribute: no module, no state_dict key
    guard_loads(result)
    return result


def _alias_paths(model: nn.Module) -> dict[int, list[str]]:
    """Every name of every submodule, by object (``named_modules`` gives each object once)."""
    paths: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if path:
            paths.setdefault(id(module), []).append(path)
    return paths


def _replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at ``path`` (torch's ``set_submodule``, strict: the name must exist)."""
    model.set_submodule(path, new, strict=True)


def remove_se(model: nn.Module, *, include: Sequence[str] | None = None) -> nn.Module:
    """Put rebuilt blocks' originals back, dropping their SE blocks; changes ``model`` in place.

    ``include``: module-name globs choosing which blocks give their SE back, matched against
    the owning block (``"layer1.*"``) or its SE modules (``"layer1.0.se"``); the others keep
    theirs, and the plan recorded on the model lists only what is left. Default: every block.
    Returns ``model`` (or the original root, if the root had been rebuilt and is chosen).
    Original keys, parameters (the same objects, with any training they received) and outputs
    come back.

    Example:
        >>> model = remove_se(model, include=["layer1.*", "layer2.*"])  # SE stays in layer3-4
    """
    globs = None if include is None else tuple(include)

    def chosen(path: str, block: RebuiltBlock) -> bool:
        if globs is None:
            return True
        _, sites = block.__dict__.get("_se_sites", ("", ()))
        names = [path, *(f"{path}.{site.attr}" if path else site.attr for site in sites)]
        return any(fnmatch.fnmatchcase(name, glob) for name in names for glob in globs)

    plan = getattr(model, PLAN_ATTR, None)
    removed: set[str] = set()
    aliases = _alias_paths(model)
    for path, module in sorted(model.named_modules(), key=lambda item: -item[0].count(".")):
        if isinstance(module, RebuiltBlock) and path and chosen(path, module):
            original = module.restore()
            for alias in aliases[id(module)]:
                _replace_module(model, alias, original)
            removed.add(path)
    if isinstance(model, RebuiltBlock) and chosen("", model):
        model = model.restore()
        removed.add("")
    left = () if not isinstance(plan, Plan) else tuple(s for s in plan.sites if s.owner not in removed)
    if left:
        object.__setattr__(model, PLAN_ATTR, replace(plan, sites=left))
    else:
        model.__dict__.pop(PLAN_ATTR, None)
    return model
