from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from models.decoder.streaming import StreamingDecoder
    from models.speech_tokenizer import SpeechTokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]


def golden_root() -> Path | None:
    """The reference fixtures: $GLM4VOICE_GOLDEN, else ../shared/golden beside the checkout."""
    env = os.environ.get("GLM4VOICE_GOLDEN")
    candidates = [Path(env)] if env else []
    candidates.append(REPO_ROOT.parent / "shared" / "golden")
    for path in candidates:
        if path.is_dir():
            return path
    return None


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    root = golden_root()
    if root is None:
        pytest.skip(
            "reference fixtures not found: set GLM4VOICE_GOLDEN or place them at ../shared/golden"
        )
    return root


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op torch thread for a module of tiny models.

    Tiny matrices gain nothing from threads, and on a busy machine the thread pool spin-waits;
    modules opt in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny decoder folder (`config.yaml`, `flow.pt`, `hift.pt`) in the official format
    (modules testing the flow or the vocoder alone define their own)."""
    from models.decoder.tiny import write_tiny_decoder

    return write_tiny_decoder(tmp_path_factory.mktemp("tiny_decoder"), hift_channels=8)


@pytest.fixture(scope="module")
def fast_decoder(tiny_folder: Path) -> StreamingDecoder:
    """The streaming decoder on `tiny_folder`."""
    from models.decoder.streaming import StreamingDecoder

    return StreamingDecoder.from_pretrained(tiny_folder)


@pytest.fixture(scope="module")
def tiny_speech_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny speech tokenizer folder in the official format."""
    from models.speech_tokenizer.tiny import write_tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny_speech_tokenizer")
    write_tiny_tokenizer(path, seed=3)
    return path


@pytest.fixture(scope="module")
def tiny_speech(tiny_speech_dir: Path) -> SpeechTokenizer:
    """The speech tokenizer on `tiny_speech_dir`."""
    from models.speech_tokenizer import SpeechTokenizer

    return SpeechTokenizer.from_pretrained(tiny_speech_dir)
