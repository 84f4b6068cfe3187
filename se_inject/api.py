"""Public entry points: plan (dry run), inject, remove."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn

from .analysis.owners import OwnerTraces
from .inject.build import build
from .inject.rewrite import remove_se
from .plan import Plan, SkipReason
from .request import SEConfig, Selection, make_request
from .sites import Analysis, build_plan
from .sites.diagnostics import no_sites_warning, unanalysed_warning

__all__ = [
    "find_sites",
    "inject_se",
    "apply_plan",
    "remove_se",
]


def find_sites(
    model: nn.Module,
    reduction: float | None = None,
    *,
    identity_init: bool = True,
    bias: bool = True,
    min_hidden: int = 8,
    hidden: int | None = None,
    gate: str | None = None,
    pool: str = "avg",
    placement: str = "standard",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    min_channels: int = 0,
    stages: Sequence[int] | None = None,
    resolutions: Sequence[int] | None = None,
    plain: bool = False,
    tokens: bool = False,
    example_input: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
    config: SEConfig | None = None,
    selection: Selection | None = None,
) -> Plan:
    """Analyse ``model`` and return the plan ``inject_se`` would apply; the model is not changed.

    Options, beyond the SE block's own (``reduction``, ``hidden``, ``bias``, ``gate``, ``pool``,
    ``identity_init``): ``placement`` is where on a residual branch the block goes
    (``standard``: end of the branch, before the sum; ``pre``: start of the branch, after the
    fork; ``inner``: after the branch's last spatial convolution; the paper's trunk-scaling
    POST and Identity variants are refused). ``include``/``exclude`` (module-name globs),
    ``min_channels``, ``stages`` (indices of runs of sites at one resolution) and
    ``resolutions`` (feature-map sizes at the analysis input) select sites. ``plain`` adds the
    SE-VGG placement to networks without residual or concatenation sites; ``tokens`` turns
    residuals on token sequences into sites.

    Example:
        >>> plan = find_sites(torchvision.models.resnet50())
        >>> len(plan.sites), plan.sites[0].name
        (16, 'layer1.0.se')

    The options can also come as the request's two objects, ``config=SEConfig(...)`` (the
    block's options) and ``selection=Selection(...)`` (the rest); the plan records both.

    Without ``example_input`` the model is analysed at its declared input size
    (:func:`se_inject.models.input_size.model_input_size`). Every listed site is one ``inject_se``
    builds: owners that cannot be rebuilt are skipped here as ``not-rewritable``.

    Thread-safe: calls from several threads run their analyses one at a time, behind one lock
    (torch.fx patches process-wide globals while it traces). The model's hooks do not fire.

    Raises:
        ConfigError: an option has a bad value, both ``reduction`` and ``hidden`` are given, or
            an object (``config``/``selection``) and keywords of its group.
        SelectionError: ``stages``/``resolutions`` name none of the model's (listed).
    """
    config, selection = make_request(
        reduction,
        identity_init=identity_init,
        bias=bias,
        min_hidden=min_hidden,
        hidden=hidden,
        gate=gate,
        pool=pool,
        placement=placement,
        include=include,
        exclude=exclude,
        min_channels=min_channels,
        stages=stages,
        resolutions=resolutions,
        plain=plain,
        tokens=tokens,
        config=config,
        selection=selection,
    )
    return build_plan(model, config, selection, example_input=example_input)


def inject_se(
    model: nn.Module,
    reduction: float | None = None,
    *,
    identity_init: bool = True,
    bias: bool = True,
    min_hidden: int = 8,
    hidden: int | None = None,
    gate: str | None = None,
    pool: str = "avg",
    placement: str = "standard",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    min_channels: int = 0,
    stages: Sequence[int] | None = None,
    resolutions: Sequence[int] | None = None,
    plain: bool = False,
    tokens: bool = False,
    example_input: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
    config: SEConfig | None = None,
    selection: Selection | None = None,
) -> nn.Module:
    """Insert SE blocks at the sites of ``find_sites(model, ...)``; changes ``model`` in place.

    Returns the same object, unless the root module itself owns a site (a model whose top-level
    ``forward`` performs the residual additions): then the root is rebuilt and the rebuilt module
    is returned. With ``identity_init`` (the default) the outputs are bit-for-bit unchanged.
    It builds exactly the sites ``find_sites`` lists with the same options (keywords, or the
    ``config``/``selection`` objects), reusing the traces made while planning.

    Example:
        >>> model = inject_se(timm.create_model("resnet50"), reduction=16)
        >>> sum(isinstance(m, SEBlock) for m in model.modules())
        16

    Where the scaled tensor is a submodule's output (``bn3``), the SE block is attached to it
    and the owner's code is not touched; an owner whose branch ends in a functional value is
    rebuilt, then run on the inputs its original received in one forward pass of the example
    input (eval mode) and must give bit-identical outputs, its SE blocks passing their input
    through; otherwise nothing is changed.

    Raises:
        ConfigError: an option has a bad value, both ``reduction`` and ``hidden`` are given, or
            an object (``config``/``selection``) and keywords of its group.
        SelectionError: ``stages``/``resolutions`` name none of the model's (listed).
        UnfaithfulRebuildError: a rebuilt block computes something else than the original
            (its ``owner`` is named); the model is unchanged.
    """
    config, selection = make_request(
        reduction,
        identity_init=identity_init,
        bias=bias,
        min_hidden=min_hidden,
        hidden=hidden,
        gate=gate,
        pool=pool,
        placement=placement,
        include=include,
        exclude=exclude,
        min_channels=min_channels,
        stages=stages,
        resolutions=resolutions,
        plain=plain,
        tokens=tokens,
        config=config,
        selection=selection,
    )
    traces, analysis = OwnerTraces(), Analysis()
    plan = build_plan(model, config, selection, example_input=example_input, traces=traces, analysis=analysis)
    name = type(model).__name__
    if plan.sites:
        injected = build(model, plan, example_input=example_input, traces=traces)
        thin = unanalysed_warning(name, plan)
        if thin is not None:
            warnings.warn(thin, UserWarning, stacklevel=2)
        return injected
    # The suggestions reuse the units traced above (the options change the rules, not the
    # trace). ``tokens=True`` turns token-sequence skips into sites and changes nothing else:
    # without such a skip it finds none and is not asked.
    tokens_skipped = any(s.reason is SkipReason.TOKEN_SEQUENCE for s in plan.skipped)
    alternatives = {
        f"{flag}=True": (
            lambda flag=flag: build_plan(
                model, config, replace(selection, **{flag: True}), example_input=example_input, analysis=analysis
            )
        )
        for flag in ("plain", "tokens")
        if not getattr(selection, flag) and (flag != "tokens" or tokens_skipped)
    }
    warnings.warn(no_sites_warning(name, plan, alternatives), UserWarning, stacklevel=2)
    return model


def apply_plan(
    model: nn.Module, plan: Plan, *, example_input: torch.Tensor | tuple[torch.Tensor, ...] | None = None
) -> nn.Module:
    """Insert the plan's SE blocks into ``model``, in place; nothing is decided here.

    Replays a plan from :func:`find_sites` (or one read back from a checkpoint) as it is, through
    the same path as :func:`inject_se`: attached sites must find their module, rebuilt owners are
    traced again, each site must be found where the plan says, and each rebuilt owner is checked
    against its original on ``example_input`` (default: one random sample at the model's input
    size). Returns the model, or the rebuilt root when the root owns a site.

    Raises:
        PlanMismatchError: a site of the plan is not where it says in this model.
        UnfaithfulRebuildError: a rebuilt block computes something else than the original.
    """
    return build(model, plan, example_input=example_input)
