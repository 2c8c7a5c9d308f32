"""Prometheus metrics for conversations (exposed over HTTP by the signaling server)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

SESSIONS_ACTIVE = Gauge("voice_agent_sessions_active", "Conversations currently connected")
SESSIONS_TOTAL = Counter("voice_agent_sessions_total", "Conversations started")
TURNS_TOTAL = Counter("voice_agent_turns_total", "User turns answered", ["kind"])
INTERRUPTIONS_TOTAL = Counter("voice_agent_interruptions_total", "Answers cut short", ["reason"])
FIRST_AUDIO_SECONDS = Histogram(
    "voice_agent_first_audio_seconds",
    "From the user's actual stop to the first answer audio frame leaving the server",
    buckets=(0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0),
)
ENGINE_ERRORS_TOTAL = Counter("voice_agent_engine_errors_total", "Replies that failed")

__all__ = [
    "ENGINE_ERRORS_TOTAL",
    "FIRST_AUDIO_SECONDS",
    "INTERRUPTIONS_TOTAL",
    "SESSIONS_ACTIVE",
    "SESSIONS_TOTAL",
    "TURNS_TOTAL",
]
