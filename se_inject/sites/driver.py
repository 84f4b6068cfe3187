"""The placement driver: model -> plan. Traces the model into units, runs the rules over each
unit's graph in order, marks nested places, then selects, names, numbers and checks the sites."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch.fx as fx
from torch import nn

from ..analysis.batch import grown_args, once
from ..analysis.ops import module_lookups
from ..analysis.owners import OwnerTraces
from ..analysis.sandbox import collection_paused, preserved_state
from ..plan import Plan, Site, SiteKind, Skipped, SkipReason, Unanalysed
from ..request import SEConfig, Selection
from ..se_block import hidden_width
from .concatenation import concatenation
from .inputs import check_input_fits, describe_input, example_args
from .mechanism import (
    AttachFacts,
    PlaceholderVerdicts,
    attach_per_owner,
    attach_point,
    fills_placeholder,
    has_placeholder,
)
from .plain import plain
from .rebuild import drop_conflicting_owners, rebuildable
from .records import Candidate, Context, Policy, Rule, Unit, skip
from .residual import residual
from .selection import check_selection, deselected, free_name, number_stages
from .units import analyse

log = logging.getLogger(__name__)

__all__ = ["Analysis", "build_plan", "example_args", "RULES", "PLAIN_RULES"]


class Analysis:
    """One model's units at one example input, kept so that plans under other options (the
    ``plain=True`` and ``tokens=True`` suggestions of a plan without sites) reuse them: those
    options change the rules and the policy, never what was traced. Pass the same object to
    each :func:`build_plan` call of one model and input; the first fills it."""

    def __init__(self) -> None:
        self._key: tuple[int, int] | None = None
        self._found: tuple[Sequence[Any], list[Unit], list[Unanalysed]] | None = None

    def units(self, model: nn.Module, example_input: Any) -> tuple[Sequence[Any], list[Unit], list[Unanalysed]]:
        """The arguments, units and unanalysed parts of ``model`` at ``example_input``, traced on
        first need (the same model and input object afterwards, or a new analysis)."""
        key = (id(model), id(example_input))
        if self._found is None or self._key != key:
            args = example_args(model, example_input)
            units: list[Unit] = []
            unanalysed: list[Unanalysed] = []
            analyse(model, "", args, units, unanalysed, {}, grown=once(lambda: grown_args(args)))
            check_input_fits(model, args, units, unanalysed, given=example_input is not None)
            self._key, self._found = key, (args, units, unanalysed)
        return self._found


def build_plan(
    model: nn.Module,
    config: SEConfig,
    selection: Selection | None = None,
    *,
    example_input: Any = None,
    traces: OwnerTraces | None = None,
    analysis: Analysis | None = None,
) -> Plan:
    """Analyse ``model`` (left as it was) and return where SE blocks go under ``config``, with
    the sites ``selection`` keeps; the plan records both.

    Every owner is traced as the rewriter will trace it and every site is found in that trace
    before it is listed (owners that fail are skipped as ``not-rewritable``); pass ``traces``
    to keep those traces for the rewriter (``se_inject.inject.rewrite.build_blocks``), and
    ``analysis`` to plan the same model and input again under other options without tracing it
    again.

    Analysis runs the user's modules on fake tensors and proxies: what their forwards cache on
    ``self`` (and the eval mode analysis sets) is put back, so the model is as it was,
    and none of the user's hooks fires. Safe from several threads: analyses run one at a time (torch.fx patches process-wide
    globals while it traces; ``analysis.sandbox.analysis_lock``).

    Raises:
        SelectionError: ``selection.stages`` or ``.resolutions`` name none of the model's (the
            message lists them).
        InputError: the input does not fit the model (its forward reached none of its parts).
    """
    selection = Selection() if selection is None else selection
    with collection_paused(), preserved_state(model):
        args, units, unanalysed = (analysis or Analysis()).units(model, example_input)
        return _plan(model, config, selection, args, units, list(unanalysed), OwnerTraces() if traces is None else traces)


def _plan(
    model: nn.Module,
    config: SEConfig,
    selection: Selection,
    args: Sequence[Any],
    units: list[Unit],
    unanalysed: list[Unanalysed],
    traces: OwnerTraces,
) -> Plan:
    policy = Policy(config.placement, selection.tokens)
    with module_lookups():  # the rules change no module tree
        candidates = _candidates(units, RULES, policy)
        _mark_nested(candidates)
        _mark_nested_across_units(candidates)
        if selection.plain and not any(c.skip is None for c in candidates):
            candidates += _candidates(units, PLAIN_RULES, policy)
    sites, skipped = _finalise(model, candidates, config, selection, traces)
    specialised = tuple(f"{u.path or 'model'}: {where}" for u in units for where in u.specialised)
    return Plan(tuple(sites), tuple(skipped), tuple(unanalysed), config, describe_input(args), selection, specialised)


#: The placement rules, asked in this order for every live node of every unit; the first
#: that answers (not None) wins. A new graph pattern is a new rule and a new test net.
RULES: tuple[Rule, ...] = (residual, concatenation)

#: SE-VGG's rule, asked only when ``plain=True`` and the rules above found no usable site.
PLAIN_RULES: tuple[Rule, ...] = (plain,)


def _candidates(units: Sequence[Unit], rules: Sequence[Rule], policy: Policy) -> list[Candidate]:
    """Run ``rules`` over each unit's live nodes in graph order, one shared context per unit."""
    found: list[Candidate] = []
    for unit in units:
        ctx = Context(policy)
        for node in unit.flow.order:
            if not unit.flow.live.get(node):
                continue
            for rule in rules:
                made = rule(unit, node, ctx)
                if made is not None:
                    found += made
                    break
    return found


def _mark_nested(candidates: list[Candidate]) -> None:
    """Rule 2 and 7: one SE per block. Places inside a bigger residual or inception block are
    nested, whether that block got a site or was skipped for already having attention."""
    outer: list[Candidate] = []
    for cand in sorted(candidates, key=lambda c: -len(c.region)):
        probe = cand.source if cand.kind is SiteKind.DENSE else cand.anchor
        host = next((o for o in outer if o.unit is cand.unit and probe in o.region), None)
        if host is not None:
            _nest(cand, f"inside {cand.unit.names[host.anchor]}")
            continue
        if _is_host(cand):
            outer.append(cand)


def _is_host(cand: Candidate) -> bool:
    """A block that nests what is inside it: it got a site, or it already has attention (so
    that a second injection nests the same places as the first)."""
    return cand.structural and (cand.skip is None or cand.skip.reason is SkipReason.ALREADY_ATTENDED)


def _nest(cand: Candidate, detail: str) -> None:
    """Skip ``cand`` as nested, unless it is skipped for already having attention."""
    if cand.skip is None or cand.skip.reason is not SkipReason.ALREADY_ATTENDED:
        node = cand.source if cand.kind is SiteKind.DENSE and cand.source is not None else cand.anchor
        skip(cand, SkipReason.NESTED, detail, node)


def _mark_nested_across_units(candidates: list[Candidate]) -> None:
    """Rule 2 across analysis units: a unit of its own (a block that does not trace, or a
    timm no-trace leaf) is a call in its enclosing unit; when that call, or the call of an
    ancestor, lies in the region of a host block there, every place of the inner unit is
    nested. Units are visited outermost first, so the outer site wins."""
    by_unit: dict[int, list[Candidate]] = {}
    for cand in candidates:
        by_unit.setdefault(id(cand.unit), []).append(cand)
    units = sorted((group[0].unit for group in by_unit.values()), key=lambda u: (_depth(u.path), u.path))
    # Model-level paths of the submodules called inside a host's region, with the host's name.
    hosted: list[tuple[str, str]] = []
    for unit in units:
        host = next((name for called, name in hosted if _within(unit.path, called)), None)
        if host is not None:
            for cand in by_unit[id(unit)]:
                _nest(cand, f"inside {host}")
            continue
        for cand in by_unit[id(unit)]:
            if not _is_host(cand):
                continue
            hosted += [
                (unit.full(str(node.target)), unit.names[cand.anchor])
                for node in sorted(cand.region, key=unit.flow.index.__getitem__)
                if node.op == "call_module"
            ]


def _mechanisms(
    model: nn.Module, sites: list[Site], found: dict[int, tuple[Unit, fx.Node, str, set[fx.Node]]]
) -> list[Site]:
    """Each site's way into the model: the owner's own placeholder, a hook on the module whose
    output it scales, or (neither) rebuilding the owner."""
    facts = AttachFacts(model)
    probes = PlaceholderVerdicts()  # traces with a probe in the placeholder: never the rewriter's
    decided = []
    for i, site in enumerate(sites):
        owner = model.get_submodule(site.owner) if site.owner else model
        if has_placeholder(owner, site.attr):  # the owner's code may call it: fill it, or rebuild
            decided.append(replace(site, slot=fills_placeholder(owner, site, probes)))
            continue
        unit, source, owner_rel, targets = found[i]
        decided.append(replace(site, attach=attach_point(unit, source, targets, owner_rel, facts)))
    return decided


def _depth(path: str) -> int:
    return path.count(".") + 1 if path else 0


def _within(path: str, ancestor: str) -> bool:
    """Whether ``path`` is ``ancestor`` or lies under it (model-level module paths)."""
    return path == ancestor or path.startswith(ancestor + ".")


def _finalise(
    model: nn.Module, candidates: list[Candidate], config: SEConfig, selection: Selection, traces: OwnerTraces
) -> tuple[list[Site], list[Skipped]]:
    """Number stages, apply the selection, name the sites (one per dense producer) and keep
    those whose owner the rewriter can rebuild; skipped places keep their reasons."""
    order: dict[int, int] = {}
    for c in candidates:
        order.setdefault(id(c.unit), len(order))
    candidates = sorted(candidates, key=lambda c: (order[id(c.unit)], c.unit.flow.index[c.source or c.anchor]))
    stages = number_stages(candidates)
    check_selection(model, selection, stages)
    sites: list[Site] = []
    skipped: list[Skipped] = []
    taken: dict[str, set[str]] = {}
    seen_sources: dict[tuple[int, fx.Node], int] = {}
    # Per site index: the unit-graph facts its attach point is decided on (targets merged).
    found: dict[int, tuple[Unit, fx.Node, str, set[fx.Node]]] = {}
    root_issues: dict[str, str] = {}
    # Owners with several sites name each after its source; counted before selection, so a
    # site's name does not depend on which others are selected.
    per_owner: dict[str, set[tuple[int, fx.Node, str]]] = {}
    for cand in candidates:
        if cand.skip is None and cand.source is not None:
            per_owner.setdefault(cand.unit.full(cand.owner_rel), set()).add(
                (id(cand.unit), cand.source, cand.rep_source))
    named: dict[tuple[int, fx.Node, str], str] = {}
    for cand in candidates:
        if cand.skip is not None:
            skipped.append(cand.skip)
            continue
        assert cand.source is not None
        key = (id(cand.unit), cand.source, cand.rep_source)
        if key in seen_sources:  # dense: one SE per producer, whatever the number of consumers
            site = sites[seen_sources[key]]
            merged = tuple(dict.fromkeys(site.targets + cand.rep_targets))
            sites[seen_sources[key]] = replace(site, targets=merged)
            held = found[seen_sources[key]]
            found[seen_sources[key]] = (*held[:3], held[3] | set(cand.targets) if held[3] and cand.targets else set())
            continue
        owner = cand.unit.full(cand.owner_rel)
        if not cand.owner_rel and cand.unit.root_call_issue:
            root_issues[owner] = cand.unit.root_call_issue
        if key not in named:
            several = len(per_owner.get(owner, ())) > 1
            named[key] = free_name(model, owner, taken, cand.rep_source if several else None)
            taken.setdefault(owner, set()).add(named[key].rsplit(".", 1)[-1])
        name = named[key]
        node_name = cand.unit.names[cand.anchor]
        stage, spatial = stages[id(cand)]
        reason = deselected(selection, name, owner, cand.channels, stage, spatial)
        if reason is not None:
            skipped.append(Skipped(node_name, *reason))
            continue
        seen_sources[key] = len(sites)
        found[len(sites)] = (cand.unit, cand.source, cand.owner_rel, set(cand.targets))
        sites.append(
            Site(
                name=name,
                kind=cand.kind,
                owner=owner,
                node=node_name,
                source=cand.rep_source,
                targets=cand.rep_targets,
                channels=cand.channels,
                hidden=hidden_width(cand.channels, config.reduction, config.min_hidden, config.hidden),
                channel_axis=cand.axis,
                stage=stage,
                inline=cand.inline,
                prefix_tokens=cand.prefix_tokens,
                batch_axis=cand.batch_axis,
                spatial=spatial,
                owner_args=cand.unit.owner_args(cand.owner_rel),
                owner_inputs=cand.unit.owner_inputs(cand.owner_rel),
                config=config,
            )
        )
    decided = _mechanisms(model, sites, found)
    sites, skipped = drop_conflicting_owners(attach_per_owner(decided), skipped)
    before = len(skipped)
    kept, skipped = rebuildable(model, sites, skipped, traces, root_issues)
    return _attached_after_all(decided, kept, skipped, before)


def _attached_after_all(
    decided: list[Site], kept: list[Site], skipped: list[Skipped], before: int
) -> tuple[list[Site], list[Skipped]]:
    """An owner none of whose sites could be rebuilt (its code does not trace faithfully) keeps
    those that attach: they leave its code alone, so why it cannot be rebuilt does not touch
    them. ``skipped[before:]`` are the rebuild's refusals; an attached site leaves them."""
    owners = {s.owner for s in kept}
    refused = {(s.node, s.reason) for s in skipped[before:]}
    back = [
        s for s in decided
        if s.attached and s.owner not in owners and (s.node, SkipReason.NOT_REWRITABLE) in refused
    ]
    if not back:
        return kept, skipped
    nodes = {s.node for s in back}
    order = {s.name: i for i, s in enumerate(decided)}
    kept = sorted([*kept, *back], key=lambda s: order.get(s.name, len(order)))
    return kept, skipped[:before] + [s for s in skipped[before:] if s.node not in nodes]
