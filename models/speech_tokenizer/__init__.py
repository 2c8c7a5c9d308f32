"""GLM-4-Voice speech tokenizer (Whisper-VQ encoder): 16 kHz speech -> 12.5 token ids per second."""

from .configuration_speech_tokenizer import (
    ConfigError,
    FeatureExtractorConfig,
    SpeechTokenizerConfig,
)
from .feature_extractor import SpeechFeatureExtractor, mel_filter_bank
from .modeling_speech_tokenizer import (
    CheckpointError,
    EncoderCache,
    WhisperVQEncoder,
    WhisperVQEncoderOutput,
)
from .resample import resample
from .streaming import StreamingSpeechTokenizer, StreamingStats
from .tiny import write_tiny_tokenizer
from .tokenizer import SpeechTokenizer

__all__ = [
    "CheckpointError",
    "ConfigError",
    "EncoderCache",
    "FeatureExtractorConfig",
    "SpeechFeatureExtractor",
    "SpeechTokenizer",
    "SpeechTokenizerConfig",
    "StreamingSpeechTokenizer",
    "StreamingStats",
    "WhisperVQEncoder",
    "WhisperVQEncoderOutput",
    "mel_filter_bank",
    "resample",
    "write_tiny_tokenizer",
]
