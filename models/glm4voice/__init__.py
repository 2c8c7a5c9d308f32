"""The GLM-4-Voice engine: speech tokenizer -> GLM-4-Voice-9B -> flow decoder + HiFT."""

from models.glm4voice.engine import (
    EngineOptions,
    GLM4VoiceEngine,
    GLM4VoiceReply,
    history_prefix,
    load_engine,
)
from models.glm4voice.paths import ModelFilesError, ModelPaths, resolve_model_paths
from models.glm4voice.static_batch import StaticCacheConfig
from models.glm4voice.tokens import TokenConstraints, TokenPattern
from models.glm4voice.worker import TurnListener, WarmUpReport

__all__ = [
    "EngineOptions",
    "GLM4VoiceEngine",
    "GLM4VoiceReply",
    "ModelFilesError",
    "ModelPaths",
    "StaticCacheConfig",
    "TokenConstraints",
    "TokenPattern",
    "TurnListener",
    "WarmUpReport",
    "history_prefix",
    "load_engine",
    "resolve_model_paths",
]
