"""The static KV cache and the fused step in the cases a server meets: rows at different
positions, rows joining and leaving, a row at the cache's end, positions past the model's
position table, one-id prompts, grouped-query heads, and steps replayed from recordings."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from pathlib import Path

import numpy as np
import pytest
import torch

from models.glm4voice.static_batch import StaticCacheConfig, StaticKVBatch
from models.lm import LMStepper, build_random_lm
from models.lm.configuration_lm import ChatGLMConfig
from models.lm.loading import load_lm
from models.lm.tiny import tiny_config_dict

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 512


def _stepper(dtype: torch.dtype = torch.float32, **sizes: int) -> LMStepper:
    seq_length = sizes.pop("seq_length", None)
    config_dict = tiny_config_dict(padded_vocab_size=VOCAB, **sizes)
    if seq_length is not None:
        config_dict["seq_length"] = seq_length
    config = ChatGLMConfig.from_dict(config_dict)
    return LMStepper(build_random_lm(config, dtype=dtype, seed=5))


def _recomputed(stepper: LMStepper, ids: list[int]) -> torch.Tensor:
    """Logits after `ids`, from transformers' forward with a fresh dynamic cache."""
    logits, _ = stepper.prefill(torch.tensor([ids]))
    return logits[0]


@pytest.mark.parametrize(
    ("case", "folder", "dtype", "atol"),
    [
        ("b1_fp32", "model", torch.float32, 1e-4),
        ("b2_leftpad_fp32", "model", torch.float32, 1e-4),
        ("b1_rope500_fp32", "model_rope500", torch.float32, 1e-4),
        ("b1_bf16", "model_bf16", torch.bfloat16, 0.25),
    ],
)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "transformers"])
def test_static_steps_of_rows_at_different_positions_give_the_reference_logits(
    golden_dir: Path, case: str, folder: str, dtype: torch.dtype, atol: float, fused: bool
):
    """A live row in slot 0 at its own position; the reference rows take the next slots and
    are stepped teacher-forced, every other step beside that row, every other alone."""
    data = {p.stem: np.load(p) for p in (golden_dir / "lm" / "cases" / case).glob("*.npy")}
    stepper = LMStepper(load_lm(golden_dir / "lm" / folder, dtype=dtype))
    config = StaticCacheConfig(max_batch=4, max_len=32, min_columns=8, fused=fused)
    static = StaticKVBatch(stepper, config)
    static.prefill("other", [9, 10, 11])
    rows = data["input_ids"].shape[0]
    keys = [f"row{i}" for i in range(rows)]
    prompts = [
        [int(t) for t, real in zip(ids, mask, strict=True) if real]
        for ids, mask in zip(data["input_ids"], data["attention_mask"], strict=True)
    ]
    got = torch.stack(static.prefill_many(list(zip(keys, prompts, strict=True))))
    want = torch.from_numpy(data["prefill_logits"][:, -1])
    torch.testing.assert_close(got, want, atol=atol, rtol=0)
    for k in range(data["decode_input_ids"].shape[1]):
        tokens = [int(t) for t in data["decode_input_ids"][:, k]]
        step_keys = keys + ["other"] if k % 2 else keys
        logits = static.step(step_keys, tokens + [5] * (len(step_keys) - rows))
        want = torch.from_numpy(data["decode_logits"][:, k])
        torch.testing.assert_close(logits[:rows], want, atol=atol, rtol=0)


@pytest.mark.parametrize(
    "heads",
    [
        {"num_attention_heads": 4, "multi_query_group_num": 1, "kv_channels": 16},
        {"num_attention_heads": 6, "multi_query_group_num": 2, "kv_channels": 8},
        {"num_attention_heads": 4, "multi_query_group_num": 4, "kv_channels": 8},
    ],
    ids=["one-kv-head", "three-per-group", "no-grouping"],
)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "transformers"])
def test_rows_joining_pausing_and_leaving_keep_the_logits_of_their_own_sequences(heads, fused):
    """Slots freed and retaken mid-stream, one-id prompts, rows sitting out steps, and the
    cache packing its rows when the cursor reaches its end: every row's logits are those of
    its own sequence recomputed from scratch."""
    stepper = _stepper(hidden_size=48, **heads)
    config = StaticCacheConfig(max_batch=4, max_len=20, min_columns=4, fused=fused)
    static = StaticKVBatch(stepper, config)
    sequences: dict[Hashable, list[int]] = {}

    def join(key: str, prompt: list[int]) -> None:
        sequences[key] = list(prompt)
        torch.testing.assert_close(
            static.prefill(key, prompt), _recomputed(stepper, prompt), atol=1e-5, rtol=0
        )

    def step(keys: str) -> None:
        tokens = [10 + len(sequences[k]) for k in keys]
        logits = static.step(list(keys), tokens)
        for key, token, row in zip(keys, tokens, logits, strict=True):
            sequences[key].append(token)
            torch.testing.assert_close(row, _recomputed(stepper, sequences[key]), atol=1e-5, rtol=0)

    join("a", [7])
    join("b", list(range(20, 31)))
    step("ab")
    step("b")
    join("c", [8])  # one id, at a position far behind the cursor
    step("cab")
    static.release("a")  # frees slot 0 below live rows
    sequences.pop("a")
    step("c")
    join("d", [40, 41])  # takes slot 0 again
    for _ in range(6):  # b (slot 1) sits out; the cursor reaches 20 and the rows are packed
        step("dc")
    assert static._cursor < 20
    step("bdc")
    step("b")


def test_a_row_at_the_end_of_the_cache_is_refused_and_no_row_is_overwritten():
    """The cache never wraps around: a step that needs a column past the end raises, and
    every row keeps its keys/values (the other row's only packed to the left)."""
    stepper = _stepper()
    static = StaticKVBatch(stepper, StaticCacheConfig(max_batch=2, max_len=8, min_columns=4))
    full = [30, 31, 32, 33, 34, 35, 36]
    static.prefill("full", full)
    static.prefill("short", [50, 51])
    static.step(["full", "short"], [37, 52])  # full now holds all 8 columns
    before = torch.stack(static.cache.kv).clone()
    with pytest.raises(RuntimeError, match="reached the static KV cache"):
        static.step(["full"], [38])
    kv = torch.stack(static.cache.kv)
    torch.testing.assert_close(kv[:, 0], before[:, 0], atol=0, rtol=0)
    torch.testing.assert_close(kv[:, 1, :, :3], before[:, 1][:, :, [0, 1, 7]], atol=0, rtol=0)
    static.release("full")  # the short row goes on from its own three ids
    logits = static.step(["short"], [53])
    torch.testing.assert_close(logits[0], _recomputed(stepper, [50, 51, 52, 53]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_positions_past_the_models_position_table_turn_as_in_transformers(dtype):
    """RoPE angles come from the positions themselves: a model whose `seq_length` is 16
    steps on at positions past it as transformers' forward does."""
    stepper = _stepper(dtype, seq_length=16)
    assert stepper.model.config.max_position_embeddings == 16
    prompt = list(range(100, 130))
    logits, state = stepper.prefill(torch.tensor([prompt]))
    want = [logits[0]]
    got = []
    for fused in (True, False):
        static = StaticKVBatch(stepper, StaticCacheConfig(max_batch=1, max_len=40, fused=fused))
        got.append([static.prefill("a", prompt)])
        for token in range(200, 206):
            got[-1].append(static.step(["a"], [token])[0])
    for token in range(200, 206):
        want.append(stepper.decode(state, torch.tensor([token]))[0])
    for rows in got:
        if dtype == torch.float32:
            torch.testing.assert_close(torch.stack(rows), torch.stack(want), atol=1e-5, rtol=0)
        else:  # about one bf16 ulp of these logits (|logit| < 8)
            assert (torch.stack(rows) - torch.stack(want)).abs().max() <= 2**-5


class _Replays:
    """A CPU stand-in for `CudaGraphCache`: the first call of a signature clones the inputs
    into buffers and notes what a capture would bake in (the cache's span, and its column
    tensor's address); later calls copy the inputs into the buffers and run on those, with
    the noted span and column tensor."""

    def __init__(self, fn: Callable[..., torch.Tensor], static: StaticKVBatch) -> None:
        self.fn, self.static = fn, static
        self.recordings: dict[Hashable, tuple[tuple[torch.Tensor, ...], int, torch.Tensor]] = {}
        self.replays = 0

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        key = tuple((tuple(t.shape), t.dtype) for t in tensors)
        if key not in self.recordings:
            cache = self.static.cache
            self.recordings[key] = (tuple(t.clone() for t in tensors), cache.span, cache.column)
        else:
            self.replays += 1
        buffers, span, column = self.recordings[key]
        for buffer, value in zip(buffers, tensors, strict=True):
            buffer.copy_(value)
        cache = self.static.cache
        live = cache.span, cache.column
        cache.span, cache.column = span, column
        try:
            return self.fn(*buffers)
        finally:
            cache.span, cache.column = live


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "transformers"])
def test_steps_replayed_from_input_buffers_give_the_plain_steps_logits(fused):
    """What a graph step reads is its copied inputs, the cache and what its signature fixes:
    replays across buckets, spans, padding rows and a packing give the plain logits."""
    stepper = _stepper()
    schedule = ["ab", "b", "abc", "c", "ca", "abc", "b", "ab"] * 3
    results = []
    for replayed in (False, True):
        config = StaticCacheConfig(max_batch=4, max_len=24, min_columns=4, fused=fused)
        static = StaticKVBatch(stepper, config)
        if replayed:
            static._step_fn, static.mode = _Replays(static._forward, static), "graphs"
        rows = [static.prefill(k, p) for k, p in (("a", [5, 6, 7]), ("b", [8]), ("c", [9] * 6))]
        tokens = dict.fromkeys("abc", 3)
        for keys in schedule:
            logits = static.step(list(keys), [tokens[k] for k in keys])
            rows.extend(logits)
            tokens.update({k: int(row.argmax()) for k, row in zip(keys, logits, strict=True)})
        assert static.mode == ("graphs" if replayed else "plain")
        if replayed:
            assert static._step_fn.replays > len(schedule) // 2
        results.append(torch.stack(rows))
    torch.testing.assert_close(results[1], results[0], atol=0, rtol=0)
