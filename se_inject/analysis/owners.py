"""How a block that owns sites is traced for rebuilding, shared by the planner and the rewriter.

The planner traces each owner exactly as the rewriter will (children kept as calls except the
ones a site lies in, both train and eval mode) and checks that every site's nodes are found
(``names.locate``); owners that fail are skipped in the plan, so a plan is a promise
(placement rule 14). ``inject_se`` hands the same :class:`OwnerTraces` to the rewriter, which reuses the
traces instead of tracing again.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch.fx as fx
from torch import nn

from ..errors import PlanMismatchError
from ..plan import Site
from .calls import required_positional, standalone_concrete_args, tuple_concrete_args
from .draws import watch_random_draws
from .node_names import locate, qualified_names
from .tracing import Traced, trace

__all__ = [
    "OwnerTraces", "TrainModeError", "inline_paths", "owner_args", "owner_inputs", "block_signature", "site_nodes",
]


def inline_paths(sites: Sequence[Site]) -> tuple[str, ...]:
    """Children of the owner traced through: those any of its sites lies in."""
    return tuple(sorted({p for s in sites for p in s.inline}))


def owner_args(sites: Sequence[Site]) -> int:
    """Positional tensors the owner is traced with: as many as its sites' calls pass (DLA's
    ``block(x, shortcut)``), or 0 for its required ones."""
    return max((s.owner_args for s in sites), default=0)


def owner_inputs(sites: Sequence[Site]) -> int:
    """N when the owner's last traced argument is an N-tuple of traced values (DPN's dual-path
    blocks), traced with one placeholder per element; 0 when it takes tensors."""
    return max((s.owner_inputs for s in sites), default=0)


_PRIMITIVES = (bool, int, float, str, type(None))


def _plain_attributes(module: nn.Module) -> tuple[Any, ...] | None:
    items = []
    for key, value in sorted(vars(module).items()):
        if key.startswith("_") or key == "training":
            continue
        if isinstance(value, _PRIMITIVES) or (
            isinstance(value, tuple) and all(isinstance(v, _PRIMITIVES) for v in value)
        ):
            items.append((key, value))
        elif not callable(value):
            return None
    return tuple(items)


def block_signature(module: nn.Module) -> tuple[Any, ...] | None:
    """What a trace of ``module`` can depend on: for the block and every module inside it, the
    class, the plain attributes (``stride``, ``use_res_connect``, ``downsample is None``) and the
    names, shapes and dtypes of parameters and buffers. ``None`` (never shared) when an
    attribute is data of some other kind."""
    items: list[Any] = []
    for path, sub in module.named_modules(remove_duplicate=False):
        attrs = _plain_attributes(sub)
        if attrs is None:
            return None
        tensors = tuple(
            (name, tuple(t.shape), t.dtype) if t is not None else (name, None)
            for name, t in [*sub._parameters.items(), *sub._buffers.items()]
        )
        items.append((path, type(sub), attrs, tensors))
    return tuple(items)


def trace_signature(module: nn.Module) -> tuple[Any, ...] | None:
    """What a trace of ``module`` can branch on: the class and plain attributes (``window_size``,
    ``downsample is None``) of the block and of every module inside it whose forward is traced
    through; torch's own layers stay calls, so their class is all that counts. Sizes of weights
    and of torch's layers are left out: blocks that differ only in widths (DenseNet's layers)
    trace alike. ``None`` (never shared) when an attribute is data of some other kind."""
    items: list[Any] = []
    for path, sub in module.named_modules(remove_duplicate=False):
        if sub is not module and type(sub).__module__.startswith("torch.nn"):
            items.append((path, type(sub)))
            continue
        attrs = _plain_attributes(sub)
        if attrs is None:
            return None
        unset = tuple(k for table in (sub._modules, sub._parameters, sub._buffers) for k, v in table.items() if v is None)
        items.append((path, type(sub), attrs, unset))
    return tuple(items)


class SideEffectError(RuntimeError):
    """The owner's forward assigns attributes: a rebuilt graph would silently drop that."""


def _refuse_side_effects(owner: nn.Module, effects: tuple[str, ...]) -> None:
    if effects:
        shown = ", ".join(f"self.{e}" for e in effects[:3]) + (f" and {len(effects) - 3} more" if len(effects) > 3 else "")
        raise SideEffectError(
            f"its forward assigns {shown}, a side effect the rebuilt block would drop"
        )


class TrainModeError(RuntimeError):
    """The owner's code cannot be rebuilt faithfully in one mode: its train-mode forward does
    not trace, reads the branch otherwise than eval mode does, or a forward drew random numbers
    while it was traced (stochastic depth, a shake-shake mix or drop-connect drawn in Python)."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _trace_owner(owner: nn.Module, training: bool, inline: tuple[str, ...], concrete: dict[str, Any]) -> Traced:
    """One mode's trace of ``owner``, refused where it would silently differ from the forward."""
    mode = "train" if training else "eval"
    with watch_random_draws() as draws:
        try:
            traced = trace(owner, training=training, inline=inline, concrete_args=concrete)
        except Exception as e:
            if not training:
                raise
            raise TrainModeError(
                f"its train-mode forward does not trace ({_first_line(e)}); a rebuilt block would lose that code"
            ) from e
    if draws:
        whose = " and ".join({"torch": "torch's", "random": "Python's", "numpy": "numpy's"}[g] for g in draws.generators)
        raise TrainModeError(
            f"its {mode}-mode forward draws random numbers outside the graph ({whose} generator), as "
            "float(torch.rand(1)) or random.random() < p do: a trace draws them once, and a rebuilt block "
            "would repeat that one draw on every call"
        )
    _refuse_side_effects(owner, traced.side_effects)
    return traced


def site_nodes(
    graphs: dict[bool, fx.Graph], owner_path: str, site: Site, names: dict[int, dict[str, fx.Node]] | None = None
) -> dict[bool, tuple[fx.Node, list[fx.Node]]]:
    """The site's source and targets in each mode's graph. Where the train graph has code of
    its own between the branch and the sum (a drop-connect mask: ``out * mask`` feeds the sum),
    the eval targets do not read the source there; when they were all its readers in eval mode,
    the SE block scales the source for all its train-mode readers too, as a hook on a module
    would. Anything else differing is refused.

    Raises:
        PlanMismatchError: a node of the site is missing from the eval graph.
        TrainModeError: the train graph reads the branch otherwise.
    """

    def relative(graph: fx.Graph) -> dict[str, fx.Node] | None:
        if names is None:
            return None
        if id(graph) not in names:
            names[id(graph)] = {name: node for node, name in qualified_names(graph).items()}
        return names[id(graph)]

    what = f"site {site.name}"
    found = {False: locate(graphs[False], owner_path, site.source, site.targets, what, relative(graphs[False]))}
    if True not in graphs:
        return found
    try:
        found[True] = locate(graphs[True], owner_path, site.source, site.targets, what, relative(graphs[True]))
    except PlanMismatchError as e:
        source, targets = found[False]
        try:
            train_source, readers = locate(graphs[True], owner_path, site.source, (), what, relative(graphs[True]))
        except PlanMismatchError:
            train_source, readers = None, []
        if train_source is None or set(targets) != set(source.users) or not readers:
            raise TrainModeError(f"its train-mode code reads the branch otherwise than eval mode ({e})") from e
        found[True] = (train_source, readers)
    return found


class OwnerTraces:
    """Traces of owners, shared between blocks with the same signature.

    Tracing patches ``nn.Module`` itself, which costs milliseconds per trace once timm and
    torchvision are loaded; ResNet-152's 50 blocks have only a handful of signatures. The
    signature covers the whole block (a forward may loop over a ModuleList or read a child's
    stride), so two blocks share a trace only when nothing a trace could see differs.
    """

    def __init__(self) -> None:
        self._graphs: dict[tuple[Any, ...], dict[bool, fx.Graph]] = {}
        # Per owner instance: traces with per-instance constants, which are never shared.
        self._own: dict[tuple[int, tuple[str, ...], int, int], tuple[dict[bool, fx.Graph], dict[str, Any]]] = {}
        # Per owner instance: its signature (planning and rewriting ask for the same owners).
        self._signatures: dict[int, tuple[nn.Module, tuple[Any, ...] | None]] = {}
        # Per graph: node names relative to the owner (the owner's path is a prefix).
        self._names: dict[int, dict[str, fx.Node]] = {}

    def _signature(self, owner: nn.Module) -> tuple[Any, ...] | None:
        held = self._signatures.get(id(owner))
        if held is None or held[0] is not owner:
            held = (owner, block_signature(owner))
            self._signatures[id(owner)] = held
        return held[1]

    def graphs(
        self, owner: nn.Module, inline: tuple[str, ...], args: int = 0, inputs: int = 0
    ) -> tuple[dict[bool, fx.Graph], dict[str, Any]]:
        """Copies of the owner's eval graph under ``False`` and, under ``True``, of a train
        graph only when the code differs; plus the tensor constants the traces made. The
        copies are the caller's to edit. ``args``: positional tensors (0: the required ones);
        ``inputs``: N when the last of those is an N-tuple of traced values."""
        graphs, constants = self._traced(owner, inline, args, inputs)
        return {mode: copy.deepcopy(g) for mode, g in graphs.items()}, constants

    def _traced(
        self, owner: nn.Module, inline: tuple[str, ...], args: int = 0, inputs: int = 0
    ) -> tuple[dict[bool, fx.Graph], dict[str, Any]]:
        own = self._own.get((id(owner), inline, args, inputs))
        if own is not None:
            return own
        key = self._signature(owner)
        key = None if key is None else (key, inline, args, inputs)
        if key is not None and key in self._graphs:
            return self._graphs[key], {}
        graphs: dict[bool, fx.Graph] = {}
        constants: dict[str, Any] = {}
        if inputs:  # one placeholder per element of the tuple it is called with
            concrete = tuple_concrete_args(owner, args or 1, inputs)
        else:
            concrete = standalone_concrete_args(owner, args or required_positional(owner) or 0)
        # Both modes unless the eval trace read no ``training`` flag: code that reads one may
        # differ in train mode, and a missed difference would silently train with the eval graph.
        traced = _trace_owner(owner, False, inline, concrete)
        graphs[False] = traced.graph
        constants.update(traced.constants)
        if traced.read_mode:
            traced = _trace_owner(owner, True, inline, concrete)
            constants.update(traced.constants)
            if graphs[False].python_code("self").src != traced.graph.python_code("self").src:
                graphs[True] = traced.graph
        if key is not None and not constants:  # constants are per instance: never share them
            self._graphs[key] = graphs
        else:
            self._own[(id(owner), inline, args, inputs)] = (graphs, constants)
        return graphs, constants

    def traced(self, owner: nn.Module, args: int = 0, inputs: int = 0) -> dict[bool, fx.Graph]:
        """The owner's graphs (eval under ``False``, train under ``True`` when it differs) with
        every child kept as a call; shared, not to be edited."""
        return self._traced(owner, (), args, inputs)[0]

    def names(self, graph: fx.Graph) -> dict[str, fx.Node]:
        """The graph's nodes by owner-relative qualified name (kept per graph)."""
        names = self._names.get(id(graph))
        if names is None:
            names = self._names[id(graph)] = {name: node for node, name in qualified_names(graph).items()}
        return names

    def check(self, owner: nn.Module, owner_path: str, sites: Sequence[Site]) -> str | None:
        """Why ``owner`` cannot be rebuilt with ``sites`` (the first line of the error), or
        None when the rewriter will find every site's nodes in both modes' graphs."""
        try:
            graphs, _ = self._traced(owner, inline_paths(sites), owner_args(sites), owner_inputs(sites))
            for site in sites:
                site_nodes(graphs, owner_path, site, self._names)
        except Exception as e:  # noqa: BLE001 - any failure means "not rewritable", with its reason
            return _first_line(e)
        return None
