"""Write a tiny random-weight GLM-4-Voice LM folder in the official layout.

The folder looks like the released `glm-4-voice-9b` repository at a small hidden size:
ChatGLM-format `config.json`, `generation_config.json`, the weights split over several
`model-0000N-of-0000M.safetensors` shards with `model.safetensors.index.json` (ChatGLM key names,
`rotary_pos_emb.inv_freq` included), and the tokenizer files `tokenizer.model` +
`tokenizer_config.json`. Token ids follow the real layout: BPE ranks 0..151328, the GLM-4 special
tokens from 151329, `<|begin_of_audio|>`/`<|end_of_audio|>` at 151343/151344 and `<|audio_0|>` ..
`<|audio_16383|>` from 151552, inside a 168960-row vocabulary. The BPE part holds the 256 single
bytes, merges for a few common English words, and filler tokens (bytes 0xF8-0xFF, which never
occur in UTF-8 text) so that the ranks are contiguous up to the first special id.
"""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import GlmForCausalLM

from models.lm.configuration_lm import ChatGLMConfig
from models.lm.loading import (
    INDEX_FILE,
    INV_FREQ_KEY,
    assign_parameter,
    build_empty_model,
    convert_tensor,
    expected_shapes,
    finish_loading,
)
from models.lm.tokenization import (
    BEGIN_OF_AUDIO,
    END_OF_AUDIO,
    GLM4_SPECIAL_TOKENS,
    audio_token,
)

logger = logging.getLogger(__name__)

FIRST_SPECIAL_ID = 151329
AUDIO_OFFSET = 151552
AUDIO_TOKEN_COUNT = 16384
PADDED_VOCAB_SIZE = 168960
VOICE_TOKENS = (
    BEGIN_OF_AUDIO,
    END_OF_AUDIO,
    "<|begin_of_transcription|>",
    "<|end_of_transcription|>",
)

_WORDS = (
    "the",
    "and",
    "you",
    "hello",
    "how",
    "are",
    "what",
    "is",
    "it",
    "to",
    "of",
    "in",
    "that",
    "this",
    "with",
    "for",
    "weather",
    "today",
    "user",
    "speech",
    "instruction",
    "streaming",
    "transcription",
)


def _bpe_vocab() -> list[bytes]:
    """Token bytes in rank order: single bytes, word-prefix merges, then unreachable fillers."""
    tokens = [bytes([b]) for b in range(256)]
    seen = set(tokens)
    for word in _WORDS:
        for form in (word, " " + word):
            raw = form.encode()
            for end in range(2, len(raw) + 1):
                if raw[:end] not in seen:
                    seen.add(raw[:end])
                    tokens.append(raw[:end])
    filler = 0
    while len(tokens) < FIRST_SPECIAL_ID:
        tokens.append(bytes([0xF8 + (filler >> 16), (filler >> 8) & 0xFF, filler & 0xFF]))
        filler += 1
    return tokens


def write_tiny_tokenizer(out_dir: Path) -> None:
    """`tokenizer.model` and `tokenizer_config.json` with the real special and audio ids."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(_bpe_vocab())]
    (out_dir / "tokenizer.model").write_text("".join(lines), encoding="ascii")
    added: dict[int, str] = {FIRST_SPECIAL_ID + i: t for i, t in enumerate(GLM4_SPECIAL_TOKENS)}
    first_voice = FIRST_SPECIAL_ID + len(GLM4_SPECIAL_TOKENS)
    added.update({first_voice + i: t for i, t in enumerate(VOICE_TOKENS)})
    added.update({AUDIO_OFFSET + n: audio_token(n) for n in range(AUDIO_TOKEN_COUNT)})
    entry = {
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }
    config = {
        "added_tokens_decoder": {str(i): {"content": t, **entry} for i, t in sorted(added.items())},
        "additional_special_tokens": list(GLM4_SPECIAL_TOKENS[2:]),
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLM4Tokenizer", None]},
        "clean_up_tokenization_spaces": False,
        "do_lower_case": False,
        "eos_token": "<|endoftext|>",
        "model_max_length": 128000,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "remove_space": False,
        "tokenizer_class": "ChatGLM4Tokenizer",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def tiny_config_dict(
    num_layers: int = 2,
    hidden_size: int = 32,
    num_attention_heads: int = 4,
    kv_channels: int = 8,
    multi_query_group_num: int = 2,
    ffn_hidden_size: int = 64,
    padded_vocab_size: int = PADDED_VOCAB_SIZE,
    rope_ratio: float = 1,
    torch_dtype: str = "bfloat16",
) -> dict:
    """An official-shaped ChatGLM `config.json` with small sizes (real values elsewhere).

    A vocabulary smaller than the real one gets small stand-in pad/eos ids (1 and [1, 4, 6]).
    """
    real_vocab = padded_vocab_size > FIRST_SPECIAL_ID + len(GLM4_SPECIAL_TOKENS)
    pad_id = 151329 if real_vocab else 1
    eos_ids = [151329, 151336, 151338] if real_vocab else [1, 4, 6]
    return {
        "_name_or_path": "glm-4-voice-9b",
        "add_bias_linear": False,
        "add_qkv_bias": True,
        "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False,
        "architectures": ["ChatGLMForConditionalGeneration"],
        "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True,
        "auto_map": {
            "AutoConfig": "configuration_chatglm.ChatGLMConfig",
            "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
        },
        "bias_dropout_fusion": True,
        "classifier_dropout": None,
        "eos_token_id": eos_ids,
        "ffn_hidden_size": ffn_hidden_size,
        "fp32_residual_connection": False,
        "hidden_dropout": 0.0,
        "hidden_size": hidden_size,
        "kv_channels": kv_channels,
        "layernorm_epsilon": 3.90625e-08,
        "model_type": "chatglm",
        "multi_query_attention": True,
        "multi_query_group_num": multi_query_group_num,
        "num_attention_heads": num_attention_heads,
        "num_hidden_layers": num_layers,
        "num_layers": num_layers,
        "original_rope": True,
        "pad_token_id": pad_id,
        "padded_vocab_size": padded_vocab_size,
        "post_layer_norm": True,
        "rmsnorm": True,
        "rope_ratio": rope_ratio,
        "seq_length": 8192,
        "tie_word_embeddings": False,
        "torch_dtype": torch_dtype,
        "transformers_version": "4.44.1",
        "use_cache": True,
        "vocab_size": padded_vocab_size,
    }


def random_chatglm_tensor(
    key: str, shape: tuple[int, ...], generator: torch.Generator, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """A random float32 value for ChatGLM tensor `key` (logits of a few units, like a trained model)."""
    noise = torch.randn(shape, generator=generator, device=device)
    if key.endswith("layernorm.weight"):
        return 1.0 + 0.1 * noise
    if key.endswith(".bias"):
        return 0.5 * noise
    if "word_embeddings" in key:
        return noise
    return noise * (1.5 / shape[1] ** 0.5)


def random_chatglm_state_dict(config: ChatGLMConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random float32 ChatGLM tensors for `config`, `rotary_pos_emb.inv_freq` included."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        key: random_chatglm_tensor(key, shape, gen)
        for key, shape in expected_shapes(config).items()
    }
    rot = config.kv_channels // 2
    tensors[INV_FREQ_KEY] = 1.0 / (10000.0 ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
    return tensors


def build_random_lm(
    config: ChatGLMConfig,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    quantization: str | None = None,
    seed: int = 0,
) -> GlmForCausalLM:
    """A `GlmForCausalLM` with random weights made directly on `device` (no checkpoint).

    Goes through the same conversion and assignment as `load_lm`, one tensor at a time, so the
    full-size model can be built on a GPU for benchmarks without host memory for its weights.
    """
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    model = build_empty_model(config, quantization)
    for key, shape in expected_shapes(config).items():
        value = random_chatglm_tensor(key, shape, generator, device).to(dtype)
        for name, tensor in convert_tensor(key, value, config):
            assign_parameter(model, name, tensor, device, dtype)
        del value
    finish_loading(model, device, dtype)
    return model


def write_checkpoint(
    out_dir: Path,
    tensors: dict[str, torch.Tensor],
    num_shards: int = 2,
    dtype: torch.dtype = torch.bfloat16,
) -> None:
    """Save ChatGLM tensors as `num_shards` safetensors shards plus the index, split by size."""
    if not 1 <= num_shards <= len(tensors):
        raise ValueError(f"num_shards must be between 1 and {len(tensors)}, got {num_shards}")
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(dtype).contiguous() for k, v in tensors.items()}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    budget = total / num_shards
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > budget and len(shards) < num_shards:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    while len(shards) < num_shards:  # tiny tensors: move the last key into a shard of its own
        donor = next(s for s in reversed(shards) if len(s) > 1)
        key = next(reversed(donor))
        shards.append({key: donor.pop(key)})
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{num_shards:05d}.safetensors"
        save_file(shard, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2), encoding="utf-8")


def write_tiny_lm(
    out_dir: Path,
    seed: int = 0,
    num_shards: int = 2,
    dtype: torch.dtype = torch.bfloat16,
    with_tokenizer: bool = True,
    **sizes: int | float,
) -> Path:
    """Write a complete tiny LM folder (config, generation config, shards, index, tokenizer).

    `sizes` override `tiny_config_dict` arguments (e.g. `hidden_size=64`). Returns `out_dir`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype_name = {torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype]
    raw = tiny_config_dict(torch_dtype=dtype_name, **sizes)  # type: ignore[arg-type]
    config = ChatGLMConfig.from_dict(raw)
    if with_tokenizer and config.padded_vocab_size < AUDIO_OFFSET + AUDIO_TOKEN_COUNT:
        raise ValueError(
            f"padded_vocab_size {config.padded_vocab_size} does not cover the audio ids"
        )
    (out_dir / "config.json").write_text(json.dumps(raw, indent=2), encoding="utf-8")
    generation = {
        "eos_token_id": raw["eos_token_id"],
        "pad_token_id": raw["pad_token_id"],
        "transformers_version": raw["transformers_version"],
    }
    (out_dir / "generation_config.json").write_text(
        json.dumps(generation, indent=2), encoding="utf-8"
    )
    write_checkpoint(out_dir, random_chatglm_state_dict(config, seed), num_shards, dtype)
    if with_tokenizer:
        write_tiny_tokenizer(out_dir)
    logger.info("wrote tiny LM to %s", out_dir)
    return out_dir
