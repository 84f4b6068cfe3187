"""Checkpoints: weights_only-loadable plain data, rebuild by replaying the plan, atomic writes."""

from __future__ import annotations

import os

import pytest
import timm
import torch
from torch import nn

import se_inject
from se_inject import SEBlock, find_sites
from se_inject.errors import (
    CheckpointError,
    OutputPathError,
    PlanMismatchError,
    UnsafeCheckpointError,
    WeightsError,
)
from se_inject.io.checkpoint import FORMAT, FORMAT_VERSION, save, se_state_dict
from se_inject.io.restore import load, read_checkpoint
from se_inject.models.names import resolve_name
from se_inject.models.weights import create_model

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


class _Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))


class _Tiny(nn.Module):
    """Two residual blocks and a head deliberately called ``se`` that is not an SE block."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.layer1 = nn.Sequential(_Block(16), _Block(16))
        self.se = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.se(self.layer1(self.stem(x)).mean((2, 3)))


def _perturb(model: nn.Module) -> None:
    # An identity-start SE block passes any round trip trivially: move it away from identity.
    with torch.no_grad():
        for p in se_inject.se_parameters(model):
            p.add_(torch.randn_like(p) * 0.2)


def _inject(model: nn.Module, **kwargs):
    plan = find_sites(model, example_input=X[:1], **kwargs)
    model = se_inject.apply_plan(model, plan)
    _perturb(model)
    return model.eval(), plan


@pytest.fixture
def tiny(tmp_path):
    torch.manual_seed(0)
    base = _Tiny().eval()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    model, plan = _inject(base)
    return model, plan, base_state


def test_full_round_trip_of_a_registry_model(tmp_path) -> None:
    model, plan = _inject(create_model(resolve_name("torchvision:resnet18")))
    expected = model(X)
    path = save(model, tmp_path / "m.pt", plan=plan)
    # plain torch.load with weights_only reads it: only plain data and tensors
    data = torch.load(path, weights_only=True)
    assert data["format"] == FORMAT and data["format_version"] == FORMAT_VERSION
    assert data["model"] == {"source": "torchvision", "name": "resnet18"}
    assert data["se_only"] is False
    assert se_inject.Plan.from_dict(data["plan"]) == plan
    rebuilt = load(path).eval()
    assert type(rebuilt) is type(model)
    assert sum(isinstance(m, SEBlock) for m in rebuilt.modules()) == 8
    assert torch.equal(rebuilt(X), expected)


def test_timm_model_origin_comes_from_pretrained_cfg(tmp_path) -> None:
    model, plan = _inject(timm.create_model("resnet18"))  # not built through the zoo
    save(model, tmp_path / "m.pt", plan=plan)
    assert torch.load(tmp_path / "m.pt", weights_only=True)["model"] == {"source": "timm", "name": "resnet18"}
    assert torch.equal(load(tmp_path / "m.pt").eval()(X), model(X))


def test_fine_tuned_classifier_is_rebuilt_to_fit(tmp_path) -> None:
    model, plan = _inject(create_model(resolve_name("torchvision:resnet18"), num_classes=7))
    save(model, tmp_path / "m.pt", plan=plan, origin=resolve_name("torchvision:resnet18"))
    assert load(tmp_path / "m.pt").fc.out_features == 7


def test_se_only_holds_se_blocks_only_and_attaches_to_a_base(tiny, tmp_path) -> None:
    model, plan, base_state = tiny
    path = save(model, tmp_path / "se.pt", se_only=True, plan=plan)
    data = torch.load(path, weights_only=True)
    assert data["se_only"] is True
    # selected by type: the head named "se" is not an SE block
    assert set(data["state_dict"]) == set(se_state_dict(model))
    assert all(".se." in k or ".se_" in k for k in data["state_dict"])
    assert "se.weight" not in data["state_dict"]
    base = _Tiny()
    base.load_state_dict(base_state)
    rebuilt = load(path, base_model=base).eval()
    assert torch.equal(rebuilt(X), model(X))


def test_full_checkpoint_with_a_custom_base_model(tiny, tmp_path) -> None:
    model, plan, _ = tiny
    save(model, tmp_path / "m.pt", plan=plan)
    assert torch.load(tmp_path / "m.pt", weights_only=True)["model"] is None
    with pytest.raises(CheckpointError, match="records no registry model name .*pass base_model="):
        load(tmp_path / "m.pt")
    rebuilt = load(tmp_path / "m.pt", base_model=_Tiny()).eval()  # its own weights are replaced
    assert torch.equal(rebuilt(X), model(X))


def test_se_only_without_base_warns_random(tmp_path) -> None:
    model, plan = _inject(create_model(resolve_name("torchvision:resnet18")))
    save(model, tmp_path / "se.pt", se_only=True, plan=plan)
    with pytest.warns(UserWarning, match="holds SE weights only; the rebuilt torchvision:resnet18 base has RANDOM"):
        rebuilt = load(tmp_path / "se.pt")
    assert torch.equal(rebuilt.layer1[0].se.fc2.weight, model.layer1[0].se.fc2.weight)


def test_save_right_after_inject_uses_the_recorded_plan(tmp_path) -> None:
    from se_inject import inject_se, remove_se
    from se_inject.plan import PLAN_ATTR, Plan

    model = inject_se(_Tiny())
    assert isinstance(getattr(model, PLAN_ATTR), Plan)
    assert PLAN_ATTR not in "".join(model.state_dict())
    rebuilt = load(save(model, tmp_path / "m.pt"), base_model=_Tiny())
    assert set(rebuilt.state_dict()) == set(model.state_dict())
    remove_se(model)
    assert not hasattr(model, PLAN_ATTR)


def test_save_needs_a_plan(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="no recorded SE plan; pass plan="):
        save(_Tiny(), tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("kind", ["torch-save", "raw-pickle"])
def test_pickle_that_would_run_code_is_refused(tmp_path, kind: str) -> None:
    import pickle

    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    payload = {"format": FORMAT, "plan": _RunsCode(str(marker))}
    if kind == "torch-save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=4))
    with pytest.raises(UnsafeCheckpointError, match="refused checkpoint .*would import and run posix.mkdir"):
        load(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        (b"\x80\x02garbage", "not a readable torch file"),
        ({"conv1.weight": torch.zeros(1)}, "not an se-inject checkpoint .*looks like a plain state dict"),
        ({"format": FORMAT, "format_version": 99}, "format version 99; this se-inject reads up to 1"),
        ({"format": FORMAT, "format_version": 1, "plan": {}, "state_dict": {"a": 1}}, "no valid state_dict"),
    ],
    ids=["missing", "corrupt", "plain-state-dict", "newer-format", "bad-state-dict"],
)
def test_bad_checkpoints(tmp_path, content, message: str) -> None:
    path = tmp_path / "c.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(path)


def test_truncated_checkpoint(tiny, tmp_path) -> None:
    model, plan, _ = tiny
    path = save(model, tmp_path / "m.pt", plan=plan)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load(path, base_model=_Tiny())


def test_tensors_that_do_not_fit_name_keys(tiny, tmp_path) -> None:
    model, plan, _ = tiny
    path = save(model, tmp_path / "m.pt", plan=plan)
    data = torch.load(path, weights_only=True)
    del data["state_dict"]["stem.weight"]
    data["state_dict"]["extra.weight"] = torch.zeros(1)
    torch.save(data, path)
    with pytest.raises(WeightsError, match="1 missing: stem.weight; 1 unexpected: extra.weight"):
        load(path, base_model=_Tiny())


def test_plan_that_does_not_fit_the_base_model(tiny, tmp_path) -> None:
    model, plan, _ = tiny
    save(model, tmp_path / "m.pt", plan=plan)
    with pytest.raises(PlanMismatchError):
        load(tmp_path / "m.pt", base_model=nn.Sequential(nn.Conv2d(3, 16, 3)))


def test_failed_write_leaves_the_old_file_and_no_partial_file(tiny, tmp_path, monkeypatch) -> None:
    model, plan, _ = tiny
    path = tmp_path / "m.pt"
    path.write_bytes(b"previous")

    def failing_save(obj, handle, *args, **kwargs):
        handle.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OutputPathError, match="No space left on device"):
        save(model, path, plan=plan)
    assert path.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


@pytest.mark.parametrize(
    ("where", "message"),
    [("missing/m.pt", "folder .* does not exist"), ("", "it is a directory")],
    ids=["missing-folder", "directory"],
)
def test_unwritable_paths(tiny, tmp_path, where: str, message: str) -> None:
    model, plan, _ = tiny
    with pytest.raises(OutputPathError, match=message):
        save(model, tmp_path / where, plan=plan)
    assert list(tmp_path.iterdir()) == []


def test_written_file_has_ordinary_permissions(tiny, tmp_path) -> None:
    model, plan, _ = tiny
    old = os.umask(0o022)
    try:
        path = save(model, tmp_path / "m.pt", plan=plan)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


# --- loading is all or nothing; an adapter only goes on the base it was saved on ---------------


def _se_count(model: nn.Module) -> int:
    return sum(isinstance(m, SEBlock) for m in model.modules())


def test_a_failed_load_leaves_the_base_model_unchanged_and_a_retry_works(tmp_path) -> None:
    model, plan = _inject(create_model(resolve_name("torchvision:resnet18")))
    save(model, tmp_path / "m.pt", plan=plan)
    wrong = create_model(resolve_name("torchvision:resnet18"), num_classes=10)  # the plan fits, the tensors do not
    before = {k: v.clone() for k, v in wrong.state_dict().items()}
    with pytest.raises(WeightsError, match="wrong shape: fc.weight"):
        load(tmp_path / "m.pt", base_model=wrong)
    assert _se_count(wrong) == 0 and not hasattr(wrong, "se_inject_plan")
    assert wrong.state_dict().keys() == before.keys()
    assert all(torch.equal(wrong.state_dict()[k], v) for k, v in before.items())
    right = create_model(resolve_name("torchvision:resnet18"))
    assert _se_count(load(tmp_path / "m.pt", base_model=right)) == 8  # the retry on a fitting base works


def test_an_adapter_is_refused_on_another_base_model(tmp_path) -> None:
    model, plan = _inject(create_model(resolve_name("torchvision:resnet18")))
    save(model, tmp_path / "se.pt", se_only=True, plan=plan)
    resnet34 = create_model(resolve_name("torchvision:resnet34"))
    with pytest.raises(CheckpointError, match=r"holds SE weights for another base model: it was saved on "
                       r"torchvision:resnet18 \(11,689,512 parameters\); this torchvision:resnet34 has 21,797,672 "
                       r"parameters.*pass force=True"):
        load(tmp_path / "se.pt", base_model=resnet34)
    assert _se_count(resnet34) == 0
    forced = load(tmp_path / "se.pt", base_model=resnet34, force=True)  # an explicit choice: half the blocks
    assert _se_count(forced) == 8
    same = create_model(resolve_name("torchvision:resnet18"))  # other weights, same layers: accepted
    assert _se_count(load(tmp_path / "se.pt", base_model=same)) == 8
