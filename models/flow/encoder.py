"""Block-causal Conformer encoder of the flow decoder (`BlockConformerEncoder`).

Layout (pre-norm, no convolution module, no macaron FFN):

    x -> Linear -> LayerNorm -> * sqrt(d)        (`embed.out.0`, `embed.out.1`)
    for each layer:  x = x + MHA_relpos(LN(x));  x = x + FFN_swish(LN(x))
    x -> after_norm

Self-attention uses ESPnet relative positions (scores `(q+u)k^T + (q+v)p^T`, divided by
sqrt(d_k)) and a block-causal mask: position `i` sees every `j <= i` and every `j` in its own
`block_size`-token block. Because scores depend on positions only through `i - j`, keys and
values of completed blocks never change when tokens are appended; `forward_chunk` exploits that
to encode a growing token stream incrementally with exactly the outputs of a full pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.flow.config import EncoderConfig

__all__ = ["BlockConformerEncoder", "EncoderCache", "block_causal_mask", "relative_position_table"]


def relative_position_table(
    max_rel: int, min_rel: int, d_model: int, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """ESPnet relative sinusoids for relative positions `max_rel, max_rel-1, ..., min_rel`.

    Row `k` encodes relative position `max_rel - k` as `[sin(r w_0), cos(r w_0), sin(r w_1), ...]`
    with `w_m = 10000^(-2m/d)`. Computed in float32 like the reference table, then cast.
    Returns (1, max_rel - min_rel + 1, d_model).
    """
    rel = torch.arange(max_rel, min_rel - 1, -1, dtype=torch.float32, device=device)
    # The reference builds |r| * w and flips the sign for negative r; same numbers bit for bit.
    magnitude = rel.abs().unsqueeze(1)
    inv_freq = torch.exp(
        torch.arange(0, d_model, 2, dtype=torch.float32, device=device)
        * -(math.log(10000.0) / d_model)
    )
    angle = magnitude * inv_freq
    angle = torch.where(rel.unsqueeze(1) < 0, -angle, angle)
    table = torch.zeros(rel.shape[0], d_model, dtype=torch.float32, device=device)
    table[:, 0::2] = torch.sin(angle)
    table[:, 1::2] = torch.cos(angle)
    return table.unsqueeze(0).to(dtype)


def block_causal_mask(query_pos: Tensor, key_pos: Tensor, block_size: int) -> Tensor:
    """Boolean (Tq, Tk): True where query position `i` may attend key position `j`.

    `j <= i`, or `j` lies in the same `block_size` block as `i` (future tokens inside the block).
    """
    q = query_pos.unsqueeze(1)
    k = key_pos.unsqueeze(0)
    return (k <= q) | (
        torch.div(k, block_size, rounding_mode="floor")
        == torch.div(q, block_size, rounding_mode="floor")
    )


class BlockRelPositionAttention(nn.Module):
    """Multi-head self-attention with ESPnet relative positions and learned biases u/v.

    Keys: `linear_q/k/v/out` (with bias), `linear_pos` (no bias), `pos_bias_u/v` (H, d_k).
    """

    def __init__(self, n_head: int, n_feat: int, dropout_rate: float) -> None:
        super().__init__()
        self.h = n_head
        self.d_k = n_feat // n_head
        self.linear_q = nn.Linear(n_feat, n_feat)
        self.linear_k = nn.Linear(n_feat, n_feat)
        self.linear_v = nn.Linear(n_feat, n_feat)
        self.linear_out = nn.Linear(n_feat, n_feat)
        self.linear_pos = nn.Linear(n_feat, n_feat, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(n_head, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.zeros(n_head, self.d_k))
        self.dropout = nn.Dropout(dropout_rate)

    def _heads(self, x: Tensor) -> Tensor:
        """(B, T, H*d_k) -> (B, H, T, d_k)."""
        b, t, _ = x.shape
        return x.view(b, t, self.h, self.d_k).transpose(1, 2)

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values (B, H, T, d_k) of the normalised layer input `x` (B, T, D)."""
        return self._heads(self.linear_k(x)), self._heads(self.linear_v(x))

    def forward(
        self,
        x: Tensor,
        keys: Tensor,
        values: Tensor,
        allowed: Tensor,
        rel_index: Tensor,
        pos_table: Tensor,
    ) -> Tensor:
        """Attend queries from `x` (B, Tq, D) over `keys`/`values` (B, H, Tk, d_k).

        `allowed` (B, Tq, Tk) bool; `rel_index` (Tq, Tk) indexes rows of `pos_table`
        (1, R, D), which holds the sinusoid of relative position `i - j`. Returns (B, Tq, D).
        """
        b, tq, _ = x.shape
        q = self.linear_q(x).view(b, tq, self.h, self.d_k)
        p = self._heads(self.linear_pos(pos_table))  # (1, H, R, d_k)
        q_u = (q + self.pos_bias_u).transpose(1, 2)
        q_v = (q + self.pos_bias_v).transpose(1, 2)
        content = torch.matmul(q_u, keys.transpose(-2, -1))  # (B, H, Tq, Tk)
        position_all = torch.matmul(q_v, p.transpose(-2, -1))  # (B, H, Tq, R)
        index = rel_index.expand(b, self.h, tq, rel_index.shape[-1])
        position = torch.gather(position_all, 3, index)
        scores = (content + position) / math.sqrt(self.d_k)
        blocked = ~allowed.unsqueeze(1)
        scores = scores.masked_fill(blocked, float("-inf"))
        attn = torch.softmax(scores, dim=-1).masked_fill(blocked, 0.0)
        out = torch.matmul(self.dropout(attn), values)
        return self.linear_out(out.transpose(1, 2).reshape(b, tq, self.h * self.d_k))


class PositionwiseFeedForward(nn.Module):
    """`w_2(dropout(swish(w_1(x))))`."""

    def __init__(self, d_model: int, d_hidden: int, dropout_rate: float) -> None:
        super().__init__()
        self.w_1 = nn.Linear(d_model, d_hidden)
        self.w_2 = nn.Linear(d_hidden, d_model)
        self.dropout = nn.Dropout(dropout_rate)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_2(self.dropout(F.silu(self.w_1(x))))


class ConformerLayer(nn.Module):
    """Pre-norm layer: `x + MHA(norm_mha(x))`, then `x + FFN(norm_ff(x))`."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        d = cfg.output_size
        self.self_attn = BlockRelPositionAttention(
            cfg.attention_heads, d, cfg.attention_dropout_rate
        )
        self.feed_forward = PositionwiseFeedForward(d, cfg.linear_units, cfg.dropout_rate)
        self.norm_ff = nn.LayerNorm(d, eps=1e-5)
        self.norm_mha = nn.LayerNorm(d, eps=1e-5)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(
        self,
        x: Tensor,
        past: tuple[Tensor, Tensor] | None,
        allowed: Tensor,
        rel_index: Tensor,
        pos_emb: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x: (B, T, D) new positions; `past` optional cached (keys, values) (B, H, S, d_k).

        Returns the layer output (B, T, D) and the keys/values (B, H, T, d_k) of the new
        positions (to extend a cache).
        """
        normed = self.norm_mha(x)
        keys, values = self.self_attn.project_kv(normed)
        all_keys, all_values = keys, values
        if past is not None:
            all_keys = torch.cat([past[0], keys], dim=2)
            all_values = torch.cat([past[1], values], dim=2)
        att = self.self_attn(normed, all_keys, all_values, allowed, rel_index, pos_emb)
        x = x + self.dropout(att)
        x = x + self.dropout(self.feed_forward(self.norm_ff(x)))
        return x, keys, values


class LinearInput(nn.Module):
    """`out = [Linear, LayerNorm, Dropout]`; the result is scaled by sqrt(d) for the relpos path."""

    def __init__(self, idim: int, odim: int, dropout_rate: float) -> None:
        super().__init__()
        self.out = nn.Sequential(
            nn.Linear(idim, odim), nn.LayerNorm(odim, eps=1e-5), nn.Dropout(dropout_rate)
        )
        self.xscale = math.sqrt(odim)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(x) * self.xscale


@dataclass
class EncoderCache:
    """Per-layer keys/values of already encoded, complete blocks (batch 1).

    `keys[l]`/`values[l]`: (1, H, S, d_k) for absolute positions `start .. start+S-1`;
    `length` is the absolute position of the next token to encode (a block boundary).
    `start > 0` only after `trim`, which bounds the left context (then outputs are approximate).
    """

    keys: list[Tensor] = field(default_factory=list)
    values: list[Tensor] = field(default_factory=list)
    start: int = 0
    length: int = 0

    def trim(self, max_positions: int) -> EncoderCache:
        """Keep at most the last `max_positions` cached positions (bounded left context)."""
        held = self.length - self.start
        if held <= max_positions:
            return self
        drop = held - max_positions
        return EncoderCache(
            keys=[k[:, :, drop:] for k in self.keys],
            values=[v[:, :, drop:] for v in self.values],
            start=self.start + drop,
            length=self.length,
        )


class BlockConformerEncoder(nn.Module):
    """Block-causal relative-position Conformer (`encoder.*` keys of flow.pt)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.block_size = cfg.block_size
        self.embed = LinearInput(cfg.input_size, cfg.output_size, cfg.dropout_rate)
        self.pos_dropout = nn.Dropout(cfg.positional_dropout_rate)
        self.encoders = nn.ModuleList(ConformerLayer(cfg) for _ in range(cfg.num_blocks))
        self.after_norm = nn.LayerNorm(cfg.output_size, eps=1e-5)

    def _positions(
        self, queries: range, keys: range, device: torch.device, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Block-causal mask (Tq, Tk), relative index (Tq, Tk) and the sinusoid table.

        `queries`/`keys` are absolute position ranges; the table holds relative positions
        `queries[-1] - keys[0]` down to `queries[0] - keys[-1]`, and `rel_index[i, j]` points
        at the row of `q_i - k_j`.
        """
        query_pos = torch.arange(queries.start, queries.stop, device=device)
        key_pos = torch.arange(keys.start, keys.stop, device=device)
        max_rel = queries.stop - 1 - keys.start
        min_rel = queries.start - (keys.stop - 1)
        table = relative_position_table(max_rel, min_rel, self.cfg.output_size, device, dtype)
        rel_index = max_rel - (query_pos.unsqueeze(1) - key_pos.unsqueeze(0))
        return block_causal_mask(query_pos, key_pos, self.block_size), rel_index, table

    def _run_layers(
        self,
        x: Tensor,
        allowed: Tensor,
        rel_index: Tensor,
        table: Tensor,
        past: EncoderCache | None,
    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        pos_emb = self.pos_dropout(table)
        new_keys: list[Tensor] = []
        new_values: list[Tensor] = []
        use_past = past is not None and past.length > past.start
        for index, layer in enumerate(self.encoders):
            layer_past = (past.keys[index], past.values[index]) if use_past else None
            x, keys, values = layer(x, layer_past, allowed, rel_index, pos_emb)
            new_keys.append(keys)
            new_values.append(values)
        return self.after_norm(x), new_keys, new_values

    def forward(self, xs: Tensor, xs_lens: Tensor) -> tuple[Tensor, Tensor]:
        """Encode a padded batch.

        xs: (B, T, input_size) float; xs_lens: (B,) valid lengths. Returns the output
        (B, T, output_size) and the padding mask (B, 1, T) bool, as the reference encoder does.
        """
        t = xs.shape[1]
        positions = torch.arange(t, device=xs.device)
        pad = positions.unsqueeze(0) < xs_lens.to(xs.device).unsqueeze(1)  # (B, T)
        causal, rel_index, table = self._positions(range(t), range(t), xs.device, xs.dtype)
        allowed = causal.unsqueeze(0) & pad.unsqueeze(1)
        x = self.pos_dropout(self.embed(xs))
        out, _, _ = self._run_layers(x, allowed, rel_index, table, None)
        return out, pad.unsqueeze(1)

    def forward_chunk(
        self, xs: Tensor, cache: EncoderCache | None = None
    ) -> tuple[Tensor, EncoderCache]:
        """Encode the next tokens of a stream (batch 1), reusing cached complete blocks.

        xs: (1, n, input_size) for absolute positions `cache.length .. cache.length + n - 1`.
        Returns (1, n, output_size) - identical to the matching rows of a full `forward` over
        the whole stream (when the cache was not trimmed) - and a cache extended by the
        complete blocks among the new tokens. Tokens of a trailing partial block are not
        cached: pass them again, with the tokens that follow, in the next call.
        """
        cache = cache if cache is not None else EncoderCache()
        if cache.length % self.block_size != 0:
            raise ValueError(f"cache ends at {cache.length}, not on a block boundary")
        if xs.shape[0] != 1:
            raise ValueError(f"forward_chunk takes batch 1, got {xs.shape[0]}")
        n = xs.shape[1]
        if n == 0:
            raise ValueError("forward_chunk needs at least one new token")
        queries = range(cache.length, cache.length + n)
        keys = range(cache.start, cache.length + n)
        causal, rel_index, table = self._positions(queries, keys, xs.device, xs.dtype)
        x = self.pos_dropout(self.embed(xs))
        out, keys, values = self._run_layers(x, causal.unsqueeze(0), rel_index, table, cache)
        keep = (n // self.block_size) * self.block_size
        merged = EncoderCache(start=cache.start, length=cache.length + keep)
        for index in range(len(self.encoders)):
            new_k = keys[index][:, :, :keep]
            new_v = values[index][:, :, :keep]
            if cache.length > cache.start:
                new_k = torch.cat([cache.keys[index], new_k], dim=2)
                new_v = torch.cat([cache.values[index], new_v], dim=2)
            merged.keys.append(new_k)
            merged.values.append(new_v)
        return out, merged
