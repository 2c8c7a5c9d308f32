"""LM throughput: prefill and cached decode tokens/s, bf16 and int4; decode steps per
`LoadOptions.decode_step` and batch size.

Default: a tiny random LM written in the official checkpoint layout and loaded with `load_lm`,
on CPU (runs in well under a minute). `--full`: the real GLM-4-Voice-9B shapes with random
weights built directly on a CUDA GPU (no checkpoint needed), with peak GPU memory.
Real time needs about 18.75 decoded tokens/s (13 text + 26 audio tokens per 2.08 s of speech).

The second table steps `--batches` sequences at once through the engine's sequence batches
(`make_sequence_batch`), for each of `--decode-steps` (the default is what the device runs:
dynamic and static on a CPU; also CUDA graphs on a GPU; `compile` takes minutes at 9B).
A static kind with `-unfused` (`static-unfused`, `graphs-unfused`) steps through
transformers' layers instead of the fused decode step, for comparison.

Then: prompts prefilled together vs. one by one (fused and transformers' path), and the next
turn's prefill after a long conversation with its keys/values kept (`PrefixCache`) vs. from
scratch.

`--profile KIND` (e.g. `graphs`) profiles a few batch-1 steps of that decode step: per step
the wall time, the time the device was busy and the kernels it ran (on a GPU; operators on a
CPU), then the operators that took the most of that time. Where the device is busy most of
the step, the kernels themselves are the limit; where it is idle, the host is.

    python -m bench.bench_lm [--full] [--prompt 64] [--steps 32] [--modes bf16,int4]
                             [--decode-steps dynamic,static,graphs] [--batches 1,4,16]
                             [--profile graphs] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import GlmForCausalLM

from bench.timing import best_of, sync
from models.glm4voice.batching import SequenceBatch
from models.glm4voice.brain import DECODE_STEPS, make_sequence_batch
from models.glm4voice.static_batch import StaticCacheConfig, StaticKVBatch
from models.lm.configuration_lm import ChatGLMConfig
from models.lm.loading import load_lm
from models.lm.sampling import LMStepper
from models.lm.tiny import build_random_lm, tiny_config_dict, write_tiny_lm

logger = logging.getLogger("bench_lm")

REALTIME_TOKENS_PER_S = 39 / 2.08
FULL_SIZES = {
    "num_layers": 40,
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "kv_channels": 128,
    "multi_query_group_num": 2,
    "ffn_hidden_size": 13696,
}


@dataclass
class Result:
    """One benchmark row."""

    size: str
    device: str
    mode: str
    prompt_tokens: int
    decode_steps: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    load_s: float
    peak_memory_gib: float


@dataclass
class StepResult:
    """Decode steps of `batch` sequences at once through one kind of sequence batch."""

    size: str
    decode_step: str
    batch: int
    steps: int
    ms_per_step: float
    tokens_per_s_per_sequence: float
    tokens_per_s_total: float
    setup_s: float  # making the batch, prefilling, and the first steps (graph recording)


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process peak RSS (KiB)


def measure(stepper: LMStepper, vocab: int, prompt_tokens: int, steps: int) -> tuple[float, float]:
    """Prefill tok/s of one prompt and greedy decode tok/s over `steps` steps (batch 1)."""
    device = stepper.device
    prompt = torch.randint(
        0, min(vocab, 150000), (1, prompt_tokens), generator=torch.Generator().manual_seed(0)
    )
    logits, state = stepper.prefill(prompt)  # warm-up
    stepper.decode(state, logits.argmax(-1))
    sync(device)
    start = time.perf_counter()
    logits, state = stepper.prefill(prompt)
    sync(device)
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        logits = stepper.decode(state, logits.argmax(-1))
    sync(device)
    decode_s = time.perf_counter() - start
    return prompt_tokens / prefill_s, steps / decode_s


def run_one(
    size: str,
    build: Callable[[str | None], GlmForCausalLM],
    device: torch.device,
    mode: str,
    prompt_tokens: int,
    steps: int,
    vocab: int,
) -> Result:
    """Build the model for `mode` (bf16 or int4), then time its prefill and decode."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    model = build(None if mode == "bf16" else "int4")
    sync(device)
    load_s = time.perf_counter() - start
    prefill, decode = measure(LMStepper(model), vocab, prompt_tokens, steps)
    result = Result(
        size,
        str(device),
        mode,
        prompt_tokens,
        steps,
        prefill,
        decode,
        load_s,
        _peak_memory_gib(device),
    )
    del model
    return result


def measure_steps(
    make_batch: Callable[[], SequenceBatch],
    device: torch.device,
    prompt_tokens: int,
    batch: int,
    steps: int,
    vocab: int,
) -> tuple[float, float]:
    """(setup s, seconds per step) of `steps` steps of `batch` sequences: each sequence is
    prefilled with its own prompt and fed the greedy token of its last logits."""
    gen = torch.Generator().manual_seed(batch)
    started = time.perf_counter()
    sequences = make_batch()
    keys = list(range(batch))
    logits = torch.stack(
        [
            sequences.prefill(
                key, torch.randint(0, vocab, (prompt_tokens,), generator=gen).tolist()
            )
            for key in keys
        ]
    )
    for _ in range(3):  # first steps: kernels chosen, graphs recorded or compiled
        logits = sequences.step(keys, logits.argmax(-1).tolist())
    sync(device)
    setup_s = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(steps):
        logits = sequences.step(keys, logits.argmax(-1).tolist())
    sync(device)
    per_step = (time.perf_counter() - started) / steps
    for key in keys:
        sequences.release(key)
    return setup_s, per_step


@dataclass
class PrefillResult:
    """`prompts` prompts arriving together, prefilled in one left-padded forward vs. one by one."""

    size: str
    path: str  # "fused" or "transformers" (the static cache's prefill)
    prompts: int
    prompt_tokens: int
    together_ms: float
    one_by_one_ms: float


def bench_prefill_together(
    model: GlmForCausalLM, size: str, counts: list[int], prompt_tokens: int, vocab: int
) -> list[PrefillResult]:
    """The static cache's `prefill_many` against a loop of `prefill` (best of three each),
    through the fused path and through transformers' forward; prompt lengths vary by up to a
    quarter, as real turns do."""
    device = next(model.parameters()).device
    stepper = LMStepper(model)
    gen = torch.Generator().manual_seed(7)
    results = []
    for path, count in [(path, count) for path in ("fused", "transformers") for count in counts]:
        cache = StaticCacheConfig(max_batch=count, fused=path == "fused")
        sequences = make_sequence_batch(stepper, "static", cache)
        lengths = torch.randint(3 * prompt_tokens // 4, prompt_tokens + 1, (count,), generator=gen)
        prompts = [
            (key, torch.randint(0, vocab, (int(n),), generator=gen).tolist())
            for key, n in enumerate(lengths)
        ]

        def together(batch=sequences, items=prompts) -> None:
            batch.prefill_many(items)

        def one_by_one(batch=sequences, items=prompts) -> None:
            for key, ids in items:
                batch.prefill(key, ids)

        together()  # warm-up
        one_by_one()
        result = PrefillResult(
            size,
            path,
            count,
            prompt_tokens,
            1e3 * best_of(3, device, together),
            1e3 * best_of(3, device, one_by_one),
        )
        results.append(result)
        print(
            f"{path:<12} prefill of {count:2d} prompts of <= {prompt_tokens} ids: together "
            f"{result.together_ms:8.1f} ms, one by one {result.one_by_one_ms:8.1f} ms "
            f"({result.one_by_one_ms / result.together_ms:.2f}x)",
            flush=True,
        )
        del sequences
    return results


@dataclass
class ConversationResult:
    """The next turn's prefill after a conversation of `history` ids: with the previous
    turn's keys/values kept (`PrefixCache`) and from scratch."""

    size: str
    history: int
    new_ids: int
    kept_ms: float
    from_scratch_ms: float


def bench_conversation_prefill(
    model: GlmForCausalLM, size: str, histories: list[int], new_ids: int, vocab: int
) -> list[ConversationResult]:
    """Best of three prefills of `history + new_ids` ids, after the history was prefilled and
    released (stored) with the prefix cache on; and the same prompt with it off."""
    device = next(model.parameters()).device
    stepper = LMStepper(model)
    gen = torch.Generator().manual_seed(11)
    results = []
    for history in histories:
        ids = torch.randint(0, vocab, (history + new_ids,), generator=gen).tolist()
        columns = 1 << (len(ids) + 1).bit_length()
        timings = {}
        for kept in (True, False):
            cache = StaticCacheConfig(
                max_batch=1, max_len=columns, prefix_cache_ids=columns if kept else 0
            )
            batch = StaticKVBatch(stepper, cache)
            elapsed = float("inf")
            for _ in range(4):  # the first round warms up
                if batch.prefixes is not None:
                    batch.prefixes.clear()
                    batch.prefill("history", ids[:history])
                    batch.release("history")
                sync(device)
                started = time.perf_counter()
                batch.prefill("turn", ids)
                sync(device)
                elapsed = min(elapsed, time.perf_counter() - started)
                batch.release("turn")
            timings[kept] = 1e3 * elapsed
            del batch
        result = ConversationResult(size, history, new_ids, timings[True], timings[False])
        results.append(result)
        print(
            f"next turn after {history:5d} ids of conversation (+{new_ids} new): prefill "
            f"{result.kept_ms:8.1f} ms with its keys/values kept, {result.from_scratch_ms:8.1f} "
            f"ms from scratch ({result.from_scratch_ms / result.kept_ms:.2f}x)",
            flush=True,
        )
    return results


def bench_decode_steps(
    model: GlmForCausalLM,
    size: str,
    decode_steps: list[str],
    batches: list[int],
    prompt_tokens: int,
    steps: int,
    vocab: int,
) -> list[StepResult]:
    """Every `decode_steps` kind at every batch size; one static cache per kind, with rows
    for the largest batch and the engine's default columns. A kind that fails is logged and
    skipped (e.g. a compiler missing on this machine)."""
    device = next(model.parameters()).device
    stepper = LMStepper(model)
    rows = max(batches)
    results: list[StepResult] = []
    for kind in decode_steps:
        base, unfused = split_decode_step(kind)
        cache = StaticCacheConfig(max_batch=rows, fused=not unfused)
        sequences: SequenceBatch | None = None

        def make_batch() -> SequenceBatch:
            nonlocal sequences
            if sequences is None:
                sequences = make_sequence_batch(stepper, base, cache)  # noqa: B023
            return sequences

        for batch in batches:
            try:
                setup_s, per_step = measure_steps(
                    make_batch, device, prompt_tokens, batch, steps, vocab
                )
            except Exception:
                logger.exception("decode step %s at batch %d failed", kind, batch)
                break
            result = StepResult(
                size, kind, batch, steps, 1e3 * per_step, 1 / per_step, batch / per_step, setup_s
            )
            results.append(result)
            print(format_steps([result], header=not results[:-1]), flush=True)
        del sequences
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


@dataclass
class StepProfile:
    """Where the time of one decode step goes (`profile_decode_step`)."""

    size: str
    decode_step: str
    steps: int
    wall_ms_per_step: float
    busy_ms_per_step: float  # device kernels (CPU: top-level operators) per step
    kernels_per_step: float
    table: str  # the operators taking the most time


def _self_time_us(event: object, device: bool) -> float:
    """Self time of a profiler event or average, on the device or the CPU (the attribute's
    name changed across torch versions)."""
    names = (
        ("self_device_time_total", "self_cuda_time_total") if device else ("self_cpu_time_total",)
    )
    for name in names:
        value = getattr(event, name, None)
        if value is not None:
            return float(value)
    return 0.0


def profile_decode_step(
    model: GlmForCausalLM,
    size: str,
    kind: str,
    prompt_tokens: int,
    vocab: int,
    steps: int = 8,
    top: int = 15,
) -> StepProfile:
    """Profile `steps` batch-1 steps of decode step `kind` after three unprofiled ones."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    device = next(model.parameters()).device
    on_gpu = device.type == "cuda"
    base, unfused = split_decode_step(kind)
    sequences = make_sequence_batch(
        LMStepper(model), base, StaticCacheConfig(max_batch=1, fused=not unfused)
    )
    prompt = torch.randint(0, vocab, (prompt_tokens,), generator=torch.Generator().manual_seed(0))
    logits = sequences.prefill("profiled", prompt.tolist())[None]
    for _ in range(3):  # kernels chosen, graphs recorded
        logits = sequences.step(["profiled"], logits.argmax(-1).tolist())
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        for _ in range(steps):
            logits = sequences.step(["profiled"], logits.argmax(-1).tolist())
        sync(device)
        wall = time.perf_counter() - started
    sequences.release("profiled")
    if on_gpu:  # kernel events only (an operator's device time is its kernels')
        kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        busy_us = sum(_self_time_us(e, True) for e in kernels)
        sort_by = "self_cuda_time_total"
    else:  # the operators called from Python, not the ones inside them
        kernels = [e for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::")]
        busy_us = sum(e.cpu_time_total for e in kernels)
        sort_by = "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=top)
    return StepProfile(
        size,
        kind,
        steps,
        1e3 * wall / steps,
        busy_us / 1e3 / steps,
        len(kernels) / steps,
        table,
    )


def format_profile(result: StepProfile) -> str:
    where = "device kernels" if result.size != "tiny" else "top-level operators"
    return (
        f"profile of {result.steps} steps, {result.size}, decode step {result.decode_step}, "
        f"batch 1: {result.wall_ms_per_step:.2f} ms per step, {where} busy "
        f"{result.busy_ms_per_step:.2f} ms ({result.kernels_per_step:.0f} per step)\n"
        f"{result.table}"
    )


UNFUSED = "-unfused"


def split_decode_step(kind: str) -> tuple[str, bool]:
    """(`LoadOptions.decode_step` value, whether to step through transformers' layers)."""
    if kind.endswith(UNFUSED):
        return kind.removesuffix(UNFUSED), True
    return kind, False


def known_decode_steps() -> list[str]:
    """Every kind `--decode-steps` takes."""
    static = [kind for kind in DECODE_STEPS if kind not in ("auto", "dynamic")]
    return [*DECODE_STEPS, *(kind + UNFUSED for kind in static)]


def format_steps(results: list[StepResult], header: bool = True) -> str:
    """Decode-step results as an aligned text table."""
    lines = (
        [
            f"{'size':<5} {'decode step':<14} {'batch':>5} {'ms/step':>8} {'tok/s per seq':>14} "
            f"{'total tok/s':>12} {'setup s':>8}"
        ]
        if header
        else []
    )
    lines += [
        f"{r.size:<5} {r.decode_step:<14} {r.batch:>5} {r.ms_per_step:>8.2f} "
        f"{r.tokens_per_s_per_sequence:>14.1f} {r.tokens_per_s_total:>12.1f} {r.setup_s:>8.2f}"
        for r in results
    ]
    return "\n".join(lines)


def bench_random(
    config: ChatGLMConfig,
    device: torch.device,
    modes: list[str],
    prompt_tokens: int,
    steps: int,
    size: str = "9B",
) -> list[Result]:
    """Random-weight models of `config` built on `device` (the `--full` path)."""

    def build(quant: str | None) -> GlmForCausalLM:
        return build_random_lm(config, device, torch.bfloat16, quant)

    vocab = config.padded_vocab_size
    return [run_one(size, build, device, mode, prompt_tokens, steps, vocab) for mode in modes]


def bench_tiny_checkpoint(modes: list[str], prompt_tokens: int, steps: int) -> list[Result]:
    """A tiny checkpoint written in the official layout and loaded with `load_lm` on CPU."""
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_tiny_lm(
            Path(tmp), with_tokenizer=False, hidden_size=64, ffn_hidden_size=128, kv_channels=16
        )

        def build(quant: str | None) -> GlmForCausalLM:
            return load_lm(model_dir, device, torch.bfloat16, quant)

        vocab = ChatGLMConfig.from_file(model_dir / "config.json").padded_vocab_size
        return [run_one("tiny", build, device, mode, prompt_tokens, steps, vocab) for mode in modes]


def format_table(results: list[Result]) -> str:
    """Results as an aligned text table."""
    lines = [
        f"{'size':<5} {'device':<6} {'mode':<5} {'prefill tok/s':>14} {'decode tok/s':>13} "
        f"{'load s':>7} {'peak GiB':>9}"
    ]
    lines += [
        f"{r.size:<5} {r.device:<6} {r.mode:<5} {r.prefill_tokens_per_s:>14.1f} "
        f"{r.decode_tokens_per_s:>13.1f} {r.load_s:>7.2f} {r.peak_memory_gib:>9.2f}"
        for r in results
    ]
    lines.append(f"real time needs >= {REALTIME_TOKENS_PER_S:.2f} decode tok/s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--full", action="store_true", help="real 9B shapes, random weights, CUDA")
    parser.add_argument(
        "--prompt", type=int, default=None, help="prompt tokens (tiny 64, full 512)"
    )
    parser.add_argument("--steps", type=int, default=None, help="decode steps (tiny 32, full 64)")
    parser.add_argument("--modes", default="bf16,int4", help="comma list of bf16,int4")
    parser.add_argument(
        "--decode-steps",
        default=None,
        help="comma list of dynamic,static,graphs,compile, or a static kind with -unfused "
        "(default: dynamic,static,static-unfused, plus graphs,graphs-unfused on a GPU; '' for "
        "none)",
    )
    parser.add_argument(
        "--batches", default=None, help="sequences per step (tiny 1,4; full 1,4,16)"
    )
    parser.add_argument(
        "--prefill-together",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time prompts prefilled together vs. one by one (4 and 16 prompts)",
    )
    parser.add_argument(
        "--conversation",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time the next turn's prefill with the conversation's keys/values kept vs not",
    )
    parser.add_argument(
        "--profile",
        default=None,
        metavar="KIND",
        help="profile batch-1 steps of this decode step (e.g. graphs, static-unfused)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_grad_enabled(False)
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - {"bf16", "int4"}
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}")

    if args.full and not torch.cuda.is_available():
        print("--full needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.decode_steps is None:
        args.decode_steps = "dynamic,static,static-unfused"
        if args.full:
            args.decode_steps += ",graphs,graphs-unfused"
    decode_steps = [k for k in args.decode_steps.split(",") if k]
    unknown = set(decode_steps) - set(known_decode_steps())
    if unknown:
        parser.error(f"unknown decode steps {sorted(unknown)}")
    if args.profile is not None and args.profile not in known_decode_steps():
        parser.error(f"unknown decode step to profile {args.profile!r}")
    on_cuda_only = ("graphs", "compile")
    if args.profile and not args.full and split_decode_step(args.profile)[0] in on_cuda_only:
        parser.error(f"--profile {args.profile} needs a CUDA device (--full)")
    if (args.prompt is not None and args.prompt < 1) or (args.steps is not None and args.steps < 1):
        parser.error("--prompt and --steps must be positive")
    batches = [int(b) for b in (args.batches or ("1,4,16" if args.full else "1,4")).split(",")]
    if any(b < 1 for b in batches):
        parser.error("--batches must be positive")

    step_results: list[StepResult] = []
    prefill_results: list[PrefillResult] = []
    conversation_results: list[ConversationResult] = []
    profiles: list[StepProfile] = []
    if args.full:
        config = ChatGLMConfig.from_dict(tiny_config_dict(**FULL_SIZES))
        device = torch.device("cuda")
        prompt, steps, size = args.prompt or 512, args.steps or 64, "9B"
        results = bench_random(config, device, modes, prompt, steps)
        vocab = min(config.padded_vocab_size, 150000)
        dtype = torch.bfloat16
    else:
        torch.set_num_threads(1)  # tiny kernels only lose time to threads fighting for cores
        results = bench_tiny_checkpoint(modes, args.prompt or 64, args.steps or 32)
        config = ChatGLMConfig.from_dict(tiny_config_dict(padded_vocab_size=512))
        device = torch.device("cpu")
        prompt, steps, size, vocab = args.prompt or 64, args.steps or 32, "tiny", 500
        dtype = torch.float32
    if results:
        print(format_table(results), flush=True)
    if decode_steps or args.prefill_together or args.conversation or args.profile:
        model = build_random_lm(config, device, dtype)
        if decode_steps:
            step_results = bench_decode_steps(
                model, size, decode_steps, batches, prompt, steps, vocab
            )
        if args.prefill_together:
            prefill_results = bench_prefill_together(model, size, [4, 16], 256, vocab)
        if args.conversation:
            histories = [500, 2000, 6000] if args.full else [250, 1000, 4000]
            conversation_results = bench_conversation_prefill(model, size, histories, 100, vocab)
        if args.profile:
            profiles.append(profile_decode_step(model, size, args.profile, prompt, vocab))
            print(format_profile(profiles[-1]), flush=True)
        del model
    if args.json:
        payload = {
            "lm": [asdict(r) for r in results],
            "decode_steps": [asdict(r) for r in step_results],
            "prefill_together": [asdict(r) for r in prefill_results],
            "conversation_prefill": [asdict(r) for r in conversation_results],
            "profiles": [asdict(r) for r in profiles],
        }
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
