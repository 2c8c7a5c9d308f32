"""HiFT vocoder of the GLM-4-Voice decoder: mel (22.05 kHz, hop 256) -> waveform.

A neural-source-filter HiFi-GAN variant that predicts 9 magnitude and 9 phase bins of a tiny
STFT (n_fft 16, hop 4) and inverts them:

    mel [B, 80, F] -> f0 [B, F] (Hz) -> repeat x256 -> sine source [B, 1, 256F]
    source -> STFT [B, 18, 64F+1] -> fused into the upsampling path (8x, 8x) of conv_pre(mel)
    -> conv_post -> exp(magnitude), sin(phase) -> iSTFT -> clamp(+-0.99) -> speech [B, 256F]

Parameter names equal those of the official `hift.pt` (legacy weight norm `weight_g`/`weight_v`),
so that file loads strictly. Two reference details are kept on purpose: the upsampling stages
use `leaky_relu` slope 0.1 while the one before `conv_post` uses the default 0.01, and the
phase channels go through `sin` before being used as an angle.

The source needs random numbers (initial sine phases and additive noise). They are either
injected as `SourceDraws` or drawn from a `torch.Generator` in the reference order, which lets
a caller replay the reference decoder bit for bit.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.signal import get_window
from torch import Tensor, nn

from models.hift.configuration_hift import F0PredictorConfig, HiFTConfig

logger = logging.getLogger(__name__)

__all__ = [
    "HiFTGenerator",
    "HiFTTrace",
    "SourceDraws",
    "WeightNormConv1d",
    "WeightNormConvTranspose1d",
    "load_state_dict_strict",
]

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "hift.pt"
_SNAKE_EPS = 1e-9  # keeps 1/alpha finite, as in the reference Snake
_MAGNITUDE_CLIP = 1e2  # upper bound on exp(log-magnitude) before the iSTFT
_POST_LRELU_SLOPE = 0.01  # the reference calls F.leaky_relu with its default slope here


def _legacy_weight_norm(module: nn.Module, dim: int) -> None:
    """Replace `module.weight` by the legacy pair `weight_g` (norm) / `weight_v` (direction).

    `weight_g` keeps size 1 on every axis but `dim` (Conv1d: out channels; ConvTranspose1d:
    in channels, which is axis 0 of its weight), matching `torch.nn.utils.weight_norm`.
    """
    weight = module.weight.detach()
    del module._parameters["weight"]
    module.weight_g = nn.Parameter(torch.norm_except_dim(weight, 2, dim))
    module.weight_v = nn.Parameter(weight.clone())


def _weight_from_norm(module: nn.Module, dim: int) -> Tensor:
    """g * v / ||v||, with the fused op torch's own weight norm uses (so weights match the
    reference bit for bit). Without autograd the result is cached until g or v change, so
    streaming inference does not recompute every weight on every block."""
    g, v = module.weight_g, module.weight_v
    if torch.is_grad_enabled() and (g.requires_grad or v.requires_grad):
        return torch._weight_norm(v, g, dim)
    key = (g._version, v._version, g.data_ptr(), v.data_ptr(), v.dtype, v.device)
    cached = module.__dict__.get("_normed_weight")
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, torch._weight_norm(v, g, dim))
        module.__dict__["_normed_weight"] = cached
    return cached[1]


class WeightNormConv1d(nn.Conv1d):
    """Conv1d with legacy weight-norm parameters (`weight_g` [out,1,1], `weight_v`)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _legacy_weight_norm(self, dim=0)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, _weight_from_norm(self, 0), self.bias)


class WeightNormConvTranspose1d(nn.ConvTranspose1d):
    """ConvTranspose1d with legacy weight norm over axis 0 (in channels; `weight_g` [in,1,1])."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _legacy_weight_norm(self, dim=0)

    def forward(self, x: Tensor) -> Tensor:
        weight = _weight_from_norm(self, 0)
        return F.conv_transpose1d(
            x, weight, self.bias, self.stride, self.padding, self.output_padding, 1, self.dilation
        )


class Snake(nn.Module):
    """x + sin^2(alpha x) / alpha with a learned per-channel alpha (linear scale)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        alpha = self.alpha[None, :, None]
        return x + (1.0 / (alpha + _SNAKE_EPS)) * torch.sin(x * alpha).pow(2)


def _same_padding(kernel_size: int, dilation: int) -> int:
    return (kernel_size * dilation - dilation) // 2


class HiFTResBlock(nn.Module):
    """Residual stack: for each dilation d, x += conv(k,1) . snake . conv(k,d) . snake (x)."""

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(
            WeightNormConv1d(
                channels, channels, kernel_size, dilation=d, padding=_same_padding(kernel_size, d)
            )
            for d in dilations
        )
        self.convs2 = nn.ModuleList(
            WeightNormConv1d(channels, channels, kernel_size, padding=_same_padding(kernel_size, 1))
            for _ in dilations
        )
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: Tensor) -> Tensor:
        for conv1, conv2, act1, act2 in zip(
            self.convs1, self.convs2, self.activations1, self.activations2, strict=True
        ):
            x = conv2(act2(conv1(act1(x)))) + x
        return x


class HiFTF0Predictor(nn.Module):
    """mel [B, 80, F] -> f0 [B, F] in Hz: (weight-normed conv k3 + ELU) x N, Linear, abs."""

    def __init__(self, config: F0PredictorConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(config.num_layers):
            in_ch = config.in_channels if i == 0 else config.cond_channels
            layers += [WeightNormConv1d(in_ch, config.cond_channels, 3, padding=1), nn.ELU()]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(config.cond_channels, config.num_class)

    def forward(self, mel: Tensor) -> Tensor:
        hidden = self.condnet(mel).transpose(1, 2)  # (B, F, C)
        return torch.abs(self.classifier(hidden).squeeze(-1))


@dataclass
class SourceDraws:
    """The random numbers of one source generation.

    phases: [B, H, 1] initial phase of each sine (H = nb_harmonics + 1), phases[:, 0] == 0.
    sine_noise: [B, H, L] unit normal noise, scaled by the voiced/unvoiced noise amplitude.
    """

    phases: Tensor
    sine_noise: Tensor

    @classmethod
    def sample(
        cls, batch: int, n_sines: int, length: int, generator: torch.Generator | None
    ) -> SourceDraws:
        """Draw in the reference order: Uniform(-pi, pi) phases, unit noise, then one unused
        [B, L, 1] normal draw (the reference's discarded noise branch) so that a shared
        generator stays in step with the reference stream."""
        low = torch.tensor(-math.pi, dtype=torch.float32)
        high = torch.tensor(math.pi, dtype=torch.float32)
        device = generator.device if generator is not None else None
        unit = torch.rand((batch, n_sines, 1), generator=generator, device=device)
        phases = low.to(unit.device) + unit * (high - low).to(unit.device)
        phases[:, 0, :] = 0
        sine_noise = torch.randn((batch, n_sines, length), generator=generator, device=device)
        torch.randn((batch, length, 1), generator=generator, device=device)
        return cls(phases=phases, sine_noise=sine_noise)


class HiFTSource(nn.Module):
    """Harmonic-plus-noise source (reference SourceModuleHnNSF + SineGen).

    f0 per sample [B, 1, L] -> har_source [B, 1, L] = tanh(Linear_9->1(sine_waves)).
    """

    def __init__(self, config: HiFTConfig) -> None:
        super().__init__()
        self.sampling_rate = config.sampling_rate
        self.n_sines = config.nb_harmonics + 1
        self.sine_amp = config.nsf_alpha
        self.noise_std = config.nsf_sigma
        self.voiced_threshold = config.nsf_voiced_threshold
        self.l_linear = nn.Linear(self.n_sines, 1)

    def sine_waves(
        self, f0_up: Tensor, draws: SourceDraws, start_cycles: Tensor | None = None
    ) -> Tensor:
        """f0_up [B, 1, L] (Hz) -> voiced sines plus noise [B, H, L], float32.

        The phase is 2*pi*(cumsum(f/sr) mod 1): accumulated per sample, so it drifts with
        rounding over long inputs exactly as in the reference. start_cycles [B, H, 1] (in
        cycles, default 0) continues the phase of a previous chunk for gapless streaming.
        """
        harmonics = torch.arange(1, self.n_sines + 1, dtype=f0_up.dtype, device=f0_up.device)
        freq = f0_up * harmonics[None, :, None] / self.sampling_rate  # (B, H, L) cycles/sample
        cycles = torch.cumsum(freq, dim=-1)
        if start_cycles is not None:
            cycles = cycles + start_cycles.to(cycles)
        theta = 2 * np.pi * (cycles % 1)
        sines = self.sine_amp * torch.sin(theta + draws.phases.to(f0_up.device))
        uv = (f0_up > self.voiced_threshold).to(f0_up.dtype)
        noise_amp = uv * self.noise_std + (1 - uv) * self.sine_amp / 3
        return sines * uv + noise_amp * draws.sine_noise.to(f0_up.device)

    def forward(
        self, f0_up: Tensor, draws: SourceDraws, start_cycles: Tensor | None = None
    ) -> Tensor:
        waves = self.sine_waves(f0_up, draws, start_cycles).transpose(1, 2)  # (B, L, H)
        weight = self.l_linear.weight.float()
        bias = self.l_linear.bias.float()
        return torch.tanh(F.linear(waves, weight, bias)).transpose(1, 2)  # (B, 1, L)


@dataclass
class HiFTTrace:
    """Every intermediate of one `HiFTGenerator.trace` call (float32).

    f0 [B, F]; har_source [B, 1, L] before the cache overwrite; source [B, 1, L] after it;
    conv_post_out [B, 2*n_bins, L/hop+1]; istft_out [B, L]; speech [B, L] (clamped).
    """

    f0: Tensor
    har_source: Tensor
    source: Tensor
    conv_post_out: Tensor
    istft_out: Tensor
    speech: Tensor


class HiFTGenerator(nn.Module):
    """The GLM-4-Voice HiFT vocoder. State-dict keys equal the official `hift.pt`."""

    def __init__(self, config: HiFTConfig) -> None:
        super().__init__()
        self.config = config
        self.m_source = HiFTSource(config)
        self.conv_pre = WeightNormConv1d(config.in_channels, config.base_channels, 7, padding=3)
        self.ups = nn.ModuleList(
            WeightNormConvTranspose1d(
                config.base_channels // 2**i,
                config.base_channels // 2 ** (i + 1),
                k,
                u,
                padding=(k - u) // 2,
            )
            for i, (u, k) in enumerate(
                zip(config.upsample_rates, config.upsample_kernel_sizes, strict=True)
            )
        )
        self.source_downs, self.source_resblocks = self._build_source_branches(config)
        self.resblocks = nn.ModuleList(
            HiFTResBlock(config.base_channels // 2 ** (i + 1), k, d)
            for i in range(len(config.upsample_rates))
            for k, d in zip(
                config.resblock_kernel_sizes, config.resblock_dilation_sizes, strict=True
            )
        )
        last_channels = config.base_channels // 2 ** len(config.upsample_rates)
        self.conv_post = WeightNormConv1d(last_channels, 2 * config.n_bins, 7, padding=3)
        self.reflection_pad = nn.ReflectionPad1d((1, 0))
        window = get_window("hann", config.istft_n_fft, fftbins=True).astype(np.float32)
        self.register_buffer("stft_window", torch.from_numpy(window), persistent=False)
        self.f0_predictor = HiFTF0Predictor(config.f0_predictor)

    @staticmethod
    def _build_source_branches(config: HiFTConfig) -> tuple[nn.ModuleList, nn.ModuleList]:
        """Per stage i: a conv bringing the source STFT (hop 4) down to the stage's frame
        rate, then a resblock. Stage i runs at 1/prod(upsample_rates[i+1:]) of the STFT rate."""
        downs, blocks = nn.ModuleList(), nn.ModuleList()
        n_stages = len(config.upsample_rates)
        stft_channels = 2 * config.n_bins
        for i in range(n_stages):
            rate = math.prod(config.upsample_rates[i + 1 :])
            channels = config.base_channels // 2 ** (i + 1)
            if rate == 1:
                downs.append(nn.Conv1d(stft_channels, channels, 1, 1))
            else:
                downs.append(nn.Conv1d(stft_channels, channels, rate * 2, rate, padding=rate // 2))
            blocks.append(
                HiFTResBlock(
                    channels,
                    config.source_resblock_kernel_sizes[i],
                    config.source_resblock_dilation_sizes[i],
                )
            )
        return downs, blocks

    # ----- source -------------------------------------------------------------------------

    @torch.inference_mode()
    def predict_f0(self, mel: Tensor) -> Tensor:
        """mel [B, 80, F] -> f0 [B, F] in Hz (float32)."""
        return self.f0_predictor(mel.to(self._dtype)).float()

    @torch.inference_mode()
    def source_from_f0(
        self, f0: Tensor, draws: SourceDraws, start_cycles: Tensor | None = None
    ) -> Tensor:
        """f0 [B, F] -> har_source [B, 1, F * upsample_factor] (float32).

        start_cycles [B, H, 1]: sine phases (in cycles) before the first sample, see
        `cycles_after`; None starts at 0 like the reference."""
        batch, frames = f0.shape
        factor = self.config.upsample_factor
        # Each frame's f0 repeated over its samples (a copy, like repeat_interleave, without
        # that op's index tensors).
        f0_up = f0.float()[:, :, None].expand(batch, frames, factor).reshape(batch, 1, -1)
        return self.m_source(f0_up, draws, start_cycles)

    def cycles_after(self, f0: Tensor, start_cycles: Tensor | None = None) -> Tensor:
        """Phase (in cycles, mod 1, float64) of every sine after the frames of f0 [B, F].

        f0 is constant over each frame's upsample_factor samples, so the phase advance is
        exact per frame; feeding the result as the next chunk's start_cycles makes the source
        continuous across chunks. Returns [B, H, 1]."""
        harmonics = torch.arange(1, self.m_source.n_sines + 1, dtype=torch.float64)
        per_frame = self.config.upsample_factor / self.config.sampling_rate
        total = f0.double().sum(dim=-1, keepdim=True) * per_frame  # (B, 1) cycles of sine 0
        cycles = (total[:, None, :] * harmonics.to(f0.device)[None, :, None]) % 1.0
        return cycles if start_cycles is None else (cycles + start_cycles.double()) % 1.0

    def draw(self, batch: int, length: int, generator: torch.Generator | None) -> SourceDraws:
        """Random draws for a source of `length` samples, from `generator` (reference order)."""
        return SourceDraws.sample(batch, self.m_source.n_sines, length, generator)

    # ----- filter -------------------------------------------------------------------------

    def _stft(self, source: Tensor) -> Tensor:
        """source [B, 1, L] -> [Re; Im] [B, 2*n_bins, L/hop + 1] (centered, reflect padded)."""
        spec = torch.stft(
            source.squeeze(1).float(),
            self.config.istft_n_fft,
            self.config.istft_hop_len,
            self.config.istft_n_fft,
            window=self.stft_window.float(),
            return_complex=True,
        )
        return torch.cat([spec.real, spec.imag], dim=1)

    def spectral(self, mel: Tensor, source: Tensor) -> Tensor:
        """mel [B, 80, F], source [B, 1, 256F] -> conv_post output [B, 2*n_bins, 64F+1]."""
        s_stft = self._stft(source).to(self._dtype)
        x = self.conv_pre(mel.to(self._dtype))
        n_kernels = len(self.config.resblock_kernel_sizes)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, self.config.lrelu_slope))
            if i == len(self.ups) - 1:
                x = self.reflection_pad(x)
            x = x + self.source_resblocks[i](self.source_downs[i](s_stft))
            blocks = self.resblocks[i * n_kernels : (i + 1) * n_kernels]
            total = blocks[0](x)
            for block in blocks[1:]:
                total = total + block(x)
            x = total / n_kernels
        return self.conv_post(F.leaky_relu(x, _POST_LRELU_SLOPE)).float()

    def istft(self, conv_post_out: Tensor, checked: bool = True) -> Tensor:
        """[B, 2*n_bins, T] -> waveform [B, hop*(T-1)] (before the clamp).

        checked=False gives the same numbers without `torch.istft`'s check that the window
        overlap never vanishes: that check reads a device value on the host, which a CUDA
        graph capture forbids (and which costs a synchronisation per call on a GPU)."""
        n_bins = self.config.n_bins
        magnitude = torch.exp(conv_post_out[:, :n_bins]).clip(max=_MAGNITUDE_CLIP)
        phase = torch.sin(conv_post_out[:, n_bins:])
        spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        if not checked:
            return self._overlap_add(spec)
        return torch.istft(
            spec,
            self.config.istft_n_fft,
            self.config.istft_hop_len,
            self.config.istft_n_fft,
            window=self.stft_window.float(),
        )

    def _overlap_add(self, spec: Tensor) -> Tensor:
        """`torch.istft(spec, n_fft, hop, n_fft, window)` (centered) step by step, as torch
        computes it: inverse real FFT per frame, windowed, overlap-added, divided by the
        overlap-added squared window, padding trimmed. No host reads."""
        n_fft, hop = self.config.istft_n_fft, self.config.istft_hop_len
        window = self.stft_window.float()
        frames = torch.fft.irfft(spec.transpose(1, 2), n=n_fft, dim=-1) * window  # (B, T, n_fft)
        batch, n_frames = frames.shape[:2]
        length = n_fft + hop * (n_frames - 1)
        summed = torch.ops.aten.unfold_backward(frames, [batch, length], 1, n_fft, hop)
        squares = window.pow(2).expand(1, n_frames, n_fft)
        envelope = torch.ops.aten.unfold_backward(squares, [1, length], 1, n_fft, hop)
        half = n_fft // 2
        return summed[:, half : length - half] / envelope[:, half : length - half]

    @torch.inference_mode()
    def decode(self, mel: Tensor, source: Tensor, checked: bool = True) -> Tensor:
        """mel [B, 80, F], source [B, 1, 256F] -> speech [B, 256F], clamped to audio_limit.

        checked=False: no host reads (CUDA-graph safe), same numbers; see `istft`."""
        limit = self.config.audio_limit
        return torch.clamp(self.istft(self.spectral(mel, source), checked), -limit, limit)

    # ----- full calls ---------------------------------------------------------------------

    @torch.inference_mode()
    def trace(
        self,
        mel: Tensor,
        cache_source: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        draws: SourceDraws | None = None,
        har_source: Tensor | None = None,
    ) -> HiFTTrace:
        """Run the vocoder keeping every intermediate (see `inference` for the arguments).

        har_source: [B, 1, L] inject the source itself (skips f0 -> source; the f0 is still
        predicted and returned)."""
        f0 = self.predict_f0(mel)
        if har_source is None:
            if draws is None:
                length = f0.shape[-1] * self.config.upsample_factor
                draws = self.draw(f0.shape[0], length, generator)
            har_source = self.source_from_f0(f0, draws)
        source = _apply_cache(har_source.float(), cache_source)
        conv_post_out = self.spectral(mel, source)
        istft_out = self.istft(conv_post_out)
        limit = self.config.audio_limit
        speech = torch.clamp(istft_out, -limit, limit)
        return HiFTTrace(f0, har_source, source, conv_post_out, istft_out, speech)

    @torch.inference_mode()
    def inference(
        self,
        mel: Tensor,
        cache_source: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        draws: SourceDraws | None = None,
    ) -> tuple[Tensor, Tensor]:
        """mel [B, 80, F] -> (speech [B, 256F], source [B, 1, 256F]).

        cache_source: [B, 1, C] (C may be 0) source samples from the previous chunk; they
          overwrite the first C samples of the new source so the sine phase continues.
        generator: where the random phases/noise come from (torch's default CPU generator
          when None, like the reference); draws: inject them instead.
        """
        out = self.trace(mel, cache_source, generator=generator, draws=draws)
        return out.speech, out.source

    @property
    def _dtype(self) -> torch.dtype:
        return self.conv_pre.weight_v.dtype

    @classmethod
    def from_pretrained(
        cls,
        decoder_dir: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> HiFTGenerator:
        """Build from `decoder_dir/config.yaml` (hift section) and load `decoder_dir/hift.pt`
        strictly. The source and the STFTs always run in float32 whatever `dtype` is."""
        decoder_dir = Path(decoder_dir)
        config = HiFTConfig.from_yaml(decoder_dir / CONFIG_FILE)
        model = cls(config)
        weights = decoder_dir / WEIGHTS_FILE
        if not weights.is_file():
            raise FileNotFoundError(f"HiFT weights not found: {weights}")
        state = torch.load(weights, map_location="cpu", weights_only=True)
        load_state_dict_strict(model, state, weights)
        logger.info("loaded HiFT from %s (%.2f M parameters)", weights, _n_params(model) / 1e6)
        return model.to(device=device, dtype=dtype).eval()


def _apply_cache(har_source: Tensor, cache_source: Tensor | None) -> Tensor:
    if cache_source is None or cache_source.shape[-1] == 0:
        return har_source
    n = cache_source.shape[-1]
    if n > har_source.shape[-1]:
        raise ValueError(
            f"cache_source has {n} samples but the new source only {har_source.shape[-1]}"
        )
    source = har_source.clone()
    source[:, :, :n] = cache_source.to(source)
    return source


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_state_dict_strict(module: nn.Module, state: Mapping[str, Tensor], source: Path) -> None:
    """Load `state` requiring exactly the module's keys and shapes; errors name file and keys."""
    if not isinstance(state, Mapping):
        raise TypeError(f"{source}: expected a state dict, found {type(state).__name__}")
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise KeyError(
            f"{source}: state dict does not match the model: "
            f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
            f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"{source}: key {key!r} has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(expected[key].shape)}"
            )
    module.load_state_dict(state, strict=True)
