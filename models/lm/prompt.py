"""GLM-4-Voice chat prompts, byte for byte as the reference web demo builds them.

A turn's prompt is the previous prompt plus the previous completion (stripped), the system prompt
once (speech or text flavour, chosen by the first turn's input), then
`<|user|>\\n{user_input}<|assistant|>streaming_transcription\\n`. Speech input is written as
`<|begin_of_audio|><|audio_N|>...<|end_of_audio|>`. The prompt is tokenized with the
`[gMASK]<sop>` prefix.

Two equivalent forms are offered: strings (`build_prompt`, `history_after_reply`) and token ids
(`build_prompt_ids`, `history_ids_after_reply`), so that a conversation can be kept as the exact
ids the model saw and an interrupted answer can be kept as a prefix of its ids.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

from models.lm.tokenization import BEGIN_OF_AUDIO, END_OF_AUDIO, GLM4VoiceTokenizer, audio_token

InputMode = Literal["audio", "text"]

# Exact strings the model was trained with (the speech one ends with a space).
SPEECH_SYSTEM_PROMPT = (
    "User will provide you with a speech instruction. Do it step by step. First, think about the "
    "instruction and respond in a interleaved manner, with 13 text token followed by 26 audio tokens. "
)
TEXT_SYSTEM_PROMPT = (
    "User will provide you with a text instruction. Do it step by step. First, think about the "
    "instruction and respond in a interleaved manner, with 13 text token followed by 26 audio tokens."
)
SYSTEM_TAG = "<|system|>"
USER_TAG = "<|user|>"
ASSISTANT_TAG = "<|assistant|>"
ASSISTANT_PREFIX = "streaming_transcription\n"


def system_prompt(input_mode: InputMode) -> str:
    """The system prompt for speech (`"audio"`) or typed (`"text"`) input."""
    if input_mode == "audio":
        return SPEECH_SYSTEM_PROMPT
    if input_mode == "text":
        return TEXT_SYSTEM_PROMPT
    raise ValueError(f"input_mode must be 'audio' or 'text', got {input_mode!r}")


def audio_tokens_text(codes: Iterable[int]) -> str:
    """Speech codes as prompt text: `<|begin_of_audio|><|audio_N|>...<|end_of_audio|>`."""
    return BEGIN_OF_AUDIO + "".join(audio_token(int(c)) for c in codes) + END_OF_AUDIO


def _turn_suffix(user_input: str) -> str:
    return f"{USER_TAG}\n{user_input}{ASSISTANT_TAG}{ASSISTANT_PREFIX}"


def build_prompt(history_prefix: str, user_input: str, input_mode: InputMode) -> str:
    """The prompt string of one turn (without `[gMASK]<sop>`, which tokenization adds).

    `history_prefix` is the previous turn's prompt plus its decoded completion ("" at first);
    `user_input` is the typed text or `audio_tokens_text(codes)`.
    """
    inputs = history_prefix.strip()
    if SYSTEM_TAG not in inputs:
        inputs += f"{SYSTEM_TAG}\n{system_prompt(input_mode)}"
    return inputs + _turn_suffix(user_input)


def split_history(history_prefix: str) -> tuple[str, list[str]]:
    """A history prefix as (what comes before its first user turn: the system prompt,
    exchanges): each exchange is a user turn and the answer to it, from its `<|user|>` on.
    Joined back together they give `history_prefix` again."""
    head, tag, rest = history_prefix.partition(USER_TAG)
    if not tag:
        return history_prefix, []
    return head, [USER_TAG + part for part in rest.split(USER_TAG)]


def _without_final_user(completion_ids: Sequence[int], tokenizer: GLM4VoiceTokenizer) -> list[int]:
    ids = list(completion_ids)
    if ids and ids[-1] == tokenizer.user_id:
        ids.pop()
    return ids


def history_after_reply(
    prompt: str, completion_ids: Sequence[int], tokenizer: GLM4VoiceTokenizer
) -> str:
    """History string for the next turn: prompt + decoded completion without its final `<|user|>`."""
    return prompt + tokenizer.decode(_without_final_user(completion_ids, tokenizer))


# ----------------------------------------------------------------------------- token ids


def history_ids_after_reply(
    prompt_ids: Sequence[int], completion_ids: Sequence[int], tokenizer: GLM4VoiceTokenizer
) -> list[int]:
    """History ids for the next turn: prompt ids (with prefix) + completion without final `<|user|>`."""
    return list(prompt_ids) + _without_final_user(completion_ids, tokenizer)


def _strip_ids(ids: list[int], tokenizer: GLM4VoiceTokenizer) -> list[int]:
    """Ids of `decode(ids).strip()`, re-tokenizing only the ordinary text at either end.

    Added tokens separate BPE segments, so only the text before the first and after the last
    added token can change under `strip()`.
    """
    specials = [i for i, t in enumerate(ids) if tokenizer.is_special(t)]
    if not specials:
        return tokenizer.encode(tokenizer.decode(ids).strip(), add_prefix=False)
    first, last = specials[0], specials[-1]
    head = tokenizer.decode(ids[:first])
    tail = tokenizer.decode(ids[last + 1 :])
    new_head = (
        ids[:first] if head == head.lstrip() else tokenizer.encode(head.lstrip(), add_prefix=False)
    )
    new_tail = (
        ids[last + 1 :]
        if tail == tail.rstrip()
        else tokenizer.encode(tail.rstrip(), add_prefix=False)
    )
    return new_head + ids[first : last + 1] + new_tail


def build_prompt_ids(
    tokenizer: GLM4VoiceTokenizer,
    history_ids: Sequence[int],
    user_input: str,
    input_mode: InputMode,
) -> list[int]:
    """Ids of one turn's prompt, `[gMASK]<sop>` included, extending `history_ids` as they are.

    `history_ids` is `history_ids_after_reply(...)` of the previous turn, or empty. When the history
    ids are the tokenization of their own text (see `canonical_ids`), the result equals
    `tokenizer.encode(build_prompt(tokenizer.decode(history_ids[2:]), user_input, input_mode))`.
    """
    body = list(history_ids)
    if body[:2] == tokenizer.prefix_ids:
        body = body[2:]
    body = _strip_ids(body, tokenizer) if body else body
    if tokenizer.system_id not in body:
        body += tokenizer.encode(f"{SYSTEM_TAG}\n{system_prompt(input_mode)}", add_prefix=False)
    body += tokenizer.encode(_turn_suffix(user_input), add_prefix=False)
    return tokenizer.prefix_ids + body


def canonical_ids(tokenizer: GLM4VoiceTokenizer, ids: Sequence[int]) -> list[int]:
    """Re-tokenize ids through their text, as the string-based reference history does.

    Sampled text tokens are not always the tokenizer's own split of that text; the reference keeps
    history as text, so its next prompt holds the canonical split. Prefix is kept if present.
    """
    body = list(ids)
    prefix = body[:2] == tokenizer.prefix_ids
    text = tokenizer.decode(body[2:] if prefix else body)
    return tokenizer.encode(text, add_prefix=prefix)
