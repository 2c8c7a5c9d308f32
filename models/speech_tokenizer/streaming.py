"""Incremental speech tokenization: encode each 4 s attention block as soon as its audio is in.

The encoder is block-causal (a 50 Hz frame sees its own 200-frame block and everything before),
so the tokens of a block depend only on the features up to the end of that block. While the user
speaks, `push` encodes every completed block against a key/value cache of the earlier ones; at
end of turn `finish` only has to encode the last, partial block.

Exactness. The reference log-mel floor is (maximum over the whole padded segment) - 8, which is
not known until the segment ends. `push` encodes with the floor of the audio heard so far and,
when a louder frame raises it, re-encodes the cached blocks holding values under the new floor
(only those change). `finish` computes the whole segment's features exactly as the one-shot path
does and applies the same rule with the final floor, so `finish()` returns what
`SpeechTokenizer.tokenize` returns for the same audio. Floor rises below `FLOOR_ATOL` (float
rounding between differently sized FFT/GEMM calls, e.g. on a GPU) do not trigger re-encoding;
features then differ from the one-shot ones by less than FLOOR_ATOL / 4. Tokens returned by
`push` are therefore provisional in one case: the loudest frame of a segment arrives after their
block (`finish` then revises them, and `stats.blocks_reencoded` counts it). In the usual case
(the loudest frame already heard) `finish` encodes only the last, partial block.

Segments of 30 s are closed (and made exact) as soon as they are full, as in the reference. The
last segment of a turn longer than 30 s is padded like the reference pads it in its batch (to a
full segment when it shares a batch with earlier segments).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .feature_extractor import padded_length
from .modeling_speech_tokenizer import EncoderCache
from .tokenizer import SEGMENT_BATCH_SIZE, SpeechTokenizer, as_float_audio

logger = logging.getLogger(__name__)

FLOOR_ATOL = 1e-5  # log10 units; floor changes below this are rounding, not louder audio


@dataclass
class StreamingStats:
    """Counters of the work done (for latency reports and tests)."""

    blocks_encoded: int = 0  # every block forward, including re-encodes
    blocks_reencoded: int = 0  # blocks encoded again because their features changed
    last_finish_blocks: int = 0  # blocks encoded by the latest finish()
    last_finish_s: float = 0.0  # wall time of the latest finish()


@dataclass
class _Segment:
    """State of the 30 s segment being received."""

    index: int
    audio: np.ndarray  # (segment_samples,) float32, filled up to num_samples
    num_samples: int = 0
    cache: EncoderCache = field(default_factory=EncoderCache)
    log_mel: torch.Tensor | None = None  # (1, num_mel, frames) un-floored input of cached blocks
    floor: float = -math.inf  # log-mel floor the cached blocks were encoded with
    block_ids: list[list[int]] = field(default_factory=list)


class StreamingSpeechTokenizer:
    """Feeds 16 kHz audio in pieces of any size; one instance per audio stream, not thread-safe."""

    def __init__(self, tokenizer: SpeechTokenizer) -> None:
        self.tokenizer = tokenizer
        self.model = tokenizer.model
        self.features = tokenizer.features
        self.block_frames = tokenizer.config.quantize_causal_block_size  # 50 Hz frames per block
        fc = tokenizer.feature_config
        self.hop = fc.hop_length
        self.half_window = fc.n_fft // 2  # samples a centred frame reaches past its centre
        self.full_blocks = tokenizer.config.max_source_positions // self.block_frames
        self.stats = StreamingStats()
        self.reset()

    def reset(self) -> None:
        """Forgets the current utterance (statistics are kept)."""
        self._closed_tokens: list[int] = []
        self._emitted = 0
        self._segment = self._new_segment(0)

    def _new_segment(self, index: int) -> _Segment:
        audio = np.zeros(self.tokenizer.segment_samples, dtype=np.float32)
        return _Segment(index=index, audio=audio)

    @property
    def num_samples(self) -> int:
        """Samples received in the current utterance."""
        return self._segment.index * self.tokenizer.segment_samples + self._segment.num_samples

    @property
    def tokens(self) -> list[int]:
        """Tokens of the closed segments and of the completed blocks of the current one."""
        return self._closed_tokens + [t for ids in self._segment.block_ids for t in ids]

    def push(self, audio_16k: np.ndarray) -> list[int]:
        """Appends 16 kHz mono audio; returns the tokens of blocks completed by it (maybe none).

        They are final unless a louder frame arrives later in the same 30 s segment, in which
        case `tokens` and `finish()` hold the revised ids (see the module docstring).
        """
        audio = as_float_audio(audio_16k)  # checked before anything is appended
        if audio.ndim != 1:
            raise ValueError(f"expected 1-D 16 kHz audio, got shape {audio.shape}")
        with torch.inference_mode():
            while audio.size:
                audio = self._append(audio)
                if self._segment.num_samples == self.tokenizer.segment_samples:
                    self._close_segment()
                else:
                    self._encode_completed_blocks()
        tokens = self.tokens
        new, self._emitted = tokens[self._emitted :], len(tokens)
        return new

    def finish(self) -> list[int]:
        """All tokens of the utterance (equal to one-shot `tokenize`); then resets."""
        start = time.perf_counter()
        encoded_before = self.stats.blocks_encoded
        with torch.inference_mode():
            self._close_segment()
        tokens = self._closed_tokens
        self.stats.last_finish_blocks = self.stats.blocks_encoded - encoded_before
        self.stats.last_finish_s = time.perf_counter() - start
        logger.debug(
            "finish: %d tokens, %d block(s) encoded in %.1f ms",
            len(tokens),
            self.stats.last_finish_blocks,
            1e3 * self.stats.last_finish_s,
        )
        self.reset()
        return tokens

    def _append(self, audio: np.ndarray) -> np.ndarray:
        """Copies what fits into the current segment; returns the rest."""
        seg = self._segment
        take = min(audio.size, self.tokenizer.segment_samples - seg.num_samples)
        seg.audio[seg.num_samples : seg.num_samples + take] = audio[:take]
        seg.num_samples += take
        return audio[take:]

    def _complete_frames(self, num_samples: int) -> int:
        """Mel frames whose whole window lies inside the first `num_samples` samples."""
        if num_samples < self.half_window:
            return 0
        return (num_samples - self.half_window) // self.hop + 1

    def _encode_completed_blocks(self) -> None:
        """Encodes the blocks whose mel frames are all final except for the floor."""
        seg = self._segment
        stem = self.model.stem_stride
        complete = self._complete_frames(seg.num_samples)
        ready = min(self.full_blocks, (complete + 1) // (stem * self.block_frames))
        if ready <= len(seg.block_ids):
            return
        waveform = torch.from_numpy(seg.audio[: seg.num_samples]).to(self.tokenizer.device)
        log_mel = self.features.log_mel(waveform[None])[..., :complete]  # (1, num_mel, complete)
        self._encode(seg, log_mel, ready * self.block_frames, num_real_samples=None)

    def _close_segment(self) -> None:
        """Encodes the rest of the segment with its exact features and moves to the next one."""
        seg = self._segment
        length = seg.num_samples
        if length:
            stride = self.tokenizer.samples_per_token
            padded = padded_length(length, stride)
            shares_batch = seg.index % SEGMENT_BATCH_SIZE != 0
            batch_length = self.tokenizer.segment_samples if shares_batch else padded
            waveform, _ = self.features.pad_batch([seg.audio[:length]], stride, batch_length)
            log_mel = self.features.log_mel(waveform)  # (1, num_mel, batch_length / hop)
            self._encode(seg, log_mel, padded // (self.hop * self.model.stem_stride), length)
            ids = [t for block in seg.block_ids for t in block]
            self._closed_tokens.extend(ids[: math.ceil(length / stride)])
        self._segment = self._new_segment(seg.index + 1)

    def _first_stale_block(self, seg: _Segment, floor: float) -> int:
        """First cached block whose features change under `floor` (or the block count).

        A floored value max(x, floor) changes only where x lies under the new, higher floor.
        """
        if seg.log_mel is None or floor <= seg.floor + FLOOR_ATOL:
            return len(seg.block_ids)
        changed = (seg.log_mel < floor).any(dim=1)[0]  # (cached mel frames,)
        if not bool(changed.any()):
            seg.floor = floor
            return len(seg.block_ids)
        frame = int(changed.nonzero()[0, 0])
        # Mel frame f first reaches 50 Hz frame ceil(f / 2) through the two causal convs.
        first = -(-frame // self.model.stem_stride) // self.block_frames
        return min(first, len(seg.block_ids))

    def _encode(
        self, seg: _Segment, log_mel: torch.Tensor, end_frame: int, num_real_samples: int | None
    ) -> None:
        """Brings the segment's blocks up to 50 Hz frame `end_frame`.

        log_mel: (1, num_mel, frames) un-floored log-mel; its maximum sets the floor.
        num_real_samples: samples of real audio when the segment is closed (padded frames are
        then hidden as keys); None while streaming, where every encoded frame is real.
        """
        floor = float(self.features.item_floor(log_mel))
        first = self._first_stale_block(seg, floor)
        stale = len(seg.block_ids) - first
        if stale:
            logger.debug("re-encoding blocks %d..%d (floor rose)", first, len(seg.block_ids) - 1)
            self.stats.blocks_reencoded += stale
            del seg.block_ids[first:]
            seg.cache.truncate(first * self.block_frames)
        if stale or not seg.block_ids:
            seg.floor = floor
        inputs = self.features.normalize(log_mel, floor).to(self.tokenizer.dtype)
        frame_samples = self.hop * self.model.stem_stride
        for block in range(len(seg.block_ids), -(-end_frame // self.block_frames)):
            start = block * self.block_frames
            end = min(end_frame, start + self.block_frames)
            key_mask = None
            if num_real_samples is not None:
                frames = torch.arange(start, end, device=inputs.device)
                key_mask = (frames * frame_samples < num_real_samples)[None]  # (1, end - start)
            _, ids = self.model.forward_block(inputs, start, end, seg.cache, key_mask)
            seg.block_ids.append(ids[0].tolist())
            self.stats.blocks_encoded += 1
        used_frames = self.model.stem_stride * end_frame - 1  # mel frames read by the stem
        seg.log_mel = log_mel[..., :used_frames].clone()


__all__ = ["StreamingSpeechTokenizer", "StreamingStats"]
