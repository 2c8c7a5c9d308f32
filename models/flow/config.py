"""Typed configuration of the flow-matching speech decoder (`MaskedDiffWithXvec`).

The values come from the `flow:` section of the decoder's official HyperPyYAML `config.yaml`,
read as plain data (tags become `HyperNode`s; nothing named in the file is imported). The
dataclasses are validated once, when built, so a model built from them never has to re-check.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.hyperyaml import HyperNode, HyperYamlError, load_hyperyaml, parse_hyperyaml

__all__ = [
    "CFMConfig",
    "EncoderConfig",
    "EstimatorConfig",
    "FlowConfig",
    "LengthRegulatorConfig",
]

FLOW_TARGET = "cosyvoice.flow.flow.MaskedDiffWithXvec"
ENCODER_TARGET = "cosyvoice.transformer.encoder.BlockConformerEncoder"
REGULATOR_TARGET = "cosyvoice.flow.length_regulator.InterpolateRegulator"
CFM_TARGET = "cosyvoice.flow.flow_matching.ConditionalCFM"
ESTIMATOR_TARGET = "cosyvoice.flow.decoder.ConditionalDecoder"
CFM_PARAMS_TARGET = "omegaconf.DictConfig"


class FlowConfigError(ValueError):
    """The `flow:` section describes a model this implementation does not build."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise FlowConfigError(message)


def _node(value: Any, target: str, where: str) -> dict[str, Any]:
    """The keyword arguments of a `!new:<target>` node, or an error naming `where`."""
    if not isinstance(value, HyperNode) or value.kind != "new":
        raise FlowConfigError(f"{where}: expected a `!new:{target}` node, got {value!r}")
    if value.target != target:
        raise FlowConfigError(f"{where}: expected class {target}, got {value.target}")
    return value.kwargs


def _pick(
    kwargs: dict[str, Any], where: str, fields: dict[str, type], defaults: dict[str, Any]
) -> dict[str, Any]:
    """Coerce the listed keys of `kwargs` to their types; missing keys take `defaults`."""
    out: dict[str, Any] = {}
    for name, kind in fields.items():
        if name in kwargs:
            raw = kwargs[name]
        elif name in defaults:
            raw = defaults[name]
        else:
            raise FlowConfigError(f"{where}: missing key `{name}`")
        try:
            if kind is bool:
                if not isinstance(raw, bool):
                    raise TypeError(f"not a boolean: {raw!r}")
                out[name] = raw
            elif kind is tuple:
                out[name] = tuple(int(v) for v in raw)
            else:
                out[name] = kind(raw)
        except (TypeError, ValueError) as exc:
            raise FlowConfigError(f"{where}.{name}: {exc}") from exc
    return out


@dataclass(frozen=True)
class EncoderConfig:
    """`BlockConformerEncoder`: linear input layer, relative-position block-causal Conformer.

    Only the variant used by GLM-4-Voice is built: `input_layer 'linear'`, `pos_enc_layer_type
    'rel_pos_espnet'`, `selfattention_layer_type 'block_rel_selfattn'`, pre-norm, swish FFN,
    no convolution module and no macaron FFN.
    """

    input_size: int = 512
    output_size: int = 512
    attention_heads: int = 8
    linear_units: int = 2048
    num_blocks: int = 6
    block_size: int = 10
    dropout_rate: float = 0.1
    positional_dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.1

    def __post_init__(self) -> None:
        _require(
            self.output_size % self.attention_heads == 0,
            f"encoder.output_size {self.output_size} is not divisible by "
            f"attention_heads {self.attention_heads}",
        )
        for name in ("input_size", "output_size", "linear_units", "num_blocks", "block_size"):
            _require(getattr(self, name) > 0, f"encoder.{name} must be positive")

    @property
    def head_dim(self) -> int:
        return self.output_size // self.attention_heads

    @classmethod
    def from_node(cls, value: Any) -> EncoderConfig:
        kwargs = _node(value, ENCODER_TARGET, "flow.encoder")
        fixed = {
            "input_layer": "linear",
            "pos_enc_layer_type": "rel_pos_espnet",
            "selfattention_layer_type": "block_rel_selfattn",
            "normalize_before": True,
            "use_cnn_module": False,
            "macaron_style": False,
        }
        for key, expected in fixed.items():
            got = kwargs.get(key, expected)
            _require(got == expected, f"flow.encoder.{key} = {got!r}; only {expected!r} is built")
        ints = ("input_size", "output_size", "attention_heads", "linear_units", "num_blocks")
        floats = ("dropout_rate", "positional_dropout_rate", "attention_dropout_rate")
        fields: dict[str, type] = {k: int for k in (*ints, "block_size")}
        fields.update({k: float for k in floats})
        defaults = {
            "block_size": 10,
            "dropout_rate": 0.1,
            "positional_dropout_rate": 0.1,
            "attention_dropout_rate": 0.0,
        }
        return cls(**_pick(kwargs, "flow.encoder", fields, defaults))


@dataclass(frozen=True)
class LengthRegulatorConfig:
    """`InterpolateRegulator`: nearest upsampling to mel length, then GroupNorm/Mish convs."""

    channels: int = 80
    sampling_ratios: tuple[int, ...] = (1, 1, 1, 1)
    out_channels: int = 80
    groups: int = 1

    def __post_init__(self) -> None:
        _require(self.channels % self.groups == 0, "length_regulator.groups must divide channels")

    @classmethod
    def from_node(cls, value: Any) -> LengthRegulatorConfig:
        kwargs = _node(value, REGULATOR_TARGET, "flow.length_regulator")
        fields = {"channels": int, "sampling_ratios": tuple, "groups": int}
        picked = _pick(kwargs, "flow.length_regulator", fields, {"groups": 1})
        out = kwargs.get("out_channels")  # the reference defaults it to `channels`
        return cls(out_channels=picked["channels"] if out is None else int(out), **picked)


@dataclass(frozen=True)
class EstimatorConfig:
    """`ConditionalDecoder`: the 1-D U-Net with transformer blocks that predicts the velocity."""

    in_channels: int = 320
    out_channels: int = 80
    channels: tuple[int, ...] = (256, 256)
    dropout: float = 0.0
    attention_head_dim: int = 64
    n_blocks: int = 4
    num_mid_blocks: int = 12
    num_heads: int = 8
    act_fn: str = "gelu"

    def __post_init__(self) -> None:
        _require(len(self.channels) > 0, "estimator.channels must not be empty")
        _require(
            self.act_fn in ("gelu", "gelu-approximate"),
            f"estimator.act_fn {self.act_fn!r} is not built (gelu, gelu-approximate)",
        )
        for width in self.channels:
            _require(width % 8 == 0, f"estimator channel width {width} is not divisible by 8")
        _require(self.in_channels % 2 == 0, "estimator.in_channels must be even")

    @property
    def time_embed_dim(self) -> int:
        return self.channels[0] * 4

    @classmethod
    def from_node(cls, value: Any) -> EstimatorConfig:
        kwargs = _node(value, ESTIMATOR_TARGET, "flow.decoder.estimator")
        fields = {
            "in_channels": int,
            "out_channels": int,
            "channels": tuple,
            "dropout": float,
            "attention_head_dim": int,
            "n_blocks": int,
            "num_mid_blocks": int,
            "num_heads": int,
            "act_fn": str,
        }
        defaults = {
            "channels": (256, 256),
            "dropout": 0.05,
            "attention_head_dim": 64,
            "n_blocks": 1,
            "num_mid_blocks": 2,
            "num_heads": 4,
            "act_fn": "snake",
        }
        return cls(**_pick(kwargs, "flow.decoder.estimator", fields, defaults))


@dataclass(frozen=True)
class CFMConfig:
    """`ConditionalCFM`: Euler ODE solver with a cosine time grid and classifier-free guidance."""

    in_channels: int = 240
    n_spks: int = 1
    spk_emb_dim: int = 80
    sigma_min: float = 1e-6
    solver: str = "euler"
    t_scheduler: str = "cosine"
    training_cfg_rate: float = 0.2
    inference_cfg_rate: float = 0.7
    reg_loss_type: str = "l1"
    estimator: EstimatorConfig = EstimatorConfig()

    def __post_init__(self) -> None:
        _require(self.solver == "euler", f"decoder solver {self.solver!r} is not built (euler)")
        _require(
            self.t_scheduler in ("cosine", "linear"),
            f"decoder t_scheduler {self.t_scheduler!r} is not built (cosine, linear)",
        )
        _require(self.inference_cfg_rate >= 0, "inference_cfg_rate must be >= 0")

    @classmethod
    def from_node(cls, value: Any) -> CFMConfig:
        kwargs = _node(value, CFM_TARGET, "flow.decoder")
        params_node = kwargs.get("cfm_params")
        params = _node(params_node, CFM_PARAMS_TARGET, "flow.decoder.cfm_params").get("content")
        if not isinstance(params, dict):
            raise FlowConfigError("flow.decoder.cfm_params: expected a `content:` mapping")
        top = _pick(
            kwargs, "flow.decoder", {"in_channels": int, "n_spks": int, "spk_emb_dim": int}, {}
        )
        fields = {
            "sigma_min": float,
            "solver": str,
            "t_scheduler": str,
            "training_cfg_rate": float,
            "inference_cfg_rate": float,
            "reg_loss_type": str,
        }
        sub = _pick(params, "flow.decoder.cfm_params.content", fields, {})
        estimator = EstimatorConfig.from_node(kwargs.get("estimator"))
        return cls(estimator=estimator, **top, **sub)


@dataclass(frozen=True)
class FlowConfig:
    """`MaskedDiffWithXvec`: token embedding -> encoder -> length regulator -> CFM -> mel.

    `mel_sample_rate` and `mel_hop` are constants of the reference code (not config keys): the
    mel length of `n` tokens is `int(float32(n) / input_frame_rate * 22050 / 256)`.
    """

    input_size: int = 512
    output_size: int = 80
    spk_embed_dim: int = 192
    vocab_size: int = 16384
    input_frame_rate: float = 12.5
    output_type: str = "mel"
    only_mask_loss: bool = True
    encoder: EncoderConfig = EncoderConfig()
    length_regulator: LengthRegulatorConfig = LengthRegulatorConfig()
    decoder: CFMConfig = CFMConfig()
    mel_sample_rate: int = 22050
    mel_hop: int = 256

    def __post_init__(self) -> None:
        mel = self.output_size
        est = self.decoder.estimator
        checks = [
            (self.encoder.input_size == self.input_size, "encoder.input_size != flow.input_size"),
            (self.length_regulator.channels == mel, "length_regulator.channels != output_size"),
            (self.length_regulator.out_channels == mel, "length_regulator out != output_size"),
            (self.decoder.spk_emb_dim == mel, "decoder.spk_emb_dim != output_size"),
            (est.out_channels == mel, "estimator.out_channels != output_size"),
            (
                est.in_channels == 4 * mel,
                "estimator.in_channels != 4 * output_size (x,mu,spk,cond)",
            ),
            (self.output_type == "mel", f"output_type {self.output_type!r} is not built (mel)"),
            (self.input_frame_rate > 0, "input_frame_rate must be positive"),
        ]
        for ok, message in checks:
            _require(ok, f"flow config: {message}")

    @classmethod
    def from_section(cls, value: Any) -> FlowConfig:
        """Build from the parsed `flow:` node (a `HyperNode` of `MaskedDiffWithXvec`)."""
        kwargs = _node(value, FLOW_TARGET, "flow")
        fields = {
            "input_size": int,
            "output_size": int,
            "spk_embed_dim": int,
            "vocab_size": int,
            "input_frame_rate": float,
            "output_type": str,
            "only_mask_loss": bool,
        }
        defaults = {"output_type": "mel", "only_mask_loss": True}
        return cls(
            encoder=EncoderConfig.from_node(kwargs.get("encoder")),
            length_regulator=LengthRegulatorConfig.from_node(kwargs.get("length_regulator")),
            decoder=CFMConfig.from_node(kwargs.get("decoder")),
            **_pick(kwargs, "flow", fields, defaults),
        )

    @classmethod
    def from_yaml_text(cls, text: str) -> FlowConfig:
        """Build from HyperPyYAML text that has a top-level `flow:` key."""
        data = parse_hyperyaml(text)
        if "flow" not in data:
            raise FlowConfigError("config has no top-level `flow:` section")
        return cls.from_section(data["flow"])

    @classmethod
    def from_yaml(cls, path: str | Path) -> FlowConfig:
        """Read the `flow:` section of the decoder's `config.yaml`; errors name the file."""
        path = Path(path)
        try:
            data = load_hyperyaml(path)
            if "flow" not in data:
                raise FlowConfigError("config has no top-level `flow:` section")
            return cls.from_section(data["flow"])
        except (FlowConfigError, HyperYamlError) as exc:
            raise FlowConfigError(f"{path}: {exc}") from exc
