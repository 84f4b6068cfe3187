"""Model arguments on the command line: --num-classes, --drop-path, --in-chans, --model-arg.

In-process with CliRunner, offline, in an empty folder with empty caches (``cli_helpers``).
Each option reaches the model's constructor, the report and the checkpoint say so, and
``se_inject.load`` rebuilds the same model from the checkpoint alone.
"""

from __future__ import annotations

import ast

import pytest
import timm
import torch
from cli_helpers import _isolated, fails, ok, report, run  # noqa: F401 - _isolated is an autouse fixture

import se_inject
from se_inject.errors import ModelArgsError
from se_inject.io.signature import architecture_signature
from se_inject.workflow import inject_named

TIMM_SMALL = ["timm:resnet10t", "--weights", "random", "--input-size", "64"]


def _x(channels: int = 3) -> torch.Tensor:
    return torch.randn(2, channels, 64, 64, generator=torch.Generator().manual_seed(0))


def _se_count(model: torch.nn.Module) -> int:
    return sum(isinstance(m, se_inject.SEBlock) for m in model.modules())


def test_named_options_and_model_args_reach_the_constructor_report_and_checkpoint(tmp_path) -> None:
    args = ["--num-classes", "7", "--drop-path", "0.1", "--model-arg", "global_pool=max",
            "--model-arg", "drop_rate=0.25", "--model-arg", "act_layer='silu'"]
    data = report(*TIMM_SMALL, *args, "-o", "model.pt")
    expected = {"num_classes": 7, "drop_path_rate": 0.1, "global_pool": "max", "drop_rate": 0.25, "act_layer": "silu"}
    assert data["model_args"] == expected
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert ast.literal_eval(saved["model_args"]) == expected
    rebuilt = se_inject.load(tmp_path / "model.pt").eval()
    assert rebuilt.fc.out_features == 7 and rebuilt.global_pool.pool_type == "max" and rebuilt.drop_rate == 0.25
    reference = timm.create_model("resnet10t", **expected)
    assert architecture_signature(rebuilt) == architecture_signature(reference)
    # the same checkpoint on the model built by hand with those arguments: bit-exact
    by_hand = se_inject.load(tmp_path / "model.pt", base_model=reference).eval()
    assert torch.equal(rebuilt(_x()), by_hand(_x()))
    assert _se_count(rebuilt) == len(data["sites"]) > 0


def test_the_text_report_lists_the_model_arguments() -> None:
    result = run(*TIMM_SMALL, "--dry-run", "--num-classes", "0", "--model-arg", "global_pool=max")
    ok(result)
    assert "model arguments: num_classes=0, global_pool='max'" in result.stdout


def test_in_chans_1_gets_the_same_sites_as_3_channels_and_a_one_channel_checkpoint(tmp_path) -> None:
    three = report("timm:resnet10t", "--weights", "random", "--dry-run")
    one = report("timm:resnet10t", "--weights", "random", "--in-chans", "1", "-o", "model.pt")
    assert one["input_size"][0] == 1 and one["input_size"][1:] == three["input_size"][1:]
    assert len(one["sites"]) == len(three["sites"]) > 0
    assert [s["name"] for s in one["sites"]] == [s["name"] for s in three["sites"]]
    rebuilt = se_inject.load(tmp_path / "model.pt").eval()
    assert rebuilt.conv1[0].in_channels == 1
    assert rebuilt(_x(1)).shape == (2, 1000)


def test_a_key_the_model_rejects_is_one_line_exit_2(tmp_path) -> None:
    fails(run(*TIMM_SMALL, "--model-arg", "no_such_key=3", "-o", "model.pt"),
          r"Invalid value for '--model-arg': timm:resnet10t does not take the model arguments no_such_key=3 "
          r"\(TypeError: .*unexpected keyword argument 'no_such_key'\)$", tmp_path, code=2)


def test_a_value_the_model_refuses_is_one_line_exit_2(tmp_path) -> None:
    fails(run(*TIMM_SMALL, "--model-arg", "act_layer=no_such_act"),
          r"does not take the model arguments act_layer='no_such_act' \(KeyError", tmp_path, code=2)


def test_in_chans_and_drop_path_are_refused_for_torchvision(tmp_path) -> None:
    small = ["torchvision:resnet18", "--weights", "random", "--input-size", "64"]
    fails(run(*small, "--in-chans", "1"),
          r"Invalid value for '--in-chans': torchvision models take no input-channel argument", tmp_path, code=2)
    fails(run(*small, "--drop-path", "0.1"),
          r"torchvision models take no drop_path_rate .*stochastic_depth_prob", tmp_path, code=2)


def test_num_classes_reaches_a_torchvision_builder(tmp_path) -> None:
    data = report("torchvision:resnet18", "--weights", "random", "--input-size", "64", "--num-classes", "5",
                  "-o", "model.pt")
    assert data["model_args"] == {"num_classes": 5}
    assert se_inject.load(tmp_path / "model.pt").fc.out_features == 5


def test_bad_model_arg_texts_are_exit_2(tmp_path) -> None:
    fails(run(*TIMM_SMALL, "--model-arg", "drop_rate"), r"'--model-arg'.*give KEY=VALUE", tmp_path, code=2)
    fails(run(*TIMM_SMALL, "--model-arg", "1x=2"), r"'--model-arg'.*give KEY=VALUE", tmp_path, code=2)
    fails(run(*TIMM_SMALL, "--num-classes", "7", "--model-arg", "num_classes=8"),
          r"num_classes is given twice \(--num-classes and --model-arg num_classes=\.\.\.\)", tmp_path, code=2)
    fails(run(*TIMM_SMALL, "--drop-path", "1.5"), r"'--drop-path'.*must be a rate in \[0, 1\)", tmp_path, code=2)


def test_without_model_arguments_the_report_records_none() -> None:
    assert report(*TIMM_SMALL, "--dry-run")["model_args"] == {}


def test_a_fine_tuned_weights_file_records_its_class_count_with_the_other_arguments(tmp_path) -> None:
    torch.save(timm.create_model("resnet10t", num_classes=7, global_pool="max").state_dict(), tmp_path / "ft.pt")
    data = report(*TIMM_SMALL[:1], "--weights", "ft.pt", "--input-size", "64", "--model-arg", "global_pool=max",
                  "-o", "model.pt")
    assert data["model_args"] == {"global_pool": "max", "num_classes": 7}
    rebuilt = se_inject.load(tmp_path / "model.pt")
    assert rebuilt.fc.out_features == 7 and rebuilt.global_pool.pool_type == "max"


def test_a_value_the_model_takes_but_cannot_run_with_is_one_line_exit_2_and_nothing_written(tmp_path) -> None:
    """``drop_rate=0,2`` (a tuple) and ``drop_rate=O.2`` (a string) build a model whose forward
    raises: refused before anything is written, naming the argument (issue 31, item 3)."""
    (tmp_path / "model.pt").write_bytes(b"old")
    for text, shown in (("drop_rate=0,2", r"drop_rate=\(0, 2\)"), ("drop_rate=O.2", r"drop_rate='O\.2'")):
        fails(run(*TIMM_SMALL, "--model-arg", text, "-o", "model.pt"),
              rf"Invalid value for '--model-arg': timm:resnet10t built with {shown} cannot run its input "
              r"3x64x64 \((TypeError|ValueError): .*\); check the value$", tmp_path, keep=("model.pt",), code=2)
        assert (tmp_path / "model.pt").read_bytes() == b"old"
    fails(run(*TIMM_SMALL, "--model-arg", "drop_rate=O.2", "--dry-run"), r"built with drop_rate='O\.2'", tmp_path,
          keep=("model.pt",), code=2)


def test_inject_named_refuses_a_model_that_cannot_run_with_its_arguments(tmp_path) -> None:
    with pytest.raises(ModelArgsError, match=r"built with drop_rate=\(0, 2\) cannot run its input 3x64x64"):
        inject_named("timm:resnet10t", weights="random", input_size=(64,), model_args={"drop_rate": (0, 2)},
                     output=tmp_path / "model.pt")
    assert list(tmp_path.iterdir()) == []
