"""GLM-4-Voice-9B language model: ChatGLM checkpoint loading into `GlmForCausalLM`, tokenizer,
prompts, sampling and step-wise decoding."""

from models.lm.configuration_lm import ChatGLMConfig, ConfigError
from models.lm.loading import (
    CheckpointError,
    ReferenceOrderRMSNorm,
    check_checkpoint,
    convert_tensor,
    expected_shapes,
    load_lm,
)
from models.lm.prompt import (
    SPEECH_SYSTEM_PROMPT,
    TEXT_SYSTEM_PROMPT,
    InputMode,
    audio_tokens_text,
    build_prompt,
    build_prompt_ids,
    canonical_ids,
    history_after_reply,
    history_ids_after_reply,
    system_prompt,
)
from models.lm.sampling import (
    DecodeState,
    LMBackend,
    LMStepper,
    SamplingConfig,
    generate,
    positions_from_mask,
    sample_next,
    top_p_filter,
)
from models.lm.tiny import build_random_lm, write_tiny_lm
from models.lm.tokenization import (
    GLM4VoiceTokenizer,
    TextStreamDecoder,
    TokenizerError,
    audio_token,
)

__all__ = [
    "SPEECH_SYSTEM_PROMPT",
    "TEXT_SYSTEM_PROMPT",
    "ChatGLMConfig",
    "CheckpointError",
    "ConfigError",
    "DecodeState",
    "GLM4VoiceTokenizer",
    "InputMode",
    "LMBackend",
    "LMStepper",
    "ReferenceOrderRMSNorm",
    "SamplingConfig",
    "TextStreamDecoder",
    "TokenizerError",
    "audio_token",
    "build_random_lm",
    "audio_tokens_text",
    "build_prompt",
    "build_prompt_ids",
    "canonical_ids",
    "check_checkpoint",
    "convert_tensor",
    "expected_shapes",
    "generate",
    "history_after_reply",
    "history_ids_after_reply",
    "load_lm",
    "positions_from_mask",
    "sample_next",
    "system_prompt",
    "top_p_filter",
    "write_tiny_lm",
]
