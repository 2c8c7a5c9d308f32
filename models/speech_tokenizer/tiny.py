"""A complete, tiny, random-weight speech tokenizer folder in the official checkpoint layout.

Used by tests and benchmarks that need a loadable tokenizer without the released weights:
`config.json` carries every field of the official `WhisperVQConfig` file (sizes replaced),
`preprocessor_config.json` the official feature-extractor settings, and `model.safetensors` a
`quantize_encoder_only` state dict with metadata {"format": "pt"}.

The random weights are scaled so that activations stay O(1) and codebook distances are spread
(codebook rows are random directions of norm sqrt(d_model)), which makes token ids react to the
audio instead of collapsing onto one code.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .configuration_speech_tokenizer import CONFIG_NAME, FEATURE_CONFIG_NAME, SpeechTokenizerConfig
from .modeling_speech_tokenizer import WEIGHTS_NAME, WhisperVQEncoder

CODEBOOK_SIZE = 16384


def tiny_config_dict(
    d_model: int, heads: int, ffn: int, layers: int, codebook_size: int = CODEBOOK_SIZE
) -> dict[str, Any]:
    """The official tokenizer `config.json` contents with the model sizes replaced."""
    return {
        "activation_dropout": 0.0,
        "activation_function": "gelu",
        "apply_spec_augment": False,
        "architectures": ["WhisperVQEncoder"],
        "attention_dropout": 0.0,
        "begin_suppress_tokens": [220, 50257],
        "bos_token_id": 50257,
        "classifier_proj_size": 256,
        "d_model": d_model,
        "decoder_attention_heads": heads,
        "decoder_ffn_dim": ffn,
        "decoder_layerdrop": 0.0,
        "decoder_layers": layers,
        "decoder_start_token_id": 50258,
        "dropout": 0.0,
        "encoder_attention_heads": heads,
        "encoder_causal_attention": False,
        "encoder_causal_convolution": True,
        "encoder_ffn_dim": ffn,
        "encoder_layerdrop": 0.0,
        "encoder_layers": layers,
        "eos_token_id": 50257,
        "init_std": 0.02,
        "is_encoder_decoder": True,
        "mask_feature_length": 10,
        "mask_feature_min_masks": 0,
        "mask_feature_prob": 0.0,
        "mask_time_length": 10,
        "mask_time_min_masks": 2,
        "mask_time_prob": 0.05,
        "max_length": 448,
        "max_source_positions": 1500,
        "max_target_positions": 448,
        "median_filter_width": 7,
        "model_type": "whisper",
        "num_hidden_layers": layers,
        "num_mel_bins": 128,
        "pad_token_id": 50256,
        "pooling_kernel_size": 4,
        "pooling_position": layers,
        "pooling_type": "avg",
        "quantize_causal_block_size": 200,
        "quantize_causal_encoder": False,
        "quantize_commit_coefficient": 0.25,
        "quantize_ema_decay": 0.99,
        "quantize_encoder_only": True,
        "quantize_loss_scale": 10.0,
        "quantize_position": layers,
        "quantize_restart_interval": 100,
        "quantize_vocab_size": codebook_size,
        "scale_embedding": False,
        "skip_language_detection": True,
        "torch_dtype": "float32",
        "transformers_version": "4.44.1",
        "use_cache": True,
        "use_weighted_layer_sum": False,
        "vocab_size": 51866,
    }


PREPROCESSOR_CONFIG: dict[str, Any] = {
    "chunk_length": 30,
    "feature_extractor_type": "WhisperFeatureExtractor",
    "feature_size": 128,
    "hop_length": 160,
    "n_fft": 400,
    "n_samples": 480000,
    "nb_max_frames": 3000,
    "padding_side": "right",
    "padding_value": 0.0,
    "return_attention_mask": False,
    "sampling_rate": 16000,
}


def _random_state_dict(
    model: WhisperVQEncoder, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Deterministic random weights for every state-dict entry, filled in sorted key order."""
    state = {}
    codebook: torch.Tensor | None = None
    for key, ref in sorted(model.state_dict().items()):
        shape = ref.shape
        if key == "codebook.weight":
            rows = torch.randn(shape, generator=generator)
            codebook = rows / rows.norm(dim=1, keepdim=True) * math.sqrt(shape[1])
            value = codebook
        elif key in ("ema_count", "ema_weight"):
            continue
        elif key.startswith("embed_positions"):
            value = 0.25 * torch.randn(shape, generator=generator)
        elif "layer_norm" in key and key.endswith(".weight"):
            value = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        elif key.endswith(".bias"):
            value = 0.05 * torch.randn(shape, generator=generator)
        else:
            fan_in = math.prod(shape[1:])
            value = torch.randn(shape, generator=generator) / math.sqrt(fan_in)
        state[key] = value.contiguous()
    if model.config.has_ema_buffers and codebook is not None:
        state["ema_count"] = torch.ones(model.config.quantize_vocab_size)
        state["ema_weight"] = codebook.clone()
    return state


def write_tiny_tokenizer(
    out_dir: Path,
    seed: int = 0,
    d_model: int = 64,
    heads: int = 4,
    ffn: int = 128,
    layers: int = 2,
    codebook_size: int = CODEBOOK_SIZE,
) -> None:
    """Writes config.json, preprocessor_config.json and model.safetensors into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config_dict = tiny_config_dict(d_model, heads, ffn, layers, codebook_size)
    config = SpeechTokenizerConfig.from_dict(config_dict)
    with torch.device("meta"):
        model = WhisperVQEncoder(config)
    state = _random_state_dict(model, torch.Generator().manual_seed(seed))
    (out_dir / CONFIG_NAME).write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    (out_dir / FEATURE_CONFIG_NAME).write_text(
        json.dumps(PREPROCESSOR_CONFIG, indent=2, sort_keys=True) + "\n"
    )
    save_file(state, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt"})


__all__ = ["PREPROCESSOR_CONFIG", "tiny_config_dict", "write_tiny_tokenizer"]
