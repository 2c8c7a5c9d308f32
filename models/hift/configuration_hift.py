"""Typed configuration of the HiFT vocoder, read from the `hift:` section of the decoder's
official `config.yaml` (HyperPyYAML, parsed without executing it)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.hyperyaml import HyperNode, HyperYamlError, load_hyperyaml

__all__ = ["F0PredictorConfig", "HiFTConfig"]

_INT_LIST_KEYS = (
    "upsample_rates",
    "upsample_kernel_sizes",
    "resblock_kernel_sizes",
    "source_resblock_kernel_sizes",
)
HIFT_TARGET = "cosyvoice.hifigan.generator.HiFTGenerator"
F0_PREDICTOR_TARGET = "cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor"


@dataclass(frozen=True)
class F0PredictorConfig:
    """ConvRNNF0Predictor: 5 weight-normed k3 convs with ELU, then Linear -> |f0| in Hz."""

    num_class: int = 1
    in_channels: int = 80
    cond_channels: int = 512
    num_layers: int = 5  # fixed in the reference class, not a config field


@dataclass(frozen=True)
class HiFTConfig:
    """HiFTGenerator hyper-parameters (defaults are the official GLM-4-Voice values)."""

    in_channels: int = 80
    base_channels: int = 512
    nb_harmonics: int = 8  # harmonics above the fundamental; SineGen makes nb_harmonics + 1 sines
    sampling_rate: int = 22050
    nsf_alpha: float = 0.1  # sine amplitude; unvoiced noise std is nsf_alpha / 3
    nsf_sigma: float = 0.003  # noise std on voiced samples
    nsf_voiced_threshold: float = 10.0  # f0 (Hz) above which a sample counts as voiced
    upsample_rates: tuple[int, ...] = (8, 8)
    upsample_kernel_sizes: tuple[int, ...] = (16, 16)
    istft_n_fft: int = 16
    istft_hop_len: int = 4
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    source_resblock_kernel_sizes: tuple[int, ...] = (7, 11)
    source_resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5))
    lrelu_slope: float = 0.1  # used inside the upsampling stages only (conv_post uses 0.01)
    audio_limit: float = 0.99  # output clamp
    f0_predictor: F0PredictorConfig = F0PredictorConfig()

    def __post_init__(self) -> None:
        self._validate()

    def _validate(self) -> None:
        if len(self.upsample_rates) != len(self.upsample_kernel_sizes):
            raise ValueError("upsample_rates and upsample_kernel_sizes differ in length")
        if len(self.resblock_kernel_sizes) != len(self.resblock_dilation_sizes):
            raise ValueError("resblock kernel and dilation lists differ in length")
        if len(self.source_resblock_kernel_sizes) != len(self.upsample_rates):
            raise ValueError("need one source resblock per upsampling stage")
        if len(self.source_resblock_dilation_sizes) != len(self.upsample_rates):
            raise ValueError("need one source resblock dilation list per upsampling stage")
        if self.base_channels % (2 ** len(self.upsample_rates)) != 0:
            raise ValueError("base_channels must halve cleanly at every upsampling stage")
        if self.f0_predictor.in_channels != self.in_channels:
            raise ValueError("f0_predictor.in_channels must equal in_channels (both read the mel)")
        if self.f0_predictor.num_class != 1:
            raise ValueError("only a single f0 output (num_class 1) is supported")

    @property
    def upsample_factor(self) -> int:
        """Waveform samples per mel frame (8 * 8 * 4 = 256 = the mel hop)."""
        return math.prod(self.upsample_rates) * self.istft_hop_len

    @property
    def n_bins(self) -> int:
        """One-sided STFT bins: magnitude and phase channels each have this many."""
        return self.istft_n_fft // 2 + 1

    @classmethod
    def from_section(cls, section: HyperNode | dict[str, Any]) -> HiFTConfig:
        """Build from the parsed `hift:` node; unknown keys are an error (no silent drift)."""
        kwargs = dict(_node_kwargs(section, HIFT_TARGET))
        f0_kwargs = dict(_node_kwargs(kwargs.pop("f0_predictor", {}), F0_PREDICTOR_TARGET))
        istft = kwargs.pop("istft_params", {})
        unknown = set(kwargs) - {f for f in cls.__dataclass_fields__ if not f.startswith("istft")}
        unknown |= set(istft) - {"n_fft", "hop_len"}
        if unknown:
            raise HyperYamlError(f"unknown hift config keys: {sorted(unknown)}")
        for key in _INT_LIST_KEYS:
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        for key in ("resblock_dilation_sizes", "source_resblock_dilation_sizes"):
            if key in kwargs:
                kwargs[key] = tuple(tuple(d) for d in kwargs[key])
        if "n_fft" in istft:
            kwargs["istft_n_fft"] = istft["n_fft"]
        if "hop_len" in istft:
            kwargs["istft_hop_len"] = istft["hop_len"]
        return cls(**kwargs, f0_predictor=F0PredictorConfig(**f0_kwargs))

    @classmethod
    def from_yaml(cls, path: str | Path) -> HiFTConfig:
        """Read the `hift:` section of a decoder `config.yaml`."""
        data = load_hyperyaml(path)
        if "hift" not in data:
            raise HyperYamlError(f"{path}: no 'hift' section")
        try:
            return cls.from_section(data["hift"])
        except (TypeError, ValueError) as exc:
            raise HyperYamlError(f"{path}: hift section: {exc}") from exc


def _node_kwargs(node: HyperNode | dict[str, Any], expected_target: str) -> dict[str, Any]:
    if isinstance(node, HyperNode):
        if node.target != expected_target:
            raise HyperYamlError(
                f"expected !new:{expected_target}, found !{node.kind}:{node.target}"
            )
        if node.args:
            raise HyperYamlError(f"{expected_target}: positional arguments are not supported")
        return node.kwargs
    if isinstance(node, dict):
        return node
    raise HyperYamlError(f"{expected_target}: expected a mapping, found {type(node).__name__}")
