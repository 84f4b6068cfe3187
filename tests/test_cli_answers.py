"""The CLI as a careful user meets it: dry runs that answer, whole names, files and interrupts.

In-process with CliRunner (stderr is not a terminal there, so no progress lines), offline.
"""

from __future__ import annotations

import json

import pytest
import torch
from cli_helpers import SMALL, _isolated, fails, ok, report, run  # noqa: F401 - _isolated is an autouse fixture

import se_inject
from se_inject import workflow

EFFICIENTNET = ["torchvision:efficientnet_b0", "--weights", "random", "--input-size", "64", "--dry-run"]


# --- 1. a dry run of a model with no site is an answer -------------------------------------


def test_dry_run_of_a_model_without_sites_prints_the_plan(tmp_path) -> None:
    result = run(*EFFICIENTNET)
    ok(result)
    assert result.stderr == ""
    out = result.stdout
    assert "SE sites (0)" in out and "Skipped (9)" in out and "already has channel attention" in out
    assert "dry run: nothing written" in out
    assert list(tmp_path.iterdir()) == []


def test_dry_run_json_of_a_model_without_sites() -> None:
    data = report(*EFFICIENTNET)
    assert data["sites"] == [] and data["by_stage"] == []
    assert len(data["skipped"]) == 9 and {s["reason"] for s in data["skipped"]} == {"already-attended"}
    assert data["params"]["added"] == 0 and data["macs"]["added"] == 0


def test_writing_a_model_without_sites_is_still_an_error(tmp_path) -> None:
    args = [a for a in EFFICIENTNET if a != "--dry-run"]
    fails(run(*args, "-o", "model.pt"), r"no SE site in .*9 already has channel attention.*Nothing was written\.$",
          tmp_path)


# --- 2. names are never cut ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["torchvision:densenet121", "timm:convnext_atto"])
def test_module_names_stay_whole_at_80_columns(monkeypatch, name: str) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    data = report(name, "--weights", "random", "--input-size", "64", "--dry-run")
    result = run(name, "--weights", "random", "--input-size", "64", "--dry-run")
    ok(result)
    lines = result.stdout.splitlines()
    assert "…" not in result.stdout
    for site in data["sites"]:
        found = [line for line in lines if f" {site['name']} " in line]
        assert found and len(found[0]) <= 80, site["name"]


# --- 4. input sizes ------------------------------------------------------------------------


def test_absurd_input_size_is_refused_before_anything_is_built(tmp_path, monkeypatch) -> None:
    def no_model(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(workflow, "load_model", no_model)
    fails(run(*SMALL[:-2], "--input-size", "100000", "-o", "model.pt"),
          r"Invalid value for '--input-size': '100000': at most 8192 pixels a side", tmp_path, code=2)


def test_input_channels_the_model_does_not_take(tmp_path) -> None:
    fails(run(*SMALL[:-2], "--input-size", "1,224,224", "-o", "model.pt"),
          r"input size 1x224x224: torchvision:resnet18 expects 3 input channels, not 1", tmp_path)


def test_library_input_size_rules() -> None:
    with pytest.raises(se_inject.ConfigError, match="at most 8192 a side"):
        workflow.resolve_input_size((3, 9000, 9000), (3, 224, 224))
    with pytest.raises(se_inject.ConfigError, match="expects 3 input channels"):
        workflow.resolve_input_size((1, 64, 64), (3, 224, 224))


def test_analysis_input_is_a_meta_tensor(monkeypatch) -> None:
    seen = []
    real = workflow.build_plan

    def spy(model, *args, example_input=None, **kwargs):
        seen.append(example_input.device.type)
        return real(model, *args, example_input=example_input, **kwargs)

    monkeypatch.setattr(workflow, "build_plan", spy)
    ok(run(*SMALL, "--dry-run"))
    assert seen == ["meta"]


# --- 6. one behaviour for a model whose root cannot be rebuilt ------------------------------


def test_cli_and_api_agree_on_a_model_whose_blocks_take_a_tuple() -> None:
    import timm

    data = report("timm:twins_svt_small", "--weights", "random", "--input-size", "64", "--dry-run")
    model = se_inject.inject_se(timm.create_model("twins_svt_small"), example_input=torch.zeros(1, 3, 64, 64))
    injected = [name for name, m in model.named_modules() if isinstance(m, se_inject.SEBlock)]
    assert [s["name"] for s in data["sites"]] == injected
    # Twins' position encoders are called with (x, (H, W)): once not rewritable from the root,
    # now their own owners (issue 17, pattern 3); the CLI and the API build the same four
    assert injected == [f"pos_block.{i}.se" for i in range(4)]


# --- 7. a reduction that leaves every block at the minimum width --------------------------


def test_reduction_that_makes_every_block_minimal_warns() -> None:
    result = run(*SMALL, "--dry-run", "-r", "1e9")
    ok(result)
    assert "reduction 1000000000 gives every SE block the minimum hidden width" in result.stderr
    assert "minimum hidden width" not in run(*SMALL, "--dry-run").stderr


# --- 8. files --------------------------------------------------------------------------------


def test_output_onto_an_existing_file_says_replaced(tmp_path) -> None:
    (tmp_path / "model.pt").write_bytes(b"old")
    result = run(*SMALL, "-o", "model.pt")
    ok(result)
    assert result.stdout.rstrip().splitlines()[-1] == "wrote model.pt (full model + plan; replaced the existing file)"
    assert json.loads(run(*SMALL, "-o", "model.pt", "--json").stdout)["replaced"] is True


def test_without_output_it_says_nothing_was_written(tmp_path) -> None:
    result = run(*SMALL)
    ok(result)
    assert result.stdout.rstrip().splitlines()[-1].startswith("no model written: give -o FILE.pt")
    assert list(tmp_path.iterdir()) == []


def test_weights_that_are_not_a_torch_file(tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("hello\n")
    fails(run("torchvision:resnet18", "--weights", "notes.txt", "-o", "model.pt"),
          r"weights file 'notes.txt' is not a torch or safetensors file", tmp_path, ("notes.txt",))


def test_interrupt_is_exit_130_and_one_line(tmp_path, monkeypatch) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(workflow, "load_model", interrupted)
    fails(run(*SMALL, "-o", "model.pt"), r"^se-inject: error: interrupted$", tmp_path, code=130)


# --- 9. progress only on a terminal ---------------------------------------------------------


def test_progress_goes_to_a_terminal_only(monkeypatch) -> None:
    # Off a terminal (this runner), stderr holds warnings and errors only; on one, progress too.
    assert run(*SMALL, "--dry-run").stderr == ""
    from rich.console import Console

    monkeypatch.setattr(Console, "is_terminal", property(lambda self: True))
    assert "building torchvision:resnet18" in run(*SMALL, "--dry-run").stderr
