"""Existing channel attention: products whose gate is pooled from the tensor it scales (SE, eSE,
ECA, CBAM's channel part, SK, split attention), our own ``SEBlock`` calls, and calls of a module
kept whole in the graph (its forward did not trace) whose structure is an SE block's."""

from __future__ import annotations

from collections.abc import Iterable

import torch.fx as fx
from torch import nn

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
        called = module_of(flow.root, n)
        if isinstance(called, SEBlock) or (called is not None and _shaped_like_se(called, n)):
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


#: Gate modules: what an SE block's excitation ends with (timm's gate layers subclass these or
#: are named so).
_GATES = (nn.Sigmoid, nn.Hardsigmoid, nn.Tanh)
_GATE_NAMES = ("sigmoid", "hardsigmoid", "hard_sigmoid", "gate")


def _projection(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) channels of a 1x1 convolution or a linear layer, else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and all(k == 1 for k in module.kernel_size):
        return module.in_channels, module.out_channels
    return None


def _shaped_like_se(module: nn.Module, node: fx.Node) -> bool:
    """A module the graph calls whole (one that does not trace: rule 13 keeps it a leaf) that has
    an SE block's parts: two projections ``C -> h -> C`` with ``h <= C``, a sigmoid-like gate,
    and an output the shape of its input. Whether it traces does not matter: its structure
    says it is channel attention, so the site after it is already attended."""
    if module.__class__.__module__.startswith("torch.nn"):
        return False  # torch's own layers are no attention blocks
    projections = [p for m in module.modules() if (p := _projection(m)) is not None]
    gates = [m for m in module.modules() if isinstance(m, _GATES) or type(m).__name__.lower() in _GATE_NAMES]
    if len(projections) != 2 or not gates:
        return False
    (c_in, hidden), (h_in, c_out) = projections
    if not (c_in == c_out and hidden == h_in and hidden <= c_in):
        return False
    inputs = [a for a in node.args if isinstance(a, fx.Node)]
    shape = tensor_shape(node)
    return bool(inputs) and shape is not None and tensor_shape(inputs[0]) == shape and c_in in shape[1:]


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
