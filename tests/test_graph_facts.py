"""Graph facts on ten-line graphs: dominators on data edges, owner-local node names.

These are the facts every placement rule builds on; a wrong fork or a name the rewriter cannot
find would show up here before it shows up as a misplaced SE block.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from se_inject.analysis.dataflow import DataFlow
from se_inject.analysis.node_names import locate, qualified_names
from se_inject.analysis.tracing import trace
from se_inject.errors import PlanMismatchError


class Fork(nn.Module):
    """``stem`` forks into a two-layer and a one-layer path that meet at a sum."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.a1 = nn.Conv2d(8, 8, 3, padding=1)
        self.a2 = nn.Conv2d(8, 8, 3, padding=1)
        self.b1 = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        return self.a2(torch.relu(self.a1(y))) + self.b1(y)


class Tokens(nn.Module):
    """A class token expanded to the batch size: its path carries only a size, not data."""

    def __init__(self) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.zeros(1, 1, 4))
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.token.expand(x.shape[0], -1, -1), self.proj(x)], dim=1)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.conv(x)) + x


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Block()
        self.head = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.head(self.block(x)))


def _by_name(graph) -> dict[str, object]:
    return {name: node for node, name in qualified_names(graph).items()}


def test_the_fork_of_a_sum_is_its_immediate_dominator() -> None:
    model = Fork()
    graph = trace(model).graph
    flow, nodes = DataFlow(graph, model), _by_name(graph)
    assert flow.idom[nodes["add"]] is nodes["stem"]
    assert flow.idom[nodes["a2"]] is nodes["relu"]
    assert flow.idom[nodes["stem"]] is nodes["<input0>"]
    assert flow.region(nodes["stem"], nodes["add"]) == {nodes[n] for n in ("a1", "relu", "a2", "b1")}


def test_size_only_edges_are_not_data() -> None:
    model = Tokens()
    graph = trace(model).graph
    flow = DataFlow(graph, model)
    expand = next(n for n in graph.nodes if n.op == "call_method" and n.target == "expand")
    cat = next(n for n in graph.nodes if n.target is torch.cat)
    assert not flow.live[expand]  # reads x only through x.shape[0]
    assert flow.live_inputs(cat) == [next(n for n in graph.nodes if n.target == "proj")]


def test_names_are_owner_local_and_numbered_per_scope() -> None:
    model = Net()
    whole = qualified_names(trace(model, inline=None).graph)
    names = set(whole.values())
    assert {"block.conv", "block.add", "block.add_1", "block.relu", "head", "relu"} <= names
    # The block traced on its own, prefixed with its path, names its nodes the same way.
    alone = set(qualified_names(trace(model.block).graph, "block").values())
    assert {"block.conv", "block.add", "block.add_1", "block.relu"} <= alone


def test_locate_finds_a_site_by_name_and_refuses_a_missing_one() -> None:
    model = Net()
    graph = trace(model.block).graph
    source, targets = locate(graph, "block", "block.relu", ("block.add",))
    assert source.target is torch.relu and [t.name for t in targets] == ["add"]
    with pytest.raises(PlanMismatchError, match="'block.relu_7' not found in block"):
        locate(graph, "block", "block.relu_7", ())
    with pytest.raises(PlanMismatchError, match="'block.conv' does not consume 'block.relu'"):
        locate(graph, "block", "block.relu", ("block.conv",))


class _Unpacks(nn.Module):
    """Unpacks proxies in a loop, as EfficientViT's per-head attention does."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for _ in range(3):
            a, b = self.proj(out).unbind(1)
            q, (k, v) = a, b.unbind(0)
            out = torch.stack([q + k, v + b], 1)
        return out


class _Iterates(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(t for t in x.unbind(0))  # iterates a proxy of unknown length: fx refuses


def test_unpacking_proxies_traces_as_fx_does():
    module = _Unpacks()
    ours, theirs = trace(module).graph, torch.fx.Tracer().trace(module)
    assert ours.python_code("self").src == theirs.python_code("self").src
    with pytest.raises(torch.fx.proxy.TraceError):
        trace(_Iterates())
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.Tracer().trace(_Iterates())
