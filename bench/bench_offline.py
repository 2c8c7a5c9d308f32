"""Benchmark the offline engine on this CPU: recognition and synthesis speed, first-audio latency.

Prints the real-time factor (seconds of compute per second of audio, lower is faster) of
PocketSphinx and eSpeak NG, PocketSphinx's word accuracy on eSpeak NG speech, and the time from
a finished user turn to the first chunk of the answer's audio. Runs in well under 30 s.

    python -m bench.bench_offline
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import numpy as np
import soxr

from agent.engine import USER_SAMPLE_RATE, AudioChunk, UserTurn
from models.offline import OfflineEngine, SpeechRecognizer, SpeechSynthesizer

PROMPTS = (
    "hello",
    "what time is it",
    "my name is john",
    "how are you",
    "what is your name",
    "what can you do",
    "good morning",
    "thank you goodbye",
    "please call my mother",
    "one two three four five",
)
ANSWER = (
    "I can tell you the time and the date. I can remember your name and what you said before. "
    "Everything I do runs offline, on this computer."
)
TYPICAL_QUESTION = "what is your name"


def word_errors(reference: str, hypothesis: str) -> int:
    """Word-level edit distance between two texts."""
    ref, hyp = reference.split(), hypothesis.split()
    row = list(range(len(hyp) + 1))
    for i, ref_word in enumerate(ref, start=1):
        previous, row[0] = row[0], i
        for j, hyp_word in enumerate(hyp, start=1):
            previous, row[j] = (
                row[j],
                min(row[j] + 1, row[j - 1] + 1, previous + (ref_word != hyp_word)),
            )
    return row[-1]


def speak(synthesizer: SpeechSynthesizer, text: str) -> np.ndarray:
    audio = synthesizer.synthesize(text)
    return soxr.resample(audio, synthesizer.sample_rate, USER_SAMPLE_RATE).astype(np.float32)


def bench_recognizer(voice: str) -> tuple[float, float]:
    """(real-time factor, word accuracy) of PocketSphinx on PROMPTS spoken in `voice`."""
    synthesizer, recognizer = SpeechSynthesizer(voice=voice), SpeechRecognizer()
    recognizer.warm_up()
    compute = audio_s = 0.0
    errors = words = 0
    for prompt in PROMPTS:
        speech = speak(synthesizer, prompt)
        start = time.perf_counter()
        heard = recognizer.transcribe(speech)
        compute += time.perf_counter() - start
        audio_s += len(speech) / USER_SAMPLE_RATE
        errors += word_errors(prompt, heard)
        words += len(prompt.split())
    return compute / audio_s, max(0.0, 1.0 - errors / words)


def bench_synthesizer(repeats: int = 5) -> float:
    """Real-time factor of eSpeak NG on a three-sentence answer."""
    synthesizer = SpeechSynthesizer()
    synthesizer.synthesize("warm up")
    compute = audio_s = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        audio = synthesizer.synthesize(ANSWER)
        compute += time.perf_counter() - start
        audio_s += len(audio) / synthesizer.sample_rate
    return compute / audio_s


async def bench_first_audio(turns: int) -> tuple[list[float], dict[str, float]]:
    """Seconds from a spoken question's end to the answer's first audio chunk, per turn."""
    engine = OfflineEngine()
    await engine.start()
    speech = speak(engine.synthesizer, TYPICAL_QUESTION)
    latencies: list[float] = []
    stages: dict[str, list[float]] = {}
    try:
        for _ in range(turns):
            reply = engine.respond(UserTurn(audio=speech), [])
            start = time.perf_counter()
            first = None
            async for event in reply:
                if first is None and isinstance(event, AudioChunk):
                    first = time.perf_counter() - start
            latencies.append(first or float("nan"))
            for name, seconds in reply.timings.stages.items():
                stages.setdefault(name, []).append(seconds)
    finally:
        await engine.close()
    return latencies, {name: statistics.median(values) for name, values in stages.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=5, help="turns timed for first audio")
    args = parser.parse_args()
    if args.turns < 1:
        parser.error("--turns must be positive")

    for voice in ("en-us", "en-us+klatt2"):
        rtf, accuracy = bench_recognizer(voice)
        print(
            f"ASR  PocketSphinx  RTF {rtf:.3f}  word accuracy {accuracy:.2f}  ({len(PROMPTS)} prompts, eSpeak NG voice {voice})"
        )
    print(f"TTS  eSpeak NG     RTF {bench_synthesizer():.4f}")
    latencies, stages = asyncio.run(bench_first_audio(args.turns))
    print(
        f"first audio for '{TYPICAL_QUESTION}' ({len(speak(SpeechSynthesizer(), TYPICAL_QUESTION)) / USER_SAMPLE_RATE:.2f} s of speech): "
        f"median {statistics.median(latencies) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms over {args.turns} turns"
    )
    print("  median per stage: " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in stages.items()))


if __name__ == "__main__":
    main()
