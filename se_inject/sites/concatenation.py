"""Placement rules 2, 3, 9 and 12: channel concatenations as inception sites (one SE after a
module of parallel branches) or dense sites (one SE per newly computed input), or fusions."""

from __future__ import annotations

import math
from collections.abc import Mapping, Set

import torch.fx as fx
from torch import nn

from ..analysis.attention import gating_products
from ..analysis.axes import channel_axis, channel_slice_of
from ..analysis.dataflow import DataFlow
from ..analysis.node_names import node_scope
from ..analysis.ops import cat_dim, is_add, is_cat, is_conv, is_layout, is_scaling, tensor_shape
from ..plan import SiteKind, Skipped, SkipReason
from .existing_attention import block_gates
from .fit import check_tensor
from .linear import linear_block, split_norm
from .rebuild import common_owner, represent
from .records import TRUNK_MAX_PARAMETRIC, Candidate, Context, Policy, Unit, skip

__all__ = ["concatenation"]


def concatenation(unit: Unit, node: fx.Node, ctx: Context) -> list[Candidate] | None:
    """Rules 2, 3, 9-12 for a concatenation: an inception candidate, dense candidates (one per
    producer not given one by an earlier concatenation), or a skipped place. An aggregation of
    finished blocks (nothing newly computed: DLA, CSP roots) is itself a finished block."""
    if not is_cat(node):
        return None
    found = []
    cands = _concatenation(unit, node, ctx.policy, ctx.producers, ctx.finished, ctx.trunks, ctx.dense, ctx.dense_producers)
    if len(cands) == 1 and cands[0].skip is not None and cands[0].skip.reason is SkipReason.NO_COMPUTED_BRANCH:
        ctx.finished.add(node)  # an aggregation root (DLA, CSP): trunk, like the sums it joins
    for cand in cands:
        # Rule 3: one SE per producer, however many concatenations read it.
        if cand.kind is SiteKind.DENSE and cand.source in ctx.producers:
            continue
        ctx.producers.add(cand.source)
        if cand.kind is SiteKind.DENSE:
            ctx.dense_producers.add(cand.source)
        found.append(cand)
    return found


def _concatenation(
    unit: Unit,
    cat: fx.Node,
    policy: Policy,
    done: Set[fx.Node | None] = frozenset(),
    finished: Set[fx.Node] = frozenset(),
    sum_trunks: Mapping[fx.Node, fx.Node] | None = None,
    dense: set[fx.Node] | None = None,
    reread: Set[fx.Node | None] = frozenset(),
) -> list[Candidate]:
    """Inception, dense or fusion (rules 2, 3, 9-12); ``done``: producers already given a
    dense candidate by an earlier concatenation (one SE per producer); ``finished``: the ends of
    finished blocks before ``cat``: residual sums (not fusions, not linear merges) and
    aggregation roots; ``sum_trunks``: the trunk of each of those sums; ``dense``: outputs of
    the dense concatenations before ``cat`` (carried features), to which ``cat`` is added
    when it is one; ``reread``: producers an earlier dense concatenation took as new."""
    flow = unit.flow
    raw = cat.args[0] if cat.args else cat.kwargs.get("tensors", ())
    inputs: list[fx.Node] = []
    for a in raw if isinstance(raw, (list, tuple)) else ():
        if isinstance(a, fx.Node) and flow.live.get(a) and a not in inputs:
            inputs.append(a)
    if len(inputs) < 2:
        return []  # rule 6: concatenating a class token or a constant is not a site
    if not flow.feeds_parametric(cat) and all(_is_prediction(unit, i) for i in inputs):
        return []  # rule 12: the model's outputs (box and class predictions), read by no layer
    owner_rel = unit.rewritable_owner(node_scope(cat))
    cand = Candidate(unit, SiteKind.INCEPTION, cat, owner_rel)
    shape = tensor_shape(cat)
    axis = channel_axis(cat, flow)
    if shape is None or axis is None:
        return [skip(cand, SkipReason.UNKNOWN_CHANNEL_AXIS)]
    if cat_dim(cat) % len(shape) != axis:
        return [skip(cand, SkipReason.NOT_CHANNEL_CONCAT, f"dim {cat_dim(cat)} of {list(shape)}")]
    fork = flow.idom.get(cat)
    if fork is None:
        return [skip(cand, SkipReason.FUSION, "inputs come from different inputs of the model")]
    region = flow.region(fork, cat)
    cost, pooled = flow.path_costs(fork, region)
    if (linear := linear_block(unit, region, cost) or split_norm(unit, fork, region)) is not None:
        return [skip(cand, SkipReason.LINEAR_BLOCK, linear)]
    ancestors = {i: flow.ancestors_within(i, region) for i in inputs}
    trunks = _sum_trunks(flow, inputs, finished, cost) | _projected_trunks(flow, sum_trunks or {}, region)
    earlier_dense = dense if dense is not None else set()

    def carried(i: fx.Node, pool_is_branch: bool) -> bool:
        # Rule 3: the fork, a slice or pooled copy of it (a pooling-only input is a branch of an
        # Inception module, but beside carried features just a pooled copy of them); rule 9: a
        # residual sum's output (and a slice of its shortcut) is trunk; an earlier dense
        # concatenation's output is carried features (DPN's dense path).
        return (
            i is fork
            or (cost[i] == 0 and not (pool_is_branch and pooled[i]))
            or (channel_slice_of(flow, i) or i) in trunks
            or i in earlier_dense
            or reused(i)
            or _after_residual(unit, i, fork, finished)
        )

    def reused(i: fx.Node) -> bool:
        # Rule 3: a producer an earlier concatenation already took as new is carried here
        # (SparseNet's layers read exponentially spaced earlier outputs, each again and again).
        return (channel_slice_of(flow, i) or i) in reread

    computed = [i for i in inputs if not carried(i, pool_is_branch=False)]
    coarse = _coarser_path(unit, cat, shape, axis, [i for i in inputs if i is not fork], ancestors)
    if coarse is not None:
        return [skip(cand, SkipReason.FUSION, coarse)]
    shortest = flow.shortest_costs(fork, region)
    nearest = min(shortest.get(i, 0) for i in inputs)
    if nearest > TRUNK_MAX_PARAMETRIC and not any(reused(i) for i in inputs):
        # Rule 12: no input lies within a handful of layers of the fork (NASNet's two-input
        # cells meet only far back): a fusion of distant features, not one module.
        return [skip(cand, SkipReason.FUSION, f"every input is {nearest}+ parametric layers from {unit.names[fork]}")]
    if not computed:
        return [skip(cand, SkipReason.NO_COMPUTED_BRANCH)]
    if not any(carried(i, pool_is_branch=True) for i in inputs):
        return [_inception(cand, fork, region, policy)]
    if dense is not None:
        dense.add(cat)
    return _dense(unit, cat, computed, region, done, policy)


def _inception(cand: Candidate, fork: fx.Node, region: set[fx.Node], policy: Policy) -> Candidate:
    """Rule 2: every input of the concatenation is a branch that transforms the fork: one SE
    after it (``pre``: on the fork, for every branch that reads it). A real block: what lies
    inside its region is nested."""
    unit, cat, flow = cand.unit, cand.anchor, cand.unit.flow
    cand.structural = True
    cand.region = region
    cand.source = cat
    if not check_tensor(cand, cat, policy):
        return cand
    gated = gating_products(flow, region) or block_gates(unit, cand.owner_rel, cat)
    if gated:
        return skip(cand, SkipReason.ALREADY_ATTENDED, f"block gated at {unit.names[gated[0]]}")
    if policy.placement == "pre":
        # The whole module is the branch: scale its input for every branch that reads it.
        cand.source = fork
        cand.targets = tuple(u for u in fork.users if fork in flow.preds.get(u, ()) and u in region)
        if not check_tensor(cand, fork, policy):
            return cand
    return represent(cand)


def _dense(
    unit: Unit, cat: fx.Node, computed: list[fx.Node], region: set[fx.Node], done: Set[fx.Node | None], policy: Policy
) -> list[Candidate]:
    """Rule 3: some inputs are carried features; each newly ``computed`` input gets one SE,
    before the concatenation, unless an earlier concatenation gave its producer one (``done``)."""
    flow = unit.flow
    dense = []
    for new in computed:
        # Rule 3: each new input gets its SE once, before the concatenation; a channel slice of
        # a computed tensor is scaled as the whole tensor, before slicing.
        producer = new
        while (whole := channel_slice_of(flow, producer)) is not None and whole in region:
            producer = whole
        if producer in done:
            continue
        consumers = tuple(
            u for u in producer.users
            if producer in flow.preds.get(u, ()) and (is_cat(u) or channel_slice_of(flow, u) is producer)
        )
        owner = unit.rewritable_owner(common_owner([producer, *consumers]))
        d = Candidate(unit, SiteKind.DENSE, cat, owner, source=producer, targets=consumers)
        if not check_tensor(d, producer, policy):
            d.skip = Skipped(unit.names[producer], d.skip.reason, d.skip.detail)  # type: ignore[union-attr]
            dense.append(d)
            continue
        gated = block_gates(unit, owner, cat) if owner else gating_products(flow, region)
        if gated:
            dense.append(skip(d, SkipReason.ALREADY_ATTENDED, f"block gated at {unit.names[gated[0]]}", producer))
            continue
        dense.append(represent(d))
    return dense


def _after_residual(unit: Unit, node: fx.Node, fork: fx.Node, finished: Set[fx.Node]) -> bool:
    """Rule 9: ``node`` is a residual sum's output, directly or through a single-input chain of
    at most a handful of layers (an activation; CSP's transition conv after its blocks): the
    aggregation of finished residual blocks, not a new feature."""
    flow, layers = unit.flow, 0
    while node is not fork:
        if node in finished:
            return True
        if flow.is_parametric(node) and not is_scaling(flow, node):
            layers += 1
        preds = flow.preds.get(node, [])
        if len(preds) != 1 or layers > TRUNK_MAX_PARAMETRIC:
            return False
        node = preds[0]
    return False


def _sum_trunks(flow: DataFlow, inputs: list[fx.Node], finished: Set[fx.Node], cost: dict[fx.Node, int]) -> set[fx.Node]:
    """The trunks of the sums among ``inputs`` (the shorter operand, or what it is a channel
    slice of): another slice of a sum's projected shortcut is carried too (dual-path blocks)."""
    trunks: set[fx.Node] = set()
    for i in inputs:
        if i in finished and is_add(i):
            a, b = i.args[:2]
            trunk = a if cost.get(a, 0) <= cost.get(b, 0) else b
            trunks.add(channel_slice_of(flow, trunk) or trunk)  # type: ignore[arg-type]
    return trunks


def _projected_trunks(flow: DataFlow, sum_trunks: Mapping[fx.Node, fx.Node], region: Set[fx.Node]) -> set[fx.Node]:
    """Projections in ``region`` that an earlier residual sum's trunk is a channel slice of: a
    dual-path block projects its input once and sums one slice into the residual path, so the
    projection's other slices are carried features too (DPN's ``x_s2`` beside ``x_s1``)."""
    found: set[fx.Node] = set()
    for trunk in sum_trunks.values():
        whole = channel_slice_of(flow, trunk)
        if whole is not None and whole in region:
            found.add(whole)
    return found


def _is_prediction(unit: Unit, node: fx.Node) -> bool:
    """A raw output of a convolution or linear layer (box or class logits), possibly reshaped."""
    while is_layout(unit.flow, node):
        node = unit.flow.live_inputs(node)[0]
    return is_conv(unit.module, node) or isinstance(_leaf(unit, node), nn.Linear)


def _leaf(unit: Unit, node: fx.Node) -> nn.Module | None:
    return unit.module.get_submodule(str(node.target)) if node.op == "call_module" else None


def _coarser_path(
    unit: Unit,
    cat: fx.Node,
    shape: tuple[int, ...],
    axis: int,
    inputs: list[fx.Node],
    ancestors: dict[fx.Node, set[fx.Node]],
) -> str | None:
    """Rule 12: an input computed through a coarser resolution than the concatenation's (U-Net
    and DeepLab decoders, FPN/PAN necks: upsampled deep features joined with a skip) makes the
    concatenation a fusion. A global-pooling branch (ASPP's image pool, 1 px) is no scale."""
    def spatial(s: tuple[int, ...]) -> int:
        return math.prod(d for k, d in enumerate(s) if k not in (0, axis))

    size = spatial(shape)
    for n in set(inputs).union(*(ancestors[i] for i in inputs)):
        s = tensor_shape(n)
        if s is not None and len(s) == len(shape) and 1 < spatial(s) < size:
            i = next(i for i in inputs if i is n or n in ancestors[i])
            return f"{unit.names[i]} is computed at a coarser resolution ({unit.names[n]}, {list(s)})"
    return None
