"""A prompt that continues a stored conversation prefills only its new ids, with the logits
of a full prefill; stored prefixes are matched by ids and kept within a budget."""

from __future__ import annotations

import pytest
import torch

from models.glm4voice.prefix_cache import PrefixCache
from models.glm4voice.static_batch import StaticCacheConfig, StaticKVBatch
from models.lm import LMStepper, build_random_lm
from models.lm.configuration_lm import ChatGLMConfig
from models.lm.tiny import tiny_config_dict

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 512


@pytest.fixture(scope="module")
def stepper() -> LMStepper:
    config = ChatGLMConfig.from_dict(tiny_config_dict(padded_vocab_size=VOCAB))
    return LMStepper(build_random_lm(config, dtype=torch.float32, seed=3))


def _kv(n: int, fill: float = 0.0) -> torch.Tensor:
    return torch.full((2, 4, n, 8), fill)


def _ids(seed: int, n: int) -> list[int]:
    return torch.randint(0, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# ----------------------------------------------------------------------------- the store


def test_the_longest_stored_prefix_matches_and_one_prompt_id_is_always_left_to_prefill():
    cache = PrefixCache(budget_ids=1000, min_match=4)
    base = list(range(100, 130))
    cache.store(base[:10], _kv(10, 1.0))
    cache.store([7, 7, 7, 7, 7, 7], _kv(6, 2.0))
    cache.store(base[:20] + [1, 2, 3], _kv(23, 3.0))
    kv, length = cache.match(base)
    assert length == 20 and kv.shape[2] == 20 and float(kv[0, 0, 0, 0]) == 3.0
    _, length = cache.match(base[:20])  # the whole prompt is stored: keep its last id back
    assert length == 19
    assert cache.match([1, 2, 3, 4, 5]) == (None, 0)
    assert cache.match(base[:3] + [0] * 10) == (None, 0)  # 3 ids < min_match
    stats = cache.stats
    assert (stats.hits, stats.misses, stats.reused_ids) == (2, 2, 39)


def test_a_stored_conversation_replaces_the_entries_it_continues():
    cache = PrefixCache(budget_ids=1000, min_match=4)
    cache.store(list(range(10)), _kv(10))
    cache.store(list(range(10)), _kv(10))  # the same ids again
    cache.store(list(range(20)), _kv(20))
    cache.store([5] * 8, _kv(8))
    assert len(cache) == 2 and cache.stored_ids == 28


def test_the_least_recently_used_entries_go_first_when_over_budget():
    cache = PrefixCache(budget_ids=30, min_match=4)
    first, second, third = ([k] * 10 for k in (1, 2, 3))
    cache.store(first, _kv(10))
    cache.store(second, _kv(10))
    cache.match(first + [9])  # first is used again: second is now the oldest
    cache.store(third, _kv(10))
    cache.store([4] * 10, _kv(10))
    assert cache.match(second + [9]) == (None, 0)
    assert cache.match(first + [9])[1] == 10 and cache.match(third + [9])[1] == 10
    assert cache.stats.evicted == 1
    cache.store([5] * 31, _kv(31))  # larger than the whole budget: not kept
    assert cache.stored_ids == 30


def test_keys_and_values_must_cover_the_ids():
    with pytest.raises(ValueError, match="ids but keys/values"):
        PrefixCache(100, min_match=2).store([1, 2, 3], _kv(2))


# ----------------------------------------------------------------------------- in the batch


def _turn(batch: StaticKVBatch, key: str, prompt: list[int], steps: int) -> list[torch.Tensor]:
    """Prefill, then feed `steps` greedy ids; every logit row. Leaves the sequence live."""
    rows = [batch.prefill(key, prompt)]
    for _ in range(steps):
        rows.append(batch.step([key], [int(rows[-1].argmax())])[0])
    return rows


def _static(stepper: LMStepper, prefix_ids: int) -> StaticKVBatch:
    return StaticKVBatch(
        stepper, StaticCacheConfig(max_batch=4, max_len=128, prefix_cache_ids=prefix_ids)
    )


@pytest.mark.parametrize("kept", [None, 4])
def test_the_next_turn_reuses_the_conversation_and_gives_a_full_prefills_logits(stepper, kept):
    """Turn two's prompt is turn one's prompt, its answer (all of it, or the 4 ids heard
    before a barge-in) and a new user turn."""
    first_prompt = _ids(1, 40)
    results = []
    for prefix_ids in (0, 4096):
        batch = _static(stepper, prefix_ids)
        rows = _turn(batch, "turn1", first_prompt, 10)
        answer = batch._ids[batch._slot_of["turn1"]][len(first_prompt) :]
        batch.release("turn1")
        heard = answer if kept is None else answer[:kept]
        rows += _turn(batch, "turn2", first_prompt + heard + _ids(2, 12), 5)
        results.append(torch.stack(rows))
        if prefix_ids:
            assert batch.prefixes is not None
            assert batch.prefixes.stats.hits == 1
            assert batch.prefixes.stats.reused_ids == 40 + len(heard)
        else:
            assert batch.prefixes is None
    torch.testing.assert_close(results[1], results[0], atol=1e-5, rtol=0)


def test_prompts_prefilled_together_mix_reused_prefixes_and_fresh_prompts(stepper):
    system = _ids(3, 24)  # every conversation starts with the same system prompt
    prompts = [("a", system + _ids(4, 9)), ("b", _ids(5, 30)), ("c", system + _ids(6, 17))]
    results = []
    for prefix_ids in (0, 4096):
        batch = _static(stepper, prefix_ids)
        _turn(batch, "earlier", system + _ids(7, 5), 3)
        batch.release("earlier")
        rows = batch.prefill_many(prompts)
        rows += list(batch.step(["a", "b", "c"], [int(r.argmax()) for r in rows]))
        results.append(torch.stack(rows))
        if prefix_ids:
            assert batch.prefixes.stats.hits == 2 and batch.prefixes.stats.reused_ids == 48
    torch.testing.assert_close(results[1], results[0], atol=1e-5, rtol=0)


def test_prefixes_are_kept_only_with_the_fused_path_and_a_budget(stepper):
    assert _static(stepper, 0).prefixes is None
    unfused = StaticCacheConfig(max_batch=2, max_len=64, fused=False, prefix_cache_ids=100)
    assert StaticKVBatch(stepper, unfused).prefixes is None
    with pytest.raises(ValueError, match="prefix_cache_ids"):
        StaticCacheConfig(prefix_cache_ids=-1)


def test_a_sequence_packed_to_the_left_is_stored_with_its_ids_in_order(stepper):
    """Pauses leave junk columns; packing drops them; the stored keys/values still line up
    with the ids, so the continuation matches a full prefill."""
    config = StaticCacheConfig(max_batch=2, max_len=48, prefix_cache_ids=4096)
    plain = StaticCacheConfig(max_batch=2, max_len=48, prefix_cache_ids=0)
    results = []
    for cfg in (plain, config):
        batch = StaticKVBatch(stepper, cfg)
        batch.prefill("a", _ids(8, 20))
        batch.prefill("b", _ids(9, 4))
        for i in range(30):  # a pauses every third step: the cursor runs out, rows pack
            keys = ["b"] if i % 3 == 0 else ["a", "b"]
            batch.step(keys, [i + 1] * len(keys))
        history = list(batch._ids[batch._slot_of["a"]])
        batch.release("a")
        results.append(torch.stack(_turn(batch, "a2", history + [3, 4, 5], 2)))
    torch.testing.assert_close(results[1], results[0], atol=1e-5, rtol=0)


def test_a_prefill_out_of_memory_gives_back_the_kept_prefixes_and_succeeds(stepper, monkeypatch):
    system = _ids(8, 24)
    expected = _static(stepper, 0).prefill("new", system + _ids(9, 6))
    batch = _static(stepper, 4096)
    _turn(batch, "earlier", system + _ids(10, 5), 3)
    batch.release("earlier")
    assert len(batch.prefixes) == 1
    fused_prefill = batch._fused_prefill
    calls = []

    def tight_memory(*args, **kwargs):
        calls.append(len(batch.prefixes))
        if len(batch.prefixes):  # the kept prefixes fill the memory
            raise torch.OutOfMemoryError("CUDA out of memory")
        return fused_prefill(*args, **kwargs)

    monkeypatch.setattr(batch, "_fused_prefill", tight_memory)
    logits = batch.prefill("new", system + _ids(9, 6))
    assert calls == [1, 0] and len(batch.prefixes) == 0
    assert batch.last_reused == {"new": 0}
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


def test_a_prefill_out_of_memory_with_nothing_kept_is_raised(stepper, monkeypatch):
    batch = _static(stepper, 4096)

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(batch, "_fused_prefill", no_memory)
    with pytest.raises(torch.OutOfMemoryError):
        batch.prefill("new", _ids(11, 20))
