"""Checkpoints back in: read one (``weights_only``, format checked), rebuild its base model, replay its plan.

:func:`load` replays the saved plan through ``inject.build``, as :func:`~se_inject.apply_plan` does (no graph analysis) on a
base model rebuilt from the recorded registry name and constructor arguments with random init
(nothing is downloaded), or on the ``base_model`` you pass, then loads the saved tensors
strictly. A rebuilt base that differs from the recorded architecture signature is refused
(:class:`~se_inject.errors.ArchitectureMismatchError`); a base that cannot be rebuilt from the
record is refused with a message that names ``base_model=``. The format is described in
:mod:`se_inject.io.checkpoint`.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import (
    ArchitectureMismatchError,
    CheckpointError,
    ModelArgsError,
    UnknownModelError,
    WeightsError,
)
from ..inject.build import build
from ..inject.rewrite import remove_se
from ..models.arguments import args_from_literal, args_text
from ..models.loading import create_model_for_state
from ..models.names import ModelSpec, Source, model_origin, origin_args, resolve_name, tag_origin
from ..models.weight_files import key_problems, load_strict, read_pickle
from ..models.weights import WeightsKind, create_model, pretrained_from_cache
from ..plan import Plan
from .checkpoint import FORMAT, FORMAT_VERSION, base_fingerprint, se_state_dict
from .signature import signature_difference

__all__ = ["load", "read_checkpoint", "check_plan_fits_tensors"]


def _base_differences(saved: Mapping[str, Any], base: nn.Module) -> str | None:
    """Why ``base`` is not the base recorded in a checkpoint, or ``None`` when it is (or nothing was recorded)."""
    recorded = saved.get("base")
    if not isinstance(recorded, Mapping) or "digest" not in recorded:
        return None  # written by an older se-inject
    own = base_fingerprint(base)
    if own["digest"] == recorded["digest"]:
        return None
    model = saved.get("model")
    name = f"{model['source']}:{model['name']}" if isinstance(model, Mapping) else "a custom model"
    origin = model_origin(base)
    this = f"this {origin}" if origin is not None else f"this {type(base).__name__}"
    return (
        f"was saved on {name} ({recorded.get('params', 0):,} parameters); {this} has {own['params']:,} parameters "
        "and other layers"
    )


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate an se-inject checkpoint as plain data (nothing is built).

    Example:
        >>> read_checkpoint("model.pt")["model"]
        {'source': 'timm', 'name': 'resnet50'}

    Raises:
        CheckpointError: missing, corrupt, not an se-inject checkpoint, or a newer format.
        UnsafeCheckpointError: the file would run code when unpickled (refused).
    """
    data = read_pickle(path, what="checkpoint", error=CheckpointError)
    where = repr(str(path))
    if not isinstance(data, Mapping) or data.get("format") != FORMAT:
        hint = ""
        if isinstance(data, Mapping) and data and all(isinstance(v, torch.Tensor) for v in data.values()):
            hint = " (it looks like a plain state dict: use it as base weights with --weights PATH)"
        raise CheckpointError(f"{where} is not an se-inject checkpoint{hint}")
    version = data.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{where} has checkpoint format version {version!r}; this se-inject reads up to {FORMAT_VERSION}, upgrade it"
        )
    state = data.get("state_dict")
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"{where} has no valid state_dict (name -> tensor)")
    if not isinstance(data.get("plan"), Mapping):
        raise CheckpointError(f"{where} has no plan")
    return dict(data)


def _se_shapes(channels: int, hidden: int, bias: bool) -> dict[str, tuple[int, ...]]:
    """The SE block's tensors (``SEBlock``'s two linear layers) by key suffix."""
    shapes = {"fc1.weight": (hidden, channels), "fc2.weight": (channels, hidden)}
    if bias:
        shapes.update({"fc1.bias": (hidden,), "fc2.bias": (channels,)})
    return shapes


def check_plan_fits_tensors(plan: Plan, state: Mapping[str, torch.Tensor], where: str) -> None:
    """Refuse a plan whose SE blocks the file's tensors could not fill, before anything is built.

    The plan says how big each SE block is (``channels``, ``hidden``); a strict load needs every
    one of their tensors in the file, shaped so. A hostile or corrupt plan (``hidden=2000000``
    next to tensors of (8, 64)) would otherwise allocate its blocks first, gigabytes, and only
    then be refused: here each site's tensors that the file holds must have the plan's shapes,
    and all SE blocks together cannot hold more values than the file does.

    Raises:
        CheckpointError: a site's shapes differ from its tensors, or the plan's SE blocks hold
            more values than the file.
    """
    total = sum(t.numel() for t in state.values())
    needed = 0
    for site in plan.sites:
        sizes = (site.channels, site.hidden)
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in sizes):
            raise CheckpointError(
                f"{where} has a plan with site {site.name!r} of {site.channels!r} channels and hidden width "
                f"{site.hidden!r} (positive integers expected); the file is corrupt or was edited"
            )
        shapes = _se_shapes(site.channels, site.hidden, site.config.bias)
        needed += sum(math.prod(shape) for shape in shapes.values())
        for suffix, shape in shapes.items():
            tensor = state.get(f"{site.name}.{suffix}")
            if tensor is not None and tuple(tensor.shape) != shape:
                raise CheckpointError(
                    f"{where} has a plan that does not match its tensors: site {site.name} has {site.channels} "
                    f"channels and hidden width {site.hidden}, so {suffix} would be {shape}, but the file holds "
                    f"{tuple(tensor.shape)}; the file is corrupt or was edited"
                )
    if needed > total:
        raise CheckpointError(
            f"{where} has a plan whose {len(plan.sites)} SE blocks hold {needed:,} values, more than the "
            f"{total:,} the file holds; the file is corrupt or was edited"
        )


def _spec(data: Mapping[str, Any], where: str) -> ModelSpec:
    recorded = data.get("model")
    if not isinstance(recorded, Mapping) or not recorded.get("name"):
        raise CheckpointError(
            f"{where} records no registry model name (saved from a custom model); pass base_model="
        )
    try:
        source = Source(recorded.get("source"))
    except ValueError as e:
        raise CheckpointError(f"{where} records an unknown model source {recorded.get('source')!r}") from e
    try:
        return resolve_name(f"{source}:{recorded['name']}")
    except UnknownModelError as e:
        raise CheckpointError(f"{where} was saved from {source}:{recorded['name']}, which is not installed here: {e}") from e


def _recorded_args(data: Mapping[str, Any]) -> dict[str, Any] | None:
    """The recorded constructor arguments, or ``None`` when the checkpoint does not know them."""
    text = data.get("model_args")
    if not isinstance(text, str):
        return None
    try:
        return args_from_literal(text)
    except (ValueError, SyntaxError):
        return None


def _created(spec: ModelSpec, args: Mapping[str, Any] | None) -> str:
    if args is None:
        return (f"{spec} created with arguments the checkpoint does not record (a model built outside se-inject; "
                "timm models do not keep their arguments)")
    return f"{spec} created with {args_text(args)}"


def _se_only_base(spec: ModelSpec, data: Mapping[str, Any], where: str, args: Mapping[str, Any] | None) -> nn.Module:
    # SE weights were trained on top of specific base weights: reuse the library's pretrained
    # ones when that is what they were and they are cached; never download.
    weights = data.get("weights") or {}
    if weights.get("kind") == WeightsKind.PRETRAINED:
        found = pretrained_from_cache(spec, args=args)
        if found is not None:
            return found[0]
    warnings.warn(
        f"{where} holds SE weights only; the rebuilt {spec} base has RANDOM weights "
        f"(saved on top of: {weights.get('detail', 'unknown weights')}); pass base_model= to attach them to yours",
        UserWarning,
        stacklevel=4,
    )
    return create_model(spec, args=args)


def _rebuild_base(data: Mapping[str, Any], where: str) -> tuple[nn.Module, ModelSpec]:
    """The base model rebuilt from the recorded name and arguments, checked against the recorded
    architecture signature.

    Raises:
        ArchitectureMismatchError: the rebuilt model has other layers or hyper-parameters.
        CheckpointError: no registry name, or the recorded arguments are refused here.
    """
    spec = _spec(data, where)
    args = _recorded_args(data)
    state: Mapping[str, torch.Tensor] = data["state_dict"]
    try:
        if data.get("se_only"):
            model = _se_only_base(spec, data, where, args)
        else:
            model = create_model_for_state(spec, state, args)
    except ModelArgsError as e:
        raise CheckpointError(
            f"{where} was saved from {_created(spec, args)}, which cannot be rebuilt here ({e}); "
            "rebuild the model as you created it and pass base_model=..."
        ) from e
    saved = data.get("architecture")
    if isinstance(saved, Mapping) and saved.get("digest"):
        different = signature_difference(saved, model)
        if different is not None:
            raise ArchitectureMismatchError(
                f"{where} was saved from {_created(spec, args)}; the model rebuilt from it is a different "
                f"architecture ({different}). Rebuild the model as you created it and pass base_model=..., "
                "e.g. se_inject.load(path, base_model=timm.create_model(name, **your_arguments))"
            )
    return model, spec


def load(path: str | os.PathLike[str], base_model: nn.Module | None = None, *, force: bool = False) -> nn.Module:
    """Rebuild an injected model from a checkpoint written by :func:`save` or ``se-inject -o``.

    Without ``base_model`` the base is rebuilt from the recorded registry name and constructor
    arguments with random init (nothing is downloaded); a full checkpoint then overwrites every
    tensor. The rebuilt base must match the recorded architecture signature (each module's class
    and hyper-parameters), else it is refused: a model is rebuilt the same, or not at all. With ``base_model``
    (a model with no registry name, or your own pretrained base for an SE-only file) the plan is
    applied to it, in place. Either way the saved tensors are loaded strictly.

    All or nothing: if anything fails, ``base_model`` is left as it was (the SE blocks are taken
    out again), so a retry starts clean. An SE-only file is refused on a base model other than
    the one it was saved on (its layers differ: the plan would cover only part of it) unless
    ``force=True``.

    Example:
        >>> model = load("model.pt")                                   # full checkpoint
        >>> model = load("se.pt", base_model=timm.create_model("resnet50", pretrained=True))

    Raises:
        CheckpointError: missing, corrupt or foreign file, no way to rebuild the base model, or
            an SE-only file saved on another base model (without ``force``).
        ArchitectureMismatchError: the base rebuilt without ``base_model`` is not the recorded
            architecture (a model created with arguments the checkpoint does not record).
        UnsafeCheckpointError: the file would run code when unpickled (refused; nothing ran).
        PlanMismatchError: the saved plan does not fit ``base_model``.
        WeightsError: the saved tensors do not fit the rebuilt model (names a few keys).
    """
    data = read_checkpoint(path)
    where = f"checkpoint {str(path)!r}"
    plan = Plan.from_dict(data["plan"])
    state: Mapping[str, torch.Tensor] = data["state_dict"]
    check_plan_fits_tensors(plan, state, where)  # before any model or SE block is built
    se_only = bool(data.get("se_only"))
    spec = None
    if base_model is not None:
        model = base_model
        different = _base_differences(data, base_model) if se_only and not force else None
        if different is not None:
            raise CheckpointError(
                f"{where} holds SE weights for another base model: it {different}. Attach it to the model it "
                "was saved on, or pass force=True to load it anyway"
            )
    else:
        model, spec = _rebuild_base(data, where)
    injected = build(model, plan)  # attach, rebuild and check, or change nothing
    try:
        if se_only:
            _load_se_only(injected, state, where)
        else:
            load_strict(injected, state, where)
    except WeightsError as e:
        remove_se(injected)  # the base model as it was: same blocks, no SE, no recorded plan
        if spec is None or type(e) is not WeightsError:
            raise
        raise WeightsError(f"{e}; if the model was created with other arguments, rebuild it so and pass "
                           "base_model=...") from e
    except BaseException:
        remove_se(injected)
        raise
    if spec is not None:
        tag_origin(injected, spec, origin_args(model))
    return injected


def _load_se_only(model: nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    own = se_state_dict(model)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or wrong:
        raise WeightsError(f"{where} SE weights do not fit the model: {key_problems(missing, unexpected, wrong)}")
    model.load_state_dict(dict(state), strict=False)

