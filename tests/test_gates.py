"""se_inject.gate_statistics: what the inserted gates do, per block and per class."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from se_inject import gate_statistics, inject_se, se_modules
from tests.nets import Residual


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), Residual(16), Residual(16, 32, stride=2)).eval()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.randn(12, 3, 16, 16), torch.arange(12) % 3


def test_identity_start_gates_are_exactly_one():
    model = inject_se(_net(), reduction=4)
    x, y = _data()
    stats = gate_statistics(model, [(x[:6], y[:6]), (x[6:], y[6:])])
    assert [s.name for s in stats] == [name for name, _ in se_modules(model)]
    assert [s.stage for s in stats] == [0, 1]  # from the injection plan
    for s in stats:
        assert s.images == 12
        assert s.mean == s.min == s.max == 1.0
        assert s.std == s.image_std == s.class_std == 0.0
        assert s.near_one == 1.0 and s.saturated == 0.0
        assert sorted(s.class_means) == [0, 1, 2] and len(s.class_means[0]) == s.channels


def test_statistics_match_the_gates_the_block_applies():
    model = inject_se(_net(), reduction=4)
    name, block = se_modules(model)[0]
    with torch.no_grad():
        block.fc2.bias.copy_(torch.linspace(-6, 6, block.channels))
        block.fc2.weight.normal_(0, 0.5)
    x, y = _data()
    seen = {}
    handle = block.register_forward_hook(lambda m, args, out: seen.setdefault("g", out / args[0]))
    model.train()  # the helper switches to eval and restores the flags afterwards
    stats = {s.name: s for s in gate_statistics(model, [(x, y)])}[name]
    handle.remove()
    assert model.training and block.training
    # gates from the hook: output / input per channel, away from zero inputs
    inputs = {}
    h = block.register_forward_pre_hook(lambda m, args: inputs.setdefault("x", args[0]))
    model.eval()
    with torch.no_grad():
        model(x)
    h.remove()
    ratio = seen["g"]
    mask = inputs["x"].abs() > 1e-3
    g = torch.where(mask, ratio, torch.nan).nanmean((2, 3))  # [B, C] gates
    assert stats.mean == pytest.approx(g.mean().item(), abs=1e-4)
    assert stats.min == pytest.approx(g.min().item(), abs=1e-4)
    assert stats.max == pytest.approx(g.max().item(), abs=1e-4)
    assert stats.image_std > 0 and stats.class_std > 0
    assert stats.class_means[1] == pytest.approx(g[y == 1].mean(0).tolist(), abs=1e-4)
    assert 0 < stats.saturated < 1  # biases of +-6 put the outer channels within 0.02 of 0 and 2


def test_inputs_without_labels_and_no_batches():
    model = inject_se(_net(), reduction=4)
    x, _ = _data()
    stats = gate_statistics(model, [x])
    assert all(s.class_std is None and s.class_means == {} for s in stats)
    with pytest.raises(ValueError, match="no gates recorded"):
        gate_statistics(model, [])


def test_to_dict_is_plain_data():
    import json

    model = inject_se(_net(), reduction=4)
    x, y = _data()
    d = gate_statistics(model, [(x, y)])[0].to_dict()
    assert json.loads(json.dumps(d))["class_means"]["2"] == d["class_means"]["2"]
