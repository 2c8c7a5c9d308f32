"""Echo cancellers on simulated rooms: echo removed, near talker kept, VAD behaviour, CPU.

    python -m bench.bench_aec                  # every installed backend, ~30 s on one core
    python -m bench.bench_aec --seconds 20     # longer scenes

Far end: eSpeak NG speech (synthetic speech-like audio without espeak-ng) through each echo
path of `tests/echo_sim.py`; a second, higher voice talks over it from 7 s for ~3 s.

- ERLE: echo energy in the microphone over what is left after cancelling, on echo-only frames
  after `--converge` seconds (frames whose echo is within 30 dB of the loudest); "first": the
  same over the first `--converge` seconds, while the canceller adapts (a call's first reply).
- near level: least-squares gain of the near talker in the output during double talk
  (0 dB = untouched); corr: correlation of output and near talker there.
- VAD echo / VAD near: how often webrtcvad (mode 3) calls a 10 ms frame speech on echo-only
  frames (false speech: the agent hearing itself) and on double-talk frames (the caller).
- CPU: process time per second of audio, in % of one core.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from audio_dsp.aec import (
    EchoCanceller,
    EchoCancellerUnavailable,
    NullCanceller,
    SpeexCanceller,
    WebRtcAec3Canceller,
)
from audio_dsp.vad import VoiceActivityDetector
from tests import echo_sim

logger = logging.getLogger("bench_aec")

NEAR_START_S = 7.0
FAR_TEXT = (
    "The quick brown fox jumps over the lazy dog. We are measuring echo cancellation on a "
    "simulated room today. Numbers one two three four five six seven eight nine ten, and a "
    "few more words to keep the far end talking for a while."
)
NEAR_TEXT = "Hello there, can you hear me talking over you right now? Please stop for a moment."

BACKENDS: dict[str, Callable[[], EchoCanceller]] = {
    "none": NullCanceller,
    "speex (linear)": lambda: SpeexCanceller(residual_suppression=False),
    "speex + residual suppressor": SpeexCanceller,
    "aec3": WebRtcAec3Canceller,
    "aec3 + noise suppression": lambda: WebRtcAec3Canceller(noise_suppression=True),
}


@dataclass
class Result:
    early_erle_db: float
    early_vad_echo: float
    erle_db: float
    near_level_db: float
    near_corr: float
    vad_echo: float
    vad_near: float
    cpu_s: float


def paths() -> list[echo_sim.EchoPath]:
    gains = (0.25, 0.5, 1.0)  # echo -12, -6, 0 dB relative to the far end
    room = [echo_sim.room_path(g) for g in gains]
    delay = [echo_sim.delay_path(g) for g in gains]
    loud = [echo_sim.EchoPath(delay_ms=20.0, gain=g, reverb_ms=60.0, drive=2.0) for g in gains]
    return room + delay + loud


def short_label(path: echo_sim.EchoPath) -> str:
    kind = "delay 150" if not path.reverb_ms else "room 60"
    if path.drive:
        kind += " distorted"
    return f"{kind}, {20 * np.log10(path.gain):+.0f} dB"


def vad_rate(vad: VoiceActivityDetector, x: np.ndarray, mask: np.ndarray) -> float:
    """Share of the frames in `mask` that the VAD calls speech."""
    frames = echo_sim.frames(np.clip(x, -1.0, 1.0))[mask]
    return float(np.mean([vad.is_speech(f) for f in frames])) if len(frames) else float("nan")


def measure(
    make: Callable[[], EchoCanceller], scene: echo_sim.EchoScene, converge_s: float
) -> Result:
    canceller = make()
    start = time.process_time()
    latency = int(canceller.latency_ms * echo_sim.SAMPLE_RATE / 1000)
    out = echo_sim.run_canceller(canceller.process, scene, latency)
    cpu = time.process_time() - start
    canceller.close()
    echo_only = scene.echo_frames(after_s=converge_s)
    early = scene.echo_frames() & (echo_sim.frame_times(scene.n_frames) < converge_s)
    double_talk = scene.double_talk_frames(after_s=converge_s)
    vad = VoiceActivityDetector(echo_sim.SAMPLE_RATE, aggressiveness=3)
    return Result(
        early_erle_db=echo_sim.erle_db(scene.mic, out, early),
        early_vad_echo=vad_rate(vad, out, early),
        erle_db=echo_sim.erle_db(scene.mic, out, echo_only),
        near_level_db=echo_sim.near_level_db(out, scene.near, double_talk),
        near_corr=echo_sim.near_correlation(out, scene.near, double_talk),
        vad_echo=vad_rate(vad, out, echo_only),
        vad_near=vad_rate(vad, out, double_talk),
        cpu_s=cpu,
    )


def build_scenes(seconds: float) -> list[tuple[echo_sim.EchoPath, echo_sim.EchoScene]]:
    n = int(seconds * echo_sim.SAMPLE_RATE)
    far = echo_sim.fit_length(echo_sim.speech(FAR_TEXT), n)
    near = echo_sim.speech(NEAR_TEXT, voice="en-us+f3", pitch=75)
    source = "eSpeak NG" if echo_sim.espeak_speech("a") is not None else "synthetic speech"
    print(f"far/near talkers: {source}; {seconds:.0f} s scenes, near talker from {NEAR_START_S} s")
    return [(p, echo_sim.simulate(far, p, near, NEAR_START_S, noise_dbfs=-70)) for p in paths()]


def print_erle_table(results: dict[str, list[Result]], labels: list[str]) -> None:
    print("\nERLE after convergence, dB (echo paths: gain = echo level vs far end)")
    print(f"| canceller | {' | '.join(labels)} |")
    print(f"|---|{'---|' * len(labels)}")
    for name, rows in results.items():
        print(f"| {name} | {' | '.join(f'{r.erle_db:.1f}' for r in rows)} |")


def print_summary_table(
    results: dict[str, list[Result]], audio_s: float, converge_s: float
) -> None:
    print(f"\nMean over all echo paths; 'first' = the first {converge_s:g} s, while adapting")
    print(
        "| canceller | ERLE first | VAD echo first | ERLE | near level dB | near corr "
        "| VAD echo | VAD near | CPU % of a core |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, rows in results.items():
        m = {f: float(np.mean([getattr(r, f) for r in rows])) for f in Result.__dataclass_fields__}
        print(
            f"| {name} | {m['early_erle_db']:.1f} | {m['early_vad_echo']:.0%} | {m['erle_db']:.1f} "
            f"| {m['near_level_db']:+.1f} | {m['near_corr']:.2f} | {m['vad_echo']:.0%} "
            f"| {m['vad_near']:.0%} | {100 * m['cpu_s'] / audio_s:.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=12.0, help="length of each scene")
    parser.add_argument("--converge", type=float, default=3.0, help="seconds before measuring")
    args = parser.parse_args()
    if args.seconds <= NEAR_START_S:  # no double talk to measure the near talker on
        parser.error(f"--seconds must exceed {NEAR_START_S:g} (the near talker's start)")
    if not 0 <= args.converge < args.seconds:
        parser.error("--converge must be at least 0 and under --seconds")
    logging.basicConfig(level=logging.WARNING)
    scenes = build_scenes(args.seconds)
    results: dict[str, list[Result]] = {}
    for name, make in BACKENDS.items():
        try:
            make().close()
        except EchoCancellerUnavailable as exc:
            print(f"skipping {name}: {exc}")
            continue
        results[name] = [measure(make, scene, args.converge) for _, scene in scenes]
    labels = [short_label(p) for p, _ in scenes]
    print_erle_table(results, labels)
    print_summary_table(results, args.seconds, args.converge)


if __name__ == "__main__":
    main()
