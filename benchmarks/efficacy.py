"""Does retrofitting SE help? A transfer experiment on a backbone pretrained here, several seeds.

Protocol (issue 12):

1. Pretrain a plain, narrow timm ResNet-18 at 32 px (grey images replicated over 3 channels) on
   Fashion-MNIST classes 0-4 (train split). This is "the pretrained backbone"; it is cached
   outside the repository (``--cache``), never committed.
2. Fine-tune it on target tasks with a small labelled budget: Fashion-MNIST classes 5-9 with
   100 labelled images per class (primary; tested on every test image of those classes), 20 and
   500 per class, and scikit-learn's digits (cross-domain, a fixed class-balanced test split).
   A fifth of each class's labelled images is the validation split; the test set is never used
   to choose anything.
3. Arms, with the same steps, schedule, augmentation and optimizer, each with its learning rate
   picked on the validation split (seed 0) from one grid: ``plain`` (backbone + new head),
   ``se`` (``inject_se`` defaults, SE blocks in their own ``param_groups`` group),
   ``se_naive`` (the paper's sigmoid with ordinary initialisation, ``identity_init=False``),
   ``se_adapter`` (``freeze_except_se``: SE blocks and head train, BatchNorm statistics frozen)
   and ``head_only`` (linear probe on the frozen backbone), the floor.
4. Seeds are paired across arms: a seed fixes the labelled subset, the head's initialisation,
   the data order and the augmentation. Reported: mean, standard deviation, the paired
   differences to ``plain`` with an exact sign test and a paired t-test, and the accuracy at
   step 0 (``se`` must equal ``plain`` exactly; its logits are compared with ``torch.equal``).
5. Gate statistics after fine-tuning (``se_inject.gate_statistics``) per block and stage, per
   class for the primary setting, and which stages keep their gates at 1 (what removing their
   SE blocks gives back).

Usage::

    python benchmarks/efficacy.py                  # full run (~25 min on 2 cores) -> results/efficacy.*
    python benchmarks/efficacy.py --quick --out efficacy-quick   # digits only, tiny model, 2 seeds, seconds
    python benchmarks/efficacy.py --data DIR       # the four Fashion-MNIST idx files (.gz or not)

Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist``
(``apt-get install dataset-fashion-mnist``); ``--data`` points anywhere else.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import platform
import struct
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

from se_inject import freeze_except_se, gate_statistics, inject_se, param_groups, se_modules
from se_inject.complexity import count

__all__ = [
    "ARMS",
    "Backbone",
    "Setting",
    "Protocol",
    "FULL",
    "QUICK",
    "DataMissingError",
    "sign_test",
    "run",
    "main",
]

RESULTS = Path(__file__).parent / "results"
DEFAULT_DATA = Path("/usr/share/datasets/fashion-mnist")  # where dataset-fashion-mnist installs
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "se-inject-efficacy"
ARMS = ("plain", "se", "se_naive", "se_adapter", "head_only")
SE_ARMS = ("se", "se_naive", "se_adapter")
SIZE = 32


@dataclass(frozen=True)
class Backbone:
    """The timm model pretrained here, and how."""

    arch: str = "resnet18"
    kwargs: dict[str, Any] = field(default_factory=lambda: {"channels": (16, 32, 64, 128), "stem_width": 16})
    source: str = "fashion_mnist"  # or "digits" (--quick)
    source_classes: tuple[int, ...] = (0, 1, 2, 3, 4)
    steps: int = 700
    batch: int = 128
    lr: float = 2e-3


@dataclass(frozen=True)
class Setting:
    """One target task: data, classes, labelled budget and training length."""

    name: str
    target: str  # "fashion_mnist" or "digits"
    classes: tuple[int, ...]
    budget_per_class: int
    steps: int = 200
    batch: int = 32


@dataclass(frozen=True)
class Variant:
    """Another recipe for one arm, run at every seed of the primary setting (the SE learning-rate study).

    Unset fields keep the protocol's value; ``lr=None`` keeps the learning rate chosen on
    validation for ``arm`` (or for ``lr_of``: the same learning rate for two arms separates the
    arm from the choice of learning rate). ``versus`` is the arm of the main table, or an earlier variant, it is paired with.
    """

    name: str
    arm: str
    versus: str = "plain"
    lr: float | None = None
    lr_of: str | None = None  # use the learning rate chosen for this arm of the main table instead
    optimizer: str | None = None
    weight_decay: float | None = None
    se_lr_multiplier: float | None = None
    warmup_steps: int | None = None
    fc1_scale: float | None = None


@dataclass(frozen=True)
class Protocol:
    """Everything that decides the numbers (recorded in the JSON)."""

    backbone: Backbone
    settings: tuple[Setting, ...]  # the first is the primary setting
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    arms: tuple[str, ...] = ARMS
    grid: tuple[float, ...] = (3e-4, 1e-3, 3e-3)
    optimizer: str = "adamw"  # or "sgd" (momentum 0.9)
    weight_decay: float = 0.01
    se_lr_multiplier: float = 1.0  # SE group learning rate = multiplier x base learning rate
    val_fraction: float = 0.2
    digits_test_per_class: int = 70
    warmup_steps: int = 0  # steps with only SE blocks and head training first (se arms)
    fc1_scale: float = 1.0  # scale of the SE blocks' first layer at insertion (exploration)
    study: tuple[Variant, ...] = ()  # extra recipes on the primary setting


FULL = Protocol(
    backbone=Backbone(),
    settings=(
        Setting("fashion_mnist_5-9_100", "fashion_mnist", (5, 6, 7, 8, 9), 100),
        Setting("fashion_mnist_5-9_20", "fashion_mnist", (5, 6, 7, 8, 9), 20),
        Setting("fashion_mnist_5-9_500", "fashion_mnist", (5, 6, 7, 8, 9), 500),
        Setting("digits_0-9_100", "digits", tuple(range(10)), 100),
    ),
    study=(
        Variant("se, SE lr x10", "se", se_lr_multiplier=10),
        Variant("se, 50 warm-up steps", "se", versus="se", warmup_steps=50),
        Variant("se, fc1 init x10", "se", versus="se", fc1_scale=10),
        Variant("plain at se_naive's lr", "plain", lr_of="se_naive"),
        Variant("se at se_naive's lr", "se", versus="plain at se_naive's lr", lr_of="se_naive"),
        Variant("se_naive at plain's lr", "se_naive", lr_of="plain"),
        Variant("plain, SGD", "plain", lr=0.01, optimizer="sgd", weight_decay=1e-4),
        Variant("se, SGD, SE lr x10", "se", versus="plain, SGD", lr=0.01, optimizer="sgd", weight_decay=1e-4,
                se_lr_multiplier=10),
        Variant("se, SGD, SE lr x100", "se", versus="plain, SGD", lr=0.01, optimizer="sgd", weight_decay=1e-4,
                se_lr_multiplier=100),
    ),
)
QUICK = Protocol(
    backbone=Backbone(kwargs={"channels": (8, 16, 32, 64), "stem_width": 8}, source="digits", steps=60, batch=64),
    settings=(Setting("digits_5-9_30", "digits", (5, 6, 7, 8, 9), 30, steps=25, batch=32),),
    seeds=(0, 1),
    grid=(1e-3, 3e-3),
    study=(Variant("se, SE lr x10", "se", se_lr_multiplier=10),),
)


class DataMissingError(FileNotFoundError):
    """The Fashion-MNIST idx files are not where they were looked for."""


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Images:
    """Raw images [N, h, w] (uint8 or float) with labels; ``scale`` maps pixels to [0, 1]."""

    x: torch.Tensor
    y: torch.Tensor
    scale: float


_IDX = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def _read_idx(path: Path) -> torch.Tensor:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return torch.frombuffer(bytearray(raw[4 + 4 * ndim :]), dtype=torch.uint8).reshape(dims)


def load_fashion_mnist(folder: Path) -> tuple[Images, Images]:
    """(train, test) from the four standard idx files, gzipped or not."""
    files = {}
    for key, stem in _IDX.items():
        found = [folder / (stem + ext) for ext in (".gz", "") if (folder / (stem + ext)).is_file()]
        if not found:
            raise DataMissingError(
                f"Fashion-MNIST not found: no {stem}[.gz] in {folder}; install the Debian package "
                f"dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or pass --data DIR "
                f"with the four idx files"
            )
        files[key] = found[0]
    t = {key: _read_idx(path) for key, path in files.items()}
    return (
        Images(t["train_x"], t["train_y"].long(), 1 / 255),
        Images(t["test_x"], t["test_y"].long(), 1 / 255),
    )


def load_digits_split(test_per_class: int) -> tuple[Images, Images]:
    """scikit-learn's digits, split class-balanced (fixed, seed-independent) into pool and test."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)
    y = torch.tensor(digits.target).long()
    g = torch.Generator().manual_seed(12345)
    test = torch.cat([idx[torch.randperm(len(idx), generator=g)[:test_per_class]] for idx in _by_class(y)])
    mask = torch.ones(len(y), dtype=torch.bool)
    mask[test] = False
    return Images(x[mask], y[mask], 1 / 16), Images(x[test], y[test], 1 / 16)


def _by_class(y: torch.Tensor) -> list[torch.Tensor]:
    return [torch.nonzero(y == c).flatten() for c in y.unique().tolist()]


def _subset(images: Images, classes: Sequence[int]) -> Images:
    """Images of ``classes``, relabelled 0..k-1 in that order."""
    keep = torch.isin(images.y, torch.tensor(list(classes)))
    lookup = torch.full((int(images.y.max()) + 1,), -1, dtype=torch.long)
    lookup[torch.tensor(list(classes))] = torch.arange(len(classes))
    return Images(images.x[keep], lookup[images.y[keep]], images.scale)


def _prepare(images: Images, idx: torch.Tensor, stats: tuple[float, float], shift: torch.Generator | None) -> torch.Tensor:
    """[B, 3, 32, 32] normalised inputs; with ``shift``, each image moved by up to 2 px (zero fill)."""
    x = images.x[idx].float().mul(images.scale).unsqueeze(1)
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    x = (x - stats[0]) / stats[1]
    if shift is not None:
        padded = F.pad(x, (2, 2, 2, 2), value=(0 - stats[0]) / stats[1])
        offsets = torch.randint(0, 5, (len(x), 2), generator=shift).tolist()
        x = torch.stack([padded[i, :, dy : dy + SIZE, dx : dx + SIZE] for i, (dy, dx) in enumerate(offsets)])
    return x.expand(-1, 3, -1, -1).contiguous()


@dataclass(frozen=True)
class Task:
    """A target task's labelled pool and test set, relabelled to 0..k-1."""

    pool: Images
    test: Images


def _labelled_split(pool: Images, per_class: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) indices: ``per_class`` images of each class (chosen by ``seed``), a fraction for validation."""
    g = torch.Generator().manual_seed(1000 + seed)
    n_val = max(1, round(per_class * val_fraction))
    train, val = [], []
    for idx in _by_class(pool.y):
        if len(idx) < per_class:
            raise ValueError(f"a class has {len(idx)} images, fewer than the budget of {per_class}")
        chosen = idx[torch.randperm(len(idx), generator=g)[:per_class]]
        val.append(chosen[:n_val])
        train.append(chosen[n_val:])
    return torch.cat(train), torch.cat(val)


# ----------------------------------------------------------------------------- models


def _create(backbone: Backbone, num_classes: int) -> nn.Module:
    return timm.create_model(backbone.arch, num_classes=num_classes, **backbone.kwargs)


def _cache_key(backbone: Backbone) -> str:
    text = json.dumps(asdict(backbone), sort_keys=True, default=list) + timm.__version__ + torch.__version__
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def pretrain(backbone: Backbone, source: tuple[Images, Images], cache: Path | None, log: Callable[[str], None]) -> dict[str, Any]:
    """Train (or load from ``cache``) the plain backbone on the source classes.

    Returns ``{"state": state_dict, "stats": (mean, std), "source_test_acc": float, "seconds": float}``.
    """
    path = cache / f"{backbone.arch}-{_cache_key(backbone)}.pt" if cache is not None else None
    if path is not None and path.is_file():
        saved = torch.load(path, weights_only=True)
        log(f"pretrained backbone from cache ({path.name}), source test accuracy {saved['source_test_acc']:.4f}")
        saved["stats"] = tuple(saved["stats"])
        return saved
    start = time.perf_counter()
    train, test = (_subset(images, backbone.source_classes) for images in source)
    pixels = train.x.float().mul(train.scale)
    stats = (pixels.mean().item(), pixels.std().item())
    torch.manual_seed(0)
    model = _create(backbone, len(backbone.source_classes))
    optimizer = torch.optim.AdamW(model.parameters(), lr=backbone.lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, backbone.lr, total_steps=backbone.steps, pct_start=0.15)
    g = torch.Generator().manual_seed(0)
    model.train()
    for step in range(backbone.steps):
        idx = torch.randint(0, len(train.y), (backbone.batch,), generator=g)
        loss = F.cross_entropy(model(_prepare(train, idx, stats, g)), train.y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % 100 == 0:
            log(f"  pretrain step {step + 1}/{backbone.steps}: loss {loss.item():.3f}")
    acc, _, _ = evaluate(model, test, torch.arange(len(test.y)), stats)
    saved = {"state": model.state_dict(), "stats": stats, "source_test_acc": acc, "seconds": time.perf_counter() - start}
    log(f"pretrained in {saved['seconds']:.0f} s, source test accuracy {acc:.4f}")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({**saved, "stats": list(stats)}, tmp)
        os.replace(tmp, path)
    return saved


def build_arm(arm: str, protocol: Protocol, pretrained: dict[str, Any], num_classes: int, seed: int) -> nn.Module:
    """The pretrained backbone with a new head (initialised by ``seed``, the same in every arm), SE per ``arm``."""
    backbone = protocol.backbone
    model = _create(backbone, len(backbone.source_classes))
    model.load_state_dict(pretrained["state"])
    torch.manual_seed(seed)
    model.reset_classifier(num_classes)
    if arm in SE_ARMS:
        torch.manual_seed(10_000 + seed)  # SE layers' own init: same across SE arms, head untouched
        example = torch.zeros(2, 3, SIZE, SIZE)
        model = inject_se(model, identity_init=arm != "se_naive", example_input=example)
        if protocol.fc1_scale != 1.0:
            with torch.no_grad():
                for _, block in se_modules(model):
                    block.fc1.weight.mul_(protocol.fc1_scale)
    return model


def _optimizer(protocol: Protocol, groups: Any, lr: float) -> torch.optim.Optimizer:
    if protocol.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=protocol.weight_decay)
    if protocol.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True, weight_decay=protocol.weight_decay)
    raise ValueError(f"unknown optimizer {protocol.optimizer!r}; known: adamw, sgd")


def _frozen_backbone(model: nn.Module, trainable_head: nn.Module, se: bool) -> None:
    """Only the head (and the SE blocks) train; BatchNorm statistics stay those of the backbone."""
    if se:
        freeze_except_se(model, head=trainable_head)
    else:
        model.requires_grad_(False)
        trainable_head.requires_grad_(True)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def train(model: nn.Module, arm: str, protocol: Protocol, setting: Setting, task: Task, train_idx: torch.Tensor,
          lr: float, seed: int, stats: tuple[float, float]) -> None:
    """Fine-tune ``model`` in place for ``setting.steps`` steps (cosine schedule, shifted images)."""
    head = model.get_classifier()
    model.train()
    if arm == "head_only":
        _frozen_backbone(model, head, se=False)
    elif arm == "se_adapter":
        _frozen_backbone(model, head, se=True)
    warmup = protocol.warmup_steps if arm in ("se", "se_naive") else 0
    if warmup:
        _frozen_backbone(model, head, se=True)
    multiplier = protocol.se_lr_multiplier
    groups = param_groups(model, lr=lr, se_lr=multiplier * lr, trainable_only=False) if arm in SE_ARMS else model.parameters()
    if arm == "head_only":
        groups = head.parameters()
    optimizer = _optimizer(protocol, groups, lr)
    steps = setting.steps
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    g = torch.Generator().manual_seed(2000 + seed)
    order = torch.cat([torch.randperm(len(train_idx), generator=g) for _ in range(steps * setting.batch // len(train_idx) + 1)])
    for step in range(steps):
        if warmup and step == warmup:
            model.requires_grad_(True)
            model.train()
        idx = train_idx[order[step * setting.batch : (step + 1) * setting.batch]]
        loss = F.cross_entropy(model(_prepare(task.pool, idx, stats, g)), task.pool.y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()


def evaluate(model: nn.Module, images: Images, idx: torch.Tensor, stats: tuple[float, float]) -> tuple[float, float, torch.Tensor]:
    """(accuracy, mean cross-entropy, logits) in eval mode; the model's flags are restored."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(_prepare(images, idx[i : i + 500], stats, None)) for i in range(0, len(idx), 500)])
    for m, training in modes:
        m.training = training
    y = images.y[idx]
    return (logits.argmax(1) == y).float().mean().item(), F.cross_entropy(logits, y).item(), logits


# ----------------------------------------------------------------------------- statistics


def sign_test(diffs: Sequence[float]) -> float:
    """Exact two-sided sign test p-value (ties dropped); 1.0 without any non-zero difference."""
    wins = sum(d > 0 for d in diffs)
    n = wins + sum(d < 0 for d in diffs)
    if n == 0:
        return 1.0
    k = min(wins, n - wins)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def _paired_t(diffs: Sequence[float]) -> float | None:
    """Two-sided paired t-test p-value (scipy, a scikit-learn dependency); None when undefined."""
    d = np.asarray(diffs, dtype=float)
    if len(d) < 2:
        return None
    if np.all(d == d[0]):
        return None  # no spread: the t statistic is undefined
    from scipy import stats

    return float(stats.ttest_1samp(d, 0.0).pvalue)


def _paired(final: Sequence[float], plain: Sequence[float]) -> dict[str, Any]:
    d = [a - b for a, b in zip(final, plain, strict=True)]
    return {
        "diffs": d,
        "mean": float(np.mean(d)),
        "std": float(np.std(d, ddof=1)) if len(d) > 1 else 0.0,
        "wins": sum(x > 0 for x in d),
        "losses": sum(x < 0 for x in d),
        "ties": sum(x == 0 for x in d),
        "sign_p": sign_test(d),
        "t_p": _paired_t(d),
    }


# ----------------------------------------------------------------------------- the run


def _load_task(setting: Setting, protocol: Protocol, fmnist: tuple[Images, Images] | None) -> Task:
    if setting.target == "digits":
        pool, test = load_digits_split(protocol.digits_test_per_class)
    elif fmnist is None:
        raise DataMissingError("Fashion-MNIST is needed for this setting")
    else:
        pool, test = fmnist
    return Task(_subset(pool, setting.classes), _subset(test, setting.classes))


def _one_run(arm: str, protocol: Protocol, setting: Setting, task: Task, pretrained: dict[str, Any], seed: int,
             lr: float, step0: bool) -> dict[str, Any]:
    """Fine-tune one arm at one seed and learning rate; validation accuracy, and step-0 test logits if asked."""
    stats = pretrained["stats"]
    train_idx, val_idx = _labelled_split(task.pool, setting.budget_per_class, protocol.val_fraction, seed)
    model = build_arm(arm, protocol, pretrained, len(setting.classes), seed)
    out: dict[str, Any] = {"arm": arm, "seed": seed, "lr": lr}
    if step0:
        out["step0_acc"], _, out["step0_logits"] = evaluate(model, task.test, torch.arange(len(task.test.y)), stats)
    start = time.perf_counter()
    train(model, arm, protocol, setting, task, train_idx, lr, seed, stats)
    out["seconds"] = time.perf_counter() - start
    out["val_acc"], out["val_loss"], _ = evaluate(model, task.pool, val_idx, stats)
    out["model"] = model
    return out


def _test(run: dict[str, Any], task: Task, stats: tuple[float, float]) -> dict[str, Any]:
    run["final_acc"], _, _ = evaluate(run["model"], task.test, torch.arange(len(task.test.y)), stats)
    return run


def _gates_of(model: nn.Module, task: Task, stats: tuple[float, float], keep_class_means: bool) -> list[dict[str, Any]]:
    idx = torch.arange(len(task.test.y))
    batches = [(_prepare(task.test, idx[i : i + 500], stats, None), task.test.y[idx[i : i + 500]]) for i in range(0, len(idx), 500)]
    result = []
    for s in gate_statistics(model, batches):
        d = s.to_dict()
        if not keep_class_means:
            d.pop("class_means")
        result.append(d)
    return result


def run_setting(setting: Setting, protocol: Protocol, pretrained: dict[str, Any], fmnist: tuple[Images, Images] | None,
                primary: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """Every arm and seed of one setting: learning rates chosen on validation (first seed), then all seeds."""
    task = _load_task(setting, protocol, fmnist)
    first, rest = protocol.seeds[0], protocol.seeds[1:]
    arms: dict[str, dict[str, Any]] = {}
    gates: dict[str, list[list[dict[str, Any]]]] = {}
    step0_logits: dict[int, torch.Tensor] = {}
    models_for_cost: dict[str, nn.Module] = {}
    for arm in protocol.arms:
        # step 0 does not depend on the learning rate: evaluated once per seed
        grid_runs = [_one_run(arm, protocol, setting, task, pretrained, first, lr, i == 0) for i, lr in enumerate(protocol.grid)]
        best = max(grid_runs, key=lambda r: (r["val_acc"], -r["val_loss"]))
        for key in ("step0_acc", "step0_logits"):
            best[key] = grid_runs[0][key]
        grid_val = {f"{r['lr']:g}": r["val_acc"] for r in grid_runs}
        del grid_runs  # only the chosen model is kept
        runs = [best] + [_one_run(arm, protocol, setting, task, pretrained, s, best["lr"], True) for s in rest]
        runs = [_test(r, task, pretrained["stats"]) for r in runs]
        entry = {
            "seeds": [r["seed"] for r in runs],
            "step0_acc": [r["step0_acc"] for r in runs],
            "final_acc": [r["final_acc"] for r in runs],
            "val_acc": [r["val_acc"] for r in runs],
            "lr": best["lr"],
            "se_lr": best["lr"] * protocol.se_lr_multiplier if arm in SE_ARMS else None,
            "grid_val_acc": grid_val,
            "mean": float(np.mean([r["final_acc"] for r in runs])),
            "std": float(np.std([r["final_acc"] for r in runs], ddof=1)) if len(runs) > 1 else 0.0,
            "train_seconds": float(np.mean([r["seconds"] for r in runs])),
        }
        if arm == "plain":
            step0_logits = {r["seed"]: r["step0_logits"] for r in runs}
        if arm == "se" and step0_logits:
            entry["step0_logits_equal_plain"] = [bool(torch.equal(r["step0_logits"], step0_logits[r["seed"]])) for r in runs]
        if arm in SE_ARMS:
            keep = primary and arm == "se"  # per-class means (Fig. 6) for one run only: they are large
            gates[arm] = [_gates_of(r["model"], task, pretrained["stats"], keep and i == 0) for i, r in enumerate(runs)]
            models_for_cost[arm] = runs[0]["model"]
        arms[arm] = entry
        log(f"  {setting.name:<24} {arm:<10} lr {best['lr']:g}: test {entry['mean']:.4f} +/- {entry['std']:.4f} "
            f"(step 0 {np.mean(entry['step0_acc']):.4f}, {entry['train_seconds']:.1f} s/run)")
    if "plain" in arms:
        for arm, entry in arms.items():
            if arm != "plain":
                entry["paired_vs_plain"] = _paired(entry["final_acc"], arms["plain"]["final_acc"])
    result = {
        "protocol": _protocol_record(protocol, setting, len(task.test.y)),
        "arms": arms,
        "gates": gates,
    }
    if "se" in models_for_cost:
        result["stages"] = _stage_summary(gates["se"], models_for_cost["se"])
    return result


def _stage_summary(per_seed: list[list[dict[str, Any]]], model: nn.Module, tol: float = 0.02) -> list[dict[str, Any]]:
    """Per stage over all seeds: gate mean and spreads, whether the gates stayed at 1, and the SE cost."""
    costs = {c.name: c for c in count(model, (3, SIZE, SIZE)).se}
    params = {name: sum(p.numel() for p in block.parameters()) for name, block in se_modules(model)}
    stages: dict[int, list[dict[str, Any]]] = {}
    for seed_stats in per_seed:
        for s in seed_stats:
            stages.setdefault(s["stage"], []).append(s)
    out = []
    for stage, items in sorted(stages.items()):
        names = sorted({s["name"] for s in items})
        out.append({
            "stage": stage,
            "blocks": names,
            "mean": float(np.mean([s["mean"] for s in items])),
            "std": float(np.mean([s["std"] for s in items])),
            "min": float(min(s["min"] for s in items)),
            "max": float(max(s["max"] for s in items)),
            "image_std": float(np.mean([s["image_std"] for s in items])),
            "class_std": float(np.mean([s["class_std"] for s in items])) if items[0]["class_std"] is not None else None,
            "near_one": float(np.mean([s["near_one"] for s in items])),
            "saturated": float(np.mean([s["saturated"] for s in items])),
            "at_one": all(s["near_one"] >= 0.99 for s in items),
            "se_params": sum(params[n] for n in names),
            "se_fc_macs": sum(costs[n].fc_macs for n in names),
            "se_elementwise_ops": sum(costs[n].pool_adds + costs[n].scale_muls for n in names),
        })
    return out


def _protocol_record(protocol: Protocol, setting: Setting, test_images: int) -> dict[str, Any]:
    b = protocol.backbone
    return {
        "backbone": f"timm {b.arch}({', '.join(f'{k}={v}' for k, v in b.kwargs.items())}) at {SIZE} px, 3 channels replicated",
        "source": f"{b.source} classes {list(b.source_classes)} (train split), {b.steps} steps of {b.batch}",
        "target": f"{setting.target} classes {list(setting.classes)}",
        "setting": setting.name,
        "budget_per_class": setting.budget_per_class,
        "val_per_class": max(1, round(setting.budget_per_class * protocol.val_fraction)),
        "test_images": test_images,
        "steps": setting.steps,
        "batch": setting.batch,
        "seeds": list(protocol.seeds),
        "optimizer": protocol.optimizer,
        "weight_decay": protocol.weight_decay,
        "schedule": "cosine to 0, no warm-up; images shifted by up to 2 px",
        "lr_grid": list(protocol.grid),
        "lr_selection": f"best validation accuracy (ties: lower validation loss) on seed {protocol.seeds[0]}",
        "se_lr_multiplier": protocol.se_lr_multiplier,
        "warmup_steps": protocol.warmup_steps,
        "fc1_scale": protocol.fc1_scale,
    }


def run(protocol: Protocol, *, data: Path | None, cache: Path | None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the whole protocol and return the JSON-ready result (primary setting at the top level)."""
    start = time.perf_counter()
    needs_fmnist = protocol.backbone.source == "fashion_mnist" or any(s.target == "fashion_mnist" for s in protocol.settings)
    fmnist = load_fashion_mnist(data or DEFAULT_DATA) if needs_fmnist else None
    source = fmnist if protocol.backbone.source == "fashion_mnist" else load_digits_split(protocol.digits_test_per_class)
    pretrained = pretrain(protocol.backbone, source, cache, log)
    settings = []
    for i, setting in enumerate(protocol.settings):
        settings.append(run_setting(setting, protocol, pretrained, fmnist, i == 0, log))
    primary = settings[0]
    study = run_study(protocol, primary, _load_task(protocol.settings[0], protocol, fmnist), pretrained, log)
    return {
        "protocol": primary["protocol"] | {
            "pretrain_source_test_acc": pretrained["source_test_acc"],
            "torch": torch.__version__,
            "timm": timm.__version__,
            "threads": torch.get_num_threads(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "wall_seconds": time.perf_counter() - start,
        },
        "arms": primary["arms"],
        "gates": primary["gates"],
        "stages": primary.get("stages", []),
        "settings": settings,
        "study": study,
    }


def run_study(protocol: Protocol, primary: dict[str, Any], task: Task, pretrained: dict[str, Any],
              log: Callable[[str], None]) -> dict[str, Any]:
    """Each variant at every seed of the primary setting, paired with the arm or variant it names."""
    setting = protocol.settings[0]
    out: dict[str, Any] = {}
    for v in protocol.study:
        chosen = primary["arms"][v.lr_of or v.arm]["lr"]
        p = replace(
            protocol,
            optimizer=v.optimizer or protocol.optimizer,
            weight_decay=protocol.weight_decay if v.weight_decay is None else v.weight_decay,
            se_lr_multiplier=protocol.se_lr_multiplier if v.se_lr_multiplier is None else v.se_lr_multiplier,
            warmup_steps=protocol.warmup_steps if v.warmup_steps is None else v.warmup_steps,
            fc1_scale=protocol.fc1_scale if v.fc1_scale is None else v.fc1_scale,
        )
        lr = chosen if v.lr is None else v.lr
        runs = [_test(_one_run(v.arm, p, setting, task, pretrained, s, lr, False), task, pretrained["stats"])
                for s in protocol.seeds]
        final = [r["final_acc"] for r in runs]
        reference = out[v.versus] if v.versus in out else primary["arms"][v.versus]
        entry = {
            "arm": v.arm,
            "versus": v.versus,
            "optimizer": p.optimizer,
            "weight_decay": p.weight_decay,
            "lr": lr,
            "se_lr": lr * p.se_lr_multiplier if v.arm in SE_ARMS else None,
            "warmup_steps": p.warmup_steps if v.arm in ("se", "se_naive") else 0,
            "fc1_scale": p.fc1_scale,
            "final_acc": final,
            "mean": float(np.mean(final)),
            "std": float(np.std(final, ddof=1)) if len(final) > 1 else 0.0,
            "paired": _paired(final, reference["final_acc"]),
        }
        if v.arm in SE_ARMS:
            per_seed = [_gates_of(r["model"], task, pretrained["stats"], False) for r in runs]
            entry["stages"] = _stage_summary(per_seed, runs[0]["model"])
        out[v.name] = entry
        log(f"  study {v.name:<26} test {entry['mean']:.4f} +/- {entry['std']:.4f}, "
            f"vs {v.versus} {entry['paired']['mean']:+.4f}")
    return out


# ----------------------------------------------------------------------------- output


def write_outputs(result: dict[str, Any], out: Path, quick: bool) -> list[Path]:
    """efficacy.json, efficacy.md and the two plots in ``out``."""
    from efficacy_report import render_markdown, write_plots  # beside this file

    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "efficacy.json"]
    tmp = paths[0].with_suffix(".tmp")
    tmp.write_text(json.dumps(_rounded(result), indent=1, default=_jsonable) + "\n")
    os.replace(tmp, paths[0])
    plots = write_plots(result, out)
    md = out / "efficacy.md"
    md.write_text(render_markdown(result, [p.name for p in plots], quick))
    return paths + plots + [md]


def _rounded(value: Any) -> Any:
    """Floats to 6 significant digits (accuracies on <= 10,000 images need no more), recursively."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON: {type(value).__name__}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="digits only, tiny model, 2 seeds: seconds (CI)")
    parser.add_argument("--data", type=Path, help=f"folder with the Fashion-MNIST idx files (default {DEFAULT_DATA})")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the pretrained backbone is cached")
    parser.add_argument("--no-cache", action="store_true", help="pretrain again, store nothing")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for efficacy.json/.md and plots")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steady on a shared machine)")
    parser.add_argument("--seeds", type=int, help="number of seeds (default 5, --quick 2)")
    parser.add_argument("--from-json", type=Path, help="only render efficacy.md and the plots from this efficacy.json")
    args = parser.parse_args(argv)
    if args.from_json:
        paths = write_outputs(json.loads(args.from_json.read_text()), args.out, args.quick)
        print("wrote " + ", ".join(str(p) for p in paths))
        return 0
    torch.set_num_threads(args.threads)
    protocol = QUICK if args.quick else FULL
    if args.seeds:
        protocol = replace(protocol, seeds=tuple(range(args.seeds)))
    try:
        result = run(protocol, data=args.data, cache=None if args.no_cache else args.cache,
                     log=lambda s: print(s, flush=True))
    except DataMissingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    paths = write_outputs(result, args.out, args.quick)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
