"""Owners: which block is rebuilt for a site, the site's node names in that block's own trace,
and whether the rewriter can rebuild it (placement rule 14: a plan is a promise)."""

from __future__ import annotations

from collections.abc import Sequence

import torch.fx as fx
from torch import nn

from ..analysis.node_names import call_stack, input_name, node_scope, owner_local_name
from ..analysis.owners import OwnerTraces
from ..plan import Site, Skipped, SkipReason
from .records import Candidate, Unit, inside, skip

__all__ = ["common_owner", "represent", "rebuildable", "drop_conflicting_owners"]


#: How deep into an owner's children a source may sit before the owner is not rebuilt.
_MAX_INLINE_DEPTH = 4


def common_owner(nodes: Sequence[fx.Node]) -> str:
    """The deepest module performing all of ``nodes`` (never a leaf: its parent calls it)."""
    paths = [(str(n.target) if n.op == "call_module" else node_scope(n)).split(".") for n in nodes]
    common: list[str] = []
    for parts in zip(*paths, strict=False):
        if any(p != parts[0] for p in parts) or parts[0] == "":
            break
        common.append(parts[0])
    prefix = ".".join(common)
    # A leaf module is never an owner: its parent performs the call.
    for n in nodes:
        if n.op == "call_module" and str(n.target) == prefix:
            return prefix.rpartition(".")[0]
    return prefix


def _rep(unit: Unit, node: fx.Node, owner_rel: str, depth: int) -> tuple[str, list[str], str | None]:
    return owner_local_name(node, unit.names, unit.path, owner_rel, depth)


def represent(cand: Candidate) -> Candidate:
    """Find how shallowly the owner can be rebuilt: children stay calls unless the source or a
    target lies inside them; record a NOT_REWRITABLE skip if no depth works."""
    unit, src = cand.unit, cand.source
    assert src is not None
    for depth in range(_MAX_INLINE_DEPTH):
        if not inside(src, cand.owner_rel) or src.op == "placeholder":
            # The fork is the owner's own input ("pre" placement): its first placeholder.
            rep_src, inline, key = input_name(unit.full(cand.owner_rel), 0), [], None
        else:
            rep_src, inline, key = _rep(unit, src, cand.owner_rel, depth)
        if key is not None and any(key in dict(call_stack(u)) for u in src.users):
            continue  # the source is not the output of that call
        if key is not None and not _returns(unit, key, src):
            continue  # that call returns more than the source (``return residual, skip``): look inside
        reps, ok = [], True
        for t in cand.targets:
            rep_t, inline_t, _ = _rep(unit, t, cand.owner_rel, depth)
            if rep_t == rep_src:
                ok = False
                break
            reps.append(rep_t)
            inline += inline_t
        if not ok:
            continue
        prefix = len(cand.owner_rel) + 1 if cand.owner_rel else 0
        cand.rep_source = rep_src
        cand.rep_targets = tuple(dict.fromkeys(reps))
        cand.inline = tuple(sorted({p[prefix:] for p in inline}))
        return cand
    return skip(cand, SkipReason.NOT_REWRITABLE, "the scaled tensor is buried too deep inside the block's children")


def _returns(unit: Unit, key: str, src: fx.Node) -> bool:
    """Whether the child call ``key`` returned ``src`` itself, not a tuple or list holding it
    (calls whose output was not recorded count as returning it, as before)."""
    path = dict(call_stack(src)).get(key)
    if path is None:
        return True
    index = int(key.rsplit("@", 1)[1]) if "@" in key else 0
    outputs = unit.outputs.get(path)
    if outputs is None or index >= len(outputs):
        return True
    return outputs[index] is src


def rebuildable(
    model: nn.Module, sites: list[Site], skipped: list[Skipped], traces: OwnerTraces, root_issues: dict[str, str]
) -> tuple[list[Site], list[Skipped]]:
    """Rule 14: trace every owner that is rebuilt as the rewriter will and keep only the sites
    found in it; the others are skipped as ``not-rewritable`` with the reason."""
    by_owner: dict[str, list[Site]] = {}
    for site in sites:
        if not site.attached:  # attached sites leave their owner's code alone: nothing to trace
            by_owner.setdefault(site.owner, []).append(site)
    dropped: dict[str, str] = {}
    for owner, group in by_owner.items():
        if owner in root_issues:
            dropped.update({s.name: f"{owner or 'the model'} is {root_issues[owner]}" for s in group})
            continue
        module = model.get_submodule(owner) if owner else model
        pending = list(group)
        while pending:
            reason = traces.check(module, owner, pending)
            if reason is None:
                break
            # Keep the sites that work on their own; drop the others with the reason.
            alone = {s.name: traces.check(module, owner, [s]) for s in pending}
            bad = [s for s in pending if alone[s.name] is not None] or pending
            for s in bad:
                dropped[s.name] = alone.get(s.name) or reason
            pending = [s for s in pending if s not in bad]
    kept = [s for s in sites if s.name not in dropped]
    skipped += [Skipped(s.node, SkipReason.NOT_REWRITABLE, dropped[s.name]) for s in sites if s.name in dropped]
    return kept, skipped


def drop_conflicting_owners(sites: list[Site], skipped: list[Skipped]) -> tuple[list[Site], list[Skipped]]:
    """An owner inside a module that another owner traces through could not be swapped in."""
    inlined = {f"{s.owner}.{p}" if s.owner else p for s in sites if not s.attached for p in s.inline}
    kept = []
    for site in sites:
        if any(site.owner == p or site.owner.startswith(p + ".") for p in inlined):
            skipped.append(Skipped(site.node, SkipReason.NOT_REWRITABLE, "its block is traced through by an outer site"))
        else:
            kept.append(site)
    return kept, skipped
