"""The fused one-token decode step computes transformers' step with fewer kernels: same
logits, same cache contents, and the model it fuses keeps working as before."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.glm4voice.static_batch import StaticCacheConfig, StaticKVBatch
from models.lm import LMStepper, build_random_lm
from models.lm.configuration_lm import ChatGLMConfig
from models.lm.fused_step import FusedDecodeStep, fuse_qkv
from models.lm.loading import load_lm
from models.lm.tiny import tiny_config_dict, write_tiny_lm

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 512
SCHEDULE = ["ab", "a", "ab", "b", "ab", "ab", "a"] * 4


def _model(dtype: torch.dtype, device: str = "cpu", layers: int = 2) -> nn.Module:
    config = ChatGLMConfig.from_dict(tiny_config_dict(padded_vocab_size=VOCAB, num_layers=layers))
    return build_random_lm(config, device=device, dtype=dtype, seed=1)


def _steps(stepper: LMStepper, config: StaticCacheConfig, graphs: bool = False) -> torch.Tensor:
    """Prefill two rows, then step the schedule's subsets (the cache packs its rows once
    the 36 columns run out); every logit row, in order."""
    static = StaticKVBatch(stepper, config)
    if graphs:
        static.record_graphs()
    gen = torch.Generator().manual_seed(0)
    prompts = {
        k: torch.randint(0, 500, (n,), generator=gen).tolist() for k, n in (("a", 7), ("b", 12))
    }
    rows = [static.prefill(key, prompt) for key, prompt in prompts.items()]
    tokens = dict.fromkeys("ab", 3)
    for keys in SCHEDULE:
        logits = static.step(list(keys), [tokens[k] for k in keys])
        rows.append(logits)
        for key, row in zip(keys, logits, strict=True):
            tokens[key] = int(row.argmax())
    assert static.mode == ("graphs" if graphs else "plain")
    return torch.cat([row.reshape(-1, VOCAB) for row in rows])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_step_gives_the_logits_of_transformers_layers(dtype):
    stepper = LMStepper(_model(dtype))
    spans = {"max_batch": 4, "max_len": 36, "min_columns": 8}
    want = _steps(stepper, StaticCacheConfig(**spans, fused=False))
    got = _steps(stepper, StaticCacheConfig(**spans, fused=True))
    assert got.shape == want.shape == (2 + sum(len(k) for k in SCHEDULE), VOCAB)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    else:  # kernels may sum in another order: about one bf16 ulp of logits near 6 (0.03)
        _assert_near_in_bf16(got, want, max_ulps=1)


def _assert_near_in_bf16(got: torch.Tensor, want: torch.Tensor, max_ulps: int) -> None:
    """Within `max_ulps` bf16 ulp of logits in [4, 8) everywhere, and far closer on average
    (a 1 % error in the attention scale moves these logits by 0.013 on average)."""
    error = (got - want).abs()
    assert error.max() <= max_ulps * 2**-5 + 1e-6, float(error.max())
    assert error.mean() <= 0.004, float(error.mean())


def test_the_fused_step_writes_the_cache_entries_transformers_writes():
    stepper = LMStepper(_model(torch.float32))
    caches = []
    for fused in (False, True):
        static = StaticKVBatch(stepper, StaticCacheConfig(max_batch=2, max_len=16, fused=fused))
        static.prefill("a", [5, 6, 7])
        static.prefill("b", [8, 9])
        static.step(["a", "b"], [10, 11])
        static.step(["b"], [12])
        caches.append(torch.stack(static.cache.kv))
    torch.testing.assert_close(caches[1], caches[0], atol=1e-6, rtol=0)
    assert caches[0][:, 1, :, 3].abs().sum() > 0  # b's step-one column was written


def test_fusing_q_k_v_shares_one_weight_and_leaves_the_model_unchanged():
    model = _model(torch.float32)
    ids = torch.tensor([[1, 2, 3, 4]])
    before = model(input_ids=ids).logits
    attention = model.model.layers[0].self_attn
    weight, bias = fuse_qkv(attention)
    rows = [attention.q_proj.out_features, attention.k_proj.out_features]
    assert weight.shape[0] == rows[0] + 2 * rows[1] and bias is not None
    assert attention.q_proj.weight.data_ptr() == weight.data_ptr()
    assert attention.v_proj.weight.untyped_storage().data_ptr() == weight.data_ptr()
    again, _ = fuse_qkv(attention)  # already fused: the same storage, no copy
    assert again.data_ptr() == weight.data_ptr() and again.shape == weight.shape
    FusedDecodeStep(model)
    torch.testing.assert_close(model(input_ids=ids).logits, before, atol=0, rtol=0)


def test_layers_that_are_not_plain_linears_are_called_as_they_are():
    """A Linear subclass (as a quantized layer is) is not fused: the step calls it."""

    class CountingLinear(nn.Linear):
        calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            CountingLinear.calls += 1
            return super().forward(x)

    model = _model(torch.float32)
    attention = model.model.layers[1].self_attn
    for name in ("k_proj", "o_proj"):
        plain = getattr(attention, name)
        counting = CountingLinear(plain.in_features, plain.out_features, plain.bias is not None)
        counting.load_state_dict(plain.state_dict())
        setattr(attention, name, counting)
    stepper = LMStepper(model)
    spans = {"max_batch": 4, "max_len": 36, "min_columns": 8}
    want = _steps(stepper, StaticCacheConfig(**spans, fused=False))
    CountingLinear.calls = 0
    got = _steps(stepper, StaticCacheConfig(**spans, fused=True))
    assert CountingLinear.calls == 2 * (2 + len(SCHEDULE))  # k and o: each prefill and step
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_a_4bit_model_steps_through_the_fused_path_as_through_transformers_layers(tmp_path):
    pytest.importorskip("bitsandbytes")
    # Every layer's input at least one 64-value quantization block wide: on CPUs with
    # AVX512-BF16 bitsandbytes repacks 4-bit weights per block and fails on narrower ones.
    sizes = {"hidden_size": 64, "ffn_hidden_size": 128, "kv_channels": 16}
    model_dir = write_tiny_lm(tmp_path, with_tokenizer=False, padded_vocab_size=VOCAB, **sizes)
    model = load_lm(model_dir, dtype=torch.bfloat16, quantization="int4")
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    stepper = LMStepper(model)
    spans = {"max_batch": 4, "max_len": 36, "min_columns": 8}
    want = _steps(stepper, StaticCacheConfig(**spans, fused=False))
    got = _steps(stepper, StaticCacheConfig(**spans, fused=True))
    _assert_near_in_bf16(got, want, max_ulps=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fused_graph_steps_on_a_gpu_give_the_logits_of_transformers_plain_steps():
    stepper = LMStepper(_model(torch.bfloat16, device="cuda", layers=4))
    spans = {"max_batch": 4, "max_len": 36, "min_columns": 8}
    want = _steps(stepper, StaticCacheConfig(**spans, fused=False))
    got = _steps(stepper, StaticCacheConfig(**spans, fused=True), graphs=True)
    _assert_near_in_bf16(got, want, max_ulps=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prompts_prefilled_together_by_the_fused_path_continue_as_transformers_ones(dtype):
    """Right-padded prompts written straight into their rows give the logits (and, through
    the steps after, the cache) of transformers' left-padded prefill copied into the rows."""
    stepper = LMStepper(_model(dtype))
    gen = torch.Generator().manual_seed(4)
    prompts = [
        (key, torch.randint(0, 500, (n,), generator=gen).tolist())
        for key, n in (("a", 5), ("b", 17), ("c", 9))
    ]
    results = []
    for fused in (False, True):
        static = StaticKVBatch(stepper, StaticCacheConfig(max_batch=4, max_len=40, fused=fused))
        static.prefill("held", [7, 8, 9])  # a live row: the prompts take the free ones
        rows = static.prefill_many(prompts)
        tokens = [int(row.argmax()) for row in rows]
        for _ in range(4):
            logits = static.step(["a", "b", "c", "held"], [*tokens, 1])
            rows += list(logits)
            tokens = [int(row.argmax()) for row in logits[:3]]
        results.append(torch.stack(rows))
    if dtype == torch.float32:
        torch.testing.assert_close(results[1], results[0], atol=1e-5, rtol=0)
    else:
        _assert_near_in_bf16(results[1], results[0], max_ulps=1)


def test_an_empty_prompt_is_refused_before_any_row_is_taken():
    static = StaticKVBatch(LMStepper(_model(torch.float32)), StaticCacheConfig(max_batch=2))
    with pytest.raises(ValueError, match="empty prompt"):
        static.prefill_many([("a", [1, 2]), ("b", [])])
    assert static.live_keys == []
