"""Model names: ``timm:NAME``, ``torchvision:NAME`` or a bare ``NAME`` -> a :class:`ModelSpec`.

* ``timm:NAME`` and ``torchvision:NAME`` pick the library; timm's ``arch.tag`` names
  (``resnet50.a1_in1k``) pass through unchanged.
* A bare ``NAME`` is looked up in timm first, then in torchvision (35 names are in both, e.g.
  ``resnet50``; timm's is the one used). :class:`ModelSpec` records the library used, and the
  CLI says which one it was.

Lookups go through the libraries' registries (``timm.is_model``,
``torchvision.models.get_model_builder``); timm and torchvision are imported on the first
lookup, not with this module.
"""

from __future__ import annotations

import difflib
import enum
from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from .errors import UnknownModelError

__all__ = ["Source", "ModelSpec", "resolve_name", "suggest", "model_origin", "tag_origin"]

#: Attribute set on models made here, so ``save`` can record where a model came from.
_ORIGIN_ATTR = "_se_inject_origin"


class Source(enum.StrEnum):
    """The registry a model comes from."""

    TIMM = "timm"
    TORCHVISION = "torchvision"


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model name: the registry and the name inside it (a timm ``arch.tag`` kept whole)."""

    source: Source
    name: str

    def __str__(self) -> str:
        return f"{self.source}:{self.name}"


def _in_timm(name: str) -> bool:
    import timm

    return timm.is_model(name)  # strips a ``.tag``, so ``resnet50.a1_in1k`` is found too


def _in_torchvision(name: str) -> bool:
    import torchvision

    try:
        torchvision.models.get_model_builder(name)
    except ValueError:
        return False
    return True


def suggest(name: str, *, limit: int = 5) -> list[str]:
    """Close matches for ``name`` from both registries, best first, each tagged with its source.

    Example:
        >>> suggest("resnet5")[:2]
        ['resnet50 (timm, torchvision)', 'resnet34 (timm, torchvision)']
    """
    import timm
    import torchvision
    from timm.models import split_model_name_tag

    bare = split_model_name_tag(name.split(":", 1)[-1])[0].lower()
    sources: dict[str, list[str]] = {}
    for source, names in ((Source.TIMM, timm.list_models()), (Source.TORCHVISION, torchvision.models.list_models())):
        for candidate in names:
            sources.setdefault(candidate, []).append(str(source))
    matches = difflib.get_close_matches(bare, list(sources), n=limit, cutoff=0.6)
    return [f"{m} ({', '.join(sources[m])})" for m in matches]


def resolve_name(name: str) -> ModelSpec:
    """Turn ``timm:NAME``, ``torchvision:NAME`` or a bare ``NAME`` into a :class:`ModelSpec`.

    A bare name is looked up in timm first, then in torchvision.

    Example:
        >>> resolve_name("resnet50"), resolve_name("torchvision:resnet50")
        (ModelSpec(source=<Source.TIMM: 'timm'>, name='resnet50'), ModelSpec(source=<Source.TORCHVISION: 'torchvision'>, name='resnet50'))

    Raises:
        UnknownModelError: the name is in neither registry (the message lists close matches).
    """
    text = name.strip()
    prefix, sep, rest = text.partition(":")
    if sep:
        try:
            source = Source(prefix.lower())
        except ValueError:
            raise UnknownModelError(
                f"Unknown model source {prefix!r} in {name!r}; use timm:NAME, torchvision:NAME or a bare NAME"
            ) from None
        found = _in_timm(rest) if source is Source.TIMM else _in_torchvision(rest)
        if found:
            return ModelSpec(source, rest)
        where = f"not in {source}"
    else:
        rest = prefix
        if rest and _in_timm(rest):
            return ModelSpec(Source.TIMM, rest)
        if rest and _in_torchvision(rest):
            return ModelSpec(Source.TORCHVISION, rest)
        where = "not in timm or torchvision"
    hints = suggest(text)
    hint = (
        f" Did you mean: {', '.join(hints)}?"
        if hints
        else " List names with timm.list_models() or torchvision.models.list_models()."
    )
    raise UnknownModelError(f"Unknown model {name!r} ({where}).{hint}")


def model_origin(model: nn.Module) -> ModelSpec | None:
    """The registry name a model was created from, if it was created here (or is a timm model).

    Example:
        >>> model_origin(timm.create_model("resnet50.a1_in1k"))
        ModelSpec(source=<Source.TIMM: 'timm'>, name='resnet50')
    """
    origin = getattr(model, _ORIGIN_ATTR, None)
    if isinstance(origin, ModelSpec):
        return origin
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, Mapping) and cfg.get("architecture"):
        return ModelSpec(Source.TIMM, str(cfg["architecture"]))
    return None


def tag_origin(model: nn.Module, spec: ModelSpec) -> nn.Module:
    """Record on ``model`` the registry name it was built from (read back by :func:`model_origin`)."""
    # A plain attribute: not a parameter or buffer, so state_dict keys are unchanged.
    object.__setattr__(model, _ORIGIN_ATTR, spec)
    return model
