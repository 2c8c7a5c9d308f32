"""GLM-4-Voice engine: warm-up, first-audio latency per stage, concurrency, decoder cost.

Default: the tiny random-weight model set (`models.make_tiny`) loaded through the real loaders,
on the CPU (two to three minutes on two cores). `--full`: the official architecture sizes with
random weights on a CUDA GPU (speech tokenizer and decoder written to a temporary folder in the
official formats, the 9B LM built directly on the GPU in bf16).

Random weights never follow the 13 text : 26 audio layout nor end a turn, so replies run under
a `TokenPattern` with a fixed length: every figure is for a well-formed answer.

    python -m bench.bench_glm4voice [--full] [--decode-step auto] [--sections all]
                                    [--turn-s 6] [--answer-ids 78] [--json out.json]

Sections:
0. start-up warm-up: its time per stage, and the first turn of a fresh process per stage
   without and with the warm-up (each in its own process, so neither inherits the other's
   warm state);
1. first audio of one conversation, per stage: speech tokenizer (one-shot vs. only the end of
   a turn that was streamed while spoken), prefill, LM tokens until the first decodable block,
   the first decoder block;
2. 1..16 concurrent conversations, with the decoder lane (decoder calls on their own thread
   while the LM steps on) and without, with the decoder batching blocks of different replies
   and without: LM tokens/s per conversation, first-audio latency, mean batch sizes of the LM
   steps and decoder calls, and the on/off ratios; then conversations that start at different
   times and are played at real-time pace, with later decoder blocks waiting for each other
   (`BlockHold`) and without;
3. decoder cost per block against the position in the answer, reference vs. fast mode, and
   the fast decoder's blocks of n streams in one batched call vs. one after the other.

`--decode-step` is `LoadOptions.decode_step` (auto: CUDA graphs over a static KV cache on a GPU,
the static cache's fused step run plainly on the CPU); its static cache gets a row per
conversation of part 2.
`--sections` picks parts by name (warm-up, stages, concurrency, decoder), so a short GPU lease
measures what matters first.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import logging
import multiprocessing
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from agent.engine import AudioChunk, UserTurn
from bench.bench_lm import FULL_SIZES
from models.decoder import AudioDecoder, StreamingDecoder
from models.decoder.tiny import write_tiny_decoder
from models.glm4voice.brain import (
    DECODE_STEPS,
    GLM4VoiceBrain,
    LoadOptions,
    ReplyDecoder,
    make_sequence_batch,
)
from models.glm4voice.engine import EngineOptions, GLM4VoiceEngine, load_engine
from models.glm4voice.paths import DECODER_FOLDER, LM_FOLDER, TOKENIZER_FOLDER, ModelPaths
from models.glm4voice.static_batch import StaticCacheConfig
from models.glm4voice.tokens import TokenConstraints, TokenMasks, TokenPattern
from models.glm4voice.worker import BlockHold
from models.lm import GLM4VoiceTokenizer, LMStepper, SamplingConfig, build_random_lm
from models.lm.configuration_lm import ChatGLMConfig
from models.lm.tiny import tiny_config_dict
from models.lm.tiny import write_tiny_tokenizer as write_lm_tokenizer
from models.make_tiny import write_tiny_model_set
from models.speech_tokenizer import SpeechTokenizer
from models.speech_tokenizer.tiny import write_tiny_tokenizer as write_speech_tokenizer

logger = logging.getLogger("bench_glm4voice")

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
SECTIONS = ("warm-up", "stages", "concurrency", "decoder")
DECODER_STREAMS = (1, 2, 4, 8)
STAGGERED_CONVERSATIONS = 6
STAGGER_S = 0.13  # between conversation starts: not a multiple of the decoder's block period
PLAYBACK_LEAD_S = 0.5  # a paced listener takes more audio when this little is left to play
USER_RATE = 16_000
FIRST_TURN_STAGES = (
    "speech_tokenizer",
    "prefill",
    "lm_until_first_block",
    "first_decoder_block",
    "first_audio",
)


@dataclass
class Report:
    """Every figure the benchmark prints, for `--json`."""

    size: str
    device: str
    decode_step: str = ""
    warm_up_s: float = 0.0
    warm_up_stages_ms: dict[str, float] = field(default_factory=dict)
    first_turn_ms: dict[str, dict[str, float]] = field(default_factory=dict)  # cold / warmed
    first_audio_stages_ms: dict[str, float] = field(default_factory=dict)
    concurrency: list[dict[str, float]] = field(default_factory=list)
    decoder_blocks_ms: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    decoder_batching_ms: list[dict[str, float]] = field(default_factory=list)
    staggered: dict[str, dict[str, float]] = field(default_factory=dict)  # hold on / off


# ----------------------------------------------------------------------------- models


def _constraints(answer_ids: int) -> TokenConstraints:
    return TokenConstraints(pattern=TokenPattern(stop_after=answer_ids))


def _load_options(args: argparse.Namespace) -> LoadOptions:
    return LoadOptions(
        device=args.device,
        sampling=SamplingConfig(seed=0),
        constraints=_constraints(args.answer_ids),
        decode_step=args.decode_step,
        static_cache=StaticCacheConfig(max_batch=max(CONCURRENCY)),
    )


def _engine(args: argparse.Namespace, root: Path, warmup: bool = True) -> GLM4VoiceEngine:
    """The tiny model set of `root` (written by `main`) through the real loaders, or the
    official sizes with random weights (`--full`)."""
    options = EngineOptions(max_ahead_s=1e9, warmup=warmup)
    load = _load_options(args)
    if not args.full:
        return load_engine(ModelPaths.from_model_dir(root), load, options)
    return GLM4VoiceEngine(lambda: _full_brain(root, load), options)


def _full_brain(root: Path, options: LoadOptions) -> GLM4VoiceBrain:
    """Official sizes with random weights: tokenizer and decoder through their file loaders,
    the LM built on the GPU directly (a 19 GB checkpoint would take minutes to write)."""
    device = options.device
    paths = ModelPaths.from_model_dir(root)
    if not (paths.tokenizer / "config.json").exists():  # written once per run
        write_speech_tokenizer(paths.tokenizer, **FULL_SPEECH_TOKENIZER)
        write_tiny_decoder(paths.decoder, hift_channels=FULL_HIFT_CHANNELS, **FULL_FLOW)
        write_lm_tokenizer(paths.lm)
    tokenizer = GLM4VoiceTokenizer.from_dir(paths.lm)
    config = ChatGLMConfig.from_dict(tiny_config_dict(**FULL_SIZES))
    lm = build_random_lm(config, device=device, dtype=torch.bfloat16)
    sequences = make_sequence_batch(
        LMStepper(lm), options.resolved_decode_step, options.static_cache
    )
    return GLM4VoiceBrain(
        SpeechTokenizer.from_pretrained(paths.tokenizer, device=device),
        sequences,
        tokenizer,
        StreamingDecoder.from_pretrained(paths.decoder, device=device),
        options.sampling,
        TokenMasks.build(tokenizer, config.padded_vocab_size, options.constraints, device),
        options.constraints,
        device,
    )


def _speech(seconds: float) -> np.ndarray:
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * USER_RATE)) / USER_RATE
    voiced = 0.3 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t))
    voiced[:4000] = 0.9 * np.sin(2 * np.pi * 900 * t[:4000])  # loudest first
    return (voiced + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


# ----------------------------------------------------------------------------- 0. warm-up


async def _first_turn(args: argparse.Namespace, root: Path, warmup: bool) -> dict:
    engine = _engine(args, root, warmup)
    await engine.start()
    try:
        stages = await _one_reply(engine, UserTurn(audio=_speech(args.turn_s)))
        report = engine.warm_up_report
    finally:
        await engine.close()
    return {
        "stages": stages,
        "warm_up_s": report.total_s if report else 0.0,
        "warm_up_stages": dict(report.stages) if report else {},
    }


def first_turn_in_fresh_process(args: argparse.Namespace, root: Path, warmup: bool) -> dict:
    """Start an engine and answer one spoken turn; runs in a process of its own."""
    logging.basicConfig(level=logging.WARNING)
    _cpu_threads(args.device)
    return asyncio.run(_first_turn(args, root, warmup))


def _fresh_first_turns(args: argparse.Namespace, root: Path, warmup: bool) -> dict:
    """The first turn in `args.repeats` fresh processes: the fastest figure of each stage."""
    spawn = multiprocessing.get_context("spawn")
    runs = []
    for _ in range(args.repeats):
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
            runs.append(pool.submit(first_turn_in_fresh_process, args, root, warmup).result())
    best = min(runs, key=lambda run: run["warm_up_s"])
    stages = {
        name: min(run["stages"].get(name, float("nan")) for run in runs)
        for name in runs[0]["stages"]
    }
    return {**best, "stages": stages}


def bench_warm_up(args: argparse.Namespace, root: Path, report: Report) -> None:
    results = {
        name: _fresh_first_turns(args, root, warmup)
        for name, warmup in (("cold", False), ("warmed", True))
    }
    warmed = results["warmed"]
    report.warm_up_s = warmed["warm_up_s"]
    report.warm_up_stages_ms = {k: 1e3 * v for k, v in warmed["warm_up_stages"].items()}
    report.first_turn_ms = {
        name: {k: 1e3 * v for k, v in result["stages"].items() if k in FIRST_TURN_STAGES}
        for name, result in results.items()
    }
    print(f"\n0. start-up warm-up: {1e3 * report.warm_up_s:.0f} ms (best of {args.repeats})")
    for name, ms in report.warm_up_stages_ms.items():
        print(f"   {name:<20} {ms:9.1f} ms")
    print("   first turn of a fresh process     no warm-up     warm-up   ratio  (fastest run)")
    for stage in FIRST_TURN_STAGES:
        cold = report.first_turn_ms["cold"].get(stage, float("nan"))
        warm = report.first_turn_ms["warmed"].get(stage, float("nan"))
        print(f"   {stage:<32} {cold:9.1f} ms {warm:8.1f} ms {cold / warm:6.1f}x")


# ----------------------------------------------------------------------------- 1. stages


async def _one_reply(engine: GLM4VoiceEngine, turn: UserTurn, listener=None) -> dict[str, float]:
    reply = engine.respond(turn, [], listener)
    async for _ in reply:
        pass
    return dict(reply.timings.stages)


async def bench_stages(engine: GLM4VoiceEngine, turn_s: float, report: Report) -> None:
    speech = _speech(turn_s)
    whole = await _one_reply(engine, UserTurn(audio=speech))  # the engine warmed up at start
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


async def _concurrency_row(engine: GLM4VoiceEngine, n: int) -> dict[str, float]:
    worker = engine.require_worker()
    worker.rounds_batch_sizes.clear()
    worker.decode_batch_sizes.clear()
    started = time.perf_counter()
    results = await asyncio.gather(*(_timed_reply(engine, i) for i in range(n)))
    wall = time.perf_counter() - started
    firsts = [1e3 * first for first, _, _ in results]
    sizes, blocks = worker.rounds_batch_sizes, worker.decode_batch_sizes
    return {
        "conversations": n,
        "lm_tokens_per_s_per_conversation": statistics.mean(i / s for _, s, i in results),
        "lm_tokens_per_s_total": sum(ids for _, _, ids in results) / wall,
        "first_audio_ms_mean": statistics.mean(firsts),
        "first_audio_ms_max": max(firsts),
        "mean_batch": statistics.mean(sizes) if sizes else 0.0,
        "mean_decoder_batch": statistics.mean(blocks) if blocks else 0.0,
        "wall_s": wall,
    }


# (label, decoder batching, decoder lane): the engine's default first
CONCURRENCY_SETTINGS = (
    ("decoder batching on, decoder lane on (the default)", True, True),
    ("decoder batching on, decoder lane off", True, False),
    ("decoder batching off, decoder lane off", False, False),
)


async def bench_concurrency(engine: GLM4VoiceEngine, repeats: int, report: Report) -> None:
    """Each row is the run (of `repeats`) with the shortest wall time."""
    print(f"\n2. concurrent conversations (text turns, fixed-length answers; best of {repeats})")
    brain = engine.brain
    worker = engine.require_worker()
    assert isinstance(brain, GLM4VoiceBrain)
    rows: dict[tuple[bool, bool], list[dict[str, float]]] = {}
    for label, batched, lane in CONCURRENCY_SETTINGS:
        brain.batch_decoder = batched
        worker.overlap_decoder = lane
        print(f"   {label}")
        print("   convs  tok/s per conv  total tok/s  first audio mean / max ms  LM / dec batch")
        rows[batched, lane] = []
        for n in CONCURRENCY:
            runs = [await _concurrency_row(engine, n) for _ in range(repeats)]
            row = min(runs, key=lambda run: run["wall_s"])
            row["decoder_batching"] = float(batched)
            row["decoder_lane"] = float(lane)
            rows[batched, lane].append(row)
            report.concurrency.append(row)
            print(
                f"   {n:5d}  {row['lm_tokens_per_s_per_conversation']:14.1f}  "
                f"{row['lm_tokens_per_s_total']:11.1f}  {row['first_audio_ms_mean']:10.0f} / "
                f"{row['first_audio_ms_max']:6.0f}  {row['mean_batch']:7.1f} / "
                f"{row['mean_decoder_batch']:4.1f}"
            )
    brain.batch_decoder = True
    worker.overlap_decoder = True
    for title, on, off in (
        ("lane on / off (batching on)", (True, True), (True, False)),
        ("batching on / off (lane off)", (True, False), (False, False)),
    ):
        print(f"   {title}:  convs  tok/s per conv  total tok/s  first audio mean  wall time")
        for a, b in zip(rows[on], rows[off], strict=True):
            per_conv = "lm_tokens_per_s_per_conversation"
            print(
                f"   {' ' * len(title)}   {int(a['conversations']):4d}  "
                f"{a[per_conv] / b[per_conv]:13.2f}  "
                f"{a['lm_tokens_per_s_total'] / b['lm_tokens_per_s_total']:11.2f}  "
                f"{a['first_audio_ms_mean'] / b['first_audio_ms_mean']:16.2f}  "
                f"{a['wall_s'] / b['wall_s']:9.2f}"
            )


async def _paced_reply(engine: GLM4VoiceEngine, index: int) -> float:
    """One text turn started `index` staggers late, its audio taken at playback pace;
    returns its first-audio latency (s)."""
    await asyncio.sleep(index * STAGGER_S)
    started = time.perf_counter()
    reply = engine.respond(UserTurn(text=f"hello {index}"), [])
    first, received = None, 0.0
    async for event in reply:
        if not isinstance(event, AudioChunk):
            continue
        now = time.perf_counter()
        if first is None:
            first = now
        received += event.duration_s
        await asyncio.sleep(max(0.0, first + received - PLAYBACK_LEAD_S - now))
    return (first or float("nan")) - started


async def bench_staggered(engine: GLM4VoiceEngine, report: Report) -> None:
    """At the tiny size on a CPU, generation runs barely faster than playback, so a reply is
    rarely the engine's default `decoder_hold_s` ahead; the waiting policy here takes any lead
    (on a GPU replies run seconds ahead and the default applies)."""
    worker = engine.require_worker()
    policy = worker.hold
    print(
        f"\n   {STAGGERED_CONVERSATIONS} conversations starting {1e3 * STAGGER_S:.0f} ms apart, "
        "played at real-time pace (blocks wait for any lead over playback)"
    )
    print("   later blocks  decoder calls  blocks per call  decoder s  first audio mean ms")
    for name, hold in (("wait", BlockHold(min_ahead_s=0.0)), ("never wait", None)):
        worker.hold = hold
        worker.decode_batch_sizes.clear()
        worker.decoder_s = 0.0
        n = STAGGERED_CONVERSATIONS
        firsts = await asyncio.gather(*(_paced_reply(engine, i) for i in range(n)))
        sizes = list(worker.decode_batch_sizes)
        row = {
            "decoder_calls": len(sizes),
            "blocks_per_call": statistics.mean(sizes) if sizes else 0.0,
            "decoder_s": worker.decoder_s,
            "first_audio_ms_mean": 1e3 * statistics.mean(firsts),
        }
        report.staggered[name] = row
        print(
            f"   {name:<12}  {row['decoder_calls']:13d}  {row['blocks_per_call']:15.2f}  "
            f"{row['decoder_s']:9.2f}  {row['first_audio_ms_mean']:19.0f}"
        )
    worker.hold = policy


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


def _streams_ms(
    decoder: StreamingDecoder, codes: list[list[int]], batched: bool, device: str
) -> float:
    """ms to decode one block of each stream's codes after a first block (steady state)."""
    block = decoder.config.block_tokens
    streams = [decoder.new_stream(seed) for seed in range(len(codes))]
    for stream, ids in zip(streams, codes, strict=True):
        decoder.push(stream, ids[:block])
    began = time.perf_counter()
    with torch.inference_mode():
        if batched:
            requests = [(s, ids[block:], False) for s, ids in zip(streams, codes, strict=True)]
            decoder.decode_many(requests)
        else:
            for stream, ids in zip(streams, codes, strict=True):
                decoder.push(stream, ids[block:])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - began)


def bench_decoder_batching(decoder_dir: Path, device: str, repeats: int, report: Report) -> None:
    """The second block of n streams at once: one batched call vs. n calls (best of runs)."""
    decoder = StreamingDecoder.from_pretrained(decoder_dir, device=device)
    block = decoder.config.block_tokens
    gen = torch.Generator().manual_seed(2)
    print("\n   fast decoder, one block of n streams: batched vs. one after the other")
    print("     streams  batched ms  one by one ms  ratio")
    _streams_ms(decoder, [list(range(2 * block))] * 2, True, device)  # warm-up
    for n in DECODER_STREAMS:
        codes = [torch.randint(0, 16384, (2 * block,), generator=gen).tolist() for _ in range(n)]
        batched = min(_streams_ms(decoder, codes, True, device) for _ in range(repeats))
        serial = min(_streams_ms(decoder, codes, False, device) for _ in range(repeats))
        report.decoder_batching_ms.append(
            {"streams": n, "batched_ms": batched, "one_by_one_ms": serial}
        )
        print(f"     {n:7d}  {batched:10.1f}  {serial:13.1f}  {serial / batched:5.2f}x")


# ----------------------------------------------------------------------------- main


async def run(args: argparse.Namespace, root: Path, report: Report) -> None:
    engine = _engine(args, root)
    await engine.start()
    try:
        if "stages" in args.sections:
            await bench_stages(engine, args.turn_s, report)
        if "concurrency" in args.sections:
            await bench_concurrency(engine, args.repeats, report)
            await bench_staggered(engine, report)
    finally:
        await engine.close()


def _cpu_threads(device: str) -> None:
    """One intra-op thread on the CPU: the tiny models gain nothing from more, and on a small
    machine a second OpenMP team (the worker thread's) spin-waiting against the first makes
    the worker's model calls several times slower, and their timings bimodal."""
    if device == "cpu":
        torch.set_num_threads(1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="official sizes, random weights, CUDA")
    p.add_argument(
        "--decode-step", default="auto", choices=DECODE_STEPS, help="LoadOptions.decode_step"
    )
    p.add_argument(
        "--sections", default="all", help=f"comma list of {', '.join(SECTIONS)} (or all)"
    )
    p.add_argument("--device", default=None, help="default: cuda with --full, else cpu")
    p.add_argument("--turn-s", type=float, default=6.0, help="spoken turn length")
    p.add_argument("--answer-ids", type=int, default=78, help="LM ids per answer (13:26 layout)")
    p.add_argument("--decoder-tokens", type=int, default=150, help="answer length for part 3")
    p.add_argument("--repeats", type=int, default=2, help="runs per figure (the best counts)")
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.answer_ids < 1 or args.decoder_tokens < 1 or args.turn_s <= 0:
        p.error("--answer-ids, --decoder-tokens and --turn-s must be positive")
    if args.device is None:
        args.device = "cuda" if args.full else "cpu"
    if args.full and not torch.cuda.is_available():
        p.error("--full needs a CUDA GPU")
    args.sections = SECTIONS if args.sections == "all" else tuple(args.sections.split(","))
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}")
    try:
        _load_options(args)
    except ValueError as exc:
        p.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _cpu_threads(args.device)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for folder in (TOKENIZER_FOLDER, LM_FOLDER, DECODER_FOLDER):
            (root / folder).mkdir()
        if not args.full:
            write_tiny_model_set(root)
        report = Report(
            "full (random weights)" if args.full else "tiny",
            args.device,
            _load_options(args).resolved_decode_step,
        )
        try:
            if "stages" in args.sections or "concurrency" in args.sections:
                asyncio.run(run(args, root, report))
            if "decoder" in args.sections:
                decoder_dir = root / DECODER_FOLDER
                if args.full and not (decoder_dir / "flow.pt").exists():
                    write_tiny_decoder(decoder_dir, hift_channels=FULL_HIFT_CHANNELS, **FULL_FLOW)
                bench_decoder(decoder_dir, args.device, args.decoder_tokens, args.repeats, report)
                bench_decoder_batching(decoder_dir, args.device, args.repeats, report)
            if "warm-up" in args.sections:
                bench_warm_up(args, root, report)
        finally:
            if args.json is not None:
                args.json.write_text(json.dumps(asdict(report), indent=2))
    print(
        f"\n({report.size} on {report.device}, decode step {report.decode_step}; "
        f"{time.perf_counter() - started:.0f} s in all)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
