"""GLM-4-Voice engine: first-audio latency per stage, concurrency, decoder cost per block.

Default: the tiny random-weight model set (`models.make_tiny`) loaded through the real loaders,
on the CPU (well under two minutes). `--full`: the official architecture sizes with random
weights on a CUDA GPU (speech tokenizer and decoder written to a temporary folder in the
official formats, the 9B LM built directly on the GPU in bf16).

Random weights never follow the 13 text : 26 audio layout nor end a turn, so replies run under
a `TokenPattern` with a fixed length: every figure is for a well-formed answer.

    python -m bench.bench_glm4voice [--full] [--turn-s 6] [--answer-ids 117] [--json out.json]

Sections:
1. first audio of one conversation, per stage: speech tokenizer (one-shot vs. only the end of
   a turn that was streamed while spoken), prefill, LM tokens until the first decodable block,
   the first decoder block;
2. 1..16 concurrent conversations: LM tokens/s per conversation, first-audio latency, mean
   batch size of the worker's LM steps;
3. decoder cost per block against the position in the answer, reference vs. fast mode.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from agent.engine import AudioChunk, UserTurn
from models.decoder import AudioDecoder, StreamingDecoder
from models.decoder.tiny import write_tiny_decoder
from models.glm4voice.batching import KVCacheBatch
from models.glm4voice.brain import GLM4VoiceBrain, LoadOptions, ReplyDecoder
from models.glm4voice.engine import EngineOptions, GLM4VoiceEngine, load_engine
from models.glm4voice.paths import DECODER_FOLDER, LM_FOLDER, TOKENIZER_FOLDER, ModelPaths
from models.glm4voice.tokens import TokenConstraints, TokenMasks, TokenPattern
from models.lm import GLM4VoiceTokenizer, LMStepper, SamplingConfig, build_random_lm
from models.lm.configuration_lm import ChatGLMConfig
from models.lm.tiny import tiny_config_dict
from models.lm.tiny import write_tiny_tokenizer as write_lm_tokenizer
from models.make_tiny import write_tiny_model_set
from models.speech_tokenizer import SpeechTokenizer
from models.speech_tokenizer.tiny import write_tiny_tokenizer as write_speech_tokenizer

logger = logging.getLogger("bench_glm4voice")

FULL_LM = {
    "num_layers": 40,
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "kv_channels": 128,
    "multi_query_group_num": 2,
    "ffn_hidden_size": 13696,
}
FULL_SPEECH_TOKENIZER = {"d_model": 1280, "heads": 20, "ffn": 5120, "layers": 16}
FULL_FLOW = {
    "d_model": 512,
    "attention_heads": 8,
    "linear_units": 2048,
    "num_blocks": 6,
    "estimator_channels": 256,
    "attention_head_dim": 64,
    "n_blocks": 4,
    "num_mid_blocks": 12,
    "num_heads": 8,
}
FULL_HIFT_CHANNELS = 512
CONCURRENCY = (1, 2, 4, 8, 16)
USER_RATE = 16_000


@dataclass
class Report:
    """Every figure the benchmark prints, for `--json`."""

    size: str
    device: str
    first_audio_stages_ms: dict[str, float] = field(default_factory=dict)
    concurrency: list[dict[str, float]] = field(default_factory=list)
    decoder_blocks_ms: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


# ----------------------------------------------------------------------------- models


def _constraints(answer_ids: int) -> TokenConstraints:
    return TokenConstraints(pattern=TokenPattern(stop_after=answer_ids))


def _tiny_engine(root: Path, device: str, answer_ids: int) -> GLM4VoiceEngine:
    paths = write_tiny_model_set(root)
    load = LoadOptions(
        device=device, sampling=SamplingConfig(seed=0), constraints=_constraints(answer_ids)
    )
    return load_engine(paths, load, EngineOptions(max_ahead_s=1e9))


def _full_brain(root: Path, device: str, answer_ids: int) -> GLM4VoiceBrain:
    """Official sizes with random weights: tokenizer and decoder through their file loaders,
    the LM built on the GPU directly (a 19 GB checkpoint would take minutes to write)."""
    paths = ModelPaths.from_model_dir(root)
    write_speech_tokenizer(paths.tokenizer, **FULL_SPEECH_TOKENIZER)
    write_tiny_decoder(paths.decoder, hift_channels=FULL_HIFT_CHANNELS, **FULL_FLOW)
    write_lm_tokenizer(paths.lm)
    tokenizer = GLM4VoiceTokenizer.from_dir(paths.lm)
    config = ChatGLMConfig.from_dict(tiny_config_dict(**FULL_LM))
    lm = build_random_lm(config, device=device, dtype=torch.bfloat16)
    constraints = _constraints(answer_ids)
    return GLM4VoiceBrain(
        SpeechTokenizer.from_pretrained(paths.tokenizer, device=device),
        KVCacheBatch(LMStepper(lm)),
        tokenizer,
        StreamingDecoder.from_pretrained(paths.decoder, device=device),
        SamplingConfig(seed=0),
        TokenMasks.build(tokenizer, config.padded_vocab_size, constraints, device),
        constraints,
        device,
    )


def _speech(seconds: float) -> np.ndarray:
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * USER_RATE)) / USER_RATE
    voiced = 0.3 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t))
    voiced[:4000] = 0.9 * np.sin(2 * np.pi * 900 * t[:4000])  # loudest first
    return (voiced + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


# ----------------------------------------------------------------------------- 1. stages


async def _one_reply(engine: GLM4VoiceEngine, turn: UserTurn, listener=None) -> dict[str, float]:
    reply = engine.respond(turn, [], listener)
    async for _ in reply:
        pass
    return dict(reply.timings.stages)


async def bench_stages(engine: GLM4VoiceEngine, turn_s: float, report: Report) -> None:
    speech = _speech(turn_s)
    await _one_reply(engine, UserTurn(audio=speech))  # warm-up
    whole = await _one_reply(engine, UserTurn(audio=speech))
    listener = engine.begin_turn()
    for start in range(0, len(speech), 320):
        listener.push(speech[start : start + 320])
    await asyncio.sleep(0.5)  # the worker tokenizes while the "user" finishes the turn
    streamed = await _one_reply(engine, UserTurn(audio=speech), listener)
    stages = {
        "speech tokenizer, whole turn": whole["speech_tokenizer"],
        "speech tokenizer, end of a streamed turn": streamed["speech_tokenizer"],
        "LM prefill": streamed["prefill"],
        "LM tokens until the first decodable block": streamed["lm_until_first_block"],
        "first decoder block": streamed["first_decoder_block"],
        "first audio (worker: turn taken -> first chunk)": streamed["first_audio"],
    }
    report.first_audio_stages_ms = {k: 1e3 * v for k, v in stages.items()}
    print(f"\n1. first audio of one conversation ({turn_s:.0f} s spoken turn)")
    for name, ms in report.first_audio_stages_ms.items():
        print(f"   {name:<50} {ms:9.1f} ms")


# ----------------------------------------------------------------------------- 2. concurrency


async def _timed_reply(engine: GLM4VoiceEngine, index: int) -> tuple[float, float, int]:
    """(first-audio latency s, decode seconds, ids generated) of one text turn."""
    started = time.perf_counter()
    reply = engine.respond(UserTurn(text=f"hello {index}"), [])
    first = None
    async for event in reply:
        if first is None and isinstance(event, AudioChunk):
            first = time.perf_counter() - started
    elapsed = time.perf_counter() - started - reply.timings.stages.get("prefill", 0.0)
    return first or float("nan"), elapsed, len(reply.job.generated)


async def bench_concurrency(engine: GLM4VoiceEngine, report: Report) -> None:
    print("\n2. concurrent conversations (text turns, fixed-length answers)")
    print("   convs  LM tok/s per conv  total tok/s  first audio mean / max ms  mean batch")
    worker = engine.require_worker()
    for n in CONCURRENCY:
        worker.rounds_batch_sizes.clear()
        started = time.perf_counter()
        results = await asyncio.gather(*(_timed_reply(engine, i) for i in range(n)))
        wall = time.perf_counter() - started
        per_conv = statistics.mean(ids / secs for _, secs, ids in results)
        firsts = [1e3 * first for first, _, _ in results]
        batch = statistics.mean(worker.rounds_batch_sizes) if worker.rounds_batch_sizes else 0
        total = sum(ids for _, _, ids in results) / wall
        row = {
            "conversations": n,
            "lm_tokens_per_s_per_conversation": per_conv,
            "lm_tokens_per_s_total": total,
            "first_audio_ms_mean": statistics.mean(firsts),
            "first_audio_ms_max": max(firsts),
            "mean_batch": batch,
        }
        report.concurrency.append(row)
        print(
            f"   {n:5d}  {per_conv:17.1f}  {total:11.1f}  "
            f"{row['first_audio_ms_mean']:10.0f} / {row['first_audio_ms_max']:6.0f}  {batch:10.1f}"
        )


# ----------------------------------------------------------------------------- 3. decoder


def _block_costs(
    decoder: ReplyDecoder, codes: list[int], sizes: tuple[int, int], device: str
) -> list[tuple[int, int, float]]:
    """(tokens decoded so far, block tokens, ms) of each block: `sizes` = (first, later)."""
    stream = decoder.new_stream()
    costs: list[tuple[int, int, float]] = []
    start = 0
    while start < len(codes):
        block = codes[start : start + sizes[0 if not costs else 1]]
        began = time.perf_counter()
        decoder.decode(stream, block, start + len(block) >= len(codes))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start += len(block)
        costs.append((start, len(block), 1e3 * (time.perf_counter() - began)))
    return costs


def bench_decoder(
    decoder_dir: Path, device: str, answer_tokens: int, repeats: int, report: Report
) -> None:
    """Each decoder with the blocks the engine gives it: the reference 10 then 20 tokens, the
    fast one its own 10-token blocks. The best of `repeats` runs counts for each block."""
    codes = torch.randint(0, 16384, (answer_tokens,), generator=torch.Generator().manual_seed(1))
    fast = StreamingDecoder.from_pretrained(decoder_dir, device=device)
    block = fast.config.block_tokens
    decoders = {
        "reference": (ReplyDecoder(AudioDecoder.from_pretrained(decoder_dir, device=device)), 20),
        "fast": (ReplyDecoder(fast), block),
    }
    print(f"\n3. decoder cost per block along a {answer_tokens}-token answer")
    for name, (decoder, later) in decoders.items():
        _block_costs(decoder, codes[:30].tolist(), (block, later), device)  # warm-up
        sizes = (block, later)
        runs = [_block_costs(decoder, codes.tolist(), sizes, device) for _ in range(repeats)]
        costs = [(end, n, min(r[i][2] for r in runs)) for i, (end, n, _) in enumerate(runs[0])]
        report.decoder_blocks_ms[name] = [(end, ms) for end, _, ms in costs]
        print(f"   {name} (blocks of {block}, then {later} tokens)")
        print("     tokens so far   " + "".join(f"{end:6d}" for end, _, _ in costs))
        print("     ms per block    " + "".join(f"{ms:6.0f}" for _, _, ms in costs))
        rtf = [ms / (n * 80) for _, n, ms in costs]
        print("     real-time factor" + "".join(f"{r:6.2f}" for r in rtf))


# ----------------------------------------------------------------------------- main


async def run(args: argparse.Namespace, root: Path) -> Report:
    device = args.device
    if args.full:
        brain = await asyncio.to_thread(_full_brain, root, device, args.answer_ids)
        engine = GLM4VoiceEngine(lambda: brain, EngineOptions(max_ahead_s=1e9))
    else:
        engine = _tiny_engine(root, device, args.answer_ids)
    report = Report("full (random weights)" if args.full else "tiny", device)
    await engine.start()
    try:
        await bench_stages(engine, args.turn_s, report)
        await bench_concurrency(engine, report)
    finally:
        await engine.close()
    bench_decoder(root / DECODER_FOLDER, device, args.decoder_tokens, args.repeats, report)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="official sizes, random weights, CUDA")
    p.add_argument("--device", default=None, help="default: cuda with --full, else cpu")
    p.add_argument("--turn-s", type=float, default=6.0, help="spoken turn length")
    p.add_argument("--answer-ids", type=int, default=78, help="LM ids per answer (13:26 layout)")
    p.add_argument("--decoder-tokens", type=int, default=150, help="answer length for part 3")
    p.add_argument("--repeats", type=int, default=2, help="decoder runs (best block counts)")
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.device is None:
        args.device = "cuda" if args.full else "cpu"
    if args.full and not torch.cuda.is_available():
        p.error("--full needs a CUDA GPU")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.device == "cpu":
        torch.set_num_threads(min(torch.get_num_threads(), 2))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for folder in (TOKENIZER_FOLDER, LM_FOLDER, DECODER_FOLDER):
            (root / folder).mkdir()
        report = asyncio.run(run(args, root))
    print(f"\n({report.size} on {report.device}; {time.perf_counter() - started:.0f} s in all)")
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(report), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
