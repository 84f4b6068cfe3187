"""Issue 6 from the command line: placements, stage and resolution selection, squeeze and
excitation options, plain networks, token sequences, the by-stage report, the plot and a JSON
report that two runs print byte for byte.

In-process CliRunner runs on torchvision's resnet18 at 64x64 with random weights; resnet50 for
the paper's Table 13 numbers, vgg11 for --plain and vit_b_16 for --tokens (one run each).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from cli_helpers import SMALL, _isolated, fails, ok, report, run  # noqa: F401 - _isolated is an autouse fixture

import se_inject
from se_inject.cli import _no_sites_message
from se_inject.plan import Plan, Skipped, SkipReason

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"




def site(data: dict, name: str) -> dict:
    return next(s for s in data["sites"] if s["name"] == name)


# --- the paper's stage ablation ------------------------------------------------------------


@pytest.mark.parametrize(
    ("stage", "added"),
    [(0, 24_576), (1, 131_072), (2, 786_432), (3, 1_572_864), (None, 2_514_944)],
    ids=["layer1", "layer2", "layer3", "layer4", "all"],
)
def test_resnet50_stage_ablation_reproduces_table_13(stage: int | None, added: int) -> None:
    # docs/se-paper.md: (2 / r) * N_s * C_s^2 without biases, r = 16; torchvision's layer1..layer4 are
    # the paper's conv2_x..conv5_x (N = 3, 4, 6, 3; C = 256, 512, 1024, 2048):
    # 2/16 * 3 * 256^2 = 24,576; 4 * 512^2 / 8 = 131,072; 6 * 1024^2 / 8 = 786,432;
    # 3 * 2048^2 / 8 = 1,572,864; all four 2,514,944.
    chosen = [] if stage is None else ["--stage", str(stage)]
    data = report("torchvision:resnet50", "--weights", "random", "--dry-run", "--no-bias", *chosen)
    assert data["params"]["added"] == added
    assert data["macs"]["added"] == added  # without biases, one multiply-add per FC weight
    assert data["selection"]["stages"] == (None if stage is None else [stage])
    if stage is None:
        assert [(row["stage"], row["sites"], row["params"]) for row in data["by_stage"]] == [
            (0, 3, 24_576), (1, 4, 131_072), (2, 6, 786_432), (3, 3, 1_572_864)
        ]
        assert [row["spatial"] for row in data["by_stage"]] == [[56, 56], [28, 28], [14, 14], [7, 7]]
    else:
        assert {s["name"].split(".")[0] for s in data["sites"]} == {f"layer{stage + 1}"}
        assert {s["stage"] for s in data["sites"]} == {stage}
        assert {s["reason"] for s in data["skipped"]} == {"excluded"}


# --- where each variant puts the block, and identity at insertion -------------------------


@pytest.mark.parametrize(
    ("options", "source", "targets", "channels"),
    [
        # pre: the block's input after the fork; the downsample shortcut still reads it unscaled
        (["--placement", "pre"], "layer2.0.<input0>", ["layer2.0.conv1"], 64),
        # inner: after the last spatial conv (conv2) and its norm; in a BasicBlock that is bn2
        (["--placement", "inner", "--pool", "max", "--gate", "one_plus_tanh"], "layer2.0.bn2", ["layer2.0.add"], 128),
        # standard, with a fixed hidden width instead of a ratio
        (["--hidden", "12"], "layer2.0.bn2", ["layer2.0.add"], 128),
    ],
    ids=["pre", "inner-max-tanh", "standard-hidden"],
)
def test_variant_places_blocks_and_starts_as_identity(tmp_path, options, source, targets, channels) -> None:
    data = report(*SMALL, *options, "-o", "model.pt")
    block = site(data, "layer2.0.se")
    assert (block["source"], block["targets"], block["channels"]) == (source, targets, channels)
    assert len(data["sites"]) == 8
    config = data["config"]
    assert config["placement"] == (options[1] if options[0] == "--placement" else "standard")
    if "--hidden" in options:
        assert config["hidden"] == 12 and {s["hidden"] for s in data["sites"]} == {12}
    else:
        assert config["hidden"] is None
    if "--pool" in options:
        assert (config["pool"], config["gate"]) == ("max", "one_plus_tanh")
    # parameter deltas: the measured total is the sum of 2 C h + h + C over the sites
    assert data["params"]["added"] == sum(2 * s["channels"] * s["hidden"] + s["hidden"] + s["channels"]
                                          for s in data["sites"])

    # Identity at insertion: the checkpoint rebuilt, against resnet18 with the file's base tensors.
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    model = se_inject.load(tmp_path / "model.pt").eval()
    base = torchvision.models.resnet18().eval()
    base.load_state_dict({k: saved["state_dict"][k] for k in base.state_dict()})
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), base(x))
    blocks = [m for m in model.modules() if isinstance(m, se_inject.SEBlock)]
    assert len(blocks) == 8 and {b.pool_name for b in blocks} == {config["pool"]}


def test_inception_model_with_squeeze_and_excitation_options() -> None:
    # SqueezeNet's Fire modules are small Inception sites: the block follows the concatenation;
    # "inner" is a residual-branch variant, so an Inception site keeps its standard place.
    data = report("squeezenet1_1", "--weights", "random", "--input-size", "64", "--dry-run",
                  "--placement", "inner", "--hidden", "8", "--pool", "max", "--paper-init", "--gate", "tanh")
    assert len(data["sites"]) == 8 and {s["kind"] for s in data["sites"]} == {"inception"}
    assert all(s["node"].endswith(".cat") and s["source"] == s["node"] for s in data["sites"])
    assert {k: data["config"][k] for k in ("placement", "hidden", "pool", "gate", "identity_init")} == {
        "placement": "inner", "hidden": 8, "pool": "max", "gate": "tanh", "identity_init": False
    }
    assert all(s["params"] == 2 * s["channels"] * 8 + 8 + s["channels"] for s in data["sites"])
    assert data["params"]["added"] == sum(s["params"] for s in data["sites"])


# --- refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize(("placement", "variant"), [("post", "SE-POST"), ("identity", "SE-Identity")])
def test_trunk_placements_are_refused(tmp_path, placement: str, variant: str) -> None:
    result = run(*SMALL, "--placement", placement, "-o", "model.pt", "--plot", "plan.png")
    fails(result, rf"Invalid value for '--placement': '{placement}' scales the trunk \({variant} .*\); se-inject only "
                  r"scales residual branches.*Use one of: standard, pre, inner", tmp_path, code=2)
    assert "building" not in result.stderr  # refused before any model is built


@pytest.mark.parametrize(
    ("options", "message", "code"),
    [
        (["--gate", "tanh"], r"Invalid value for '--gate': tanh is not 1 at z = 0.*add --paper-init.*"
                             r"scaled_sigmoid, one_plus_tanh", 2),
        (["--gate", "softmax"], r"'--gate': 'softmax' is not one of scaled_sigmoid, one_plus_tanh, sigmoid, tanh", 2),
        (["--pool", "min"], r"'--pool': 'min' is not one of avg, max", 2),
        (["--placement", "middle"], r"'--placement': 'middle' is not one of standard, pre, inner", 2),
        (["-r", "8", "--hidden", "4"], r"Invalid value for '--reduction' / '--hidden': give one, not both", 2),
        (["--plot", "plan.jpg"], r"Invalid value for '--plot': 'plan.jpg': the chart is a PNG", 2),
        (["--plot", "missing/plan.png"], r"cannot write 'missing/plan.png': folder 'missing' does not exist", 1),
        (["-o", "same.png", "--plot", "same.png"], r"--plot and --output name the same file", 2),
    ],
    ids=["gate-needs-paper-init", "unknown-gate", "unknown-pool", "unknown-placement", "reduction-and-hidden",
         "plot-not-png", "plot-missing-folder", "plot-is-output"],
)
def test_bad_variant_options_before_building(tmp_path, options: list[str], message: str, code: int) -> None:
    result = run(*SMALL, "-o", "model.pt", *options)
    fails(result, message, tmp_path, code=code)
    assert "building" not in result.stderr


def test_stage_and_resolution_that_match_no_site(tmp_path) -> None:
    fails(run(*SMALL, "--stage", "1", "--stage", "7", "-o", "model.pt"),
          r"--stage 7: ResNet has 4 stages .*: 0 \(16x16\), 1 \(8x8\), 2 \(4x4\), "
          r"3 \(2x2\)$", tmp_path)
    fails(run(*SMALL, "--resolution", "32", "-o", "model.pt"),
          r"--resolution 32: .* at resolutions 16, 8, 4, 2 ", tmp_path)


def test_plot_without_matplotlib_is_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    fails(run(*SMALL, "--plot", "plan.png"), r"--plot needs matplotlib, which is not installed", tmp_path)


def test_no_site_messages_point_at_the_opt_in_flags() -> None:
    plain = _no_sites_message("torchvision:vgg11", Plan((), ()))
    assert "add --plain" in plain and plain.endswith("Nothing was written.")
    assert "even --plain found no" in _no_sites_message("torchvision:vgg11", Plan((), ()), plain=True)
    tokens = Plan((), (Skipped("encoder.layers.encoder_layer_0.add", SkipReason.TOKEN_SEQUENCE),))
    assert "add --tokens" in _no_sites_message("torchvision:vit_b_16", tokens)
    linear = Plan((), (Skipped("stages.0.0.add", SkipReason.LINEAR_BLOCK),))
    assert "add --plain (SE after each re-parameterisable block" in _no_sites_message("timm:repvgg_a0", linear)


# --- plain networks and token sequences --------------------------------------------------


def test_plain_network_vgg11() -> None:
    data = report("torchvision:vgg11", "--weights", "random", "--input-size", "64", "--dry-run", "--plain")
    assert len(data["sites"]) == 8 and {s["kind"] for s in data["sites"]} == {"plain"}
    assert data["selection"]["plain"] is True
    # eight convolutions, one block after each one's ReLU; stages follow the max-pools
    assert site(data, "features.se_1")["source"] == "features.1"
    assert [(row["stage"], row["sites"]) for row in data["by_stage"]] == [(0, 1), (1, 1), (2, 2), (3, 2), (4, 2)]
    assert data["params"]["added"] == sum(s["params"] for s in data["sites"])


def test_tokens_on_a_vision_transformer() -> None:
    data = report("torchvision:vit_b_16", "--weights", "random", "--dry-run", "--tokens")
    assert len(data["sites"]) == 24  # attention and MLP branch of each of the 12 encoder layers
    assert {(s["channel_axis"], s["prefix_tokens"], s["channels"]) for s in data["sites"]} == {(-1, 1, 768)}
    assert {tuple(s["spatial"]) for s in data["sites"]} == {(197,)}  # 196 patches + the class token
    assert site(data, "encoder.layers.encoder_layer_0.se_getitem")["kind"] == "residual"
    assert data["selection"]["tokens"] is True
    # the table shows the tokens left out of the squeeze; one stage, 197 tokens
    result = run("torchvision:vit_b_16", "--weights", "random", "--dry-run", "--tokens", "--stage", "0")
    ok(result)
    header = next(line for line in result.stdout.splitlines() if "module" in line)
    assert [cell.strip() for cell in header.split("┃")[1:-1]] == [
        "stage", "size", "module", "kind", "channels", "hidden", "axis", "prefix", "params"
    ]
    row = next(line for line in result.stdout.splitlines() if "encoder_layer_0.se_getitem " in line)
    assert [cell.strip() for cell in row.split("│")[1:-1]] == [
        "0", "197", "encoder.layers.encoder_layer_0.se_getitem", "residual", "768", "48", "-1", "1", "74,544"
    ]  # 2 * 768 * 48 + 48 + 768


# --- the report, the JSON and the plot ------------------------------------------------------


def test_report_groups_sites_by_stage() -> None:
    result = run(*SMALL, "--plain")  # --plain is ignored for a residual network, with a warning
    ok(result)
    assert "--plain has no effect on torchvision:resnet18" in result.stderr
    out = result.stdout
    assert "SE: reduction 16, hidden >= 8, with biases, gate scaled_sigmoid, identity start, avg pool, " \
           "placement standard" in out
    assert "selection: plain" in out
    table = out.split("SE sites (8)", 1)[1].split("SE per stage", 1)[0]
    rows = [line for line in table.splitlines() if ".se " in line]
    # the stage and its size head each group of two blocks; sections divide the groups
    heads = [re.match(r"│\s+(\d*)\s+│\s+(\S*)\s+│\s+(\S+)", line).groups() for line in rows]
    assert heads == [
        ("0", "16x16", "layer1.0.se"), ("", "", "layer1.1.se"), ("1", "8x8", "layer2.0.se"), ("", "", "layer2.1.se"),
        ("2", "4x4", "layer3.0.se"), ("", "", "layer3.1.se"), ("3", "2x2", "layer4.0.se"), ("", "", "layer4.1.se"),
    ]
    assert table.count("├") == 3
    per_stage = out.split("SE per stage", 1)[1].split("Totals", 1)[0]
    stage_rows = [line.split("│")[1:-1] for line in per_stage.splitlines() if line.startswith("│")]
    # 2 blocks per stage; 2 C h + h + C with C = 64, 128, 256, 512 and h = max(C // 16, 8)
    assert [[cell.strip() for cell in row[:4]] for row in stage_rows] == [
        ["0", "16x16", "2", "2,192"], ["1", "8x8", "2", "4,368"], ["2", "4x4", "2", "16,928"],
        ["3", "2x2", "2", "66,624"],
    ]


def test_json_is_byte_identical_sorted_and_names_the_options() -> None:
    args = [*SMALL, "--dry-run", "--json", "--placement", "pre", "--resolution", "8", "--pool", "max"]
    first, second = run(*args), run(*args)
    ok(first)
    ok(second)
    assert first.stdout_bytes == second.stdout_bytes
    data = json.loads(first.stdout)
    assert first.stdout == json.dumps(data, indent=2, sort_keys=True) + "\n"
    assert {k: data["config"][k] for k in ("placement", "pool", "gate", "reduction", "hidden")} == {
        "placement": "pre", "pool": "max", "gate": "scaled_sigmoid", "reduction": 16, "hidden": None
    }
    assert data["selection"] == {
        "include": None, "exclude": None, "min_channels": 0, "stages": None, "resolutions": [8],
        "plain": False, "tokens": False,
    }
    # pre scales each block's input, but stages and resolutions are those of the blocks themselves
    # (as under the standard placement): layer2's two blocks work at 8x8
    assert [(s["name"], s["stage"], s["spatial"]) for s in data["sites"]] == [
        ("layer2.0.se", 1, [8, 8]), ("layer2.1.se", 1, [8, 8])
    ]
    assert not re.search(r'"\w*(time|elapsed|seconds|date)\w*"', first.stdout)


def test_plot_is_a_png_written_atomically(tmp_path, monkeypatch) -> None:
    # reason: --plot imports se_inject.report.plot, which binds it on the package; put the package back
    # as it was, so test_public_api still sees only the names se_inject exports.
    monkeypatch.setattr(se_inject, "plot", getattr(se_inject, "plot", None), raising=False)
    result = run(*SMALL, "--dry-run", "--plot", "plan.png")
    ok(result)
    assert "wrote plan.png (plot: SE blocks and parameters per stage)" in result.stdout
    assert "dry run: no model written" in result.stdout
    png = tmp_path / "plan.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.png"]

    # A write that fails midway leaves the previous chart and no temporary file.
    from matplotlib.figure import Figure

    def disk_full(self, handle, *args, **kwargs):
        handle.write(b"half a png")
        raise OSError(28, "No space left on device")

    previous = png.read_bytes()
    monkeypatch.setattr(Figure, "savefig", disk_full)
    fails(run(*SMALL, "--dry-run", "--plot", "plan.png"), r"cannot write 'plan.png': No space left on device",
          tmp_path, ("plan.png",))
    assert png.read_bytes() == previous


def test_matplotlib_is_imported_only_for_plot() -> None:
    # Module-level imports of every se_inject module (an AST check: a fresh interpreter costs more
    # than the rest of this file): neither matplotlib nor se_inject.report.plot is among them.
    import ast

    package = Path(se_inject.__file__).parent
    for path in package.rglob("*.py"):
        tree = ast.parse(path.read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = {a.name for n in top if isinstance(n, ast.Import) for a in n.names}
        names |= {("." * n.level) + (n.module or "") for n in top if isinstance(n, ast.ImportFrom)}
        names |= {f".{a.name}" for n in top if isinstance(n, ast.ImportFrom) and n.level and not n.module
                  for a in n.names}
        plot_module = {m for m in names if m.lstrip(".").split(".")[-1] == "plot"}  # .plot, .report.plot, ...
        assert not {m for m in names if m.split(".")[0] == "matplotlib"} | plot_module, path
    plot_source = (package / "report" / "plot.py").read_text()
    assert "from matplotlib" in plot_source  # inside plot_stages only, as checked above
