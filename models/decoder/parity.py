"""Parity of `AudioDecoder` against the reference fixtures in `<golden>/token2wav_stream/`.

Scenarios: "demo" (web demo schedule: blocks of 25, 50, 100 and a final 15 tokens), "stream10"
(`stream_inference`, 10-token blocks) and "offline" (one final call on 190 tokens).

Two runs per scenario:
* recorded flow: the flow's output per block is replayed from `*_flow_mel.npy`, which
  isolates the decoder's own logic (noise draw, cross-fade, caches, trimming, prompt feedback)
  and the vocoder from the flow's rounding;
* real flow: `FlowDecoder` from `<golden>/flow/` produces the mels itself (end to end).

Tolerances (fixture README): mels 1e-4; HiFT on a block with the recorded source injected 1e-4;
speech with the decoder's own source 5e-3 (the sine phase integrates f0 rounding, see
`models.hift.parity`); f0 2e-3 Hz; the flow noise must be drawn exactly.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from models.decoder.audio_decoder import (
    DEMO_BLOCK_SIZES,
    SOURCE_CACHE_SAMPLES,
    STREAM_BLOCK_SIZE,
    AudioDecoder,
    DecoderStream,
    ReferenceStreamer,
)
from models.flow import FlowDecoder, mel_frames_for_tokens
from models.hift import HiFTGenerator
from models.parity import ParityResult, compare, load_npy

COMPONENT = "token2wav"
TOL_MEL = 1e-4
TOL_SPEECH_INJECTED = 1e-4
TOL_SPEECH = 5e-3
TOL_F0 = 2e-3
TOL_NOISE = 0.0
SCENARIOS = ("demo", "stream10", "offline")


class RecordedFlow:
    """Stands in for the flow model: returns recorded mels in call order and keeps the
    inputs it was given, so the decoder's own noise draw and prompt feedback can be checked."""

    def __init__(self, mels: list[Tensor], frame_rate: float = 12.5) -> None:
        self._mels = list(mels)
        self.frame_rate = frame_rate
        self.calls: list[dict[str, Tensor]] = []

    def mel_frames(self, n_tokens: int) -> int:
        return mel_frames_for_tokens(n_tokens, self.frame_rate)

    def inference(
        self,
        token: Tensor,
        prompt_token: Tensor,
        prompt_feat: Tensor,
        embedding: Tensor,
        noise: Tensor | None = None,
        n_timesteps: int = 10,
    ) -> Tensor:
        self.calls.append(
            {
                "token": token,
                "prompt_token": prompt_token,
                "prompt_feat": prompt_feat,
                "noise": noise,
            }
        )
        return self._mels[len(self.calls) - 1].clone()


class _Fixtures:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.info = json.loads((folder / "run_info.json").read_text())

    def tensor(self, name: str) -> Tensor:
        return torch.from_numpy(load_npy(self.folder, name))

    def n_blocks(self, scenario: str) -> int:
        return len(self.info[scenario]["blocks"])

    def tokens(self, scenario: str) -> Tensor:
        tokens = self.tensor("tokens")[None, :]
        return tokens[:, : self.info["stream10"]["n_tokens"]] if scenario == "stream10" else tokens


def _run_scenario(
    decoder: AudioDecoder, scenario: str, tokens: Tensor
) -> tuple[list[Tensor], DecoderStream]:
    """Decode like the reference caller of `scenario`; returns the chunks and the stream
    (whose `mels` are the per-block returned mels)."""
    if scenario == "stream10":
        stream = DecoderStream()
        return list(decoder.iter_blocks(tokens, (STREAM_BLOCK_SIZE,), stream)), stream
    streamer = ReferenceStreamer(decoder, DEMO_BLOCK_SIZES)
    chunks = [c for t in tokens[0].tolist() if (c := streamer.push(t)) is not None]
    final = streamer.finish()
    return chunks + ([final] if final is not None else []), streamer.stream


def _check_blocks_recorded(
    fx: _Fixtures, hift: HiFTGenerator, scenario: str, add: Callable
) -> None:
    """Decoder logic with the flow replayed: what it hands the flow (tokens, noise, prompt
    mel) and what it returns (mel, speech) per block. A block-count mismatch is reported
    once and the common blocks are still compared."""
    n = fx.n_blocks(scenario)
    flow = RecordedFlow([fx.tensor(f"{scenario}_b{i}_flow_mel") for i in range(n)])
    chunks, stream = _run_scenario(AudioDecoder(flow, hift), scenario, fx.tokens(scenario))
    add(f"{scenario}/n_blocks", np.array(len(chunks)), np.array(n), 0.0)
    for i, (chunk, call, mel) in enumerate(zip(chunks, flow.calls, stream.mels, strict=False)):
        p = f"{scenario}_b{i}_"
        add(f"{scenario}/b{i}/tts_mel", mel, fx.tensor(p + "tts_mel"), TOL_MEL)
        add(f"{scenario}/b{i}/token", call["token"], fx.tensor(p + "token"), 0.0)
        add(f"{scenario}/b{i}/flow_noise", call["noise"], fx.tensor(p + "flow_noise"), TOL_NOISE)
        add(
            f"{scenario}/b{i}/prompt_feat",
            call["prompt_feat"],
            fx.tensor(p + "prompt_feat"),
            TOL_MEL,
        )
        speech = fx.tensor(p + "tts_speech")
        add(f"{scenario}/b{i}/tts_speech (recorded flow)", chunk, speech, TOL_SPEECH)


def _check_blocks_vocoder(fx: _Fixtures, hift: HiFTGenerator, scenario: str, add: Callable) -> None:
    """HiFT on each block's recorded input with the recorded source -> the emitted speech."""
    blocks = fx.info[scenario]["blocks"]
    for i, block in enumerate(blocks):
        p = f"{scenario}_b{i}_"
        mel, cache = fx.tensor(p + "hift_mel_in"), fx.tensor(p + "hift_cache_source")
        add(f"{scenario}/b{i}/hift_f0", hift.predict_f0(mel), fx.tensor(p + "hift_f0"), TOL_F0)
        har = fx.tensor(p + "hift_har_source").transpose(1, 2)
        speech = hift.trace(mel, cache, har_source=har).speech
        if not block["finalize"]:
            speech = speech[:, :-SOURCE_CACHE_SAMPLES]
        add(
            f"{scenario}/b{i}/tts_speech (recorded source)",
            speech,
            fx.tensor(p + "tts_speech"),
            TOL_SPEECH_INJECTED,
        )


def _check_blocks_flow(fx: _Fixtures, decoder: AudioDecoder, scenario: str, add: Callable) -> None:
    """End to end with the real flow: per-block mel and speech."""
    chunks, stream = _run_scenario(decoder, scenario, fx.tokens(scenario))
    for i, (chunk, mel) in enumerate(zip(chunks, stream.mels, strict=True)):
        p = f"{scenario}_b{i}_"
        add(f"{scenario}/b{i}/tts_mel (flow)", mel, fx.tensor(p + "tts_mel"), TOL_MEL)
        add(f"{scenario}/b{i}/tts_speech (flow)", chunk, fx.tensor(p + "tts_speech"), TOL_SPEECH)


def _check_offline_recorded(fx: _Fixtures, hift: HiFTGenerator, add: Callable) -> None:
    recorded = AudioDecoder(RecordedFlow([fx.tensor("offline_flow_mel")]), hift)
    speech = recorded.offline(fx.tokens("offline"))
    add("offline/speech (recorded flow)", speech, fx.tensor("offline_speech"), TOL_SPEECH)
    f0 = hift.predict_f0(fx.tensor("offline_flow_mel"))
    add("offline/hift_f0", f0, fx.tensor("offline_hift_f0"), TOL_F0)


def _check_offline_flow(fx: _Fixtures, decoder: AudioDecoder, add: Callable) -> None:
    tokens = fx.tokens("offline")
    empty_prompt = (torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, 80))
    mel, generator = decoder.generate_mel(tokens, *empty_prompt, torch.zeros(1, 192))
    add("offline/flow_mel (flow)", mel, fx.tensor("offline_flow_mel"), TOL_MEL)
    speech, source = decoder.hift.inference(mel, None, generator=generator)
    add("offline/hift_source (flow)", source, fx.tensor("offline_hift_source"), TOL_SPEECH)
    add("offline/speech (flow)", speech, fx.tensor("offline_speech"), TOL_SPEECH)


def check(
    golden_dir: Path,
    scenarios: tuple[str, ...] = SCENARIOS,
    flow_scenarios: tuple[str, ...] = SCENARIOS,
) -> list[ParityResult]:
    """Compare the recorded token2wav blocks and the offline call; `golden_dir` is the root.

    scenarios: checked with the flow replayed from the fixtures (fast);
    flow_scenarios: checked end to end with the real flow model (the demo's long blocks take
    about a minute on two CPU cores)."""
    golden_dir = Path(golden_dir)
    fx = _Fixtures(golden_dir / "token2wav_stream")
    hift = HiFTGenerator.from_pretrained(golden_dir / "hift")
    results: list[ParityResult] = []

    def add(
        output: str, got: Tensor | np.ndarray, expected: Tensor | np.ndarray, tol: float
    ) -> None:
        results.append(compare(COMPONENT, output, np.asarray(got), np.asarray(expected), tol))

    for scenario in scenarios:
        if scenario == "offline":
            _check_offline_recorded(fx, hift, add)
        else:
            _check_blocks_recorded(fx, hift, scenario, add)
            _check_blocks_vocoder(fx, hift, scenario, add)
    if flow_scenarios:
        decoder = AudioDecoder(FlowDecoder.from_pretrained(golden_dir / "flow"), hift)
        for scenario in flow_scenarios:
            if scenario == "offline":
                _check_offline_flow(fx, decoder, add)
            else:
                _check_blocks_flow(fx, decoder, scenario, add)
    return results
