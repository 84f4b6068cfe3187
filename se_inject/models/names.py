"""Model names: ``timm:NAME``, ``torchvision:NAME`` or a bare ``NAME`` -> a :class:`ModelSpec`.

* ``timm:NAME`` and ``torchvision:NAME`` pick the library; timm's ``arch.tag`` names
  (``resnet50.a1_in1k``) pass through unchanged.
* A bare ``NAME`` is looked up in timm first, then in torchvision (35 names are in both, e.g.
  ``resnet50``; timm's is the one used). :class:`ModelSpec` records the library used, and the
  CLI says which one it was.
* Lookups ignore case and give the registered spelling (``RESNET50`` is timm's ``resnet50``, as
  the lower-case name is): torchvision's own lookup lower-cases, timm's does not, so matching
  case-sensitively would send such a name to a different library.
* A timm ``arch.tag`` must name one of the architecture's pretrained tags
  (:class:`~se_inject.errors.UnknownTagError` lists them).
* ``hf-hub:org/name`` (timm's convention for Hugging Face hub models) is a timm model whose
  architecture and weights come from the hub (:mod:`se_inject.models.weights` fetches or finds them).

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

from ..errors import UnknownModelError, UnknownTagError

__all__ = ["HUB_PREFIX", "Source", "ModelSpec", "resolve_name", "suggest", "model_origin", "tag_origin",
           "is_hub_name", "origin_args"]

#: timm's prefix for Hugging Face hub models (``hf_hub:`` is accepted too, as timm does).
HUB_PREFIX = "hf-hub:"

#: Attribute set on models made here, so ``save`` can record where a model came from.
_ORIGIN_ATTR = "_se_inject_origin"
#: Attribute set next to it: the keyword arguments the model's constructor was given.
_ARGS_ATTR = "_se_inject_model_args"


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
        return self.name if is_hub_name(self.name) else f"{self.source}:{self.name}"


def is_hub_name(name: str) -> bool:
    """True for timm's Hugging Face hub names, ``hf-hub:org/name``."""
    return name.startswith(HUB_PREFIX)


def _in_timm(name: str) -> str | None:
    """The registered spelling of ``name`` (``arch`` or ``arch.tag``) in timm, or None.

    Raises:
        UnknownTagError: the architecture exists but has no pretrained tag ``tag``.
    """
    import timm
    from timm.models import split_model_name_tag

    arch, tag = split_model_name_tag(name)
    if not timm.is_model(arch):
        lower = {n.lower(): n for n in timm.list_models()}
        if arch.lower() not in lower:
            return None
        arch = lower[arch.lower()]
    if not tag:
        return arch
    tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
    for known in tags:
        if known.lower() == tag.lower():
            return f"{arch}.{known}"
    listed = f"its tags: {', '.join(tags)}" if tags else "it has no pretrained tags (use the bare name)"
    raise UnknownTagError(f"timm model {arch!r} has no pretrained tag {tag!r}; {listed}")


def _in_torchvision(name: str) -> str | None:
    """The registered spelling of ``name`` in torchvision, or None (its lookup ignores case)."""
    import torchvision

    lower = {n.lower(): n for n in torchvision.models.list_models()}
    return lower.get(name.lower())


def _hub_name(text: str) -> str | None:
    """``hf-hub:org/name`` in timm's spelling, or None when ``text`` is no hub name."""
    prefix, sep, repo = text.partition(":")
    if not sep or prefix.lower() not in ("hf-hub", "hf_hub"):
        return None
    owner, slash, rest = repo.partition("/")
    if not (owner and slash and rest) or "/" in rest:
        raise UnknownModelError(f"bad hub name {text!r}: give hf-hub:ORG/NAME (a Hugging Face hub repository)")
    return HUB_PREFIX + repo


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
        UnknownTagError: a timm ``arch.tag`` whose tag the architecture does not have (the
            message lists its tags).
    """
    text = name.strip()
    if text.lower().startswith("timm:") and _hub_name(text[5:]):
        text = text[5:]
    hub = _hub_name(text)
    if hub is not None:
        return ModelSpec(Source.TIMM, hub)
    prefix, sep, rest = text.partition(":")
    if sep:
        try:
            source = Source(prefix.lower())
        except ValueError:
            raise UnknownModelError(
                f"Unknown model source {prefix!r} in {name!r}; use timm:NAME, torchvision:NAME, "
                "hf-hub:ORG/NAME or a bare NAME"
            ) from None
        found = _in_timm(rest) if source is Source.TIMM else _in_torchvision(rest)
        if found:
            return ModelSpec(source, found)
        where = f"not in {source}"
    else:
        rest = prefix
        found = _in_timm(rest) if rest else None
        if found:
            return ModelSpec(Source.TIMM, found)
        found = _in_torchvision(rest) if rest else None
        if found:
            return ModelSpec(Source.TORCHVISION, found)
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


def tag_origin(model: nn.Module, spec: ModelSpec, args: Mapping[str, object] | None = None) -> nn.Module:
    """Record on ``model`` the registry name it was built from and the constructor arguments it
    was given (read back by :func:`model_origin` and :func:`origin_args`; ``None``: unknown)."""
    # Plain attributes: not parameters or buffers, so state_dict keys are unchanged.
    object.__setattr__(model, _ORIGIN_ATTR, spec)
    object.__setattr__(model, _ARGS_ATTR, None if args is None else dict(args))
    return model


def origin_args(model: nn.Module) -> dict[str, object] | None:
    """The constructor arguments of a model built here (``{}``: the defaults), or ``None`` when
    they are unknown (a model built elsewhere: timm models do not keep their arguments)."""
    args = getattr(model, _ARGS_ATTR, None)
    if isinstance(args, dict) and isinstance(getattr(model, _ORIGIN_ATTR, None), ModelSpec):
        return dict(args)
    return None
