"""Token-rate to mel-rate regulator of the flow decoder (`InterpolateRegulator`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.flow.config import LengthRegulatorConfig

__all__ = ["InterpolateRegulator"]


class InterpolateRegulator(nn.Module):
    """Nearest-neighbour upsampling to the mel length, then a small conv stack, masked.

    `model` = len(sampling_ratios) x [Conv1d k3, GroupNorm, Mish] + Conv1d k1, so the keys are
    `model.{0,1,3,4,...,3n}` (Mish has no parameters).
    """

    def __init__(self, cfg: LengthRegulatorConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in cfg.sampling_ratios:
            layers += [
                nn.Conv1d(cfg.channels, cfg.channels, 3, 1, 1),
                nn.GroupNorm(cfg.groups, cfg.channels),
                nn.Mish(),
            ]
        layers.append(nn.Conv1d(cfg.channels, cfg.out_channels, 1, 1))
        self.model = nn.Sequential(*layers)

    def regulate(self, x: Tensor, n_frames: int) -> Tensor:
        """x: (B, T_tok, C) -> (B, out_channels, n_frames), channels first: `forward` for
        lengths that all equal n_frames (nothing to mask), without reading a tensor on the
        host, so that it can run inside a CUDA graph."""
        frames = F.interpolate(x.transpose(1, 2).contiguous(), size=n_frames, mode="nearest")
        return self.model(frames)

    def forward(self, x: Tensor, ylens: Tensor) -> tuple[Tensor, Tensor]:
        """x: (B, T_tok, C) token features; ylens: (B,) mel lengths.

        Returns (B, T_mel, out_channels) with frames past each length zeroed, and `ylens`.
        """
        t_mel = int(ylens.max())
        out = self.regulate(x, t_mel).transpose(1, 2).contiguous()
        positions = torch.arange(t_mel, device=ylens.device)
        valid = (positions.unsqueeze(0) < ylens.unsqueeze(1)).to(out.dtype).unsqueeze(-1)
        return out * valid, ylens
