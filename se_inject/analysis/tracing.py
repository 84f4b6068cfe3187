"""Tracing: the fx tracer (timm's no-trace modules and functions, mode-dependent leaves) and
``trace`` that leaves the user's model as it was (``mode_reads``: whether it read a ``training``
flag). One trace at a time in the process (``trace`` runs in the sandbox, which holds the
analysis lock), and fx's patches of ``nn.Module`` never outlive it."""

from __future__ import annotations

import bisect
import dis
import functools
import inspect
import operator
import threading
import types
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch.fx as fx
from torch import nn

from ..se_block import SEBlock, SEHook
from .calls import PLAIN, VAR_KINDS, CallRecord, KeepsOutputType, arg_kind
from .causes import watch_jit_isinstance
from .mode_reads import watch_mode_reads
from .sandbox import preserved_state
from .size_decisions import decide_on_sizes

__all__ = ["SETracer", "Traced", "trace", "mode_dependent_leaves", "training_mode"]


def mode_dependent_leaves() -> tuple[type[nn.Module], ...]:
    """Module classes whose traced form depends on train/eval mode, kept as leaves.

    Traced, timm's ``DropPath`` disappears in eval mode and becomes a fixed random mask in train
    mode; torchvision's ``StochasticDepth`` bakes in ``training``. As leaves they stay calls.
    """
    leaves: list[type[nn.Module]] = []
    try:
        from torchvision.ops import StochasticDepth

        leaves.append(StochasticDepth)
    except ImportError:  # pragma: no cover - torchvision is a dependency
        pass
    try:
        from timm.layers import DropBlock2d, DropPath

        leaves += [DropPath, DropBlock2d]
    except ImportError:  # pragma: no cover - timm is a dependency
        pass
    return tuple(leaves)


def _timm_notrace() -> tuple[tuple[type[nn.Module], ...], tuple[Callable[..., Any], ...]]:
    """timm's registries of modules and functions that do not trace (its public helpers)."""
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:  # pragma: no cover
        return (), ()
    modules = tuple(m for m in get_notrace_modules() if isinstance(m, type))
    functions = tuple(f for f in get_notrace_functions() if callable(f))
    return modules, functions


class SETracer(KeepsOutputType, fx.Tracer):
    """fx tracer with timm's no-trace modules and functions, plus mode-dependent leaves.

    ``inline``, when given, turns the tracer around: every submodule is a leaf except the
    module paths listed (used to rebuild one block while leaving its children as calls).
    """

    def __init__(
        self,
        *,
        leaf_modules: Sequence[type[nn.Module]] = (),
        autowrap_functions: Sequence[Callable[..., Any]] = (),
        inline: Iterable[str] | None = None,
        var_positional: bool = False,
        opaque: Iterable[str] = (),
        sizes: Callable[[fx.Graph, fx.Node], Any] | None = None,
    ) -> None:
        timm_modules, timm_functions = _timm_notrace()
        super().__init__(autowrap_functions=tuple(autowrap_functions) + timm_functions)
        # SEBlock is a leaf so our own blocks read as one call (and as attention) in the graph.
        self.leaf_modules = tuple(leaf_modules) + timm_modules + mode_dependent_leaves() + (SEBlock,)
        self.inline = None if inline is None else frozenset(inline)
        self.var_positional = var_positional
        self.opaque = frozenset(opaque)
        self.module_calls: dict[str, list[CallRecord]] = {}
        #: Per submodule traced through: the node each call returned (None: not one traced value).
        self.module_outputs: dict[str, list[fx.Node | None]] = {}
        self._aliases: dict[int, list[str]] | None = None
        self._thread = threading.get_ident()
        self.sizes, self.specialised, self.evaluating = sizes, list[str](), False  # see size_decisions

    def to_bool(self, obj: fx.Proxy) -> bool:
        decided = decide_on_sizes(self, obj.node)
        return super().to_bool(obj) if decided is None else decided

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        self._thread = threading.get_ident()
        return super().trace(root, concrete_args)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        # fx's patch of ``nn.Module.__getattr__`` is process-wide: another thread's modules
        # get their plain attributes (see ``call_module``).
        if threading.get_ident() != self._thread or self.evaluating:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def path_of_module(self, mod: nn.Module) -> str:
        # A module registered under several names (ultralytics' Conv blocks share one SiLU) is
        # named where it is called from: the alias inside the module being traced. fx names it
        # by its first registration, which puts the call in another block.
        if self._aliases is None:
            found: dict[int, list[str]] = {}
            for name, sub in self.root.named_modules(remove_duplicate=False):
                found.setdefault(id(sub), []).append(name)
            self._aliases = {k: v for k, v in found.items() if len(v) > 1}
        paths = self._aliases.get(id(mod))
        if paths:
            scope = self.scope.module_path
            for path in paths:
                if path.rpartition(".")[0] == scope:
                    return path
        return super().path_of_module(mod)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # fx patches ``nn.Module.__call__`` for the whole process while it traces: a forward
        # another thread runs meanwhile (not an analysis: those wait for the analysis lock) is
        # the plain call, not a part of this trace.
        if threading.get_ident() != self._thread or self.evaluating:
            return forward(*args, **kwargs)
        path = self.path_of_module(m)
        if self.is_leaf_module(m, path):
            returned = super().call_module(m, forward, args, kwargs)
            # An SE block attached to a leaf runs in its hook, which fx skips: trace it as the
            # call it is, so an injected model reads as attended (inject_se is idempotent).
            for hook in m._forward_hooks.values():
                if isinstance(hook, SEHook):
                    returned = self.call_module(hook.se, hook.se.forward, (returned,), {})
            return returned
        calls = self.module_calls.setdefault(path, [])
        calls.append(
            (
                tuple((arg_kind(a), a if isinstance(a, PLAIN) else None) for a in args),
                tuple((k, arg_kind(v), v if isinstance(v, PLAIN) else None) for k, v in sorted(kwargs.items())),
            )
        )
        returned = super().call_module(m, forward, args, kwargs)
        # What the call returned, when it is one traced value: an SE block can be attached to
        # that module's output (``inject.attach``) instead of rebuilding its caller.
        outputs = self.module_outputs.setdefault(path, [])
        outputs.append(returned.node if isinstance(returned, fx.Proxy) else None)
        return returned

    def create_args_for_root(self, root_fn: Any, is_module: bool, concrete_args: Any = None) -> Any:
        # ``*args`` / ``**kwargs`` (every transformers layer takes ``**kwargs``) would become
        # proxies, and ``kwargs.get(...)`` control flow fails: trace them empty, as a call
        # that passes nothing extra would have them.
        return super().create_args_for_root(_without_var_args(root_fn, self.var_positional), is_module, concrete_args)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        count = _static_length(node)
        return _PartsProxy(node, self, count) if count is not None else _Proxy(node, self)

    def iter(self, obj: fx.Proxy) -> Any:
        # ``list(x.chunk(2, 1))`` and ``a, b = x.split([c1, c2], 1)`` have a length fixed by
        # their arguments (YOLO's C2f blocks, GhostNet, CSP stages): iterate the parts.
        count = _static_length(obj.node)
        if count is not None:
            return iter([obj[i] for i in range(count)])
        return super().iter(obj)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.inline is not None and module_qualified_name not in self.inline:
            return True
        if isinstance(m, self.leaf_modules) or module_qualified_name in self.opaque:
            return True
        return super().is_leaf_module(m, module_qualified_name)


@functools.lru_cache(maxsize=1024)
def _instructions(code: types.CodeType) -> tuple[tuple[int, str, Any], ...]:
    """(offset, opname, argval) of each bytecode instruction of ``code``."""
    return tuple((i.offset, i.opname, i.argval) for i in dis.get_instructions(code))


class _Proxy(fx.Proxy):
    """``fx.Proxy`` whose ``__iter__`` reads the caller's bytecode once per code object.

    fx's ``Proxy.__iter__`` disassembles the whole calling function at every ``a, b = proxy``
    to find the ``UNPACK_SEQUENCE`` there (about 1 ms each in EfficientViT's attention, which
    unpacks in a loop over heads). Same decision, same fallback to ``tracer.iter``."""

    def __iter__(self) -> Iterator[fx.Proxy]:
        frame = inspect.currentframe()
        calling = frame.f_back if frame is not None else None
        if calling is None:
            return super().__iter__()
        instructions = _instructions(calling.f_code)
        index = bisect.bisect_left(instructions, calling.f_lasti, key=lambda inst: inst[0])
        _, opname, argval = instructions[index]
        if opname == "UNPACK_SEQUENCE":
            return (self[i] for i in range(argval))  # type: ignore[index]
        return self.tracer.iter(self)

    def __setitem__(self, index: Any, value: Any) -> None:
        # In-place writes into a traced tensor (Swin's attention mask built for the input's
        # size: ``img_mask[:, h0:h1, w0:w1, :] = cnt``) are recorded as ``operator.setitem``,
        # which fx keeps as a side-effectful call, in graph order.
        self.tracer.create_proxy("call_function", operator.setitem, (self, index, value), {})


class _PartsProxy(_Proxy):
    """The parts of a ``chunk``/``split``: ``list(...)`` asks their number first."""

    def __init__(self, node: fx.Node, tracer: fx.Tracer, count: int) -> None:
        super().__init__(node, tracer)
        self._count = count

    def __len__(self) -> int:
        return self._count


def _static_length(node: fx.Node) -> int | None:
    """Number of parts of a ``chunk(n)`` or ``split([sizes])`` node, known without values."""
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", None)
    if node.op not in ("call_method", "call_function") or len(node.args) < 2:
        return None
    arg = node.args[1] if "chunks" not in node.kwargs and "split_size_or_sections" not in node.kwargs else None
    arg = node.kwargs.get("chunks", node.kwargs.get("split_size_or_sections", arg))
    if name == "chunk" and isinstance(arg, int):
        return arg
    if name == "split" and isinstance(arg, (list, tuple)) and all(isinstance(a, int) for a in arg):
        return len(arg)
    return None


def _without_var_args(fn: Callable[..., Any], keep_var_positional: bool = False) -> Callable[..., Any]:
    """``fn`` behind a function with the same named parameters and no ``*args``/``**kwargs``
    (``*args`` kept when the call passes arguments into it: fx then traces it as one input).

    fx reads the parameters from the code object, so the wrapper is real code, compiled once
    per signature shape; it does not set ``__wrapped__`` (fx would unwrap it again).
    """
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return fn
    dropped = (inspect.Parameter.VAR_KEYWORD,) if keep_var_positional else VAR_KINDS
    if not any(p.kind in dropped for p in params):
        return fn
    kept = [p for p in params if p.kind not in dropped]
    if not all(p.name.isidentifier() for p in kept):
        return fn
    namespace: dict[str, Any] = {"_fn": fn}
    parts: list[str] = []
    call: list[str] = []
    star = False
    for p in kept:
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            parts.append(f"*{p.name}")
            call.append(f"*{p.name}")
            star = True
            continue
        if p.kind is inspect.Parameter.KEYWORD_ONLY and not star:
            parts.append("*")
            star = True
        if p.default is inspect.Parameter.empty:
            parts.append(p.name)
        else:
            namespace[f"_default_{p.name}"] = p.default
            parts.append(f"{p.name}=_default_{p.name}")
        call.append(f"{p.name}={p.name}" if p.kind is inspect.Parameter.KEYWORD_ONLY else p.name)
    source = f"def forward({', '.join(parts)}):\n    return _fn({', '.join(call)})\n"
    exec(compile(source, f"<se_inject: {getattr(fn, '__qualname__', 'forward')} without *args/**kwargs>", "exec"), namespace)
    return namespace["forward"]


@contextmanager
def training_mode(module: nn.Module, mode: bool):
    """Set every submodule's mode, restoring each one's own flag afterwards."""
    saved = [(m, m.training) for m in module.modules()]
    try:
        module.train(mode)
        yield
    finally:
        for m, flag in saved:
            m.training = flag


class Traced(NamedTuple):
    """A trace: the graph, the tensor constants the tracer made, and how each submodule that
    was traced through got called (``CallKind`` per argument, one tuple per call)."""

    graph: fx.Graph
    constants: dict[str, Any]
    calls: dict[str, list[CallRecord]]
    #: Whether the traced code read a ``training`` flag (else the other mode traces the same).
    read_mode: bool = True
    #: Attributes the traced code assigned or mutated (``calls`` of ``self.calls += 1``,
    #: ``head.anchors``): side effects a graph cannot hold, undone after the trace.
    side_effects: tuple[str, ...] = ()
    #: Per submodule traced through, the node each of its calls returned (None: not one value).
    outputs: dict[str, list[fx.Node | None]] = {}
    #: Where control flow was decided on sizes at the analysis input (``trace(sizes=...)``).
    specialised: tuple[str, ...] = ()


_MISSING = object()


def trace(
    module: nn.Module,
    *,
    training: bool = False,
    inline: Iterable[str] | None = None,
    concrete_args: dict[str, Any] | None = None,
    var_positional: bool = False,
    opaque: Iterable[str] = (),
    sizes: Callable[[fx.Graph, fx.Node], Any] | None = None,
) -> Traced:
    """Trace ``module`` in the given mode; ``var_positional``: the call passes arguments into
    the forward's ``*args`` (else it is traced empty, as ``**kwargs`` always is); ``opaque``:
    paths of submodules kept as calls (parts that do not trace themselves); ``sizes``: the value of
    a node at the analysis input, to decide conditions on sizes (``size_decisions``).

    The tracer stores tensor constants as attributes of the traced root; they are removed from
    ``module`` again and returned, so tracing never changes the user's model.
    """
    # Forwards that set attributes lazily (torchvision's MultiScaleRoIAlign caches its scales,
    # timm's LeViT fills a dict of attention biases) would keep proxies: the sandbox puts every
    # module back as it was, keeping only the constants the tracer added to the root. What
    # changed is noted first: side effects a rebuilt block would lose.
    tracer = SETracer(inline=inline, var_positional=var_positional, opaque=opaque, sizes=sizes)
    reads: list[str] = []
    effects: list[str] = []
    with preserved_state(module, rng=False):
        with training_mode(module, training):
            # Noted after the mode switch: what ``train()`` itself changes (timm's EfficientViT
            # empties its attention-bias cache there) is not the forward's doing.
            saved = [
                (path, m, dict(m.__dict__), {k: dict(m.__dict__[k]) for k in _STATE_DICTS})
                for path, m in module.named_modules()
            ]
            before = set(module.__dict__)
            with watch_mode_reads(module, reads), watch_jit_isinstance(), _module_patches_undone():
                graph = tracer.trace(module, concrete_args=concrete_args)
        added = {k: module.__dict__[k] for k in set(module.__dict__) - before}
        for path, m, attrs, state in saved:
            made = added if m is module else {}
            # An attribute, parameter, buffer or child (re)assigned is a side effect; a plain
            # dict or list filled in place is taken for a cache (LeViT's attention biases),
            # which a graph recomputes: the sandbox empties it again, it is not reported.
            changed = [k for k in _rebound(attrs, m.__dict__) if k not in made]
            changed += [name for k, held in state.items() for name in _rebound(held, attrs[k])]
            effects += [f"{path}.{k}" if path else k for k in sorted(set(changed)) if k != "training"]
    _restore_parameter_names(graph, concrete_args or {})
    found = tracer.module_calls, bool(reads), tuple(effects), tracer.module_outputs, tuple(tracer.specialised)
    return Traced(graph, added, *found)


@contextmanager
def _module_patches_undone() -> Iterator[None]:
    """fx patches ``nn.Module.__call__`` and ``__getattr__`` while it traces; whatever happens
    in the trace (an error, an interrupt), they are torch's own again afterwards."""
    call, getattr_ = nn.Module.__call__, nn.Module.__getattr__
    try:
        yield
    finally:
        if nn.Module.__call__ is not call:
            nn.Module.__call__ = call  # type: ignore[method-assign]
        if nn.Module.__getattr__ is not getattr_:
            nn.Module.__getattr__ = getattr_  # type: ignore[method-assign]


def _rebound(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Keys of ``now`` bound to other objects than in its earlier copy ``before`` (or added, or gone)."""
    return [k for k in {*before, *now} if before.get(k, _MISSING) is not now.get(k, _MISSING)]


#: ``nn.Module``'s dicts of parameters, buffers and children: a forward reassigning one of
#: those changes the module's state, not a cache.
_STATE_DICTS = ("_parameters", "_buffers", "_modules")


def _restore_parameter_names(graph: fx.Graph, concrete_args: dict[str, Any]) -> None:
    """fx names the input of a constant parameter ``mask_1``; a rebuilt block's forward must
    take ``mask=`` as the original does."""
    taken = {str(n.target) for n in graph.nodes if n.op == "placeholder"}
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        name, _, count = str(node.target).rpartition("_")
        leaf = name in concrete_args and not isinstance(concrete_args[name], (list, tuple, dict))
        if count == "1" and leaf and name not in taken:  # (a tuple is flattened: leave it to fx)
            node.target = name
            taken.add(name)
