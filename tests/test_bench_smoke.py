"""Every benchmark in `bench/` runs end to end at its smallest size and prints its figures.

Each test checks that the figures the benchmark's docstring promises are printed and finite,
never how fast anything ran: timings on a shared machine are noise.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO_ROOT

NUMBER = r"([-+]?(?:\d+\.?\d*|nan|inf))"


def figures(pattern: str, text: str) -> list[float]:
    """Every number the regex `pattern` captures in `text` (NUMBER stands for one); fails where
    the pattern is missing or a figure is not finite."""
    found = re.findall(pattern.replace("NUMBER", NUMBER), text)
    assert found, f"no {pattern!r} in:\n{text}"
    values = [float(v) for match in found for v in (match if isinstance(match, tuple) else [match])]
    assert all(math.isfinite(v) for v in values), f"{pattern!r}: {values}"
    return values


@pytest.fixture(autouse=True)
def torch_state() -> Iterator[None]:
    """The benchmarks set one torch thread and turn gradients off for the whole process."""
    threads, grad = torch.get_num_threads(), torch.is_grad_enabled()
    yield
    torch.set_num_threads(threads)
    torch.set_grad_enabled(grad)


def run_main(monkeypatch: pytest.MonkeyPatch, module: str, *argv: str) -> None:
    """A benchmark's `main()` that reads `sys.argv`."""
    import importlib

    monkeypatch.setattr(sys, "argv", [module, *argv])
    importlib.import_module(f"bench.{module}").main()


# ----------------------------------------------------------------------------- LM


def test_lm_benchmark_prints_every_table(tmp_path: Path, capsys) -> None:
    from bench import bench_lm

    out = tmp_path / "lm.json"
    argv = ["--modes", "bf16", "--prompt", "8", "--steps", "2", "--batches", "1,2"]
    argv += ["--decode-steps", "dynamic,static", "--profile", "static", "--json", str(out)]
    assert bench_lm.main(argv) == 0
    text = capsys.readouterr().out
    prefill, decode, _, _ = figures(r"tiny\s+cpu\s+bf16\s+NUMBER\s+NUMBER\s+NUMBER\s+NUMBER", text)
    assert prefill > 0 and decode > 0
    steps = figures(r"tiny\s+(?:dynamic|static)\s+[12]\s+NUMBER\s+NUMBER\s+NUMBER", text)
    assert len(steps) == 4 * 3
    assert (
        len(figures(r"prefill of .* together\s+NUMBER ms.*by one\s+NUMBER ms \(NUMBERx", text))
        == 12
    )
    assert (
        len(figures(r"next turn after .* prefill\s+NUMBER ms.*\s+NUMBER ms from .*\(NUMBERx", text))
        == 9
    )
    figures(r"per step, top-level operators busy NUMBER ms \(NUMBER per step\)", text)
    payload = json.loads(out.read_text())
    assert [len(payload[k]) for k in ("lm", "decode_steps", "profiles")] == [1, 4, 1]


@pytest.mark.parametrize("profile", ["graphs", "compile", "graphs-unfused"])
def test_lm_benchmark_refuses_a_cuda_only_profile_on_the_cpu(profile: str) -> None:
    from bench import bench_lm

    with pytest.raises(SystemExit) as exc:
        bench_lm.main(["--modes", "", "--decode-steps", "", "--profile", profile])
    assert exc.value.code == 2


# ----------------------------------------------------------------------------- engine


@pytest.mark.slow
def test_engine_benchmark_prints_stages_concurrency_and_decoder_costs(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bench import bench_glm4voice

    monkeypatch.setattr(bench_glm4voice, "CONCURRENCY", (1, 2))
    monkeypatch.setattr(bench_glm4voice, "STAGGERED_CONVERSATIONS", 2)
    monkeypatch.setattr(bench_glm4voice, "DECODER_STREAMS", (1, 2))
    out = tmp_path / "engine.json"
    argv = ["--sections", "stages,concurrency,decoder", "--turn-s", "1", "--answer-ids", "39"]
    argv += ["--decoder-tokens", "25", "--repeats", "1", "--json", str(out)]
    assert bench_glm4voice.main(argv) == 0
    text = capsys.readouterr().out
    for stage in (
        "speech tokenizer, whole turn",
        "speech tokenizer, end of a streamed turn",
        "LM prefill",
        "LM tokens until the first decodable block",
        "first decoder block",
        r"first audio \(worker: turn taken -> first chunk\)",
    ):
        (ms,) = figures(stage + r"\s+NUMBER ms", text)
        assert ms >= 0
    rows = figures(r"\n\s+([12])\s+NUMBER\s+NUMBER\s+NUMBER /\s+NUMBER\s+NUMBER /\s+NUMBER", text)
    assert len(rows) == 3 * 2 * 7  # three settings, two levels, seven columns
    ratios = figures(r"\n\s+([12])\s+NUMBER\s+NUMBER\s+NUMBER\s+NUMBER(?=\n)", text)
    assert len(ratios) == 2 * 2 * 5
    figures(r"(?:wait|never wait)\s+NUMBER\s+NUMBER\s+NUMBER\s+NUMBER", text)
    assert len(figures(r"ms per block\s+NUMBER\s+NUMBER", text)) == 4  # two decoders
    figures(r"real-time factor\s+NUMBER\s+NUMBER", text)
    assert len(figures(r"\n\s+[12]\s+NUMBER\s+NUMBER\s+NUMBERx", text)) == 6
    report = json.loads(out.read_text())
    assert len(report["concurrency"]) == 6 and set(report["staggered"]) == {"wait", "never wait"}


@pytest.mark.slow
def test_engine_benchmark_prints_the_warm_up_and_first_turns(capsys) -> None:
    from bench import bench_glm4voice

    argv = ["--sections", "warm-up", "--turn-s", "1", "--answer-ids", "39", "--repeats", "1"]
    assert bench_glm4voice.main(argv) == 0
    text = capsys.readouterr().out
    (total,) = figures(r"start-up warm-up: NUMBER ms", text)
    assert total > 0
    for stage in bench_glm4voice.FIRST_TURN_STAGES:
        figures(stage + r"\s+NUMBER ms\s+NUMBER ms\s+NUMBERx", text)


def test_engine_benchmark_refuses_bad_options() -> None:
    from bench import bench_glm4voice

    for argv in (["--sections", "nope"], ["--decoder-tokens", "0"], ["--repeats", "0"]):
        with pytest.raises(SystemExit):
            bench_glm4voice.parse_args(argv)


# ----------------------------------------------------------------------------- models


def test_decoder_benchmark_prints_block_costs_memory_and_distances(
    monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="bench_decoder")
    run_main(monkeypatch, "bench_decoder", "--tokens", "20", "--repeats", "1", "--device", "cpu")
    text = "\n".join(r.getMessage() for r in caplog.records if r.name == "bench_decoder")
    rtf = figures(r"RTF NUMBER\s+first chunk NUMBER s\s+chunks NUMBER\s+audio NUMBER s", text)
    assert len(rtf) == 3 * 4 and all(v > 0 for v in rtf)
    assert len(figures(r"block of\s+NUMBER -> NUMBER s", text)) >= 2 * 5
    figures(r"final flush -> NUMBER s", text)  # 20 tokens: the fast decoder's flush
    assert len(figures(r"peak RSS growth NUMBER MB", text)) == 3
    figures(r"offline vs other noise\s+overall NUMBER", text)
    assert len(figures(r"overall NUMBER\s+at joins NUMBER", text)) == 2 * 2
    assert "no joins (one block)" in text  # the demo schedule's first block holds 20 tokens


def test_flow_benchmark_prints_each_part_and_the_cfg_ratio(
    monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    run_main(monkeypatch, "bench_flow", "--tokens", "25", "--repeats", "1")
    text = capsys.readouterr().out
    values = figures(
        r"inference\s+NUMBER ms \(RTF NUMBER\) \| encoder\s+NUMBER ms \| CFG step batched\s+"
        r"NUMBER ms, two calls\s+NUMBER ms \(NUMBERx\)",
        text,
    )
    assert all(v > 0 for v in values)


def test_tokenizer_benchmark_prints_one_shot_stream_and_finish(
    monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    run_main(monkeypatch, "bench_tokenizer", "--seconds", "2", "--repeats", "1")
    text = capsys.readouterr().out
    for part in ("tokenize", "stream pushes"):
        figures(part + r"\s+NUMBER ms\s+RTF NUMBER", text)
    figures(r"stream finish\s+NUMBER ms\s+\(NUMBER block", text)


# ----------------------------------------------------------------------------- audio and calls


def test_echo_canceller_benchmark_prints_both_tables(
    monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    run_main(monkeypatch, "bench_aec", "--seconds", "8", "--converge", "2")
    text = capsys.readouterr().out
    summary = text.split("Mean over all echo paths")[1]
    rows = figures(
        r"\| [^|\n]+ \| NUMBER \| NUMBER% \| NUMBER \| NUMBER \| NUMBER \| NUMBER% \| NUMBER% "
        r"\| NUMBER \|",
        summary,
    )
    assert len(rows) % 8 == 0 and rows
    assert "| aec3 |" in text or "skipping aec3" in text


def test_echo_canceller_benchmark_refuses_scenes_without_double_talk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for argv in (["--seconds", "5"], ["--seconds", "8", "--converge", "8"]):
        with pytest.raises(SystemExit):
            run_main(monkeypatch, "bench_aec", *argv)


def test_barge_in_benchmark_prints_echo_and_double_talk_tables(
    monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    run_main(
        monkeypatch,
        "bench_bargein",
        "--trials",
        "1",
        "--double-talk-trials",
        "1",
        "--webrtc-trials",
        "0",
    )
    text = capsys.readouterr().out
    assert figures(r"\| (?:auto|none) \| NUMBER \| NUMBER \| NUMBER \| NUMBER \|", text)
    rows = re.findall(r"\| (?:aec3, random room|clean \(no echo\)) \| (\d+)/(\d+) \|", text)
    assert [n for _, n in rows] == ["1", "1"]


@pytest.mark.slow
def test_barge_in_benchmark_prints_the_webrtc_table(
    monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    run_main(
        monkeypatch,
        "bench_bargein",
        "--trials",
        "0",
        "--double-talk-trials",
        "0",
        "--webrtc-trials",
        "1",
    )
    text = capsys.readouterr().out
    (trials, stopped) = figures(r"\n\| NUMBER \| NUMBER \|", text)
    assert trials == 1 and 0 <= stopped <= 1


@pytest.mark.slow
def test_offline_engine_benchmark_prints_rates_and_first_audio(
    monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    run_main(monkeypatch, "bench_offline", "--turns", "1")
    text = capsys.readouterr().out
    assert len(figures(r"ASR  PocketSphinx  RTF NUMBER  word accuracy NUMBER", text)) == 4
    figures(r"TTS  eSpeak NG     RTF NUMBER", text)
    figures(r"\(NUMBER s of speech\): median NUMBER ms, max NUMBER ms", text)
    figures(r"first_audio NUMBER ms", text)


@pytest.mark.slow
def test_latency_benchmark_compares_early_replies_over_a_call(capsys) -> None:
    from bench import bench_latency

    bench_latency.main(["--turns", "1"])
    text = capsys.readouterr().out
    assert len(figures(r"median first audio: server NUMBER ms, client NUMBER ms", text)) == 4
    figures(r"early replies: median first audio xNUMBER at the server, xNUMBER at the", text)


@pytest.mark.slow
def test_concurrency_benchmark_measures_a_level(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(REPO_ROOT)  # the server child runs `python -m bench.bench_concurrency`
    from bench import bench_concurrency

    assert bench_concurrency.main(["--levels", "1", "--window", "1"]) == 0
    text = capsys.readouterr().out
    row = figures(r"\n\s+1\s+NUMBER\s+NUMBER\s+NUMBER%\s+NUMBER\s+NUMBER\s+NUMBER\s+NUMBER%", text)
    assert row[0] == 1 and row[1] > 0
    figures(r"held without underruns: NUMBER concurrent", text)
