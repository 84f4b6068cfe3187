"""``se-inject --list PATTERN``: registry names matching a glob, with their pretrained weights.

Reads only the registries (``timm.list_models`` / ``timm.list_pretrained`` and torchvision's
``list_models`` / weights enums); no model is built, so a listing takes about the time of
importing the two libraries. The glob is matched case-insensitively against whole names, as
:func:`se_inject.models.names.resolve_name` looks names up; a pattern with a ``.`` matches timm's
``arch.tag`` names instead, to list the tags themselves.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from ..errors import UnknownModelError
from .names import Source

__all__ = ["Listed", "list_names", "listing_lines"]


@dataclass(frozen=True)
class Listed:
    """One registry name and, per library that has it, how many pretrained weights it offers."""

    name: str
    weights: dict[Source, int]  # library -> number of pretrained tags / weights (0: random init only)


def _timm_names(pattern: str) -> dict[str, int]:
    import timm

    if "." in pattern:  # arch.tag: each tag is a name of its own
        return {name: 1 for name in timm.list_pretrained()}
    tags: dict[str, int] = {}
    for name in timm.list_pretrained():
        arch = name.partition(".")[0]
        tags[arch] = tags.get(arch, 0) + 1
    return {name: tags.get(name, 0) for name in timm.list_models()}


def _torchvision_names(pattern: str) -> dict[str, int]:
    if "." in pattern:
        return {}
    import torchvision

    found = {}
    for name in torchvision.models.list_models():
        try:
            found[name] = len(torchvision.models.get_model_weights(name))
        except (ValueError, KeyError):  # a builder without a weights enum
            found[name] = 0
    return found


def list_names(pattern: str) -> list[Listed]:
    """Names matching ``pattern`` (a glob over whole names, any case) in timm and torchvision, sorted.

    Example:
        >>> [(x.name, dict(x.weights)) for x in list_names("resnet18")]
        [('resnet18', {<Source.TIMM: 'timm'>: 5, <Source.TORCHVISION: 'torchvision'>: 1})]

    Raises:
        UnknownModelError: nothing matches (the message says where was looked).
    """
    glob = pattern.strip().lower()
    if not glob:
        raise UnknownModelError("--list needs a pattern, e.g. 'resnet*' ('*' lists every model)")
    found: dict[str, dict[Source, int]] = {}
    for source, names in ((Source.TIMM, _timm_names(glob)), (Source.TORCHVISION, _torchvision_names(glob))):
        for name, count in names.items():
            if fnmatch.fnmatchcase(name.lower(), glob):
                found.setdefault(name, {})[source] = count
    if not found:
        where = "timm's arch.tag names" if "." in glob else "timm or torchvision"
        raise UnknownModelError(
            f"no model in {where} matches {pattern!r} (globs match whole names, any case: try '*{glob.strip('*')}*')"
        )
    return [Listed(name, found[name]) for name in sorted(found)]


def _cell(listed: Listed, source: Source) -> str:
    if source not in listed.weights:
        return "-"
    count = listed.weights[source]
    return "random init only" if not count else "pretrained" if count == 1 else f"pretrained ({count})"


def listing_lines(listed: list[Listed]) -> list[str]:
    """Aligned plain-text lines: name, then per library ``pretrained`` (``(N)``: N tags or weights
    enum members), ``random init only`` or ``-`` (not in that library), and a count."""
    width = max(len("name"), *(len(x.name) for x in listed))
    cells = [(x.name, _cell(x, Source.TIMM), _cell(x, Source.TORCHVISION)) for x in listed]
    timm_width = max(len("timm"), *(len(c[1]) for c in cells))
    lines = [f"{'name':<{width}}  {'timm':<{timm_width}}  torchvision"]
    lines += [f"{name:<{width}}  {t:<{timm_width}}  {tv}".rstrip() for name, t, tv in cells]
    with_weights = sum(1 for x in listed if any(x.weights.values()))
    lines.append(f"{len(listed)} models, {with_weights} with pretrained weights")
    return lines
