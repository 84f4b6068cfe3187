"""benchmarks/efficacy.py --quick: the transfer experiment end to end on digits, tiny model, 2 seeds."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

EFFICACY = Path(__file__).resolve().parents[1] / "benchmarks" / "efficacy.py"
ARMS = ["plain", "se", "se_naive", "se_adapter", "head_only"]


def _env() -> dict[str, str]:
    root = str(EFFICACY.parents[1])
    return {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("efficacy")
    proc = subprocess.run(
        [sys.executable, str(EFFICACY), "--quick", "--no-cache", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=_env(),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, json.loads((out / "efficacy.json").read_text())


def test_json_has_the_issue_shape(quick):
    _, result = quick
    assert {"protocol", "arms", "settings"} <= set(result)
    for key in ("backbone", "source", "target", "budget_per_class", "steps", "seeds"):
        assert key in result["protocol"], key
    assert result["protocol"]["seeds"] == [0, 1]
    assert list(result["arms"]) == ARMS
    assert len(result["settings"]) == 1 and result["settings"][0]["arms"] == result["arms"]
    grid = result["protocol"]["lr_grid"]
    for arm, entry in result["arms"].items():
        assert entry["seeds"] == [0, 1], arm
        assert entry["lr"] in grid, arm  # chosen from the grid, on validation
        assert set(entry["grid_val_acc"]) == {f"{lr:g}" for lr in grid}, arm
        for key in ("step0_acc", "final_acc", "val_acc"):
            assert len(entry[key]) == 2 and all(math.isfinite(a) and 0 <= a <= 1 for a in entry[key]), (arm, key)
        if arm != "plain":
            paired = entry["paired_vs_plain"]
            assert paired["diffs"] == pytest.approx([a - b for a, b in zip(entry["final_acc"], result["arms"]["plain"]["final_acc"], strict=True)], abs=1e-5)
            assert paired["wins"] + paired["losses"] + paired["ties"] == 2
            assert 0 < paired["sign_p"] <= 1


def test_identity_start_equals_plain_at_step_0(quick):
    _, result = quick
    arms = result["arms"]
    assert arms["se"]["step0_logits_equal_plain"] == [True, True]
    assert arms["se"]["step0_acc"] == arms["plain"]["step0_acc"]
    assert arms["se_adapter"]["step0_acc"] == arms["plain"]["step0_acc"]
    # the paper's initialisation halves every branch at insertion: not the pretrained function
    assert arms["se_naive"]["step0_acc"] != arms["plain"]["step0_acc"]
    # training does something: every arm ends above its step-0 accuracy (chance is 0.2)
    for arm, entry in arms.items():
        assert sum(entry["final_acc"]) > sum(entry["step0_acc"]), arm


def test_gate_statistics_are_reported(quick):
    _, result = quick
    assert set(result["gates"]) == {"se", "se_naive", "se_adapter"}
    for arm, per_seed in result["gates"].items():
        assert len(per_seed) == 2
        for blocks in per_seed:
            assert len(blocks) == 8  # resnet18: two SE blocks per stage
            for b in blocks:
                assert b["min"] <= b["mean"] <= b["max"], (arm, b["name"])
                low, high = (0, 1) if arm == "se_naive" else (0, 2)
                assert low <= b["min"] and b["max"] <= high
    # per-class means (the paper's Fig. 6) for the se arm's first seed: one vector per class
    first = result["gates"]["se"][0][-1]
    assert sorted(first["class_means"]) == ["0", "1", "2", "3", "4"]
    assert len(first["class_means"]["0"]) == first["channels"]
    stages = result["stages"]
    assert [s["stage"] for s in stages] == [0, 1, 2, 3]
    assert all(s["se_params"] > 0 and s["se_fc_macs"] > 0 for s in stages)


def test_report_and_plots_are_written(quick):
    out, result = quick
    md = (out / "efficacy.md").read_text()
    assert "| `se` |" in md and "(= plain: yes)" in md
    for name in ("efficacy.png", "efficacy_gates.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in md


def test_missing_fashion_mnist_names_the_package(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(EFFICACY), "--data", str(tmp_path), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120, env=_env(),
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "dataset-fashion-mnist" in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


def test_sign_test_is_exact():
    spec = importlib.util.spec_from_file_location("efficacy_benchmark", EFFICACY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    assert module.sign_test([0.1] * 5) == pytest.approx(2 / 32)  # 5 of 5: 2 * (1/2)^5
    assert module.sign_test([0.1, -0.1]) == 1.0
    assert module.sign_test([0.1, 0.1, 0.1, -0.1, 0.0]) == pytest.approx(2 * 5 / 16)  # tie dropped: 3 of 4
    assert module.sign_test([0.0, 0.0]) == 1.0


def test_study_pairs_each_recipe_with_its_reference(quick):
    _, result = quick
    (name, entry), = result["study"].items()
    assert entry["arm"] == "se" and entry["versus"] == "plain"
    assert entry["se_lr"] == pytest.approx(10 * entry["lr"])
    assert len(entry["final_acc"]) == 2 and all(math.isfinite(a) for a in entry["final_acc"])
    assert entry["paired"]["diffs"] == pytest.approx(
        [a - b for a, b in zip(entry["final_acc"], result["arms"]["plain"]["final_acc"], strict=True)], abs=1e-5)
    assert len(entry["stages"]) == 4
