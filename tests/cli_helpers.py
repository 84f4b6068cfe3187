"""Shared by the CLI tests: run the typer app offline in an empty folder."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from se_inject import zoo
from se_inject.cli import app

SMALL = ["torchvision:resnet18", "--weights", "random", "--input-size", "64"]


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Run in an empty folder, offline: no weights host answers, every cache is empty."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(zoo, "_host_reachable", lambda host, timeout=zoo.PROBE_TIMEOUT_S: False)
    monkeypatch.setattr(zoo, "_hf_cached", lambda repo_id, filename: None)
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
