"""The post-build check of ``inject_se``: every rebuilt block computes what its original does.

Tracing specialises Python control flow to the traced call (``isinstance(x, tuple)``, ``len``,
a flag): a block rebuilt from a trace made with other inputs than the model passes computes
another function. So the example input is run once through the original model, recording
each owner's inputs and outputs, and each rebuilt block is run on its owner's recorded inputs
with its SE blocks passing their input through (whatever their gate): outputs must be
bit-identical (``torch.equal`` on every leaf of nested outputs). The check runs before
anything is swapped in, so a failure leaves the model as it was.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from ..analysis.draws import random_states, restore_random_states
from ..analysis.hooks import hooks_silenced
from ..analysis.sandbox import analysis_lock
from ..errors import UnfaithfulRebuildError
from ..se_block import SEBlock

__all__ = ["OwnerCalls", "record_owner_calls", "check_rebuilt"]

#: Per owner path: (args, kwargs, output) of each call the example forward made.
OwnerCalls = dict[str, list[tuple[tuple[Any, ...], dict[str, Any], Any]]]


def _is_dataclass(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def _clone_leaf(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if _is_dataclass(value):  # a plain @dataclass output is no pytree node: copy its fields
        copied = copy.copy(value)
        for f in dataclasses.fields(value):
            object.__setattr__(copied, f.name, _clone(getattr(value, f.name)))
        return copied
    return value


def _clone(tree: Any) -> Any:
    # reason: a later in-place op (``relu_`` on a block's output) would change what was recorded.
    return pytree.tree_map(_clone_leaf, tree)


@contextmanager
def _eval_mode(modules: list[nn.Module], training: bool = False) -> Iterator[None]:
    """Every module in eval mode (deterministic, no running-statistics updates; or in train
    mode with ``training``), then each module's own flag back as it was."""
    flags = [(m, m.training) for m in modules]
    try:
        for m in modules:
            m.training = training
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def record_owner_calls(model: nn.Module, owners: list[str], args: tuple[Any, ...]) -> OwnerCalls:
    """Run ``model`` once (eval mode, no grad) on ``args`` and record each owner's calls."""
    calls: OwnerCalls = {path: [] for path in owners}
    pending: dict[str, list[tuple[tuple[Any, ...], dict[str, Any]]]] = {path: [] for path in owners}
    hooks = []
    for path in owners:
        module = model.get_submodule(path) if path else model

        def before(mod: nn.Module, a: tuple[Any, ...], kw: dict[str, Any], path: str = path) -> None:
            pending[path].append((_clone(a), _clone(kw)))

        def after(mod: nn.Module, a: tuple[Any, ...], kw: dict[str, Any], out: Any, path: str = path) -> None:
            a0, kw0 = pending[path].pop()
            calls[path].append((a0, kw0, _clone(out)))

        hooks.append(module.register_forward_pre_hook(before, with_kwargs=True))
        hooks.append(module.register_forward_hook(after, with_kwargs=True))
    try:
        with _eval_mode(list(model.modules())), torch.no_grad():
            model(*args)
    finally:
        for h in hooks:
            h.remove()
    return calls


def _same(a: Any, b: Any) -> bool:
    flat_a, spec_a = pytree.tree_flatten(a)
    flat_b, spec_b = pytree.tree_flatten(b)
    if spec_a != spec_b:
        return False
    for x, y in zip(flat_a, flat_b, strict=True):
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
                return False
            if x.shape != y.shape or x.dtype != y.dtype or not torch.equal(x.nan_to_num(), y.nan_to_num()):
                return False
            if not torch.equal(x.isnan(), y.isnan()):
                return False
        elif _is_dataclass(x) or _is_dataclass(y):
            if type(x) is not type(y):
                return False
            if not all(_same(getattr(x, f.name), getattr(y, f.name)) for f in dataclasses.fields(x)):
                return False
        elif isinstance(x, dict) or isinstance(y, dict):  # a dict subclass pytree does not know
            if type(x) is not type(y) or list(x) != list(y) or not all(_same(x[k], y[k]) for k in x):
                return False
        elif x != y:
            return False
    return True


def _passthrough(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    return args[0]


def check_rebuilt(rebuilt: Mapping[str, nn.Module], calls: OwnerCalls) -> None:
    """Run each rebuilt block on its owner's recorded calls; the first that differs or raises
    is named in the error. The hooks a rebuilt block took over from its original do not fire
    (analysis runs no user hook).

    Raises:
        UnfaithfulRebuildError: a rebuilt block computes something else than its original.
    """
    with analysis_lock, ExitStack() as stack:
        for block in rebuilt.values():
            stack.enter_context(hooks_silenced(block))
            original = block.__dict__.get("_se_original")
            if original is not None:
                stack.enter_context(hooks_silenced(original))
        _check_rebuilt(rebuilt, calls)


def _outcome(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[bool, Any]:
    """``(True, output)``, or ``(False, exception class)`` when the call raised."""
    try:
        return True, module(*_clone(args), **_clone(kwargs))
    except Exception as e:  # noqa: BLE001 - compared below: both must raise alike
        return False, type(e)


def _check_train_mode(path: str, block: nn.Module, train_graph: Any, calls: OwnerCalls) -> None:
    """A block with a train graph of its own (code that reads ``self.training``: functional
    dropout, a drop-connect mask) computes in train mode what its original does, from the same
    random numbers: each call runs the original, then the rebuilt block, from one generator state.
    A block whose original also raises in train mode on the example input (a norm over one value
    per channel) must raise alike."""
    original = block.__dict__["_se_original"]
    where = path or "the model"
    modules = [original, *block.modules()]
    with _eval_mode(modules, training=True), torch.no_grad(), _replayed_draws() as replay, _buffers_kept(modules):
        block.graph = train_graph  # (put back by the caller)
        for args, kwargs, _ in calls.get(path, []):
            expected = _outcome(original, args, kwargs)
            replay()
            got = _outcome(block, args, kwargs)
            if expected[0] != got[0] or (expected[0] and not _same(got[1], expected[1])) or (
                not expected[0] and got[1] is not expected[1]
            ):
                raise UnfaithfulRebuildError(
                    f"the rebuilt {where} ({type(block).__name__}) computes other outputs than the original in "
                    "train mode on the example input, from the same random numbers; the model is unchanged. Its "
                    "train-mode code likely decides something outside the graph; exclude it with exclude=[...]",
                    owner=path,
                )


@contextmanager
def _buffers_kept(modules: list[nn.Module]) -> Iterator[None]:
    """Every buffer's values back afterwards: a norm's running statistics are updated in train
    mode by its kernel, which leaves no version bump for the sandbox to see."""
    held = {id(b): (b, b.clone()) for m in modules for b in m.buffers(recurse=False)}
    try:
        yield
    finally:
        for tensor, values in held.values():
            tensor.copy_(values)


@contextmanager
def _replayed_draws() -> Iterator[Any]:
    """A function that puts the random generators (``analysis.draws``: torch's, Python's,
    numpy's) back to their state at entry, so a second run draws the first run's numbers; they
    stay at that state."""
    states = random_states()

    def replay() -> None:
        restore_random_states(states)

    try:
        yield replay
    finally:
        replay()


def _check_rebuilt(rebuilt: Mapping[str, nn.Module], calls: OwnerCalls) -> None:
    for path, block in rebuilt.items():
        hooks = [m.register_forward_hook(_passthrough) for m in block.modules() if isinstance(m, SEBlock)]
        where = path or "the model"
        try:
            with _eval_mode(list(block.modules())), torch.no_grad():
                graphs = block.__dict__.get("_se_graphs")
                if graphs is not None and graphs[1] is not None:
                    block.graph = graphs[0]  # the eval graph, as eval mode runs it
                for args, kwargs, expected in calls.get(path, []):
                    try:
                        got = block(*_clone(args), **_clone(kwargs))
                    except Exception as e:  # noqa: BLE001 - any failure is the block's, named below
                        raise UnfaithfulRebuildError(
                            f"the rebuilt {where} ({type(block).__name__}) fails on the example input "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); the model is unchanged. "
                            "Its trace likely specialised Python control flow on its inputs; exclude it with "
                            "exclude=[...]",
                            owner=path,
                        ) from e
                    if not _same(got, expected):
                        raise UnfaithfulRebuildError(
                            f"the rebuilt {where} ({type(block).__name__}) computes other outputs than the "
                            "original on the example input; the model is unchanged. Its trace likely "
                            "specialised Python control flow on its inputs; exclude it with exclude=[...]",
                            owner=path,
                        )
            if graphs is not None and graphs[1] is not None:
                _check_train_mode(path, block, graphs[1], calls)
        finally:
            for h in hooks:
                h.remove()
            graphs = block.__dict__.get("_se_graphs")
            if graphs is not None and graphs[1] is not None:
                block.graph = graphs[1] if block.training else graphs[0]
