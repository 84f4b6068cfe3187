"""Data flow of one traced graph: which nodes carry input-dependent data, dominators over them,
regions between a fork and a merge, and parametric path costs."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .ops import is_norm, is_pool, is_scaling

__all__ = ["DataFlow"]


def _is_tensor_value(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (list, tuple)):
        return any(_is_tensor_value(v) for v in value)
    if isinstance(value, dict):  # a dict of tensors passed as the model's input
        return any(_is_tensor_value(v) for v in value.values())
    return False


_SIZE_METHODS = {"size", "dim", "numel", "__len__", "ndimension", "nelement", "stride", "data_ptr"}


def _is_data_node(node: fx.Node) -> bool:
    if node.op == "output":
        return False
    if "val" in node.meta:
        return _is_tensor_value(node.meta["val"])
    # No value recorded (should be rare): judge by the op.
    if node.op == "call_method" and node.target in _SIZE_METHODS:
        return False
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] not in ("shape", "ndim", "dtype", "device", "is_cuda")
    return True


class DataFlow:
    """Data edges of one traced graph, with dominators over the input-dependent part.

    Edges that only carry sizes (``x.shape``, ``x.size(0)``) are not data: otherwise ViT's
    ``class_token.expand(n, -1, -1)`` would look input-dependent.
    """

    def __init__(self, graph: fx.Graph, root: nn.Module) -> None:
        self.graph = graph
        self.root = root
        self.order: list[fx.Node] = list(graph.nodes)
        self.index = {n: i for i, n in enumerate(self.order)}
        self.data = {n: _is_data_node(n) for n in self.order}
        self.live: dict[fx.Node, bool] = {}
        self.preds: dict[fx.Node, list[fx.Node]] = {}
        for n in self.order:
            ins = [p for p in n.all_input_nodes if self.data.get(p)]
            self.preds[n] = [p for p in ins if self.live.get(p)]
            self.live[n] = self.data[n] and (n.op == "placeholder" or bool(self.preds[n]))
        self.idom: dict[fx.Node, fx.Node | None] = {}
        for n in self.order:
            if not self.live[n]:
                continue
            new: fx.Node | None = None
            for i, p in enumerate(self.preds[n]):
                new = p if i == 0 else self._intersect(p, new)
            self.idom[n] = new
        self._parametric: dict[fx.Node, bool] = {}
        self._feeds: dict[fx.Node, bool] | None = None
        self._layer: dict[fx.Node, bool] = {}
        self._pool: dict[fx.Node, bool] = {}
        self._descendants: dict[fx.Node, frozenset[fx.Node]] = {}
        self._idom_within: dict[fx.Node, dict[fx.Node, fx.Node | None]] = {}

    def _pos(self, n: fx.Node | None) -> int:
        return -1 if n is None else self.index[n]

    def _intersect(self, a: fx.Node | None, b: fx.Node | None) -> fx.Node | None:
        while a is not b:
            while self._pos(a) > self._pos(b):
                a = self.idom[a]  # type: ignore[index]
            while self._pos(b) > self._pos(a):
                b = self.idom[b]  # type: ignore[index]
        return a

    def live_inputs(self, node: fx.Node) -> list[fx.Node]:
        return self.preds.get(node, [])

    def descendants(self, node: fx.Node) -> frozenset[fx.Node]:
        """``node`` and every node its data reaches (data edges only), computed once per node."""
        cached = self._descendants.get(node)
        if cached is None:
            found = {node}
            for n in self.order[self.index[node] + 1:]:
                if any(p in found for p in self.preds.get(n, ())):
                    found.add(n)
            cached = self._descendants[node] = frozenset(found)
        return cached

    def fork_within(self, source: fx.Node, anchor: fx.Node) -> fx.Node | None:
        """The immediate dominator of ``anchor`` when only ``source``'s data counts: data that
        joins from elsewhere (a second model input, a tensor computed before ``source``) is
        left out, as a bias would be. None when ``anchor`` does not descend from ``source``."""
        within = self.descendants(source)
        if anchor not in within or anchor is source:
            return None
        idom = self._idom_within.get(source)
        if idom is None:
            idom = {source: None}
            for n in sorted(within, key=self.index.__getitem__):
                if n is source:
                    continue
                new: fx.Node | None = None
                for i, p in enumerate(p for p in self.preds[n] if p in within):
                    new = p if i == 0 else self._intersect_in(idom, p, new)
                idom[n] = new
            self._idom_within[source] = idom
        return idom[anchor]

    def _intersect_in(
        self, idom: dict[fx.Node, fx.Node | None], a: fx.Node | None, b: fx.Node | None
    ) -> fx.Node | None:
        while a is not b:
            while self._pos(a) > self._pos(b):
                a = idom[a]  # type: ignore[index]
            while self._pos(b) > self._pos(a):
                b = idom[b]  # type: ignore[index]
        return a

    def region(self, fork: fx.Node, anchor: fx.Node, within: frozenset[fx.Node] | None = None) -> set[fx.Node]:
        """Nodes on data paths from ``fork`` to ``anchor``, both excluded; ``within``: only
        among these nodes (the descendants of the fork, when other data joins the paths)."""
        lo = self.index[fork]
        seen: set[fx.Node] = set()
        stack = list(self.preds[anchor])
        while stack:
            n = stack.pop()
            if n in seen or self.index[n] <= lo or (within is not None and n not in within):
                continue
            seen.add(n)
            stack.extend(self.preds[n])
        return seen

    def ancestors_within(self, node: fx.Node, region: set[fx.Node]) -> set[fx.Node]:
        seen: set[fx.Node] = set()
        stack = list(self.preds[node])
        while stack:
            n = stack.pop()
            if n in seen or n not in region:
                continue
            seen.add(n)
            stack.extend(self.preds[n])
        return seen

    def feeds_parametric(self, node: fx.Node) -> bool:
        """Whether some parametric layer reads ``node``'s value, directly or further on (one
        reverse pass over the graph, computed once)."""
        if self._feeds is None:
            feeds: dict[fx.Node, bool] = {}
            for n in reversed(self.order):
                feeds[n] = any(
                    n in self.preds.get(u, ()) and (self.is_parametric(u) or feeds.get(u, False)) for u in n.users
                )
            self._feeds = feeds
        return self._feeds.get(node, False)

    def is_layer(self, node: fx.Node) -> bool:
        """What path lengths count: parametric layers and per-sample normalisations (also
        without affine weights, as in PoolFormer's ``pool(norm(x)) - norm(x)``), not scalings
        by parameters (layer scale, ``res_scale``), which make no branch and lengthen no trunk."""
        cached = self._layer.get(node)
        if cached is None:
            cached = (self.is_parametric(node) and not is_scaling(self, node)) or is_norm(self.root, node)
            self._layer[node] = cached
        return cached

    def is_parametric(self, node: fx.Node) -> bool:
        """A layer with weights: a module with parameters, or an op fed a parameter or weight."""
        cached = self._parametric.get(node)
        if cached is not None:
            return cached
        result = False
        if node.op == "call_module":
            try:
                module = self.root.get_submodule(str(node.target))
                result = any(True for _ in module.parameters())
            except AttributeError:
                result = False
        elif node.op in ("call_function", "call_method"):
            result = any(
                self.data.get(p) and not self.live.get(p) for p in node.all_input_nodes
            )
        self._parametric[node] = result
        return result

    def path_costs(self, fork: fx.Node, region: set[fx.Node]) -> tuple[dict[fx.Node, int], dict[fx.Node, bool]]:
        """Longest count of layers (``is_layer``) from ``fork`` to each node, and whether a
        pooling op lies on the way."""
        cost: dict[fx.Node, int] = {fork: 0}
        pooled: dict[fx.Node, bool] = {fork: False}
        for n in sorted(region, key=self.index.__getitem__):
            ps = [p for p in self.preds[n] if p in cost]
            cost[n] = int(self.is_layer(n)) + max((cost[p] for p in ps), default=0)
            pooled[n] = self._is_pool(n) or any(pooled[p] for p in ps)
        return cost, pooled

    def _is_pool(self, node: fx.Node) -> bool:
        # reason: path_costs asks once per node of every region (50 000 times on CoaT-Tiny).
        cached = self._pool.get(node)
        if cached is None:
            cached = self._pool[node] = is_pool(self.root, node)
        return cached

    def shortest_costs(self, fork: fx.Node, region: set[fx.Node]) -> dict[fx.Node, int]:
        """Shortest count of layers (``is_layer``) from ``fork`` to each node."""
        cost: dict[fx.Node, int] = {fork: 0}
        for n in sorted(region, key=self.index.__getitem__):
            ps = [cost[p] for p in self.preds[n] if p in cost]
            cost[n] = int(self.is_layer(n)) + min(ps, default=0)
        return cost
