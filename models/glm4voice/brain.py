"""The loaded GLM-4-Voice models, and the units of work the worker runs with them.

Speech tokenizer (16 kHz -> 12.5 codes/s) -> GLM-4-Voice-9B (interleaved text and audio ids,
sampled with the reference demo's defaults, every live reply stepped in one batch) -> flow
decoder + HiFT (22.05 kHz). Everything here runs on the worker thread only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from models.decoder import AudioDecoder, DecoderStream, StreamingConfig, StreamingDecoder
from models.glm4voice.batching import KVCacheBatch, SequenceBatch
from models.glm4voice.paths import ModelPaths
from models.glm4voice.static_batch import StaticCacheConfig, StaticKVBatch
from models.glm4voice.tokens import TokenConstraints, TokenMasks, sample_nucleus
from models.glm4voice.worker import AudioBlock, Job, TextStream, TurnListener
from models.lm import GLM4VoiceTokenizer, LMStepper, SamplingConfig, load_lm
from models.lm.loading import check_checkpoint
from models.lm.prompt import InputMode, audio_tokens_text, build_prompt, split_history
from models.speech_tokenizer import SpeechTokenizer

logger = logging.getLogger(__name__)

DecoderMode = Literal["fast", "reference"]
DecodeStep = Literal["auto", "dynamic", "static", "graphs", "compile"]
DECODE_STEPS: tuple[str, ...] = ("auto", "dynamic", "static", "graphs", "compile")

WARM_UP_SPEECH_S = 1.5  # synthetic speech the warm-up tokenizes
PREFILL_BATCH_IDS = 16_384  # padded prompt ids (rows x longest) of one batched prefill
# A history too long for the context is cut down to this share of the room it may take.
HISTORY_FIT = 0.75
# LM steps per warmed batch size: a CUDA-graph step is recorded (or compiled), then replayed.
WARM_UP_STEPS = 3
WARM_UP_STREAMS = 2  # decoder streams of the warm-up (batched when the decoder batches)
WARM_UP_GRAPH_BLOCKS = 4  # blocks of the warm-up answer when the decoder replays CUDA graphs
WARM_UP_GRAPH_STREAMS = 16  # most streams the warm-up records decoder graphs for


def default_lm_dtype(device: str) -> torch.dtype:
    """float32 on the CPU (bf16 matmuls are slow there), bfloat16 on accelerators."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


@dataclass(frozen=True)
class LoadOptions:
    """How to place and run the models.

    lm_dtype None picks float32 on the CPU and bfloat16 elsewhere. decoder_mode "fast" uses the
    bounded-cost `StreamingDecoder`; "reference" decodes exactly as the reference demo does
    (`AudioDecoder.decode_block`, every block re-decoding the whole answer so far).
    batch_decoder: blocks of different replies that are ready in the same round share the fast
    decoder's model calls (`StreamingDecoder.decode_many`).
    decode_step: how the LM's one-token steps run. "dynamic": transformers' growing cache,
    plain calls. "static": a preallocated KV cache (`static_cache` rows and columns), plain
    calls. "graphs": the static cache with the step recorded as CUDA graphs. "compile": the
    static cache with the step compiled by `torch.compile` into CUDA graphs (minutes of
    compilation at start-up). "auto": "graphs" on CUDA devices without quantization, else
    "static" (its fused step is about twice as fast as the dynamic cache's on the CPU, and
    the next turn of a conversation prefills only its new ids). With a static cache at most `static_cache.max_batch` replies are started at
    once; further ones wait for a row.
    """

    device: str = "cpu"
    lm_dtype: torch.dtype | None = None
    quantization: str | None = None  # None or "int4" (bitsandbytes NF4)
    decoder_dtype: torch.dtype = torch.float32
    decoder_mode: DecoderMode = "fast"
    batch_decoder: bool = True
    decode_step: DecodeStep = "auto"
    static_cache: StaticCacheConfig = field(default_factory=StaticCacheConfig)
    streaming: StreamingConfig = field(default_factory=StreamingConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    constraints: TokenConstraints = field(default_factory=TokenConstraints)

    def __post_init__(self) -> None:
        if self.quantization not in (None, "int4"):
            raise ValueError(f"quantization must be None or 'int4', got {self.quantization!r}")
        if self.decoder_mode not in ("fast", "reference"):
            raise ValueError(
                f"decoder_mode must be 'fast' or 'reference', not {self.decoder_mode!r}"
            )
        if self.decode_step not in DECODE_STEPS:
            raise ValueError(f"decode_step must be one of {DECODE_STEPS}, not {self.decode_step!r}")
        if self.decode_step in ("graphs", "compile") and not _is_cuda(self.device):
            raise ValueError(f"decode_step {self.decode_step!r} needs a CUDA device")

    @property
    def resolved_lm_dtype(self) -> torch.dtype:
        return self.lm_dtype if self.lm_dtype is not None else default_lm_dtype(self.device)

    @property
    def resolved_decode_step(self) -> DecodeStep:
        if self.decode_step != "auto":
            return self.decode_step
        return "graphs" if _is_cuda(self.device) and self.quantization is None else "static"


def _is_cuda(device: str) -> bool:
    return torch.device(device).type == "cuda"


@dataclass
class ListenStats:
    """How user turns were tokenized (for tests, logs and benchmarks)."""

    streamed_turns: int = 0  # finished from speech tokenized while it was spoken
    whole_turns: int = 0  # tokenized in one go at the end
    last_finish_blocks: int = 0  # 4 s blocks the end of the latest streamed turn encoded


class ReplyDecoder:
    """Audio codes of one reply -> speech, with either decoder (state per reply)."""

    def __init__(self, decoder: AudioDecoder | StreamingDecoder) -> None:
        self.decoder = decoder
        streams_blocks = isinstance(decoder, StreamingDecoder)
        self.block_tokens = decoder.config.block_tokens if streams_blocks else None

    def new_stream(self) -> object:
        if isinstance(self.decoder, StreamingDecoder):
            return self.decoder.new_stream()
        return DecoderStream()

    def decode(self, stream: object, codes: list[int], final: bool) -> np.ndarray:
        """Speech [S] float32 for `codes`; `final` flushes what the decoder holds back."""
        token = torch.tensor([codes], dtype=torch.long).reshape(1, len(codes))
        with torch.inference_mode():
            speech = self.decoder.decode_block(stream, token, final)  # type: ignore[arg-type]
        return speech[0].float().cpu().numpy()

    def decode_many(
        self, requests: Sequence[tuple[object, list[int], bool]], batched: bool = True
    ) -> list[np.ndarray]:
        """`decode` for several replies' streams; batched model calls with the fast decoder."""
        if not batched or not isinstance(self.decoder, StreamingDecoder) or len(requests) < 2:
            return [self.decode(stream, codes, final) for stream, codes, final in requests]
        with torch.inference_mode():
            speech = self.decoder.decode_many(requests)  # type: ignore[arg-type]
        return [chunk[0].float().cpu().numpy() for chunk in speech]


@contextmanager
def _timed(stages: dict[str, float], name: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        stages[name] = stages.get(name, 0.0) + time.perf_counter() - started


def warm_up_speech(seconds: float = WARM_UP_SPEECH_S) -> np.ndarray:
    """A deterministic stand-in for speech (16 kHz float32): a voiced tone with noise."""
    rng = np.random.default_rng(0)
    t = np.arange(round(seconds * 16_000)) / 16_000
    voiced = 0.3 * np.sin(2 * np.pi * 150 * t) * (1 + np.sin(2 * np.pi * 4 * t))
    return (voiced + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


class GLM4VoiceBrain:
    """The three models plus the text tokenizer, loaded on one device."""

    def __init__(
        self,
        speech_tokenizer: SpeechTokenizer,
        sequences: SequenceBatch,
        tokenizer: GLM4VoiceTokenizer,
        decoder: AudioDecoder | StreamingDecoder,
        sampling: SamplingConfig,
        masks: TokenMasks,
        constraints: TokenConstraints | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.speech_tokenizer = speech_tokenizer
        self.sequences = sequences
        self.tokenizer = tokenizer
        self.reply_decoder = ReplyDecoder(decoder)
        self.sampling = sampling
        self.masks = masks
        self.constraints = constraints or TokenConstraints()
        self.sample_rate = decoder.sample_rate
        self.decoder_device = next(decoder.flow.parameters()).device  # where decoding runs
        self.block_tokens = self.reply_decoder.block_tokens
        self._stop_ids = frozenset(tokenizer.turn_stop_ids())
        self._generator = sampling.generator(device)
        self.listen_stats = ListenStats()
        self.batch_decoder = True  # see `LoadOptions.batch_decoder`
        # Replies that can hold LM state at once (None: no limit).
        self.max_sequences: int | None = getattr(sequences, "max_sequences", None)
        # Ids a sequence may hold (prompt and answer); None: no known limit.
        self.context_ids: int | None = _context_ids(sequences)

    @classmethod
    def load(cls, paths: ModelPaths, options: LoadOptions) -> GLM4VoiceBrain:
        """Check every file and the LM's keys and shapes, then load onto the device.

        The LM is used exactly as `load_lm` returns it (never cast afterwards: that would also
        cast its float32 RoPE frequencies).
        """
        paths.check()
        check_checkpoint(paths.lm)
        tokenizer = GLM4VoiceTokenizer.from_dir(paths.lm)
        started = time.perf_counter()
        speech_tokenizer = SpeechTokenizer.from_pretrained(paths.tokenizer, device=options.device)
        decoder = _load_decoder(paths, options)
        logger.info("speech tokenizer and decoder loaded in %.1f s", time.perf_counter() - started)
        started = time.perf_counter()
        lm = load_lm(paths.lm, options.device, options.resolved_lm_dtype, options.quantization)
        logger.info("language model loaded in %.1f s", time.perf_counter() - started)
        if lm.config.vocab_size < tokenizer.vocab_size:
            raise ValueError(
                f"{paths.lm}: the model has {lm.config.vocab_size} rows but its tokenizer uses "
                f"ids up to {tokenizer.vocab_size - 1}"
            )
        sequences = _sequence_batch(LMStepper(lm), options)
        masks = TokenMasks.build(
            tokenizer, lm.config.vocab_size, options.constraints, options.device
        )
        brain = cls(
            speech_tokenizer,
            sequences,
            tokenizer,
            decoder,
            options.sampling,
            masks,
            options.constraints,
            options.device,
        )
        brain.batch_decoder = options.batch_decoder
        return brain

    # ------------------------------------------------------------------ token classes

    def is_audio(self, token_id: int) -> bool:
        return self.tokenizer.is_audio(token_id)

    def audio_code(self, token_id: int) -> int:
        return self.tokenizer.audio_code(token_id)

    def is_stop(self, token_id: int) -> bool:
        return token_id in self._stop_ids

    def decode_text(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids)

    def text_stream(self) -> TextStream:
        return self.tokenizer.text_stream()

    # ------------------------------------------------------------------ the user's speech

    def listen(self, listener: TurnListener, samples: np.ndarray) -> None:
        """Tokenize speech of a turn still being spoken (completed 4 s blocks only)."""
        if listener.state is None:
            listener.state = self.speech_tokenizer.streaming()
        listener.state.push(samples)

    def speech_codes(self, job: Job) -> list[int]:
        """The user's speech codes: finished from the listener when it heard this very audio."""
        audio = job.turn_audio
        assert audio is not None
        listener, job.listener = job.listener, None
        state = listener.state if listener is not None else None
        if listener is not None:
            listener.close()  # whatever it hears from now on belongs to no turn
        if state is not None:
            fed = listener.fed_audio()  # type: ignore[union-attr]
            if len(fed) <= len(audio) and np.array_equal(audio[: len(fed)], fed):
                state.push(audio[len(fed) :])
                codes = state.finish()
                self.listen_stats.streamed_turns += 1
                self.listen_stats.last_finish_blocks = state.stats.last_finish_blocks
                return codes
            logger.info("the turn's audio differs from what was heard: tokenizing it again")
        self.listen_stats.whole_turns += 1
        return self.speech_tokenizer.tokenize(audio)

    # ------------------------------------------------------------------ units of work

    def user_input(self, job: Job) -> tuple[str, InputMode]:
        """The user's turn as prompt text, and the input mode ("audio" or "text")."""
        if job.turn_text is not None:
            return job.turn_text, "text"
        started = time.perf_counter()
        codes = self.speech_codes(job)
        job.timings.add("speech_tokenizer", time.perf_counter() - started)
        return audio_tokens_text(codes), "audio"

    def start_jobs(self, jobs: Sequence[Job]) -> list[BaseException | None]:
        """Start jobs that arrived together: each turn is tokenized and its prompt built on
        its history, then the prompts are prefilled in one left-padded forward per group of
        at most `PREFILL_BATCH_IDS` padded ids. Returns each job's error (None: started); one
        job's failure leaves the others started."""
        errors: list[BaseException | None] = [None] * len(jobs)
        prepared: list[tuple[Job, list[int]]] = []
        for index, job in enumerate(jobs):
            try:
                user_input, mode = self.user_input(job)
                prepared.append((job, self._fitted_prompt(job, user_input, mode)))
            except Exception as exc:
                logger.exception("could not build a reply's prompt")
                errors[index] = exc
        failed: dict[int, BaseException] = {}
        for group in _prefill_groups(prepared, PREFILL_BATCH_IDS):
            self._prefill_group(group, failed)
        for index, job in enumerate(jobs):
            errors[index] = errors[index] or failed.get(id(job))
        return errors

    def _fitted_prompt(self, job: Job, user_input: str, mode: InputMode) -> list[int]:
        """Build the job's prompt and return its ids. Where the prompt and the longest answer
        (`max_new_tokens`) would not fit the context, the oldest exchanges of the history are
        dropped (the system prompt stays) down to `HISTORY_FIT` of the room, so that the next
        turns continue the same kept history instead of dropping one exchange each."""
        job.prompt = build_prompt(job.history_prefix, user_input, mode)
        ids = self.tokenizer.encode(job.prompt)
        if self.context_ids is None:
            return ids
        room = self.context_ids - job.max_new_tokens
        if len(ids) <= room:
            return ids
        head, exchanges = split_history(job.history_prefix.strip())
        dropped = 0
        while exchanges and len(ids) > HISTORY_FIT * room:
            exchanges = exchanges[1:]
            dropped += 1
            # with no exchange left, the turn starts afresh (its own input's system prompt)
            kept = head + "".join(exchanges) if exchanges else ""
            job.prompt = build_prompt(kept, user_input, mode)
            ids = self.tokenizer.encode(job.prompt)
        if len(ids) > room:
            job.prompt = ""  # the turn is not answered: it leaves nothing in the history
            raise ValueError(
                f"this turn alone takes {len(ids)} prompt ids; with room for a "
                f"{job.max_new_tokens}-id answer at most {room} fit the model's context"
            )
        logger.info(
            "dropped the %d oldest exchanges of a conversation to fit the context (%d ids left)",
            dropped,
            len(ids),
        )
        return ids

    def _prefill_group(
        self, group: list[tuple[Job, list[int]]], failed: dict[int, BaseException]
    ) -> None:
        started = time.perf_counter()
        try:
            logits = self.sequences.prefill_many([(job.key, ids) for job, ids in group])
        except Exception as exc:
            if len(group) == 1:
                logger.exception("prefill failed")
                failed[id(group[0][0])] = exc
                return
            logger.exception("prefill of %d prompts together failed: one by one", len(group))
            for item in group:
                self._prefill_group([item], failed)
            return
        elapsed = time.perf_counter() - started
        reused = getattr(self.sequences, "last_reused", {})
        for (job, ids), row in zip(group, logits, strict=True):
            job.prompt_ids, job.reused_ids = len(ids), reused.get(job.key, 0)
            job.logits = row
            job.timings.add("prefill", elapsed)
            job.decoder_state = self.reply_decoder.new_stream()
        logger.debug("prefilled %s prompt ids", [len(ids) for _, ids in group])

    def sample(self, jobs: Sequence[Job]) -> list[int]:
        """The next id of every job, from its logits, in one batched draw."""
        logits = torch.stack([job.logits for job in jobs])  # type: ignore[misc]  # (B, V)
        phases = [self.constraints.phase(len(job.generated)) for job in jobs]
        logits = self.masks.apply(logits, phases)
        tokens = sample_nucleus(
            logits, self.sampling.temperature, self.sampling.top_p, self._generator
        )
        return [int(t) for t in tokens.tolist()]

    def step(self, jobs: Sequence[Job], tokens: Sequence[int]) -> None:
        """Feed each job its sampled id, all in one batched LM step; sets their next logits."""
        logits = self.sequences.step([job.key for job in jobs], tokens)
        for row, job in enumerate(jobs):
            job.logits = logits[row]

    def release(self, job: Job) -> None:
        self.sequences.release(job.key)

    def decode_audio(self, job: Job, codes: list[int], final: bool) -> np.ndarray:
        return self.reply_decoder.decode(job.decoder_state, codes, final)

    def decode_audio_many(self, blocks: Sequence[AudioBlock]) -> list[np.ndarray]:
        """Speech of each block (one per job), in batched decoder calls if enabled."""
        requests = [(block.job.decoder_state, block.codes, block.final) for block in blocks]
        return self.reply_decoder.decode_many(requests, batched=self.batch_decoder)

    # ------------------------------------------------------------------ warm-up

    def warm_up(self, max_batch: int) -> dict[str, float]:
        """Every stage once on a synthetic turn: speech tokenizer (one-shot and streaming),
        prefill (of a spoken and a typed turn: a cache that keeps prefixes then holds both
        system prompts), sampling, LM steps at each batch size the LM batch warms, one
        decoder block per warm-up stream. Uses its own keys, streams and generator: no reply's state and
        no sampling stream is touched. Returns seconds per stage."""
        stages: dict[str, float] = {}
        with _timed(stages, "speech_tokenizer"):
            codes = self._warm_speech_tokenizer()
        prompt = build_prompt("", audio_tokens_text(codes), "audio")
        self._warm_lm(self.tokenizer.encode(prompt), max_batch, stages)
        with _timed(stages, "prefill"):  # where kept, both system prompts' keys/values stay
            key = ("warm-up", "text")
            self.sequences.prefill(key, self.tokenizer.encode(build_prompt("", "hello", "text")))
            self.sequences.release(key)
        with _timed(stages, "decoder"):
            self._warm_decoder(max_batch)
        return stages

    def _warm_speech_tokenizer(self) -> list[int]:
        speech = warm_up_speech()
        codes = self.speech_tokenizer.tokenize(speech)
        stream = self.speech_tokenizer.streaming()
        stream.push(speech)
        stream.finish()
        return codes

    def _warm_lm(self, prompt_ids: list[int], max_batch: int, stages: dict[str, float]) -> None:
        sizes = self.sequences.warmup_batch_sizes(max_batch)
        keys = [("warm-up", index) for index in range(max(sizes))]
        generator = torch.Generator(device=self.masks.table.device).manual_seed(0)
        try:
            with _timed(stages, "prefill"):
                logits = torch.stack([self.sequences.prefill(key, prompt_ids) for key in keys])
            for size in sizes:
                for _ in range(WARM_UP_STEPS):
                    with _timed(stages, "sampling"):
                        masked = self.masks.apply(logits[:size], ["any"] * size)
                        tokens = sample_nucleus(
                            masked, self.sampling.temperature, self.sampling.top_p, generator
                        )
                    with _timed(stages, "lm_step"):
                        logits[:size] = self.sequences.step(keys[:size], tokens.tolist())
        finally:
            for key in keys:
                self.sequences.release(key)
        logger.debug("warmed LM steps at batch sizes %s", sizes)

    def _warm_decoder(self, max_batch: int) -> None:
        """One block per warm-up stream; where the decoder replays CUDA graphs, a whole short
        answer alone and in every batch bucket up to `max_batch` streams, so the graphs of
        the first, second and later blocks are recorded before a conversation needs them.
        The answer decoded alone is long enough for the stream to reach its steady state
        (the encoder's per-stream graphs, one per cache size, serve every batch)."""
        block = self.block_tokens or 10
        decoder = self.reply_decoder.decoder
        graphs = getattr(decoder, "uses_cuda_graphs", False)
        blocks = WARM_UP_GRAPH_BLOCKS if graphs else 1
        alone = max(blocks, getattr(decoder, "steady_after_blocks", 0) + 1) if graphs else 1
        codes = [(7 * index) % 4096 for index in range(alone * block)]
        together = WARM_UP_STREAMS if self.batch_decoder else 1
        batches = [together]
        if graphs:
            limit = min(max_batch, self.max_sequences or max_batch, WARM_UP_GRAPH_STREAMS)
            batches = [1]
            while self.batch_decoder and batches[-1] < limit:
                batches.append(min(2 * batches[-1], limit))
        for streams in batches:
            states = [self.reply_decoder.new_stream() for _ in range(streams)]
            n_blocks = alone if streams == 1 else blocks
            for index in range(n_blocks):
                part = codes[index * block : (index + 1) * block]
                final = index == n_blocks - 1
                requests = [(state, part, final) for state in states]
                self.reply_decoder.decode_many(requests, batched=self.batch_decoder)


def _context_ids(sequences: SequenceBatch) -> int | None:
    """The ids one sequence may hold: the static cache's columns, else the LM's positions."""
    config = getattr(sequences, "config", None)
    if isinstance(config, StaticCacheConfig):
        return config.max_len
    model = getattr(getattr(sequences, "stepper", None), "model", None)
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return positions if isinstance(positions, int) else None


def _prefill_groups(
    prepared: list[tuple[Job, list[int]]], budget: int
) -> list[list[tuple[Job, list[int]]]]:
    """Prompts in arrival order, cut into groups whose padded size (rows x longest prompt)
    stays within `budget` (a longer prompt goes alone)."""
    groups: list[list[tuple[Job, list[int]]]] = []
    for item in prepared:
        current = groups[-1] if groups else None
        if current is not None:
            longest = max(len(item[1]), *(len(ids) for _, ids in current))
            if longest * (len(current) + 1) <= budget:
                current.append(item)
                continue
        groups.append([item])
    return groups


def _sequence_batch(stepper: LMStepper, options: LoadOptions) -> SequenceBatch:
    """The cache and step that `options.decode_step` resolves to."""
    return make_sequence_batch(stepper, options.resolved_decode_step, options.static_cache)


def make_sequence_batch(
    stepper: LMStepper, decode_step: DecodeStep, static_cache: StaticCacheConfig | None = None
) -> SequenceBatch:
    """A dynamic-cache batch, or a static-cache one whose step runs plainly, as recorded CUDA
    graphs or compiled; falls back to the dynamic cache when the static one does not fit."""
    if decode_step == "auto":
        decode_step = "graphs" if stepper.device.type == "cuda" else "static"
    if decode_step == "dynamic":
        return KVCacheBatch(stepper)
    static_cache = static_cache or StaticCacheConfig()
    try:
        static = StaticKVBatch(stepper, static_cache)
    except torch.OutOfMemoryError:
        logger.warning(
            "no memory for a static KV cache of %s: decoding with the dynamic cache", static_cache
        )
        return KVCacheBatch(stepper)
    if decode_step == "graphs":
        static.record_graphs()
    elif decode_step == "compile":
        static.compile_step()
    return static


def _load_decoder(paths: ModelPaths, options: LoadOptions) -> AudioDecoder | StreamingDecoder:
    if options.decoder_mode == "reference":
        return AudioDecoder.from_pretrained(
            paths.decoder, device=options.device, dtype=options.decoder_dtype
        )
    return StreamingDecoder.from_pretrained(
        paths.decoder, device=options.device, dtype=options.decoder_dtype, config=options.streaming
    )


__all__ = [
    "DECODE_STEPS",
    "DecodeStep",
    "DecoderMode",
    "GLM4VoiceBrain",
    "ListenStats",
    "LoadOptions",
    "ReplyDecoder",
    "default_lm_dtype",
    "make_sequence_batch",
]
