"""Fine-tuning helpers: select, freeze and train the inserted SE blocks.

SE blocks are found by type (:class:`~se_inject.se_block.SEBlock`), never by the substring ``"se"``
in a name: timm's ``seresnet*`` and EfficientNets have ``.se.`` modules of their own, and those
belong to the backbone. Typical use::

    model = inject_se(timm.create_model("resnet50", pretrained=True, num_classes=10))
    freeze_except_se(model, head=True)            # train SE blocks, norm affine parameters and the classifier
    optimizer = torch.optim.AdamW(param_groups(model, lr=1e-4))   # SE at the same lr: see param_groups
    ...
    remove_se(model)                              # back to the original blocks, exactly
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch import nn

from ..errors import NoSitesError, SEInjectError
from ..se_block import SEBlock

__all__ = [
    "HeadNotFoundError",
    "se_modules",
    "se_parameters",
    "se_state_dict_keys",
    "find_head",
    "freeze_except_se",
    "norm_modules",
    "NORM_TYPES",
    "param_groups",
]

#: Attribute names of classifier heads, in the order they are tried when a model has no
#: ``get_classifier`` (torchvision: ``fc`` for ResNets, ``classifier`` for MobileNets and
#: EfficientNets, ``heads`` for ViT, ``head`` for Swin).
_HEAD_ATTRS = ("fc", "classifier", "heads", "head", "last_linear")


#: Normalisation layers whose affine parameters ``freeze_except_se(norms=True)`` trains: batch, group,
#: layer, instance and RMS norms (timm's ``BatchNormAct2d``, ``LayerNorm2d`` and ``GroupNorm1`` subclass
#: these). Selected by type, like the SE blocks.
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


class HeadNotFoundError(SEInjectError, LookupError):
    """``head=True`` was asked for, but the model's classifier head could not be found."""


def se_modules(model: nn.Module) -> list[tuple[str, SEBlock]]:
    """The inserted SE blocks with their module paths (selected by type, never by name).

    Example:
        >>> model = inject_se(torchvision.models.resnet18())
        >>> [name for name, _ in se_modules(model)][:2]
        ['layer1.0.se', 'layer1.1.se']
    """
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SEBlock)]


def se_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Parameters of the inserted SE blocks, e.g. for an optimizer group with its own learning rate.

    Example:
        >>> optimizer = torch.optim.SGD([{"params": se_parameters(model), "lr": 1e-2}], lr=1e-3)
    """
    for _, block in se_modules(model):
        yield from block.parameters()


def se_state_dict_keys(model: nn.Module) -> list[str]:
    """The ``state_dict`` keys that belong to inserted SE blocks.

    After ``inject_se``, loading the original (pretrained) checkpoint with ``strict=False``
    reports exactly these keys as missing and nothing as unexpected.

    Example:
        >>> result = model.load_state_dict(pretrained_state, strict=False)
        >>> sorted(result.missing_keys) == sorted(se_state_dict_keys(model))
        True
    """
    keys = []
    for name, block in se_modules(model):
        prefix = f"{name}." if name else ""
        keys += [prefix + k for k in block.state_dict()]
    return keys


def find_head(model: nn.Module) -> nn.Module:
    """The classifier head of a timm or torchvision model.

    timm models name it through ``get_classifier()``; otherwise the first of the attributes
    ``fc``, ``classifier``, ``heads``, ``head``, ``last_linear`` that is a module with parameters.

    Example:
        >>> find_head(torchvision.models.resnet18()) is model.fc
        True

    Raises:
        HeadNotFoundError: the model has no head by these rules (pass the module itself).
    """
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        head = get_classifier()
        if isinstance(head, nn.Module) and any(True for _ in head.parameters()):
            return head
    for attr in _HEAD_ATTRS:
        head = getattr(model, attr, None)
        if isinstance(head, nn.Module) and any(True for _ in head.parameters()):
            return head
    raise HeadNotFoundError(
        f"cannot find the classifier head of {type(model).__name__} (no get_classifier() with parameters, "
        f"no {'/'.join(_HEAD_ATTRS)} attribute); pass the module itself: head=model.<your head>"
    )


def _resolve_head(model: nn.Module, head: nn.Module | str | bool | None) -> nn.Module | None:
    if head is None or head is False:
        return None
    if head is True:
        return find_head(model)
    if isinstance(head, str):
        try:
            return model.get_submodule(head)
        except AttributeError as e:
            raise HeadNotFoundError(f"{type(model).__name__} has no submodule {head!r} to use as head") from e
    if isinstance(head, nn.Module):
        return head
    raise TypeError(f"head must be a module, a module path, True or None, got {type(head).__name__}")


def norm_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The normalisation layers (:data:`NORM_TYPES`) with their module paths, selected by type."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, NORM_TYPES)]


def freeze_except_se(
    model: nn.Module, *, head: nn.Module | str | bool | None = None, norms: bool = True
) -> nn.Module:
    """Set ``requires_grad`` so only SE blocks, norm affine parameters (and the head, if asked) train.

    Training the norms' scale and shift with the SE blocks is the default because it beat the SE
    blocks alone on every seed of ``benchmarks/efficacy.py`` (``se_bn`` against ``se_adapter``) for
    a few thousand parameters more; ``norms=False`` trains the SE blocks (and head) alone. Changes
    ``model`` in place and only ``requires_grad``: BatchNorm layers in ``train()`` mode still update
    their running statistics; call ``.eval()`` on them as well to freeze those too.

    Args:
        model: a model with SE blocks inserted.
        head: also train this module: ``True`` for the model's classifier (see :func:`find_head`),
            a module path such as ``"fc"``, or the module itself.
        norms: also train the affine parameters (weight and bias) of every normalisation layer
            (:data:`NORM_TYPES`: BatchNorm, GroupNorm, LayerNorm, InstanceNorm, RMSNorm).

    Returns:
        ``model``.

    Example:
        >>> freeze_except_se(model, head=True)
        >>> {n for n, p in model.named_parameters() if p.requires_grad} <= {*se_keys, *norm_keys, "fc.weight", "fc.bias"}
        True
        >>> freeze_except_se(model, head=True, norms=False)   # SE blocks and head only

    Raises:
        HeadNotFoundError: ``head=True`` or a path, and no such head exists.
        NoSitesError: the model has no SE blocks (freezing everything else would train nothing).
    """
    head_module = _resolve_head(model, head)
    blocks = se_modules(model)
    if not blocks:
        raise NoSitesError(
            f"{type(model).__name__} has no SE blocks, so freezing all but them would train nothing; "
            "call inject_se(model) first"
        )
    model.requires_grad_(False)
    for _, block in blocks:
        block.requires_grad_(True)
    if norms:
        for _, norm in norm_modules(model):
            norm.requires_grad_(True)  # weight and bias; running statistics are buffers, untouched
    if head_module is not None:
        head_module.requires_grad_(True)
    return model


def param_groups(
    model: nn.Module,
    *,
    lr: float | None = None,
    se_lr: float | None = None,
    se_weight_decay: float | None = None,
    trainable_only: bool = True,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups: the SE blocks (own learning rate if given), then the rest.

    The default puts the SE blocks at the same learning rate as the rest, which is what the
    transfer experiment in ``benchmarks/results/efficacy.md`` supports: with AdamW, an SE
    learning rate 10x the backbone's left 37% of the last stage's gates at their bounds (0 or 2:
    channels switched off or doubled, where the gradient vanishes) for no change in accuracy;
    with SGD and momentum, 10x left every gate of the last stage within 0.02 of 1. Groups without
    parameters are left out, so the result can go straight to an optimizer.

    Args:
        model: a model with SE blocks inserted.
        lr: learning rate of every parameter that is not in an SE block (``None``: the optimizer's).
        se_lr: learning rate of the SE parameters (``None``: the same as ``lr``).
        se_weight_decay: weight decay of the SE parameters (``None``: the optimizer's default).
        trainable_only: leave out parameters with ``requires_grad=False`` (after ``freeze_except_se``).

    Example:
        >>> optimizer = torch.optim.AdamW(param_groups(model, lr=1e-4))  # SE blocks at 1e-4 too
        >>> [g["name"] for g in optimizer.param_groups]
        ['se', 'base']
    """
    if se_lr is None:
        se_lr = lr
    se_ids = {id(p) for p in se_parameters(model)}
    se, rest = [], []
    for p in model.parameters():
        if trainable_only and not p.requires_grad:
            continue
        (se if id(p) in se_ids else rest).append(p)
    groups: list[dict[str, Any]] = []
    if se:
        group: dict[str, Any] = {"params": se, "name": "se"}
        if se_lr is not None:
            group["lr"] = se_lr
        if se_weight_decay is not None:
            group["weight_decay"] = se_weight_decay
        groups.append(group)
    if rest:
        group = {"params": rest, "name": "base"}
        if lr is not None:
            group["lr"] = lr
        groups.append(group)
    return groups
