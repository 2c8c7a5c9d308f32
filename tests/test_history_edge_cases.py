"""Edge cases of a conversation's history on the real (tiny) models: what a turn that was never
answered leaves behind, and what the next turn's prompt holds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from agent.engine import AudioChunk, EngineError, UserTurn
from models.glm4voice.brain import LoadOptions
from models.glm4voice.engine import EngineOptions, GLM4VoiceEngine, load_engine
from models.glm4voice.paths import ModelPaths
from models.glm4voice.tokens import TokenConstraints, TokenPattern
from models.lm import GLM4VoiceTokenizer, SamplingConfig
from models.make_tiny import write_tiny_model_set

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORDS = "hello how are you the weather is today and it is"


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory: pytest.TempPathFactory) -> ModelPaths:
    return write_tiny_model_set(Path(tmp_path_factory.mktemp("tiny_history")))


async def _engine(paths: ModelPaths) -> GLM4VoiceEngine:
    tokenizer = GLM4VoiceTokenizer.from_dir(paths.lm)
    words = frozenset(tokenizer.encode(WORDS, add_prefix=False))
    load = LoadOptions(
        sampling=SamplingConfig(seed=0),
        constraints=TokenConstraints(words, TokenPattern(stop_after=40)),
    )
    engine = load_engine(paths, load, EngineOptions(max_new_tokens=100, warmup=False))
    await engine.start()
    return engine


async def test_a_turn_whose_prefill_fails_leaves_nothing_in_the_history(tiny_paths, monkeypatch):
    """The prompt of a turn is built, then its prefill runs out of memory: the turn is not
    answered, so (like a turn too long for the context) it leaves nothing in the history, and
    the next turn's prompt does not carry it."""
    engine = await _engine(tiny_paths)
    try:
        sequences = engine.brain.sequences  # type: ignore[union-attr]
        prefill_many = sequences.prefill_many

        def out_of_memory(prompts):
            raise torch.OutOfMemoryError("CUDA out of memory")

        monkeypatch.setattr(sequences, "prefill_many", out_of_memory)
        failed = engine.respond(UserTurn(text="the failed question"), [])
        with pytest.raises(EngineError):
            _ = [event async for event in failed]
        assert failed.history(0.0) == []
        monkeypatch.setattr(sequences, "prefill_many", prefill_many)
        again = engine.respond(UserTurn(text="hello"), failed.history(0.0))
        events = [event async for event in again]
        assert any(isinstance(event, AudioChunk) for event in events)
        assert "the failed question" not in again.job.prompt
    finally:
        await engine.close()
