"""GLM-4-Voice LM: config mapping, ChatGLM checkpoint loading, int4, cached decoding, sampling."""

from __future__ import annotations

import json
import weakref
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GlmForCausalLM

from models.lm import (
    ChatGLMConfig,
    CheckpointError,
    ConfigError,
    LMStepper,
    ReferenceOrderRMSNorm,
    SamplingConfig,
    build_random_lm,
    check_checkpoint,
    generate,
    load_lm,
    sample_next,
    top_p_filter,
    write_tiny_lm,
)
from models.lm.tiny import tiny_config_dict

SMALL_VOCAB = 256


@pytest.fixture(scope="module")
def fp32_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A float32 tiny checkpoint with a small vocabulary (no tokenizer), 3 shards."""
    out = tmp_path_factory.mktemp("lm_fp32")
    return write_tiny_lm(
        out,
        seed=3,
        num_shards=3,
        dtype=torch.float32,
        with_tokenizer=False,
        padded_vocab_size=SMALL_VOCAB,
    )


def _raw_config(**overrides: object) -> dict:
    raw = tiny_config_dict()
    raw.update(overrides)
    return raw


# ----------------------------------------------------------------------------- config


def test_config_maps_to_native_glm_config() -> None:
    config = ChatGLMConfig.from_dict(_raw_config(rope_ratio=500, pad_token_id=7))
    glm = config.to_glm_config()
    assert glm.vocab_size == 168960
    assert (glm.hidden_size, glm.intermediate_size, glm.num_hidden_layers) == (32, 64, 2)
    assert (glm.num_attention_heads, glm.num_key_value_heads, glm.head_dim) == (4, 2, 8)
    assert glm.rope_parameters["rope_theta"] == pytest.approx(5_000_000.0)
    assert glm.rope_parameters["partial_rotary_factor"] == 0.5
    assert glm.rms_norm_eps == pytest.approx(3.90625e-08)
    assert glm.attention_bias is True
    assert glm.tie_word_embeddings is False
    assert glm.pad_token_id == 7
    assert glm.max_position_embeddings == 8192


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("multi_query_attention", False),
        ("rmsnorm", False),
        ("original_rope", False),
        ("add_bias_linear", True),
        ("apply_residual_connection_post_layernorm", True),
        ("post_layer_norm", False),
        ("tie_word_embeddings", True),
    ],
)
def test_config_rejects_unsupported_architecture_flags(field: str, value: bool) -> None:
    with pytest.raises(ConfigError, match=field):
        ChatGLMConfig.from_dict(_raw_config(**{field: value}))


def test_config_rejects_other_model_types_and_inconsistent_layer_counts() -> None:
    with pytest.raises(ConfigError, match="model_type"):
        ChatGLMConfig.from_dict(_raw_config(model_type="llama"))
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        ChatGLMConfig.from_dict(_raw_config(num_hidden_layers=3))


# ----------------------------------------------------------------------------- checkpoint layout


def test_tiny_checkpoint_has_official_sharded_layout(fp32_dir: Path) -> None:
    index = json.loads((fp32_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert "transformer.rotary_pos_emb.inv_freq" in index["weight_map"]
    assert "transformer.encoder.layers.1.self_attention.query_key_value.bias" in index["weight_map"]
    assert check_checkpoint(fp32_dir).num_layers == 2


def _converted_by_hand(model_dir: Path, config: ChatGLMConfig) -> dict[str, torch.Tensor]:
    """The documented ChatGLM -> GLM key mapping, written out independently of the loader."""
    chatglm: dict[str, torch.Tensor] = {}
    for shard in sorted(model_dir.glob("model-*.safetensors")):
        chatglm.update(load_file(shard))
    q, kv = config.q_size, config.kv_size
    out = {
        "model.embed_tokens.weight": chatglm["transformer.embedding.word_embeddings.weight"],
        "model.norm.weight": chatglm["transformer.encoder.final_layernorm.weight"],
        "lm_head.weight": chatglm["transformer.output_layer.weight"],
    }
    for i in range(config.num_layers):
        src, dst = f"transformer.encoder.layers.{i}.", f"model.layers.{i}."
        for kind in ("weight", "bias"):
            fused = chatglm[f"{src}self_attention.query_key_value.{kind}"]
            out[f"{dst}self_attn.q_proj.{kind}"] = fused[:q]
            out[f"{dst}self_attn.k_proj.{kind}"] = fused[q : q + kv]
            out[f"{dst}self_attn.v_proj.{kind}"] = fused[q + kv :]
        out[f"{dst}self_attn.o_proj.weight"] = chatglm[f"{src}self_attention.dense.weight"]
        out[f"{dst}mlp.gate_up_proj.weight"] = chatglm[f"{src}mlp.dense_h_to_4h.weight"]
        out[f"{dst}mlp.down_proj.weight"] = chatglm[f"{src}mlp.dense_4h_to_h.weight"]
        out[f"{dst}input_layernorm.weight"] = chatglm[f"{src}input_layernorm.weight"]
        out[f"{dst}post_attention_layernorm.weight"] = chatglm[
            f"{src}post_attention_layernorm.weight"
        ]
    return out


def test_loaded_model_equals_model_built_from_hand_converted_tensors(fp32_dir: Path) -> None:
    config = check_checkpoint(fp32_dir)
    expected = _converted_by_hand(fp32_dir, config)
    loaded = load_lm(fp32_dir, dtype=torch.float32)

    got = loaded.state_dict()
    assert set(got) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key

    reference = GlmForCausalLM(config.to_glm_config()).eval()
    reference.load_state_dict(expected, strict=True)
    ids = torch.randint(0, SMALL_VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)


def test_loading_holds_at_most_one_checkpoint_tensor_at_a_time(
    fp32_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from models.lm import loading

    real_safe_open = loading.safe_open
    alive: list[weakref.ref] = []
    reads: list[str] = []

    class Recording:
        def __init__(self, *args: object, **kwargs: object) -> None:
            self._inner = real_safe_open(*args, **kwargs)

        def __enter__(self) -> Recording:
            self._handle = self._inner.__enter__()
            return self

        def __exit__(self, *exc: object) -> None:
            self._inner.__exit__(*exc)

        def get_tensor(self, key: str) -> torch.Tensor:
            assert all(ref() is None for ref in alive), (
                "a previous checkpoint tensor is still alive"
            )
            tensor = self._handle.get_tensor(key)
            alive.append(weakref.ref(tensor))
            reads.append(key)
            return tensor

    monkeypatch.setattr(loading, "safe_open", Recording)
    load_lm(fp32_dir, dtype=torch.float32)
    assert len(reads) == len(set(reads)) == 3 + 2 * 7  # inv_freq is never read


def test_loaded_model_uses_reference_order_rmsnorm_and_float32_rope(tmp_path: Path) -> None:
    model_dir = write_tiny_lm(
        tmp_path, with_tokenizer=False, padded_vocab_size=SMALL_VOCAB, rope_ratio=500
    )
    model = load_lm(model_dir, dtype=torch.bfloat16)
    assert isinstance(model.model.norm, ReferenceOrderRMSNorm)
    assert all(
        isinstance(layer.input_layernorm, ReferenceOrderRMSNorm) for layer in model.model.layers
    )
    inv_freq = model.model.rotary_emb.inv_freq
    assert inv_freq.dtype == torch.float32  # the saved bf16-era inv_freq is not used
    rot = 4  # half of kv_channels 8
    expected = 1.0 / (5_000_000.0 ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
    torch.testing.assert_close(inv_freq, expected)
    assert model.lm_head.weight.dtype == torch.bfloat16


def test_reference_order_rmsnorm_rounds_once_after_the_weight() -> None:
    norm = ReferenceOrderRMSNorm(16, eps=1e-6)
    norm.weight.data = (
        1 + 0.37 * torch.randn(16, generator=torch.Generator().manual_seed(1))
    ).bfloat16()
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(2)).bfloat16()
    xf = x.float()
    exact = norm.weight.float() * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6))
    assert torch.equal(norm(x), exact.bfloat16())


@pytest.mark.parametrize("quantization", [None, "int4"])
def test_random_lm_is_built_through_the_checkpoint_conversion(quantization: str | None) -> None:
    if quantization:
        pytest.importorskip("bitsandbytes")
    config = ChatGLMConfig.from_dict(
        tiny_config_dict(padded_vocab_size=SMALL_VOCAB, hidden_size=64, kv_channels=16)
    )
    model = build_random_lm(config, "cpu", torch.bfloat16, quantization, seed=1)
    assert not any(p.device.type == "meta" for p in model.parameters())
    assert model.model.layers[1].self_attn.k_proj.bias.shape == (config.kv_size,)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, SMALL_VOCAB) and torch.isfinite(logits).all()


# ----------------------------------------------------------------------------- errors before allocation


def _forbid_weight_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("weights were read before the checkpoint was validated")

    monkeypatch.setattr("models.lm.loading.safe_open", refuse)


def test_key_missing_from_index_is_reported_before_any_weight_is_read(
    fp32_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = tmp_path / "ckpt"
    broken.mkdir()
    for f in fp32_dir.iterdir():
        (broken / f.name).symlink_to(f)
    index = json.loads((fp32_dir / "model.safetensors.index.json").read_text())
    del index["weight_map"]["transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"]
    (broken / "model.safetensors.index.json").unlink()
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    _forbid_weight_reads(monkeypatch)
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors\.index\.json.*layers\.1\.mlp\.dense_4h_to_h\.weight",
    ):
        load_lm(broken, dtype=torch.float32)


def _rewrite_shard_holding(
    model_dir: Path, key: str, edit: Callable[[dict[str, torch.Tensor]], object]
) -> str:
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    shard = index["weight_map"][key]
    tensors = load_file(model_dir / shard)
    edit(tensors)
    save_file(tensors, str(model_dir / shard), metadata={"format": "pt"})
    return shard


def test_key_missing_from_its_shard_names_the_shard_and_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = write_tiny_lm(tmp_path, with_tokenizer=False, padded_vocab_size=SMALL_VOCAB)
    key = "transformer.encoder.layers.0.self_attention.query_key_value.bias"
    shard = _rewrite_shard_holding(model_dir, key, lambda t: t.pop(key))
    _forbid_weight_reads(monkeypatch)
    with pytest.raises(CheckpointError, match=rf"{shard}.*{key}.*missing"):
        load_lm(model_dir)


def test_wrong_shape_names_the_shard_key_and_shapes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = write_tiny_lm(tmp_path, with_tokenizer=False, padded_vocab_size=SMALL_VOCAB)
    key = "transformer.encoder.layers.1.mlp.dense_h_to_4h.weight"

    def shrink(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key] = tensors[key][:-2].contiguous()

    shard = _rewrite_shard_holding(model_dir, key, shrink)
    _forbid_weight_reads(monkeypatch)
    with pytest.raises(CheckpointError, match=rf"{shard}.*{key}.*\[126, 32\].*\[128, 32\]"):
        check_checkpoint(model_dir)


def test_unexpected_key_is_rejected(tmp_path: Path) -> None:
    model_dir = write_tiny_lm(tmp_path, with_tokenizer=False, padded_vocab_size=SMALL_VOCAB)
    key = "transformer.encoder.final_layernorm.weight"

    def add_extra(tensors: dict[str, torch.Tensor]) -> None:
        tensors["transformer.prefix_encoder.embedding.weight"] = torch.zeros(2, 2)

    shard = _rewrite_shard_holding(model_dir, key, add_extra)
    index_path = model_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["transformer.prefix_encoder.embedding.weight"] = shard
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="prefix_encoder"):
        check_checkpoint(model_dir)


# ----------------------------------------------------------------------------- int4


def test_int4_loads_on_cpu_as_nf4_double_quant_and_tracks_bf16(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    model_dir = write_tiny_lm(
        tmp_path,
        with_tokenizer=False,
        padded_vocab_size=SMALL_VOCAB,
        hidden_size=64,
        ffn_hidden_size=128,
        kv_channels=16,
    )
    bf16 = load_lm(model_dir, dtype=torch.bfloat16)
    int4 = load_lm(model_dir, dtype=torch.bfloat16, quantization="int4")

    q_proj = int4.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == "Linear4bit"
    assert q_proj.weight.quant_state.quant_type == "nf4"
    assert q_proj.weight.quant_state.nested  # double quantization
    assert q_proj.compute_dtype == torch.bfloat16
    assert type(int4.model.layers[1].mlp.gate_up_proj).__name__ == "Linear4bit"
    assert type(int4.lm_head) is torch.nn.Linear  # the output layer stays unquantized

    ids = torch.randint(0, SMALL_VOCAB, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a = bf16(ids).logits.float().flatten()
        b = int4(ids).logits.float().flatten()
    assert torch.isfinite(b).all()
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.9
    assert (a - b).abs().max() < 0.5 * a.abs().max()


def test_unknown_quantization_is_rejected(fp32_dir: Path) -> None:
    with pytest.raises(ValueError, match="quantization"):
        load_lm(fp32_dir, quantization="int8")


# ----------------------------------------------------------------------------- cached decoding


@pytest.fixture(scope="module")
def stepper(fp32_dir: Path) -> LMStepper:
    return LMStepper(load_lm(fp32_dir, dtype=torch.float32))


def test_cached_decode_equals_full_forward(stepper: LMStepper) -> None:
    gen = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, SMALL_VOCAB, (1, 7), generator=gen)
    continuation = torch.randint(0, SMALL_VOCAB, (1, 5), generator=gen)
    logits, state = stepper.prefill(prompt)
    cached = [logits]
    for k in range(continuation.shape[1]):
        cached.append(stepper.decode(state, continuation[:, k]))
    with torch.no_grad():
        full = stepper.model(torch.cat([prompt, continuation], dim=1)).logits[0, 6:]
    torch.testing.assert_close(torch.cat(cached), full, rtol=0, atol=1e-4)
    assert state.length == 12


def test_left_padded_batch_decodes_like_each_row_alone(stepper: LMStepper) -> None:
    gen = torch.Generator().manual_seed(6)
    long_row = torch.randint(0, SMALL_VOCAB, (9,), generator=gen)
    short_row = torch.randint(0, SMALL_VOCAB, (5,), generator=gen)
    ids = torch.stack([long_row, torch.cat([torch.full((4,), 1), short_row])])
    mask = torch.tensor([[1] * 9, [0] * 4 + [1] * 5])
    logits, state = stepper.prefill(ids, mask)
    step = torch.tensor([11, 12])
    batched = stepper.decode(state, step)
    for row, seq in enumerate((long_row, short_row)):
        alone_logits, alone = stepper.prefill(seq[None])
        torch.testing.assert_close(logits[row], alone_logits[0], rtol=0, atol=1e-4)
        torch.testing.assert_close(
            batched[row], stepper.decode(alone, step[row : row + 1])[0], rtol=0, atol=1e-4
        )


def test_appending_a_next_turn_to_the_cache_equals_prefilling_everything(
    stepper: LMStepper,
) -> None:
    first_turn = torch.arange(20, 31)[None]
    next_turn = torch.arange(100, 106)[None]
    _, state = stepper.prefill(first_turn)
    appended = stepper.append(state, next_turn)
    fresh, _ = stepper.prefill(torch.cat([first_turn, next_turn], dim=1))
    torch.testing.assert_close(appended, fresh, rtol=0, atol=1e-4)


def test_crop_forgets_tokens_like_they_were_never_fed(stepper: LMStepper) -> None:
    prompt = torch.arange(10, 18)[None]
    _, state = stepper.prefill(prompt)
    stepper.decode(state, torch.tensor([40]))
    stepper.decode(state, torch.tensor([41]))
    stepper.crop(state, 8)
    after_crop = stepper.decode(state, torch.tensor([50]))
    _, fresh = stepper.prefill(prompt)
    torch.testing.assert_close(
        after_crop, stepper.decode(fresh, torch.tensor([50])), rtol=0, atol=1e-4
    )


# ----------------------------------------------------------------------------- sampling


def test_sampling_defaults_are_the_demo_values() -> None:
    config = SamplingConfig()
    assert (config.temperature, config.top_p, config.max_new_tokens) == (0.2, 0.8, 2000)


def test_top_p_keeps_the_smallest_nucleus_reaching_top_p() -> None:
    logits = torch.tensor([[0.5, 0.3, 0.2, 0.0]]).clamp(min=1e-9).log()
    kept = torch.isfinite(top_p_filter(logits, 0.8))
    assert kept.tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_p_filter(logits, 0.1)).tolist() == [[True, False, False, False]]


def test_zero_temperature_is_greedy() -> None:
    logits = torch.tensor([[0.1, 3.0, -1.0], [2.0, 0.0, 1.9]])
    assert sample_next(logits, 0.0, 0.8, None).tolist() == [1, 0]


def test_seeded_sampling_is_reproducible_and_stays_in_the_nucleus() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(7)) * 3
    config = SamplingConfig(temperature=1.0, top_p=0.5, seed=123)
    draws_a = torch.stack(
        [sample_next(logits, 1.0, 0.5, g) for g in [config.generator()] for _ in range(20)]
    )
    draws_b = torch.stack(
        [sample_next(logits, 1.0, 0.5, g) for g in [config.generator()] for _ in range(20)]
    )
    assert torch.equal(draws_a, draws_b)
    allowed = torch.isfinite(top_p_filter(logits, 0.5))
    for row in range(3):
        assert allowed[row, draws_a[:, row]].all()


class _ScriptedBackend:
    """Always predicts the next id of a fixed script (a one-hot logit)."""

    def __init__(self, script: list[int], vocab: int = 20) -> None:
        self.script, self.vocab, self.calls = script, vocab, 0

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def _logits(self) -> torch.Tensor:
        out = torch.full((1, self.vocab), -10.0)
        out[0, self.script[self.calls]] = 10.0
        self.calls += 1
        return out

    def prefill(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, None]:
        return self._logits(), None

    def decode(self, state: None, token_ids: torch.Tensor) -> torch.Tensor:
        return self._logits()


def test_generate_yields_until_and_including_the_stop_id() -> None:
    backend = _ScriptedBackend([3, 4, 5, 9, 6, 7])
    out = list(generate(backend, [1, 2], SamplingConfig(seed=0), stop_ids={9}))
    assert out == [3, 4, 5, 9]


def test_generate_stops_at_max_new_tokens() -> None:
    backend = _ScriptedBackend([3] * 10)
    out = list(generate(backend, [1], SamplingConfig(max_new_tokens=4, seed=0), stop_ids={9}))
    assert out == [3, 3, 3, 3]
