"""A complete tiny random-weight decoder folder (config.yaml, flow.pt, hift.pt) in the official
file formats, for CPU tests and benchmarks."""

from __future__ import annotations

from pathlib import Path

from models.flow.tiny import tiny_flow_yaml_section, write_tiny_decoder_flow
from models.hift.tiny import tiny_hift_yaml_section, write_tiny_hift

__all__ = ["write_tiny_decoder"]

SAMPLE_RATE = 22050


def write_tiny_decoder(
    out_dir: str | Path, seed: int = 0, hift_channels: int = 16, **flow_sizes: int
) -> Path:
    """Write `config.yaml` (sample_rate + flow + hift sections), `flow.pt` and `hift.pt` into
    out_dir, loadable by `AudioDecoder.from_pretrained(out_dir)`; returns out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = "\n".join(
        [
            f"sample_rate: {SAMPLE_RATE}",
            "",
            tiny_flow_yaml_section(**flow_sizes),
            tiny_hift_yaml_section(base_channels=hift_channels, cond_channels=hift_channels),
        ]
    )
    (out_dir / "config.yaml").write_text(config, encoding="utf-8")
    write_tiny_decoder_flow(out_dir, seed=seed, **flow_sizes)
    write_tiny_hift(out_dir, seed=seed, base_channels=hift_channels, cond_channels=hift_channels)
    return out_dir
