"""Models of other libraries for the zoo sweep, built from their configs.

Random init, nothing downloaded: transformers models from small configs (the architectures of
the hub's checkpoints, fewer and narrower layers so a row takes seconds), ultralytics YOLO from
the model yaml files it ships. Each library is optional (the ``zoo`` extra of the project);
rows of a library that is not installed are left out with a note.

Two parts: vision models, run on images like the rest of the sweep, and sequence models
(``SEQUENCE``: speech encoders, audio codecs, vocoders, text-to-speech), each with its own
example input: a waveform ``[B, L]``, filter-bank features ``[B, T, 80]`` or ``[B, 80, T]``,
audio ``[B, C, L]``, token ids ``[B, N]``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

__all__ = ["BUILDERS", "SEQUENCE", "NOT_COVERED", "SequenceModel", "available", "build", "example_input"]


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


# Speech encoders of the wav2vec2 family share their layout: a convolutional feature encoder
# (stride 20 here) over the waveform, then a transformer encoder on [B, T, D].
_W2V = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, conv_dim=(32, 32, 32),
            conv_stride=(5, 2, 2), conv_kernel=(10, 3, 3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)
_TEXT = dict(d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
             encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=100, pad_token_id=1, bos_token_id=2, eos_token_id=2,
             decoder_start_token_id=2)


def _transformers_sequence(name: str) -> nn.Module:
    import transformers as T

    configs: dict[str, Callable[[], nn.Module]] = {
        "Wav2Vec2Model": lambda: T.Wav2Vec2Model(T.Wav2Vec2Config(**_W2V)),
        # the large checkpoints' layout: layer-normed feature encoder, pre-norm transformer layers
        "Wav2Vec2Model-stable": lambda: T.Wav2Vec2Model(T.Wav2Vec2Config(**_W2V, feat_extract_norm="layer", do_stable_layer_norm=True)),
        "HubertModel": lambda: T.HubertModel(T.HubertConfig(**_W2V)),
        "WavLMModel": lambda: T.WavLMModel(T.WavLMConfig(**_W2V)),
        "Wav2Vec2ConformerModel": lambda: T.Wav2Vec2ConformerModel(T.Wav2Vec2ConformerConfig(**_W2V, conv_depthwise_kernel_size=7)),
        "SEWModel": lambda: T.SEWModel(T.SEWConfig(**_W2V, squeeze_factor=2)),
        "SEWDModel": lambda: T.SEWDModel(T.SEWDConfig(**_W2V, squeeze_factor=2, max_position_embeddings=64, position_buckets=16)),
        "Data2VecAudioModel": lambda: T.Data2VecAudioModel(T.Data2VecAudioConfig(**_W2V)),
        "UniSpeechSatModel": lambda: T.UniSpeechSatModel(T.UniSpeechSatConfig(**_W2V)),
        "Wav2Vec2BertModel": lambda: T.Wav2Vec2BertModel(T.Wav2Vec2BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, feature_projection_input_dim=160,
            conv_depthwise_kernel_size=7, output_hidden_size=32)),
        "Speech2TextEncoder": lambda: T.Speech2TextModel(T.Speech2TextConfig(
            **_TEXT, conv_channels=32, input_feat_per_channel=80, max_source_positions=64)).get_encoder(),
        "WhisperEncoder": lambda: T.WhisperModel(T.WhisperConfig(**_TEXT, num_mel_bins=80, max_source_positions=50)).get_encoder(),
        "ParakeetEncoder": lambda: T.ParakeetEncoder(T.ParakeetEncoderConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, conv_kernel_size=7,
            subsampling_conv_channels=32, num_mel_bins=80)),
        "EncodecModel": lambda: T.EncodecModel(T.EncodecConfig(
            num_filters=8, hidden_size=32, upsampling_ratios=[4, 4], num_lstm_layers=1, codebook_size=64,
            target_bandwidths=[1.5], sampling_rate=800)),
        "DacModel": lambda: T.DacModel(T.DacConfig(
            encoder_hidden_size=8, downsampling_ratios=[2, 4], decoder_hidden_size=32, upsampling_ratios=[4, 2], hidden_size=32,
            n_codebooks=2, codebook_size=64, codebook_dim=4)),
        "MimiModel": lambda: T.MimiModel(T.MimiConfig(
            hidden_size=32, num_filters=8, upsampling_ratios=[4, 4], num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2, head_dim=16, intermediate_size=64, codebook_size=64, codebook_dim=16, num_quantizers=2,
            num_semantic_quantizers=1, sliding_window=32, upsample_groups=32, vector_quantization_hidden_dimension=16,
            sampling_rate=800, max_position_embeddings=64)),
        "SpeechT5HifiGan": lambda: T.SpeechT5HifiGan(T.SpeechT5HifiGanConfig(
            model_in_dim=80, upsample_initial_channel=32, upsample_rates=[4, 4], upsample_kernel_sizes=[8, 8],
            resblock_kernel_sizes=[3, 7], resblock_dilation_sizes=[[1, 3], [1, 3]])),
        "UnivNetModel": lambda: T.UnivNetModel(T.UnivNetConfig(
            model_in_channels=16, model_hidden_channels=16, num_mel_bins=80, resblock_stride_sizes=[4, 4],
            resblock_kernel_sizes=[3, 3], resblock_dilation_sizes=[[1, 3], [1, 3]], kernel_predictor_num_blocks=1,
            kernel_predictor_hidden_channels=16)),
        "FastSpeech2ConformerModel": lambda: T.FastSpeech2ConformerModel(T.FastSpeech2ConformerConfig(
            hidden_size=32, encoder_layers=1, decoder_layers=1, encoder_num_attention_heads=2, decoder_num_attention_heads=2,
            encoder_linear_units=64, decoder_linear_units=64, vocab_size=50, speech_decoder_postnet_units=32,
            duration_predictor_channels=32, pitch_predictor_channels=32, energy_predictor_channels=32, encoder_kernel_size=7,
            decoder_kernel_size=7)),
    }
    return configs[name]()


class SequenceModel(NamedTuple):
    """A sequence model's row: what it is, its example input for ``batch`` samples, and whether
    it has transformer layers on ``[B, T, D]`` (then it is also run with ``tokens=True``)."""

    family: str
    example: Callable[[int], torch.Tensor]
    tokens: bool = True


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def _waveform(batch: int) -> torch.Tensor:  # 0.1 s at 16 kHz
    return _randn(batch, 1600)


def _ids(batch: int) -> torch.Tensor:
    return torch.randint(1, 50, (batch, 12), generator=torch.Generator().manual_seed(0))


#: ``library:name`` of the sequence part -> its family and example input.
SEQUENCE: dict[str, SequenceModel] = {f"transformers:{k}": v for k, v in {
    "Wav2Vec2Model": SequenceModel("speech encoder", _waveform),
    "Wav2Vec2Model-stable": SequenceModel("speech encoder", _waveform),
    "HubertModel": SequenceModel("speech encoder", _waveform),
    "WavLMModel": SequenceModel("speech encoder", _waveform),
    "Wav2Vec2ConformerModel": SequenceModel("speech encoder", _waveform),
    "SEWModel": SequenceModel("speech encoder", _waveform),
    "SEWDModel": SequenceModel("speech encoder", _waveform),
    "Data2VecAudioModel": SequenceModel("speech encoder", _waveform),
    "UniSpeechSatModel": SequenceModel("speech encoder", _waveform),
    "Wav2Vec2BertModel": SequenceModel("speech encoder", lambda b: _randn(b, 50, 160)),  # stacked filter banks [B, T, 160]
    "Speech2TextEncoder": SequenceModel("speech encoder", lambda b: _randn(b, 100, 80)),  # filter banks [B, T, 80]
    "WhisperEncoder": SequenceModel("speech encoder", lambda b: _randn(b, 80, 100)),  # log-mel [B, 80, T], T = 2 x positions
    "ParakeetEncoder": SequenceModel("speech encoder", lambda b: _randn(b, 100, 80)),
    "EncodecModel": SequenceModel("audio codec", lambda b: _randn(b, 1, 800)),  # audio [B, C, L]
    "DacModel": SequenceModel("audio codec", lambda b: _randn(b, 1, 800)),
    "MimiModel": SequenceModel("audio codec", lambda b: _randn(b, 1, 800)),
    "SpeechT5HifiGan": SequenceModel("vocoder", lambda b: _randn(b, 20, 80), tokens=False),  # mel frames [B, T, 80]
    "UnivNetModel": SequenceModel("vocoder", lambda b: _randn(b, 20, 80), tokens=False),
    "FastSpeech2ConformerModel": SequenceModel("text-to-speech", _ids),
}.items()}

#: Libraries of sequence models that this part does not cover, and why (a note in the results).
NOT_COVERED = (
    "torchaudio and speechbrain models (torchaudio's wav2vec2, Conformer, Emformer; speechbrain's ECAPA-TDNN) "
    "are not in this part: neither was installed for this run, so their rows are left out."
)


def example_input(key: str, batch: int = 2) -> torch.Tensor | None:
    """The example input of the sequence model ``key`` for ``batch`` samples; None for a vision
    model (the sweep builds image inputs for those)."""
    entry = SEQUENCE.get(key)
    return None if entry is None else entry.example(batch)


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
    **{key: ("transformers", _transformers_sequence) for key in SEQUENCE},
}


def available(key: str) -> bool:
    """Whether the library of ``key`` is installed."""
    return importlib.util.find_spec(BUILDERS[key][0]) is not None


def build(key: str) -> nn.Module:
    """The model ``library:name``, random init, in eval mode."""
    _, builder = BUILDERS[key]
    return builder(key.split(":", 1)[1]).eval()
