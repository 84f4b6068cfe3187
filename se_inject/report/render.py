"""The human report: rich tables of a :class:`~se_inject.report.summary.Report`, for the CLI's stdout.

Module and node names are never shortened: when the site table is wider than the screen (80
columns when piped), it switches to a compact layout (short headers, no vertical rules) so the
names keep their width; on a screen too narrow even for that, the least needed columns are left
out (with a line saying which) before any header or number would break, and names fold onto a
second line rather than end in an ellipsis. Numbers are right-aligned, one unit per column.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console
from rich.table import Table

from .summary import size_text

if TYPE_CHECKING:
    from .summary import Report

__all__ = ["render"]


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


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


def render(console: Console, report: Report) -> None:
    """Print the whole report: header, sites by stage, per-stage totals, skipped, totals, SE work, files."""
    _header(console, report)
    _sites(console, report)
    _stages(console, report)
    _skipped(console, report)
    _totals(console, report)
    _closing(console, report)


def _header(console: Console, report: Report) -> None:
    cfg = report.plan.config
    source = str(report.model.source)
    given = report.requested.startswith(f"{source}:") or report.requested == str(report.model)  # hf-hub:...
    note = "" if given else f" (name found in {source})"
    console.print(f"[bold]se-inject[/] {report.model}{note}")
    if report.model_args:
        from ..models.arguments import args_text

        console.print(f"model arguments: {args_text(report.model_args)}", soft_wrap=True, markup=False)
    weights = report.weights
    loud = str(weights.kind) == "random" and report.requested_weights != "random"
    console.print(f"weights: [bold red]{weights.detail}[/]" if loud else f"weights: {weights.detail}", soft_wrap=True)
    gate = f"{cfg.gate}" + (", identity start" if cfg.identity_init else ", paper init")
    width = f"fixed hidden width {cfg.hidden}" if cfg.hidden is not None else (
        f"reduction {_number(cfg.reduction)}, hidden >= {cfg.min_hidden}"
    )
    console.print(
        f"SE: {width}, {'with' if cfg.bias else 'no'} biases, gate {gate}, {cfg.pool} pool, placement {cfg.placement}",
        soft_wrap=True,
    )
    chosen = _describe_selection(report.selection.to_dict())
    if chosen:
        console.print(f"selection: {chosen}", soft_wrap=True)
    capped = _capped(report)
    if capped:
        console.print(capped, soft_wrap=True)


def _capped(report: Report) -> str | None:
    """The note for a fixed hidden width wider than some sites: those blocks get their channel count."""
    hidden = report.plan.config.hidden
    sites = report.plan.sites
    capped = [s for s in sites if hidden is not None and s.hidden < hidden]
    if not capped:
        return None
    widths = ", ".join(str(w) for w in sorted({s.hidden for s in capped}))
    return (f"note: --hidden {hidden} is more than the channels of {len(capped)} of {len(sites)} sites; "
            f"their hidden width is capped at the channel count ({widths})")


def _sites(console: Console, report: Report) -> None:
    rows = report.sites
    if not rows:
        console.print("SE sites (0): none (see the skipped places below)")
        return
    table = _site_table(rows, compact=False)
    natural = console.measure(table, options=console.options.update_width(10_000)).maximum
    dropped: tuple[str, ...] = ()
    if natural > console.width:  # narrow screen: give way around the names
        dropped = _dropped_columns(rows, console.width)
        table = _site_table(rows, compact=True, drop=dropped)
    console.print(table)
    if dropped:
        console.print(f"(left out at this width: {', '.join(dropped)}; --json has every column)")
    console.print(_mechanisms(rows))


def _mechanisms(rows: list[dict[str, Any]]) -> str:
    """How the SE blocks get in: ``how: 15 attached (the blocks' code untouched), 1 rebuilt (checked)``."""
    counts = {m: sum(1 for site in rows if site["mechanism"] == m) for m in ("attached", "placeholder", "rebuilt")}
    notes = {"attached": "attached to a module's output", "placeholder": "filling their blocks' empty placeholders",
             "rebuilt": "rebuilt and checked"}
    parts = [f"{n} {notes[m]}" for m, n in counts.items() if n]
    names = [site["name"] for site in rows if site["mechanism"] == "rebuilt"]
    shown = f" ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})" if names and counts["rebuilt"] < len(rows) else ""
    return f"how: {', '.join(parts)}{shown}"


#: Column headers, full and compact (a narrow terminal or pipe: the names keep their width).
_SITE_HEADERS = {
    False: ("stage", "size", "module", "kind", "channels", "hidden", "axis", "prefix", "params"),
    True: ("st", "size", "module", "kind", "C", "hid", "ax", "pre", "params"),
}

#: Compact columns left out, in this order, when even the compact table would break a header.
_DROP_ORDER = ("ax", "pre", "kind", "hid", "size")

#: The module column's width below which columns are dropped rather than the names folded further.
_MIN_MODULE = 16


def _cells(site: dict[str, Any], first: bool) -> dict[str, str]:
    """One site's compact cells, by header."""
    return {
        "st": str(site["stage"]) if first else "",
        "size": size_text(site["spatial"]) if first else "",
        "module": site["name"],
        "kind": site["kind"],
        "C": str(site["channels"]),
        "hid": str(site["hidden"]),
        "ax": str(site["channel_axis"]),
        "pre": str(site["prefix_tokens"]),
        "params": _fmt(site["params"]),
    }


def _dropped_columns(rows: list[dict[str, Any]], width: int) -> tuple[str, ...]:
    """The compact columns to leave out so that every header and number keeps its width and
    the names get at least ``_MIN_MODULE`` columns (or their own width, when shorter)."""
    tokens = any(site["prefix_tokens"] for site in rows)
    headers = [h for h in _SITE_HEADERS[True] if h != "pre" or tokens]
    cells = [_cells(site, True) for site in rows]
    need = {h: max(len(h), *(len(c[h]) for c in cells)) for h in headers}
    def fits(shown: list[str], module: int) -> bool:
        # compact layout: a space on each side of a column's cells, one rule character between columns
        return sum(module if h == "module" else need[h] for h in shown) + 3 * (len(shown) - 1) + 2 <= width

    # Names whole, at the cost of the least needed columns (the axis, the prefix-token count) ...
    if fits(headers, need["module"]):
        return ()
    few = [h for h in headers if h not in ("ax", "pre")]
    if fits(few, need["module"]):
        dropped = [h for h in ("ax", "pre") if h in headers]
        if len(dropped) == 2 and fits([h for h in headers if h != "pre"], need["module"]):
            dropped = ["pre"]
        return tuple(dropped)
    headers_left, dropped = list(headers), []
    # ... else names folded onto a second line, down to _MIN_MODULE, before any header breaks.
    module = min(need["module"], _MIN_MODULE)
    for candidate in (None, *_DROP_ORDER):
        if candidate is not None and candidate in headers_left:
            dropped.append(candidate)
            headers_left.remove(candidate)
        if fits(headers_left, module):
            break
    return tuple(dropped)


def _site_table(rows: list[dict[str, Any]], *, compact: bool, drop: tuple[str, ...] = ()) -> Table:
    """Sites grouped by stage (the stage and its feature-map size head each group).

    Compact: short headers, no vertical rules, one space between columns; headers and numbers
    never wrap (columns in ``drop`` are left out instead). Names fold onto a second line only
    if even that does not fit; they are never cut.
    """
    labels = dict(zip(_SITE_HEADERS[True], _SITE_HEADERS[compact], strict=True))
    tokens = any(site["prefix_tokens"] for site in rows)
    shown = [h for h in _SITE_HEADERS[True] if h not in drop and (h != "pre" or tokens)]
    style = {"box": box.SIMPLE_HEAD, "padding": (0, 1), "pad_edge": False} if compact else {}
    table = Table(title=f"SE sites ({len(rows)})", title_justify="left", **style)
    for key in shown:
        if key == "module":
            table.add_column(labels[key], overflow="fold")
        else:
            table.add_column(labels[key], justify="left" if key == "kind" else "right", no_wrap=compact)
    last = None
    for site in sorted(rows, key=lambda s: s["stage"]):
        first = site["stage"] != last
        if first and last is not None:
            table.add_section()
        last = site["stage"]
        cells = _cells(site, first)
        table.add_row(*(cells[key] for key in shown))
    return table


def _stages(console: Console, report: Report) -> None:
    rows = report.by_stage
    if not rows:
        return
    added = sum(row["params"] for row in rows)
    table = Table(title="SE per stage", title_justify="left")
    table.add_column("stage", justify="right")
    table.add_column("size", justify="right")
    for label in ("blocks", "params", "% of SE params", "FC MACs"):
        table.add_column(label, justify="right")
    for row in rows:
        table.add_row(
            str(row["stage"]), size_text(row["spatial"]), str(row["sites"]), _fmt(row["params"]),
            f"{100 * row['params'] / added:.1f}" if added else "n/a", _fmt(row["fc_macs"]),
        )
    console.print(table)


def _skipped(console: Console, report: Report) -> None:
    plan = report.plan
    if not (plan.skipped or plan.unanalysed):
        console.print("skipped: none")
        return
    table = Table(title=f"Skipped ({len(plan.skipped)})", title_justify="left")
    table.add_column("reason", ratio=1, overflow="fold")
    table.add_column("count", justify="right")
    shown_rows: list[tuple[str, str, str]] = []
    for items in plan.skipped_by_reason().values():
        nodes = [s.node for s in items]
        shown = ", ".join(nodes[:3]) + (f", ... (+{len(nodes) - 3})" if len(nodes) > 3 else "")
        shown_rows.append((items[0].text, str(len(items)), shown))
    for module in plan.unanalysed:  # each with why (nothing silently missed)
        shown_rows.append(("could not be analysed", "1", str(module)))
    # "where" lists node names: it may wrap between names, and folds a name only if one is wider than the screen.
    table.add_column("where", ratio=2, overflow="fold")
    for row in shown_rows:
        table.add_row(*row)
    console.print(table)


def _totals(console: Console, report: Report) -> None:
    complexity = report.complexity
    table = Table(title=f"Totals (one {size_text(complexity.input_size)} input)", title_justify="left")
    table.add_column("count")
    for label in ("before", "after", "added", "added %"):
        table.add_column(label, justify="right")
    pct = complexity.macs_added_pct
    table.add_row(
        "parameters", _fmt(complexity.params_before), _fmt(complexity.params_after),
        _fmt(complexity.params_added, sign=True), f"{complexity.params_added_pct:+.2f}",
    )
    table.add_row(
        "multiply-adds (MACs)", _fmt(complexity.macs_before), _fmt(complexity.macs_after),
        _fmt(complexity.macs_added, sign=True), "n/a" if pct is None else f"{pct:+.3f}",
    )
    console.print(table)
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


def _closing(console: Console, report: Report) -> None:
    """The last lines: what was written, what was replaced, or that nothing was."""
    if report.dry_run:
        console.print("dry run: no model written" if report.plot else "dry run: nothing written")
    elif report.output:
        what = "SE weights + plan" if report.se_only else "full model + plan"
        replaced = "; replaced the existing file" if report.replaced else ""
        console.print(f"wrote {report.output} ({what}{replaced})", soft_wrap=True)
    else:
        console.print("no model written: give -o FILE.pt to save it (or --dry-run to only plan)")
    if report.plot:
        console.print(f"wrote {report.plot} (plot: SE blocks and parameters per stage)", soft_wrap=True)
    if str(report.weights.kind) == "random" and report.requested_weights != "random":
        # Said at the top too; repeated last, where a reader of a long report looks.
        console.print(f"[bold red]WARNING:[/] the base model has RANDOM weights: {report.weights.detail}",
                      soft_wrap=True)


def _describe_selection(selection: dict[str, Any]) -> str:
    parts = []
    for key in ("stages", "resolutions", "include", "exclude"):
        if selection[key] is not None:
            parts.append(f"{key} {', '.join(map(str, selection[key]))}")
    if selection["min_channels"]:
        parts.append(f"min channels {selection['min_channels']}")
    parts += [flag for flag in ("plain", "tokens") if selection[flag]]
    return "; ".join(parts)
