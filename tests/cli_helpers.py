"""Shared by the CLI tests: run the typer app offline in an empty folder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from se_inject.cli import app

SMALL = ["torchvision:resnet18", "--weights", "random", "--input-size", "64"]


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Run in an empty folder, offline (``SE_INJECT_OFFLINE``), with empty hub and torch caches."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SE_INJECT_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path.parent / f"{tmp_path.name}-hf-cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path.parent / f"{tmp_path.name}-torch-home"))
    monkeypatch.setenv("COLUMNS", "120")


def run(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def ok(result) -> None:
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output


def report(*args: str) -> dict:
    result = run(*args, "--json")
    ok(result)
    return json.loads(result.stdout)


def fails(result, message: str, folder: Path, keep: tuple[str, ...] = (), code: int = 1) -> None:
    """Exit code, stderr one error line matching ``message`` (no progress, no traceback), nothing new written."""
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit)  # handled, not a crash
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("se-inject: error:")]
    assert len(errors) == 1, result.stderr
    assert re.search(message, errors[0]), errors[0]
    assert result.stderr == errors[0] + "\n", result.stderr
    assert result.stdout == ""
    assert sorted(p.name for p in folder.iterdir()) == sorted(keep)
