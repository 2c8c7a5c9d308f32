"""Token -> waveform decoding exactly as the GLM-4-Voice reference `AudioDecoder` does it.

One `token2wav` call turns a block of audio tokens into speech:

1. the flow model generates the block's mel [1, 80, F] given all previous tokens as prompt
   and all previously returned mels as prompt features (noise: generator seeded 42);
2. the first 34 frames are cross-faded (Hamming window of 68) with the 34-frame tail kept
   back from the previous block;
3. the previous block's last vocoded mel frame is prepended and its last 256 source samples
   become HiFT's `cache_source` (sine phase continuity);
4. unless finalizing, the last 34 frames are kept back for the next cross-fade, the rest is
   vocoded and the last 256 samples of speech are held back (re-rendered next call from the
   cached frame); when finalizing everything is vocoded and the state is cleared.

The reference keeps that state in dicts keyed by a uuid; here it is an explicit
`DecoderStream` object per utterance. The reference's streaming callers are reproduced too:
`stream_inference` (10-token blocks) and the web demo's block schedule 25, 50, 100, 150, 200...
(`ReferenceStreamer`). The HiFT draws continue the generator that drew the flow noise, so a
call consumes "seed 42 -> randn(1, 80, T) -> phases -> sine noise -> unused noise" like the
reference on CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from models.flow import FlowDecoder, mel_frames_for_tokens
from models.hift import HiFTGenerator

logger = logging.getLogger(__name__)

__all__ = [
    "DEMO_BLOCK_SIZES",
    "FLOW_SEED",
    "MEL_CACHE_FRAMES",
    "MEL_OVERLAP_FRAMES",
    "SOURCE_CACHE_SAMPLES",
    "AudioDecoder",
    "DecoderStream",
    "MelGenerator",
    "ReferenceStreamer",
    "schedule_blocks",
]

TOKEN_OVERLAP = 5  # tokens of cross-fade in the reference; only its mel length is used
MEL_OVERLAP_FRAMES = mel_frames_for_tokens(TOKEN_OVERLAP)  # 34 frames held back per block
MEL_CACHE_FRAMES = 1  # mel frames re-vocoded at the start of the next block
SOURCE_CACHE_SAMPLES = 256  # source samples (= held-back speech samples) carried over
FLOW_SEED = 42  # the reference CFM re-seeds torch with 42 on every call
STREAM_BLOCK_SIZE = 10  # reference stream_inference block = the encoder's attention block
DEMO_BLOCK_SIZES = (25, 50, 100, 150, 200)  # web demo schedule; the last size repeats
EMBEDDING_DIM = 192  # x-vector size; GLM-4-Voice always passes zeros
MEL_BINS = 80


class MelGenerator(Protocol):
    """What the decoder needs from the flow model (`models.flow.FlowDecoder` fits)."""

    def mel_frames(self, n_tokens: int) -> int:
        """Mel frames the flow assigns to `n_tokens` tokens (noise length)."""
        ...

    def inference(
        self,
        token: Tensor,
        prompt_token: Tensor,
        prompt_feat: Tensor,
        embedding: Tensor,
        noise: Tensor | None = None,
        n_timesteps: int = 10,
    ) -> Tensor:
        """token [1, T], prompt_token [1, P], prompt_feat [1, F, 80] -> new mel [1, 80, F_new]."""
        ...


@dataclass
class DecoderStream:
    """Per-utterance state of the reference streaming decoder.

    mel_overlap: [1, 80, 34] flow frames kept back, cross-faded into the next block.
    cache_mel: [1, 80, 1] last vocoded frame, prepended to the next block's mel.
    cache_source: [1, 1, 256] last source samples, overwriting the next block's first ones.
    prompt_token: [1, P] every token decoded so far (the caller-side prompt of the reference).
    mels: the mels returned so far; their concatenation is the next prompt_feat.
    """

    mel_overlap: Tensor | None = None
    cache_mel: Tensor | None = None
    cache_source: Tensor | None = None
    prompt_token: Tensor = field(default_factory=lambda: torch.zeros(1, 0, dtype=torch.long))
    mels: list[Tensor] = field(default_factory=list)

    def prompt_feat(self) -> Tensor:
        """[1, F, 80]: all returned mels concatenated (zeros(1, 0, 80) before the first)."""
        if not self.mels:
            return torch.zeros(1, 0, MEL_BINS)
        return torch.cat(self.mels, dim=-1).transpose(1, 2)

    def clear_caches(self) -> None:
        self.mel_overlap = self.cache_mel = self.cache_source = None


def fade_in_out(new_mel: Tensor, previous: Tensor, window: np.ndarray) -> Tensor:
    """Cross-fade the first len(window)/2 frames of new_mel [1, 80, F] with the last ones of
    previous: new * w[:n] + previous * w[n:]. Computed in float64 like the reference (a numpy
    float64 window promotes the product), stored back in new_mel's dtype."""
    n = window.shape[0] // 2
    w = torch.from_numpy(window)
    head = new_mel[..., :n].cpu().double() * w[:n] + previous[..., -n:].cpu().double() * w[n:]
    out = new_mel.clone()
    out[..., :n] = head.to(out)
    return out


def schedule_blocks(n_tokens: int, block_sizes: Sequence[int]) -> list[int]:
    """Split n_tokens into consecutive blocks of block_sizes (the last size repeats)."""
    blocks: list[int] = []
    remaining = n_tokens
    while remaining > 0:
        size = block_sizes[min(len(blocks), len(block_sizes) - 1)]
        blocks.append(min(size, remaining))
        remaining -= blocks[-1]
    return blocks


class AudioDecoder:
    """The reference token -> speech decoder (flow + HiFT) with explicit per-stream state."""

    sample_rate = 22050

    def __init__(self, flow: MelGenerator, hift: HiFTGenerator, n_timesteps: int = 10) -> None:
        self.flow = flow
        self.hift = hift
        self.n_timesteps = n_timesteps
        self.mel_window = np.hamming(2 * MEL_OVERLAP_FRAMES)

    @classmethod
    def from_pretrained(
        cls,
        decoder_dir: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> AudioDecoder:
        """Load `config.yaml`, `flow.pt` and `hift.pt` from the decoder folder."""
        flow = FlowDecoder.from_pretrained(decoder_dir, device=device, dtype=dtype)
        return cls(flow, HiFTGenerator.from_pretrained(decoder_dir, device=device, dtype=dtype))

    @property
    def device(self) -> torch.device:
        return self.hift.stft_window.device

    def new_stream(self) -> DecoderStream:
        return DecoderStream()

    # ----- one block --------------------------------------------------------------------

    def generate_mel(
        self, token: Tensor, prompt_token: Tensor, prompt_feat: Tensor, embedding: Tensor
    ) -> tuple[Tensor, torch.Generator]:
        """Flow mel [1, 80, F_new] for `token` after the prompt, and the generator (seeded 42,
        advanced past the flow noise) whose stream the vocoder continues."""
        generator = torch.Generator().manual_seed(FLOW_SEED)
        n_frames = self.flow.mel_frames(prompt_token.shape[1] + token.shape[1])
        noise = torch.randn(1, MEL_BINS, n_frames, generator=generator)
        mel = self.flow.inference(
            token.to(self.device),
            prompt_token.to(self.device),
            prompt_feat.to(self.device),
            embedding.to(self.device),
            noise=noise.to(self.device),
            n_timesteps=self.n_timesteps,
        )
        return mel, generator

    def token2wav(
        self,
        token: Tensor,
        stream: DecoderStream,
        prompt_token: Tensor | None = None,
        prompt_feat: Tensor | None = None,
        embedding: Tensor | None = None,
        finalize: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """Decode one block: token [1, T] -> (speech [1, S], vocoded mel [1, 80, F]).

        prompt_token [1, P] / prompt_feat [1, F_p, 80]: the previous tokens and the
        concatenation of the mels this method returned for them. Non-final calls return
        speech for all but the last 34 flow frames and hold back 256 samples.
        """
        prompt_token = torch.zeros(1, 0, dtype=torch.long) if prompt_token is None else prompt_token
        prompt_feat = torch.zeros(1, 0, MEL_BINS) if prompt_feat is None else prompt_feat
        embedding = torch.zeros(1, EMBEDDING_DIM) if embedding is None else embedding
        mel, generator = self.generate_mel(token, prompt_token, prompt_feat, embedding)
        return self.vocode_block(mel, stream, finalize, generator)

    def vocode_block(
        self,
        mel: Tensor,
        stream: DecoderStream,
        finalize: bool,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Steps 2-4 of `token2wav` on a flow mel [1, 80, F]; updates `stream`."""
        if stream.mel_overlap is not None:
            mel = fade_in_out(mel, stream.mel_overlap, self.mel_window)
        cache_source = torch.zeros(1, 1, 0)
        if stream.cache_mel is not None:
            mel = torch.cat([stream.cache_mel.to(mel), mel], dim=2)
            cache_source = stream.cache_source
        if finalize:
            speech, _ = self.hift.inference(mel, cache_source, generator=generator)
            stream.clear_caches()
            return speech, mel
        stream.mel_overlap = mel[:, :, -MEL_OVERLAP_FRAMES:]
        mel = mel[:, :, :-MEL_OVERLAP_FRAMES]
        speech, source = self.hift.inference(mel, cache_source, generator=generator)
        stream.cache_mel = mel[:, :, -MEL_CACHE_FRAMES:]
        stream.cache_source = source[:, :, -SOURCE_CACHE_SAMPLES:]
        return speech[:, :-SOURCE_CACHE_SAMPLES], mel

    def decode_block(self, stream: DecoderStream, token: Tensor, finalize: bool) -> Tensor:
        """The reference callers' step: `token2wav` with the stream's own prompt (all previous
        tokens and returned mels), then append the block to that prompt. Returns speech [1, S].

        A block without tokens (the reference never makes one) decodes nothing new: it returns
        no speech, or when finalizing the frames and samples held back so far (`flush`)."""
        if token.shape[1] == 0:
            return self.flush(stream) if finalize else torch.zeros(1, 0, device=self.device)
        speech, mel = self.token2wav(
            token, stream, stream.prompt_token, stream.prompt_feat(), finalize=finalize
        )
        stream.mels.append(mel)
        stream.prompt_token = torch.cat([stream.prompt_token, token.cpu().long()], dim=1)
        return speech

    def flush(self, stream: DecoderStream) -> Tensor:
        """End the stream with no tokens left: vocode the 34 held-back frames after the
        cached frame (re-rendering the 256 held-back samples) and clear the caches. Running
        the flow on zero new tokens instead would regenerate frames that do not line up with
        the held-back ones (the prompt holds a duplicated frame per block). Speech [1, S]."""
        if stream.mel_overlap is None:
            stream.clear_caches()
            return torch.zeros(1, 0, device=self.device)
        mel, stream.mel_overlap = stream.mel_overlap, None
        generator = torch.Generator().manual_seed(FLOW_SEED)
        speech, _ = self.vocode_block(mel, stream, finalize=True, generator=generator)
        return speech

    # ----- whole utterances ---------------------------------------------------------------

    def offline(self, tokens: Tensor) -> Tensor:
        """All tokens [1, T] in one final call -> speech [1, 256 * mel_frames(T)]."""
        speech, _ = self.token2wav(tokens, DecoderStream(), finalize=True)
        return speech

    def iter_blocks(
        self, tokens: Tensor, block_sizes: Sequence[int], stream: DecoderStream | None = None
    ) -> Iterator[Tensor]:
        """Decode tokens [1, T] in blocks of `block_sizes` (last size repeats), yielding each
        block's speech [1, S_i] as soon as it is ready; the last block finalizes.
        `stream` (a fresh one by default) is left holding the prompt and returned mels."""
        stream = DecoderStream() if stream is None else stream
        blocks = schedule_blocks(tokens.shape[1], block_sizes)
        start = 0
        for i, size in enumerate(blocks):
            yield self.decode_block(stream, tokens[:, start : start + size], i == len(blocks) - 1)
            start += size

    def stream_inference(self, tokens: Tensor, block_size: int = STREAM_BLOCK_SIZE) -> Tensor:
        """Reference `stream_inference`: fixed blocks of 10 tokens, speech concatenated."""
        return torch.cat(list(self.iter_blocks(tokens, (block_size,))), dim=-1)


class ReferenceStreamer:
    """The web demo's decoding loop over a live token stream.

    Tokens are buffered; when a token arrives while the buffer already holds the current
    block size, the buffer is decoded (not final) and the schedule advances. `finish()` (end of
    turn) decodes what is left with finalize=True. Feeding the same tokens therefore yields the
    demo's blocks (190 tokens -> 25, 50, 100, 15).
    """

    def __init__(self, decoder: AudioDecoder, block_sizes: Sequence[int] = DEMO_BLOCK_SIZES):
        self.decoder = decoder
        self.block_sizes = tuple(block_sizes)
        self.stream = DecoderStream()
        self._pending: list[int] = []
        self._n_blocks = 0

    @property
    def block_size(self) -> int:
        return self.block_sizes[min(self._n_blocks, len(self.block_sizes) - 1)]

    def push(self, token_id: int) -> Tensor | None:
        """Add one audio token id; returns speech [1, S] when a block was decoded."""
        speech = None
        if len(self._pending) >= self.block_size:
            speech = self._decode(finalize=False)
        self._pending.append(int(token_id))
        return speech

    def finish(self) -> Tensor | None:
        """End of turn: decode the remaining tokens with finalize=True (None if none)."""
        return self._decode(finalize=True) if self._pending else None

    def _decode(self, finalize: bool) -> Tensor:
        token = torch.tensor([self._pending], dtype=torch.long)
        self._pending = []
        self._n_blocks += 1
        logger.debug("decoding block %d of %d tokens", self._n_blocks, token.shape[1])
        return self.decoder.decode_block(self.stream, token, finalize)
