"""Tiny random-weight flow decoder in the official file formats, for CPU tests and demos.

`tiny_flow_yaml_section(...)` returns the `flow:` section of a decoder `config.yaml` (official
HyperPyYAML layout, small sizes); `write_tiny_decoder_flow(out_dir, ...)` writes the matching
`flow.pt` (a plain pickled state dict with the official key names). The caller assembles
`config.yaml` from this section and the vocoder's `hift:` section.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from models.flow.config import FlowConfig
from models.flow.encoder import BlockRelPositionAttention
from models.flow.model import FlowDecoder

__all__ = ["randomize_flow_weights", "tiny_flow_yaml_section", "write_tiny_decoder_flow"]

logger = logging.getLogger(__name__)


def tiny_flow_yaml_section(
    d_model: int = 32,
    attention_heads: int = 2,
    linear_units: int = 64,
    num_blocks: int = 2,
    block_size: int = 10,
    estimator_channels: int = 32,
    attention_head_dim: int = 16,
    n_blocks: int = 1,
    num_mid_blocks: int = 1,
    num_heads: int = 2,
    vocab_size: int = 16384,
) -> str:
    """The `flow:` section of a decoder config.yaml with small sizes (official keys and tags).

    `spk_embed_dim` is written as the literal 192 so that the section stands on its own.
    """
    return f"""flow: !new:cosyvoice.flow.flow.MaskedDiffWithXvec
    input_size: {d_model}
    output_size: 80
    spk_embed_dim: 192
    output_type: 'mel'
    vocab_size: {vocab_size}
    input_frame_rate: 12.5
    only_mask_loss: True
    encoder: !new:cosyvoice.transformer.encoder.BlockConformerEncoder
        output_size: {d_model}
        attention_heads: {attention_heads}
        linear_units: {linear_units}
        num_blocks: {num_blocks}
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0.1
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'block_rel_selfattn'
        block_size: {block_size}
        input_size: {d_model}
        use_cnn_module: False
        macaron_style: False
    length_regulator: !new:cosyvoice.flow.length_regulator.InterpolateRegulator
        channels: 80
        sampling_ratios: [1, 1, 1, 1]
    decoder: !new:cosyvoice.flow.flow_matching.ConditionalCFM
        in_channels: 240
        n_spks: 1
        spk_emb_dim: 80
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                solver: 'euler'
                t_scheduler: 'cosine'
                training_cfg_rate: 0.2
                inference_cfg_rate: 0.7
                reg_loss_type: 'l1'
        estimator: !new:cosyvoice.flow.decoder.ConditionalDecoder
            in_channels: 320
            out_channels: 80
            channels: [{estimator_channels}, {estimator_channels}]
            dropout: 0
            attention_head_dim: {attention_head_dim}
            n_blocks: {n_blocks}
            num_mid_blocks: {num_mid_blocks}
            num_heads: {num_heads}
            act_fn: 'gelu'
"""


def randomize_flow_weights(model: FlowDecoder, seed: int = 0) -> FlowDecoder:
    """Overwrite every parameter with seeded random values of a sensible scale, in place.

    Weights ~ N(0, 1/fan_in), biases ~ N(0, 0.05^2), norm scales ~ 1 + N(0, 0.1^2), relative
    position biases ~ N(0, 0.1^2), the token embedding ~ N(0, 1). Returns `model`.
    """
    generator = torch.Generator().manual_seed(seed)

    def normal(shape: torch.Size, std: float, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(shape, generator=generator) * std + mean

    with torch.no_grad():
        for module in model.modules():
            for name, param in module.named_parameters(recurse=False):
                if isinstance(module, nn.Embedding):
                    value = normal(param.shape, 1.0)
                elif isinstance(module, BlockRelPositionAttention) and name.startswith("pos_bias"):
                    value = normal(param.shape, 0.1)
                elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)) and name == "weight":
                    value = normal(param.shape, 0.1, mean=1.0)
                elif name == "bias":
                    value = normal(param.shape, 0.05)
                else:
                    fan_in = param[0].numel() if isinstance(module, nn.Conv1d) else param.shape[-1]
                    if isinstance(module, nn.ConvTranspose1d):
                        fan_in = param.shape[0] * param.shape[2]
                    value = normal(param.shape, fan_in**-0.5)
                param.copy_(value.to(param.dtype))
    return model


def write_tiny_decoder_flow(out_dir: Path | str, seed: int = 0, **sizes: int) -> Path:
    """Write `out_dir/flow.pt` for the config given by `tiny_flow_yaml_section(**sizes)`.

    Returns the checkpoint path. config.yaml is not written (it also needs a `hift:` section).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = FlowConfig.from_yaml_text(tiny_flow_yaml_section(**sizes))
    model = randomize_flow_weights(FlowDecoder(cfg), seed)
    path = out_dir / "flow.pt"
    torch.save(model.state_dict(), path)
    logger.info("wrote tiny flow checkpoint %s (%d tensors)", path, len(model.state_dict()))
    return path
