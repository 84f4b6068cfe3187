"""The request: how every SE block is built (:class:`SEConfig`) and which sites to keep (:class:`Selection`).

The CLI and the API build these two objects once; planning, injection, the report and the
checkpoint all take and record them unchanged. :func:`make_request` is the one place where the
keyword options of ``find_sites`` / ``inject_se`` become the two objects.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from .errors import ConfigError
from .se_block import GATES, PLACEMENTS, POOLS, TRUNK_PLACEMENTS

__all__ = ["DEFAULT_REDUCTION", "SEConfig", "Selection", "make_request", "check_globs", "check_ints"]

#: The paper's r, when neither a reduction nor a fixed hidden width is given.
DEFAULT_REDUCTION = 16


@dataclass(frozen=True)
class SEConfig:
    """How every SE block of one injection is built (recorded in plans and checkpoints)."""

    reduction: float = DEFAULT_REDUCTION
    min_hidden: int = 8
    hidden: int | None = None
    bias: bool = True
    gate: str | None = None  # None: the identity gate, or the paper's sigmoid without identity_init
    pool: str = "avg"
    identity_init: bool = True
    placement: str = "standard"

    def __post_init__(self) -> None:
        if self.gate is None:
            object.__setattr__(self, "gate", "scaled_sigmoid" if self.identity_init else "sigmoid")
        if not (isinstance(self.reduction, (int, float)) and math.isfinite(self.reduction)) or self.reduction < 1:
            raise ConfigError(f"reduction must be a number >= 1, got {self.reduction!r}")
        if self.min_hidden < 1:
            raise ConfigError(f"min_hidden must be >= 1, got {self.min_hidden!r}")
        if self.hidden is not None and self.hidden < 1:
            raise ConfigError(f"hidden must be >= 1, got {self.hidden!r}")
        if self.gate not in GATES:
            raise ConfigError(f"unknown gate {self.gate!r}; known gates: {', '.join(GATES)}")
        if self.pool not in POOLS:
            raise ConfigError(f"unknown pool {self.pool!r}; known pools: {', '.join(POOLS)}")
        if self.placement in TRUNK_PLACEMENTS:
            raise ConfigError(
                f"placement {self.placement!r} scales the trunk ({TRUNK_PLACEMENTS[self.placement]}); se-inject only "
                f"scales residual branches, where the paper finds SE robust. Use one of: {', '.join(PLACEMENTS)}"
            )
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"unknown placement {self.placement!r}; known placements: {', '.join(PLACEMENTS)}")
        if self.identity_init and not GATES[self.gate][1]:
            raise ConfigError(
                f"gate {self.gate!r} is not 1 at z = 0, so it cannot start as an identity; "
                f"use identity_init=False or one of: "
                f"{', '.join(name for name, (_, ok) in GATES.items() if ok)}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SEConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class Selection:
    """Which of the found sites to keep (placement rule 8: by module name, width, stage,
    resolution) and which extra placements to allow (``plain``: SE-VGG's, for networks without
    residual or concatenation sites; ``tokens``: residual branches on token sequences).

    Values are checked and normalised here (one glob or int may be given bare), so a Selection
    that exists is a valid one.

    Raises:
        ConfigError: a glob that is not a non-empty string, a stage / resolution / channel
            count that is not a non-negative integer.
    """

    include: tuple[str, ...] | None = None  # module-name globs to keep
    exclude: tuple[str, ...] | None = None  # module-name globs to drop
    min_channels: int = 0  # sites with fewer channels are skipped
    stages: tuple[int, ...] | None = None  # stage indices to keep (numbered over every site)
    resolutions: tuple[int, ...] | None = None  # feature-map sides to keep, at the analysis input
    plain: bool = False  # the SE-VGG placement for networks without residual or concat sites
    tokens: bool = False  # SE over the token axis of transformer residual branches

    def __post_init__(self) -> None:
        object.__setattr__(self, "include", check_globs("include", self.include))
        object.__setattr__(self, "exclude", check_globs("exclude", self.exclude))
        object.__setattr__(self, "stages", check_ints("stages", self.stages))
        object.__setattr__(self, "resolutions", check_ints("resolutions", self.resolutions))
        if isinstance(self.min_channels, bool) or not isinstance(self.min_channels, int) or self.min_channels < 0:
            raise ConfigError(f"min_channels must be >= 0, got {self.min_channels!r}")

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

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Selection:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def check_ints(what: str, values: Sequence[int] | int | None) -> tuple[int, ...] | None:
    """``values`` as a tuple of non-negative ints (one int allowed).

    Raises:
        ConfigError: a value is not a non-negative int.
    """
    if values is None:
        return None
    if isinstance(values, int):
        values = (values,)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ConfigError(f"{what} must be non-negative integers, got {values!r}")
    return tuple(values)


def check_globs(what: str, globs: Sequence[str] | str | None) -> tuple[str, ...] | None:
    """``globs`` as a tuple of non-empty strings (one string allowed).

    Raises:
        ConfigError: a glob is not a non-empty string.
    """
    if globs is None:
        return None
    if isinstance(globs, str):
        globs = (globs,)
    if not all(isinstance(g, str) and g for g in globs):
        raise ConfigError(f"{what} must be module-name globs (non-empty strings), got {globs!r}")
    return tuple(globs)


def make_request(
    reduction: float | None = None,
    *,
    identity_init: bool = True,
    bias: bool = True,
    min_hidden: int = 8,
    hidden: int | None = None,
    gate: str | None = None,
    pool: str = "avg",
    placement: str = "standard",
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    min_channels: int = 0,
    stages: Sequence[int] | int | None = None,
    resolutions: Sequence[int] | int | None = None,
    plain: bool = False,
    tokens: bool = False,
    config: SEConfig | None = None,
    selection: Selection | None = None,
) -> tuple[SEConfig, Selection]:
    """The keyword options of ``find_sites`` / ``inject_se`` as the request's two objects.

    A ``config`` or ``selection`` given as an object is taken unchanged; giving one together
    with keywords of its group that differ from their defaults is refused, so no option is
    silently dropped.

    Example:
        >>> config, selection = make_request(8, include="layer4.*")
        >>> config.reduction, selection.include
        (8, ('layer4.*',))

    Raises:
        ConfigError: a bad value, both ``reduction`` and ``hidden`` (one fixes every block's
            width, the other sets it from the channels), or an object and keywords of its group.
    """
    keywords = dict(
        reduction=reduction, identity_init=identity_init, bias=bias, min_hidden=min_hidden, hidden=hidden, gate=gate,
        pool=pool, placement=placement, include=include, exclude=exclude, min_channels=min_channels, stages=stages,
        resolutions=resolutions, plain=plain, tokens=tokens,
    )
    for given, group, what in ((config, SEConfig, "config"), (selection, Selection, "selection")):
        if given is None:
            continue
        if not isinstance(given, group):
            raise ConfigError(f"{what} must be a {group.__name__}, got {type(given).__name__}")
        keys = _SELECTION_KEYWORDS if group is Selection else tuple(k for k in keywords if k not in _SELECTION_KEYWORDS)
        changed = [k for k in keys if keywords[k] != _DEFAULTS[k]]
        if changed:
            raise ConfigError(f"give {what}= or the keywords {', '.join(changed)}, not both")
    if config is not None and selection is not None:
        return config, selection
    if reduction is not None and hidden is not None:
        raise ConfigError(
            f"give reduction or hidden, not both (reduction={reduction!r}, hidden={hidden!r}): "
            "hidden fixes every SE block's width, reduction sets it from the channels"
        )
    made_config = SEConfig(
        reduction=DEFAULT_REDUCTION if reduction is None else reduction,
        min_hidden=min_hidden,
        hidden=hidden,
        bias=bias,
        gate=gate,
        pool=pool,
        identity_init=identity_init,
        placement=placement,
    )
    made = Selection(include, exclude, min_channels, stages, resolutions, plain, tokens)  # type: ignore[arg-type]
    return config or made_config, selection or made


#: The keywords of :func:`make_request` that fill a :class:`Selection` (the rest fill the SEConfig).
_SELECTION_KEYWORDS = tuple(f.name for f in fields(Selection))
_DEFAULTS = {name: p.default for name, p in inspect.signature(make_request).parameters.items()}
