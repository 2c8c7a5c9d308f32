"""CUDA graph replays give what the plain calls give (run where a CUDA GPU is present)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from models.cuda_graphs import CudaGraphCache
from models.decoder import StreamingConfig, StreamingDecoder
from models.decoder.quality import log_mel_distance
from models.decoder.streaming import GRAPH_PARTS
from models.decoder.tiny import write_tiny_decoder
from models.glm4voice.static_batch import StaticCacheConfig, StaticKVBatch
from models.lm import LMStepper, build_random_lm
from models.lm.configuration_lm import ChatGLMConfig
from models.lm.tiny import tiny_config_dict

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_the_graph_cache_records_once_per_shape_and_replays_new_values():
    calls = []

    def fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape)
        return (x * 2 + y).sum(-1)

    graphs = CudaGraphCache(fn, max_graphs=2, warm_up_runs=1)
    for rows in (1, 2, 1, 2, 3):
        x = torch.randn(rows, 5, device="cuda")
        y = torch.randn(rows, 5, device="cuda")
        torch.testing.assert_close(graphs(x, y).clone(), (x * 2 + y).sum(-1))
    assert graphs.recorded == 3 and len(graphs) == 2  # 1, 2, then 3 (dropping 1)
    assert len(calls) == 3 * 2  # each recording: one warm-up run and the capture


def test_graph_steps_give_the_plain_static_steps_logits():
    config = ChatGLMConfig.from_dict(tiny_config_dict(padded_vocab_size=512))
    stepper = LMStepper(build_random_lm(config, device="cuda", dtype=torch.float32, seed=1))
    gen = torch.Generator().manual_seed(0)
    prompts = {
        k: torch.randint(0, 500, (n,), generator=gen).tolist()
        for k, n in zip("ab", (7, 12), strict=True)
    }
    schedule = ["ab", "a", "ab", "b", "ab", "ab", "a"]
    results = []
    for graphs in (False, True):
        config = StaticCacheConfig(max_batch=4, max_len=64, min_columns=8)  # spans 8..64
        static = StaticKVBatch(stepper, config)
        if graphs:
            static.record_graphs()
        rows = [static.prefill(k, p) for k, p in prompts.items()]
        tokens = {k: 3 for k in "ab"}
        for keys in schedule:
            logits = static.step(list(keys), [tokens[k] for k in keys])
            rows.append(logits)
            for key, row in zip(keys, logits, strict=True):
                tokens[key] = int(row.argmax())
        assert static.mode == ("graphs" if graphs else "plain")  # no fallback happened
        results.append(torch.cat([r.reshape(-1, 512) for r in rows]))
    torch.testing.assert_close(results[1], results[0], atol=1e-4, rtol=1e-4)


def _decode(
    decoder_dir,
    parts: tuple[str, ...],
    codes: list[list[int]],
    config: StreamingConfig | None = None,
) -> tuple[list[torch.Tensor], StreamingDecoder]:
    """Each stream's audio [1, S], its 10-token blocks decoded together (the last one short),
    with `parts` replayed as CUDA graphs (none: the plain decoder)."""
    config = replace(config or StreamingConfig(), cuda_graphs=bool(parts), cuda_graph_parts=parts)
    decoder = StreamingDecoder.from_pretrained(decoder_dir, device="cuda", config=config)
    assert decoder.graphed_parts == parts
    streams = [decoder.new_stream(seed) for seed in range(len(codes))]
    chunks: list[list[torch.Tensor]] = [[] for _ in codes]
    length = len(codes[0])
    for start in range(0, length, 10):
        final = start + 10 >= length
        requests = [
            (s, ids[start : start + 10], final) for s, ids in zip(streams, codes, strict=True)
        ]
        for out, chunk in zip(chunks, decoder.decode_many(requests), strict=True):
            out.append(chunk)
    assert decoder.graphed_parts == parts  # no fallback happened
    for part in parts:
        assert decoder._graphs[part].recorded > 0, part
    return [torch.cat(pieces, dim=-1) for pieces in chunks], decoder


PARTS = [("sampler",), ("encoder",), ("vocoder",), GRAPH_PARTS]


@pytest.mark.parametrize("parts", PARTS, ids=lambda parts: "+".join(parts))
@pytest.mark.parametrize("streams", [1, 2])
def test_graphed_parts_give_the_plain_audio(tmp_path, streams, parts):
    """Batches of a bucket's own size: the replay runs the plain call's kernels. 45 tokens
    with an encoder cache of 20: the cache is trimmed from the third block on."""
    decoder_dir = write_tiny_decoder(tmp_path)
    gen = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 4096, (streams, 45), generator=gen).tolist()
    config = StreamingConfig(encoder_cache_tokens=20)
    plain, _ = _decode(decoder_dir, (), codes, config)
    graphed, _ = _decode(decoder_dir, parts, codes, config)
    for want, got in zip(plain, graphed, strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("parts", PARTS, ids=lambda parts: "+".join(parts))
def test_a_filled_up_batch_sounds_like_the_plain_one(tmp_path, parts):
    """Three streams run in a bucket of four: only float rounding may differ (the vocoder's
    sine phase integrates it, so samples drift apart while the spectrum stays put)."""
    decoder_dir = write_tiny_decoder(tmp_path)
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 4096, (3, 40), generator=gen).tolist()
    plain, _ = _decode(decoder_dir, (), codes)
    graphed, _ = _decode(decoder_dir, parts, codes)
    for want, got in zip(plain, graphed, strict=True):
        assert got.shape == want.shape
        assert log_mel_distance(got.cpu(), want.cpu()).overall < 0.05


def test_steady_blocks_replay_the_recorded_graphs(tmp_path):
    """Past the encoder cache's bound, a second answer of the same length records nothing
    new: every full block replays a graph of the first answer."""
    decoder_dir = write_tiny_decoder(tmp_path)
    config = StreamingConfig(encoder_cache_tokens=20)
    decoder = StreamingDecoder.from_pretrained(decoder_dir, device="cuda", config=config)
    codes = torch.randint(0, 4096, (1, 80), generator=torch.Generator().manual_seed(4))
    first, _ = decoder.decode(codes)
    recorded = {part: decoder._graphs[part].recorded for part in GRAPH_PARTS}
    assert all(recorded.values())
    second, _ = decoder.decode(codes)
    assert {part: decoder._graphs[part].recorded for part in GRAPH_PARTS} == recorded
    assert decoder.graphed_parts == GRAPH_PARTS
    torch.testing.assert_close(second, first, atol=0, rtol=0)  # same seed, same kernels


def test_the_engine_with_its_decoder_lane_sounds_like_the_engine_without_it(tmp_path, caplog):
    """On a GPU the lane decodes on its own CUDA stream, recording decoder graphs while the
    LM thread steps (and records) on the default one: no capture may fail, and each reply
    gets the audio it gets with every decoder call on the worker's thread."""
    import asyncio
    import logging

    import numpy as np

    from agent.engine import AudioChunk, UserTurn
    from models.glm4voice.brain import LoadOptions
    from models.glm4voice.engine import EngineOptions, load_engine
    from models.glm4voice.tokens import TokenConstraints, TokenPattern
    from models.lm import SamplingConfig
    from models.make_tiny import write_tiny_model_set

    paths = write_tiny_model_set(tmp_path)
    # Greedy, in float32: the answers do not depend on which replies step together (with the
    # lane a reply may sit out a round while the decoder catches up).
    load = LoadOptions(
        device="cuda",
        lm_dtype=torch.float32,
        sampling=SamplingConfig(temperature=0.0, seed=0),
        constraints=TokenConstraints(None, TokenPattern(stop_after=120)),
    )

    async def answers(lane: bool) -> list[tuple[list[int], np.ndarray]]:
        engine = load_engine(paths, load, EngineOptions(overlap_decoder=lane, max_ahead_s=1e9))
        await engine.start()
        try:
            replies = [engine.respond(UserTurn(text=f"hello {i}"), []) for i in range(3)]
            events = await asyncio.gather(*(_collect(reply) for reply in replies))
        finally:
            await engine.close()
        out = []
        for reply, reply_events in zip(replies, events, strict=True):
            chunks = [e.samples for e in reply_events if isinstance(e, AudioChunk)]
            out.append((list(reply.job.generated), np.concatenate(chunks)))
        return out

    with caplog.at_level(logging.WARNING):
        with_lane = asyncio.run(answers(True))
    failures = [r for r in caplog.records if r.levelno >= logging.WARNING and "graph" in r.msg]
    assert not failures, [r.getMessage() for r in failures]
    without = asyncio.run(answers(False))
    for (ids, audio), (plain_ids, plain_audio) in zip(with_lane, without, strict=True):
        assert ids == plain_ids
        assert audio.shape == plain_audio.shape
        distance = log_mel_distance(
            torch.from_numpy(audio)[None], torch.from_numpy(plain_audio)[None]
        )
        assert distance.overall < 0.05, distance


async def _collect(reply) -> list:
    return [event async for event in reply]
