"""The LM benchmark's measurement path runs end to end at a tiny size."""

from __future__ import annotations

import math

import torch

from bench.bench_lm import (
    FULL_SIZES,
    bench_conversation_prefill,
    bench_decode_steps,
    bench_prefill_together,
    bench_random,
    format_profile,
    format_steps,
    format_table,
    profile_decode_step,
    split_decode_step,
)
from models.lm import ChatGLMConfig, build_random_lm, expected_shapes
from models.lm.tiny import tiny_config_dict


def test_random_weight_benchmark_reports_positive_rates() -> None:
    config = ChatGLMConfig.from_dict(
        tiny_config_dict(padded_vocab_size=512, hidden_size=64, kv_channels=16)
    )
    (result,) = bench_random(
        config, torch.device("cpu"), ["bf16"], prompt_tokens=4, steps=2, size="tiny"
    )
    assert result.prefill_tokens_per_s > 0 and result.decode_tokens_per_s > 0
    assert "bf16" in format_table([result])


def test_full_size_config_has_the_published_parameter_count() -> None:
    # The model card of glm-4-voice-9b lists 9.54B parameters; with vocab 168960 it is exact.
    config = ChatGLMConfig.from_dict(tiny_config_dict(**FULL_SIZES))
    total = sum(math.prod(shape) for shape in expected_shapes(config).values())
    assert total == 9_542_557_696


def test_decode_step_and_prefill_tables_run_at_a_tiny_size() -> None:
    config = ChatGLMConfig.from_dict(tiny_config_dict(padded_vocab_size=512))
    model = build_random_lm(config, "cpu", torch.float32)
    kinds = ["dynamic", "static", "static-unfused"]
    steps = bench_decode_steps(model, "tiny", kinds, [1, 3], 8, 2, 500)
    assert [(r.decode_step, r.batch) for r in steps] == [
        (kind, batch) for kind in kinds for batch in (1, 3)
    ]
    assert all(
        math.isclose(r.tokens_per_s_total, r.batch * r.tokens_per_s_per_sequence) for r in steps
    )
    assert "static-unfused" in format_steps(steps)
    assert split_decode_step("graphs-unfused") == ("graphs", True)
    assert split_decode_step("graphs") == ("graphs", False)
    fused, transformers = bench_prefill_together(model, "tiny", [3], 16, 500)
    assert (fused.path, transformers.path) == ("fused", "transformers")
    for prefill in (fused, transformers):
        assert prefill.prompts == 3 and prefill.together_ms > 0 and prefill.one_by_one_ms > 0


def test_the_conversation_prefill_table_times_both_ways_at_a_tiny_size() -> None:
    config = ChatGLMConfig.from_dict(tiny_config_dict(padded_vocab_size=512))
    model = build_random_lm(config, "cpu", torch.float32)
    (result,) = bench_conversation_prefill(model, "tiny", [40], 8, 500)
    assert (result.history, result.new_ids) == (40, 8)
    assert result.kept_ms > 0 and result.from_scratch_ms > 0


def test_the_step_profile_says_where_a_steps_time_goes_at_a_tiny_size() -> None:
    config = ChatGLMConfig.from_dict(tiny_config_dict(padded_vocab_size=512))
    model = build_random_lm(config, "cpu", torch.float32)
    fused = profile_decode_step(model, "tiny", "static", 8, 500, steps=3)
    unfused = profile_decode_step(model, "tiny", "static-unfused", 8, 500, steps=3)
    assert 0 < fused.busy_ms_per_step < fused.wall_ms_per_step
    assert 0 < fused.kernels_per_step < unfused.kernels_per_step  # the fused step calls fewer
    assert "aten::" in fused.table and "static" in format_profile(fused)
