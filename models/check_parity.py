"""Check our models against reference fixtures laid out like `shared/golden/`.

    python -m models.check_parity GOLDEN_DIR

For every component folder found (`speech_tokenizer/`, `lm/`, `flow/`, `hift/`,
`token2wav_stream/`), the model is built from the config files in that folder (any sizes, any
seed), its checkpoint is loaded strictly, the recorded inputs are run, and every recorded output
is compared: one line per output with the max abs error and PASS/FAIL against the tolerance of
that folder's README. Exits 1 if anything fails or no component was found.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

from models.parity import ParityResult

logger = logging.getLogger(__name__)

# fixture folder -> module with `check(golden_root: Path) -> list[ParityResult]`
COMPONENTS: dict[str, str] = {
    "speech_tokenizer": "models.speech_tokenizer.parity",
    "lm": "models.lm.parity",
    "flow": "models.flow.parity",
    "hift": "models.hift.parity",
    "token2wav_stream": "models.decoder.parity",
}


def _checker(module: str) -> Callable[[Path], list[ParityResult]]:
    return importlib.import_module(module).check


def run_checks(golden_dir: Path, only: list[str] | None = None) -> list[ParityResult]:
    """Run every component present under `golden_dir`; a crash counts as a failure."""
    results: list[ParityResult] = []
    for folder, module in COMPONENTS.items():
        if only and folder not in only:
            continue
        path = golden_dir / folder
        if not path.is_dir():
            logger.info("no %s/ folder: skipped", folder)
            continue
        started = time.perf_counter()
        try:
            results += _checker(module)(golden_dir)
        except Exception as exc:  # report, keep checking the other components
            logger.exception("%s: the check crashed", folder)
            results.append(
                ParityResult(
                    folder, f"crashed: {type(exc).__name__}: {exc}"[:120], float("inf"), 0.0
                )
            )
        logger.info("%s checked in %.1f s", folder, time.perf_counter() - started)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("golden_dir", type=Path)
    parser.add_argument("--only", nargs="*", choices=sorted(COMPONENTS), help="check only these")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if not args.golden_dir.is_dir():
        parser.error(f"not a folder: {args.golden_dir}")
    results = run_checks(args.golden_dir, args.only)
    for result in results:
        sys.stdout.write(result.line() + "\n")
    failed = [r for r in results if not r.passed]
    sys.stdout.write(f"{len(results) - len(failed)} passed, {len(failed)} failed\n")
    return 1 if failed or not results else 0


if __name__ == "__main__":
    raise SystemExit(main())
