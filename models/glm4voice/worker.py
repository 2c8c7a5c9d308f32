"""The model worker: one thread that owns the GLM-4-Voice models and serves every conversation.

Sessions never touch torch. Each reply becomes a `Job`; the worker advances every active job by
one unit of work per round (tokenize + prefill, one LM step, one decoder block), so
conversations share the models fairly, and a cancelled job stops within one unit. A job whose
audio is far ahead of playback is skipped until the listener catches up, which bounds the
memory a reply holds and the work wasted on an answer that gets interrupted.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from agent.engine import AudioChunk, ReplyEvent, StageTimings, TextDelta

logger = logging.getLogger(__name__)

AUDIO_TOKEN_S = 0.08  # one speech token is 80 ms of audio (12.5 tokens/s)


class SpeechBrain(Protocol):
    """What the worker needs from the loaded models (see `models.glm4voice.brain`)."""

    sample_rate: int

    def start_job(self, job: Job) -> None:
        """Tokenize the user's turn, build and prefill the prompt; sets `job.lm_state`."""

    def next_token(self, job: Job) -> int:
        """Sample the next id of `job` and advance its LM state."""

    def decode_audio(self, job: Job, codes: list[int], final: bool) -> np.ndarray:
        """Speech (float32 at `sample_rate`) for the next block of `codes` of `job`."""

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


@dataclass
class Job:
    """One reply in progress; everything here belongs to the worker thread once submitted."""

    turn_audio: np.ndarray | None
    turn_text: str | None
    history_prefix: str
    emit: Callable[[ReplyEvent | BaseException | None], None]
    max_new_tokens: int
    max_ahead_s: float
    schedule: DecodeSchedule = field(default_factory=DecodeSchedule)
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    timings: StageTimings = field(default_factory=StageTimings)
    # filled by the worker
    prompt: str = ""
    lm_state: object = None
    decoder_state: object = None
    generated: list[int] = field(default_factory=list)
    pending_codes: list[int] = field(default_factory=list)
    text_ids: list[int] = field(default_factory=list)
    text_sent: str = ""
    blocks_done: int = 0
    audio_tokens_decoded: int = 0
    audio_samples_emitted: int = 0
    consumed_s: float = 0.0  # written by the consumer: seconds of audio handed to playback
    started_at: float = 0.0
    first_audio_at: float | None = None
    done: bool = False


class ModelWorker:
    """Runs jobs round-robin on one thread; `submit` is safe from any thread."""

    def __init__(self, brain: SpeechBrain, max_jobs: int = 64) -> None:
        self.brain = brain
        self._inbox: queue.Queue[Job] = queue.Queue(maxsize=max_jobs)
        self._active: list[Job] = []
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="glm4voice-worker", daemon=True)
        self.steps = 0

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
        with torch.inference_mode():
            while not self._stopping.is_set():
                self._take_new_jobs()
                if not self._round():
                    self._wake.wait(timeout=0.05)
                    self._wake.clear()
        for job in self._active + self._drain_inbox():
            self._finish(job, error=RuntimeError("the model worker stopped"))
        logger.info("model worker stopped")

    def _drain_inbox(self) -> list[Job]:
        jobs = []
        while True:
            try:
                jobs.append(self._inbox.get_nowait())
            except queue.Empty:
                return jobs

    def _take_new_jobs(self) -> None:
        for job in self._drain_inbox():
            job.started_at = time.perf_counter()
            self._active.append(job)

    def _round(self) -> bool:
        """One unit of work for every runnable job; False when nothing could run."""
        worked = False
        for job in list(self._active):
            if job.cancelled.is_set():
                self._finish(job)
                continue
            if job.lm_state is not None and self._too_far_ahead(job):
                continue  # the listener is far behind: let playback catch up first
            try:
                self._advance(job)
            except Exception as exc:  # one job's failure never stops the others
                logger.exception("reply failed")
                self._finish(job, error=exc)
                continue
            worked = True
            self.steps += 1
            if job.done:
                self._finish(job)
        return worked

    def _too_far_ahead(self, job: Job) -> bool:
        emitted_s = job.audio_samples_emitted / self.brain.sample_rate
        return emitted_s - job.consumed_s > job.max_ahead_s

    def _finish(self, job: Job, error: BaseException | None = None) -> None:
        if job in self._active:
            self._active.remove(job)
        job.lm_state = None
        job.decoder_state = None
        if error is not None:
            job.emit(error)
        job.emit(None)
        job.finished.set()

    # ------------------------------------------------------------------ one unit of work

    def _advance(self, job: Job) -> None:
        if job.lm_state is None:
            self.brain.start_job(job)
            return
        token = self.brain.next_token(job)
        at_limit = len(job.generated) + 1 >= job.max_new_tokens
        if self.brain.is_stop(token):
            job.generated.append(token)
            self._end_of_answer(job)
            return
        job.generated.append(token)
        if self.brain.is_audio(token):
            self._on_audio_token(job, self.brain.audio_code(token))
        else:
            self._on_text_token(job, token)
        if at_limit:
            self._end_of_answer(job)

    def _on_text_token(self, job: Job, token: int) -> None:
        job.text_ids.append(token)
        text = self.brain.decode_text(job.text_ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return
        if text.startswith(job.text_sent) and len(text) > len(job.text_sent):
            job.emit(TextDelta(text[len(job.text_sent) :]))
            job.text_sent = text

    def _on_audio_token(self, job: Job, code: int) -> None:
        # A full block is decoded when the next audio token arrives, so the final block is
        # never empty and the held-back crossfade tail is always flushed at the end.
        if len(job.pending_codes) >= job.schedule.size(job.blocks_done):
            self._decode_pending(job, final=False)
        job.pending_codes.append(code)

    def _end_of_answer(self, job: Job) -> None:
        if job.pending_codes:
            self._decode_pending(job, final=True)
        job.done = True

    def _decode_pending(self, job: Job, final: bool) -> None:
        codes, job.pending_codes = job.pending_codes, []
        started = time.perf_counter()
        speech = self.brain.decode_audio(job, codes, final)
        job.timings.add("decoder", time.perf_counter() - started)
        job.blocks_done += 1
        job.audio_tokens_decoded += len(codes)
        if speech.size == 0:
            return
        if job.first_audio_at is None:
            job.first_audio_at = time.perf_counter()
            job.timings.add("first_audio", job.first_audio_at - job.started_at)
        job.audio_samples_emitted += len(speech)
        job.emit(AudioChunk(np.ascontiguousarray(speech, dtype=np.float32), self.brain.sample_rate))
