"""The planner's records: a traced unit, a candidate place, the options the rules read."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx
from torch import nn

from ..analysis.attention import gating_products
from ..analysis.batch import batch_axis, grown_call_args, grown_values
from ..analysis.batch_first import BatchFirst
from ..analysis.calls import CallRecord, leading_tensors, standalone_call, tuple_call
from ..analysis.dataflow import DataFlow
from ..analysis.node_names import node_scope
from ..analysis.ops import cat_dim, is_cat, tensor_shape
from ..plan import SiteKind, Skipped, SkipReason

__all__ = ["TRUNK_MAX_PARAMETRIC", "Unit", "Candidate", "Policy", "Context", "Rule", "inside", "skip"]


#: A shortcut has at most this many parametric layers (projection: pool + conv + norm, or a
#: GhostNet-style depthwise + pointwise pair); a deeper "shortcut" means a fusion.
TRUNK_MAX_PARAMETRIC = 4


@dataclass
class Unit:
    """One traced module: the whole model, or a block of a model that does not trace.

    Filled once by ``units.analyse``; only the two caches below grow afterwards.
    """

    #: Path of the traced module in the model ("" for the model itself).
    path: str
    #: The traced module (the user's, unchanged).
    module: nn.Module
    #: Its fx graph, with ``node.meta["val"]`` set by shape propagation.
    graph: fx.Graph
    #: Data edges, dominators and path costs of ``graph``.
    flow: DataFlow
    #: Model-level qualified name of every node (``layer1.0.add``).
    names: dict[fx.Node, str]
    #: How each submodule traced through was called, by path relative to the unit.
    calls: dict[str, list[CallRecord]]
    #: Why the unit's root cannot be rebuilt on its own ("" when it can): it was called with
    #: values other than tensors and defaults, which its own trace would not reproduce.
    root_call_issue: str = ""
    #: Per submodule traced through (relative path): the node each of its calls returned, or
    #: None when a call returned something else than one traced value.
    outputs: dict[str, list[fx.Node | None]] = field(default_factory=dict)
    #: The tensor constants the trace made (shape propagation reads them).
    constants: dict[str, Any] = field(default_factory=dict)
    #: The unit's inputs with one sample more (``analysis.batch``), None when its batch is not
    #: known; asked on first need only (a second shape propagation tells the batch axes).
    grown_inputs: Callable[[], Sequence[Any] | None] | None = None
    #: Where its code branched on sizes, decided at the analysis input: the unit's graph holds
    #: for that input size only.
    specialised: tuple[str, ...] = ()
    #: How many leading placeholders hold the model's example arguments, batch on dim 0 (the
    #: model's own unit; 0 for a block analysed alone: its caller's layout is not assumed).
    batch_inputs: int = 0
    #: Cache: the nodes performed inside each owner (relative path -> nodes in graph order).
    _owned: dict[str, list[fx.Node]] = field(default_factory=dict)
    #: Cache: the gating products (existing attention) among each owner's nodes.
    _gated: dict[str, list[fx.Node]] = field(default_factory=dict)
    #: Cache: each node's value on the grown inputs (one entry once asked; None: not known).
    _grown: list[dict[fx.Node, Any] | None] = field(default_factory=list)
    #: Cache: how many times each submodule (by id) is called in the unit, under any name.
    _call_counts: dict[int, int] = field(default_factory=dict)
    #: Cache: the batch axes proven from the graph (``analysis.batch_first``), made once asked.
    _first: list[BatchFirst] = field(default_factory=list)

    def full(self, rel: str) -> str:
        """The model-level path of ``rel``, a path relative to the unit."""
        return f"{self.path}.{rel}" if self.path and rel else self.path or rel

    def rewritable_owner(self, scope: str) -> str:
        """``scope`` or its nearest ancestor that can be traced on its own: every call passes
        exactly its required arguments, all tensors, plus at most defaults by keyword (lists,
        ``None`` and other Python values would become placeholders and change the graph), or
        every call passes the same tensors and then one tuple of as many traced values (DPN's
        dual-path blocks, Twins' ``(H, W)``: it is traced with one placeholder per element).
        The unit's root always qualifies."""
        while scope:
            calls = self.calls.get(scope, [])
            module = self.module.get_submodule(scope)
            if calls and (_standalone_calls(module, calls) or _tuple_calls(module, calls)):
                return scope
            scope = scope.rpartition(".")[0]
        return scope

    def owner_args(self, owner_rel: str) -> int:
        """Positional tensors each call of the owner passes, a tuple of traced values counted as
        one (0 for the unit's root: its own)."""
        calls = self.calls.get(owner_rel) if owner_rel else None
        if not calls:
            return 0
        passed, _ = tuple_call(self.module.get_submodule(owner_rel), *calls[0])
        return passed or leading_tensors(calls[0][0])

    def owner_inputs(self, owner_rel: str) -> int:
        """N when the last traced argument of each call of the owner is an N-tuple of traced
        values, else 0 (tensors only; always for the unit's root)."""
        calls = self.calls.get(owner_rel) if owner_rel else None
        return tuple_call(self.module.get_submodule(owner_rel), *calls[0])[1] if calls else 0

    def grown_values(self) -> dict[fx.Node, Any] | None:
        """Each node's value on the unit's inputs with one sample more; None when not known."""
        if not self._grown:
            grown = self.grown_inputs() if self.grown_inputs is not None else None
            self._grown.append(None if grown is None else grown_values(self.module, self.graph, self.constants, grown))
        return self._grown[0]

    def module_calls(self, path: str) -> int:
        """How many times the module at ``path`` is called in the unit, under any of its names
        (one instance shared by several blocks, or reached by several paths)."""
        if not self._call_counts:
            for rel, calls in self.calls.items():
                key = id(self.module.get_submodule(rel))
                self._call_counts[key] = self._call_counts.get(key, 0) + len(calls)
        return self._call_counts.get(id(self.module.get_submodule(path)), 0)

    def batch_axis(self, node: fx.Node) -> int | None:
        """The axis of ``node``'s output holding the samples of the batch; None when not known.
        Proven from the graph where its ops keep dim 0, else told by the second shape pass."""
        if self.batch_inputs:
            if not self._first:
                self._first.append(BatchFirst(self.module, self.graph, self.batch_inputs))
            if self._first[0].proven(node):
                return 0
        grown = self.grown_values()
        return None if grown is None else batch_axis(node.meta.get("val"), grown.get(node))

    def grown_call(self, node: fx.Node) -> tuple[Any, ...] | None:
        """The arguments of the call ``node`` with one sample more (for a block analysed alone)."""
        return grown_call_args(node, self.grown_values())

    def prefix_tokens(self, token_axis: int = 1) -> int:
        """Class and distillation tokens in front of a token sequence (on ``token_axis``): timm's
        ``num_prefix_tokens``, else the constant tokens concatenated in front of the patches."""
        declared = getattr(self.module, "num_prefix_tokens", None)
        if isinstance(declared, int):
            return declared
        for node in self.flow.order:
            shape = tensor_shape(node)
            if not is_cat(node) or shape is None or len(shape) != 3 or cat_dim(node) % 3 != token_axis:
                continue
            count = 0
            for a in node.args[0] if isinstance(node.args[0], (list, tuple)) else ():
                if not isinstance(a, fx.Node) or self.flow.live.get(a):
                    break
                count += (tensor_shape(a) or (0, 0, 0))[token_axis]
            if count:
                return count
        return 0

    def owned_nodes(self, owner_rel: str) -> list[fx.Node]:
        """The nodes performed inside ``owner_rel`` (all of them for the unit's root)."""
        if owner_rel not in self._owned:
            self._owned[owner_rel] = [n for n in self.flow.order if inside(n, owner_rel)]
        return self._owned[owner_rel]

    def owner_gates(self, owner_rel: str) -> list[fx.Node]:
        """Existing channel attention anywhere inside ``owner_rel``."""
        if owner_rel not in self._gated:
            self._gated[owner_rel] = gating_products(self.flow, self.owned_nodes(owner_rel))
        return self._gated[owner_rel]


def _standalone_calls(module: nn.Module, calls: list[CallRecord]) -> bool:
    """Every call passes tensors and defaults, the same number of tensors: one graph serves all."""
    return all(standalone_call(module, args, kwargs) for args, kwargs in calls) and (
        len({leading_tensors(args) for args, _ in calls}) == 1
    )


def _tuple_calls(module: nn.Module, calls: list[CallRecord]) -> bool:
    """Every call passes the same tensors, then a tuple of as many traced values, then defaults."""
    shapes = {tuple_call(module, args, kwargs) for args, kwargs in calls}
    return len(shapes) == 1 and (0, 0) not in shapes


@dataclass
class Candidate:
    """A place considered for SE, before naming and selection.

    Made by a rule; ``skip`` (once a reason is found), ``check_tensor`` (the tensor's fields)
    and ``represent`` (the owner-level names) fill in the rest; ``_mark_nested`` may add a skip.
    """

    #: The analysis unit whose graph holds the place.
    unit: Unit
    #: Residual, inception, dense or plain.
    kind: SiteKind
    #: The node that makes the place: the sum, the concatenation, the activation (plain).
    anchor: fx.Node
    #: The block rebuilt for the site, relative to the unit ("" for the unit's root).
    owner_rel: str
    #: The tensor the SE block scales (None until a rule finds it).
    source: fx.Node | None = None
    #: The nodes that read the scaled tensor instead of ``source`` (empty: all its users).
    targets: tuple[fx.Node, ...] = ()
    #: Nodes between the fork and the anchor (structural blocks only): what is nested inside.
    region: set[fx.Node] = field(default_factory=set)
    #: A real residual or inception block: candidates inside its region are nested.
    structural: bool = False
    #: Why the place gets no SE block (None while it is still a site).
    skip: Skipped | None = None
    #: ``source``'s name in the owner's own trace (children kept as calls where possible).
    rep_source: str = ""
    #: ``targets``' names in the owner's own trace.
    rep_targets: tuple[str, ...] = ()
    #: Children of the owner traced through to reach ``source`` and ``targets``, owner-relative.
    inline: tuple[str, ...] = ()
    #: Width of the scaled tensor along its channel axis.
    channels: int = 0
    #: Channel axis of the scaled tensor: 1 (channels first) or -1 (channels last).
    axis: int = 1
    #: Shape of the scaled tensor at the analysed input.
    shape: tuple[int, ...] = ()
    #: Class and distillation tokens left out of the squeeze (token sequences, ``tokens=True``).
    prefix_tokens: int = 0
    #: Axis of the scaled tensor holding the samples (0; 1 for time-first ``[T, B, D]``).
    batch_axis: int = 0
    #: ``(H, W)`` of the feature map a token sequence flattens (timm's Swin MLP), else empty.
    map_size: tuple[int, ...] = ()


@dataclass(frozen=True)
class Policy:
    """The options the rules read: where on a branch the SE block goes, and whether residual
    branches on token sequences are sites."""

    #: ``standard`` (end of the branch), ``pre`` (start, after the fork) or ``inner`` (after
    #: the branch's last spatial convolution).
    placement: str = "standard"
    #: Turn residual branches on token sequences ``[B, N, C]`` into sites.
    tokens: bool = False


@dataclass
class Context:
    """What the rules share while one unit's graph is walked in order (one per unit)."""

    #: The placement options.
    policy: Policy
    #: Producers already given a dense candidate (rule 3: one SE per producer, however many
    #: concatenations read it).
    producers: set[fx.Node | None] = field(default_factory=set)
    #: Rule 3: the producers among those taken as new inputs of a dense concatenation: read
    #: again by a later concatenation, they are carried features there (SparseNet).
    dense_producers: set[fx.Node | None] = field(default_factory=set)
    #: Rule 9: ends of finished blocks (residual sums, aggregation roots) seen so far: their
    #: outputs are trunk, not new features.
    finished: set[fx.Node] = field(default_factory=set)
    #: The trunk of each residual sum in ``finished`` (a later branch summed into it from the
    #: same fork shares that trunk: multi-branch residuals).
    trunks: dict[fx.Node, fx.Node] = field(default_factory=dict)
    #: Branch-side nodes of the residual sums in ``finished`` (fork and sum left out), to their
    #: sum: a later sum's "trunk" computed in there is a side output of that block (WaveNet's
    #: skip), no shortcut.
    branch_nodes: dict[fx.Node, fx.Node] = field(default_factory=dict)
    #: Rule 3: outputs of dense concatenations seen so far: carried features wherever they
    #: flow next (DPN's dense path, concatenated again by every later block).
    dense: set[fx.Node] = field(default_factory=set)


#: A placement rule: given a unit, one of its live nodes (in graph order) and the shared context,
#: the candidates the node makes, or None when the node is not the rule's kind (the driver then
#: asks the next rule; the first rule that answers wins).
Rule = Callable[[Unit, fx.Node, Context], "list[Candidate] | None"]


def inside(node: fx.Node, owner_rel: str) -> bool:
    """Whether ``node`` is performed inside the module at ``owner_rel`` (relative to the unit)."""
    path = str(node.target) if node.op == "call_module" else node_scope(node)
    return not owner_rel or path == owner_rel or path.startswith(owner_rel + ".")


def skip(cand: Candidate, reason: SkipReason, detail: str = "", node: fx.Node | None = None) -> Candidate:
    """Record on ``cand`` why it gets no SE block, named after ``node`` (default: its anchor)."""
    cand.skip = Skipped(cand.unit.names[node if node is not None else cand.anchor], reason, detail)
    return cand
