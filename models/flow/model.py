"""The flow-matching speech decoder of GLM-4-Voice (`MaskedDiffWithXvec`): tokens -> 80-bin mel.

Pipeline of `FlowDecoder.inference` (batch 1, like the reference):

1. speaker: `spk_embed_affine_layer(l2_normalise(embedding))` -> (1, 80); a zero x-vector
   stays zero, so the result is the layer bias;
2. tokens = concat(prompt_token, token); `input_embedding(clamp(tokens, 0))`;
3. `encoder` (block-causal Conformer) and `encoder_proj` -> (1, T_tok, 80);
4. mel length `int(float32(T_tok) / 12.5 * 22050 / 256)` (float32 arithmetic, truncated);
5. `length_regulator` -> mu (1, 80, T_mel); `cond` = zeros with `prompt_feat` in front;
6. `decoder` (CFM, 10 cosine-grid Euler steps, CFG 0.7) from seed-42 noise;
7. drop the prompt frames.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.flow.cfm import ConditionalCFM, EulerTrace
from models.flow.config import FlowConfig
from models.flow.encoder import BlockConformerEncoder, EncoderCache
from models.flow.length_regulator import InterpolateRegulator

__all__ = ["CheckpointError", "FlowDecoder", "SamplerInputs", "mel_frames_for_tokens"]

logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint does not match the model; the message names the file and the key."""


def mel_frames_for_tokens(n_tokens: int, frame_rate: float = 12.5) -> int:
    """Mel length for `n_tokens` tokens, computed like the reference.

    The reference divides an int32 length tensor in float32 and truncates:
    `int(float32(n) / frame_rate * 22050 / 256)`, e.g. 49 -> 337, 50 -> 344, 190 -> 1309.
    """
    lengths = torch.tensor([n_tokens], dtype=torch.int32)
    return int((lengths / frame_rate * 22050 / 256).int()[0])


@dataclass(frozen=True)
class SamplerInputs:
    """Inputs of the CFM sampler for one `inference` call (batch 1).

    mu, cond: (1, 80, T_mel); mask: (1, 1, T_mel) of ones; spks: (1, 80);
    `n_prompt_frames` leading frames of the result belong to the prompt.
    """

    mu: Tensor
    mask: Tensor
    spks: Tensor
    cond: Tensor
    n_prompt_frames: int


class FlowDecoder(nn.Module):
    """Tokens + prompt -> mel. Submodule names match the keys of the official flow.pt."""

    def __init__(self, cfg: FlowConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.input_embedding = nn.Embedding(cfg.vocab_size, cfg.input_size)
        self.spk_embed_affine_layer = nn.Linear(cfg.spk_embed_dim, cfg.output_size)
        self.encoder = BlockConformerEncoder(cfg.encoder)
        self.encoder_proj = nn.Linear(cfg.encoder.output_size, cfg.output_size)
        self.length_regulator = InterpolateRegulator(cfg.length_regulator)
        self.decoder = ConditionalCFM(cfg.decoder)

    @property
    def estimator(self) -> nn.Module:
        """The velocity network: `estimator(x, mask, mu, t, spks, cond)` on batched inputs."""
        return self.decoder.estimator

    # ----------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        decoder_dir: Path | str,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> FlowDecoder:
        """Build from `decoder_dir/config.yaml`, strictly load `decoder_dir/flow.pt`; eval mode.

        Eval mode is deliberate: the reference decoder never switches its flow model to eval,
        so there the encoder's dropout (0.1) stays active and every mel is stochastic.
        """
        decoder_dir = Path(decoder_dir)
        model = cls(FlowConfig.from_yaml(decoder_dir / "config.yaml"))
        model.load_checkpoint(decoder_dir / "flow.pt")
        model.to(device=device, dtype=dtype).eval()
        return model

    def load_checkpoint(self, path: Path | str) -> None:
        """Strictly load a plain pickled state dict; mismatches name the file and the key."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
        self.load_state(state, source=str(path))
        logger.info("loaded %d tensors from %s", len(state), path)

    def load_state(self, state: dict[str, Tensor], source: str = "state dict") -> None:
        """Strict `load_state_dict` with errors that name `source` and the offending key."""
        own = self.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if missing:
            raise CheckpointError(f"{source}: missing key {missing[0]!r} ({len(missing)} missing)")
        if unexpected:
            raise CheckpointError(
                f"{source}: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected)"
            )
        for key, tensor in own.items():
            if tuple(state[key].shape) != tuple(tensor.shape):
                raise CheckpointError(
                    f"{source}: key {key!r} has shape {tuple(state[key].shape)}, "
                    f"the config gives {tuple(tensor.shape)}"
                )
        self.load_state_dict(state, strict=True)

    # ----------------------------------------------------------------- pieces
    def speaker_projection(self, embedding: Tensor) -> Tensor:
        """(B, 192) x-vector -> (B, 80): L2-normalise (zeros stay zeros), then the affine layer.

        The norm is taken in float32: in float16 `normalize`'s eps (1e-12) rounds to 0 and a
        zero x-vector (GLM-4-Voice's) would become 0/0 = NaN."""
        unit = F.normalize(embedding.float(), dim=1).to(embedding.dtype)
        return self.spk_embed_affine_layer(unit)

    def embed_tokens(self, token: Tensor, token_len: Tensor) -> Tensor:
        """(B, T) ids -> (B, T, input_size) embeddings, zeroed past each length; ids < 0 -> 0."""
        positions = torch.arange(token.shape[1], device=token.device)
        valid = positions.unsqueeze(0) < token_len.to(token.device).unsqueeze(1)
        emb = self.input_embedding(torch.clamp(token, min=0))
        return emb * valid.unsqueeze(-1).to(emb.dtype)

    def encode(self, token: Tensor, token_len: Tensor) -> tuple[Tensor, Tensor]:
        """Token ids (B, T), lengths (B,) -> (h (B, T, 80) after `encoder_proj`, lengths (B,))."""
        h, _ = self.encoder(self.embed_tokens(token, token_len), token_len)
        return self.encoder_proj(h), token_len

    def encode_chunk(
        self, token: Tensor, cache: EncoderCache | None = None
    ) -> tuple[Tensor, EncoderCache]:
        """Incremental `encode` of a token stream (batch 1), as `encoder.forward_chunk`.

        token: (1, n) ids following `cache.length` already-encoded tokens. Returns the
        projected features (1, n, 80) and the cache advanced by the complete blocks.
        """
        lengths = torch.tensor([token.shape[1]], device=token.device)
        h, cache = self.encoder.forward_chunk(self.embed_tokens(token, lengths), cache)
        return self.encoder_proj(h), cache

    def encode_next(
        self, token: Tensor, keys: Sequence[Tensor], values: Sequence[Tensor]
    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """`encode_chunk` as a function of tensors alone (no host reads: CUDA-graph safe).

        token: (1, n) ids; keys/values: per layer (1, H, S, d_k), the cache of the S positions
        just before the token (S may be 0, or lists empty), which must start on a block
        boundary. Attention depends on positions only through their differences and block
        membership, so the absolute positions are not needed: the result equals
        `encode_chunk` with any cache holding these keys/values, untrimmed or trimmed. Returns
        the features (1, n, 80) and per layer the keys/values of the cache extended by the
        complete blocks of `token` (S + n rounded down to a block, untrimmed)."""
        held = keys[0].shape[2] if len(keys) else 0
        block = self.encoder.block_size
        end = -(-held // block) * block  # a block boundary, at least `held`
        cache = EncoderCache(list(keys), list(values), start=end - held, length=end)
        # `embed_tokens` with every position valid (its mask multiplies by one).
        embedded = self.input_embedding(torch.clamp(token, min=0))
        h, merged = self.encoder.forward_chunk(embedded, cache)
        return self.encoder_proj(h), merged.keys, merged.values

    def regulate(self, h: Tensor, mel_len: int) -> Tensor:
        """(B, T_tok, 80) token features -> mu (B, 80, mel_len) at mel rate. No host reads:
        the length regulator's mask is all ones for one length (CUDA-graph safe)."""
        return self.length_regulator.regulate(h, mel_len).contiguous()

    def mel_frames(self, n_tokens: int) -> int:
        """Mel length the reference assigns to `n_tokens` tokens (float32, truncated)."""
        return mel_frames_for_tokens(n_tokens, self.cfg.input_frame_rate)

    # ----------------------------------------------------------------- inference
    @torch.no_grad()
    def prepare(
        self, token: Tensor, prompt_token: Tensor, prompt_feat: Tensor, embedding: Tensor
    ) -> SamplerInputs:
        """Everything the CFM sampler needs for `inference` (steps 1-5 of the module docstring)."""
        self._check_inputs(token, prompt_token, prompt_feat, embedding)
        device = self.input_embedding.weight.device
        dtype = self.input_embedding.weight.dtype
        spks = self.speaker_projection(embedding.to(device=device, dtype=dtype))
        tokens = torch.cat([prompt_token, token], dim=1).to(device)
        n_tokens = tokens.shape[1]
        h, _ = self.encode(tokens, torch.tensor([n_tokens], device=device))
        mel_len = self.mel_frames(n_tokens)
        n_prompt = prompt_feat.shape[1]
        if n_prompt > mel_len:
            raise ValueError(
                f"prompt_feat has {n_prompt} frames, more than the {mel_len} of all tokens"
            )
        cond = torch.zeros(1, self.cfg.output_size, mel_len, device=device, dtype=dtype)
        cond[:, :, :n_prompt] = prompt_feat.to(device=device, dtype=dtype).transpose(1, 2)
        return SamplerInputs(
            mu=self.regulate(h, mel_len),
            mask=torch.ones(1, 1, mel_len, device=device, dtype=dtype),
            spks=spks,
            cond=cond,
            n_prompt_frames=n_prompt,
        )

    @torch.no_grad()
    def inference(
        self,
        token: Tensor,
        prompt_token: Tensor,
        prompt_feat: Tensor,
        embedding: Tensor,
        noise: Tensor | None = None,
        n_timesteps: int = 10,
        trace: EulerTrace | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Decode `token` (1, T) after `prompt_token` (1, P), whose mel is `prompt_feat` (1, F, 80).

        embedding: (1, 192) x-vector (zeros in GLM-4-Voice). `noise` (1, 80, T_mel) overrides the
        reference draw (seed 42 on the model's device; `generator`, if given, is re-seeded with 42,
        used, and left advanced for the vocoder's draws). `trace` records the ODE states.
        Returns the new mel (1, 80, T_mel - F), prompt frames removed.
        """
        inputs = self.prepare(token, prompt_token, prompt_feat, embedding)
        mel = self.decoder(
            inputs.mu,
            inputs.mask,
            inputs.spks,
            inputs.cond,
            n_timesteps=n_timesteps,
            noise=noise,
            trace=trace,
            generator=generator,
        )
        return mel[:, :, inputs.n_prompt_frames :]

    def _check_inputs(
        self, token: Tensor, prompt_token: Tensor, prompt_feat: Tensor, embedding: Tensor
    ) -> None:
        if token.ndim != 2 or token.shape[0] != 1:
            raise ValueError(f"token must be (1, T), got {tuple(token.shape)}")
        if prompt_token.ndim != 2 or prompt_token.shape[0] != 1:
            raise ValueError(f"prompt_token must be (1, P), got {tuple(prompt_token.shape)}")
        if prompt_feat.ndim != 3 or prompt_feat.shape[0] != 1:
            raise ValueError(f"prompt_feat must be (1, F, 80), got {tuple(prompt_feat.shape)}")
        if prompt_feat.shape[2] != self.cfg.output_size:
            raise ValueError(
                f"prompt_feat must have {self.cfg.output_size} bins, got {prompt_feat.shape[2]}"
            )
        if embedding.shape != (1, self.cfg.spk_embed_dim):
            raise ValueError(
                f"embedding must be (1, {self.cfg.spk_embed_dim}), got {tuple(embedding.shape)}"
            )
        if token.shape[1] + prompt_token.shape[1] == 0:
            raise ValueError("no tokens to decode")
        for name, ids in (("token", token), ("prompt_token", prompt_token)):
            self.check_token_ids(ids, name)

    def check_token_ids(self, ids: Tensor, name: str = "token") -> None:
        """Raise ValueError unless every id is in [0, vocab_size) (reads `ids` on the host).

        Out-of-range ids would otherwise fail deep inside the embedding (on CUDA: a device
        assert that poisons the whole context), and negative ones would be silently clamped."""
        if ids.numel() == 0:
            return
        low, high = int(ids.min()), int(ids.max())
        vocab = self.cfg.vocab_size
        if low < 0 or high >= vocab:
            bad = low if low < 0 else high
            raise ValueError(f"{name} holds audio token id {bad}, outside [0, {vocab})")
