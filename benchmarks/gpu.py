"""GPU runtime and training-step memory of se-inject's SE-ResNet-50 against timm's, side by side.

Same comparison as ``benchmarks/speed.py`` (injected timm ``resnet50`` vs timm ``seresnet50`` vs
plain ``resnet50``, eval forward and training step, interleaved reps, medians and ratios), on a
CUDA GPU with bf16 autocast and channels_last, eager and ``torch.compile``. Memory is the CUDA
caching allocator's peak (``torch.cuda.max_memory_allocated``) during one training step, above
what was allocated before it (parameters, momentum buffers, inputs): activations, gradients,
temporaries and compiled-code workspaces, not the allocator's cached-but-free blocks.

The paper's anchor (Hu et al., CVPR 2018): SE adds about 10% to a ResNet-50 training step
(190 ms -> 209 ms); the target here is at most 5% with ``torch.compile``.

Run on a machine with a GPU (``--device cpu --tiny`` is a smoke test):

    python benchmarks/gpu.py --out results/gpu.md
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402
from speed import (  # noqa: E402
    MEMORY_HEADERS,
    RUNTIME_HEADERS,
    Case,
    _memory_ratios,
    _memory_row,
    bench_block,
    build_models,
    interleaved,
    make_eval,
    make_train,
    runtime_rows,
    table,
    with_reference_blocks,
)


def gpu_name(device: torch.device) -> str:
    if device.type != "cuda":
        return f"none (device {device})"
    p = torch.cuda.get_device_properties(device)
    return f"{p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, capability {p.major}.{p.minor}"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--inner", type=int, default=3, help="runs per timed sample")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--dtype", choices=("bf16", "fp32"), default="bf16", help="autocast dtype (fp32: no autocast)"
    )
    p.add_argument("--layouts", default="channels_last")
    p.add_argument("--modes", default="eval,train")
    p.add_argument("--compile", choices=("no", "also", "only"), default="also")
    p.add_argument("--reference", action="store_true", help="also time the reference SE forward (eager only)")
    p.add_argument("--no-block", action="store_true", help="skip the SE-block-alone comparison")
    p.add_argument(
        "--cache", type=Path, help="torch.compile cache artifacts: loaded if present, saved at the end"
    )
    p.add_argument("--tiny", action="store_true", help="smoke test: batch 2 at 64 px, 2 reps")
    p.add_argument("--out", type=Path, help="also write the report (markdown) here")
    args = p.parse_args(argv)
    if args.tiny:
        args.batch, args.size, args.reps, args.inner, args.warmup = 2, 64, 2, 1, 1
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    autocast = torch.bfloat16 if args.dtype == "bf16" else None
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    if args.cache and args.cache.exists():
        torch.compiler.load_cache_artifacts(args.cache.read_bytes())
        print(f"loaded compile cache {args.cache}", flush=True)

    started = time.perf_counter()
    header = (
        f"# se-inject speed (GPU)\n\nGPU: {gpu_name(device)}\n\n"
        f"Host: {os.cpu_count()} CPUs; Python {platform.python_version()}, torch {torch.__version__}, "
        f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version() if cuda else '-'}, timm {timm.__version__}\n\n"
        f"Command: `python benchmarks/gpu.py {' '.join(sys.argv[1:] if argv is None else argv)}`"
    )
    print(header, flush=True)
    compile_modes = {"no": [False], "also": [False, True], "only": [True]}[args.compile]
    run_rows: list[list[str]] = []
    mem_rows: list[list[str]] = []
    ref_rows: list[list[str]] = []
    block_text: list[str] = []

    def render() -> str:
        """The report so far; written after every setting, so a run cut short still leaves one."""
        sections = [
            header,
            f"## Runtime: batch {args.batch} at {args.size}x{args.size}, median of {args.reps} interleaved reps "
            f"({args.inner} runs each) after {args.warmup} warm-up\n\n"
            f"SE overhead = model / resnet50 - 1; noise = largest half-IQR / median.\n\n{table(RUNTIME_HEADERS, run_rows)}",
        ]
        if mem_rows:
            sections.append(
                "## Memory: CUDA allocator peak above the pre-step baseline, one training step\n\n"
                + table(MEMORY_HEADERS, mem_rows)
            )
        if ref_rows:
            sections.append(
                "## SE forward: current SEBlock.forward vs the reference formula (same weights, eager)\n\n"
                + table(["setting", "injected ms", "injected-reference ms", "injected / reference"], ref_rows)
            )
        if block_text:
            sections.append(
                f"## The SE block alone: forward + backward at ResNet-50's SE shapes, batch {args.batch}, "
                f"{args.dtype}, {args.layouts.split(',')[-1]}, eager\n\n{block_text[0]}"
            )
        sections.append(f"Wall time so far: {time.perf_counter() - started:.0f} s")
        report = "\n\n".join(sections) + "\n"
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(report)
        return report

    for compiled in compile_modes:
        if compiled and not args.no_block and not block_text:
            _run_block(args, device, autocast, sync, block_text)
            render()
        for layout in args.layouts.split(","):
            cl = layout == "channels_last"
            fmt = torch.channels_last if cl else torch.contiguous_format
            gen = torch.Generator().manual_seed(1)
            x = torch.randn(args.batch, 3, args.size, args.size, generator=gen).to(
                device=device, memory_format=fmt
            )
            y = torch.randint(0, 1000, (args.batch,), generator=gen).to(device)
            models = build_models(device, cl)
            if args.reference and not compiled:
                ref = with_reference_blocks(build_models(device, cl)["injected"])
                ref.load_state_dict(models["injected"].state_dict())
                models = {**models, "injected-reference": ref}
            for mode in args.modes.split(","):
                if compiled:
                    torch._dynamo.reset()
                cases = [
                    Case(
                        n,
                        make_eval(m, x, compiled, autocast)
                        if mode == "eval"
                        else make_train(m, x, y, compiled, autocast),
                    )
                    for n, m in models.items()
                ]
                label = f"{mode} {'compiled' if compiled else 'eager'} {layout} {args.dtype}"
                t0 = time.perf_counter()
                interleaved(cases, args.reps, args.warmup, sync, args.inner)
                rows, _ = runtime_rows(label, [c for c in cases if c.name != "injected-reference"])
                run_rows.extend(rows)
                print(f"  runtime {label}: {rows[0][1:]} ({time.perf_counter() - t0:.0f} s)", flush=True)
                if "injected-reference" in models:
                    ref_rows.append(_reference_row(label, cases))
                if mode == "train" and cuda:
                    peaks = {c.name: _cuda_peak(c, device) for c in cases if c.name != "injected-reference"}
                    mem_rows.append(_memory_row(label, peaks, _memory_ratios(peaks)))
                    print(f"  memory {label}: {mem_rows[-1][1:]}", flush=True)
                del cases
                gc.collect()
                render()
                if compiled and args.cache:
                    _save_cache(args.cache)
            del models
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    if not args.no_block and not block_text:
        _run_block(args, device, autocast, sync, block_text)
    print("\n" + render(), flush=True)
    return 0


def _run_block(
    args: argparse.Namespace, device: torch.device, autocast: Any, sync: Any, out: list[str]
) -> None:
    print("SE block alone ...", flush=True)
    cl = args.layouts.split(",")[-1] == "channels_last"
    out.append(bench_block(device, cl, args.batch, args.reps * 2, autocast, sync, args.inner))
    print(out[0], flush=True)


def _save_cache(path: Path) -> None:
    try:
        artifacts = torch.compiler.save_cache_artifacts()
        if artifacts is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(artifacts[0])
            print(f"  saved compile cache {path} ({len(artifacts[0]) / 2**20:.1f} MiB)", flush=True)
    except Exception as e:  # noqa: BLE001 - the cache is an optimisation only
        print(f"  could not save the compile cache: {e}", flush=True)


def _cuda_peak(case: Case, device: torch.device) -> float:
    torch.cuda.synchronize(device)
    gc.collect()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    case.run()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def _reference_row(label: str, cases: Sequence[Case]) -> list[Any]:
    from speed import median, paired_ratio

    by = {c.name: c.times for c in cases}
    inj, ref = by["injected"], by["injected-reference"]
    return [label, f"{median(inj) * 1e3:.2f}", f"{median(ref) * 1e3:.2f}", f"{paired_ratio(inj, ref):.3f}"]


if __name__ == "__main__":
    raise SystemExit(main())
