"""The user's hooks, switched off while analysis runs the model.

Analysis runs the user's modules on fx proxies, meta or fake tensors and one random sample: a
forward hook that appends its output to a list would keep a proxy, one that logs ``float(x)``
a made-up value. :func:`hooks_silenced` empties every module's forward, pre-forward and
backward hook dicts and torch's global module hooks
(``torch.nn.modules.module.register_module_forward_hook`` and its kin) for the body, and puts
them back afterwards, also when the body raises; hooks se-inject registers inside (its input
recorders, the flop counter's module tracker) run as usual, and so do the hooks that carry
attached SE blocks (``se_inject_own``): they are part of the injected model. The caller holds the analysis lock
(``sandbox.analysis_lock``): the globals are process-wide.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn
from torch.nn.modules import module as torch_module

__all__ = ["hooks_silenced"]

#: ``nn.Module``'s per-module hook dicts that a forward or backward pass reads.
MODULE_HOOKS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)
#: torch's process-wide module hook dicts (``register_module_forward_hook`` and its kin).
GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_hooks_with_kwargs",
    "_global_forward_hooks_always_called",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)

#: Ids of the modules whose hooks are off now (an inner call leaves them to the outer one, so
#: the hooks se-inject registered in between keep working), and whether the globals are off.
_silenced: set[int] = set()
_globals_off: list[bool] = [False]


def _hook_dicts(model: nn.Module) -> list[dict[Any, Any]]:
    """The non-empty hook dicts of ``model`` and its submodules not silenced already."""
    found: list[dict[Any, Any]] = []
    for m in model.modules():
        if id(m) in _silenced:
            continue
        _silenced.add(id(m))
        found += [d for name in MODULE_HOOKS if isinstance(d := m.__dict__.get(name), dict) and d]
    return found


@contextmanager
def hooks_silenced(model: nn.Module) -> Iterator[None]:
    """Run the body with no user hook of ``model`` (any submodule) or torch's global module
    hooks firing; afterwards every hook is back in its place and order, with any hook
    registered inside kept after them.

    Example:
        >>> with hooks_silenced(model):
        ...     model(torch.empty(1, 3, 8, 8, device="meta"))   # the user's hooks do not see it
    """
    before = set(_silenced)
    took_globals = not _globals_off[0]
    saved: list[tuple[dict[Any, Any], dict[Any, Any]]] = []
    try:
        dicts = _hook_dicts(model)
        if took_globals:
            _globals_off[0] = True
            dicts += [d for name in GLOBAL_HOOKS if isinstance(d := getattr(torch_module, name, None), dict) and d]
        for d in dicts:
            saved.append((d, dict(d)))
            own = {k: v for k, v in d.items() if getattr(v, "se_inject_own", False)}
            d.clear()
            d.update(own)  # se-inject's attached SE blocks are part of the model, not the user's hooks
        yield
    finally:
        for d, held in saved:
            added = {k: v for k, v in d.items() if k not in held}
            d.clear()
            d.update(held)
            d.update(added)
        _silenced.intersection_update(before)
        if took_globals:
            _globals_off[0] = False
