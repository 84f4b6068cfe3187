"""The package's shape: packages by pipeline stage, no import cycles, small modules.

Imports are read from the source (``ast``), every one of them: module level, inside
functions and under ``if TYPE_CHECKING:``, so a cycle hidden behind a type-only or a late
import fails here too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import se_inject

PACKAGE = Path(se_inject.__file__).parent

#: Pipeline stages, one package each, in the order they may import each other: a stage reads
#: only the stages before it (the report reads the io stage's atomic writes for its plot).
STAGES = ("models", "analysis", "sites", "inject", "io", "report")
#: The top level: the entry points (api, cli, workflow) and what every stage shares: the
#: errors, the request (SEConfig, Selection), the plan, and the SE block itself.
TOP_LEVEL = {"__init__", "api", "cli", "errors", "plan", "request", "se_block", "workflow"}

#: The command line is one module on purpose (one place that parses and renders); every
#: other module stays readable in one sitting.
MAX_LINES = 400
LONG_ALLOWED = {"se_inject.cli"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every ``se_inject`` module that ``name`` imports, wherever the import statement is."""
    found: set[str] = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(name, is_package, node.level, node.module) if node.level else (node.module or "")
            # ``from .pkg import module`` imports the module; ``from .module import name`` the module
            candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in known:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate.startswith("se_inject") and candidate != name:
                found.add(candidate)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def _without_package_inits(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Edges between modules, with each package ``__init__`` (a list of re-exports) replaced by
    the modules it re-exports, so ``a -> pkg -> b`` counts as ``a -> b``."""
    packages = {name for name, path in _modules().items() if path.name == "__init__.py"}

    def expand(target: str, seen: frozenset[str] = frozenset()) -> set[str]:
        if target not in packages or target in seen:
            return {target}
        out: set[str] = set()
        for t in graph[target]:
            if t.startswith(target + "."):
                out |= expand(t, seen | {target})
        return out or {target}

    return {
        name: {e for t in targets for e in expand(t) if e != name}
        for name, targets in graph.items()
        if name not in packages or name == "se_inject"
    } | {name: set() for name in packages if name != "se_inject"}


def test_no_import_cycles_also_through_type_only_and_late_imports() -> None:
    cycles = _cycles(_without_package_inits(_graph()))
    assert cycles == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_top_level_holds_only_entry_points_and_stage_packages() -> None:
    top = {p.stem for p in PACKAGE.glob("*.py")}
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert top == TOP_LEVEL
    assert packages == set(STAGES)


def test_module_names_are_unique_across_packages() -> None:
    """One name, one meaning: no ``names.py`` in two packages."""
    stems: dict[str, list[str]] = {}
    for name, path in _modules().items():
        if path.name != "__init__.py":
            stems.setdefault(path.stem, []).append(name)
    assert {s: m for s, m in stems.items() if len(m) > 1} == {}


def test_modules_stay_under_the_size_limit() -> None:
    long = {
        name: len(path.read_text().splitlines())
        for name, path in _modules().items()
        if name not in LONG_ALLOWED and len(path.read_text().splitlines()) > MAX_LINES
    }
    assert long == {}


def test_an_earlier_stage_never_imports_a_later_one() -> None:
    """The pipeline reads left to right: analysis knows nothing of sites, sites nothing of
    inject, and so on; only the top-level entry points see every stage."""
    order = {stage: i for i, stage in enumerate(STAGES)}
    backwards = []
    for name, targets in _graph().items():
        here = name.split(".")[1] if name.count(".") >= 1 else None
        for target in targets:
            there = target.split(".")[1] if target.count(".") >= 1 else None
            if here in order and there in order and order[there] > order[here]:
                backwards.append(f"{name} -> {target}")
    assert backwards == []


def test_what_every_stage_shares_imports_no_stage() -> None:
    """The errors, the request, the plan and the SE block are read by every stage, so they
    import none: otherwise a stage would reach a later one through them."""
    shared = {f"se_inject.{name}" for name in ("errors", "plan", "request", "se_block")}
    reaching = {
        name: sorted(t for t in targets if t.split(".")[1] in STAGES)
        for name, targets in _graph().items()
        if name in shared
    }
    assert all(not targets for targets in reaching.values()), reaching
