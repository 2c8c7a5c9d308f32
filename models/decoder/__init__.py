"""GLM-4-Voice speech decoder: audio tokens -> flow mel -> HiFT waveform.

`AudioDecoder` reproduces the reference decoder (offline, 10-token `stream_inference`, the web
demo's block schedule via `ReferenceStreamer`); `StreamingDecoder` is the bounded-cost
low-latency streaming path; `log_mel_distance` measures streamed against offline audio.
"""

from models.decoder.audio_decoder import (
    DEMO_BLOCK_SIZES,
    AudioDecoder,
    DecoderStream,
    MelGenerator,
    ReferenceStreamer,
    schedule_blocks,
)
from models.decoder.quality import MelDistance, log_mel, log_mel_distance
from models.decoder.streaming import FastStream, StreamingConfig, StreamingDecoder

__all__ = [
    "DEMO_BLOCK_SIZES",
    "AudioDecoder",
    "DecoderStream",
    "FastStream",
    "MelDistance",
    "MelGenerator",
    "ReferenceStreamer",
    "StreamingConfig",
    "StreamingDecoder",
    "log_mel",
    "log_mel_distance",
    "schedule_blocks",
]
