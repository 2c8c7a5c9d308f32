"""LM throughput: prefill and cached decode tokens/s, bf16 and int4.

Default: a tiny random LM written in the official checkpoint layout and loaded with `load_lm`,
on CPU (runs in well under a minute). `--full`: the real GLM-4-Voice-9B shapes with random
weights built directly on a CUDA GPU (no checkpoint needed), with peak GPU memory.
Real time needs about 18.75 decoded tokens/s (13 text + 26 audio tokens per 2.08 s of speech).

    python -m bench.bench_lm [--full] [--prompt 64] [--steps 32] [--json out.json]
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

from bench.timing import sync
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
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_grad_enabled(False)
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - {"bf16", "int4"}
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}")

    if args.full:
        if not torch.cuda.is_available():
            print("--full needs a CUDA GPU", file=sys.stderr)
            return 2
        config = ChatGLMConfig.from_dict(tiny_config_dict(**FULL_SIZES))
        results = bench_random(
            config, torch.device("cuda"), modes, args.prompt or 512, args.steps or 64
        )
    else:
        results = bench_tiny_checkpoint(modes, args.prompt or 64, args.steps or 32)

    print(format_table(results))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
