"""The CLI as timm users drive it: listing, hub names, EMA weights, name case, tags, small things.

In-process with CliRunner, offline, in an empty folder with empty caches (``cli_helpers``).
Expected values come from the registries and the files the tests write, not from constants.
"""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import torchvision
from cli_helpers import SMALL, _isolated, fails, ok, report, run  # noqa: F401 - _isolated is an autouse fixture

import se_inject
from se_inject.models.names import resolve_name

# --- listing --------------------------------------------------------------------------------


def test_list_prints_both_libraries_names_any_case_marks_pretrained_and_builds_nothing(tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(timm, "create_model", no_model)
    monkeypatch.setattr(torchvision.models, "get_model", no_model)
    result = run("--list", "S*NET*")  # no MODEL needed; the glob ignores case
    ok(result)
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:-1]}
    want_timm = set(timm.list_models("s*net*"))
    want_tv = {n for n in torchvision.models.list_models() if fnmatch.fnmatchcase(n, "s*net*")}
    assert set(rows) == want_timm | want_tv and want_tv - want_timm and want_timm - want_tv
    pretrained = {n.partition(".")[0] for n in timm.list_pretrained("s*net*")}
    tv_pretrained = {n for n in want_tv if len(torchvision.models.get_model_weights(n))}
    for name, line in rows.items():
        timm_cell, tv_cell = re.split(r"\s{2,}", line.strip())[1:3]
        for cell, names, with_weights in ((timm_cell, want_timm, pretrained), (tv_cell, want_tv, tv_pretrained)):
            if name not in names:
                assert cell == "-", line
            elif name in with_weights:
                assert cell.startswith("pretrained"), line
            else:
                assert cell == "random init only", line
    assert result.stdout.splitlines()[-1].startswith(f"{len(rows)} models")
    assert list(tmp_path.iterdir()) == []


def test_list_with_nothing_matching_is_one_line_exit_1(tmp_path) -> None:
    fails(run("--list", "no_such_model*"), r"no model in timm or torchvision matches 'no_such_model\*'", tmp_path)


# --- hub names ------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", ["auto", "random", "pretrained"])
def test_hub_name_offline_without_cache_is_one_download_error(tmp_path, weights: str) -> None:
    fails(run("hf-hub:timm/resnet18.a1_in1k", "--weights", weights, "-o", "model.pt"),
          r"hf-hub:timm/resnet18\.a1_in1k \((config\.json|timm/resnet18\.a1_in1k)\) (is|are) not in the local cache "
          r"and huggingface\.co "
          r"cannot be reached \(offline\?\)$", tmp_path)


def _cache_hub_model(tmp_path: Path) -> dict[str, torch.Tensor]:
    """A hub repository ``org/tiny`` (resnet18, 7 classes) in the test's HF cache, as the hub client stores it."""
    repo = tmp_path.parent / f"{tmp_path.name}-hf-cache" / "models--org--tiny"
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    (snapshot / "config.json").write_text(json.dumps({"architecture": "resnet18", "num_classes": 7}))
    state = timm.create_model("resnet18", num_classes=7).state_dict()
    safetensors.torch.save_file(state, snapshot / "model.safetensors")
    return state


def test_hub_name_from_the_cache_builds_its_architecture_with_its_weights_and_reloads(tmp_path) -> None:
    state = _cache_hub_model(tmp_path)
    data = report("hf-hub:org/tiny", "--weights", "pretrained", "--input-size", "64", "-o", "model.pt")
    assert (data["model"], data["source"], data["weights"]["kind"]) == ("hf-hub:org/tiny", "timm", "pretrained")
    model = se_inject.load("model.pt")
    assert model.fc.out_features == 7
    assert torch.equal(model.conv1.weight, state["conv1.weight"])


# --- EMA weights ----------------------------------------------------------------------------


def _training_checkpoint(path: Path) -> tuple[torchvision.models.ResNet, torchvision.models.ResNet]:
    torch.manual_seed(0)
    plain, ema = torchvision.models.resnet18(num_classes=10), torchvision.models.resnet18(num_classes=10)
    torch.save({"epoch": 3, "state_dict": plain.state_dict(), "state_dict_ema": ema.state_dict()}, path)
    return plain, ema


def test_training_checkpoint_plain_by_default_with_a_note_and_ema_on_request(tmp_path) -> None:
    plain, ema = _training_checkpoint(tmp_path / "last.pth.tar")
    args = ["torchvision:resnet18", "--weights", "last.pth.tar", "--input-size", "64"]
    result = run(*args, "-o", "plain.pt")
    ok(result)
    line = next(line for line in result.stdout.splitlines() if line.startswith("weights:"))
    assert "plain weights 'state_dict'" in line and "EMA weights 'state_dict_ema'" in line and "--weights-ema" in line
    data = report(*args, "--weights-ema", "-o", "ema.pt")
    assert data["weights"]["detail"] == "file last.pth.tar (EMA weights 'state_dict_ema')"
    for file, source, other in (("plain.pt", plain, ema), ("ema.pt", ema, plain)):
        loaded = se_inject.load(file)
        assert torch.equal(loaded.conv1.weight, source.conv1.weight)
        assert not torch.equal(loaded.conv1.weight, other.conv1.weight)


def test_weights_ema_needs_ema_weights_in_a_file(tmp_path) -> None:
    torch.save({"state_dict": torchvision.models.resnet18().state_dict()}, tmp_path / "plain.pth")
    fails(run(*SMALL[:1], "--weights", "plain.pth", "--weights-ema", "-o", "m.pt"),
          r"holds no EMA weights \(state_dict_ema or model_ema\)", tmp_path, keep=("plain.pth",))
    fails(run(*SMALL, "--weights-ema"), r"'--weights-ema'.*give --weights PATH", tmp_path, keep=("plain.pth",),
          code=2)


# --- name case and pretrained tags -----------------------------------------------------------


@pytest.mark.parametrize(("name", "source", "found"), [
    ("RESNET18", "timm", "resnet18"),  # the library the lower-case name picks, in its spelling
    ("torchvision:ResNet18", "torchvision", "resnet18"),
    ("RESNET18.A1_IN1K", "timm", "resnet18.a1_in1k"),
])
def test_names_match_registries_whatever_the_case(name: str, source: str, found: str) -> None:
    data = report(name, "--weights", "random", "--input-size", "64", "--dry-run")
    assert (data["source"], data["model"]) == (source, found)


def test_bad_pretrained_tag_lists_the_models_tags(tmp_path) -> None:
    tags = [n.partition(".")[2] for n in timm.list_pretrained("resnet18.*")]
    fails(run("resnet18.bogus_tag", "--weights", "random", "-o", "m.pt"),
          rf"timm model 'resnet18' has no pretrained tag 'bogus_tag'; its tags: {re.escape(', '.join(tags))}$",
          tmp_path)
    from se_inject.errors import UnknownTagError

    with pytest.raises(UnknownTagError, match="its tags: "):
        resolve_name("timm:resnet18.bogus_tag")


# --- small things -----------------------------------------------------------------------------


def test_include_without_a_wildcard_that_matches_nothing_says_what_was_meant(tmp_path) -> None:
    fails(run(*SMALL, "--include", "layer4", "-o", "m.pt"),
          r"no site matches --include layer4; globs match whole names, did you mean 'layer4\.\*'\?", tmp_path)
    result = run(*SMALL, "--include", "layer4", "--dry-run")
    ok(result)
    assert "did you mean 'layer4.*'" in result.stderr
    assert len(report(*SMALL, "--include", "layer4.*", "--dry-run")["sites"]) == 2  # what was meant works


@pytest.mark.parametrize("flag", ["--include", "--exclude"])
def test_empty_glob_is_a_bad_command_line(tmp_path, flag: str) -> None:
    fails(run(*SMALL, flag, "", "-o", "m.pt"), rf"'{flag}'.*empty glob", tmp_path, code=2)


def test_capped_hidden_width_is_said_in_the_report() -> None:
    data = report(*SMALL, "--hidden", "100", "--dry-run")
    capped = [s for s in data["sites"] if s["channels"] < 100]
    assert capped and all(s["hidden"] == s["channels"] for s in capped)
    result = run(*SMALL, "--hidden", "100", "--dry-run")
    ok(result)
    widths = ", ".join(str(w) for w in sorted({s["channels"] for s in capped}))
    assert (f"note: --hidden 100 is more than the channels of {len(capped)} of {len(data['sites'])} sites; "
            f"their hidden width is capped at the channel count ({widths})") in result.stdout


def test_random_fallback_is_repeated_in_the_last_line() -> None:
    result = run("torchvision:resnet18", "--input-size", "64", "--dry-run")  # auto, offline: random init
    ok(result)
    last = result.stdout.splitlines()[-1]
    assert last.startswith("WARNING: the base model has RANDOM weights") and "pretrained unavailable" in last


@pytest.mark.parametrize("columns", [80, 48])
def test_site_table_headers_stay_whole_on_narrow_screens(monkeypatch, columns: int) -> None:
    monkeypatch.setenv("COLUMNS", str(columns))
    result = run(*SMALL, "--dry-run")
    ok(result)
    lines = result.stdout.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("SE sites")))
    header = next(line for line in lines[start:] if "module" in line or "modul" in line or "mod" in line)
    words = header.replace("┃", " ").split()
    full = {"stage", "size", "module", "kind", "channels", "hidden", "axis", "params"}
    compact = {"st", "size", "module", "kind", "C", "hid", "ax", "params"}
    assert set(words) <= full or set(words) <= compact, header
    assert {"module", "params"} <= set(words) and all(len(line) <= columns for line in lines[start:start + 12])
    site_lines = [line for line in lines if "layer1.0.se" in line]
    assert site_lines and "layer1.0.se " in site_lines[0] + " "  # the name whole on one line


def test_se_module_names_say_which_node_they_follow(tmp_path) -> None:
    data = report("torchvision:densenet121", "--weights", "random", "--input-size", "64", "-o", "model.pt")
    names = [s["name"] for s in data["sites"]]
    assert len(set(names)) == len(names)
    by_owner: dict[str, list[dict]] = {}
    for site in data["sites"]:
        by_owner.setdefault(site["owner"], []).append(site)
    for owner, sites in by_owner.items():
        for site in sites:
            attr = site["name"].removeprefix(f"{owner}.")
            assert attr.isidentifier() and "." not in attr
            if len(sites) > 1:  # several in one block: each named after its source, not numbered
                rel = site["source"].removeprefix(f"{owner}.")
                assert attr == "se_" + rel.replace(".", "_"), site
    model = se_inject.load("model.pt")
    modules = dict(model.named_modules())
    assert all(isinstance(modules[n], se_inject.SEBlock) for n in names)
    base = se_inject.remove_se(model)
    assert set(base.state_dict()) == set(torchvision.models.densenet121().state_dict())
