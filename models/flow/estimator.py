"""Velocity estimator of the flow decoder: a 1-D U-Net with transformer blocks.

`ConditionalDecoder(x, mask, mu, t, spks, cond)` packs `[x; mu; spks; cond]` on the channel
axis (4 x 80 = 320 channels), embeds the time `t` with sinusoids + an MLP, and runs
down blocks (ResNet + transformer blocks + stride-2 conv), mid blocks, and up blocks (skip
concatenation, ResNet + transformer blocks + transposed conv) before a final block and 1x1 conv.

Reference behaviours reproduced on purpose:
* the transformer attention gets `mask^T mask` as a float 0/1 tensor that is *added* to the
  scores (valid keys get +1, padded keys +0), so padded keys are not removed;
* before each skip concatenation the upsampled signal is cropped to the skip length (odd T).
Parameter names follow the checkpoint (`attn1.to_q`, `ff.net.0.proj`, `norm1`, `norm3`, ...).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.flow.config import EstimatorConfig

__all__ = ["ConditionalDecoder", "sinusoidal_time_embedding"]


def sinusoidal_time_embedding(t: Tensor, dim: int, scale: float = 1000.0) -> Tensor:
    """(B,) or 0-dim times -> (B, dim) `[sin(scale t w), cos(scale t w)]`, w_k = 1e4^(-k/(h-1))."""
    if t.ndim < 1:
        t = t.unsqueeze(0)
    half = dim // 2
    step = math.log(10000) / (half - 1)
    freqs = torch.exp(torch.arange(half, device=t.device).float() * -step)
    angles = scale * t.unsqueeze(1) * freqs.unsqueeze(0)
    return torch.cat((angles.sin(), angles.cos()), dim=-1)


class TimestepEmbedding(nn.Module):
    """`linear_2(silu(linear_1(emb)))`."""

    def __init__(self, in_channels: int, time_embed_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, sample: Tensor) -> Tensor:
        return self.linear_2(self.act(self.linear_1(sample)))


class Block1D(nn.Module):
    """Masked `[Conv1d k3, GroupNorm(8), Mish]`: `block(x * mask) * mask`."""

    def __init__(self, dim: int, dim_out: int, groups: int = 8) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv1d(dim, dim_out, 3, padding=1), nn.GroupNorm(groups, dim_out), nn.Mish()
        )

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.block(x * mask) * mask


class ResnetBlock1D(nn.Module):
    """Two Block1D with the time embedding added in between, plus a 1x1 residual conv."""

    def __init__(self, dim: int, dim_out: int, time_emb_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_emb_dim, dim_out))
        self.block1 = Block1D(dim, dim_out)
        self.block2 = Block1D(dim_out, dim_out)
        self.res_conv = nn.Conv1d(dim, dim_out, 1)

    def forward(self, x: Tensor, mask: Tensor, time_emb: Tensor) -> Tensor:
        h = self.block1(x, mask) + self.mlp(time_emb).unsqueeze(-1)
        return self.block2(h, mask) + self.res_conv(x * mask)


class Downsample1D(nn.Module):
    """Stride-2 Conv1d k3 p1: T -> ceil(T / 2)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, 3, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample1D(nn.Module):
    """ConvTranspose1d k4 s2 p1: T -> 2T."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose1d(dim, dim, 4, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class SelfAttention(nn.Module):
    """Multi-head attention with bias-free q/k/v and an additive float mask (`attn1.*`)."""

    def __init__(self, dim: int, heads: int, head_dim: int, dropout: float) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.head_dim = head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(dropout)])

    def forward(self, x: Tensor, additive_mask: Tensor) -> Tensor:
        """x: (B, T, dim); additive_mask: (B, 1, T, T) added to the scaled scores."""
        b, t, _ = x.shape

        def split(y: Tensor) -> Tensor:
            return y.view(b, t, self.heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x)), attn_mask=additive_mask
        )
        out = out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim)
        return self.to_out[1](self.to_out[0](out))


class GELUProjection(nn.Module):
    """`gelu(proj(x))` (`ff.net.0`)."""

    def __init__(self, dim_in: int, dim_out: int, approximate: str) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.proj(x), approximate=self.approximate)


class FeedForward(nn.Module):
    """`net = [GELUProjection(dim, 4 dim), Dropout, Linear(4 dim, dim)]`."""

    def __init__(self, dim: int, dropout: float, act_fn: str) -> None:
        super().__init__()
        approximate = "tanh" if act_fn == "gelu-approximate" else "none"
        self.net = nn.ModuleList(
            [
                GELUProjection(dim, dim * 4, approximate),
                nn.Dropout(dropout),
                nn.Linear(dim * 4, dim),
            ]
        )

    def forward(self, x: Tensor) -> Tensor:
        for module in self.net:
            x = module(x)
        return x


class TransformerBlock(nn.Module):
    """`x + attn1(norm1(x))`, then `x + ff(norm3(x))` (self-attention only)."""

    def __init__(self, dim: int, cfg: EstimatorConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = SelfAttention(dim, cfg.num_heads, cfg.attention_head_dim, cfg.dropout)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, cfg.dropout, cfg.act_fn)

    def forward(self, x: Tensor, additive_mask: Tensor) -> Tensor:
        x = self.attn1(self.norm1(x), additive_mask) + x
        return self.ff(self.norm3(x)) + x


def _stage(
    dim_in: int, dim_out: int, cfg: EstimatorConfig, resample: nn.Module | None
) -> nn.ModuleList:
    """`[ResnetBlock1D, [TransformerBlock] * n_blocks, resample]` (mid stages: no resample)."""
    blocks = nn.ModuleList(TransformerBlock(dim_out, cfg) for _ in range(cfg.n_blocks))
    stage = nn.ModuleList([ResnetBlock1D(dim_in, dim_out, cfg.time_embed_dim), blocks])
    if resample is not None:
        stage.append(resample)
    return stage


def _run_stage(stage: nn.ModuleList, x: Tensor, mask: Tensor, t_emb: Tensor) -> Tensor:
    """ResNet + transformer blocks of one stage; x (B, C, T), mask (B, 1, T) float."""
    x = stage[0](x, mask, t_emb)
    additive = torch.matmul(mask.transpose(1, 2), mask).unsqueeze(1)  # (B, 1, T, T) of 0/1
    h = x.transpose(1, 2).contiguous()
    for block in stage[1]:
        h = block(h, additive)
    return h.transpose(1, 2).contiguous()


class ConditionalDecoder(nn.Module):
    """U-Net velocity estimator (`decoder.estimator.*` keys of flow.pt)."""

    def __init__(self, cfg: EstimatorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.in_channels = cfg.in_channels
        self.time_mlp = TimestepEmbedding(cfg.in_channels, cfg.time_embed_dim)
        widths = list(cfg.channels)
        self.down_blocks = nn.ModuleList()
        dim_out = cfg.in_channels
        for i, width in enumerate(widths):
            dim_in, dim_out = dim_out, width
            is_last = i == len(widths) - 1
            tail = nn.Conv1d(width, width, 3, padding=1) if is_last else Downsample1D(width)
            self.down_blocks.append(_stage(dim_in, dim_out, cfg, tail))
        self.mid_blocks = nn.ModuleList(
            _stage(widths[-1], widths[-1], cfg, None) for _ in range(cfg.num_mid_blocks)
        )
        up_widths = widths[::-1] + [widths[0]]
        self.up_blocks = nn.ModuleList()
        for i in range(len(up_widths) - 1):
            width = up_widths[i + 1]
            is_last = i == len(up_widths) - 2
            tail = nn.Conv1d(width, width, 3, padding=1) if is_last else Upsample1D(width)
            self.up_blocks.append(_stage(up_widths[i] * 2, width, cfg, tail))
        self.final_block = Block1D(up_widths[-1], up_widths[-1])
        self.final_proj = nn.Conv1d(up_widths[-1], cfg.out_channels, 1)

    def forward(
        self,
        x: Tensor,
        mask: Tensor,
        mu: Tensor,
        t: Tensor,
        spks: Tensor | None = None,
        cond: Tensor | None = None,
    ) -> Tensor:
        """Velocity (B, 80, T) for state x (B, 80, T).

        mask: (B, 1, T) float 0/1; mu, cond: (B, 80, T); t: (B,) or 0-dim; spks: (B, 80).
        """
        t_emb = self.time_mlp(sinusoidal_time_embedding(t, self.in_channels).to(x.dtype))
        parts = [x, mu]
        if spks is not None:
            parts.append(spks.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        if cond is not None:
            parts.append(cond)
        h = torch.cat(parts, dim=1)
        skips: list[Tensor] = []
        masks = [mask]
        for stage in self.down_blocks:
            h = _run_stage(stage, h, masks[-1], t_emb)
            skips.append(h)
            h = stage[2](h * masks[-1])
            masks.append(masks[-1][:, :, ::2])
        masks.pop()
        for stage in self.mid_blocks:
            h = _run_stage(stage, h, masks[-1], t_emb)
        mask_up = mask
        for stage in self.up_blocks:
            mask_up = masks.pop()
            skip = skips.pop()
            h = torch.cat([h[:, :, : skip.shape[-1]], skip], dim=1)
            h = _run_stage(stage, h, mask_up, t_emb)
            h = stage[2](h * mask_up)
        h = self.final_block(h, mask_up)
        return self.final_proj(h * mask_up) * mask
