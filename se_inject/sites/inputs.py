"""The analysis input: the model's own calling convention, what the plan says was run, and a
clear refusal when it does not fit the model at all.

A ``tuple`` is the positional arguments (``(sample, timestep)``); any other value, a tensor, a
list of images (torchvision's detectors) or a dict of tensors, is the one argument.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, InputError
from ..models.input_size import example_input as _default_example_input
from ..plan import Unanalysed
from .records import Unit

__all__ = ["example_args", "describe_input", "check_input_fits", "NOT_REACHED"]

#: Why a module holding weights was not analysed when the forward pass never called it.
NOT_REACHED = "not reached by the forward pass on the example input"


def example_args(model: nn.Module, example_input: Any = None) -> tuple[Any, ...]:
    """The positional arguments to analyse with: the user's (a tuple is the arguments, anything
    else the one argument), else an empty tensor of the model's declared input size
    (``input_size.model_input_size``), batch 2; only shapes matter.

    Raises:
        ConfigError: no input was given and the model does not say what it reads.
    """
    if example_input is not None:
        return example_input if isinstance(example_input, tuple) else (example_input,)
    built = _default_example_input(model)
    if built is None:
        raise ConfigError(f"cannot guess an input for {type(model).__name__}; pass example_input=torch.randn(...)")
    return (built,)


def describe_input(args: Sequence[Any]) -> str:
    """What the analysis ran, in one line: ``Tensor[2, 3, 224, 224]``, ``list[Tensor[3, 64, 64]]``,
    ``(Tensor[1, 4, 32, 32], Tensor[1])``."""
    parts = [_describe(a) for a in args]
    return parts[0] if len(parts) == 1 else f"({', '.join(parts)})"


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"Tensor[{', '.join(str(s) for s in value.shape)}]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k!r}: {_describe(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        inner = [_describe(v) for v in value]
        if len(set(inner)) == 1 and len(inner) > 1:
            return f"{type(value).__name__}[{len(inner)} x {inner[0]}]"
        return f"{type(value).__name__}[{', '.join(inner)}]"
    return type(value).__name__


def check_input_fits(model: nn.Module, args: Sequence[Any], units: Sequence[Unit], unanalysed: Sequence[Unanalysed], given: bool) -> None:
    """Refuse an input the model fails on before any of its parts ran, when the model's first
    layer says why (another channel count, no batch dimension): no site could ever be found,
    and a plan with none would hide the cause. A model that fails for other reasons (its code
    does not trace) is left to the plan's unanalysed list.

    Raises:
        InputError: naming the input, the model's error and what its first layer expects.
    """
    if units or not unanalysed or unanalysed[0].path != "":
        return
    if any(not u.reason.startswith(NOT_REACHED) for u in unanalysed[1:]):
        return  # some part ran (and failed on its own): the input reached the model
    mismatch = _first_layer_mismatch(model, args)
    if mismatch is None:
        return
    what = "example_input" if given else "the default analysis input"
    fix = "" if given else "; pass example_input= in the model's own input format"
    raise InputError(
        f"{what} {describe_input(args)} does not fit {type(model).__name__}: {mismatch} "
        f"(the model failed with {unanalysed[0].reason}){fix}"
    )


def _first_layer_mismatch(model: nn.Module, args: Sequence[Any]) -> str | None:
    """What the first convolution (in module order) expects that a tensor input lacks."""
    x = args[0] if len(args) == 1 and isinstance(args[0], torch.Tensor) else None
    name, first = next(((n, m) for n, m in model.named_modules() if isinstance(m, _CONVS)), ("", None))
    if x is None or first is None:
        return None
    dims = 3 if isinstance(first, nn.Conv1d) else 4 if isinstance(first, nn.Conv2d) else 5
    layer = f"its first layer {name} ({type(first).__name__}) takes {dims}-D batches of {first.in_channels} channels"
    if x.dim() == dims - 1 and x.shape[0] == first.in_channels:
        shape = ", ".join(map(str, x.shape))
        return f"{layer}; the input has no batch dimension: give a batch of shape [N, {shape}], or a list of images if the model takes one"
    if x.dim() == dims and x.shape[1] != first.in_channels:
        return f"{layer}; the input has {x.shape[1]}"
    return None


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
