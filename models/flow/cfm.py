"""Conditional flow matching sampler (`ConditionalCFM`): Euler ODE solve with CFG.

The conditional and unconditional estimator passes of each step run as one batch of 2
(`[cond; uncond]`), which halves the number of estimator launches compared with the reference's
two sequential calls; the numbers agree to float32 rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models.flow.config import CFMConfig
from models.flow.estimator import ConditionalDecoder

__all__ = ["NOISE_SEED", "ConditionalCFM", "EulerTrace", "reference_noise", "time_grid"]

NOISE_SEED = 42


def reference_noise(
    shape: tuple[int, ...],
    device: torch.device,
    dtype: torch.dtype,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The starting noise of the reference sampler, without touching the global RNG.

    The reference calls `torch.manual_seed(42)` then `randn_like(mu)`; a generator of the same
    device seeded 42 draws the same numbers. `generator`, when given, is re-seeded with 42 and
    left advanced past the draw, so later draws from it (the vocoder's) continue the reference
    sequence. Shape (B, 80, T).
    """
    if generator is None:
        generator = torch.Generator(device=device)
    generator.manual_seed(NOISE_SEED)
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def time_grid(n_timesteps: int, scheduler: str, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(n_timesteps + 1,) times from 0 to 1; `cosine` maps u -> 1 - cos(u pi / 2)."""
    grid = torch.linspace(0, 1, n_timesteps + 1, device=device, dtype=dtype)
    if scheduler == "cosine":
        grid = 1 - torch.cos(grid * 0.5 * math.pi)
    return grid


@dataclass
class EulerTrace:
    """Optional record of a solve: states x_0..x_n (each (B, 80, T)) and the times fed in."""

    states: list[Tensor]
    times: list[Tensor]


class ConditionalCFM(nn.Module):
    """Holds the estimator (`decoder.estimator.*`) and integrates its velocity field."""

    def __init__(self, cfg: CFMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.inference_cfg_rate = cfg.inference_cfg_rate
        self.estimator = ConditionalDecoder(cfg.estimator)

    def guided_velocity(
        self, x: Tensor, mask: Tensor, mu: Tensor, t: Tensor, spks: Tensor, cond: Tensor
    ) -> Tensor:
        """`(1 + r) v(x | mu, spks, cond) - r v(x | 0, 0, 0)` with one batched estimator call.

        x, mu, cond: (B, 80, T); mask: (B, 1, T); t: 0-dim; spks: (B, 80). Returns (B, 80, T).
        """
        rate = self.inference_cfg_rate
        if rate <= 0:
            return self.estimator(x, mask, mu, t, spks, cond)
        b = x.shape[0]
        velocity = self.estimator(
            torch.cat([x, x]),
            torch.cat([mask, mask]),
            torch.cat([mu, torch.zeros_like(mu)]),
            t.reshape(()).expand(2 * b),
            torch.cat([spks, torch.zeros_like(spks)]),
            torch.cat([cond, torch.zeros_like(cond)]),
        )
        v_cond, v_uncond = velocity[:b], velocity[b:]
        return (1.0 + rate) * v_cond - rate * v_uncond

    def solve_euler(
        self,
        x: Tensor,
        t_span: Tensor,
        mu: Tensor,
        mask: Tensor,
        spks: Tensor,
        cond: Tensor,
        trace: EulerTrace | None = None,
    ) -> Tensor:
        """Fixed-grid Euler steps, accumulating `t` like the reference (`t += dt`).

        `dt` for step k is `t_span[k] - t` where `t` is the accumulated time, so the float32
        rounding of the grid matches the reference. Appends to `trace` when given.
        """
        t = t_span[0]
        dt = t_span[1] - t_span[0]
        if trace is not None:
            trace.states.append(x)
        for step in range(1, len(t_span)):
            if trace is not None:
                trace.times.append(t)
            x = x + dt * self.guided_velocity(x, mask, mu, t, spks, cond)
            t = t + dt
            if trace is not None:
                trace.states.append(x)
            if step < len(t_span) - 1:
                dt = t_span[step + 1] - t
        return x

    def forward(
        self,
        mu: Tensor,
        mask: Tensor,
        spks: Tensor,
        cond: Tensor,
        n_timesteps: int = 10,
        noise: Tensor | None = None,
        trace: EulerTrace | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Sample a mel (B, 80, T) given mu/cond (B, 80, T), mask (B, 1, T) and spks (B, 80).

        `noise` defaults to the reference draw (`reference_noise`, from `generator` if given).
        """
        if noise is None:
            noise = reference_noise(tuple(mu.shape), mu.device, mu.dtype, generator)
        elif noise.shape != mu.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != mu shape {tuple(mu.shape)}")
        t_span = time_grid(n_timesteps, self.cfg.t_scheduler, mu.device, mu.dtype)
        return self.solve_euler(noise.to(mu), t_span, mu, mask, spks, cond, trace)
