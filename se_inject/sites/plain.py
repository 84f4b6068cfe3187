"""SE-VGG's plain sites (opt-in): after the non-linearity that follows each convolution, and
after each re-parameterisable block (placement rule 10), outside it."""

from __future__ import annotations

import torch.fx as fx

from ..analysis.node_names import node_scope
from ..analysis.ops import (
    is_activation,
    is_add,
    is_cat,
    is_conv,
    is_mul,
    is_norm,
    trailing_scaling_input,
)
from ..plan import SiteKind, SkipReason
from .fit import check_tensor
from .linear import linear_block, split_norm
from .rebuild import represent
from .records import Candidate, Context, Unit, skip

__all__ = ["plain"]


def plain(unit: Unit, node: fx.Node, ctx: Context) -> list[Candidate] | None:
    """SE-VGG for a non-linearity: a plain candidate when it follows a convolution (and its
    norm) or a re-parameterisable block (rule 10; the SE then sits outside the block, so that
    deploy-time fusion, timm's ``reparameterize_model``, still fuses every block); ``[]`` for
    other non-linearities. Opt-in, for networks without residual or concatenation sites."""
    if not is_activation(unit.module, node):
        return None
    flow = unit.flow
    producer = flow.preds[node][0] if len(flow.preds[node]) == 1 else None
    merge = producer
    while merge is not None and (inner := trailing_scaling_input(flow, merge)) is not None:
        merge = inner
    if merge is not None and (is_add(merge) or is_cat(merge)) and _linear_merge(unit, merge):
        return [_after_block(unit, node, _scope_of(merge))]
    if producer is not None:
        producer = _norm_input(unit, producer)
    if producer is None or not is_conv(unit.module, producer):
        return []
    out = _self_gated(unit, node)
    cand = Candidate(unit, SiteKind.PLAIN, node, _single_call_owner(unit, _scope_of(out)), source=out)
    refused = _refused(unit, cand)
    if refused is not None:
        return [refused]
    if not check_tensor(cand, out):
        return [cand]
    shape = cand.shape
    if all(d == 1 for k, d in enumerate(shape) if k not in (0, cand.axis % len(shape))):
        return [skip(cand, SkipReason.NO_SPATIAL_EXTENT, f"shape {list(shape)}")]  # rule 5: a 1x1 map
    return [represent(cand)]


def _self_gated(unit: Unit, act: fx.Node) -> fx.Node:
    """The non-linearity's output: ``x * sigmoid(x)`` (a hand-written Swish) ends at the product."""
    flow = unit.flow
    users = [u for u in act.users if act in flow.preds.get(u, ())]
    if len(users) == 1 and is_mul(users[0]) and set(flow.live_inputs(users[0])) == {act, *flow.preds[act]}:
        return users[0]
    return act


def _single_call_owner(unit: Unit, scope: str) -> str:
    """The owner for a plain site in ``scope``: the nearest rewritable block whose module is
    called once in the unit. A module called several times (one activation instance shared by
    every block, also under several names) runs one forward for all its calls: an SE block
    rebuilt into it would scale every call with one width; its caller is rebuilt instead."""
    owner = unit.rewritable_owner(scope)
    while owner and unit.module_calls(owner) > 1:
        owner = unit.rewritable_owner(owner.rpartition(".")[0])
    return owner


def _refused(unit: Unit, cand: Candidate) -> Candidate | None:
    """Places a plain SE never goes (rule 5): inside an existing channel attention block (its
    squeeze's 1x1 maps, its gate); None elsewhere."""
    flow = unit.flow
    for product in unit.owner_gates(""):
        fork = flow.idom.get(product)
        if fork is not None and cand.anchor in flow.region(fork, product):
            return skip(cand, SkipReason.ALREADY_ATTENDED, f"inside the channel attention gated at {unit.names[product]}")
    return None


def _norm_input(unit: Unit, node: fx.Node) -> fx.Node:
    """What a norm normalises: its input, also for normalised channel slices concatenated back
    (an IBN layer, rule 10); ``node`` itself when it is no norm."""
    flow = unit.flow
    if is_norm(unit.module, node) and len(flow.preds[node]) == 1:
        return flow.preds[node][0]
    fork = flow.idom.get(node)
    if is_cat(node) and fork is not None and split_norm(unit, fork, flow.region(fork, node)) is not None:
        return fork
    return node


def _linear_merge(unit: Unit, merge: fx.Node) -> bool:
    fork = unit.flow.idom.get(merge)
    if fork is None:
        return False
    region = unit.flow.region(fork, merge)
    cost, _ = unit.flow.path_costs(fork, region)
    return linear_block(unit, region, cost) is not None


def _after_block(unit: Unit, act: fx.Node, block: str) -> Candidate:
    """A plain site on the output of the re-parameterisable ``block``, owned by its parent."""
    owner = unit.rewritable_owner(block.rpartition(".")[0]) if block else ""
    cand = Candidate(unit, SiteKind.PLAIN, act, owner, source=act)
    if not check_tensor(cand, act):
        return cand
    cand = represent(cand)
    rel = block[len(owner) + 1:] if owner else block
    if cand.skip is None and block and any(p == rel or rel.startswith(p + ".") for p in cand.inline):
        return skip(cand, SkipReason.NOT_REWRITABLE, f"the SE would sit inside the re-parameterisable block {unit.full(block)}")
    return cand


def _scope_of(node: fx.Node) -> str:
    return str(node.target).rpartition(".")[0] if node.op == "call_module" else node_scope(node)
