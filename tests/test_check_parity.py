"""`python -m models.check_parity` against the reference fixtures, and `python -m models.make_tiny`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.check_parity import run_checks
from models.glm4voice.paths import ModelPaths
from tests.conftest import REPO_ROOT


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_check_parity_passes_every_component_of_the_reference_fixtures(golden_dir: Path):
    done = _run("models.check_parity", str(golden_dir))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    components = {line.split()[1] for line in lines if line.startswith(("PASS", "FAIL"))}
    assert components == {"speech_tokenizer", "lm", "flow", "hift", "token2wav"}
    assert lines[-1].endswith(" 0 failed")


def test_check_parity_fails_when_a_recorded_output_differs(golden_dir: Path, tmp_path: Path):
    """A copy of the flow fixtures with one expected output nudged beyond tolerance must fail."""
    shutil.copytree(golden_dir / "flow", tmp_path / "flow")
    target = tmp_path / "flow" / "caseA_mel.npy"
    mel = np.load(target)
    mel[0, 0, 0] += 0.01
    np.save(target, mel)
    results = run_checks(tmp_path)
    failed = [r.output for r in results if not r.passed]
    assert failed and all("caseA" in name for name in failed)
    done = _run("models.check_parity", str(tmp_path), "--only", "flow")
    assert done.returncode == 1 and "FAIL" in done.stdout


def test_check_parity_with_no_component_folders_exits_nonzero(tmp_path: Path):
    done = _run("models.check_parity", str(tmp_path))
    assert done.returncode == 1
    assert done.stdout.strip().endswith("0 passed, 0 failed")


def test_make_tiny_writes_the_three_official_repository_layouts(tmp_path: Path):
    done = _run("models.make_tiny", str(tmp_path / "set"))
    assert done.returncode == 0, done.stderr[-3000:]
    paths = ModelPaths.from_model_dir(tmp_path / "set")
    assert paths.missing_files() == []
    shards = sorted(p.name for p in paths.lm.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2
    assert {p.name for p in paths.decoder.iterdir()} >= {"config.yaml", "flow.pt", "hift.pt"}
    # A file taken away is reported by name.
    (paths.decoder / "hift.pt").unlink()
    assert paths.missing_files() == [str(paths.decoder / "hift.pt")]
