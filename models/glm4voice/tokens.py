"""Which ids the language model may sample next: an allowed-ids mask and the 13:26 pattern.

Every step masks the logits to ids the tokenizer defines (the LM's vocabulary is padded beyond
them, and a random or fine-tuned model may put mass there). On top of that:

- `TokenConstraints.allowed_text_ids` restricts the *text* the model may write, e.g. to English
  tokens as the GLM-4-Voice paper did for its English evaluation; audio and turn-end ids stay
  allowed so the model can still speak and finish.
- `TokenPattern` enforces the trained interleaving (13 text ids, then 26 audio ids, repeating)
  and can force the turn end after a fixed number of ids. A trained model follows the layout on
  its own; the pattern makes random-weight models behave like it in tests and benchmarks (fixed
  answer lengths, audio for the decoder), and guards a drifting model.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

Phase = Literal["any", "text", "audio", "stop"]
_PHASE_ROWS: dict[Phase, int] = {"any": 0, "text": 1, "audio": 2, "stop": 3}


@dataclass(frozen=True)
class TokenPattern:
    """`text_tokens` text ids, then `audio_tokens` audio ids, repeating; the turn-end ids are
    allowed at every position and forced from position `stop_after` on (None: never forced)."""

    text_tokens: int = 13
    audio_tokens: int = 26
    stop_after: int | None = None

    def __post_init__(self) -> None:
        if self.text_tokens < 0 or self.audio_tokens < 1:
            raise ValueError("need text_tokens >= 0 and audio_tokens >= 1")
        if self.stop_after is not None and self.stop_after < 0:
            raise ValueError("stop_after must be >= 0")

    def phase(self, position: int) -> Phase:
        """What the id at `position` (0 = first generated id) must be."""
        if self.stop_after is not None and position >= self.stop_after:
            return "stop"
        cycle = self.text_tokens + self.audio_tokens
        return "text" if position % cycle < self.text_tokens else "audio"


@dataclass(frozen=True)
class TokenConstraints:
    """Limits on sampling beyond the tokenizer's own vocabulary (none by default)."""

    allowed_text_ids: frozenset[int] | None = None
    pattern: TokenPattern | None = None

    def phase(self, position: int) -> Phase:
        return "any" if self.pattern is None else self.pattern.phase(position)


class Vocabulary(Protocol):
    """What the masks need to know about the tokenizer."""

    def is_special(self, token_id: int) -> bool: ...
    def is_audio(self, token_id: int) -> bool: ...
    def decode_bytes(self, ids: Sequence[int]) -> bytes: ...
    def turn_stop_ids(self) -> Collection[int]: ...


def _defined(vocab: Vocabulary, token_id: int) -> bool:
    try:
        vocab.decode_bytes([token_id])
    except ValueError:
        return False
    return True


class TokenMasks:
    """Boolean masks [4, V] of allowed ids per phase (any, text, audio, stop), on one device."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table

    @classmethod
    def build(
        cls,
        vocab: Vocabulary,
        rows: int,
        constraints: TokenConstraints,
        device: torch.device | str = "cpu",
    ) -> TokenMasks:
        """Masks over the LM's `rows` logits from the tokenizer's ids (run once, at load)."""
        text = torch.zeros(rows, dtype=torch.bool)
        audio = torch.zeros(rows, dtype=torch.bool)
        special = torch.zeros(rows, dtype=torch.bool)
        stop = torch.zeros(rows, dtype=torch.bool)
        for token_id in range(rows):
            if vocab.is_audio(token_id):
                audio[token_id] = True
            elif vocab.is_special(token_id):
                special[token_id] = True
            elif _defined(vocab, token_id):
                text[token_id] = True
        for token_id in vocab.turn_stop_ids():
            if token_id < rows:
                stop[token_id] = True
        if constraints.allowed_text_ids is not None:
            allowed = torch.zeros(rows, dtype=torch.bool)
            allowed[[i for i in constraints.allowed_text_ids if 0 <= i < rows]] = True
            text &= allowed
        any_id = text | audio | special | stop
        table = torch.stack([any_id, text | stop, audio | stop, stop])  # (4, V)
        return cls(table.to(device))

    def apply(self, logits: torch.Tensor, phases: Sequence[Phase]) -> torch.Tensor:
        """Logits [B, V] with every id not allowed in its row's phase set to -inf."""
        rows = torch.tensor([_PHASE_ROWS[p] for p in phases], device=self.table.device)
        allowed = self.table.index_select(0, rows).to(logits.device)  # (B, V)
        return logits.masked_fill(~allowed, float("-inf"))


__all__ = ["Phase", "TokenConstraints", "TokenMasks", "TokenPattern"]
