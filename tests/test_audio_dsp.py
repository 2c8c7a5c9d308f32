"""Pure DSP: resampling, framing, VAD and endpointing on arrays and synthetic timelines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from audio_dsp import (
    Endpointer,
    EndpointerConfig,
    EndpointerEvent,
    FrameChunker,
    SpeechEnded,
    SpeechPaused,
    SpeechResumed,
    SpeechStarted,
    StreamResampler,
    VoiceActivityDetector,
    float32_to_int16,
    frame_samples,
    int16_to_float32,
    to_mono_float32,
)
from tests.fakes import espeak_16k

FRAME_S = 0.010


def tone(freq: float, seconds: float, rate: int, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def dominant_freq(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[np.argmax(spectrum)])


# --- resampling -------------------------------------------------------------------------------


@pytest.mark.parametrize(("in_rate", "out_rate"), [(48_000, 16_000), (22_050, 48_000)])
def test_chunked_resampling_equals_one_shot(in_rate: int, out_rate: int) -> None:
    rng = np.random.default_rng(0)
    signal = (0.3 * rng.standard_normal(in_rate)).astype(np.float32)
    one_shot = StreamResampler(in_rate, out_rate)
    expected = np.concatenate([one_shot.process(signal), one_shot.flush()])

    chunked = StreamResampler(in_rate, out_rate)
    cuts = np.cumsum(rng.integers(1, 2000, size=200))
    pieces = [chunked.process(p) for p in np.split(signal, cuts[cuts < len(signal)])]
    got = np.concatenate([*pieces, chunked.flush()])

    assert len(got) == len(expected)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_resampler_is_causal_output_on_a_prefix_is_a_prefix_of_the_full_output() -> None:
    signal = tone(300, 0.5, 48_000)
    full = StreamResampler(48_000, 16_000).process(signal)
    prefix = StreamResampler(48_000, 16_000).process(signal[:7_000])
    assert 0 < len(prefix) <= len(full)
    np.testing.assert_allclose(prefix, full[: len(prefix)], atol=1e-6)


def test_resampled_tone_keeps_its_pitch_and_length() -> None:
    rs = StreamResampler(48_000, 16_000)
    out = np.concatenate([rs.process(tone(440, 1.0, 48_000)), rs.flush()])
    assert abs(len(out) - 16_000) <= 1
    assert abs(dominant_freq(out, 16_000) - 440) < 2


def test_flush_makes_the_resampler_ready_for_a_new_stream() -> None:
    rs = StreamResampler(24_000, 48_000)
    first = np.concatenate([rs.process(tone(300, 0.2, 24_000)), rs.flush()])
    second = np.concatenate([rs.process(tone(300, 0.2, 24_000)), rs.flush()])
    np.testing.assert_allclose(first, second, atol=1e-6)


def test_equal_rates_pass_audio_through() -> None:
    x = tone(100, 0.1, 16_000)
    rs = StreamResampler(16_000, 16_000)
    np.testing.assert_array_equal(rs.process(x), x)
    assert rs.flush().size == 0


def test_packed_stereo_int16_becomes_mono_float() -> None:
    left = np.full(4, 16384, np.int16)
    right = np.full(4, -16384, np.int16)
    packed = np.stack([left, right], axis=1).reshape(1, -1)  # av's packed s16 layout
    np.testing.assert_allclose(to_mono_float32(packed, channels=2), np.zeros(4))
    packed_same = np.stack([left, left], axis=1).reshape(1, -1)
    np.testing.assert_allclose(to_mono_float32(packed_same, channels=2), np.full(4, 0.5))


def test_int16_float_round_trip_and_clipping() -> None:
    pcm = np.array([-32768, -1, 0, 1, 32767], np.int16)
    np.testing.assert_array_equal(float32_to_int16(int16_to_float32(pcm)), pcm)
    np.testing.assert_array_equal(
        float32_to_int16(np.array([-2.0, 2.0], np.float32)), [-32768, 32767]
    )


# --- framing ----------------------------------------------------------------------------------


def test_chunker_emits_exact_frames_and_keeps_the_remainder() -> None:
    chunker = FrameChunker(160)
    data = np.arange(1000, dtype=np.float32)
    frames = chunker.push(data[:250]) + chunker.push(data[250:333]) + chunker.push(data[333:])
    assert [len(f) for f in frames] == [160] * 6
    np.testing.assert_array_equal(np.concatenate(frames), data[:960])
    assert chunker.pending == 40
    (last,) = chunker.flush()
    np.testing.assert_array_equal(last[:40], data[960:])
    assert not last[40:].any()
    assert chunker.pending == 0


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 700), max_size=20), st.sampled_from([160, 320, 960]))
def test_chunker_output_does_not_depend_on_how_input_is_split(sizes: list[int], size: int) -> None:
    data = np.arange(sum(sizes), dtype=np.float32)
    chunker = FrameChunker(size)
    pieces = np.split(data, np.cumsum(sizes)[:-1]) if sizes else []
    frames = [f for p in pieces for f in chunker.push(p)]
    whole = len(data) // size * size
    got = np.concatenate(frames) if frames else np.zeros(0, np.float32)
    np.testing.assert_array_equal(got, data[:whole])
    assert chunker.pending == len(data) - whole


def test_frame_samples_rejects_fractional_frames() -> None:
    assert frame_samples(48_000, 20) == 960
    assert frame_samples(16_000, 10) == 160
    with pytest.raises(ValueError):
        frame_samples(22_050, 10)


# --- VAD --------------------------------------------------------------------------------------


def test_vad_hears_speech_and_not_silence(tmp_path: Path) -> None:
    speech = espeak_16k("hello there, how are you today", tmp_path)
    vad = VoiceActivityDetector(16_000, aggressiveness=2)
    frames = FrameChunker(160).push(speech)
    voiced_share = np.mean([vad.is_speech(f) for f in frames])
    assert voiced_share > 0.5
    assert not vad.is_speech(np.zeros(320, np.float32))


def test_vad_rejects_frames_of_the_wrong_length() -> None:
    with pytest.raises(ValueError):
        VoiceActivityDetector().is_speech(np.zeros(100, np.float32))


# --- endpointing on synthetic timelines -------------------------------------------------------


def run_timeline(
    voiced_spans: list[tuple[float, float]], total_s: float, config: EndpointerConfig
) -> tuple[Endpointer, list[EndpointerEvent]]:
    """Feed frames whose sample value is their index, voiced inside the given spans."""
    ep = Endpointer(config)
    events: list[EndpointerEvent] = []
    for i in range(round(total_s / FRAME_S)):
        t = i * FRAME_S + 1e-9
        voiced = any(a <= t < b for a, b in voiced_spans)
        events += ep.process(np.full(160, i, np.float32), voiced=voiced)
    return ep, events


def test_speech_from_half_a_second_to_two_and_a_half_gives_start_and_end() -> None:
    cfg = EndpointerConfig(hangover_ms=700, pause_ms=0)
    _, events = run_timeline([(0.5, 2.5)], 4.0, cfg)
    start, end = events
    assert isinstance(start, SpeechStarted) and isinstance(end, SpeechEnded)
    assert start.onset_s == pytest.approx(0.5, abs=FRAME_S)
    assert start.detected_s == pytest.approx(0.5 + cfg.start_ms / 1000, abs=FRAME_S)
    assert end.stop_s == pytest.approx(2.5, abs=FRAME_S)
    assert end.detected_s == pytest.approx(2.5 + 0.7, abs=FRAME_S)
    assert end.detected_s - end.stop_s == pytest.approx(0.7, abs=1e-9)
    assert end.reason == "silence"


def test_turn_audio_keeps_the_preroll_and_the_tail() -> None:
    cfg = EndpointerConfig(preroll_ms=300, tail_ms=150)
    _, events = run_timeline([(0.5, 2.5)], 4.0, cfg)
    end = events[-1]
    frame_ids = end.audio[::160]
    assert frame_ids[0] == pytest.approx(20)  # 0.5 s - 300 ms
    assert frame_ids[-1] == pytest.approx(264)  # 2.5 s + 150 ms, last frame
    assert len(end.audio) == (265 - 20) * 160


def test_a_sixty_millisecond_click_does_not_start_a_turn() -> None:
    ep, events = run_timeline([(1.0, 1.06)], 3.0, EndpointerConfig())
    assert events == []
    assert not ep.in_speech


def test_pauses_shorter_than_the_hangover_stay_in_one_turn() -> None:
    cfg = EndpointerConfig(hangover_ms=700, pause_ms=300)
    _, events = run_timeline([(0.5, 1.5), (2.1, 3.0)], 5.0, cfg)
    kinds = [SpeechStarted, SpeechPaused, SpeechResumed, SpeechPaused, SpeechEnded]
    assert [type(e) for e in events] == kinds
    assert events[-1].stop_s == pytest.approx(3.0, abs=FRAME_S)


def test_a_pause_carries_the_turn_as_it_ends_if_the_silence_lasts() -> None:
    cfg = EndpointerConfig(hangover_ms=700, pause_ms=300, preroll_ms=300, tail_ms=150)
    _, events = run_timeline([(0.5, 1.5), (2.1, 3.0)], 5.0, cfg)
    first_pause, resumed, pause, end = events[1:]
    assert isinstance(first_pause, SpeechPaused) and isinstance(end, SpeechEnded)
    assert first_pause.stop_s == pytest.approx(1.5, abs=FRAME_S)
    assert first_pause.detected_s - first_pause.stop_s == pytest.approx(0.3, abs=1e-9)
    assert resumed.detected_s == pytest.approx(2.1 + FRAME_S, abs=1e-9)
    assert not first_pause.ends(end)  # the user went on after it
    assert pause.ends(end)
    assert (pause.onset_s, pause.stop_s) == (end.onset_s, end.stop_s)
    np.testing.assert_array_equal(pause.audio, end.audio)
    assert pause.audio[::160][-1] == pytest.approx(314)  # 3.0 s + 150 ms, last frame


def test_no_pauses_are_reported_when_turned_off_or_not_shorter_than_the_hangover() -> None:
    for cfg in (EndpointerConfig(pause_ms=0), EndpointerConfig(hangover_ms=300, pause_ms=300)):
        _, events = run_timeline([(0.5, 1.5), (2.1, 3.0)], 5.0, cfg)
        assert not any(isinstance(e, SpeechPaused | SpeechResumed) for e in events)


def test_a_turn_cut_at_the_maximum_length_does_not_end_at_an_earlier_pause() -> None:
    cfg = EndpointerConfig(max_turn_s=2.0, pause_ms=300)
    _, events = run_timeline([(0.5, 1.0), (1.4, 6.0)], 6.5, cfg)
    pauses = [e for e in events if isinstance(e, SpeechPaused)]
    end = next(e for e in events if isinstance(e, SpeechEnded))
    assert end.reason == "max_length" and pauses and not pauses[0].ends(end)


def test_a_pause_longer_than_the_hangover_splits_turns() -> None:
    cfg = EndpointerConfig(hangover_ms=600, pause_ms=0)
    _, events = run_timeline([(0.5, 1.5), (2.3, 3.0)], 5.0, cfg)
    assert [type(e) for e in events] == [SpeechStarted, SpeechEnded] * 2
    assert events[1].stop_s == pytest.approx(1.5, abs=FRAME_S)
    assert events[2].onset_s == pytest.approx(2.3, abs=FRAME_S)


def test_a_turn_is_cut_at_the_maximum_length() -> None:
    cfg = EndpointerConfig(max_turn_s=2.0)
    _, events = run_timeline([(0.5, 6.0)], 6.5, cfg)
    ends = [e for e in events if isinstance(e, SpeechEnded)]
    assert ends[0].reason == "max_length"
    assert ends[0].stop_s - ends[0].onset_s == pytest.approx(2.0, abs=FRAME_S)
    assert len(ends) >= 2  # talking on starts a new turn


def test_voiced_ms_grows_during_speech_for_barge_in_checks() -> None:
    ep, _ = run_timeline([(0.0, 0.5)], 0.5, EndpointerConfig())
    assert ep.in_speech
    assert ep.voiced_ms == pytest.approx(500, abs=10)


def test_endpointer_with_the_real_vad_finds_espeak_speech(tmp_path: Path) -> None:
    speech = espeak_16k("please tell me the weather", tmp_path)
    pad = np.zeros(8000, np.float32)
    signal = np.concatenate([pad, speech, pad, pad, pad])
    ep = Endpointer(EndpointerConfig(hangover_ms=700, pause_ms=0))
    events = [e for f in FrameChunker(160).push(signal) for e in ep.process(f)]
    assert [type(e) for e in events] == [SpeechStarted, SpeechEnded]
    assert events[0].onset_s == pytest.approx(0.5, abs=0.15)
    assert events[1].stop_s == pytest.approx(0.5 + len(speech) / 16_000, abs=0.25)


def test_config_rejects_inconsistent_thresholds() -> None:
    with pytest.raises(ValueError):
        EndpointerConfig(start_ms=300, start_window_ms=200)
    with pytest.raises(ValueError):
        EndpointerConfig(frame_ms=7)
    with pytest.raises(ValueError, match="tail_ms"):
        EndpointerConfig(pause_ms=100, tail_ms=150)
