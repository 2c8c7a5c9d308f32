"""Sampling and step-wise decoding for GLM-4-Voice-9B.

`sample_next` is a pure function over a batch of logits (temperature, then nucleus/top-p
filtering, then a draw from a seeded generator), usable by any decode loop. `LMStepper` runs the
model one step at a time with a KV cache for a batch of left-padded sequences, passing explicit
position ids (the GLM-4 position of a token counts only real tokens). `LMBackend` is the interface
a decode loop needs, so a remote model server can stand in for the local model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch
from transformers import DynamicCache, GlmForCausalLM

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling settings; the defaults are the GLM-4-Voice web demo's."""

    temperature: float = 0.2
    top_p: float = 0.8
    max_new_tokens: int = 2000
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.temperature < math.inf:  # also rejects NaN
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    def generator(self, device: str | torch.device = "cpu") -> torch.Generator:
        """A generator on `device`, seeded with `seed` (or from the global RNG when None)."""
        gen = torch.Generator(device=device)
        if self.seed is None:
            gen.seed()
        else:
            gen.manual_seed(self.seed)
        return gen


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the smallest set whose probability reaches `top_p`.

    The most likely token is always kept. Shape [B, V] in and out.
    """
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= (1.0 - top_p)
    drop_sorted[..., -1] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def check_sampled(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """`ids` [B] if each row's chosen logit is a real candidate, else a ValueError.

    With `ids` the argmax: a NaN anywhere in a row is what argmax picks (and makes softmax all
    NaN); a row masked to -inf everywhere leaves nothing to pick. Either way the id would be
    meaningless.
    """
    chosen = logits.gather(-1, ids[:, None]).squeeze(-1)
    bad = chosen.isnan() | (chosen == float("-inf"))
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()
        raise ValueError(
            f"logits row(s) {rows} have NaN values or no allowed token (all -inf): "
            "nothing can be sampled"
        )
    return ids


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids [B] (int64) from logits [B, V]; temperature 0 means greedy (argmax).

    Raises ValueError for a row with NaN logits or without any allowed (finite) logit.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
    greedy = check_sampled(logits, logits.argmax(dim=-1))
    if temperature <= 0:
        return greedy
    scores = top_p_filter(logits.float() / temperature, top_p)
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------- stepping


@dataclass
class DecodeState:
    """A batch of sequences in progress.

    `attention_mask` [B, T] covers every cached position (0 = left pad); `next_positions` [B] is
    the GLM-4 position the next token of each row gets.
    """

    cache: DynamicCache
    attention_mask: torch.Tensor
    next_positions: torch.Tensor

    @property
    def length(self) -> int:
        """Cached positions per row (pads included)."""
        return int(self.attention_mask.shape[1])


StateT = TypeVar("StateT")


class LMBackend(Protocol[StateT]):
    """What a decode loop needs from a language model (local or remote)."""

    @property
    def device(self) -> torch.device: ...

    def prefill(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, StateT]:
        """Run prompts [B, S] (left-padded); return last-position logits [B, V] and the state."""
        ...

    def decode(self, state: StateT, token_ids: torch.Tensor) -> torch.Tensor:
        """Append one token per row ([B]); return the next logits [B, V]. Updates `state`."""
        ...


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """GLM-4 position ids [B, S] of a left-padded batch: pads 0, real tokens 0, 1, 2, ..."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


class LMStepper:
    """Prefill and cached decode over `GlmForCausalLM` with explicit positions (`LMBackend`)."""

    def __init__(self, model: GlmForCausalLM) -> None:
        self.model = model

    @property
    def device(self) -> torch.device:
        return self.model.model.embed_tokens.weight.device

    @torch.inference_mode()
    def prefill(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, DecodeState]:
        """Run prompts [B, S]; return float32 logits of the last position [B, V] and the state."""
        input_ids = input_ids.to(self.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(self.device).long()
        positions = positions_from_mask(attention_mask)
        cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        state = DecodeState(cache, attention_mask, positions[:, -1] + 1)
        return out.logits[:, -1].float(), state

    @torch.inference_mode()
    def append(self, state: DecodeState, token_ids: torch.Tensor) -> torch.Tensor:
        """Append tokens [B, n] to every row; return float32 logits after the last one [B, V]."""
        token_ids = token_ids.to(self.device)
        batch, n = token_ids.shape
        positions = state.next_positions[:, None] + torch.arange(n, device=self.device)
        mask = torch.cat([state.attention_mask, state.attention_mask.new_ones(batch, n)], dim=1)
        out = self.model(
            input_ids=token_ids,
            attention_mask=mask,
            position_ids=positions,
            cache=state.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        state.attention_mask = mask
        state.next_positions = positions[:, -1] + 1
        return out.logits[:, -1].float()

    def decode(self, state: DecodeState, token_ids: torch.Tensor) -> torch.Tensor:
        """Append one token per row ([B]); return the next logits [B, V]."""
        return self.append(state, token_ids.reshape(-1, 1))

    def crop(self, state: DecodeState, length: int) -> None:
        """Forget every cached position from `length` on (e.g. an answer cut short)."""
        drop = state.length - length
        if drop < 0:
            raise ValueError(f"cannot crop {state.length} cached positions to {length}")
        if drop == 0:
            return
        state.cache.crop(-drop)
        state.attention_mask = state.attention_mask[:, :length]
        state.next_positions = positions_from_mask(state.attention_mask)[:, -1] + 1


def generate(
    backend: LMBackend,
    prompt_ids: Sequence[int],
    sampling: SamplingConfig,
    stop_ids: Collection[int],
) -> Iterator[int]:
    """Sample one sequence token by token; yields every id, the stop id (if reached) included."""
    generator = sampling.generator(backend.device)
    logits, state = backend.prefill(torch.tensor([list(prompt_ids)], dtype=torch.long))
    for _ in range(sampling.max_new_tokens):
        token = sample_next(logits, sampling.temperature, sampling.top_p, generator)
        token_id = int(token[0])
        yield token_id
        if token_id in stop_ids:
            return
        logits = backend.decode(state, token)
