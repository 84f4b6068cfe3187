"""Parameter and multiply-add counts, before and after SE injection.

What is counted:

* **Parameters**: every distinct parameter tensor of the model (shared tensors once); buffers
  (BatchNorm statistics) are not parameters.
* **Multiply-adds (MACs)**: ``torch.utils.flop_counter.FlopCounterMode`` over one forward pass
  of a single input, halved (it counts 2 FLOPs per multiply-add). It has formulas for
  convolutions, matrix products and attention only; element-wise ops, normalisation, pooling
  and activations count as zero. The pass runs on meta tensors (the parameters swapped for meta
  stand-ins with ``torch.func.functional_call``: shapes only, no arithmetic; normalisation
  layers, which the counter has no formula for, just give their input's shape there instead of
  running torch's Python decomposition of meta batch norm), else on fake
  tensors, so ResNet-152 at 224x224 takes well under a second; models whose forward depends on
  data values (detection heads) fall back to a real forward pass on zeros.
* **SE costs**, per inserted :class:`~se_inject.se_block.SEBlock` and per sample:
  ``fc_macs`` = ``C*h + h*C``, the two bottleneck layers (exactly what FlopCounterMode adds);
  ``pool_adds`` = one addition per input element (the squeeze); ``scale_muls`` = one
  multiplication per input element (the reweighting). The last two are element-wise, so
  FlopCounterMode does not see them; they are reported apart from the MACs, never added to
  them. The per-channel gate (``2 * sigmoid``) is not counted.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from ..analysis.sandbox import preserved_state
from ..se_block import SEBlock

__all__ = ["SECost", "Count", "Complexity", "count_params", "count", "compare", "NOT_COUNTED"]

#: How the warning of a count whose forward passes all failed begins.
NOT_COUNTED = "multiply-adds not counted"


@dataclass(frozen=True)
class SECost:
    """Work done by one SE block for one sample (summed over its calls in a forward pass)."""

    name: str
    fc_macs: int
    pool_adds: int
    scale_muls: int


@dataclass(frozen=True)
class Count:
    """Parameters and multiply-adds of one model at one input size."""

    input_size: tuple[int, ...]
    params: int
    macs: int | None
    se: tuple[SECost, ...] = ()


def _pct(added: int, before: int) -> float:
    return 100.0 * added / before if before else 0.0


@dataclass(frozen=True)
class Complexity:
    """Before / after totals; ``macs_*`` are ``None`` when the model could not be counted."""

    input_size: tuple[int, ...]
    params_before: int
    params_after: int
    macs_before: int | None
    macs_after: int | None
    se: tuple[SECost, ...]

    @property
    def params_added(self) -> int:
        return self.params_after - self.params_before

    @property
    def params_added_pct(self) -> float:
        return _pct(self.params_added, self.params_before)

    @property
    def macs_added(self) -> int | None:
        if self.macs_before is None or self.macs_after is None:
            return None
        return self.macs_after - self.macs_before

    @property
    def macs_added_pct(self) -> float | None:
        added = self.macs_added
        return None if added is None or self.macs_before is None else _pct(added, self.macs_before)

    @property
    def se_fc_macs(self) -> int:
        return sum(c.fc_macs for c in self.se)

    @property
    def se_pool_adds(self) -> int:
        return sum(c.pool_adds for c in self.se)

    @property
    def se_scale_muls(self) -> int:
        return sum(c.scale_muls for c in self.se)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``--json``: ``params`` and ``macs`` with ``before``, ``after``, ``added``."""
        return {
            "input_size": list(self.input_size),
            "params": {
                "before": self.params_before,
                "after": self.params_after,
                "added": self.params_added,
                "added_pct": self.params_added_pct,
            },
            "macs": {
                "before": self.macs_before,
                "after": self.macs_after,
                "added": self.macs_added,
                "added_pct": self.macs_added_pct,
            },
            "se_ops": {
                "fc_macs": self.se_fc_macs,
                "pool_adds": self.se_pool_adds,
                "scale_muls": self.se_scale_muls,
            },
        }


def count_params(model: nn.Module) -> int:
    """Number of parameters (``model.parameters()`` yields each shared tensor once).

    Example:
        >>> count_params(timm.create_model("resnet50"))
        25557032
    """
    return sum(p.numel() for p in model.parameters())


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    # Batch-1 BatchNorm in training mode fails on 1x1 maps. The sandbox restores each module's
    # own flag after, and whatever the counting forwards cached on the modules.
    with preserved_state(model):
        model.eval()
        yield


def _device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _meta_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Meta stand-ins for every parameter and buffer, by name (``torch.func.functional_call``)."""
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return {name: torch.empty_like(t, device="meta") for name, t in named if t is not None}


#: Normalisations: no multiply-adds in FlopCounterMode (it has no formula for them), a Python
#: decomposition each on the meta device (most of a ResNet's meta forward).
_NORMS = frozenset({F.batch_norm, F.instance_norm, F.layer_norm, F.group_norm})
#: Whether this torch counts some normalisation: then the shortcut would undercount, and is off.
_NORMS_COUNTED = any("norm" in str(op) for op in flop_registry)


class _ShapeOnlyNorms(TorchFunctionMode):
    """On meta tensors, a normalisation returns an empty tensor of its input's shape (its output's)."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if not _NORMS_COUNTED and func in _NORMS and args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            return torch.empty_like(args[0])
        return func(*args, **(kwargs or {}))


def _forward_macs(model: nn.Module, input_size: Sequence[int], *, way: str) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        if way == "meta":
            # Parameters swapped for meta tensors for the call: shapes only, no copy of the model
            # and no fake-tensor wrapping (about twice as fast for a ResNet-50).
            from torch.func import functional_call

            with _ShapeOnlyNorms():
                functional_call(model, _meta_state(model), (torch.empty(1, *input_size, device="meta"),), strict=False)
        elif way == "fake":
            # torch's own fake tensors (the mode the flop counter's docs use): shapes without
            # arithmetic; real parameters are wrapped on the fly, the model is not copied.
            from torch._subclasses.fake_tensor import FakeTensorMode

            with FakeTensorMode(allow_non_fake_inputs=True):
                model(torch.empty(1, *input_size))
        else:
            model(torch.zeros(1, *input_size, device=_device(model)))
    return counter.get_total_flops() // 2


def count(model: nn.Module, input_size: Sequence[int]) -> Count:
    """Count parameters, multiply-adds and per-SE-block costs of ``model`` for one input.

    ``input_size`` excludes the batch (``(3, 224, 224)``). The model is not changed (its
    train/eval flags, attributes, caches and the RNG state are restored). When no meta, fake or real forward pass works, ``macs``
    is ``None`` and a :class:`UserWarning` says why.

    Example:
        >>> count(timm.create_model("resnet50"), (3, 224, 224)).macs
        4089184256
    """
    size = tuple(int(s) for s in input_size)
    calls: dict[str, list[int]] = {}  # SE block name -> [calls, input elements per sample]
    blocks: dict[str, SEBlock] = {}
    macs: int | None = None
    # The sandbox first: the user's hooks are off in it, the counters registered inside run.
    with _eval_mode(model):
        handles = []
        for name, block in model.named_modules():
            if isinstance(block, SEBlock):
                calls[name] = [0, 0]
                blocks[name] = block

                def hook(_: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
                    x = args[0]
                    calls[name][0] += 1
                    calls[name][1] += x.numel() // max(1, x.shape[0])

                handles.append(block.register_forward_pre_hook(hook))
        try:
            errors = []
            for way in ("meta", "fake", "real"):
                for value in calls.values():
                    value[:] = [0, 0]
                try:
                    macs = _forward_macs(model, size, way=way)
                    break
                except Exception as e:  # any failure of a forward pass: try the next way, then give up
                    errors.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            else:
                warnings.warn(
                    f"{NOT_COUNTED}: a forward pass at input size {size} failed ({errors[-1]})",
                    UserWarning,
                    stacklevel=2,
                )
        finally:
            for handle in handles:
                handle.remove()
    se = []
    for name, (n_calls, elements) in calls.items():
        block = blocks[name]
        fc = block.fc1.in_features * block.fc1.out_features + block.fc2.in_features * block.fc2.out_features
        se.append(SECost(name, fc * n_calls, elements, elements))
    return Count(size, count_params(model), macs, tuple(se))


def compare(before: Count, after: Count) -> Complexity:
    """Combine the counts of the base model and the injected model.

    Example:
        >>> before = count(model, (3, 224, 224))
        >>> after = count(inject_se(model), (3, 224, 224))
        >>> compare(before, after).params_added      # timm resnet50, r = 16
        2530992

    Raises:
        ValueError: the two counts are at different input sizes.
    """
    if before.input_size != after.input_size:
        raise ValueError(f"counts at different input sizes: {before.input_size} vs {after.input_size}")
    return Complexity(before.input_size, before.params, after.params, before.macs, after.macs, after.se)
