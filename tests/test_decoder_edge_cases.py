"""Edge cases of the speech decoders a live voice agent runs into: bad token ids, half
precision, a request that fails inside a batch, an end of answer with no tokens left."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

from models.decoder import AudioDecoder, DecoderStream, StreamingDecoder
from models.flow import FlowDecoder, mel_frames_for_tokens
from models.hift import HiFTGenerator

VOCAB = 16384


def _ids(n: int, seed: int = 0) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n,), generator=generator).tolist()


def _decode_alone(decoder: StreamingDecoder, ids: list[int], seed: int) -> Tensor:
    stream = decoder.new_stream(seed)
    chunks = decoder.push(stream, ids)
    chunks.append(decoder.finish(stream))
    return torch.cat(chunks, dim=-1)


# ----- token ids outside the codebook -------------------------------------------------------


@pytest.mark.parametrize("bad", [VOCAB, VOCAB + 500, -1])
def test_fast_decoder_rejects_an_out_of_range_token_id_and_keeps_the_stream_usable(
    fast_decoder: StreamingDecoder, bad: int
) -> None:
    stream = fast_decoder.new_stream(3)
    good = _ids(12, seed=1)
    with pytest.raises(ValueError, match=f"token id {bad} is outside"):
        fast_decoder.push(stream, [*good[:9], bad])
    assert stream.pending == [] and stream.n_tokens == 0 and not stream.finished
    chunks = fast_decoder.push(stream, good)
    chunks.append(fast_decoder.finish(stream))
    torch.testing.assert_close(
        torch.cat(chunks, dim=-1), _decode_alone(fast_decoder, good, 3), rtol=0, atol=0
    )


def test_decode_many_with_one_bad_request_leaves_every_stream_as_it_was(
    fast_decoder: StreamingDecoder,
) -> None:
    first, second = fast_decoder.new_stream(4), fast_decoder.new_stream(5)
    ids = _ids(13, seed=2)
    with pytest.raises(ValueError, match="outside"):
        fast_decoder.decode_many([(first, ids, True), (second, [1, 2, VOCAB], False)])
    done = fast_decoder.new_stream(6)
    fast_decoder.finish(done)
    with pytest.raises(RuntimeError, match="already finished"):
        fast_decoder.decode_many([(first, ids, True), (done, [1], True)])
    for stream in (first, second):
        assert stream.pending == [] and stream.n_tokens == 0 and not stream.finished
    speech = fast_decoder.decode_many([(first, ids, True)])[0]
    torch.testing.assert_close(speech, _decode_alone(fast_decoder, ids, 4), rtol=0, atol=0)


@pytest.mark.parametrize("bad", [VOCAB, -3])
def test_reference_decoder_rejects_an_out_of_range_token_id(tiny_folder: Path, bad: int) -> None:
    decoder = AudioDecoder.from_pretrained(tiny_folder)
    tokens = torch.tensor([[5, 17, bad, 9]])
    with pytest.raises(ValueError, match=f"audio token id {bad}, outside"):
        decoder.offline(tokens)
    stream = DecoderStream()
    with pytest.raises(ValueError, match="outside"):
        decoder.decode_block(stream, tokens, finalize=False)


# ----- half precision -----------------------------------------------------------------------


def test_zero_speaker_embedding_stays_finite_in_float16(tiny_folder: Path) -> None:
    flow = FlowDecoder.from_pretrained(tiny_folder, dtype=torch.float16)
    with torch.no_grad():
        spks = flow.speaker_projection(torch.zeros(1, 192, dtype=torch.float16))
    assert torch.isfinite(spks).all()
    torch.testing.assert_close(spks, flow.spk_embed_affine_layer.bias[None])


def test_float16_streaming_decoder_produces_finite_audio(tiny_folder: Path) -> None:
    decoder = StreamingDecoder.from_pretrained(tiny_folder, dtype=torch.float16)
    speech, _ = decoder.decode(torch.tensor([_ids(13, seed=3)]))
    assert speech.shape == (1, mel_frames_for_tokens(13) * 256)
    assert torch.isfinite(speech).all() and speech.abs().max() > 0


# ----- reference decoder: end of answer with no tokens left ---------------------------------


@pytest.fixture(scope="module")
def reference_decoder(tiny_folder: Path) -> AudioDecoder:
    flow = FlowDecoder.from_pretrained(tiny_folder)
    return AudioDecoder(flow, HiFTGenerator.from_pretrained(tiny_folder))


def test_reference_end_of_answer_without_tokens_flushes_the_held_back_tail_once(
    reference_decoder: AudioDecoder,
) -> None:
    """After full blocks, a final block with no tokens emits the 34 held-back frames and the
    256 held-back samples (once), whatever the number of blocks before."""
    tokens = torch.tensor([_ids(30, seed=4)])
    for n_blocks in (1, 3):
        stream = DecoderStream()
        for i in range(n_blocks):
            reference_decoder.decode_block(stream, tokens[:, 10 * i : 10 * i + 10], False)
        empty = tokens[:, :0]
        assert reference_decoder.decode_block(stream, empty, finalize=False).shape == (1, 0)
        tail = reference_decoder.decode_block(stream, empty, finalize=True)
        assert tail.shape == (1, (34 + 1) * 256) and torch.isfinite(tail).all()
        assert stream.mel_overlap is None and stream.cache_mel is None
        assert reference_decoder.decode_block(stream, empty, finalize=True).shape == (1, 0)


def test_reference_answer_without_audio_tokens_decodes_to_no_speech(
    reference_decoder: AudioDecoder,
) -> None:
    speech = reference_decoder.decode_block(
        DecoderStream(), torch.zeros(1, 0, dtype=torch.long), finalize=True
    )
    assert speech.shape == (1, 0)
