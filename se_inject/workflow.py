"""From a registry name to a report: build, count, plan, inject, count again, save.

:func:`inject_named` is what ``se-inject MODEL ...`` does, as a library call that returns a
:class:`~se_inject.report.summary.Report` and the injected model; the CLI only parses options and
renders. Analysis runs on meta tensors, so the input size costs no real memory; sizes a model
could never be run at are refused before anything is built.

Example::

    from se_inject.workflow import inject_named
    done = inject_named("torchvision:resnet18", weights="random", input_size=(64,), output="model.pt")
    done.report.to_dict()["params"]["added"]
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .analysis.owners import OwnerTraces
from .errors import ConfigError, ModelArgsError, NoSitesError, SelectionError
from .inject.build import build
from .io.checkpoint import check_output_path, save
from .models.arguments import args_text
from .models.loading import default_input_size, load_model
from .models.names import ModelSpec
from .models.weights import Network
from .plan import Plan, SiteKind, SkipReason
from .report.complexity import NOT_COUNTED, Count, compare, count
from .report.summary import Report, build_report, size_text
from .request import SEConfig, Selection
from .sites import build_plan
from .sites.selection import NOT_INCLUDED

__all__ = ["MAX_SIDE", "Injection", "inject_named", "resolve_input_size", "no_sites_reason", "include_hint"]

#: Largest input side accepted for analysis and counts. Analysis runs on meta tensors, but a
#: model whose graph needs a real pass would allocate the input, and no vision model is run at
#: more than a few thousand pixels a side.
MAX_SIDE = 8192

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Injection:
    """What :func:`inject_named` returns: the report and the model (injected unless it was a dry run)."""

    report: Report
    model: nn.Module


def resolve_input_size(given: Sequence[int] | None, default: Sequence[int], *, model: str = "the model") -> tuple[int, ...]:
    """The analysis input (no batch): ``given`` numbers replace the trailing dimensions of ``default``.

    One number sets both spatial sides (``(224,)``), two set height and width, three or more
    include the channels, which must be the model's.

    Example:
        >>> resolve_input_size((256, 192), (3, 224, 224))
        (3, 256, 192)

    Raises:
        ConfigError: not positive, more numbers than ``default`` has, channels the model does
            not take, or a side above :data:`MAX_SIDE`.
    """
    default = tuple(int(n) for n in default)
    if given is None:
        return default
    numbers = [int(n) for n in given]
    if not numbers or any(n < 1 for n in numbers) or len(numbers) > len(default):
        raise ConfigError(
            f"input size {size_text(numbers)}: give 1 to {len(default)} positive numbers for {model} "
            f"(its default input is {size_text(default)})"
        )
    if len(numbers) == 1 and len(default) >= 2:
        numbers = numbers * 2
    size = (*default[: len(default) - len(numbers)], *numbers)
    if len(numbers) == len(default) and size[0] != default[0]:
        raise ConfigError(
            f"input size {size_text(size)}: {model} expects {default[0]} input channels, not {size[0]} "
            f"(its default input is {size_text(default)})"
        )
    if max(size[1:], default=0) > MAX_SIDE:
        gigabytes = 4 * math.prod(size) / 1e9
        raise ConfigError(
            f"input size {size_text(size)}: at most {MAX_SIDE} a side (one such image is {gigabytes:,.1f} GB "
            "of float32)"
        )
    return size


def no_sites_reason(plan: Plan) -> str:
    """Why a plan has no site, in one clause: the skip reasons with counts, or "no candidates"."""
    if not plan.skipped:
        why = "it has no residual additions or channel concatenations (a plain network such as VGG)"
    else:
        why = f"all {len(plan.skipped)} candidate places were skipped: " + ", ".join(
            f"{len(items)} {items[0].text}" for items in plan.skipped_by_reason().values()
        )
    if plan.unanalysed:
        why += f"; could not analyse {', '.join(str(m) for m in plan.unanalysed[:3])}"
    return why


def include_hint(plan: Plan, selection: Selection) -> str | None:
    """When the ``include`` globs matched no site at all and one has no trailing ``*``: a sentence
    saying so, with the glob that was probably meant (globs match whole names, so ``layer4`` matches no ``layer4.0.se``).

    Example:
        >>> include_hint(plan, Selection(include=("layer4",)))
        "no site matches --include layer4; globs match whole names, did you mean 'layer4.*'?"
    """
    if not selection.include or plan.sites:
        return None
    left_out = [s for s in plan.skipped if s.detail == NOT_INCLUDED]
    later = [s for s in plan.skipped if s.reason is SkipReason.EXCLUDED and s.detail != NOT_INCLUDED]
    if not left_out or later or (selection.min_channels and any(
            s.reason is SkipReason.TOO_FEW_CHANNELS for s in plan.skipped)):
        return None
    meant = [f"'{g.rstrip('.')}.*'" for g in selection.include if not g.endswith("*")]
    if not meant:  # every glob has its wildcard: the general no-site message says what would help
        return None
    given = " ".join(f"--include {g}" for g in selection.include)
    return f"no site matches {given}; globs match whole names, did you mean {' '.join(meant)}?"


def _warn_minimum_width(plan: Plan) -> None:
    cfg = plan.config
    if cfg.hidden is not None or not plan.sites:
        return
    if all(site.channels // cfg.reduction < cfg.min_hidden for site in plan.sites):
        warnings.warn(
            f"reduction {cfg.reduction} gives every SE block the minimum hidden width "
            f"(channels // r < {cfg.min_hidden} at all {len(plan.sites)} sites); give a fixed hidden width "
            "instead, or a smaller reduction",
            UserWarning,
            stacklevel=3,
        )


def _count_base(net: nn.Module, spec: ModelSpec, size: tuple[int, ...], args: Mapping[str, Any]) -> Count:
    """Count the base model. Built with constructor arguments, a model that cannot run its input
    is refused here, before anything is written: a typo (``drop_rate=0,2`` is a tuple,
    ``drop_rate=O.2`` a string) builds a model whose every forward raises.

    Raises:
        ModelArgsError: with ``args``, no forward pass of the model at ``size`` ran.
    """
    if not args:
        return count(net, size)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        counted = count(net, size)
    if counted.macs is None:
        failed = next((str(w.message) for w in caught if str(w.message).startswith(NOT_COUNTED)), "")
        why = failed.partition(" failed ")[2] or "(its forward failed)"
        raise ModelArgsError(
            f"{spec} built with {args_text(args)} cannot run its input {size_text(size)} {why}; check the value"
        )
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return counted


def _plan(
    net: nn.Module, spec: ModelSpec, config: SEConfig, selection: Selection, size: tuple[int, ...], traces: OwnerTraces
) -> Plan:
    """The plan for the request, on a meta input of ``size``; the owner traces it makes are kept
    in ``traces`` for ``build``."""
    try:
        # shapes only: a meta input costs no real memory
        plan = build_plan(net, config, selection, example_input=torch.empty(1, *size, device="meta"), traces=traces)
    except SelectionError as e:  # the library lists the model's stages; name the flag
        raise SelectionError(f"--{e}") from e
    if selection.plain and plan.sites and not any(site.kind is SiteKind.PLAIN for site in plan.sites):
        warnings.warn(
            f"--plain has no effect on {spec}: it has residual or concatenation sites, and the plain "
            "placement is only for networks without them",
            UserWarning,
            stacklevel=3,
        )
    return plan


def inject_named(
    name: str,
    *,
    weights: str | os.PathLike[str] = "auto",
    config: SEConfig | None = None,
    selection: Selection | None = None,
    input_size: Sequence[int] | None = None,
    output: str | os.PathLike[str] | None = None,
    se_only: bool = False,
    dry_run: bool = False,
    progress: Progress | None = None,
    network: Network | None = None,
    weights_ema: bool = False,
    model_args: Mapping[str, Any] | None = None,
) -> Injection:
    """Build ``name``, plan and insert SE blocks, count before and after, and save to ``output``.

    A dry run applies the plan to the in-memory model too, so its totals are measured, not
    estimated; it writes nothing and also answers for a model with no site (an empty plan with
    every skipped place). Writing a model with no site is an error. ``model_args`` go to the
    model's constructor (``timm.create_model`` kwargs, a torchvision builder's); the report and
    the checkpoint record them, so ``se_inject.load`` rebuilds the same model.

    Example:
        >>> done = inject_named("resnet50", weights="random", dry_run=True)
        >>> len(done.report.plan.sites), done.report.complexity.params_added
        (16, 2530992)

    Raises:
        UnknownModelError, WeightsError, UnsafeCheckpointError: the model or its weights.
        ConfigError: a bad input size, or stages / resolutions the model does not have.
        ModelArgsError: the model's constructor does not take ``model_args``, or the model built
            with them cannot run its input (a forward raises: ``drop_rate=(0, 2)``).
        NoSitesError: not a dry run and the plan has no site (``error.plan`` holds the plan).
        OutputPathError: ``output`` cannot be written.
    """
    config = config or SEConfig()
    selection = selection or Selection()
    say = progress or (lambda text: None)
    replaced = False
    if output is not None and not dry_run:
        check_output_path(output)
        replaced = Path(output).exists()
    say(f"building {name} (weights: {weights})...")
    loaded = load_model(name, weights, network=network, ema=weights_ema, model_args=model_args)
    net, spec = loaded.model, loaded.spec
    size = resolve_input_size(input_size, default_input_size(spec, net), model=str(spec))
    say(f"counting the base model at {size_text(size)}...")
    before = _count_base(net, spec, size, loaded.args)
    say("analysing the graph...")
    traces = OwnerTraces()
    plan = _plan(net, spec, config, selection, size, traces)
    _warn_minimum_width(plan)
    if plan.sites:
        # a plan is a promise: every listed site is built, rebuilt blocks checked on one sample
        net = build(net, plan, example_input=torch.empty(1, *size, device="meta"), traces=traces)
    hint = include_hint(plan, selection)
    if not plan.sites and not dry_run:
        why = hint or no_sites_reason(plan)
        raise NoSitesError(f"no SE site in {spec}: {why}. Nothing was written.", plan=plan)
    if hint is not None:
        warnings.warn(hint, UserWarning, stacklevel=2)
    after = count(net, size) if plan.sites else before
    if output is not None and not dry_run:
        say(f"writing {output}...")
        save(net, output, se_only, plan=plan, origin=spec, weights=loaded.weights, model_args=loaded.args)
    report = build_report(
        spec,
        loaded.weights,
        plan,
        compare(before, after),
        requested=name,
        requested_weights=str(weights),
        dry_run=dry_run,
        output=None if output is None else str(output),
        replaced=replaced,
        se_only=se_only,
        model_args=loaded.args,
    )
    return Injection(report, net)
