"""Flow-matching speech decoder of GLM-4-Voice: speech tokens -> 80-bin mel at 22050/256 Hz.

    flow = FlowDecoder.from_pretrained(decoder_dir)          # config.yaml + flow.pt, eval mode
    mel = flow.inference(token, prompt_token, prompt_feat, embedding)   # (1, 80, F_new)

Pieces for streaming callers: `encode` / `encode_chunk` (exact incremental encoder with a
block cache), `prepare` (mu, cond, mask, spks), `decoder(...)` (the CFM sampler, with
`guided_velocity` running both CFG passes as one batch) and `estimator` (the U-Net).
"""

from models.flow.cfm import ConditionalCFM, EulerTrace, reference_noise, time_grid
from models.flow.config import (
    CFMConfig,
    EncoderConfig,
    EstimatorConfig,
    FlowConfig,
    FlowConfigError,
    LengthRegulatorConfig,
)
from models.flow.encoder import BlockConformerEncoder, EncoderCache
from models.flow.estimator import ConditionalDecoder
from models.flow.length_regulator import InterpolateRegulator
from models.flow.model import CheckpointError, FlowDecoder, SamplerInputs, mel_frames_for_tokens

__all__ = [
    "BlockConformerEncoder",
    "CFMConfig",
    "CheckpointError",
    "ConditionalCFM",
    "ConditionalDecoder",
    "EncoderCache",
    "EncoderConfig",
    "EstimatorConfig",
    "EulerTrace",
    "FlowConfig",
    "FlowConfigError",
    "FlowDecoder",
    "InterpolateRegulator",
    "LengthRegulatorConfig",
    "SamplerInputs",
    "mel_frames_for_tokens",
    "reference_noise",
    "time_grid",
]
