"""The ``se-inject`` command: report, options, checkpoints, and one-line errors for bad input.

Most tests run the typer app in-process with CliRunner on torchvision's resnet18 at 64x64;
timm's resnet50 is used for the pinned numbers only. Two tests run the installed script in a
fresh process: the README's quickstart command, and reloading a written checkpoint.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torchvision
from cli_helpers import SMALL, _isolated, fails, ok, report, run  # noqa: F401 - _isolated is an autouse fixture

from se_inject.cli import parse_input_size
from se_inject.errors import ConfigError
from se_inject.workflow import resolve_input_size

README = Path(__file__).resolve().parents[1] / "README.md"
SCRIPT = Path(sys.executable).with_name("se-inject")


# --- the pinned numbers and fresh-process checks -----------------------------------------


def test_resnet50_pinned_numbers_and_bit_equal_reload_in_a_fresh_process(tmp_path) -> None:
    data = report("resnet50", "--reduction", "16", "--weights", "random", "-o", "model.pt")
    assert (data["model"], data["source"]) == ("resnet50", "timm")
    assert len(data["sites"]) == 16
    assert data["params"]["added"] == 2_530_992  # docs/se-paper.md: seresnet50 - resnet50
    assert data["macs"]["before"] == 4_089_184_256  # FlopCounterMode at 3x224x224
    assert data["input_size"] == [3, 224, 224]
    assert data["se_ops"]["fc_macs"] == 2_514_944 == data["macs"]["added"]
    assert data["weights"]["kind"] == "random"
    assert data["output"] == "model.pt"

    # A fresh process: only plain torch.load + se_inject.load; the base model gets the file's
    # own base tensors (selected by the base model's keys), so any difference is the SE blocks'.
    script = """
import sys, torch, timm, se_inject
data = torch.load("model.pt", weights_only=True)
model = se_inject.load("model.pt").eval()
base = timm.create_model("resnet50").eval()
base.load_state_dict({k: data["state_dict"][k] for k in base.state_dict()})
x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    print(sum(isinstance(m, se_inject.SEBlock) for m in model.modules()), torch.equal(model(x), base(x)))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["16", "True"]


# --- the report --------------------------------------------------------------------------


def test_human_report_on_stdout_progress_on_stderr() -> None:
    result = run(*SMALL)
    ok(result)
    out = result.stdout
    for text in (
        "se-inject torchvision:resnet18",
        "weights: random init (by request)",
        "SE: reduction 16",
        "SE sites (8)",
        "layer1.0.se",
        "Totals (one 3x64x64 input)",
        "parameters",
        "multiply-adds (MACs)",
        "FC multiply-adds (fc1 + fc2)",
        "squeeze: pooling additions",
        "scale: multiplications",
    ):
        assert text in out
    assert "building" not in out and "building" not in result.stderr  # no progress off a terminal
    # numbers right-aligned: the params column of the site table ends every row at one place
    rows = [line for line in out.splitlines() if " layer" in line and "residual" in line]
    assert len({len(line.rstrip()) for line in rows}) == 1


def test_json_report() -> None:
    data = report(*SMALL)
    assert {"model", "sites", "skipped", "params", "macs"} <= set(data)
    assert set(data["params"]) >= {"before", "after", "added"}
    assert set(data["macs"]) >= {"before", "after", "added"}
    assert data["params"]["added"] == sum(s["params"] for s in data["sites"])
    assert data["params"]["after"] == data["params"]["before"] + data["params"]["added"]
    assert data["macs"]["added"] == sum(s["fc_macs"] for s in data["sites"])
    site = data["sites"][0]
    assert site["name"] == "layer1.0.se" and site["kind"] == "residual"
    assert (site["channels"], site["hidden"]) == (64, 8)  # max(64 // 16, min_hidden 8)
    assert site["pool_adds"] == 64 * 16 * 16  # one add per element of the 64x16x16 map
    assert data["dry_run"] is False and data["output"] is None


def test_bare_name_says_which_registry_was_used() -> None:
    result = run("squeezenet1_1", "--weights", "random", "--input-size", "64")
    ok(result)
    assert "torchvision:squeezenet1_1 (name found in torchvision)" in result.stdout


@pytest.mark.parametrize(
    ("option", "size"),
    [("64", [3, 64, 64]), ("64x48", [3, 64, 48]), ("3,96,64", [3, 96, 64])],
)
def test_input_size(option: str, size: list[int]) -> None:
    data = report("torchvision:resnet18", "--weights", "random", "--input-size", option)
    assert data["input_size"] == size


def test_options_shape_the_plan() -> None:
    only = report(*SMALL, "--include", "layer1.*", "--include", "layer2.*")
    assert [s["name"] for s in only["sites"]] == ["layer1.0.se", "layer1.1.se", "layer2.0.se", "layer2.1.se"]
    assert {s["reason"] for s in only["skipped"]} == {"excluded"}
    without = report(*SMALL, "--exclude", "layer4.*")
    assert len(without["sites"]) == 6
    wide = report(*SMALL, "--min-channels", "256")
    assert [s["channels"] for s in wide["sites"]] == [256, 256, 512, 512]
    assert {s["reason"] for s in wide["skipped"]} == {"too-few-channels"}


def test_paper_init_no_bias_and_reduction() -> None:
    data = report(*SMALL, "--paper-init", "--no-bias", "-r", "8")
    assert data["config"]["identity_init"] is False and data["config"]["gate"] == "sigmoid"
    assert data["config"]["bias"] is False and data["config"]["reduction"] == 8
    for site in data["sites"]:
        assert site["hidden"] == max(site["channels"] // 8, 8)
        assert site["params"] == 2 * site["channels"] * site["hidden"]


def test_dry_run_writes_nothing(tmp_path) -> None:
    result = run(*SMALL, "--dry-run", "-o", "model.pt")
    ok(result)
    assert "dry run: nothing written" in result.stdout
    assert "--output is ignored" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_output_full_and_se_only(tmp_path) -> None:
    ok(run(*SMALL, "-o", "full.pt"))
    ok(run(*SMALL, "-o", "se.pt", "--se-only"))
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    se = torch.load(tmp_path / "se.pt", weights_only=True)
    assert full["model"] == {"source": "torchvision", "name": "resnet18"}
    assert se["se_only"] is True
    assert set(se["state_dict"]) < set(full["state_dict"])
    assert len(se["state_dict"]) == 8 * 4  # fc1/fc2 weight and bias per block
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full.pt", "se.pt"]


@pytest.mark.parametrize(
    ("text", "default", "size"),
    [
        ("64", (3, 224, 224), (3, 64, 64)),
        ("256x192", (3, 224, 224), (3, 256, 192)),
        ("3,32,32", (3, 224, 224), (3, 32, 32)),
        ("112", (3, 16, 112, 112), (3, 16, 112, 112)),
        ("8,64,64", (3, 16, 112, 112), (3, 8, 64, 64)),
    ],
)
def test_parse_input_size(text: str, default: tuple[int, ...], size: tuple[int, ...]) -> None:
    assert resolve_input_size(parse_input_size(text), default) == size


@pytest.mark.parametrize("text", ["", "0", "64x", "1,2,3,4,5,6", "a,b"])
def test_parse_input_size_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="bad --input-size"):
        parse_input_size(text)


def test_cli_never_touches_the_graph() -> None:
    import ast

    import se_inject.cli as cli

    tree = ast.parse(Path(cli.__file__).read_text())
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    modules |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not {m for m in modules if m.rsplit(".", 1)[-1] in ("graph", "sites", "rewrite")}


def test_version() -> None:
    result = run("--version")
    ok(result)
    assert re.fullmatch(r"se-inject \d+\.\d+\.\d+\n", result.stdout)


# --- weights -----------------------------------------------------------------------------


def test_auto_weights_offline_fall_back_loudly() -> None:
    result = run("torchvision:resnet18", "--input-size", "64")
    ok(result)
    assert "WARNING:" in result.stderr and "RANDOM" in result.stderr
    assert "random init (pretrained unavailable" in result.stdout


def test_auto_weights_from_the_local_cache(tmp_path) -> None:
    url = torchvision.models.get_model_weights("resnet18").DEFAULT.url
    cache = Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), cache / url.rsplit("/", 1)[-1])
    data = report("torchvision:resnet18", "--input-size", "64")
    assert data["weights"]["kind"] == "pretrained"
    assert "local cache" in data["weights"]["detail"]


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_weights_from_a_file(tmp_path, suffix: str) -> None:
    state = torchvision.models.resnet18().state_dict()
    path = tmp_path / f"w{suffix}"
    if suffix == ".pt":
        torch.save(state, path)
    else:
        safetensors.torch.save_file(state, str(path))
    data = report("torchvision:resnet18", "--weights", str(path), "--input-size", "64")
    assert data["weights"]["kind"] == "file"


# --- bad input: one line on stderr, non-zero exit, no traceback, nothing written ------------


def test_unknown_model(tmp_path) -> None:
    result = run("resnet5", "-o", "model.pt")
    fails(result, r"Unknown model 'resnet5' \(not in timm or torchvision\)\. Did you mean: resnet50 \(timm, torchvision\)", tmp_path)


def test_unknown_model_names_torchvision_only_matches(tmp_path) -> None:
    result = run("squeezenet1_2", "-o", "model.pt")
    fails(result, r"Did you mean: .*squeezenet1_1 \(torchvision\)", tmp_path)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["-r", "sixteen"], r"Invalid value for '--reduction' / '-r': .*number"),
        (["-r", "abc"], r"Invalid value for '--reduction' / '-r': .*number"),
        (["-r", "0"], r"Invalid value for '--reduction' / '-r': must be a number >= 1 \(the paper's r\), got 0$"),
        (["-r", "0.5"], r"'--reduction' / '-r': must be a number >= 1 \(the paper's r\), got 0.5$"),
        (["-r", "-3"], r"'--reduction' / '-r': must be a number >= 1 \(the paper's r\), got -3$"),
        (["-r", "nan"], r"'--reduction' / '-r': must be a number >= 1 \(the paper's r\), got nan$"),
        (["--hidden", "0"], r"Invalid value for '--hidden': .*(greater than or equal to 1|range x>=1)"),
        (["--gate", "relu"], r"Invalid value for '--gate': 'relu' is not one of scaled_sigmoid, one_plus_tanh, sigmoid, tanh"),
        (["--pool", "min"], r"Invalid value for '--pool': 'min' is not one of avg, max$"),
        (["--placement", "x"], r"Invalid value for '--placement': 'x' is not one of standard, pre, inner$"),
        (["--input-size", "big"], r"Invalid value for '--input-size': 'big': give 224, 256x192 or C,H,W"),
        (["--stage", "-1"], r"Invalid value for '--stage': .*(greater than or equal to 0|range x>=0)"),
    ],
    ids=["reduction-word", "reduction-abc", "reduction-0", "reduction-half", "reduction-negative", "reduction-nan",
         "hidden-0", "gate", "pool", "placement", "input-size", "stage"],
)
def test_bad_option_values_exit_2_with_the_flag_name(tmp_path, options: list[str], message: str) -> None:
    # One rule: a bad value is a usage error (exit 2) in the command line's words, before any model is built.
    fails(run(*SMALL, *options, "-o", "model.pt"), message, tmp_path, code=2)


def test_missing_model_is_a_usage_error(tmp_path) -> None:
    fails(run(), r"Missing argument 'MODEL'", tmp_path, code=2)


def test_help_lists_the_choices_and_one_value_per_flag() -> None:
    result = run("--help")
    ok(result)
    text = " ".join(result.stdout.split())
    for shown in ("--gate [scaled_sigmoid|one_plus_tanh|sigmoid|tanh]", "--pool [avg|max]",
                  "--placement [standard|pre|inner]", "--include GLOB", "--exclude GLOB", "--stage N",
                  "--resolution N", "--input-size SIZE", "-o, --output FILE.pt"):
        assert shown in text, shown
    assert "<list" not in text and "repeat for several" in text


def test_cli_choices_are_the_library_registries() -> None:
    from se_inject import cli, se_block

    assert set(cli.GATE_CHOICES) == set(se_block.GATES)
    assert set(cli.POOL_CHOICES) == set(se_block.POOLS)
    assert set(cli.PLACEMENT_CHOICES) == set(se_block.PLACEMENTS)


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ("missing/model.pt", r"cannot write 'missing/model.pt': folder 'missing' does not exist"),
        (".", r"cannot write '\.': it is a directory"),
        ("/proc/model.pt", r"cannot write '/proc/model.pt'"),
        ("model.safetensors", r"cannot write 'model.safetensors': checkpoints are torch files"),
    ],
    ids=["missing-folder", "directory", "read-only", "safetensors-name"],
)
def test_unwritable_output(tmp_path, output: str, message: str) -> None:
    if output.startswith("/proc") and not Path("/proc/self").exists():
        pytest.skip("needs Linux /proc")
    fails(run(*SMALL, "-o", output), message, tmp_path)


def _write(path: Path, content) -> None:
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.pt", None, r"weights file 'missing.pt' does not exist"),
        (".", None, r"weights file '\.' is a directory, not a file"),
        ("corrupt.pt", b"\x80\x02 not a pickle", r"weights file 'corrupt.pt' is not a readable torch file"),
        ("corrupt.safetensors", b"\x00" * 16, r"'corrupt.safetensors' is not a readable safetensors file"),
        (
            "other.pt",
            {"features.0.weight": torch.zeros(64, 3, 11, 11), "conv1.weight": torch.zeros(1)},
            r"does not fit the architecture: \d+ missing: bn1.weight, .*; 1 unexpected: features.0.weight; "
            r"1 wrong shape: conv1.weight",
        ),
    ],
    ids=["missing", "directory", "corrupt-pt", "corrupt-safetensors", "wrong-architecture"],
)
def test_bad_weights(tmp_path, name: str, content, message: str) -> None:
    _write(tmp_path / name, content)
    keep = (name,) if content is not None else ()
    fails(run("torchvision:resnet18", "--weights", name, "-o", "model.pt"), message, tmp_path, keep)


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_weights_that_would_run_code_are_refused(tmp_path) -> None:
    torch.save({"conv1.weight": _RunsCode(str(tmp_path / "ran"))}, tmp_path / "evil.pt")
    result = run("torchvision:resnet18", "--weights", "evil.pt", "-o", "model.pt")
    fails(result, r"refused weights file 'evil.pt': unpickling it would import and run posix.mkdir", tmp_path, ("evil.pt",))
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            [*SMALL, "--include", "nomatch.*"],
            r"no SE site in torchvision:resnet18: all 8 candidate places were skipped: 8 excluded by the "
            r"selection \(include/exclude, stage, resolution\)\. What would help: loosen --include/--exclude",
        ),
        (
            ["torchvision:alexnet", "--weights", "random", "--input-size", "64"],
            r"no SE site in torchvision:alexnet: it has no residual additions or channel concatenations",
        ),
        (
            ["timm:efficientnet_b0", "--weights", "random", "--input-size", "64"],
            r"skipped: 9 already has channel attention\. What would help: .*variant of the model without it",
        ),
    ],
    ids=["all-excluded", "plain-network", "already-attended"],
)
def test_model_with_no_sites(tmp_path, args: list[str], message: str) -> None:
    fails(run(*args, "-o", "model.pt"), message + r".*Nothing was written\.$", tmp_path)


def test_failed_run_before_writing_leaves_an_existing_output_untouched(tmp_path) -> None:
    (tmp_path / "model.pt").write_bytes(b"the previous model")
    _write(tmp_path / "corrupt.pt", b"junk")
    result = run("torchvision:resnet18", "--weights", "corrupt.pt", "-o", "model.pt")
    fails(result, r"is not a torch or safetensors file", tmp_path, ("model.pt", "corrupt.pt"))
    assert (tmp_path / "model.pt").read_bytes() == b"the previous model"


def test_failed_write_leaves_an_existing_output_untouched(tmp_path, monkeypatch) -> None:
    (tmp_path / "model.pt").write_bytes(b"the previous model")

    def disk_full(obj, handle, *args, **kwargs):
        handle.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    result = run(*SMALL, "-o", "model.pt")
    fails(result, r"cannot write 'model.pt': No space left on device", tmp_path, ("model.pt",))
    assert (tmp_path / "model.pt").read_bytes() == b"the previous model"


def test_pretrained_unavailable(tmp_path) -> None:
    result = run("torchvision:resnet18", "--weights", "pretrained", "-o", "model.pt")
    fails(result, r"pretrained weights for torchvision:resnet18 .* not in the local cache and "
                  r"download.pytorch.org cannot be reached", tmp_path)
