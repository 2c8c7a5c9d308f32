"""Speed paths of the GLM-4-Voice engine that must not change results: the preallocated KV
cache (the shape-stable decode step a GPU compiles into CUDA graphs) against the dynamic one."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from models.glm4voice import brain as brain_module
from models.glm4voice.batching import KVCacheBatch
from models.glm4voice.brain import GLM4VoiceBrain, LoadOptions, make_sequence_batch
from models.glm4voice.paths import ModelPaths
from models.glm4voice.static_batch import StaticCacheConfig, StaticKVBatch
from models.glm4voice.tokens import TokenConstraints, TokenPattern
from models.glm4voice.worker import AudioChunk, Job, ModelWorker
from models.lm import LMStepper, SamplingConfig, build_random_lm
from models.lm.configuration_lm import ChatGLMConfig
from models.lm.tiny import tiny_config_dict
from models.make_tiny import write_tiny_model_set

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def stepper() -> LMStepper:
    config = ChatGLMConfig.from_dict(tiny_config_dict(padded_vocab_size=512))
    return LMStepper(build_random_lm(config, dtype=torch.float32, seed=1))


def _random_ids(generator: torch.Generator, n: int) -> list[int]:
    return torch.randint(0, 500, (n,), generator=generator).tolist()


def _run_schedule(batch, prompts: dict[str, list[int]], tokens: dict[str, list[int]], schedule):
    """Prefill every sequence, then step the subsets of `schedule`; logits per sequence."""
    got = {key: [batch.prefill(key, prompt)] for key, prompt in prompts.items()}
    done = dict.fromkeys(prompts, 0)
    for keys in schedule:
        keys = [k for k in keys if done[k] < len(tokens[k])]
        if not keys:
            continue
        logits = batch.step(keys, [tokens[k][done[k]] for k in keys])
        for row, key in enumerate(keys):
            got[key].append(logits[row])
            done[key] += 1
    return {key: torch.stack(rows) for key, rows in got.items()}


SCHEDULE = ["abc", "ab", "b", "bc", "cab", "ca", "c", "abc", "ab", "b", "ab", "a", "ac", "c"]


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("min_columns", [256, 8])
def test_static_cache_steps_give_the_dynamic_cache_logits(stepper, min_columns, fused):
    """Rows join, pause and come back; the static rows attend through their masks only (over
    all 64 columns, or over spans of 8, 16, 32 and 64 as the cursor moves on), stepping
    through the fused step or transformers' layers."""
    gen = torch.Generator().manual_seed(0)
    prompts = {key: _random_ids(gen, n) for key, n in zip("abc", (5, 17, 9), strict=True)}
    tokens = {key: _random_ids(gen, 8) for key in "abc"}
    want = _run_schedule(KVCacheBatch(stepper), prompts, tokens, SCHEDULE)
    config = StaticCacheConfig(max_batch=4, max_len=64, min_columns=min_columns, fused=fused)
    static = StaticKVBatch(stepper, config)
    assert (static.fused is not None) == fused
    got = _run_schedule(static, prompts, tokens, SCHEDULE)
    for key in "abc":
        assert got[key].shape == want[key].shape == (9, 512)
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=0)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("min_columns", [256, 4])
def test_static_cache_packs_its_rows_when_the_columns_run_out(stepper, min_columns, fused):
    """A short cache: the cursor reaches its end and the rows are packed to the left (after
    which the step attends over a shorter span again)."""
    gen = torch.Generator().manual_seed(1)
    prompts = {"a": _random_ids(gen, 6), "b": _random_ids(gen, 3)}
    tokens = {"a": _random_ids(gen, 30), "b": _random_ids(gen, 30)}
    schedule = ["ab", "a", "b"] * 30  # pauses leave junk columns that packing drops
    want = _run_schedule(KVCacheBatch(stepper), prompts, tokens, schedule)
    static = StaticKVBatch(
        stepper, StaticCacheConfig(max_batch=2, max_len=40, min_columns=min_columns, fused=fused)
    )
    got = _run_schedule(static, prompts, tokens, schedule)
    for key in "ab":
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=0)


def test_a_released_slot_is_reused_by_the_next_sequence_with_no_trace_of_the_old_one(stepper):
    gen = torch.Generator().manual_seed(2)
    first, second, third = (_random_ids(gen, n) for n in (12, 4, 7))
    steps = _random_ids(gen, 5)
    static = StaticKVBatch(stepper, StaticCacheConfig(max_batch=2, max_len=64))
    static.prefill("old", first)
    static.prefill("kept", second)
    for token in steps:
        static.step(["old", "kept"], [token, token])
    static.release("old")
    got = [static.prefill("new", third)]
    got += [static.step(["new"], [token])[0] for token in steps]
    dynamic = KVCacheBatch(stepper)
    want = [dynamic.prefill("new", third)]
    want += [dynamic.step(["new"], [token])[0] for token in steps]
    torch.testing.assert_close(torch.stack(got), torch.stack(want), atol=1e-5, rtol=0)
    assert sorted(static.live_keys) == ["kept", "new"]


def test_static_cache_refuses_more_sequences_than_rows_and_prompts_longer_than_columns(stepper):
    static = StaticKVBatch(stepper, StaticCacheConfig(max_batch=1, max_len=16))
    static.prefill("a", [1, 2, 3])
    with pytest.raises(RuntimeError, match="in use"):
        static.prefill("b", [1, 2])
    static.release("a")
    with pytest.raises(ValueError, match="does not fit"):
        static.prefill("b", list(range(16)))


def test_static_steps_run_at_power_of_two_buckets_and_warm_each_one():
    config = StaticCacheConfig(max_batch=12, max_len=32)
    assert config.buckets == [1, 2, 4, 8, 12]
    assert [config.bucket(n) for n in (1, 3, 5, 9, 12)] == [1, 4, 8, 12, 12]


def test_warm_up_sizes_cover_every_recorded_bucket_up_to_the_job_limit(stepper):
    static = StaticKVBatch(stepper, StaticCacheConfig(max_batch=16, max_len=32))
    assert static.warmup_batch_sizes(64) == [1, 2]  # plain steps record nothing
    static.mode = "compile"  # as `compile_step` sets it (CUDA only)
    assert static.warmup_batch_sizes(64) == [1, 2, 4, 8, 16]
    assert static.warmup_batch_sizes(5) == [1, 2, 4]
    assert KVCacheBatch(stepper).warmup_batch_sizes(64) == [1, 2]


def test_the_static_step_traces_as_one_graph_without_breaks(stepper):
    """What CUDA graphs need: the whole one-token step (cache writes included) is one graph."""
    static = StaticKVBatch(stepper, StaticCacheConfig(max_batch=2, max_len=32))
    static.prefill("a", [1, 2, 3])
    rows = static.config.bucket(1)
    inputs = static._step_inputs([0], [5], rows)
    token_ids, positions = inputs[0, :, None], inputs[1, :, None]
    mask = static._bias[:rows, None, None, :]
    static.cache.column.fill_(static._cursor)
    torch._dynamo.reset()
    try:
        explained = torch._dynamo.explain(static._forward)(token_ids, positions, mask)
    finally:
        torch._dynamo.reset()
    assert explained.graph_count == 1 and explained.graph_break_count == 0


def test_column_spans_are_powers_of_two_up_to_the_cache_length():
    config = StaticCacheConfig(max_len=3000, min_columns=256)
    assert config.column_spans == [256, 512, 1024, 2048, 3000]
    assert [config.column_span(n) for n in (1, 256, 257, 2049, 3000)] == [256, 256, 512, 3000, 3000]
    assert StaticCacheConfig(max_len=64).column_spans == [64]


@pytest.mark.parametrize("start", ["record_graphs", "compile_step"])
def test_graph_steps_are_refused_off_cuda(stepper, start):
    static = StaticKVBatch(stepper, StaticCacheConfig(max_batch=1, max_len=16))
    with pytest.raises(RuntimeError, match="CUDA"):
        getattr(static, start)()
    assert not static.compiled and static.mode == "plain"


def test_a_failing_graph_step_falls_back_to_the_plain_step_with_the_same_logits(stepper):
    gen = torch.Generator().manual_seed(3)
    prompt, steps = _random_ids(gen, 9), _random_ids(gen, 4)
    static = StaticKVBatch(stepper, StaticCacheConfig(max_batch=2, max_len=32))
    calls = []

    def broken(*args):
        calls.append(len(args))
        raise RuntimeError("graph capture failed")

    static._step_fn, static.mode = broken, "graphs"  # what record_graphs sets up on a GPU
    got = [static.prefill("a", prompt)] + [static.step(["a"], [t])[0] for t in steps]
    dynamic = KVCacheBatch(stepper)
    want = [dynamic.prefill("a", prompt)] + [dynamic.step(["a"], [t])[0] for t in steps]
    torch.testing.assert_close(torch.stack(got), torch.stack(want), atol=1e-5, rtol=0)
    assert calls == [3] and not static.compiled  # tried once, then never again


def test_decode_step_defaults_to_cuda_graphs_on_cuda_and_the_static_cache_elsewhere():
    assert LoadOptions(device="cuda").resolved_decode_step == "graphs"
    assert LoadOptions(device="cuda:1").resolved_decode_step == "graphs"
    assert LoadOptions(device="cuda", quantization="int4").resolved_decode_step == "static"
    assert LoadOptions(device="cpu").resolved_decode_step == "static"
    assert LoadOptions(device="cpu", decode_step="dynamic").resolved_decode_step == "dynamic"
    assert LoadOptions(device="cuda", decode_step="compile").resolved_decode_step == "compile"
    assert LoadOptions(device="cpu", decode_step="static").resolved_decode_step == "static"
    for needs_cuda in ("graphs", "compile"):
        with pytest.raises(ValueError, match="CUDA"):
            LoadOptions(device="cpu", decode_step=needs_cuda)
    with pytest.raises(ValueError, match="decode_step"):
        LoadOptions(decode_step="fastest")


def test_sequence_batches_are_made_for_each_decode_step_the_cpu_runs(stepper):
    assert isinstance(make_sequence_batch(stepper, "auto"), StaticKVBatch)
    assert isinstance(make_sequence_batch(stepper, "dynamic"), KVCacheBatch)
    static = make_sequence_batch(stepper, "static", StaticCacheConfig(max_batch=2, max_len=16))
    assert isinstance(static, StaticKVBatch) and static.mode == "plain"
    assert static.max_sequences == 2
    with pytest.raises(RuntimeError, match="CUDA"):
        make_sequence_batch(stepper, "graphs", StaticCacheConfig(max_batch=1, max_len=16))


def _answers(brain: GLM4VoiceBrain, texts: list[str]) -> list[tuple[list[int], int]]:
    """Replies to `texts` started together, rounds driven by hand: (ids, audio samples)."""
    worker = ModelWorker(brain)
    events: list[list] = [[] for _ in texts]
    jobs = [
        Job(None, text, "", events[i].append, max_new_tokens=100, max_ahead_s=1e9)
        for i, text in enumerate(texts)
    ]
    for job in jobs:
        worker.submit(job)
    with torch.inference_mode():
        while not all(job.finished.is_set() for job in jobs):
            worker._round()
    return [
        (job.generated, sum(len(e.samples) for e in ev if isinstance(e, AudioChunk)))
        for job, ev in zip(jobs, events, strict=True)
    ]


def test_the_brain_answers_with_the_static_cache_as_with_the_dynamic_one(tmp_path):
    """The static path uncompiled, as a GPU would run it compiled: same sampled answers."""
    paths: ModelPaths = write_tiny_model_set(tmp_path)
    options = LoadOptions(
        sampling=SamplingConfig(seed=0),
        constraints=TokenConstraints(None, TokenPattern(stop_after=45)),
    )
    dynamic = GLM4VoiceBrain.load(paths, replace(options, decode_step="dynamic"))
    assert isinstance(dynamic.sequences, KVCacheBatch)
    static = GLM4VoiceBrain.load(paths, options)
    static.sequences = StaticKVBatch(static.sequences.stepper, StaticCacheConfig(2, 256))
    static.max_sequences = static.sequences.max_sequences
    dynamic.max_sequences = 2  # the same schedule, so the shared sampling stream matches
    texts = ["hello", "how are you", "fine"]  # three replies on two rows: one waits
    want = _answers(dynamic, texts)
    got = _answers(static, texts)
    assert got == want
    assert all(len(ids) == 46 and samples > 0 for ids, samples in got)


def test_the_static_cache_serves_on_the_cpu_and_the_dynamic_one_when_it_does_not_fit(
    stepper, monkeypatch
):
    assert isinstance(brain_module._sequence_batch(stepper, LoadOptions()), StaticKVBatch)
    dynamic = LoadOptions(decode_step="dynamic")
    assert isinstance(brain_module._sequence_batch(stepper, dynamic), KVCacheBatch)

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(brain_module, "StaticKVBatch", no_memory)
    chosen = brain_module._sequence_batch(stepper, LoadOptions(device="cuda"))
    assert isinstance(chosen, KVCacheBatch)


def test_a_failed_batched_prefill_starts_each_reply_alone_and_a_bad_turn_fails_alone(
    tmp_path, monkeypatch
):
    brain = GLM4VoiceBrain.load(
        write_tiny_model_set(tmp_path), LoadOptions(sampling=SamplingConfig(seed=0))
    )
    calls = []
    together = brain.sequences.prefill_many

    def out_of_memory_when_batched(prompts):
        calls.append(len(prompts))
        if len(prompts) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return together(prompts)

    monkeypatch.setattr(brain.sequences, "prefill_many", out_of_memory_when_batched)

    def job(text):
        return Job(None, text, "", lambda event: None, max_new_tokens=10, max_ahead_s=1e9)

    good = [job("hello"), job("how are you")]
    broken = job(None)  # neither audio nor text: its prompt cannot be built
    errors = brain.start_jobs([good[0], broken, good[1]])
    assert errors[0] is None and errors[2] is None and errors[1] is not None
    assert calls == [2, 1, 1]
    for started in good:
        assert started.logits is not None and started.decoder_state is not None
        assert started.timings.stages["prefill"] > 0
