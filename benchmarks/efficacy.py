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
   picked on the validation split (seed 0): the grid 1e-3, 3e-3, 1e-2 grows by one 1-3-10 step past
   an edge while the best rate is at that edge (limits 1e-5 and 1; ``lr_at_limit`` marks a stop
   there). ``plain`` (backbone + new head), ``se`` (``inject_se`` defaults, SE blocks in their own
   ``param_groups`` group), ``se_naive`` (the paper's sigmoid with ordinary initialisation,
   ``identity_init=False``), and on the frozen backbone (BatchNorm statistics frozen, layers in eval
   mode): ``se_adapter`` (SE blocks + head, ``freeze_except_se(norms=False)``), ``se_bn`` (SE blocks +
   BatchNorm affine + head), ``bn_tune`` (BatchNorm affine + head), ``lora_r<k>`` (``peft`` LoRA,
   alpha = rank, on every backbone Conv2d + head; one rank with about se_bn's trainable count and 8x
   that; the ``efficacy`` extra, left out with a note without peft) and ``head_only`` (linear probe),
   the floor. Trained parameters are counted per arm.
4. Seeds are paired across arms: a seed fixes the labelled subset, the head's initialisation,
   the data order and the augmentation. Reported: mean, standard deviation, the paired
   differences to ``plain`` with an exact sign test and a paired t-test, and the accuracy at
   step 0 (``se`` must equal ``plain`` exactly; its logits are compared with ``torch.equal``).
5. ``--part scratch``: the same ResNet from random init on a Fashion-MNIST train subset, ``plain``
   against ``se`` (identity start) and ``se_paper`` (sigmoid, ordinary init), one fixed recipe.
6. Gate statistics after fine-tuning (``se_inject.gate_statistics``) per block and stage, per
   class for the primary setting, and which stages keep their gates at 1 (what removing their
   SE blocks gives back).

Usage::

    python benchmarks/efficacy.py                  # full run (about an hour on 2 cores) -> results/efficacy.*
    python benchmarks/efficacy.py --part transfer --setting fashion_mnist_5-9_100 --no-study --out A
    python benchmarks/efficacy.py --merge A/efficacy.json B/efficacy.json --round1 OLD.json  # parts -> one report
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
import re
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
from se_inject.report.complexity import count

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
#: ``"lora"`` stands for the LoRA arms, ``lora_r<k>`` for each rank of ``Protocol.lora_ranks`` (or the auto ranks).
ARMS = ("plain", "se", "se_naive", "se_adapter", "head_only", "bn_tune", "se_bn", "lora")
SE_ARMS = ("se", "se_naive", "se_adapter", "se_bn")
#: Arms that train a few parameters on the frozen backbone (BatchNorm layers in eval mode).
FROZEN_ARMS = ("se_adapter", "head_only", "bn_tune", "se_bn")
#: Learning rates a grid is extended by, 1-3-10 steps between the stated limits 1e-5 and 1.
LR_LADDER = tuple(float(f"{m}e{e}") for e in range(-5, 1) for m in (1, 3) if float(f"{m}e{e}") <= 1.0)
#: Extra paired comparisons reported per setting (first minus second), besides each arm against plain.
PAIRS = (("se_bn", "se_adapter"), ("se_bn", "bn_tune"), ("se_adapter", "bn_tune"), ("se_adapter", "head_only"))
SIZE = 32


def is_lora(arm: str) -> bool:
    """``lora_r<k>`` arm names."""
    return re.fullmatch(r"lora_r\d+", arm) is not None


def lora_rank(arm: str) -> int:
    return int(arm.removeprefix("lora_r"))


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
class Scratch:
    """Training the same small ResNet from random init (``--part scratch``): plain against two SE inits.

    One recipe for every arm, the backbone pretraining's (AdamW, one-cycle, shifted images), not tuned
    per arm; a seed fixes the training subset, the initialisation (the same backbone weights in every
    arm), the SE layers' init and the data order.
    """

    source: str = "fashion_mnist"  # or "digits" (--quick)
    classes: tuple[int, ...] = tuple(range(10))
    train_images: int = 10_000  # a class-balanced random subset of the train split, per seed
    steps: int = 600
    batch: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    seeds: tuple[int, ...] = (0, 1, 2)
    arms: tuple[str, ...] = ("plain", "se", "se_paper")


@dataclass(frozen=True)
class Protocol:
    """Everything that decides the numbers (recorded in the JSON)."""

    backbone: Backbone
    settings: tuple[Setting, ...]  # the first is the primary setting
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    arms: tuple[str, ...] = ARMS
    grid: tuple[float, ...] = (1e-3, 3e-3, 1e-2)  # the start: extended past an edge by LR_LADDER steps
    lr_limits: tuple[float, float] = (1e-5, 1.0)
    lora_ranks: tuple[int, ...] = ()  # empty: one rank closest to se_bn's trainable count, and 8x that
    optimizer: str = "adamw"  # or "sgd" (momentum 0.9)
    weight_decay: float = 0.01
    se_lr_multiplier: float = 1.0  # SE group learning rate = multiplier x base learning rate
    val_fraction: float = 0.2
    digits_test_per_class: int = 70
    warmup_steps: int = 0  # steps with only SE blocks and head training first (se arms)
    fc1_scale: float = 1.0  # scale of the SE blocks' first layer at insertion (exploration)
    study: tuple[Variant, ...] = ()  # extra recipes on the primary setting
    scratch: Scratch | None = None


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
    scratch=Scratch(),
)
QUICK = Protocol(
    backbone=Backbone(kwargs={"channels": (8, 16, 32, 64), "stem_width": 8}, source="digits", steps=60, batch=64),
    settings=(Setting("digits_5-9_30", "digits", (5, 6, 7, 8, 9), 30, steps=25, batch=32),),
    seeds=(0, 1),
    grid=(1e-3, 3e-3),
    lr_limits=(3e-4, 1e-2),  # a narrow ladder: seconds, and the limit marking is exercised
    study=(Variant("se, SE lr x10", "se", se_lr_multiplier=10),),
    scratch=Scratch(source="digits", train_images=600, steps=30, batch=64, seeds=(0, 1)),
)


class DataMissingError(FileNotFoundError):
    """The Fashion-MNIST idx files are not where they were looked for."""


class PeftMissingError(ImportError):
    """A LoRA arm was asked for and the ``peft`` library (the ``efficacy`` extra) is not installed."""


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
    elif is_lora(arm):
        torch.manual_seed(10_000 + seed)
        model = add_lora(model, lora_rank(arm))
    return model


def add_lora(model: nn.Module, rank: int) -> nn.Module:
    """``peft`` LoRA (alpha = rank, no dropout) on every Conv2d outside the head; B starts at 0, so the
    model's function is unchanged at step 0."""
    try:
        import peft
    except ImportError as e:
        raise PeftMissingError("the LoRA arms need peft: pip install 'se-inject[efficacy]'") from e
    head = {id(m) for m in model.get_classifier().modules()}
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and id(m) not in head]
    config = peft.LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, bias="none",
                             target_modules="|".join(re.escape(n) for n in convs))  # a str is full-matched
    return peft.inject_adapter_in_model(config, model)


def peft_available() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


def _optimizer(protocol: Protocol, groups: Any, lr: float) -> torch.optim.Optimizer:
    if protocol.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=protocol.weight_decay)
    if protocol.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True, weight_decay=protocol.weight_decay)
    raise ValueError(f"unknown optimizer {protocol.optimizer!r}; known: adamw, sgd")


def _frozen_backbone(model: nn.Module, trainable_head: nn.Module, arm: str) -> None:
    """Only the arm's few parameters and the head train; BatchNorm statistics stay those of the backbone.

    ``se_adapter``: SE blocks; ``se_bn``: SE blocks and BatchNorm affine parameters; ``bn_tune``:
    BatchNorm affine parameters; ``lora_r<k>``: the LoRA matrices; ``head_only``: nothing else.
    """
    if arm in ("se_adapter", "se_bn"):
        freeze_except_se(model, head=trainable_head, norms=arm == "se_bn")
    else:
        model.requires_grad_(False)
        trainable_head.requires_grad_(True)
        for name, p in model.named_parameters():
            if is_lora(arm) and ".lora_" in f".{name}":
                p.requires_grad_(True)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            if arm == "bn_tune":
                m.requires_grad_(True)


def train(model: nn.Module, arm: str, protocol: Protocol, setting: Setting, task: Task, train_idx: torch.Tensor,
          lr: float, seed: int, stats: tuple[float, float]) -> int:
    """Fine-tune ``model`` in place for ``setting.steps`` steps (cosine schedule, shifted images).

    Returns the number of parameters the optimizer trains.
    """
    head = model.get_classifier()
    model.train()
    frozen = arm in FROZEN_ARMS or is_lora(arm)
    if frozen:
        _frozen_backbone(model, head, arm)
    warmup = protocol.warmup_steps if arm in ("se", "se_naive") else 0
    if warmup:
        _frozen_backbone(model, head, "se_adapter")
    multiplier = protocol.se_lr_multiplier
    if arm in SE_ARMS:
        groups = param_groups(model, lr=lr, se_lr=multiplier * lr, trainable_only=frozen)
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad or not frozen]}]
    trainable = sum(p.numel() for g in groups for p in g["params"])
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
    return trainable


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
    out["trainable_params"] = train(model, arm, protocol, setting, task, train_idx, lr, seed, stats)
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


def ladder_step(lr: float, direction: int, limits: tuple[float, float]) -> float | None:
    """The next learning rate of LR_LADDER below (-1) or above (+1) ``lr``; None past ``limits``."""
    index = min(range(len(LR_LADDER)), key=lambda i: abs(math.log(LR_LADDER[i] / lr)))
    if not math.isclose(LR_LADDER[index], lr, rel_tol=1e-9):
        raise ValueError(f"learning rate {lr:g} is not on the 1-3-10 ladder {LR_LADDER}")
    j = index + direction
    if j < 0 or j >= len(LR_LADDER) or not limits[0] <= LR_LADDER[j] <= limits[1]:
        return None
    return LR_LADDER[j]


def search_lr(run_at: Callable[[float], dict[str, Any]], grid: Sequence[float],
              limits: tuple[float, float]) -> tuple[dict[str, Any], list[dict[str, Any]], bool]:
    """Runs at each rate of ``grid``, then one 1-3-10 step further while the best is at an edge.

    The best run has the highest validation accuracy (ties: lower validation loss). Returns (best
    run, every run in the order run, whether the search stopped at a limit with the best at the edge).
    """
    runs = [run_at(lr) for lr in grid]
    while True:
        best = max(runs, key=lambda r: (r["val_acc"], -r["val_loss"]))
        rates = sorted(r["lr"] for r in runs)
        if best["lr"] not in (rates[0], rates[-1]):
            return best, runs, False
        nxt = ladder_step(best["lr"], -1 if best["lr"] == rates[0] else 1, limits)
        if nxt is None:
            return best, runs, True
        runs.append(run_at(nxt))


def lora_ranks(protocol: Protocol, setting: Setting, pretrained: dict[str, Any], log: Callable[[str], None]) -> tuple[int, ...]:
    """The protocol's LoRA ranks, or: the rank whose trainable count is closest to se_bn's, and 8x it."""
    if protocol.lora_ranks:
        return protocol.lora_ranks
    k = len(setting.classes)

    def trainable(arm: str) -> int:
        model = build_arm(arm, protocol, pretrained, k, 0)
        _frozen_backbone(model, model.get_classifier(), arm)
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    target, head, per_rank = trainable("se_bn"), trainable("head_only"), trainable("lora_r1") - trainable("head_only")
    rank = max(1, round((target - head) / per_rank))
    log(f"  LoRA: {per_rank:,} parameters per rank, se_bn trains {target:,}: ranks {rank} and {8 * rank}")
    return (rank, 8 * rank)


def resolve_arms(protocol: Protocol, setting: Setting, pretrained: dict[str, Any], log: Callable[[str], None]) -> list[str]:
    """``protocol.arms`` with ``"lora"`` expanded to ``lora_r<k>``, or left out (with a note) without peft."""
    arms: list[str] = []
    for arm in protocol.arms:
        if arm != "lora" and not is_lora(arm):
            arms.append(arm)
        elif not peft_available():
            log(f"note: peft is not installed, so the LoRA arm {arm} is left out "
                "(pip install 'se-inject[efficacy]' to run it)")
        elif arm == "lora":
            arms += [f"lora_r{r}" for r in lora_ranks(protocol, setting, pretrained, log)]
        else:
            arms.append(arm)
    return arms


def run_setting(setting: Setting, protocol: Protocol, pretrained: dict[str, Any], fmnist: tuple[Images, Images] | None,
                primary: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """Every arm and seed of one setting: learning rates chosen on validation (first seed), then all seeds."""
    task = _load_task(setting, protocol, fmnist)
    first, rest = protocol.seeds[0], protocol.seeds[1:]
    arms: dict[str, dict[str, Any]] = {}
    gates: dict[str, list[list[dict[str, Any]]]] = {}
    step0_logits: dict[int, torch.Tensor] = {}
    models_for_cost: dict[str, nn.Module] = {}
    for arm in resolve_arms(protocol, setting, pretrained, log):
        # step 0 does not depend on the learning rate: evaluated once per seed
        def run_at(lr: float, arm: str = arm, done: list[int] = [0]) -> dict[str, Any]:  # noqa: B006 (a counter)
            done[0] += 1
            return _one_run(arm, protocol, setting, task, pretrained, first, lr, done[0] == 1)

        best, grid_runs, at_limit = search_lr(run_at, protocol.grid, protocol.lr_limits)
        for key in ("step0_acc", "step0_logits"):
            best[key] = grid_runs[0][key]
        grid = sorted(r["lr"] for r in grid_runs)
        grid_val = {f"{r['lr']:g}": r["val_acc"] for r in sorted(grid_runs, key=lambda r: r["lr"])}
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
            "grid": grid,
            "grid_val_acc": grid_val,
            "lr_at_limit": at_limit,
            "trainable_params": best["trainable_params"],
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
        log(f"  {setting.name:<24} {arm:<10} lr {best['lr']:g} (grid {', '.join(f'{g:g}' for g in grid)}"
            f"{', at the limit' if at_limit else ''}): test {entry['mean']:.4f} +/- {entry['std']:.4f} "
            f"(step 0 {np.mean(entry['step0_acc']):.4f}, {entry['trainable_params']:,} trained, "
            f"{entry['train_seconds']:.1f} s/run)")
    if "plain" in arms:
        for arm, entry in arms.items():
            if arm != "plain":
                entry["paired_vs_plain"] = _paired(entry["final_acc"], arms["plain"]["final_acc"])
    pairs = {f"{a} - {b}": _paired(arms[a]["final_acc"], arms[b]["final_acc"])
             for a, b in PAIRS if a in arms and b in arms}
    lora = [a for a in arms if is_lora(a)]
    if lora and "se_bn" in arms:
        pairs[f"se_bn - {lora[0]}"] = _paired(arms["se_bn"]["final_acc"], arms[lora[0]]["final_acc"])
    result = {
        "protocol": _protocol_record(protocol, setting, len(task.test.y)),
        "arms": arms,
        "pairs": pairs,
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
        "lr_limits": list(protocol.lr_limits),
        "lr_selection": f"best validation accuracy (ties: lower validation loss) on seed {protocol.seeds[0]}; "
                        f"the grid {list(protocol.grid)} extended by 1-3-10 steps past an edge while the best "
                        f"rate is at that edge, within {protocol.lr_limits[0]:g} to {protocol.lr_limits[1]:g}",
        "se_lr_multiplier": protocol.se_lr_multiplier,
        "warmup_steps": protocol.warmup_steps,
        "fc1_scale": protocol.fc1_scale,
    }


def run(protocol: Protocol, *, data: Path | None, cache: Path | None, log: Callable[[str], None] = print,
        part: str = "all", settings: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the protocol (``part``: "transfer", "scratch" or "all") and return the JSON-ready result.

    ``settings`` names the transfer settings to run (default: all); the primary setting, when run, is
    also at the top level (``arms``, ``gates``, ``stages``) and the study runs on it.
    """
    start = time.perf_counter()
    chosen = [s for s in protocol.settings if settings is None or s.name in settings]
    if settings is not None and len(chosen) != len(set(settings)):
        known = ", ".join(s.name for s in protocol.settings)
        raise ValueError(f"unknown setting in {list(settings)}; known: {known}")
    transfer = part in ("all", "transfer")
    scratch = part in ("all", "scratch") and protocol.scratch is not None
    needs_fmnist = (transfer and (protocol.backbone.source == "fashion_mnist"
                                  or any(s.target == "fashion_mnist" for s in chosen))) or (
        scratch and protocol.scratch.source == "fashion_mnist")
    fmnist = load_fashion_mnist(data or DEFAULT_DATA) if needs_fmnist else None
    result: dict[str, Any] = {"protocol": {}}
    if transfer and chosen:
        source = fmnist if protocol.backbone.source == "fashion_mnist" else load_digits_split(protocol.digits_test_per_class)
        pretrained = pretrain(protocol.backbone, source, cache, log)
        done = [run_setting(s, protocol, pretrained, fmnist, s == protocol.settings[0], log) for s in chosen]
        result["protocol"] = dict(done[0]["protocol"], pretrain_source_test_acc=pretrained["source_test_acc"])
        result["settings"] = done
        if chosen[0] == protocol.settings[0]:
            primary = done[0]
            result |= {"arms": primary["arms"], "pairs": primary["pairs"], "gates": primary["gates"],
                       "stages": primary.get("stages", [])}
            result["study"] = run_study(protocol, primary, _load_task(protocol.settings[0], protocol, fmnist),
                                        pretrained, log)
    if scratch:
        result["scratch"] = run_scratch(protocol.scratch, protocol, fmnist, log)
    result["protocol"] |= {
        "torch": torch.__version__,
        "timm": timm.__version__,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "wall_seconds": time.perf_counter() - start,
    }
    return result


def _scratch_subset(pool: Images, per_class: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(3000 + seed)
    return torch.cat([idx[torch.randperm(len(idx), generator=g)[:per_class]] for idx in _by_class(pool.y)])


def run_scratch(sc: Scratch, protocol: Protocol, fmnist: tuple[Images, Images] | None,
                log: Callable[[str], None]) -> dict[str, Any]:
    """The small ResNet from random init: ``plain``, ``se`` (identity start), ``se_paper`` (sigmoid, ordinary init)."""
    if sc.source == "digits":
        source = load_digits_split(protocol.digits_test_per_class)
    elif fmnist is None:
        raise DataMissingError("Fashion-MNIST is needed for the from-scratch part")
    else:
        source = fmnist
    pool, test = (_subset(images, sc.classes) for images in source)
    pixels = pool.x.float().mul(pool.scale)
    stats = (pixels.mean().item(), pixels.std().item())
    per_class = sc.train_images // len(sc.classes)
    arms: dict[str, dict[str, Any]] = {a: {"final_acc": [], "step0_acc": [], "half_acc": [], "final_train_loss": [],
                                           "loss_curve": [], "seconds": []} for a in sc.arms}
    step0_logits: dict[int, torch.Tensor] = {}
    all_test = torch.arange(len(test.y))
    for seed in sc.seeds:
        train_idx = _scratch_subset(pool, per_class, seed)
        for arm in sc.arms:
            torch.manual_seed(seed)  # the same backbone initialisation in every arm
            model = _create(protocol.backbone, len(sc.classes))
            if arm != "plain":
                torch.manual_seed(10_000 + seed)
                model = inject_se(model, identity_init=arm == "se", example_input=torch.zeros(2, 3, SIZE, SIZE))
            e = arms[arm]
            acc0, _, logits0 = evaluate(model, test, all_test, stats)
            e["step0_acc"].append(acc0)
            if arm == "plain":
                step0_logits[seed] = logits0
            elif arm == "se":
                e.setdefault("step0_logits_equal_plain", []).append(bool(torch.equal(logits0, step0_logits[seed])))
            optimizer = torch.optim.AdamW(model.parameters(), lr=sc.lr, weight_decay=sc.weight_decay)
            schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, sc.lr, total_steps=sc.steps, pct_start=0.15)
            g = torch.Generator().manual_seed(2000 + seed)
            losses: list[float] = []
            start = time.perf_counter()
            model.train()
            for step in range(sc.steps):
                idx = train_idx[torch.randint(0, len(train_idx), (sc.batch,), generator=g)]
                loss = F.cross_entropy(model(_prepare(pool, idx, stats, g)), pool.y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                losses.append(loss.item())
                if step + 1 == sc.steps // 2:
                    e["half_acc"].append(evaluate(model, test, all_test, stats)[0])
            e["seconds"].append(time.perf_counter() - start)
            e["final_acc"].append(evaluate(model, test, all_test, stats)[0])
            window = max(1, sc.steps // 10)
            e["loss_curve"].append([float(np.mean(losses[i : i + window])) for i in range(0, sc.steps, window)])
            e["final_train_loss"].append(e["loss_curve"][-1][-1])
            log(f"  scratch seed {seed} {arm:<9}: test {e['final_acc'][-1]:.4f} (half-way {e['half_acc'][-1]:.4f}, "
                f"train loss {e['final_train_loss'][-1]:.3f}, {e['seconds'][-1]:.0f} s)")
    for e in arms.values():
        e["mean"] = float(np.mean(e["final_acc"]))
        e["std"] = float(np.std(e["final_acc"], ddof=1)) if len(e["final_acc"]) > 1 else 0.0
        e["lr"] = sc.lr
    for arm, e in arms.items():
        if arm != "plain" and "plain" in arms:
            e["paired_vs_plain"] = _paired(e["final_acc"], arms["plain"]["final_acc"])
    pairs = {}
    if "se" in arms and "se_paper" in arms:
        pairs["se - se_paper"] = _paired(arms["se"]["final_acc"], arms["se_paper"]["final_acc"])
    b = protocol.backbone
    return {
        "protocol": {
            "model": f"timm {b.arch}({', '.join(f'{k}={v}' for k, v in b.kwargs.items())}) at {SIZE} px, random init "
                     f"(timm's zero_init_last)",
            "data": f"{sc.source} classes {list(sc.classes)}: {per_class} train images per class "
                    f"({per_class * len(sc.classes)}, a random class-balanced subset per seed), test on all "
                    f"{len(test.y)} test images",
            "steps": sc.steps,
            "batch": sc.batch,
            "optimizer": f"adamw, lr {sc.lr:g} one-cycle (15% warm-up), weight decay {sc.weight_decay}, images shifted "
                         f"by up to 2 px: the backbone pretraining's recipe, the same for every arm, not tuned per arm",
            "seeds": list(sc.seeds),
        },
        "arms": arms,
        "pairs": pairs,
    }


def merge(parts: Sequence[dict[str, Any]], round1: dict[str, Any] | None, protocol: Protocol) -> dict[str, Any]:
    """One result from runs of parts of the protocol; settings (and the study) not run come from round 1, marked.

    Settings keep the protocol's order; the primary setting's numbers are also at the top level.
    """
    runs: dict[str, dict[str, Any]] = {}
    out: dict[str, Any] = {"protocol": {}}
    wall = 0.0
    for part in parts:
        for setting in part.get("settings", []):
            runs[setting["protocol"]["setting"]] = setting
        for key in ("arms", "pairs", "gates", "stages", "study", "scratch"):
            if part.get(key):  # an empty study: run with --no-study
                out[key] = part[key]
        if "arms" in part or not out["protocol"]:
            out["protocol"] = {k: v for k, v in part["protocol"].items() if k != "wall_seconds"}
        wall += part["protocol"].get("wall_seconds", 0.0)
    old = {s["protocol"]["setting"]: s for s in (round1 or {}).get("settings", [])}
    settings = []
    for s in protocol.settings:
        if s.name in runs:
            settings.append(runs[s.name])
        elif s.name in old:
            settings.append(old[s.name] | {"round": 1})
    if "study" not in out and round1 and round1.get("study"):
        out["study"] = round1["study"]
        out["study_round"] = 1
    out["settings"] = settings
    out["protocol"]["wall_seconds"] = wall  # the parts' run times added (they may have run side by side)
    return out


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
    parser.add_argument("--part", choices=("all", "transfer", "scratch"), default="all",
                        help="transfer experiment, from-scratch experiment, or both (default)")
    parser.add_argument("--setting", action="append", help="run only this transfer setting (repeatable)")
    parser.add_argument("--arms", help="comma-separated arms to run (default: all; 'lora' for the LoRA arms)")
    parser.add_argument("--no-study", action="store_true", help="leave out the SE learning-rate study")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                        help="combine the efficacy.json of runs of parts into --out (no training)")
    parser.add_argument("--round1", type=Path, help="with --merge: round-1 efficacy.json for settings not run")
    args = parser.parse_args(argv)
    protocol = QUICK if args.quick else FULL
    if args.merge:
        round1 = json.loads(args.round1.read_text()) if args.round1 else None
        result = merge([json.loads(p.read_text()) for p in args.merge], round1, protocol)
        paths = write_outputs(result, args.out, args.quick)
        print("wrote " + ", ".join(str(p) for p in paths))
        return 0
    if args.from_json:
        paths = write_outputs(json.loads(args.from_json.read_text()), args.out, args.quick)
        print("wrote " + ", ".join(str(p) for p in paths))
        return 0
    torch.set_num_threads(args.threads)
    if args.seeds:
        protocol = replace(protocol, seeds=tuple(range(args.seeds)))
    if args.arms:
        protocol = replace(protocol, arms=tuple(a.strip() for a in args.arms.split(",") if a.strip()))
    if args.no_study:
        protocol = replace(protocol, study=())
    try:
        result = run(protocol, data=args.data, cache=None if args.no_cache else args.cache,
                     log=lambda s: print(s, flush=True), part=args.part, settings=args.setting)
    except (DataMissingError, PeftMissingError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    paths = write_outputs(result, args.out, args.quick)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
