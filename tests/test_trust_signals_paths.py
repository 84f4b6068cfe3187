"""SIGTERM during a write, output names the file system refuses, and weights that are no
regular file (issue 31, items 5 to 7)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from cli_helpers import SMALL, _isolated, fails, run  # noqa: F401  (_isolated: autouse fixture)

ROOT = Path(__file__).parent.parent

# --- 5. SIGTERM while writing: as Ctrl-C, exit 143 ---------------------------------------------

#: Runs the command with ``torch.save`` writing part of the file, then sending the process
#: SIGTERM (what ``timeout`` and schedulers send) and writing on: the signal lands mid-write.
_TERMINATED_MIDWAY = textwrap.dedent("""
    import os, signal, sys
    import torch
    from se_inject.cli import main
    from se_inject.io import checkpoint

    real_save = torch.save

    def save_terminated_midway(obj, handle, *args, **kwargs):
        handle.write(b"partial data")
        os.kill(os.getpid(), signal.SIGTERM)
        real_save(obj, handle, *args, **kwargs)

    checkpoint.torch.save = save_terminated_midway
    sys.argv = ["se-inject", *sys.argv[1:]]
    main()
""")


def test_sigterm_during_the_write_is_exit_143_one_line_old_file_intact(tmp_path) -> None:
    (tmp_path / "model.pt").write_bytes(b"old checkpoint")
    env = {**os.environ, "SE_INJECT_OFFLINE": "1", "COLUMNS": "120", "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", _TERMINATED_MIDWAY, *SMALL, "-o", "model.pt"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 143, done.stderr
    assert done.stderr == ("se-inject: error: terminated (SIGTERM): writing 'model.pt' stopped: the existing file "
                           "is unchanged\n"), done.stderr
    assert (tmp_path / "model.pt").read_bytes() == b"old checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no temporary file


def test_sigterm_in_process_restores_the_handlers(tmp_path, monkeypatch) -> None:
    from se_inject import workflow

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)

    def unhandled(signum, frame):  # a CLI that left SIGTERM alone would end pytest itself
        raise AssertionError("the command did not handle SIGTERM")

    before = signal.signal(signal.SIGTERM, unhandled)
    monkeypatch.setattr(workflow, "load_model", terminated)
    try:
        fails(run(*SMALL, "-o", "model.pt"), r"^se-inject: error: terminated \(SIGTERM\)$", tmp_path, code=143)
        assert signal.getsignal(signal.SIGTERM) is unhandled
    finally:
        signal.signal(signal.SIGTERM, before)


# --- 7. --weights that is no regular file: say what it is --------------------------------------


def test_weights_that_are_a_fifo_a_device_or_a_dangling_link_say_what_they_are(tmp_path) -> None:
    os.mkfifo(tmp_path / "pipe.pt")
    os.mkfifo(tmp_path / "pipe.safetensors")
    os.symlink(tmp_path / "gone.pt", tmp_path / "link.pt")
    keep = ("link.pt", "pipe.pt", "pipe.safetensors")
    fails(run(*SMALL, "--weights", "pipe.pt", "--dry-run"),
          r"^se-inject: error: weights file 'pipe\.pt' is a FIFO \(named pipe\), not a regular file$", tmp_path, keep)
    fails(run(*SMALL, "--weights", "/dev/zero", "--dry-run"),
          r"^se-inject: error: weights file '/dev/zero' is a character device, not a regular file$", tmp_path, keep)
    fails(run(*SMALL, "--weights", "link.pt", "--dry-run"),
          r"^se-inject: error: weights file 'link\.pt' is a symbolic link to nothing", tmp_path, keep)
    fails(run(*SMALL, "--weights", "pipe.safetensors", "--dry-run"),
          r"^se-inject: error: weights file 'pipe\.safetensors' is a FIFO \(named pipe\), not a regular file$", tmp_path, keep)


# --- 6. names the file system refuses, and symlink loops ---------------------------------------

LONG = "a" * 300 + ".pt"


def test_an_output_name_over_255_bytes_is_one_line_exit_1(tmp_path) -> None:
    fails(run(*SMALL, "-o", LONG), r"^se-inject: error: cannot write 'a{40}\.\.\.a{27}\.pt': its name is 303 bytes, "
          r"longer than the 255 a file name may have$", tmp_path)
    fails(run(*SMALL, "--dry-run", "--plot", f"runs/{LONG}.png"), r"the name 'a{40}\.\.\.a{23}\.pt\.png' is 307 bytes",
          tmp_path)


def test_save_to_a_name_over_255_bytes_raises_output_path_error(tmp_path) -> None:
    import pytest
    import torch
    from nets import Residual

    import se_inject
    from se_inject.errors import OutputPathError

    model = se_inject.inject_se(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), Residual(8)),
                                example_input=torch.randn(1, 3, 8, 8))
    with pytest.raises(OutputPathError, match="is 303 bytes, longer than the 255"):
        se_inject.save(model, tmp_path / LONG)
    os.symlink("loop.pt", tmp_path / "loop.pt")
    with pytest.raises(OutputPathError, match="it is a symbolic link loop"):
        se_inject.save(model, tmp_path / "loop.pt")
    assert os.readlink(tmp_path / "loop.pt") == "loop.pt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loop.pt"]


def test_an_output_that_is_a_symlink_loop_is_refused_not_replaced(tmp_path) -> None:
    os.symlink("loop.pt", tmp_path / "loop.pt")
    fails(run(*SMALL, "-o", "loop.pt"), r"^se-inject: error: cannot write 'loop\.pt': it is a symbolic link loop",
          tmp_path, keep=("loop.pt",))
    assert (tmp_path / "loop.pt").is_symlink() and os.readlink(tmp_path / "loop.pt") == "loop.pt"
