"""Shapes: ``node.meta["val"]`` for every node, on meta tensors first (fake tensors, then a real
run on zeros, when a graph needs them), and the inputs each submodule gets in a forward pass."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_map

from .calls import extra_keywords, positional_args
from .causes import is_known_cause
from .ops import SHAPE_KEEPING_FUNCTIONS, keeps_shape
from .shortcuts import ShapeShortcuts, recurrent_output
from .tracing import training_mode

log = logging.getLogger(__name__)

__all__ = ["propagate_shapes", "record_module_inputs", "RecordedInputs", "meta_copy", "traced_value"]


def _fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def _to_fake(mode: Any, value: Any) -> Any:
    """Every tensor in ``value`` (nested lists, tuples, dicts) as an empty fake one of its shape."""

    def fake(v: Any) -> Any:
        if not isinstance(v, torch.Tensor):
            return v
        with mode:
            return torch.empty(v.shape, dtype=v.dtype, device=v.device)

    return tree_map(fake, value)


class _ValueProp(fx.Interpreter):
    """Runs a graph and keeps each node's value in ``node.meta["val"]``. Runs ``graph`` on
    the module it was traced from (no ``GraphModule`` is built: its code generation costs
    more than the run), with the tensor constants the trace made."""

    def __init__(self, module: nn.Module, graph: fx.Graph | None = None, constants: dict[str, Any] | None = None) -> None:
        super().__init__(module, graph=graph)
        self.constants = constants or {}

    def fetch_attr(self, target: str) -> Any:
        if target in self.constants:
            return self.constants[target]
        return super().fetch_attr(target)

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        n.meta["val"] = result
        return result


def _meta_like(t: torch.Tensor) -> torch.Tensor:
    # torch.empty_like on a meta tensor runs a Python reference (~50 us); the factory does not.
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


def meta_copy(value: Any) -> Any:
    """``value`` with every tensor (also inside lists, tuples and dicts) replaced by an empty
    meta tensor of its shape and dtype."""
    return tree_map(
        lambda v: torch.empty(v.shape, dtype=v.dtype, device="meta") if isinstance(v, torch.Tensor) else v, value
    )


class _MetaProp(_ValueProp):
    """Shape propagation on the meta device: builtin layers run with meta copies of their
    weights; norms, activations and dropouts just pass their input's shape on."""

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        module = self.fetch_attr(target)
        if keeps_shape(module) and len(args) == 1 and isinstance(args[0], torch.Tensor) and not kwargs:
            return _meta_like(args[0])
        # reason: a meta LSTM unrolls every time step in Python (seconds for timm's Sequencer).
        shortcut = recurrent_output(module, tuple(args), dict(kwargs))
        if shortcut is not None:
            return shortcut
        state = {k: meta_copy(v) for k, v in [*module.named_parameters(), *module.named_buffers()]}
        return torch.func.functional_call(module, state, tuple(args), dict(kwargs))

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        # reason: meta batch_norm runs a Python decomposition (~10 ms a call); its shape is its input's.
        if target in SHAPE_KEEPING_FUNCTIONS and args and isinstance(args[0], torch.Tensor):
            return _meta_like(args[0])
        return super().call_function(target, args, kwargs)

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        return meta_copy(super().get_attr(target, args, kwargs))


def propagate_shapes(
    module: nn.Module, args: Sequence[Any], *, graph: fx.Graph | None = None, constants: dict[str, Any] | None = None
) -> None:
    """Write ``node.meta["val"]`` for every node of ``graph`` (traced from ``module``; by
    default ``module`` is a ``GraphModule`` and its own graph) without computing anything real.

    Meta tensors first: on this project's reference machine they take well under a second
    for ResNet-152, where ``FakeTensorProp`` takes 6-10 s (its batch-norm decomposition
    dominates). Then fake tensors, for graphs that need a real device; a real run last.
    """
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    graph = module.graph if graph is None else graph  # type: ignore[assignment]
    try:
        with torch.no_grad(), ShapeShortcuts():
            _MetaProp(module, graph, constants).run(*meta_copy(list(args)))
        return
    except Exception as e:  # noqa: BLE001 - any failure means "try the next way"
        log.debug("meta propagation failed (%s); trying fake tensors", e)
    mode = _fake_mode()
    try:
        with torch.no_grad(), ShapeShortcuts():
            FakeTensorProp(_as_graph_module(module, graph, constants or {}), mode).propagate(*_to_fake(mode, list(args)))
        return
    except Exception as e:  # noqa: BLE001
        log.debug("fake tensor propagation failed (%s); running for real", e)
        fake_error = e
    try:
        with torch.no_grad():
            _ValueProp(module, graph, constants).run(*[_real_zeros(a) for a in args])
    except Exception as e:
        # A graph that reads values (``.item()``, a boolean mask) fails on fake tensors for that
        # reason; on zeros it may then fail otherwise (an empty mask): keep the cause.
        if is_known_cause(fake_error) and not is_known_cause(e):
            raise e from fake_error
        raise


def _as_graph_module(module: nn.Module, graph: fx.Graph, constants: dict[str, Any]) -> fx.GraphModule:
    if isinstance(module, fx.GraphModule) and module.graph is graph:
        return module
    attrs: dict[str, Any] = {}
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module"):
            target = str(node.target)
            attrs[target] = constants[target] if target in constants else _resolve(module, target)
    return fx.GraphModule(attrs, graph)


def _resolve(module: nn.Module, target: str) -> Any:
    obj: Any = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _real_zeros(value: Any) -> Any:
    """A real stand-in for one input: zeros, except integer tensors holding values (lengths,
    indices), which are kept: a forward computing ``lengths.max().item()`` takes its sizes from
    them, as it will at run time."""
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point() and not value.is_complex() and not value.is_meta and value.numel():
            return value
        return torch.zeros(value.shape, dtype=value.dtype, device=value.device)
    if isinstance(value, (list, tuple)):
        return type(value)(_real_zeros(v) for v in value)
    return value


def _as_called(value: Any) -> Any:
    """A recorded input as it was at the call: each tensor as an alias of its own (same storage,
    its own shape), so a forward that later frees or reshapes its input in place (a memory-saving
    reversible block's ``x.set_()``, an in-place ``squeeze_``) leaves the shape as recorded; an
    emptied storage (``x.untyped_storage().resize_(0)``) keeps the shape too, all analysis reads."""
    return tree_map(lambda v: v.detach() if isinstance(v, torch.Tensor) else v, value)


class RecordedInputs(dict[str, tuple[Any, ...]]):
    """Positional inputs of each submodule's first call, by module path; ``extra_keywords``
    names the keyword arguments a call passed into the forward's ``**kwargs``."""

    def __init__(self) -> None:
        super().__init__()
        self.extra_keywords: dict[str, tuple[str, ...]] = {}

    def under(self, rel: str) -> RecordedInputs:
        """The entries under the submodule ``rel``, with paths relative to it."""
        sub = RecordedInputs()
        prefix = rel + "."
        for key, value in self.items():
            if key.startswith(prefix):
                sub[key[len(prefix):]] = value
        for key, value in self.extra_keywords.items():
            if key.startswith(prefix):
                sub.extra_keywords[key[len(prefix):]] = value
        return sub


def record_module_inputs(
    module: nn.Module, args: Sequence[Any], enough: Callable[[RecordedInputs], bool] | None = None
) -> RecordedInputs:
    """Run ``module`` and return the positional inputs of each submodule's first call.

    Keyword arguments are put in their positional places (parameters skipped in between get
    their defaults), so a block called as ``layer(x, mask=None)`` is traced like ``layer(x,
    None)``. Used for models whose top level does not trace: their blocks are then traced on
    their own, with the inputs recorded here. Fake tensors first; a forward on zeros when
    control flow depends on values, unless what the fake forward recorded before it stopped
    is ``enough`` (a detector's postprocessing stops it after the backbone and heads ran; a
    real forward at its 800 px would cost seconds). A forward that fails part-way still
    yields what ran before.
    """
    names = {id(m): n for n, m in module.named_modules()}
    recorded = RecordedInputs()

    def hook(mod: nn.Module, inputs: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        name = names.get(id(mod))
        if name is not None and name not in recorded:
            recorded[name] = _as_called(positional_args(mod, inputs, kwargs))
            extra = extra_keywords(mod, kwargs)
            if extra:
                recorded.extra_keywords[name] = extra

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in module.modules()]
    try:
        with torch.no_grad(), training_mode(module, False):
            try:
                fake_args = _to_fake(_fake_mode(), list(args))
                with ShapeShortcuts():  # fake linear and norm layers cost 1.5-2.5 ms a call
                    module(*fake_args)
            except Exception as e:  # noqa: BLE001 - data-dependent control flow: run for real
                # reason: a forward stopped before any part ran (``lengths.max().item()`` first)
                # recorded nothing to be enough with: its parts are reached only for real.
                if enough is not None and len(recorded) > 1 and enough(recorded):
                    log.debug("forward on fake tensors stopped early (%s); what ran is enough", e)
                    return recorded
                log.debug("forward on fake tensors stopped early (%s); running on zeros", e)
                recorded.clear()
                recorded.extra_keywords.clear()
                try:
                    module(*[_real_zeros(a) for a in args])
                except Exception as e2:  # noqa: BLE001 - partial records are still useful
                    log.debug("forward on zeros stopped early: %s", e2)
    finally:
        for h in handles:
            h.remove()
    return recorded


def traced_value(module: nn.Module, args: Sequence[Any], graph: fx.Graph, node: fx.Node) -> Any:
    """The value of ``node`` in ``graph``, a trace of ``module`` still being made, at the
    analysis input ``args``, on meta tensors only: a size, or a condition on sizes, comes out
    as a Python value; anything read from data stays a meta tensor (never a real run)."""
    needed: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n not in needed:
            needed.add(n)
            stack.extend(n.all_input_nodes)
    part = fx.Graph()
    copies: dict[fx.Node, fx.Node] = {}
    for n in graph.nodes:
        if n.op == "placeholder" or n in needed:
            copies[n] = part.node_copy(n, copies.__getitem__)
    part.output(copies[node])
    with torch.no_grad(), ShapeShortcuts():
        _MetaProp(module, part).run(*meta_copy(list(args)))
    return copies[node].meta.get("val")
