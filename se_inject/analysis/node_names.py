"""Owner-local qualified node names: the one implementation the planner and the rewriter share.

A node is named torchvision-style after the module that performs it (``layer1.0.conv1``,
``layer1.0.add``, ``layer1.0.relu_1``), relative to the model, so a block traced on its own
gets the same names as inside the whole model. The planner analyses a bigger graph (the whole
model, or a block of it) than the one the rewriter rebuilds (the site's owner, with children it
does not need kept as calls): :func:`owner_local_name` says what a node of the bigger graph is
called in the owner's graph, and :func:`locate` finds a site's nodes in that graph by those
names. The planner checks every site with :func:`locate` on the owner's real trace
(``analysis.owners``), so the rewriter, which calls the same function on the same trace, finds them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch.fx as fx

from ..errors import PlanMismatchError

__all__ = ["qualified_names", "input_name", "node_scope", "call_stack", "owner_local_name", "locate"]



def call_stack(node: fx.Node) -> list[tuple[str, str]]:
    """``(call key, module path)`` pairs from outermost to innermost; a call key carries ``@k``
    for the k-th repeated call of the same module. For ``call_module`` nodes the called module is
    the last entry."""
    stack = node.meta.get("nn_module_stack") or {}
    return [(key, value[0]) for key, value in stack.items()]


def node_scope(node: fx.Node) -> str:
    """Path (relative to the traced root) of the module whose ``forward`` created ``node``."""
    stack = call_stack(node)
    if node.op == "call_module":
        stack = stack[:-1]
    return stack[-1][1] if stack else ""


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _op_name(node: fx.Node) -> str:
    if isinstance(node.target, str):
        return node.target
    return getattr(node.target, "__name__", str(node.target))


def input_name(prefix: str, k: int) -> str:
    """Name of the k-th input of the module at ``prefix`` (``layer1.0.<input0>``)."""
    return _join(prefix, f"<input{k}>")


def qualified_names(graph: fx.Graph, prefix: str = "") -> dict[fx.Node, str]:
    """torchvision-style node names: ``layer1.0.conv1``, ``layer1.0.add``, ``layer1.0.relu_1``.

    Module calls are named after the module, other ops after the module that performs them;
    repeats get ``_1``, ``_2``, ... in graph order; inputs are ``<input0>``, ``<input1>``, ...
    ``prefix`` is the path of the traced module,
    so a block traced on its own gets the same names as inside the whole model.
    """
    counts: Counter[str] = Counter()
    names: dict[fx.Node, str] = {}
    inputs = 0
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr"):
            base = _join(prefix, str(node.target))
        elif node.op == "placeholder":
            base, inputs = input_name(prefix, inputs), inputs + 1
        elif node.op == "output":
            base = _join(prefix, node.name)
        else:
            base = _join(_join(prefix, node_scope(node)), _op_name(node))
        k = counts[base]
        counts[base] += 1
        names[node] = base if k == 0 else f"{base}_{k}"
    return names


def _owner_entries(node: fx.Node, owner_rel: str) -> list[tuple[str, str]]:
    return [(k, p) for k, p in call_stack(node) if not owner_rel or p.startswith(owner_rel + ".")]


def _call_name(full_path: str, key: str) -> str:
    k = int(key.rsplit("@", 1)[1]) if "@" in key else 0
    return full_path if k == 0 else f"{full_path}_{k}"


def owner_local_name(
    node: fx.Node, names: dict[fx.Node, str], unit_path: str, owner_rel: str, depth: int
) -> tuple[str, list[str], str | None]:
    """Name of ``node`` (of a graph traced at ``unit_path``, named by ``names``) in the graph of
    its owner ``owner_rel`` (relative to the unit) when the owner's first ``depth`` nested calls
    are traced through and deeper ones stay calls. Also returns the child paths traced through
    and, when the node stands for a whole child call, that call's key."""
    entries = _owner_entries(node, owner_rel)
    if node.op == "call_module":
        entries = entries[:-1] + [("", entries[-1][1])] if entries else entries
    if depth < len(entries) and entries[depth][0]:
        key, path = entries[depth]
        full = f"{unit_path}.{path}" if unit_path and path else unit_path or path
        return _call_name(full, key), [p for _, p in entries[:depth]], key
    inline = [p for k, p in entries if k]
    return names[node], inline, None


def locate(
    graph: fx.Graph,
    owner_path: str,
    source: str,
    targets: Sequence[str],
    what: str = "site",
    relative: dict[str, fx.Node] | None = None,
) -> tuple[fx.Node, list[fx.Node]]:
    """The nodes named ``source`` and ``targets`` in ``graph`` (the owner's trace), checking
    that each target reads the source; all users of the source when ``targets`` is empty.
    ``relative``: the graph's names without the owner's prefix, when the caller keeps them
    (``qualified_names(graph, p)`` is ``p.`` + ``qualified_names(graph)``).

    Raises:
        PlanMismatchError: a name is missing or a target does not read the source.
    """
    if relative is None:
        relative = {name: node for node, name in qualified_names(graph).items()}
    prefix = owner_path + "." if owner_path else ""

    def lookup(name: str) -> fx.Node | None:
        return relative.get(name[len(prefix):]) if name.startswith(prefix) else None

    node = lookup(source)
    if node is None:
        raise PlanMismatchError(f"{what}: node {source!r} not found in {owner_path or 'the model'}")
    if not targets:
        return node, list(node.users)
    found = []
    for t in targets:
        target = lookup(t)
        if target is None or node not in target.all_input_nodes:
            raise PlanMismatchError(f"{what}: {t!r} does not consume {source!r}")
        found.append(target)
    return node, found
