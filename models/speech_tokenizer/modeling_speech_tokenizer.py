"""GLM-4-Voice speech tokenizer: the Whisper-VQ encoder (12.5 tokens/s, 16384 codes).

Reads top to bottom: causal conv stem -> learned positions -> pre-LN Whisper layers with a
block-causal mask -> average pooling (x4) -> nearest-codebook vector quantisation.
Parameter and buffer names are exactly those of the released `model.safetensors`
(`quantize_encoder_only` layout, no prefix), so the checkpoint loads with `strict=True`.

Two ways to run the layers:
- `forward`: a whole padded batch at once with the reference's additive block-causal mask.
- `forward_block`: one attention block of frames against a cache of the keys/values of the
  earlier blocks. Because a frame sees every key of its own and earlier blocks and nothing after
  (the mask is "lower triangle OR same block"), this gives the same outputs block by block.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn

from .configuration_speech_tokenizer import SpeechTokenizerConfig

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint file does not match the encoder built from its config."""


@dataclass
class WhisperVQEncoderOutput:
    """Outputs of `WhisperVQEncoder.forward` (B = batch, T = 50 Hz frames, T' = T / 4 tokens).

    last_hidden_state: (B, T', d_model) `codebook[ids] + embed_positions2[:T']`.
    quantized_token_ids: (B, T') int64 codebook indices, padded positions included.
    token_mask: (B, T') bool, True where the token starts inside real audio.
    prequant_hidden: (B, T', d_model) pooled hidden states fed to the quantiser.
    conv2_out: (B, d_model, T) second stem convolution before its GELU (if requested).
    hidden_states: outputs of each encoder layer, (B, T, d_model) each (if requested).
    """

    last_hidden_state: torch.Tensor
    quantized_token_ids: torch.Tensor
    token_mask: torch.Tensor
    prequant_hidden: torch.Tensor
    conv2_out: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] = ()


@dataclass
class EncoderCache:
    """Keys/values of the frames already encoded, per layer: (B, heads, frames, head_dim)."""

    keys: list[torch.Tensor | None] = field(default_factory=list)
    values: list[torch.Tensor | None] = field(default_factory=list)

    @property
    def length(self) -> int:
        return 0 if not self.keys or self.keys[0] is None else self.keys[0].shape[2]

    def get(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if layer >= len(self.keys) or self.keys[layer] is None:
            return None
        return self.keys[layer], self.values[layer]

    def set(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        while len(self.keys) <= layer:
            self.keys.append(None)
            self.values.append(None)
        self.keys[layer], self.values[layer] = keys, values

    def truncate(self, frames: int) -> None:
        """Forgets every frame from `frames` on (to re-encode them)."""
        for layer, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            if k is not None and v is not None:
                self.keys[layer], self.values[layer] = k[:, :, :frames], v[:, :, :frames]


class WhisperVQAttention(nn.Module):
    """Whisper multi-head self-attention; `k_proj` has no bias, as in Whisper."""

    def __init__(self, config: SpeechTokenizerConfig) -> None:
        super().__init__()
        self.num_heads = config.encoder_attention_heads
        self.head_dim = config.head_dim
        d = config.d_model
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d)
        self.q_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, frames, _ = x.shape
        return x.view(batch, frames, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)

    def forward(
        self,
        hidden: torch.Tensor,
        attn_mask: torch.Tensor | None,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """hidden (B, T, d); attn_mask additive, broadcastable to (B, H, T, past + T).

        Returns the attention output (B, T, d) and all keys/values (past + these frames).
        """
        query = self._heads(self.q_proj(hidden))
        key = self._heads(self.k_proj(hidden))
        value = self._heads(self.v_proj(hidden))
        if past is not None:
            key = torch.cat([past[0], key], dim=2)
            value = torch.cat([past[1], value], dim=2)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask)
        batch, _, frames, _ = out.shape
        out = out.transpose(1, 2).reshape(batch, frames, -1)  # (B, T, d)
        return self.out_proj(out), (key, value)


class WhisperVQEncoderLayer(nn.Module):
    """Pre-LayerNorm Whisper encoder layer (attention, then a GELU MLP; both residual)."""

    def __init__(self, config: SpeechTokenizerConfig) -> None:
        super().__init__()
        d = config.d_model
        self.self_attn = WhisperVQAttention(config)
        self.self_attn_layer_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.fc1 = nn.Linear(d, config.encoder_ffn_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)

    def forward(
        self,
        hidden: torch.Tensor,
        attn_mask: torch.Tensor | None,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        attn, key_values = self.self_attn(self.self_attn_layer_norm(hidden), attn_mask, past)
        hidden = hidden + attn
        hidden = hidden + self.fc2(F.gelu(self.fc1(self.final_layer_norm(hidden))))
        return hidden, key_values


def block_causal_mask(
    frame_mask: torch.Tensor, block_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """Additive attention mask (B, 1, T, T) from a frame mask (B, T).

    Query i may see key j when j <= i or both lie in the same `block_size` block, and key j is a
    real (unpadded) frame; hidden pairs get `finfo(dtype).min`.
    """
    frames = frame_mask.shape[1]
    pos = torch.arange(frames, device=frame_mask.device)
    visible = (pos[None, :] <= pos[:, None]) | (
        (pos[None, :] // block_size) == (pos[:, None] // block_size)
    )  # (T, T)
    visible = visible[None] & frame_mask.bool()[:, None, :]  # (B, T, T)
    mask = torch.zeros(visible.shape, dtype=dtype, device=frame_mask.device)
    return mask.masked_fill_(~visible, torch.finfo(dtype).min)[:, None]


def _zero_embedding(rows: int, dim: int) -> nn.Embedding:
    """An embedding table starting at zero (its values always come from a checkpoint).

    Skipping the random normal init also keeps construction on the meta device cheap.
    """
    return nn.Embedding(rows, dim, _weight=torch.zeros(rows, dim))


class WhisperVQEncoder(nn.Module):
    """The quantising Whisper encoder: log-mel (B, num_mel, F) -> token ids (B, F / 8)."""

    def __init__(self, config: SpeechTokenizerConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        # Causal convolutions: built without padding, the input is left-padded by 2 frames.
        self.conv1 = nn.Conv1d(config.num_mel_bins, d, kernel_size=3)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2)
        self.embed_positions = _zero_embedding(config.max_source_positions, d)
        self.layers = nn.ModuleList(
            WhisperVQEncoderLayer(config) for _ in range(config.quantize_position)
        )
        self.pooling_layer = nn.AvgPool1d(config.pooling_kernel_size)
        self.codebook = _zero_embedding(config.quantize_vocab_size, d)
        self.embed_positions2 = _zero_embedding(config.num_pooled_positions, d)
        if config.has_ema_buffers:
            # Training-time EMA statistics of the codebook; unused at inference but stored.
            self.register_buffer("ema_count", torch.ones(config.quantize_vocab_size))
            self.register_buffer("ema_weight", self.codebook.weight.detach().clone())

    @property
    def frames_per_token(self) -> int:
        """50 Hz frames averaged into one token."""
        return self.config.pooling_kernel_size

    @property
    def stem_stride(self) -> int:
        """Mel frames per 50 Hz frame (conv1 stride x conv2 stride)."""
        return self.conv1.stride[0] * self.conv2.stride[0]

    def stem(self, features: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """conv2 output before its GELU for 50 Hz frames [start, end): (B, d_model, end - start).

        features: (B, num_mel, F) with F >= 2 * end - 1. Frame j of conv2 reads conv1 frames
        2j-2..2j, which read mel frames 2j-4..2j; frames before 0 are zeros at both levels.
        """
        lo, hi = 2 * start - 2, 2 * end - 1  # conv1 frames needed: [lo, hi)
        mel_lo = lo - 2
        x = features[..., max(0, mel_lo) : hi]
        x = F.pad(x, (max(0, -mel_lo), 0))
        h1 = F.gelu(self.conv1(x))  # (B, d, hi - lo)
        if lo < 0:
            h1 = F.pad(h1[..., -lo:], (-lo, 0))  # conv2's causal padding is zeros after GELU
        return self.conv2(h1)

    def embed(
        self, features: torch.Tensor, start: int, end: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(layer input (B, end - start, d_model), conv2 output (B, d_model, end - start))."""
        if end > self.config.max_source_positions:
            raise ValueError(
                f"{end} frames exceed max_source_positions={self.config.max_source_positions}"
            )
        conv2_out = self.stem(features, start, end)
        hidden = F.gelu(conv2_out).transpose(1, 2) + self.embed_positions.weight[start:end]
        return hidden, conv2_out

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, d) -> (B, ceil(T / k), d); T is zero-padded on the right to a multiple of k."""
        k = self.config.pooling_kernel_size
        if hidden.shape[1] % k:
            hidden = F.pad(hidden, (0, 0, 0, k - hidden.shape[1] % k))
        return self.pooling_layer(hidden.transpose(1, 2)).transpose(1, 2)

    def quantize(self, hidden: torch.Tensor) -> torch.Tensor:
        """Nearest codebook rows by squared L2: (B, T', d) -> ids (B, T') int64.

        Distances are |c|^2 + |h|^2 - 2 h.c in float32 whatever the model dtype, since a
        reduced-precision argmin would change tokens.
        """
        batch, frames, dim = hidden.shape
        flat = hidden.reshape(-1, dim).float()
        codebook = self.codebook.weight.float()
        base = (codebook**2).sum(dim=1) + (flat**2).sum(dim=1, keepdim=True)  # (N, V)
        distances = torch.addmm(base, flat, codebook.t(), beta=1.0, alpha=-2.0)
        return distances.argmin(dim=1).view(batch, frames)

    def dequantize(self, ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """`codebook[ids] + embed_positions2[offset : offset + T']`: (B, T') -> (B, T', d)."""
        pos = self.embed_positions2.weight[offset : offset + ids.shape[1]]
        return self.codebook(ids) + pos

    def forward(
        self,
        input_features: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> WhisperVQEncoderOutput:
        """input_features (B, num_mel, F), attention_mask (B, F) 1 = real frame (None: all real).

        F is even in practice (padded audio is a multiple of 1280 samples); T = ceil(F / 2).
        """
        batch, _, num_frames = input_features.shape
        frames = (num_frames - 1) // 2 + 1
        hidden, conv2_out = self.embed(input_features, 0, frames)
        if attention_mask is None:
            attention_mask = torch.ones(batch, num_frames, device=input_features.device)
        frame_mask = attention_mask[:, :: self.stem_stride]  # (B, T)
        mask = block_causal_mask(frame_mask, self.config.quantize_causal_block_size, hidden.dtype)
        layer_outputs = []
        for layer in self.layers:
            hidden, _ = layer(hidden, mask)
            layer_outputs.append(hidden)
        pooled = self.pool(hidden)
        ids = self.quantize(pooled)
        return WhisperVQEncoderOutput(
            last_hidden_state=self.dequantize(ids),
            quantized_token_ids=ids,
            token_mask=frame_mask[:, :: self.frames_per_token].bool(),
            prequant_hidden=pooled,
            conv2_out=conv2_out if output_hidden_states else None,
            hidden_states=tuple(layer_outputs) if output_hidden_states else (),
        )

    def forward_block(
        self,
        features: torch.Tensor,
        start: int,
        end: int,
        cache: EncoderCache,
        key_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encodes 50 Hz frames [start, end) of one attention block against `cache`.

        `cache` must hold exactly frames [0, start) (all real audio) and is extended to `end`.
        key_mask: (B, end - start) bool, False for padded frames of this block.
        Returns (pooled hidden (B, ceil((end - start) / k), d), token ids (B, same)).
        """
        if cache.length != start:
            raise ValueError(f"cache holds {cache.length} frames, block starts at {start}")
        hidden, _ = self.embed(features, start, end)
        batch = hidden.shape[0]
        visible = torch.ones(batch, end, dtype=torch.bool, device=hidden.device)
        if key_mask is not None:
            visible[:, start:] = key_mask
        mask = torch.zeros(visible.shape, dtype=hidden.dtype, device=hidden.device)
        mask = mask.masked_fill_(~visible, torch.finfo(hidden.dtype).min)[:, None, None]
        for index, layer in enumerate(self.layers):
            hidden, (keys, values) = layer(hidden, mask, cache.get(index))
            cache.set(index, keys, values)
        pooled = self.pool(hidden)
        return pooled, self.quantize(pooled)


def load_checked_state_dict(model: nn.Module, path: Path) -> None:
    """Loads `path` (safetensors) into `model` strictly, naming the file and key of any mismatch."""
    if not path.is_file():
        raise FileNotFoundError(f"speech tokenizer file missing: {path}")
    expected = model.state_dict()
    try:
        handle = safe_open(str(path), framework="pt")
    except SafetensorError as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    with handle as f:
        keys = set(f.keys())
        missing = sorted(set(expected) - keys)
        unexpected = sorted(keys - set(expected))
        if missing:
            raise CheckpointError(f"{path}: missing key(s) {', '.join(missing)}")
        if unexpected:
            raise CheckpointError(f"{path}: unexpected key(s) {', '.join(unexpected)}")
        tensors = {}
        for key in sorted(keys):
            shape = tuple(f.get_slice(key).get_shape())
            if shape != tuple(expected[key].shape):
                raise CheckpointError(
                    f"{path}: key {key} has shape {list(shape)}, "
                    f"the config implies {list(expected[key].shape)}"
                )
            tensors[key] = f.get_tensor(key)
    model.load_state_dict(tensors, strict=True)
    logger.debug("loaded %d tensors from %s", len(tensors), path)


__all__ = [
    "WEIGHTS_NAME",
    "CheckpointError",
    "EncoderCache",
    "WhisperVQAttention",
    "WhisperVQEncoder",
    "WhisperVQEncoderLayer",
    "WhisperVQEncoderOutput",
    "block_causal_mask",
    "load_checked_state_dict",
]
