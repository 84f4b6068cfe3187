"""One rebuilt block: the owner's traced graph with SE calls inserted, as a :class:`RebuiltBlock`.

The block is traced on its own with its children kept as calls (unless a site lies inside
one), the SE module is inserted between the site's source node and its targets, and the
result keeps the block's children, parameters and buffers (same objects, same names), so every
original ``state_dict`` key is unchanged; SE keys read ``<owner>.se.fc1.weight``. The rebuilt
block follows what the original's methods change, pickles and deep-copies by rebuilding from
its original, and gives the original back (``restore``).
"""

from __future__ import annotations

import copy
import functools
import inspect
import typing
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import torch.fx as fx
from torch import nn

from ..analysis.calls import OUTPUT_TYPE
from ..analysis.hooks import MODULE_HOOKS
from ..analysis.owners import OwnerTraces, inline_paths, owner_args, owner_inputs, site_nodes
from ..errors import PlanMismatchError
from ..plan import PLAN_ATTR, Site
from ..se_block import SEBlock, check_se_weights
from .attach import se_block_for

__all__ = ["RebuiltBlock", "guard_loads", "rebuild_block"]

#: The hook dicts a rebuilt block takes over from its original (analysis silences the same ones).
_HOOK_DICTS = MODULE_HOOKS


class RebuiltBlock(fx.GraphModule):
    """A block rebuilt from its traced graph with SE calls inserted.

    It owns the original block's children, parameters and buffers (the same objects) plus the
    SE blocks. When the block's code differs between train and eval mode (a functional dropout
    baked in by tracing), it holds one graph per mode and switches on ``train()``, as
    torchvision's ``DualGraphModule`` does. Attributes it does not have (``stride``,
    ``downsample``, methods) are looked up on the original block, kept in ``original``.
    """

    # reason: TorchScript compiles properties unless told not to; these are Python-side only.
    __jit_unused_properties__ = [*fx.GraphModule.__jit_unused_properties__, "original", "original_class"]

    def __init__(
        self,
        original: nn.Module,
        eval_graph: fx.Graph,
        train_graph: fx.Graph | None,
        se_blocks: dict[str, SEBlock],
        constants: dict[str, Any],
    ) -> None:
        graphs = [g for g in (eval_graph, train_graph) if g is not None]
        attrs: dict[str, Any] = {}
        for graph in graphs:
            _resolve_annotations(graph, original)
            for node in graph.nodes:
                if node.op in ("get_attr", "call_module"):
                    target = str(node.target)
                    attrs[target] = _lookup(original, target, se_blocks, constants)
        start = train_graph if (original.training and train_graph is not None) else eval_graph
        super().__init__(attrs, start, class_name=type(original).__name__)
        _adopt(self, original, se_blocks, constants)
        self.__dict__["_se_graphs"] = (eval_graph, train_graph)
        self.__dict__["_se_original"] = original
        for name in _HOOK_DICTS:
            if hasattr(original, name):
                setattr(self, name, copy.copy(getattr(original, name)))
        self.training = original.training

    @property
    def original(self) -> nn.Module:
        return self.__dict__["_se_original"]

    @property
    def original_class(self) -> type[nn.Module]:
        return type(self.original)

    def train(self, mode: bool = True) -> RebuiltBlock:
        eval_graph, train_graph = self.__dict__["_se_graphs"]
        if train_graph is not None and mode != self.training:
            self.graph = train_graph if mode else eval_graph
        return super().train(mode)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            original = self.__dict__.get("_se_original")
            if original is None or name.startswith("__"):
                raise
            value = getattr(original, name)
            if inspect.ismethod(value) and value.__self__ is original:
                return _followed(self, name, value)
            return value

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        # reason: a layer swapped on the rebuilt block (``fuse_modules`` replaces conv and BN by
        # name on their parent) must be swapped on the original too, or copies and ``remove_se``
        # bring back the old one.
        original = self.__dict__.get("_se_original")
        if original is not None and _owned_by(original, name):
            setattr(original, name, value)

    def __delattr__(self, name: str) -> None:
        super().__delattr__(name)
        original = self.__dict__.get("_se_original")
        if original is not None and _owned_by(original, name):
            delattr(original, name)

    def _follow(self, method: str) -> None:
        """Rebuild from the original after ``method`` changed its structure (fused branches,
        swapped layers, a deploy flag), keeping this block's SE modules; or, when the sites no
        longer fit the changed block, refuse to run from now on and raise."""
        original = self.original
        owner_path, sites = self.__dict__.get("_se_sites", ("", ()))
        where = f"{owner_path or 'the model'} ({type(original).__name__})"
        try:
            if not sites:
                raise PlanMismatchError("no record of its sites")
            fresh = rebuild_block(original, owner_path, list(sites), OwnerTraces())
        except Exception as e:
            cause = str(e).splitlines()[0] if str(e) else type(e).__name__
            message = (
                f"{type(original).__name__}.{method}() changed the block at {where}, and its SE sites no "
                f"longer fit the changed block ({cause}); the rebuilt block would silently keep computing the "
                f"old function, so it now refuses to run. Call {method}() before inject_se, or call "
                f"remove_se(model) (it gives back the changed block) and inject again."
            )
            self.__dict__["_se_stale"] = message
            self.register_forward_pre_hook(_refuse_stale)
            raise PlanMismatchError(message, owner=owner_path) from e
        for attr in [site.attr for site in sites]:
            fresh._modules[attr] = self._modules[attr]
        for key in ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set", "_se_graphs"):
            self.__dict__[key] = fresh.__dict__[key]
        eval_graph, train_graph = self.__dict__["_se_graphs"]
        self.graph = train_graph if (self.training and train_graph is not None) else eval_graph

    def __reduce__(self) -> tuple[Any, ...]:
        # reason: fx.GraphModule pickles as a plain GraphModule rebuilt from its code, which
        # would register the original as a child (its keys twice in state_dict) and drop this
        # class; a rebuilt block pickles as its original plus its SE modules and is rebuilt on load.
        stale = self.__dict__.get("_se_stale")
        if stale:
            raise PlanMismatchError(stale)
        owner_path, sites = self.__dict__["_se_sites"]
        se_blocks = {site.attr: self._modules[site.attr] for site in sites}
        extras = {k: v for k, v in self.__dict__.items() if k == PLAN_ATTR}
        return (_unpickle, (self.original, owner_path, sites, se_blocks, self.training, extras))

    def _deepcopy_init(self):  # noqa: ANN202 - signature fixed by fx.GraphModule.__deepcopy__
        return _init_copy

    def restore(self) -> nn.Module:
        """The original block, holding this block's current children, parameters and buffers."""
        original = self.original
        if self.__dict__.get("_se_stale"):  # a method changed the original since: it is the truth
            return original
        for store in ("_modules", "_parameters", "_buffers"):
            mine, theirs = getattr(self, store), getattr(original, store)
            for key in list(theirs):
                if key in mine:
                    theirs[key] = mine[key]
        original.training = self.training
        return original


def _owned_by(module: nn.Module, name: str) -> bool:
    """``name`` is one of ``module``'s own children, parameters or buffers."""
    return name in module._modules or name in module._parameters or name in module._buffers


def _structure(module: nn.Module) -> tuple[Any, ...]:
    """What a trace of ``module`` depends on and a method could change behind a rebuilt block's
    back: every submodule, parameter and buffer object, and every plain attribute's value."""
    items: list[Any] = []
    for path, sub in module.named_modules(remove_duplicate=False):
        attrs = tuple(
            (key, value if isinstance(value, _PRIMITIVES) else id(value))
            for key, value in sorted(vars(sub).items())
            if not key.startswith("_") and key != "training"
        )
        tensors = tuple((name, id(t)) for name, t in [*sub._parameters.items(), *sub._buffers.items()])
        items.append((path, id(sub), attrs, tensors))
    return tuple(items)


def _followed(block: RebuiltBlock, name: str, method: Any) -> Any:
    """``method`` of the original block, called so that ``block`` follows what it changes."""

    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        before = _structure(block.original)
        result = method(*args, **kwargs)
        if _structure(block.original) != before:
            block._follow(name)
        return result

    return call


def _unpickle(
    original: nn.Module,
    owner_path: str,
    sites: tuple[Site, ...],
    se_blocks: dict[str, SEBlock],
    training: bool,
    extras: dict[str, Any],
) -> RebuiltBlock:
    """A pickled rebuilt block, rebuilt from its original with its own SE modules put back."""
    block = rebuild_block(original, owner_path, list(sites), OwnerTraces())
    block._modules.update(se_blocks)
    block.training = training
    eval_graph, train_graph = block.__dict__["_se_graphs"]
    if train_graph is not None:
        block.graph = train_graph if training else eval_graph
    block.__dict__.update(extras)
    if PLAN_ATTR in extras:  # the model's root
        guard_loads(block)
    return block


def _refuse_stale(module: nn.Module, args: Any) -> None:
    raise PlanMismatchError(module.__dict__["_se_stale"])


def _init_copy(res: RebuiltBlock, fake_mod: nn.Module, graph: fx.Graph) -> None:
    """``__init__`` for ``copy.deepcopy``: rebuild from the copied attribute dictionary."""
    body = fake_mod.__dict__
    eval_graph, train_graph = body["_se_graphs"]
    original = body["_se_original"]
    se_blocks = {k: m for k, m in body["_modules"].items() if isinstance(m, SEBlock)}
    constants = {k: v for k, v in body["_buffers"].items() if k not in original._buffers}
    if "_se_stale" in body:
        # reason: the changed original no longer has what the graphs call; the copy refuses to
        # run as the block does, so an empty graph stands in for them.
        eval_graph, train_graph = fx.Graph(), None
        eval_graph.output(None)
    RebuiltBlock.__init__(res, original, eval_graph, train_graph, se_blocks, constants)
    for key in ("_se_sites", "_se_stale", PLAN_ATTR):
        if key in body:
            res.__dict__[key] = body[key]
    if PLAN_ATTR in body:  # the model's root: its copy checks SE weights on load as it does
        guard_loads(res)
    if "_se_stale" in body:
        res.register_forward_pre_hook(_refuse_stale)
    res.training = body["training"]
    if train_graph is not None:
        res.graph = train_graph if res.training else eval_graph


def _resolve_annotations(graph: fx.Graph, original: nn.Module) -> None:
    """Turn the string annotations fx copies from a ``from __future__ import annotations``
    forward into real types, or drop them: generated code that names a string as a type does
    not compile in TorchScript."""
    try:
        hints = typing.get_type_hints(type(original).forward)
    except Exception:  # reason: an unresolvable annotation must not block the rebuild; drop it
        hints = {}
    for node in graph.nodes:
        if node.op == "placeholder" and isinstance(node.type, str):
            node.type = hints.get(str(node.target).lstrip("*"))
        elif node.op == "output" and isinstance(node.type, str):
            node.type = hints.get("return")


def _lookup(original: nn.Module, target: str, se_blocks: dict[str, SEBlock], constants: dict[str, Any]) -> Any:
    if target in se_blocks:
        return se_blocks[target]
    if target in constants:
        return constants[target]
    obj: Any = original
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _adopt(new: nn.Module, original: nn.Module, se_blocks: dict[str, SEBlock], constants: dict[str, Any]) -> None:
    """Give ``new`` exactly the original's top-level children, parameters and buffers (same
    objects, same order, same persistence), then the SE blocks, so state_dict keys match."""
    new._modules = OrderedDict(original._modules)
    new._modules.update(se_blocks)
    new._parameters = OrderedDict(original._parameters)
    new._buffers = OrderedDict(original._buffers)
    new._non_persistent_buffers_set = set(original._non_persistent_buffers_set)
    for name, value in constants.items():
        new.register_buffer(name, value, persistent=False)


# --------------------------------------------------------------------------------------------


def _insert_sites(graphs: dict[bool, fx.Graph], owner_path: str, sites: Iterable[Site]) -> None:
    """Call each site's SE block on its source and feed its targets with it, in every mode's graph."""
    for site in sites:
        for mode, (source, targets) in site_nodes(graphs, owner_path, site).items():
            with graphs[mode].inserting_after(source):
                se_node = graphs[mode].call_module(site.attr, (source,))
            for node in targets:
                node.replace_input_with(source, se_node)
    for graph in graphs.values():
        graph.lint()


def _restore_output_type(graph: fx.Graph) -> None:
    """Return the dict subclass the original's forward returned (``ModelOutput``), not the plain
    dict fx writes for it: ``cls(**outputs)`` becomes the graph's last node."""
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    cls, value = output.meta.get(OUTPUT_TYPE), output.args[0] if output.args else None
    if cls is None or type(value) is cls or not isinstance(value, dict):
        return
    with graph.inserting_before(output):
        output.args = (graph.call_function(cls, (), dict(value)),)
    graph.lint()


_PRIMITIVES = (bool, int, float, str, type(None))


def rebuild_block(owner: nn.Module, owner_path: str, sites: list[Site], traces: OwnerTraces) -> RebuiltBlock:
    graphs, constants = traces.graphs(owner, inline_paths(sites), owner_args(sites), owner_inputs(sites))
    _insert_sites(graphs, owner_path, sites)
    for graph in graphs.values():
        _restore_output_type(graph)
    se_blocks = {s.attr: se_block_for(s, owner) for s in sites}
    block = RebuiltBlock(owner, graphs[False], graphs.get(True), se_blocks, constants)
    block.__dict__["_se_sites"] = (owner_path, tuple(sites))  # to follow a change of the original
    return block


def guard_loads(root: nn.Module) -> None:
    """Check SE weights against their blocks' gates before ``root.load_state_dict`` copies anything."""
    hooks = root.__dict__.get("_load_state_dict_pre_hooks", {})
    if not any(getattr(h, "hook", h) is check_se_weights for h in hooks.values()):
        root.register_load_state_dict_pre_hook(check_se_weights)
