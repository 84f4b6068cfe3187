"""A bar chart of an SE plan: blocks and added parameters per stage (``se-inject --plot``).

A stage is a run of SE sites at one feature-map resolution (:attr:`se_inject.Site.stage`), so
the chart shows where the paper's stage ablation would cut. Parameters are the SE blocks' own
(both FC layers, with their biases when the blocks have them); multiply-adds are not drawn.

matplotlib is imported inside :func:`plot_stages` only, so importing se-inject, or running the
CLI without ``--plot``, never loads it. The chart is drawn on an Agg canvas of its own (no
pyplot, no global backend change) and written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..io.atomic import atomic_write

__all__ = ["StageBar", "plot_stages"]


@dataclass(frozen=True)
class StageBar:
    """One stage of the chart: its index, feature-map size (``"56x56"``), SE blocks and parameters."""

    stage: int
    size: str
    blocks: int
    params: int


def _compact(n: float) -> str:
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def plot_stages(path: str | os.PathLike[str], stages: Sequence[StageBar], *, title: str, subtitle: str = "") -> Path:
    """Write a PNG with two bar charts, SE blocks per stage and added parameters per stage.

    The file is written under a temporary name next to ``path`` and moved into place, so a
    failure leaves an existing file as it was and no partial file.

    Example:
        >>> plot_stages("plan.png", [StageBar(0, "56x56", 3, 24_576)], title="resnet50")
        PosixPath('plan.png')

    Raises:
        ConfigError: matplotlib is not installed, or there is no stage to draw.
        OutputPathError: the file cannot be written.
    """
    if not stages:
        raise ConfigError("nothing to plot: the plan has no SE site")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter
    except ImportError as e:
        raise ConfigError(
            f"plotting needs matplotlib, which could not be imported ({e}); pip install matplotlib"
        ) from e

    labels = [f"{s.stage}\n{s.size}" for s in stages]
    xs = list(range(len(stages)))
    fig = Figure(figsize=(max(7.0, 1.1 * len(stages) + 4.0), 4.0), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    blocks_ax, params_ax = fig.subplots(1, 2)
    panels = (
        (blocks_ax, [s.blocks for s in stages], "SE blocks per stage", "#4c72b0", lambda n: f"{n:d}"),
        (params_ax, [s.params for s in stages], "added parameters per stage", "#dd8452", lambda n: f"{n:,}"),
    )
    for ax, values, name, colour, fmt in panels:
        bars = ax.bar(xs, values, color=colour, width=0.65)
        ax.bar_label(bars, labels=[fmt(v) for v in values], padding=2, fontsize=8)
        ax.set_title(name, fontsize=10)
        ax.set_xticks(xs, labels, fontsize=8)
        ax.set_xlabel("stage (feature-map size)", fontsize=9)
        ax.margins(y=0.15)
        ax.spines[["top", "right"]].set_visible(False)
    blocks_ax.yaxis.get_major_locator().set_params(integer=True)
    params_ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _compact(v)))
    fig.suptitle(title + (f"\n{subtitle}" if subtitle else ""), fontsize=10)
    return _write_png(fig, Path(path))


def _write_png(fig: object, file: Path) -> Path:
    return atomic_write(file, lambda handle: fig.savefig(handle, format="png"))  # type: ignore[attr-defined]
