"""Checkpoints: plain data that ``torch.load(path, weights_only=True)`` reads, and rebuilding from them.

A checkpoint is a dict of plain values and tensors, never pickled classes::

    {
        "format": "se-inject", "format_version": 1,
        "se_inject_version": "0.1.0", "torch_version": "2.14.1",
        "model": {"source": "timm", "name": "resnet50"},    # None for a custom model
        "model_args": "{'drop_path_rate': 0.1}",            # constructor kwargs as a Python literal; None: unknown
        "architecture": {"digest": "...", "modules": [...]}, # the base model's layers (se_inject.io.signature)
        "weights": {"kind": "pretrained", "detail": "..."},  # what the base weights were
        "se_only": False,
        "base": {"params": 25557032, "digest": "..."},      # the base model under the SE blocks
        "plan": Plan.to_dict(),
        "state_dict": {"conv1.weight": tensor, ..., "layer1.0.se.fc1.weight": tensor, ...},
    }

A full checkpoint holds every tensor of the injected model; an SE-only checkpoint (the
adapter-style option, a few MB) holds the tensors of the :class:`~se_inject.se_block.SEBlock`
modules only, selected by type, never by a name such as ``"se"`` (timm's ``seresnet*`` have
``.se.`` modules of their own).

:func:`load` replays the saved plan with :func:`~se_inject.apply_plan` (no graph analysis) on a
base model rebuilt from the recorded registry name and constructor arguments with random init
(nothing is downloaded), or on the ``base_model`` you pass, then loads the saved tensors
strictly. A rebuilt base must have the recorded architecture signature (every module's class
and hyper-parameters): one that differs (a timm model created with ``global_pool='max'``
outside se-inject, whose arguments timm does not keep) is refused with
:class:`~se_inject.errors.ArchitectureMismatchError`, never loaded silently.

Writes are atomic: the file is written next to its destination under a temporary name and
moved into place with ``os.replace``, so a failure leaves an existing file untouched and no
partial file behind.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..api import apply_plan, remove_se
from ..errors import (
    ArchitectureMismatchError,
    CheckpointError,
    ModelArgsError,
    OutputPathError,
    UnknownModelError,
    WeightsError,
)
from ..models.arguments import args_from_literal, args_literal, args_text
from ..models.loading import create_model_for_state
from ..models.names import ModelSpec, Source, model_origin, origin_args, resolve_name, tag_origin
from ..models.weight_files import key_problems, load_strict, read_pickle
from ..models.weights import WeightsInfo, WeightsKind, create_model, pretrained_from_cache
from ..plan import PLAN_ATTR, Plan
from ..se_block import SEBlock
from .atomic import atomic_write, output_target
from .signature import architecture_signature, signature_difference

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "save",
    "load",
    "read_checkpoint",
    "checkpoint_dict",
    "check_output_path",
    "atomic_save",
    "se_state_dict",
    "base_fingerprint",
]

FORMAT = "se-inject"
FORMAT_VERSION = 1




# --- writing --------------------------------------------------------------------------------


def check_output_path(path: str | os.PathLike[str]) -> Path:
    """Check, before any work is done, that a file can be written at ``path``.

    A probe file is created and removed in the destination folder, so the answer is also right
    for root and for read-only file systems, where permission bits say nothing.

    Example:
        >>> check_output_path("runs/model.pt")
        PosixPath('runs/model.pt')

    Raises:
        OutputPathError: the folder does not exist, ``path`` is a folder, a device, a FIFO or a
            socket (never replaced), nothing can be written there, or the name ends in
            ``.safetensors`` (a checkpoint is a torch file). A symlink's target is checked.
    """
    file = Path(path)
    if file.suffix == ".safetensors":
        raise OutputPathError(
            f"cannot write {str(file)!r}: checkpoints are torch files (they hold the plan too); use a .pt name"
        )
    folder = output_target(file).parent
    if not folder.is_dir():
        raise OutputPathError(f"cannot write {str(file)!r}: folder {str(folder)!r} does not exist")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{file.name}.", suffix=".probe", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputPathError(f"cannot write {str(file)!r}: {e.strerror or e}") from e
    return file


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj)`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    Raises:
        OutputPathError: the file cannot be written; an existing ``path`` is left untouched and
            no temporary file remains.
    """
    file = check_output_path(path)
    return atomic_write(file, lambda handle: torch.save(obj, handle))


def se_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of the model's :class:`SEBlock` modules, under their full keys.

    Example:
        >>> sorted(se_state_dict(inject_se(torchvision.models.resnet18())))[:2]
        ['layer1.0.se.fc1.bias', 'layer1.0.se.fc1.weight']
    """
    state: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, SEBlock):
            state.update(module.state_dict(prefix=f"{name}." if name else ""))
    return state


def base_fingerprint(model: nn.Module) -> dict[str, Any]:
    """What the base model under the SE blocks is: its parameter count and a digest of its keys and shapes.

    SE tensors are left out, so the fingerprint of an injected model is that of its base.
    :func:`load` compares it with the ``base_model`` an SE-only file is attached to.
    """
    se_keys = set(se_state_dict(model))
    shapes = sorted(f"{k}:{tuple(v.shape)}" for k, v in model.state_dict().items() if k not in se_keys)
    params = sum(p.numel() for name, p in model.named_parameters() if name not in se_keys)
    return {"params": int(params), "digest": hashlib.sha256("\n".join(shapes).encode()).hexdigest()[:16]}


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


def _version() -> str:
    try:
        return metadata.version("se-inject")
    except metadata.PackageNotFoundError:
        return "unknown"


def _recorded_plan(model: nn.Module) -> Plan | None:
    plan = getattr(model, PLAN_ATTR, None)
    return plan if isinstance(plan, Plan) else None


def checkpoint_dict(
    model: nn.Module,
    *,
    plan: Plan | None = None,
    se_only: bool = False,
    origin: ModelSpec | None = None,
    weights: WeightsInfo | None = None,
    model_args: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The plain-data checkpoint of an injected model (what :func:`save` writes).

    Raises:
        CheckpointError: no plan was given and none is recorded on the model.
    """
    plan = plan if plan is not None else _recorded_plan(model)
    if plan is None:
        raise CheckpointError(
            f"{type(model).__name__} has no recorded SE plan; pass plan= (the Plan it was injected with)"
        )
    if model_args is None and (origin is None or origin == model_origin(model)):
        model_args = origin_args(model)  # known for models built by se-inject only
    origin = origin if origin is not None else model_origin(model)
    state = se_state_dict(model) if se_only else model.state_dict()
    return _plain({
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "se_inject_version": _version(),
        "torch_version": str(torch.__version__),
        "model": None if origin is None else {"source": str(origin.source), "name": origin.name},
        "model_args": None if model_args is None else args_literal(model_args),
        "architecture": architecture_signature(model),
        "weights": None if weights is None else weights.to_dict(),
        "se_only": se_only,
        "base": base_fingerprint(model),
        "plan": plan.to_dict(),
        "state_dict": {k: v.detach().to("cpu") for k, v in state.items()},
    })


def _plain(value: Any) -> Any:
    """``value`` with every container and scalar turned into its exact built-in type.

    ``weights_only`` unpickling refuses subclasses (``torch.__version__`` is a ``TorchVersion``,
    plans hold ``StrEnum`` values), so they are converted here rather than found at load time.
    """
    if isinstance(value, torch.Tensor):
        return value
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    raise CheckpointError(f"cannot store {type(value).__name__} in a weights_only checkpoint")


def save(
    model: nn.Module,
    path: str | os.PathLike[str],
    se_only: bool = False,
    *,
    plan: Plan | None = None,
    origin: ModelSpec | None = None,
    weights: WeightsInfo | None = None,
    model_args: Mapping[str, Any] | None = None,
) -> Path:
    """Write an injected model (or only its SE weights) as a ``weights_only``-loadable checkpoint.

    The model is not changed. The plan is the one recorded on the model by ``inject_se`` /
    ``apply_plan`` unless ``plan`` is given; the registry name comes from models built by
    :mod:`se_inject.models.loading` and from timm's ``pretrained_cfg`` unless ``origin`` is given (without
    one, :func:`load` needs a ``base_model``). The constructor arguments are recorded when they
    are known: those of models built by se-inject, or ``model_args`` (what you passed to
    ``timm.create_model``); the architecture signature always is, so :func:`load` refuses a
    rebuild that differs.

    Example:
        >>> model = inject_se(timm.create_model("resnet50"))
        >>> save(model, "model.pt")                      # everything
        >>> save(model, "se.pt", se_only=True)           # adapter: SE weights + plan

    Raises:
        CheckpointError: no plan is known for the model.
        OutputPathError: the file cannot be written (an existing file is left untouched), or
            its name ends in ``.safetensors``.
    """
    data = checkpoint_dict(model, plan=plan, se_only=se_only, origin=origin, weights=weights, model_args=model_args)
    return atomic_save(data, path)


# --- reading --------------------------------------------------------------------------------


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
    injected = apply_plan(model, plan)  # changes nothing if the plan does not fit
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

