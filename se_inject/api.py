"""Public entry points: plan (dry run), inject, remove."""

from __future__ import annotations

import gc
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .analysis.owners import OwnerTraces
from .analysis.sandbox import preserved_state
from .errors import ConfigError
from .inject.rewrite import apply_plan, build_blocks, install, remove_se
from .inject.verify import check_rebuilt, record_owner_calls
from .plan import Plan
from .se_block import SEConfig
from .sites import build_plan, example_args
from .sites.diagnostics import no_sites_warning, unanalysed_warning

__all__ = [
    "find_sites",
    "inject_se",
    "apply_plan",
    "remove_se",
]


_DEFAULT_REDUCTION = 16  # the paper's r, when neither reduction nor hidden is given


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
    traces: OwnerTraces | None = None,
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

    Without ``example_input`` the model is analysed at its declared input size
    (:func:`se_inject.models.input_size.model_input_size`). Every listed site is one ``inject_se``
    builds: owners that cannot be rebuilt are skipped here as ``not-rewritable``. Pass an
    ``OwnerTraces`` as ``traces`` to keep the owner traces planning made, and the same object to
    ``apply_plan(..., traces=)`` so the owners are not traced again.

    Raises:
        ConfigError: an option has a bad value, or both ``reduction`` and ``hidden`` are given.
        SelectionError: ``stages``/``resolutions`` name none of the model's (listed).
    """
    return _plan(
        model,
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
        example_input=example_input,
        traces=traces,
    )


@contextmanager
def _collection_paused() -> Iterator[None]:
    """Analysis makes hundreds of thousands of short-lived objects (fx nodes, proxies, fake
    tensors); the cyclic collector's passes over them cost up to half of an injection's time
    (measured on ResNet-152). Paused for the call, then restored as it was."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _plan(
    model: nn.Module,
    reduction: float | None,
    *,
    identity_init: bool,
    bias: bool,
    min_hidden: int,
    hidden: int | None,
    gate: str | None,
    pool: str,
    placement: str,
    include: Sequence[str] | None,
    exclude: Sequence[str] | None,
    min_channels: int,
    stages: Sequence[int] | None,
    resolutions: Sequence[int] | None,
    plain: bool,
    tokens: bool,
    example_input: torch.Tensor | tuple[torch.Tensor, ...] | None,
    traces: OwnerTraces | None = None,
) -> Plan:
    if reduction is not None and hidden is not None:
        raise ConfigError(
            f"give reduction or hidden, not both (reduction={reduction!r}, hidden={hidden!r}): "
            "hidden fixes every SE block's width, reduction sets it from the channels"
        )
    config = SEConfig(
        reduction=_DEFAULT_REDUCTION if reduction is None else reduction,
        min_hidden=min_hidden,
        hidden=hidden,
        bias=bias,
        gate=gate,
        pool=pool,
        identity_init=identity_init,
        placement=placement,
    )
    # Analysis runs the user's modules on fake tensors and proxies: what their forwards cache
    # on ``self`` (and the eval mode analysis sets) is put back, so the model is as it was.
    with _collection_paused(), preserved_state(model):
        return build_plan(
            model,
            config,
            include=include,
            exclude=exclude,
            min_channels=min_channels,
            stages=stages,
            resolutions=resolutions,
            plain=plain,
            tokens=tokens,
            example_input=example_input,
            traces=traces,
        )


def _check_args(model: nn.Module, example_input: object) -> tuple[object, ...]:
    """The inputs of the post-build check: the user's example, else one sample of random
    values at the analysis input's size (an empty tensor may hold NaNs and infinities; one
    sample halves the check's cost, and a rebuilt block is just as wrong at batch 1)."""
    args = example_args(model, example_input)
    if example_input is not None:
        return args
    generator = torch.Generator(device="cpu").manual_seed(0)
    return tuple(
        torch.randn((1, *a.shape[1:]), generator=generator, dtype=a.dtype).to(a.device)
        if isinstance(a, torch.Tensor) and a.is_floating_point() else a
        for a in args
    )


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
) -> nn.Module:
    """Insert SE blocks at the sites of ``find_sites(model, ...)``; changes ``model`` in place.

    Returns the same object, unless the root module itself owns a site (a model whose top-level
    ``forward`` performs the residual additions): then the root is rebuilt and the rebuilt module
    is returned. With ``identity_init`` (the default) the outputs are bit-for-bit unchanged.
    It builds exactly the sites ``find_sites`` lists with the same options, reusing the
    traces made while planning.

    Example:
        >>> model = inject_se(timm.create_model("resnet50"), reduction=16)
        >>> sum(isinstance(m, SEBlock) for m in model.modules())
        16

    After building, each rebuilt block is run on the inputs its original received in one
    forward pass of the example input (eval mode) and must give bit-identical outputs, its
    SE blocks passing their input through; otherwise nothing is changed.

    Raises:
        ConfigError: an option has a bad value, or both ``reduction`` and ``hidden`` are given.
        SelectionError: ``stages``/``resolutions`` name none of the model's (listed).
        UnfaithfulRebuildError: a rebuilt block computes something else than the original
            (its ``owner`` is named); the model is unchanged.
    """
    traces = OwnerTraces()
    options: dict[str, Any] = dict(
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
        example_input=example_input,
    )
    plan = _plan(model, reduction, traces=traces, **options)
    name = type(model).__name__
    if plan.sites:
        with _collection_paused():
            rebuilt = build_blocks(model, plan, traces=traces)
            # Post-build check (a plan is a promise): each rebuilt block must compute what its
            # original computes on the example input, before anything is swapped in.
            with preserved_state(model):  # a real forward: its caches, counters and RNG use are undone
                calls = record_owner_calls(model, list(rebuilt), _check_args(model, example_input))
                check_rebuilt(rebuilt, calls)
            injected = install(model, plan, rebuilt)
        thin = unanalysed_warning(name, plan)
        if thin is not None:
            warnings.warn(thin, UserWarning, stacklevel=2)
        return injected
    alternatives = {
        f"{flag}=True": (lambda flag=flag: _plan(model, reduction, **{**options, flag: True}))
        for flag in ("plain", "tokens")
        if not options[flag]
    }
    warnings.warn(no_sites_warning(name, plan, alternatives), UserWarning, stacklevel=2)
    return model
