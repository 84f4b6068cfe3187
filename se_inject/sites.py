"""The placement policy: model -> plan (DESIGN.md, "Placement policy", rules 1-8).

Phases, each a small function: find the example input, trace the model into analysis units
(falling back to its blocks when the whole does not trace), turn additions and
concatenations into candidates (residual, inception, dense) or skipped places with reasons,
mark nested ones, then name, size and select the sites.
"""

from __future__ import annotations

import fnmatch
import itertools
import logging
import math
from collections.abc import Sequence, Set
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .block import SEConfig, hidden_width
from .errors import ConfigError, SelectionError
from .graph import (
    CallRecord,
    DataFlow,
    RecordedInputs,
    call_concrete_args,
    call_stack,
    cat_dim,
    channel_axis,
    channel_slice_of,
    gating_products,
    input_name,
    is_activation,
    is_add,
    is_cat,
    is_conv,
    is_layout,
    is_linear,
    is_norm,
    is_scaling,
    is_spatial_conv,
    is_unary_elementwise,
    is_upsample,
    leading_tensors,
    node_scope,
    passes_var_positional,
    propagate_shapes,
    qualified_names,
    record_module_inputs,
    standalone_call,
    tensor_shape,
    trace,
    trailing_scaling_input,
)
from .input_size import example_input as _default_example_input
from .node_names import owner_local_name
from .owners import OwnerTraces, block_signature
from .plan import Plan, Site, SiteKind, Skipped, SkipReason, Unanalysed

log = logging.getLogger(__name__)

__all__ = ["build_plan", "example_args", "Selection", "TRUNK_MAX_PARAMETRIC"]

#: A shortcut has at most this many parametric layers (projection: pool + conv + norm, or a
#: GhostNet-style depthwise + pointwise pair); a deeper "shortcut" means a fusion.
TRUNK_MAX_PARAMETRIC = 4

#: How deep into an owner's children a source may sit before the owner is not rebuilt.
_MAX_INLINE_DEPTH = 4


@dataclass
class _Unit:
    """One traced module: the whole model, or a block of a model that does not trace."""

    path: str
    module: nn.Module
    graph: fx.Graph
    flow: DataFlow
    names: dict[fx.Node, str]
    calls: dict[str, list[CallRecord]]
    #: Why the unit's root cannot be rebuilt on its own ("" when it can): it was called with
    #: values other than tensors and defaults, which its own trace would not reproduce.
    root_call_issue: str = ""
    _owned: dict[str, list[fx.Node]] = field(default_factory=dict)
    _gated: dict[str, list[fx.Node]] = field(default_factory=dict)

    def full(self, rel: str) -> str:
        return f"{self.path}.{rel}" if self.path and rel else self.path or rel

    def rewritable_owner(self, scope: str) -> str:
        """``scope`` or its nearest ancestor that can be traced on its own: every call passes
        exactly its required arguments, all tensors, plus at most defaults by keyword (lists,
        ``None`` and other Python values would become placeholders and change the graph). The
        unit's root always qualifies."""
        while scope:
            calls = self.calls.get(scope, [])
            module = self.module.get_submodule(scope)
            if (
                calls
                and all(standalone_call(module, args, kwargs) for args, kwargs in calls)
                and len({leading_tensors(args) for args, _ in calls}) == 1  # one graph serves every call
            ):
                return scope
            scope = scope.rpartition(".")[0]
        return scope

    def owner_args(self, owner_rel: str) -> int:
        """Positional tensors each call of the owner passes (0 for the unit's root: its own)."""
        calls = self.calls.get(owner_rel) if owner_rel else None
        return leading_tensors(calls[0][0]) if calls else 0

    def prefix_tokens(self) -> int:
        """Class and distillation tokens in front of a token sequence: timm's
        ``num_prefix_tokens``, else the constant tokens concatenated in front of the patches."""
        declared = getattr(self.module, "num_prefix_tokens", None)
        if isinstance(declared, int):
            return declared
        for node in self.flow.order:
            shape = tensor_shape(node)
            if not is_cat(node) or shape is None or len(shape) != 3 or cat_dim(node) % 3 != 1:
                continue
            count = 0
            for a in node.args[0] if isinstance(node.args[0], (list, tuple)) else ():
                if not isinstance(a, fx.Node) or self.flow.live.get(a):
                    break
                count += (tensor_shape(a) or (0, 0))[1]
            if count:
                return count
        return 0

    def owned_nodes(self, owner_rel: str) -> list[fx.Node]:
        if owner_rel not in self._owned:
            self._owned[owner_rel] = [n for n in self.flow.order if _inside(n, owner_rel)]
        return self._owned[owner_rel]

    def owner_gates(self, owner_rel: str) -> list[fx.Node]:
        if owner_rel not in self._gated:
            self._gated[owner_rel] = gating_products(self.flow, self.owned_nodes(owner_rel))
        return self._gated[owner_rel]


@dataclass
class _Candidate:
    """A place considered for SE, before naming and selection."""

    unit: _Unit
    kind: SiteKind
    anchor: fx.Node
    owner_rel: str
    source: fx.Node | None = None
    targets: tuple[fx.Node, ...] = ()
    region: set[fx.Node] = field(default_factory=set)
    structural: bool = False  # a real residual or inception block: others inside it are nested
    skip: Skipped | None = None
    rep_source: str = ""
    rep_targets: tuple[str, ...] = ()
    inline: tuple[str, ...] = ()
    channels: int = 0
    axis: int = 1
    shape: tuple[int, ...] = ()
    prefix_tokens: int = 0


# --------------------------------------------------------------------------------------------
# Entry point


@dataclass(frozen=True)
class Selection:
    """Which of the found sites to keep (DESIGN.md rule 8)."""

    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    min_channels: int = 0
    stages: tuple[int, ...] | None = None
    resolutions: tuple[int, ...] | None = None


def build_plan(
    model: nn.Module,
    config: SEConfig,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    min_channels: int = 0,
    stages: Sequence[int] | None = None,
    resolutions: Sequence[int] | None = None,
    plain: bool = False,
    tokens: bool = False,
    example_input: Any = None,
    traces: OwnerTraces | None = None,
) -> Plan:
    """Analyse ``model`` (unchanged) and return where SE blocks go under ``config``.

    Every owner is traced as the rewriter will trace it and every site is found in that trace
    before it is listed (owners that fail are skipped as ``not-rewritable``); pass ``traces``
    to keep those traces for ``apply_plan``.

    ``plain`` adds the paper's SE-VGG placement (after the non-linearity that follows each
    convolution) to models that have no residual or concatenation site; ``tokens`` turns
    residual branches on token sequences into sites (squeezing over the tokens, class and
    distillation tokens left out).

    Raises:
        ConfigError: a selection option has a bad value.
        SelectionError: ``stages`` or ``resolutions`` name none of the model's (the message
            lists them).
    """
    selection = Selection(
        _check_globs("include", include),
        _check_globs("exclude", exclude),
        min_channels,
        _check_ints("stages", stages),
        _check_ints("resolutions", resolutions),
    )
    if min_channels < 0:
        raise ConfigError(f"min_channels must be >= 0, got {min_channels}")
    args = example_args(model, example_input)
    units: list[_Unit] = []
    unanalysed: list[Unanalysed] = []
    _analyse(model, "", args, units, unanalysed, {})
    policy = _Policy(config.placement, tokens)
    candidates = [c for unit in units for c in _unit_candidates(unit, policy)]
    _mark_nested(candidates)
    if plain and not any(c.skip is None for c in candidates):
        candidates += [c for unit in units for c in _plain_candidates(unit)]
    sites, skipped = _finalise(model, candidates, config, selection, OwnerTraces() if traces is None else traces)
    return Plan(tuple(sites), tuple(skipped), tuple(unanalysed), config)


@dataclass(frozen=True)
class _Policy:
    placement: str = "standard"
    tokens: bool = False


def _check_ints(what: str, values: Sequence[int] | None) -> tuple[int, ...] | None:
    if values is None:
        return None
    if isinstance(values, int):
        values = (values,)
    if not all(isinstance(v, int) and v >= 0 for v in values):
        raise ConfigError(f"{what} must be non-negative integers, got {values!r}")
    return tuple(values)


def _check_globs(what: str, globs: Sequence[str] | None) -> tuple[str, ...] | None:
    if globs is None:
        return None
    if isinstance(globs, str):
        globs = (globs,)
    if not all(isinstance(g, str) and g for g in globs):
        raise ConfigError(f"{what} must be module-name globs (non-empty strings), got {globs!r}")
    return tuple(globs)


def example_args(model: nn.Module, example_input: Any = None) -> tuple[Any, ...]:
    """The inputs to analyse with: the user's, else an empty tensor of the model's declared
    input size (``input_size.model_input_size``), batch 2; only shapes matter.

    Raises:
        ConfigError: no input was given and the model does not say what it reads.
    """
    if example_input is not None:
        return tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    built = _default_example_input(model)
    if built is None:
        raise ConfigError(
            f"cannot guess an input for {type(model).__name__}; pass example_input=torch.randn(...)"
        )
    return (built,)


# --------------------------------------------------------------------------------------------
# Tracing into units


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _may_hold_sites(module: nn.Module) -> bool:
    """Builtin layers are leaves (nothing inside to analyse), and so are modules without
    weights; torch's containers are not leaves: what they hold is analysed (rule 13)."""
    if not any(True for _ in module.parameters()):
        return False
    return isinstance(module, _CONTAINERS) or not type(module).__module__.startswith("torch.")


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _join_path(path: str, name: str) -> str:
    return f"{path}.{name}" if path and name else path or name


def _args_key(args: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(
        (tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else a if isinstance(a, (bool, int, str)) else type(a).__name__
        for a in args
    )


def _analyse(
    module: nn.Module,
    path: str,
    args: Sequence[Any],
    units: list[_Unit],
    unanalysed: list[Unanalysed],
    memo: dict[Any, Any],
    extra_keywords: tuple[str, ...] = (),
    recorded: RecordedInputs | None = None,
) -> frozenset[str] | None:
    """Trace ``module`` into a unit; if it does not trace, analyse its parts on their own.

    When parts of it fail to trace, it is traced again with those parts kept as calls, so
    a block whose attention does not trace still shows its residual sums (rule 13). Returns
    the paths of the parts left opaque in its unit, or None when it could not be analysed as
    one unit.

    ``memo`` remembers per (class, argument kinds) why a module failed to trace, so the 58
    dense layers of timm's DenseNet-121 (no-trace leaves taking a list) fail once, not 58
    times; and per (block signature, argument shapes) blocks whose trace has nothing to
    analyse (timm's ``BatchNormAct2d``), so such blocks are traced once per kind.
    """
    key = (type(module), tuple(type(a).__name__ for a in args))
    leaf_key = _leaf_key(module, args)
    if leaf_key is not None and memo.get(leaf_key) == _NOTHING:
        return frozenset()
    try:
        if key in memo:
            raise _KnownFailure(memo[key])
        unit = _trace_unit(module, path, args, frozenset(), extra_keywords)
    except Exception as e:  # noqa: BLE001 - any failure means "analyse the parts"
        reason = str(e) if isinstance(e, _KnownFailure) else _first_line(e)
        log.debug("%s does not trace (%s); analysing its parts", path or "model", reason)
        memo.setdefault(key, reason)
        part_units: list[_Unit] = []
        part_unanalysed: list[Unanalysed] = []
        opaque = _analyse_parts(module, path, args, part_units, part_unanalysed, memo, recorded)
        unit = None
        if opaque:
            try:
                unit = _trace_unit(module, path, args, opaque, extra_keywords)
            except Exception as e2:  # noqa: BLE001 - its own code does not trace either
                log.debug("%s does not trace with its parts opaque either (%s)", path or "model", _first_line(e2))
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


def _within(path: str, ancestor: str) -> bool:
    return path == ancestor or path.startswith(ancestor + ".") or not ancestor


def _trace_unit(
    module: nn.Module, path: str, args: Sequence[Any], opaque: frozenset[str], extra_keywords: tuple[str, ...] = ()
) -> _Unit:
    prefix = len(path) + 1 if path else 0
    traced = trace(
        module,
        concrete_args=call_concrete_args(module, args),
        var_positional=passes_var_positional(module, len(args)),
        opaque={p[prefix:] for p in opaque},
    )
    graph, constants, calls = traced.graph, traced.constants, traced.calls
    propagate_shapes(module, args, graph=graph, constants=constants)
    record = tuple(("tensor" if isinstance(a, torch.Tensor) else type(a).__name__, a) for a in args)
    if extra_keywords:
        issue = f"called with keyword arguments its rebuilt forward would not take ({', '.join(extra_keywords)})"
    elif not standalone_call(module, record, ()):
        issue = "called with values other than tensors and defaults"
    else:
        issue = ""
    return _Unit(path, module, graph, DataFlow(graph, module), qualified_names(graph, path), calls, issue)


def _keep_unit(
    unit: _Unit,
    units: list[_Unit],
    unanalysed: list[Unanalysed],
    memo: dict[Any, Any],
    leaf_key: tuple[Any, ...] | None,
    opaque: frozenset[str],
) -> None:
    """Keep ``unit`` unless it holds nothing to analyse, then open the leaves inside it
    that may hold sites (timm's no-trace blocks), each on its own."""
    if not opaque and _nothing_inside(unit):
        if leaf_key is not None:
            memo[leaf_key] = _NOTHING
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
        vals = tuple(_on_device(a.meta.get("val"), device) if isinstance(a, fx.Node) else a for a in node.args)
        _analyse(child, child_path, vals, units, unanalysed, memo)


class _KnownFailure(Exception):
    """A module of a class that already failed to trace with these argument kinds."""


_NOTHING = "nothing to analyse"


#: Blocks with more submodules than this are not memoised as "nothing inside" (the ones
#: that repeat by the hundred, like timm's BatchNormAct2d, are small; big ones rarely repeat).
_MEMO_MAX_MODULES = 16


def _leaf_key(module: nn.Module, args: Sequence[Any]) -> tuple[Any, ...] | None:
    if sum(1 for _ in itertools.islice(module.modules(), _MEMO_MAX_MODULES + 1)) > _MEMO_MAX_MODULES:
        return None
    signature = block_signature(module)
    return None if signature is None else ("leaf", signature, _args_key(args))


def _nothing_inside(unit: _Unit) -> bool:
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
    units: list[_Unit],
    unanalysed: list[Unanalysed],
    memo: dict[Any, Any],
    recorded: RecordedInputs | None = None,
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

    inputs = recorded if recorded is not None and enough(recorded) else record_module_inputs(module, args, enough)
    opaque: set[str] = set()

    def visit(parent: nn.Module, rel: str) -> None:
        for name, child in parent.named_children():
            child_rel = _join_path(rel, name)
            if not _may_hold_sites(child):
                continue
            child_path = _join_path(path, child_rel)
            if child_rel in inputs:
                extra = inputs.extra_keywords.get(child_rel, ())
                inner = _analyse(
                    child, child_path, inputs[child_rel], units, unanalysed, memo, extra, _sub_record(inputs, child_rel)
                )
                opaque.update({child_path} if inner is None else inner)
                continue
            if not isinstance(child, _CONTAINERS):
                probe = _probe(child, memo)
                if probe.reason is None and not probe.needs_inputs:
                    continue  # traced without inputs: nothing in it can be a site
                if probe.reason is None or not any(_may_hold_sites(c) for c in child.children()):
                    unanalysed.append(Unanalysed(child_path, "not reached by the forward pass on the example input"))
                    continue
                unanalysed.append(Unanalysed(child_path, probe.reason))
                opaque.add(child_path)
            visit(child, child_rel)  # an iterated container, or a module not reached as a whole

    visit(module, "")
    return frozenset(opaque)


def _sub_record(recorded: RecordedInputs, rel: str) -> RecordedInputs:
    """The entries of ``recorded`` under ``rel``, relative to it."""
    sub = RecordedInputs()
    prefix = rel + "."
    for key, value in recorded.items():
        if key.startswith(prefix):
            sub[key[len(prefix):]] = value
    for key, value in recorded.extra_keywords.items():
        if key.startswith(prefix):
            sub.extra_keywords[key[len(prefix):]] = value
    return sub


@dataclass(frozen=True)
class _Probe:
    """A module traced without inputs: why it does not trace (None: it does), and whether
    analysing it (or its parts) needs real inputs, i.e. it may hold a site."""

    reason: str | None
    needs_inputs: bool


def _probe(module: nn.Module, memo: dict[Any, Any]) -> _Probe:
    """Trace ``module`` without inputs as ``_analyse`` would: whole, else with the parts that
    do not trace kept as calls; it needs inputs when its graph or one of those parts may hold
    a site."""
    key = ("probe", id(module))
    if key in memo:
        return memo[key]
    concrete = call_concrete_args(module, ())
    try:
        result = _Probe(None, not _graph_holds_nothing(module, trace(module, concrete_args=concrete).graph))
    except Exception as e:  # noqa: BLE001 - does not trace whole: try with its failing parts as calls
        reason = _first_line(e)
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
    if isinstance(value, torch.Tensor) and value.device.type == "meta":
        return torch.empty(value.shape, dtype=value.dtype, device=device)
    if isinstance(value, (list, tuple)):
        return type(value)(_on_device(v, device) for v in value)
    return value


def _is_first_call(node: fx.Node) -> bool:
    stack = call_stack(node)
    return not stack or "@" not in stack[-1][0]


# --------------------------------------------------------------------------------------------
# Candidates


def _inside(node: fx.Node, owner_rel: str) -> bool:
    path = str(node.target) if node.op == "call_module" else node_scope(node)
    return not owner_rel or path == owner_rel or path.startswith(owner_rel + ".")


def _unit_candidates(unit: _Unit, policy: _Policy) -> list[_Candidate]:
    found: list[_Candidate] = []
    producers: set[fx.Node | None] = set()
    # Rule 9: ends of finished blocks (residual sums, aggregation roots): their outputs are trunk.
    finished: set[fx.Node] = set()
    for node in unit.flow.order:
        if not unit.flow.live.get(node):
            continue
        if is_add(node):
            cand = _residual(unit, node, policy)
            if cand is not None:
                found.append(cand)
                if cand.structural:
                    finished.add(node)
        elif is_cat(node):
            cands = _concatenation(unit, node, policy, producers, finished)
            if len(cands) == 1 and cands[0].skip is not None and cands[0].skip.reason is SkipReason.NO_COMPUTED_BRANCH:
                finished.add(node)  # an aggregation root (DLA, CSP): trunk, like the sums it joins
            for cand in cands:
                # Rule 3: one SE per producer, however many concatenations read it.
                if cand.kind is SiteKind.DENSE and cand.source in producers:
                    continue
                producers.add(cand.source)
                found.append(cand)
    return found


def _skip(cand: _Candidate, reason: SkipReason, detail: str = "", node: fx.Node | None = None) -> _Candidate:
    cand.skip = Skipped(cand.unit.names[node if node is not None else cand.anchor], reason, detail)
    return cand


def _residual(unit: _Unit, add: fx.Node, policy: _Policy) -> _Candidate | None:
    flow = unit.flow
    operands = [a for a in add.args[:2] if isinstance(a, fx.Node)]
    if len(operands) != 2 or not all(flow.live.get(a) for a in operands):
        return None  # rule 6: a constant, parameter or scalar operand is not a residual
    shape_a, shape_b = tensor_shape(operands[0]), tensor_shape(operands[1])
    if shape_a is None or shape_a != shape_b or shape_a != tensor_shape(add):
        return None
    cand = _Candidate(unit, SiteKind.RESIDUAL, add, unit.rewritable_owner(node_scope(add)))
    fork = flow.idom.get(add)
    if fork is None:
        return _skip(cand, SkipReason.FUSION, "operands come from different inputs of the model")
    # Rule 7: locality is the dataflow's (fork, path lengths, resolution), not module scope:
    # a shortcut computed by the parent and passed in is still the trunk.
    region = flow.region(fork, add)
    cost, _ = flow.path_costs(fork, region)
    if (linear := _linear_block(unit, region, cost)) is not None:
        return _skip(cand, SkipReason.LINEAR_BLOCK, linear)
    a, b = operands
    if cost[a] == cost[b]:
        return _skip(cand, SkipReason.NO_TRUNK, f"both operands have {cost[a]} parametric layers")
    branch, trunk = (a, b) if cost[a] > cost[b] else (b, a)
    if cost[trunk] > TRUNK_MAX_PARAMETRIC:
        return _skip(cand, SkipReason.FUSION, f"the shorter operand still has {cost[trunk]} parametric layers")
    upsampled = next((n for n in sorted(region, key=flow.index.__getitem__) if is_upsample(unit.module, n)), None)
    if upsampled is not None:
        return _skip(cand, SkipReason.FUSION, f"the branch changes resolution at {unit.names[upsampled]}: a multi-scale merge")
    cand.structural = True
    cand.region = region
    cand.source, cand.targets = _branch_output(flow, branch, add, region, fork)
    if cost.get(cand.source, 0) == 0:
        return _skip(cand, SkipReason.NO_TRUNK, "the branch has no parametric layer before its scalings")
    gates = gating_products(flow, region)
    if gates:
        return _skip(cand, SkipReason.ALREADY_ATTENDED, f"branch gated at {unit.names[gates[0]]}")
    gates = _enclosing_gates(unit, cand.owner_rel, add) if cand.owner_rel else []
    if gates:
        return _skip(cand, SkipReason.ALREADY_ATTENDED, f"enclosing block gated at {unit.names[gates[0]]}")
    if policy.placement == "pre":
        branch_side = flow.ancestors_within(branch, region) | {branch}
        trunk_side = flow.ancestors_within(trunk, region) | {trunk}
        heads = tuple(u for u in fork.users if fork in flow.preds.get(u, ()) and u in branch_side and u not in trunk_side)
        if not heads:
            return _skip(cand, SkipReason.NOT_REWRITABLE, "no layer of the branch alone reads the fork")
        cand.source, cand.targets = fork, heads
    elif policy.placement == "inner":
        placed = _after_last_spatial_conv(unit, flow.ancestors_within(branch, region) | {branch}, add)
        if placed is None:
            return _skip(cand, SkipReason.NO_SPATIAL_CONV, "the branch has no spatial convolution")
        cand.source, cand.targets = placed
    if not _check_tensor(cand, cand.source, policy):
        return cand
    return _represent(cand)


def _branch_output(
    flow: DataFlow, branch: fx.Node, add: fx.Node, region: set[fx.Node], fork: fx.Node
) -> tuple[fx.Node, tuple[fx.Node, ...]]:
    """Where the branch's features end (rule 1): before its trailing scalings (drop-path, layer
    scale, ``* scale``), also behind a permute or reshape that separates a scaling from the sum
    (EdgeNeXt), and before a channel slice that feeds only part of the branch to the sum
    (ReXNet's and dual-path networks' partial residuals: the SE squeezes the whole output).
    Returns the tensor to scale and the nodes that read it instead."""
    source, target, sliced = branch, add, False

    def usable(n: fx.Node | None) -> bool:
        return n is not None and n in region and n is not fork

    while True:
        inner = trailing_scaling_input(flow, source)
        if inner is None and (whole := channel_slice_of(flow, source)) is not None and usable(whole):
            inner, sliced = whole, True
        if inner is None and is_layout(flow, source):
            # Only permutes and reshapes that keep the rank: a token sequence viewed as a map
            # (SAM's attention output) is squeezed as the map the sum sees.
            probe, rank = source, len(tensor_shape(source) or ())
            while is_layout(flow, probe) and usable(probe) and len(tensor_shape(probe) or ()) == rank:
                probe = flow.live_inputs(probe)[0]
            if usable(probe) and len(tensor_shape(probe) or ()) == rank and trailing_scaling_input(flow, probe) is not None:
                inner = flow.live_inputs(source)[0]
        if not usable(inner):
            break
        source, target = inner, source  # type: ignore[assignment]
    if sliced:
        readers = tuple(u for u in source.users if source in flow.preds.get(u, ()))
        return source, readers
    return source, (target,)


def _linear_block(unit: _Unit, region: set[fx.Node], cost: dict[fx.Node, int]) -> str | None:
    """Rule 10: a merge whose whole region from the fork is linear and holds several parallel
    parametric paths (RepVGG, MobileOne, MixedConv) or none at all (a bare pooling mixer) is one
    layer in disguise; a detail string, or ``None`` for a real block. A single linear path
    beside an identity (``x + bn(conv(x))``) stays a residual."""
    flow = unit.flow
    nonlinear = next((n for n in region if not is_linear(flow, n)), None)
    if nonlinear is not None:
        return None
    heads = [n for n in region if cost.get(n) == 1 and flow.is_parametric(n) and not is_scaling(flow, n)]
    if len(heads) == 1:
        return None
    if not heads:
        return "no parametric layer and no non-linearity between fork and merge"
    names = sorted(unit.names[n] for n in heads)
    return f"{len(heads)} parallel linear paths ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"


def _after_last_spatial_conv(
    unit: _Unit, branch: set[fx.Node], add: fx.Node
) -> tuple[fx.Node, tuple[fx.Node, ...]] | None:
    """The branch's last spatial convolution, followed through its norm and activation; and
    the branch nodes that read it (the paper's "SE 3x3" placement)."""
    flow = unit.flow
    convs = [n for n in sorted(branch, key=flow.index.__getitem__) if is_spatial_conv(unit.module, n)]
    if not convs:
        return None
    source = convs[-1]
    while True:
        users = [u for u in source.users if source in flow.preds.get(u, ())]
        if len(users) != 1 or users[0] is add or users[0] not in branch or not is_unary_elementwise(flow, users[0]):
            break
        source = users[0]
    targets = tuple(u for u in source.users if source in flow.preds.get(u, ()) and (u in branch or u is add))
    return (source, targets) if targets else None


def _check_tensor(cand: _Candidate, node: fx.Node, policy: _Policy | None = None) -> bool:
    """Channel axis and layout of the tensor to scale; records a skip and returns False if unfit."""
    shape = tensor_shape(node)
    if shape is None:
        _skip(cand, SkipReason.UNKNOWN_CHANNEL_AXIS, "no shape recorded")
        return False
    if len(shape) <= 2:
        _skip(cand, SkipReason.NO_SPATIAL_EXTENT, f"shape {list(shape)}")
        return False
    axis = channel_axis(node, cand.unit.flow)
    if axis is None:
        _skip(cand, SkipReason.UNKNOWN_CHANNEL_AXIS, f"shape {list(shape)}")
        return False
    if len(shape) == 3 and axis == 2:
        if policy is None or not policy.tokens:
            _skip(cand, SkipReason.TOKEN_SEQUENCE, f"shape {list(shape)}, channels last")
            return False
        cand.prefix_tokens = cand.unit.prefix_tokens()
    if axis not in (1, len(shape) - 1):
        _skip(cand, SkipReason.UNKNOWN_CHANNEL_AXIS, f"channels on axis {axis} of {list(shape)}")
        return False
    cand.shape, cand.channels = shape, shape[axis]
    cand.axis = 1 if axis == 1 else -1
    return True


def _concatenation(
    unit: _Unit,
    cat: fx.Node,
    policy: _Policy,
    done: Set[fx.Node | None] = frozenset(),
    finished: Set[fx.Node] = frozenset(),
) -> list[_Candidate]:
    """Inception, dense or fusion (rules 2, 3, 9-12); ``done``: producers already given a
    dense candidate by an earlier concatenation (one SE per producer); ``finished``: the ends of
    finished blocks before ``cat``: residual sums (not fusions, not linear merges) and
    aggregation roots."""
    flow = unit.flow
    raw = cat.args[0] if cat.args else cat.kwargs.get("tensors", ())
    inputs: list[fx.Node] = []
    for a in raw if isinstance(raw, (list, tuple)) else ():
        if isinstance(a, fx.Node) and flow.live.get(a) and a not in inputs:
            inputs.append(a)
    if len(inputs) < 2:
        return []  # rule 6: concatenating a class token or a constant is not a site
    if not flow.feeds_parametric(cat) and all(_is_prediction(unit, i) for i in inputs):
        return []  # rule 12: the model's outputs (box and class predictions), read by no layer
    owner_rel = unit.rewritable_owner(node_scope(cat))
    cand = _Candidate(unit, SiteKind.INCEPTION, cat, owner_rel)
    shape = tensor_shape(cat)
    axis = channel_axis(cat, flow)
    if shape is None or axis is None:
        return [_skip(cand, SkipReason.UNKNOWN_CHANNEL_AXIS)]
    if cat_dim(cat) % len(shape) != axis:
        return [_skip(cand, SkipReason.NOT_CHANNEL_CONCAT, f"dim {cat_dim(cat)} of {list(shape)}")]
    fork = flow.idom.get(cat)
    if fork is None:
        return [_skip(cand, SkipReason.FUSION, "inputs come from different inputs of the model")]
    region = flow.region(fork, cat)
    cost, pooled = flow.path_costs(fork, region)
    if (linear := _linear_block(unit, region, cost)) is not None:
        return [_skip(cand, SkipReason.LINEAR_BLOCK, linear)]
    ancestors = {i: flow.ancestors_within(i, region) for i in inputs}
    trunks = _sum_trunks(flow, inputs, finished, cost)

    def carried(i: fx.Node, pool_is_branch: bool) -> bool:
        # Rule 3: the fork, a slice or pooled copy of it (a pooling-only input is a branch of an
        # Inception module, but beside carried features just a pooled copy of them); rule 9: a
        # residual sum's output (and a slice of its shortcut) is trunk.
        return (
            i is fork
            or (cost[i] == 0 and not (pool_is_branch and pooled[i]))
            or (channel_slice_of(flow, i) or i) in trunks
            or _after_residual(unit, i, fork, finished)
        )

    computed = [i for i in inputs if not carried(i, pool_is_branch=False)]
    coarse = _coarser_path(unit, cat, shape, axis, [i for i in inputs if i is not fork], ancestors)
    if coarse is not None:
        return [_skip(cand, SkipReason.FUSION, coarse)]
    shortest = flow.shortest_costs(fork, region)
    nearest = min(shortest.get(i, 0) for i in inputs)
    if nearest > TRUNK_MAX_PARAMETRIC:
        # Rule 12: no input lies within a handful of layers of the fork (NASNet's two-input
        # cells meet only far back): a fusion of distant features, not one module.
        return [_skip(cand, SkipReason.FUSION, f"every input is {nearest}+ parametric layers from {unit.names[fork]}")]
    if not computed:
        return [_skip(cand, SkipReason.NO_COMPUTED_BRANCH)]
    if not any(carried(i, pool_is_branch=True) for i in inputs):
        cand.structural = True
        cand.region = region
        cand.source = cat
        if not _check_tensor(cand, cat, policy):
            return [cand]
        gated = gating_products(flow, region) or _block_gates(unit, owner_rel, cat)
        if gated:
            return [_skip(cand, SkipReason.ALREADY_ATTENDED, f"block gated at {unit.names[gated[0]]}")]
        if policy.placement == "pre":
            # The whole module is the branch: scale its input for every branch that reads it.
            cand.source = fork
            cand.targets = tuple(u for u in fork.users if fork in flow.preds.get(u, ()) and u in region)
            if not _check_tensor(cand, fork, policy):
                return [cand]
        return [_represent(cand)]
    dense = []
    for new in computed:
        # Rule 3: each new input gets its SE once, before the concatenation; a channel slice of
        # a computed tensor is scaled as the whole tensor, before slicing.
        producer = new
        while (whole := channel_slice_of(flow, producer)) is not None and whole in region:
            producer = whole
        if producer in done:
            continue
        consumers = tuple(
            u for u in producer.users
            if producer in flow.preds.get(u, ()) and (is_cat(u) or channel_slice_of(flow, u) is producer)
        )
        owner = unit.rewritable_owner(_common_owner([producer, *consumers]))
        d = _Candidate(unit, SiteKind.DENSE, cat, owner, source=producer, targets=consumers)
        if not _check_tensor(d, producer, policy):
            d.skip = Skipped(unit.names[producer], d.skip.reason, d.skip.detail)  # type: ignore[union-attr]
            dense.append(d)
            continue
        gated = _block_gates(unit, owner, cat) if owner else gating_products(flow, region)
        if gated:
            dense.append(_skip(d, SkipReason.ALREADY_ATTENDED, f"block gated at {unit.names[gated[0]]}", producer))
            continue
        dense.append(_represent(d))
    return dense


def _after_residual(unit: _Unit, node: fx.Node, fork: fx.Node, finished: Set[fx.Node]) -> bool:
    """Rule 9: ``node`` is a residual sum's output, directly or through a single-input chain of
    at most a handful of layers (an activation; CSP's transition conv after its blocks): the
    aggregation of finished residual blocks, not a new feature."""
    flow, layers = unit.flow, 0
    while node is not fork:
        if node in finished:
            return True
        if flow.is_parametric(node) and not is_scaling(flow, node):
            layers += 1
        preds = flow.preds.get(node, [])
        if len(preds) != 1 or layers > TRUNK_MAX_PARAMETRIC:
            return False
        node = preds[0]
    return False


def _sum_trunks(flow: DataFlow, inputs: list[fx.Node], finished: Set[fx.Node], cost: dict[fx.Node, int]) -> set[fx.Node]:
    """The trunks of the sums among ``inputs`` (the shorter operand, or what it is a channel
    slice of): another slice of a sum's projected shortcut is carried too (dual-path blocks)."""
    trunks: set[fx.Node] = set()
    for i in inputs:
        if i in finished and is_add(i):
            a, b = i.args[:2]
            trunk = a if cost.get(a, 0) <= cost.get(b, 0) else b
            trunks.add(channel_slice_of(flow, trunk) or trunk)  # type: ignore[arg-type]
    return trunks


def _is_prediction(unit: _Unit, node: fx.Node) -> bool:
    """A raw output of a convolution or linear layer (box or class logits), possibly reshaped."""
    while is_layout(unit.flow, node):
        node = unit.flow.live_inputs(node)[0]
    return is_conv(unit.module, node) or isinstance(_leaf(unit, node), nn.Linear)


def _leaf(unit: _Unit, node: fx.Node) -> nn.Module | None:
    return unit.module.get_submodule(str(node.target)) if node.op == "call_module" else None


def _coarser_path(
    unit: _Unit,
    cat: fx.Node,
    shape: tuple[int, ...],
    axis: int,
    inputs: list[fx.Node],
    ancestors: dict[fx.Node, set[fx.Node]],
) -> str | None:
    """Rule 12: an input computed through a coarser resolution than the concatenation's (U-Net
    and DeepLab decoders, FPN/PAN necks: upsampled deep features joined with a skip) makes the
    concatenation a fusion. A global-pooling branch (ASPP's image pool, 1 px) is no scale."""
    def spatial(s: tuple[int, ...]) -> int:
        return math.prod(d for k, d in enumerate(s) if k not in (0, axis))

    size = spatial(shape)
    for n in set(inputs).union(*(ancestors[i] for i in inputs)):
        s = tensor_shape(n)
        if s is not None and len(s) == len(shape) and 1 < spatial(s) < size:
            i = next(i for i in inputs if i is n or n in ancestors[i])
            return f"{unit.names[i]} is computed at a coarser resolution ({unit.names[n]}, {list(s)})"
    return None


def _block_gates(unit: _Unit, owner_rel: str, anchor: fx.Node) -> list[fx.Node]:
    """Rule 5 and 11: attention anywhere in the block owning a concatenation, or in the block
    enclosing it after the concatenation (a split convolution inside an inverted residual
    whose SE follows it)."""
    if not owner_rel:
        return []
    return unit.owner_gates(owner_rel) or _enclosing_gates(unit, owner_rel, anchor)


def _enclosing_gates(unit: _Unit, owner_rel: str, anchor: fx.Node) -> list[fx.Node]:
    """Rule 11: gates of the nearest enclosing block of ``owner_rel`` that read ``anchor``'s
    output (the SE that follows a split convolution; the channel attention on a CSP stage's
    concatenation, after its residual blocks). Containers (``nn.Sequential``, ...) hold many
    blocks and are looked through; the analysed root is no enclosing block."""
    enclosing = owner_rel.rpartition(".")[0]
    while enclosing and isinstance(unit.module.get_submodule(enclosing), (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        enclosing = enclosing.rpartition(".")[0]
    if not enclosing:
        return []
    gates = unit.owner_gates(enclosing)
    if not gates:
        return []
    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    block = unit.module.get_submodule(enclosing)

    def child(path: str) -> str:  # the enclosing block's child that holds ``path`` ("": itself)
        return path[len(enclosing) + 1:].split(".")[0] if path.startswith(enclosing + ".") else ""

    own = child(owner_rel)
    nodes = set(unit.owned_nodes(enclosing))
    found = []
    for g in gates:
        holder = child(str(g.target) if g.op == "call_module" else node_scope(g))
        # Attention of a sibling block (another block of the same stage, in a container or a
        # residual block of its own) is not the block's own.
        if holder == own or (holder and isinstance(block.get_submodule(holder), containers)):
            continue
        if holder and any(_is_residual_shaped(unit.flow, n) for n in unit.owned_nodes(f"{enclosing}.{holder}")):
            continue
        if anchor in unit.flow.ancestors_within(g, nodes):
            found.append(g)
    return found


def _is_residual_shaped(flow: DataFlow, node: fx.Node) -> bool:
    """An addition of two data tensors of one shape: what a residual block ends with."""
    if not is_add(node):
        return False
    operands = [a for a in node.args[:2] if isinstance(a, fx.Node) and flow.live.get(a)]
    return len(operands) == 2 and tensor_shape(operands[0]) == tensor_shape(operands[1]) is not None


def _common_owner(nodes: Sequence[fx.Node]) -> str:
    paths = [(str(n.target) if n.op == "call_module" else node_scope(n)).split(".") for n in nodes]
    common: list[str] = []
    for parts in zip(*paths, strict=False):
        if any(p != parts[0] for p in parts) or parts[0] == "":
            break
        common.append(parts[0])
    prefix = ".".join(common)
    # A leaf module is never an owner: its parent performs the call.
    for n in nodes:
        if n.op == "call_module" and str(n.target) == prefix:
            return prefix.rpartition(".")[0]
    return prefix


def _plain_candidates(unit: _Unit) -> list[_Candidate]:
    """SE-VGG: after the non-linearity that follows each convolution (opt-in, plain networks),
    and after each re-parameterisable block (rule 10), outside it, so that deploy-time fusion
    (timm's ``reparameterize_model``) still fuses every block."""
    flow = unit.flow
    found = []
    for node in flow.order:
        if not flow.live.get(node) or not is_activation(unit.module, node):
            continue
        producer = flow.preds[node][0] if len(flow.preds[node]) == 1 else None
        merge = producer
        while merge is not None and (inner := trailing_scaling_input(flow, merge)) is not None:
            merge = inner
        if merge is not None and (is_add(merge) or is_cat(merge)) and _linear_merge(unit, merge):
            found.append(_after_block(unit, node, _scope_of(merge)))
            continue
        if producer is not None and is_norm(unit.module, producer) and len(flow.preds[producer]) == 1:
            producer = flow.preds[producer][0]
        if producer is None or not is_conv(unit.module, producer):
            continue
        owner = unit.rewritable_owner(_scope_of(node))
        cand = _Candidate(unit, SiteKind.PLAIN, node, owner, source=node)
        if _check_tensor(cand, node):
            found.append(_represent(cand))
        else:
            found.append(cand)
    return found


def _linear_merge(unit: _Unit, merge: fx.Node) -> bool:
    fork = unit.flow.idom.get(merge)
    if fork is None:
        return False
    region = unit.flow.region(fork, merge)
    cost, _ = unit.flow.path_costs(fork, region)
    return _linear_block(unit, region, cost) is not None


def _after_block(unit: _Unit, act: fx.Node, block: str) -> _Candidate:
    """A plain site on the output of the re-parameterisable ``block``, owned by its parent."""
    owner = unit.rewritable_owner(block.rpartition(".")[0]) if block else ""
    cand = _Candidate(unit, SiteKind.PLAIN, act, owner, source=act)
    if not _check_tensor(cand, act):
        return cand
    cand = _represent(cand)
    rel = block[len(owner) + 1:] if owner else block
    if cand.skip is None and block and any(p == rel or rel.startswith(p + ".") for p in cand.inline):
        return _skip(cand, SkipReason.NOT_REWRITABLE, f"the SE would sit inside the re-parameterisable block {unit.full(block)}")
    return cand


def _scope_of(node: fx.Node) -> str:
    return str(node.target).rpartition(".")[0] if node.op == "call_module" else node_scope(node)


# --------------------------------------------------------------------------------------------
# Owner-level names of the nodes a site touches


def _rep(unit: _Unit, node: fx.Node, owner_rel: str, depth: int) -> tuple[str, list[str], str | None]:
    return owner_local_name(node, unit.names, unit.path, owner_rel, depth)


def _represent(cand: _Candidate) -> _Candidate:
    """Find how shallowly the owner can be rebuilt: children stay calls unless the source or a
    target lies inside them; record a NOT_REWRITABLE skip if no depth works."""
    unit, src = cand.unit, cand.source
    assert src is not None
    for depth in range(_MAX_INLINE_DEPTH):
        if not _inside(src, cand.owner_rel) or src.op == "placeholder":
            # The fork is the owner's own input ("pre" placement): its first placeholder.
            rep_src, inline, key = input_name(unit.full(cand.owner_rel), 0), [], None
        else:
            rep_src, inline, key = _rep(unit, src, cand.owner_rel, depth)
        if key is not None and any(key in dict(call_stack(u)) for u in src.users):
            continue  # the source is not the output of that call
        reps, ok = [], True
        for t in cand.targets:
            rep_t, inline_t, _ = _rep(unit, t, cand.owner_rel, depth)
            if rep_t == rep_src:
                ok = False
                break
            reps.append(rep_t)
            inline += inline_t
        if not ok:
            continue
        prefix = len(cand.owner_rel) + 1 if cand.owner_rel else 0
        cand.rep_source = rep_src
        cand.rep_targets = tuple(dict.fromkeys(reps))
        cand.inline = tuple(sorted({p[prefix:] for p in inline}))
        return cand
    return _skip(cand, SkipReason.NOT_REWRITABLE, "the scaled tensor is buried too deep inside the block's children")


# --------------------------------------------------------------------------------------------
# Nesting, naming, selection


def _mark_nested(candidates: list[_Candidate]) -> None:
    """Rule 2 and 7: one SE per block. Places inside a bigger residual or inception block are
    nested, whether that block got a site or was skipped for already having attention."""
    outer: list[_Candidate] = []
    for cand in sorted(candidates, key=lambda c: -len(c.region)):
        probe = cand.source if cand.kind is SiteKind.DENSE else cand.anchor
        host = next((o for o in outer if o.unit is cand.unit and probe in o.region), None)
        if host is not None:
            if cand.skip is None or cand.skip.reason is not SkipReason.ALREADY_ATTENDED:
                node = cand.source if cand.kind is SiteKind.DENSE and cand.source is not None else cand.anchor
                _skip(cand, SkipReason.NESTED, f"inside {cand.unit.names[host.anchor]}", node)
            continue
        # Hosts: blocks that got a site, or that already have attention (so that a second
        # injection nests the same places as the first).
        if cand.structural and (cand.skip is None or cand.skip.reason is SkipReason.ALREADY_ATTENDED):
            outer.append(cand)


def _spatial(cand: _Candidate) -> tuple[int, ...]:
    axis = cand.axis % len(cand.shape)
    return tuple(size for d, size in enumerate(cand.shape) if d not in (0, axis))


def _stage_spatial(cand: _Candidate) -> tuple[int, ...]:
    """Feature-map size of the site's block (its sum or concatenation), whatever the placement
    moves the SE to (``pre`` scales the fork, which may be at the previous resolution)."""
    shape = tensor_shape(cand.anchor)
    if shape is None or len(shape) != len(cand.shape):
        return _spatial(cand)
    axis = cand.axis % len(shape)
    return tuple(size for d, size in enumerate(shape) if d not in (0, axis))


def _number_stages(candidates: list[_Candidate]) -> dict[int, tuple[int, tuple[int, ...]]]:
    """Stage (index, feature-map size) of every usable candidate: runs of blocks at one
    resolution in graph order, counted over all sites before selection, so indices do not
    depend on it."""
    order: dict[int, int] = {}
    for c in candidates:
        order.setdefault(id(c.unit), len(order))
    usable = [c for c in candidates if c.skip is None]
    usable.sort(key=lambda c: (order[id(c.unit)], c.unit.flow.index[c.anchor], c.unit.flow.index[c.source or c.anchor]))
    stages: dict[int, tuple[int, tuple[int, ...]]] = {}
    stage, last = -1, None
    for cand in usable:
        spatial = _stage_spatial(cand)
        if spatial != last:
            stage, last = stage + 1, spatial
        stages[id(cand)] = (stage, spatial)
    return stages


def _check_selection(model: nn.Module, selection: Selection, stages: dict[int, tuple[int, tuple[int, ...]]]) -> None:
    """Refuse stages and resolutions the model does not have, listing the ones it has."""
    if not stages:
        return  # no site at all: the caller says so
    known: dict[int, tuple[int, ...]] = {}
    for stage, spatial in stages.values():
        known.setdefault(stage, spatial)
    name = type(model).__name__
    unknown = sorted(set(selection.stages or ()) - set(known))
    if unknown:
        listed = ", ".join(f"{k} ({_size(v)})" for k, v in sorted(known.items()))
        raise SelectionError(
            f"stage {', '.join(map(str, unknown))}: {name} has {len(known)} stages "
            f"(runs of SE sites at one feature-map size, at the analysed input): {listed}"
        )
    sides = sorted({max(v, default=0) for v in known.values()}, reverse=True)
    unknown = sorted(set(selection.resolutions or ()) - set(sides))
    if unknown:
        raise SelectionError(
            f"resolution {', '.join(map(str, unknown))}: {name} has SE sites at resolutions "
            f"{', '.join(map(str, sides))} (the largest side of each feature map at the analysed input)"
        )


def _size(spatial: Sequence[int]) -> str:
    return "x".join(str(n) for n in spatial) if spatial else "-"


def _finalise(
    model: nn.Module, candidates: list[_Candidate], config: SEConfig, selection: Selection, traces: OwnerTraces
) -> tuple[list[Site], list[Skipped]]:
    order: dict[int, int] = {}
    for c in candidates:
        order.setdefault(id(c.unit), len(order))
    candidates = sorted(candidates, key=lambda c: (order[id(c.unit)], c.unit.flow.index[c.source or c.anchor]))
    stages = _number_stages(candidates)
    _check_selection(model, selection, stages)
    sites: list[Site] = []
    skipped: list[Skipped] = []
    taken: dict[str, set[str]] = {}
    seen_sources: dict[tuple[int, fx.Node], int] = {}
    root_issues: dict[str, str] = {}
    for cand in candidates:
        if cand.skip is not None:
            skipped.append(cand.skip)
            continue
        assert cand.source is not None
        key = (id(cand.unit), cand.source, cand.rep_source)
        if key in seen_sources:  # dense: one SE per producer, whatever the number of consumers
            site = sites[seen_sources[key]]
            merged = tuple(dict.fromkeys(site.targets + cand.rep_targets))
            sites[seen_sources[key]] = replace(site, targets=merged)
            continue
        owner = cand.unit.full(cand.owner_rel)
        if not cand.owner_rel and cand.unit.root_call_issue:
            root_issues[owner] = cand.unit.root_call_issue
        name = _free_name(model, owner, taken)
        node_name = cand.unit.names[cand.anchor]
        stage, spatial = stages[id(cand)]
        reason = _deselected(selection, name, owner, cand.channels, stage, spatial)
        if reason is not None:
            skipped.append(Skipped(node_name, *reason))
            continue
        taken.setdefault(owner, set()).add(name.rsplit(".", 1)[-1])
        seen_sources[key] = len(sites)
        sites.append(
            Site(
                name=name,
                kind=cand.kind,
                owner=owner,
                node=node_name,
                source=cand.rep_source,
                targets=cand.rep_targets,
                channels=cand.channels,
                hidden=hidden_width(cand.channels, config.reduction, config.min_hidden, config.hidden),
                channel_axis=cand.axis,
                stage=stage,
                inline=cand.inline,
                prefix_tokens=cand.prefix_tokens,
                spatial=spatial,
                owner_args=cand.unit.owner_args(cand.owner_rel),
                config=config,
            )
        )
    sites, skipped = _drop_conflicting_owners(sites, skipped)
    return _rebuildable(model, sites, skipped, traces, root_issues)


def _rebuildable(
    model: nn.Module, sites: list[Site], skipped: list[Skipped], traces: OwnerTraces, root_issues: dict[str, str]
) -> tuple[list[Site], list[Skipped]]:
    """Rule 14: trace every owner as the rewriter will and keep only the sites found in it;
    the others are skipped as ``not-rewritable`` with the reason."""
    by_owner: dict[str, list[Site]] = {}
    for site in sites:
        by_owner.setdefault(site.owner, []).append(site)
    dropped: dict[str, str] = {}
    for owner, group in by_owner.items():
        if owner in root_issues:
            dropped.update({s.name: f"{owner or 'the model'} is {root_issues[owner]}" for s in group})
            continue
        module = model.get_submodule(owner) if owner else model
        pending = list(group)
        while pending:
            reason = traces.check(module, owner, pending)
            if reason is None:
                break
            # Keep the sites that work on their own; drop the others with the reason.
            alone = {s.name: traces.check(module, owner, [s]) for s in pending}
            bad = [s for s in pending if alone[s.name] is not None] or pending
            for s in bad:
                dropped[s.name] = alone.get(s.name) or reason
            pending = [s for s in pending if s not in bad]
    kept = [s for s in sites if s.name not in dropped]
    skipped += [Skipped(s.node, SkipReason.NOT_REWRITABLE, dropped[s.name]) for s in sites if s.name in dropped]
    return kept, skipped


def _deselected(
    selection: Selection, name: str, owner: str, channels: int, stage: int, spatial: tuple[int, ...]
) -> tuple[SkipReason, str] | None:
    if selection.include is not None and not _matches(selection.include, name, owner):
        return SkipReason.EXCLUDED, "not matched by include"
    if selection.exclude is not None and _matches(selection.exclude, name, owner):
        return SkipReason.EXCLUDED, "matched by exclude"
    if selection.stages is not None and stage not in selection.stages:
        return SkipReason.EXCLUDED, f"stage {stage} not selected"
    if selection.resolutions is not None and max(spatial, default=0) not in selection.resolutions:
        return SkipReason.EXCLUDED, f"resolution {'x'.join(map(str, spatial))} not selected"
    if channels < selection.min_channels:
        return SkipReason.TOO_FEW_CHANNELS, f"{channels} < {selection.min_channels}"
    return None


def _matches(globs: tuple[str, ...], name: str, owner: str) -> bool:
    return any(fnmatch.fnmatchcase(name, g) or fnmatch.fnmatchcase(owner, g) for g in globs)


def _free_name(model: nn.Module, owner: str, taken: dict[str, set[str]]) -> str:
    """``owner.se``, ``owner.se_1``, ...: the first name the owner does not already use.

    An attribute set to ``None`` counts as free, so timm blocks built without attention
    (``self.se = None``) get ``se`` and their keys match timm's SE-ResNets.
    """
    module = model.get_submodule(owner) if owner else model
    used = taken.get(owner, set())
    k = 0
    while True:
        attr = "se" if k == 0 else f"se_{k}"
        if attr not in used and getattr(module, attr, None) is None:
            return f"{owner}.{attr}" if owner else attr
        k += 1


def _drop_conflicting_owners(sites: list[Site], skipped: list[Skipped]) -> tuple[list[Site], list[Skipped]]:
    """An owner inside a module that another owner traces through could not be swapped in."""
    inlined = {f"{s.owner}.{p}" if s.owner else p for s in sites for p in s.inline}
    kept = []
    for site in sites:
        if any(site.owner == p or site.owner.startswith(p + ".") for p in inlined):
            skipped.append(Skipped(site.node, SkipReason.NOT_REWRITABLE, "its block is traced through by an outer site"))
        else:
            kept.append(site)
    return kept, skipped
