"""Edge cases of the LM state behind replies: after failures, the static KV cache's rows still
give the logits of a from-scratch prefill of each sequence's ids."""

from __future__ import annotations

import pytest
import torch

from models.glm4voice.static_batch import StaticCacheConfig, StaticKVBatch
from models.lm import LMStepper, build_random_lm
from models.lm.configuration_lm import ChatGLMConfig
from models.lm.tiny import tiny_config_dict

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 512


@pytest.fixture(scope="module")
def stepper() -> LMStepper:
    config = ChatGLMConfig.from_dict(tiny_config_dict(padded_vocab_size=VOCAB))
    return LMStepper(build_random_lm(config, dtype=torch.float32, seed=7))


def _from_scratch(stepper: LMStepper, ids: list[int]) -> torch.Tensor:
    """Next-token logits [V] of `ids` prefilled from nothing."""
    logits, _ = stepper.prefill(torch.tensor([ids], dtype=torch.long))
    return logits[0]


@pytest.mark.parametrize("fused", [True, False])
def test_a_failed_step_leaves_the_rows_that_sat_it_out_blind_to_its_column(
    stepper, fused, monkeypatch
):
    """A step fails (its keys/values half written) while one reply is paused; the failed
    replies are released and a longer prompt moves the cursor past that column: the paused
    reply, stepped again, still gets the logits of its own ids alone."""
    static = StaticKVBatch(
        stepper, StaticCacheConfig(max_batch=2, max_len=64, fused=fused, prefix_cache_ids=0)
    )
    paused, failing = list(range(20, 26)), list(range(1, 9))
    static.prefill("paused", paused)  # slot 0: inside the bucket of any later step
    static.prefill("failing", failing)
    for token in (3, 4):
        static.step(["paused", "failing"], [token, token])
        paused.append(token)
    forward = static._forward

    def fails_after_writing(*args: torch.Tensor) -> torch.Tensor:
        forward(*args)
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(static, "_forward", fails_after_writing)
    with pytest.raises(torch.OutOfMemoryError):
        static.step(["failing"], [7])
    monkeypatch.undo()
    static.release("failing")
    static.prefill("longer", list(range(100, 140)))
    logits = static.step(["paused"], [9])[0]
    paused.append(9)
    torch.testing.assert_close(logits, _from_scratch(stepper, paused), atol=1e-5, rtol=0)
