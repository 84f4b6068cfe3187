"""Applying the request's :class:`~se_inject.request.Selection` (include/exclude globs, channels,
stages, resolutions), stage numbering, free names."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence

from torch import nn

from ..analysis.axes import channel_axis
from ..analysis.ops import tensor_shape
from ..errors import SelectionError
from ..plan import SkipReason
from ..request import Selection
from .records import Candidate

__all__ = ["NOT_INCLUDED", "check_selection", "deselected", "free_name", "number_stages"]

#: The detail of a site left out because no ``include`` glob matched it.
NOT_INCLUDED = "not matched by include"


def _spatial(cand: Candidate) -> tuple[int, ...]:
    axis = cand.axis % len(cand.shape)
    return tuple(size for d, size in enumerate(cand.shape) if d not in (cand.batch_axis, axis))


def _stage_spatial(cand: Candidate) -> tuple[int, ...]:
    """Feature-map size of the site's block (its sum or concatenation), whatever the placement
    moves the SE to (``pre`` scales the fork, which may be at the previous resolution)."""
    if cand.map_size:
        return cand.map_size
    shape = tensor_shape(cand.anchor)
    if shape is None or len(shape) != len(cand.shape):
        return _spatial(cand)
    # The block's sum may be in another layout than the site (EdgeNeXt: a channels-last branch
    # joins an NCHW trunk), so its own channel axis is asked for, not the site's.
    anchor_axis = channel_axis(cand.anchor, cand.unit.flow)
    axis = (cand.axis if anchor_axis is None else anchor_axis) % len(shape)
    anchor_batch = cand.unit.batch_axis(cand.anchor)
    batch = cand.batch_axis if anchor_batch is None else anchor_batch
    return tuple(size for d, size in enumerate(shape) if d not in (batch, axis))


def number_stages(candidates: list[Candidate]) -> dict[int, tuple[int, tuple[int, ...]]]:
    """Stage (index, feature-map size) of every usable candidate: runs of blocks at one
    resolution in graph order, counted over all sites before selection, so indices do not
    depend on it."""
    order: dict[int, int] = {}
    for c in candidates:
        order.setdefault(id(c.unit), len(order))
    usable = [c for c in candidates if c.skip is None]
    usable.sort(key=lambda c: (order[id(c.unit)], c.unit.flow.index[c.anchor], c.unit.flow.index[c.source or c.anchor]))
    stages: dict[int, tuple[int, tuple[int, ...]]] = {}
    stage, last = -1, None
    for cand in usable:
        spatial = _stage_spatial(cand)
        if spatial != last:
            stage, last = stage + 1, spatial
        stages[id(cand)] = (stage, spatial)
    return stages


def check_selection(model: nn.Module, selection: Selection, stages: dict[int, tuple[int, tuple[int, ...]]]) -> None:
    """Refuse stages and resolutions the model does not have, listing the ones it has."""
    if not stages:
        return  # no site at all: the caller says so
    known: dict[int, tuple[int, ...]] = {}
    for stage, spatial in stages.values():
        known.setdefault(stage, spatial)
    name = type(model).__name__
    unknown = sorted(set(selection.stages or ()) - set(known))
    if unknown:
        listed = ", ".join(f"{k} ({_size(v)})" for k, v in sorted(known.items()))
        raise SelectionError(
            f"stage {', '.join(map(str, unknown))}: {name} has {len(known)} stages "
            f"(runs of SE sites at one feature-map size, at the analysed input): {listed}"
        )
    sides = sorted({max(v, default=0) for v in known.values()}, reverse=True)
    unknown = sorted(set(selection.resolutions or ()) - set(sides))
    if unknown:
        raise SelectionError(
            f"resolution {', '.join(map(str, unknown))}: {name} has SE sites at resolutions "
            f"{', '.join(map(str, sides))} (the largest side of each feature map at the analysed input)"
        )


def _size(spatial: Sequence[int]) -> str:
    return "x".join(str(n) for n in spatial) if spatial else "-"


def deselected(
    selection: Selection, name: str, owner: str, channels: int, stage: int, spatial: tuple[int, ...]
) -> tuple[SkipReason, str] | None:
    """Why a site is left out by the selection (reason, detail), or None when it is kept."""
    if selection.include is not None and not _matches(selection.include, name, owner):
        return SkipReason.EXCLUDED, NOT_INCLUDED
    if selection.exclude is not None and _matches(selection.exclude, name, owner):
        return SkipReason.EXCLUDED, "matched by exclude"
    if selection.stages is not None and stage not in selection.stages:
        return SkipReason.EXCLUDED, f"stage {stage} not selected"
    if selection.resolutions is not None and max(spatial, default=0) not in selection.resolutions:
        return SkipReason.EXCLUDED, f"resolution {'x'.join(map(str, spatial))} not selected"
    if channels < selection.min_channels:
        return SkipReason.TOO_FEW_CHANNELS, f"{channels} < {selection.min_channels}"
    return None


def _matches(globs: tuple[str, ...], name: str, owner: str) -> bool:
    return any(fnmatch.fnmatchcase(name, g) or fnmatch.fnmatchcase(owner, g) for g in globs)


def _after(owner: str, source: str) -> str:
    """``se_<source>``: the source's path inside the owner, as an attribute name."""
    rel = source[len(owner) + 1:] if owner and source.startswith(owner + ".") else source
    return "se_" + (re.sub(r"\W+", "_", rel).strip("_") or "input")


def free_name(model: nn.Module, owner: str, taken: dict[str, set[str]], after: str | None = None) -> str:
    """The site's module name: ``owner.se``, or with ``after`` (the node the SE follows, for an
    owner with several sites) ``owner.se_conv3``; numbered (``_2``, ...) if the owner
    already uses that name.

    An attribute set to ``None`` counts as free, so timm blocks built without attention
    (``self.se = None``) get ``se`` and their keys match timm's SE-ResNets. Names that say
    where they are (``blocks.0.se_attn_proj``, ``blocks.0.se_mlp_fc2``) rather than
    ``se``, ``se_1``: a user reading a state dict or a hook finds the site without the plan.
    """
    module = model.get_submodule(owner) if owner else model
    used = taken.get(owner, set())
    base = "se" if after is None else _after(owner, after)
    k = 0
    while True:
        attr = base if k == 0 else f"{base}_{k + 1}" if after is not None else f"se_{k}"
        if attr not in used and getattr(module, attr, None) is None:
            return f"{owner}.{attr}" if owner else attr
        k += 1
