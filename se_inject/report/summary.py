"""The report of one injection: what was asked, the plan, the counts, what was written.

A :class:`Report` is frozen plain data built from a plan and the counts
(:func:`build_report`); :meth:`Report.to_dict` is what ``se-inject --json`` prints, so Python
users and the CLI read the same thing. It holds nothing that changes between runs (no times,
no absolute paths beyond those given), so the reports of two variants diff cleanly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..models.names import ModelSpec
from ..models.weights import WeightsInfo
from ..plan import Plan
from ..request import Selection
from .complexity import Complexity

__all__ = ["Report", "build_report", "stage_rows", "size_text"]


def size_text(spatial: Sequence[int]) -> str:
    """``(56, 56)`` -> ``"56x56"``; ``"-"`` for no spatial axes."""
    return "x".join(str(n) for n in spatial) if spatial else "-"


def _site_rows(plan: Plan, complexity: Complexity) -> list[dict[str, Any]]:
    costs = {c.name: c for c in complexity.se}
    rows = []
    for site in plan.sites:
        cost = costs.get(site.name)
        rows.append({
            "name": site.name,
            "kind": str(site.kind),
            "owner": site.owner,
            "node": site.node,
            "channels": site.channels,
            "hidden": site.hidden,
            "channel_axis": site.channel_axis,
            "stage": site.stage,
            "spatial": list(site.spatial),
            "prefix_tokens": site.prefix_tokens,
            "source": site.source,
            "targets": list(site.targets),
            # attached (a hook on the module ``attach`` names), placeholder, or rebuilt
            "mechanism": site.mechanism,
            "attach": site.attach,
            "params": site.added_params(plan.config.bias),
            "fc_macs": None if cost is None else cost.fc_macs,
            "pool_adds": None if cost is None else cost.pool_adds,
            "scale_muls": None if cost is None else cost.scale_muls,
        })
    return rows


def stage_rows(sites: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-stage totals of site rows (blocks, parameters, FC multiply-adds), in stage order."""
    stages: dict[int, dict[str, Any]] = {}
    for site in sites:
        row = stages.setdefault(
            site["stage"],
            {"stage": site["stage"], "spatial": site["spatial"], "sites": 0, "params": 0, "fc_macs": 0},
        )
        row["sites"] += 1
        row["params"] += site["params"]
        row["fc_macs"] = None if row["fc_macs"] is None or site["fc_macs"] is None else row["fc_macs"] + site["fc_macs"]
    return [stages[k] for k in sorted(stages)]


@dataclass(frozen=True)
class Report:
    """One injection (or dry run) of a registry model: the request, the plan, the counts, the files."""

    model: ModelSpec  # the model used (registry and name)
    requested: str  # the name as given ("resnet50", "torchvision:resnet50")
    weights: WeightsInfo  # the base weights used
    requested_weights: str  # "auto", "pretrained", "random" or the path given
    plan: Plan  # sites, skipped places, unanalysed modules, SE configuration
    complexity: Complexity  # parameters and multiply-adds before and after
    dry_run: bool = False  # True: nothing but the plot was written
    output: str | None = None  # the checkpoint written (None: none)
    replaced: bool = False  # the checkpoint replaced an existing file
    se_only: bool = False  # the checkpoint holds SE weights and the plan only
    plot: str | None = None  # the chart written, if any
    model_args: Mapping[str, Any] = field(default_factory=dict)  # the constructor's keyword arguments

    @property
    def selection(self) -> Selection:
        """The selection options given (the plan records its request)."""
        return self.plan.selection

    @property
    def sites(self) -> list[dict[str, Any]]:
        """One row per site, in graph order, with its parameters and per-image costs."""
        return _site_rows(self.plan, self.complexity)

    @property
    def by_stage(self) -> list[dict[str, Any]]:
        return stage_rows(self.sites)

    def to_dict(self) -> dict[str, Any]:
        """Plain data, stable order: what ``se-inject --json`` prints (with sorted keys)."""
        sites = self.sites
        return {
            "model": self.model.name,
            "source": str(self.model.source),
            "requested": self.requested,
            "model_args": _json_args(self.model_args),
            "weights": {**self.weights.to_dict(), "requested": self.requested_weights},
            "config": self.plan.config.to_dict(),
            "selection": self.selection.to_dict(),
            "sites": sites,
            "by_stage": stage_rows(sites),
            "skipped": [
                {"node": s.node, "reason": str(s.reason), "text": s.text, "detail": s.detail}
                for s in self.plan.skipped
            ],
            "unanalysed": [{"path": u.path, "reason": u.reason} for u in self.plan.unanalysed],
            "analysed_input": self.plan.input,
            **self.complexity.to_dict(),
            "dry_run": self.dry_run,
            "output": self.output,
            "replaced": self.replaced,
            "se_only": self.se_only,
            "plot": self.plot,
        }


def _json_args(args: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor arguments as JSON values (tuples as lists; anything else as its repr)."""

    def plain(value: Any) -> Any:
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        return repr(value)

    return {str(k): plain(v) for k, v in args.items()}


def build_report(
    spec: ModelSpec,
    weights: WeightsInfo,
    plan: Plan,
    complexity: Complexity,
    *,
    requested: str | None = None,
    requested_weights: str = "auto",
    dry_run: bool = False,
    output: str | None = None,
    replaced: bool = False,
    se_only: bool = False,
    plot: str | None = None,
    model_args: Mapping[str, Any] | None = None,
) -> Report:
    """The :class:`Report` of a plan and its counts.

    Example:
        >>> report = build_report(spec, info, plan, compare(before, after), requested="resnet50")
        >>> report.to_dict()["params"]["added"]
        2530992
    """
    return Report(
        model=spec,
        requested=str(spec) if requested is None else requested,
        weights=weights,
        requested_weights=requested_weights,
        plan=plan,
        complexity=complexity,
        dry_run=dry_run,
        output=None if dry_run else output,
        replaced=replaced and not dry_run,
        se_only=se_only,
        plot=plot,
        model_args=dict(model_args or {}),
    )
