"""Where an SE block can be attached instead of rebuilding its owner.

A site whose name is a placeholder the owner already has (``self.se = None`` in timm's blocks
built without attention) is filled when the owner's own trace, made with a module in the
placeholder, calls it on the scaled tensor and feeds the site's targets with the result: the
owner's code then runs the SE block itself, where timm's SE-ResNets run theirs.

A site's scaled tensor that is exactly what one submodule of the owner returns, from its only
call in the forward, with no reader that is not one of the site's targets, is that module's
output: the SE block can scale it there (a forward hook, ``inject.attach``) and the owner's code,
keywords, train-mode behaviour and hooks stay as they are. The outermost such module is chosen
(the branch's ``nn.Sequential`` rather than its last BatchNorm), so as few modules as possible
carry the hook. Facts come from the unit's trace: which node each submodule call returned
(``Unit.outputs``) and the leaf calls in its graph.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import torch.fx as fx
from torch import nn

from ..analysis.node_names import call_stack
from ..analysis.owners import OwnerTraces, trace_signature
from ..plan import Site
from .records import Unit

__all__ = [
    "AttachFacts", "PlaceholderVerdicts", "attach_point", "attach_per_owner", "fills_placeholder", "has_placeholder",
    "probe_placeholder",
]


class AttachFacts:
    """Per model: how many names each module has; per unit: how often each leaf is called."""

    def __init__(self, model: nn.Module) -> None:
        self.names = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
        self._leaf_calls: dict[int, Counter[int]] = {}

    def leaf_calls(self, unit: Unit, module: nn.Module) -> int:
        counts = self._leaf_calls.get(id(unit))
        if counts is None:
            counts = Counter()
            for node in unit.graph.nodes:
                if node.op == "call_module":
                    counts[id(unit.module.get_submodule(str(node.target)))] += 1
            self._leaf_calls[id(unit)] = counts
        return counts[id(module)]


#: Owners whose forward iterates their own children (DenseNet's blocks are ``ModuleDict`` s): the
#: SE block registered on them would be called as one more layer, so they are rebuilt.
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _inside(path: str, owner_rel: str) -> bool:
    return not owner_rel or path.startswith(owner_rel + ".")


def _relative(path: str, owner_rel: str) -> str:
    return path[len(owner_rel) + 1:] if owner_rel else path


def attach_point(
    unit: Unit, source: fx.Node, targets: Iterable[fx.Node], owner_rel: str, facts: AttachFacts
) -> str | None:
    """The path (relative to the owner; ``""`` for the owner itself) of the module whose output
    is ``source``, or None when the SE block must be put in by rebuilding the owner."""
    wanted = set(targets)
    if wanted and any(user not in wanted for user in source.users):
        return None  # another reader would see the scaled tensor too
    if isinstance(unit.module.get_submodule(owner_rel), _CONTAINERS):
        return None  # its forward runs its children in turn: the SE block would run as one more

    def once(path: str) -> bool:
        return facts.names[id(unit.module.get_submodule(path))] == 1

    for key, path in call_stack(source):
        if not _inside(path, owner_rel) or (source.op == "call_module" and path == str(source.target)):
            continue
        if "@" in key:
            return None  # inside a module called more than once: every call would be scaled
        if unit.outputs.get(path) == [source] and once(path):
            return _relative(path, owner_rel)
    if source.op == "call_module":
        path = str(source.target)
        module = unit.module.get_submodule(path)
        if _inside(path, owner_rel) and once(path) and facts.leaf_calls(unit, module) == 1:
            return _relative(path, owner_rel)
    if owner_rel and unit.outputs.get(owner_rel) == [source] and once(owner_rel):
        return ""  # the owner's own output (an Inception block returning its concatenation)
    return None


def attach_per_owner(sites: list[Site]) -> list[Site]:
    """An owner is attached to only when all its sites can be: an owner that must be rebuilt
    takes all its sites into the rebuilt block (one mechanism per block)."""
    rebuilt = {s.owner for s in sites if not s.attached}
    return [s if not s.attached or s.owner not in rebuilt else replace(s, attach=None, slot=False) for s in sites]


def has_placeholder(owner: nn.Module, attr: str) -> bool:
    """Whether ``owner`` has ``attr`` set to ``None`` (a placeholder its code may call)."""
    return (attr in owner.__dict__ and owner.__dict__[attr] is None) or (
        attr in owner._modules and owner._modules[attr] is None
    )


class PlaceholderVerdicts:
    """Per plan: the probe traces, and each verdict by what the owner's trace can branch on
    (``trace_signature``: classes, plain attributes, unset children; not widths), so ResNet-152's
    50 bottlenecks are traced a handful of times, not once per width."""

    def __init__(self) -> None:
        self.traces = OwnerTraces()
        self.held: dict[tuple[Any, ...], bool] = {}


def fills_placeholder(owner: nn.Module, site: Site, verdicts: PlaceholderVerdicts) -> bool:
    """:func:`probe_placeholder`, once per kind of owner and site (see :class:`PlaceholderVerdicts`)."""
    signature = trace_signature(owner)
    prefix = len(site.owner) + 1 if site.owner else 0
    key = None if signature is None else (
        signature, site.attr, site.source[prefix:], tuple(t[prefix:] for t in site.targets), site.owner_args,
        site.owner_inputs,
    )
    if key is not None and key in verdicts.held:
        return verdicts.held[key]
    verdict = probe_placeholder(owner, site, verdicts.traces)
    if key is not None:
        verdicts.held[key] = verdict
    return verdict


def probe_placeholder(owner: nn.Module, site: Site, traces: OwnerTraces) -> bool:
    """Whether the owner's forward, with a module in its ``None`` placeholder ``site.attr``,
    calls it on the site's scaled tensor alone and feeds the site's targets (all of the
    tensor's readers) with what it returns, in every mode's trace."""
    attr = site.attr
    probe = nn.Identity()  # a leaf: its call is one node, wherever the owner's code puts it
    held = owner.__dict__.pop(attr, None) if attr in owner.__dict__ else owner._modules.pop(attr, None)
    in_dict = attr not in owner._modules
    owner._modules[attr] = probe
    try:
        graphs = traces.traced(owner, site.owner_args, site.owner_inputs)
    except Exception:  # noqa: BLE001 - an owner that does not trace is rebuilt or refused later, with its reason
        return False
    finally:
        del owner._modules[attr]
        if in_dict:
            owner.__dict__[attr] = held
        else:
            owner._modules[attr] = held
    prefix = len(site.owner) + 1 if site.owner else 0
    for graph in graphs.values():
        names = traces.names(graph)
        call, source = names.get(attr), names.get(site.source[prefix:])
        if call is None or source is None or call.op != "call_module" or call.args != (source,) or call.kwargs:
            return False
        if set(source.users) != {call}:
            return False
        targets = {names.get(t[prefix:]) for t in site.targets}
        if site.targets and set(call.users) != targets:
            return False
    return True
