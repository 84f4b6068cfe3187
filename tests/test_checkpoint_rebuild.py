"""A checkpoint rebuilds the same model, or refuses: constructor arguments and architecture signatures.

timm models created with arguments that change no tensor (``global_pool='max'``,
``output_stride=16``, ``act_layer='silu'``, ``drop_rate``) or that change the modules
(``drop_path_rate``, ``num_classes=0``, ``features_only=True``): saved through se-inject (which
knows the arguments) they are rebuilt the same; saved from a model built elsewhere (timm keeps
no arguments) they are refused with a message that names ``base_model=``.
"""

from __future__ import annotations

import ast

import pytest
import timm
import torch
from torch import nn

import se_inject
from se_inject.errors import ArchitectureMismatchError, ModelArgsError
from se_inject.io.checkpoint import save
from se_inject.io.restore import load
from se_inject.io.signature import architecture_signature
from se_inject.models.arguments import parse_model_arg
from se_inject.models.input_size import model_input_size
from se_inject.models.names import resolve_name
from se_inject.models.weights import create_model
from se_inject.workflow import inject_named

NAME = "resnet10t"
SIDE = 64

CASES = [
    pytest.param({"global_pool": "max"}, id="global_pool"),
    pytest.param({"output_stride": 16}, id="output_stride"),
    pytest.param({"act_layer": "silu"}, id="act_layer"),
    pytest.param({"drop_rate": 0.25}, id="drop_rate"),
    pytest.param({"drop_path_rate": 0.1}, id="drop_path_rate"),
    pytest.param({"num_classes": 0}, id="num_classes_0"),
    pytest.param({"features_only": True}, id="features_only"),
]


def _x(channels: int = 3) -> torch.Tensor:
    return torch.randn(2, channels, SIDE, SIDE, generator=torch.Generator().manual_seed(0))


def _perturb(model: nn.Module) -> nn.Module:
    # An identity-start SE block passes any round trip trivially: move it away from identity.
    with torch.no_grad():
        for p in se_inject.se_parameters(model):
            p.add_(torch.randn_like(p) * 0.2)
    return model


def _outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    out = model.eval()(x)
    return list(out) if isinstance(out, (list, tuple)) else [out]


def _same(a: nn.Module, b: nn.Module, x: torch.Tensor) -> bool:
    return all(torch.equal(u, v) for u, v in zip(_outputs(a, x), _outputs(b, x), strict=True))


@pytest.mark.parametrize("kwargs", CASES)
def test_a_checkpoint_written_by_inject_named_rebuilds_the_model_created_with_its_arguments(tmp_path, kwargs) -> None:
    path = tmp_path / "m.pt"
    done = inject_named(f"timm:{NAME}", weights="random", input_size=(SIDE,), output=path, model_args=kwargs)
    injected = _perturb(done.model)
    se_inject.save(injected, path)  # the perturbed SE weights: the round trip must carry them
    data = torch.load(path, weights_only=True)
    assert ast.literal_eval(data["model_args"]) == kwargs  # a Python literal, read back the same
    rebuilt = load(path)
    reference = timm.create_model(NAME, **kwargs)
    assert architecture_signature(rebuilt) == architecture_signature(reference)
    assert _same(rebuilt, injected, _x())
    for key, value in kwargs.items():  # what timm keeps of the arguments came back
        if isinstance(getattr(reference, key, None), (bool, int, float, str)):
            assert getattr(rebuilt, key) == value
    assert _same_in_training(rebuilt, injected, _x())  # dropout and drop path too


def _same_in_training(a: nn.Module, b: nn.Module, x: torch.Tensor) -> bool:
    outs = []
    for model in (a, b):
        model.train()
        torch.manual_seed(1)
        out = model(x)
        outs.append(list(out) if isinstance(out, (list, tuple)) else [out])
    return all(torch.equal(u, v) for u, v in zip(*outs, strict=True))


@pytest.mark.parametrize("kwargs", CASES)
def test_a_model_built_outside_se_inject_with_unrecorded_arguments_is_refused_naming_base_model(
    tmp_path, kwargs
) -> None:
    model = timm.create_model(NAME, **kwargs).eval()
    injected = _perturb(se_inject.inject_se(model, example_input=_x()[:1]))
    path = save(injected, tmp_path / "m.pt")
    with pytest.raises(ArchitectureMismatchError, match=r"created with arguments the checkpoint does not record"
                       r".*different architecture \(module .*\)\. Rebuild the model as you created it and pass "
                       r"base_model="):
        load(path)
    again = load(path, base_model=timm.create_model(NAME, **kwargs))  # as the message says
    assert _same(again, injected, _x())


def test_the_refusal_says_what_differs(tmp_path) -> None:
    injected = se_inject.inject_se(timm.create_model(NAME, global_pool="max").eval(), example_input=_x()[:1])
    path = save(injected, tmp_path / "m.pt")
    with pytest.raises(ArchitectureMismatchError,
                       match=r"module 'global_pool' \(SelectAdaptivePool2d\) has pool_type='avg' rebuilt, "
                       r"pool_type='max' saved"):
        load(path)


def test_arguments_given_to_save_make_a_user_made_model_rebuildable(tmp_path) -> None:
    kwargs = {"act_layer": "silu", "drop_path_rate": 0.1}
    injected = _perturb(se_inject.inject_se(timm.create_model(NAME, **kwargs).eval(), example_input=_x()[:1]))
    path = save(injected, tmp_path / "m.pt", model_args=kwargs)
    assert _same(load(path), injected, _x())


def test_a_user_made_model_with_default_arguments_still_rebuilds(tmp_path) -> None:
    injected = _perturb(se_inject.inject_se(timm.create_model(NAME).eval(), example_input=_x()[:1]))
    assert _same(load(save(injected, tmp_path / "m.pt")), injected, _x())


def test_an_se_only_checkpoint_rebuilds_its_base_with_the_recorded_arguments(tmp_path) -> None:
    path = tmp_path / "se.pt"
    inject_named(f"timm:{NAME}", weights="random", input_size=(SIDE,), output=path, se_only=True,
                 model_args={"global_pool": "max", "drop_path_rate": 0.1})
    with pytest.warns(UserWarning, match="RANDOM weights"):
        rebuilt = load(path)
    assert rebuilt.global_pool.pool_type == "max"
    assert architecture_signature(rebuilt) == architecture_signature(
        timm.create_model(NAME, global_pool="max", drop_path_rate=0.1))


def test_the_signature_of_an_injected_model_is_that_of_its_base() -> None:
    base = timm.create_model(NAME, drop_path_rate=0.1).eval()
    before = architecture_signature(base)
    injected = se_inject.inject_se(base, example_input=_x()[:1])
    assert sum(isinstance(m, se_inject.SEBlock) for m in injected.modules()) > 0
    assert architecture_signature(injected) == before


# --- creation arguments: the constructor, the library's names, the analysis input ----------------


def test_a_key_the_constructor_rejects_is_a_model_args_error() -> None:
    with pytest.raises(ModelArgsError, match=r"timm:resnet10t does not take the model arguments no_such_key=1 "
                       r"\(TypeError: .*unexpected keyword argument 'no_such_key'\)"):
        create_model(resolve_name(f"timm:{NAME}"), args={"no_such_key": 1})


def test_torchvision_takes_num_classes_and_refuses_in_chans() -> None:
    spec = resolve_name("torchvision:resnet18")
    assert create_model(spec, args={"num_classes": 7}).fc.out_features == 7
    with pytest.raises(ModelArgsError, match="torchvision models take no input-channel argument"):
        create_model(spec, args={"in_chans": 1})


def test_a_one_channel_timm_model_is_analysed_on_one_channel() -> None:
    model = timm.create_model(NAME, in_chans=1)
    assert model.pretrained_cfg["input_size"][0] == 3  # what timm still says
    assert model_input_size(model) == (1, *model.pretrained_cfg["input_size"][1:])
    three = se_inject.inject_se(timm.create_model(NAME))
    one = se_inject.inject_se(model)  # no example input: the model's own size is used
    count = sum(isinstance(m, se_inject.SEBlock) for m in one.modules())
    assert count == sum(isinstance(m, se_inject.SEBlock) for m in three.modules()) > 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [("drop_rate=0.25", ("drop_rate", 0.25)), ("global_pool=max", ("global_pool", "max")),
     ("img_size=(64, 48)", ("img_size", (64, 48))), ("pretrained_strict=False", ("pretrained_strict", False)),
     ("act_layer='silu'", ("act_layer", "silu"))],
)
def test_model_arg_values_are_python_literals_else_strings(text: str, expected) -> None:
    assert parse_model_arg(text) == expected


# --- older files and recorded arguments that no longer build -----------------------------------


def _strip(path, *keys: str) -> None:
    data = torch.load(path, weights_only=True)
    for key in keys:
        data.pop(key)
    torch.save(data, path)


def test_a_file_without_signature_or_arguments_still_loads(tmp_path) -> None:
    injected = _perturb(se_inject.inject_se(timm.create_model(NAME).eval(), example_input=_x()[:1]))
    path = save(injected, tmp_path / "m.pt")
    _strip(path, "architecture", "model_args")  # as an older se-inject wrote it
    assert _same(load(path), injected, _x())


def test_a_missing_key_on_a_rebuilt_model_says_to_pass_base_model(tmp_path) -> None:
    injected = se_inject.inject_se(timm.create_model(NAME, num_classes=0).eval(), example_input=_x()[:1])
    path = save(injected, tmp_path / "m.pt")
    _strip(path, "architecture")  # no signature to refuse it by: the tensors do not fit
    with pytest.raises(se_inject.WeightsError, match=r"2 missing: fc\.weight, fc\.bias; if the model was created "
                       r"with other arguments, rebuild it so and pass base_model="):
        load(path)


def test_recorded_arguments_the_model_no_longer_takes_are_refused_naming_base_model(tmp_path) -> None:
    path = tmp_path / "m.pt"
    inject_named(f"timm:{NAME}", weights="random", input_size=(SIDE,), output=path, model_args={"drop_rate": 0.1})
    data = torch.load(path, weights_only=True)
    data["model_args"] = repr({"drop_rate": 0.1, "gone_in_this_version": 1})
    torch.save(data, path)
    with pytest.raises(se_inject.CheckpointError, match=r"created with drop_rate=0\.1, gone_in_this_version=1, "
                       r"which cannot be rebuilt here .*pass base_model="):
        load(path)
