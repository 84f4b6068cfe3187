"""Existing channel attention: products whose gate is pooled from the tensor it scales (SE, eSE,
ECA, CBAM's channel part, SK, split attention), and our own ``SEBlock`` calls."""

from __future__ import annotations

from collections.abc import Iterable

import torch.fx as fx

from ..se_block import SEBlock
from .axes import channel_axis
from .dataflow import DataFlow
from .ops import is_mul, module_of, tensor_shape

__all__ = ["gating_products"]


def _strip_expand(node: fx.Node) -> fx.Node:
    while (node.op == "call_method" and node.target in ("expand", "expand_as")) and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def gating_products(flow: DataFlow, nodes: Iterable[fx.Node]) -> list[fx.Node]:
    """Products ``t * g`` where the gate ``g`` is computed from ``t`` by global pooling (SE,
    eSE, ECA, CBAM's channel part, SK and split attention all have this shape), and calls of
    our own ``SEBlock``."""
    found = []
    for n in nodes:
        if isinstance(module_of(flow.root, n), SEBlock):
            found.append(n)
            continue
        if not is_mul(n):
            continue
        operands = [a for a in n.args[:2] if isinstance(a, fx.Node) and flow.live.get(a)]
        if len(operands) != 2:
            continue
        for t, g in (operands, operands[::-1]):
            if _is_gate_of(flow, t, _strip_expand(g)):
                found.append(n)
                break
    return found


def _is_gate_of(flow: DataFlow, t: fx.Node, g: fx.Node) -> bool:
    ts, gs = tensor_shape(t), tensor_shape(g)
    if ts is None or gs is None or len(gs) > len(ts) or len(ts) < 3:
        return False
    gs = (1,) * (len(ts) - len(gs)) + gs
    if any(gd not in (1, td) for gd, td in zip(gs, ts, strict=True)):
        return False
    axis = channel_axis(t, flow)
    if axis is not None:
        # The gate runs along the channels and is constant over at least one spatial axis.
        spatial_pooled = any(gs[d] == 1 and ts[d] > 1 for d in range(1, len(ts)) if d != axis)
        if gs[axis] != ts[axis] or ts[axis] <= 1 or not spatial_pooled:
            return False
    elif not (gs[-1] == 1 < ts[-1] and any(gd == td > 1 for gd, td in zip(gs[1:], ts[1:], strict=True))):
        # Layout unknown (SK's stacked paths): pooled over the last axis, kept along another.
        return False
    return t in flow.ancestors_within(g, set(flow.order[flow.index[t]: flow.index[g]]))
