"""The ``se-inject`` command: build a model, insert SE blocks, report, save.

``se-inject resnet50 --reduction 16 -o model.pt``

The report goes to stdout (a rich table grouped by stage, or JSON with ``--json``: sorted keys,
no timings, so two runs with the same options are byte-identical and two variants diff
cleanly); progress and warnings go to stderr. ``--plot`` draws SE blocks and parameters per
stage (:mod:`se_inject.plot`, imported only then).

Every error of ours (:class:`~se_inject.errors.SEInjectError`) and every bad command line is
caught in one place, :meth:`_Command.main`, and printed as one line on stderr with a non-zero
exit status (1 for our errors, 2 for usage errors) and no traceback.

This module parses options, calls :mod:`se_inject.zoo`, the public API,
:mod:`se_inject.complexity` and :mod:`se_inject.checkpoint`, and renders; it never touches the
graph.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperCommand

from . import __version__
from .api import apply_plan, find_sites
from .block import GATES, SEConfig
from .checkpoint import check_output_path, save
from .complexity import Complexity, compare, count
from .errors import ConfigError, NoSitesError, SEInjectError
from .plan import Plan, SiteKind, SkipReason
from .zoo import LoadedModel, Source, WeightsKind, default_input_size, load_model

__all__ = ["app", "main", "build_report", "parse_input_size"]

_ERROR_PREFIX = "se-inject: error:"

#: What would help, per reason every candidate was skipped for (shown when there is no site).
_HELP: dict[SkipReason, str] = {
    SkipReason.EXCLUDED: (
        "loosen --include/--exclude/--stage/--resolution (globs match module names such as 'layer1.*')"
    ),
    SkipReason.TOO_FEW_CHANNELS: "lower --min-channels",
    SkipReason.ALREADY_ATTENDED: "it already has channel attention; use a variant of the model without it",
    SkipReason.TOKEN_SEQUENCE: "add --tokens (SE over the token axis, class tokens left out of the squeeze)",
    SkipReason.NO_SPATIAL_CONV: "use --placement standard or pre (--placement inner needs a spatial convolution)",
}


def _usage_error_types() -> tuple[type[Exception], ...]:
    # typer >= 0.2x vendors click and raises typer.TyperException subclasses; older typer
    # raises click's own ClickException. Catch whichever exist.
    found: list[type[Exception]] = []
    if isinstance(getattr(typer, "TyperException", None), type):
        found.append(typer.TyperException)
    try:
        import click
    except ImportError:
        pass
    else:
        found.append(click.ClickException)
    return tuple(found)


_USAGE_ERRORS = _usage_error_types()


class _Command(TyperCommand):
    """The typer command, with every error printed as one line (the one place errors are caught)."""

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _USAGE_ERRORS as e:  # bad option values, missing MODEL, unknown options
            _error_line(e.format_message())  # type: ignore[attr-defined]
            code = int(getattr(e, "exit_code", 2))
        except SEInjectError as e:
            _error_line(str(e))
            code = 1
        except typer.Abort:
            _error_line("aborted")
            code = 1
        else:
            code = rv if isinstance(rv, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code


def _error_line(message: str) -> None:
    # Plain write, not rich: rich would wrap a long message over several lines at 80 columns.
    text = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    sys.stderr.write(f"{_ERROR_PREFIX} {text}\n")
    sys.stderr.flush()


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"se-inject {__version__}")
        raise typer.Exit(0)


app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _size_numbers(text: str, most: int) -> list[int]:
    parts = text.replace("x", ",").replace("X", ",").split(",")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        numbers = []
    if not numbers or any(n < 1 for n in numbers) or len(numbers) > most:
        raise ConfigError(
            f"bad --input-size {text!r}: give 224, 256x192 or C,H,W (positive integers, at most {most})"
        )
    return numbers


def parse_input_size(text: str | None, default: tuple[int, ...]) -> tuple[int, ...]:
    """``--input-size``: ``224`` (square), ``256x192`` / ``256,192`` (H, W) or ``3,224,224``.

    The numbers replace the trailing dimensions of ``default`` (channels first, no batch); one
    number sets both spatial sides.

    Example:
        >>> parse_input_size("256x192", (3, 224, 224))
        (3, 256, 192)

    Raises:
        ConfigError: not positive integers, or more numbers than ``default`` has dimensions.
    """
    if text is None:
        return default
    numbers = _size_numbers(text, len(default))
    if len(numbers) == 1 and len(default) >= 2:
        numbers = numbers * 2
    return (*default[: len(default) - len(numbers)], *numbers)


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


def _no_sites_message(name: str, plan: Plan, plain: bool = False) -> str:
    if not plan.skipped:
        why = "it has no residual additions or channel concatenations (a plain network such as VGG)"
        helps = (
            ["nothing: even --plain found no convolution followed by a non-linearity"]
            if plain
            else ["add --plain for the paper's placement in plain networks (SE after each convolution's non-linearity)"]
        )
    else:
        grouped = plan.skipped_by_reason()
        why = f"all {len(plan.skipped)} candidate places were skipped: " + ", ".join(
            f"{len(items)} {items[0].text}" for items in grouped.values()
        )
        helps = [_HELP[r] for r in grouped if r in _HELP] or ["see --dry-run --json for each skipped place's reason"]
    if plan.unanalysed:
        why += f"; could not analyse {', '.join(map(str, plan.unanalysed[:3]))}"
    return f"no SE site in {name}: {why}. What would help: {'; '.join(helps)}. Nothing was written."


@dataclass(frozen=True)
class _Selection:
    """Which sites to keep, as given on the command line (recorded in the report)."""

    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    min_channels: int = 0
    stages: tuple[int, ...] | None = None
    resolutions: tuple[int, ...] | None = None
    plain: bool = False
    tokens: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "include": None if self.include is None else list(self.include),
            "exclude": None if self.exclude is None else list(self.exclude),
            "min_channels": self.min_channels,
            "stages": None if self.stages is None else list(self.stages),
            "resolutions": None if self.resolutions is None else list(self.resolutions),
            "plain": self.plain,
            "tokens": self.tokens,
        }

    def options(self, *, staged: bool = True) -> dict[str, Any]:
        """Keyword arguments for ``find_sites``; without stage and resolution selection if not ``staged``."""
        return {
            "include": self.include,
            "exclude": self.exclude,
            "min_channels": self.min_channels,
            "stages": self.stages if staged else None,
            "resolutions": self.resolutions if staged else None,
            "plain": self.plain,
            "tokens": self.tokens,
        }


def _se_config(
    *,
    reduction: float | None,
    hidden: int | None,
    paper_init: bool,
    bias: bool,
    gate: str | None,
    pool: str,
    placement: str,
) -> SEConfig:
    """The SE configuration from the command line, with errors worded in its options."""
    if reduction is not None and hidden is not None:
        raise ConfigError(
            f"give --reduction or --hidden, not both (got --reduction {_number(reduction)} and --hidden {hidden}): "
            "--hidden fixes every block's width, --reduction makes it channels / r"
        )
    identity_init = not paper_init
    if gate is not None and gate in GATES and identity_init and not GATES[gate][1]:
        starts = ", ".join(name for name, (_, one) in GATES.items() if one)
        raise ConfigError(
            f"--gate {gate} is not 1 at z = 0, so the blocks cannot start as an identity: add --paper-init "
            f"(ordinary init; the model's outputs change at insertion) or use a gate that starts at 1: {starts}"
        )
    return SEConfig(
        reduction=16 if reduction is None else _number(reduction),
        hidden=hidden,
        bias=bias,
        gate=gate,
        pool=pool,
        identity_init=identity_init,
        placement=placement,
    )


def _size(spatial: Sequence[int]) -> str:
    return "x".join(str(n) for n in spatial) if spatial else "-"


def _check_selection(name: str, selection: _Selection, everything: Plan, input_size: Sequence[int]) -> None:
    """Refuse ``--stage`` / ``--resolution`` values that match no site of the unselected plan."""
    stages: dict[int, tuple[int, ...]] = {}
    for site in everything.sites:
        stages.setdefault(site.stage, site.spatial)
    at = f"at input {_size(input_size)}"
    unknown = sorted(set(selection.stages or ()) - set(stages))
    if unknown:
        known = ", ".join(f"{k} ({_size(v)})" for k, v in sorted(stages.items()))
        raise ConfigError(
            f"--stage {', '.join(map(str, unknown))}: {name} has {len(stages)} stages {at}: {known}"
        )
    sides = sorted({max(site.spatial, default=0) for site in everything.sites}, reverse=True)
    unknown = sorted(set(selection.resolutions or ()) - set(sides))
    if unknown:
        raise ConfigError(
            f"--resolution {', '.join(map(str, unknown))}: {name} has SE sites at resolutions "
            f"{', '.join(map(str, sides))} {at} (the largest side of each feature map; it follows --input-size)"
        )


def _by_stage(sites: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-stage totals of the report's sites, in stage order."""
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


def build_report(
    loaded: LoadedModel,
    plan: Plan,
    complexity: Complexity,
    *,
    requested: str,
    requested_weights: str,
    output: Path | None,
    se_only: bool,
    dry_run: bool,
    selection: _Selection | None = None,
    plot: Path | None = None,
) -> dict[str, Any]:
    """The machine-readable report (what ``--json`` prints, with sorted keys).

    Plain data in a stable order (sites in graph order, stages ascending) and nothing that
    changes between runs (no times, no absolute paths beyond those given), so reports of two
    variants can be diffed.
    """
    costs = {c.name: c for c in complexity.se}
    sites = []
    for site in plan.sites:
        cost = costs.get(site.name)
        sites.append({
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
            "params": site.added_params(plan.config.bias),
            "fc_macs": None if cost is None else cost.fc_macs,
            "pool_adds": None if cost is None else cost.pool_adds,
            "scale_muls": None if cost is None else cost.scale_muls,
        })
    return {
        "model": loaded.spec.name,
        "source": str(loaded.spec.source),
        "requested": requested,
        "weights": {**loaded.weights.to_dict(), "requested": requested_weights},
        "config": plan.config.to_dict(),
        "selection": (selection or _Selection()).to_dict(),
        "sites": sites,
        "by_stage": _by_stage(sites),
        "skipped": [
            {"node": s.node, "reason": str(s.reason), "text": s.text, "detail": s.detail} for s in plan.skipped
        ],
        "unanalysed": [{"path": u.path, "reason": u.reason} for u in plan.unanalysed],
        **complexity.to_dict(),
        "dry_run": dry_run,
        "output": None if output is None or dry_run else str(output),
        "se_only": se_only,
        "plot": None if plot is None else str(plot),
    }


def _fmt(n: int | None, sign: bool = False) -> str:
    if n is None:
        return "n/a"
    return f"{n:+,}" if sign else f"{n:,}"


def _si(n: int | None) -> str:
    if n is None:
        return "n/a"
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3f} {unit}"
    return str(n)


def _render(console: Console, report: dict[str, Any], plan: Plan, complexity: Complexity) -> None:
    cfg = plan.config
    source_note = "" if report["requested"].startswith(f"{report['source']}:") else f" (name found in {report['source']})"
    console.print(f"[bold]se-inject[/] {report['source']}:{report['model']}{source_note}")
    weights = report["weights"]
    style = "bold red" if weights["kind"] == WeightsKind.RANDOM and weights["requested"] != "random" else ""
    line = f"weights: [{style}]{weights['detail']}[/]" if style else f"weights: {weights['detail']}"
    console.print(line, soft_wrap=True)
    gate = f"{cfg.gate}" + (", identity start" if cfg.identity_init else ", paper init")
    width = f"fixed hidden width {cfg.hidden}" if cfg.hidden is not None else (
        f"reduction {_number(cfg.reduction)}, hidden >= {cfg.min_hidden}"
    )
    console.print(
        f"SE: {width}, {'with' if cfg.bias else 'no'} biases, gate {gate}, {cfg.pool} pool, "
        f"placement {cfg.placement}",
        soft_wrap=True,
    )
    chosen = _describe_selection(report["selection"])
    if chosen:
        console.print(f"selection: {chosen}", soft_wrap=True)

    # Grouped by stage: the stage and its feature-map size head each group, sections divide them.
    tokens = any(site["prefix_tokens"] for site in report["sites"])
    sites = Table(title=f"SE sites ({len(plan.sites)})", title_justify="left")
    sites.add_column("stage", justify="right")
    sites.add_column("size", justify="right")
    sites.add_column("module")
    sites.add_column("kind")
    for label in ("channels", "hidden", "axis", *(["prefix"] if tokens else []), "params"):
        sites.add_column(label, justify="right")
    last = None
    for site in sorted(report["sites"], key=lambda s: s["stage"]):
        first = site["stage"] != last
        if first and last is not None:
            sites.add_section()
        last = site["stage"]
        sites.add_row(
            str(site["stage"]) if first else "",
            _size(site["spatial"]) if first else "",
            site["name"], site["kind"], str(site["channels"]), str(site["hidden"]), str(site["channel_axis"]),
            *([str(site["prefix_tokens"])] if tokens else []),
            _fmt(site["params"]),
        )
    console.print(sites)

    added = sum(row["params"] for row in report["by_stage"])
    stages = Table(title="SE per stage", title_justify="left")
    stages.add_column("stage", justify="right")
    stages.add_column("size", justify="right")
    for label in ("blocks", "params", "% of SE params", "FC MACs"):
        stages.add_column(label, justify="right")
    for row in report["by_stage"]:
        stages.add_row(
            str(row["stage"]), _size(row["spatial"]), str(row["sites"]), _fmt(row["params"]),
            f"{100 * row['params'] / added:.1f}" if added else "n/a", _fmt(row["fc_macs"]),
        )
    console.print(stages)

    if not (plan.skipped or plan.unanalysed):
        console.print("skipped: none")
    else:
        skipped = Table(title=f"Skipped ({len(plan.skipped)})", title_justify="left")
        skipped.add_column("reason")
        skipped.add_column("count", justify="right")
        skipped.add_column("where")
        for items in plan.skipped_by_reason().values():
            nodes = [s.node for s in items]
            shown = ", ".join(nodes[:3]) + (f", ... (+{len(nodes) - 3})" if len(nodes) > 3 else "")
            skipped.add_row(items[0].text, str(len(items)), shown)
        if plan.unanalysed:
            skipped.add_row("could not be analysed", str(len(plan.unanalysed)), ", ".join(map(str, plan.unanalysed[:3])))
        console.print(skipped)

    size = "x".join(str(s) for s in complexity.input_size)
    totals = Table(title=f"Totals (one {size} input)", title_justify="left")
    totals.add_column("count")
    for label in ("before", "after", "added", "added %"):
        totals.add_column(label, justify="right")
    pct = complexity.macs_added_pct
    totals.add_row(
        "parameters",
        _fmt(complexity.params_before),
        _fmt(complexity.params_after),
        _fmt(complexity.params_added, sign=True),
        f"{complexity.params_added_pct:+.2f}",
    )
    totals.add_row(
        "multiply-adds (MACs)",
        _fmt(complexity.macs_before),
        _fmt(complexity.macs_after),
        _fmt(complexity.macs_added, sign=True),
        "n/a" if pct is None else f"{pct:+.3f}",
    )
    console.print(totals)
    console.print(
        f"  = {_si(complexity.params_before)} -> {_si(complexity.params_after)} parameters, "
        f"{_si(complexity.macs_before)} -> {_si(complexity.macs_after)} MACs"
    )

    ops = Table(title="SE blocks' own work per image", title_justify="left")
    ops.add_column("operation")
    ops.add_column("ops", justify="right")
    ops.add_column("in MACs above")
    ops.add_row("FC multiply-adds (fc1 + fc2)", _fmt(complexity.se_fc_macs), "yes")
    ops.add_row("squeeze: pooling additions", _fmt(complexity.se_pool_adds), "no")
    ops.add_row("scale: multiplications", _fmt(complexity.se_scale_muls), "no")
    console.print(ops)

    if report["dry_run"]:
        console.print("dry run: no model written" if report["plot"] else "dry run: nothing written")
    elif report["output"]:
        what = "SE weights + plan" if report["se_only"] else "full model + plan"
        console.print(f"wrote {report['output']} ({what})")
    if report["plot"]:
        console.print(f"wrote {report['plot']} (plot: SE blocks and parameters per stage)")


def _describe_selection(selection: dict[str, Any]) -> str:
    parts = []
    for key, label in (("stages", "stages"), ("resolutions", "resolutions"), ("include", "include"),
                       ("exclude", "exclude")):
        if selection[key] is not None:
            parts.append(f"{label} {', '.join(map(str, selection[key]))}")
    if selection["min_channels"]:
        parts.append(f"min channels {selection['min_channels']}")
    parts += [flag for flag in ("plain", "tokens") if selection[flag]]
    return "; ".join(parts)


@app.command(cls=_Command)
def inject(
    model: Annotated[
        str,
        typer.Argument(
            metavar="MODEL",
            help="timm:NAME, torchvision:NAME, or a bare NAME (timm first, then torchvision).",
            show_default=False,
        ),
    ],
    reduction: Annotated[
        float | None,
        typer.Option("--reduction", "-r", help="SE reduction ratio r (>= 1).  [default: 16]", show_default=False),
    ] = None,
    hidden: Annotated[
        int | None,
        typer.Option(min=1, help="Fixed SE hidden width for every block, instead of channels / r.",
                     show_default=False),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the injected model here (.pt).", show_default=False)
    ] = None,
    weights: Annotated[
        str,
        typer.Option(help="auto | pretrained | random | PATH to a state dict (.pt/.pth/.safetensors)."),
    ] = "auto",
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show the plan and projected totals; write no model.")
    ] = False,
    include: Annotated[
        list[str] | None, typer.Option(help="Only sites in modules matching this glob (repeatable).", show_default=False)
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option(help="No sites in modules matching this glob (repeatable).", show_default=False)
    ] = None,
    min_channels: Annotated[int, typer.Option(min=0, help="Skip sites with fewer channels.")] = 0,
    paper_init: Annotated[
        bool, typer.Option("--paper-init", help="Plain sigmoid gate, ordinary init (no identity start).")
    ] = False,
    no_bias: Annotated[bool, typer.Option("--no-bias", help="SE layers without biases.")] = False,
    gate: Annotated[
        str | None,
        typer.Option(
            help="Excitation gate: scaled_sigmoid or one_plus_tanh (identity start); sigmoid or tanh "
            "(the paper's, need --paper-init) [default: scaled_sigmoid, sigmoid with --paper-init].",
            show_default=False,
        ),
    ] = None,
    pool: Annotated[str, typer.Option(help="Squeeze: avg (the paper's) or max.")] = "avg",
    placement: Annotated[
        str,
        typer.Option(
            help="Where on a residual branch: standard (end, before the sum), pre (start, after the fork) "
            "or inner (after the last spatial conv). The paper's post and identity scale the trunk: refused.",
        ),
    ] = "standard",
    stage: Annotated[
        list[int] | None,
        typer.Option(min=0, help="Only sites in this stage (0 = first run of sites at one resolution; repeatable).",
                     show_default=False),
    ] = None,
    resolution: Annotated[
        list[int] | None,
        typer.Option(min=1, help="Only sites whose feature map's largest side is N at --input-size (repeatable).",
                     show_default=False),
    ] = None,
    plain: Annotated[
        bool, typer.Option("--plain", help="Plain networks (VGG, AlexNet): SE after each conv's non-linearity.")
    ] = False,
    tokens: Annotated[
        bool, typer.Option("--tokens", help="SE on transformer residual branches over the token axis [B, N, C].")
    ] = False,
    plot: Annotated[
        Path | None,
        typer.Option(help="Write a PNG bar chart of SE blocks and parameters per stage.", show_default=False),
    ] = None,
    input_size: Annotated[
        str | None,
        typer.Option(help="Input for analysis and MACs (--resolution sizes follow it): 224, 256x192 or 3,224,224 "
                     "(default: the model's).",
                     show_default=False),
    ] = None,
    se_only: Annotated[
        bool, typer.Option("--se-only", help="With -o: write only the SE weights and the plan (adapter file).")
    ] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Machine-readable report on stdout.")] = False,
    version: Annotated[
        bool | None,
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Show the version and exit."),
    ] = None,
) -> None:
    """Insert Squeeze-and-Excitation blocks into MODEL and report what was added."""
    err = Console(stderr=True, highlight=False)
    out = Console(highlight=False)

    def show_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        loud = "RANDOM" in str(message)
        text = f"[bold red]WARNING:[/] {message}" if loud else f"[yellow]warning:[/] {message}"
        err.print(text, soft_wrap=True)

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = show_warning
        config = _se_config(
            reduction=None if reduction is None else _number(reduction),
            hidden=hidden,
            paper_init=paper_init,
            bias=not no_bias,
            gate=gate,
            pool=pool,
            placement=placement,
        )
        selection = _Selection(
            include=tuple(include) if include else None,
            exclude=tuple(exclude) if exclude else None,
            min_channels=min_channels,
            stages=tuple(dict.fromkeys(stage)) if stage else None,
            resolutions=tuple(dict.fromkeys(resolution)) if resolution else None,
            plain=plain,
            tokens=tokens,
        )
        report, plan, complexity = _run(
            err,
            model=model,
            config=config,
            selection=selection,
            output=output,
            weights=weights,
            dry_run=dry_run,
            input_size=input_size,
            se_only=se_only,
            plot=plot,
        )
    if json_output:
        # Sorted keys, no timings: byte-identical for identical options, diffable across variants.
        typer.echo(json.dumps(report, indent=2, sort_keys=True))
    else:
        _render(out, report, plan, complexity)


def _run(
    err: Console,
    *,
    model: str,
    config: SEConfig,
    selection: _Selection,
    output: Path | None,
    weights: str,
    dry_run: bool,
    input_size: str | None,
    se_only: bool,
    plot: Path | None,
) -> tuple[dict[str, Any], Plan, Complexity]:
    # Check everything cheap before building anything (the SE configuration is checked already).
    if plot is not None:
        _check_plot_path(plot, output if not dry_run else None)
    if input_size is not None:
        _size_numbers(input_size, 5)  # the format; the count is checked against the model's size later
    if output is not None and not dry_run:
        check_output_path(output)
    elif output is not None:
        err.print("[yellow]warning:[/] --dry-run: --output is ignored, nothing is written")
    if se_only and output is None:
        err.print("[yellow]warning:[/] --se-only has no effect without --output")

    err.print(f"[dim]building {model} (weights: {weights})...[/]")
    loaded = load_model(model, weights)
    net = loaded.model
    spec = loaded.spec
    if spec.source is Source.TORCHVISION and not model.startswith("torchvision:"):
        err.print(f"[dim]'{model}' is not in timm; using torchvision's[/]")
    size = parse_input_size(input_size, default_input_size(spec, net))

    err.print(f"[dim]counting the base model at {'x'.join(map(str, size))}...[/]")
    before = count(net, size)
    err.print("[dim]analysing the graph...[/]")

    def analyse(staged: bool) -> Plan:
        return find_sites(
            net,
            config.reduction,
            identity_init=config.identity_init,
            bias=config.bias,
            min_hidden=config.min_hidden,
            hidden=config.hidden,
            gate=config.gate,
            pool=config.pool,
            placement=config.placement,
            **selection.options(staged=staged),
            example_input=torch.zeros(1, *size),
        )

    if selection.stages is not None or selection.resolutions is not None:
        # Stages are numbered over every site, so check the asked ones against the unselected plan.
        everything = analyse(staged=False)
        if not everything.sites:
            raise NoSitesError(_no_sites_message(str(spec), everything, selection.plain))
        _check_selection(str(spec), selection, everything, size)
    plan = analyse(staged=True)
    if not plan.sites:
        raise NoSitesError(_no_sites_message(str(spec), plan, selection.plain))
    if selection.plain and not any(site.kind is SiteKind.PLAIN for site in plan.sites):
        warnings.warn(
            f"--plain has no effect on {spec}: it has residual or concatenation sites, and the plain "
            "placement is only for networks without them",
            UserWarning,
            stacklevel=1,
        )
    # The dry run applies the plan to this in-memory copy too, so its totals are measured,
    # not estimated; it only writes nothing.
    net = apply_plan(net, plan)
    after = count(net, size)
    complexity = compare(before, after)
    if output is not None and not dry_run:
        err.print(f"[dim]writing {output}...[/]")
        save(net, output, se_only, plan=plan, origin=spec, weights=loaded.weights)
    report = build_report(
        loaded,
        plan,
        complexity,
        requested=model,
        requested_weights=weights,
        output=output,
        se_only=se_only,
        dry_run=dry_run,
        selection=selection,
        plot=plot,
    )
    if plot is not None:
        from .plot import StageBar, plot_stages

        err.print(f"[dim]plotting {plot}...[/]")
        cfg = plan.config
        width = f"hidden {cfg.hidden}" if cfg.hidden is not None else f"r={_number(cfg.reduction)}"
        plot_stages(
            plot,
            [StageBar(row["stage"], _size(row["spatial"]), row["sites"], row["params"]) for row in report["by_stage"]],
            title=f"se-inject {spec}: {len(plan.sites)} SE blocks, {complexity.params_added:+,} parameters",
            subtitle=f"placement {cfg.placement}, {width}, gate {cfg.gate}, {cfg.pool} pool, "
            f"{'with' if cfg.bias else 'no'} biases",
        )
    return report, plan, complexity


def _check_plot_path(plot: Path, output: Path | None) -> None:
    if plot.suffix.lower() != ".png":
        raise ConfigError(f"--plot {str(plot)!r}: the chart is a PNG; give a name ending in .png")
    if importlib.util.find_spec("matplotlib") is None:
        raise ConfigError(
            "--plot needs matplotlib, which is not installed: pip install matplotlib (or leave out --plot)"
        )
    if output is not None and plot.resolve() == output.resolve():
        raise ConfigError(f"--plot and --output name the same file {str(plot)!r}")
    check_output_path(plot)


def main() -> None:
    """Console-script entry point (``se-inject``)."""
    app()
