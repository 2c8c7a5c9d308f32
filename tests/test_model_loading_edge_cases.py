"""Inputs a user gets wrong: odd audio arrays, damaged model files, unusable logits, other
folder layouts. Each must give a clear error (naming the file where there is one) or work."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models.glm4voice.paths import LM_FOLDER, TOKENIZER_FOLDER, ModelPaths
from models.glm4voice.tokens import TokenConstraints, TokenMasks, TokenPattern, sample_nucleus
from models.lm import (
    CheckpointError,
    ConfigError,
    GLM4VoiceTokenizer,
    SamplingConfig,
    TokenizerError,
    check_checkpoint,
    load_lm,
    sample_next,
    write_tiny_lm,
)
from models.lm.tiny import write_tiny_tokenizer as write_tiny_lm_tokenizer
from models.speech_tokenizer import CheckpointError as SpeechCheckpointError
from models.speech_tokenizer import ConfigError as SpeechConfigError
from models.speech_tokenizer import SpeechTokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SR = 16_000


def voiced(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    audio = 0.3 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t))
    return (audio + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lm")
    return write_tiny_lm(
        out, seed=3, num_shards=3, dtype=torch.float32, padded_vocab_size=256, with_tokenizer=False
    )


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------- audio input


def test_int16_pcm_is_tokenized_like_the_same_float_audio(tiny_speech: SpeechTokenizer) -> None:
    audio = voiced(2.0)
    pcm = np.round(audio * 32768).clip(-32768, 32767).astype(np.int16)
    expected = tiny_speech.tokenize(pcm.astype(np.float32) / 32768)
    assert tiny_speech.tokenize(pcm) == expected
    assert tiny_speech.extract([(np.stack([pcm, pcm]), SR)]) == [expected]
    streamer = tiny_speech.streaming()
    streamer.push(pcm)
    assert streamer.finish() == expected


def test_samples_by_channels_stereo_is_rejected_not_cut_to_two_samples(
    tiny_speech: SpeechTokenizer,
) -> None:
    audio = voiced(1.0)
    stereo = np.stack([audio, audio], axis=1)  # (samples, 2), as soundfile returns it
    with pytest.raises(ValueError, match=r"\(samples, channels\).*audio\.T"):
        tiny_speech.extract([(stereo, SR)])
    assert tiny_speech.extract([(stereo.T, SR)]) == [tiny_speech.tokenize(audio)]


def test_empty_stereo_audio_has_no_tokens(tiny_speech: SpeechTokenizer) -> None:
    assert tiny_speech.extract([(np.zeros((2, 0), np.float32), SR)]) == [[]]
    assert tiny_speech.extract([(np.zeros((0, 2), np.float32), SR)]) == [[]]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_audio_is_rejected_instead_of_giving_code_zero(
    tiny_speech: SpeechTokenizer, bad: float
) -> None:
    audio = voiced(1.0)
    audio[100] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        tiny_speech.tokenize(audio)


def test_streaming_push_of_nan_raises_and_keeps_what_was_heard(
    tiny_speech: SpeechTokenizer,
) -> None:
    audio = voiced(5.0, seed=1)
    streamer = tiny_speech.streaming()
    streamer.push(audio[: 3 * SR])
    poisoned = audio[3 * SR : 4 * SR].copy()
    poisoned[10] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        streamer.push(poisoned)
    assert streamer.num_samples == 3 * SR
    streamer.push(audio[3 * SR :])
    assert streamer.finish() == tiny_speech.tokenize(audio)


def test_a_whole_number_float_sample_rate_is_accepted(tiny_speech: SpeechTokenizer) -> None:
    audio = np.repeat(voiced(1.0), 3)  # 48 kHz
    assert tiny_speech.extract([(audio, 48000.0)]) == tiny_speech.extract([(audio, 48000)])
    with pytest.raises(ValueError, match="whole number"):
        tiny_speech.extract([(audio, 47999.5)])


# ----------------------------------------------------------------------------- damaged files


def test_corrupt_speech_tokenizer_config_names_the_file(
    tiny_speech_dir: Path, tmp_path: Path
) -> None:
    folder = _copy(tiny_speech_dir, tmp_path / "tok")
    config = folder / "config.json"
    config.write_text(config.read_text()[:40])
    with pytest.raises(SpeechConfigError, match=r"config\.json.*not valid JSON"):
        SpeechTokenizer.from_pretrained(folder)


def test_truncated_speech_tokenizer_weights_name_the_file(
    tiny_speech_dir: Path, tmp_path: Path
) -> None:
    folder = _copy(tiny_speech_dir, tmp_path / "tok")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    with pytest.raises(SpeechCheckpointError, match=r"model\.safetensors"):
        SpeechTokenizer.from_pretrained(folder)


def test_truncated_shard_is_caught_by_the_check_before_any_weight_is_loaded(
    lm_dir: Path, tmp_path: Path
) -> None:
    folder = _copy(lm_dir, tmp_path / "lm")
    last = sorted(folder.glob("model-*.safetensors"))[-1]
    last.write_bytes(last.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=rf"{last.name}.*truncated"):
        check_checkpoint(folder)


def test_shard_with_a_huge_header_length_is_reported(lm_dir: Path, tmp_path: Path) -> None:
    folder = _copy(lm_dir, tmp_path / "lm")
    first = sorted(folder.glob("model-*.safetensors"))[0]
    first.write_bytes((2**62).to_bytes(8, "little") + first.read_bytes()[8:])
    with pytest.raises(CheckpointError, match=first.name):
        check_checkpoint(folder)


@pytest.mark.parametrize(
    ("name", "error"),
    [("model.safetensors.index.json", CheckpointError), ("config.json", ConfigError)],
)
def test_corrupt_lm_json_file_is_named(
    lm_dir: Path, tmp_path: Path, name: str, error: type[Exception]
) -> None:
    folder = _copy(lm_dir, tmp_path / "lm")
    (folder / name).write_text((folder / name).read_text()[:50])
    with pytest.raises(error, match=rf"{name}: not valid JSON"):
        check_checkpoint(folder)


def test_corrupt_lm_tokenizer_config_is_named(tmp_path: Path) -> None:
    write_tiny_lm_tokenizer(tmp_path)
    config = tmp_path / "tokenizer_config.json"
    config.write_text(config.read_text()[:100])
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: not valid JSON"):
        GLM4VoiceTokenizer.from_dir(tmp_path)


def test_int4_without_bitsandbytes_says_what_to_install(
    lm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"int4.*pip install bitsandbytes"):
        load_lm(lm_dir, dtype=torch.bfloat16, quantization="int4")


# ----------------------------------------------------------------------------- sampling


def test_greedy_sampling_refuses_a_row_with_no_allowed_token() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.0], [float("-inf")] * 3])
    with pytest.raises(ValueError, match=r"row\(s\) \[1\].*no allowed token"):
        sample_next(logits, 0.0, 0.8)
    with pytest.raises(ValueError, match=r"row\(s\) \[1\]"):
        sample_nucleus(logits, 0.0, 0.8)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_nan_logits_are_refused_rather_than_sampled(temperature: float) -> None:
    logits = torch.tensor([[1.0, float("nan"), 3.0, 0.0]])
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="NaN"):
        sample_next(logits, temperature, 0.8, generator)
    with pytest.raises(ValueError, match="NaN"):
        sample_nucleus(logits, temperature, 0.8, generator)


def test_masked_rows_with_some_allowed_token_still_sample_it() -> None:
    logits = torch.tensor([[float("-inf"), 0.5, float("-inf")]])
    generator = torch.Generator().manual_seed(0)
    assert sample_next(logits, 0.7, 0.8, generator).tolist() == [1]
    assert sample_nucleus(logits, 0.0, 0.8).tolist() == [1]


@pytest.mark.parametrize("temperature", [float("nan"), float("inf")])
def test_non_finite_temperature_is_rejected(temperature: float) -> None:
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=temperature)


def test_masks_leaving_no_text_id_for_a_text_first_pattern_are_rejected(tmp_path: Path) -> None:
    write_tiny_lm_tokenizer(tmp_path)
    tokenizer = GLM4VoiceTokenizer.from_dir(tmp_path)
    constraints = TokenConstraints(
        allowed_text_ids=frozenset({tokenizer.user_id}),  # not a text id
        pattern=TokenPattern(text_tokens=2, audio_tokens=3, stop_after=10),
    )
    with pytest.raises(ValueError, match="no text id"):
        TokenMasks.build(tokenizer, tokenizer.vocab_size, constraints)


# ----------------------------------------------------------------------------- folders


def test_model_dir_may_be_a_hugging_face_hub_cache(tmp_path: Path) -> None:
    lm_repo = tmp_path / "hub" / f"models--THUDM--{LM_FOLDER}"
    snapshot = lm_repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (lm_repo / "refs").mkdir()
    (lm_repo / "refs" / "main").write_text("abc123")
    (lm_repo / "snapshots" / "old").mkdir()
    tok_snapshot = tmp_path / "hub" / f"models--zai-org--{TOKENIZER_FOLDER}" / "snapshots" / "r1"
    tok_snapshot.mkdir(parents=True)
    for root in (tmp_path, tmp_path / "hub"):
        paths = ModelPaths.from_model_dir(root)
        assert paths.lm == snapshot
        assert paths.tokenizer == tok_snapshot
        assert paths.decoder == root / "glm-4-voice-decoder"  # absent: reported as missing
        assert str(paths.decoder / "flow.pt") in paths.missing_files()


def test_nucleus_sampling_names_only_the_rows_with_nothing_to_sample() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.0], [float("-inf")] * 3, [1.0, float("nan"), 0.0]])
    with pytest.raises(ValueError, match=r"row\(s\) \[1, 2\]"):
        sample_nucleus(logits, 0.7, 0.8, torch.Generator().manual_seed(0), candidates=2)
