"""Placement rules 5 and 11: channel attention in a candidate's block or in the block enclosing it."""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from ..analysis.dataflow import DataFlow
from ..analysis.node_names import node_scope
from ..analysis.ops import is_add, tensor_shape
from .records import Unit

__all__ = ["block_gates", "enclosing_gates"]


def block_gates(unit: Unit, owner_rel: str, anchor: fx.Node) -> list[fx.Node]:
    """Rule 5 and 11: attention anywhere in the block owning a concatenation, or in the block
    enclosing it after the concatenation (a split convolution inside an inverted residual
    whose SE follows it)."""
    if not owner_rel:
        return []
    return unit.owner_gates(owner_rel) or enclosing_gates(unit, owner_rel, anchor)


def enclosing_gates(unit: Unit, owner_rel: str, anchor: fx.Node) -> list[fx.Node]:
    """Rule 11: gates of the nearest enclosing block of ``owner_rel`` that read ``anchor``'s
    output (the SE that follows a split convolution; the channel attention on a CSP stage's
    concatenation, after its residual blocks). Containers (``nn.Sequential``, ...) hold many
    blocks and are looked through; the analysed root is no enclosing block."""
    enclosing = owner_rel.rpartition(".")[0]
    while enclosing and isinstance(unit.module.get_submodule(enclosing), (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        enclosing = enclosing.rpartition(".")[0]
    if not enclosing:
        return []
    gates = unit.owner_gates(enclosing)
    if not gates:
        return []
    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    block = unit.module.get_submodule(enclosing)

    def child(path: str) -> str:  # the enclosing block's child that holds ``path`` ("": itself)
        return path[len(enclosing) + 1:].split(".")[0] if path.startswith(enclosing + ".") else ""

    own = child(owner_rel)
    nodes = set(unit.owned_nodes(enclosing))
    found = []
    for g in gates:
        holder = child(str(g.target) if g.op == "call_module" else node_scope(g))
        # Attention of a sibling block (another block of the same stage, in a container or a
        # residual block of its own) is not the block's own.
        if holder == own or (holder and isinstance(block.get_submodule(holder), containers)):
            continue
        if holder and any(_is_residual_shaped(unit.flow, n) for n in unit.owned_nodes(f"{enclosing}.{holder}")):
            continue
        if anchor in unit.flow.ancestors_within(g, nodes):
            found.append(g)
    return found


def _is_residual_shaped(flow: DataFlow, node: fx.Node) -> bool:
    """An addition of two data tensors of one shape: what a residual block ends with."""
    if not is_add(node):
        return False
    operands = [a for a in node.args[:2] if isinstance(a, fx.Node) and flow.live.get(a)]
    return len(operands) == 2 and tensor_shape(operands[0]) == tensor_shape(operands[1]) is not None
