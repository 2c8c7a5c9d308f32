"""Token -> waveform decoder speed: real-time factor, peak memory, and cost per block.

    python -m bench.bench_decoder                # tiny random decoder on CPU (< 60 s)
    python -m bench.bench_decoder --tokens 200   # longer answers

Reports, for the reference streaming decoder (web demo schedule and 10-token blocks) and the
bounded-cost `StreamingDecoder`:
* real-time factor = compute seconds / seconds of audio produced, for a whole answer;
* peak memory: CUDA allocator peak on GPU, otherwise the process's peak RSS growth;
* seconds per block against the number of tokens already decoded (the reference re-encodes
  and re-samples the whole history on every block, the fast decoder a bounded window);
* time to the first audio chunk;
* log-mel distance of each streamed result to the offline decode, overall and around the
  joins, next to the distance between two offline decodes with different noise (with random
  weights the sampler noise dominates, so only a join value well above that baseline means
  an audible seam).
Weights are random: speed is what this measures.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from bench.timing import peak_rss_mb, reset_peak_rss, rss_mb
from models.decoder import (
    DEMO_BLOCK_SIZES,
    AudioDecoder,
    MelDistance,
    log_mel_distance,
    schedule_blocks,
)
from models.decoder.streaming import StreamingDecoder
from models.decoder.tiny import write_tiny_decoder

logger = logging.getLogger("bench_decoder")

SAMPLE_RATE = 22050


def _timed_chunks(chunks: Iterator[Tensor], device: torch.device) -> list[tuple[float, int]]:
    """(seconds, samples) per chunk as the iterator produces them."""
    out = []
    while True:
        start = time.perf_counter()
        try:
            chunk = next(chunks)
        except StopIteration:
            return out
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out.append((time.perf_counter() - start, chunk.shape[-1]))


def _fast_chunks(decoder: StreamingDecoder, tokens: Tensor) -> Iterator[Tensor]:
    stream = decoder.new_stream()
    for token in tokens[0].tolist():
        yield from decoder.push(stream, [token])
    yield decoder.finish(stream)


def _report(name: str, timings: list[tuple[float, int]], block_tokens: list[int]) -> None:
    total_s = sum(t for t, _ in timings)
    audio_s = sum(n for _, n in timings) / SAMPLE_RATE
    logger.info(
        "%-22s RTF %.3f  first chunk %.3f s  chunks %d  audio %.2f s",
        name,
        total_s / audio_s,
        timings[0][0],
        len(timings),
        audio_s,
    )
    decoded = 0
    for (seconds, _), n in zip(timings, block_tokens, strict=False):
        logger.info("%-22s   after %4d tokens: block of %3d -> %.3f s", "", decoded, n, seconds)
        decoded += n
    for seconds, _ in timings[len(block_tokens) :]:  # the fast decoder's flush at the end
        logger.info("%-22s   after %4d tokens: final flush -> %.3f s", "", decoded, seconds)


def _measure(
    name: str,
    run: Callable[[], list[tuple[float, int]]],
    blocks: list[int],
    repeats: int,
    device: torch.device,
) -> None:
    """Run `repeats` times; per block the fastest time counts (filters scheduler noise)."""
    rss_before = rss_mb() if reset_peak_rss() else peak_rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs = [run() for _ in range(repeats)]
    timings = [min(per_block) for per_block in zip(*runs, strict=True)]
    _report(name, timings, blocks)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        logger.info("%-22s peak CUDA memory %.1f MB", "", peak)
    else:
        logger.info("%-22s peak RSS growth %.1f MB", "", peak_rss_mb() - rss_before)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=100, help="answer length in audio tokens")
    parser.add_argument("--repeats", type=int, default=2, help="runs per decoder (best counts)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.tokens < 1 or args.repeats < 1:
        parser.error("--tokens and --repeats must be positive")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    tokens = torch.randint(0, 16384, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_tiny_decoder(tmp)
        reference = AudioDecoder.from_pretrained(folder, device=device)
        fast = StreamingDecoder.from_pretrained(folder, device=device)
    fast.decode(tokens[:, :20])  # warm-up
    for name, sizes in (("reference demo", DEMO_BLOCK_SIZES), ("reference 10-token", (10,))):
        blocks = schedule_blocks(args.tokens, sizes)
        run = lambda s=sizes: _timed_chunks(reference.iter_blocks(tokens, s), device)  # noqa: E731
        _measure(name, run, blocks, args.repeats, device)
    blocks = schedule_blocks(args.tokens, (fast.config.block_tokens,))
    run = lambda: _timed_chunks(_fast_chunks(fast, tokens), device)  # noqa: E731
    _measure("fast streaming", run, blocks, args.repeats, device)
    report_quality(reference, fast, tokens)


def _joins(chunks: list[Tensor]) -> list[int]:
    return torch.tensor([c.shape[-1] for c in chunks]).cumsum(0)[:-1].tolist()


def report_quality(reference: AudioDecoder, fast: StreamingDecoder, tokens: Tensor) -> None:
    """Log-mel distances to the offline decode (see the module docstring)."""
    offline = reference.offline(tokens).cpu()
    flow = reference.flow
    n_frames = flow.mel_frames(tokens.shape[1])
    noise = torch.randn(1, 80, n_frames, generator=torch.Generator().manual_seed(1))
    empty = (torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, 80), torch.zeros(1, 192))
    other_mel = flow.inference(tokens, *empty, noise=noise)
    other, _ = reference.hift.inference(other_mel, generator=torch.Generator().manual_seed(1))
    baseline = log_mel_distance(other.cpu(), offline)
    logger.info("offline vs other noise   overall %.3f", baseline.overall)
    for name, sizes in (("reference demo", DEMO_BLOCK_SIZES), ("reference 10-token", (10,))):
        chunks = [c.cpu() for c in reference.iter_blocks(tokens, sizes)]
        joins = _joins(chunks)
        _log_distance(name, log_mel_distance(torch.cat(chunks, dim=-1), offline, joins), joins)
    streamed, joins = fast.decode(tokens)
    _log_distance("fast streaming", log_mel_distance(streamed.cpu(), offline, joins), joins)


def _log_distance(name: str, distance: MelDistance, joins: list[int]) -> None:
    """One distance line; an answer decoded in one block has no joins to measure."""
    at_joins = f"at joins {distance.at_joins:.3f}" if joins else "no joins (one block)"
    logger.info("%-22s   overall %.3f  %s", name, distance.overall, at_joins)


if __name__ == "__main__":
    main()
