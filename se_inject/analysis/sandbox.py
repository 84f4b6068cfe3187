"""A sandbox for the forwards analysis runs on the user's modules.

Planning, the post-build check and the counts run the user's modules forward on meta or fake
tensors, fx proxies or one real sample. Modules that cache on ``self`` during forward keep
what such a run put there: a YOLO head's ``self.anchors`` (then fake tensors), a buffer
reassigned in forward (``torch.save(model.state_dict())`` fails), a call counter, a LeViT-style
attention-bias dict filled in eval mode (fx proxies as values, or tensors of the current
weights that go stale after ``load_state_dict``). :func:`preserved_state` puts every
submodule back as it was: its attribute dictionary, the dicts, lists and sets found in it
(in place, so references to them stay valid), its class, its buffers' values and its
train/eval flag; and torch's random number generators. It also runs the body alone
(:data:`analysis_lock`: one analysis at a time in the process) and with the user's hooks off
(``hooks.hooks_silenced``).
"""

from __future__ import annotations

import gc
import operator
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from .hooks import hooks_silenced

__all__ = ["analysis_lock", "collection_paused", "preserved_state"]

#: Held by every analysis forward and trace (:func:`preserved_state`; ``tracing.trace`` runs
#: inside one). torch.fx patches process-wide globals while it traces (``nn.Module.__call__``
#: and ``__getattr__``, the traced functions' globals), and the hook switch-off and the mode
#: watch are process-wide too: two threads analysing at once would record into each other's
#: graphs and restore each other's patches in the wrong order, leaving ``nn.Module.__call__``
#: patched for good. Re-entrant, since analysis nests (a plan traces, a trace is sandboxed).
analysis_lock = threading.RLock()

_CONTAINERS = (dict, list, set)
#: How deep nested containers are copied (``self.cache = {"cpu": [...]}`` is depth 2).
_DEPTH = 3
#: ``nn.Module``'s own dicts: their values are modules, tensors, hooks, never containers.
_TORCH_DICTS = frozenset({
    "_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "_backward_pre_hooks",
    "_backward_hooks", "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_state_dict_hooks", "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
})


class _Snapshot:
    """What :func:`preserved_state` restores: per module its class and a shallow copy of its
    ``__dict__``; per container found in one (any depth up to ``_DEPTH``) a shallow copy of
    its contents (``None`` for an empty one: most of a module's hook dicts); per buffer its
    values and version counter."""

    __slots__ = ("modules", "containers", "buffers")

    def __init__(self, model: nn.Module) -> None:
        self.modules: list[tuple[nn.Module, type, dict[str, Any]]] = []
        self.containers: list[tuple[Any, Any]] = []
        self.buffers: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}
        keep = self.containers.append
        with torch.no_grad():
            for m in model.modules():
                attrs = dict(m.__dict__)
                self.modules.append((m, type(m), attrs))
                for key, value in attrs.items():
                    if not isinstance(value, _CONTAINERS):
                        continue
                    if key in _TORCH_DICTS:
                        keep((value, _copy(value) if value else None))
                    else:
                        self._keep(value, _DEPTH)
                for b in m._buffers.values():
                    if b is not None and id(b) not in self.buffers and not b.is_inference():
                        self.buffers[id(b)] = (b, b._version, b.detach().clone())

    def _keep(self, container: Any, depth: int) -> None:
        self.containers.append((container, _copy(container) if container else None))
        if depth > 1:
            for value in container.values() if isinstance(container, dict) else container:
                if isinstance(value, _CONTAINERS):
                    self._keep(value, depth - 1)

    def restore(self) -> None:
        for container, copied in self.containers:
            if copied is None:
                if container:
                    container.clear()
            elif _changed(container, copied):
                if isinstance(container, list):
                    container[:] = copied
                else:
                    container.clear()
                    container.update(copied)
        for m, cls, attrs in self.modules:
            if type(m) is not cls:
                m.__class__ = cls
            if _changed(m.__dict__, attrs):
                m.__dict__.clear()
                m.__dict__.update(attrs)
        for tensor, version, values in self.buffers.values():
            if tensor._version != version:  # changed in place (``self.calls += 1`` on a buffer)
                with torch.no_grad():
                    tensor.copy_(values)


def _copy(container: Any) -> Any:
    return dict(container) if isinstance(container, dict) else type(container).copy(container)


def _changed(now: Any, then: Any) -> bool:
    """Whether ``now`` holds other objects than its copy ``then`` (identity, not equality; a
    key deleted and added again counts as a change)."""
    if len(now) != len(then):
        return True
    if isinstance(now, dict):
        return now.keys() != then.keys() or not all(map(operator.is_, now.values(), then.values()))
    if isinstance(now, list):
        return not all(map(operator.is_, now, then))
    return now != then


@contextmanager
def _rng_preserved() -> Iterator[None]:
    cpu = torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextmanager
def preserved_state(
    model: nn.Module, *, rng: bool = True, on_error_only: bool = False, run_hooks: bool = False
) -> Iterator[None]:
    """Run the body alone (holding :data:`analysis_lock`) with the model's hooks off, then put
    ``model`` back exactly as it was (also when the body raises).

    Restored for every submodule: the entries of its ``__dict__`` (attributes, train/eval
    flags, and the ``_parameters``/``_buffers``/``_modules`` dicts, so reassigned buffers and
    added children come undone), the contents of the dicts, lists and sets it holds (caches
    filled in place), its class, and the values of buffers changed in place; with ``rng``,
    torch's CPU (and initialised CUDA) random number generator states. Parameters changed in
    place are not restored (no analysis forward writes to them). The user's forward and
    backward hooks, per module and global, do not fire in the body (``hooks.hooks_silenced``)
    unless ``run_hooks`` (a measurement on the user's own batches). With ``on_error_only`` the
    model is restored only when the body raises (a failed call leaves the model as it was; a
    successful one keeps what it installed), and the generators and hooks are left alone.

    Example:
        >>> with preserved_state(model):
        ...     record_module_inputs(model, [x])  # forwards on fake tensors, caches and all
    """
    with analysis_lock:
        snapshot = _Snapshot(model)
        if on_error_only:
            try:
                yield
            except BaseException:
                snapshot.restore()
                raise
            return
        with ExitStack() as stack:
            if rng:
                stack.enter_context(_rng_preserved())
            if not run_hooks:
                stack.enter_context(hooks_silenced(model))
            try:
                yield
            finally:
                snapshot.restore()


@contextmanager
def collection_paused() -> Iterator[None]:
    """Analysis makes hundreds of thousands of short-lived objects (fx nodes, proxies, fake
    tensors); the cyclic collector's passes over them cost up to half of an injection's time
    (measured on ResNet-152). Paused for the call, then restored as it was."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
