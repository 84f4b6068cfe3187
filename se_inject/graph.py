"""Tracing and graph facts: tracer, shapes, qualified node names, dominators, path costs, axes.

Everything here describes a graph; nothing decides placement (that is ``sites.py``) and nothing
changes a model (``rewrite.py``). Facts are returned from small functions and one ``DataFlow``
object rather than hidden in ``node.meta``, apart from ``node.meta["val"]``, which
``FakeTensorProp`` writes.
"""

from __future__ import annotations

import inspect
import logging
import operator
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .block import SEBlock
from .node_names import call_stack, input_name, node_scope, qualified_names

log = logging.getLogger(__name__)

__all__ = [
    "SETracer",
    "DataFlow",
    "trace",
    "Traced",
    "standalone_concrete_args",
    "call_concrete_args",
    "passes_var_positional",
    "required_positional",
    "standalone_call",
    "leading_tensors",
    "propagate_shapes",
    "record_module_inputs",
    "RecordedInputs",
    "qualified_names",
    "node_scope",
    "call_stack",
    "channel_axis",
    "is_add",
    "is_cat",
    "is_upsample",
    "is_activation",
    "is_norm",
    "is_conv",
    "is_spatial_conv",
    "is_unary_elementwise",
    "input_name",
    "cat_dim",
    "trailing_scaling_input",
    "is_layout",
    "is_scaling",
    "is_linear",
    "channel_slice_of",
    "gating_products",
    "tensor_shape",
    "mode_dependent_leaves",
]


# --------------------------------------------------------------------------------------------
# Tracing


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
    try:
        from timm.layers import _fx as timm_fx
    except ImportError:  # pragma: no cover
        return (), ()
    modules = tuple(m for m in timm_fx.get_notrace_modules() if isinstance(m, type))
    functions = tuple(f for f in timm_fx.get_notrace_functions() if callable(f))
    return modules, functions


class SETracer(fx.Tracer):
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
    ) -> None:
        timm_modules, timm_functions = _timm_notrace()
        super().__init__(autowrap_functions=tuple(autowrap_functions) + timm_functions)
        # SEBlock is a leaf so our own blocks read as one call (and as attention) in the graph.
        self.leaf_modules = tuple(leaf_modules) + timm_modules + mode_dependent_leaves() + (SEBlock,)
        self.inline = None if inline is None else frozenset(inline)
        self.var_positional = var_positional
        self.opaque = frozenset(opaque)
        self.module_calls: dict[str, list[CallRecord]] = {}
        self._aliases: dict[int, list[str]] | None = None

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
        if not self.is_leaf_module(m, self.path_of_module(m)):
            calls = self.module_calls.setdefault(self.path_of_module(m), [])
            calls.append(
                (
                    tuple((_arg_kind(a), a if isinstance(a, _PLAIN) else None) for a in args),
                    tuple((k, _arg_kind(v), v if isinstance(v, _PLAIN) else None) for k, v in sorted(kwargs.items())),
                )
            )
        return super().call_module(m, forward, args, kwargs)

    def create_args_for_root(self, root_fn: Any, is_module: bool, concrete_args: Any = None) -> Any:
        # ``*args`` / ``**kwargs`` (every transformers layer takes ``**kwargs``) would become
        # proxies, and ``kwargs.get(...)`` control flow fails: trace them empty, as a call
        # that passes nothing extra would have them.
        return super().create_args_for_root(_without_var_args(root_fn, self.var_positional), is_module, concrete_args)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        count = _static_length(node)
        return _PartsProxy(node, self, count) if count is not None else super().proxy(node)

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


_VAR_KINDS = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


class _PartsProxy(fx.Proxy):
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
    dropped = (inspect.Parameter.VAR_KEYWORD,) if keep_var_positional else _VAR_KINDS
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
def _training_mode(module: nn.Module, mode: bool):
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


_PLAIN = (bool, int, float, str, type(None))
_PLAIN_KINDS = frozenset(t.__name__ for t in _PLAIN)
_MISSING = object()

#: One recorded call: (kind, value if plain data) of each positional argument (kind "tensor"
#: for traced values), and (name, kind, value if plain data) for each keyword argument.
CallRecord = tuple[tuple[tuple[str, Any], ...], tuple[tuple[str, str, Any], ...]]


def _arg_kind(value: Any) -> str:
    return "tensor" if isinstance(value, fx.Proxy) else type(value).__name__


def trace(
    module: nn.Module,
    *,
    training: bool = False,
    inline: Iterable[str] | None = None,
    concrete_args: dict[str, Any] | None = None,
    var_positional: bool = False,
    opaque: Iterable[str] = (),
) -> Traced:
    """Trace ``module`` in the given mode; ``var_positional``: the call passes arguments into
    the forward's ``*args`` (else it is traced empty, as ``**kwargs`` always is); ``opaque``:
    paths of submodules kept as calls (parts that do not trace themselves).

    The tracer stores tensor constants as attributes of the traced root; they are removed from
    ``module`` again and returned, so tracing never changes the user's model.
    """
    # Forwards that set attributes lazily (torchvision's MultiScaleRoIAlign caches its scales)
    # would keep proxies: every module's attributes are put back as they were.
    saved = [(m, dict(m.__dict__)) for m in module.modules()]
    before = set(module.__dict__)
    tracer = SETracer(inline=inline, var_positional=var_positional, opaque=opaque)
    reads: list[str] = []
    try:
        with _training_mode(module, training), _watch_mode_reads(module, reads):
            graph = tracer.trace(module, concrete_args=concrete_args)
    finally:
        added = {k: module.__dict__[k] for k in set(module.__dict__) - before}
        for m, attrs in saved:
            now = m.__dict__
            if len(now) != len(attrs) or any(now.get(k, _MISSING) is not v for k, v in attrs.items()):
                now.clear()
                now.update(attrs)
    _restore_parameter_names(graph, concrete_args or {})
    return Traced(graph, added, tracer.module_calls, bool(reads))


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
def _watch_mode_reads(module: nn.Module, reads: list[str]):
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


def standalone_concrete_args(module: nn.Module, passed: int = 0) -> dict[str, Any]:
    """Defaults of the parameters of ``module.forward`` that a call with ``passed`` positional
    arguments leaves out: traced as placeholders they would be taken as given (``attn_mask is
    not None`` would hold), so they are traced as the constants they are."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    return {
        p.name: p.default
        for i, p in enumerate(params)
        if i >= passed
        and p.default is not inspect.Parameter.empty
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }


def passes_var_positional(module: nn.Module, passed: int) -> bool:
    """Whether ``passed`` positional arguments reach ``module.forward``'s ``*args``."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    named = sum(p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD) for p in params)
    return passed > named and any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)


def call_concrete_args(module: nn.Module, args: Sequence[Any]) -> dict[str, Any]:
    """Concrete values for tracing ``module`` as it was called with positional ``args``:
    plain-data arguments (``None`` masks, ``(H, W)`` sizes, flags) are traced as the constants
    they were, parameters not passed as their defaults; tensors stay placeholders."""
    concrete = standalone_concrete_args(module, len(args))
    try:
        params = [p for p in inspect.signature(module.forward).parameters.values() if p.kind not in _VAR_KINDS]
    except (TypeError, ValueError):
        return concrete
    for param, value in zip(params, args, strict=False):
        if _is_plain(value):
            concrete[param.name] = value
    return concrete


def _is_plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    return isinstance(value, _PLAIN)


def leading_tensors(args: Sequence[tuple[str, Any]]) -> int:
    """How many of a recorded call's positional arguments, from the first, are tensors: the
    placeholders a block rebuilt on its own is traced with."""
    count = 0
    for kind, _ in args:
        if kind != "tensor":
            break
        count += 1
    return count


def standalone_call(
    module: nn.Module, args: tuple[tuple[str, Any], ...], kwargs: tuple[tuple[str, str, Any], ...]
) -> bool:
    """Whether a call with these arguments is what ``module`` computes when traced on its own
    with its leading tensor arguments as placeholders: the required positional arguments plus
    optional tensors (DLA's ``shortcut``), then (positionally or by keyword) only plain values
    that repeat their parameter's default."""
    try:
        params = [p for p in inspect.signature(module.forward).parameters.values() if p.kind not in _VAR_KINDS]
    except (TypeError, ValueError):
        return False
    required = required_positional(module)
    tensors = leading_tensors(args)
    if required is None or tensors < required or len(args) > len(params):
        return False
    given = [(p.name, kind, value) for p, (kind, value) in zip(params[tensors:], args[tensors:], strict=False)]
    by_name = {p.name: p for p in params}
    for name, kind, value in [*given, *kwargs]:
        param = by_name.get(name)
        if kind not in _PLAIN_KINDS or param is None or param.default is inspect.Parameter.empty:
            return False  # a tensor, or data recorded without its value (a list of tensors)
        if not (value is param.default or (isinstance(value, _PLAIN) and value == param.default)):
            return False
    return True


def required_positional(module: nn.Module) -> int | None:
    """How many named positional parameters ``module.forward`` requires (``*args`` is traced
    empty, see ``SETracer``); None when the signature cannot be read."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    return sum(
        1
        for p in params
        if p.default is inspect.Parameter.empty
        and p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    )


def _fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def _to_fake(mode: Any, value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        with mode:
            return torch.empty(value.shape, dtype=value.dtype, device=value.device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_fake(mode, v) for v in value)
    if isinstance(value, dict):
        return {k: _to_fake(mode, v) for k, v in value.items()}
    return value


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


def _meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.empty(value.shape, dtype=value.dtype, device="meta")
    if isinstance(value, (list, tuple)):
        return type(value)(_meta(v) for v in value)
    if isinstance(value, dict):
        return {k: _meta(v) for k, v in value.items()}
    return value


def _keeps_shape(module: nn.Module) -> bool:
    if isinstance(module, _SHAPE_KEEPING_MODULES):
        return True
    return type(module).__module__ == "torch.nn.modules.activation" and not isinstance(module, nn.MultiheadAttention)


class _MetaProp(_ValueProp):
    """Shape propagation on the meta device: builtin layers run with meta copies of their
    weights; norms, activations and dropouts just pass their input's shape on."""

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        module = self.fetch_attr(target)
        if _keeps_shape(module) and len(args) == 1 and isinstance(args[0], torch.Tensor) and not kwargs:
            return _meta_like(args[0])
        state = {k: _meta(v) for k, v in [*module.named_parameters(), *module.named_buffers()]}
        return torch.func.functional_call(module, state, tuple(args), dict(kwargs))

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        # reason: meta batch_norm runs a Python decomposition (~10 ms a call); its shape is its input's.
        if target in _SHAPE_KEEPING_FUNCTIONS and args and isinstance(args[0], torch.Tensor):
            return _meta_like(args[0])
        return super().call_function(target, args, kwargs)

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        return _meta(super().get_attr(target, args, kwargs))


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
        with torch.no_grad():
            _MetaProp(module, graph, constants).run(*_meta(list(args)))
        return
    except Exception as e:  # noqa: BLE001 - any failure means "try the next way"
        log.debug("meta propagation failed (%s); trying fake tensors", e)
    mode = _fake_mode()
    try:
        with torch.no_grad():
            FakeTensorProp(_as_graph_module(module, graph, constants or {}), mode).propagate(*_to_fake(mode, list(args)))
        return
    except Exception as e:  # noqa: BLE001
        log.debug("fake tensor propagation failed (%s); running for real", e)
    with torch.no_grad():
        _ValueProp(module, graph, constants).run(*[_real_zeros(a) for a in args])


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
    if isinstance(value, torch.Tensor):
        return torch.zeros(value.shape, dtype=value.dtype, device=value.device)
    if isinstance(value, (list, tuple)):
        return type(value)(_real_zeros(v) for v in value)
    return value


class RecordedInputs(dict[str, tuple[Any, ...]]):
    """Positional inputs of each submodule's first call, by module path; ``extra_keywords``
    names the keyword arguments a call passed into the forward's ``**kwargs``."""

    def __init__(self) -> None:
        super().__init__()
        self.extra_keywords: dict[str, tuple[str, ...]] = {}


def _extra_keywords(module: nn.Module, kwargs: dict[str, Any]) -> tuple[str, ...]:
    try:
        named = {p.name for p in inspect.signature(module.forward).parameters.values() if p.kind not in _VAR_KINDS}
    except (TypeError, ValueError):
        return ()
    return tuple(sorted(k for k in kwargs if k not in named))


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
            recorded[name] = _positional(mod, inputs, kwargs)
            extra = _extra_keywords(mod, kwargs)
            if extra:
                recorded.extra_keywords[name] = extra

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in module.modules()]
    try:
        with torch.no_grad(), _training_mode(module, False):
            try:
                module(*_to_fake(_fake_mode(), list(args)))
            except Exception as e:  # noqa: BLE001 - data-dependent control flow: run for real
                if enough is not None and enough(recorded):
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


def _positional(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    if not kwargs:
        return tuple(args)
    try:
        params = [p for p in inspect.signature(module.forward).parameters.values() if p.kind not in _VAR_KINDS]
    except (TypeError, ValueError):
        return tuple(args)
    values = list(args)
    last_given = len(values)
    for p in params[len(args):]:
        if p.name in kwargs:
            values.append(kwargs[p.name])
            last_given = len(values)
        elif p.default is not inspect.Parameter.empty:
            values.append(p.default)
        else:
            break
    return tuple(values[:last_given])


# --------------------------------------------------------------------------------------------
# Names and scopes live in ``names.py`` (one implementation for the planner and the rewriter).

# --------------------------------------------------------------------------------------------
# Values


def _is_tensor_value(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (list, tuple)):
        return any(_is_tensor_value(v) for v in value)
    return False


def tensor_shape(node: fx.Node) -> tuple[int, ...] | None:
    value = node.meta.get("val")
    if isinstance(value, torch.Tensor):
        return tuple(int(s) for s in value.shape)
    return None


_SIZE_METHODS = {"size", "dim", "numel", "__len__", "ndimension", "nelement", "stride", "data_ptr"}


def _is_data_node(node: fx.Node) -> bool:
    if node.op == "output":
        return False
    if "val" in node.meta:
        return _is_tensor_value(node.meta["val"])
    # No value recorded (should be rare): judge by the op.
    if node.op == "call_method" and node.target in _SIZE_METHODS:
        return False
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] not in ("shape", "ndim", "dtype", "device", "is_cuda")
    return True


# --------------------------------------------------------------------------------------------
# Data flow: input dependence, dominators, regions, parametric costs


class DataFlow:
    """Data edges of one traced graph, with dominators over the input-dependent part.

    Edges that only carry sizes (``x.shape``, ``x.size(0)``) are not data: otherwise ViT's
    ``class_token.expand(n, -1, -1)`` would look input-dependent.
    """

    def __init__(self, graph: fx.Graph, root: nn.Module) -> None:
        self.graph = graph
        self.root = root
        self.order: list[fx.Node] = list(graph.nodes)
        self.index = {n: i for i, n in enumerate(self.order)}
        self.data = {n: _is_data_node(n) for n in self.order}
        self.live: dict[fx.Node, bool] = {}
        self.preds: dict[fx.Node, list[fx.Node]] = {}
        for n in self.order:
            ins = [p for p in n.all_input_nodes if self.data.get(p)]
            self.preds[n] = [p for p in ins if self.live.get(p)]
            self.live[n] = self.data[n] and (n.op == "placeholder" or bool(self.preds[n]))
        self.idom: dict[fx.Node, fx.Node | None] = {}
        for n in self.order:
            if not self.live[n]:
                continue
            new: fx.Node | None = None
            for i, p in enumerate(self.preds[n]):
                new = p if i == 0 else self._intersect(p, new)
            self.idom[n] = new
        self._parametric: dict[fx.Node, bool] = {}
        self._feeds: dict[fx.Node, bool] | None = None
        self._layer: dict[fx.Node, bool] = {}

    def _pos(self, n: fx.Node | None) -> int:
        return -1 if n is None else self.index[n]

    def _intersect(self, a: fx.Node | None, b: fx.Node | None) -> fx.Node | None:
        while a is not b:
            while self._pos(a) > self._pos(b):
                a = self.idom[a]  # type: ignore[index]
            while self._pos(b) > self._pos(a):
                b = self.idom[b]  # type: ignore[index]
        return a

    def live_inputs(self, node: fx.Node) -> list[fx.Node]:
        return self.preds.get(node, [])

    def region(self, fork: fx.Node, anchor: fx.Node) -> set[fx.Node]:
        """Nodes on data paths from ``fork`` to ``anchor``, both excluded."""
        lo = self.index[fork]
        seen: set[fx.Node] = set()
        stack = list(self.preds[anchor])
        while stack:
            n = stack.pop()
            if n in seen or self.index[n] <= lo:
                continue
            seen.add(n)
            stack.extend(self.preds[n])
        return seen

    def ancestors_within(self, node: fx.Node, region: set[fx.Node]) -> set[fx.Node]:
        seen: set[fx.Node] = set()
        stack = list(self.preds[node])
        while stack:
            n = stack.pop()
            if n in seen or n not in region:
                continue
            seen.add(n)
            stack.extend(self.preds[n])
        return seen

    def feeds_parametric(self, node: fx.Node) -> bool:
        """Whether some parametric layer reads ``node``'s value, directly or further on (one
        reverse pass over the graph, computed once)."""
        if self._feeds is None:
            feeds: dict[fx.Node, bool] = {}
            for n in reversed(self.order):
                feeds[n] = any(
                    n in self.preds.get(u, ()) and (self.is_parametric(u) or feeds.get(u, False)) for u in n.users
                )
            self._feeds = feeds
        return self._feeds.get(node, False)

    def is_layer(self, node: fx.Node) -> bool:
        """What path lengths count: parametric layers and per-sample normalisations (also
        without affine weights, as in PoolFormer's ``pool(norm(x)) - norm(x)``), not scalings
        by parameters (layer scale, ``res_scale``), which make no branch and lengthen no trunk."""
        cached = self._layer.get(node)
        if cached is None:
            cached = (self.is_parametric(node) and not is_scaling(self, node)) or is_norm(self.root, node)
            self._layer[node] = cached
        return cached

    def is_parametric(self, node: fx.Node) -> bool:
        """A layer with weights: a module with parameters, or an op fed a parameter or weight."""
        cached = self._parametric.get(node)
        if cached is not None:
            return cached
        result = False
        if node.op == "call_module":
            try:
                module = self.root.get_submodule(str(node.target))
                result = any(True for _ in module.parameters())
            except AttributeError:
                result = False
        elif node.op in ("call_function", "call_method"):
            result = any(
                self.data.get(p) and not self.live.get(p) for p in node.all_input_nodes
            )
        self._parametric[node] = result
        return result

    def path_costs(self, fork: fx.Node, region: set[fx.Node]) -> tuple[dict[fx.Node, int], dict[fx.Node, bool]]:
        """Longest count of layers (``is_layer``) from ``fork`` to each node, and whether a
        pooling op lies on the way."""
        cost: dict[fx.Node, int] = {fork: 0}
        pooled: dict[fx.Node, bool] = {fork: False}
        for n in sorted(region, key=self.index.__getitem__):
            ps = [p for p in self.preds[n] if p in cost]
            cost[n] = int(self.is_layer(n)) + max((cost[p] for p in ps), default=0)
            pooled[n] = _is_pool(self.root, n) or any(pooled[p] for p in ps)
        return cost, pooled

    def shortest_costs(self, fork: fx.Node, region: set[fx.Node]) -> dict[fx.Node, int]:
        """Shortest count of layers (``is_layer``) from ``fork`` to each node."""
        cost: dict[fx.Node, int] = {fork: 0}
        for n in sorted(region, key=self.index.__getitem__):
            ps = [cost[p] for p in self.preds[n] if p in cost]
            cost[n] = int(self.is_layer(n)) + min(ps, default=0)
        return cost


# --------------------------------------------------------------------------------------------
# Op classification

_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_", "__add__", "__iadd__", "__radd__"}
_CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}
_MUL_FUNCTIONS = {operator.mul, operator.imul, torch.mul}
_MUL_METHODS = {"mul", "mul_", "__mul__", "__rmul__"}
_DIV_FUNCTIONS = {operator.truediv, operator.itruediv, torch.div}
_DIV_METHODS = {"div", "div_", "__truediv__"}
_DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout}
_POOL_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    F.lp_pool1d, F.lp_pool2d,
}
_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d,
)
_SHAPE_KEEPING_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm, nn.RMSNorm,
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)
_SHAPE_KEEPING_FUNCTIONS = {
    F.batch_norm, F.layer_norm, F.group_norm, F.instance_norm, F.rms_norm,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
    F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.mish, F.elu, F.leaky_relu,
    torch.relu, torch.sigmoid, torch.tanh,
}
_IDENTITY_LIKE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)


def _module(root: nn.Module, node: fx.Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    try:
        return root.get_submodule(str(node.target))
    except AttributeError:
        return None


def _is_pool(root: nn.Module, node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _POOL_FUNCTIONS
    return isinstance(_module(root, node), _POOL_MODULES)


_UPSAMPLE_FUNCTIONS = {
    F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear, F.pixel_shuffle,
    F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
}
_UPSAMPLE_MODULES = (
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.PixelShuffle,
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
)
_SPATIAL_ONLY_FUNCTIONS = _POOL_FUNCTIONS | {F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear, F.pad}
_SPATIAL_ONLY_MODULES = _POOL_MODULES + (
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReplicationPad2d,
)


def is_upsample(root: nn.Module, node: fx.Node) -> bool:
    """Ops that raise resolution: a branch through one of them fuses scales, it is no residual."""
    if node.op == "call_function":
        return node.target in _UPSAMPLE_FUNCTIONS
    return isinstance(_module(root, node), _UPSAMPLE_MODULES)


_ACTIVATION_FUNCTIONS = {
    F.relu, F.relu_, F.relu6, F.gelu, F.silu, F.hardswish, F.mish, F.elu, F.leaky_relu, F.selu,
    F.hardtanh, torch.relu, torch.relu_, torch.sigmoid, torch.tanh, F.sigmoid, F.tanh,
}
_ACTIVATION_METHODS = {"relu", "relu_", "sigmoid", "tanh"}


def is_activation(root: nn.Module, node: fx.Node) -> bool:
    module = _module(root, node)
    if module is not None:
        return type(module).__module__ == "torch.nn.modules.activation" and not isinstance(module, nn.MultiheadAttention)
    return (node.op == "call_function" and node.target in _ACTIVATION_FUNCTIONS) or (
        node.op == "call_method" and node.target in _ACTIVATION_METHODS
    )


def is_norm(root: nn.Module, node: fx.Node) -> bool:
    module = _module(root, node)
    return isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)) or (
        node.op == "call_function" and node.target in (F.batch_norm, F.group_norm, F.layer_norm, F.instance_norm)
    )


_CONV_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d}


def is_conv(root: nn.Module, node: fx.Node) -> bool:
    module = _module(root, node)
    return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) or (
        node.op == "call_function" and node.target in _CONV_FUNCTIONS
    )


def is_spatial_conv(root: nn.Module, node: fx.Node) -> bool:
    """A convolution with a kernel wider than 1 (a 3x3, not a 1x1 projection)."""
    module = _module(root, node)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return max(module.kernel_size) > 1
    if node.op == "call_function" and node.target in _CONV_FUNCTIONS and len(node.args) > 1:
        weight = node.args[1]
        shape = tensor_shape(weight) if isinstance(weight, fx.Node) else None
        return shape is not None and max(shape[2:], default=1) > 1
    return False


def is_unary_elementwise(flow: DataFlow, node: fx.Node) -> bool:
    """One data input, same shape out: a norm, an activation, a dropout."""
    live = flow.live_inputs(node)
    if len(live) != 1 or is_add(node) or _is_mul(node) or is_cat(node):
        return False
    module = _module(flow.root, node)
    if module is not None:
        return _builtin(module) and (_keeps_shape(module) or isinstance(module, _SHAPE_KEEPING_MODULES))
    return tensor_shape(node) == tensor_shape(live[0]) and tensor_shape(node) is not None


def is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target in _ADD_METHODS
    )


def is_cat(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _CAT_FUNCTIONS


def cat_dim(node: fx.Node) -> int:
    if len(node.args) > 1:
        return int(node.args[1])  # type: ignore[arg-type]
    return int(node.kwargs.get("dim", node.kwargs.get("axis", 0)))  # type: ignore[arg-type]


def _is_mul(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _MUL_FUNCTIONS) or (
        node.op == "call_method" and node.target in _MUL_METHODS
    )


def _is_div(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _DIV_FUNCTIONS) or (
        node.op == "call_method" and node.target in _DIV_METHODS
    )


def _mode_dependent_function(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    if node.target in _DROPOUT_FUNCTIONS:
        return True
    name = getattr(node.target, "__name__", "")
    return name in ("stochastic_depth", "drop_path", "drop_block_2d", "drop_block_fast_2d")


def trailing_scaling_input(flow: DataFlow, node: fx.Node) -> fx.Node | None:
    """If ``node`` is a per-sample or per-channel scaling of one tensor (drop-path, stochastic
    depth, dropout, identity placeholders, layer scale, ``* scale``), the tensor it scales."""
    live = flow.live_inputs(node)
    if len(live) != 1:
        return None
    module = _module(flow.root, node)
    if module is not None:
        return live[0] if isinstance(module, _IDENTITY_LIKE_MODULES + mode_dependent_leaves()) else None
    if _mode_dependent_function(node):
        return live[0]
    if _is_mul(node) or (_is_div(node) and node.args and node.args[0] is live[0]):
        return live[0]
    return None


_LAYOUT_METHODS = {
    "permute", "transpose", "swapaxes", "swapdims", "reshape", "view", "flatten", "unflatten",
    "contiguous", "clone", "squeeze", "unsqueeze",
}


def _op_key(node: fx.Node) -> str | None:
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_function":
        return getattr(node.target, "__name__", None)
    return None


def is_layout(flow: DataFlow, node: fx.Node) -> bool:
    """A permute, transpose, reshape or copy of one tensor: same values, another layout."""
    return _op_key(node) in _LAYOUT_METHODS and len(flow.live_inputs(node)) == 1 and node.op != "call_module"


def is_scaling(flow: DataFlow, node: fx.Node) -> bool:
    """A product or quotient of one data tensor with parameters or constants (layer scale,
    ``res_scale``, ``* scale``): per-channel or per-tensor scaling, no layer of its own."""
    if not (_is_mul(node) or _is_div(node)) or len(flow.live_inputs(node)) != 1:
        return False
    return not _is_div(node) or (bool(node.args) and node.args[0] is flow.live_inputs(node)[0])


def channel_slice_of(flow: DataFlow, node: fx.Node) -> fx.Node | None:
    """The tensor that ``node`` is a channel slice or chunk of (``x[:, :k]``, ``narrow``,
    ``split``/``chunk`` items); ``None`` for anything else. Slices along other axes are no
    channel slices."""
    live = flow.live_inputs(node)
    if len(live) != 1:
        return None
    key = _op_key(node)
    first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if first is None:
        return None
    if key == "getitem" and not isinstance(first.meta.get("val"), torch.Tensor):
        # An item of split/chunk: the tuple's own input is what was sliced.
        if _op_key(first) in ("split", "chunk", "tensor_split", "split_with_sizes"):
            source = flow.live_inputs(first)
            if len(source) == 1 and _split_dim(first) == channel_axis(source[0], flow):
                return source[0]
        return None
    if key == "getitem" and first is live[0]:
        axis, shape, in_shape = channel_axis(first, flow), tensor_shape(node), tensor_shape(first)
        if axis is None or shape is None or in_shape is None or len(shape) != len(in_shape):
            return None
        changed = [d for d in range(len(shape)) if shape[d] != in_shape[d]]
        return first if changed == [axis] else None
    if key == "narrow" and first is live[0]:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        in_shape = tensor_shape(first)
        if isinstance(dim, int) and in_shape is not None and dim % len(in_shape) == channel_axis(first, flow):
            return first
    return None


def _split_dim(node: fx.Node) -> int | None:
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    source = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    shape = tensor_shape(source) if source is not None else None
    return dim % len(shape) if isinstance(dim, int) and shape else None


_LINEAR_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm,
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Flatten, nn.Unflatten,
)
_LINEAR_FUNCTIONS = {
    F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d, F.linear,
    F.batch_norm, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d, F.pad, operator.getitem, operator.sub, operator.neg, torch.sub, torch.neg,
    torch.narrow, torch.split, torch.chunk, torch.flatten, torch.reshape, torch.permute, torch.transpose,
} | _DROPOUT_FUNCTIONS
_LINEAR_METHODS = {"sub", "neg", "narrow", "split", "chunk", "tensor_split", "__getitem__", "sum", "mean"} | _LAYOUT_METHODS


def _linear_module(module: nn.Module) -> bool:
    """Builtin linear layers (and timm's norm-act layers with no activation): foldable."""
    if isinstance(module, mode_dependent_leaves()):
        return True
    if not isinstance(module, _LINEAR_MODULES):
        return False
    return all(_linear_module(child) for child in module.children())


def is_linear(flow: DataFlow, node: fx.Node) -> bool:
    """An op foldable into one convolution at inference (DESIGN.md rule 10): convolutions,
    linear layers, BatchNorm, average pooling, padding, slicing, layout changes, sums,
    concatenations and scalings by parameters. Activations, max pooling, per-sample norms,
    softmax and products of two data tensors are not."""
    if is_add(node) or is_cat(node) or is_scaling(flow, node):
        return True
    module = _module(flow.root, node)
    if module is not None:
        return _linear_module(module)
    if node.op == "call_function":
        return node.target in _LINEAR_FUNCTIONS or _mode_dependent_function(node)
    if node.op == "call_method":
        return str(node.target) in _LINEAR_METHODS
    return False


# --------------------------------------------------------------------------------------------
# Channel axis

_CHANNEL_FIRST_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LocalResponseNorm,
)
_CHANNEL_LAST_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.LayerNorm, nn.RMSNorm)
_CHANNEL_FIRST_FUNCTIONS = {
    F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
    F.batch_norm, F.group_norm, F.instance_norm,
}
_CHANNEL_LAST_FUNCTIONS = {F.linear, F.layer_norm, F.rms_norm}


def _builtin(module: nn.Module) -> bool:
    return type(module).__module__.startswith("torch.nn")


def channel_axis(node: fx.Node, flow: DataFlow, _memo: dict[fx.Node, int | None] | None = None, _depth: int = 0) -> int | None:
    """Non-negative index of the channel axis of ``node``'s output, inferred from the layer that
    produced the channels and the permutes since; ``None`` when the graph does not tell."""
    memo = {} if _memo is None else _memo
    if node in memo:
        return memo[node]
    memo[node] = None  # guards against cycles through bad metadata
    result = _channel_axis(node, flow, memo, _depth)
    memo[node] = result
    return result


def _channel_axis(node: fx.Node, flow: DataFlow, memo: dict[fx.Node, int | None], depth: int) -> int | None:
    shape = tensor_shape(node)
    if shape is None or depth > 200:
        return None
    ndim = len(shape)
    module = _module(flow.root, node)
    if module is not None and _builtin(module):
        if isinstance(module, _CHANNEL_FIRST_MODULES):
            return 1
        if isinstance(module, _CHANNEL_LAST_MODULES):
            return ndim - 1
    if node.op == "call_function" and node.target in _CHANNEL_FIRST_FUNCTIONS:
        return 1
    if node.op == "call_function" and node.target in _CHANNEL_LAST_FUNCTIONS:
        return ndim - 1

    inputs = [p for p in node.all_input_nodes if flow.data.get(p)]
    first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    spatial_only = (node.op == "call_function" and node.target in _SPATIAL_ONLY_FUNCTIONS) or isinstance(
        module, _SPATIAL_ONLY_MODULES
    )
    if spatial_only and first is not None:
        return channel_axis(first, flow, memo, depth + 1)  # pooling, resizing, padding keep channels

    def axis_of(p: fx.Node) -> int | None:
        return channel_axis(p, flow, memo, depth + 1)

    target = node.target if node.op == "call_method" else getattr(node.target, "__name__", None)
    if target == "permute" and first is not None:
        dims = node.args[1:] if node.op == "call_method" else node.args[1]
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = dims[0]
        a = axis_of(first)
        if a is None:
            return None
        dims = [int(d) % ndim for d in dims]  # type: ignore[call-overload]
        return dims.index(a) if a in dims else None
    if target in ("transpose", "swapaxes", "swapdims") and first is not None and len(node.args) >= 3:
        a = axis_of(first)
        if a is None:
            return None
        d0, d1 = (int(node.args[1]) % ndim, int(node.args[2]) % ndim)  # type: ignore[call-overload]
        return d1 if a == d0 else d0 if a == d1 else a
    if target in ("getitem", "narrow") and first is not None and isinstance(first.meta.get("val"), torch.Tensor):
        return _sliced_axis(node, first, axis_of(first))
    if target == "getitem" and first is not None and not isinstance(first.meta.get("val"), torch.Tensor):
        # An element of a tuple (chunk, split, a module returning several outputs).
        for p in flow.live_inputs(first) or [p for p in first.all_input_nodes if flow.data.get(p)]:
            p_shape = tensor_shape(p)
            if p_shape is not None and len(p_shape) == ndim:
                return axis_of(p)
        return None
    if target in ("flatten", "reshape", "view", "unflatten") and first is not None:
        in_shape = tensor_shape(first)
        a = axis_of(first)
        if a is None or in_shape is None:
            return None
        if len(shape) > a and in_shape[: a + 1] == shape[: a + 1]:
            return a
        tail = len(in_shape) - a
        if len(shape) >= tail and in_shape[a:] == shape[len(shape) - tail:]:
            return len(shape) - tail
        return None
    if is_cat(node):
        for p in inputs:
            a = axis_of(p)
            if a is not None:
                return a
        return None
    # Shape-preserving ops (activations, norms traced as functions, adds, products, unknown
    # leaves that keep the shape): the axis of an input of the same shape.
    for p in inputs:
        if tensor_shape(p) == shape:
            a = axis_of(p)
            if a is not None:
                return a
    return None


def _sliced_axis(node: fx.Node, first: fx.Node, axis: int | None) -> int | None:
    """The channel axis after indexing ``first`` (``x[:, :k]``, ``x[..., None]``, ``narrow``):
    slices keep an axis, integers drop one, ``None`` inserts one (DESIGN.md rule 4)."""
    in_shape = tensor_shape(first)
    if axis is None or in_shape is None:
        return None
    if _op_key(node) == "narrow":
        return axis
    index = node.args[1] if len(node.args) > 1 else None
    items = list(index) if isinstance(index, tuple) else [index]
    consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
    in_dim = out_dim = 0
    for item in items:
        if item is Ellipsis:
            span = len(in_shape) - consumed
            if in_dim <= axis < in_dim + span:
                return out_dim + axis - in_dim
            in_dim, out_dim = in_dim + span, out_dim + span
        elif item is None:
            out_dim += 1
        elif isinstance(item, slice):
            if in_dim == axis:
                return out_dim
            in_dim, out_dim = in_dim + 1, out_dim + 1
        elif isinstance(item, int) or (isinstance(item, fx.Node) and not isinstance(item.meta.get("val"), torch.Tensor)):
            if in_dim == axis:
                return None  # the channel axis itself is indexed away
            in_dim += 1
        else:
            return None  # advanced indexing with a tensor: the layout is not known
    return out_dim + axis - in_dim if axis >= in_dim else None


# --------------------------------------------------------------------------------------------
# Existing channel attention


def _strip_expand(node: fx.Node) -> fx.Node:
    while (node.op == "call_method" and node.target in ("expand", "expand_as")) and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def gating_products(flow: DataFlow, nodes: Iterable[fx.Node]) -> list[fx.Node]:
    """Products ``t * g`` where the gate ``g`` is computed from ``t`` by global pooling (SE,
    eSE, ECA, CBAM's channel part, SK and split attention all have this shape), and calls of
    our own ``SEBlock``."""
    found = []
    for n in nodes:
        if isinstance(_module(flow.root, n), SEBlock):
            found.append(n)
            continue
        if not _is_mul(n):
            continue
        operands = [a for a in n.args[:2] if isinstance(a, fx.Node) and flow.live.get(a)]
        if len(operands) != 2:
            continue
        for t, g in (operands, operands[::-1]):
            if _is_gate_of(flow, t, _strip_expand(g)):
                found.append(n)
                break
    return found


def _is_gate_of(flow: DataFlow, t: fx.Node, g: fx.Node) -> bool:
    ts, gs = tensor_shape(t), tensor_shape(g)
    if ts is None or gs is None or len(gs) > len(ts) or len(ts) < 3:
        return False
    gs = (1,) * (len(ts) - len(gs)) + gs
    if any(gd not in (1, td) for gd, td in zip(gs, ts, strict=True)):
        return False
    axis = channel_axis(t, flow)
    if axis is not None:
        # The gate runs along the channels and is constant over at least one spatial axis.
        spatial_pooled = any(gs[d] == 1 and ts[d] > 1 for d in range(1, len(ts)) if d != axis)
        if gs[axis] != ts[axis] or ts[axis] <= 1 or not spatial_pooled:
            return False
    elif not (gs[-1] == 1 < ts[-1] and any(gd == td > 1 for gd, td in zip(gs[1:], ts[1:], strict=True))):
        # Layout unknown (SK's stacked paths): pooled over the last axis, kept along another.
        return False
    return t in flow.ancestors_within(g, set(flow.order[flow.index[t]: flow.index[g]]))
