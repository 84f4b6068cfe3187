"""Reading weights and checkpoint files safely: torch pickles, safetensors, state dicts.

Only plain data is ever unpickled (``torch.load(weights_only=True)``); a file that would import
or run code is refused with the names it would have imported, found by
:func:`torch.serialization.get_unsafe_globals_in_checkpoint` (zip files) or by reading the
opcodes of a raw pickle, never by running it. A file that is neither a torch file nor a
safetensors file is named as such rather than reported with the unpickler's raw error.
"""

from __future__ import annotations

import os
import pickle
import pickletools
import re
import stat
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import SEInjectError, UnsafeCheckpointError, WeightsError

__all__ = ["not_a_file", "read_pickle", "load_state_dict_file", "read_weights_file", "WeightsFile", "clean_state_dict", "load_strict",
           "key_problems", "is_torch_file"]

#: How many missing / unexpected keys an error message names.
_KEYS_SHOWN = 4

#: First bytes of a zip archive (torch's default format since 1.6).
_ZIP_MAGIC = b"PK\x03\x04"

#: First byte of a pickle of protocol 2 or later (torch's legacy, non-zip format).
_PICKLE_PROTO = 0x80

#: Keys under which training scripts wrap a model's state dict: the plain weights, in the order
#: timm's ``load_state_dict`` tries them (``model_state_dict`` is the PyTorch tutorials' key) ...
_WRAPPERS = ("state_dict", "model", "model_state_dict")
#: ... and the exponential moving average of them (timm's train.py and ``ModelEmaV2/V3`` users).
_EMA_WRAPPERS = ("state_dict_ema", "model_ema")


@dataclass(frozen=True)
class WeightsFile:
    """A state dict read from a file, and which of the file's state dicts it is."""

    state: dict[str, torch.Tensor]
    key: str | None  # the wrapper key it was under ("state_dict", "state_dict_ema"), None: the file is one
    ema: bool  # the weights are the EMA ones
    ema_key: str | None  # the file's EMA state dict's key, whether or not it was the one read


def is_torch_file(path: Path) -> bool:
    """True when ``path`` starts like ``torch.save`` output: a zip archive or a binary pickle.

    Only the first bytes are read, so a truncated torch file still counts (and is then reported
    as truncated, not as another format).
    """
    with open(path, "rb") as handle:
        head = handle.read(4)
    return head == _ZIP_MAGIC or (bool(head) and head[0] == _PICKLE_PROTO)


def _is_safetensors(path: Path) -> bool:
    # safetensors: an 8-byte little-endian header length, then a JSON header starting with "{".
    with open(path, "rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _unsafe_globals(path: Path) -> list[str]:
    """Names unpickling ``path`` would import; nothing in the file is executed."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip checkpoint (legacy or raw pickle): read the opcodes ourselves
        names = _pickle_globals(path)
    return [n for n in names if not n.startswith(("torch.", "collections.OrderedDict"))]


def _pickle_globals(file: Path) -> list[str]:
    """Names a raw pickle would import, found by reading its opcodes (nothing is executed)."""
    found: list[str] = []
    strings: list[str] = []
    try:
        with open(file, "rb") as handle:
            for op, arg, _ in pickletools.genops(handle):
                if op.name == "GLOBAL" and isinstance(arg, str):
                    found.append(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # a corrupt stream: keep what was found before the damage
        pass
    return found


_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def not_a_file(path: Path) -> str | None:
    """Why ``path`` is no regular file to read, as the end of a sentence (``"is a FIFO ..."``),
    or ``None`` when it is one. A FIFO or ``/dev/zero`` would block or never end a read."""
    try:
        mode = path.stat().st_mode
    except OSError as e:
        if path.is_symlink():
            return "is a symbolic link to nothing (its target does not exist)"
        return "does not exist" if isinstance(e, FileNotFoundError) else f"cannot be read ({e.strerror or e})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a directory, not a file"
    kind = next((kind for is_kind, kind in _KINDS if is_kind(mode)), "a special file")
    return f"is {kind}, not a regular file"


def read_pickle(file: str | os.PathLike[str], *, what: str, error: type[SEInjectError]) -> Any:
    """``torch.load(file, weights_only=True, map_location="cpu")`` with our errors.

    Raises:
        error: the file is missing, not a torch file, or corrupt (``error`` is the class to use).
        UnsafeCheckpointError: unpickling would import or call code; torch's ``weights_only``
            unpickler refused it before anything ran.
    """
    path = Path(file)
    problem = not_a_file(path)
    if problem is not None:
        raise error(f"{what} {str(path)!r} {problem}")
    if not is_torch_file(path):
        if _is_safetensors(path):
            raise error(f"{what} {str(path)!r} is a safetensors file, not a torch file")
        raise error(f"{what} {str(path)!r} is not a torch or safetensors file (another format, or corrupt)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols it then refuses
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        named = re.findall(r"GLOBAL ([\w.]+)", str(e)) or _unsafe_globals(path)
        if named:
            raise UnsafeCheckpointError(
                f"refused {what} {str(path)!r}: unpickling it would import and run {', '.join(dict.fromkeys(named))} "
                "(only tensors and plain data are accepted; nothing was run)"
            ) from None
        raise error(f"{what} {str(path)!r} is not a readable torch file (corrupt or another format)") from e
    except Exception as e:  # zip, struct, EOF and OS errors alike mean an unreadable file
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise error(f"{what} {str(path)!r} is not a readable torch file (corrupt or truncated: {first})") from e


def clean_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys without the wrappers' prefixes: ``module.`` (DataParallel/DDP) and ``_orig_mod.``
    (``torch.compile``), in either order, as timm's ``clean_state_dict`` does.

    Example:
        >>> list(clean_state_dict({"_orig_mod.module.fc.weight": w}))
        ['fc.weight']
    """
    from timm.models import clean_state_dict as timm_clean

    return dict(timm_clean(dict(state)))


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.pt`` / ``.pth`` (``weights_only``) or ``.safetensors``.

    Training checkpoints that wrap the weights (``{"state_dict": ...}``, ``{"model": ...}``,
    ``{"model_state_dict": ...}``) are unwrapped, and the prefixes of DataParallel (``module.``)
    and compiled models (``_orig_mod.``) removed. The plain weights are read; a file holding
    only EMA weights gives those (:func:`read_weights_file` says which, and can pick EMA).

    Raises:
        WeightsError: the file is missing, corrupt, of another format, or holds no state dict.
        UnsafeCheckpointError: unpickling it would run code (refused; nothing ran).
    """
    return read_weights_file(path).state


def read_weights_file(path: str | os.PathLike[str], *, ema: bool = False) -> WeightsFile:
    """:func:`load_state_dict_file`, saying which state dict was read; ``ema`` reads the EMA weights.

    timm's training checkpoints hold the plain weights (``state_dict``) and, trained with
    ``--model-ema``, their moving average (``state_dict_ema``). timm's ``load_state_dict``
    picks EMA when present; here the plain weights are the default and ``ema`` asks for the
    others, so nothing is chosen silently: :attr:`WeightsFile.ema_key` names the EMA weights a
    file also holds. (The keys are timm's; the reading stays ours, so an unsafe file is refused
    with the names it would import.)

    Example:
        >>> read_weights_file("last.pth.tar", ema=True).key
        'state_dict_ema'

    Raises:
        WeightsError: as :func:`load_state_dict_file`; with ``ema``, also a file without EMA weights.
        UnsafeCheckpointError: unpickling it would run code (refused; nothing ran).
    """
    file = Path(path)
    if file.suffix == ".safetensors" or (file.is_file() and _is_safetensors(file)):
        problem = not_a_file(file)
        if problem is not None:
            raise WeightsError(f"weights file {str(file)!r} {problem}")
        try:
            from safetensors.torch import load_file

            state = load_file(str(file), device="cpu")
        except Exception as e:  # safetensors raises its own SafetensorError and OSError
            raise WeightsError(f"weights file {str(file)!r} is not a readable safetensors file: {e}") from e
    else:
        state = read_pickle(file, what="weights file", error=WeightsError)
    return _unwrap_state_dict(state, file, ema)


def _wrapped(data: Any, keys: tuple[str, ...]) -> str | None:
    if not isinstance(data, Mapping):
        return None
    return next((k for k in keys if isinstance(data.get(k), Mapping) and data[k]), None)


def _unwrap_state_dict(data: Any, file: Path, ema: bool = False) -> WeightsFile:
    if isinstance(data, Mapping) and data.get("format") == "se-inject":
        raise WeightsError(
            f"{str(file)!r} is an se-inject checkpoint, not base-model weights; load it with se_inject.load()"
        )
    ema_key = _wrapped(data, _EMA_WRAPPERS)
    if ema and ema_key is None:
        raise WeightsError(
            f"weights file {str(file)!r} holds no EMA weights ({' or '.join(_EMA_WRAPPERS)}); leave out --weights-ema"
        )
    key = ema_key if ema else (_wrapped(data, _WRAPPERS) or ema_key)
    if key is not None:
        data = data[key]
    if not isinstance(data, Mapping) or not data or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()
    ):
        raise WeightsError(f"weights file {str(file)!r} does not hold a state dict (name -> tensor)")
    return WeightsFile(clean_state_dict(data), key, key is not None and key == ema_key, ema_key)


def load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line error naming a few bad keys.

    The keys are checked before anything is copied, so a refused state leaves ``model`` as it was.

    Example:
        >>> load_strict(model, torch.load("resnet18.pth", weights_only=True), "resnet18.pth")

    Raises:
        WeightsError: missing, unexpected or wrongly shaped keys.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        raise WeightsError(f"{what} does not fit the architecture: {key_problems(missing, unexpected, shapes)}")
    model.load_state_dict(state, strict=True)


def key_problems(missing: list[str], unexpected: list[str], wrong: list[str]) -> str:
    """``"2 missing: a, b; 1 unexpected: c"``: a few keys of each kind, for one-line errors."""
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if keys:
            more = f" (+{len(keys) - _KEYS_SHOWN} more)" if len(keys) > _KEYS_SHOWN else ""
            parts.append(f"{len(keys)} {label}: {', '.join(keys[:_KEYS_SHOWN])}{more}")
    return "; ".join(parts)
