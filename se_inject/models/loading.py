"""A registry name and a weights choice -> a model: the one entry point over names, weights and files.

:func:`load_model` resolves the name (:mod:`se_inject.models.names`), then builds the model with the
requested weights:

* ``"random"``: the library's random initialisation; nothing is downloaded.
* ``"pretrained"``: the library's default pretrained weights, cached or downloaded
  (:mod:`se_inject.models.weights`); :class:`~se_inject.errors.WeightsError` if neither works.
* ``"auto"`` (the default): ``"pretrained"`` if possible, else random init with a warning.
* anything else is a path to a local state dict (``.pt`` / ``.pth`` read with
  ``torch.load(weights_only=True)``, ``.safetensors`` through safetensors; :mod:`se_inject.models.weight_files`),
  loaded strictly into a model whose classifier fits it.

:func:`default_input_size` is the input analysis and counts use when none is given.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, ModelArgsError, WeightsError
from .input_size import DEFAULT_SIDE, model_input_size
from .names import ModelSpec, origin_args, resolve_name
from .weight_files import WeightsFile, load_strict, read_weights_file
from .weights import Network, WeightsInfo, WeightsKind, create_model, create_pretrained

__all__ = [
    "LoadedModel",
    "load_model",
    "create_model_for_state",
    "default_input_size",
]


@dataclass(frozen=True)
class LoadedModel:
    """What :func:`load_model` returns."""

    model: nn.Module
    spec: ModelSpec
    weights: WeightsInfo
    #: The constructor arguments the model was built with (a fine-tuned file's ``num_classes`` too).
    args: dict[str, Any] = field(default_factory=dict)


def default_input_size(spec: ModelSpec, model: nn.Module | None = None) -> tuple[int, ...]:
    """Input size (without batch) used for analysis and to count multiply-adds.

    The library's one rule (:func:`se_inject.models.input_size.model_input_size`: timm's
    ``pretrained_cfg``, a transformers config, the crop of torchvision's default weights, else
    224 px) applied to ``model``, or to the named model built on the meta device.

    Example:
        >>> default_input_size(resolve_name("torchvision:inception_v3"))
        (3, 299, 299)
    """
    if model is None:
        with torch.device("meta"):  # only the architecture matters: nothing is allocated
            model = create_model(spec)
    return model_input_size(model) or (3, DEFAULT_SIDE, DEFAULT_SIDE)


def _classifier_width(model: nn.Module, state: Mapping[str, torch.Tensor]) -> int | None:
    """The class count of ``state`` when only its classifier layers differ from ``model``'s.

    Fine-tuned checkpoints usually differ from the registry model in the number of classes
    only; every ``nn.Linear`` whose shapes differ must differ in its output width alone.
    """
    own = model.state_dict()
    wrong = {k for k, v in own.items() if k in state and tuple(state[k].shape) != tuple(v.shape)}
    if not wrong:
        return None
    modules = dict(model.named_modules())
    widths = set()
    for prefix in {k.rsplit(".", 1)[0] for k in wrong}:
        layer = modules.get(prefix)
        weight = state.get(f"{prefix}.weight")
        if not isinstance(layer, nn.Linear) or weight is None or weight.ndim != 2:
            return None
        if weight.shape[1] != layer.in_features:
            return None
        widths.add(int(weight.shape[0]))
    return widths.pop() if len(widths) == 1 else None


def create_model_for_state(
    spec: ModelSpec, state: Mapping[str, torch.Tensor], args: Mapping[str, Any] | None = None
) -> nn.Module:
    """Random-init ``spec`` (with constructor ``args``) whose classifier width fits ``state``
    (fine-tuned checkpoints); a ``num_classes`` in ``args`` is kept as given.

    Nothing is loaded and nothing is downloaded; keys that do not fit are left for
    :func:`~se_inject.models.weight_files.load_strict` to report.

    Example:
        >>> state = torchvision.models.resnet18(num_classes=10).state_dict()
        >>> create_model_for_state(resolve_name("torchvision:resnet18"), state).fc.out_features
        10
    """
    args = dict(args or {})
    model = create_model(spec, args=args)
    width = None if "num_classes" in args else _classifier_width(model, state)
    if width is not None:
        try:
            model = create_model(spec, args={**args, "num_classes": width})
        except (TypeError, ValueError, ModelArgsError):  # a builder without num_classes: report the shapes instead
            pass
    return model


def _file_detail(weights: str | os.PathLike[str], read: WeightsFile, requested_ema: bool) -> str:
    """Which of the file's state dicts was loaded, in words for the report."""
    if read.key is None:
        return f"file {weights}"
    if read.ema:
        alone = "" if requested_ema else ", the only weights it holds"
        return f"file {weights} (EMA weights {read.key!r}{alone})"
    if read.ema_key is not None:
        return (f"file {weights} (plain weights {read.key!r}; it also holds EMA weights {read.ema_key!r}: "
                "--weights-ema loads those)")
    return f"file {weights} ({read.key!r})"


def load_model(
    name: str,
    weights: str | os.PathLike[str] = "auto",
    *,
    network: Network | None = None,
    ema: bool = False,
    model_args: Mapping[str, Any] | None = None,
) -> LoadedModel:
    """Resolve ``name`` and build the model with the requested weights.

    Args:
        name: ``timm:NAME``, ``torchvision:NAME`` or a bare ``NAME`` (timm first).
        weights: ``"auto"``, ``"pretrained"``, ``"random"`` or a path to a state dict file.
            ``"auto"`` falls back to random init with a :class:`UserWarning` when pretrained
            weights cannot be had; the returned :class:`WeightsInfo` says so too.
        network: how pretrained weights are looked for (:data:`~se_inject.models.weights.OFFLINE`:
            caches only); the default honours ``SE_INJECT_OFFLINE``.
        ema: read a training checkpoint's EMA weights (``state_dict_ema``) rather than its
            plain ones; the returned :class:`WeightsInfo` names the state dict read either way.
        model_args: keyword arguments for the model's constructor (``timm.create_model``
            kwargs such as ``num_classes``, ``drop_path_rate``, ``in_chans``; a torchvision
            builder's); the model and :attr:`LoadedModel.args` record them.

    Example:
        >>> loaded = load_model("torchvision:resnet18", weights="random")
        >>> loaded.weights.kind
        <WeightsKind.RANDOM: 'random'>

    Raises:
        UnknownModelError: the name is in neither registry.
        WeightsError: pretrained weights cannot be had (``"pretrained"``), or the file is
            missing, corrupt or does not fit the architecture.
        UnsafeCheckpointError: the weights file would run code when unpickled.
        ConfigError: ``ema`` without a weights file.
        ModelArgsError: the constructor does not take ``model_args``.
    """
    if ema and weights in ("auto", "pretrained", "random"):
        raise ConfigError(f"EMA weights are read from a training checkpoint file; weights={weights!r} is none")
    spec = resolve_name(name)
    args = dict(model_args or {})
    if weights == "random":
        info = WeightsInfo(WeightsKind.RANDOM, "random init (by request)")
        return _loaded(create_model(spec, network=network, args=args), spec, info)
    if weights in ("auto", "pretrained"):
        try:
            model, info = create_pretrained(spec, network=network, args=args)
        except WeightsError as e:
            if weights == "pretrained":
                raise
            model = create_model(spec, network=network, args=args)  # first: a hub model may not even build
            warnings.warn(f"{e}; using RANDOM init instead", UserWarning, stacklevel=2)
            info = WeightsInfo(WeightsKind.RANDOM, f"random init (pretrained unavailable: {e})")
            return _loaded(model, spec, info)
        return _loaded(model, spec, info)
    read = read_weights_file(weights, ema=ema)
    model = create_model_for_state(spec, read.state, args)
    load_strict(model, read.state, f"weights file {str(weights)!r}")
    return _loaded(model, spec, WeightsInfo(WeightsKind.FILE, _file_detail(weights, read, ema)))


def _loaded(model: nn.Module, spec: ModelSpec, info: WeightsInfo) -> LoadedModel:
    return LoadedModel(model, spec, info, origin_args(model) or {})
