"""The plan: where SE blocks go, what was skipped and why, as plain frozen data.

A plan holds no fx nodes or modules, so tests can compare plans, the CLI can print them and a
``weights_only`` checkpoint can store them (``to_dict`` / ``from_dict`` round-trip exactly).
"""

from __future__ import annotations

import enum
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import CheckpointError
from .request import SEConfig, Selection

__all__ = ["SiteKind", "SkipReason", "REASON_TEXT", "Site", "Skipped", "Unanalysed", "Plan", "PLAN_ATTR"]

#: Attribute of an injected model holding the plan it was built from (a plain attribute, not a
#: module or a state_dict entry), so ``save`` can record it.
PLAN_ATTR = "se_inject_plan"


class SiteKind(enum.StrEnum):
    # repr is the value, so a Site prints as Site(..., kind='residual', ...)
    def __repr__(self) -> str:
        return repr(self.value)

    RESIDUAL = "residual"
    INCEPTION = "inception"
    DENSE = "dense"
    PLAIN = "plain"


class SkipReason(enum.StrEnum):
    def __repr__(self) -> str:
        return repr(self.value)

    ALREADY_ATTENDED = "already-attended"
    NESTED = "nested"
    FUSION = "fusion"
    NO_TRUNK = "no-trunk"
    TOKEN_SEQUENCE = "token-sequence"
    NO_SPATIAL_EXTENT = "no-spatial-extent"
    UNKNOWN_CHANNEL_AXIS = "unknown-channel-axis"
    NOT_CHANNEL_CONCAT = "not-channel-concat"
    NO_COMPUTED_BRANCH = "no-computed-branch"
    EXCLUDED = "excluded"
    TOO_FEW_CHANNELS = "too-few-channels"
    NOT_REWRITABLE = "not-rewritable"
    NO_SPATIAL_CONV = "no-spatial-conv"
    LINEAR_BLOCK = "linear-block"
    UNKNOWN_BATCH_AXIS = "unknown-batch-axis"


#: One human sentence per reason; the enum value is for machines.
REASON_TEXT: dict[SkipReason, str] = {
    SkipReason.ALREADY_ATTENDED: "already has channel attention",
    SkipReason.NESTED: "nested inside another site's block (one SE per block)",
    SkipReason.FUSION: "fusion of features from different inputs or deep paths, not a residual",
    SkipReason.NO_TRUNK: "both operands are equally deep branches: no trunk to keep unscaled",
    SkipReason.TOKEN_SEQUENCE: "residual on a token sequence [B, N, C]; SE over tokens is opt-in",
    SkipReason.NO_SPATIAL_EXTENT: "feature vector without spatial axes: nothing to squeeze",
    SkipReason.UNKNOWN_CHANNEL_AXIS: "channel axis could not be inferred from the graph",
    SkipReason.NOT_CHANNEL_CONCAT: "concatenation along a non-channel axis",
    SkipReason.NO_COMPUTED_BRANCH: "no input is computed by parametric layers or pooling",
    SkipReason.EXCLUDED: "excluded by the selection (include/exclude, stage, resolution)",
    SkipReason.TOO_FEW_CHANNELS: "fewer channels than min_channels",
    SkipReason.NOT_REWRITABLE: "the block that owns it could not be rebuilt",
    SkipReason.NO_SPATIAL_CONV: "placement 'inner' needs a spatial convolution in the branch",
    SkipReason.LINEAR_BLOCK: (
        "parallel linear branches (no non-linearity between fork and merge) are one layer in disguise, "
        "re-parameterisable into a single convolution: no SE inside"
    ),
    SkipReason.UNKNOWN_BATCH_AXIS: (
        "which axis holds the samples could not be told (growing the batch did not run, or grew no "
        "single axis): a squeeze over it would mix the samples of a batch"
    ),
}


@dataclass(frozen=True)
class Site:
    """One SE block to insert.

    Attributes:
        name: module path the SE block will have, ``owner.attr`` (``layer1.0.se``).
        kind: residual, inception or dense.
        owner: path of the module whose forward is rebuilt ("" for the root).
        node: qualified name of the node that defines the site (the add or the concatenation).
        source: qualified name of the node whose output the SE block scales.
        targets: nodes whose ``source`` input is replaced by the SE output; empty means all uses.
        channels: channel count of ``source``.
        hidden: bottleneck width of the SE block.
        channel_axis: axis of ``source`` holding the channels (1, or -1 for channels-last).
        stage: index of the stage (run of blocks at one feature-map resolution) holding the site.
        inline: submodules of ``owner`` (paths relative to it) that must be traced through when
            the owner is rebuilt because ``source`` or ``targets`` lie inside them; all other
            submodules stay calls.
        prefix_tokens: leading tokens (class, distillation) left out of the squeeze.
        batch_axis: axis of ``source`` holding the samples of the batch (0; 1 for a time-first
            sequence ``[T, B, D]``): the squeeze pools each sample on its own. Plans saved
            before it was recorded load as 0, what their blocks assumed.
        spatial: the non-channel, non-batch sizes of ``source`` at the analysis input.
        owner_args: positional tensors the owner is called with, optional ones included (DLA's
            ``block(x, shortcut)``), a tuple of traced values counted as one; 0 means its
            required ones.
        owner_inputs: N when the last of the owner's ``owner_args`` is an N-tuple of traced
            values (DPN's ``(residual, dense)`` pair, Twins' ``(H, W)`` read from the input): it is
            traced with one input per element and its rebuilt forward takes the tuple; 0 when it
            takes tensors.
        config: how this site's SE block is built (a model injected twice with different
            options holds sites with different configs; each rebuilds as it was made).
        attach: how the SE block gets into the model. A path relative to ``owner`` (``"bn3"``,
            ``"conv"``; ``""`` for the owner itself): the module whose output is the scaled
            tensor, called once per forward, with no other reader; the SE block is attached to
            that output and the owner's code is not touched. ``None``: the owner is rebuilt
            from its trace with the SE call inserted (its branch ends in a functional value).
        slot: the owner's own forward already calls ``self.<attr>`` on the scaled tensor, a
            placeholder that is ``None`` (timm's blocks built without attention: ``self.se =
            None``), as its trace showed: the SE block fills the placeholder, nothing else changes.
    """

    name: str
    kind: SiteKind
    owner: str
    node: str
    source: str
    targets: tuple[str, ...]
    channels: int
    hidden: int
    channel_axis: int
    stage: int = 0
    inline: tuple[str, ...] = ()
    prefix_tokens: int = 0
    batch_axis: int = 0
    spatial: tuple[int, ...] = ()
    owner_args: int = 0
    owner_inputs: int = 0
    config: SEConfig = field(default_factory=SEConfig)
    attach: str | None = None
    slot: bool = False

    @property
    def attached(self) -> bool:
        """Whether the owner's code is left alone (a hook, or its own placeholder), else it is rebuilt."""
        return self.attach is not None or self.slot

    @property
    def mechanism(self) -> str:
        """How the SE block gets into the model: ``attached``, ``placeholder`` or ``rebuilt``."""
        return "placeholder" if self.slot else "attached" if self.attach is not None else "rebuilt"

    @property
    def attr(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    def added_params(self, bias: bool | None = None) -> int:
        """Parameters of this site's SE block (``bias`` overrides the site's own setting)."""
        bias = self.config.bias if bias is None else bias
        return 2 * self.channels * self.hidden + (self.hidden + self.channels if bias else 0)


@dataclass(frozen=True)
class Skipped:
    """A place that was considered and not used."""

    node: str
    reason: SkipReason
    detail: str = ""

    @property
    def text(self) -> str:
        return REASON_TEXT[self.reason]


@dataclass(frozen=True)
class Unanalysed:
    """A module that could not be analysed (placement rule 13: nothing is silently missed).

    ``path`` is the module path ("" for the root), ``reason`` why, in one line: the cause behind
    the error and the line of the model's code (``Block.forward uses len() on a traced value
    (model.py:42)``), else the error's first line.
    """

    path: str
    reason: str = ""

    def __str__(self) -> str:
        where = self.path or "(root)"
        return f"{where}: {self.reason}" if self.reason else where


@dataclass(frozen=True)
class Plan:
    """Sites, skipped sites and unanalysed modules, plus the request they answer.

    Each site carries its own block config; ``config`` and ``selection`` are the request of the
    latest injection (what ``find_sites`` was called with).
    """

    sites: tuple[Site, ...]
    skipped: tuple[Skipped, ...]
    unanalysed: tuple[Unanalysed, ...] = ()
    config: SEConfig = field(default_factory=SEConfig)
    #: what the analysis ran the model on (``Tensor[2, 3, 224, 224]``, ``list[Tensor[3, 64, 64]]``)
    input: str = ""
    #: which sites were asked for (with ``config``, the request this plan answers)
    selection: Selection = field(default_factory=Selection)
    #: modules whose code branched on sizes, decided at ``input``: the plan holds for that size
    specialised: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.sites)

    @property
    def added_params(self) -> int:
        return sum(site.added_params() for site in self.sites)

    def skipped_by_reason(self) -> dict[SkipReason, list[Skipped]]:
        grouped: dict[SkipReason, list[Skipped]] = {}
        for skip in self.skipped:
            grouped.setdefault(skip.reason, []).append(skip)
        return grouped

    def merged(self, later: Plan) -> Plan:
        """This plan followed by ``later`` (a second injection into the same model)."""
        return Plan(
            self.sites + later.sites, later.skipped, later.unanalysed, later.config, later.input, later.selection
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "sites": [
                {
                    **asdict(s),
                    "kind": str(s.kind),
                    "targets": list(s.targets),
                    "inline": list(s.inline),
                    "spatial": list(s.spatial),
                    "config": s.config.to_dict(),
                }
                for s in self.sites
            ],
            "skipped": [{**asdict(s), "reason": str(s.reason)} for s in self.skipped],
            "unanalysed": [asdict(u) for u in self.unanalysed],
            "config": self.config.to_dict(),
            "input": self.input,
            "selection": self.selection.to_dict(),
            "specialised": list(self.specialised),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        try:
            config = SEConfig.from_dict(data.get("config", {}))
            sites = tuple(
                Site(**{
                    **_known(Site, raw),
                    "kind": SiteKind(raw["kind"]),
                    "targets": tuple(raw["targets"]),
                    "inline": tuple(raw.get("inline", ())),
                    "spatial": tuple(raw.get("spatial", ())),
                    # Checkpoints before per-site configs hold one config for the whole plan.
                    "config": SEConfig.from_dict(raw["config"]) if "config" in raw else config,
                    # Plans saved before attaching existed rebuild every owner, as they were made.
                    "attach": _attach_path(raw.get("attach")),
                    "slot": raw.get("slot", False) is True,
                })
                for raw in data["sites"]
            )
            skipped = tuple(
                Skipped(**{**_known(Skipped, raw), "reason": SkipReason(raw["reason"])})
                for raw in data.get("skipped", ())
            )
            unanalysed = tuple(_unanalysed(raw) for raw in data.get("unanalysed", ()))
            selection = Selection.from_dict(data.get("selection", {}))  # plans before it was recorded: the default
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"malformed plan: {e}") from e
        specialised = tuple(str(w) for w in data.get("specialised", ()))
        return cls(sites, skipped, unanalysed, config, str(data.get("input", "")), selection, specialised)


def _attach_path(raw: Any) -> str | None:
    if raw is None or isinstance(raw, str):
        return raw
    raise TypeError(f"a site's attach is a module path or null, not {type(raw).__name__}")


def _unanalysed(raw: Any) -> Unanalysed:
    # Plans saved before reasons were recorded list bare module paths.
    if isinstance(raw, str):
        return Unanalysed(raw)
    return Unanalysed(**_known(Unanalysed, raw))


def _known(cls: type, raw: Mapping[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    unknown = set(raw) - names
    if unknown:
        warnings.warn(f"ignoring unknown plan keys {sorted(unknown)}", UserWarning, stacklevel=3)
    return {k: v for k, v in raw.items() if k in names}
