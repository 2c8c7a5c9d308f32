"""A preallocated key/value cache with one row per conversation, and a decode step that can
be compiled into CUDA graphs.

`StaticKVBatch` is a `SequenceBatch` like `KVCacheBatch`, with fixed tensor shapes:

- Every live sequence owns a row ("slot") of a cache of `max_batch` rows and `max_len`
  columns per layer, allocated once. A prompt is prefilled (dynamic shapes, once per turn)
  into the first columns of its slot.
- Every step writes its new keys/values into one shared column (`cursor`) of every row in
  the step's batch bucket; a boolean table [max_batch, max_len] on the host says which
  columns hold a row's real tokens, and a device copy of it as an additive mask (0 or the
  dtype's minimum) is what the step attends through, updated a column at a time. A row's
  positions are its own (the count of its real tokens), so gaps of unused columns change
  nothing. A sequence that sits out a step (paused, or a free slot) gets a junk entry in
  that column that its mask never shows it.
- When the cursor reaches `max_len`, each row's real columns are packed to the left.
- A step covers the smallest bucket (power of two up to `max_batch`) holding the highest
  slot in use; slots are handed out lowest first. It attends over the smallest column span
  (power of two from `min_columns`, or `max_len`) holding the cursor.

Steps and prompts run through `FusedDecodeStep` (`models/lm/fused_step.py`; about half the
kernels of transformers' layers, same logits) unless `StaticCacheConfig.fused` is off: a
fused prefill takes the prompts right-padded and writes them straight
into their slots; transformers' prefill runs them left-padded with a dynamic cache, copied
into the slots afterwards. With the fused path, a sequence's ids and keys/values are kept
when it leaves (`PrefixCache`), and a prompt that continues them (the conversation's next
turn) prefills only its new ids.

Because the one-token step has the same shapes for every (bucket, span), it can run as one
CUDA graph each, which removes the per-layer kernel-launch and Python overhead that dominates
a one-token step at small batch: `record_graphs` captures the plain step directly
(`CudaGraphCache`: about three plain steps' time per recording, no compiler); `compile_step`
wraps it in `torch.compile(mode="reduce-overhead")` (inductor kernels plus CUDA graphs,
minutes of compilation at the 9B size), one graph per bucket over all `max_len` columns.
Either is recorded on first use (the engine's warm-up steps every bucket once). On the CPU
the same static path runs plainly; it gives the logits of the dynamic cache.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from models.cuda_graphs import CudaGraphCache
from models.glm4voice.batching import dynamic_warmup_sizes, left_padded
from models.glm4voice.prefix_cache import PrefixCache, gather_kv
from models.lm import LMStepper
from models.lm.fused_step import FusedDecodeStep

logger = logging.getLogger(__name__)


def _doublings(start: int, stop: int) -> list[int]:
    """start, 2 start, 4 start, ... while below stop, then stop."""
    values = []
    while start < stop:
        values.append(start)
        start *= 2
    return [*values, stop]


@dataclass(frozen=True)
class StaticCacheConfig:
    """Shape of the preallocated cache: rows (live sequences) and columns (tokens per row;
    GLM-4-Voice's practical context is 8192). It takes layers x 2 x max_batch x kv_heads x
    max_len x head_dim values: 2.7 GB in bf16 for GLM-4-Voice-9B at the defaults."""

    max_batch: int = 8
    max_len: int = 8192
    # A step attends over the first columns up to the smallest span (a power of two from
    # min_columns, or max_len) that holds the cursor, not over all max_len columns.
    min_columns: int = 256
    # Step and prefill through `FusedDecodeStep` (about half the kernels of transformers'
    # layers); False keeps transformers' forward.
    fused: bool = True
    # Ids whose keys/values are kept after their sequences leave (`PrefixCache`), so a
    # prompt that continues a stored conversation prefills only its new ids; 0 turns it
    # off. Needs the fused path. 16384 ids take 0.67 GB in bf16 for GLM-4-Voice-9B.
    prefix_cache_ids: int = 16_384

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_len < 2 or self.min_columns < 1:
            raise ValueError("need max_batch >= 1, max_len >= 2 and min_columns >= 1")
        if self.prefix_cache_ids < 0:
            raise ValueError("prefix_cache_ids must be >= 0")

    @property
    def column_spans(self) -> list[int]:
        """Column counts a step attends over: powers of two from min_columns, then max_len."""
        return _doublings(self.min_columns, self.max_len)

    def column_span(self, columns: int) -> int:
        """The smallest span holding `columns` columns."""
        return next(span for span in self.column_spans if span >= columns)

    @property
    def buckets(self) -> list[int]:
        """Batch sizes a step is run at: powers of two below max_batch, then max_batch."""
        return _doublings(1, self.max_batch)

    def bucket(self, rows: int) -> int:
        """The smallest bucket holding `rows` rows."""
        return next(size for size in self.buckets if size >= rows)


class SlotCache:
    """Keys and values of every layer in one tensor [max_batch, 2 * kv_heads, max_len,
    head_dim] per layer (`kv`; keys in the first kv_heads heads, `keys`/`values` are views);
    `update` writes the step's one new column at `column` for the first rows and returns
    those rows' first `span` columns (the transformers attention layers call it as they
    call a `Cache`)."""

    def __init__(
        self,
        layers: int,
        config: StaticCacheConfig,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (config.max_batch, 2 * kv_heads, config.max_len, head_dim)
        self.kv = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.keys = [kv[:, :kv_heads] for kv in self.kv]
        self.values = [kv[:, kv_heads:] for kv in self.kv]
        self.column = torch.zeros(1, dtype=torch.long, device=device)
        self.span = config.max_len  # columns `update` returns (set before each step)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, **_: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = key_states.shape[0]
        keys = self.keys[layer_idx][:rows]
        values = self.values[layer_idx][:rows]
        keys.index_copy_(2, self.column, key_states.to(keys.dtype))
        values.index_copy_(2, self.column, value_states.to(values.dtype))
        return keys[:, :, : self.span], values[:, :, : self.span]

    def mark_static(self) -> None:
        """Tell the compiler these tensors keep their addresses (needed by CUDA graphs)."""
        for tensor in [*self.kv, self.column]:
            torch._dynamo.mark_static_address(tensor)


StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
StepMode = Literal["plain", "graphs", "compile"]


class StaticKVBatch:
    """Sequences of a local `LMStepper` in a preallocated cache, one row each (see module)."""

    def __init__(self, stepper: LMStepper, config: StaticCacheConfig | None = None) -> None:
        self.stepper = stepper
        self.config = config or StaticCacheConfig()
        model = stepper.model
        lm_config = model.config
        device = stepper.device
        self._dtype = model.model.embed_tokens.weight.dtype
        self.cache = SlotCache(
            lm_config.num_hidden_layers,
            self.config,
            lm_config.num_key_value_heads,
            lm_config.head_dim,
            self._dtype,
            device,
        )
        rows, cols = self.config.max_batch, self.config.max_len
        self._valid = torch.zeros(rows, cols, dtype=torch.bool)  # host bookkeeping
        self._hidden = torch.finfo(self._dtype).min
        self._bias = torch.full((rows, cols), self._hidden, dtype=self._dtype, device=device)
        self._pin = device.type == "cuda"
        self._lengths = [0] * rows  # real tokens per slot (= the next GLM-4 position)
        self._slot_of: dict[Hashable, int] = {}
        self._cursor = 0  # the next column written by a step
        self.fused = FusedDecodeStep(model) if self.config.fused else None
        self._ids: list[list[int]] = [[] for _ in range(rows)]  # the ids in each slot
        self.prefixes = (
            PrefixCache(self.config.prefix_cache_ids)
            if self.fused is not None and self.config.prefix_cache_ids
            else None
        )
        # Per sequence of the latest `prefill_many`: ids whose keys/values were restored.
        self.last_reused: dict[Hashable, int] = {}
        self._step_fn: StepFn = self._forward
        self.mode: StepMode = "plain"

    @property
    def max_sequences(self) -> int:
        return self.config.max_batch

    @property
    def live_keys(self) -> list[Hashable]:
        return list(self._slot_of)

    @property
    def compiled(self) -> bool:
        """Whether steps run as CUDA graphs (recorded or compiled)."""
        return self.mode != "plain"

    def record_graphs(self) -> None:
        """Run the one-token step as CUDA graphs recorded from the plain step (one per
        bucket, on its first use): no compiler, about a second per bucket."""
        self._require_cuda("CUDA-graph")
        graphs = len(self.config.buckets) * len(self.config.column_spans)
        self._step_fn = CudaGraphCache(self._forward, max_graphs=graphs)
        self.mode = "graphs"
        logger.info("decode step runs as CUDA graphs for batch buckets %s", self.config.buckets)

    def compile_step(self) -> None:
        """Compile the one-token step with `torch.compile` into CUDA graphs (one per bucket,
        on first use; compiling takes minutes at the full size)."""
        self._require_cuda("compiled")
        self.cache.mark_static()
        # One compiled graph per batch bucket: every step attends over all columns.
        self._step_fn = torch.compile(self._forward, mode="reduce-overhead", dynamic=False)
        self.mode = "compile"
        logger.info("decode step compiled for batch buckets %s", self.config.buckets)

    def _require_cuda(self, what: str) -> None:
        if self.stepper.device.type != "cuda":
            raise RuntimeError(f"the {what} decode step needs a CUDA device")

    # ------------------------------------------------------------------ SequenceBatch

    def prefill(self, key: Hashable, prompt_ids: Sequence[int]) -> torch.Tensor:
        return self.prefill_many([(key, prompt_ids)])[0]

    def prefill_many(self, prompts: Sequence[tuple[Hashable, Sequence[int]]]) -> list[torch.Tensor]:
        """One forward over the left-padded prompts; each row's real columns are copied into
        the first columns of its own slot."""
        if len({key for key, _ in prompts}) != len(prompts):
            raise ValueError("each sequence can be prefilled once per call")
        for key, prompt_ids in prompts:
            self.release(key)
            if not prompt_ids:
                raise ValueError("an empty prompt cannot be prefilled")
            if len(prompt_ids) >= self.config.max_len:
                raise ValueError(
                    f"a prompt of {len(prompt_ids)} ids does not fit {self.config.max_len}"
                )
        free = [slot for slot in range(self.config.max_batch) if slot not in self._slot_of.values()]
        if len(free) < len(prompts):
            raise RuntimeError(
                f"all {self.config.max_batch} rows of the static KV cache are in use"
            )
        slots = free[: len(prompts)]
        ids = [list(prompt) for _, prompt in prompts]
        reused = [0] * len(prompts)
        if self.fused is None:
            logits = list(self._transformers_prefill(ids, slots))
        else:
            try:
                logits = self._prefill_with_prefixes(ids, slots, reused)
            except torch.OutOfMemoryError:
                if not self.prefixes:  # nothing of ours to give back
                    raise
                logger.warning(
                    "out of memory in a prefill: dropping %d kept prefixes (%d ids), trying again",
                    len(self.prefixes),
                    self.prefixes.stored_ids,
                )
                self.prefixes.clear()
                if self._bias.device.type == "cuda":
                    torch.cuda.empty_cache()
                reused = [0] * len(prompts)
                logits = self._prefill_with_prefixes(ids, slots, reused)
        self.last_reused = {key: n for (key, _), n in zip(prompts, reused, strict=True)}
        for (key, prompt_ids), slot in zip(prompts, slots, strict=True):
            length = len(prompt_ids)
            self._ids[slot] = list(prompt_ids)
            self._valid[slot] = False
            self._valid[slot, :length] = True
            self._bias[slot].fill_(self._hidden)
            self._bias[slot, :length] = 0
            self._lengths[slot] = length
            self._slot_of[key] = slot
            self._cursor = max(self._cursor, length)
        return logits

    def step(self, keys: Sequence[Hashable], tokens: Sequence[int]) -> torch.Tensor:
        if len(set(keys)) != len(keys):
            raise ValueError("a sequence can take one token per step")
        missing = [key for key in keys if key not in self._slot_of]
        if missing:
            raise KeyError(f"sequence {missing[0]!r} was never prefilled (or was released)")
        if self._cursor >= self.config.max_len:
            self._compact()
        slots = [self._slot_of[key] for key in keys]
        rows = self.config.bucket(max(slots) + 1)
        cursor = self._cursor
        inputs = self._step_inputs(slots, tokens, rows)
        token_ids, positions, index = inputs[0, :, None], inputs[1, :, None], inputs[2]
        # Every row of the bucket sees the new column for this step (a row outside the step
        # sees its own junk entry, so no row's softmax is empty); afterwards only the rows
        # that took a token keep it. A failed step leaves the column hidden from every row.
        self._bias[:rows, cursor] = 0
        span = (
            self.config.max_len if self.mode == "compile" else self.config.column_span(cursor + 1)
        )
        self.cache.span = span
        try:
            with torch.inference_mode():
                self.cache.column.fill_(cursor)
                mask = self._bias[:rows, None, None, :span]
                logits = self._run_step(token_ids, positions, mask)
                if slots == list(range(len(slots))):
                    logits = logits[: len(slots)].clone()
                else:
                    logits = logits.index_select(0, index[: len(slots)])
        except BaseException:
            self._bias[:rows, cursor] = self._hidden
            raise
        left_out = sorted(set(range(rows)) - set(slots))
        if left_out:
            self._bias[left_out, cursor] = self._hidden
        self._valid[slots, cursor] = True
        self._cursor += 1
        for slot, token in zip(slots, tokens, strict=True):
            self._lengths[slot] += 1
            self._ids[slot].append(int(token))
        return logits

    def release(self, key: Hashable) -> None:
        slot = self._slot_of.pop(key, None)
        if slot is None:
            return
        self._store_prefix(slot)
        self._ids[slot] = []
        self._valid[slot] = False
        self._bias[slot].fill_(self._hidden)
        self._lengths[slot] = 0
        if not self._slot_of:
            self._cursor = 0

    def warmup_batch_sizes(self, limit: int) -> list[int]:
        """Every bucket up to `limit` live sequences where steps are recorded (graphs or
        compiled: each bucket records its own); plain steps, like the dynamic cache's, need
        one and two sequences."""
        if self.mode == "plain":
            return dynamic_warmup_sizes(min(limit, self.config.max_batch))
        return [size for size in self.config.buckets if size <= max(1, limit)]

    # ------------------------------------------------------------------ internals

    def _step_inputs(self, slots: list[int], tokens: Sequence[int], rows: int) -> torch.Tensor:
        """[3, rows] on the device, in one copy: token ids, positions (each row's count of
        real tokens) and the stepped slots (padded with zeros)."""
        host = torch.zeros((3, rows), dtype=torch.long, pin_memory=self._pin)
        values = host.numpy()
        for i, (slot, token) in enumerate(zip(slots, tokens, strict=True)):
            values[0, slot] = int(token)
            values[1, slot] = self._lengths[slot]
            values[2, i] = slot
        return host.to(self._bias.device, non_blocking=True)

    def _run_step(
        self, token_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Logits [rows, V] of the graph step if there is one (its output buffer: copy it
        before the next step); should it fail, the plain step from then on (it writes the
        same cache column, so the failed call leaves nothing behind)."""
        if not self.compiled:
            return self._forward(token_ids, positions, mask)
        try:
            return self._step_fn(token_ids, positions, mask)
        except Exception:
            logger.exception("the %s decode step failed: stepping plainly from now on", self.mode)
            self._step_fn, self.mode = self._forward, "plain"
            return self._forward(token_ids, positions, mask)

    def _forward(
        self, token_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """One token per row through the LM with the slot cache; float32 logits [rows, V]."""
        if self.fused is not None:
            cache = self.cache
            return self.fused(token_ids, positions, mask, cache.kv, cache.column, cache.span)
        out = self.stepper.model(
            input_ids=token_ids,
            attention_mask=mask,
            position_ids=positions,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1].float()

    def _prefill_with_prefixes(
        self, prompts: list[list[int]], slots: list[int], reused: list[int]
    ) -> list[torch.Tensor]:
        """Fused prefill: a prompt that continues a stored prefix takes its keys/values and
        prefills the rest on its own; the other prompts are prefilled together. `reused[i]`
        is set to the ids of prompt i whose keys/values were restored."""
        logits: list[torch.Tensor | None] = [None] * len(prompts)
        fresh = []
        for index, (prompt, slot) in enumerate(zip(prompts, slots, strict=True)):
            stored, length = (None, 0) if self.prefixes is None else self.prefixes.match(prompt)
            if stored is None:
                fresh.append(index)
                continue
            for layer, kv in enumerate(self.cache.kv):
                kv[slot, :, :length] = stored[layer]
            logits[index] = self._fused_prefill([prompt[length:]], [slot], start=length)[0]
            reused[index] = length
            logger.debug("prefill reused %d of %d prompt ids", length, len(prompt))
        if fresh:
            rows = self._fused_prefill([prompts[i] for i in fresh], [slots[i] for i in fresh])
            for index, row in zip(fresh, rows, strict=True):
                logits[index] = row
        return logits  # type: ignore[return-value]

    def _store_prefix(self, slot: int) -> None:
        """Keep a leaving sequence's ids and keys/values for a prompt that continues them."""
        ids = self._ids[slot]
        if self.prefixes is None or len(ids) < self.prefixes.min_match:
            return
        columns = self._valid[slot].nonzero().squeeze(-1)
        if columns.numel() != len(ids):  # bookkeeping out of step: store nothing
            logger.warning("slot %d holds %d columns for %d ids", slot, columns.numel(), len(ids))
            return
        try:
            with torch.inference_mode():
                kv = gather_kv(self.cache.kv, slot, columns.to(self._bias.device))
        except torch.OutOfMemoryError:
            logger.warning("no memory to keep a prefix of %d ids", len(ids))
            return
        self.prefixes.store(ids, kv)

    def _fused_prefill(
        self, prompts: Sequence[Sequence[int]], slots: list[int], start: int = 0
    ) -> torch.Tensor:
        """The fused prefill of the right-padded prompts, written straight into the slots
        (at columns from `start`, after a restored prefix of that many ids)."""
        assert self.fused is not None
        width = max(len(prompt) for prompt in prompts)
        host = torch.zeros((len(prompts), width + 2), dtype=torch.long, pin_memory=self._pin)
        values = host.numpy()
        for row, (prompt, slot) in enumerate(zip(prompts, slots, strict=True)):
            values[row, : len(prompt)] = prompt
            values[row, width] = len(prompt)
            values[row, width + 1] = slot
        inputs = host.to(self._bias.device, non_blocking=True)
        with torch.inference_mode():
            return self.fused.prefill(
                inputs[:, :width], inputs[:, width], self.cache.kv, inputs[:, width + 1], start
            )

    def _transformers_prefill(
        self, prompts: Sequence[Sequence[int]], slots: list[int]
    ) -> torch.Tensor:
        """transformers' forward over the left-padded prompts with a dynamic cache, whose
        real columns are then copied into the first columns of each slot."""
        if len(prompts) == 1:
            ids, mask = torch.tensor([list(prompts[0])], dtype=torch.long), None
        else:
            ids, mask = left_padded([list(prompt) for prompt in prompts])
        logits, state = self.stepper.prefill(ids, mask)
        width = ids.shape[1]
        for row, (prompt, slot) in enumerate(zip(prompts, slots, strict=True)):
            length = len(prompt)
            for layer, cached in enumerate(state.cache.layers):
                self.cache.keys[layer][slot, :, :length] = cached.keys[row, :, width - length :]
                self.cache.values[layer][slot, :, :length] = cached.values[row, :, width - length :]
        return logits

    def _compact(self) -> None:
        """Pack every row's real columns to the left; frees the columns of gaps and junk."""
        end = 0
        for slot in self._slot_of.values():
            columns = self._valid[slot].nonzero().squeeze(-1)
            count = int(columns.numel())
            columns = columns.to(self._bias.device)
            for kv in self.cache.kv:
                kv[slot, :, :count] = kv[slot, :, columns]
            self._valid[slot] = False
            self._valid[slot, :count] = True
            self._bias[slot].fill_(self._hidden)
            self._bias[slot, :count] = 0
            end = max(end, count)
        if end >= self.config.max_len:
            raise RuntimeError(f"a sequence reached the static KV cache's {end} columns")
        logger.debug("static KV cache packed: cursor %d -> %d", self._cursor, end)
        self._cursor = end


__all__ = ["SlotCache", "StaticCacheConfig", "StaticKVBatch", "StepMode"]
