"""The ``se-inject`` command: options in, a rendered report out.

``se-inject resnet50 --reduction 16 -o model.pt``

The work is :func:`se_inject.workflow.inject_named`, which returns a
:class:`~se_inject.report.summary.Report`; this module parses options, calls it and renders the report
(a table grouped by stage, or ``--json``: the report's ``to_dict`` with sorted keys, no timings,
so two runs with the same options are byte-identical). torch, timm and torchvision are imported
only once a model is asked for, so ``--help`` and ``--version`` answer at once.

Errors are caught in one place, :meth:`_Command.main`, and printed as one line on stderr with no
traceback. Exit status: 2 for a bad command line (a bad option value, with the flag's name, or
options that do not go together), 1 when the work fails (model, weights, files, a model with no
site), 130 on an interrupt. Progress lines go to stderr only when it is a terminal, so a script
capturing stderr gets warnings and the error line alone; the report goes to stdout.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperCommand

from . import __version__
from .errors import ConfigError, NoSitesError, SEInjectError

if TYPE_CHECKING:
    from rich.console import Console

    from .plan import Plan
    from .report.summary import Report
    from .request import SEConfig

__all__ = ["app", "main", "parse_input_size", "GATE_CHOICES", "POOL_CHOICES", "PLACEMENT_CHOICES"]

_ERROR_PREFIX = "se-inject: error:"

#: The choices ``--help`` lists (the library's registries, which a test keeps in step; written
#: out here so that ``--help`` needs no torch).
GATE_CHOICES = ("scaled_sigmoid", "one_plus_tanh", "sigmoid", "tanh")
POOL_CHOICES = ("avg", "max")
PLACEMENT_CHOICES = ("standard", "pre", "inner")

#: What would help, per skip reason (its value) every candidate was skipped for (shown when there is no site).
_HELP: dict[str, str] = {
    "excluded": "loosen --include/--exclude/--stage/--resolution (globs match module names such as 'layer1.*')",
    "too-few-channels": "lower --min-channels",
    "already-attended": "it already has channel attention; use a variant of the model without it",
    "token-sequence": "add --tokens (SE over the token axis, class tokens left out of the squeeze)",
    "no-spatial-conv": "use --placement standard or pre (--placement inner needs a spatial convolution)",
    "linear-block": "add --plain (SE after each re-parameterisable block, outside it, so deploy-time fusion still works)",
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
        from .io.atomic import Terminated, terminate_as_interrupt

        self._interrupted_while = ""
        self._terminated = False
        try:
            with terminate_as_interrupt():  # SIGTERM (timeout, schedulers) is handled as Ctrl-C
                rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _USAGE_ERRORS as e:  # bad option values, missing MODEL, unknown options
            _error_line(e.format_message())  # type: ignore[attr-defined]
            code = int(getattr(e, "exit_code", 2))
        except SEInjectError as e:
            _error_line(str(e))
            code = 1
        except (KeyboardInterrupt, typer.Abort) as e:
            self._terminated = self._terminated or isinstance(e, Terminated)
            _error_line(self._interrupt_line())
            code = 143 if self._terminated else 130
        else:
            code = rv if isinstance(rv, int) else 0
            if code == 130:  # typer turns an interrupt into a silent exit code 130
                _error_line(self._interrupt_line())
                code = 143 if self._terminated else 130
        if standalone_mode:
            sys.exit(code)
        return code


    def invoke(self, ctx: Any) -> Any:
        # typer turns KeyboardInterrupt into a bare exit code; keep what it said (for example
        # that an interrupted write left the old file unchanged) for the error line.
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as e:
            self._interrupted_while = str(e)
            from .io.atomic import Terminated

            self._terminated = isinstance(e, Terminated)
            raise

    def _interrupt_line(self) -> str:
        detail = getattr(self, "_interrupted_while", "")
        what = "terminated (SIGTERM)" if getattr(self, "_terminated", False) else "interrupted"
        return f"{what}: {detail}" if detail else what


def _error_line(message: str) -> None:
    # Plain write, not rich: rich would wrap a long message over several lines at 80 columns.
    text = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    sys.stderr.write(f"{_ERROR_PREFIX} {text}\n")
    sys.stderr.flush()


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"se-inject {__version__}")
        raise typer.Exit(0)


def _list_callback(pattern: str | None) -> None:
    if pattern is not None:
        from .models.listing import list_names, listing_lines

        for line in listing_lines(list_names(pattern)):  # UnknownModelError: one line, exit 1
            typer.echo(line)
        raise typer.Exit(0)


app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


# --- option values: checked by click callbacks, so a bad one is exit 2 with the flag's name ---


def parse_input_size(text: str) -> tuple[int, ...]:
    """``--input-size``: ``224`` (square), ``256x192`` / ``256,192`` (H, W) or ``3,224,224``.

    Example:
        >>> parse_input_size("256x192")
        (256, 192)

    Raises:
        ConfigError: not 1 to 5 positive integers.
    """
    parts = text.replace("x", ",").replace("X", ",").split(",")
    try:
        numbers = tuple(int(p) for p in parts)
    except ValueError:
        numbers = ()
    if not numbers or any(n < 1 for n in numbers) or len(numbers) > 5:
        raise ConfigError(f"bad --input-size {text!r}: give 224, 256x192 or C,H,W (positive integers)")
    return numbers


def _input_size(value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        numbers = parse_input_size(value)
    except ConfigError:
        raise typer.BadParameter(f"{value!r}: give 224, 256x192 or C,H,W (positive integers)") from None
    from .workflow import MAX_SIDE

    sides = numbers[1:] if len(numbers) >= 3 else numbers  # C,H,W: the first number is the channels
    if max(sides) > MAX_SIDE:
        raise typer.BadParameter(f"{value!r}: at most {MAX_SIDE} pixels a side (analysis runs at this size)")
    return numbers


def _reduction(value: float | None) -> float | int | None:
    if value is None:
        return None
    if not math.isfinite(value) or value < 1:
        raise typer.BadParameter(f"must be a number >= 1 (the paper's r), got {_number(value)}")
    return _number(value)


def _choice(choices: tuple[str, ...]) -> Callable[[str | None], str | None]:
    def check(value: str | None) -> str | None:
        if value is None or value in choices:
            return value
        if choices is PLACEMENT_CHOICES:
            from .se_block import TRUNK_PLACEMENTS

            if value in TRUNK_PLACEMENTS:
                raise typer.BadParameter(
                    f"{value!r} scales the trunk ({TRUNK_PLACEMENTS[value]}); se-inject only scales residual "
                    f"branches, where the paper finds SE robust. Use one of: {', '.join(choices)}"
                )
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(choices)}")

    return check


def _globs(values: list[str] | None) -> list[str] | None:
    """``--include`` / ``--exclude``: an empty glob matches nothing and is a bad command line."""
    if values and any(not v.strip() for v in values):
        raise typer.BadParameter("an empty glob matches no module; give a module-name glob such as 'layer4.*'")
    return values


def _model_args(values: list[str] | None) -> list[tuple[str, Any]] | None:
    """``--model-arg KEY=VALUE``: the value as a Python literal, else the plain string."""
    if not values:
        return None
    from .models.arguments import parse_model_arg

    try:
        return [parse_model_arg(v) for v in values]
    except ConfigError as e:
        raise typer.BadParameter(str(e)) from None


def _drop_path(value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and 0 <= value < 1):
        raise typer.BadParameter(f"must be a rate in [0, 1), got {_number(value)}")
    return value


def _creation_args(named: dict[str, tuple[str, Any]], given: list[tuple[str, Any]] | None) -> dict[str, Any]:
    """The model constructor's kwargs from the named options (``flag -> (key, value)``) and
    ``--model-arg``; a key given twice is a bad command line."""
    args: dict[str, Any] = {}
    flags: dict[str, str] = {}
    for flag, (key, value) in named.items():
        if value is not None:
            args[key], flags[key] = value, flag
    for key, value in given or []:
        if key in flags:
            raise typer.BadParameter(f"{key} is given twice ({flags[key]} and --model-arg {key}=...); give it once",
                                     param_hint="'--model-arg'")
        args[key], flags[key] = value, "--model-arg"
    return args


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


def _se_config(*, reduction: float | None, hidden: int | None, paper_init: bool, bias: bool, gate: str | None,
               pool: str, placement: str) -> SEConfig:
    """The SE configuration; options that do not go together are usage errors (exit 2)."""
    from .request import SEConfig
    from .se_block import GATES

    if reduction is not None and hidden is not None:
        raise typer.BadParameter(
            f"give one, not both (got --reduction {_number(reduction)} and --hidden {hidden}): "
            "--hidden fixes every block's width, --reduction makes it channels / r",
            param_hint="'--reduction' / '--hidden'",
        )
    if gate is not None and paper_init is False and not GATES[gate][1]:
        starts = ", ".join(name for name, (_, one) in GATES.items() if one)
        raise typer.BadParameter(
            f"{gate} is not 1 at z = 0, so the blocks cannot start as an identity: add --paper-init "
            f"(ordinary init; the model's outputs change at insertion) or use a gate that starts at 1: {starts}",
            param_hint="'--gate'",
        )
    return SEConfig(reduction=16 if reduction is None else reduction, hidden=hidden, bias=bias, gate=gate, pool=pool,
                    identity_init=not paper_init, placement=placement)


def _check_plot_path(plot: Path, output: Path | None) -> None:
    from .io.checkpoint import check_output_path

    if plot.suffix.lower() != ".png":
        raise typer.BadParameter(f"{str(plot)!r}: the chart is a PNG; give a name ending in .png", param_hint="'--plot'")
    if output is not None and plot.resolve() == output.resolve():
        raise typer.BadParameter(f"--plot and --output name the same file {str(plot)!r}", param_hint="'--plot'")
    if importlib.util.find_spec("matplotlib") is None:
        raise ConfigError("--plot needs matplotlib, which is not installed: pip install matplotlib (or leave out --plot)")
    check_output_path(plot)


# --- the command ---------------------------------------------------------------------------


@app.command(cls=_Command)
def inject(
    model: Annotated[str, typer.Argument(
        metavar="MODEL", help="timm:NAME, torchvision:NAME, or a bare NAME (timm first, then torchvision).",
        show_default=False)],
    reduction: Annotated[float | None, typer.Option(
        "--reduction", "-r", metavar="R", callback=_reduction,
        help="SE reduction ratio r (>= 1): hidden width max(channels // r, 8).  [default: 16]",
        show_default=False)] = None,
    hidden: Annotated[int | None, typer.Option(
        min=1, metavar="N", help="Fixed SE hidden width for every block, instead of channels / r.",
        show_default=False)] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", metavar="FILE.pt", help="Write the injected model here (replaces an existing file).",
        show_default=False)] = None,
    weights: Annotated[str, typer.Option(
        metavar="WEIGHTS", help="auto | pretrained | random | PATH to a state dict (.pt/.pth/.safetensors).")] = "auto",
    num_classes: Annotated[int | None, typer.Option(
        min=0, metavar="N", show_default=False,
        help="Model argument num_classes (0: no classifier, timm).")] = None,
    drop_path: Annotated[float | None, typer.Option(
        "--drop-path", metavar="R", callback=_drop_path, show_default=False,
        help="Model argument drop_path_rate (timm's stochastic depth).")] = None,
    in_chans: Annotated[int | None, typer.Option(
        min=1, metavar="C", show_default=False,
        help="Model argument in_chans, input channels (timm); the analysis input follows.")] = None,
    model_arg: Annotated[list[str] | None, typer.Option(
        "--model-arg", metavar="KEY=VALUE", callback=_model_args, show_default=False,
        help="Keyword argument for the model's constructor (timm.create_model, a torchvision builder); VALUE is "
        "read as a Python literal, else as a string. Repeat for several. Recorded in the checkpoint.")] = None,
    weights_ema: Annotated[bool, typer.Option(
        "--weights-ema", help="With --weights PATH: a training checkpoint's EMA weights (state_dict_ema).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the plan and projected totals; write no model.")] = False,
    include: Annotated[list[str] | None, typer.Option(
        metavar="GLOB", callback=_globs, help="Only sites in modules matching GLOB; repeat for several.", show_default=False)] = None,
    exclude: Annotated[list[str] | None, typer.Option(
        metavar="GLOB", callback=_globs, help="No sites in modules matching GLOB; repeat for several.", show_default=False)] = None,
    min_channels: Annotated[int, typer.Option(min=0, metavar="N", help="Skip sites with fewer channels.")] = 0,
    paper_init: Annotated[bool, typer.Option(
        "--paper-init", help="Plain sigmoid gate, ordinary init (no identity start).")] = False,
    no_bias: Annotated[bool, typer.Option("--no-bias", help="SE layers without biases.")] = False,
    gate: Annotated[str | None, typer.Option(
        metavar="[" + "|".join(GATE_CHOICES) + "]", callback=_choice(GATE_CHOICES), show_default=False,
        help="Excitation gate: scaled_sigmoid or one_plus_tanh start at 1; sigmoid and tanh (the paper's) "
        "need --paper-init.  [default: scaled_sigmoid, sigmoid with --paper-init]")] = None,
    pool: Annotated[str, typer.Option(
        metavar="[" + "|".join(POOL_CHOICES) + "]", callback=_choice(POOL_CHOICES),
        help="Squeeze: avg (the paper's) or max.")] = "avg",
    placement: Annotated[str, typer.Option(
        metavar="[" + "|".join(PLACEMENT_CHOICES) + "]", callback=_choice(PLACEMENT_CHOICES),
        help="Where on a residual branch: standard (end, before the sum), pre (start, after the fork) or inner "
        "(after the last spatial conv). The paper's post and identity scale the trunk: refused.")] = "standard",
    stage: Annotated[list[int] | None, typer.Option(
        min=0, metavar="N", show_default=False,
        help="Only sites in stage N (0 = first run of sites at one resolution); repeat for several.")] = None,
    resolution: Annotated[list[int] | None, typer.Option(
        min=1, metavar="N", show_default=False,
        help="Only sites whose feature map's largest side is N at --input-size; repeat for several.")] = None,
    plain: Annotated[bool, typer.Option(
        "--plain", help="Plain networks (VGG, AlexNet): SE after each conv's non-linearity.")] = False,
    tokens: Annotated[bool, typer.Option(
        "--tokens", help="SE on transformer residual branches over the token axis [B, N, C].")] = False,
    plot: Annotated[Path | None, typer.Option(
        metavar="FILE.png", help="Write a PNG bar chart of SE blocks and parameters per stage.",
        show_default=False)] = None,
    input_size: Annotated[str | None, typer.Option(
        metavar="SIZE", callback=_input_size, show_default=False,
        help="Input for analysis and MACs (--resolution sizes follow it): 224, 256x192 or 3,224,224 "
        "(default: the model's).")] = None,
    se_only: Annotated[bool, typer.Option(
        "--se-only", help="With -o: write only the SE weights and the plan (adapter file).")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Machine-readable report on stdout.")] = False,
    version: Annotated[bool | None, typer.Option(
        "--version", callback=_version_callback, is_eager=True, help="Show the version and exit.")] = None,
    list_pattern: Annotated[str | None, typer.Option(
        "--list", metavar="PATTERN", callback=_list_callback, is_eager=True, show_default=False,
        help="List timm and torchvision model names matching PATTERN (a glob, any case; 'resnet50.*' lists "
        "timm's tags), with how many pretrained weights each has, and exit. Builds no model.")] = None,
) -> None:
    """Insert Squeeze-and-Excitation blocks into MODEL and report what was added."""
    from rich.console import Console

    err = Console(stderr=True, highlight=False)
    config = _se_config(reduction=reduction, hidden=hidden, paper_init=paper_init, bias=not no_bias, gate=gate,
                        pool=pool, placement=placement)
    if weights_ema and weights in ("auto", "pretrained", "random"):
        raise typer.BadParameter(f"EMA weights come from a checkpoint file: give --weights PATH, not {weights!r}",
                                 param_hint="'--weights-ema'")
    if plot is not None:
        _check_plot_path(plot, output if not dry_run else None)
    if output is not None and dry_run:
        err.print("[yellow]warning:[/] --dry-run: --output is ignored, nothing is written")
    if se_only and output is None:
        err.print("[yellow]warning:[/] --se-only has no effect without --output")
    model_args = _creation_args({"--num-classes": ("num_classes", num_classes),
                                 "--drop-path": ("drop_path_rate", drop_path),
                                 "--in-chans": ("in_chans", in_chans)}, model_arg)  # type: ignore[arg-type]
    from .request import Selection

    selection = Selection(
        include=tuple(include) if include else None,
        exclude=tuple(exclude) if exclude else None,
        min_channels=min_channels,
        stages=tuple(dict.fromkeys(stage)) if stage else None,
        resolutions=tuple(dict.fromkeys(resolution)) if resolution else None,
        plain=plain,
        tokens=tokens,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = _warning_printer(err)
        report = _run(err, model, weights=weights, config=config, selection=selection,
                      input_size=input_size, output=output, se_only=se_only, dry_run=dry_run,
                      weights_ema=weights_ema, model_args=model_args)
    if plot is not None:
        report = _draw(err, report, plot)
    if json_output:
        # Sorted keys, no timings: byte-identical for identical options, diffable across variants.
        typer.echo(json.dumps(report.to_dict(), indent=2, sort_keys=True))
    else:
        from .report import render

        render.render(Console(highlight=False), report)


def _warning_printer(err: Console) -> Callable[..., None]:
    def show(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        loud = "RANDOM" in str(message)
        err.print(f"[bold red]WARNING:[/] {message}" if loud else f"[yellow]warning:[/] {message}", soft_wrap=True)

    return show


def _run(err: Console, model: str, **options: Any) -> Report:
    from .errors import ModelArgsError
    from .workflow import inject_named

    def progress(text: str) -> None:
        if err.is_terminal:  # a captured stderr gets warnings and the error line only
            err.print(f"[dim]{text}[/]")

    try:
        return inject_named(model, progress=progress, **options).report
    except ModelArgsError as e:  # a key or value the model's constructor refuses: a bad command line
        raise typer.BadParameter(str(e), param_hint=_args_hint(options["model_args"])) from None
    except NoSitesError as e:
        if e.plan is None:
            raise
        selection = options["selection"]
        raise NoSitesError(_no_sites_message(model, e.plan, selection.plain, selection), e.plan) from None


def _args_hint(args: dict[str, Any]) -> str:
    flags = {"num_classes": "--num-classes", "drop_path_rate": "--drop-path", "in_chans": "--in-chans"}
    used = dict.fromkeys(flags.get(key, "--model-arg") for key in args)
    return " / ".join(f"'{flag}'" for flag in used) or "'--model-arg'"


def _draw(err: Console, report: Report, plot: Path) -> Report:
    from .report.plot import StageBar, plot_stages
    from .report.summary import size_text

    cfg = report.plan.config
    width = f"hidden {cfg.hidden}" if cfg.hidden is not None else f"r={_number(cfg.reduction)}"
    plot_stages(
        plot,
        [StageBar(row["stage"], size_text(row["spatial"]), row["sites"], row["params"]) for row in report.by_stage],
        title=f"se-inject {report.model}: {len(report.plan.sites)} SE blocks, "
        f"{report.complexity.params_added:+,} parameters",
        subtitle=f"placement {cfg.placement}, {width}, gate {cfg.gate}, {cfg.pool} pool, "
        f"{'with' if cfg.bias else 'no'} biases",
    )
    return replace(report, plot=str(plot))


def _no_sites_message(name: str, plan: Plan, plain: bool = False, selection: Any = None) -> str:
    from .workflow import include_hint, no_sites_reason

    hint = include_hint(plan, selection) if selection is not None else None
    if hint is not None:
        return f"no SE site in {name}: {hint} Nothing was written."

    if not plan.skipped:
        helps = (
            ["nothing: even --plain found no convolution followed by a non-linearity"]
            if plain
            else ["add --plain for the paper's placement in plain networks (SE after each convolution's non-linearity)"]
        )
    else:
        grouped = plan.skipped_by_reason()
        helps = [_HELP[str(r)] for r in grouped if str(r) in _HELP] or ["see --dry-run for each skipped place's reason"]
    return f"no SE site in {name}: {no_sites_reason(plan)}. What would help: {'; '.join(helps)}. Nothing was written."


def main() -> None:
    """Console-script entry point (``se-inject``)."""
    try:
        app()
    except KeyboardInterrupt:  # outside the command (while Python starts it): still one line
        _error_line("interrupted")
        sys.exit(130)
