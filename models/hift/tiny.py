"""A tiny random-weight HiFT in the official file format, for tests and benchmarks on CPU.

`write_tiny_hift` writes `hift.pt` (official key names, legacy `weight_g`/`weight_v`) and
`tiny_hift_yaml_section` returns the matching `hift:` section of `config.yaml` in the official
HyperPyYAML form. The section refers to `<sample_rate>`, so the assembled config must define
the top-level `sample_rate` key as the official file does.

The weights are random but shaped so the output behaves like speech-range audio: f0 lands in
the 100-200 Hz range and the log-magnitudes stay far
below the clip, so the waveform is neither silent nor clamped.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from models.hift.configuration_hift import F0PredictorConfig, HiFTConfig
from models.hift.modeling_hift import WEIGHTS_FILE, HiFTGenerator

__all__ = ["tiny_hift_config", "tiny_hift_yaml_section", "write_tiny_hift"]


def tiny_hift_config(base_channels: int = 16, cond_channels: int = 16) -> HiFTConfig:
    """Official HiFT hyper-parameters with only the channel widths shrunk."""
    return replace(
        HiFTConfig(),
        base_channels=base_channels,
        f0_predictor=F0PredictorConfig(cond_channels=cond_channels),
    )


def _fmt_list(values: tuple) -> str:
    return "[" + ", ".join(_fmt_list(v) if isinstance(v, tuple) else str(v) for v in values) + "]"


def tiny_hift_yaml_section(base_channels: int = 16, cond_channels: int = 16) -> str:
    """The `hift:` section of `config.yaml` (official layout) for `tiny_hift_config`."""
    c = tiny_hift_config(base_channels, cond_channels)
    f0 = c.f0_predictor
    lines = [
        "hift: !new:cosyvoice.hifigan.generator.HiFTGenerator",
        f"    in_channels: {c.in_channels}",
        f"    base_channels: {c.base_channels}",
        f"    nb_harmonics: {c.nb_harmonics}",
        "    sampling_rate: !ref <sample_rate>",
        f"    nsf_alpha: {c.nsf_alpha}",
        f"    nsf_sigma: {c.nsf_sigma}",
        f"    nsf_voiced_threshold: {c.nsf_voiced_threshold:g}",
        f"    upsample_rates: {_fmt_list(c.upsample_rates)}",
        f"    upsample_kernel_sizes: {_fmt_list(c.upsample_kernel_sizes)}",
        "    istft_params:",
        f"        n_fft: {c.istft_n_fft}",
        f"        hop_len: {c.istft_hop_len}",
        f"    resblock_kernel_sizes: {_fmt_list(c.resblock_kernel_sizes)}",
        f"    resblock_dilation_sizes: {_fmt_list(c.resblock_dilation_sizes)}",
        f"    source_resblock_kernel_sizes: {_fmt_list(c.source_resblock_kernel_sizes)}",
        f"    source_resblock_dilation_sizes: {_fmt_list(c.source_resblock_dilation_sizes)}",
        f"    lrelu_slope: {c.lrelu_slope}",
        f"    audio_limit: {c.audio_limit}",
        "    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor",
        f"        num_class: {f0.num_class}",
        f"        in_channels: {f0.in_channels}",
        f"        cond_channels: {f0.cond_channels}",
    ]
    return "\n".join(lines) + "\n"


def _randomize(model: HiFTGenerator, generator: torch.Generator) -> None:
    """Random weights with a speech-like operating point (see the module docstring)."""
    for name, param in model.named_parameters():
        if name.endswith("weight_v") or (name.endswith("weight") and param.ndim > 1):
            fan_in = param[0].numel() if not name.startswith("ups") else param.shape[0]
            param.copy_(torch.randn(param.shape, generator=generator) / fan_in**0.5)
        elif name.endswith("weight_g"):
            param.copy_(0.6 + 0.6 * torch.rand(param.shape, generator=generator))
        elif name.endswith("alpha"):
            param.copy_(0.5 + torch.rand(param.shape, generator=generator))
        else:
            param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    classifier = model.f0_predictor.classifier
    classifier.weight.mul_(30.0 * classifier.weight.shape[1] ** 0.5 / 8)
    classifier.bias.fill_(120.0)
    model.conv_post.weight_g.mul_(0.25)
    model.conv_post.bias.add_(-0.5)


def write_tiny_hift(
    out_dir: str | Path, seed: int = 0, base_channels: int = 16, cond_channels: int = 16
) -> Path:
    """Write a random-weight `hift.pt` for `tiny_hift_config(...)` into out_dir; returns it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = HiFTGenerator(tiny_hift_config(base_channels, cond_channels))
    with torch.no_grad():
        _randomize(model, torch.Generator().manual_seed(seed))
    path = out_dir / WEIGHTS_FILE
    torch.save(model.state_dict(), path)
    return path
