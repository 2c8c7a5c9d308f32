"""CUDA graph replays give what the plain calls give (run where a CUDA GPU is present)."""

from __future__ import annotations

import pytest
import torch

from models.cuda_graphs import CudaGraphCache
from models.decoder import StreamingConfig, StreamingDecoder
from models.decoder.quality import log_mel_distance
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


def _decode(decoder_dir, graphs: bool, codes: list[list[int]]) -> list[torch.Tensor]:
    """Each stream's audio [1, S], its 10-token blocks decoded together (the last one short)."""
    config = StreamingConfig(cuda_graphs=graphs)
    decoder = StreamingDecoder.from_pretrained(decoder_dir, device="cuda", config=config)
    assert decoder.uses_cuda_graphs == graphs
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
    assert decoder.uses_cuda_graphs == graphs  # no fallback happened
    return [torch.cat(parts, dim=-1) for parts in chunks]


@pytest.mark.parametrize("streams", [1, 2])
def test_the_graphed_flow_sampler_gives_the_plain_samplers_audio(tmp_path, streams):
    """Batches of a bucket's own size: the replay runs the plain call's kernels."""
    decoder_dir = write_tiny_decoder(tmp_path)
    gen = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 4096, (streams, 45), generator=gen).tolist()
    plain, graphed = _decode(decoder_dir, False, codes), _decode(decoder_dir, True, codes)
    for want, got in zip(plain, graphed, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)


def test_a_filled_up_batch_sounds_like_the_plain_one(tmp_path):
    """Three streams run in a bucket of four: only float rounding may differ (the vocoder's
    sine phase integrates it, so samples drift apart while the spectrum stays put)."""
    decoder_dir = write_tiny_decoder(tmp_path)
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 4096, (3, 40), generator=gen).tolist()
    plain, graphed = _decode(decoder_dir, False, codes), _decode(decoder_dir, True, codes)
    for want, got in zip(plain, graphed, strict=True):
        assert got.shape == want.shape
        assert log_mel_distance(got.cpu(), want.cpu()).overall < 0.05
