"""Fine-tuning helpers: select, freeze and train the inserted SE blocks."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from .block import SEBlock

__all__ = ["se_modules", "se_parameters", "freeze_except_se"]


def se_modules(model: nn.Module) -> list[tuple[str, SEBlock]]:
    """The inserted SE blocks with their module paths (selected by type, never by name)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SEBlock)]


def se_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Parameters of the inserted SE blocks, e.g. for an optimizer group with its own learning rate."""
    for _, block in se_modules(model):
        yield from block.parameters()


def freeze_except_se(model: nn.Module, *, head: nn.Module | None = None) -> nn.Module:
    """Set ``requires_grad`` so only SE blocks (and ``head``, if given) train; changes ``model`` in place."""
    model.requires_grad_(False)
    for _, block in se_modules(model):
        block.requires_grad_(True)
    if head is not None:
        head.requires_grad_(True)
    return model
