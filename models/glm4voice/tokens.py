"""Which ids the language model may sample next: an allowed-ids mask and the 13:26 pattern.

Every step masks the logits to ids the tokenizer defines (the LM's vocabulary is padded beyond
them, and a random or fine-tuned model may put mass there). On top of that:

- `TokenConstraints.allowed_text_ids` restricts the *text* the model may write to a set of ids;
  `TokenConstraints.reply_language` "english" bars every text id that writes Chinese, Japanese
  or Korean (as the GLM-4-Voice paper did for its English evaluation: the model sometimes
  answers English speech in Chinese). The model speaks what it writes, so its speech follows.
  Audio and turn-end ids stay allowed so the model can still speak and finish.
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

from models.lm import sample_next
from models.lm.sampling import check_sampled

ReplyLanguage = Literal["any", "english"]
REPLY_LANGUAGES: tuple[ReplyLanguage, ...] = ("any", "english")

# "text"/"audio": that class or a turn end; "text_only"/"audio_only": that class alone.
Phase = Literal["any", "text", "audio", "stop", "text_only", "audio_only"]
_PHASE_ROWS: dict[Phase, int] = {
    "any": 0,
    "text": 1,
    "audio": 2,
    "stop": 3,
    "text_only": 4,
    "audio_only": 5,
}


@dataclass(frozen=True)
class TokenPattern:
    """`text_tokens` text ids, then `audio_tokens` audio ids, repeating.

    With `stop_after` None the model may end its turn anywhere; otherwise every answer is
    exactly `stop_after` ids long plus the turn end (fixed lengths for tests and benchmarks).
    """

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
        text = position % cycle < self.text_tokens
        if self.stop_after is None:
            return "text" if text else "audio"
        return "text_only" if text else "audio_only"


@dataclass(frozen=True)
class TokenConstraints:
    """Limits on sampling beyond the tokenizer's own vocabulary (none by default)."""

    allowed_text_ids: frozenset[int] | None = None
    pattern: TokenPattern | None = None
    reply_language: ReplyLanguage = "any"

    def __post_init__(self) -> None:
        if self.reply_language not in REPLY_LANGUAGES:
            raise ValueError(
                f"reply_language must be one of {REPLY_LANGUAGES}, not {self.reply_language!r}"
            )

    def phase(self, position: int) -> Phase:
        return "any" if self.pattern is None else self.pattern.phase(position)


class Vocabulary(Protocol):
    """What the masks need to know about the tokenizer."""

    def is_special(self, token_id: int) -> bool: ...
    def is_audio(self, token_id: int) -> bool: ...
    def decode_bytes(self, ids: Sequence[int]) -> bytes: ...
    def turn_stop_ids(self) -> Collection[int]: ...


def _text_bytes(vocab: Vocabulary, token_id: int) -> bytes | None:
    """The UTF-8 bytes an id writes; None for ids the tokenizer does not define."""
    try:
        return vocab.decode_bytes([token_id])
    except ValueError:
        return None


# UTF-8 lead bytes of three-byte characters from U+3000 to U+DFFF (CJK punctuation, kana,
# ideographs, Yi, Hangul) and from U+F000 (CJK compatibility ideographs, fullwidth forms).
_CJK_LEADS = frozenset(range(0xE3, 0xEE)) | {0xEF}


def writes_cjk(piece: bytes) -> bool:
    """Whether a token's bytes start a Chinese, Japanese or Korean character.

    Byte-level BPE splits characters across tokens, so the test is on UTF-8 lead bytes (a
    token made only of continuation bytes completes a character another token started):
    U+3000-U+DFFF and U+F000-U+FFFF, the CJK radicals at U+2E80-U+2FFF and the supplementary
    ideographs from U+20000. Latin letters with accents, dashes, curly quotes and emoji pass.
    """
    for i, byte in enumerate(piece):
        if byte in _CJK_LEADS:
            return True
        follower = piece[i + 1] if i + 1 < len(piece) else None
        if follower is None:
            continue
        if byte == 0xE2 and follower >= 0xBA:  # U+2E80-U+2FFF
            return True
        if byte == 0xF0 and follower >= 0xA0:  # U+20000 and beyond
            return True
    return False


def pattern_forces_text(constraints: TokenConstraints) -> bool:
    """Whether some position must be a text id with no turn end allowed ("text_only")."""
    pattern = constraints.pattern
    if pattern is None or pattern.stop_after is None:
        return False
    return pattern.text_tokens > 0 and pattern.stop_after > 0  # position 0 is text_only


class TokenMasks:
    """Boolean masks [6, V] of allowed ids per `Phase`, on one device."""

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
        english = constraints.reply_language == "english"
        for token_id in range(rows):
            if vocab.is_audio(token_id):
                audio[token_id] = True
            elif vocab.is_special(token_id):
                special[token_id] = True
            elif (piece := _text_bytes(vocab, token_id)) is not None:
                text[token_id] = not (english and writes_cjk(piece))
        for token_id in vocab.turn_stop_ids():
            if token_id < rows:
                stop[token_id] = True
        if constraints.allowed_text_ids is not None:
            allowed = torch.zeros(rows, dtype=torch.bool)
            allowed[[i for i in constraints.allowed_text_ids if 0 <= i < rows]] = True
            text &= allowed
        if pattern_forces_text(constraints) and not bool(text.any()):
            raise ValueError(
                "the constraints allow no text id, but the pattern requires text ids "
                "(allowed_text_ids names none of the tokenizer's text ids)"
            )
        any_id = text | audio | special | stop
        table = torch.stack([any_id, text | stop, audio | stop, stop, text, audio])  # (6, V)
        return cls(table.to(device))

    def apply(self, logits: torch.Tensor, phases: Sequence[Phase]) -> torch.Tensor:
        """Logits [B, V] with every id not allowed in its row's phase set to -inf."""
        rows = torch.tensor([_PHASE_ROWS[p] for p in phases], device=self.table.device)
        allowed = self.table.index_select(0, rows).to(logits.device)  # (B, V)
        return logits.masked_fill(~allowed, float("-inf"))


NUCLEUS_CANDIDATES = 256  # ids searched first for the top-p nucleus


def sample_nucleus(
    logits: torch.Tensor,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None = None,
    candidates: int = NUCLEUS_CANDIDATES,
) -> torch.Tensor:
    """Next ids [B] from logits [B, V] with temperature and top-p, like `sample_next`, without
    sorting the whole vocabulary.

    The nucleus (ids in decreasing probability while the mass before them is < top_p) lies
    inside the `candidates` most likely ids whenever those hold at least top_p of the mass,
    which is the rule at the demo's temperature 0.2; other rows take the full sort. Sorting
    169k logits per row per step costs about 20 ms on a CPU core, the top-k below well under 1.
    """
    if temperature <= 0:
        return check_sampled(logits, logits.argmax(dim=-1))  # NaN or nothing allowed: raise
    # A row with NaN logits or none allowed is reported after sampling, at the one host sync
    # below; meanwhile it samples a harmless stand-in, since a NaN reaching multinomial on a
    # GPU is a device-side assert that ends the process.
    best = logits.gather(-1, logits.argmax(dim=-1, keepdim=True)).squeeze(-1)
    bad = best.isnan() | (best == float("-inf"))  # (B,)
    probs = (logits.float() / temperature).softmax(dim=-1)  # (B, V)
    top_probs, top_ids = probs.topk(min(candidates, probs.shape[-1]), dim=-1)  # descending
    before = top_probs.cumsum(dim=-1) - top_probs  # mass of the more likely candidates
    kept = torch.where(before < top_p, top_probs, torch.zeros_like(top_probs))
    stand_in = torch.zeros_like(kept)
    stand_in[:, 0] = 1.0
    kept = torch.where(bad[:, None], stand_in, kept)
    choice = torch.multinomial(kept, num_samples=1, generator=generator)  # (B, 1)
    ids = top_ids.gather(-1, choice).squeeze(-1)
    wide = (top_probs.sum(dim=-1) < top_p) & ~bad  # the nucleus may reach beyond the candidates
    any_bad, any_wide = torch.stack([bad.any(), wide.any()]).tolist()
    if any_bad:
        check_sampled(logits, logits.argmax(dim=-1))  # raises, naming the rows
    if any_wide:
        rows = wide.nonzero().squeeze(-1)
        ids[rows] = sample_next(logits[rows], temperature, top_p, generator)
    return ids


__all__ = ["Phase", "TokenConstraints", "TokenMasks", "TokenPattern", "sample_nucleus"]
