"""A small deterministic responder: what the offline engine says back.

It understands a handful of requests (the time, the date, greetings, its name, "how are you",
what it can do, thanks, goodbye), remembers the user's name and earlier words from the
conversation history, and otherwise repeats what it heard. Answers come as a list of short
sentences so speech synthesis can start on the first while the rest wait.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from agent.engine import HistoryItem

NOT_CAUGHT = "Sorry, I did not catch that."

_WORD = re.compile(r"[a-z0-9']+")
_NAME_STATEMENT = re.compile(r"\b(?:my name is|my name's|call me)\s+(.+)")
# Words that end a name ("my name is john and i ...").
_NAME_STOP = frozenset({"and", "but", "so", "please", "what", "how", "i", "im", "i'm", "the"})
_MAX_NAME_WORDS = 2


@dataclass(frozen=True)
class _Heard:
    """The user's words, normalised for matching."""

    raw: str
    words: tuple[str, ...]

    @classmethod
    def of(cls, text: str) -> _Heard:
        return cls(text.strip(), tuple(_WORD.findall(text.lower())))

    @property
    def joined(self) -> str:
        return " ".join(self.words)

    def has(self, *phrases: str) -> bool:
        """True if any phrase occurs as whole words."""
        padded = f" {self.joined} "
        return any(f" {phrase} " in padded for phrase in phrases)


def extract_name(text: str) -> str | None:
    """The name in "my name is X" / "call me X", capitalised; None if the text states none."""
    match = _NAME_STATEMENT.search(" ".join(_WORD.findall(text.lower())))
    if match is None:
        return None
    name: list[str] = []
    for word in match.group(1).split():
        if word in _NAME_STOP or len(name) == _MAX_NAME_WORDS:
            break
        name.append(word.capitalize())
    return " ".join(name) or None


def remembered_name(history: Sequence[HistoryItem]) -> str | None:
    """The latest name the user gave in `history`, if any."""
    for item in reversed(history):
        if item.role == "user" and (name := extract_name(item.text)):
            return name
    return None


def last_user_words(history: Sequence[HistoryItem]) -> str | None:
    """What the user said in their latest non-empty turn in `history`."""
    return next((i.text for i in reversed(history) if i.role == "user" and i.text.strip()), None)


class Responder:
    """Answers one transcribed user turn with a list of sentences.

    Args:
        assistant_name: how the assistant introduces itself.
        now: the clock used for time and date questions.
    """

    def __init__(
        self, assistant_name: str = "Echo", now: Callable[[], datetime] = datetime.now
    ) -> None:
        self.assistant_name = assistant_name
        self._now = now

    def answer(self, heard: str, history: Sequence[HistoryItem] = ()) -> list[str]:
        """Sentences answering `heard` (the user's words) given the earlier `history`."""
        words = _Heard.of(heard)
        if not words.words:
            return [NOT_CAUGHT, "Could you say it again?"]
        handlers = (
            self._names,
            self._recall,
            self._time,
            self._date,
            self._identity,
            self._wellbeing,
            self._capabilities,
            self._thanks,
            self._goodbye,
        )
        sentences = [s for handler in handlers for s in handler(words, history)]
        greeting = self._greeting(words, history)
        if greeting and not sentences:
            return [*greeting, "How can I help you?"]
        if greeting or sentences:
            return greeting + sentences
        return self._echo(words)

    def _greeting(self, heard: _Heard, history: Sequence[HistoryItem]) -> list[str]:
        if not heard.has("hello", "hi", "hey", "good morning", "good afternoon", "good evening"):
            return []
        name = extract_name(heard.raw) or remembered_name(history)
        return [f"Hello, {name}!" if name else "Hello!"]

    def _names(self, heard: _Heard, history: Sequence[HistoryItem]) -> list[str]:
        name = extract_name(heard.raw)
        if name:
            return [f"Nice to meet you, {name}.", "I will remember your name."]
        if not heard.has("my name", "who am i"):
            return []
        known = remembered_name(history)
        if known:
            return [f"Your name is {known}."]
        return [
            "You have not told me your name yet.",
            "You can say: my name is, and then your name.",
        ]

    def _recall(self, heard: _Heard, history: Sequence[HistoryItem]) -> list[str]:
        if not heard.has("did i say", "did i just say", "i said", "i say before"):
            return []
        earlier = last_user_words(history)
        if earlier is None:
            return ["This is the first thing you have said to me."]
        return [f"Before this, you said: {_as_sentence(earlier)}"]

    def _time(self, heard: _Heard, _history: Sequence[HistoryItem]) -> list[str]:
        if not heard.has("time", "what hour", "o'clock"):
            return []
        now = self._now()
        hour = now.hour % 12 or 12
        return [f"It is {hour}:{now.minute:02d} {'AM' if now.hour < 12 else 'PM'}."]

    def _date(self, heard: _Heard, _history: Sequence[HistoryItem]) -> list[str]:
        if not heard.has("date", "what day", "which day", "day is it", "day today"):
            return []
        now = self._now()
        return [f"Today is {now:%A}, {now:%B} {now.day}, {now.year}."]

    def _identity(self, heard: _Heard, _history: Sequence[HistoryItem]) -> list[str]:
        if not heard.has("your name", "who are you", "what are you"):
            return []
        return [
            f"My name is {self.assistant_name}.",
            "I am a voice assistant that runs entirely on this computer.",
        ]

    def _wellbeing(self, heard: _Heard, _history: Sequence[HistoryItem]) -> list[str]:
        if not heard.has("how are you", "how are you doing", "how's it going", "how is it going"):
            return []
        return ["I am doing well, thank you for asking."]

    def _capabilities(self, heard: _Heard, _history: Sequence[HistoryItem]) -> list[str]:
        if not heard.has("help", "what can you do", "what do you do"):
            return []
        return [
            "I can tell you the time and the date.",
            "I can remember your name and what you said before.",
            "Everything I do runs offline, on this computer.",
        ]

    def _thanks(self, heard: _Heard, _history: Sequence[HistoryItem]) -> list[str]:
        return ["You are welcome."] if heard.has("thank you", "thanks") else []

    def _goodbye(self, heard: _Heard, _history: Sequence[HistoryItem]) -> list[str]:
        if not heard.has("goodbye", "bye", "good bye", "see you"):
            return []
        return ["Goodbye!", "It was nice talking to you."]

    def _echo(self, heard: _Heard) -> list[str]:
        return [
            f"You said: {_as_sentence(heard.raw)}",
            "I am a simple offline assistant.",
            "Ask me what I can do.",
        ]


def _as_sentence(text: str) -> str:
    """`text` ending in a full stop (unless it already ends a sentence)."""
    text = text.strip()
    return text if text.endswith((".", "!", "?")) else f"{text}."


__all__ = ["NOT_CAUGHT", "Responder", "extract_name", "last_user_words", "remembered_name"]
