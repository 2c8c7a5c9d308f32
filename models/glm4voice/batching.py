"""Decoding many conversations' sequences as one batch per step.

`SequenceBatch` is what the model worker drives: prefill sequences (alone, or several that
arrive together in one left-padded forward), then step any subset of the live sequences by one
token each. Two implementations:

- `KVCacheBatch` (the local `LMStepper`): the sequences being stepped share one left-padded
  batch (one KV cache, an attention mask with 0 on pads, per-row GLM-4 positions), so a round
  costs one forward whatever the number of conversations. A sequence joins the batch by padding
  the shorter side on the left; it leaves by selecting the other rows and trimming columns that
  are padding in every row. Joins and leaves happen per turn and when a reply pauses for its
  listener, not per step.
- `SerialBatch` (any `LMBackend`, e.g. a remote server): steps each sequence on its own and lets
  the backend batch them.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from typing import Protocol

import torch

from models.lm import DecodeState, LMBackend, LMStepper

logger = logging.getLogger(__name__)


class SequenceBatch(Protocol):
    """Independent token sequences stepped together."""

    def prefill(self, key: Hashable, prompt_ids: Sequence[int]) -> torch.Tensor:
        """Start sequence `key` with its prompt; returns its next-token logits [V] (float32)."""
        ...

    def prefill_many(self, prompts: Sequence[tuple[Hashable, Sequence[int]]]) -> list[torch.Tensor]:
        """`prefill` for several (key, prompt ids) at once; logits [V] of each, in order."""
        ...

    def step(self, keys: Sequence[Hashable], tokens: Sequence[int]) -> torch.Tensor:
        """Append `tokens[i]` to sequence `keys[i]`; returns the next logits [len(keys), V]."""
        ...

    def release(self, key: Hashable) -> None:
        """Forget sequence `key` (no-op if unknown)."""
        ...

    def warmup_batch_sizes(self, limit: int) -> list[int]:
        """Batch sizes (at most `limit`) whose first step should run before serving."""
        ...


def left_padded(prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts as one left-padded batch: ids [n, longest] (pads 0) and mask [n, longest]."""
    if not prompts or any(len(ids) == 0 for ids in prompts):
        raise ValueError("need at least one prompt, none of them empty")
    longest = max(len(ids) for ids in prompts)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros(len(prompts), longest, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, longest - len(prompt) :] = 1
    return ids, mask


def dynamic_warmup_sizes(limit: int) -> list[int]:
    """A dynamic-shape step pays its first-call costs once, whatever the batch size: one
    sequence, and two so that the batched paths (joining, padding, parking) run too."""
    return [1, 2] if limit >= 2 else [1]


class SerialBatch:
    """One backend call per sequence: for backends that batch on their own side."""

    def __init__(self, backend: LMBackend) -> None:
        self.backend = backend
        self._states: dict[Hashable, object] = {}

    def prefill(self, key: Hashable, prompt_ids: Sequence[int]) -> torch.Tensor:
        logits, state = self.backend.prefill(torch.tensor([list(prompt_ids)], dtype=torch.long))
        self._states[key] = state
        return logits[0]

    def prefill_many(self, prompts: Sequence[tuple[Hashable, Sequence[int]]]) -> list[torch.Tensor]:
        return [self.prefill(key, ids) for key, ids in prompts]

    def step(self, keys: Sequence[Hashable], tokens: Sequence[int]) -> torch.Tensor:
        rows = [
            self.backend.decode(self._states[key], torch.tensor([token], dtype=torch.long))[0]
            for key, token in zip(keys, tokens, strict=True)
        ]
        return torch.stack(rows)

    def release(self, key: Hashable) -> None:
        self._states.pop(key, None)

    def warmup_batch_sizes(self, limit: int) -> list[int]:
        return dynamic_warmup_sizes(limit)


# ----------------------------------------------------------------------------- KV cache surgery


def _layers(state: DecodeState) -> list:
    return list(state.cache.layers)


def _pad_left(state: DecodeState, length: int) -> None:
    """Left-pad every row of `state` with masked positions up to `length` columns."""
    extra = length - state.length
    if extra <= 0:
        return
    for layer in _layers(state):
        for name in ("keys", "values"):
            kv = getattr(layer, name)  # (B, kv_heads, T, head_dim)
            pad = kv.new_zeros(kv.shape[0], kv.shape[1], extra, kv.shape[3])
            setattr(layer, name, torch.cat([pad, kv], dim=2))
    mask = state.attention_mask
    state.attention_mask = torch.cat([mask.new_zeros(mask.shape[0], extra), mask], dim=1)


def _trim_left(state: DecodeState) -> None:
    """Drop leading columns that are padding in every row."""
    real = state.attention_mask.any(dim=0)
    if not bool(real.any()):
        return
    first = int(real.nonzero()[0, 0])
    if first == 0:
        return
    for layer in _layers(state):
        layer.keys = layer.keys[:, :, first:]
        layer.values = layer.values[:, :, first:]
    state.attention_mask = state.attention_mask[:, first:]


def _select_rows(state: DecodeState, rows: list[int]) -> None:
    index = torch.tensor(rows, dtype=torch.long, device=state.attention_mask.device)
    for layer in _layers(state):
        layer.keys = layer.keys.index_select(0, index)
        layer.values = layer.values.index_select(0, index)
    state.attention_mask = state.attention_mask.index_select(0, index)
    state.next_positions = state.next_positions.index_select(0, index)
    _trim_left(state)


def _append_rows(state: DecodeState, other: DecodeState) -> None:
    """Append the rows of `other` below those of `state` (both padded to a common length)."""
    length = max(state.length, other.length)
    _pad_left(state, length)
    _pad_left(other, length)
    for mine, theirs in zip(_layers(state), _layers(other), strict=True):
        mine.keys = torch.cat([mine.keys, theirs.keys], dim=0)
        mine.values = torch.cat([mine.values, theirs.values], dim=0)
    state.attention_mask = torch.cat([state.attention_mask, other.attention_mask], dim=0)
    state.next_positions = torch.cat([state.next_positions, other.next_positions], dim=0)


def _copy_rows(state: DecodeState, rows: list[int]) -> DecodeState:
    """A new state holding copies of `rows` of `state`, trimmed."""
    index = torch.tensor(rows, dtype=torch.long, device=state.attention_mask.device)
    cache = type(state.cache)()
    for layer_index, layer in enumerate(_layers(state)):
        cache.update(
            layer.keys.index_select(0, index), layer.values.index_select(0, index), layer_index
        )
    copy = DecodeState(
        cache,
        state.attention_mask.index_select(0, index),
        state.next_positions.index_select(0, index),
    )
    _trim_left(copy)
    return copy


class KVCacheBatch:
    """Sequences of a local `LMStepper`, stepped as rows of one left-padded KV cache."""

    def __init__(self, stepper: LMStepper) -> None:
        self.stepper = stepper
        self._batch: DecodeState | None = None
        self._rows: list[Hashable] = []  # key of each batch row
        self._parked: dict[Hashable, DecodeState] = {}  # sequences outside the batch

    @property
    def batch_keys(self) -> list[Hashable]:
        """Keys of the rows currently in the batch, in row order."""
        return list(self._rows)

    def prefill(self, key: Hashable, prompt_ids: Sequence[int]) -> torch.Tensor:
        self.release(key)
        logits, state = self.stepper.prefill(torch.tensor([list(prompt_ids)], dtype=torch.long))
        self._parked[key] = state
        return logits[0]

    def prefill_many(self, prompts: Sequence[tuple[Hashable, Sequence[int]]]) -> list[torch.Tensor]:
        """One left-padded forward; each row is then parked on its own, its padding trimmed."""
        if len(prompts) == 1:
            return [self.prefill(*prompts[0])]
        if len({key for key, _ in prompts}) != len(prompts):
            raise ValueError("each sequence can be prefilled once per call")
        for key, _ in prompts:
            self.release(key)
        ids, mask = left_padded([list(prompt) for _, prompt in prompts])
        logits, state = self.stepper.prefill(ids, mask)
        for row, (key, _) in enumerate(prompts):
            self._parked[key] = _copy_rows(state, [row])
        return list(logits)

    def step(self, keys: Sequence[Hashable], tokens: Sequence[int]) -> torch.Tensor:
        if len(set(keys)) != len(keys):
            raise ValueError("a sequence can take one token per step")
        self._arrange(keys)
        assert self._batch is not None
        order = {key: row for row, key in enumerate(self._rows)}
        by_row = [0] * len(self._rows)
        for key, token in zip(keys, tokens, strict=True):
            by_row[order[key]] = int(token)
        logits = self.stepper.decode(self._batch, torch.tensor(by_row, dtype=torch.long))
        index = torch.tensor([order[key] for key in keys], device=logits.device)
        return logits.index_select(0, index)

    def release(self, key: Hashable) -> None:
        self._parked.pop(key, None)
        if key in self._rows:
            self._drop_rows([self._rows.index(key)])

    def warmup_batch_sizes(self, limit: int) -> list[int]:
        return dynamic_warmup_sizes(limit)

    # ------------------------------------------------------------------ membership

    def _arrange(self, keys: Sequence[Hashable]) -> None:
        """Make the batch hold exactly `keys` (in any row order)."""
        wanted = set(keys)
        unknown = [k for k in keys if k not in self._parked and k not in self._rows]
        if unknown:
            raise KeyError(f"sequence {unknown[0]!r} was never prefilled (or was released)")
        leaving = [row for row, key in enumerate(self._rows) if key not in wanted]
        if leaving:
            self._park_rows(leaving)
        for key in keys:
            if key not in self._rows:
                self._join(key)

    def _park_rows(self, rows: list[int]) -> None:
        assert self._batch is not None
        for row in rows:
            self._parked[self._rows[row]] = _copy_rows(self._batch, [row])
        self._drop_rows(rows)

    def _drop_rows(self, rows: list[int]) -> None:
        assert self._batch is not None
        keep = [row for row in range(len(self._rows)) if row not in set(rows)]
        self._rows = [self._rows[row] for row in keep]
        if not keep:
            self._batch = None
            return
        _select_rows(self._batch, keep)

    def _join(self, key: Hashable) -> None:
        state = self._parked.pop(key)
        if self._batch is None:
            self._batch = state
        else:
            _append_rows(self._batch, state)
        self._rows.append(key)


__all__ = ["KVCacheBatch", "SequenceBatch", "SerialBatch", "left_padded"]
