"""Vision models of other libraries for the zoo sweep, built from their configs.

Random init, nothing downloaded: transformers models from small configs (the architectures of
the hub's checkpoints, fewer and narrower layers so a row takes seconds), ultralytics YOLO from
the model yaml files it ships. Each library is optional (the ``zoo`` extra of the project);
rows of a library that is not installed are left out with a note.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

from torch import nn

__all__ = ["BUILDERS", "available", "build"]


def _transformers(name: str) -> nn.Module:
    import transformers as T

    small = {"hidden_sizes": [32, 64, 128, 256], "depths": [1, 1, 2, 1]}
    configs: dict[str, Callable[[], nn.Module]] = {
        "ResNetModel": lambda: T.ResNetModel(T.ResNetConfig(embedding_size=32, layer_type="bottleneck", **small)),
        "ResNetModel-basic": lambda: T.ResNetModel(T.ResNetConfig(embedding_size=32, layer_type="basic", **small)),
        "ConvNextModel": lambda: T.ConvNextModel(T.ConvNextConfig(**small)),
        "ConvNextV2Model": lambda: T.ConvNextV2Model(T.ConvNextV2Config(**small)),
        "RegNetModel": lambda: T.RegNetModel(T.RegNetConfig(embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 2, 1], groups_width=16)),
        "BitModel": lambda: T.BitModel(T.BitConfig(embedding_size=32, num_groups=8, **small)),
        "MobileNetV2Model": lambda: T.MobileNetV2Model(T.MobileNetV2Config(depth_multiplier=0.35)),
        "EfficientNetModel": lambda: T.EfficientNetModel(T.EfficientNetConfig(width_coefficient=0.25, depth_coefficient=0.5, image_size=128)),
        "PoolFormerModel": lambda: T.PoolFormerModel(T.PoolFormerConfig(hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 2, 1])),
        "SegformerModel": lambda: T.SegformerModel(T.SegformerConfig(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], decoder_hidden_size=64)),
        "SwinModel": lambda: T.SwinModel(T.SwinConfig(image_size=128, embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], window_size=4)),
        "Dinov2Model": lambda: T.Dinov2Model(T.Dinov2Config(image_size=112, patch_size=14, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)),
        "ViTModel": lambda: T.ViTModel(T.ViTConfig(image_size=64, patch_size=16, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)),
    }
    return configs[name]()


def _ultralytics(name: str) -> nn.Module:
    from ultralytics.nn.tasks import DetectionModel

    return DetectionModel(f"{name}.yaml", verbose=False)


#: ``library:name`` -> the library's module name and a builder.
BUILDERS: dict[str, tuple[str, Callable[[str], nn.Module]]] = {
    **{f"transformers:{n}": ("transformers", _transformers) for n in (
        "ResNetModel", "ResNetModel-basic", "ConvNextModel", "ConvNextV2Model", "RegNetModel", "BitModel",
        "MobileNetV2Model", "EfficientNetModel", "PoolFormerModel", "SegformerModel", "SwinModel", "Dinov2Model",
        "ViTModel",
    )},
    **{f"ultralytics:{n}": ("ultralytics", _ultralytics) for n in ("yolov8n", "yolo11n")},
}


def available(key: str) -> bool:
    """Whether the library of ``key`` is installed."""
    return importlib.util.find_spec(BUILDERS[key][0]) is not None


def build(key: str) -> nn.Module:
    """The model ``library:name``, random init, in eval mode."""
    _, builder = BUILDERS[key]
    return builder(key.split(":", 1)[1]).eval()
