"""Model constructor arguments: ``--model-arg KEY=VALUE`` parsing, per-library names, and the
literal text a checkpoint records them as.

timm users create models with keyword arguments (``num_classes``, ``drop_path_rate``,
``in_chans``, ``global_pool``, ...). They go to ``timm.create_model`` as given; torchvision
builders take ``num_classes`` too, but have no input-channel argument (refused here, not
ignored) and call timm's ``drop_path_rate`` ``stochastic_depth_prob`` where they have one.

A checkpoint records the arguments as the text of a Python literal (``repr`` of the dict), so
tuples stay tuples and ``torch.load(weights_only=True)`` reads it; arguments that are no
literals (a class object, a function) cannot be recorded (:func:`args_literal` returns None).
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from typing import Any

from ..errors import ModelArgsError

__all__ = ["parse_model_arg", "library_kwargs", "args_literal", "args_from_literal", "args_text"]


def parse_model_arg(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` -> ``(KEY, value)``: the value as a Python literal, else the plain string.

    Example:
        >>> parse_model_arg("drop_rate=0.1"), parse_model_arg("global_pool=max")
        (('drop_rate', 0.1), ('global_pool', 'max'))

    Raises:
        ModelArgsError: no ``=``, or the key is not a Python identifier.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise ModelArgsError(f"{text!r}: give KEY=VALUE, KEY a keyword argument name such as drop_rate")
    raw = raw.strip()
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        value = raw
    return key, value


def library_kwargs(source: str, args: Mapping[str, Any]) -> dict[str, Any]:
    """``args`` in the names the library's constructor takes (``source``: ``"timm"`` or ``"torchvision"``).

    Raises:
        ModelArgsError: ``in_chans`` or ``drop_path_rate`` for torchvision, which has neither.
    """
    kwargs = dict(args)
    if source != "torchvision":
        return kwargs
    if "in_chans" in kwargs:
        raise ModelArgsError(
            f"torchvision models take no input-channel argument (in_chans={kwargs['in_chans']!r}); "
            "use the timm model of that name, or build it yourself and call se_inject.inject_se"
        )
    if "drop_path_rate" in kwargs:
        raise ModelArgsError(
            f"torchvision models take no drop_path_rate (got {kwargs['drop_path_rate']!r}); where the builder "
            "has stochastic depth, give --model-arg stochastic_depth_prob=R"
        )
    return kwargs


def args_literal(args: Mapping[str, Any]) -> str | None:
    """The text of ``args`` as a Python literal, or ``None`` when a value is not one (it could not
    be read back the same)."""
    text = repr(dict(args))
    try:
        same = ast.literal_eval(text) == dict(args)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    return text if same else None


def args_from_literal(text: str) -> dict[str, Any]:
    """What :func:`args_literal` wrote, as a dict.

    Raises:
        ValueError: not the text of a dict literal with string keys.
    """
    value = ast.literal_eval(text)
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"not a dict of keyword arguments: {text!r}")
    return value


def args_text(args: Mapping[str, Any]) -> str:
    """``key=value, ...`` for the report (``defaults`` when there are none)."""
    return ", ".join(f"{k}={v!r}" for k, v in args.items()) or "defaults"
