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

On CUDA, small-batch decoding is bound by launching kernels, so the work of full blocks runs
as CUDA graphs (`models.cuda_graphs.CudaGraphCache`), in three parts, each a pure function of
tensors whose shapes repeat from block to block:

* encoder (`_encoder_pass`, batch 1 per stream): the block's tokens and the stream's key/value
  cache -> features and the cache after the block, trimmed (one graph per cache size: the
  cache grows for the first blocks, then keeps `encoder_cache_tokens` positions);
* sampler (`_flow_pass`): window features, prompt mel, noise -> mel, the length regulator
  (per window) and all sampler steps included;
* vocoder (`_vocoder_pass`): mel, the settled f0 to keep, sine phases, noise and start phases
  -> audio and the f0 used (predict_f0, the splice of settled f0, source, HiFT filter).

Random numbers are drawn outside, from each stream's generator, in the order of the plain
path. Short and final blocks run plainly; a graph that fails once is given up for good
(`_replay`).
"""

from __future__ import annotations

import functools
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from models.cuda_graphs import CudaGraphCache
from models.flow import EncoderCache, FlowDecoder, mel_frames_for_tokens
from models.hift import HiFTGenerator, SourceDraws

logger = logging.getLogger(__name__)

__all__ = ["BlockRequest", "FastStream", "StreamingConfig", "StreamingDecoder"]

FRAMES_PER_TOKEN = 22050 / 256 / 12.5  # 6.89 mel frames per 12.5 Hz token
GRAPH_PARTS = ("encoder", "sampler", "vocoder")  # the parts that can replay CUDA graphs


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
    # On CUDA, replay the work of full blocks as CUDA graphs, one per input shape and batch
    # bucket: the encoder (per stream), the sampler (length regulator and all its estimator
    # calls) and the vocoder (f0, source and filter). Short and final blocks run plainly.
    # Batches are filled up to a power of two with copies of their first row: no other row's
    # result depends on them, though a different batch size can change float rounding.
    cuda_graphs: bool = True
    cuda_graph_parts: tuple[str, ...] = GRAPH_PARTS  # which of GRAPH_PARTS to replay

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
        unknown = set(self.cuda_graph_parts) - set(GRAPH_PARTS)
        if unknown:
            raise ValueError(f"unknown cuda_graph_parts {sorted(unknown)}; known: {GRAPH_PARTS}")


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


@functools.lru_cache(maxsize=64)
def _raised_cosine(n: int, device: torch.device | None = None) -> Tensor:
    """Fade-in weights 0 -> 1 over n points (excluding both ends), float32. Cached (one copy
    to the device per length); read-only."""
    t = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return (0.5 - 0.5 * torch.cos(math.pi * t)).float().to(device)


def _bucket(rows: int) -> int:
    """The power of two a batch of `rows` is filled up to for a CUDA graph."""
    return 1 << (rows - 1).bit_length()


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
        self._plain: dict[str, Callable[..., Tensor]] = {
            "encoder": self._encoder_pass,
            "sampler": self._flow_pass,
            "vocoder": self._vocoder_pass,
        }
        # Where a part replays CUDA graphs; None: it runs plainly (a CPU, or a failed graph).
        self._graphs: dict[str, CudaGraphCache | None] = dict.fromkeys(GRAPH_PARTS)
        if self.config.cuda_graphs and self._device.type == "cuda":
            for part in self.config.cuda_graph_parts:
                self._graphs[part] = CudaGraphCache(
                    self._plain[part], max_graphs=48, warm_up_runs=1
                )
        self._prefixes: dict[tuple[int, int], Tensor] = {}  # see `_settled_f0`

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
        """Whether any part replays CUDA graphs (recorded per shape on first use)."""
        return bool(self.graphed_parts)

    @property
    def graphed_parts(self) -> tuple[str, ...]:
        """The parts (of `GRAPH_PARTS`) that replay CUDA graphs now: a part whose graph
        failed runs plainly from then on."""
        return tuple(part for part in GRAPH_PARTS if self._graphs[part] is not None)

    @property
    def steady_after_blocks(self) -> int:
        """Blocks of a stream after which its full blocks have the shapes of the block
        before (the encoder cache and the flow window have reached their bounds), up to the
        mel frames of a block (68 or 69 for 10 tokens). A warm-up answer of this many full
        blocks records every graph of a stream's steady state."""
        cfg = self.config
        reach = max(cfg.encoder_cache_tokens, cfg.context_tokens)
        return 1 + math.ceil(reach / cfg.block_tokens)

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
        stream.pending.extend(self._token_ids(tokens))
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
        # Check every request before any stream takes its tokens: a bad one leaves all as were.
        checked = [self._token_ids(ids) for _, ids, _ in requests]
        if any(stream.finished for stream in streams):
            raise RuntimeError("stream already finished")
        units = [
            self._units_of(stream, ids, final)
            for (stream, _, final), ids in zip(requests, checked, strict=True)
        ]
        outputs: list[list[Tensor]] = [[] for _ in requests]
        for wave in range(max((len(u) for u in units), default=0)):
            owners = [i for i, unit_list in enumerate(units) if wave < len(unit_list)]
            speech = self._decode_units([units[i][wave] for i in owners])
            for owner, chunk in zip(owners, speech, strict=True):
                outputs[owner].append(chunk)
        empty = torch.zeros(1, 0, device=self._device)
        return [torch.cat(chunks, dim=-1) if chunks else empty for chunks in outputs]

    def _token_ids(self, tokens: Iterable[int]) -> list[int]:
        """The ids as ints; ValueError if one is outside [0, vocab_size) (which would fail
        deep inside the embedding, or on CUDA poison the context with a device assert)."""
        ids = [int(t) for t in tokens]
        vocab = self.flow.cfg.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"audio token id {bad} is outside [0, {vocab})")
        return ids

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

    def _is_full(self, unit: _Unit) -> bool:
        """A full block before the end of its stream: the shapes CUDA graphs are kept for."""
        return not unit.final and len(unit.block) == self.config.block_tokens

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
        return self._vocode_many(
            [unit.stream for unit in units],
            frames,
            [u.final for u in units],
            [self._is_full(u) for u in units],
        )

    def _no_frames(self) -> Tensor:
        return torch.zeros(1, 80, 0, device=self._device, dtype=self._dtype)

    def _encode(self, unit: _Unit) -> Tensor:
        """The block's features [1, n, 80]; advances the stream's encoder cache (not final)."""
        stream, n = unit.stream, len(unit.block)
        token = torch.tensor([unit.block], dtype=torch.long, device=self._device)
        cache = stream.encoder_cache
        past: list[Tensor] = []
        if cache is not None and cache.length > cache.start:
            past = [t for pair in zip(cache.keys, cache.values, strict=True) for t in pair]
        packed = self._replay("encoder", (token, *past), self._is_full(unit))[0]
        enc = self.flow.cfg.encoder
        width = self.flow.cfg.output_size
        h_new = packed[: n * width].view(1, n, width)
        rest = packed[n * width :]
        per_position = 2 * enc.num_blocks * enc.attention_heads * enc.head_dim
        held = rest.numel() // per_position
        layers = rest.view(enc.num_blocks, 2, 1, enc.attention_heads, held, enc.head_dim)
        if not unit.final:
            block = self.flow.encoder.block_size
            length = (cache.length if cache is not None else 0) + n // block * block
            stream.encoder_cache = EncoderCache(
                keys=[layer[0] for layer in layers],
                values=[layer[1] for layer in layers],
                start=length - held,
                length=length,
            )
        return h_new

    def _encoder_pass(self, token: Tensor, *past: Tensor) -> Tensor:
        """`flow.encode_chunk` + `EncoderCache.trim` as a function of tensors (graphed).

        token [1, n] ids; past: the stream's cache as keys, values of layer 0, then layer 1,
        ... (each [1, H, S, d_k]; none for an empty cache). Returns [1, N]: the features
        [1, n, 80], then each layer's keys and values of the cache after the block, trimmed to
        `encoder_cache_tokens` positions, flattened (one tensor: what a graph returns)."""
        h, keys, values = self.flow.encode_next(token, past[0::2], past[1::2])
        limit = self.config.encoder_cache_tokens
        parts = [h.reshape(-1)]
        for k, v in zip(keys, values, strict=True):
            parts += [k[:, :, -limit:].reshape(-1), v[:, :, -limit:].reshape(-1)]
        return torch.cat(parts)[None]

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
        h_new = self._encode(unit)
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
        n_frames = plans[0].n_frames
        windows = torch.cat([plan.window for plan in plans])
        prompts = torch.cat([plan.prompt for plan in plans])
        noise = torch.cat([torch.randn(1, 80, n_frames, generator=g) for g in generators])
        full = all(p.last_token - p.first_token == self.config.block_tokens for p in plans)
        # a short last block: too rare to record
        return self._replay("sampler", (windows, prompts, noise.to(windows)), full)

    def _flow_pass(self, windows: Tensor, prompts: Tensor, noise: Tensor) -> Tensor:
        """The flow from token features to mel as a function of tensors (graphed): windows
        [B, W, 80], prompt mel [B, 80, P] of the first frames, noise [B, 80, n] -> [B, 80, n].
        The length regulator is a small conv stack: it runs per window; the sampler batched."""
        rows, n_frames, n_prompt = windows.shape[0], noise.shape[-1], prompts.shape[-1]
        mu = torch.cat([self.flow.regulate(windows[i : i + 1], n_frames) for i in range(rows)])
        cond = torch.zeros_like(mu)
        cond[:, :, :n_prompt] = prompts
        mask = torch.ones(rows, 1, n_frames, device=mu.device, dtype=mu.dtype)
        spks = self._spks.expand(rows, -1)
        return self.flow.decoder(mu, mask, spks, cond, self.config.n_timesteps, noise)

    def _replay(self, part: str, inputs: tuple[Tensor, ...], full: bool) -> Tensor:
        """`part`'s function of `inputs` (batch first) - replayed as a CUDA graph when the
        part has graphs and the blocks are full, else called plainly.

        For a graph, the batch is filled up to a power of two with copies of its first row
        and the result (the recording's buffer) is sliced back and copied. A graph that fails
        is logged and given up for good; the part then runs plainly, on the same inputs."""
        graphs = self._graphs[part]
        if graphs is None or not full:
            return self._plain[part](*inputs)
        rows = inputs[0].shape[0]
        bucket = _bucket(rows)
        filled = inputs
        if bucket > rows:  # fill the batch up with copies of its first row
            filled = tuple(
                torch.cat([x, x[:1].expand(bucket - rows, *x.shape[1:])]) for x in inputs
            )
        try:
            return graphs(*filled)[:rows].clone()
        except Exception:
            logger.exception("the %s's CUDA graph failed: running it plainly from now on", part)
            self._graphs[part] = None
            return self._plain[part](*inputs)

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
        self,
        streams: Sequence[FastStream],
        frames: Sequence[Tensor],
        finals: Sequence[bool],
        full: Sequence[bool] | None = None,
    ) -> list[Tensor]:
        """`vocode_frames` for distinct streams; one vocoder call per group of equal inputs.
        full: which streams vocode a full block (a group of full blocks only may replay a
        CUDA graph); none when not given."""
        full = full if full is not None else [False] * len(streams)
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
                [streams[i] for i in group],
                [mels[i] for i in group],
                [finals[i] for i in group],
                all(full[i] for i in group),
            )
            for index, chunk in zip(group, chunks, strict=True):
                out[index] = chunk
        return out  # type: ignore[return-value]

    def _vocode_group(
        self,
        streams: Sequence[FastStream],
        mels: Sequence[Tensor],
        finals: Sequence[bool],
        full: bool = False,
    ) -> list[Tensor]:
        """One batched f0/source/HiFT pass over mels of equal length [1, 80, F] each (a CUDA
        graph replay when `full`: every row vocodes a full block)."""
        cfg, hop = self.config, self._hop
        mel = torch.cat(list(mels))  # (B, 80, F)
        n_frames = mel.shape[-1]
        settled, keep = self._settled_f0(streams, n_frames)
        phases = torch.cat([s.phases for s in streams]).to(mel.device)
        noise = torch.cat([self._unit_noise(s, n_frames * hop) for s in streams])
        inputs = (mel, settled, keep, phases, noise.to(mel.device))
        starts = None
        if streams[0].voc_cycles is not None:
            starts = torch.cat([s.voc_cycles for s in streams])  # type: ignore[misc]
            inputs += (starts,)
        out = self._replay("vocoder", inputs, full)
        audio, f0 = out[:, : n_frames * hop], out[:, n_frames * hop :]
        next_start = n_frames - min(cfg.vocoder_context_frames, n_frames)
        cycles = self.hift.cycles_after(f0[:, :next_start], starts)
        speech = []
        for row, stream in enumerate(streams):
            n_ctx = stream.voc_mel.shape[-1] if stream.voc_mel is not None else 0
            row_audio = audio[row : row + 1]
            stream.voc_cycles = cycles[row : row + 1]
            stream.voc_mel = mel[row : row + 1, :, next_start:]
            stream.voc_f0 = f0[row : row + 1, next_start:]
            new, rerendered = row_audio[:, n_ctx * hop :], row_audio[:, : n_ctx * hop]
            speech.append(self._emit(stream, new, rerendered, finals[row]))
        return speech

    def _vocoder_pass(
        self,
        mel: Tensor,
        settled: Tensor,
        keep: Tensor,
        phases: Tensor,
        noise: Tensor,
        *starts: Tensor,
    ) -> Tensor:
        """The vocoder as a function of tensors (graphed): mel [B, 80, F]; f0 of settled
        frames [B, F], kept where keep [B, F] (bool) holds, predicted elsewhere; sine phases
        [B, H, 1]; noise [B, H, 256F]; optionally the start phases [B, H, 1] (float64).
        Returns [B, 256F + F]: the speech, then the f0 it used."""
        f0 = torch.where(keep, settled, self.hift.predict_f0(mel))
        draws = SourceDraws(phases, noise)
        source = self.hift.source_from_f0(f0, draws, starts[0] if starts else None)
        audio = self.hift.decode(mel, source, checked=False)
        return torch.cat([audio, f0], dim=-1)

    def _settled_f0(self, streams: Sequence[FastStream], n_frames: int) -> tuple[Tensor, Tensor]:
        """For each stream, the f0 of the first frames that the previous call settled, to be
        kept as it was, and where: (f0 [B, F] float32, keep [B, F] bool). The frames within
        `f0_margin` of the previous right edge take the new prediction."""
        frozen = [
            max(0, s.voc_f0.shape[-1] - self._f0_margin) if s.voc_f0 is not None else 0
            for s in streams
        ]
        if len(set(frozen)) == 1:  # the usual case: one count for the batch
            count = frozen[0]
            keep = self._prefix(count, n_frames).expand(len(streams), n_frames)
            if count == 0:
                return torch.zeros(len(streams), n_frames, device=self._device), keep
            heads = torch.cat([s.voc_f0[:, :count] for s in streams])  # type: ignore[index]
            return F.pad(heads, (0, n_frames - count)), keep
        rows = [
            F.pad(s.voc_f0[:, :count], (0, n_frames - count))  # type: ignore[index]
            if count
            else torch.zeros(1, n_frames, device=self._device)
            for s, count in zip(streams, frozen, strict=True)
        ]
        keep = torch.cat([self._prefix(count, n_frames) for count in frozen])
        return torch.cat(rows), keep

    def _prefix(self, count: int, n_frames: int) -> Tensor:
        """[1, n_frames] bool, True on the first `count` frames (cached: read-only)."""
        mask = self._prefixes.get((count, n_frames))
        if mask is None:
            mask = (torch.arange(n_frames) < count)[None].to(self._device)
            self._prefixes[(count, n_frames)] = mask
        return mask

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
