"""Flow decoder: reference parity, config parsing, strict loading, batched CFG, causality."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.flow import (
    CheckpointError,
    FlowConfig,
    FlowConfigError,
    FlowDecoder,
    mel_frames_for_tokens,
    reference_noise,
)
from models.flow.parity import check
from models.flow.tiny import randomize_flow_weights, tiny_flow_yaml_section, write_tiny_decoder_flow

SPEAKER_DIM = 192
MEL_BINS = 80


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A decoder folder with a tiny random flow.pt and a config.yaml holding its flow section."""
    out = tmp_path_factory.mktemp("tiny_decoder")
    write_tiny_decoder_flow(out, seed=3)
    (out / "config.yaml").write_text("sample_rate: 22050\n" + tiny_flow_yaml_section())
    return out


@pytest.fixture(scope="module")
def tiny_model(tiny_dir: Path) -> FlowDecoder:
    return FlowDecoder.from_pretrained(tiny_dir)


def _no_prompt() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, MEL_BINS)


# ---------------------------------------------------------------- reference parity
def test_flow_matches_reference_fixtures(golden_dir: Path) -> None:
    results = check(golden_dir)
    assert len(results) >= 25
    failed = [r.line() for r in results if not r.passed]
    assert not failed, "\n".join(failed)


def test_prompted_calls_match_reference_streaming_blocks(golden_dir: Path) -> None:
    """Each web-demo block re-decodes all previous tokens with the previous mels as prompt."""
    stream = golden_dir / "token2wav_stream"
    model = FlowDecoder.from_pretrained(golden_dir / "flow")

    def load(name: str) -> torch.Tensor:
        return torch.from_numpy(np.load(stream / f"{name}.npy"))

    prompt_token = torch.zeros(1, 0, dtype=torch.long)
    for block in range(2):
        token = load(f"demo_b{block}_token")
        mel = model.inference(
            token, prompt_token, load(f"demo_b{block}_prompt_feat"), torch.zeros(1, SPEAKER_DIM)
        )
        expected = load(f"demo_b{block}_flow_mel")
        assert mel.shape == expected.shape
        assert (mel - expected).abs().max().item() < 1e-4
        prompt_token = torch.cat([prompt_token, token], dim=1)


# ---------------------------------------------------------------- config
def test_official_config_gives_full_size_values(golden_dir: Path) -> None:
    cfg = FlowConfig.from_yaml(golden_dir / "flow" / "config_official_mirror.yaml")
    assert (cfg.input_size, cfg.output_size, cfg.spk_embed_dim) == (512, 80, 192)
    assert (cfg.vocab_size, cfg.input_frame_rate) == (16384, 12.5)
    enc = cfg.encoder
    assert (enc.output_size, enc.attention_heads, enc.linear_units, enc.num_blocks) == (
        512,
        8,
        2048,
        6,
    )
    assert enc.block_size == 10 and enc.head_dim == 64
    assert cfg.length_regulator.sampling_ratios == (1, 1, 1, 1)
    assert cfg.decoder.inference_cfg_rate == 0.7 and cfg.decoder.t_scheduler == "cosine"
    assert cfg.decoder.sigma_min == pytest.approx(1e-6)
    est = cfg.decoder.estimator
    assert est.channels == (256, 256) and est.attention_head_dim == 64 and est.num_heads == 8
    assert (est.n_blocks, est.num_mid_blocks, est.in_channels) == (4, 12, 320)


def test_full_size_model_has_the_official_key_set(golden_dir: Path) -> None:
    cfg = FlowConfig.from_yaml(golden_dir / "flow" / "config_official_mirror.yaml")
    with torch.device("meta"):
        model = FlowDecoder(cfg)
    lines = (golden_dir / "flow" / "state_dict_keys_real_inferred.txt").read_text().splitlines()
    expected = {}
    for line in lines:
        key, shape, _ = line.split("\t")
        expected[key] = tuple(int(v) for v in shape.strip("[]").split(", "))
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected


def test_config_rejects_unbuilt_attention_variant() -> None:
    text = tiny_flow_yaml_section().replace("'block_rel_selfattn'", "'rel_selfattn'")
    with pytest.raises(FlowConfigError, match="selfattention_layer_type"):
        FlowConfig.from_yaml_text(text)


def test_config_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("hift: 1\n")
    with pytest.raises(FlowConfigError, match="config.yaml.*flow"):
        FlowConfig.from_yaml(path)


# ---------------------------------------------------------------- loading
def test_strict_load_names_missing_key_and_file(tiny_dir: Path, tmp_path: Path) -> None:
    state = torch.load(tiny_dir / "flow.pt", weights_only=True)
    del state["encoder.encoders.1.self_attn.pos_bias_u"]
    torch.save(state, tmp_path / "flow.pt")
    (tmp_path / "config.yaml").write_text((tiny_dir / "config.yaml").read_text())
    with pytest.raises(
        CheckpointError, match=r"flow\.pt.*encoder\.encoders\.1\.self_attn\.pos_bias_u"
    ):
        FlowDecoder.from_pretrained(tmp_path)


def test_strict_load_names_unexpected_and_misshapen_keys(tiny_dir: Path) -> None:
    model = FlowDecoder(FlowConfig.from_yaml(tiny_dir / "config.yaml"))
    state = torch.load(tiny_dir / "flow.pt", weights_only=True)
    extra = dict(state, **{"decoder.estimator.extra.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="unexpected key 'decoder.estimator.extra.weight'"):
        model.load_state(extra, source="flow.pt")
    bad = dict(state)
    bad["encoder_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match=r"'encoder_proj.weight' has shape \(3, 3\)"):
        model.load_state(bad, source="flow.pt")


# ---------------------------------------------------------------- behaviour on the tiny model
def test_tiny_model_decodes_on_cpu_with_prompt(tiny_model: FlowDecoder) -> None:
    token = torch.randint(0, 16384, (1, 12), generator=torch.Generator().manual_seed(1))
    prompt_token = torch.randint(0, 16384, (1, 5), generator=torch.Generator().manual_seed(2))
    n_prompt = mel_frames_for_tokens(5)
    prompt_feat = torch.randn(1, n_prompt, MEL_BINS)
    mel = tiny_model.inference(token, prompt_token, prompt_feat, torch.randn(1, SPEAKER_DIM))
    assert mel.shape == (1, MEL_BINS, mel_frames_for_tokens(17) - n_prompt)
    assert torch.isfinite(mel).all()


def test_default_noise_is_seed_42_and_leaves_global_rng_alone(tiny_model: FlowDecoder) -> None:
    torch.manual_seed(42)
    expected = torch.randn(1, MEL_BINS, 37)
    assert torch.equal(
        reference_noise((1, MEL_BINS, 37), torch.device("cpu"), torch.float32), expected
    )

    torch.manual_seed(7)
    before = torch.get_rng_state()
    token = torch.arange(6).unsqueeze(0)
    first = tiny_model.inference(token, *_no_prompt(), torch.zeros(1, SPEAKER_DIM))
    assert torch.equal(torch.get_rng_state(), before)
    second = tiny_model.inference(token, *_no_prompt(), torch.zeros(1, SPEAKER_DIM))
    assert torch.equal(first, second)


def test_given_generator_continues_the_reference_draw_sequence(tiny_model: FlowDecoder) -> None:
    token = torch.arange(4).unsqueeze(0)
    frames = mel_frames_for_tokens(4)
    generator = torch.Generator().manual_seed(0)
    tiny_model.inference(token, *_no_prompt(), torch.zeros(1, SPEAKER_DIM), generator=generator)
    after_flow = torch.rand(1, 9, 1, generator=generator)
    torch.manual_seed(42)
    torch.randn(1, MEL_BINS, frames)
    assert torch.equal(after_flow, torch.rand(1, 9, 1))


def test_injected_noise_overrides_the_seeded_draw(tiny_model: FlowDecoder) -> None:
    token = torch.arange(4).unsqueeze(0)
    frames = mel_frames_for_tokens(4)
    noise = torch.randn(1, MEL_BINS, frames, generator=torch.Generator().manual_seed(5))
    default = tiny_model.inference(token, *_no_prompt(), torch.zeros(1, SPEAKER_DIM))
    injected = tiny_model.inference(token, *_no_prompt(), torch.zeros(1, SPEAKER_DIM), noise=noise)
    assert not torch.allclose(default, injected)


def test_batched_guidance_equals_two_separate_estimator_passes(tiny_model: FlowDecoder) -> None:
    gen = torch.Generator().manual_seed(11)
    frames = 23
    x, mu, cond = (torch.randn(1, MEL_BINS, frames, generator=gen) for _ in range(3))
    mask = torch.ones(1, 1, frames)
    spks = torch.randn(1, MEL_BINS, generator=gen)
    t = torch.tensor(0.3)
    estimator = tiny_model.estimator
    rate = tiny_model.decoder.inference_cfg_rate
    with torch.no_grad():
        v_cond = estimator(x, mask, mu, t, spks, cond)
        v_uncond = estimator(
            x, mask, torch.zeros_like(mu), t, torch.zeros_like(spks), torch.zeros_like(cond)
        )
        batched = tiny_model.decoder.guided_velocity(x, mask, mu, t, spks, cond)
    separate = (1.0 + rate) * v_cond - rate * v_uncond
    assert rate == pytest.approx(0.7)
    assert torch.allclose(batched, separate, atol=1e-5, rtol=0)
    assert not torch.allclose(v_cond, v_uncond, atol=1e-3)


@pytest.mark.parametrize(
    ("n_tokens", "frames"),
    [(1, 6), (10, 68), (25, 172), (49, 337), (50, 344), (190, 1309), (200, 1378)],
)
def test_mel_length_uses_float32_truncation(n_tokens: int, frames: int) -> None:
    assert mel_frames_for_tokens(n_tokens) == frames


# ---------------------------------------------------------------- block-causal encoder
def _encoder_inputs(model: FlowDecoder, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, n, model.cfg.encoder.input_size, generator=gen)


def test_complete_blocks_do_not_change_when_tokens_are_appended(tiny_model: FlowDecoder) -> None:
    block = tiny_model.cfg.encoder.block_size
    xs = _encoder_inputs(tiny_model, 3 * block + 4, seed=21)
    with torch.no_grad():
        short, _ = tiny_model.encoder(xs[:, : 2 * block], torch.tensor([2 * block]))
        long, _ = tiny_model.encoder(xs, torch.tensor([xs.shape[1]]))
        partial, _ = tiny_model.encoder(xs[:, : 2 * block + 3], torch.tensor([2 * block + 3]))
    assert torch.allclose(long[:, : 2 * block], short, atol=1e-5, rtol=0)
    # a token sees the rest of its own block, so a partial block does change
    assert not torch.allclose(
        long[:, 2 * block : 2 * block + 3], partial[:, 2 * block :], atol=1e-3
    )


def test_chunked_encoding_equals_a_full_pass(tiny_model: FlowDecoder) -> None:
    block = tiny_model.cfg.encoder.block_size
    n = 4 * block + 7
    xs = _encoder_inputs(tiny_model, n, seed=22)
    encoder = tiny_model.encoder
    with torch.no_grad():
        full, _ = encoder(xs, torch.tensor([n]))
        first, cache = encoder.forward_chunk(xs[:, :block])
        second, cache = encoder.forward_chunk(xs[:, block : 3 * block + 5], cache)
        # the 5 tokens of the trailing partial block are not cached: they are passed again
        assert cache.length == 3 * block
        third, cache = encoder.forward_chunk(xs[:, 3 * block :], cache)
    assert cache.length == 4 * block
    got = torch.cat([first, second[:, : 2 * block], third], dim=1)
    assert torch.allclose(got, full, atol=1e-5, rtol=0)


def test_padded_batch_encodes_like_separate_calls(tiny_model: FlowDecoder) -> None:
    gen = torch.Generator().manual_seed(24)
    tokens = torch.randint(0, 16384, (2, 23), generator=gen)
    lengths = torch.tensor([23, 14])
    with torch.no_grad():
        batched, _ = tiny_model.encode(tokens, lengths)
        alone, _ = tiny_model.encode(tokens[1:, :14], lengths[1:])
    assert torch.allclose(batched[1:, :14], alone, atol=1e-5, rtol=0)


def test_trimmed_cache_keeps_a_bounded_left_context(tiny_model: FlowDecoder) -> None:
    block = tiny_model.cfg.encoder.block_size
    xs = _encoder_inputs(tiny_model, 6 * block, seed=23)
    with torch.no_grad():
        _, cache = tiny_model.encoder.forward_chunk(xs[:, : 5 * block])
        trimmed = cache.trim(2 * block)
        out, next_cache = tiny_model.encoder.forward_chunk(xs[:, 5 * block :], trimmed)
    assert trimmed.keys[0].shape[2] == 2 * block and trimmed.start == 3 * block
    assert next_cache.length == 6 * block and next_cache.keys[0].shape[2] == 3 * block
    assert out.shape == (1, block, tiny_model.cfg.encoder.output_size)


def test_randomized_weights_are_reproducible_from_the_seed(tiny_dir: Path) -> None:
    cfg = FlowConfig.from_yaml(tiny_dir / "config.yaml")
    a = randomize_flow_weights(FlowDecoder(cfg), seed=9).state_dict()
    b = randomize_flow_weights(FlowDecoder(cfg), seed=9).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    written = torch.load(tiny_dir / "flow.pt", weights_only=True)
    assert not torch.equal(written["encoder_proj.weight"], a["encoder_proj.weight"])


@pytest.mark.parametrize("trim", [None, 20, 25])
def test_encode_next_equals_encode_chunk_for_any_cache(
    tiny_model: FlowDecoder, trim: int | None
) -> None:
    """The cache as bare tensors (no positions, no host reads) gives `encode_chunk`'s
    features and keys/values bit for bit, also once the cache is trimmed (to a size that is
    not a whole number of blocks: 25)."""
    block = tiny_model.cfg.encoder.block_size
    gen = torch.Generator().manual_seed(25)
    tokens = torch.randint(0, 16384, (1, 6 * block + 4), generator=gen)
    cache = None
    with torch.no_grad():
        for start in range(0, tokens.shape[1], block):
            token = tokens[:, start : start + block]
            keys = cache.keys if cache is not None else []
            values = cache.values if cache is not None else []
            want, extended = tiny_model.encode_chunk(token, cache)
            got, got_keys, got_values = tiny_model.encode_next(token, keys, values)
            assert torch.equal(got, want)
            assert all(torch.equal(a, b) for a, b in zip(got_keys, extended.keys, strict=True))
            assert all(torch.equal(a, b) for a, b in zip(got_values, extended.values, strict=True))
            cache = extended if trim is None else extended.trim(trim)
    assert cache is not None and (trim is None or cache.start > 0)


def test_regulate_equals_the_masked_length_regulator(tiny_model: FlowDecoder) -> None:
    h = torch.randn(2, 30, MEL_BINS, generator=torch.Generator().manual_seed(26))
    with torch.no_grad():
        masked, _ = tiny_model.length_regulator(h, torch.tensor([207, 207]))
        got = tiny_model.regulate(h, 207)
    assert got.shape == (2, MEL_BINS, 207)
    assert torch.equal(got, masked.transpose(1, 2))
