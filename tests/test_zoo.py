"""Model names -> modules, default input sizes, weights resolution (all offline, no downloads)."""

from __future__ import annotations

import time

import pytest
import safetensors.torch
import torch
import torchvision

from se_inject.errors import UnknownModelError, UnsafeCheckpointError, WeightsError
from se_inject.models import loading, names, weight_files, weights
from se_inject.models.names import ModelSpec, Source
from se_inject.models.weights import Network, WeightsKind


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path) -> Network:
    """A network where no weights host answers and the hub cache is empty; torch hub's is a fresh folder."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return Network(reachable=lambda host: False, hf_cached=lambda repo_id, filename: None)


@pytest.mark.parametrize(
    ("name", "source", "resolved"),
    [
        ("resnet50", Source.TIMM, "resnet50"),  # in both: timm first
        ("torchvision:resnet50", Source.TORCHVISION, "resnet50"),
        ("timm:resnet50", Source.TIMM, "resnet50"),
        ("resnet50.a1_in1k", Source.TIMM, "resnet50.a1_in1k"),  # timm tags pass through
        ("squeezenet1_1", Source.TORCHVISION, "squeezenet1_1"),  # torchvision only
        ("TorchVision:resnet18", Source.TORCHVISION, "resnet18"),
    ],
    ids=["both-timm-first", "tv-prefix", "timm-prefix", "timm-tag", "tv-only", "prefix-case"],
)
def test_resolve_name(name: str, source: Source, resolved: str) -> None:
    assert names.resolve_name(name) == ModelSpec(source, resolved)


def test_unknown_name_suggests_from_both_registries() -> None:
    with pytest.raises(UnknownModelError, match=r"Unknown model 'resnet5' \(not in timm or torchvision\)") as info:
        names.resolve_name("resnet5")
    assert "resnet50 (timm, torchvision)" in str(info.value)
    # a torchvision-only name is suggested with its source
    assert "squeezenet1_1 (torchvision)" in names.suggest("squeezenet1_")


def test_unknown_in_the_named_registry() -> None:
    with pytest.raises(UnknownModelError, match=r"not in torchvision\).*Did you mean"):
        names.resolve_name("torchvision:resnet5")
    with pytest.raises(UnknownModelError, match="Unknown model source 'keras'"):
        names.resolve_name("keras:resnet50")


@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("timm:resnet50", (3, 224, 224)),
        ("timm:inception_v3", (3, 299, 299)),  # timm pretrained_cfg['input_size']
        ("torchvision:inception_v3", (3, 299, 299)),
        ("torchvision:r3d_18", (3, 16, 112, 112)),
        ("torchvision:resnet18", (3, 224, 224)),
        ("torchvision:efficientnet_b7", (3, 600, 600)),  # the crop of its default weights
        ("torchvision:swin_v2_t", (3, 256, 256)),
    ],
)
def test_default_input_size(name: str, size: tuple[int, ...]) -> None:
    assert loading.default_input_size(names.resolve_name(name)) == size


def test_random_init_never_downloads_a_detection_backbone(offline) -> None:
    # torchvision's detection builders default to pretrained backbone weights
    model = weights.create_model(names.resolve_name("torchvision:fasterrcnn_mobilenet_v3_large_320_fpn"))
    assert names.model_origin(model) == ModelSpec(Source.TORCHVISION, "fasterrcnn_mobilenet_v3_large_320_fpn")


def test_auto_falls_back_to_random_with_a_warning(offline) -> None:
    with pytest.warns(UserWarning, match="RANDOM init"):
        loaded = loading.load_model("torchvision:resnet18", "auto", network=offline)
    assert loaded.weights.kind is WeightsKind.RANDOM
    assert "pretrained unavailable" in loaded.weights.detail


def test_pretrained_fails_clearly_offline(offline) -> None:
    with pytest.raises(WeightsError, match="not in the local cache and download.pytorch.org cannot be reached"):
        loading.load_model("torchvision:resnet18", "pretrained", network=offline)
    with pytest.raises(WeightsError, match="huggingface.co cannot be reached"):
        loading.load_model("timm:resnet18", "pretrained", network=offline)


def test_offline_is_decided_within_seconds() -> None:
    start = time.monotonic()
    assert not weights.host_reachable("weights.se-inject.invalid")  # .invalid never resolves
    assert time.monotonic() - start < weights.PROBE_TIMEOUT_S + 2


def test_a_hanging_name_lookup_is_cut_short(monkeypatch) -> None:
    import socket

    def hang(*args, **kwargs):
        time.sleep(2)
        raise OSError("name lookup timed out")

    monkeypatch.setattr(socket, "create_connection", hang)
    start = time.monotonic()
    assert not weights.host_reachable("huggingface.co", timeout=0.2)
    assert time.monotonic() - start < 1.5


def test_probe_goes_through_the_https_proxy(monkeypatch) -> None:
    for name in ("https_proxy", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert weights._probe_address("huggingface.co") == ("proxy.example", 3128)
    monkeypatch.setenv("NO_PROXY", "huggingface.co")
    assert weights._probe_address("huggingface.co") == ("huggingface.co", 443)


def test_pretrained_from_the_torch_hub_cache(offline, tmp_path) -> None:
    reference = torchvision.models.resnet18()
    url = torchvision.models.get_model_weights("resnet18").DEFAULT.url
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference.state_dict(), cache / url.rsplit("/", 1)[-1])
    loaded = loading.load_model("torchvision:resnet18", "auto", network=offline)
    assert loaded.weights.kind is WeightsKind.PRETRAINED
    assert "local cache" in loaded.weights.detail
    assert torch.equal(loaded.model.conv1.weight, reference.conv1.weight)


def test_pretrained_from_the_hf_cache(tmp_path) -> None:
    import timm

    reference = timm.create_model("resnet18")
    file = tmp_path / "model.safetensors"
    safetensors.torch.save_file(reference.state_dict(), str(file))
    cached = Network(reachable=lambda host: False, hf_cached=lambda repo_id, filename: str(file))
    loaded = loading.load_model("resnet18", "pretrained", network=cached)
    assert loaded.weights.detail.startswith("pretrained timm/resnet18")
    assert torch.equal(loaded.model.fc.weight, reference.fc.weight)


def test_weights_file_unwraps_training_checkpoints(tmp_path) -> None:
    reference = torchvision.models.resnet18()
    wrapped = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, wrapped)
    loaded = loading.load_model("torchvision:resnet18", str(wrapped))
    assert loaded.weights.kind is WeightsKind.FILE
    assert torch.equal(loaded.model.conv1.weight, reference.conv1.weight)


def test_weights_file_of_a_fine_tuned_model(tmp_path) -> None:
    # Only the classifier differs (10 classes): the model is built to fit instead of failing.
    reference = torchvision.models.resnet18(num_classes=10)
    file = tmp_path / "ft.safetensors"
    safetensors.torch.save_file(reference.state_dict(), str(file))
    loaded = loading.load_model("torchvision:resnet18", str(file))
    assert loaded.model.fc.out_features == 10


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        (b"definitely not a checkpoint", "is not a torch or safetensors file"),
        (
            {"conv1.weight": torch.zeros(2), "head.weight": torch.zeros(1)},
            r"does not fit the architecture: 121 missing: bn1.weight, .*; 1 unexpected: head.weight; "
            r"1 wrong shape: conv1.weight \(2,\) vs \(64, 3, 7, 7\)",
        ),
        ({"format": "se-inject"}, "is an se-inject checkpoint"),
        ({"epoch": 1}, "does not hold a state dict"),
    ],
    ids=["missing", "corrupt", "wrong-architecture", "se-inject-checkpoint", "no-state-dict"],
)
def test_bad_weights_files(tmp_path, content, message: str) -> None:
    file = tmp_path / "w.pt"
    if isinstance(content, bytes):
        file.write_bytes(content)
    elif content is not None:
        torch.save(content, file)
    with pytest.raises(WeightsError, match=message):
        loading.load_model("torchvision:resnet18", str(file))


def test_corrupt_safetensors(tmp_path) -> None:
    file = tmp_path / "w.safetensors"
    file.write_bytes(b"\x00" * 20)
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        weight_files.load_state_dict_file(file)


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.mkdir, (self.marker,))


def test_weights_file_that_would_run_code_is_refused(tmp_path) -> None:
    marker = tmp_path / "ran"
    file = tmp_path / "evil.pt"
    torch.save({"conv1.weight": _RunsCode(str(marker))}, file)
    with pytest.raises(UnsafeCheckpointError, match="would import and run posix.mkdir"):
        weight_files.load_state_dict_file(file)
    assert not marker.exists()


def test_compiled_and_data_parallel_prefixes_are_stripped(tmp_path) -> None:
    # torch.compile saves "_orig_mod.", DataParallel "module.", in either order (timm's clean_state_dict)
    reference = torchvision.models.resnet18()
    file = tmp_path / "compiled.pt"
    torch.save({f"_orig_mod.module.{k}": v for k, v in reference.state_dict().items()}, file)
    loaded = loading.load_model("torchvision:resnet18", str(file))
    assert torch.equal(loaded.model.fc.weight, reference.fc.weight)


def test_a_text_file_is_named_as_not_a_torch_file(tmp_path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("hello\n")
    with pytest.raises(WeightsError, match=r"'.*notes.txt' is not a torch or safetensors file"):
        loading.load_model("torchvision:resnet18", str(notes))


def test_a_safetensors_file_under_another_name_still_loads(tmp_path) -> None:
    reference = torchvision.models.resnet18()
    file = tmp_path / "weights.bin"
    safetensors.torch.save_file(reference.state_dict(), str(file))
    assert torch.equal(loading.load_model("torchvision:resnet18", str(file)).model.fc.weight, reference.fc.weight)


def test_offline_by_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("SE_INJECT_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    assert weights.default_network() is weights.OFFLINE
    with pytest.raises(WeightsError, match="cannot be reached"):
        loading.load_model("torchvision:resnet18", "pretrained")
