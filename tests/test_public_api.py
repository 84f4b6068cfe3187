"""The package root: exports agree with __all__, every error class is exported, imports are lazy."""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import se_inject
from se_inject import errors

PACKAGE = Path(se_inject.__file__).parent
#: Modules that need no ``__all__``: the CLI (an entry point) and the plot (one function, imported by the CLI).
NO_ALL = {"cli", "report.plot"}


def _modules() -> set[str]:
    """Every module of the package, by dotted name under ``se_inject``; a package counts when
    its ``__init__`` exports names (``sites``), not when it only describes its modules."""
    found = set()
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        if path.name == "__init__.py":
            if name == "__init__" or "__all__" not in path.read_text():
                continue
            name = name.removesuffix(".__init__")
        found.add(name)
    return found - NO_ALL


def test_all_matches_the_exported_names() -> None:
    # The names type checkers read (the TYPE_CHECKING imports) are the lazy exports and __all__.
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    checked = {alias.asname for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1
               for alias in node.names}
    assert checked == set(se_inject.__all__) == set(se_inject._EXPORTS)
    assert len(se_inject.__all__) == len(set(se_inject.__all__))
    for name in se_inject.__all__:
        value = getattr(se_inject, name)
        assert value is getattr(importlib.import_module(f"se_inject.{se_inject._EXPORTS[name]}"), name)
    assert set(se_inject.__all__) <= set(dir(se_inject))


def test_every_error_class_is_exported_from_the_root() -> None:
    classes = {name for name in errors.__all__ if inspect.isclass(getattr(errors, name))}
    classes.add("HeadNotFoundError")
    assert classes <= set(se_inject.__all__)
    for name in classes:
        assert issubclass(getattr(se_inject, name), se_inject.SEInjectError)


def test_every_module_declares_all() -> None:
    modules = _modules()
    assert {"api", "se_block", "sites.driver", "inject.rewrite", "io.checkpoint"} <= modules
    for name in modules:
        module = importlib.import_module(f"se_inject.{name}")
        assert module.__all__, name
        assert all(hasattr(module, n) for n in module.__all__), name


def test_the_package_ships_py_typed() -> None:
    assert (PACKAGE / "py.typed").is_file()
    pyproject = (PACKAGE.parent / "pyproject.toml").read_text()
    assert 'se_inject = ["py.typed"]' in pyproject


def test_import_and_help_load_no_model_library() -> None:
    # A fresh interpreter: import the package and the CLI, and answer --help, then list what was loaded.
    script = """
import sys
import se_inject, se_inject.cli
from typer.testing import CliRunner
assert CliRunner().invoke(se_inject.cli.app, ["--help"]).exit_code == 0
assert CliRunner().invoke(se_inject.cli.app, ["--version"]).exit_code == 0
print(" ".join(sorted({m.split(".")[0] for m in sys.modules})))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr
    loaded = set(done.stdout.split())
    assert not loaded & {"torch", "timm", "torchvision", "huggingface_hub", "socket", "requests", "matplotlib"}, loaded


def test_a_model_name_loads_the_libraries_on_demand() -> None:
    script = """
import sys
import se_inject
se_inject.SEConfig
assert "timm" not in sys.modules and "torchvision" not in sys.modules
from se_inject.models.names import resolve_name
resolve_name("torchvision:resnet18")
print("torchvision" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True"]


def test_a_site_prints_its_kind_as_a_plain_string() -> None:
    import torchvision

    site = se_inject.find_sites(torchvision.models.resnet18(), example_input=__import__("torch").zeros(1, 3, 64, 64)).sites[0]
    assert "kind='residual'" in repr(site) and site.kind is se_inject.SiteKind.RESIDUAL
    assert repr(se_inject.SkipReason.NESTED) == "'nested'"


def test_freeze_except_se_refuses_a_model_without_se_blocks() -> None:
    import pytest
    import torchvision

    model = torchvision.models.resnet18()
    with pytest.raises(se_inject.NoSitesError, match="ResNet has no SE blocks.*call inject_se"):
        se_inject.freeze_except_se(model)
    assert all(p.requires_grad for p in model.parameters())  # nothing was frozen
