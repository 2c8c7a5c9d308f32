"""GLM-4-Voice tokenizer: GLM-4's tiktoken BPE plus the added tokens of `tokenizer_config.json`.

Files (official layout, no remote code needed):
- `tokenizer.model`: one `<base64 bytes> <rank>` pair per line; the rank is the token id.
- `tokenizer_config.json`: `added_tokens_decoder` maps id -> {"content": ...} for the GLM-4 special
  tokens (`[gMASK]`, `<sop>`, `<|user|>`, ...) and GLM-4-Voice's `<|begin_of_audio|>`,
  `<|end_of_audio|>` and `<|audio_0|>` ... `<|audio_16383|>`.

Every special id is read from these files. Added tokens written inside text are recognised as
single tokens (exact match, nothing stripped around them); the text between them is split with the
GLM-4 pre-tokenizer pattern and BPE-merged. Encoding with `add_prefix=True` prepends `[gMASK]<sop>`
as the GLM-4 tokenizer does by default. Decoding concatenates without spaces around special tokens
(`spaces_between_special_tokens=False`) and decodes the bytes between them as UTF-8 (invalid bytes
become U+FFFD), which is how GLM-4-Voice turns generated ids back into history text.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import tiktoken

from models.jsonfile import read_json_object

logger = logging.getLogger(__name__)

VOCAB_FILE = "tokenizer.model"
CONFIG_FILE = "tokenizer_config.json"

# GLM-4's pre-tokenizer split pattern.
GLM4_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The GLM-4 tokenizer's own special tokens, in its order: when `tokenizer_config.json` does not
# list them, they take the ids right after the last BPE rank, in this order.
GLM4_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
)

BEGIN_OF_AUDIO = "<|begin_of_audio|>"
END_OF_AUDIO = "<|end_of_audio|>"
_AUDIO_TOKEN = re.compile(r"<\|audio_(\d+)\|>")


def audio_token(code: int) -> str:
    """The text form of speech code `code`: `<|audio_{code}|>`."""
    return f"<|audio_{code}|>"


class TokenizerError(ValueError):
    """The tokenizer files are malformed or inconsistent."""


def read_bpe_ranks(path: Path) -> dict[bytes, int]:
    """Parse `tokenizer.model`: base64 token bytes and integer rank per line."""
    ranks: dict[bytes, int] = {}
    with Path(path).open(encoding="ascii") as f:
        for line_no, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2:
                raise TokenizerError(f"{path}:{line_no}: expected '<base64> <rank>'")
            try:
                token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
            except (binascii.Error, ValueError) as exc:
                raise TokenizerError(f"{path}:{line_no}: {exc}") from exc
            if token in ranks:
                raise TokenizerError(f"{path}:{line_no}: duplicate token {token!r}")
            ranks[token] = rank
    if len(set(ranks.values())) != len(ranks):
        raise TokenizerError(f"{path}: ranks are not unique")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(f"{path}: single bytes {missing[:8]} have no rank (BPE needs all 256)")
    return ranks


def read_added_tokens(path: Path, ranks: dict[bytes, int]) -> dict[str, int]:
    """Added tokens (content -> id) from `tokenizer_config.json`, plus GLM-4's own specials."""
    config = read_json_object(path, TokenizerError)
    added: dict[str, int] = {}
    for key, entry in config.get("added_tokens_decoder", {}).items():
        content = entry["content"] if isinstance(entry, dict) else str(entry)
        added[content] = int(key)
    next_id = max(ranks.values()) + 1
    for name in GLM4_SPECIAL_TOKENS:
        if name not in added:
            added[name] = next_id + GLM4_SPECIAL_TOKENS.index(name)
    rank_ids = set(ranks.values())
    clash = [(t, i) for t, i in added.items() if i in rank_ids]
    if clash:
        raise TokenizerError(f"{path}: added token {clash[0][0]!r} reuses BPE id {clash[0][1]}")
    if len(set(added.values())) != len(added):
        raise TokenizerError(f"{path}: two added tokens share an id")
    return added


class GLM4VoiceTokenizer:
    """Text <-> ids for GLM-4-Voice-9B, including the speech tokens."""

    def __init__(self, ranks: dict[bytes, int], added_tokens: dict[str, int]) -> None:
        self._encoding = tiktoken.Encoding(
            name="glm4voice",
            pat_str=GLM4_SPLIT_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=added_tokens,
        )
        self._added = dict(added_tokens)
        self._added_by_id = {i: t for t, i in added_tokens.items()}
        self._bytes_by_id = {i: t for t, i in ranks.items()}
        self.audio_offset, self.audio_token_count = self._audio_layout()
        self.gmask_id = self.token_to_id("[gMASK]")
        self.sop_id = self.token_to_id("<sop>")
        self.system_id = self.token_to_id("<|system|>")
        self.user_id = self.token_to_id("<|user|>")
        self.assistant_id = self.token_to_id("<|assistant|>")
        self.eos_id = self.token_to_id("<|endoftext|>")
        self.begin_of_audio_id = self.token_to_id(BEGIN_OF_AUDIO)
        self.end_of_audio_id = self.token_to_id(END_OF_AUDIO)

    @classmethod
    def from_dir(cls, folder: Path) -> GLM4VoiceTokenizer:
        """Load `tokenizer.model` and `tokenizer_config.json` from a model folder."""
        folder = Path(folder)
        for name in (VOCAB_FILE, CONFIG_FILE):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"tokenizer file missing: {folder / name}")
        ranks = read_bpe_ranks(folder / VOCAB_FILE)
        added = read_added_tokens(folder / CONFIG_FILE, ranks)
        tokenizer = cls(ranks, added)
        logger.info(
            "tokenizer: %d BPE ranks, %d added tokens, audio ids %d..%d",
            len(ranks),
            len(added),
            tokenizer.audio_offset,
            tokenizer.audio_offset + tokenizer.audio_token_count - 1,
        )
        return tokenizer

    def _audio_layout(self) -> tuple[int, int]:
        """Id of `<|audio_0|>` and how many consecutive `<|audio_N|>` follow it.

        Speech code n must be id `offset + n` (the model and the demo rely on it).
        """
        codes = {
            int(m.group(1)): i for t, i in self._added.items() if (m := _AUDIO_TOKEN.fullmatch(t))
        }
        if 0 not in codes:
            raise TokenizerError(f"no {audio_token(0)} among the added tokens")
        offset = codes[0]
        count = len(codes)
        for code in range(count):
            if codes.get(code) != offset + code:
                raise TokenizerError(
                    f"{audio_token(code)} has id {codes.get(code)}, expected {offset + code} "
                    "(audio tokens must be consecutive from <|audio_0|>)"
                )
        return offset, count

    # ------------------------------------------------------------------ lookups

    @property
    def prefix_ids(self) -> list[int]:
        """`[gMASK]<sop>`, prepended to every prompt."""
        return [self.gmask_id, self.sop_id]

    @property
    def vocab_size(self) -> int:
        """One more than the largest id (BPE ranks and added tokens)."""
        return self._encoding.max_token_value + 1

    def token_to_id(self, token: str) -> int:
        """Id of an added token such as `<|user|>`; KeyError if the files do not define it."""
        try:
            return self._added[token]
        except KeyError:
            raise KeyError(f"token {token!r} is not an added token of this tokenizer") from None

    def is_special(self, token_id: int) -> bool:
        """True for added tokens (GLM-4 specials and audio tokens)."""
        return token_id in self._added_by_id

    def is_audio(self, token_id: int) -> bool:
        """True for `<|audio_N|>` ids."""
        return self.audio_offset <= token_id < self.audio_offset + self.audio_token_count

    def audio_code(self, token_id: int) -> int:
        """Speech code of an audio id (`id - audio_offset`)."""
        if not self.is_audio(token_id):
            raise ValueError(f"id {token_id} is not an audio token")
        return token_id - self.audio_offset

    def audio_id(self, code: int) -> int:
        """Id of speech code `code`."""
        if not 0 <= code < self.audio_token_count:
            raise ValueError(f"speech code {code} is outside 0..{self.audio_token_count - 1}")
        return self.audio_offset + code

    # ------------------------------------------------------------------ encode / decode

    def encode(self, text: str, add_prefix: bool = True) -> list[int]:
        """Ids of `text`; added tokens inside it become single ids. Prefix `[gMASK]<sop>` first."""
        ids = self._encoding.encode(text, allowed_special="all")
        return self.prefix_ids + ids if add_prefix else ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Raw bytes of `ids` (added tokens as their UTF-8 text)."""
        return b"".join(self._piece(i) for i in ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`: added tokens verbatim, the bytes between them decoded as UTF-8."""
        parts: list[str] = []
        pending = bytearray()
        for token_id in ids:
            special = self._added_by_id.get(token_id)
            if special is None:
                pending += self._piece(token_id)
                continue
            if pending:
                parts.append(pending.decode("utf-8", errors="replace"))
                pending.clear()
            parts.append(special)
        if pending:
            parts.append(pending.decode("utf-8", errors="replace"))
        return "".join(parts)

    def _piece(self, token_id: int) -> bytes:
        piece = self._bytes_by_id.get(token_id)
        if piece is not None:
            return piece
        special = self._added_by_id.get(token_id)
        if special is not None:
            return special.encode("utf-8")
        raise ValueError(f"id {token_id} is neither a BPE rank nor an added token")

    def audio_ids(self, codes: Sequence[int]) -> list[int]:
        """`<|begin_of_audio|>`, the audio ids of `codes`, `<|end_of_audio|>`."""
        return [self.begin_of_audio_id, *(self.audio_id(c) for c in codes), self.end_of_audio_id]

    def turn_stop_ids(self) -> frozenset[int]:
        """Ids that end an answer: `<|user|>` (the model's turn end), `<|endoftext|>`, `<|observation|>`."""
        return frozenset({self.user_id, self.eos_id, self.token_to_id("<|observation|>")})

    def text_stream(self) -> TextStreamDecoder:
        """A decoder turning generated ids into text deltas (special and audio ids skipped)."""
        return TextStreamDecoder(self)


class TextStreamDecoder:
    """Incremental text of a generated answer, one id at a time.

    Only ordinary (BPE) ids produce text; added tokens (audio, turn markers) are skipped. A UTF-8
    character split over several ids (or around an audio block) is emitted once it is complete.
    """

    def __init__(self, tokenizer: GLM4VoiceTokenizer) -> None:
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Text completed by `token_id` ("" for special ids or an unfinished character)."""
        if self._tokenizer.is_special(token_id):
            return ""
        return self._utf8.decode(self._tokenizer.decode_bytes([token_id]))

    def flush(self) -> str:
        """Whatever is left at the end (an unfinished character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)
