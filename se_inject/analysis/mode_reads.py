"""Whether a trace read a module's ``training`` flag: a trace that read none is the same in
both modes, so the other mode's trace can be skipped (``tracing.trace``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["watch_mode_reads"]

# While tracing, every module's class is swapped for a subclass whose ``training`` is a
# property that notes reads: a trace that read no ``training`` flag is the same in both
# modes, so the other mode's trace can be skipped.
_WATCHED_CLASSES: dict[type, type] = {}
_reads_sink: list[list[str]] = []


def _training_get(self: nn.Module) -> bool:
    if _reads_sink:
        _reads_sink[-1].append(type(self).__name__)
    return self.__dict__["training"]


def _training_set(self: nn.Module, value: bool) -> None:
    self.__dict__["training"] = value


def _watching(cls: type) -> type:
    sub = _WATCHED_CLASSES.get(cls)
    if sub is None:
        body = {"training": property(_training_get, _training_set), "__module__": cls.__module__,
                "__qualname__": cls.__qualname__}
        sub = _WATCHED_CLASSES[cls] = type(cls.__name__, (cls,), body)
    return sub


@contextmanager
def watch_mode_reads(module: nn.Module, reads: list[str]) -> Iterator[None]:
    """Record in ``reads`` each read of a ``training`` flag of ``module`` or its submodules;
    a module whose class cannot be swapped counts as read (both modes are then traced)."""
    swapped: list[tuple[nn.Module, type]] = []
    try:
        for m in module.modules():
            cls = type(m)
            if "training" not in m.__dict__:
                reads.append(cls.__name__)
                continue
            try:
                m.__class__ = _watching(cls)
            except TypeError:
                reads.append(cls.__name__)
                continue
            swapped.append((m, cls))
        _reads_sink.append(reads)
        yield
    finally:
        if _reads_sink and _reads_sink[-1] is reads:
            _reads_sink.pop()
        for m, cls in swapped:
            m.__class__ = cls
