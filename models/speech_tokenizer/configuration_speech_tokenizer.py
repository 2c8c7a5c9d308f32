"""Typed configs of the GLM-4-Voice speech tokenizer, read from the official checkpoint files.

`config.json` is a Whisper config extended with the VQ fields (`WhisperVQConfig`,
`model_type: "whisper"`); `preprocessor_config.json` is a `WhisperFeatureExtractor` config.
Only the fields the encoder and the feature extractor use are kept; each is validated once, and
values this implementation does not support raise `ConfigError` naming the file and the field.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.jsonfile import read_json_object

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
FEATURE_CONFIG_NAME = "preprocessor_config.json"


class ConfigError(ValueError):
    """A config file is missing a field or holds a value this implementation does not support."""


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"speech tokenizer file missing: {path}")
    return read_json_object(path, ConfigError)


def _field(data: dict[str, Any], name: str, kind: type | tuple[type, ...], source: str) -> Any:
    """`data[name]` checked against `kind` (bool is not accepted where a number is expected)."""
    if name not in data:
        raise ConfigError(f"{source}: required field {name!r} is missing")
    value = data[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise ConfigError(f"{source}: field {name!r} must be {kind}, got {value!r}")
    if not isinstance(value, kinds):
        raise ConfigError(f"{source}: field {name!r} must be {kind}, got {value!r}")
    return value


def _require(condition: bool, source: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{source}: {message}")


@dataclass(frozen=True)
class SpeechTokenizerConfig:
    """The encoder half of `WhisperVQConfig` that a `quantize_encoder_only` checkpoint holds."""

    d_model: int
    encoder_attention_heads: int
    encoder_ffn_dim: int
    encoder_layers: int  # layers of the full Whisper encoder; only `quantize_position` are stored
    num_mel_bins: int
    max_source_positions: int  # 50 Hz frames per forward (1500 = 30 s)
    quantize_position: int  # VQ runs after this many layers; the checkpoint stops there
    pooling_position: int  # average pooling runs after this many layers (== quantize_position)
    pooling_kernel_size: int  # 4: 50 Hz -> 12.5 tokens/s
    pooling_type: str
    quantize_vocab_size: int
    quantize_causal_block_size: int  # 200 frames = 4 s: a query sees every key of its block
    encoder_causal_convolution: bool
    encoder_causal_attention: bool
    quantize_causal_encoder: bool
    quantize_encoder_only: bool
    quantize_ema_decay: float | None  # set in training configs; makes the EMA buffers exist
    activation_function: str = "gelu"
    layer_norm_eps: float = 1e-5  # nn.LayerNorm default, as in the reference encoder layers

    @property
    def head_dim(self) -> int:
        return self.d_model // self.encoder_attention_heads

    @property
    def num_pooled_positions(self) -> int:
        """Rows of `embed_positions2`: pooled frames per forward (375)."""
        return math.ceil(self.max_source_positions / self.pooling_kernel_size)

    @property
    def has_ema_buffers(self) -> bool:
        return self.quantize_ema_decay is not None

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = CONFIG_NAME) -> SpeechTokenizerConfig:
        ints = {
            name: _field(data, name, int, source)
            for name in (
                "d_model",
                "encoder_attention_heads",
                "encoder_ffn_dim",
                "encoder_layers",
                "num_mel_bins",
                "max_source_positions",
                "quantize_position",
                "pooling_position",
                "pooling_kernel_size",
                "quantize_vocab_size",
                "quantize_causal_block_size",
            )
        }
        bools = {
            name: _field(data, name, bool, source)
            for name in (
                "encoder_causal_convolution",
                "encoder_causal_attention",
                "quantize_causal_encoder",
                "quantize_encoder_only",
            )
        }
        decay = data.get("quantize_ema_decay")
        if decay is not None:
            decay = float(_field(data, "quantize_ema_decay", (int, float), source))
        config = cls(
            **ints,
            **bools,
            pooling_type=_field(data, "pooling_type", str, source),
            quantize_ema_decay=decay,
            activation_function=data.get("activation_function", "gelu"),
        )
        config.validate(source)
        return config

    @classmethod
    def from_file(cls, path: Path) -> SpeechTokenizerConfig:
        return cls.from_dict(_read_json(path), source=str(path))

    def validate(self, source: str = CONFIG_NAME) -> None:
        """Rejects values the encoder here does not implement (each with the field's name)."""
        for name in (
            "d_model",
            "encoder_attention_heads",
            "encoder_ffn_dim",
            "num_mel_bins",
            "max_source_positions",
            "quantize_position",
            "pooling_kernel_size",
            "quantize_vocab_size",
            "quantize_causal_block_size",
        ):
            _require(getattr(self, name) > 0, source, f"{name} must be positive")
        _require(
            self.d_model % self.encoder_attention_heads == 0,
            source,
            "d_model must be divisible by encoder_attention_heads",
        )
        _require(
            self.pooling_type == "avg",
            source,
            f"pooling_type {self.pooling_type!r} is not supported (only 'avg')",
        )
        _require(
            self.pooling_position == self.quantize_position,
            source,
            "pooling_position must equal quantize_position (pooling directly before VQ)",
        )
        _require(
            self.quantize_position <= self.encoder_layers,
            source,
            "quantize_position exceeds encoder_layers",
        )
        _require(
            self.quantize_encoder_only,
            source,
            "only quantize_encoder_only checkpoints (layers up to quantize_position) are supported",
        )
        _require(
            self.encoder_causal_convolution,
            source,
            "encoder_causal_convolution must be true (the block-streaming encoder relies on it)",
        )
        _require(
            not self.encoder_causal_attention and not self.quantize_causal_encoder,
            source,
            "encoder_causal_attention / quantize_causal_encoder must be false "
            "(block-causal attention via quantize_causal_block_size is used)",
        )
        _require(
            self.quantize_causal_block_size % self.pooling_kernel_size == 0,
            source,
            "quantize_causal_block_size must be a multiple of pooling_kernel_size",
        )
        _require(
            self.activation_function == "gelu",
            source,
            f"activation_function {self.activation_function!r} is not supported (only 'gelu')",
        )


@dataclass(frozen=True)
class FeatureExtractorConfig:
    """`WhisperFeatureExtractor` settings: 16 kHz in, 128-bin log-mel at 100 frames/s out."""

    feature_size: int  # mel bins
    sampling_rate: int
    hop_length: int
    n_fft: int
    chunk_length: int  # seconds per segment (30)
    n_samples: int  # samples per segment (chunk_length * sampling_rate)
    nb_max_frames: int  # mel frames per segment (n_samples // hop_length)
    padding_value: float
    padding_side: str

    @property
    def num_frequency_bins(self) -> int:
        return self.n_fft // 2 + 1

    @classmethod
    def from_dict(
        cls, data: dict[str, Any], source: str = FEATURE_CONFIG_NAME
    ) -> FeatureExtractorConfig:
        kind = data.get("feature_extractor_type", "WhisperFeatureExtractor")
        _require(
            kind == "WhisperFeatureExtractor",
            source,
            f"feature_extractor_type {kind!r} is not supported (only WhisperFeatureExtractor)",
        )
        dither = data.get("dither", 0.0)
        _require(dither == 0.0, source, f"dither {dither!r} is not supported (only 0.0)")
        config = cls(
            feature_size=_field(data, "feature_size", int, source),
            sampling_rate=_field(data, "sampling_rate", int, source),
            hop_length=_field(data, "hop_length", int, source),
            n_fft=_field(data, "n_fft", int, source),
            chunk_length=_field(data, "chunk_length", int, source),
            n_samples=_field(data, "n_samples", int, source),
            nb_max_frames=_field(data, "nb_max_frames", int, source),
            padding_value=float(_field(data, "padding_value", (int, float), source)),
            padding_side=_field(data, "padding_side", str, source),
        )
        config.validate(source)
        return config

    @classmethod
    def from_file(cls, path: Path) -> FeatureExtractorConfig:
        return cls.from_dict(_read_json(path), source=str(path))

    def validate(self, source: str = FEATURE_CONFIG_NAME) -> None:
        for name in ("feature_size", "sampling_rate", "hop_length", "n_fft", "chunk_length"):
            _require(getattr(self, name) > 0, source, f"{name} must be positive")
        _require(
            self.n_samples == self.chunk_length * self.sampling_rate,
            source,
            "n_samples must equal chunk_length * sampling_rate",
        )
        _require(
            self.nb_max_frames == self.n_samples // self.hop_length,
            source,
            "nb_max_frames must equal n_samples // hop_length",
        )
        _require(self.padding_side == "right", source, "only padding_side 'right' is supported")
        _require(self.padding_value == 0.0, source, "only padding_value 0.0 is supported")
        _require(
            self.n_fft // 2 < self.n_samples,
            source,
            "n_fft is too large for the segment length",
        )


__all__ = [
    "CONFIG_NAME",
    "FEATURE_CONFIG_NAME",
    "ConfigError",
    "FeatureExtractorConfig",
    "SpeechTokenizerConfig",
]
