"""Pure, synchronous, frame-in/frame-out signal processing (numpy only).

Resampling, re-framing, echo cancellation, voice activity detection and turn endpointing. Nothing here knows about
asyncio, WebRTC or models, so every piece is tested with plain arrays.
"""

from audio_dsp.aec import (
    AlignedEchoCanceller,
    EchoCanceller,
    EchoCancellerUnavailable,
    FarEndBuffer,
    NullCanceller,
    SpeexCanceller,
    WebRtcAec3Canceller,
    available_backends,
    create_canceller,
)
from audio_dsp.endpointer import (
    Endpointer,
    EndpointerConfig,
    EndpointerEvent,
    SpeechEnded,
    SpeechPaused,
    SpeechResumed,
    SpeechStarted,
)
from audio_dsp.frames import FrameChunker, frame_samples
from audio_dsp.resample import (
    StreamResampler,
    float32_to_int16,
    int16_to_float32,
    to_mono_float32,
)
from audio_dsp.vad import VoiceActivityDetector

__all__ = [
    "AlignedEchoCanceller",
    "EchoCanceller",
    "EchoCancellerUnavailable",
    "FarEndBuffer",
    "NullCanceller",
    "SpeexCanceller",
    "WebRtcAec3Canceller",
    "available_backends",
    "create_canceller",
    "Endpointer",
    "EndpointerConfig",
    "EndpointerEvent",
    "FrameChunker",
    "SpeechEnded",
    "SpeechPaused",
    "SpeechResumed",
    "SpeechStarted",
    "StreamResampler",
    "VoiceActivityDetector",
    "float32_to_int16",
    "frame_samples",
    "int16_to_float32",
    "to_mono_float32",
]
