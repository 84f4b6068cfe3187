"""SE-VGG's plain sites (opt-in): after the non-linearity that follows each convolution, and
after each re-parameterisable block (placement rule 10), outside it."""

from __future__ import annotations

import torch.fx as fx

from ..analysis.node_names import node_scope
from ..analysis.ops import is_activation, is_add, is_cat, is_conv, is_norm, trailing_scaling_input
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
    owner = unit.rewritable_owner(_scope_of(node))
    cand = Candidate(unit, SiteKind.PLAIN, node, owner, source=node)
    return [represent(cand) if check_tensor(cand, node) else cand]


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
