"""Architecture signatures: what a model's layers are, beyond their state-dict keys and shapes.

Two models with the same keys and shapes can compute different functions: timm's
``global_pool='max'``, ``output_stride=16`` (dilated convolutions), ``act_layer='silu'`` or
``drop_rate`` change no tensor. A checkpoint records the signature of the base model it was
saved on, and :func:`se_inject.load` compares it with the model it rebuilds, so a rebuild that
differs is refused rather than loaded silently.

The signature lists every submodule, in order, as its qualified name, its class and its
hyper-parameters: ``extra_repr()`` plus the module's own attributes that are plain values
(numbers, strings, booleans, ``None`` and tuples of them: ``pool_type``, ``drop_rate``,
``stride``), never tensors, dicts or private attributes. It is that of the *base* model: SE
blocks are left out and a rebuilt block reads as the original block it was rebuilt from, so an
injected model has the signature of the model it was injected into.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from torch import nn

from ..inject.attach import PLACEHOLDER_FLAG, base_class
from ..inject.rebuilt import RebuiltBlock
from ..se_block import SEBlock

__all__ = ["architecture_signature", "signature_difference"]

#: Attributes that say how a model runs, not what it computes (toggled freely by users).
_IGNORED = frozenset({"training", "grad_checkpointing", "dump_patches", "call_super_init"})


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    return isinstance(value, tuple) and all(_plain(v) for v in value)


def _describe(module: nn.Module) -> list[Any]:
    """``[class, extra_repr, ["key=value", ...]]`` of one module (not of its children)."""
    cls = base_class(module)  # a module carrying an attached SE block is still its own class
    try:
        extra = module.extra_repr()
    except Exception:  # noqa: BLE001 - a module whose repr fails still has its attributes
        extra = "?"
    fields = sorted(
        [f"{k}={v!r}" for k, v in vars(module).items() if not k.startswith("_") and k not in _IGNORED and _plain(v)]
        # an SE block in the module's own placeholder (timm's ``self.se = None``): the base had None
        + [f"{k}=None" for k, child in module._modules.items() if getattr(child, "__dict__", {}).get(PLACEHOLDER_FLAG)]
    )
    return [f"{cls.__module__}.{cls.__qualname__}", extra, fields]


def _walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
    base = module.original if isinstance(module, RebuiltBlock) else module
    yield prefix, base
    for name, child in base.named_children():
        if isinstance(child, SEBlock):
            continue
        yield from _walk(child, f"{prefix}.{name}" if prefix else name)


def architecture_signature(model: nn.Module) -> dict[str, Any]:
    """The base model's layers as plain data: ``{"digest": str, "modules": [[name, class, extra_repr,
    ["key=value", ...]], ...]}``.

    Example:
        >>> a = architecture_signature(timm.create_model("resnet18"))
        >>> a == architecture_signature(timm.create_model("resnet18", global_pool="max"))
        False
    """
    modules = [[name, *_describe(m)] for name, m in _walk(model, "")]
    digest = hashlib.sha256(repr(modules).encode()).hexdigest()[:16]
    return {"digest": digest, "modules": modules}


def _cut(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _entry(entry: Sequence[Any]) -> str:
    return f"{entry[0] or 'the root'!r} ({entry[1].rpartition('.')[2]})"


def _changes(here: Sequence[Any], there: Sequence[Any]) -> str:
    """What differs between two entries of the same module name: its class, its extra_repr or fields."""
    if here[1] != there[1]:
        return f"is {here[1].rpartition('.')[2]} rebuilt, {there[1].rpartition('.')[2]} saved"
    if here[2] != there[2]:
        return f"has ({_cut(here[2])}) rebuilt, ({_cut(there[2])}) saved"
    mine, theirs = set(here[3]), set(there[3])
    rebuilt = ", ".join(sorted(mine - theirs)) or "no " + ", ".join(f.partition("=")[0] for f in sorted(theirs - mine))
    saved = ", ".join(sorted(theirs - mine)) or "no " + ", ".join(f.partition("=")[0] for f in sorted(mine - theirs))
    return f"has {_cut(rebuilt)} rebuilt, {_cut(saved)} saved"


def signature_difference(saved: Mapping[str, Any], model: nn.Module) -> str | None:
    """Where ``model`` first differs from the ``saved`` signature, in words; ``None`` when it does not.

    Example:
        >>> signature_difference(saved, timm.create_model("resnet18"))
        "module 'global_pool' (SelectAdaptivePool2d) has pool_type='avg' rebuilt, pool_type='max' saved"
    """
    own = architecture_signature(model)
    if own["digest"] == saved.get("digest"):
        return None
    theirs: Sequence[Sequence[Any]] = saved.get("modules") or []
    mine = own["modules"]
    for index in range(max(len(mine), len(theirs))):
        here = mine[index] if index < len(mine) else None
        there = theirs[index] if index < len(theirs) else None
        if here is not None and there is not None and list(here) == list(there):
            continue
        if there is None or len(there) != 4:
            return f"the rebuilt model has module {_entry(here)}, which the saved one has not"
        if here is None:
            return f"the saved model has module {_entry(there)}, which the rebuilt one has not"
        if here[0] != there[0]:
            return f"module {_entry(there)} of the saved model is {_entry(here)} in the rebuilt one"
        where = f"{there[0] or 'the root'!r}" if here[1] != there[1] else _entry(there)
        return f"module {where} {_changes(here, there)}"
    return "its layers differ"
