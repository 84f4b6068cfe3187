"""Placement rule 10: a merge whose region is linear is one layer in disguise (RepVGG, MixConv),
and so are normalisations of channel slices concatenated back (IBN layers)."""

from __future__ import annotations

import torch
import torch.fx as fx

from ..analysis.axes import channel_slice_of
from ..analysis.ops import is_linear, is_norm, is_scaling
from .records import Unit

__all__ = ["linear_block", "split_norm"]


def linear_block(unit: Unit, region: set[fx.Node], cost: dict[fx.Node, int]) -> str | None:
    """Rule 10: a merge whose whole region from the fork is linear and holds several parallel
    parametric paths (RepVGG, MobileOne, MixedConv) or none at all (a bare pooling mixer) is one
    layer in disguise; a detail string, or ``None`` for a real block. A single linear path
    beside an identity (``x + bn(conv(x))``) stays a residual."""
    flow = unit.flow
    nonlinear = next((n for n in region if not is_linear(flow, n)), None)
    if nonlinear is not None:
        return None
    heads = [n for n in region if cost.get(n) == 1 and flow.is_parametric(n) and not is_scaling(flow, n)]
    if len(heads) == 1:
        return None
    if not heads:
        return "no parametric layer and no non-linearity between fork and merge"
    names = sorted(unit.names[n] for n in heads)
    return f"{len(heads)} parallel linear paths ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"


def split_norm(unit: Unit, fork: fx.Node, region: set[fx.Node]) -> str | None:
    """Rule 10 for a concatenation: every node between ``fork`` and it is a channel slice of the
    fork or a normalisation (IBN's ``cat([IN(x[:, :h]), BN(x[:, h:])])``): one normalisation
    layer applied per channel group, with no non-linearity, like a split convolution; a detail
    string, or ``None`` for anything else."""
    flow = unit.flow
    norms = sorted(unit.names[n] for n in region if is_norm(unit.module, n))
    if not norms:
        return None
    for n in region:
        sliced = channel_slice_of(flow, n) is fork
        split = not isinstance(n.meta.get("val"), torch.Tensor) and flow.live_inputs(n) == [fork]
        if not (sliced or split or is_norm(unit.module, n)):
            return None
    return f"normalisations of channel slices of {unit.names[fork]} ({', '.join(norms)}): one normalisation layer"
