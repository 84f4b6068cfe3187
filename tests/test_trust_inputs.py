"""The analysis input: refused with a clear reason when it does not fit the model, and the
model's own input conventions (a list of images, a dict, positional tuples) accepted and named
in the plan."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import se_inject
from se_inject import InputError


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_wrong_channel_count_is_an_input_error_naming_the_first_layer() -> None:
    model = torchvision.models.resnet18()
    before = _state(model)
    with pytest.raises(InputError, match=r"Tensor\[1, 4, 64, 64\] does not fit ResNet: its first layer conv1 \(Conv2d\) takes 4-D batches of 3 channels; the input has 4"):
        se_inject.inject_se(model, example_input=torch.randn(1, 4, 64, 64))
    with pytest.raises(InputError, match="of 3 channels"):
        se_inject.find_sites(model, example_input=torch.randn(1, 4, 64, 64))
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not any(isinstance(m, se_inject.SEBlock) for m in model.modules())


def test_missing_batch_dimension_is_an_input_error_that_says_so() -> None:
    with pytest.raises(InputError, match=r"no batch dimension: give a batch of shape \[N, 3, 64, 64\]"):
        se_inject.find_sites(torchvision.models.resnet18(), example_input=torch.randn(3, 64, 64))


def test_input_error_is_a_config_error() -> None:
    assert issubclass(InputError, se_inject.ConfigError)


def test_a_detector_takes_its_own_list_of_images() -> None:
    """torchvision detectors take a list of 3-D images: the list is the one argument, and gives
    the sites a 4-D batch gives."""
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None).eval()
    batch = se_inject.find_sites(model, example_input=torch.randn(1, 3, 64, 64))
    images = se_inject.find_sites(model, example_input=[torch.randn(3, 64, 64)])
    assert images.sites and [s.name for s in images.sites] == [s.name for s in batch.sites]
    assert images.input == "list[Tensor[3, 64, 64]]" and batch.input == "Tensor[1, 3, 64, 64]"


class _DictResNet(nn.Module):
    """Reads a dict batch, as training pipelines pass it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv1 = nn.Conv2d(16, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = torch.relu(self.stem(batch["image"]))
        return x + self.conv2(torch.relu(self.conv1(x)))


class _TimestepBlock(nn.Module):
    """``(sample, timestep)`` positional inputs, the timestep conditioning the branch."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.emb = nn.Linear(1, 16)
        self.conv1 = nn.Conv2d(16, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        h = torch.relu(self.conv1(x) + self.emb(t[:, None])[:, :, None, None])
        return x + self.conv2(h)


def test_a_dict_input_is_one_argument_and_injects_exactly() -> None:
    model = _DictResNet().eval()
    batch = {"image": torch.randn(2, 3, 16, 16)}
    reference = copy.deepcopy(model)
    plan = se_inject.find_sites(model, example_input=batch)
    assert [s.name for s in plan.sites] == ["se"] and plan.input == "{'image': Tensor[2, 3, 16, 16]}"
    injected = se_inject.inject_se(model, example_input=batch)
    with torch.no_grad():
        assert torch.equal(injected(batch), reference(batch))


def test_positional_inputs_are_named_in_the_plan_and_its_json() -> None:
    plan = se_inject.find_sites(_TimestepBlock(), example_input=(torch.randn(2, 3, 16, 16), torch.randn(2)))
    assert len(plan.sites) == 1
    assert plan.input == "(Tensor[2, 3, 16, 16], Tensor[2])"
    assert se_inject.Plan.from_dict(plan.to_dict()) == plan


# --- what inject_se says when the plan is thin ---------------------------------------------------


def test_no_sites_warning_suggests_plain_for_a_plain_cnn() -> None:
    with pytest.warns(UserWarning, match=r"no SE site found in VGG \(0 skipped\).*plain=True finds 8 sites"):
        se_inject.inject_se(torchvision.models.vgg11(), example_input=torch.randn(1, 3, 64, 64))


def test_no_sites_warning_suggests_tokens_for_a_token_model() -> None:
    import timm

    model = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2)
    with pytest.warns(UserWarning, match=r"tokens=True finds 4 sites") as caught:
        se_inject.inject_se(model, example_input=torch.randn(1, 3, 64, 64))
    assert not any("plain=True" in str(w.message) for w in caught)


class _UntracedBlock(nn.Module):
    """A residual block whose forward branches on a tensor's value: it cannot be traced."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x + self.conv(x)
        return x


class _PartlyAnalysed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.good = _DictResNet()
        self.bad = _UntracedBlock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bad(self.good({"image": x}))


def test_inject_says_once_how_many_modules_were_not_analysed() -> None:
    with pytest.warns(UserWarning) as caught:
        se_inject.inject_se(_PartlyAnalysed().eval(), example_input=torch.randn(2, 3, 16, 16))
    lines = [str(w.message) for w in caught if "unanalysed" in str(w.message)]
    assert len(lines) == 1
    assert lines[0].startswith("SE inserted at 1 sites of _PartlyAnalysed; 1 module unanalysed (top reason, 1 of them: ")
    assert "_UntracedBlock.forward branches on a traced value (if/while/bool) (test_trust_inputs.py:" in lines[0]


def test_no_sites_warning_counts_unanalysed_modules() -> None:
    with pytest.warns(UserWarning, match=r"\(0 skipped; 1 module unanalysed \(top reason, 1 of them: _UntracedBlock\.forward branches on a traced value"):
        se_inject.inject_se(_UntracedBlock(), example_input=torch.randn(2, 16, 8, 8))


def test_a_detector_given_one_3d_image_as_its_argument_is_told_about_lists() -> None:
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None).eval()
    with pytest.raises(InputError, match=r"no batch dimension.*or a list of images if the model takes one"):
        se_inject.find_sites(model, example_input=(torch.randn(3, 64, 64),))
