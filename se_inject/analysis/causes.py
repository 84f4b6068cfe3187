"""Why a module could not be analysed, in one line a user can act on: the cause behind fx's
error (a branch on a traced value, ``len()`` of one, ``torch.jit.isinstance`` of one) and the
line of the model's own code that did it, instead of fx's long message or a later symptom."""

from __future__ import annotations

import os
import re
import sysconfig
import traceback
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.fx as fx

__all__ = [
    "describe_failure", "is_known_cause", "raised_inside", "split_location", "watch_jit_isinstance", "TracedIsinstanceError",
]


class TracedIsinstanceError(fx.proxy.TraceError):
    """``torch.jit.isinstance`` was asked about a traced value: it would answer about the
    tracer's Proxy, not the tensor, so the trace would follow a branch the model never takes."""


#: (exception class name or None for any, text in the message, what the forward did)
_CAUSES: tuple[tuple[str | None, str, str], ...] = (
    (None, "symbolically traced variables cannot be used as inputs to control flow", "branches on a traced value (if/while/bool)"),
    (None, "'len' is not supported in symbolic tracing", "uses len() on a traced value"),
    (None, "Proxy object cannot be iterated", "iterates over a traced value (for/unpacking/*args)"),
    ("TracedIsinstanceError", "", "uses torch.jit.isinstance on a traced value"),
    ("TypeError", "Proxy", "needs a plain Python value from a traced one (int()/float()/range())"),
    ("DataDependentOutputException", "", "reads a tensor's values (.item()/.tolist()), so shapes depend on the data"),
    ("DynamicOutputShapeException", "", "makes a tensor whose shape depends on the data (nonzero/masking)"),
    ("GuardOnDataDependentSymNode", "", "branches on a tensor's values, so shapes depend on the data"),
)

_LOCATION = re.compile(r" \([^()\s]+:\d+\)$")


def _cause(error: BaseException) -> str | None:
    """What the forward did, when ``error`` is one of the failures listed in ``_CAUSES``."""
    name, text = type(error).__name__, str(error)
    for cls, needle, cause in _CAUSES:
        if (cls is None or cls == name) and needle in text:
            return cause
    return None


def is_known_cause(error: BaseException) -> bool:
    """Whether ``error`` says why a forward does not trace or propagate (not a later symptom)."""
    return _cause(error) is not None


def _library_dirs() -> tuple[str, ...]:
    """Folders whose frames are never the user's code: torch, se_inject and the standard library."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    dirs = [os.path.dirname(os.path.abspath(torch.__file__)), here, sysconfig.get_paths()["stdlib"]]
    return tuple(os.path.join(d, "") for d in dirs)


_LIBRARY_DIRS = _library_dirs()


def _where(error: BaseException) -> tuple[str | None, str]:
    """Where in the model's own code ``error`` was raised: the innermost frame of its traceback
    outside torch, se_inject, the standard library and generated code, as the function's
    qualified name (without ``<locals>`` prefixes) and `` (file.py:line)``; (None, "") if none."""
    found: tuple[types.FrameType, int] | None = None
    for frame, line in traceback.walk_tb(error.__traceback__):
        filename = frame.f_code.co_filename
        if not filename.startswith("<") and not os.path.abspath(filename).startswith(_LIBRARY_DIRS):
            found = frame, line
    if found is None:
        return None, ""
    code, line = found[0].f_code, found[1]
    # ``make.<locals>.Block.forward.<locals>.<genexpr>`` reads ``Block.forward``.
    parts = [p for p in getattr(code, "co_qualname", code.co_name).split(".") if p != "<locals>"]
    while len(parts) > 1 and parts[-1].startswith("<"):
        parts.pop()
    qualname = ".".join(parts[-2:])
    return qualname, f" ({os.path.basename(code.co_filename)}:{line})"


def _graph_subject(error: BaseException) -> str | None:
    """``Block.forward`` for the innermost module around the graph node whose run raised
    ``error`` (shape propagation runs graph nodes, not the model's code: no user frame)."""
    node = None
    for frame, _ in traceback.walk_tb(error.__traceback__):
        candidate = frame.f_locals.get("node") if frame.f_code.co_filename.endswith(_INTERPRETER) else None
        if isinstance(candidate, fx.Node):
            node = candidate
    stack = node.meta.get("nn_module_stack") if node is not None else None
    if not stack:
        return None
    _, cls = list(stack.values())[-1]
    return f"{getattr(cls, '__name__', cls)}.forward"


_INTERPRETER = os.path.join("fx", "interpreter.py")


def describe_failure(error: BaseException, module: Any = None) -> str:
    """One line naming why ``module`` could not be analysed.

    A known cause reads ``Block.forward uses len() on a traced value (model.py:42)``; the
    first known cause along ``error``'s explicit ``__cause__`` chain wins (a later fallback's
    different error is a symptom). Anything else keeps fx's or torch's first line, as
    ``RuntimeError: ...``, with the user's line when the traceback reaches their code.
    """
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__
    known = next((e for e in chain if is_known_cause(e)), None)
    if known is not None:
        qualname, location = _where(known)
        subject = qualname or _graph_subject(known)
        subject = subject or (f"{type(module).__name__}.forward" if module is not None else "forward")
        return f"{subject} {_cause(known)}{location}"
    lines = str(error).strip().splitlines()
    first = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return first + _where(error)[1]


def split_location(reason: str) -> tuple[str, str]:
    """``reason`` without its trailing `` (file.py:line)``, and that suffix ("" when none)."""
    match = _LOCATION.search(reason)
    return (reason[: match.start()], match.group(0)) if match else (reason, "")


def raised_inside(error: BaseException, modules: Any) -> bool:
    """Whether ``error`` was raised while one of ``modules`` ran its own code (a frame whose
    ``self`` is one of them): the failure belongs to that part, not to its caller."""
    ids = {id(m) for m in modules}
    return bool(ids) and any(id(frame.f_locals.get("self")) in ids for frame, _ in traceback.walk_tb(error.__traceback__))


def _holds_proxy(value: Any) -> bool:
    if isinstance(value, fx.Proxy):
        return True
    if isinstance(value, (list, tuple)):
        return any(_holds_proxy(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_proxy(v) for v in value.values())
    return False


@contextmanager
def watch_jit_isinstance() -> Iterator[None]:
    """While tracing, make ``torch.jit.isinstance`` of a traced value fail with
    :class:`TracedIsinstanceError` instead of silently answering ``False`` about the Proxy
    (the trace would take a branch the model does not, and fail later with a shape error)."""
    original = torch.jit.isinstance

    def checked(obj: Any, target_type: Any) -> bool:
        if _holds_proxy(obj):
            raise TracedIsinstanceError(f"torch.jit.isinstance(<traced value>, {target_type!r}) cannot be answered while tracing")
        return original(obj, target_type)

    torch.jit.isinstance = checked  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.jit.isinstance = original  # type: ignore[assignment]
