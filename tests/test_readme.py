"""Every command and code block of README.md runs as written, top to bottom, in one empty folder.

How each fenced block is run (a user with the virtual environment active, offline):

* ``$ command`` blocks: the lines up to the next ``$`` are what the command prints (stdout, then
  stderr; trailing spaces ignored), compared exactly; a command that prints an error line must
  exit non-zero, others zero.
* ``bash`` blocks: each line must exit 0. Two are checked rather than run: the set-up (it
  creates a virtual environment and installs the project: its ``se-inject`` command runs, the
  ``[test]`` extra must exist) and the benchmark commands (minutes, or a GPU: each script must
  define every option the command uses).
* A plain ``se-inject ARGS`` command runs in this process through the console script's entry
  point (the same parser and output; a fresh interpreter per command would double this test's
  time); one with shell syntax (a loop, a pipe) runs in bash with the venv's ``bin`` first on
  ``PATH``, as the README asks the reader to have it.
* ``python`` blocks: after the commands (they read ``model.pt`` and ``se.pt``), each in a fresh
  namespace of one new interpreter. ``pretrained=True`` becomes ``pretrained=False``, the one
  substitution (the tests are offline; the README's numbers do not depend on the weights). A
  ``print(...)  # text`` line must print ``text`` (up to a ``...``).
* The usage synopsis: every option it shows is in ``se-inject --help``.

Commands leave files for later blocks (``model.pt``, ``se.pt``), as they would for a reader.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent


def _blocks() -> list[tuple[str, str]]:
    """(language, code) of every fenced block, in order."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```$", README.read_text(), re.S | re.M)]


def _env(folder: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ROOT),
        "COLUMNS": "80",
        "SE_INJECT_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "TORCH_HOME": str(folder.parent / f"{folder.name}-torch-home"),
    }


def _bash(command: str, folder: Path) -> subprocess.CompletedProcess[str]:
    words = shlex.split(command)
    if words[0] == "se-inject" and not re.search(r"[|;&<>$`]", command):
        from typer.testing import CliRunner

        from se_inject.cli import app

        cwd = os.getcwd()
        os.chdir(folder)
        try:
            result = CliRunner().invoke(app, words[1:], env=_env(folder))
        finally:
            os.chdir(cwd)
        return subprocess.CompletedProcess(words, result.exit_code, result.stdout, result.stderr)
    return subprocess.run(["bash", "-c", command], cwd=folder, env=_env(folder), capture_output=True, text=True,
                          timeout=600)


_SNIPPETS = """
import contextlib, io, json, sys, traceback
out = []
for code in json.load(sys.stdin):
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            exec(compile(code, "<README>", "exec"), {"__name__": "__main__"})
    except BaseException:
        out.append({"stdout": buffer.getvalue(), "error": traceback.format_exc()})
        break
    out.append({"stdout": buffer.getvalue(), "error": None})
print(json.dumps(out))
"""


def _run_python(blocks: list[str], folder: Path) -> None:
    """Each block in a fresh namespace of one new interpreter, in order."""
    import json

    codes = [code.replace("pretrained=True", "pretrained=False") for code in blocks]
    done = subprocess.run([sys.executable, "-c", _SNIPPETS], input=json.dumps(codes), cwd=folder, env=_env(folder),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for code, result in zip(codes, results, strict=False):
        assert result["error"] is None, f"{code}\n---\n{result['error']}"
        for expected in re.findall(r"^\s*print\(.*\)\s+#\s*(.+)$", code, re.M):
            assert expected.split("...")[0].strip() in result["stdout"], (expected, result["stdout"])
    assert len(results) == len(codes)


def _run_transcript(block: str, folder: Path) -> int:
    """``$ command`` lines with their printed output; returns how many commands ran."""
    parts = re.split(r"^\$ ", block, flags=re.M)[1:]
    for part in parts:
        lines = part.rstrip("\n").split("\n")
        command = lines[0]
        while command.endswith("\\"):  # a command continued on the next line
            command = command[:-1] + lines.pop(1)
        expected = [line.rstrip() for line in lines[1:]]
        done = _bash(command, folder)
        printed = [line.rstrip() for line in (done.stdout + done.stderr).rstrip("\n").split("\n")]
        assert printed == expected, f"$ {command}\n" + "\n".join(printed)
        failing = any(line.startswith("se-inject: error:") for line in expected)
        assert (done.returncode != 0) == failing, f"$ {command}: exit {done.returncode}"
    return len(parts)


def _check_setup(block: str, folder: Path) -> None:
    first, second = block.strip().split("\n")
    steps = [s.strip() for s in first.split("&&")]
    assert steps[0] == "python3 -m venv .venv" and steps[1] == ".venv/bin/pip install -e '.[test]'"
    assert "\ntest = [" in (ROOT / "pyproject.toml").read_text()
    command = steps[2].removeprefix(".venv/bin/")
    done = _bash(command, folder)
    assert done.returncode == 0 and "SE sites (16)" in done.stdout, done.stderr
    assert second == ".venv/bin/python -m pytest -q"


def _check_benchmarks(block: str) -> None:
    for line in block.strip().split("\n"):
        words = shlex.split(line.split("#")[0])
        assert words[0] == "python" and words[1].startswith("benchmarks/")
        source = (ROOT / words[1]).read_text()  # read, not run: importing torch and timm costs seconds
        for option in (w for w in words[2:] if w.startswith("--")):
            assert re.search(rf"add_argument\(\s*(\"-\w\", )?\"{option}\"", source), (line, option)


def _check_synopsis(block: str, folder: Path) -> None:
    help_text = _bash("se-inject --help", folder).stdout
    for option in set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", block)):
        assert re.search(rf"(?<![\w-]){re.escape(option)}\b", help_text), option


def test_every_readme_block_runs_as_written(tmp_path) -> None:
    ran = {"python": 0, "commands": 0, "bash": 0, "checked": 0}
    python = [code for language, code in _blocks() if language == "python"]
    for language, code in _blocks():
        if language == "python":
            ran["python"] += 1
        elif language == "bash" and "python3 -m venv" in code:
            _check_setup(code, tmp_path)
            ran["checked"] += 1
        elif language == "bash" and "benchmarks/" in code:
            _check_benchmarks(code)
            ran["checked"] += 1
        elif language == "bash":
            for line in code.strip().split("\n"):
                done = _bash(line, tmp_path)
                assert done.returncode == 0, f"{line}\n{done.stderr}"
                ran["bash"] += 1
        elif code.startswith("$ "):
            ran["commands"] += _run_transcript(code, tmp_path)
        elif code.startswith("se-inject MODEL"):
            _check_synopsis(code, tmp_path)
            ran["checked"] += 1
        else:
            pytest.fail(f"a README block the test does not know how to run:\n{code[:200]}")
    _run_python(python, tmp_path)
    # The README's examples, counted: a block that silently stops being run fails here.
    assert ran == {"python": 5, "commands": 6, "bash": 1, "checked": 3}, ran


def test_readme_cites_only_files_in_the_repository() -> None:
    text = README.read_text()
    assert "SE-PAPER" not in text and "DESIGN.md" not in text
    for cited in set(re.findall(r"`((?:docs|benchmarks|tests|notebooks)/[\w./-]+)`", text)):
        assert (ROOT / cited).exists(), cited


def test_no_machine_paths_in_tracked_files() -> None:
    # Profiles, notebook outputs and comments must not carry the paths of the machine they came from.
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    pattern = re.compile(r"(?<![\w.])/(?:home|Users|root|work|tmp)/[\w.-]+")
    found = []
    for name in files:
        path = ROOT / name
        if not path.is_file() or path.suffix in (".png", ".jpg", ".pt", ".safetensors"):
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if pattern.search(line):
                found.append(f"{name}:{number}: {line.strip()[:100]}")
    assert not found, "\n".join(found)
