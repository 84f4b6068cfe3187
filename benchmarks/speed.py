"""Side-by-side cost of se-inject: injection time, runtime overhead and training-step memory.

Everything compared runs in this one process, interleaved (the order of the compared things
rotates every repetition), after warm-up; each table gives medians and the ratios between them.
Ratios are the median over repetitions of the per-repetition ratio, so slow drifts of a shared
machine cancel out. There are no timed unit tests: this script is the benchmark.

What is compared:

* injection: ``inject_se(m)`` time over the time to build ``m`` (``timm.create_model(name)``,
  or a torchvision detector with random weights), same model, same rep, after one untimed
  build; with the targets of issues 9 and 29 (ratio <= 0.25 for ResNet-152, <= 1 for the
  others, detectors under 2 s);
* cli: ``se-inject resnet50 --weights random -o m.pt`` (``inject_named``) over building the
  model and ``torch.save`` of its state dict (target 1.5, issue 29);
* zoo: ``inject_se`` over building, for every model of the zoo sweep (every torchvision
  classifier and the smallest model of each timm module): median (target 0.5) and worst (3);
* runtime: one eval forward (``no_grad``) and one training step (forward, cross-entropy,
  backward, SGD step) of timm ``resnet50`` with se-inject's SE blocks ("injected"), timm
  ``seresnet50`` (the same SE computation written by hand: 1x1-conv ``SEModule`` after ``bn3``,
  before the residual add) and plain ``resnet50``, eager and (with ``--compile``) ``torch.compile``,
  contiguous and channels_last;
* shortcuts: ``find_sites`` time with the shape shortcuts of ``se_inject/analysis/shortcuts.py``
  (output shapes of costly layers computed instead of run on meta/fake tensors) over the time
  without them, same model, interleaved: the benchmark that keeps that hand-written code;
* memory: the peak of live tensor bytes created during one eager training step (see
  :class:`LiveTensorBytes` for what it counts). ``benchmarks/gpu.py`` measures the allocator's
  peak on a GPU, compiled too.

Defaults fit a small shared machine: one thread, runtime read on this process's CPU-time clock
(time slices given to other processes do not count), batch 4 at 160x160. ``--threads 0 --clock
wall --batch 8 --size 224`` measures wall time the usual way. Run (CPU, a few minutes on 2 cores;
``--compile also`` adds minutes of compilation per model and mode):

    python benchmarks/speed.py --out benchmarks/results/speed-cpu.md
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import os
import platform
import pstats
import statistics
import sys
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402

from se_inject import inject_se  # noqa: E402

#: torchvision detectors, built with random weights (``weights=None, weights_backbone=None``).
DETECTION_MODELS_TV = ("retinanet_resnet50_fpn", "fasterrcnn_mobilenet_v3_large_fpn")
INJECTION_MODELS = (
    "resnet18", "resnet50", "resnet152", "convnext_tiny", "densenet121", "inception_v3",
    *(f"torchvision:{n}" for n in DETECTION_MODELS_TV),
)
#: inject_se / build targets: 0.25 for ResNet-152 (issue 29; 0.5 required), 1 for every other classifier.
INJECTION_TARGETS = {"resnet152": 0.25}
#: ``se-inject NAME -o m.pt`` end to end over building NAME and ``torch.save`` of its state dict.
CLI_MODEL, CLI_TARGET = "resnet50", 1.5
RUNTIME_MODELS = ("injected", "seresnet50", "resnet50")
#: Models whose analysis runs the layers the shortcuts cover: LSTMs (Sequencer), linear layers
#: and norms (ViT, MLP-Mixer), convolutions and batch norms (ResNet).
SHORTCUT_MODELS = ("resnet50", "vit_small_patch16_224", "mixer_b16_224", "sequencer2d_s")


# --------------------------------------------------------------------------------------------
# statistics and tables


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median over repetitions of num[i] / den[i] (pairs measured back to back)."""
    return median([a / b for a, b in zip(num, den, strict=True) if b > 0])


def spread(values: Sequence[float]) -> float:
    """Half the interquartile range over the median: the noise of one median."""
    if len(values) < 4:
        return float("nan")
    q = statistics.quantiles(values, n=4)
    return (q[2] - q[0]) / 2 / median(values)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table (readable as plain text too); numbers right-aligned."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    numeric = [all(_is_number(r[i]) for r in cells) if cells else False for i in range(len(headers))]

    def fmt(row: Sequence[str]) -> str:
        return (
            "| "
            + " | ".join(
                c.rjust(w) if n else c.ljust(w) for c, w, n in zip(row, widths, numeric, strict=True)
            )
            + " |"
        )

    rule = (
        "|"
        + "|".join(
            ("-" * (w + 1) + ":") if n else ("-" * (w + 2)) for w, n in zip(widths, numeric, strict=True)
        )
        + "|"
    )
    return "\n".join([fmt(headers), rule, *(fmt(r) for r in cells)])


def _is_number(s: str) -> bool:
    try:
        float(s.rstrip("%x"))
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# injection cost


def _builder(name: str) -> tuple[Callable[[], nn.Module], dict[str, Any]]:
    """How to build ``name`` (timm, or ``torchvision:NAME`` with random weights and no backbone
    weights) and the ``inject_se`` options it needs (detectors read a list of images)."""
    if name.startswith("torchvision:"):
        import torchvision

        tv = name.split(":", 1)[1]

        def build() -> nn.Module:
            return torchvision.models.get_model(tv, weights=None, weights_backbone=None).eval()

        images = [torch.rand(3, 320, 320)] if tv in DETECTION_MODELS_TV else None
        return build, ({"example_input": (images,)} if images is not None else {})
    return (lambda: timm.create_model(name)), {}


def _target(name: str) -> tuple[str, Callable[[float, float], bool]]:
    """The issue's target for a model: inject/create for classifiers, seconds for detectors."""
    if name.split(":", 1)[-1] in DETECTION_MODELS_TV:
        return "< 2 s", lambda inject, ratio: inject < 2.0
    limit = INJECTION_TARGETS.get(name, 1.0)
    return f"<= {limit:g}", lambda inject, ratio: ratio <= limit


def bench_injection(names: Sequence[str], reps: int, profile: str | None) -> tuple[str, dict[str, float]]:
    """Per model and rep: time building the model, then ``inject_se`` on the model just made."""
    rows, ratios = [], {}
    for name in names:
        build, options = _builder(name)
        build()  # warm-up: lazy imports and first-call caches are not the model's cost
        create, inject = [], []
        for _ in range(reps):
            gc.collect()
            t0 = time.perf_counter()
            model = build()
            t1 = time.perf_counter()
            inject_se(model, **options)
            t2 = time.perf_counter()
            create.append(t1 - t0)
            inject.append(t2 - t1)
            del model
        ratios[name] = paired_ratio(inject, create)
        target, met = _target(name)
        rows.append([
            name, f"{median(create):.3f}", f"{median(inject):.3f}", f"{ratios[name]:.2f}", target,
            "yes" if met(median(inject), ratios[name]) else "no",
        ])
        print(f"  injection {name}: create {median(create):.3f} s, inject {median(inject):.3f} s", flush=True)
    text = table(["model", "build s", "inject_se s", "inject / build", "target", "met"], rows)
    if profile:
        text += "\n\n" + profile_injection(profile)
    return text, ratios


def bench_cli(name: str, reps: int) -> tuple[str, float]:
    """What ``se-inject NAME --weights random -o m.pt`` does (``inject_named``: build, count,
    plan, inject, count, save) over building the model and ``torch.save`` of its state dict,
    interleaved, same rep."""
    import tempfile

    from se_inject.workflow import inject_named

    folder = Path(tempfile.mkdtemp())
    inject_named(name, weights="random", output=folder / "warm.pt")  # lazy imports, first-call caches
    plain, command = [], []
    for rep in range(reps):
        gc.collect()
        t0 = time.perf_counter()
        torch.save(timm.create_model(name).state_dict(), folder / f"plain{rep}.pt")
        t1 = time.perf_counter()
        inject_named(name, weights="random", output=folder / f"se{rep}.pt")
        t2 = time.perf_counter()
        plain.append(t1 - t0)
        command.append(t2 - t1)
    ratio = paired_ratio(command, plain)
    rows = [[name, f"{median(plain):.3f}", f"{median(command):.3f}", f"{ratio:.2f}", f"<= {CLI_TARGET:g}",
             "yes" if ratio <= CLI_TARGET else "no"]]
    print(f"  cli {name}: build+save {median(plain):.3f} s, se-inject -o {median(command):.3f} s", flush=True)
    return table(["model", "build + torch.save s", "se-inject -o s", "ratio", "target", "met"], rows), ratio


#: The zoo part's targets: median and worst inject_se / create_model over the timm zoo.
ZOO_MEDIAN_TARGET, ZOO_WORST_TARGET = 0.5, 3.0


def bench_zoo(reps: int) -> tuple[str, dict[str, float]]:
    """``inject_se(m)`` over building ``m`` for the zoo sweep's models (every torchvision
    classifier, random weights, and the smallest model of each timm module,
    ``results/timm_smallest.json``), same model, paired per rep, after one untimed build and
    injection (lazy imports, first-call caches)."""
    import json
    import warnings

    import torchvision

    timm_names = sorted(m["name"] for m in json.loads(
        (Path(__file__).parent / "results" / "timm_smallest.json").read_text())["models"].values())
    builders: dict[str, Callable[[], nn.Module]] = {
        f"torchvision:{n}": (lambda n=n: torchvision.models.get_model(n, weights=None))
        for n in sorted(torchvision.models.list_models(module=torchvision.models))
    }
    builders.update({n: (lambda n=n: timm.create_model(n)) for n in timm_names})
    ratios: dict[str, float] = {}
    failed: list[str] = []
    for name, build in builders.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                inject_se(build().eval())
                create, inject = [], []
                for _ in range(reps):
                    gc.collect()
                    t0 = time.perf_counter()
                    model = build().eval()
                    t1 = time.perf_counter()
                    inject_se(model)
                    t2 = time.perf_counter()
                    create.append(t1 - t0)
                    inject.append(t2 - t1)
        except Exception as e:  # noqa: BLE001 - named in the table, not hidden
            failed.append(f"{name} ({type(e).__name__})")
            continue
        ratios[name] = paired_ratio(inject, create)
    ordered = sorted(ratios.items(), key=lambda kv: kv[1])
    mid, worst = median(list(ratios.values())), ordered[-1]
    rows = [["median", f"{mid:.2f}", f"<= {ZOO_MEDIAN_TARGET:g}", "yes" if mid <= ZOO_MEDIAN_TARGET else "no"],
            [f"worst ({worst[0]})", f"{worst[1]:.2f}", f"<= {ZOO_WORST_TARGET:g}",
             "yes" if worst[1] <= ZOO_WORST_TARGET else "no"]]
    text = table(["over " + str(len(ratios)) + " models", "inject / create", "target", "met"], rows)
    text += "\n\nHighest five: " + ", ".join(f"{n} {r:.2f}" for n, r in ordered[-5:][::-1])
    if failed:
        text += f"\n\nNot measured ({len(failed)}): " + ", ".join(failed)
    print(f"  zoo: median {mid:.2f}, worst {worst[1]:.2f} ({worst[0]})", flush=True)
    return text, ratios


def _relative_paths(line: str) -> str:
    """A profile line with file names relative to the repository or site-packages (no machine paths)."""
    import sysconfig

    root = str(Path(__file__).resolve().parents[1]) + "/"
    site = sysconfig.get_paths()["purelib"] + "/"
    return line.replace(root, "").replace(site, "site-packages/")


def profile_injection(name: str, top: int = 18) -> str:
    model = timm.create_model(name)
    prof = cProfile.Profile()
    prof.enable()
    inject_se(model)
    prof.disable()
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("cumulative").print_stats(top)
    lines = [_relative_paths(ln) for ln in buf.getvalue().splitlines() if ln.strip()]
    return f"cProfile of inject_se({name}), by cumulative time:\n```\n" + "\n".join(lines) + "\n```"


def _without_shortcuts() -> Callable[[], None]:
    """Turn the shape shortcuts off (every op runs as torch runs it on meta/fake tensors);
    returns the function that turns them back on."""
    from se_inject.analysis import shapes, shortcuts

    table, recurrent = dict(shortcuts._SHORTCUTS), shapes.recurrent_output
    shortcuts._SHORTCUTS.clear()
    shapes.recurrent_output = lambda module, args, kwargs: None

    def restore() -> None:
        shortcuts._SHORTCUTS.update(table)
        shapes.recurrent_output = recurrent

    return restore


def bench_shortcuts(names: Sequence[str], reps: int) -> tuple[str, dict[str, float]]:
    """Per model: ``find_sites`` with and without the shape shortcuts, alternating, same model."""
    from se_inject import find_sites

    rows, ratios = [], {}
    for name in names:
        model = timm.create_model(name)
        find_sites(model)  # warm-up
        times: dict[bool, list[float]] = {True: [], False: []}
        sites: dict[bool, int] = {}
        for rep in range(reps):
            for on in ((True, False) if rep % 2 == 0 else (False, True)):
                restore = None if on else _without_shortcuts()
                try:
                    gc.collect()
                    t0 = time.perf_counter()
                    sites[on] = len(find_sites(model).sites)
                    times[on].append(time.perf_counter() - t0)
                finally:
                    if restore is not None:
                        restore()
        ratios[name] = paired_ratio(times[False], times[True])
        rows.append([name, f"{median(times[True]):.3f}", f"{median(times[False]):.3f}", f"{ratios[name]:.2f}",
                     "yes" if sites[True] == sites[False] else f"no ({sites[True]} vs {sites[False]})"])
        print(f"  shortcuts {name}: with {median(times[True]):.3f} s, without {median(times[False]):.3f} s", flush=True)
    text = table(["model", "find_sites s, shortcuts", "without", "without / with", "same plan"], rows)
    return text, ratios


# --------------------------------------------------------------------------------------------
# models and steps


def build_models(device: torch.device, channels_last: bool, num_classes: int = 1000) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    models = {
        "injected": inject_se(timm.create_model("resnet50", num_classes=num_classes)),
        "seresnet50": timm.create_model("seresnet50", num_classes=num_classes),
        "resnet50": timm.create_model("resnet50", num_classes=num_classes),
    }
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return {k: m.to(device=device, memory_format=fmt) for k, m in models.items()}


@dataclass
class Case:
    """One model in one setting: a callable that runs one timed unit of work."""

    name: str
    run: Callable[[], Any]
    times: list[float] = field(default_factory=list)


def make_eval(
    model: nn.Module, x: torch.Tensor, compiled: bool, autocast: torch.dtype | None
) -> Callable[[], Any]:
    model.eval()
    fn = torch.compile(model) if compiled else model

    def run() -> Any:
        with torch.no_grad(), _autocast(x.device, autocast):
            return fn(x)

    return run


def make_train(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, compiled: bool, autocast: torch.dtype | None
) -> Callable[[], Any]:
    model.train()
    fn = torch.compile(model) if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def run() -> Any:
        opt.zero_grad(set_to_none=True)
        with _autocast(x.device, autocast):
            out = fn(x)
        loss = F.cross_entropy(out.float(), y)
        loss.backward()
        opt.step()
        return loss

    return run


def _autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


#: The clock runtime samples read: wall time by default; ``--clock cpu`` reads this process's CPU
#: time, which time slices given to other processes on a shared machine do not inflate (use it
#: with ``--threads 1``: idle OpenMP workers spinning would count too).
CLOCK: list[Callable[[], float]] = [time.perf_counter]


def interleaved(
    cases: Sequence[Case], reps: int, warmup: int, sync: Callable[[], None], inner: int = 1
) -> None:
    """Warm each case up, then time ``inner`` runs per case per rep, rotating the order each rep."""
    for case in cases:
        for _ in range(warmup):
            case.run()
        sync()
    for rep in range(reps):
        order = list(cases[rep % len(cases) :]) + list(cases[: rep % len(cases)])
        for case in order:
            sync()
            t0 = CLOCK[0]()
            for _ in range(inner):
                case.run()
            sync()
            case.times.append((CLOCK[0]() - t0) / inner)


def runtime_rows(label: str, cases: Sequence[Case]) -> tuple[list[list[str]], dict[str, float]]:
    """Rows of medians and the three ratios for one (mode, compile, layout) setting."""
    by = {c.name: c.times for c in cases}
    inj, se, plain = by["injected"], by["seresnet50"], by["resnet50"]
    r = {
        "inj/se": paired_ratio(inj, se),
        "inj/plain": paired_ratio(inj, plain),
        "se/plain": paired_ratio(se, plain),
    }
    noise = max(spread(inj), spread(se), spread(plain))
    row = [
        label,
        f"{median(inj) * 1e3:.1f}",
        f"{median(se) * 1e3:.1f}",
        f"{median(plain) * 1e3:.1f}",
        f"{r['inj/se']:.3f}",
        f"{(r['inj/plain'] - 1) * 100:+.1f}%",
        f"{(r['se/plain'] - 1) * 100:+.1f}%",
        f"{noise * 100:.1f}%",
    ]
    return [row], r


RUNTIME_HEADERS = [
    "setting",
    "injected ms",
    "seresnet50 ms",
    "resnet50 ms",
    "injected / seresnet50",
    "injected SE overhead",
    "timm SE overhead",
    "noise",
]


def bench_runtime(
    device: torch.device,
    layouts: Sequence[str],
    compile_modes: Sequence[bool],
    modes: Sequence[str],
    batch: int,
    size: int,
    reps: int,
    warmup: int,
    autocast: torch.dtype | None = None,
    inner: int = 1,
    sync: Callable[[], None] = lambda: None,
    num_classes: int = 1000,
) -> tuple[str, dict[str, dict[str, float]]]:
    rows, ratios = [], {}
    for layout in layouts:
        cl = layout == "channels_last"
        for compiled in compile_modes:
            models = build_models(device, cl, num_classes)
            fmt = torch.channels_last if cl else torch.contiguous_format
            gen = torch.Generator().manual_seed(1)
            x = torch.randn(batch, 3, size, size, generator=gen).to(device=device, memory_format=fmt)
            y = torch.randint(0, num_classes, (batch,), generator=gen).to(device)
            for mode in modes:
                if compiled:
                    torch._dynamo.reset()
                cases = [
                    Case(
                        name,
                        make_eval(m, x, compiled, autocast)
                        if mode == "eval"
                        else make_train(m, x, y, compiled, autocast),
                    )
                    for name, m in models.items()
                ]
                label = f"{mode} {'compiled' if compiled else 'eager'} {layout}"
                t0 = time.perf_counter()
                interleaved(cases, reps, warmup, sync, inner)
                r_rows, r = runtime_rows(label, cases)
                rows += r_rows
                ratios[label] = r
                print(f"  runtime {label}: {r_rows[0][1:5]} ({time.perf_counter() - t0:.0f} s)", flush=True)
            del models
    return table(RUNTIME_HEADERS, rows), ratios


# --------------------------------------------------------------------------------------------
# the SE block alone


#: (channels, spatial size) of ResNet-50's four stages at 224x224: where its 16 SE blocks sit.
RESNET50_SE_SHAPES = ((256, 56), (512, 28), (1024, 14), (2048, 7))


def reference_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """SEBlock's first implementation, the formula as written (``mean`` squeeze), for comparison."""
    from se_inject.se_block import GATES, POOLS

    axis = self.channel_axis % x.ndim
    squeeze_dims = tuple(d for d in range(1, x.ndim) if d != axis)
    pool = (lambda t, d: t.mean(d)) if self.pool_name == "avg" else POOLS[self.pool_name]
    z = self.fc2(self.act(self.fc1(pool(x, squeeze_dims))))
    shape = [1] * x.ndim
    shape[0] = -1
    shape[axis] = self.channels
    return x * GATES[self.gate_name][0](z).view(shape)


def with_reference_blocks(model: nn.Module) -> nn.Module:
    """``model`` with every SEBlock computing ``reference_forward`` (same parameters and keys)."""
    from se_inject.se_block import SEBlock

    class _ReferenceSE(SEBlock):
        forward = reference_forward

    for m in model.modules():
        if type(m) is SEBlock:
            m.__class__ = _ReferenceSE
    return model


def bench_block(
    device: torch.device,
    channels_last: bool,
    batch: int,
    reps: int,
    autocast: torch.dtype | None = None,
    sync: Callable[[], None] = lambda: None,
    inner: int = 1,
) -> str:
    """Forward + backward of one SE block at each ResNet-50 stage shape: SEBlock, timm SEModule, reference."""
    rows = []
    names = ("SEBlock", "timm SEModule", "SEBlock reference")
    for channels, size in RESNET50_SE_SHAPES:
        cases = _block_cases(device, channels, size, batch, channels_last, autocast)
        interleaved(cases, reps, 2, sync, inner)
        by = {c.name: c.times for c in cases}
        rows.append(
            [
                f"{channels}x{size}x{size}",
                *(f"{median(by[n]) * 1e3:.3f}" for n in names),
                f"{paired_ratio(by['SEBlock'], by['timm SEModule']):.3f}",
                f"{paired_ratio(by['SEBlock'], by['SEBlock reference']):.3f}",
            ]
        )
    return table(
        [
            "shape (C x H x W)",
            "SEBlock ms",
            "timm SEModule ms",
            "reference ms",
            "SEBlock / timm",
            "SEBlock / reference",
        ],
        rows,
    )


def _block_cases(
    device: torch.device,
    channels: int,
    size: int,
    batch: int,
    channels_last: bool,
    autocast: torch.dtype | None,
) -> list[Case]:
    from timm.layers import SEModule

    from se_inject.se_block import SEBlock

    torch.manual_seed(0)
    ours = SEBlock(channels, channels // 16, identity_init=False, gate="sigmoid").to(device)
    ref = with_reference_blocks(
        torch.nn.Sequential(SEBlock(channels, channels // 16, identity_init=False, gate="sigmoid"))
    )
    ref[0].load_state_dict(ours.state_dict())
    ref = ref.to(device)
    theirs = SEModule(channels, rd_ratio=1 / 16).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = (
        torch.randn(batch, channels, size, size, device=device)
        .contiguous(memory_format=fmt)
        .requires_grad_(True)
    )
    grad = torch.randn_like(x)

    def step(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            with _autocast(device, autocast):
                out = fn(x)
            out.backward(grad.to(out.dtype))
            x.grad = None

        return run

    return [
        Case("SEBlock", step(ours)),
        Case("timm SEModule", step(theirs)),
        Case("SEBlock reference", step(ref)),
    ]


# --------------------------------------------------------------------------------------------
# memory


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created by ATen ops while the mode is active.

    Counts every storage an op (forward, backward or optimizer, all dispatched on this thread's
    mode stack) returns that is new, i.e. not one of the op's inputs' storages, until it is freed:
    activations saved for backward, temporaries, gradients, optimizer temporaries. It does not
    count storages alive before the mode was entered (parameters, inputs, optimizer state made
    during warm-up) nor buffers a kernel allocates internally and frees before returning (oneDNN
    scratch space), nor allocator caching or fragmentation. Eager mode only: compiled code
    allocates its buffers outside the dispatcher.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if _has_storage(t)}
        for t in tree_flatten(out)[0]:
            if not _has_storage(t):
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in inputs or key in self.live:
                continue
            self.live[key] = storage.nbytes()
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, key)
        return out


def _has_storage(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type != "meta" and not t.is_sparse


def bench_memory_cpu(
    layouts: Sequence[str], batch: int, size: int
) -> tuple[str, dict[str, dict[str, float]]]:
    """Peak live tensor bytes of one eager training step (after one warm-up step)."""
    rows, ratios = [], {}
    device = torch.device("cpu")
    for layout in layouts:
        cl = layout == "channels_last"
        models = build_models(device, cl)
        fmt = torch.channels_last if cl else torch.contiguous_format
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(batch, 3, size, size, generator=gen).contiguous(memory_format=fmt)
        y = torch.randint(0, 1000, (batch,), generator=gen)
        peaks = {}
        for name, m in models.items():
            step = make_train(m, x, y, compiled=False, autocast=None)
            step()
            gc.collect()
            with LiveTensorBytes() as mode:
                step()
            peaks[name] = mode.peak
        r = _memory_ratios(peaks)
        ratios[f"train eager {layout}"] = r
        rows.append(_memory_row(f"train eager {layout}", peaks, r))
        print(f"  memory {layout}: {rows[-1][1:]}", flush=True)
    return table(MEMORY_HEADERS, rows), ratios


MEMORY_HEADERS = [
    "setting",
    "injected MiB",
    "seresnet50 MiB",
    "resnet50 MiB",
    "injected / seresnet50",
    "injected / resnet50",
    "seresnet50 / resnet50",
]


def _memory_ratios(peaks: dict[str, float]) -> dict[str, float]:
    return {
        "inj/se": peaks["injected"] / peaks["seresnet50"],
        "inj/plain": peaks["injected"] / peaks["resnet50"],
        "se/plain": peaks["seresnet50"] / peaks["resnet50"],
    }


def _memory_row(label: str, peaks: dict[str, float], r: dict[str, float]) -> list[str]:
    mib = 2.0**20
    return [
        label,
        f"{peaks['injected'] / mib:.1f}",
        f"{peaks['seresnet50'] / mib:.1f}",
        f"{peaks['resnet50'] / mib:.1f}",
        f"{r['inj/se']:.3f}",
        f"{r['inj/plain']:.3f}",
        f"{r['se/plain']:.3f}",
    ]


# --------------------------------------------------------------------------------------------


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{cpu}; {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}; "
        f"Python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="injection,runtime,memory,block",
                   help="comma-separated parts to run (also: cli, zoo, shortcuts)")
    p.add_argument("--models", default=",".join(INJECTION_MODELS), help="models for the injection part")
    p.add_argument("--injection-reps", type=int, default=3)
    p.add_argument("--shortcut-models", default=",".join(SHORTCUT_MODELS), help="models for the shortcuts part")
    p.add_argument(
        "--profile", default="resnet152", help="cProfile one inject_se of this model ('' for none)"
    )
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=160)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--layouts", default="contiguous,channels_last")
    p.add_argument("--modes", default="eval,train")
    p.add_argument("--compile", choices=("no", "also", "only"), default="no", help="torch.compile rows")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument(
        "--clock", choices=("wall", "cpu"), default="cpu", help="runtime clock (cpu: process CPU time)"
    )
    p.add_argument("--tiny", action="store_true", help="smoke test: tiny inputs, one rep, resnet18 injection")
    p.add_argument("--out", type=Path, help="also write the report (markdown) here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        CLOCK[0] = time.process_time
    if args.tiny:
        args.models, args.injection_reps, args.profile = "resnet18", 1, ""
        args.batch, args.size, args.reps, args.warmup = 2, 64, 2, 1
    parts = set(args.only.split(","))
    layouts = args.layouts.split(",")
    modes = args.modes.split(",")
    compile_modes = {"no": [False], "also": [False, True], "only": [True]}[args.compile]
    started = time.perf_counter()
    sections = [
        f"# se-inject speed (CPU)\n\nMachine: {machine()}\n\nCommand: `python benchmarks/speed.py {' '.join(sys.argv[1:] if argv is None else argv)}`"
    ]
    if "zoo" in parts:
        print("zoo injection cost ...", flush=True)
        text, _ = bench_zoo(max(1, args.injection_reps // 2))
        sections.append(f"## Zoo: inject_se / create_model over the timm zoo (median of {max(1, args.injection_reps // 2)})\n\n{text}")
    if "cli" in parts:
        print("command end to end ...", flush=True)
        text, _ = bench_cli(CLI_MODEL, args.injection_reps)
        sections.append(
            f"## Command: `se-inject {CLI_MODEL} --weights random -o m.pt` over build + `torch.save` "
            f"(median of {args.injection_reps})\n\n{text}"
        )
    if "injection" in parts:
        print("injection cost ...", flush=True)
        text, _ = bench_injection(args.models.split(","), args.injection_reps, args.profile or None)
        sections.append(
            f"## Injection: inject_se time / build time (median of {args.injection_reps})\n\n{text}"
        )
    if "shortcuts" in parts:
        print("shape shortcuts ...", flush=True)
        text, _ = bench_shortcuts(args.shortcut_models.split(","), args.injection_reps)
        sections.append(
            f"## Shape shortcuts: find_sites time with and without them (median of {args.injection_reps})\n\n{text}"
        )
    if "runtime" in parts:
        print("runtime ...", flush=True)
        text, _ = bench_runtime(
            torch.device("cpu"), layouts, compile_modes, modes, args.batch, args.size, args.reps, args.warmup
        )
        sections.append(
            f"## Runtime: batch {args.batch} at {args.size}x{args.size}, fp32, {args.clock} clock, median of {args.reps} interleaved reps "
            f"after {args.warmup} warm-up\n\nSE overhead = model / resnet50 - 1; noise = largest half-IQR / median.\n\n{text}"
        )
    if "memory" in parts:
        print("memory ...", flush=True)
        text, _ = bench_memory_cpu(layouts, args.batch, args.size)
        sections.append(
            f"## Memory: peak live tensor bytes in one eager training step, batch {args.batch} at {args.size}x{args.size}\n\n"
            f"Counts storages created by ATen ops during the step (activations, temporaries, gradients), not "
            f"parameters, optimizer state or kernel-internal scratch.\n\n{text}"
        )
    if "block" in parts:
        print("SE block alone ...", flush=True)
        text = "\n\n".join(
            f"{layout}:\n\n"
            + bench_block(torch.device("cpu"), layout == "channels_last", args.batch, args.reps * 2)
            for layout in layouts
        )
        sections.append(
            f"## The SE block alone: forward + backward at ResNet-50's SE shapes, batch {args.batch}, fp32, "
            f"median of {args.reps * 2}\n\n{text}"
        )
    sections.append(f"Total wall time: {time.perf_counter() - started:.0f} s")
    report = "\n\n".join(sections) + "\n"
    print("\n" + report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
