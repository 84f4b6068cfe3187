"""Whether code drew random numbers outside a graph while it was traced.

A trace records calls on traced values; a random number drawn on a real tensor or in Python
(``float(torch.rand(1))`` for a shake-shake mix, ``torch.rand(1).item() < p`` or
``random.random() < p`` for stochastic depth) is drawn once, while tracing, and its value (or
the branch it decided) is baked into the graph: a block rebuilt from that graph would repeat
the one draw on every call. Such draws advance a generator, which is what is watched here.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["RandomDraws", "watch_random_draws", "random_states", "restore_random_states"]


class RandomDraws:
    """Which generators a body advanced (``torch`` for torch's CPU or CUDA generators,
    ``random`` for Python's, ``numpy`` for numpy's global one: SpecAugment masks in wav2vec2's
    train mode); empty when it drew nothing."""

    def __init__(self) -> None:
        self.generators: list[str] = []

    def __bool__(self) -> bool:
        return bool(self.generators)


def random_states() -> dict[str, Any]:
    """The states of torch's (CPU and initialised CUDA), Python's and, when imported, numpy's
    generators, by name (``torch``, ``random``, ``numpy``)."""
    states: dict[str, Any] = {"torch": [torch.random.get_rng_state()], "random": random.getstate()}
    if torch.cuda.is_initialized():
        states["torch"] += torch.cuda.get_rng_state_all()
    numpy = sys.modules.get("numpy")  # only when imported: nothing drew from it otherwise
    if numpy is not None:
        states["numpy"] = numpy.random.get_state()
    return states


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list):  # (a generator the body created has no earlier state to differ from)
        return all(torch.equal(x, y) for x, y in zip(a, b, strict=False))
    if isinstance(a, tuple) and len(a) == 5 and hasattr(a[1], "tobytes"):  # numpy's (name, keys, pos, ...)
        return a[0] == b[0] and a[1].tobytes() == b[1].tobytes() and a[2:] == b[2:]
    return a == b


def restore_random_states(states: dict[str, Any], names: Any = None) -> None:
    """Put the generators ``names`` (default: all in ``states``) back to ``states``."""
    for name in states if names is None else names:
        if name == "torch":
            torch.random.set_rng_state(states["torch"][0])
            if len(states["torch"]) > 1:
                torch.cuda.set_rng_state_all(states["torch"][1:])
        elif name == "random":
            random.setstate(states["random"])
        elif name == "numpy":
            sys.modules["numpy"].random.set_state(states["numpy"])


@contextmanager
def watch_random_draws() -> Iterator[RandomDraws]:
    """Note which generators the body advanced, then put every generator back as it was (a
    trace must not use up the user's random numbers either)."""
    draws = RandomDraws()
    before = random_states()
    try:
        yield draws
    finally:
        after = random_states()
        draws.generators += [name for name in before if not _same(before[name], after[name])]
        restore_random_states(before, draws.generators)
