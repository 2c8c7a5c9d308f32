"""The model worker: one thread that owns the GLM-4-Voice models and serves every conversation.

Sessions never touch torch. Each reply becomes a `Job`; each round the worker

1. feeds the speech of turns still being spoken to the streaming speech tokenizer,
2. starts new jobs (finish tokenizing the turn, build the prompt, prefill),
3. samples the next id of every runnable job in one draw, streams text deltas, decodes the audio
   blocks completed in this round (the blocks of all jobs together, so the decoder can batch
   them), and
4. advances all of them with ONE batched LM step.

Blocks of replies that are not in step complete in different rounds. So that they can still
share decoder calls, a later block of the streaming decoder may be held back for a few rounds
(`BlockHold`) while its reply has enough audio ahead of playback and other replies are
generating: it is decoded with the next block another reply completes.

Before the first round the worker can warm every stage up on a synthetic turn, so that the
first conversation does not pay for first-call costs (allocations, kernel selection, lazy
initialisation, compiled graphs).

With `overlap_decoder`, decoder calls run on a second thread (`DecoderLane`; on CUDA, on a
stream of their own) while the LM goes on stepping: one call at a time, fed with every block
completed since the previous call was handed over, so that a block's decoding no longer holds
up every reply's next LM step. A reply's blocks still decode in order, one call after another.
A call that holds a reply's first block runs alone, the LM waiting, as without the lane: first
audio matters more than throughput, and the two threads would slow each other down.

A cancelled job stops at the next check: between LM steps and between decoder blocks. A job
whose audio is far ahead of playback sits out rounds until the listener catches up, which bounds
the memory a reply holds and the work wasted on an answer that gets interrupted.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from agent import metrics
from agent.engine import AudioChunk, ReplyEvent, StageTimings, TextDelta

logger = logging.getLogger(__name__)

AUDIO_TOKEN_S = 0.08  # one speech token is 80 ms of audio (12.5 tokens/s)
USER_RATE = 16_000
MAX_LISTEN_S = 300.0  # speech a listener buffers; the rest of a longer turn waits for its end

_job_ids = itertools.count(1)


class TextStream(Protocol):
    """Generated ids -> text deltas (see `models.lm.TextStreamDecoder`)."""

    def push(self, token_id: int) -> str: ...
    def flush(self) -> str: ...


class SpeechBrain(Protocol):
    """What the worker needs from the loaded models (see `models.glm4voice.brain`)."""

    sample_rate: int
    # The decoder's own block size when it streams blocks itself: each block is decoded as
    # soon as it is full. None: the engine's `DecodeSchedule` and the reference's rule apply.
    block_tokens: int | None
    # Jobs that can hold LM state at once (None: no limit); later ones wait to be started.
    max_sequences: int | None

    def listen(self, listener: TurnListener, samples: np.ndarray) -> None:
        """Tokenize more speech of a turn still being spoken (state in `listener.state`)."""

    def start_jobs(self, jobs: Sequence[Job]) -> list[BaseException | None]:
        """Tokenize each user's turn, build and prefill the prompts (together where the
        model can); sets each `job.logits`. Returns each job's error, None when started."""
        ...

    def sample(self, jobs: Sequence[Job]) -> list[int]:
        """The next id of each job from its current logits."""
        ...

    def step(self, jobs: Sequence[Job], tokens: Sequence[int]) -> None:
        """Append each job's id in one batched LM step; sets each `job.logits`."""

    def release(self, job: Job) -> None:
        """Free the LM state of a finished job."""

    def decode_audio_many(self, blocks: Sequence[AudioBlock]) -> list[np.ndarray]:
        """Speech (float32 at `sample_rate`) for each block, in order; blocks of different
        jobs that became ready in the same round (at most one block per job)."""
        ...

    def warm_up(self, max_batch: int) -> dict[str, float]:
        """Run every stage once on a synthetic turn, touching no job's state and no sampling
        stream; LM steps use the batch sizes up to `max_batch` that need their own warm-up.
        Returns the seconds spent per stage."""
        ...

    def text_stream(self) -> TextStream: ...

    def is_audio(self, token_id: int) -> bool: ...

    def audio_code(self, token_id: int) -> int: ...

    def is_stop(self, token_id: int) -> bool: ...

    def decode_text(self, token_ids: list[int]) -> str: ...


@dataclass
class DecodeSchedule:
    """Audio-token block sizes: a small first block for latency, then larger ones."""

    first_block: int = 10
    later_block: int = 20

    def size(self, blocks_done: int) -> int:
        return self.first_block if blocks_done == 0 else self.later_block


@dataclass(eq=False)
class AudioBlock:
    """Audio codes of one job ready to be decoded; `final` flushes the job's decoder.

    `held_rounds`: rounds it has waited for other replies' blocks; `urgent`: it must not wait
    (it holds more than one block)."""

    job: Job
    codes: list[int]
    final: bool
    held_rounds: int = 0
    urgent: bool = False


@dataclass(frozen=True)
class BlockHold:
    """When a streaming decoder's block may wait to share a decoder call with other replies'
    blocks: never the first or the final block of a reply, only while the reply has at least
    `min_ahead_s` of audio ahead of playback and other replies are generating, and for at
    most `max_rounds` rounds (one LM step each)."""

    min_ahead_s: float = 1.0
    max_rounds: int = 10

    def __post_init__(self) -> None:
        if self.min_ahead_s < 0 or self.max_rounds < 0:
            raise ValueError("need min_ahead_s >= 0 and max_rounds >= 0")


@dataclass(frozen=True)
class WarmUpReport:
    """What the start-up warm-up ran: seconds per stage, and in all."""

    stages: dict[str, float]
    total_s: float


class TurnListener:
    """A user turn while it is spoken: audio pushed from the event loop, tokenized on the worker.

    Audio is handed to the tokenizer only once it is `lag_samples` old, so the end of the
    speech, which the endpointer may still cut off, is not tokenized before the turn is known.
    """

    def __init__(self, worker: ModelWorker, lag_samples: int) -> None:
        self._worker = worker
        self._lag = lag_samples
        self._lock = threading.Lock()
        self._audio = np.zeros(USER_RATE * 8, dtype=np.float32)
        self._received = 0
        self._fed = 0
        self.queued = False  # guarded by the worker's lock
        self.closed = False
        self.state: Any = None  # the worker's streaming tokenizer for this turn
        self.failed = False

    @property
    def received_samples(self) -> int:
        return self._received

    def push(self, samples: np.ndarray) -> None:
        """Append 16 kHz mono float32 speech; never blocks on model work."""
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        if self.closed or self.failed:
            return
        with self._lock:
            end = self._received + len(samples)
            if end > MAX_LISTEN_S * USER_RATE:
                logger.warning("a turn over %.0f s: its rest is tokenized at its end", MAX_LISTEN_S)
                self.failed = True
                return
            if end > len(self._audio):
                grown = np.zeros(max(end, 2 * len(self._audio)), dtype=np.float32)
                grown[: self._received] = self._audio[: self._received]
                self._audio = grown
            self._audio[self._received : end] = samples
            self._received = end
        if self._received - self._lag > self._fed:
            self._worker.post(self)

    def close(self) -> None:
        """The speech was not answered: stop tokenizing it."""
        self.closed = True
        self.state = None

    def take_ready(self) -> np.ndarray:
        """(worker) Audio old enough to tokenize that was not handed over yet."""
        with self._lock:
            end = max(self._fed, self._received - self._lag)
            ready = self._audio[self._fed : end].copy()
            self._fed = end
        return ready

    def fed_audio(self) -> np.ndarray:
        """(worker) Everything handed to the tokenizer so far."""
        with self._lock:
            return self._audio[: self._fed].copy()


@dataclass(eq=False)  # a reply is itself: equal fields (numpy audio among them) do not matter
class Job:
    """One reply in progress; everything here belongs to the worker thread once submitted.

    Stage timings (seconds): `speech_tokenizer` (what is left at the end of the turn),
    `prefill`, `lm_until_first_block` (sampling until the first audio block is complete),
    `first_decoder_block`, `decoder` (all blocks) and `first_audio` (job taken -> first chunk).
    """

    turn_audio: np.ndarray | None
    turn_text: str | None
    history_prefix: str
    emit: Callable[[ReplyEvent | BaseException | None], None]
    max_new_tokens: int
    max_ahead_s: float
    resume_margin_s: float = 0.0  # a paused job resumes below max_ahead_s - this
    schedule: DecodeSchedule = field(default_factory=DecodeSchedule)
    listener: TurnListener | None = None
    key: int = field(default_factory=lambda: next(_job_ids))
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    timings: StageTimings = field(default_factory=StageTimings)
    # filled by the worker
    prompt: str = ""
    prompt_ids: int = 0  # ids of the prompt
    reused_ids: int = 0  # of which keys/values were kept from the conversation's last turn
    started: bool = False
    logits: Any = None  # next-token logits [V]
    decoder_state: object = None
    text: TextStream | None = None
    generated: list[int] = field(default_factory=list)
    pending_codes: list[int] = field(default_factory=list)
    blocks_done: int = 0  # blocks decoded and delivered
    blocks_queued: int = 0  # blocks handed to the decoder queue (some may not be done yet)
    lm_released: bool = False  # its LM state was given back (it may still await its audio)
    audio_tokens_decoded: int = 0
    audio_samples_emitted: int = 0
    consumed_s: float = 0.0  # written by the consumer: seconds of audio handed to playback
    started_at: float = 0.0
    decoding_since: float = 0.0  # when the prompt was prefilled and sampling began
    first_audio_at: float | None = None
    done: bool = False
    paused: bool = False  # waiting for its listener to catch up


@dataclass
class DecodedCall:
    """What one decoder call of the lane gave: a speech array per block, or the error."""

    blocks: list[AudioBlock]
    speeches: list[np.ndarray] | None
    error: BaseException | None
    started: float
    elapsed: float


class DecoderLane:
    """Decoder calls on a thread of their own, one at a time, so that the LM thread steps on
    while blocks decode. On CUDA the calls run on a stream of their own, so the GPU can
    overlap them with the LM's kernels.

    Only the worker thread calls `submit`, `poll` and `close`. On the lane's thread, when a
    call has succeeded, `deliver` streams its audio at once (not a round later); then
    `on_done` tells the worker to collect the call (its bookkeeping: replies that ended, or
    the error)."""

    def __init__(
        self,
        decode: Callable[[Sequence[AudioBlock]], list[np.ndarray]],
        deliver: Callable[[DecodedCall], None],
        on_done: Callable[[], None],
        device: object = None,
    ) -> None:
        self._decode = decode
        self._deliver = deliver
        self._on_done = on_done
        self._device = device
        self._requests: queue.Queue[tuple[list[AudioBlock], float] | None] = queue.Queue(1)
        self._results: queue.Queue[DecodedCall] = queue.Queue(1)
        self.in_flight: list[AudioBlock] = []  # the blocks of the call under way
        self._thread = threading.Thread(target=self._run, name="glm4voice-decoder", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        return bool(self.in_flight)

    @property
    def decodes_a_first_block(self) -> bool:
        """Whether the call under way decodes the first block of a reply."""
        return any(block.job.blocks_done == 0 for block in self.in_flight)

    def holds(self, job: Job) -> bool:
        """Whether a block of `job` is being decoded."""
        return any(block.job is job for block in self.in_flight)

    def submit(self, blocks: list[AudioBlock]) -> None:
        if self.busy:
            raise RuntimeError("the decoder lane takes one call at a time")
        self.in_flight = list(blocks)
        self._requests.put((self.in_flight, time.perf_counter()))

    def poll(self, timeout: float | None = 0.0) -> DecodedCall | None:
        """The finished call, if any (waiting up to `timeout` s; None waits for it)."""
        if not self.busy:
            return None
        try:
            done = self._results.get(block=timeout != 0, timeout=timeout)
        except queue.Empty:
            return None
        self.in_flight = []
        return done

    def close(self, timeout: float = 30.0) -> None:
        """Stop the thread once the call under way (if any) has finished."""
        self.poll(timeout=timeout)
        self._requests.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        import torch

        stream = None
        device = self._device
        if device is not None and torch.device(device).type == "cuda":  # type: ignore[arg-type]
            stream = torch.cuda.Stream(device=device)  # type: ignore[arg-type]
        with torch.inference_mode(), torch.cuda.stream(stream) if stream else nullcontext():
            while (request := self._requests.get()) is not None:
                blocks, started = request
                speeches, error = None, None
                try:
                    speeches = self._decode(blocks)
                except Exception as exc:  # handed to the worker, which ends these replies
                    error = exc
                elapsed = time.perf_counter() - started
                call = DecodedCall(blocks, speeches, error, started, elapsed)
                if error is None:
                    try:
                        self._deliver(call)
                    except Exception as exc:
                        logger.exception("streaming decoded audio failed")
                        call.error = exc
                self._results.put(call)
                self._on_done()


class ModelWorker:
    """Runs jobs on one thread, one batched LM step per round; `submit` is safe from any thread."""

    def __init__(
        self,
        brain: SpeechBrain,
        max_jobs: int = 64,
        warm_up: bool = False,
        hold: BlockHold | None = None,
        overlap_decoder: bool = False,
    ) -> None:
        """`warm_up`: run `brain.warm_up` on the thread before serving; `ready` is set once
        the worker serves (after the warm-up, whether it succeeded or not). `hold`: let later
        blocks wait for other replies' blocks (None: every block is decoded in its round).
        `overlap_decoder`: decode on a `DecoderLane` while the LM steps on (with a decoder
        that streams its own blocks: `brain.block_tokens` set)."""
        self.brain = brain
        self._max_jobs = max_jobs
        self._warm_up = warm_up
        self.overlap_decoder = overlap_decoder  # may be changed between rounds
        self._lane: DecoderLane | None = None
        # Jobs to finish (with their error) once the lane's call that holds a block of theirs
        # returns: the decoder may not be working on a stream that is being released.
        self._deferred: dict[int, tuple[Job, BaseException | None]] = {}
        self.hold = hold  # may be changed between rounds
        self.ready = threading.Event()
        self.warm_up_report: WarmUpReport | None = None
        self._blocks: dict[int, AudioBlock] = {}  # job key -> its block waiting for the decoder
        self._inbox: queue.Queue[Job] = queue.Queue(maxsize=max_jobs)
        self._active: list[Job] = []
        self._listen_lock = threading.Lock()
        self._listening: deque[TurnListener] = deque()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="glm4voice-worker", daemon=True)
        self.steps = 0  # LM steps (one per round, whatever the batch size)
        self.rounds_batch_sizes: deque[int] = deque(maxlen=1000)
        self.decode_batch_sizes: deque[int] = deque(maxlen=1000)  # blocks per decoder call
        self.decoder_s = 0.0  # seconds spent in decoder calls

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("model worker did not stop within %.0f s", timeout)

    def submit(self, job: Job) -> None:
        """Queue a job; raises queue.Full when the worker is saturated."""
        self._inbox.put_nowait(job)
        self._wake.set()

    def post(self, listener: TurnListener) -> None:
        """Schedule tokenization of a listener's new audio (at most one entry per listener)."""
        with self._listen_lock:
            if listener.queued:
                return
            listener.queued = True
            self._listening.append(listener)
        self._wake.set()

    def wake(self) -> None:
        """Tell the worker that a job changed (cancelled, or its listener caught up)."""
        self._wake.set()

    @property
    def active_jobs(self) -> int:
        return len(self._active) + self._inbox.qsize()

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        import torch

        logger.info("model worker started")
        try:
            with torch.inference_mode():
                try:
                    if self._warm_up:
                        self._run_warm_up()
                finally:
                    self.ready.set()
                while not self._stopping.is_set():
                    if not self._guarded_round():
                        self._wake.wait(timeout=0.05)
                        self._wake.clear()
        finally:
            stopped = RuntimeError("the model worker stopped")
            if self._lane is not None:
                lane, self._lane = self._lane, None
                lane.close()  # after the call under way: its replies end below
                deferred, self._deferred = list(self._deferred.values()), {}
                for job, error in deferred:
                    self._finish(job, error=error)
            for job in self._active + self._drain_inbox():
                self._finish(job, error=stopped)
            logger.info("model worker stopped")

    def _run_warm_up(self) -> None:
        """Warm every stage up; a failure only costs the first replies their speed."""
        started = time.perf_counter()
        try:
            stages = self.brain.warm_up(self._max_jobs)
        except Exception:
            logger.exception("warm-up failed: the first replies may be slow")
            return
        report = WarmUpReport(dict(stages), time.perf_counter() - started)
        self.warm_up_report = report
        detail = ", ".join(f"{name} {1e3 * s:.0f} ms" for name, s in report.stages.items())
        logger.info("warm-up took %.2f s (%s)", report.total_s, detail)

    def _drain_inbox(self) -> list[Job]:
        jobs = []
        while True:
            try:
                jobs.append(self._inbox.get_nowait())
            except queue.Empty:
                return jobs

    def _guarded_round(self) -> bool:
        """`_round`, surviving its failure: the replies in flight end with the error (their
        state may be half updated) and the worker goes on serving the next ones."""
        try:
            return self._round()
        except Exception as exc:
            logger.exception(
                "a worker round failed: ending the %d replies in flight", len(self._active)
            )
            self._blocks.clear()
            for job in list(self._active):
                self._abandon(job, exc)
            return False

    def _abandon(self, job: Job, error: BaseException) -> None:
        """End `job` with `error` even if its regular ending fails."""
        try:
            self._finish(job, error=error)
        except Exception:
            logger.exception("ending a failed reply failed too")
            self._active = [j for j in self._active if j is not job]
            job.emit(error)
            job.emit(None)
            job.finished.set()

    def _round(self) -> bool:
        """Listen, start, then one step for every runnable job; False when nothing could run."""
        worked = self._serve_listeners()
        worked = self._collect_decoded() or worked
        self._sync_lane()
        for job in self._drain_inbox():
            job.started_at = time.perf_counter()
            self._active.append(job)
        for job in [j for j in self._active if j.cancelled.is_set()]:
            self._finish(job)
        worked = self._start_waiting() or worked
        runnable = [
            j
            for j in self._active
            if j.started
            and not j.done
            and not self._too_far_ahead(j)
            and not self._decoder_behind(j)
        ]
        metrics.QUEUE_DEPTH.labels(queue="engine_replies_active").set(len(self._active))
        metrics.QUEUE_DEPTH.labels(queue="decoder_blocks_waiting").set(len(self._blocks))
        if runnable:
            self._step(runnable)
            worked = True
        elif self._blocks and (self._lane is None or not self._lane.busy):
            # blocks that waited for the lane (it may have been stopped since); nothing steps
            self._decode_ready_blocks(0)
            for job in [j for j in self._active if j.done and not self._awaits_decoder(j)]:
                self._finish(job)
            worked = True
        return worked

    def _start_waiting(self) -> bool:
        """Start jobs in arrival order while the brain has room for their LM state, all that
        can start in one call (their prompts are prefilled together); True when any start
        was tried."""
        limit = self.brain.max_sequences
        running = sum(1 for job in self._active if job.started and not job.lm_released)
        waiting = [j for j in self._active if not j.started]
        if limit is not None:
            waiting = waiting[: max(0, limit - running)]
        if not waiting:
            return False
        started = time.perf_counter()
        try:
            errors = self.brain.start_jobs(waiting)
        except Exception as exc:  # a failure outside any one job: none of them started
            logger.exception("replies could not start")
            errors = [exc] * len(waiting)
        metrics.MODEL_STEP_SECONDS.labels(stage="prefill").observe(time.perf_counter() - started)
        now = time.perf_counter()
        for job, error in zip(waiting, errors, strict=True):
            if error is not None:
                job.prompt = ""  # not answered: the turn leaves nothing in the history
                self._finish(job, error=error)
                continue
            metrics.PROMPT_IDS_TOTAL.labels(source="reused").inc(job.reused_ids)
            metrics.PROMPT_IDS_TOTAL.labels(source="prefilled").inc(job.prompt_ids - job.reused_ids)
            job.text = self.brain.text_stream()
            job.started = True
            job.decoding_since = now
        return True

    def _serve_listeners(self) -> bool:
        with self._listen_lock:
            listeners = list(self._listening)
            self._listening.clear()
            for listener in listeners:
                listener.queued = False
        for listener in listeners:
            samples = listener.take_ready()
            if listener.closed or listener.failed or samples.size == 0:
                continue
            try:
                self.brain.listen(listener, samples)
            except Exception:
                if not listener.closed:  # else its state went away under the tokenizer
                    logger.exception("streaming speech tokenization failed; the turn is redone")
                    listener.failed = True
                listener.state = None
            if listener.closed:  # closed while tokenized: drop the state the brain just set
                listener.state = None
        return bool(listeners)

    def _guarded(self, job: Job, work: Callable[[Job], None]) -> None:
        """Run one unit of a job; a failure ends that job only."""
        try:
            work(job)
        except Exception as exc:
            logger.exception("reply failed")
            self._finish(job, error=exc)

    def _too_far_ahead(self, job: Job) -> bool:
        """Pause above max_ahead_s of unplayed audio, resume below max_ahead_s - margin: the
        hysteresis makes a reply leave and rejoin the LM batch once per margin of audio, not
        once per chunk played."""
        ahead_s = job.audio_samples_emitted / self.brain.sample_rate - job.consumed_s
        limit = job.max_ahead_s - job.resume_margin_s if job.paused else job.max_ahead_s
        job.paused = ahead_s > limit
        return job.paused

    def _sync_lane(self) -> None:
        """Start or stop the decoder lane as `overlap_decoder` asks (it stops between calls).
        Not for the reference decoder: blocks that complete while a call is under way are
        merged, and that decoder's audio depends on where its blocks begin."""
        wanted = self.overlap_decoder and self.brain.block_tokens is not None
        if wanted and self._lane is None:
            device = getattr(self.brain, "decoder_device", None)
            self._lane = DecoderLane(
                self.brain.decode_audio_many, self._deliver_call, self._wake.set, device
            )
        elif not wanted and self._lane is not None and not self._lane.busy:
            lane, self._lane = self._lane, None
            lane.close()

    def _decoder_behind(self, job: Job) -> bool:
        """With a lane: two blocks of the job's codes wait for the decoder, so the reply sits
        out LM rounds until they are handed over (the LM may run ahead of the decoder by
        that much, no further: calls stay short, and their audio comes out block by block)."""
        if self._lane is None:
            return False
        waiting = self._blocks.get(job.key)
        limit = 2 * (self.brain.block_tokens or 1)
        return waiting is not None and len(waiting.codes) >= limit

    def _release_lm(self, job: Job) -> None:
        """Give the job's LM state back (once): its row can take another reply."""
        if job.lm_released:
            return
        job.lm_released = True
        try:
            self.brain.release(job)
        except Exception:
            logger.exception("releasing a reply's model state failed")

    def _finish(self, job: Job, error: BaseException | None = None) -> None:
        if job in self._active:
            self._active.remove(job)
        self._blocks.pop(job.key, None)
        self._release_lm(job)
        if self._lane is not None and self._lane.holds(job):
            # the lane is decoding a block of it: end it once that call returns
            self._deferred.setdefault(job.key, (job, error))
            return
        job.logits = None
        job.decoder_state = None
        if job.listener is not None:
            job.listener.close()
        if error is not None:
            job.emit(error)
        job.emit(None)
        job.finished.set()

    # ------------------------------------------------------------------ one step

    def _step(self, jobs: list[Job]) -> None:
        try:
            tokens = self.brain.sample(jobs)
        except Exception as exc:
            self._fail_all(jobs, exc)
            return
        stepped: list[tuple[Job, int]] = []
        for job, token in zip(jobs, tokens, strict=True):
            if job.cancelled.is_set():
                self._finish(job)
                continue
            self._guarded(job, lambda j, t=token: self._on_token(j, t))
            if job in self._active:
                stepped.append((job, token))
        self._decode_ready_blocks(len(stepped))
        continuing: list[tuple[Job, int]] = []
        for job, token in stepped:
            if job not in self._active:
                continue  # its decoder block failed
            if job.done:
                if self._awaits_decoder(job):  # finished once its last block is decoded
                    self._release_lm(job)
                else:
                    self._finish(job)
            else:
                continuing.append((job, token))
        if continuing:
            started = time.perf_counter()
            self._advance([j for j, _ in continuing], [t for _, t in continuing])
            metrics.MODEL_STEP_SECONDS.labels(stage="lm_step").observe(
                time.perf_counter() - started
            )

    def _advance(self, jobs: list[Job], tokens: list[int]) -> None:
        try:
            self.brain.step(jobs, tokens)
        except Exception as exc:
            self._fail_all(jobs, exc)
            return
        self.steps += 1
        self.rounds_batch_sizes.append(len(jobs))

    def _fail_all(self, jobs: list[Job], exc: Exception) -> None:
        logger.exception("a batched model call failed; ending its %d replies", len(jobs))
        for job in jobs:
            self._finish(job, error=exc)

    def _on_token(self, job: Job, token: int) -> None:
        job.generated.append(token)
        if self.brain.is_stop(token):
            self._end_of_answer(job)
            return
        if self.brain.is_audio(token):
            self._on_audio_token(job, self.brain.audio_code(token))
        else:
            self._emit_text(job, job.text.push(token) if job.text else "")
        if len(job.generated) >= job.max_new_tokens:
            self._end_of_answer(job)

    def _emit_text(self, job: Job, text: str) -> None:
        if text:
            job.emit(TextDelta(text))

    def _on_audio_token(self, job: Job, code: int) -> None:
        if self.brain.block_tokens is not None:
            job.pending_codes.append(code)
            if len(job.pending_codes) >= self.brain.block_tokens:
                self._decode_pending(job, final=False)
            return
        # Reference rule: a full block is decoded when the next audio token arrives, so the
        # final block is never empty and the held-back cross-fade tail is flushed at the end.
        if len(job.pending_codes) >= job.schedule.size(job.blocks_done):
            self._decode_pending(job, final=False)
        job.pending_codes.append(code)

    def _end_of_answer(self, job: Job) -> None:
        if job.text is not None:
            self._emit_text(job, job.text.flush())
        if job.pending_codes or (self.brain.block_tokens is not None and job.blocks_queued):
            self._decode_pending(job, final=True)
        job.done = True

    def _decode_pending(self, job: Job, final: bool) -> None:
        """Queue the job's pending codes; blocks are decoded together at the round's end. A
        job whose previous block is still waiting adds to it, which then waits no more."""
        codes, job.pending_codes = job.pending_codes, []
        waiting = self._blocks.get(job.key)
        if waiting is not None:
            waiting.codes += codes
            waiting.final = final
            waiting.urgent = True
            return
        self._blocks[job.key] = AudioBlock(job, codes, final)
        job.blocks_queued += 1

    def _decode_ready_blocks(self, runnable: int) -> None:
        """Decode the queued blocks in one call and stream their audio, unless the only one
        may wait for another reply's block (`BlockHold`); `runnable`: jobs in this step."""
        blocks = [block for block in self._blocks.values() if block.job in self._active]
        if not blocks:
            self._blocks.clear()
            return
        if self._lane is not None and self._lane.busy:
            return  # they join the call after the one under way
        if len(blocks) == 1 and self._may_wait(blocks[0], runnable):
            blocks[0].held_rounds += 1
            return
        self._blocks.clear()
        if self._lane is not None:
            self._lane.submit(blocks)
            if self._lane.decodes_a_first_block:  # a reply's first audio: the LM waits
                self._collect_decoded(wait=True)
            return
        started = time.perf_counter()
        try:
            speeches = self.brain.decode_audio_many(blocks)
            elapsed = time.perf_counter() - started
            self._deliver_call(DecodedCall(blocks, speeches, None, started, elapsed))
        except Exception as exc:  # the replies of this call end; the others go on
            self._fail_all([block.job for block in blocks if block.job in self._active], exc)

    def _deliver_call(self, call: DecodedCall) -> None:
        """Stream the audio of a successful decoder call (on the lane's thread with a lane:
        a cancelled reply gets none)."""
        metrics.MODEL_STEP_SECONDS.labels(stage="decoder_block").observe(call.elapsed)
        self.decoder_s += call.elapsed
        self.decode_batch_sizes.append(len(call.blocks))
        assert call.speeches is not None
        for block, speech in zip(call.blocks, call.speeches, strict=True):
            if not block.job.cancelled.is_set():
                self._deliver_block(block, speech, call.started, call.elapsed)

    def _collect_decoded(self, wait: bool = False) -> bool:
        """The bookkeeping of the lane's finished call (its audio has gone out already):
        replies that ended with it, or its error; False when no call finished (`wait`: until
        the call under way finishes)."""
        call = self._lane.poll(timeout=None if wait else 0.0) if self._lane is not None else None
        if call is None:
            return False
        if call.error is not None:
            logger.error(
                "a decoder call failed; ending its %d replies",
                len(call.blocks),
                exc_info=call.error,
            )
        for block in call.blocks:
            job = block.job
            deferred = self._deferred.pop(job.key, None)
            if deferred is not None:
                self._finish(job, error=deferred[1])
            elif job not in self._active:
                continue
            elif call.error is not None:
                self._finish(job, error=call.error)
            elif job.done and not self._awaits_decoder(job):
                self._finish(job)
        return True

    def _awaits_decoder(self, job: Job) -> bool:
        """Whether a block of `job` waits for the decoder or is being decoded."""
        return job.key in self._blocks or (self._lane is not None and self._lane.holds(job))

    def _may_wait(self, block: AudioBlock, runnable: int) -> bool:
        hold = self.hold
        if hold is None or self.brain.block_tokens is None or runnable < 2:
            return False  # no policy, a decoder that does not batch, or nobody to wait for
        job = block.job
        if block.urgent or block.final or job.blocks_done == 0:
            return False
        ahead_s = job.audio_samples_emitted / self.brain.sample_rate - job.consumed_s
        return ahead_s >= hold.min_ahead_s and block.held_rounds < hold.max_rounds

    def _deliver_block(
        self, block: AudioBlock, speech: np.ndarray, started: float, elapsed: float
    ) -> None:
        job = block.job
        job.timings.add("decoder", elapsed)
        if job.blocks_done == 0:
            job.timings.add("lm_until_first_block", started - job.decoding_since)
            job.timings.add("first_decoder_block", elapsed)
        job.blocks_done += 1
        job.audio_tokens_decoded += len(block.codes)
        if speech.size == 0:
            return
        if job.first_audio_at is None:
            job.first_audio_at = time.perf_counter()
            job.timings.add("first_audio", job.first_audio_at - job.started_at)
        job.audio_samples_emitted += len(speech)
        job.emit(AudioChunk(np.ascontiguousarray(speech, dtype=np.float32), self.brain.sample_rate))
