"""Zoo sweep: analyse and inject every torchvision classifier and one model per timm module.

For each model (random init; nothing is downloaded) the sweep records the plan (sites, skipped
sites by reason, parts that could not be traced), whether the injected model's outputs are
bit-for-bit those of the original (``torch.equal``, in ``eval()`` and, seeded, in ``train()``)
and whether it kept its class, plus the time ``find_sites`` took. A model that raises, or runs
past ``--timeout`` seconds, is recorded as a crash with its error and the sweep goes on.

Which models:

* torchvision: every classification model (``torchvision.models.list_models(module=
  torchvision.models)``), not the detection, segmentation, video or optical-flow ones.
* timm: the model with the fewest parameters of every model module (``timm.list_modules()``).
  Counting needs every model built once (on the meta device, ~20 minutes on 2 cores), so the
  choice is cached in ``results/timm_smallest.json`` per timm version; ``--refresh-selection``
  recounts.

What it measures: analysis time is ``find_sites`` alone, at the model's default input size
(shapes only: it runs on fake tensors). The identity check runs real forwards at the smallest
of 64 / 96 / 128 px / the native size that the original model accepts, batch 2. Crashes of the
original model itself (a forward that fails at every size) are crashes too, with the cause.

Other libraries (``--other``): vision models of transformers and ultralytics built from their
configs (``benchmarks/other_libraries.py``; the project's ``zoo`` extra installs them), same
columns, written to ``results/zoo-other-libraries.md``. Every row also has the build time and
``inject_se`` time over it (*inject / build*), in one run on the same machine. Its sequence part
(speech encoders, audio codecs, vocoders, text-to-speech: ``other_libraries.SEQUENCE``) runs each
model on its own example input (a waveform, filter banks, audio, token ids) for the analysis,
``inject_se`` and the identity check, and the models with transformer layers once more with
``tokens=True`` (rows ``NAME+tokens``); it has its own table and summary line.

Usage::

    python benchmarks/zoo.py                 # full sweep -> results/zoo.md (+ results/zoo.jsonl)
    python benchmarks/zoo.py --other         # other libraries -> results/zoo-other-libraries.md
    python benchmarks/zoo.py --quick         # ~12 models, < 2 minutes, what CI runs
    python benchmarks/zoo.py --only 'timm:*vit*' --output vit.md
    python benchmarks/zoo.py --resume        # keep finished models from results/zoo.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fnmatch
import json
import signal
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import torchvision
from torch import nn

from se_inject import SEBlock, find_sites, inject_se
from se_inject.models.names import ModelSpec, Source
from se_inject.models.weights import create_model

sys.path.insert(0, str(Path(__file__).parent))
import other_libraries  # noqa: E402 - a sibling script, not a package

__all__ = ["ZooResult", "QUICK", "select_models", "run_model", "sweep", "render_markdown", "summary_line", "main"]

RESULTS = Path(__file__).parent / "results"
SELECTION_FILE = RESULTS / "timm_smallest.json"

#: The ``--quick`` subset: one model per placement rule and per library, all small.
QUICK: tuple[str, ...] = (
    "torchvision:resnet18",
    "torchvision:mobilenet_v3_small",
    "torchvision:squeezenet1_1",
    "torchvision:shufflenet_v2_x0_5",
    "torchvision:googlenet",
    "torchvision:regnet_x_400mf",
    "timm:test_resnet",
    "timm:test_convnext",
    "timm:test_efficientnet",
    "timm:test_vit",
    "timm:ese_vovnet19b_slim_dw",
    "timm:dla46x_c",
)

_SIZES = (64, 96, 128)

#: Row-name suffixes that run a model with other options than the defaults: ``Wav2Vec2Model+tokens``.
VARIANTS: dict[str, dict[str, Any]] = {"tokens": {"tokens": True}}


@dataclass
class ZooResult:
    """One model's row of the table (plain data, one JSON line in the cache)."""

    source: str
    name: str
    family: str
    params: int = 0
    status: str = "ok"  # ok | crash | timeout
    sites: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    unanalysed: list[str] = field(default_factory=list)  # "path: why it was not analysed"
    identity: str = "n/a"  # yes | no | n/a (no SE inserted, or not reached)
    identity_detail: str = ""
    class_kept: str = "n/a"
    analysis_s: float = 0.0
    build_s: float = 0.0  # building the model (create_model, or the library's constructor)
    inject_s: float = 0.0  # inject_se on the built model (analysis + rewrite)
    total_s: float = 0.0
    input_size: list[int] = field(default_factory=list)
    error: str = ""
    revision: str = ""  # git commit of se_inject/ the row was measured with ("+dirty": uncommitted edits)
    part: str = ""  # "sequence": a model run on its own example input (the other libraries' sequence part)

    @property
    def key(self) -> str:
        return f"{self.source}:{self.name}"


# --------------------------------------------------------------------------------------------
# Which models


def _count_params_meta(name: str) -> int:
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = timm.create_model(name, pretrained=False)
    return sum(p.numel() for p in model.parameters())


def timm_smallest(refresh: bool = False) -> dict[str, str]:
    """timm module -> the name of its model with the fewest parameters (cached per timm version)."""
    cached: dict[str, Any] = {}
    if SELECTION_FILE.is_file() and not refresh:
        data = json.loads(SELECTION_FILE.read_text())
        if data.get("timm_version") == timm.__version__:
            cached = data.get("models", {})
    modules = timm.list_modules()
    missing = [m for m in modules if m not in cached]
    for module in missing:
        best: tuple[str, int] | None = None
        for name in timm.list_models(module=module):
            try:
                n = _count_params_meta(name)
            except Exception:  # noqa: BLE001 - a model that cannot be built is not a candidate
                continue
            if best is None or n < best[1]:
                best = (name, n)
        if best is not None:
            cached[module] = {"name": best[0], "params": best[1]}
    if missing:
        SELECTION_FILE.parent.mkdir(parents=True, exist_ok=True)
        SELECTION_FILE.write_text(json.dumps({
            "timm_version": timm.__version__,
            "criterion": "fewest parameters (meta-device instantiation)",
            "models": dict(sorted(cached.items())),
        }, indent=1) + "\n")
    return {m: cached[m]["name"] for m in modules if m in cached}


def select_models(
    *, quick: bool = False, only: Sequence[str] = (), refresh: bool = False, other: bool = False
) -> list[tuple[str, str, str]]:
    """``(source, name, family)`` triples to sweep, torchvision first, each sorted by name;
    ``other``: the models of other libraries that are installed."""
    if other:
        chosen = []
    elif quick:
        chosen = []
        for key in QUICK:
            source, name = key.split(":", 1)
            family = _timm_module(name) if source == "timm" else "torchvision"
            chosen.append((source, name, family))
    else:
        chosen = [("torchvision", n, _tv_family(n)) for n in sorted(torchvision.models.list_models(module=torchvision.models))]
        chosen += [("timm", name, module) for module, name in sorted(timm_smallest(refresh).items())]
    if other:
        chosen = []
        for key in other_libraries.BUILDERS:
            if not other_libraries.available(key):
                continue
            source, name = key.split(":", 1)
            sequence = other_libraries.SEQUENCE.get(key)
            chosen.append((source, name, sequence.family if sequence else source))
            if sequence is not None and sequence.tokens:
                chosen.append((source, f"{name}+tokens", sequence.family))
    if only:
        chosen = [c for c in chosen if any(fnmatch.fnmatchcase(f"{c[0]}:{c[1]}", p) or fnmatch.fnmatchcase(c[1], p) for p in only)]
    return chosen


def split_variant(name: str) -> tuple[str, dict[str, Any]]:
    """``Wav2Vec2Model+tokens`` -> ``("Wav2Vec2Model", {"tokens": True})``: the model to build
    and the options of ``find_sites`` / ``inject_se`` its row runs with."""
    base, plus, variant = name.partition("+")
    if not plus:
        return name, {}
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} of {base} (known: {', '.join(VARIANTS)})")
    return base, dict(VARIANTS[variant])


def _timm_module(name: str) -> str:
    from timm.models._registry import _model_to_module

    return _model_to_module.get(name, "?")


def _tv_family(name: str) -> str:
    fn = torchvision.models.get_model_builder(name)
    return fn.__module__.rsplit(".", 1)[-1]


# --------------------------------------------------------------------------------------------
# One model


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: int) -> Iterator[None]:
    """Raise ``_Timeout`` in the main thread after ``seconds`` (0: no limit)."""
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def _raise(signum: int, frame: Any) -> None:
        raise _Timeout(f"ran past {seconds} s")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _in_channels(model: nn.Module) -> int:
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return int(cfg["input_size"][0])
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            return m.in_channels
    return 3


def _native_size(model: nn.Module) -> int:
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return int(cfg["input_size"][-1])
    return 299 if type(model).__name__ == "Inception3" else 224


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return type(a) is type(b)


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_detach(v) for v in value)
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    # torchvision's InceptionOutputs / GoogLeNetOutputs are namedtuples: handled above.
    return value


def _forward(model: nn.Module, x: Any, *, training: bool) -> Any:
    """``model(x)`` (a tuple is the positional arguments), outputs detached, in train or eval mode."""
    import random

    import numpy as np

    model.train(training)
    # Same dropout / drop-path masks for the original and the injected model; numpy's and
    # Python's too (wav2vec2's SpecAugment time masks are drawn with numpy in train mode).
    torch.manual_seed(1234)
    np.random.seed(1234)
    random.seed(1234)
    with torch.no_grad():
        out = model(*x) if isinstance(x, tuple) else model(x)
    model.eval()
    return _detach(out)


def _shape(x: Any) -> list[int]:
    """The shape of the input (of its first tensor, for a tuple of arguments)."""
    first = x[0] if isinstance(x, tuple) and x else x
    return list(first.shape) if isinstance(first, torch.Tensor) else []


def _working_input(model: nn.Module, example: Any = None) -> tuple[Any, Any]:
    """The smallest input the original accepts in eval mode, and its eval output; ``example``:
    the model's own input (a sequence model's), used as it is."""
    if example is not None:
        try:
            return example, _forward(model, example, training=False)
        except _Timeout:
            raise
        except Exception as e:
            raise RuntimeError(f"the original model does not run on its example input {_shape(example)}: "
                               f"{type(e).__name__}: {e}") from e
    channels, native = _in_channels(model), _native_size(model)
    sizes = sorted({s for s in _SIZES if s <= native} | {native})
    last: Exception | None = None
    for size in sizes:
        x = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(0))
        try:
            return x, _forward(model, x, training=False)
        except _Timeout:
            raise
        except Exception as e:  # noqa: BLE001 - too small for this model: try the next size
            last = e
    raise RuntimeError(f"the original model accepts none of the sizes {sizes}: {type(last).__name__}: {last}")


def _revision() -> str:
    """Short git commit of the se_inject package, with ``+dirty`` when it has uncommitted edits."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "log", "-1", "--format=%h", "--", "se_inject"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "se_inject"], cwd=root, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return f"{head}+dirty" if head and dirty else head


_REVISION: str | None = None


def run_model(source: str, name: str, family: str = "", *, timeout: int = 600) -> ZooResult:
    """Analyse, inject and check one model; never raises (a failure is a ``crash`` row)."""
    global _REVISION
    if _REVISION is None:
        _REVISION = _revision()
    part = "sequence" if f"{source}:{split_variant(name)[0]}" in other_libraries.SEQUENCE else ""
    result = ZooResult(source, name, family, revision=_REVISION, part=part)
    start = time.perf_counter()
    try:
        with _time_limit(timeout), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _run_model(result)
    except _Timeout as e:
        result.status, result.error = "timeout", str(e)
    except Exception as e:  # noqa: BLE001 - the sweep records every failure and goes on
        result.status = "crash"
        frame = traceback.extract_tb(e.__traceback__)[-1]
        where = f"{Path(frame.filename).name}:{frame.lineno}"
        result.error = f"{type(e).__name__} at {where}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    result.total_s = round(time.perf_counter() - start, 2)
    return result


def _build(source: str, name: str) -> nn.Module:
    key = f"{source}:{split_variant(name)[0]}"
    if key in other_libraries.BUILDERS:
        return other_libraries.build(key)
    return create_model(ModelSpec(Source(source), name)).eval()


def _run_model(result: ZooResult) -> None:
    base, options = split_variant(result.name)
    key = f"{result.source}:{base}"
    if key in other_libraries.BUILDERS:
        _build(result.source, result.name)  # untimed: the library's lazy imports happen on first use
    example = other_libraries.example_input(key)  # None: an image model, analysed at its default size
    torch.manual_seed(0)
    start = time.perf_counter()
    model = _build(result.source, result.name)
    result.build_s = round(time.perf_counter() - start, 3)
    original_class = type(model)
    result.params = sum(p.numel() for p in model.parameters())

    start = time.perf_counter()
    plan = find_sites(model, example_input=example, **options)
    result.analysis_s = round(time.perf_counter() - start, 3)
    result.sites = len(plan.sites)
    result.kinds = dict(Counter(str(s.kind) for s in plan.sites))
    result.skipped = {str(k): len(v) for k, v in plan.skipped_by_reason().items()}
    result.unanalysed = [str(u) for u in plan.unanalysed]
    if not plan.sites:
        result.inject_s = result.analysis_s  # inject_se analyses, finds nothing, leaves the model
        return

    x, eval_before = _working_input(model, example)
    result.input_size = _shape(x)
    saved = copy.deepcopy(model.state_dict())  # a train-mode forward moves BatchNorm statistics
    try:
        train_before = _forward(model, x, training=True)
    except Exception:  # noqa: BLE001 - some models only run in eval mode at this size
        train_before = None
    model.load_state_dict(saved)
    del saved

    start = time.perf_counter()
    injected = inject_se(model, example_input=example, **options)
    result.inject_s = round(time.perf_counter() - start, 3)
    if injected.se_inject_plan.sites != plan.sites:
        raise AssertionError("inject_se built other sites than find_sites listed")
    result.class_kept = "yes" if type(injected) is original_class else "no"
    added = sum(isinstance(m, SEBlock) for m in injected.modules())
    if added != len(plan.sites):
        raise AssertionError(f"the plan has {len(plan.sites)} sites but {added} SE blocks were inserted")
    eval_ok = _equal(eval_before, _forward(injected, x, training=False))
    train_ok = train_before is None or _equal(train_before, _forward(injected, x, training=True))
    result.identity = "yes" if eval_ok and train_ok else "no"
    if not eval_ok or not train_ok:
        result.identity_detail = ", ".join(m for m, ok in (("eval", eval_ok), ("train", train_ok)) if not ok) + " differ"
    elif train_before is None:
        result.identity_detail = "eval only: train-mode forward fails on the original"


# --------------------------------------------------------------------------------------------
# Sweep and report


def _load_cache(path: Path | None) -> dict[str, ZooResult]:
    if path is None or not path.is_file():
        return {}
    done = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = ZooResult(**json.loads(line))
            done[r.key] = r
    return done


def sweep(
    models: Sequence[tuple[str, str, str]],
    *,
    timeout: int = 600,
    cache: Path | None = None,
    resume: bool = False,
    rerun_failed: bool = False,
    progress: bool = True,
) -> list[ZooResult]:
    """Run every model with a rich progress bar; append each result to ``cache`` as it lands."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    done = _load_cache(cache) if resume else {}
    if rerun_failed:
        done = {k: r for k, r in done.items() if r.status == "ok" and r.identity != "no"}
    if cache is not None and not resume:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text("")
    results: list[ZooResult] = []
    columns = (TextColumn("[bold]zoo"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.description}"))
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task("", total=len(models))
        for source, name, family in models:
            key = f"{source}:{name}"
            bar.update(task, description=key)
            if key in done:
                results.append(done[key])
            else:
                result = run_model(source, name, family, timeout=timeout)
                results.append(result)
                if cache is not None:
                    _append(cache, result)
                if result.status != "ok":
                    bar.console.print(f"[red]{result.status}[/red] {key}: {result.error}")
                elif result.identity == "no":
                    bar.console.print(f"[red]identity failure[/red] {key}: {result.identity_detail}")
            bar.advance(task)
    return results


def _append(cache: Path, result: ZooResult) -> None:
    """Add ``result`` to the cache, replacing an older line for the same model."""
    lines = [ln for ln in cache.read_text().splitlines() if ln.strip()] if cache.is_file() else []
    lines = [ln for ln in lines if ZooResult(**json.loads(ln)).key != result.key]
    lines.append(json.dumps(asdict(result)))
    cache.write_text("\n".join(lines) + "\n")


def summary_line(results: Sequence[ZooResult]) -> str:
    """One line: models, crashes, identity failures, and how many got SE or were partly traced."""
    crashes = sum(r.status != "ok" for r in results)
    with_se = [r for r in results if r.sites]
    identity_fail = sum(r.identity == "no" for r in results)
    identity_ok = sum(r.identity == "yes" for r in results)
    partial = sum(bool(r.unanalysed) and r.status == "ok" for r in results)
    return (
        f"{len(results)} models, {crashes} crashes, {identity_fail} identity failures "
        f"({identity_ok}/{len(with_se)} bit-exact where SE was inserted), "
        f"{len(with_se)} with SE, {partial} partly traced"
    )


def _ratio(r: ZooResult) -> str:
    return f"{r.inject_s / r.build_s:.2f}" if r.build_s > 0 and r.inject_s > 0 else "-"


def _cell_skipped(r: ZooResult) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(r.skipped.items())) or "-"


def _other_versions(results: Sequence[ZooResult]) -> str:
    from importlib.metadata import PackageNotFoundError, version

    libraries = sorted({r.source for r in results} - {"timm", "torchvision"})
    found = []
    for lib in libraries:
        try:
            found.append(f"{lib} {version(lib)}")
        except PackageNotFoundError:
            continue
    return "".join(f", {f}" for f in found)


def _rows(results: Sequence[ZooResult], heading: str = "##") -> list[str]:
    """One part's table, then its untraced parts, crashes and identity failures."""
    lines = [
        "| source | model | family | params (M) | sites | skipped | untraced | identity | class kept | input | analysis (s) | inject / build |",
        "|---|---|---|--:|--:|---|---|---|---|---|--:|--:|",
    ]
    for r in results:
        if r.status != "ok":
            lines.append(
                f"| {r.source} | {r.name} | {r.family} | {r.params / 1e6:.1f} | **{r.status}** | | | | | | {r.analysis_s:.2f} | |"
            )
            continue
        kinds = " ".join(f"{k[0]}{v}" for k, v in sorted(r.kinds.items()))
        sites = f"{r.sites} ({kinds})" if r.sites else "0"
        paths = [u.split(": ", 1)[0] for u in r.unanalysed]
        untraced = ", ".join(f"`{p}`" for p in paths[:4]) + (f" +{len(paths) - 4}" if len(paths) > 4 else "")
        identity = r.identity + (f", {r.identity_detail}" if r.identity_detail else "")
        # images: H x W; a sequence model's own input: its shape less the batch
        size = "x".join(str(s) for s in r.input_size[1 if r.part else 2:]) if r.input_size else ""
        lines.append(
            f"| {r.source} | {r.name} | {r.family} | {r.params / 1e6:.1f} | {sites} | {_cell_skipped(r)} | "
            f"{untraced or '-'} | {identity} | {r.class_kept} | {size} | {r.analysis_s:.2f} | {_ratio(r)} |"
        )
    reasons = [r for r in results if r.unanalysed and r.status == "ok"]
    if reasons:
        lines += ["", f"{heading} Parts that could not be analysed, and why", ""]
        for r in reasons:
            shown = "; ".join(f"`{u.split(': ', 1)[0]}`: {u.split(': ', 1)[1] if ': ' in u else ''}"[:160] for u in r.unanalysed[:6])
            more = f" (+{len(r.unanalysed) - 6} more)" if len(r.unanalysed) > 6 else ""
            lines.append(f"- `{r.key}`: {shown}{more}")
    failures = [r for r in results if r.status != "ok"]
    if failures:
        lines += ["", f"{heading} Crashes and timeouts", ""]
        lines += [f"- `{r.key}`: {r.error}" for r in failures]
    wrong = [r for r in results if r.identity == "no"]
    if wrong:
        lines += ["", f"{heading} Identity failures", ""]
        lines += [f"- `{r.key}`: {r.identity_detail}" for r in wrong]
    return lines


def render_markdown(results: Sequence[ZooResult], *, title: str = "se-inject zoo sweep") -> str:
    """The results as a markdown page: summary, one table row per model, then the crashes; the
    sequence models (rows with ``part == "sequence"``) in a section of their own."""
    images = [r for r in results if not r.part]
    sequences = [r for r in results if r.part == "sequence"]
    lines = [
        f"# {title}",
        "",
        f"Generated by `benchmarks/zoo.py` with torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"timm {timm.__version__}{_other_versions(results)}; random init, CPU; se-inject at "
        f"{', '.join(sorted({r.revision for r in results if r.revision})) or 'unknown revision'}.",
        "",
    ]
    if images or not sequences:
        lines += [
            f"**Summary: {summary_line(images)}.**",
            "",
            "Columns: *sites* by kind (r residual, i inception, d dense); *skipped* by reason; *untraced* lists the",
            "module paths that did not trace as a whole (their traceable children were analysed on their own);",
            "*identity* is `torch.equal` of the outputs before and after injection, in eval and (seeded) train mode,",
            "at the input shown; *n/a* when no SE block was inserted. Analysis time is `find_sites` at the model's",
            "default input size; *inject / build* is `inject_se` time over the time to build the model, same run.",
            "",
            *_rows(images),
        ]
    if sequences:
        seconds = sum(r.total_s for r in sequences)
        lines += [
            *([""] if images else []),
            "## Sequence models",
            "",
            f"**Summary (sequence models): {summary_line(sequences)}.**",
            "",
            "Speech encoders, audio codecs, vocoders and text-to-speech models from small configs, each run on its",
            "own example input (batch 2; *input* is its shape less the batch): a waveform `L`, filter banks `T x 80`",
            "(Whisper: `80 x T`), audio `C x L`, token ids `N`. The analysis, `inject_se` (whose post-build check",
            "runs on that input) and the identity check all use it. A `+tokens` row is the same model with",
            "`tokens=True`, the option that makes residuals on `[B, T, D]` sequences sites. Columns as above;",
            f"analysis time is `find_sites` at the example input. The {len(sequences)} rows took {seconds:.0f} s.",
            "",
            f"Not covered: {other_libraries.NOT_COVERED}",
            "",
            *_rows(sequences, heading="###"),
        ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the small CI subset")
    parser.add_argument("--other", action="store_true", help="models of other libraries (transformers, ultralytics)")
    parser.add_argument("--only", action="append", default=[], help="fnmatch pattern on 'source:name' or name (repeatable)")
    parser.add_argument("--output", type=Path, default=None, help="markdown file (default results/zoo.md, quick: none)")
    parser.add_argument("--cache", type=Path, default=None, help="JSON-lines results (default results/zoo.jsonl for a full run)")
    parser.add_argument("--resume", action="store_true", help="keep models already in the cache")
    parser.add_argument("--rerun-failed", action="store_true", help="with --resume: run crashes and identity failures again")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per model (0: none)")
    parser.add_argument("--refresh-selection", action="store_true", help="recount timm's smallest model per module")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    full = not args.quick and not args.only and not args.other
    default_output = RESULTS / "zoo-other-libraries.md" if args.other and not args.only else RESULTS / "zoo.md" if full else None
    output = args.output if args.output is not None else default_output
    cache = args.cache if args.cache is not None else (RESULTS / "zoo.jsonl" if full else None)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    models = select_models(quick=args.quick, only=args.only, refresh=args.refresh_selection, other=args.other)
    results = sweep(
        models, timeout=args.timeout, cache=cache, resume=args.resume or args.rerun_failed,
        rerun_failed=args.rerun_failed, progress=not args.no_progress,
    )
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        title = (
            "se-inject zoo sweep: other libraries" if args.other
            else "se-inject zoo sweep (quick subset)" if args.quick else "se-inject zoo sweep"
        )
        output.write_text(render_markdown(results, title=title))
    parts = [("", [r for r in results if not r.part]), ("sequence models: ", [r for r in results if r.part])]
    for label, rows in parts if any(r.part for r in results) else [("", results)]:
        if rows:
            print(label + summary_line(rows))
    return 0 if all(r.status == "ok" and r.identity != "no" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
