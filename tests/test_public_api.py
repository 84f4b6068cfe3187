"""The package root exports exactly what its __all__ lists (timm's registry drifted once)."""

from __future__ import annotations

import se_inject


def test_all_matches_the_exported_names() -> None:
    public = {name for name in vars(se_inject) if not name.startswith("_")}
    # submodules appear as attributes once imported (plot only when a plot was drawn)
    modules = {"api", "block", "checkpoint", "complexity", "errors", "finetune", "gates", "graph", "plan", "rewrite", "sites", "zoo", "cli", "plot", "atomic"}
    assert set(se_inject.__all__) == public - modules
    for name in se_inject.__all__:
        assert getattr(se_inject, name) is not None


def test_every_module_declares_all() -> None:
    import importlib

    for name in ("api", "atomic", "block", "checkpoint", "complexity", "errors", "finetune", "gates", "graph", "plan", "rewrite", "sites", "zoo"):
        module = importlib.import_module(f"se_inject.{name}")
        assert module.__all__, name
        assert all(hasattr(module, n) for n in module.__all__), name
