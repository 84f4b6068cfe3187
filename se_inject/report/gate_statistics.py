"""What the inserted SE blocks do after training: gate statistics per block and per class.

For each :class:`~se_inject.se_block.SEBlock` the gates (one per channel and image, after the gate
function: ``2 * sigmoid(z)`` by default, so 1.0 means "unchanged") are recorded on the given
batches and summarised:

* ``mean``, ``std``, ``min``, ``max`` over every image and channel;
* ``image_std``: mean over channels of the standard deviation across images. Near zero, the
  block applies the same scale to every image: a static per-channel scale, not attention;
* ``near_one``: fraction of gates within ``tol`` of 1.0 (the identity: the block does nothing);
* ``saturated``: fraction of gates within ``tol`` of the gate's bounds (0 and 2 for the
  identity gate, 0 and 1 for the paper's sigmoid), where the gradient vanishes;
* with labels, ``class_means`` (class -> mean gate per channel, the SE paper's Fig. 6 analysis)
  and ``class_std``: mean over channels of the standard deviation across the class means. The
  paper finds class-agnostic gates early in the network and class-specific ones late.

Only the SE blocks' own gates are recorded; nothing else in the model is touched.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..analysis.sandbox import preserved_state
from ..plan import PLAN_ATTR
from ..se_block import GATES, SEBlock, _squeeze

__all__ = ["GateStats", "gate_statistics", "GATE_RANGE"]

#: Gate name -> (lowest, highest) value the gate function can take.
GATE_RANGE: dict[str, tuple[float, float]] = {
    "scaled_sigmoid": (0.0, 2.0),
    "sigmoid": (0.0, 1.0),
    "one_plus_tanh": (0.0, 2.0),
    "tanh": (-1.0, 1.0),
}


@dataclass(frozen=True)
class GateStats:
    """Summary of one SE block's gates over the batches it saw (see the module docstring)."""

    name: str  # module path of the SE block, ``layer3.0.se``
    stage: int | None  # stage index from the injection plan (None without a plan)
    channels: int
    images: int  # images the statistics are computed over
    mean: float
    std: float  # over every image and channel
    min: float
    max: float
    image_std: float  # input dependence: mean over channels of the std across images
    near_one: float  # fraction of gates within tol of 1.0
    saturated: float  # fraction of gates within tol of the gate's bounds
    class_std: float | None = None  # class dependence: mean over channels of the std of class means
    class_means: dict[int, list[float]] = field(default_factory=dict)  # class -> mean gate per channel

    def to_dict(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["class_means"] = {str(k): v for k, v in self.class_means.items()}
        return data


def _gates(block: SEBlock, x: torch.Tensor) -> torch.Tensor:
    """[B, C] gates of ``block`` for its input ``x`` (the same arithmetic as its forward)."""
    squeezed = _squeeze(x, block.channel_axis, block.pool_name, block.prefix_tokens, block.batch_axis)
    z = block.fc2(torch.relu(block.fc1(squeezed)))
    return GATES[block.gate_name][0](z)


def _split(batch: Any) -> tuple[Any, torch.Tensor | None]:
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], torch.Tensor):
        return batch[0], batch[1]
    return batch, None


def gate_statistics(model: nn.Module, batches: Iterable[Any], *, tol: float = 0.02) -> list[GateStats]:
    """Run ``model`` in eval mode on ``batches`` and summarise each SE block's gates.

    ``batches`` yields inputs, or ``(inputs, labels)`` pairs (then per-class statistics are
    added). The model's train/eval flags are restored afterwards and no gradient is recorded.

    Example:
        >>> stats = gate_statistics(model, [(x_test, y_test)])
        >>> [(s.name, round(s.mean, 3), round(s.near_one, 2)) for s in stats][:1]
        [('layer1.0.se', 1.0, 1.0)]
    """
    blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, SEBlock)]
    plan = getattr(model, PLAN_ATTR, None)
    stages = {site.name: site.stage for site in plan.sites} if plan is not None else {}
    recorded: dict[str, list[torch.Tensor]] = {name: [] for name, _ in blocks}
    labels: list[torch.Tensor] = []

    def hook(block: nn.Module, args: tuple[Any, ...], name: str) -> None:
        recorded[name].append(_gates(block, args[0]).float().cpu())

    handles = [b.register_forward_pre_hook(lambda m, a, name=name: hook(m, a, name)) for name, b in blocks]
    try:
        # A measurement: train/eval flags and what the forwards cache on the modules are put back
        # (not the RNG state: the batches may draw on it as they are made). The user's hooks run:
        # these are the user's own batches.
        with preserved_state(model, rng=False, run_hooks=True), torch.no_grad():
            model.eval()
            for batch in batches:
                inputs, y = _split(batch)
                model(inputs)
                if y is not None:
                    labels.append(y.cpu())
    finally:
        for handle in handles:
            handle.remove()
    y_all = torch.cat(labels) if labels else None
    return [_summarise(name, block, stages.get(name), recorded[name], y_all, tol) for name, block in blocks]


def _summarise(
    name: str, block: SEBlock, stage: int | None, chunks: list[torch.Tensor], y: torch.Tensor | None, tol: float
) -> GateStats:
    g = torch.cat(chunks) if chunks else torch.empty(0, block.channels)
    if g.numel() == 0:
        raise ValueError(f"no gates recorded for {name}: were the batches empty?")
    low, high = GATE_RANGE.get(block.gate_name, (float("-inf"), float("inf")))
    image_std = g.std(0, unbiased=False).mean().item()
    class_std, class_means = None, {}
    if y is not None and len(y) == len(g):
        classes = y.unique().tolist()
        means = torch.stack([g[y == c].mean(0) for c in classes])
        class_means = {int(c): means[i].tolist() for i, c in enumerate(classes)}
        class_std = means.std(0, unbiased=False).mean().item()
    return GateStats(
        name=name,
        stage=stage,
        channels=block.channels,
        images=len(g),
        mean=g.mean().item(),
        std=g.std(unbiased=False).item(),
        min=g.min().item(),
        max=g.max().item(),
        image_std=image_std,
        near_one=((g - 1.0).abs() <= tol).float().mean().item(),
        saturated=(((g - low) <= tol) | ((high - g) <= tol)).float().mean().item(),
        class_std=class_std,
        class_means=class_means,
    )
