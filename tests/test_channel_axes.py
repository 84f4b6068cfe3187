"""Graph facts on ten-line graphs: the channel axis through slices, chunks, indexing and
permutes (placement rule 4), which ops are channel slices, and which are linear (rule 10)."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from se_inject.analysis.axes import channel_axis, channel_slice_of
from se_inject.analysis.dataflow import DataFlow
from se_inject.analysis.ops import is_linear
from se_inject.analysis.shapes import propagate_shapes
from se_inject.analysis.tracing import trace


class Slicing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor):
        y = self.conv(x)
        a = y[:, :4]  # channel slice: axis 1
        b = y.narrow(1, 4, 4)  # channel narrow: axis 1
        c, d = torch.split(y, [3, 5], dim=1)  # split items: axis 1
        e = y[..., None][:, :, 2]  # a new trailing axis, then a spatial row removed: axis 1
        f = y[:, :, :2]  # a spatial slice: axis 1, but no channel slice
        g = y[0]  # the batch indexed away: channels move to axis 0
        h = self.fc(y.permute(0, 2, 3, 1))[:, 1:]  # channels last, sliced spatially: axis 3
        k = y.chunk(2, 1)[1]
        return a, b, c, d, e, f, g, h, k


def _graph() -> tuple[DataFlow, dict[str, fx.Node]]:
    module = Slicing()
    graph = trace(module).graph
    propagate_shapes(fx.GraphModule(module, graph), [torch.randn(2, 3, 5, 5)])
    flow = DataFlow(graph, module)
    out = next(n for n in graph.nodes if n.op == "output")
    names = "abcdefghk"
    return flow, dict(zip(names, out.args[0], strict=True))


def test_slices_keep_the_channel_axis() -> None:
    flow, n = _graph()
    axes = {k: channel_axis(v, flow) for k, v in n.items()}
    assert axes == {"a": 1, "b": 1, "c": 1, "d": 1, "e": 1, "f": 1, "g": 0, "h": 3, "k": 1}


def test_channel_slices_are_told_from_other_slices() -> None:
    flow, n = _graph()
    conv = next(v for v in flow.order if v.op == "call_module" and v.target == "conv")
    sliced = {k: channel_slice_of(flow, v) is conv for k, v in n.items()}
    assert sliced == {"a": True, "b": True, "c": True, "d": True, "e": False, "f": False, "g": False, "h": False, "k": True}


def test_linear_ops() -> None:
    class Ops(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.gn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.GroupNorm(1, 4)
            self.scale = nn.Parameter(torch.ones(4, 1, 1))

        def forward(self, x: torch.Tensor):
            y = self.bn(self.conv(x)) * self.scale  # linear: conv, BN, scaling by a parameter
            z = torch.nn.functional.avg_pool2d(y, 3, 1, 1) - y  # linear: pooling, difference
            return torch.relu(z), self.gn(z), z * y, torch.nn.functional.max_pool2d(z, 3, 1, 1)

    module = Ops()
    graph = trace(module).graph
    propagate_shapes(fx.GraphModule(module, graph), [torch.randn(2, 4, 6, 6)])
    flow = DataFlow(graph, module)
    ops = [v for v in flow.order if v.op not in ("placeholder", "output", "get_attr")]
    verdict = {v.name: is_linear(flow, v) for v in ops}
    assert verdict == {
        "conv": True, "bn": True, "mul": True, "avg_pool2d": True, "sub": True,
        "relu": False, "gn": False, "mul_1": False, "max_pool2d": False,
    }
