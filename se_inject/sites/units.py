"""Tracing a model into analysis units, falling back to its parts where the whole does not trace."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_map

from ..analysis.batch import grown_part, grown_record, grown_under, once
from ..analysis.calls import call_concrete_args, passes_var_positional, standalone_call
from ..analysis.causes import describe_failure, raised_inside
from ..analysis.dataflow import DataFlow
from ..analysis.node_names import call_stack, qualified_names
from ..analysis.ops import is_add, is_cat, is_conv
from ..analysis.shapes import RecordedInputs, propagate_shapes, record_module_inputs, traced_value
from ..analysis.tracing import trace
from ..plan import Unanalysed
from .inputs import NOT_REACHED
from .memo import NOTHING, failure_key, nothing_key
from .records import Unit

log = logging.getLogger(__name__)

__all__ = ["analyse"]


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _may_hold_sites(module: nn.Module) -> bool:
    """Builtin layers are leaves (nothing inside to analyse), and so are modules without
    weights; torch's containers are not leaves: what they hold is analysed (rule 13)."""
    if not any(True for _ in module.parameters()):
        return False
    return isinstance(module, _CONTAINERS) or not type(module).__module__.startswith("torch.")


def _join_path(path: str, name: str) -> str:
    return f"{path}.{name}" if path and name else path or name


def analyse(
    module: nn.Module,
    path: str,
    args: Sequence[Any],
    units: list[Unit],
    unanalysed: list[Unanalysed],
    memo: dict[Any, Any],
    extra_keywords: tuple[str, ...] = (),
    recorded: RecordedInputs | None = None,
    grown: Grown = None,
    grown_recorded: Callable[[], RecordedInputs | None] | None = None,
) -> frozenset[str] | None:
    """Trace ``module`` into a unit; if it does not trace, analyse its parts on their own.

    When parts of it fail to trace, it is traced again with those parts kept as calls, so
    a block whose attention does not trace still shows its residual sums (rule 13). Returns
    the paths of the parts left opaque in its unit, or None when it could not be analysed as
    one unit.

    ``memo`` remembers per (class, argument kinds, block signature) why a module failed to
    trace, so the 58 dense layers of timm's DenseNet-121 (no-trace leaves taking a list) fail
    once, not 58 times, while blocks of one class that take other paths (a window size of 0)
    are traced on their own; and per (block signature, argument shapes) blocks whose trace has nothing to
    analyse (timm's ``BatchNormAct2d``), so such blocks are traced once per kind.

    ``grown`` gives ``args`` with one sample more (``analysis.batch``; None: the batch is not
    known), ``grown_recorded`` the same for ``recorded``; both are called on first need.
    """
    key = failure_key(module, args, memo)
    leaf_key = nothing_key(module, args)
    if leaf_key is not None and memo.get(leaf_key) == NOTHING:
        return frozenset()
    try:
        if key is not None and key in memo:
            raise _KnownFailure(memo[key])
        unit = _trace_unit(module, path, args, frozenset(), extra_keywords, grown)
    except Exception as e:  # noqa: BLE001 - any failure means "analyse the parts"
        reason = str(e) if isinstance(e, _KnownFailure) else describe_failure(e, module)
        log.debug("%s does not trace (%s); analysing its parts", path or "model", reason)
        key = key or failure_key(module, args, memo, failed=True)
        memo.setdefault(key, reason)
        part_units: list[Unit] = []
        part_unanalysed: list[Unanalysed] = []
        opaque = _analyse_parts(
            module, path, args, part_units, part_unanalysed, memo, recorded, grown, grown_recorded
        )
        unit = None
        if opaque:
            try:
                unit = _trace_unit(module, path, args, opaque, extra_keywords, grown)
            except Exception as e2:  # noqa: BLE001 - its own code does not trace either
                own = describe_failure(e2, module)
                log.debug("%s does not trace with its parts opaque either (%s)", path or "model", own)
                # The first failure stays the reason (a later one may be its symptom), unless it
                # was raised inside a part now opaque (that part has it as its own reason) and
                # this one in the module's own code.
                parts = _modules_at(module, path, opaque)
                if not isinstance(e, _KnownFailure) and raised_inside(e, parts) and not raised_inside(e2, parts):
                    reason = memo[key] = own
        if unit is None:
            unanalysed.append(Unanalysed(path, reason))
            units += part_units
            unanalysed += part_unanalysed
            return None
        # Its unit covers the parts that traced; keep what was found inside the opaque ones.
        units += [u for u in part_units if any(_within(u.path, p) for p in opaque)]
        unanalysed += part_unanalysed
        _keep_unit(unit, units, unanalysed, memo, leaf_key, opaque)
        return opaque
    _keep_unit(unit, units, unanalysed, memo, leaf_key, frozenset())
    return frozenset()


def _modules_at(module: nn.Module, path: str, paths: frozenset[str]) -> list[nn.Module]:
    """The submodules of ``module`` (at model path ``path``) at the model paths ``paths``."""
    prefix = len(path) + 1 if path else 0
    return [module.get_submodule(p[prefix:]) for p in paths]


def _holds_tensors(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, dict):
        return bool(value) and all(_holds_tensors(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return bool(value) and all(_holds_tensors(v) for v in value)
    return False


def _within(path: str, ancestor: str) -> bool:
    return path == ancestor or path.startswith(ancestor + ".") or not ancestor


#: A unit's inputs with one sample more, on first need (None: the batch is not known).
Grown = Callable[[], Sequence[Any] | None] | None


def _trace_unit(
    module: nn.Module,
    path: str,
    args: Sequence[Any],
    opaque: frozenset[str],
    extra_keywords: tuple[str, ...] = (),
    grown: Grown = None,
) -> Unit:
    prefix = len(path) + 1 if path else 0
    options = {
        "concrete_args": call_concrete_args(module, args),
        "var_positional": passes_var_positional(module, len(args)),
        "opaque": {p[prefix:] for p in opaque},
    }
    try:
        traced = trace(module, **options)
    except fx.proxy.TraceError as e:
        # Control flow on sizes (a cropped identity): decided at the analysis input, where the
        # shapes are known; the unit then holds for that input size (``Unit.specialised``).
        try:
            traced = trace(module, **options, sizes=lambda graph, node: traced_value(module, args, graph, node))
        except Exception:  # noqa: BLE001 - it branches on more than sizes: the first error stands
            raise e from None
    graph, constants, calls = traced.graph, traced.constants, traced.calls
    propagate_shapes(module, args, graph=graph, constants=constants)
    if traced.specialised:
        _drop_decided_sizes(graph)
    # A list or dict of tensors (a detector's images, a dict batch) is a placeholder of the
    # trace as a tensor is, so the rebuilt forward takes it the same way.
    record = tuple(("tensor" if _holds_tensors(a) else type(a).__name__, a) for a in args)
    if extra_keywords:
        issue = f"called with keyword arguments its rebuilt forward would not take ({', '.join(extra_keywords)})"
    elif not standalone_call(module, record, ()):
        issue = "called with values other than tensors and defaults"
    else:
        issue = ""
    names = qualified_names(graph, path)
    return Unit(
        path, module, graph, DataFlow(graph, module), names, calls, issue, traced.outputs, constants, grown,
        traced.specialised, 0 if path else len(args),
    )


def _drop_decided_sizes(graph: fx.Graph) -> None:
    """Remove what computed the conditions decided on sizes (``out.size(-1) != ...``), read by
    nothing once decided: a size is no reader of the tensor, which may then take an SE hook."""
    changed = True
    while changed:
        changed = False
        for node in reversed(graph.nodes):
            dead = not node.users and node.op in ("call_method", "call_function") and not node.is_impure()
            if dead and not isinstance(node.meta.get("val"), torch.Tensor):
                graph.erase_node(node)
                changed = True


def _keep_unit(
    unit: Unit,
    units: list[Unit],
    unanalysed: list[Unanalysed],
    memo: dict[Any, Any],
    leaf_key: tuple[Any, ...] | None,
    opaque: frozenset[str],
) -> None:
    """Keep ``unit`` unless it holds nothing to analyse, then open the leaves inside it
    that may hold sites (timm's no-trace blocks), each on its own."""
    if not opaque and _nothing_inside(unit):
        if leaf_key is not None and not unit.specialised:  # a graph of one input size only
            memo[leaf_key] = NOTHING
        return
    units.append(unit)
    for node in unit.graph.nodes:
        if node.op != "call_module" or not _is_first_call(node):
            continue
        child_path = _join_path(unit.path, str(node.target))
        if child_path in opaque:
            continue  # analysed already, as parts
        child = unit.module.get_submodule(str(node.target))
        if not _may_hold_sites(child) or isinstance(child, _CONTAINERS):
            continue
        device = next(child.parameters()).device
        # map_arg reaches nodes inside tuples too (EdgeNeXt's ``pos_embd((B, H, W))``): the block
        # must get the values, never the caller's graph nodes.
        vals = tuple(fx.node.map_arg(tuple(node.args), lambda a, on=device: _on_device(a.meta.get("val"), on)))
        analyse(child, child_path, vals, units, unanalysed, memo, grown=once(_grown_call(unit, node, device)))


def _grown_call(unit: Unit, node: fx.Node, device: torch.device) -> Callable[[], tuple[Any, ...] | None]:
    """The arguments of the call ``node`` in ``unit`` with one sample more, on ``device``."""

    def grown() -> tuple[Any, ...] | None:
        args = unit.grown_call(node)
        return None if args is None else _on_device(args, device)

    return grown


class _KnownFailure(Exception):
    """A module of a class that already failed to trace with these argument kinds."""


def _nothing_inside(unit: Unit) -> bool:
    return _graph_holds_nothing(unit.module, unit.graph)


def _graph_holds_nothing(module: nn.Module, graph: fx.Graph, opaque: frozenset[str] = frozenset()) -> bool:
    """A traced block with no addition or concatenation and no module left to open holds no
    site of any rule (residual, inception, dense), nor SE-VGG's plain sites when it has no
    convolution (timm's ``BatchNormAct2d``: a norm and an activation)."""
    for node in graph.nodes:
        if is_add(node) or is_cat(node) or is_conv(module, node):
            return False
        if (
            node.op == "call_module"
            and str(node.target) not in opaque
            and _may_hold_sites(module.get_submodule(str(node.target)))
        ):
            return False
    return True


def _analyse_parts(
    module: nn.Module,
    path: str,
    args: Sequence[Any],
    units: list[Unit],
    unanalysed: list[Unanalysed],
    memo: dict[Any, Any],
    recorded: RecordedInputs | None = None,
    grown: Grown = None,
    grown_recorded: Callable[[], RecordedInputs | None] | None = None,
) -> frozenset[str]:
    """Analyse the children of a module that did not trace, with the inputs a forward pass
    gave them; containers (``nn.ModuleList``, ``nn.Sequential``, ``nn.ModuleDict``) and
    modules that were not called themselves are looked through, at any depth. Returns the
    paths of the parts that stay opaque (did not trace, or hold parts that did not).

    ``recorded``: inputs of this module's submodules from a forward pass of an ancestor,
    reused when they cover every part that needs inputs (no second forward pass).
    """
    if not any(_may_hold_sites(c) for c in module.children()):
        return frozenset()

    def enough(rec: RecordedInputs) -> bool:
        return not _missing_inputs(module, "", rec, memo)

    reused = recorded is not None and enough(recorded)
    inputs = recorded if reused and recorded is not None else record_module_inputs(module, args, enough)
    # The same forward with one sample more: what each part's batch axis is read from.
    grown_inputs = grown_recorded if reused and grown_recorded is not None else once(grown_record(module, grown, enough))
    opaque: set[str] = set()

    def visit(parent: nn.Module, rel: str) -> None:
        for name, child in parent.named_children():
            child_rel = _join_path(rel, name)
            if not _may_hold_sites(child):
                continue
            child_path = _join_path(path, child_rel)
            if child_rel in inputs:
                extra = inputs.extra_keywords.get(child_rel, ())
                inner = analyse(
                    child, child_path, inputs[child_rel], units, unanalysed, memo, extra, inputs.under(child_rel),
                    once(grown_part(grown_inputs, child_rel)), once(grown_under(grown_inputs, child_rel)),
                )
                opaque.update({child_path} if inner is None else inner)
                continue
            if not isinstance(child, _CONTAINERS):
                probe = _probe(child, memo)
                if probe.reason is None and not probe.needs_inputs:
                    continue  # traced without inputs: nothing in it can be a site
                if probe.reason is None or not any(_may_hold_sites(c) for c in child.children()):
                    unanalysed.append(Unanalysed(child_path, NOT_REACHED))
                    continue
                unanalysed.append(Unanalysed(child_path, f"{NOT_REACHED}; alone: {probe.reason}"))
                opaque.add(child_path)
            visit(child, child_rel)  # an iterated container, or a module not reached as a whole

    visit(module, "")
    return frozenset(opaque)


@dataclass(frozen=True)
class _Probe:
    """A module traced without inputs: why it does not trace (None: it does), and whether
    analysing it (or its parts) needs real inputs, i.e. it may hold a site."""

    reason: str | None
    needs_inputs: bool


def _probe(module: nn.Module, memo: dict[Any, Any]) -> _Probe:
    """Trace ``module`` without inputs as ``analyse`` would: whole, else with the parts that
    do not trace kept as calls; it needs inputs when its graph or one of those parts may hold
    a site."""
    key = ("probe", id(module))
    if key in memo:
        return memo[key]
    concrete = call_concrete_args(module, ())
    try:
        result = _Probe(None, not _graph_holds_nothing(module, trace(module, concrete_args=concrete).graph))
    except Exception as e:  # noqa: BLE001 - does not trace whole: try with its failing parts as calls
        reason = describe_failure(e, module)
        opaque = _failing_parts(module, "", memo)
        needs = any(_probe(module.get_submodule(p), memo).needs_inputs for p in opaque)
        if opaque:
            try:
                graph = trace(module, concrete_args=concrete, opaque=opaque).graph
                needs = needs or not _graph_holds_nothing(module, graph, opaque)
            except Exception:  # noqa: BLE001 - its own code does not trace: only its parts count
                pass
        result = _Probe(reason, needs)
    memo[key] = result
    return result


def _failing_parts(module: nn.Module, rel: str, memo: dict[Any, Any]) -> frozenset[str]:
    """Paths (relative to the probed module) of the parts that do not trace, through containers."""
    found: set[str] = set()
    for name, child in module.named_children():
        child_rel = _join_path(rel, name)
        if not _may_hold_sites(child):
            continue
        if isinstance(child, _CONTAINERS):
            found |= _failing_parts(child, child_rel, memo)
        elif _probe(child, memo).reason is not None:
            found.add(child_rel)
    return frozenset(found)


def _missing_inputs(module: nn.Module, rel: str, recorded: RecordedInputs, memo: dict[Any, Any]) -> bool:
    """Whether a part of ``module`` that may hold a site has no recorded inputs."""
    for name, child in module.named_children():
        child_rel = _join_path(rel, name)
        if child_rel in recorded or not _may_hold_sites(child):
            continue
        if isinstance(child, _CONTAINERS):
            if _missing_inputs(child, child_rel, recorded, memo):
                return True
        elif _probe(child, memo).needs_inputs:
            return True
    return False


def _on_device(value: Any, device: torch.device) -> Any:
    """Shape propagation left meta tensors; a block that must run for real needs its device."""
    return tree_map(
        lambda v: torch.empty(v.shape, dtype=v.dtype, device=device)
        if isinstance(v, torch.Tensor) and v.device.type == "meta" else v,
        value,
    )


def _is_first_call(node: fx.Node) -> bool:
    stack = call_stack(node)
    return not stack or "@" not in stack[-1][0]
