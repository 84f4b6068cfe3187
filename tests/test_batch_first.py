"""Batch axes proven from the graph (``analysis.batch_first``): never other than what the
second shape pass finds, silent on ops that move or mix dim 0, and enough for a ResNet that
the second pass is not run at all."""

from __future__ import annotations

import pytest
import torch
import torchvision
from nets import ChannelsLast, Dense, Inception, PermutedScale, Res2NetLike, Residual
from torch import nn

from se_inject.analysis.batch import batch_axis
from se_inject.analysis.sandbox import preserved_state
from se_inject.sites.driver import Analysis


def _root_unit(model: nn.Module, x: torch.Tensor):
    with preserved_state(model):
        _, units, _ = Analysis().units(model.eval(), x)
    return next(u for u in units if u.batch_inputs)


MODELS = {
    "residual": (lambda: Residual(8), (2, 8, 16, 16)),
    "inception": (lambda: Inception(8), (2, 8, 16, 16)),
    "dense": (lambda: Dense(8, 4, 3), (2, 8, 16, 16)),
    "res2net": (lambda: Res2NetLike(16), (2, 16, 16, 16)),
    "channels-last": (lambda: ChannelsLast(8), (2, 16, 16, 8)),
    "permuted scale": (lambda: PermutedScale(8), (2, 8, 16, 16)),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 64, 64)),
    "shufflenet": (lambda: torchvision.models.shufflenet_v2_x0_5(num_classes=10), (2, 3, 64, 64)),
    "mobilenet_v3": (lambda: torchvision.models.mobilenet_v3_small(num_classes=10), (2, 3, 64, 64)),
    "vit (time mixing)": (
        lambda: torchvision.models.VisionTransformer(32, 8, 2, 2, 16, 32, num_classes=10), (2, 3, 32, 32)
    ),
}


@pytest.mark.parametrize("name", MODELS)
def test_a_proof_never_disagrees_with_the_second_shape_pass(name: str) -> None:
    make, shape = MODELS[name]
    torch.manual_seed(0)
    unit = _root_unit(make(), torch.randn(*shape))
    grown = unit.grown_values()
    assert grown is not None
    proven = 0
    for node in unit.graph.nodes:
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor) and unit._first and unit._first[0].proven(node):
            proven += 1
            assert batch_axis(value, grown.get(node)) == 0, node.format_node()
        elif isinstance(value, torch.Tensor):
            unit.batch_axis(node)  # makes the proof object on first ask
    assert proven > 0


class Moves(nn.Module):
    """Ops that move or mix dim 0, each followed by a conv so a proof would have to pass them."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv1d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, 4, T] with B == T
        b, c, t = x.shape
        if self.kind == "view T B":
            y = x.permute(0, 2, 1).reshape(t, b, c).permute(1, 2, 0)  # [B, C, T] from time-first rows
        elif self.kind == "transpose 0":
            y = x.transpose(0, 2)
        elif self.kind == "permute 0":
            y = x.permute(2, 1, 0)
        elif self.kind == "gather batch":
            y = x[[1, 0, 2, 3]]
        elif self.kind == "flatten 0":
            y = x.flatten(0, 1).reshape(b, c, t)
        else:
            y = x.reshape(4, 4, 4)  # sizes written in the code: a fixed batch
        return self.conv(y)


@pytest.mark.parametrize("kind", ["view T B", "transpose 0", "permute 0", "gather batch", "flatten 0", "literal"])
def test_ops_that_move_the_batch_are_not_proven(kind: str) -> None:
    unit = _root_unit(Moves(kind), torch.randn(4, 4, 4))
    conv = next(n for n in unit.graph.nodes if n.op == "call_module")
    unit.batch_axis(conv)  # asks the proof first
    assert unit._first and not unit._first[0].proven(conv)


def test_a_resnet_needs_no_second_shape_pass() -> None:
    unit = _root_unit(torchvision.models.resnet18(num_classes=10), torch.randn(1, 3, 64, 64))
    adds = [n for n in unit.graph.nodes if n.op == "call_function" and "add" in str(n.target)]
    assert len(adds) == 8
    assert all(unit.batch_axis(n) == 0 for n in adds)
    assert unit._grown == []  # the pass that grows the batch never ran
