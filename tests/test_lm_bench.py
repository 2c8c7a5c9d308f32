"""The LM benchmark's measurement path runs end to end at a tiny size."""

from __future__ import annotations

import math

import torch

from bench.bench_lm import FULL_SIZES, bench_random, format_table
from models.lm import ChatGLMConfig, expected_shapes
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
