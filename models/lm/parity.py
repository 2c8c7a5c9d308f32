"""Parity of the LM against the reference fixtures in `golden/lm`.

Each case folder under `lm/cases/` runs one checkpoint folder (`model/`, `model_bf16/`,
`model_rope500/`), loaded with `load_lm` in that checkpoint's `torch_dtype`. Compared:
prefill logits, per-layer hidden states (entry k = input of layer k, the last one before the
final norm), the output after the final norm, the prefill KV cache, six teacher-forced cached
decode steps, a no-cache forward over the whole sequence and a greedy decode (exact ids).
Left-padded rows are compared only where the attention mask is 1 (the reference lets pad queries
attend everywhere; their outputs mean nothing).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from transformers import GlmForCausalLM

from models.lm.loading import load_lm
from models.lm.sampling import LMStepper
from models.parity import ParityResult, compare, load_npy

logger = logging.getLogger(__name__)

COMPONENT = "lm"
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.25}


def _lm_root(golden_dir: Path) -> Path:
    golden_dir = Path(golden_dir)
    return golden_dir / "lm" if (golden_dir / "lm").is_dir() else golden_dir


def model_folder_for(root: Path, case: str) -> Path:
    """The checkpoint a case runs: `model_bf16` for bf16 cases, `model_rope500` for rope500."""
    for tag in ("bf16", "rope500"):
        if tag in case.split("_"):
            return root / f"model_{tag}"
    return root / "model"


def _checkpoint_dtype(folder: Path) -> torch.dtype:
    with (folder / "config.json").open(encoding="utf-8") as f:
        name = json.load(f).get("torch_dtype", "float32")
    return torch.bfloat16 if name == "bfloat16" else torch.float32


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


class _LayerRecorder:
    """Captures the input of every decoder layer and of the final norm (reference hidden states)."""

    def __init__(self, model: GlmForCausalLM) -> None:
        self.inputs: list[torch.Tensor] = []
        modules = [*model.model.layers, model.model.norm]
        self._handles = [m.register_forward_pre_hook(self._hook) for m in modules]

    def _hook(self, _module: torch.nn.Module, args: tuple) -> None:
        self.inputs.append(args[0].detach())

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def _masked(
    name: str, got: np.ndarray, expected: np.ndarray, mask: np.ndarray, tol: float
) -> ParityResult:
    """Compare arrays shaped [*leading, b, S, D] only where mask [b, S] == 1."""
    if got.shape != expected.shape:
        return compare(COMPONENT, name, got, expected, tol)
    leading = got.ndim - mask.ndim - (1 if got.ndim > mask.ndim else 0)
    index = (slice(None),) * max(leading, 0) + (mask.astype(bool),)
    return compare(COMPONENT, name, got[index], expected[index], tol)


@torch.inference_mode()
def _prefill_checks(
    model: GlmForCausalLM, case_dir: Path, case: str, tol: float
) -> list[ParityResult]:
    ids = torch.from_numpy(load_npy(case_dir, "input_ids"))
    mask = load_npy(case_dir, "attention_mask")
    pos = torch.from_numpy(load_npy(case_dir, "position_ids"))
    recorder = _LayerRecorder(model)
    try:
        out = model(
            input_ids=ids, attention_mask=torch.from_numpy(mask), position_ids=pos, use_cache=True
        )
    finally:
        recorder.close()
    post_norm = model.model.norm(recorder.inputs[-1])
    hidden = np.stack([_np(h) for h in recorder.inputs])
    results = [
        _masked(
            f"{case}/prefill_logits",
            _np(out.logits),
            load_npy(case_dir, "prefill_logits"),
            mask,
            tol,
        ),
        _masked(f"{case}/hidden_states", hidden, load_npy(case_dir, "hidden_states"), mask, tol),
        _masked(
            f"{case}/last_hidden_state",
            _np(post_norm),
            load_npy(case_dir, "last_hidden_state"),
            mask,
            tol,
        ),
    ]
    if (case_dir / "prefill_kv_cache.npy").is_file():
        kv = np.stack(
            [np.stack([_np(layer.keys), _np(layer.values)]) for layer in out.cache.layers]
        )
        results.append(
            compare(
                COMPONENT,
                f"{case}/prefill_kv_cache",
                kv,
                load_npy(case_dir, "prefill_kv_cache"),
                tol,
            )
        )
    return results


@torch.inference_mode()
def _decode_checks(
    model: GlmForCausalLM, case_dir: Path, case: str, tol: float
) -> list[ParityResult]:
    ids = torch.from_numpy(load_npy(case_dir, "input_ids"))
    mask = torch.from_numpy(load_npy(case_dir, "attention_mask"))
    decode_ids = torch.from_numpy(load_npy(case_dir, "decode_input_ids"))
    expected_greedy = load_npy(case_dir, "greedy_tokens")
    stepper = LMStepper(model)

    logits, state = stepper.prefill(ids, mask)
    steps = []
    for k in range(decode_ids.shape[1]):
        steps.append(_np(stepper.decode(state, decode_ids[:, k])))
    teacher_forced = np.stack(steps, axis=1)

    logits, state = stepper.prefill(ids, mask)
    greedy = [logits.argmax(-1)]
    for _ in range(expected_greedy.shape[1] - 1):
        greedy.append(stepper.decode(state, greedy[-1]).argmax(-1))
    greedy_ids = torch.stack(greedy, dim=1).cpu().numpy()

    full_ids = torch.cat([ids, decode_ids], dim=1)
    final_mask = load_npy(case_dir, "decode_attention_mask_final")
    positions = torch.cat(
        [
            torch.from_numpy(load_npy(case_dir, "position_ids")),
            torch.from_numpy(load_npy(case_dir, "decode_position_ids")),
        ],
        dim=1,
    )
    full = model(
        input_ids=full_ids,
        attention_mask=torch.from_numpy(final_mask),
        position_ids=positions,
        use_cache=False,
    )
    return [
        compare(
            COMPONENT,
            f"{case}/decode_logits",
            teacher_forced,
            load_npy(case_dir, "decode_logits"),
            tol,
        ),
        _masked(
            f"{case}/full_sequence_logits",
            _np(full.logits),
            load_npy(case_dir, "full_sequence_logits"),
            final_mask,
            tol,
        ),
        compare(COMPONENT, f"{case}/greedy_tokens", greedy_ids, expected_greedy, 0.0, exact=True),
    ]


def check_case(root: Path, case: str) -> list[ParityResult]:
    """All comparisons of one case folder `root/cases/<case>`."""
    folder = model_folder_for(root, case)
    dtype = _checkpoint_dtype(folder)
    tol = TOLERANCE[dtype]
    model = load_lm(folder, device="cpu", dtype=dtype)
    case_dir = root / "cases" / case
    return _prefill_checks(model, case_dir, case, tol) + _decode_checks(model, case_dir, case, tol)


def check(golden_dir: Path) -> list[ParityResult]:
    """Every case under `golden_dir/lm/cases` (or `golden_dir/cases`)."""
    root = _lm_root(golden_dir)
    cases = sorted(p.name for p in (root / "cases").iterdir() if p.is_dir())
    if not cases:
        raise FileNotFoundError(f"no LM cases under {root / 'cases'}")
    results: list[ParityResult] = []
    for case in cases:
        logger.info("lm parity case %s", case)
        results.extend(check_case(root, case))
    return results


def main(argv: list[str] | None = None) -> int:
    """`python -m models.lm.parity GOLDEN_DIR`: print every comparison; exit 1 on any failure."""
    import argparse

    parser = argparse.ArgumentParser(description="LM parity against the reference fixtures")
    parser.add_argument("golden_dir", type=Path)
    args = parser.parse_args(argv)
    results = check(args.golden_dir)
    for result in results:
        print(result.line())
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
