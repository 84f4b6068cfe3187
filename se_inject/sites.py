"""The placement policy: model -> plan (DESIGN.md, "Placement policy", rules 1-8).

Phases, each a small function: find the example input, trace the model into analysis units
(falling back to its blocks when the whole does not trace), turn additions and
concatenations into candidates (residual, inception, dense) or skipped places with reasons,
mark nested ones, then name, size and select the sites.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from collections.abc import Sequence, Set
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .block import SEConfig, hidden_width
from .errors import ConfigError
from .graph import (
    CallRecord,
    DataFlow,
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
    node_scope,
    propagate_shapes,
    qualified_names,
    record_module_inputs,
    standalone_call,
    standalone_concrete_args,
    tensor_shape,
    trace,
    trailing_scaling_input,
)
from .plan import Plan, Site, SiteKind, Skipped, SkipReason

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
                and len({len(args) for args, _ in calls}) == 1  # one graph serves every call
            ):
                return scope
            scope = scope.rpartition(".")[0]
        return scope

    def owner_args(self, owner_rel: str) -> int:
        """Positional tensors each call of the owner passes (0 for the unit's root: its own)."""
        calls = self.calls.get(owner_rel) if owner_rel else None
        return len(calls[0][0]) if calls else 0

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
) -> Plan:
    """Analyse ``model`` (unchanged) and return where SE blocks go under ``config``.

    ``plain`` adds the paper's SE-VGG placement (after the non-linearity that follows each
    convolution) to models that have no residual or concatenation site; ``tokens`` turns
    residual branches on token sequences into sites (squeezing over the tokens, class and
    distillation tokens left out).

    Raises:
        ConfigError: a selection option has a bad value.
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
    unanalysed: list[str] = []
    _analyse(model, "", args, units, unanalysed)
    policy = _Policy(config.placement, tokens)
    candidates = [c for unit in units for c in _unit_candidates(unit, policy)]
    _mark_nested(candidates)
    if plain and not any(c.skip is None for c in candidates):
        candidates += [c for unit in units for c in _plain_candidates(unit)]
    sites, skipped = _finalise(model, candidates, config, selection)
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
    """The inputs to analyse with: the user's, else one built from the model's config.

    Only shapes matter (analysis runs on fake tensors): timm's ``pretrained_cfg['input_size']``
    when known, else the first layer's input channels at the model's ``image_size`` or 224 px,
    batch 2.
    """
    if example_input is not None:
        return tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    ref = next(iter(model.parameters()), None)
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.get_default_dtype()
    device = ref.device if ref is not None else torch.device("cpu")
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    shape: tuple[int, ...] | None = None
    image_size = getattr(model, "image_size", None)  # torchvision's ViT checks its input size
    if isinstance(cfg, dict) and cfg.get("input_size"):
        shape = (2, *cfg["input_size"])
    else:
        for m in model.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                side = image_size if isinstance(image_size, int) else 224
                spatial = {nn.Conv1d: (side,), nn.Conv2d: (side, side), nn.Conv3d: (16, 112, 112)}[type(m)]
                shape = (2, m.in_channels, *spatial)
                break
            if isinstance(m, nn.Linear):
                shape = (2, m.in_features)
                break
    if shape is None:
        raise ConfigError(
            f"cannot guess an input for {type(model).__name__}; pass example_input=torch.randn(...)"
        )
    return (torch.empty(shape, dtype=dtype, device=device),)


# --------------------------------------------------------------------------------------------
# Tracing into units


def _graph_module(module: nn.Module, graph: fx.Graph, constants: dict[str, Any]) -> fx.GraphModule:
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


def _analysable_children(module: nn.Module) -> list[tuple[str, nn.Module]]:
    # Builtin layers are leaves (nothing inside to analyse), and so are modules without weights.
    return [
        (name, child)
        for name, child in module.named_children()
        if not type(child).__module__.startswith("torch.") and any(True for _ in child.parameters())
    ]


def _analyse(
    module: nn.Module,
    path: str,
    args: Sequence[Any],
    units: list[_Unit],
    unanalysed: list[str],
    untraceable: set[tuple[type, tuple[str, ...]]] | None = None,
) -> None:
    """Trace ``module`` into a unit; if it does not trace, analyse its children on their own.

    ``untraceable`` remembers (class, argument types) that failed, so the 58 dense layers of
    timm's DenseNet-121 (no-trace leaves taking a list) fail once, not 58 times.
    """
    untraceable = set() if untraceable is None else untraceable
    key = (type(module), tuple(type(a).__name__ for a in args))
    children = _analysable_children(module)
    try:
        if key in untraceable:
            raise TypeError("a module of this class failed to trace with these argument types")
        graph, constants, calls = trace(module, concrete_args=standalone_concrete_args(module, len(args)))
        propagate_shapes(_graph_module(module, graph, constants), args)
    except Exception as e:  # noqa: BLE001 - any failure means "analyse the parts"
        log.debug("%s does not trace (%s: %s); analysing its children", path or "model", type(e).__name__, e)
        untraceable.add(key)
        unanalysed.append(path)
        inputs = record_module_inputs(module, args) if children else {}
        for name, child in children:
            child_path = f"{path}.{name}" if path else name
            if name in inputs:
                _analyse(child, child_path, inputs[name], units, unanalysed, untraceable)
            else:
                unanalysed.append(child_path)
        return
    flow = DataFlow(graph, module)
    units.append(_Unit(path, module, graph, flow, qualified_names(graph, path), calls))
    # Leaves we cannot see into (timm's no-trace blocks): analyse them on their own.
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        child = module.get_submodule(str(node.target))
        if type(child).__module__.startswith("torch.") or not any(True for _ in child.parameters()):
            continue
        if _is_first_call(node):
            device = next(child.parameters()).device
            vals = tuple(_on_device(a.meta.get("val"), device) if isinstance(a, fx.Node) else a for a in node.args)
            child_path = f"{path}.{node.target}" if path else str(node.target)
            _analyse(child, child_path, vals, units, unanalysed, untraceable)


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


def _owner_entries(node: fx.Node, owner_rel: str) -> list[tuple[str, str]]:
    return [(k, p) for k, p in call_stack(node) if not owner_rel or p.startswith(owner_rel + ".")]


def _call_name(unit: _Unit, key: str, path: str) -> str:
    k = int(key.rsplit("@", 1)[1]) if "@" in key else 0
    full = unit.full(path)
    return full if k == 0 else f"{full}_{k}"


def _rep(unit: _Unit, node: fx.Node, owner_rel: str, depth: int) -> tuple[str, list[str], str | None]:
    """Name of ``node`` in the owner's graph when the first ``depth`` nested calls are traced
    through; also the paths traced through and the call key that stands for the node."""
    entries = _owner_entries(node, owner_rel)
    if node.op == "call_module":
        entries = entries[:-1] + [("", entries[-1][1])] if entries else entries
    if depth < len(entries) and entries[depth][0]:
        key, path = entries[depth]
        return _call_name(unit, key, path), [p for _, p in entries[:depth]], key
    inline = [p for k, p in entries if k]
    return unit.names[node], inline, None


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


def _finalise(
    model: nn.Module, candidates: list[_Candidate], config: SEConfig, selection: Selection
) -> tuple[list[Site], list[Skipped]]:
    order: dict[int, int] = {}
    for c in candidates:
        order.setdefault(id(c.unit), len(order))
    candidates = sorted(candidates, key=lambda c: (order[id(c.unit)], c.unit.flow.index[c.source or c.anchor]))
    # Stages are counted over every usable site before selection, so indices do not depend on it.
    stages: dict[int, int] = {}
    stage, last = -1, None
    for cand in candidates:
        if cand.skip is None:
            if _spatial(cand) != last:
                stage, last = stage + 1, _spatial(cand)
            stages[id(cand)] = stage
    sites: list[Site] = []
    skipped: list[Skipped] = []
    taken: dict[str, set[str]] = {}
    seen_sources: dict[tuple[int, fx.Node], int] = {}
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
        name = _free_name(model, owner, taken)
        node_name = cand.unit.names[cand.anchor]
        reason = _deselected(selection, name, owner, cand.channels, stages[id(cand)], _spatial(cand))
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
                stage=stages[id(cand)],
                inline=cand.inline,
                prefix_tokens=cand.prefix_tokens,
                spatial=_spatial(cand),
                owner_args=cand.unit.owner_args(cand.owner_rel),
            )
        )
    return _drop_conflicting_owners(sites, skipped)


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
