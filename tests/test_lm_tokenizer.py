"""GLM-4-Voice tokenizer files and the exact reference prompt strings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.lm import (
    GLM4VoiceTokenizer,
    TokenizerError,
    audio_tokens_text,
    build_prompt,
    build_prompt_ids,
    canonical_ids,
    history_after_reply,
    history_ids_after_reply,
)
from models.lm.prompt import split_history
from models.lm.tiny import write_tiny_tokenizer

SPEECH_SYS = (
    "User will provide you with a speech instruction. Do it step by step. First, think about the "
    "instruction and respond in a interleaved manner, with 13 text token followed by 26 audio tokens. "
)
TEXT_SYS = (
    "User will provide you with a text instruction. Do it step by step. First, think about the "
    "instruction and respond in a interleaved manner, with 13 text token followed by 26 audio tokens."
)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    write_tiny_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir: Path) -> GLM4VoiceTokenizer:
    return GLM4VoiceTokenizer.from_dir(tok_dir)


# ----------------------------------------------------------------------------- tokenizer


def test_special_ids_come_from_the_files(tok: GLM4VoiceTokenizer) -> None:
    assert tok.prefix_ids == [151331, 151333]
    assert (tok.system_id, tok.user_id, tok.assistant_id) == (151335, 151336, 151337)
    assert (tok.begin_of_audio_id, tok.end_of_audio_id) == (151343, 151344)
    assert (tok.audio_offset, tok.audio_token_count) == (151552, 16384)


def test_audio_offset_follows_tokenizer_config(tok_dir: Path, tmp_path: Path) -> None:
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    shifted = {}
    for key, entry in config["added_tokens_decoder"].items():
        moved = int(key) + 100 if entry["content"].startswith("<|audio_") else int(key)
        shifted[str(moved)] = entry
    config["added_tokens_decoder"] = shifted
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "tokenizer.model").symlink_to(tok_dir / "tokenizer.model")
    moved = GLM4VoiceTokenizer.from_dir(tmp_path)
    assert moved.audio_offset == 151652
    assert moved.encode("<|audio_7|>", add_prefix=False) == [151659]


def test_non_consecutive_audio_ids_are_rejected(tok_dir: Path, tmp_path: Path) -> None:
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    entry = config["added_tokens_decoder"].pop(str(151552 + 5))
    config["added_tokens_decoder"]["168900"] = entry
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "tokenizer.model").symlink_to(tok_dir / "tokenizer.model")
    with pytest.raises(TokenizerError, match=r"<\|audio_5\|>"):
        GLM4VoiceTokenizer.from_dir(tmp_path)


def test_encode_adds_gmask_sop_prefix_only_when_asked(tok: GLM4VoiceTokenizer) -> None:
    plain = tok.encode("hello", add_prefix=False)
    assert tok.encode("hello") == [151331, 151333, *plain]


def test_special_tokens_inside_text_are_single_ids(tok: GLM4VoiceTokenizer) -> None:
    ids = tok.encode(
        "<|user|>\n<|begin_of_audio|><|audio_0|><|audio_16383|><|end_of_audio|><|assistant|>",
        add_prefix=False,
    )
    assert ids == [151336, 10, 151343, 151552, 151552 + 16383, 151344, 151337]


def test_text_is_split_by_the_glm4_pattern_then_bpe_merged(tok: GLM4VoiceTokenizer) -> None:
    ids = tok.encode("hello how are you?", add_prefix=False)
    assert [tok.decode([i]) for i in ids] == ["hello", " how", " are", " you", "?"]


def test_decode_round_trips_text_and_specials_without_added_spaces(tok: GLM4VoiceTokenizer) -> None:
    text = (
        "<|system|>\nHi there, 你好 — ok?<|user|>\n<|begin_of_audio|><|audio_12|><|end_of_audio|>"
    )
    assert tok.decode(tok.encode(text, add_prefix=False)) == text
    assert tok.decode([151336, 151552, 151337]) == "<|user|><|audio_0|><|assistant|>"


def test_decode_replaces_incomplete_utf8_between_specials(tok: GLM4VoiceTokenizer) -> None:
    first_byte_of_ni = tok.encode("你", add_prefix=False)[:1]
    assert tok.decode([*first_byte_of_ni, tok.user_id]) == "\ufffd<|user|>"


def test_audio_ids_map_to_speech_codes_and_back(tok: GLM4VoiceTokenizer) -> None:
    assert tok.is_audio(151552) and tok.is_audio(151552 + 16383)
    assert not tok.is_audio(151551) and not tok.is_audio(151552 + 16384)
    assert tok.audio_code(151552 + 42) == 42
    assert tok.audio_id(42) == 151552 + 42
    assert tok.audio_ids([1, 2]) == [151343, 151553, 151554, 151344]
    with pytest.raises(ValueError):
        tok.audio_code(151336)
    with pytest.raises(ValueError):
        tok.audio_id(16384)


def test_turn_stop_ids_are_user_endoftext_and_observation(tok: GLM4VoiceTokenizer) -> None:
    assert tok.turn_stop_ids() == {151336, 151329, 151338}


def test_text_stream_skips_audio_and_completes_split_characters(tok: GLM4VoiceTokenizer) -> None:
    ids = tok.encode("hi 你<|audio_3|>好<|audio_4|><|user|>", add_prefix=False)
    ni_bytes = tok.encode("你", add_prefix=False)
    assert len(ni_bytes) == 3  # one id per byte in the tiny vocabulary
    stream = tok.text_stream()
    deltas = [stream.push(i) for i in ids]
    assert "".join(deltas) + stream.flush() == "hi 你好"
    assert "" in deltas and "你" in deltas  # nothing emitted until the character is whole


def test_unknown_id_cannot_be_decoded(tok: GLM4VoiceTokenizer) -> None:
    with pytest.raises(ValueError, match="151400"):
        tok.decode([151400])


# ----------------------------------------------------------------------------- prompts


def test_first_speech_turn_prompt_is_byte_exact() -> None:
    prompt = build_prompt("", audio_tokens_text([5, 0, 16383]), "audio")
    assert prompt == (
        "<|system|>\n" + SPEECH_SYS + "<|user|>\n<|begin_of_audio|><|audio_5|><|audio_0|>"
        "<|audio_16383|><|end_of_audio|><|assistant|>streaming_transcription\n"
    )


def test_first_text_turn_prompt_is_byte_exact() -> None:
    prompt = build_prompt("", "What is the weather today?", "text")
    assert prompt == (
        "<|system|>\n"
        + TEXT_SYS
        + "<|user|>\nWhat is the weather today?<|assistant|>streaming_transcription\n"
    )


def test_a_history_splits_into_its_system_prompt_and_exchanges_and_joins_back() -> None:
    first = build_prompt("", audio_tokens_text([1, 2]), "audio") + "Hi<|audio_3|>"
    history = build_prompt(first, "and you?", "text") + "Fine<|audio_4|>"
    head, exchanges = split_history(history)
    assert head == "<|system|>\n" + SPEECH_SYS
    assert exchanges == [
        "<|user|>\n<|begin_of_audio|><|audio_1|><|audio_2|><|end_of_audio|>"
        "<|assistant|>streaming_transcription\nHi<|audio_3|>",
        "<|user|>\nand you?<|assistant|>streaming_transcription\nFine<|audio_4|>",
    ]
    assert head + "".join(exchanges) == history
    assert split_history("") == ("", [])


def test_multi_turn_history_keeps_one_system_prompt_and_strips(tok: GLM4VoiceTokenizer) -> None:
    first = build_prompt("", audio_tokens_text([1, 2]), "audio")
    completion = tok.encode("Hello you<|audio_3|><|audio_4|> \n", add_prefix=False) + [tok.user_id]
    history = history_after_reply(first, completion, tok)
    assert history == first + "Hello you<|audio_3|><|audio_4|> \n"
    second = build_prompt(history, "and the weather?", "text")
    assert second == (
        "<|system|>\n"
        + SPEECH_SYS
        + "<|user|>\n<|begin_of_audio|><|audio_1|><|audio_2|><|end_of_audio|>"
        "<|assistant|>streaming_transcription\nHello you<|audio_3|><|audio_4|>"
        "<|user|>\nand the weather?<|assistant|>streaming_transcription\n"
    )
    assert second.count("<|system|>") == 1


def _string_path(tok: GLM4VoiceTokenizer, turns: list[tuple[str, str, list[int]]]) -> list[int]:
    history = ""
    ids: list[int] = []
    for user_input, mode, completion in turns:
        prompt = build_prompt(history, user_input, mode)  # type: ignore[arg-type]
        ids = tok.encode(prompt)
        history = history_after_reply(prompt, completion, tok)
    return ids


def _id_path(tok: GLM4VoiceTokenizer, turns: list[tuple[str, str, list[int]]]) -> list[int]:
    history: list[int] = []
    ids: list[int] = []
    for user_input, mode, completion in turns:
        ids = build_prompt_ids(tok, history, user_input, mode)  # type: ignore[arg-type]
        history = history_ids_after_reply(ids, completion, tok)
    return ids


def test_id_prompt_builder_equals_tokenizing_the_prompt_string(tok: GLM4VoiceTokenizer) -> None:
    reply = tok.encode("Hello, how are you<|audio_7|><|audio_8|>today\n", add_prefix=False) + [
        tok.user_id
    ]
    cut = reply[:4]  # an answer interrupted after four tokens
    turns = [
        (audio_tokens_text([3, 9]), "audio", reply),
        ("what is the weather", "text", cut),
        (audio_tokens_text([11]), "audio", []),
    ]
    assert _id_path(tok, turns) == _string_path(tok, turns)
    assert _id_path(tok, turns[:1]) == tok.encode(
        build_prompt("", audio_tokens_text([3, 9]), "audio")
    )


def test_canonical_ids_retokenize_a_sampled_split(tok: GLM4VoiceTokenizer) -> None:
    pieces = [tok.encode(p, add_prefix=False)[0] for p in ("h", "e", "l", "l", "o")]
    sampled = [*tok.prefix_ids, tok.assistant_id, *pieces]
    assert canonical_ids(tok, sampled) == tok.encode("<|assistant|>hello")
    assert canonical_ids(tok, sampled) != sampled
