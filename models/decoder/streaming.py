"""Low-latency streaming token -> waveform decoding with bounded cost per block.

The reference streaming decoder (`AudioDecoder`) re-encodes every previous token and re-runs
the flow over every previous mel frame on each block, so a block costs O(answer length), and its
cross-fade mixes frames that are not time-aligned. `StreamingDecoder` keeps the same models and
the same token -> frame alignment but bounds the work per block:

* encoder: only the block's new tokens are encoded, attending to a trimmed key/value cache
  of at most `encoder_cache_tokens` previous tokens (exact while the cache is untrimmed);
* flow: the sampler runs on a window of `context_tokens` previous tokens plus the block;
  the context frames are conditioned on the mel already produced for them (the reference's
  prompt mechanism, limited to a window);
* mel joins: the last `lookahead_frames` of each block are provisional; the next block
  regenerates them with right context and cross-fades (raised cosine) old -> new at the same
  time positions;
* vocoder: each call re-renders `vocoder_context_frames` of already vocoded mel on the left,
  keeps the sine phase continuous across calls (random initial phases drawn once per stream,
  running phase and the f0 of settled frames carried over), holds back the last
  `vocoder_holdback_frames` of audio (within the reach of the right edge) and replaces them
  by their re-rendering, cross-faded where the two meet.

The first block needs only `block_tokens` (10) tokens. State lives in a `FastStream` per
utterance.

`decode_many` serves several streams at once: their blocks go through the flow sampler (with
its classifier-free guidance) and the vocoder as one batch wherever the shapes agree (same
window tokens, frames and prompt frames; same vocoder input length). Blocks are never padded:
the flow's group norms and the vocoder's convolutions would see the padding, so grouping equal
shapes is what keeps a batched stream's audio equal to the audio it gets alone.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from models.cuda_graphs import CudaGraphCache
from models.flow import EncoderCache, FlowDecoder, mel_frames_for_tokens
from models.hift import HiFTGenerator, SourceDraws

logger = logging.getLogger(__name__)

__all__ = ["BlockRequest", "FastStream", "StreamingConfig", "StreamingDecoder"]

FRAMES_PER_TOKEN = 22050 / 256 / 12.5  # 6.89 mel frames per 12.5 Hz token


@dataclass(frozen=True)
class StreamingConfig:
    """Knobs of the bounded-cost streaming decoder (frames are 256-sample mel frames)."""

    block_tokens: int = 10  # tokens per block; a multiple of the encoder's attention block
    context_tokens: int = 20  # previous tokens (and their mel) conditioning each block
    encoder_cache_tokens: int = 100  # encoder left context kept in the key/value cache
    lookahead_frames: int = 8  # provisional frames at a block's end, regenerated next block
    # The vocoder's convolutions reach about 8 frames past an input edge: audio closer than
    # that to the right edge is held back and re-rendered by the next call, which starts
    # that far left of the held-back audio.
    vocoder_context_frames: int = 14  # already vocoded frames re-rendered on the left
    vocoder_holdback_frames: int = 6  # audio frames held back, re-rendered next call
    vocoder_crossfade_frames: int = 2  # old -> new cross-fade at the start of the held part
    n_timesteps: int = 10  # Euler steps of the flow sampler (reference: 10)
    seed: int = 42  # per-stream generator seed (noise and sine phases)
    # On CUDA, replay the flow sampler (all its estimator calls) as CUDA graphs, one per
    # window shape and batch bucket, for full blocks (a short last block runs plainly).
    # Batches are filled up to a power of two with copies of their first row: no other row's
    # result depends on them, though a different batch size can change float rounding.
    cuda_graphs: bool = True

    def __post_init__(self) -> None:
        if min(self.block_tokens, self.n_timesteps, self.encoder_cache_tokens) < 1:
            raise ValueError("block_tokens, n_timesteps and encoder_cache_tokens must be >= 1")
        if self.context_tokens * FRAMES_PER_TOKEN < self.lookahead_frames + 1:
            raise ValueError("context_tokens must cover more frames than lookahead_frames")
        if self.block_tokens * FRAMES_PER_TOKEN < 2 * self.lookahead_frames:
            raise ValueError("a block must produce at least twice lookahead_frames frames")
        if not 0 < self.vocoder_holdback_frames <= self.vocoder_context_frames:
            raise ValueError("need 0 < vocoder_holdback_frames <= vocoder_context_frames")
        if not 0 < self.vocoder_crossfade_frames <= self.vocoder_holdback_frames:
            raise ValueError("need 0 < vocoder_crossfade_frames <= vocoder_holdback_frames")


@dataclass
class FastStream:
    """Per-utterance state of `StreamingDecoder` (batch 1).

    pending: token ids not decoded yet; n_tokens: tokens decoded so far.
    encoder_cache: keys/values of encoded complete token blocks (trimmed).
    features: [1, <=context_tokens, 80] projected encoder features of the last tokens.
    mel: [1, 80, M] final mel of the last frames (ends at global frame `mel_end`).
    lookahead: [1, 80, lookahead_frames] provisional frames after `mel_end`.
    voc_mel: [1, 80, <=K] last vocoded frames, voc_f0 [1, <=K] the f0 used for them and
    voc_cycles [1, H, 1] the sine phase at their start.
    audio_tail: [1, holdback * 256] rendered, not yet emitted samples.
    """

    generator: torch.Generator
    phases: Tensor
    pending: list[int] = field(default_factory=list)
    n_tokens: int = 0
    encoder_cache: EncoderCache | None = None
    features: Tensor | None = None
    mel: Tensor | None = None
    mel_end: int = 0
    lookahead: Tensor | None = None
    voc_mel: Tensor | None = None
    voc_f0: Tensor | None = None
    voc_cycles: Tensor | None = None
    audio_tail: Tensor | None = None
    finished: bool = False


# (stream, token ids, final): what `decode_block` takes, for one stream of `decode_many`.
BlockRequest = tuple[FastStream, Sequence[int], bool]


@dataclass
class _Unit:
    """One block (or, when final with no tokens left, one flush) of one stream."""

    stream: FastStream
    block: list[int]
    final: bool


@dataclass
class _FlowPlan:
    """The flow sampler's inputs for one block: window features [1, W, 80], prompt mel."""

    window: Tensor
    n_frames: int
    prompt: Tensor
    first_token: int
    last_token: int

    @property
    def key(self) -> Hashable:
        return (self.window.shape[1], self.n_frames, self.prompt.shape[-1])


def _groups(keys: Sequence[Hashable]) -> list[list[int]]:
    """Indices with equal keys, groups in order of first appearance."""
    grouped: dict[Hashable, list[int]] = defaultdict(list)
    for index, key in enumerate(keys):
        grouped[key].append(index)
    return list(grouped.values())


def _raised_cosine(n: int, device: torch.device | None = None) -> Tensor:
    """Fade-in weights 0 -> 1 over n points (excluding both ends), float32."""
    t = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return (0.5 - 0.5 * torch.cos(math.pi * t)).float().to(device)


class StreamingDecoder:
    """Bounded-cost streaming decoder over the reference flow and HiFT models."""

    sample_rate = 22050

    def __init__(
        self, flow: FlowDecoder, hift: HiFTGenerator, config: StreamingConfig | None = None
    ) -> None:
        self.flow = flow
        self.hift = hift
        self.config = config or StreamingConfig()
        block = flow.cfg.encoder.block_size
        if self.config.block_tokens % block != 0:
            raise ValueError(f"block_tokens must be a multiple of the encoder block ({block})")
        self._hop = hift.config.upsample_factor
        self._f0_margin = hift.config.f0_predictor.num_layers  # k3 convs: +-1 frame each
        if self.config.vocoder_context_frames < 2 * self._f0_margin:
            raise ValueError(
                f"vocoder_context_frames must be >= {2 * self._f0_margin} (twice the f0 "
                "predictor's reach) so that re-predicted f0 is free of edge effects"
            )
        with torch.no_grad():
            zeros = torch.zeros(1, flow.cfg.spk_embed_dim, device=self._device, dtype=self._dtype)
            self._spks = flow.speaker_projection(zeros)  # GLM-4-Voice uses a zero x-vector
        self._sampler_graphs: CudaGraphCache | None = None
        if self.config.cuda_graphs and self._device.type == "cuda":
            self._sampler_graphs = CudaGraphCache(self._sampler, max_graphs=48, warm_up_runs=1)

    @classmethod
    def from_pretrained(
        cls,
        decoder_dir: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        config: StreamingConfig | None = None,
    ) -> StreamingDecoder:
        flow = FlowDecoder.from_pretrained(decoder_dir, device=device, dtype=dtype)
        hift = HiFTGenerator.from_pretrained(decoder_dir, device=device, dtype=dtype)
        return cls(flow, hift, config)

    @property
    def uses_cuda_graphs(self) -> bool:
        """Whether the flow sampler replays CUDA graphs (recorded per shape on first use)."""
        return self._sampler_graphs is not None

    @property
    def _device(self) -> torch.device:
        return self.flow.input_embedding.weight.device

    @property
    def _dtype(self) -> torch.dtype:
        return self.flow.input_embedding.weight.dtype

    def new_stream(self, seed: int | None = None) -> FastStream:
        generator = torch.Generator().manual_seed(self.config.seed if seed is None else seed)
        phases = self.hift.draw(1, 0, generator).phases
        return FastStream(generator=generator, phases=phases)

    # ----- public streaming API -----------------------------------------------------------

    @torch.inference_mode()
    def push(self, stream: FastStream, tokens: Iterable[int]) -> list[Tensor]:
        """Add audio token ids; decode every complete block. Returns speech chunks [1, S]."""
        if stream.finished:
            raise RuntimeError("stream already finished")
        stream.pending.extend(int(t) for t in tokens)
        chunks = []
        while len(stream.pending) >= self.config.block_tokens:
            block = stream.pending[: self.config.block_tokens]
            del stream.pending[: self.config.block_tokens]
            chunks.append(self._decode_block(stream, block, final=False))
        return chunks

    @torch.inference_mode()
    def finish(self, stream: FastStream) -> Tensor:
        """Decode the remaining tokens and flush every held-back frame/sample: speech [1, S]."""
        if stream.finished:
            raise RuntimeError("stream already finished")
        block, stream.pending = stream.pending, []
        stream.finished = True
        return self._decode_units([_Unit(stream, block, final=True)])[0]

    @torch.inference_mode()
    def decode_many(self, requests: Sequence[BlockRequest]) -> list[Tensor]:
        """`decode_block` for several distinct streams in batched model calls.

        Each request is (stream, token ids, final) with `decode_block`'s meaning; returns the
        speech [1, S] of each request, in order. The k-th blocks of all requests are decoded
        together, batched where their shapes agree."""
        streams = [stream for stream, _, _ in requests]
        if len({id(stream) for stream in streams}) != len(streams):
            raise ValueError("decode_many takes each stream at most once")
        units = [self._units_of(stream, ids, final) for stream, ids, final in requests]
        outputs: list[list[Tensor]] = [[] for _ in requests]
        for wave in range(max((len(u) for u in units), default=0)):
            owners = [i for i, unit_list in enumerate(units) if wave < len(unit_list)]
            speech = self._decode_units([units[i][wave] for i in owners])
            for owner, chunk in zip(owners, speech, strict=True):
                outputs[owner].append(chunk)
        empty = torch.zeros(1, 0, device=self._device)
        return [torch.cat(chunks, dim=-1) if chunks else empty for chunks in outputs]

    def _units_of(self, stream: FastStream, ids: Sequence[int], final: bool) -> list[_Unit]:
        """Take the complete blocks (and, when final, the rest) out of the stream's pending."""
        if stream.finished:
            raise RuntimeError("stream already finished")
        stream.pending.extend(int(t) for t in ids)
        size = self.config.block_tokens
        units = []
        while len(stream.pending) >= size:
            units.append(_Unit(stream, stream.pending[:size], final=False))
            del stream.pending[:size]
        if final:
            units.append(_Unit(stream, stream.pending, final=True))
            stream.pending = []
            stream.finished = True
        return units

    def decode_block(self, stream: FastStream, token: Tensor, finalize: bool) -> Tensor:
        """Same call shape as `AudioDecoder.decode_block`, so either decoder can serve a
        caller that hands over token blocks of any size: token [1, n] -> speech [1, S] (empty
        until a full block of `block_tokens` is available; everything on finalize)."""
        chunks = self.push(stream, token[0].tolist())
        if finalize:
            chunks.append(self.finish(stream))
        if not chunks:
            return torch.zeros(1, 0, device=self._device)
        return torch.cat(chunks, dim=-1)

    def decode(self, tokens: Tensor) -> tuple[Tensor, list[int]]:
        """Stream tokens [1, T] through a fresh stream; returns (speech [1, S], the sample
        index where each chunk after the first begins)."""
        stream = self.new_stream()
        chunks = self.push(stream, tokens[0].tolist())
        chunks.append(self.finish(stream))
        joins = torch.tensor([c.shape[-1] for c in chunks]).cumsum(0)[:-1].tolist()
        return torch.cat(chunks, dim=-1), joins

    # ----- flow ---------------------------------------------------------------------------

    def _decode_block(self, stream: FastStream, block: list[int], final: bool) -> Tensor:
        return self._decode_units([_Unit(stream, block, final)])[0]

    def _decode_units(self, units: Sequence[_Unit]) -> list[Tensor]:
        """Speech [1, S] of one unit per distinct stream: flow, then vocoder, each batched."""
        with_tokens = [i for i, unit in enumerate(units) if unit.block]
        frames: list[Tensor | None] = [None] * len(units)
        flowed = self._flow_blocks([units[i] for i in with_tokens])
        for index, done in zip(with_tokens, flowed, strict=True):
            frames[index] = done
        for index, unit in enumerate(units):
            if frames[index] is None:  # a final flush: the provisional frames become final
                held = unit.stream.lookahead
                frames[index] = held.to(self._device) if held is not None else self._no_frames()
        return self._vocode_many([unit.stream for unit in units], frames, [u.final for u in units])

    def _no_frames(self) -> Tensor:
        return torch.zeros(1, 80, 0, device=self._device, dtype=self._dtype)

    def _encode(self, stream: FastStream, block: list[int], final: bool) -> Tensor:
        token = torch.tensor([block], dtype=torch.long, device=self._device)
        h_new, cache = self.flow.encode_chunk(token, stream.encoder_cache)
        if not final:
            stream.encoder_cache = cache.trim(self.config.encoder_cache_tokens)
        return h_new

    def _flow_blocks(self, units: Sequence[_Unit]) -> list[Tensor]:
        """Each unit's mel frames that became final [1, 80, n]: encoded one by one (a few
        tokens each), sampled in one flow call per group of equal shapes."""
        plans = [self._plan(unit) for unit in units]
        mels: list[Tensor | None] = [None] * len(units)
        for group in _groups([plan.key for plan in plans]):
            sampled = self._sample_batch(
                [plans[i] for i in group], [units[i].stream.generator for i in group]
            )
            for row, index in enumerate(group):
                mels[index] = sampled[row : row + 1]
        return [
            self._settle(unit, plan, mel)  # type: ignore[arg-type]
            for unit, plan, mel in zip(units, plans, mels, strict=True)
        ]

    def _plan(self, unit: _Unit) -> _FlowPlan:
        stream = unit.stream
        h_new = self._encode(stream, unit.block, unit.final)
        a, b = stream.n_tokens, stream.n_tokens + len(unit.block)
        context = stream.features if stream.features is not None else h_new[:, :0]
        window = torch.cat([context, h_new], dim=1)  # (1, tokens of window, 80)
        f_start, f_end = mel_frames_for_tokens(a - context.shape[1]), mel_frames_for_tokens(b)
        n_prompt = stream.mel_end - f_start if stream.mel is not None else 0
        return _FlowPlan(window, f_end - f_start, self._prompt(stream, n_prompt), a, b)

    def _settle(self, unit: _Unit, plan: _FlowPlan, sampled: Tensor) -> Tensor:
        """Cross-fade the sampled mel into the stream; returns the frames that became final."""
        cfg, stream = self.config, unit.stream
        mel = sampled[:, :, plan.prompt.shape[-1] :]
        if stream.lookahead is not None:
            mel = self._crossfade_lookahead(mel, stream.lookahead)
        stream.n_tokens = plan.last_token
        stream.features = plan.window[:, -cfg.context_tokens :]
        keep = mel.shape[-1] if unit.final else mel.shape[-1] - cfg.lookahead_frames
        stream.lookahead = None if unit.final else mel[:, :, keep:]
        done = mel[:, :, :keep]
        history = done if stream.mel is None else torch.cat([stream.mel, done], dim=-1)
        stream.mel = history[:, :, -math.ceil(cfg.context_tokens * FRAMES_PER_TOKEN + 2) :]
        stream.mel_end += keep
        return done

    def _prompt(self, stream: FastStream, n_prompt: int) -> Tensor:
        if n_prompt == 0:
            return torch.zeros(1, 80, 0, device=self._device, dtype=self._dtype)
        if stream.mel is None or n_prompt > stream.mel.shape[-1]:
            raise RuntimeError("mel history shorter than the context window")
        return stream.mel[:, :, -n_prompt:]

    def _sample_batch(
        self, plans: Sequence[_FlowPlan], generators: Sequence[torch.Generator]
    ) -> Tensor:
        """Flow sampler over windows of equal shape: mu from the token features, cond = prompt
        mel on the first frames, noise from each stream's generator. Returns [B, 80, n]."""
        n_frames, n_prompt = plans[0].n_frames, plans[0].prompt.shape[-1]
        # The length regulator is a small conv stack: run per window, batch the sampler.
        mu = torch.cat([self.flow.regulate(plan.window, n_frames) for plan in plans])
        cond = torch.zeros_like(mu)
        cond[:, :, :n_prompt] = torch.cat([plan.prompt for plan in plans])
        mask = torch.ones(len(plans), 1, n_frames, device=mu.device, dtype=mu.dtype)
        noise = torch.cat([torch.randn(1, 80, n_frames, generator=g) for g in generators])
        spks = self._spks.expand(len(plans), -1)
        inputs = (mu, mask, spks, cond, noise.to(mu))
        full = all(p.last_token - p.first_token == self.config.block_tokens for p in plans)
        if self._sampler_graphs is None or not full:  # a short last block: too rare to record
            return self._sampler(*inputs)
        rows = len(plans)
        bucket = 1 << (rows - 1).bit_length()
        if bucket > rows:  # fill the batch up with copies of its first row
            inputs = tuple(
                torch.cat([x, x[:1].expand(bucket - rows, *x.shape[1:])]) for x in inputs
            )
        try:
            return self._sampler_graphs(*inputs)[:rows].clone()
        except Exception:
            logger.exception("the flow sampler's CUDA graph failed: sampling plainly from now on")
            self._sampler_graphs = None
            return self._sampler(*(x[:rows] for x in inputs))

    def _sampler(
        self, mu: Tensor, mask: Tensor, spks: Tensor, cond: Tensor, noise: Tensor
    ) -> Tensor:
        return self.flow.decoder(mu, mask, spks, cond, self.config.n_timesteps, noise)

    @staticmethod
    def _crossfade_lookahead(mel: Tensor, lookahead: Tensor) -> Tensor:
        n = lookahead.shape[-1]
        fade_in = _raised_cosine(n, mel.device).to(mel.dtype)
        out = mel.clone()
        out[:, :, :n] = lookahead * (1 - fade_in) + mel[:, :, :n] * fade_in
        return out

    # ----- vocoder ------------------------------------------------------------------------

    def vocode_frames(self, stream: FastStream, frames: Tensor, final: bool) -> Tensor:
        """Vocode new final frames [1, 80, n] after the stream's context frames; returns the
        samples that are now final (the held-back tail of the previous call cross-faded with
        its re-rendering, then the new samples minus a fresh held-back tail unless final).

        f0 near an input edge is distorted by the predictor's zero padding (+-`f0_margin`
        frames), and an f0 error shifts the sine phase for every later sample. So the first
        frames of the context reuse the f0 the previous call used for them (it saw them with
        right context), the phase is anchored at the context start, and only frames at least
        `f0_margin` away from the previous right edge take the new prediction."""
        return self._vocode_many([stream], [frames], [final])[0]

    def _vocode_many(
        self, streams: Sequence[FastStream], frames: Sequence[Tensor], finals: Sequence[bool]
    ) -> list[Tensor]:
        """`vocode_frames` for distinct streams; one vocoder call per group of equal inputs."""
        mels = []
        for stream, new in zip(streams, frames, strict=True):
            context = stream.voc_mel if stream.voc_mel is not None else new[:, :, :0]
            mels.append(torch.cat([context, new], dim=-1))
        out: list[Tensor | None] = [None] * len(streams)
        keys = [(mel.shape[-1], s.voc_cycles is None) for mel, s in zip(mels, streams, strict=True)]
        for group in _groups(keys):
            if mels[group[0]].shape[-1] == 0:
                for index in group:
                    out[index] = self._flush(streams[index], finals[index])
                continue
            chunks = self._vocode_group(
                [streams[i] for i in group], [mels[i] for i in group], [finals[i] for i in group]
            )
            for index, chunk in zip(group, chunks, strict=True):
                out[index] = chunk
        return out  # type: ignore[return-value]

    def _vocode_group(
        self, streams: Sequence[FastStream], mels: Sequence[Tensor], finals: Sequence[bool]
    ) -> list[Tensor]:
        """One batched f0/source/HiFT pass over mels of equal length [1, 80, F] each."""
        cfg, hop = self.config, self._hop
        mel = torch.cat(list(mels))  # (B, 80, F)
        predicted = self.hift.predict_f0(mel)
        f0 = torch.cat(
            [self._keep_settled_f0(s, predicted[i : i + 1]) for i, s in enumerate(streams)]
        )
        phases = torch.cat([s.phases for s in streams])
        noise = torch.cat([self._unit_noise(s, mel.shape[-1] * hop) for s in streams])
        starts = (
            None if streams[0].voc_cycles is None else torch.cat([s.voc_cycles for s in streams])
        )  # type: ignore[misc]
        audio = self.hift.decode(
            mel, self.hift.source_from_f0(f0, SourceDraws(phases, noise), starts)
        )
        next_start = mel.shape[-1] - min(cfg.vocoder_context_frames, mel.shape[-1])
        speech = []
        for row, stream in enumerate(streams):
            n_ctx = stream.voc_mel.shape[-1] if stream.voc_mel is not None else 0
            row_f0, row_audio = f0[row : row + 1], audio[row : row + 1]
            stream.voc_cycles = self.hift.cycles_after(row_f0[:, :next_start], stream.voc_cycles)
            stream.voc_mel = mel[row : row + 1, :, next_start:]
            stream.voc_f0 = row_f0[:, next_start:]
            new, rerendered = row_audio[:, n_ctx * hop :], row_audio[:, : n_ctx * hop]
            speech.append(self._emit(stream, new, rerendered, finals[row]))
        return speech

    def _keep_settled_f0(self, stream: FastStream, f0: Tensor) -> Tensor:
        """The predicted f0 [1, F], with the frames the previous call settled kept as they were."""
        if stream.voc_f0 is None:
            return f0
        frozen = max(0, stream.voc_f0.shape[-1] - self._f0_margin)
        return torch.cat([stream.voc_f0[:, :frozen], f0[:, frozen:]], dim=-1)

    def _unit_noise(self, stream: FastStream, length: int) -> Tensor:
        return torch.randn((1, stream.phases.shape[1], length), generator=stream.generator)

    def _emit(self, stream: FastStream, new: Tensor, rerendered: Tensor, final: bool) -> Tensor:
        """Replace the held-back tail by its re-rendering (the end of `rerendered`), with a
        short cross-fade where the two meet; then emit `new` minus a fresh held-back tail
        (nothing held back when final)."""
        hold = self.config.vocoder_holdback_frames * self._hop
        head = new[:, :0]
        if stream.audio_tail is not None:
            tail = stream.audio_tail
            redo = rerendered[:, rerendered.shape[-1] - tail.shape[-1] :]
            n_fade = min(self.config.vocoder_crossfade_frames * self._hop, tail.shape[-1])
            fade_in = _raised_cosine(n_fade, new.device)
            joined = tail[:, :n_fade] * (1 - fade_in) + redo[:, :n_fade] * fade_in
            head = torch.cat([joined, redo[:, n_fade:]], dim=-1)
        if final:
            stream.audio_tail = None
            return torch.cat([head, new], dim=-1)
        stream.audio_tail = new[:, new.shape[-1] - hold :]
        return torch.cat([head, new[:, : new.shape[-1] - hold]], dim=-1)

    def _flush(self, stream: FastStream, final: bool) -> Tensor:
        tail = stream.audio_tail
        if tail is None:
            tail = torch.zeros(1, 0, device=self._device)
        if final:
            stream.audio_tail = None
        return tail
