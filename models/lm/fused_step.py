"""A one-token decode step over `GlmForCausalLM`'s weights in about half the kernels.

At batch sizes a voice agent runs at, a one-token step of GLM-4-Voice-9B is bound by the
number of kernels it launches, not by arithmetic: transformers' layer takes about fifty per
layer (three projections for q, k and v, a dozen for the interleaved partial rotary
embedding, eight for the reference-order RMSNorm, two copies expanding the grouped keys and
values to every query head). Even replayed as a CUDA graph each kernel costs a few
microseconds, two thousand per step. `FusedDecodeStep` computes the same step with about
twenty per layer:

- q, k and v come from one matrix product: the three weights become views of one fused
  weight (no extra memory; transformers' modules keep working on the views). Quantized
  layers (bitsandbytes 4-bit) are called as they are, their outputs joined.
- RMSNorm is `F.rms_norm` in float32 with float32 copies of the norm weights: the same
  rounding order as GLM-4 (normalize and scale in float32, round once).
- The rotary embedding turns q and k together in place, with the cos/sin of the step's
  positions computed once for all layers; it rounds exactly as transformers does.
- Keys and values of a layer live in one cache tensor `[rows, 2 * kv_heads, columns, dim]`
  (keys first), so one `index_copy_` writes both.
- Grouped-query attention without copies: the query heads of a group attend as the "query
  positions" of their one key/value head (`[rows, kv_heads, heads per group, dim]`), which
  is exact for a one-token step and lets any attention kernel take the mask.

Float32 logits match transformers' step to float32 rounding; bf16 logits to a few bf16 ulp
(kernels sum in other orders).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GlmForCausalLM

__all__ = ["FusedDecodeStep", "fuse_qkv"]


Projection = Callable[[Tensor], Tensor]


def _is_plain(module: nn.Module) -> bool:
    return type(module) is nn.Linear


def _linear(weight: Tensor, bias: Tensor | None = None) -> Projection:
    return lambda x: F.linear(x, weight, bias)


def _projection(module: nn.Module) -> Projection:
    """A plain Linear as `F.linear` on its weights; any other layer (4-bit) called as is."""
    if _is_plain(module):
        return _linear(module.weight, module.bias)
    return module


def _qkv_projection(attention: nn.Module) -> Projection:
    projections = [attention.q_proj, attention.k_proj, attention.v_proj]
    if all(_is_plain(p) for p in projections):
        return _linear(*fuse_qkv(attention))
    return lambda x: torch.cat([p(x) for p in projections], dim=-1)


def fuse_qkv(attention: nn.Module) -> tuple[Tensor, Tensor | None]:
    """Make `q_proj`, `k_proj` and `v_proj` views of one fused weight (and bias); returns them.

    Idempotent: projections that already share one storage in q, k, v order are kept.
    """
    projections = [attention.q_proj, attention.k_proj, attention.v_proj]
    fused_weight = _shared_rows([p.weight for p in projections])
    if fused_weight is None:
        fused_weight = torch.cat([p.weight.detach() for p in projections])
        _repoint(projections, "weight", fused_weight)
    if projections[0].bias is None:
        return fused_weight, None
    fused_bias = _shared_rows([p.bias for p in projections])
    if fused_bias is None:
        fused_bias = torch.cat([p.bias.detach() for p in projections])
        _repoint(projections, "bias", fused_bias)
    return fused_weight, fused_bias


def _shared_rows(parts: Sequence[Tensor]) -> Tensor | None:
    """The tensor whose consecutive rows `parts` are, if they are views of one storage."""
    pointer = parts[0].data_ptr()
    storage = parts[0].untyped_storage().data_ptr()
    for part in parts:
        if not part.is_contiguous() or part.data_ptr() != pointer:
            return None
        if part.untyped_storage().data_ptr() != storage:
            return None
        pointer += part.numel() * part.element_size()
    first = parts[0].detach()
    rows = sum(part.shape[0] for part in parts)
    return first.as_strided((rows, *first.shape[1:]), first.stride())


def _repoint(projections: Sequence[nn.Linear], name: str, fused: Tensor) -> None:
    start = 0
    for projection in projections:
        rows = getattr(projection, name).shape[0]
        setattr(projection, name, nn.Parameter(fused[start : start + rows], requires_grad=False))
        start += rows


@dataclass(frozen=True)
class _Layer:
    norm1: Tensor  # float32
    eps1: float
    qkv: Projection
    o: Projection
    norm2: Tensor  # float32
    eps2: float
    gate_up: Projection
    down: Projection

    @classmethod
    def of(cls, layer: nn.Module) -> _Layer:
        return cls(
            norm1=layer.input_layernorm.weight.detach().float(),
            eps1=layer.input_layernorm.variance_epsilon,
            qkv=_qkv_projection(layer.self_attn),
            o=_projection(layer.self_attn.o_proj),
            norm2=layer.post_attention_layernorm.weight.detach().float(),
            eps2=layer.post_attention_layernorm.variance_epsilon,
            gate_up=_projection(layer.mlp.gate_up_proj),
            down=_projection(layer.mlp.down_proj),
        )


class FusedDecodeStep:
    """`step(token_ids, positions, mask, kv, column, span)`: one token per row through the
    LM, reading and writing a caller-owned cache (see module).

    `kv[layer]` is `[rows_max, 2 * kv_heads, columns, head_dim]`, keys in the first
    `kv_heads` heads. The step writes each row's new key/value at `column` (a one-element
    long tensor on the device) and attends over the first `span` columns through `mask`,
    an additive float mask `[rows, 1, 1, span]` (0 where a row may look). `positions` are
    each row's RoPE position `[rows, 1]`. Returns float32 logits `[rows, vocab]`.
    """

    def __init__(self, model: GlmForCausalLM) -> None:
        config = model.config
        self.model = model
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        rotary = model.model.rotary_emb
        self._inv_freq = rotary.inv_freq.float()
        self._rope_scaling = float(rotary.attention_scaling)
        self.rotary_dim = 2 * self._inv_freq.numel()
        self._dtype = model.model.embed_tokens.weight.dtype
        with torch.no_grad():
            self._layers = [_Layer.of(layer) for layer in model.model.layers]
            self._lm_head = _projection(model.lm_head)
            self._final_norm = (
                model.model.norm.weight.detach().float(),
                model.model.norm.variance_epsilon,
            )

    def _norm(self, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), weight, eps).to(self._dtype)

    def _rotary_tables(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos and signed sin `[*positions.shape, 1, rotary_dim]` (pairs repeated, one head
        dim to broadcast over), as transformers rounds them: angles in float32, cos/sin cast
        to the model dtype."""
        angles = positions.float()[..., None, None] * self._inv_freq.to(positions.device)
        cos = (angles.cos() * self._rope_scaling).to(self._dtype)
        sin = (angles.sin() * self._rope_scaling).to(self._dtype)
        cos = cos.repeat_interleave(2, dim=-1)
        # rotate_half turns a pair (a, b) into (-b, a): flipped pairs times (-sin, sin)
        signed_sin = torch.stack((-sin, sin), dim=-1).flatten(-2)
        return cos, signed_sin

    def _rotate_qk(self, qkv: Tensor, cos: Tensor, signed_sin: Tensor) -> None:
        """Rotate the q and k heads of `qkv` [..., (heads + 2 kv_heads) * dim] in place."""
        qk_width = (self.heads + self.kv_heads) * self.head_dim
        turned = qkv[..., :qk_width].unflatten(-1, (-1, self.head_dim))[..., : self.rotary_dim]
        swapped = turned.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
        turned.mul_(cos).add_(swapped * signed_sin)

    def _mlp_half(self, hidden: Tensor, attended: Tensor, w: _Layer) -> Tensor:
        """The residual adds around o_proj and the MLP."""
        hidden = hidden + w.o(attended)
        gate, up = w.gate_up(self._norm(hidden, w.norm2, w.eps2)).chunk(2, -1)
        return hidden + w.down(up * F.silu(gate))

    def _logits(self, hidden: Tensor) -> Tensor:
        norm_weight, eps = self._final_norm
        return self._lm_head(self._norm(hidden, norm_weight, eps)).float()

    def __call__(
        self,
        token_ids: Tensor,
        positions: Tensor,
        mask: Tensor,
        kv: Sequence[Tensor],
        column: Tensor,
        span: int,
    ) -> Tensor:
        rows = token_ids.shape[0]
        heads, groups, dim = self.heads, self.kv_heads, self.head_dim
        q_width = heads * dim
        hidden = F.embedding(token_ids[:, 0], self.model.model.embed_tokens.weight)
        cos, signed_sin = self._rotary_tables(positions[:, 0])  # [rows, 1, rotary_dim]
        for w, cache in zip(self._layers, kv, strict=True):
            qkv = w.qkv(self._norm(hidden, w.norm1, w.eps1))
            self._rotate_qk(qkv, cos, signed_sin)
            table = cache[:rows]
            table.index_copy_(2, column, qkv[:, q_width:].view(rows, 2 * groups, 1, dim))
            # the heads of a group attend as the query positions of their key/value head
            attended = F.scaled_dot_product_attention(
                qkv[:, :q_width].view(rows, groups, heads // groups, dim),
                table[:, :groups, :span],
                table[:, groups:, :span],
                attn_mask=mask,
                scale=self.scale,
            )
            hidden = self._mlp_half(hidden, attended.reshape(rows, q_width), w)
        return self._logits(hidden)

    def prefill(
        self,
        token_ids: Tensor,
        lengths: Tensor,
        kv: Sequence[Tensor],
        slots: Tensor,
        start: int = 0,
    ) -> Tensor:
        """Prompts `token_ids` [rows, T], right-padded (row r's `lengths[r]` real ids first),
        into the cache rows `slots` [rows] at columns `start` to `start + T` (columns past a
        row's length get junk, for a mask to hide); returns the logits [rows, vocab] after
        each row's last real id.

        With `start` 0 the rows begin empty, and causal attention alone keeps the padding
        (after the real ids) out of them. With `start` > 0 one row continues the `start`
        ids its cache row already holds in columns 0 to `start` (positions go on from there).
        """
        rows, width = token_ids.shape
        if start and rows != 1:
            raise ValueError("only one row at a time continues a cached prefix")
        heads, groups, dim = self.heads, self.kv_heads, self.head_dim
        q_width = heads * dim
        hidden = F.embedding(token_ids, self.model.model.embed_tokens.weight)
        device = token_ids.device
        columns = torch.arange(start, start + width, device=device)
        cos, signed_sin = self._rotary_tables(columns)  # [width, 1, rotary_dim]
        # with a prefix: query i (column start + i) sees columns up to start + i
        visible = torch.arange(start + width, device=device) <= columns[:, None] if start else None
        for w, cache in zip(self._layers, kv, strict=True):
            qkv = w.qkv(self._norm(hidden, w.norm1, w.eps1))
            self._rotate_qk(qkv, cos, signed_sin)
            new_kv = qkv[..., q_width:].view(rows, width, 2 * groups, dim).transpose(1, 2)
            cache[:, :, start : start + width].index_copy_(0, slots, new_kv)
            query = qkv[..., :q_width].view(rows, width, heads, dim).transpose(1, 2)
            if visible is None:
                attended = F.scaled_dot_product_attention(
                    query,
                    new_kv[:, :groups],
                    new_kv[:, groups:],
                    is_causal=True,
                    scale=self.scale,
                    enable_gqa=True,
                )
            else:  # every key/value head repeated for its query heads (one row, once per turn)
                table = cache[:, :, : start + width].index_select(0, slots)
                table = table.repeat_interleave(heads // groups, dim=1)
                attended = F.scaled_dot_product_attention(
                    query,
                    table[:, :heads],
                    table[:, heads:],
                    attn_mask=visible,
                    scale=self.scale,
                )
            hidden = self._mlp_half(hidden, attended.transpose(1, 2).reshape(rows, width, -1), w)
        last = hidden[torch.arange(rows, device=device), lengths - 1]
        return self._logits(last)
