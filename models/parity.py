"""Shared pieces of the parity checks against reference fixtures (`../shared/golden` layout).

Each model folder exposes `check(golden_dir: Path) -> list[ParityResult]` for its component;
`python -m models.check_parity GOLDEN_DIR` runs them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class ParityResult:
    component: str  # e.g. "speech_tokenizer"
    output: str  # e.g. "single/token_ids"
    max_abs_err: float
    tolerance: float
    exact: bool = False  # integer outputs: every element must match

    @property
    def passed(self) -> bool:
        if self.exact:
            return self.max_abs_err == 0
        return bool(np.isfinite(self.max_abs_err)) and self.max_abs_err <= self.tolerance

    def line(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        tol = "exact" if self.exact else f"tol {self.tolerance:.1e}"
        return f"{verdict}  {self.component:<18} {self.output:<44} max|err| {self.max_abs_err:.3e}  ({tol})"


def compare(
    component: str,
    output: str,
    got: np.ndarray,
    expected: np.ndarray,
    tol: float,
    exact: bool = False,
) -> ParityResult:
    """Max abs error of `got` against `expected`; a shape mismatch is an infinite error."""
    got = np.asarray(got)
    expected = np.asarray(expected)
    if got.shape != expected.shape:
        return ParityResult(
            component, f"{output} (shape {got.shape} != {expected.shape})", float("inf"), tol, exact
        )
    if got.size == 0:
        return ParityResult(component, output, 0.0, tol, exact)
    err = float(np.max(np.abs(got.astype(np.float64) - expected.astype(np.float64))))
    return ParityResult(component, output, err, tol, exact)


def load_npy(folder: Path, name: str) -> np.ndarray:
    path = folder / (name if name.endswith(".npy") else f"{name}.npy")
    if not path.is_file():
        raise FileNotFoundError(f"fixture file missing: {path}")
    return np.load(path, allow_pickle=False)
