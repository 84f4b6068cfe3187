"""Parameter and multiply-add counts (FlopCounterMode convention), SE costs apart."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from torch import nn

from se_inject import inject_se
from se_inject.report.complexity import compare, count, count_params


@pytest.fixture(scope="module")
def resnet50_counts():
    model = timm.create_model("resnet50")
    before = count(model, (3, 224, 224))
    model = inject_se(model, reduction=16)
    return before, count(model, (3, 224, 224))


def test_resnet50_pinned(resnet50_counts) -> None:
    before, after = resnet50_counts
    c = compare(before, after)
    # timm resnet50 (v1.5): 25,557,032 parameters, FlopCounterMode total / 2 at 224x224.
    assert c.params_before == 25_557_032
    assert c.macs_before == 4_089_184_256
    # docs/se-paper.md: (2/r) * sum N_s C_s^2 = 2,514,944, plus biases sum N_s (C_s/r + C_s) = 16,048;
    # 28,088,024 is timm's seresnet50.
    assert c.params_added == 2_530_992
    assert c.params_after == 28_088_024
    # The FCs are the only SE ops FlopCounterMode sees: per block C*h + h*C, i.e. the
    # bias-free parameter count again.
    assert c.se_fc_macs == 2_514_944
    assert c.macs_added == c.se_fc_macs
    # Pooling and scaling: one op per element of each SE input, C*H*W per block:
    # 3*256*56^2 + 4*512*28^2 + 6*1024*14^2 + 3*2048*7^2 = 5,519,360.
    assert c.se_pool_adds == c.se_scale_muls == 5_519_360
    assert len(c.se) == 16
    assert round(c.macs_before / 1e9, 3) == 4.089


def test_fake_count_equals_a_real_forward_pass() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    model = inject_se(torchvision.models.resnet18().eval())
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, 64, 64))
    assert count(model, (3, 64, 64)).macs == counter.get_total_flops() // 2


def test_count_keeps_the_modes() -> None:
    model = torchvision.models.resnet18()
    model.train()
    model.layer1.eval()
    count(model, (3, 32, 32))
    assert model.training and model.layer2.training and not model.layer1.training
    assert not model.layer1[0].bn1.training


class _DataDependent(nn.Module):
    """Control flow on values: fake tensors cannot decide it, a real pass can."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y if bool(y.sum() >= 0) else -y


class _Broken(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)  # wrong input width for any image


def test_data_dependent_model_falls_back_to_a_real_pass() -> None:
    c = count(_DataDependent(), (3, 8, 8))
    assert c.macs == 4 * 3 * 9 * 6 * 6  # out channels * in channels * kernel * output positions


def test_uncountable_model_warns_and_reports_none() -> None:
    with pytest.warns(UserWarning, match=r"multiply-adds not counted: a forward pass at input size \(3, 8, 8\)"):
        c = count(_Broken(), (3, 8, 8))
    assert c.macs is None
    assert c.params == count_params(_Broken())
    assert compare(c, c).macs_added is None


def test_shared_parameters_count_once() -> None:
    layer = nn.Linear(4, 4)
    assert count_params(nn.Sequential(layer, layer)) == 20


def test_compare_needs_one_input_size() -> None:
    model = nn.Conv2d(3, 3, 1)
    with pytest.raises(ValueError, match="different input sizes"):
        compare(count(model, (3, 8, 8)), count(model, (3, 9, 9)))


def test_to_dict_keys(resnet50_counts) -> None:
    data = compare(*resnet50_counts).to_dict()
    assert set(data["params"]) >= {"before", "after", "added"}
    assert set(data["macs"]) >= {"before", "after", "added"}
    assert data["se_ops"] == {"fc_macs": 2_514_944, "pool_adds": 5_519_360, "scale_muls": 5_519_360}
