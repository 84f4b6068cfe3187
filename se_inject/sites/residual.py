"""Placement rule 1: residual sites, at the end of the branch's features, before the sum."""

from __future__ import annotations

import torch.fx as fx

from ..analysis.attention import gating_products
from ..analysis.axes import channel_axis, channel_slice_of
from ..analysis.dataflow import DataFlow
from ..analysis.node_names import node_scope
from ..analysis.ops import (
    is_add,
    is_layout,
    is_spatial_conv,
    is_unary_elementwise,
    is_upsample,
    op_key,
    tensor_shape,
    trailing_scaling_input,
)
from ..plan import SiteKind, SkipReason
from .existing_attention import enclosing_gates
from .fit import check_tensor
from .linear import linear_block
from .rebuild import represent
from .records import TRUNK_MAX_PARAMETRIC, Candidate, Context, Unit, skip

__all__ = ["residual"]


def residual(unit: Unit, node: fx.Node, ctx: Context) -> list[Candidate] | None:
    """Rule 1 for a sum: one residual candidate, or a skipped one with its reason (fusion,
    linear block, no trunk, already attended, ...); ``[]`` for a sum that is no residual at
    all (a constant or differently shaped operand). A real residual block marks its sum as
    the end of a finished block (rule 9)."""
    if not is_add(node):
        return None
    cand = _residual(unit, node, ctx)
    if cand is None:
        return []
    if cand.structural:
        ctx.finished.add(node)
    return [cand]


def _is_sum_output(flow: DataFlow, node: fx.Node, ctx: Context) -> bool:
    """Rule 9: a finished residual sum, directly or through layers without weights (an
    activation): trunk wherever it flows."""
    while node not in ctx.finished:
        preds = flow.live_inputs(node)
        if len(preds) != 1 or flow.is_parametric(node):
            return False
        node = preds[0]
    return True


def _shortcut_fork(
    flow: DataFlow, add: fx.Node, operands: list[fx.Node], fork: fx.Node | None, ctx: Context
) -> tuple[fx.Node, frozenset[fx.Node]] | None:
    """Where the operands meet when data from elsewhere joins the branch (rule 7): the fork
    and the nodes the region is kept within, or None to keep the dominator.

    An operand that the other one reads is the trunk and the fork (``x + f(conv(x) + emb(t))``
    with ``t`` a second model input; a dual-path block reading ``cat(sum, dense)`` of the block
    before): when the operands meet at no node, or when that operand is a finished sum (rule 9:
    the dominator would reach back into the block before). Otherwise, when they meet at no
    node, the latest fork that one model input alone gives them (a projection shortcut beside
    a conditioned branch). Two operands of different inputs, neither reading the other's
    input, keep no fork: a fusion."""
    for trunk, branch in (operands, operands[::-1]):
        if branch in flow.descendants(trunk) and (fork is None or _is_sum_output(flow, trunk, ctx)):
            return trunk, flow.descendants(trunk)
    if fork is not None:
        return None
    best: tuple[fx.Node, frozenset[fx.Node]] | None = None
    for source in (n for n in flow.order if n.op == "placeholder" and flow.live.get(n)):
        within = flow.descendants(source)
        if not all(o in within for o in operands):
            continue
        meet = flow.fork_within(source, add)
        if meet is not None and (best is None or flow.index[meet] > flow.index[best[0]]):
            best = (meet, within)
    return best


def _side_output(
    flow: DataFlow, trunk: fx.Node, fork: fx.Node, region: set[fx.Node], ctx: Context, cost: dict[fx.Node, int]
) -> fx.Node | None:
    """The finished residual sum whose branch computes ``trunk`` (a block returning ``(residual,
    skip)``: WaveNet's ``skips = skips + s``); None for a real shortcut (the fork, a projection
    of it, a finished sum). Only what the branch computed with a parametric layer counts: a
    slice of the fork that a branch also reads (RevNet's x2, read by F in y1 = x1 + F(x2) and
    the shortcut of y2 = x2 + G(y1) or of a projected y2 = P(x2) + G(y1)) is still the fork's."""
    if trunk is fork:
        return None
    for node in sorted(flow.ancestors_within(trunk, region) | {trunk}, key=flow.index.__getitem__):
        if node in ctx.branch_nodes and cost.get(node, 0) > 0:
            return ctx.branch_nodes[node]
    return None


def _earlier_sum(flow: DataFlow, operands: list[fx.Node], fork: fx.Node, ctx: Context) -> fx.Node | None:
    """Rule 1 for multi-branch residuals (``x + a(x) + b(x)``, PolyNet): an operand that is a
    residual sum from the same fork carries the trunk; the other operand is one more branch."""
    for op in operands:
        if op in ctx.trunks and flow.idom.get(op) is fork:
            return op
    return None


def _residual(unit: Unit, add: fx.Node, ctx: Context) -> Candidate | None:
    flow = unit.flow
    operands = [a for a in add.args[:2] if isinstance(a, fx.Node)]
    if len(operands) != 2 or not all(flow.live.get(a) for a in operands):
        return None  # rule 6: a constant, parameter or scalar operand is not a residual
    shape_a, shape_b = tensor_shape(operands[0]), tensor_shape(operands[1])
    if shape_a is None or shape_a != shape_b or shape_a != tensor_shape(add):
        return None
    policy = ctx.policy
    cand = Candidate(unit, SiteKind.RESIDUAL, add, unit.rewritable_owner(node_scope(add)))
    fork = flow.idom.get(add)
    within = None
    if fork is None or fork not in operands:
        found = _shortcut_fork(flow, add, operands, fork, ctx)
        if found is not None:
            fork, within = found
    if fork is None:
        return skip(cand, SkipReason.FUSION, "operands come from different inputs of the model")
    # Rule 7: locality is the dataflow's (fork, path lengths, resolution), not module scope:
    # a shortcut computed by the parent and passed in is still the trunk.
    region = flow.region(fork, add, within)
    cost, _ = flow.path_costs(fork, region)
    if (linear := linear_block(unit, region, cost)) is not None:
        return skip(cand, SkipReason.LINEAR_BLOCK, linear)
    a, b = operands
    earlier = _earlier_sum(flow, operands, fork, ctx)
    if earlier is not None:
        # One more branch of a multi-branch block: its region is its own side only, so the
        # earlier branches keep their sites (one placement per branch, none nested).
        trunk, branch = earlier, b if earlier is a else a
        trunk_cost = cost.get(ctx.trunks[earlier], 0)
        region = region - flow.ancestors_within(earlier, region) - {earlier}
    else:
        if cost[a] == cost[b]:
            return skip(cand, SkipReason.NO_TRUNK, f"both operands have {cost[a]} parametric layers")
        branch, trunk = (a, b) if cost[a] > cost[b] else (b, a)
        trunk_cost = cost[trunk]
        side = _side_output(flow, trunk, fork, region, ctx, cost)
        if side is not None:
            return skip(cand, SkipReason.FUSION, f"a sum of block outputs: the shorter operand is computed in the "
                        f"residual branch of {unit.names[side]} (a skip or side output), not a shortcut")
    if op_key(branch) == "detach":
        return skip(cand, SkipReason.FUSION, f"the branch ends in detach() at {unit.names[branch]}: a straight-through "
                    "estimator (x + (q - x).detach() is q forward, x's gradient back), not a residual")
    if cost[branch] <= trunk_cost:
        return skip(cand, SkipReason.NO_TRUNK, f"the branch has no more parametric layers than the trunk ({trunk_cost})")
    if trunk_cost > TRUNK_MAX_PARAMETRIC:
        return skip(cand, SkipReason.FUSION, f"the shorter operand still has {trunk_cost} parametric layers")
    merge = _multi_scale_merge(unit, fork, add, region, trunk_cost, ctx)
    if merge is not None:
        return skip(cand, SkipReason.FUSION, merge)
    cand.structural = True
    cand.region = region
    ctx.branch_nodes.update(dict.fromkeys((flow.ancestors_within(branch, region) | {branch}) - {fork}, add))
    ctx.trunks[add] = ctx.trunks[earlier] if earlier is not None else trunk
    cand.source, cand.targets = _branch_output(flow, branch, add, region, fork)
    if cost.get(cand.source, 0) == 0:
        return skip(cand, SkipReason.NO_TRUNK, "the branch has no parametric layer before its scalings")
    gates = gating_products(flow, region)
    if gates:
        return skip(cand, SkipReason.ALREADY_ATTENDED, f"branch gated at {unit.names[gates[0]]}")
    gates = enclosing_gates(unit, cand.owner_rel, add) if cand.owner_rel else []
    if gates:
        return skip(cand, SkipReason.ALREADY_ATTENDED, f"enclosing block gated at {unit.names[gates[0]]}")
    if policy.placement == "pre":
        branch_side = flow.ancestors_within(branch, region) | {branch}
        trunk_side = flow.ancestors_within(trunk, region) | {trunk}
        heads = tuple(u for u in fork.users if fork in flow.preds.get(u, ()) and u in branch_side and u not in trunk_side)
        if not heads:
            return skip(cand, SkipReason.NOT_REWRITABLE, "no layer of the branch alone reads the fork")
        cand.source, cand.targets = fork, heads
    elif policy.placement == "inner":
        placed = _after_last_spatial_conv(unit, flow.ancestors_within(branch, region) | {branch}, add)
        if placed is None:
            return skip(cand, SkipReason.NO_SPATIAL_CONV, "the branch has no spatial convolution")
        cand.source, cand.targets = placed
    if not check_tensor(cand, cand.source, policy):
        return cand
    return represent(cand)


def _multi_scale_merge(
    unit: Unit, fork: fx.Node, add: fx.Node, region: set[fx.Node], trunk_cost: int, ctx: Context
) -> str | None:
    """Rule 12 for a branch that upsamples: why the sum is a multi-scale merge, or None for a
    residual unit whose branch leaves its resolution and comes back.

    A branch that pools, convolves and interpolates back beside an identity trunk (hourglass
    and attention-residual units, self-calibrated convolutions) is a residual branch, and so
    is a decoder unit whose branch and projection trunk both upsample from a coarser fork (the
    mirror of a downsampling unit). A merge stays a fusion when the upsampled operand holds
    finished blocks (an FPN's or an encoder-decoder's deeper stages: the operands meet at no
    nearby fork) or when a projection at the sum's own resolution meets it (an FPN lateral)."""
    flow = unit.flow
    ordered = sorted(region, key=flow.index.__getitem__)
    upsampled = next((n for n in ordered if is_upsample(unit.module, n)), None)
    if upsampled is None:
        return None
    where = f"the branch changes resolution at {unit.names[upsampled]}"
    finished = next((n for n in ordered if n in ctx.finished), None)
    if finished is not None:
        return f"{where} and holds the finished block {unit.names[finished]}: a multi-scale merge"
    fork_shape, add_shape = tensor_shape(fork), tensor_shape(add)
    if fork_shape is None or add_shape is None or len(fork_shape) != len(add_shape):
        return f"{where}: a multi-scale merge"
    axis = channel_axis(add, flow)
    same = all(a == b for d, (a, b) in enumerate(zip(fork_shape, add_shape, strict=True)) if d not in (0, axis))
    if same and trunk_cost > 0:
        return f"{where} beside a projection at its input's resolution: a multi-scale merge"
    return None


def _branch_output(
    flow: DataFlow, branch: fx.Node, add: fx.Node, region: set[fx.Node], fork: fx.Node
) -> tuple[fx.Node, tuple[fx.Node, ...]]:
    """Where the branch's features end (rule 1): before its trailing scalings (drop-path, layer
    scale, ``* scale``), also behind a permute or reshape that separates a scaling from the sum
    (EdgeNeXt), and before a channel slice that feeds only part of the branch to the sum
    (ReXNet's and dual-path networks' partial residuals: the SE squeezes the whole output).
    Returns the tensor to scale and the nodes that read it instead."""
    source, target, sliced = branch, add, False

    def usable(n: fx.Node | None) -> bool:
        return n is not None and n in region and n is not fork

    while True:
        inner = trailing_scaling_input(flow, source)
        if inner is None and (whole := channel_slice_of(flow, source)) is not None and usable(whole):
            inner, sliced = whole, True
        if inner is None and is_layout(flow, source):
            # Only permutes and reshapes that keep the rank: a token sequence viewed as a map
            # (SAM's attention output) is squeezed as the map the sum sees.
            probe, rank = source, len(tensor_shape(source) or ())
            while is_layout(flow, probe) and usable(probe) and len(tensor_shape(probe) or ()) == rank:
                probe = flow.live_inputs(probe)[0]
            if usable(probe) and len(tensor_shape(probe) or ()) == rank and trailing_scaling_input(flow, probe) is not None:
                inner = flow.live_inputs(source)[0]
        if not usable(inner):
            break
        source, target = inner, source  # type: ignore[assignment]
    if sliced:
        readers = tuple(u for u in source.users if source in flow.preds.get(u, ()))
        return source, readers
    return source, (target,)


def _after_last_spatial_conv(
    unit: Unit, branch: set[fx.Node], add: fx.Node
) -> tuple[fx.Node, tuple[fx.Node, ...]] | None:
    """The branch's last spatial convolution, followed through its norm and activation; and
    the branch nodes that read it (the paper's "SE 3x3" placement)."""
    flow = unit.flow
    convs = [n for n in sorted(branch, key=flow.index.__getitem__) if is_spatial_conv(unit.module, n)]
    if not convs:
        return None
    source = convs[-1]
    while True:
        users = [u for u in source.users if source in flow.preds.get(u, ())]
        if len(users) != 1 or users[0] is add or users[0] not in branch or not is_unary_elementwise(flow, users[0]):
            break
        source = users[0]
    targets = tuple(u for u in source.users if source in flow.preds.get(u, ()) and (u in branch or u is add))
    return (source, targets) if targets else None
