"""Checkpoints out: the format (plain data that ``torch.load(path, weights_only=True)`` reads) and ``save``.

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

:func:`~se_inject.io.restore.load` replays the saved plan through ``inject.build``, as :func:`~se_inject.apply_plan` does (no graph analysis) on a
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
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import (
    CheckpointError,
    OutputPathError,
)
from ..models.arguments import args_literal
from ..models.names import ModelSpec, model_origin, origin_args
from ..models.weights import WeightsInfo
from ..plan import PLAN_ATTR, Plan
from ..se_block import SEBlock
from .atomic import atomic_write, output_target
from .signature import architecture_signature

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "save",
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
