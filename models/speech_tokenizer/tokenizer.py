"""Audio in, GLM-4-Voice speech token ids out (the reference `extract_speech_token` behaviour).

Each utterance: first channel only, resampled to 16 kHz if needed, cut into independent 30 s
segments; segments are tokenized in batches of up to 128, each batch right-padded to its longest
segment rounded up to 1280 samples (one token); tokens that start in padding are dropped and the
segments' tokens concatenated.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .configuration_speech_tokenizer import (
    CONFIG_NAME,
    FEATURE_CONFIG_NAME,
    ConfigError,
    FeatureExtractorConfig,
    SpeechTokenizerConfig,
)
from .feature_extractor import SpeechFeatureExtractor
from .modeling_speech_tokenizer import WEIGHTS_NAME, WhisperVQEncoder, load_checked_state_dict
from .resample import resample

if TYPE_CHECKING:
    from .streaming import StreamingSpeechTokenizer

logger = logging.getLogger(__name__)

SEGMENT_BATCH_SIZE = 128  # segments per forward, as in the reference
# More "channels" than this (and than samples) means a (samples, channels) array was passed.
MAX_CHANNELS = 8


def as_float_audio(audio: np.ndarray) -> np.ndarray:
    """`audio` as float32 samples in [-1, 1]: signed integer PCM is scaled by its full range
    (int16 / 32768, as `torchaudio.load` reads it); NaN or infinite samples are rejected."""
    audio = np.asarray(audio)
    if np.issubdtype(audio.dtype, np.signedinteger):
        scale = float(np.iinfo(audio.dtype).max) + 1.0
        return (audio.astype(np.float64) / scale).astype(np.float32)
    if not np.issubdtype(audio.dtype, np.floating):
        raise ValueError(f"audio must be float or signed integer PCM, got dtype {audio.dtype}")
    audio = audio.astype(np.float32, copy=False)
    if not np.isfinite(audio).all():
        raise ValueError("audio contains NaN or infinite samples")
    return audio


def split_segments(audio: np.ndarray, segment_samples: int) -> list[np.ndarray]:
    """Consecutive non-overlapping segments; the last one may be shorter (none for empty audio)."""
    return [audio[i : i + segment_samples] for i in range(0, len(audio), segment_samples)]


class SpeechTokenizer:
    """GLM-4-Voice-Tokenizer: 16 kHz speech -> 12.5 ids/s in [0, quantize_vocab_size)."""

    def __init__(
        self,
        config: SpeechTokenizerConfig,
        feature_config: FeatureExtractorConfig,
        model: WhisperVQEncoder,
    ) -> None:
        if config.num_mel_bins != feature_config.feature_size:
            raise ConfigError(
                f"num_mel_bins {config.num_mel_bins} != feature_size {feature_config.feature_size}"
            )
        self.config = config
        self.feature_config = feature_config
        self.model = model.eval()
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.features = SpeechFeatureExtractor(feature_config).to(self.device)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> SpeechTokenizer:
        """Loads `config.json`, `preprocessor_config.json` and `model.safetensors` from `path`."""
        path = Path(path)
        config = SpeechTokenizerConfig.from_file(path / CONFIG_NAME)
        feature_config = FeatureExtractorConfig.from_file(path / FEATURE_CONFIG_NAME)
        with torch.device("meta"):
            model = WhisperVQEncoder(config)
        model = model.to_empty(device="cpu")
        load_checked_state_dict(model, path / WEIGHTS_NAME)
        model = model.to(device=device, dtype=dtype)
        logger.info(
            "speech tokenizer loaded from %s (d_model %d, %d layers, %s, %s)",
            path,
            config.d_model,
            config.quantize_position,
            device,
            dtype,
        )
        return cls(config, feature_config, model)

    @property
    def sampling_rate(self) -> int:
        return self.feature_config.sampling_rate

    @property
    def samples_per_token(self) -> int:
        """Input samples per token: stem stride x pooling x hop (1280 = 80 ms)."""
        return (
            self.model.stem_stride
            * self.config.pooling_kernel_size
            * self.feature_config.hop_length
        )

    @property
    def token_rate_hz(self) -> float:
        return self.sampling_rate / self.samples_per_token

    @property
    def segment_samples(self) -> int:
        """Samples per independently tokenized segment (30 s)."""
        return self.feature_config.n_samples

    def prepare_audio(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        """1-D float32 at 16 kHz from (samples,) or (channels, samples) audio at `sample_rate`.

        Only the first channel is used (no down-mix), as in the reference. Integer PCM is
        scaled to [-1, 1]; NaN samples, (samples, channels) arrays and non-integer rates raise.
        """
        audio = as_float_audio(audio)
        if audio.ndim == 2:
            if audio.shape[0] > max(audio.shape[1], MAX_CHANNELS):
                raise ValueError(
                    f"audio of shape {audio.shape} looks like (samples, channels); "
                    "pass (channels, samples), e.g. audio.T"
                )
            audio = audio[0] if audio.shape[0] else audio.reshape(-1)
        if audio.ndim != 1:
            raise ValueError(f"audio must be (samples,) or (channels, samples), got {audio.shape}")
        if isinstance(sample_rate, float) and sample_rate.is_integer():
            sample_rate = int(sample_rate)
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)):
            raise ValueError(f"sample rate must be a whole number of Hz, got {sample_rate!r}")
        return resample(audio, int(sample_rate), self.sampling_rate)

    @torch.inference_mode()
    def tokenize_segments(
        self, segments: list[np.ndarray], length: int | None = None
    ) -> list[list[int]]:
        """Token ids of 16 kHz segments tokenized together as one padded batch.

        length: padded batch length in samples (default: longest rounded up to a token).
        """
        batch = self.features.batch(segments, self.samples_per_token, length)
        out = self.model(batch.input_features.to(self.dtype), batch.attention_mask)
        ids = out.quantized_token_ids.cpu()
        valid = out.token_mask.cpu()
        return [ids[row][valid[row]].tolist() for row in range(len(segments))]

    def extract(
        self, utts: list[tuple[np.ndarray, int]], batch_size: int = SEGMENT_BATCH_SIZE
    ) -> list[list[int]]:
        """Token ids of each (audio, sample_rate) utterance, as the reference computes them."""
        segments: list[np.ndarray] = []
        owners: list[int] = []
        for index, (audio, sample_rate) in enumerate(utts):
            for segment in split_segments(
                self.prepare_audio(audio, sample_rate), self.segment_samples
            ):
                segments.append(segment)
                owners.append(index)
        tokens: list[list[int]] = [[] for _ in utts]
        for start in range(0, len(segments), batch_size):
            batch_ids = self.tokenize_segments(segments[start : start + batch_size])
            for owner, ids in zip(owners[start : start + batch_size], batch_ids, strict=True):
                tokens[owner].extend(ids)
        return tokens

    def tokenize(self, audio_16k: np.ndarray) -> list[int]:
        """Token ids of one 16 kHz mono utterance."""
        return self.extract([(audio_16k, self.sampling_rate)])[0]

    def streaming(self) -> StreamingSpeechTokenizer:
        """A fresh incremental tokenizer sharing this model (one per audio stream)."""
        from .streaming import StreamingSpeechTokenizer

        return StreamingSpeechTokenizer(self)


__all__ = ["SEGMENT_BATCH_SIZE", "SpeechTokenizer", "as_float_audio", "split_segments"]
