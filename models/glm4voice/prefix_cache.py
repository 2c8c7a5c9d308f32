"""Keys and values of finished sequences, kept so that the next turn's prompt does not
prefill the conversation again.

Each turn's prompt is the conversation so far plus the new user turn, so without a cache the
prefill grows with the conversation: at GLM-4-Voice-9B's size a 3000-id history costs tens
of milliseconds of GPU time before the first token of every later turn. When a sequence
leaves the static KV cache, its ids and their keys/values are stored here; a new prompt that
starts with stored ids takes their keys/values and prefills only the rest.

Matching is by ids alone: the same ids at the same positions give the same keys and values
(up to float rounding between kernels), whoever produced them. So a turn cut short by a
barge-in reuses exactly the ids its history kept, a history re-tokenized differently stops
the match where it differs, and every conversation shares the system prompt's entry.

Entries are kept least recently used first, within a budget of ids (keys and values take
`2 * layers * kv_heads * head_dim` values per id: 40 KB in bf16 for GLM-4-Voice-9B).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = ["PrefixCache", "PrefixStats", "gather_kv"]


@dataclass
class PrefixStats:
    """What the cache saved: prompts that reused a prefix, ids reused and ids prefilled."""

    hits: int = 0
    misses: int = 0
    reused_ids: int = 0
    prefilled_ids: int = 0
    stored: int = 0
    evicted: int = 0


@dataclass
class _Entry:
    ids: tuple[int, ...]
    kv: Tensor  # [layers, 2 * kv_heads, len(ids), head_dim]


class PrefixCache:
    """Stored (ids, keys/values) pairs, matched against new prompts by common prefix."""

    def __init__(self, budget_ids: int, min_match: int = 16) -> None:
        if budget_ids < 0 or min_match < 1:
            raise ValueError("need budget_ids >= 0 and min_match >= 1")
        self.budget_ids = budget_ids
        self.min_match = min_match
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._next = 0
        self.stats = PrefixStats()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def stored_ids(self) -> int:
        return sum(len(entry.ids) for entry in self._entries.values())

    def match(self, prompt: Sequence[int]) -> tuple[Tensor | None, int]:
        """The keys/values of the longest stored prefix of `prompt` and its length, leaving
        at least one id of `prompt` to prefill (for its logits); (None, 0) below
        `min_match` ids."""
        best: tuple[int, int] | None = None  # (length, entry key)
        limit = len(prompt) - 1
        for key, entry in self._entries.items():
            length = _common_prefix(entry.ids, prompt, limit)
            if length >= self.min_match and (best is None or length > best[0]):
                best = (length, key)
        if best is None:
            self.stats.misses += 1
            self.stats.prefilled_ids += len(prompt)
            return None, 0
        length, key = best
        self._entries.move_to_end(key)
        self.stats.hits += 1
        self.stats.reused_ids += length
        self.stats.prefilled_ids += len(prompt) - length
        return self._entries[key].kv[:, :, :length], length

    def store(self, ids: Sequence[int], kv: Tensor) -> None:
        """Keep `kv` [layers, 2 * kv_heads, len(ids), head_dim] for `ids`; entries whose
        ids begin this one are dropped (it covers them), then the oldest beyond the budget."""
        if len(ids) < self.min_match or len(ids) > self.budget_ids:
            return
        if kv.shape[2] != len(ids):
            raise ValueError(f"{len(ids)} ids but keys/values for {kv.shape[2]}")
        entry = _Entry(tuple(ids), kv)
        for key in [k for k, e in self._entries.items() if _is_prefix(e.ids, entry.ids)]:
            del self._entries[key]
        self._entries[self._next] = entry
        self._next += 1
        self.stats.stored += 1
        while self.stored_ids > self.budget_ids:
            self._entries.popitem(last=False)
            self.stats.evicted += 1

    def clear(self) -> None:
        self._entries.clear()


def _common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    if n <= 0:
        return 0
    if a[:n] == tuple(b[:n]):  # the usual case: a whole stored conversation
        return n
    low, high = 0, n  # a[:low] == b[:low] and a[:high] != b[:high]
    while high - low > 1:
        middle = (low + high) // 2
        if a[:middle] == tuple(b[:middle]):
            low = middle
        else:
            high = middle
    return low


def _is_prefix(short: tuple[int, ...], long: tuple[int, ...]) -> bool:
    return len(short) <= len(long) and long[: len(short)] == short


def gather_kv(kv: Sequence[Tensor], row: int, columns: Tensor) -> Tensor:
    """Keys/values [layers, 2 * kv_heads, len(columns), head_dim] of cache row `row`'s
    `columns` (one tensor per layer in `kv`, each [rows, 2 * kv_heads, max_len, head_dim])."""
    return torch.stack([layer[row].index_select(1, columns) for layer in kv])
