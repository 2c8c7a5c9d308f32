"""Parity of the speech tokenizer against the reference fixtures (`speech_tokenizer/` folder).

The model and feature extractor are built from the fixture folder's own checkpoint files (any
sizes), the recorded waveforms are run through the same steps as the reference
`extract_speech_token`, and every recorded intermediate is compared with the README tolerances.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from models.parity import ParityResult, compare, load_npy

from .tokenizer import SpeechTokenizer

logger = logging.getLogger(__name__)

COMPONENT = "speech_tokenizer"
TOL_FEATURES = 5e-5
TOL_HIDDEN = 1e-4  # conv2 output, layer outputs, pooled pre-quantisation states
TOL_LAST_HIDDEN = 1e-5
TOL_MEL_FILTERS = 1e-7
CASES = {"single": ("wav_a_16k",), "batch": ("wav_a_16k", "wav_b_16k")}


def fixture_dir(golden_dir: Path) -> Path:
    """`golden_dir/speech_tokenizer` when it exists, else `golden_dir` itself."""
    golden_dir = Path(golden_dir)
    nested = golden_dir / COMPONENT
    return nested if nested.is_dir() else golden_dir


def _np(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().float().cpu().numpy()


def _check_case(tokenizer: SpeechTokenizer, folder: Path, case: str) -> list[ParityResult]:
    waves = [load_npy(folder, name) for name in CASES[case]]

    def expected(name: str) -> np.ndarray:
        return load_npy(folder, f"{case}_{name}")

    batch = tokenizer.features.batch(waves, tokenizer.samples_per_token)
    with torch.inference_mode():
        out = tokenizer.model(batch.input_features, batch.attention_mask, output_hidden_states=True)
    results = [
        compare(
            COMPONENT,
            f"{case}/input_features",
            _np(batch.input_features),
            expected("input_features"),
            TOL_FEATURES,
        ),
        compare(
            COMPONENT,
            f"{case}/attention_mask",
            batch.attention_mask.cpu().numpy(),
            expected("attention_mask"),
            0.0,
            exact=True,
        ),
        compare(
            COMPONENT, f"{case}/conv2_out", _np(out.conv2_out), expected("conv2_out"), TOL_HIDDEN
        ),
    ]
    for index, hidden in enumerate(out.hidden_states):
        results.append(
            compare(
                COMPONENT,
                f"{case}/layer{index}_out",
                _np(hidden),
                expected(f"layer{index}_out"),
                TOL_HIDDEN,
            )
        )
    results += [
        compare(
            COMPONENT,
            f"{case}/prequant_hidden",
            _np(out.prequant_hidden),
            expected("prequant_hidden"),
            TOL_HIDDEN,
        ),
        compare(
            COMPONENT,
            f"{case}/last_hidden_state",
            _np(out.last_hidden_state),
            expected("last_hidden_state"),
            TOL_LAST_HIDDEN,
        ),
        compare(
            COMPONENT,
            f"{case}/token_ids_all",
            out.quantized_token_ids.cpu().numpy(),
            expected("token_ids_all"),
            0.0,
            exact=True,
        ),
    ]
    tokens = tokenizer.extract([(wave, tokenizer.sampling_rate) for wave in waves])
    for index, ids in enumerate(tokens):
        results.append(
            compare(
                COMPONENT,
                f"{case}/tokens_utt{index}",
                np.asarray(ids, dtype=np.int64),
                expected(f"tokens_utt{index}"),
                0.0,
                exact=True,
            )
        )
    return results


def check(golden_dir: Path) -> list[ParityResult]:
    """Every speech tokenizer comparison; `golden_dir` is the fixture root or its component folder."""
    folder = fixture_dir(golden_dir)
    tokenizer = SpeechTokenizer.from_pretrained(folder, device="cpu", dtype=torch.float32)
    filters = _np(tokenizer.features.mel_filters_t).T
    results = [
        compare(COMPONENT, "mel_filters", filters, load_npy(folder, "mel_filters"), TOL_MEL_FILTERS)
    ]
    for case in CASES:
        results += _check_case(tokenizer, folder, case)
    failed = [r.output for r in results if not r.passed]
    logger.info(
        "speech tokenizer parity: %d checks, %d failed %s", len(results), len(failed), failed
    )
    return results


__all__ = ["COMPONENT", "check", "fixture_dir"]
