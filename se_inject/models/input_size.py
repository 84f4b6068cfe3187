"""A model's declared input size: the one rule the API and the CLI share.

Analysis only needs shapes, but shapes decide resolutions, stages and which concatenations
join different scales, so a model is analysed at the size it was made for when it says so:

1. timm: the size ``timm.data.resolve_model_data_config`` gives (the pretrained config's
   ``input_size``), with the model's own channel count (its ``in_chans``,
   else its ``first_conv``'s input channels): a model created with ``in_chans=1`` reads 1 channel,
   though its ``pretrained_cfg`` still says 3;
2. transformers: ``config.image_size`` (and ``config.num_channels``);
3. torchvision: the crop size of the DEFAULT weights of the builder that makes this
   architecture (``efficientnet_b7`` 600, ``vit_h_14`` 518, ``swin_v2_t`` 256,
   ``inception_v3`` 299), found through ``torchvision.models.list_models`` and
   ``get_model_builder``; where one class has several builders (EfficientNet B0-B7), the one
   whose parameter names and shapes match, built on the meta device (nothing is allocated);
4. else 224 px (3-D convolutions: 16 frames of 112 px, torchvision's video clips).

Channels come from the first convolution (any subclass of ``nn.Conv1d/2d/3d``) unless the
model declares them.
"""

from __future__ import annotations

import functools
import inspect
import logging
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["model_input_size", "example_input", "DEFAULT_SIDE"]

#: Side of the square input used when a model declares nothing.
DEFAULT_SIDE = 224
_VIDEO_CLIP = (16, 112, 112)


def model_input_size(model: nn.Module) -> tuple[int, ...] | None:
    """Input shape without the batch axis, e.g. ``(3, 224, 224)``; None when no convolution
    or linear layer says what the model reads.

    Example:
        >>> model_input_size(torchvision.models.efficientnet_b7())
        (3, 600, 600)
    """
    declared = _timm_size(model)
    if declared is not None:
        return declared
    first = _first_layer(model)
    if first is None:
        return None
    if isinstance(first, nn.Linear):
        return (first.in_features,)
    channels = _config_channels(model) or first.in_channels
    side = _transformers_side(model) or _attribute_side(model) or _torchvision_side(model)
    if isinstance(first, nn.Conv3d):
        return (channels, _VIDEO_CLIP[0], side, side) if side else (channels, *_VIDEO_CLIP)
    side = side or DEFAULT_SIDE
    return (channels, side) if isinstance(first, nn.Conv1d) else (channels, side, side)


def example_input(model: nn.Module, batch: int = 2) -> torch.Tensor | None:
    """An empty tensor of the model's input size on its device and dtype (analysis reads
    shapes only), or None when the size is unknown."""
    size = model_input_size(model)
    if size is None:
        return None
    ref = next(iter(model.parameters()), None)
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.get_default_dtype()
    device = ref.device if ref is not None else torch.device("cpu")
    return torch.empty((batch, *size), dtype=dtype, device=device)


def _first_layer(model: nn.Module) -> nn.Module | None:
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) or isinstance(m, nn.Linear):
            return m
    return None


def _timm_size(model: nn.Module) -> tuple[int, ...] | None:
    """The size timm's data config resolves for the model (``resolve_model_data_config``: its
    pretrained config's train-time ``input_size``), with the model's own channel count."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if not (isinstance(cfg, Mapping) and cfg.get("input_size")):
        return None  # timm would answer 224 px for any model: the other sources know better
    from timm.data import resolve_model_data_config  # a model with a pretrained_cfg came from timm

    size = tuple(int(s) for s in resolve_model_data_config(model, pretrained_cfg=dict(cfg))["input_size"])
    channels = _timm_channels(model, cfg)
    return (channels, *size[1:]) if channels is not None and len(size) >= 2 else size


def _timm_channels(model: nn.Module, cfg: Mapping[str, Any]) -> int | None:
    """The input channels of a timm model: its ``in_chans`` attribute (timm models keep it), else
    its first convolution's (``first_conv`` names it; not first: TResNet's space-to-depth stem
    gives that convolution 16 times the image's channels); None when it says neither."""
    channels = getattr(model, "in_chans", None)
    if isinstance(channels, int) and not isinstance(channels, bool) and channels > 0:
        return channels
    first = cfg.get("first_conv")
    names = [first] if isinstance(first, str) else list(first) if isinstance(first, (tuple, list)) else []
    for name in names:
        try:
            conv = model.get_submodule(str(name))
        except AttributeError:
            continue
        if isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return int(conv.in_channels)
    return None


def _config(model: nn.Module) -> Any:
    cfg = getattr(model, "config", None)
    return None if cfg is None or isinstance(cfg, (Mapping, str, int, float)) else cfg


def _config_channels(model: nn.Module) -> int | None:
    channels = getattr(_config(model), "num_channels", None)
    return channels if isinstance(channels, int) and channels > 0 else None


def _side(value: Any) -> int | None:
    if isinstance(value, int) and value > 0:
        return value
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, int) and v > 0 for v in value):
        return int(max(value))
    return None


def _transformers_side(model: nn.Module) -> int | None:
    return _side(getattr(_config(model), "image_size", None))


def _attribute_side(model: nn.Module) -> int | None:
    # torchvision's VisionTransformer checks its input against ``image_size``.
    return _side(getattr(model, "image_size", None))


def _torchvision_side(model: nn.Module) -> int | None:
    cls = type(model)
    if not cls.__module__.startswith("torchvision.models"):
        return None
    sizes = _builder_crops(cls)
    if not sizes:
        return None
    if len(set(sizes.values())) == 1:
        return next(iter(sizes.values()))
    return _matching_crop(model, sizes)


@functools.cache
def _builder_crops(cls: type[nn.Module]) -> dict[str, int]:
    """Crop size of the DEFAULT weights of every torchvision builder returning ``cls``."""
    import torchvision

    crops: dict[str, int] = {}
    for name in torchvision.models.list_models():
        builder = torchvision.models.get_model_builder(name)
        if inspect.signature(builder).return_annotation is not cls:
            continue
        try:
            weights = torchvision.models.get_model_weights(name).DEFAULT
            side = _side(getattr(weights.transforms(), "crop_size", None))
        except Exception as e:  # noqa: BLE001 - a builder without weights or transforms: no size
            log.debug("no crop size for %s: %s", name, e)
            continue
        if side is not None:
            crops[name] = side
    return crops


def _matching_crop(model: nn.Module, sizes: dict[str, int]) -> int | None:
    mine = _shape_signature(model)
    best: tuple[int, str] | None = None
    for name in sizes:
        theirs = _meta_signature(name)
        if theirs is None:
            continue
        if theirs == mine:
            return sizes[name]
        score = len(mine & theirs) if len(mine) == len(theirs) else -1
        if score >= 0 and (best is None or score > best[0]):
            best = (score, name)
    return sizes[best[1]] if best is not None else None


def _shape_signature(model: nn.Module) -> frozenset[tuple[str, tuple[int, ...]]]:
    return frozenset((k, tuple(v.shape)) for k, v in model.state_dict().items())


@functools.cache
def _meta_signature(name: str) -> frozenset[tuple[str, tuple[int, ...]]] | None:
    """Parameter names and shapes of ``name`` built without weights on the meta device."""
    import torchvision

    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            built = torchvision.models.get_model_builder(name)(weights=None)
    except Exception as e:  # noqa: BLE001 - a builder that cannot run on meta tensors is not a match
        log.debug("could not build %s on the meta device: %s", name, e)
        return None
    return _shape_signature(built)
