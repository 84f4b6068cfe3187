"""Trust, reports and files: channels-last sizes, outputs that are not regular files, symlinks,
Ctrl-C and a full disk during the write, and reduction-or-hidden."""

from __future__ import annotations

import os
import re
import resource
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from cli_helpers import SMALL, _isolated, fails, ok, run  # noqa: F401  (_isolated: autouse fixture)

import se_inject
from se_inject.errors import ConfigError
from se_inject.io import checkpoint

# --- 4. channels-last blocks report (H, W) ---------------------------------------------------


def _sizes(model: torch.nn.Module, side: int) -> set[tuple[int, ...]]:
    plan = se_inject.find_sites(model, example_input=torch.randn(1, 3, side, side))
    return {site.spatial for site in plan.sites}


def test_channels_last_blocks_report_height_and_width() -> None:
    """EdgeNeXt's blocks run channels-last and add into an NCHW trunk; their sizes are the
    feature maps' (as torchvision's ConvNeXt, right before, gives them), not (C, W)."""
    edgenext = timm.create_model("edgenext_xx_small")
    reference = _sizes(torchvision.models.convnext_tiny(), 128)
    assert _sizes(edgenext, 128) == reference == {(32, 32), (16, 16), (8, 8), (4, 4)}


def test_channels_last_resolution_selects_by_feature_map_size() -> None:
    model = timm.create_model("edgenext_xx_small")
    plan = se_inject.find_sites(model, example_input=torch.randn(1, 3, 128, 128), resolutions=[16])
    assert plan.sites and {s.spatial for s in plan.sites} == {(16, 16)}
    assert {s.channels for s in plan.sites} == {48}


# --- 5. reduction or hidden -------------------------------------------------------------------


def test_reduction_and_hidden_together_are_refused() -> None:
    model = torchvision.models.resnet18()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="reduction or hidden, not both"):
        se_inject.inject_se(model, reduction=16, hidden=8)
    with pytest.raises(ConfigError, match="reduction or hidden, not both"):
        se_inject.find_sites(model, reduction=4, hidden=8)
    assert model.state_dict().keys() == before.keys()
    assert not any(isinstance(m, se_inject.SEBlock) for m in model.modules())


def test_hidden_alone_and_reduction_alone_still_work() -> None:
    plan = se_inject.find_sites(torchvision.models.resnet18(), hidden=8, example_input=torch.randn(1, 3, 64, 64))
    assert plan.sites and {s.hidden for s in plan.sites} == {8}
    plan = se_inject.find_sites(torchvision.models.resnet18(), reduction=4, example_input=torch.randn(1, 3, 64, 64))
    assert plan.sites[0].hidden == plan.sites[0].channels // 4


# --- 5. output files that are not regular files ------------------------------------------------


def test_output_onto_a_fifo_is_refused_and_the_fifo_kept(tmp_path) -> None:
    os.mkfifo(tmp_path / "pipe")
    fails(run(*SMALL, "-o", "pipe"), r"cannot write 'pipe': it is a FIFO, not a regular file", tmp_path, keep=("pipe",))
    assert stat.S_ISFIFO(os.lstat(tmp_path / "pipe").st_mode)


def _device(folder: Path) -> Path:
    """A character device to write onto: a private copy of /dev/null where the test may make
    one (root), so a regression replaces that copy, never the system's; else /dev/null itself,
    which a user without root cannot replace anyway."""
    node = folder / "null"
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except (PermissionError, OSError):
        return Path("/dev/null")
    return node


def test_output_onto_a_device_is_refused_and_the_device_kept(tmp_path) -> None:
    device = _device(tmp_path)
    before = os.lstat(device)
    keep = ("null",) if device.parent == tmp_path else ()
    fails(run(*SMALL, "-o", str(device)), rf"cannot write '{re.escape(str(device))}': it is a character device", tmp_path, keep=keep)
    after = os.lstat(device)
    assert stat.S_ISCHR(after.st_mode) and (after.st_ino, after.st_rdev) == (before.st_ino, before.st_rdev)


def test_save_onto_a_device_raises_output_path_error(tmp_path) -> None:
    device = _device(tmp_path)
    model = se_inject.inject_se(torchvision.models.resnet18(), example_input=torch.randn(1, 3, 64, 64))
    with pytest.raises(se_inject.OutputPathError, match="character device"):
        se_inject.save(model, device)
    assert stat.S_ISCHR(os.lstat(device).st_mode)


def test_output_through_a_symlink_replaces_its_target_and_keeps_the_link(tmp_path) -> None:
    (tmp_path / "runs").mkdir()
    target = tmp_path / "runs" / "model.pt"
    target.write_bytes(b"old")
    (tmp_path / "latest.pt").symlink_to(Path("runs") / "model.pt")
    ok(run(*SMALL, "-o", "latest.pt"))
    assert (tmp_path / "latest.pt").is_symlink()
    assert os.readlink(tmp_path / "latest.pt") == os.path.join("runs", "model.pt")
    loaded = se_inject.load(target)
    assert any(isinstance(m, se_inject.SEBlock) for m in loaded.modules())
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["model.pt"]  # no temp file


# --- 5. faults during the write ----------------------------------------------------------------


def test_ctrl_c_inside_torch_writer_is_exit_130_one_line_old_file_intact(tmp_path, monkeypatch) -> None:
    """Torch's zip writer turns a Ctrl-C inside it into a RuntimeError; the CLI still says
    'interrupted', exits 130 and leaves the old file as it was."""
    (tmp_path / "model.pt").write_bytes(b"old checkpoint")
    real_save = torch.save

    def save_interrupted_midway(obj, handle, *args, **kwargs):
        handle.write(b"partial data")
        try:
            os.kill(os.getpid(), signal.SIGINT)
            real_save(obj, handle, *args, **kwargs)
        except KeyboardInterrupt as e:  # what torch's C++ writer does with it
            raise RuntimeError("[enforce fail at inline_container.cc] PytorchStreamWriter failed writing file") from e

    monkeypatch.setattr(checkpoint.torch, "save", save_interrupted_midway)
    fails(
        run(*SMALL, "-o", "model.pt"),
        r"^se-inject: error: interrupted: writing 'model.pt' stopped: the existing file is unchanged$",
        tmp_path,
        keep=("model.pt",),
        code=130,
    )
    assert (tmp_path / "model.pt").read_bytes() == b"old checkpoint"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_disk_full_midway_is_one_line_exit_1_old_file_intact(tmp_path) -> None:
    """A real write that fails midway: a 1 MB file-size limit (``ulimit -f``) on a subprocess
    writing a ResNet-18 checkpoint (~45 MB)."""
    (tmp_path / "model.pt").write_bytes(b"old checkpoint")
    limit = 1 << 20

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "SE_INJECT_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1", "COLUMNS": "120"}
    result = subprocess.run(
        [sys.executable, "-c", "from se_inject.cli import main; main()", *SMALL, "-o", "model.pt"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        preexec_fn=limit_file_size,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("se-inject: error:")]
    assert errors == ["se-inject: error: cannot write 'model.pt': File too large"], result.stderr
    assert (tmp_path / "model.pt").read_bytes() == b"old checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no temp file left
