"""Speech tokenizer speed: real-time factor of one-shot tokenization and end-of-turn latency.

    python -m bench.bench_tokenizer                 # tiny random model on CPU
    python -m bench.bench_tokenizer --full          # plus the official sizes on a CUDA GPU

Real-time factor = seconds of compute per second of audio (lower is better). Streaming feeds
the audio in 20 ms frames; "finish" is the latency between the last frame and the tokens, which
is what delays the reply at end of turn. Weights are random: only speed is measured.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.timing import best_of, sync
from models.speech_tokenizer import (
    FeatureExtractorConfig,
    SpeechTokenizer,
    SpeechTokenizerConfig,
    WhisperVQEncoder,
    write_tiny_tokenizer,
)
from models.speech_tokenizer.tiny import PREPROCESSOR_CONFIG, tiny_config_dict

logger = logging.getLogger("bench_tokenizer")

SR = 16_000
FRAME = 320  # 20 ms


def synthetic_speech(seconds: float, seed: int = 0) -> np.ndarray:
    """Harmonic 'syllables' with pauses, loudest at the start (the usual streaming case)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    phase = 2 * np.pi * np.cumsum(140 + 40 * np.sin(2 * np.pi * 0.4 * t)) / SR
    voiced = sum(np.sin(k * phase) / k for k in range(1, 6))
    envelope = np.clip(np.sin(2 * np.pi * 3.0 * t), 0, None) ** 2
    audio = 0.2 * envelope * voiced + 1e-5 * rng.standard_normal(len(t))
    audio[: SR // 2] *= 2.0
    return audio.astype(np.float32)


def full_size_tokenizer(device: torch.device) -> SpeechTokenizer:
    """Official sizes (1280-d, 20 heads, 16 layers before VQ) with random weights."""
    config_dict = tiny_config_dict(d_model=1280, heads=20, ffn=5120, layers=32)
    config_dict.update(quantize_position=16, pooling_position=16)
    config = SpeechTokenizerConfig.from_dict(config_dict)
    with torch.device(device):
        model = WhisperVQEncoder(config)
    with torch.no_grad():
        for table in (model.codebook, model.embed_positions, model.embed_positions2):
            table.weight.normal_()
    return SpeechTokenizer(config, FeatureExtractorConfig.from_dict(PREPROCESSOR_CONFIG), model)


def bench(name: str, tokenizer: SpeechTokenizer, seconds: float, repeats: int) -> None:
    audio = synthetic_speech(seconds)
    tokenizer.tokenize(audio[:SR])  # warm-up
    one_shot = best_of(repeats, tokenizer.device, lambda: tokenizer.tokenize(audio))
    streamer = tokenizer.streaming()
    push_times, finish_times = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        for offset in range(0, len(audio), FRAME):
            streamer.push(audio[offset : offset + FRAME])
        sync(tokenizer.device)
        push_times.append(time.perf_counter() - start)
        streamer.finish()
        finish_times.append(streamer.stats.last_finish_s)
    print(f"[{name}] {seconds:.1f} s of audio on {tokenizer.device}")
    print(f"  tokenize       {one_shot * 1e3:8.1f} ms   RTF {one_shot / seconds:.4f}")
    print(f"  stream pushes  {min(push_times) * 1e3:8.1f} ms   RTF {min(push_times) / seconds:.4f}")
    print(
        f"  stream finish  {min(finish_times) * 1e3:8.1f} ms   "
        f"({streamer.stats.last_finish_blocks} block(s) encoded at end of turn)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="audio length")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--full", action="store_true", help="also the official sizes on CUDA")
    args = parser.parse_args()
    if args.seconds <= 0 or args.repeats < 1:
        parser.error("--seconds and --repeats must be positive")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        write_tiny_tokenizer(Path(folder))
        tiny = SpeechTokenizer.from_pretrained(folder)
    bench("tiny", tiny, args.seconds, args.repeats)
    if args.full:
        if not torch.cuda.is_available():
            logger.warning("--full needs a CUDA GPU; skipped")
            return
        bench("full", full_size_tokenizer(torch.device("cuda")), args.seconds, args.repeats)


if __name__ == "__main__":
    main()
