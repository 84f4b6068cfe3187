"""Graph classes the sequence part of the other-libraries sweep (``benchmarks/zoo.py --other``)
ran into, each as a small net of its own: speech encoders returning ``ModelOutput`` dicts, the
straight-through estimator of audio codecs' quantisers, convolutions padded from 0-dim buffers."""

from __future__ import annotations

import copy
import pickle
from collections import OrderedDict

import pytest
import torch
from torch import nn

from se_inject import SEBlock, find_sites, inject_se, remove_se


class Output(OrderedDict):
    """A dict subclass returned by a forward, as transformers' ``ModelOutput`` is."""


class ConvEncoder(nn.Module):
    """``x + act(conv(x)).to(x.dtype)`` on ``[B, C, T]``, returning its result in a dict
    subclass: the branch ends in a function call, so the encoder itself is rebuilt (wav2vec2's
    encoder adds its positional convolution this way and returns a ``BaseModelOutput``)."""

    def __init__(self, c: int = 16, returns: type = Output) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv1d(c, c, 3, padding=1), nn.Conv1d(c, c, 3, padding=1)
        self.returns = returns

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        branch = self.conv2(torch.relu(self.conv1(x)))
        return self.returns(last_hidden_state=x + torch.nn.functional.gelu(branch).to(x.dtype))


@pytest.mark.parametrize("returns", [Output, OrderedDict], ids=["subclass", "ordered-dict"])
def test_a_rebuilt_block_returns_the_dict_type_its_forward_returned(returns: type) -> None:
    torch.manual_seed(0)
    model, x = ConvEncoder(returns=returns).eval(), torch.randn(2, 16, 20)
    before = model(x)
    plan = find_sites(model, example_input=x)
    assert [(s.kind, s.owner, s.channels) for s in plan.sites] == [("residual", "", 16)]
    injected = inject_se(model, example_input=x)  # the post-build check compares output types too
    assert sum(isinstance(m, SEBlock) for m in injected.modules()) == 1
    for copied in (injected, copy.deepcopy(injected), pickle.loads(pickle.dumps(injected))):
        out = copied(x)
        assert type(out) is returns and list(out) == ["last_hidden_state"]
        assert torch.equal(out["last_hidden_state"], before["last_hidden_state"])
    assert type(remove_se(injected)(x)) is returns


class StraightThrough(nn.Module):
    """A vector quantiser as audio codecs have one (DAC, VQ-VAEs): a residual unit, then the
    nearest codebook entry ``q`` of ``z`` passed on as ``z + (q - z).detach()`` (the value is
    ``q``; the gradient goes to ``z``)."""

    def __init__(self, c: int = 16, d: int = 8, entries: int = 32) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv1d(c, c, 3, padding=1), nn.Conv1d(c, c, 3, padding=1)
        self.project_in, self.project_out = nn.Conv1d(c, d, 1), nn.Conv1d(d, c, 1)
        self.codebook = nn.Embedding(entries, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.conv2(torch.relu(self.conv1(x)))
        z = self.project_in(x)
        b, d, t = z.shape
        flat = z.permute(0, 2, 1).reshape(b * t, d)
        q = self.codebook((flat @ self.codebook.weight.t()).argmax(1)).reshape(b, t, d).permute(0, 2, 1)
        return self.project_out(z + (q - z).detach())


def test_a_straight_through_estimator_is_no_residual() -> None:
    # An SE scaling (q - z) would hand the decoder z + s * (q - z): no codebook entry any more.
    torch.manual_seed(0)
    model, x = StraightThrough().eval(), torch.randn(2, 16, 12)
    plan = find_sites(model, example_input=x)
    assert [s.node for s in plan.sites] == ["add"]
    skipped = [s for s in plan.skipped if s.node == "add_1"]
    assert [s.reason for s in skipped] == ["fusion"] and "straight-through" in skipped[0].detail
    before = model(x)
    assert torch.equal(inject_se(model, example_input=x)(x), before)


class BufferPaddedConv(nn.Module):
    """A causal ``Conv1d`` whose padding is a 0-dim buffer, compared with the input's length
    (Encodec's and Mimi's convolutions): it does not trace, and a meta forward needs the
    buffer's value."""

    def __init__(self, cin: int, cout: int, k: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv1d(cin, cout, k)
        self.register_buffer("padding_total", torch.tensor(k - 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] <= self.padding_total:
            raise ValueError("input shorter than the kernel")
        return self.conv(torch.nn.functional.pad(x, (int(self.padding_total), 0)))


class BufferPaddedUnit(nn.Module):
    """``x + conv(elu(conv(elu(x))))`` of such convolutions (Encodec's residual unit)."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.ELU(), BufferPaddedConv(c, c // 2), nn.ELU(), BufferPaddedConv(c // 2, c, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


def test_opaque_convolutions_reading_0_dim_buffers_tell_their_channel_axis() -> None:
    torch.manual_seed(0)
    model, x = nn.Sequential(BufferPaddedConv(1, 16, 7), BufferPaddedUnit()).eval(), torch.randn(2, 1, 20)
    plan = find_sites(model, example_input=x)
    assert [(s.kind, s.channels, s.channel_axis) for s in plan.sites] == [("residual", 16, 1)]
    assert {"0", "1.block.1", "1.block.3"} <= {u.path for u in plan.unanalysed}  # they did not trace
    before = model(x)
    assert torch.equal(inject_se(model, example_input=x)(x), before)


class LayerDropEncoder(nn.Module):
    """``x + gelu(conv(x))`` (a branch ending in a function: the encoder itself is rebuilt),
    then layers that training skips at random, drawn with ``torch.rand([])`` (LayerDrop, as in
    wav2vec2's encoders): a draw no traced value depends on."""

    def __init__(self, c: int = 16, layers: int = 4) -> None:
        super().__init__()
        self.position = nn.Sequential(nn.Conv1d(c, c, 3, padding=1), nn.ReLU(), nn.Conv1d(c, c, 3, padding=1))
        self.layers = nn.ModuleList(nn.Sequential(nn.Conv1d(c, c, 1), nn.Dropout(0.2)) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + torch.nn.functional.gelu(self.position(x))
        for layer in self.layers:
            if self.training and torch.rand([]) < 0.5:
                continue
            x = layer(x)
        return x


def test_a_forward_drawing_random_numbers_outside_the_graph_is_not_rebuilt() -> None:
    # A train graph traced with one draw baked in would skip the same layers at every step.
    torch.manual_seed(0)
    model, x = LayerDropEncoder().eval(), torch.randn(2, 16, 10)
    plan = find_sites(model, example_input=x)
    skipped = [s for s in plan.skipped if s.node == "add"]
    assert [s.reason for s in skipped] == ["not-rewritable"] and "random numbers" in skipped[0].detail
    reference = copy.deepcopy(model)
    model = inject_se(model, example_input=x)
    for seed in range(4):
        outputs = []
        for m in (reference, model):
            torch.manual_seed(seed)
            outputs.append(m.train()(x))
        assert torch.equal(*outputs)
