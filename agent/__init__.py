"""Conversations: sessions, the outbound audio track, turn-taking and the events channel.

Importing `agent` is cheap: the names below load their modules (and aiortc) on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "AgentAudioTrack": "agent.tracks",
    "AUDIO_PTIME": "agent.tracks",
    "OUTPUT_SAMPLE_RATE": "agent.tracks",
    "EchoCanceller": "agent.session",
    "Session": "agent.session",
    "SessionConfig": "agent.session",
    "TurnConfig": "agent.turns",
    "TurnManager": "agent.turns",
    "TurnRecord": "agent.turns",
    "EventChannel": "agent.messages",
}

if TYPE_CHECKING:
    from agent.messages import EventChannel
    from agent.session import EchoCanceller, Session, SessionConfig
    from agent.tracks import AUDIO_PTIME, OUTPUT_SAMPLE_RATE, AgentAudioTrack
    from agent.turns import TurnConfig, TurnManager, TurnRecord


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'agent' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "AUDIO_PTIME",
    "OUTPUT_SAMPLE_RATE",
    "AgentAudioTrack",
    "EchoCanceller",
    "EventChannel",
    "Session",
    "SessionConfig",
    "TurnConfig",
    "TurnManager",
    "TurnRecord",
]
