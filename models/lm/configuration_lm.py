"""The ChatGLM `config.json` of GLM-4-Voice-9B as a typed, validated dataclass.

The released LM is a ChatGLM (GLM-4 family) checkpoint. Its architecture is exactly what
transformers' native `GlmForCausalLM` implements, so the config is read once from the official
file, every field that would change the computation is checked, and `to_glm_config()` gives the
equivalent `GlmConfig` (no remote code).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import GlmConfig

from models.jsonfile import read_json_object

logger = logging.getLogger(__name__)

# RoPE base of the GLM-4 code before `rope_ratio` scales it.
ROPE_BASE = 10000.0
# GLM-4 rotates the first half of each head's dims (interleaved pairs); the rest passes through.
PARTIAL_ROTARY_FACTOR = 0.5

# Fields that must hold these values: each is a code path that GlmForCausalLM does not have.
_REQUIRED_FLAGS: dict[str, bool] = {
    "multi_query_attention": True,  # fused qkv rows are [q | k | v]; without MQA they interleave
    "rmsnorm": True,
    "post_layer_norm": True,
    "original_rope": True,
    "add_bias_linear": False,
    "apply_residual_connection_post_layernorm": False,
    "fp32_residual_connection": False,
    "tie_word_embeddings": False,
}

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class ConfigError(ValueError):
    """The ChatGLM config names something this implementation does not compute."""


@dataclass(frozen=True)
class ChatGLMConfig:
    """Architecture fields of a ChatGLM `config.json` (GLM-4 family).

    Shapes follow from these: fused qkv has `num_attention_heads * kv_channels +
    2 * multi_query_group_num * kv_channels` rows, the fused MLP input `2 * ffn_hidden_size` rows.
    """

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    kv_channels: int
    multi_query_group_num: int
    padded_vocab_size: int
    seq_length: int
    layernorm_epsilon: float
    rope_ratio: float
    add_qkv_bias: bool
    pad_token_id: int
    eos_token_ids: tuple[int, ...]
    torch_dtype: torch.dtype

    @property
    def q_size(self) -> int:
        """Rows of the query projection: heads * head dim."""
        return self.num_attention_heads * self.kv_channels

    @property
    def kv_size(self) -> int:
        """Rows of the key (and of the value) projection: KV heads * head dim."""
        return self.multi_query_group_num * self.kv_channels

    @property
    def rope_theta(self) -> float:
        """RoPE base: the GLM-4 code scales 10000 by `rope_ratio` (GLM-4-9B-chat uses 500)."""
        return ROPE_BASE * self.rope_ratio

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ChatGLMConfig:
        """Validate a parsed ChatGLM config; raise `ConfigError` naming `source` and the field."""
        _validate_raw(raw, source)
        eos = raw.get("eos_token_id", [])
        eos_ids = tuple(int(x) for x in (eos if isinstance(eos, list) else [eos]))
        dtype_name = str(raw.get("torch_dtype", "bfloat16"))
        if dtype_name not in _DTYPES:
            raise ConfigError(
                f"{source}: torch_dtype {dtype_name!r} is not one of {sorted(_DTYPES)}"
            )
        config = cls(
            num_layers=int(raw["num_layers"]),
            hidden_size=int(raw["hidden_size"]),
            ffn_hidden_size=int(raw["ffn_hidden_size"]),
            num_attention_heads=int(raw["num_attention_heads"]),
            kv_channels=int(raw["kv_channels"]),
            multi_query_group_num=int(raw["multi_query_group_num"]),
            padded_vocab_size=int(raw["padded_vocab_size"]),
            seq_length=int(raw.get("seq_length", 8192)),
            layernorm_epsilon=float(raw["layernorm_epsilon"]),
            rope_ratio=float(raw.get("rope_ratio", 1)),
            add_qkv_bias=bool(raw.get("add_qkv_bias", False)),
            pad_token_id=int(raw["pad_token_id"]) if raw.get("pad_token_id") is not None else 0,
            eos_token_ids=eos_ids,
            torch_dtype=_DTYPES[dtype_name],
        )
        config._check_sizes(source)
        return config

    @classmethod
    def from_file(cls, path: Path) -> ChatGLMConfig:
        """Read and validate a ChatGLM `config.json`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ChatGLM config not found: {path}")
        return cls.from_dict(read_json_object(path, ConfigError), source=str(path))

    def _check_sizes(self, source: str) -> None:
        positive = {
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "ffn_hidden_size": self.ffn_hidden_size,
            "num_attention_heads": self.num_attention_heads,
            "kv_channels": self.kv_channels,
            "multi_query_group_num": self.multi_query_group_num,
            "padded_vocab_size": self.padded_vocab_size,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{source}: {name} must be positive, got {value}")
        if self.num_attention_heads % self.multi_query_group_num:
            raise ConfigError(
                f"{source}: num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"multi_query_group_num {self.multi_query_group_num}"
            )
        if self.kv_channels % 4:
            raise ConfigError(
                f"{source}: kv_channels {self.kv_channels} must be a multiple of 4 "
                "(half of each head is rotated in pairs)"
            )
        for name, token_id in [("pad_token_id", self.pad_token_id)] + [
            ("eos_token_id", i) for i in self.eos_token_ids
        ]:
            if not 0 <= token_id < self.padded_vocab_size:
                raise ConfigError(
                    f"{source}: {name} {token_id} is outside the vocabulary of {self.padded_vocab_size}"
                )
        if self.rope_ratio <= 0:
            raise ConfigError(f"{source}: rope_ratio must be positive, got {self.rope_ratio}")

    def to_glm_config(self) -> GlmConfig:
        """The equivalent transformers `GlmConfig` (sdpa attention, float32 RoPE frequencies)."""
        return GlmConfig(
            vocab_size=self.padded_vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.ffn_hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.multi_query_group_num,
            head_dim=self.kv_channels,
            hidden_act="silu",
            attention_dropout=0.0,
            max_position_embeddings=self.seq_length,
            rms_norm_eps=self.layernorm_epsilon,
            use_cache=True,
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": self.rope_theta,
                "partial_rotary_factor": PARTIAL_ROTARY_FACTOR,
            },
            pad_token_id=self.pad_token_id,
            eos_token_id=list(self.eos_token_ids) or None,
            attention_bias=self.add_qkv_bias,
            attn_implementation="sdpa",
        )


def _validate_raw(raw: dict[str, Any], source: str) -> None:
    model_type = raw.get("model_type")
    if model_type != "chatglm":
        raise ConfigError(f"{source}: model_type is {model_type!r}, expected 'chatglm'")
    required = (
        "num_layers",
        "hidden_size",
        "ffn_hidden_size",
        "num_attention_heads",
        "kv_channels",
        "multi_query_group_num",
        "padded_vocab_size",
        "layernorm_epsilon",
    )
    missing = [name for name in required if name not in raw]
    if missing:
        raise ConfigError(f"{source}: missing fields {missing}")
    for name, expected in _REQUIRED_FLAGS.items():
        value = raw.get(name, False if name == "tie_word_embeddings" else None)
        if value is None:
            raise ConfigError(f"{source}: missing field {name!r} (must be {expected})")
        if bool(value) != expected:
            raise ConfigError(
                f"{source}: unsupported {name}={value!r} (only {expected} is implemented)"
            )
    if "num_hidden_layers" in raw and raw["num_hidden_layers"] != raw["num_layers"]:
        raise ConfigError(
            f"{source}: num_hidden_layers {raw['num_hidden_layers']} != num_layers {raw['num_layers']}"
        )
    if raw.get("hidden_dropout", 0.0) or raw.get("attention_dropout", 0.0):
        logger.info("%s: dropout values are ignored (inference only)", source)
