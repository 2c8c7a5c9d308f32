"""HiFT vocoder of the GLM-4-Voice decoder (mel -> 22.05 kHz waveform)."""

from models.hift.configuration_hift import F0PredictorConfig, HiFTConfig
from models.hift.modeling_hift import (
    HiFTGenerator,
    HiFTTrace,
    SourceDraws,
    load_state_dict_strict,
)
from models.hyperyaml import HyperNode, HyperYamlError, load_hyperyaml, parse_hyperyaml

__all__ = [
    "F0PredictorConfig",
    "HiFTConfig",
    "HiFTGenerator",
    "HiFTTrace",
    "HyperNode",
    "HyperYamlError",
    "SourceDraws",
    "load_hyperyaml",
    "load_state_dict_strict",
    "parse_hyperyaml",
]
