"""Flow decoder speed: latency of one reference `inference` call and of its parts.

    python -m bench.bench_flow                      # tiny random model on CPU
    python -m bench.bench_flow --full               # plus the official sizes on a CUDA GPU

For each total token count (prompt + new block) it reports the whole call, the encoder, and
one CFG step with the conditional/unconditional passes batched (what `inference` does) versus
run one after the other. Real-time factor = compute seconds per second of generated audio
(mel frames x 256 / 22050). Weights are random: only speed is measured.
"""

from __future__ import annotations

import argparse
import logging

import torch

from bench.timing import best_of
from models.flow import FlowConfig, FlowDecoder
from models.flow.tiny import randomize_flow_weights, tiny_flow_yaml_section

logger = logging.getLogger("bench_flow")

HOP_SECONDS = 256 / 22050
NEW_TOKENS = 25  # first block of the web demo schedule


def full_size_flow(device: torch.device, dtype: torch.dtype) -> FlowDecoder:
    """Official sizes (512-d encoder x6, U-Net 256 ch with 12 mid blocks), random weights."""
    section = tiny_flow_yaml_section(
        d_model=512,
        attention_heads=8,
        linear_units=2048,
        num_blocks=6,
        estimator_channels=256,
        attention_head_dim=64,
        n_blocks=4,
        num_mid_blocks=12,
        num_heads=8,
    )
    model = randomize_flow_weights(FlowDecoder(FlowConfig.from_yaml_text(section)))
    return model.to(device=device, dtype=dtype).eval()


def bench_one(model: FlowDecoder, total: int, repeats: int) -> str:
    """Timings for `total` tokens (the last NEW_TOKENS of them new), as one report line."""
    param = model.input_embedding.weight
    device, dtype = param.device, param.dtype
    n_prompt = max(total - NEW_TOKENS, 0)
    tokens = torch.randint(0, model.cfg.vocab_size, (1, total), device=device)
    prompt_token, token = tokens[:, :n_prompt], tokens[:, n_prompt:]
    prompt_feat = torch.randn(1, model.mel_frames(n_prompt), 80, device=device, dtype=dtype)
    embedding = torch.zeros(1, 192, device=device, dtype=dtype)

    def whole() -> None:
        model.inference(token, prompt_token, prompt_feat, embedding)

    whole()  # warm-up
    lengths = torch.tensor([total], device=device)
    inputs = model.prepare(token, prompt_token, prompt_feat, embedding)
    x = torch.randn_like(inputs.mu)
    t = torch.tensor(0.5, device=device, dtype=dtype)
    zeros_mu, zeros_spks = torch.zeros_like(inputs.mu), torch.zeros_like(inputs.spks)

    def batched() -> None:
        model.decoder.guided_velocity(x, inputs.mask, inputs.mu, t, inputs.spks, inputs.cond)

    def two_calls() -> None:
        model.estimator(x, inputs.mask, inputs.mu, t, inputs.spks, inputs.cond)
        model.estimator(x, inputs.mask, zeros_mu, t, zeros_spks, zeros_mu)

    whole_s = best_of(repeats, device, whole)
    encode_s = best_of(repeats, device, lambda: model.encode(tokens, lengths))
    batched_s = best_of(repeats, device, batched)
    two_s = best_of(repeats, device, two_calls)
    frames = model.mel_frames(total) - prompt_feat.shape[1]
    return (
        f"  tokens {total:4d} ({model.mel_frames(total):4d} frames): inference "
        f"{whole_s * 1e3:8.1f} ms (RTF {whole_s / (frames * HOP_SECONDS):.3f}) | encoder "
        f"{encode_s * 1e3:6.1f} ms | CFG step batched {batched_s * 1e3:6.1f} ms, "
        f"two calls {two_s * 1e3:6.1f} ms ({two_s / batched_s:.2f}x)"
    )


def bench(name: str, model: FlowDecoder, totals: list[int], repeats: int) -> None:
    param = model.input_embedding.weight
    print(f"[{name}] on {param.device} {param.dtype}; {NEW_TOKENS} new tokens after a prompt")
    for total in totals:
        print(bench_one(model, total, repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[25, 75, 175])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--full", action="store_true", help="also the official sizes on CUDA")
    args = parser.parse_args()
    if min(args.tokens) < 1 or args.repeats < 1:
        parser.error("--tokens and --repeats must be positive")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    tiny = randomize_flow_weights(FlowDecoder(FlowConfig.from_yaml_text(tiny_flow_yaml_section())))
    bench("tiny", tiny.eval(), args.tokens, args.repeats)
    if args.full:
        if not torch.cuda.is_available():
            logger.warning("--full needs a CUDA GPU; skipped")
            return
        for dtype in (torch.float32, torch.bfloat16):
            bench(
                f"full {dtype}",
                full_size_flow(torch.device("cuda"), dtype),
                args.tokens,
                args.repeats,
            )


if __name__ == "__main__":
    main()
