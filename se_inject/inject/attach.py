"""Attaching an SE block to a module's output, without touching the code of the block that owns it.

The mechanism is a forward hook on the module whose output the site scales (``bn3`` of a
ResNet bottleneck, the ``conv`` Sequential of an inverted residual), as ``torch.ao``'s eager
observers and FSDP attach behaviour; the SE block itself is registered on the owner under the
site's name, so its keys read ``layer1.0.se.fc1.weight`` and every original key stays. The hook
is a picklable object holding the SE block, so ``copy.deepcopy`` and ``torch.save(model)`` keep
it (the copy's hook holds the copy's SE block).

A hooked module stays the same object, so a traced copy (``torch.fx.symbolic_trace``,
torchvision's ``create_feature_extractor``, ``torch.jit.trace``) that calls it runs the hook, and
one that traces through it records the SE call. A hooked torch.nn leaf (a BatchNorm, a Conv)
gets a subclass of its own class, same name and module (FSDP2's ``fully_shard`` swaps classes
the same way): ``isinstance`` and every tracer's leaf rule still hold, but fusers that match
exact types (``torch.ao.quantization.fuse_modules``, fx's conv-BN ``fuse``) no longer take it
for a plain BatchNorm: ``fuse_modules`` refuses loudly and fx's ``fuse`` leaves that pair alone,
instead of fusing the SE block away.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import PlanMismatchError
from ..plan import Site
from ..se_block import NOT_SCRIPTABLE, SEBlock, SEHook

__all__ = ["PLACEHOLDER_FLAG", "placement", "se_block_for", "SEHook", "attach", "detach", "attached_hooks", "attachments", "base_class", "is_marked",
           "SEGuard", "guard", "guarded", "unguard", "take_off"]


def placement(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of ``module``'s first floating-point tensor (CPU and the default dtype
    when it has none): where SE blocks and the check's inputs are made."""
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def se_block_for(site: Site, near: nn.Module) -> SEBlock:
    """The site's SE block, built as its config says, on the device and dtype of ``near`` (the
    owner) and in its train/eval mode."""
    device, dtype = placement(near)
    block = SEBlock(
        site.channels,
        site.hidden,
        channel_axis=site.channel_axis,
        bias=site.config.bias,
        gate=site.config.gate,
        pool=site.config.pool,
        identity_init=site.config.identity_init,
        prefix_tokens=site.prefix_tokens,
        batch_axis=site.batch_axis,
        device=device,
        dtype=dtype,
    )
    return block.train(near.training)


#: Set on an SE block that fills its owner's ``None`` placeholder, so the base model's
#: signature still reads ``se=None`` there (``io.signature``) and ``remove_se`` puts it back.
PLACEHOLDER_FLAG = "_se_fills_placeholder"

_MARKED: dict[type, type] = {}


def _new_marked(base: type) -> nn.Module:
    """Unpickling and copying: an empty instance of ``base``'s marked class (state follows)."""
    cls = _marked(base)
    return cls.__new__(cls)


def _reduce_marked(self: nn.Module, protocol: int) -> tuple[Any, ...]:
    # reason: the marked class is made at run time; pickle it as its base plus the state, and
    # make the class again on load (a copy in another process has the same hook and class).
    return (_new_marked, (base_class(self),), self.__dict__.copy())


def _fx_leaf(module: nn.Module) -> bool:
    """What ``torch.fx.Tracer.is_leaf_module`` answers by default (its rule, restated)."""
    name = type(module).__module__
    return (name.startswith("torch.nn") or name.startswith("torch.ao.nn")) and not isinstance(module, nn.Sequential)


def _marked(base: type) -> type:
    cls = _MARKED.get(base)
    if cls is None:
        body = {"__module__": base.__module__, "__qualname__": base.__qualname__, "__reduce_ex__": _reduce_marked,
                "_se_base": base}
        cls = _MARKED[base] = type(base.__name__, (base,), body)
    return cls


def is_marked(module: nn.Module) -> bool:
    """Whether ``module``'s class is a marked subclass made here."""
    return base_class(module) is not type(module)


def base_class(module: nn.Module) -> type:
    """The module's own class: the one it had before an SE block was attached to it."""
    for cls in type(module).__mro__:
        base = cls.__dict__.get("_se_base")
        if base is not None:
            return base
    return type(module)


def attached_hooks(module: nn.Module) -> list[tuple[int, SEHook]]:
    """The SE hooks on ``module``, with their handle ids."""
    return [(key, hook) for key, hook in module._forward_hooks.items() if isinstance(hook, SEHook)]


def attach(module: nn.Module, se: SEBlock, *, first: bool = False) -> None:
    """Scale ``module``'s output with ``se`` from now on. ``first``: before the module's other
    forward hooks (the owner's own output: its users' hooks see the block's output with SE)."""
    if _fx_leaf(module) and not is_marked(module):
        module.__class__ = _marked(type(module))
    module.register_forward_hook(SEHook(se), prepend=first)


def detach(module: nn.Module, se: SEBlock | None = None) -> None:
    """Take ``se`` (every SE block, when None) off ``module``; its class comes back with the last."""
    for key, hook in attached_hooks(module):
        if se is None or hook.se is se:
            del module._forward_hooks[key]
            for store in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
                getattr(module, store, {}).pop(key, None)
    if not attached_hooks(module) and is_marked(module):
        module.__class__ = base_class(module)


class SEGuard:
    """Forward pre-hook on an owner with attached SE blocks: each attached module must still be
    where the plan put it. A module swapped under the same name (a deploy method fusing conv+BN
    into a conv and an ``Identity``) takes the SE hook over, so the SE block keeps scaling that
    place; a name that is gone (a re-parameterisation that deletes the branch) makes the owner
    refuse to run, instead of silently running without its SE block."""

    se_inject_own = True  # see SEHook

    def __init__(self) -> None:
        self.sites: list[tuple[str, str, SEBlock]] = []  # (site name, attach path, SE block)

    @property
    def __name__(self) -> str:
        raise AttributeError(NOT_SCRIPTABLE)  # see SEHook

    def __call__(self, owner: nn.Module, args: tuple[Any, ...]) -> None:
        for name, path, se in self.sites:
            try:
                current = owner.get_submodule(path) if path else owner
            except AttributeError:
                raise PlanMismatchError(
                    f"{type(owner).__name__} no longer has {path!r}, which the SE block {name} is attached to "
                    "(a method changed the block); it refuses to run rather than run without it. Call such "
                    "methods before inject_se, or remove_se(model), call them, and inject again",
                    owner=name.rpartition(".")[0],
                ) from None
            if not any(hook.se is se for _, hook in attached_hooks(current)):
                attach(current, se)


def guard(owner: nn.Module, name: str, path: str, se: SEBlock) -> None:
    """Have ``owner`` check, before each forward, that ``se`` still scales what is at ``path``."""
    found = [hook for hook in owner._forward_pre_hooks.values() if isinstance(hook, SEGuard)]
    keeper = found[0] if found else SEGuard()
    if not found:
        owner.register_forward_pre_hook(keeper)
    keeper.sites.append((name, path, se))


def guarded(owner: nn.Module) -> list[tuple[str, str, SEBlock]]:
    """The (site name, attach path, SE block) entries ``owner`` guards."""
    return [entry for hook in owner._forward_pre_hooks.values() if isinstance(hook, SEGuard) for entry in hook.sites]


def unguard(owner: nn.Module, se: SEBlock) -> None:
    """Stop guarding ``se``; the guard goes when it guards nothing."""
    for key, hook in list(owner._forward_pre_hooks.items()):
        if isinstance(hook, SEGuard):
            hook.sites = [entry for entry in hook.sites if entry[2] is not se]
            if not hook.sites:
                del owner._forward_pre_hooks[key]
                getattr(owner, "_forward_pre_hooks_with_kwargs", {}).pop(key, None)


def take_off(model: nn.Module, chosen: Callable[[str, Sequence[str]], bool]) -> set[str]:
    """Take every attached or placeholder SE block that ``chosen(owner path, [attr])`` picks off
    ``model``: hooks and guards removed, the module's class and the owner's ``None`` placeholder
    back. Returns the SE modules' names."""
    holders = {id(child): (path, parent, key) for path, parent in model.named_modules()
               for key, child in parent._modules.items() if child is not None}
    removed: set[str] = set()

    def drop(path: str, owner: nn.Module, attr: str) -> None:
        se = owner._modules[attr]
        if se.__dict__.get(PLACEHOLDER_FLAG):  # the owner's own slot: back to None
            del owner._modules[attr]
            owner.__dict__[attr] = None
        else:
            delattr(owner, attr)
        removed.add(f"{path}.{attr}" if path else attr)

    # Guarded owners first: they know their SE blocks even when the module held is gone.
    for path, owner in list(model.named_modules()):
        for name, attach_path, se in guarded(owner):
            attr = holders.get(id(se), ("", None, name.rpartition(".")[2]))[2]
            if chosen(path, [attr]):
                try:
                    detach(owner.get_submodule(attach_path), se)
                except AttributeError:
                    pass  # a method of the owner deleted that module: nothing left to unhook
                unguard(owner, se)
                if owner._modules.get(attr) is se:
                    drop(path, owner, attr)
    for _, module, hook in list(attachments(model)):  # an owner's own output: no guard
        path, owner, attr = holders.get(id(hook.se), ("", None, ""))
        if owner is None or chosen(path, [attr]):
            detach(module, hook.se)
            if owner is not None:
                drop(path, owner, attr)
    for path, owner, attr in list(holders.values()):
        held = owner._modules.get(attr)
        if isinstance(held, SEBlock) and held.__dict__.get(PLACEHOLDER_FLAG) and chosen(path, [attr]):
            drop(path, owner, attr)
    return removed


def attachments(model: nn.Module) -> Iterator[tuple[str, nn.Module, SEHook]]:
    """Every (path, module, hook) of an attached SE block in ``model``."""
    for path, module in model.named_modules():
        for _, hook in attached_hooks(module):
            yield path, module, hook
