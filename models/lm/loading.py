"""Load a ChatGLM-format GLM-4-Voice-9B checkpoint into transformers' native `GlmForCausalLM`.

The released files (`config.json`, `model.safetensors.index.json`, `model-0000N-of-0000M.safetensors`)
use ChatGLM parameter names. Loading works in three steps so that the weights exist once:

1. `check_checkpoint` reads only the JSON files and the safetensors headers, and checks that every
   expected key is present in the shard the index names, with the shape the config implies.
   Nothing is allocated for weights before this passes.
2. The model is built on the meta device (no storage), and for int4 every Linear of the decoder
   blocks is swapped for a bitsandbytes `Linear4bit` (NF4, double quant, bf16 compute; like
   `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True, bnb_4bit_quant_type="nf4",
   bnb_4bit_compute_dtype=torch.bfloat16)`, which also keeps the output layer unquantized).
3. Shard by shard, tensor by tensor: read one ChatGLM tensor, convert it (split the fused qkv rows,
   rename the rest, drop `rotary_pos_emb.inv_freq`), cast and move it to the device (quantizing
   Linear weights there) and assign it into the model. Peak host memory is the model plus one
   tensor; nothing holds a second copy of the weights.

RMSNorm is swapped for `ReferenceOrderRMSNorm`, which rounds once after the weight multiply like the
GLM-4 code; with it the bf16 logits match the reference bit for bit (float32 is unaffected).
The RoPE frequencies are recomputed in float32 from `10000 * rope_ratio` and never cast.
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from safetensors import safe_open
from torch import nn
from transformers import GlmConfig, GlmForCausalLM
from transformers.models.glm.modeling_glm import GlmRMSNorm, GlmRotaryEmbedding

from models.jsonfile import read_json_object
from models.lm.configuration_lm import ChatGLMConfig

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
INV_FREQ_KEY = "transformer.rotary_pos_emb.inv_freq"

_SAFETENSORS_DTYPES = {"F32", "BF16", "F16"}
_QUANTIZATIONS = (None, "int4")


class CheckpointError(ValueError):
    """A checkpoint file is missing, or a key in it is missing or has the wrong shape."""


@dataclass(frozen=True)
class TensorInfo:
    """One entry of a safetensors header."""

    file: Path
    dtype: str
    shape: tuple[int, ...]


class ReferenceOrderRMSNorm(GlmRMSNorm):
    """RMSNorm with the GLM-4 rounding order.

    GLM-4 computes `weight * (x * rsqrt(mean(x_f32^2) + eps))` with the normalized value kept in
    float32 and rounds to the input dtype once, at the end. `GlmRMSNorm` rounds the normalized
    value before the weight multiply (two roundings), which moves bf16 logits by a few ulp.
    Input/output shape: [..., hidden].
    """

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        variance = hidden_states.float().pow(2).mean(-1, keepdim=True)
        normalized = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return (self.weight * normalized).to(input_dtype)


# ----------------------------------------------------------------------------- checkpoint check


def expected_shapes(config: ChatGLMConfig) -> dict[str, tuple[int, ...]]:
    """ChatGLM state-dict keys of a checkpoint with `config`, and their shapes."""
    h, f, v = config.hidden_size, config.ffn_hidden_size, config.padded_vocab_size
    qkv_rows = config.q_size + 2 * config.kv_size
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.embedding.word_embeddings.weight": (v, h),
        "transformer.encoder.final_layernorm.weight": (h,),
        "transformer.output_layer.weight": (v, h),
    }
    for i in range(config.num_layers):
        p = f"transformer.encoder.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attention.query_key_value.weight"] = (qkv_rows, h)
        if config.add_qkv_bias:
            shapes[p + "self_attention.query_key_value.bias"] = (qkv_rows,)
        shapes[p + "self_attention.dense.weight"] = (h, config.q_size)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "mlp.dense_h_to_4h.weight"] = (2 * f, h)
        shapes[p + "mlp.dense_4h_to_h.weight"] = (h, f)
    return shapes


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor names, dtypes and shapes of a safetensors file, read from its JSON header only.

    The file size is checked against the data the header describes, so that a truncated
    download is reported here rather than after other shards have been loaded.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError(f"header length {header_len} exceeds the file")
            header = json.loads(f.read(header_len))
        header.pop("__metadata__", None)
        infos = {
            name: TensorInfo(path, entry["dtype"], tuple(entry["shape"]))
            for name, entry in header.items()
        }
        data_end = max((int(entry["data_offsets"][1]) for entry in header.values()), default=0)
    except (OSError, struct.error, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    if size != 8 + header_len + data_end:
        raise CheckpointError(
            f"{path}: file has {size} bytes but its header describes {8 + header_len + data_end} "
            "(truncated or corrupt; download it again)"
        )
    return infos


def _weight_map(model_dir: Path) -> dict[str, Path]:
    """Key -> shard file, from the index (or every key of a single `model.safetensors`)."""
    index_path = model_dir / INDEX_FILE
    if index_path.is_file():
        index = read_json_object(index_path, CheckpointError)
        if not isinstance(index.get("weight_map"), dict):
            raise CheckpointError(f"{index_path}: no 'weight_map'")
        return {key: model_dir / name for key, name in index["weight_map"].items()}
    single = model_dir / SINGLE_FILE
    if single.is_file():
        return dict.fromkeys(read_safetensors_header(single), single)
    raise CheckpointError(f"{model_dir}: neither {INDEX_FILE} nor {SINGLE_FILE} found")


def scan_checkpoint(model_dir: Path) -> tuple[ChatGLMConfig, dict[str, TensorInfo]]:
    """Validate config, index and shard headers; return the config and every tensor to load."""
    model_dir = Path(model_dir)
    config = ChatGLMConfig.from_file(model_dir / CONFIG_FILE)
    weight_map = _weight_map(model_dir)
    headers: dict[Path, dict[str, TensorInfo]] = {}
    for shard in sorted(set(weight_map.values())):
        if not shard.is_file():
            raise CheckpointError(f"{shard}: shard named in {INDEX_FILE} is missing")
        headers[shard] = read_safetensors_header(shard)
    index_path = model_dir / INDEX_FILE
    tensors = {
        key: _checked_entry(key, shape, weight_map.get(key), headers, index_path)
        for key, shape in expected_shapes(config).items()
    }
    unexpected = sorted(set(weight_map) - set(tensors) - {INV_FREQ_KEY})
    if unexpected:
        raise CheckpointError(
            f"{weight_map[unexpected[0]]}: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected in all)"
        )
    return config, tensors


def _checked_entry(
    key: str,
    shape: tuple[int, ...],
    shard: Path | None,
    headers: dict[Path, dict[str, TensorInfo]],
    index_path: Path,
) -> TensorInfo:
    """The header entry of `key`, checked for presence, shape and dtype (errors name the file)."""
    if shard is None:
        raise CheckpointError(f"{index_path}: key {key!r} is missing")
    info = headers[shard].get(key)
    if info is None:
        raise CheckpointError(f"{shard}: key {key!r} is missing from the file")
    if info.shape != shape:
        raise CheckpointError(
            f"{shard}: key {key!r} has shape {list(info.shape)}, expected {list(shape)}"
        )
    if info.dtype not in _SAFETENSORS_DTYPES:
        raise CheckpointError(
            f"{shard}: key {key!r} has dtype {info.dtype}, "
            f"expected one of {sorted(_SAFETENSORS_DTYPES)}"
        )
    return info


def check_checkpoint(model_dir: Path) -> ChatGLMConfig:
    """Validate a ChatGLM checkpoint folder without reading any weight data; return its config."""
    config, _ = scan_checkpoint(model_dir)
    return config


# ----------------------------------------------------------------------------- key conversion


def convert_tensor(
    key: str, tensor: torch.Tensor, config: ChatGLMConfig
) -> list[tuple[str, torch.Tensor]]:
    """One ChatGLM tensor as `GlmForCausalLM` tensors (views; the qkv rows are split, no copy).

    `query_key_value` rows are `[q (heads*D) | k (G*D) | v (G*D)]` and split along dim 0 without
    any permutation (both codes rotate interleaved pairs of the first half of each head);
    `dense_h_to_4h` stays fused (`gate_up_proj`, first half = gate). `inv_freq` is dropped.
    """
    if key == INV_FREQ_KEY:
        return []
    simple = {
        "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
        "transformer.encoder.final_layernorm.weight": "model.norm.weight",
        "transformer.output_layer.weight": "lm_head.weight",
    }
    if key in simple:
        return [(simple[key], tensor)]
    prefix = "transformer.encoder.layers."
    if not key.startswith(prefix):
        raise CheckpointError(f"no conversion for key {key!r}")
    layer, rest = key[len(prefix) :].split(".", 1)
    out = f"model.layers.{layer}."
    renames = {
        "input_layernorm.weight": "input_layernorm.weight",
        "post_attention_layernorm.weight": "post_attention_layernorm.weight",
        "self_attention.dense.weight": "self_attn.o_proj.weight",
        "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
        "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
    }
    if rest in renames:
        return [(out + renames[rest], tensor)]
    if rest.startswith("self_attention.query_key_value."):
        kind = rest.rsplit(".", 1)[1]
        q, k, v = torch.split(tensor, [config.q_size, config.kv_size, config.kv_size], dim=0)
        return [
            (f"{out}self_attn.q_proj.{kind}", q),
            (f"{out}self_attn.k_proj.{kind}", k),
            (f"{out}self_attn.v_proj.{kind}", v),
        ]
    raise CheckpointError(f"no conversion for key {key!r}")


def iter_converted(
    model_dir: Path, config: ChatGLMConfig, tensors: dict[str, TensorInfo]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Converted (GLM name, CPU tensor) pairs, read one tensor at a time, shard by shard."""
    by_shard: dict[Path, list[str]] = {}
    for key, info in tensors.items():
        by_shard.setdefault(info.file, []).append(key)
    for shard, keys in sorted(by_shard.items()):
        logger.info("loading %s (%d tensors)", shard.name, len(keys))
        with safe_open(str(shard), framework="pt", device="cpu") as f:
            for key in keys:
                yield from convert_tensor(key, f.get_tensor(key), config)


# ----------------------------------------------------------------------------- model assembly


def build_empty_model(config: ChatGLMConfig, quantization: str | None = None) -> GlmForCausalLM:
    """`GlmForCausalLM` on the meta device with reference-order RMSNorm (and 4-bit Linears)."""
    if quantization not in _QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {_QUANTIZATIONS}, got {quantization!r}")
    glm_config = config.to_glm_config()
    with torch.device("meta"):
        model = GlmForCausalLM(glm_config)
    for module in model.modules():
        if isinstance(module, GlmRMSNorm):
            module.__class__ = ReferenceOrderRMSNorm
    if quantization == "int4":
        _swap_linear_for_4bit(model)
    return model


def _import_bitsandbytes() -> ModuleType:
    """bitsandbytes, or an ImportError that says what needs it and how to get it."""
    try:
        import bitsandbytes
    except ImportError as exc:
        raise ImportError(
            "quantization='int4' needs the bitsandbytes package (pip install bitsandbytes); "
            f"it could not be imported: {exc}"
        ) from exc
    return bitsandbytes


def _swap_linear_for_4bit(model: GlmForCausalLM) -> None:
    """Replace every Linear inside the decoder blocks by a meta `Linear4bit` (NF4, double quant)."""
    bnb = _import_bitsandbytes()

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    replacement = bnb.nn.Linear4bit(
                        child.in_features,
                        child.out_features,
                        bias=child.bias is not None,
                        compute_dtype=torch.bfloat16,
                        compress_statistics=True,
                        quant_type="nf4",
                        device="meta",
                    )
                    setattr(parent, name, replacement)


def assign_parameter(
    model: nn.Module, name: str, tensor: torch.Tensor, device: torch.device, dtype: torch.dtype
) -> None:
    """Set parameter `name` to a copy of `tensor` cast to `dtype` on `device`.

    Weights of `Linear4bit` modules are quantized to NF4 on `device` as they arrive.
    """
    module_path, leaf = name.rsplit(".", 1)
    module = model.get_submodule(module_path)
    value = tensor.to(device=device, dtype=dtype, copy=True).contiguous()
    if leaf == "weight" and _is_linear4bit(module):
        bnb = _import_bitsandbytes()

        param: nn.Parameter = bnb.nn.Params4bit(
            value, requires_grad=False, compress_statistics=True, quant_type="nf4", module=module
        ).to(device)
    else:
        param = nn.Parameter(value, requires_grad=False)
    setattr(module, leaf, param)


def _is_linear4bit(module: nn.Module) -> bool:
    return type(module).__name__ == "Linear4bit"


def load_lm(
    model_dir: Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    quantization: str | None = None,
) -> GlmForCausalLM:
    """Load a ChatGLM checkpoint folder as an eval-mode `GlmForCausalLM` on `device`.

    `dtype` applies to every unquantized parameter (float32 or bfloat16). `quantization="int4"`
    stores the decoder Linear weights in NF4 with double quantization and computes them in bf16
    (works on CPU and CUDA). The whole folder is validated before any weight memory is used.
    Do not call `model.to(dtype)` afterwards: it would also cast the float32 RoPE frequencies,
    which moves bf16 logits by about 1.5 ulp against the reference.
    """
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    device = torch.device(device)
    if quantization == "int4":
        _import_bitsandbytes()  # before any file is read
    config, tensors = scan_checkpoint(Path(model_dir))
    model = build_empty_model(config, quantization)
    for name, tensor in iter_converted(Path(model_dir), config, tensors):
        assign_parameter(model, name, tensor, device, dtype)
        del tensor
    finish_loading(model, device, dtype)
    logger.info("loaded %s on %s (%s, quantization=%s)", model_dir, device, dtype, quantization)
    return model


def finish_loading(model: GlmForCausalLM, device: torch.device, dtype: torch.dtype) -> None:
    """Recreate the float32 RoPE buffers on `device`, check nothing is left on meta, set eval."""
    glm_config: GlmConfig = model.config
    with torch.device(device):
        model.model.rotary_emb = GlmRotaryEmbedding(config=glm_config)
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        raise CheckpointError(f"parameters not filled from the checkpoint: {left[:5]}")
    glm_config.dtype = dtype
    model.eval()
