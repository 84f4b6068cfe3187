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
ARMS = ["plain", "se", "se_naive", "se_adapter", "head_only", "bn_tune", "se_bn"]
HAS_PEFT = importlib.util.find_spec("peft") is not None  # the efficacy extra; the LoRA arms need it
LORA = ["lora_r1", "lora_r8"] if HAS_PEFT else []  # quick model: rank 1 is closest to se_bn's count


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
    assert list(result["arms"]) == ARMS + LORA
    assert len(result["settings"]) == 1 and result["settings"][0]["arms"] == result["arms"]
    start, (low, high) = result["protocol"]["lr_grid"], result["protocol"]["lr_limits"]
    for arm, entry in result["arms"].items():
        assert entry["seeds"] == [0, 1], arm
        grid = entry["grid"]
        assert set(start) <= set(grid) and low <= min(grid) and max(grid) <= high, arm
        assert entry["lr"] in grid, arm  # chosen from the searched grid, on validation
        assert set(entry["grid_val_acc"]) == {f"{lr:g}" for lr in grid}, arm
        best = max(entry["grid_val_acc"].values())
        assert entry["grid_val_acc"][f"{entry['lr']:g}"] == best, arm
        # never at the grid's edge unless the search hit its limit there
        if entry["lr"] in (min(grid), max(grid)):
            assert entry["lr_at_limit"] and entry["lr"] in (low, high), arm
        else:
            assert not entry["lr_at_limit"], arm
        # the grid grows one 1-3-10 step at a time: consecutive rates are 3x or 10/3x apart
        ratios = [b / a for a, b in zip(sorted(grid), sorted(grid)[1:], strict=False)]
        assert all(r == pytest.approx(3) or r == pytest.approx(10 / 3) for r in ratios), (arm, grid)
        for key in ("step0_acc", "final_acc", "val_acc"):
            assert len(entry[key]) == 2 and all(math.isfinite(a) and 0 <= a <= 1 for a in entry[key]), (arm, key)
        if arm != "plain":
            paired = entry["paired_vs_plain"]
            assert paired["diffs"] == pytest.approx([a - b for a, b in zip(entry["final_acc"], result["arms"]["plain"]["final_acc"], strict=True)], abs=1e-5)
            assert paired["wins"] + paired["losses"] + paired["ties"] == 2
            assert 0 < paired["sign_p"] <= 1


def test_trained_parameter_counts_add_up(quick):
    _, result = quick
    n = {arm: e["trainable_params"] for arm, e in result["arms"].items()}
    assert n["head_only"] == 5 * 64 + 5  # the new head on 64 features
    assert n["plain"] < n["se"] == n["se_naive"]
    # SE + BN is exactly the SE adapter plus the BatchNorm affine parameters (the head counted once)
    assert n["se_bn"] == n["se_adapter"] + n["bn_tune"] - n["head_only"]
    assert n["head_only"] < n["bn_tune"] < n["se_bn"] < n["plain"]
    if HAS_PEFT:  # LoRA's count is linear in the rank
        assert n["lora_r8"] - n["head_only"] == 8 * (n["lora_r1"] - n["head_only"])
    pairs = result["pairs"]
    assert {"se_bn - se_adapter", "se_bn - bn_tune"} <= set(pairs)
    d = [a - b for a, b in zip(result["arms"]["se_bn"]["final_acc"], result["arms"]["bn_tune"]["final_acc"], strict=True)]
    assert pairs["se_bn - bn_tune"]["diffs"] == pytest.approx(d, abs=1e-5)


def test_lora_arms_are_left_out_with_a_note_without_peft(tmp_path):
    hide = ("import os, runpy, sys; sys.modules['peft'] = None; sys.argv = sys.argv[1:]; "
            "sys.path.insert(0, os.path.dirname(sys.argv[0])); runpy.run_path(sys.argv[0], run_name='__main__')")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-c", hide, str(EFFICACY), "--quick", "--no-cache", "--part", "transfer", "--arms", "plain,lora",
         "--seeds", "1", "--no-study", "--out", str(out)],
        capture_output=True, text=True, timeout=120, env=_env(),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "note: peft is not installed, so the LoRA arm lora is left out" in proc.stdout
    assert list(json.loads((out / "efficacy.json").read_text())["arms"]) == ["plain"]


def test_identity_start_equals_plain_at_step_0(quick):
    _, result = quick
    arms = result["arms"]
    assert arms["se"]["step0_logits_equal_plain"] == [True, True]
    assert arms["se"]["step0_acc"] == arms["plain"]["step0_acc"]
    for arm in ["se_adapter", "bn_tune", "se_bn", *LORA]:  # LoRA's B starts at zero
        assert arms[arm]["step0_acc"] == arms["plain"]["step0_acc"], arm
    # the paper's initialisation halves every branch at insertion: not the pretrained function
    assert arms["se_naive"]["step0_acc"] != arms["plain"]["step0_acc"]
    # training does something: every arm ends above its step-0 accuracy (chance is 0.2)
    for arm, entry in arms.items():
        assert sum(entry["final_acc"]) > sum(entry["step0_acc"]), arm


def test_gate_statistics_are_reported(quick):
    _, result = quick
    assert set(result["gates"]) == {"se", "se_naive", "se_adapter", "se_bn"}
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
    assert "| `se_bn` |" in md and "`se_bn - se_adapter`" in md and "From scratch" in md
    for name in ("efficacy.png", "efficacy_gates.png", "efficacy_budget.png"):
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


def test_scratch_part_trains_three_arms_from_the_same_init(quick):
    _, result = quick
    scratch = result["scratch"]
    assert list(scratch["arms"]) == ["plain", "se", "se_paper"]
    assert scratch["protocol"]["seeds"] == [0, 1]
    for arm, e in scratch["arms"].items():
        assert len(e["final_acc"]) == 2 and all(0 <= a <= 1 for a in e["final_acc"]), arm
        assert e["mean"] == pytest.approx(sum(e["final_acc"]) / 2, abs=1e-5)
        assert all(len(curve) == 10 for curve in e["loss_curve"]), arm
    # the same random init in every arm, and the identity start leaves its function unchanged
    assert scratch["arms"]["se"]["step0_logits_equal_plain"] == [True, True]
    d = scratch["pairs"]["se - se_paper"]["diffs"]
    assert d == pytest.approx([a - b for a, b in zip(scratch["arms"]["se"]["final_acc"],
                                                      scratch["arms"]["se_paper"]["final_acc"], strict=True)], abs=1e-5)


def test_search_extends_past_an_edge_until_inside_or_at_the_limit():
    spec = importlib.util.spec_from_file_location("efficacy_benchmark", EFFICACY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)

    def peaked(at):
        return lambda lr: {"lr": lr, "val_acc": -abs(math.log10(lr / at)), "val_loss": 0.0}

    best, runs, at_limit = module.search_lr(peaked(0.1), (1e-3, 3e-3, 1e-2), (1e-5, 1.0))
    assert best["lr"] == 0.1 and not at_limit
    assert [r["lr"] for r in runs] == [1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3]  # one step past the best
    best, runs, at_limit = module.search_lr(peaked(1e-7), (1e-3, 3e-3, 1e-2), (1e-5, 1.0))
    assert best["lr"] == 1e-5 and at_limit and min(r["lr"] for r in runs) == 1e-5
    best, runs, at_limit = module.search_lr(peaked(3e-3), (1e-3, 3e-3, 1e-2), (1e-5, 1.0))
    assert best["lr"] == 3e-3 and len(runs) == 3 and not at_limit
