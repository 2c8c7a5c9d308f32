"""The engine seam: what the agent asks of a speech brain, and what it gets back.

An engine turns one user turn (16 kHz speech, or typed text) plus the conversation history into
a stream of events: what it understood of the user, text deltas of its answer, and audio chunks
of its answer. The stream can be cancelled at any await. Once the agent knows how much of the
answer's audio actually reached the listener, it asks the reply for the history entries to keep
(`Reply.history`), so an interrupted answer is remembered only up to what was heard.

Engines:
- `models.offline.OfflineEngine`: pocketsphinx ASR -> a small responder -> eSpeak NG (no GPU).
- `models.glm4voice.GLM4VoiceEngine`: speech tokenizer -> GLM-4-Voice-9B -> flow + HiFT.
- tests add scripted fakes behind the same interface.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

USER_SAMPLE_RATE = 16_000  # every user turn reaches an engine as 16 kHz mono float32

Role = Literal["user", "assistant"]


class TurnListener(Protocol):
    """An engine's ear on a user turn while it is still being spoken.

    Engines that can work on speech as it arrives (e.g. tokenize it block by block) hand one
    out from `Engine.listen()`; the session pushes the turn's audio into it as it is heard and
    passes it along with the finished turn, so less work is left when the user stops talking.
    """

    def push(self, samples: np.ndarray) -> None:
        """16 kHz mono float32, in order, from the turn's first sample; never blocks."""

    def close(self) -> None:
        """The speech will not be answered: free what the listener holds."""


@dataclass(frozen=True)
class UserTurn:
    """One finished user turn: speech (16 kHz mono float32 in [-1, 1]) or typed text.

    `listener` is the engine's `TurnListener` that heard this speech as it was spoken, if any.
    """

    audio: np.ndarray | None = None
    text: str | None = None
    listener: TurnListener | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if (self.audio is None) == (self.text is None):
            raise ValueError("a user turn carries exactly one of audio or text")
        if self.audio is not None and (self.audio.ndim != 1 or self.audio.dtype != np.float32):
            raise ValueError("turn audio must be a 1-D float32 array at 16 kHz")

    @property
    def duration_s(self) -> float:
        return 0.0 if self.audio is None else len(self.audio) / USER_SAMPLE_RATE


@dataclass(frozen=True)
class HistoryItem:
    """One remembered turn.

    `text` is what a person would read in a transcript; `payload` is the engine's own record of
    the turn (e.g. GLM-4-Voice keeps the exact token ids so the next prompt is byte-identical to
    what the model saw). An engine may only rely on payloads that it produced itself.
    """

    role: Role
    text: str
    interrupted: bool = False
    payload: Any = None


@dataclass(frozen=True)
class UserTranscript:
    """What the engine understood the user to say (may be empty if it cannot transcribe)."""

    text: str


@dataclass(frozen=True)
class TextDelta:
    """A piece of the answer's text, in order."""

    text: str


@dataclass(frozen=True)
class AudioChunk:
    """A piece of the answer's audio: mono float32 in [-1, 1] at `sample_rate`."""

    samples: np.ndarray
    sample_rate: int

    @property
    def duration_s(self) -> float:
        return len(self.samples) / self.sample_rate


ReplyEvent = UserTranscript | TextDelta | AudioChunk


class EngineError(RuntimeError):
    """A reply failed inside the engine; the message is safe to show to the user."""


@dataclass
class StageTimings:
    """Seconds spent in each stage of a reply (filled by engines that know them)."""

    stages: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, seconds: float) -> None:
        self.stages[name] = self.stages.get(name, 0.0) + seconds


class Reply(abc.ABC):
    """A reply in progress. Iterate it for events; cancel it at any time.

    Iteration ends when the answer is complete or after `cancel()`. Audio chunks are yielded in
    playback order; their concatenation is the whole answer's audio.
    """

    timings: StageTimings

    @abc.abstractmethod
    def __aiter__(self) -> AsyncIterator[ReplyEvent]: ...

    @abc.abstractmethod
    async def cancel(self) -> None:
        """Stop generating as soon as possible; returns once model work for it has stopped."""

    @abc.abstractmethod
    def history(self, played_s: float | None) -> list[HistoryItem]:
        """History entries for this exchange (the user's turn, then the answer).

        `played_s` is how many seconds of the answer's audio reached the listener; None means
        all of it. An answer cut short is kept only up to what was heard and marked interrupted.
        """


class Engine(abc.ABC):
    """A speech brain shared by every session of the server."""

    name: str = "engine"

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Load and warm up models (runs once, before the server accepts sessions)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release workers and memory."""

    def listen(self) -> TurnListener | None:
        """Start hearing a user turn as it is spoken (None: this engine takes whole turns)."""
        return None

    @abc.abstractmethod
    def respond(self, turn: UserTurn, history: Sequence[HistoryItem]) -> Reply:
        """Start answering `turn` given `history`; returns at once."""


def played_fraction(played_s: float | None, total_s: float) -> float:
    """The share of an answer that was heard, clamped to [0, 1] (None = all of it)."""
    if played_s is None or total_s <= 0:
        return 1.0
    return min(1.0, max(0.0, played_s / total_s))


__all__ = [
    "USER_SAMPLE_RATE",
    "AudioChunk",
    "Engine",
    "EngineError",
    "HistoryItem",
    "Reply",
    "ReplyEvent",
    "StageTimings",
    "TextDelta",
    "TurnListener",
    "UserTranscript",
    "UserTurn",
    "played_fraction",
]
