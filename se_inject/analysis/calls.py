"""What a forward's signature says about a call: recorded calls, concrete arguments, and
whether a block called this way is what its own trace computes (standalone calls)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from typing import Any

import torch.fx as fx
from torch import nn

__all__ = [
    "CallRecord", "PLAIN", "PLAIN_KINDS", "VAR_KINDS", "arg_kind", "standalone_concrete_args", "passes_var_positional",
    "call_concrete_args", "leading_tensors", "standalone_call", "required_positional", "extra_keywords",
    "positional_args", "tuple_size", "tuple_call", "tuple_concrete_args", "OUTPUT_TYPE", "KeepsOutputType",
]

VAR_KINDS = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)

PLAIN = (bool, int, float, str, type(None))
PLAIN_KINDS = frozenset(t.__name__ for t in PLAIN)

#: One recorded call: (kind, value if plain data) of each positional argument (kind "tensor"
#: for traced values, ``traced*N`` for a tuple of N traced values), and (name, kind, value if
#: plain data) for each keyword argument.
CallRecord = tuple[tuple[tuple[str, Any], ...], tuple[tuple[str, str, Any], ...]]

_TUPLE_KIND = "traced*"


def arg_kind(value: Any) -> str:
    """How a call argument is recorded: ``tensor`` for traced values, ``traced*N`` for a tuple
    of N traced values (DPN's ``(residual, dense)`` pair), else its type's name. A list stays
    ``list``: a block taking one (DenseNet) is not rebuilt with one input per element."""
    if isinstance(value, fx.Proxy):
        return "tensor"
    if type(value) is tuple and value and all(isinstance(v, fx.Proxy) for v in value):
        return f"{_TUPLE_KIND}{len(value)}"
    return type(value).__name__


#: ``meta`` key of a traced graph's output node: the dict subclass the forward returned.
OUTPUT_TYPE = "se_inject_output_type"


class KeepsOutputType:
    """Tracer mixin: fx writes a returned dict subclass (transformers' ``ModelOutput``, an
    ``OrderedDict``) as a plain dict, so a graph's code would return another type than the
    forward it was traced from. Its type is noted on the output node (``OUTPUT_TYPE``), for a
    rebuilt block to return it again."""

    def create_args_for_root(self, root_fn: Any, is_module: bool, concrete_args: Any = None) -> Any:
        fn, args = super().create_args_for_root(root_fn, is_module, concrete_args)  # type: ignore[misc]

        @functools.wraps(fn)
        def traced(*a: Any) -> Any:
            out = fn(*a)
            keys = isinstance(out, dict) and all(isinstance(k, str) and k.isidentifier() for k in out)
            self._output_type = type(out) if keys and type(out) is not dict else None
            return out

        return traced, args

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        self._output_type = None
        graph = super().trace(root, concrete_args)  # type: ignore[misc]
        if self._output_type is not None:
            next(n for n in reversed(graph.nodes) if n.op == "output").meta[OUTPUT_TYPE] = self._output_type
        return graph


def tuple_size(kind: str) -> int:
    """N for a recorded ``traced*N`` argument, else 0."""
    return int(kind[len(_TUPLE_KIND):]) if kind.startswith(_TUPLE_KIND) else 0


def tuple_call(
    module: nn.Module, args: tuple[tuple[str, Any], ...], kwargs: tuple[tuple[str, str, Any], ...]
) -> tuple[int, int]:
    """``(k, N)`` when a call passes ``k - 1`` tensors, then an N-tuple of traced values (DPN's
    ``block((resid, dense))``, Twins' ``pos_block(x, (H, W))``), then only defaults; else
    ``(0, 0)``. ``module`` traced with those tensors and one placeholder per element of the
    tuple, the tuple rebuilt around them, computes that call."""
    k = leading_tensors(args)
    size = tuple_size(args[k][0]) if k < len(args) else 0
    if not size:
        return 0, 0
    as_tensors = (*args[:k], ("tensor", None), *args[k + 1:])
    return (k + 1, size) if standalone_call(module, as_tensors, kwargs) else (0, 0)


def tuple_concrete_args(module: nn.Module, passed: int, inputs: int) -> dict[str, Any]:
    """Concrete arguments tracing ``module`` as called with ``passed`` positional arguments, the
    last an ``inputs``-tuple of traced values: that parameter is a tuple of placeholders (fx
    flattens it and the traced forward takes the tuple again), the parameters left out their
    defaults."""
    params = [p for p in inspect.signature(module.forward).parameters.values() if p.kind not in VAR_KINDS]
    return {**standalone_concrete_args(module, passed), params[passed - 1].name: tuple(fx.PH for _ in range(inputs))}


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
        params = [p for p in inspect.signature(module.forward).parameters.values() if p.kind not in VAR_KINDS]
    except (TypeError, ValueError):
        return concrete
    for param, value in zip(params, args, strict=False):
        if _is_plain(value):
            concrete[param.name] = value
    return concrete


def _is_plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    return isinstance(value, PLAIN)


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
        params = [p for p in inspect.signature(module.forward).parameters.values() if p.kind not in VAR_KINDS]
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
        if kind not in PLAIN_KINDS or param is None or param.default is inspect.Parameter.empty:
            return False  # a tensor, or data recorded without its value (a list of tensors)
        if not (value is param.default or (isinstance(value, PLAIN) and value == param.default)):
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


def extra_keywords(module: nn.Module, kwargs: dict[str, Any]) -> tuple[str, ...]:
    """Keyword arguments of a call that ``module.forward`` takes only through ``**kwargs``."""
    try:
        named = {p.name for p in inspect.signature(module.forward).parameters.values() if p.kind not in VAR_KINDS}
    except (TypeError, ValueError):
        return ()
    return tuple(sorted(k for k in kwargs if k not in named))


def positional_args(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """A call's arguments in positional order: keyword arguments in their places, skipped
    parameters as their defaults, up to the last one given."""
    if not kwargs:
        return tuple(args)
    try:
        params = [p for p in inspect.signature(module.forward).parameters.values() if p.kind not in VAR_KINDS]
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
