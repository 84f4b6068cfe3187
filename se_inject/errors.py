"""Exceptions raised by se-inject.

One base class, :class:`SEInjectError`, so callers (and the CLI) can catch everything of ours in
one place; each specific error also subclasses the built-in it refines, so code that already
catches ``ValueError`` or ``LookupError`` keeps working.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "SEInjectError",
    "ConfigError",
    "InputError",
    "SelectionError",
    "NoSitesError",
    "PlanMismatchError",
    "UnknownModelError",
    "WeightsError",
    "GateMismatchError",
    "CheckpointError",
    "UnsafeCheckpointError",
    "OutputPathError",
    "UnfaithfulRebuildError",
    "UnknownTagError",
    "ModelArgsError",
    "ArchitectureMismatchError",
]


class SEInjectError(Exception):
    """Base class of every error se-inject raises on purpose."""


class ConfigError(SEInjectError, ValueError):
    """An option has a bad value (reduction < 1, unknown gate, malformed glob, ...)."""


class InputError(ConfigError):
    """The analysis input does not fit the model (wrong channel count, no batch dimension, a
    structure the model does not take): the message says what the model's first layer expects."""


class SelectionError(ConfigError):
    """A selection names stages or resolutions the model does not have (the message lists
    the ones it has)."""


class NoSitesError(SEInjectError, ValueError):
    """The plan has no site, so there is nothing to insert.

    ``plan`` is that plan (a :class:`se_inject.plan.Plan`), when there is one: every skipped
    place with its reason. Typed ``Any`` because the plan module raises errors from here: an
    import back, even one for type checkers only, would make the two a cycle.
    """

    def __init__(self, message: str, plan: Any = None) -> None:
        super().__init__(message)
        self.plan = plan


class PlanMismatchError(SEInjectError, ValueError):
    """A plan does not fit the model it is applied to (missing owner or node).

    ``owner`` names the block that could not be rebuilt, when one block is to blame.
    """

    def __init__(self, message: str, owner: str | None = None) -> None:
        super().__init__(message)
        self.owner = owner


class UnknownModelError(SEInjectError, LookupError):
    """A model name is in neither timm's nor torchvision's registry."""


class WeightsError(SEInjectError, RuntimeError):
    """Weights could not be had, or do not fit the architecture."""


class GateMismatchError(WeightsError):
    """SE weights made for another gate: loaded, they would compute a different function."""


class CheckpointError(SEInjectError, ValueError):
    """A checkpoint file is missing, corrupt or not an se-inject checkpoint."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint would run code when unpickled; it was refused and nothing ran."""


class OutputPathError(SEInjectError, OSError):
    """An output file cannot be written there (missing folder, a directory, read-only place)."""


class UnfaithfulRebuildError(PlanMismatchError):
    """A rebuilt block does not compute what the original block computes on the example input
    (different outputs, or its forward raised); ``owner`` names it. Nothing was changed."""


class UnknownTagError(UnknownModelError):
    """A timm ``arch.tag`` name whose architecture exists but has no such pretrained tag (the
    message lists the tags it has)."""


class ModelArgsError(ConfigError):
    """Model constructor arguments the model does not take (an unknown key, a value it refuses),
    or one its library has no such argument for (``in_chans`` for torchvision)."""


class ArchitectureMismatchError(CheckpointError):
    """The model rebuilt from a checkpoint is not the architecture it was saved from (same keys
    and shapes, other layers or hyper-parameters): it was refused, not loaded. Rebuild the model
    as it was created and pass ``base_model=``."""
