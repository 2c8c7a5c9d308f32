"""Speech tokenizer: reference parity, checkpoint loading, one-shot and streaming tokenization."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from models.speech_tokenizer import (
    CheckpointError,
    ConfigError,
    EncoderCache,
    SpeechTokenizer,
    SpeechTokenizerConfig,
    WhisperVQEncoder,
    resample,
)
from models.speech_tokenizer.parity import check
from models.speech_tokenizer.tiny import tiny_config_dict

SR = 16_000


def speech_like(seconds: float, seed: int, loud: tuple[float, float] | None = None) -> np.ndarray:
    """Voiced 'syllables' (harmonics under a 3 Hz envelope) separated by near-silent pauses.

    The pauses sit more than 80 dB below the voiced peaks, so the log-mel floor
    (maximum - 8) is active, as it is for real speech. Within the `loud` span (seconds) the
    signal is 4x louder, which places the loudest frame, hence the floor, there.
    """
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    t = np.arange(n) / SR
    f0 = 140 + 40 * np.sin(2 * np.pi * 0.4 * t + rng.uniform(0, 6))
    phase = 2 * np.pi * np.cumsum(f0) / SR
    voiced = sum(np.sin(k * phase) / k for k in range(1, 6))
    envelope = np.clip(np.sin(2 * np.pi * 3.0 * t + rng.uniform(0, 6)), 0, None) ** 2
    audio = 0.2 * envelope * voiced + 1e-5 * rng.standard_normal(n)
    if loud is not None:
        audio[int(loud[0] * SR) : int(loud[1] * SR)] *= 4.0
    return audio.astype(np.float32)


def stream(
    tokenizer: SpeechTokenizer, audio: np.ndarray, chunk: int
) -> tuple[list[int], list[int]]:
    """(tokens returned by push, tokens returned by finish) for `audio` fed in `chunk` pieces."""
    streamer = tokenizer.streaming()
    pushed: list[int] = []
    for start in range(0, len(audio), chunk):
        pushed += streamer.push(audio[start : start + chunk])
    return pushed, streamer.finish()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _corrupt(src: Path, dst: Path, edit: Callable[[dict[str, torch.Tensor]], object]) -> Path:
    """Copies a tokenizer folder into `dst` with its state dict changed by `edit(state)`."""
    dst.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        (dst / name).write_text((src / name).read_text())
    state = load_file(str(src / "model.safetensors"))
    edit(state)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


# --- reference parity -------------------------------------------------------------------------


def test_parity_with_reference_fixtures(golden_dir: Path) -> None:
    results = check(golden_dir)
    failed = [r.line() for r in results if not r.passed]
    assert not failed, "\n".join(failed)
    assert any(r.output == "batch/tokens_utt1" for r in results)


# --- loading ----------------------------------------------------------------------------------


def test_missing_weight_key_is_named(tiny_speech_dir: Path, tmp_path: Path) -> None:
    folder = _corrupt(tiny_speech_dir, tmp_path / "m", lambda s: s.pop("layers.1.fc1.bias"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*missing.*layers\.1\.fc1\.bias"):
        SpeechTokenizer.from_pretrained(folder)


def test_unexpected_weight_key_is_named(tiny_speech_dir: Path, tmp_path: Path) -> None:
    def add_k_bias(state: dict[str, torch.Tensor]) -> None:
        state["layers.0.self_attn.k_proj.bias"] = torch.zeros(64)

    folder = _corrupt(tiny_speech_dir, tmp_path / "u", add_k_bias)
    with pytest.raises(CheckpointError, match=r"unexpected.*layers\.0\.self_attn\.k_proj\.bias"):
        SpeechTokenizer.from_pretrained(folder)


def test_wrong_weight_shape_is_named(tiny_speech_dir: Path, tmp_path: Path) -> None:
    def shrink(state: dict[str, torch.Tensor]) -> None:
        state["embed_positions2.weight"] = state["embed_positions2.weight"][:100].clone()

    folder = _corrupt(tiny_speech_dir, tmp_path / "s", shrink)
    with pytest.raises(CheckpointError, match=r"embed_positions2\.weight has shape \[100, 64\]"):
        SpeechTokenizer.from_pretrained(folder)


def test_missing_file_is_named(tiny_speech_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "nofile"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_speech_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        SpeechTokenizer.from_pretrained(folder)


def test_unsupported_pooling_type_is_rejected(tiny_speech_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "maxpool"
    folder.mkdir()
    config = json.loads((tiny_speech_dir / "config.json").read_text())
    config["pooling_type"] = "max"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="pooling_type 'max' is not supported"):
        SpeechTokenizer.from_pretrained(folder)


def test_tiny_folder_has_official_layout(tiny_speech_dir: Path, golden_dir: Path) -> None:
    official = json.loads((golden_dir / "speech_tokenizer" / "config.json").read_text())
    ours = json.loads((tiny_speech_dir / "config.json").read_text())
    assert set(ours) == set(official)
    keys = set(load_file(str(tiny_speech_dir / "model.safetensors")))
    listed = (golden_dir / "speech_tokenizer" / "state_dict_keys_reduced.txt").read_text()
    official_keys = {line.split("\t")[0] for line in listed.splitlines() if line.strip()}
    assert keys == official_keys  # both have two layers before quantisation


# --- one-shot tokenization --------------------------------------------------------------------


@pytest.mark.parametrize("samples", [1, 1279, 1280, 1281, 40_000])
def test_tokens_come_at_12_5_per_second(tiny_speech: SpeechTokenizer, samples: int) -> None:
    tokens = tiny_speech.tokenize(speech_like(samples / SR, seed=1))
    assert len(tokens) == math.ceil(samples / 1280)
    assert all(0 <= t < 16384 for t in tokens)


def test_tokens_depend_on_the_audio(tiny_speech: SpeechTokenizer) -> None:
    a = tiny_speech.tokenize(speech_like(2.0, seed=1))
    b = tiny_speech.tokenize(speech_like(2.0, seed=2))
    assert len(set(a)) > 3
    assert a != b


def test_empty_audio_has_no_tokens(tiny_speech: SpeechTokenizer) -> None:
    assert tiny_speech.tokenize(np.zeros(0, dtype=np.float32)) == []
    assert tiny_speech.streaming().finish() == []


def test_batched_extract_equals_one_by_one(tiny_speech: SpeechTokenizer) -> None:
    utts = [speech_like(1.3, seed=4), speech_like(3.1, seed=5)]
    batched = tiny_speech.extract([(u, SR) for u in utts])
    assert batched == [tiny_speech.tokenize(u) for u in utts]


def test_48khz_input_is_resampled_to_16khz(tiny_speech: SpeechTokenizer) -> None:
    audio_48k = resample(speech_like(2.0, seed=6), SR, 48_000)
    tokens = tiny_speech.extract([(audio_48k, 48_000)])[0]
    assert len(tokens) == math.ceil(2.0 * SR / 1280)
    assert tokens == tiny_speech.tokenize(resample(audio_48k, 48_000, SR))


def test_resampler_keeps_an_in_band_tone() -> None:
    t = np.arange(48_000) / 48_000
    tone = np.sin(2 * np.pi * 1000 * t).astype(np.float32)
    out = resample(tone, 48_000, SR)
    expected = np.sin(2 * np.pi * 1000 * np.arange(len(out)) / SR)
    assert len(out) == SR
    assert np.max(np.abs(out[200:-200] - expected[200:-200])) < 1e-3


def test_resampler_removes_content_above_8khz() -> None:
    t = np.arange(48_000) / 48_000
    tone = np.sin(2 * np.pi * 12_000 * t).astype(np.float32)
    out = resample(tone, 48_000, SR)
    assert np.sqrt(np.mean(out[200:-200] ** 2)) < 1e-2  # > 37 dB below the input tone


def test_only_the_first_channel_is_used(tiny_speech: SpeechTokenizer) -> None:
    left, right = speech_like(1.5, seed=7), speech_like(1.5, seed=8)
    stereo = np.stack([left, right])
    assert tiny_speech.extract([(stereo, SR)])[0] == tiny_speech.tokenize(left)


# --- block-wise encoder -----------------------------------------------------------------------


def test_block_wise_encoding_matches_full_forward(tiny_speech: SpeechTokenizer) -> None:
    """Encoding 200-frame blocks against a key/value cache equals the masked full forward."""
    batch = tiny_speech.features.batch([speech_like(10.0, seed=9)], 1280)
    full = tiny_speech.model(batch.input_features, batch.attention_mask)
    cache = EncoderCache()
    pooled, ids = [], []
    with torch.inference_mode():
        for start in range(0, 500, 200):
            p, i = tiny_speech.model.forward_block(
                batch.input_features, start, min(start + 200, 500), cache
            )
            pooled.append(p)
            ids.append(i)
    torch.testing.assert_close(torch.cat(pooled, 1), full.prequant_hidden, rtol=0, atol=1e-5)
    assert torch.equal(torch.cat(ids, 1), full.quantized_token_ids)


def test_encoder_is_block_causal(tiny_speech: SpeechTokenizer) -> None:
    """Tokens of a completed block do not change when later frames are appended."""
    features = tiny_speech.features.batch([speech_like(8.0, seed=10)], 1280).input_features
    prefix = tiny_speech.model(features[..., :400]).quantized_token_ids  # first block: 200 frames
    full = tiny_speech.model(features).quantized_token_ids
    assert torch.equal(prefix, full[:, :50])


# --- streaming --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "chunk"),
    [(3.0, 320), (9.3, 160), (9.3, 7_777), (30.0 + 1270 / SR, 4_000), (33.7, 16_000)],
)
def test_streaming_equals_one_shot(
    tiny_speech: SpeechTokenizer, seconds: float, chunk: int
) -> None:
    audio = speech_like(seconds, seed=11)
    pushed, final = stream(tiny_speech, audio, chunk)
    assert final == tiny_speech.tokenize(audio)
    assert pushed == final[: len(pushed)]


def test_push_emits_each_block_when_its_audio_is_complete(tiny_speech: SpeechTokenizer) -> None:
    audio = speech_like(9.0, seed=12)
    streamer = tiny_speech.streaming()
    # Block 0 reads mel frames 0..398; frame 398 is complete at 398 * 160 + 200 samples.
    assert streamer.push(audio[: 398 * 160 + 199]) == []
    first = streamer.push(audio[398 * 160 + 199 : 398 * 160 + 200])
    assert len(first) == 50


def test_finish_encodes_only_the_last_block_when_the_floor_is_known(
    tiny_speech: SpeechTokenizer,
) -> None:
    audio = speech_like(9.5, seed=13, loud=(0.2, 0.7))
    streamer = tiny_speech.streaming()
    for start in range(0, len(audio), 320):
        streamer.push(audio[start : start + 320])
    tokens = streamer.finish()
    assert tokens == tiny_speech.tokenize(audio)
    assert streamer.stats.last_finish_blocks == 1
    assert streamer.stats.blocks_reencoded == 0


def test_streaming_stays_exact_when_the_loudest_audio_comes_last(
    tiny_speech: SpeechTokenizer,
) -> None:
    """A louder ending raises the log-mel floor of earlier blocks; finish re-encodes them."""
    audio = speech_like(9.5, seed=14, loud=(8.5, 9.5))
    streamer = tiny_speech.streaming()
    for start in range(0, len(audio), 320):
        streamer.push(audio[start : start + 320])
    assert streamer.finish() == tiny_speech.tokenize(audio)
    assert streamer.stats.blocks_reencoded >= 2


def test_pushed_tokens_are_final_when_later_audio_is_quieter(tiny_speech: SpeechTokenizer) -> None:
    loud = speech_like(4.5, seed=15, loud=(0.0, 4.5))
    quiet = speech_like(5.0, seed=16)
    streamer = tiny_speech.streaming()
    first = streamer.push(loud)
    assert len(first) == 50
    streamer.push(quiet)
    assert streamer.finish()[:50] == first


def test_short_last_segment_is_padded_like_in_the_reference_batch(
    tiny_speech: SpeechTokenizer,
) -> None:
    """After 30 s the last segment shares a batch with full ones, so it is zero-padded to 30 s.

    A click in its last samples is reflected into its last frame when the segment is padded only
    to a whole token, but not when it is padded to 30 s; streaming must follow the batch.
    """
    audio = speech_like(30.0 + 2550 / SR, seed=11)
    audio[-40:] = np.random.default_rng(0).uniform(-0.9, 0.9, 40)
    assert stream(tiny_speech, audio, 4_000)[1] == tiny_speech.tokenize(audio)


def test_official_size_state_dict_matches_the_released_key_list(golden_dir: Path) -> None:
    config_dict = tiny_config_dict(d_model=1280, heads=20, ffn=5120, layers=32)
    config_dict.update(quantize_position=16, pooling_position=16)
    with torch.device("meta"):
        model = WhisperVQEncoder(SpeechTokenizerConfig.from_dict(config_dict))
    ours = {key: list(t.shape) for key, t in model.state_dict().items()}
    listed = (golden_dir / "speech_tokenizer" / "state_dict_keys_real_inferred.txt").read_text()
    official = {}
    for line in listed.splitlines():
        if line.strip():
            key, shape, _ = line.split("\t")
            official[key] = json.loads(shape)
    assert ours == official


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_reference_tokens_on_cuda(golden_dir: Path) -> None:
    folder = golden_dir / "speech_tokenizer"
    tokenizer = SpeechTokenizer.from_pretrained(folder, device="cuda")
    waves = [np.load(folder / "wav_a_16k.npy"), np.load(folder / "wav_b_16k.npy")]
    expected = [np.load(folder / f"batch_tokens_utt{i}.npy").tolist() for i in range(2)]
    assert tokenizer.extract([(w, SR) for w in waves]) == expected
    assert stream(tokenizer, waves[1], 320)[1] == expected[1]
