"""Reference token -> waveform decoding: golden parity, streaming schedules, per-stream state."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from models.decoder import (
    DEMO_BLOCK_SIZES,
    AudioDecoder,
    DecoderStream,
    ReferenceStreamer,
    schedule_blocks,
)
from models.decoder.parity import check
from models.decoder.quality import log_mel_distance
from models.decoder.streaming import StreamingConfig, StreamingDecoder
from models.decoder.tiny import write_tiny_decoder
from models.flow import FlowDecoder, mel_frames_for_tokens
from models.glm4voice.brain import GLM4VoiceBrain, ReplyDecoder
from models.hift import HiFTGenerator, SourceDraws
from models.hift.tiny import tiny_hift_yaml_section, write_tiny_hift


class TokenMelFlow:
    """A deterministic stand-in for the flow: each token id maps to a fixed mel colour, frames
    are laid out at the reference rate, and the prompt is ignored (fast and prompt-free, so the
    decoder's own bookkeeping is what the tests see)."""

    def mel_frames(self, n_tokens: int) -> int:
        return mel_frames_for_tokens(n_tokens)

    def inference(self, token, prompt_token, prompt_feat, embedding, noise=None, n_timesteps=10):
        total = prompt_token.shape[1] + token.shape[1]
        n_new = self.mel_frames(total) - prompt_feat.shape[1]
        ids = torch.cat([prompt_token, token], dim=1)[0].float()
        frame_ids = ids[
            (torch.arange(n_new) + prompt_feat.shape[1]) * total // self.mel_frames(total)
        ]
        bins = torch.arange(80).float()
        return (torch.sin(frame_ids[None, :] * 0.37 + bins[:, None] * 0.1) - 5.0)[None]


@pytest.fixture(scope="module")
def tiny_hift(tmp_path_factory: pytest.TempPathFactory) -> HiFTGenerator:
    out = tmp_path_factory.mktemp("tiny_hift")
    write_tiny_hift(out, seed=0, base_channels=8, cond_channels=8)
    (out / "config.yaml").write_text(
        "sample_rate: 22050\n" + tiny_hift_yaml_section(base_channels=8, cond_channels=8)
    )
    return HiFTGenerator.from_pretrained(out)


@pytest.fixture(scope="module")
def fake_decoder(tiny_hift: HiFTGenerator) -> AudioDecoder:
    return AudioDecoder(TokenMelFlow(), tiny_hift)


def _tokens(n: int, seed: int = 0) -> Tensor:
    return torch.randint(0, 16384, (1, n), generator=torch.Generator().manual_seed(seed))


def _assert_all_pass(results) -> None:
    failed = [r.line() for r in results if not r.passed]
    assert results and not failed, "\n".join(failed)


def test_stream10_matches_reference_blocks_with_recorded_flow(golden_dir: Path) -> None:
    """stream_inference (10-token blocks): every block's noise, prompt, mel and speech."""
    _assert_all_pass(check(golden_dir, scenarios=("stream10",), flow_scenarios=()))


def test_stream10_matches_reference_blocks_end_to_end(golden_dir: Path) -> None:
    _assert_all_pass(check(golden_dir, scenarios=(), flow_scenarios=("stream10",)))


@pytest.mark.slow
def test_demo_schedule_and_offline_match_reference_with_recorded_flow(golden_dir: Path) -> None:
    """The web demo's blocks (25, 50, 100, final 15) and offline decoding of 190 tokens."""
    _assert_all_pass(check(golden_dir, scenarios=("demo", "offline"), flow_scenarios=()))


@pytest.mark.slow
def test_demo_schedule_and_offline_match_reference_end_to_end(golden_dir: Path) -> None:
    _assert_all_pass(check(golden_dir, scenarios=(), flow_scenarios=("demo", "offline")))


@pytest.mark.parametrize(
    ("n_tokens", "sizes", "expected"),
    [
        (190, DEMO_BLOCK_SIZES, [25, 50, 100, 15]),
        (45, (10,), [10, 10, 10, 10, 5]),
        (800, DEMO_BLOCK_SIZES, [25, 50, 100, 150, 200, 200, 75]),
        (0, (10,), []),
    ],
)
def test_schedule_blocks_repeats_the_last_size(n_tokens: int, sizes, expected) -> None:
    assert schedule_blocks(n_tokens, sizes) == expected


def test_streamer_decodes_a_full_block_only_when_the_next_token_arrives(
    fake_decoder: AudioDecoder,
) -> None:
    streamer = ReferenceStreamer(fake_decoder, (10, 20))
    outputs = [streamer.push(t) for t in _tokens(10)[0].tolist()]
    assert all(o is None for o in outputs)
    assert streamer.push(1) is not None  # 11th token triggers the first block


def test_streamer_chunks_equal_block_decoding(fake_decoder: AudioDecoder) -> None:
    """Pushing tokens one by one yields the same chunks as decoding the scheduled blocks."""
    tokens = _tokens(37)
    streamer = ReferenceStreamer(fake_decoder, (10, 20))
    pushed = [c for t in tokens[0].tolist() if (c := streamer.push(t)) is not None]
    pushed.append(streamer.finish())
    blocks = list(fake_decoder.iter_blocks(tokens, (10, 20)))
    assert len(pushed) == len(blocks) == 3
    for got, want in zip(pushed, blocks, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_chunk_lengths_hold_back_overlap_and_source_cache(fake_decoder: AudioDecoder) -> None:
    """Non-final blocks emit (frames - 34 [+1 cached]) * 256 - 256 samples; the final block
    emits everything, so the total is one sample per 256 of the final flow frames + cache."""
    tokens = _tokens(25)
    chunks = list(fake_decoder.iter_blocks(tokens, (10,)))
    f = [mel_frames_for_tokens(n) for n in (10, 20, 25)]
    new = [f[0], f[1] - (f[0] - 34), f[2] - (f[0] - 34) - (f[1] - f[0] + 1)]
    assert chunks[0].shape[1] == (new[0] - 34) * 256 - 256
    assert chunks[1].shape[1] == (new[1] + 1 - 34) * 256 - 256
    assert chunks[2].shape[1] == (new[2] + 1) * 256


def test_interleaved_streams_do_not_share_state(fake_decoder: AudioDecoder) -> None:
    """Two utterances decoded block by block in alternation equal each decoded alone."""
    a, b = _tokens(20, seed=1), _tokens(20, seed=2)
    alone_a = list(fake_decoder.iter_blocks(a, (10,)))
    alone_b = list(fake_decoder.iter_blocks(b, (10,)))
    sa, sb = DecoderStream(), DecoderStream()
    mixed_a, mixed_b = [], []
    for i in range(2):
        final = i == 1
        mixed_a.append(fake_decoder.decode_block(sa, a[:, 10 * i : 10 * i + 10], final))
        mixed_b.append(fake_decoder.decode_block(sb, b[:, 10 * i : 10 * i + 10], final))
    for got, want in zip(mixed_a + mixed_b, alone_a + alone_b, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_finalize_clears_the_stream_caches(fake_decoder: AudioDecoder) -> None:
    stream = DecoderStream()
    fake_decoder.decode_block(stream, _tokens(10), finalize=False)
    assert stream.cache_source is not None and stream.mel_overlap is not None
    fake_decoder.decode_block(stream, _tokens(5), finalize=True)
    assert stream.cache_source is None and stream.mel_overlap is None and stream.cache_mel is None


def test_tiny_decoder_folder_loads_and_decodes_on_cpu(tmp_path: Path) -> None:
    decoder = AudioDecoder.from_pretrained(write_tiny_decoder(tmp_path))
    tokens = _tokens(12)
    speech = decoder.offline(tokens)
    assert speech.shape == (1, mel_frames_for_tokens(12) * 256)
    assert torch.isfinite(speech).all() and speech.abs().max() <= 0.99


# ----- bounded-cost streaming decoder -----------------------------------------------------


def test_fast_decoder_emits_audio_after_the_first_ten_tokens(
    fast_decoder: StreamingDecoder,
) -> None:
    stream = fast_decoder.new_stream()
    assert fast_decoder.push(stream, _tokens(9)[0].tolist()) == []
    chunks = fast_decoder.push(stream, [7])
    assert len(chunks) == 1 and chunks[0].shape[-1] > 0.5 * 22050


def test_fast_decoder_total_length_equals_offline_length(fast_decoder: StreamingDecoder) -> None:
    """Every frame of the offline alignment is emitted exactly once (no gaps, no repeats)."""
    speech, joins = fast_decoder.decode(_tokens(35))
    assert speech.shape == (1, mel_frames_for_tokens(35) * 256)
    assert len(joins) == 3 and joins == sorted(joins)
    assert torch.isfinite(speech).all()


def test_fast_decoder_work_per_block_is_bounded(fast_decoder: StreamingDecoder) -> None:
    """The flow window stays the same size however long the answer gets."""
    windows: list[int] = []
    regulate = fast_decoder.flow.regulate

    def recording(h: Tensor, mel_len: int) -> Tensor:
        windows.append(mel_len)
        return regulate(h, mel_len)

    fast_decoder.flow.regulate = recording  # type: ignore[method-assign]
    try:
        fast_decoder.decode(_tokens(50))
    finally:
        del fast_decoder.flow.regulate
    cfg = fast_decoder.config
    bound = mel_frames_for_tokens(cfg.context_tokens + cfg.block_tokens) + 1
    assert len(windows) == 5 and max(windows) <= bound
    assert windows[-1] == windows[-2]  # steady state: constant cost


def test_log_mel_distance_is_zero_for_identical_audio_and_sees_a_click() -> None:
    audio = 0.1 * torch.sin(torch.arange(22050) * 2 * torch.pi * 220 / 22050)[None]
    same = log_mel_distance(audio, audio, joins=[11025])
    assert same.overall == 0 and same.at_joins == 0
    clicked = audio.clone()
    clicked[:, 11025:11030] = 0.9
    hit = log_mel_distance(clicked, audio, joins=[11025])
    assert hit.at_joins > 5 * hit.overall > 0


def test_fast_decoder_stays_within_sampling_noise_of_offline(golden_dir: Path) -> None:
    """On the reference (reduced) models, streamed audio is as close to offline audio as an
    offline decode with other noise is, overall and around the joins."""
    flow = FlowDecoder.from_pretrained(golden_dir / "flow")
    hift = HiFTGenerator.from_pretrained(golden_dir / "hift")
    tokens = torch.from_numpy(np.load(golden_dir / "token2wav_stream" / "tokens.npy"))[None, :40]
    offline = AudioDecoder(flow, hift).offline(tokens)
    noise = torch.randn(1, 80, flow.mel_frames(40), generator=torch.Generator().manual_seed(7))
    empty = (torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, 80), torch.zeros(1, 192))
    other_mel = flow.inference(tokens, *empty, noise=noise)
    other, _ = hift.inference(other_mel, generator=torch.Generator().manual_seed(7))
    baseline = log_mel_distance(other, offline).overall
    streamed, joins = StreamingDecoder(flow, hift).decode(tokens)
    distance = log_mel_distance(streamed, offline, joins)
    assert distance.overall < 1.15 * baseline
    assert distance.at_joins < 1.3 * baseline


def test_fast_decode_block_matches_push_and_finish(fast_decoder: StreamingDecoder) -> None:
    """Blocks of any size through `decode_block` give the same audio as token-wise pushes."""
    tokens = _tokens(27)
    stream = fast_decoder.new_stream()
    parts = [
        fast_decoder.decode_block(stream, tokens[:, :7], finalize=False),
        fast_decoder.decode_block(stream, tokens[:, 7:25], finalize=False),
        fast_decoder.decode_block(stream, tokens[:, 25:], finalize=True),
    ]
    assert parts[0].shape == (1, 0)
    whole, _ = fast_decoder.decode(tokens)
    torch.testing.assert_close(torch.cat(parts, dim=-1), whole, rtol=0, atol=0)


def test_fast_decoder_rejects_blocks_that_split_encoder_blocks(tiny_folder: Path) -> None:
    flow = FlowDecoder.from_pretrained(tiny_folder)
    hift = HiFTGenerator.from_pretrained(tiny_folder)
    with pytest.raises(ValueError, match="multiple of the encoder block"):
        StreamingDecoder(flow, hift, StreamingConfig(block_tokens=15, context_tokens=20))


def test_fast_vocoder_chunks_join_like_one_shot_vocoding(fast_decoder: StreamingDecoder) -> None:
    """Vocoding a mel in 4 chunks gives nearly the audio of vocoding it at once with the same
    sine phases: the source phase continues and edge-affected audio is re-rendered. (Without
    that, chunk-wise vocoding differs at the level of the signal itself.)"""
    hift = fast_decoder.hift
    g = torch.Generator().manual_seed(0)
    mel = torch.nn.functional.avg_pool1d(torch.randn(1, 80, 130, generator=g), 5, 1, 2) - 4
    bounds = [0, 30, 60, 90, 130]
    stream = fast_decoder.new_stream()
    with torch.inference_mode():
        chunks = [
            fast_decoder.vocode_frames(stream, mel[:, :, a:b], final=b == bounds[-1])
            for a, b in zip(bounds, bounds[1:], strict=False)
        ]
        noise = torch.randn(1, stream.phases.shape[1], 130 * 256, generator=g)
        one_shot, _ = hift.inference(mel, draws=SourceDraws(stream.phases, noise))
    streamed = torch.cat(chunks, dim=-1)
    joins = torch.tensor([c.shape[-1] for c in chunks]).cumsum(0)[:-1].tolist()
    assert streamed.shape == one_shot.shape
    distance = log_mel_distance(streamed, one_shot, joins)
    assert distance.overall < 0.08 and distance.at_joins < 0.12
    assert (streamed - one_shot).abs().max() < 0.2 * one_shot.abs().max()


# ----- several streams in one call --------------------------------------------------------


def _alone(decoder: StreamingDecoder, tokens: Tensor, seed: int, sizes: list[int]) -> Tensor:
    """A stream decoded on its own, handed its tokens in blocks of `sizes`."""
    stream = decoder.new_stream(seed)
    bounds = np.cumsum([0, *sizes]).tolist()
    parts = [
        decoder.decode_block(stream, tokens[:, a:b], finalize=b == bounds[-1])
        for a, b in zip(bounds, bounds[1:], strict=False)
    ]
    return torch.cat(parts, dim=-1)


def _flow_batch_sizes(decoder: StreamingDecoder) -> tuple[list[int], object]:
    sizes: list[int] = []
    handle = decoder.flow.decoder.register_forward_hook(
        lambda _module, args, _out: sizes.append(int(args[0].shape[0]))
    )
    return sizes, handle


def test_batched_decoding_of_two_streams_gives_each_the_audio_it_gets_alone(
    fast_decoder: StreamingDecoder,
) -> None:
    sizes = [10, 10, 10, 7]
    first, second = _tokens(37, seed=1), _tokens(37, seed=2)
    streams = [fast_decoder.new_stream(5), fast_decoder.new_stream(6)]
    batch_sizes, handle = _flow_batch_sizes(fast_decoder)
    try:
        start, parts = 0, [[], []]
        for size in sizes:
            end, final = start + size, start + size == 37
            out = fast_decoder.decode_many(
                [(streams[0], first[0, start:end].tolist(), final)]
                + [(streams[1], second[0, start:end].tolist(), final)]
            )
            for index, speech in enumerate(out):
                parts[index].append(speech)
            start = end
    finally:
        handle.remove()
    assert batch_sizes == [2] * len(sizes)  # equal shapes: one flow call for both streams
    for index, (tokens, seed) in enumerate([(first, 5), (second, 6)]):
        batched = torch.cat(parts[index], dim=-1)
        torch.testing.assert_close(
            batched, _alone(fast_decoder, tokens, seed, sizes), atol=2e-4, rtol=1e-3
        )


def test_streams_at_different_points_are_decoded_in_one_call_without_mixing(
    fast_decoder: StreamingDecoder,
) -> None:
    """A stream three blocks in and a fresh one: their flow windows differ, so each gets its
    own sampler call (their final flushes share a vocoder call), and both get their lone audio."""
    old, new = _tokens(50, seed=3), _tokens(20, seed=4)
    ahead = fast_decoder.new_stream(7)
    head = fast_decoder.decode_block(ahead, old[:, :30], finalize=False)
    fresh = fast_decoder.new_stream(8)
    out = fast_decoder.decode_many(
        [(ahead, old[0, 30:].tolist(), True), (fresh, new[0].tolist(), True)]
    )
    torch.testing.assert_close(
        torch.cat([head, out[0]], dim=-1),
        _alone(fast_decoder, old, 7, [30, 20]),
        atol=2e-4,
        rtol=1e-3,
    )
    torch.testing.assert_close(out[1], _alone(fast_decoder, new, 8, [20]), atol=2e-4, rtol=1e-3)


def test_decode_many_refuses_one_stream_twice(fast_decoder: StreamingDecoder) -> None:
    stream = fast_decoder.new_stream()
    with pytest.raises(ValueError, match="at most once"):
        fast_decoder.decode_many([(stream, [1] * 10, False), (stream, [2] * 10, False)])


class _RecordingStandIn:
    """Stands in for the CUDA graph cache on the CPU: runs the plain function, notes batches.

    Installed where a CUDA device installs a `CudaGraphCache` of the part's function; like
    the cache, it returns a buffer that the next call may overwrite (the caller must copy)."""

    def __init__(self, fn: Callable[..., Tensor], fail: bool = False) -> None:
        self.fn, self.fail = fn, fail
        self.batches: list[int] = []
        self.shapes: list[tuple[tuple[int, ...], ...]] = []
        self.inputs: list[tuple[Tensor, ...]] = []
        self._buffer: Tensor | None = None

    def __call__(self, *inputs: Tensor) -> Tensor:
        self.batches.append(int(inputs[0].shape[0]))
        self.shapes.append(tuple(tuple(x.shape) for x in inputs))
        self.inputs.append(inputs)
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        if self._buffer is not None:
            self._buffer.fill_(float("nan"))  # what the caller did not copy is gone
        self._buffer = self.fn(*inputs)
        return self._buffer


def _install(decoder: StreamingDecoder, part: str, fail: bool = False) -> _RecordingStandIn:
    """What a CUDA device sets up for `part`, on the CPU."""
    stand_in = _RecordingStandIn(decoder._plain[part], fail)
    decoder._graphs[part] = stand_in  # type: ignore[assignment]
    return stand_in


def _three_streams(decoder: StreamingDecoder) -> list[Tensor]:
    """Three streams decoded together in blocks of 10, 10 and a short last block of 5."""
    tokens = [_tokens(25, seed=10 + i) for i in range(3)]
    streams = [decoder.new_stream(20 + i) for i in range(3)]
    parts: list[list[Tensor]] = [[], [], []]
    for start, end in ((0, 10), (10, 20), (20, 25)):
        requests = [
            (s, t[0, start:end].tolist(), end == 25) for s, t in zip(streams, tokens, strict=True)
        ]
        for out, speech in zip(parts, decoder.decode_many(requests), strict=True):
            out.append(speech)
    return [torch.cat(p, dim=-1) for p in parts]


def test_graphed_sampler_batches_are_filled_to_a_bucket_and_short_blocks_run_plainly(
    tiny_folder: Path,
) -> None:
    plain = _three_streams(StreamingDecoder.from_pretrained(tiny_folder))
    decoder = StreamingDecoder.from_pretrained(tiny_folder)
    stand_in = _install(decoder, "sampler")
    graphed = _three_streams(decoder)
    assert stand_in.batches == [4, 4]  # full blocks only, three streams filled up to four
    for want, got in zip(plain, graphed, strict=True):
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-3)


def test_a_failing_sampler_graph_falls_back_to_plain_sampling_for_good(tiny_folder: Path) -> None:
    plain = _three_streams(StreamingDecoder.from_pretrained(tiny_folder))
    decoder = StreamingDecoder.from_pretrained(tiny_folder)
    stand_in = _install(decoder, "sampler", fail=True)
    graphed = _three_streams(decoder)
    assert stand_in.batches == [4] and not decoder.uses_cuda_graphs  # tried once
    for want, got in zip(plain, graphed, strict=True):
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-3)


# ----- the encoder and the vocoder as CUDA graphs (stand-ins on the CPU) ------------------

SHORT_CACHE = StreamingConfig(encoder_cache_tokens=20)  # the encoder cache trims from block 3


def _together(decoder: StreamingDecoder, n_streams: int, sizes: list[int]) -> list[Tensor]:
    """Streams decoded together, handed their tokens in blocks of `sizes` (the last final)."""
    total = sum(sizes)
    tokens = [_tokens(total, seed=30 + i) for i in range(n_streams)]
    streams = [decoder.new_stream(40 + i) for i in range(n_streams)]
    parts: list[list[Tensor]] = [[] for _ in range(n_streams)]
    start = 0
    for size in sizes:
        end = start + size
        requests = [
            (s, t[0, start:end].tolist(), end == total)
            for s, t in zip(streams, tokens, strict=True)
        ]
        for out, speech in zip(parts, decoder.decode_many(requests), strict=True):
            out.append(speech)
        start = end
    return [torch.cat(p, dim=-1) for p in parts]


def _assert_same_audio(got: list[Tensor], want: list[Tensor]) -> None:
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("part", ["encoder", "sampler", "vocoder"])
def test_a_graphed_part_gives_exactly_the_plain_audio_for_full_buckets(
    tiny_folder: Path, part: str
) -> None:
    """Two streams (a full bucket): four full blocks through the part's graph, the short
    final block plainly; the audio is the plain decoder's, sample for sample."""
    sizes = [10, 10, 10, 10, 5]
    plain = _together(StreamingDecoder.from_pretrained(tiny_folder, config=SHORT_CACHE), 2, sizes)
    decoder = StreamingDecoder.from_pretrained(tiny_folder, config=SHORT_CACHE)
    stand_in = _install(decoder, part)
    _assert_same_audio(_together(decoder, 2, sizes), plain)
    assert decoder.graphed_parts == (part,)
    if part == "encoder":  # per stream; the cache grows, then stays trimmed at 20 positions
        assert stand_in.batches == [1] * 8
        cache_sizes = [shapes[1][2] if len(shapes) > 1 else 0 for shapes in stand_in.shapes]
        assert cache_sizes == [0, 0, 10, 10, 20, 20, 20, 20]
        assert all(shapes[0] == (1, 10) for shapes in stand_in.shapes)
    else:
        assert stand_in.batches == [2] * 4
    if part == "vocoder":  # the first call starts the sine phases; later ones continue them
        assert [len(shapes) for shapes in stand_in.shapes] == [5, 6, 6, 6]
        lengths = [shapes[0][-1] for shapes in stand_in.shapes]
        first = mel_frames_for_tokens(10) - decoder.config.lookahead_frames
        assert lengths[0] == first
        steady = decoder.config.vocoder_context_frames + np.diff(
            [mel_frames_for_tokens(n) for n in (10, 20, 30, 40)]
        )
        assert lengths[1:] == steady.tolist()


def test_graphed_parts_fill_batches_to_a_bucket_and_run_the_final_block_plainly(
    tiny_folder: Path,
) -> None:
    """Three streams: every part's graph sees batches of four (the encoder's: one stream);
    the filled-up rows change float rounding only."""
    plain = _three_streams(StreamingDecoder.from_pretrained(tiny_folder))
    decoder = StreamingDecoder.from_pretrained(tiny_folder)
    stand_ins = {part: _install(decoder, part) for part in ("encoder", "sampler", "vocoder")}
    graphed = _three_streams(decoder)
    assert stand_ins["encoder"].batches == [1] * 6  # two full blocks of three streams
    assert stand_ins["sampler"].batches == [4, 4]
    assert stand_ins["vocoder"].batches == [4, 4]
    for inputs in stand_ins["sampler"].inputs + stand_ins["vocoder"].inputs:
        for x in inputs:  # the filled-up row is a copy of the first
            assert x.shape[0] == 4 and torch.equal(x[3], x[0])
    for want, got in zip(plain, graphed, strict=True):
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("part", ["encoder", "sampler", "vocoder"])
def test_a_failing_graph_runs_its_part_plainly_for_good_with_the_plain_audio(
    tiny_folder: Path, part: str
) -> None:
    sizes = [10, 10, 10, 7]
    plain = _together(StreamingDecoder.from_pretrained(tiny_folder), 2, sizes)
    decoder = StreamingDecoder.from_pretrained(tiny_folder)
    stand_ins = {p: _install(decoder, p, fail=p == part) for p in ("encoder", "sampler", "vocoder")}
    _assert_same_audio(_together(decoder, 2, sizes), plain)
    assert len(stand_ins[part].batches) == 1  # tried once, then plain calls
    assert part not in decoder.graphed_parts and len(decoder.graphed_parts) == 2
    others = [stand_in for p, stand_in in stand_ins.items() if p != part]
    assert all(len(stand_in.batches) >= 3 for stand_in in others)  # still graphed


_COMPOSITE = torch._C.DispatchKey.CompositeImplicitAutograd


class _HostReads(TorchDispatchMode):
    """Notes the ops that read tensor values on the host or make tensors of host data:
    what a CUDA graph capture cannot record."""

    FORBIDDEN = ("_local_scalar_dense", "equal", "item", "is_nonzero", "lift_fresh", "nonzero")

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in self.FORBIDDEN:
            self.seen.append(name)
        # In inference mode composite ops (istft, ...) arrive whole: run their C++ composite
        # kernel with this mode on, so that the ops inside are seen too.
        if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), _COMPOSITE):
            with self:
                return func._op_dk(_COMPOSITE, *args, **kwargs)
        return func(*args, **kwargs)


def _host_reads(fn: Callable[..., Tensor], inputs: tuple[Tensor, ...]) -> list[str]:
    with torch.inference_mode(), _HostReads() as mode:
        fn(*inputs)
    return mode.seen


def test_the_graphed_functions_read_nothing_on_the_host(tiny_folder: Path) -> None:
    decoder = StreamingDecoder.from_pretrained(tiny_folder, config=SHORT_CACHE)
    stand_ins = {part: _install(decoder, part) for part in ("encoder", "sampler", "vocoder")}
    _together(decoder, 1, [10, 10, 10, 10, 3])
    inputs = {part: stand_in.inputs for part, stand_in in stand_ins.items()}
    for part, calls in inputs.items():
        for call in (calls[0], calls[-1]):  # the first block and a steady one
            assert _host_reads(decoder._plain[part], call) == [], part
    # The detector sees what the plain vocoder's torch.istft reads on the host.
    mel, *_ = inputs["vocoder"][-1]
    source = torch.zeros(1, 1, mel.shape[-1] * 256)
    assert "equal" in _host_reads(lambda m, s: decoder.hift.decode(m, s), (mel, source))
    token, *_ = inputs["encoder"][0]  # and the lengths tensor `encode_chunk` makes
    assert "lift_fresh" in _host_reads(lambda t: decoder.flow.encode_chunk(t)[0], (token,))


def test_the_warm_up_records_every_steady_graph_of_a_stream(tiny_folder: Path) -> None:
    """With graphs, the brain's decoder warm-up runs one answer alone until the encoder cache
    is at its bound, and shorter answers in every bucket up to the batch limit."""
    config = StreamingConfig(encoder_cache_tokens=50)  # bounded from the sixth block on
    decoder = StreamingDecoder.from_pretrained(tiny_folder, config=config)
    stand_ins = {part: _install(decoder, part) for part in ("encoder", "sampler", "vocoder")}
    brain = GLM4VoiceBrain.__new__(GLM4VoiceBrain)  # only what `_warm_decoder` reads
    brain.reply_decoder = ReplyDecoder(decoder)
    brain.block_tokens, brain.batch_decoder, brain.max_sequences = 10, True, None
    brain._warm_decoder(max_batch=4)
    warmed = {part: set(stand_in.shapes) for part, stand_in in stand_ins.items()}
    assert set(stand_ins["sampler"].batches) == set(stand_ins["vocoder"].batches) == {1, 2, 4}
    # A long answer afterwards: its encoder graphs (per stream) were all recorded.
    stand_ins["encoder"].shapes.clear()
    _together(decoder, 3, [10] * 8 + [4])
    assert set(stand_ins["encoder"].shapes) <= warmed["encoder"]
    assert decoder.steady_after_blocks == 6
