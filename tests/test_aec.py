"""Echo cancellation: backends on a simulated room, far-end alignment, frame checks, factory.

ERLE bounds are conservative against what `bench/bench_aec.py` measures on the same scenes
(AEC3 ~40 dB, speex with residual suppression ~30 dB, linear speex ~15-25 dB after 3 s).
"""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import audio_dsp.aec as aec
from audio_dsp.aec import (
    FRAME_SIZE,
    AlignedEchoCanceller,
    EchoCanceller,
    EchoCancellerUnavailable,
    FarEndBuffer,
    NullCanceller,
    SpeexCanceller,
    WebRtcAec3Canceller,
    available_backends,
    create_canceller,
)
from tests import echo_sim

SCENE_S = 8.0
CONVERGED_S = 3.0  # measure ERLE only after this much far-end speech
NEAR_START_S = 5.0

needs_aec3 = pytest.mark.skipif(
    "aec3" not in available_backends(), reason="pywebrtc-audio is not installed"
)
needs_speex = pytest.mark.skipif(
    "speex" not in available_backends(), reason="libspeexdsp.so.1 is not installed"
)

# (factory, least ERLE after convergence in dB, least near-talker correlation in double talk)
BACKENDS = {
    "aec3": pytest.param(WebRtcAec3Canceller, 20.0, 0.6, marks=needs_aec3, id="aec3"),
    "speex+res": pytest.param(SpeexCanceller, 15.0, 0.9, marks=needs_speex, id="speex+res"),
    "speex": pytest.param(
        lambda: SpeexCanceller(residual_suppression=False), 6.0, 0.9, marks=needs_speex, id="speex"
    ),
}
PATHS = [
    pytest.param(echo_sim.room_path(), id="room-60ms"),
    pytest.param(echo_sim.delay_path(), id="delay-150ms"),
]


@pytest.fixture(scope="module")
def far_speech() -> np.ndarray:
    """SCENE_S seconds of far-end speech (what the agent says)."""
    text = (
        "The quick brown fox jumps over the lazy dog. We are testing echo cancellation "
        "in a simulated room, with a few sentences of speech from the agent."
    )
    return echo_sim.fit_length(echo_sim.speech(text), int(SCENE_S * echo_sim.SAMPLE_RATE))


@pytest.fixture(scope="module")
def near_speech() -> np.ndarray:
    """A second, higher-pitched talker: the caller speaking over the agent."""
    return echo_sim.speech("Hello there, can you hear me talking?", voice="en-us+f3", pitch=75)


def run(canceller: EchoCanceller, scene: echo_sim.EchoScene) -> np.ndarray:
    latency = int(canceller.latency_ms * echo_sim.SAMPLE_RATE / 1000)
    return echo_sim.run_canceller(canceller.process, scene, latency)


# --- the backends on a simulated room ---------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("make", "min_erle_db", "_corr"), list(BACKENDS.values()))
def test_backend_removes_echo_after_convergence(
    make, min_erle_db: float, _corr: float, path: echo_sim.EchoPath, far_speech: np.ndarray
) -> None:
    scene = echo_sim.simulate(far_speech, path)
    out = run(make(), scene)
    erle = echo_sim.erle_db(scene.mic, out, scene.echo_frames(after_s=CONVERGED_S))
    assert erle > min_erle_db


@pytest.mark.parametrize(("make", "_erle", "min_corr"), list(BACKENDS.values()))
def test_backend_keeps_the_near_talker_in_double_talk(
    make, _erle: float, min_corr: float, far_speech: np.ndarray, near_speech: np.ndarray
) -> None:
    scene = echo_sim.simulate(
        far_speech, echo_sim.room_path(), near_speech, near_start_s=NEAR_START_S
    )
    out = run(make(), scene)
    double_talk = scene.double_talk_frames(after_s=CONVERGED_S)
    assert double_talk.sum() > 50  # the scene really overlaps the two talkers
    assert echo_sim.near_correlation(out, scene.near, double_talk) > min_corr
    assert echo_sim.near_level_db(out, scene.near, double_talk) > -12.0


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(WebRtcAec3Canceller, marks=needs_aec3, id="aec3"),
        pytest.param(
            lambda: WebRtcAec3Canceller(noise_suppression=True), marks=needs_aec3, id="aec3+ns"
        ),
        pytest.param(SpeexCanceller, marks=needs_speex, id="speex+res"),
        pytest.param(
            lambda: SpeexCanceller(residual_suppression=False), marks=needs_speex, id="speex"
        ),
        pytest.param(NullCanceller, id="none"),
    ],
)
def test_latency_ms_is_the_measured_output_lag(make, near_speech: np.ndarray) -> None:
    """`latency_ms` must match the real lag, or callers align output and far end wrongly."""
    silence = np.zeros(len(near_speech) + 4000, np.float32)
    scene = echo_sim.simulate(silence, echo_sim.room_path(), near_speech, near_start_s=0.1)
    canceller = make()
    out = echo_sim.run_canceller(canceller.process, scene)
    lags = np.arange(0, 400)
    n = len(scene.near) - 400
    scores = [np.dot(out[lag : lag + n], scene.near[:n]) for lag in lags]
    # within 2 samples: AEC3's high-pass filter shifts the peak by a sample on some voices
    assert abs(lags[int(np.argmax(scores))] - canceller.latency_ms * 16) <= 2


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(WebRtcAec3Canceller, marks=needs_aec3, id="aec3"),
        pytest.param(SpeexCanceller, marks=needs_speex, id="speex+res"),
    ],
)
def test_reset_makes_a_canceller_behave_as_new(make, far_speech: np.ndarray) -> None:
    scene = echo_sim.simulate(far_speech[: 2 * echo_sim.SAMPLE_RATE], echo_sim.room_path())
    used = make()
    run(used, scene)
    used.reset()
    np.testing.assert_array_equal(run(used, scene), run(make(), scene))


@needs_speex
def test_closed_speex_canceller_refuses_frames() -> None:
    canceller = SpeexCanceller()
    canceller.close()
    frame = np.zeros(FRAME_SIZE, np.int16)
    with pytest.raises(RuntimeError, match="closed"):
        canceller.process(frame, frame)


# --- frames in, frames out --------------------------------------------------------------------


def test_null_canceller_passes_the_microphone_through() -> None:
    rng = np.random.default_rng(0)
    near = rng.integers(-3000, 3000, FRAME_SIZE).astype(np.int16)
    far = rng.integers(-3000, 3000, FRAME_SIZE).astype(np.int16)
    out = NullCanceller().process(near, far)
    np.testing.assert_array_equal(out, near)
    assert out is not near


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(WebRtcAec3Canceller, marks=needs_aec3, id="aec3"),
        pytest.param(SpeexCanceller, marks=needs_speex, id="speex+res"),
        pytest.param(NullCanceller, id="none"),
    ],
)
@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_output_keeps_the_near_frame_dtype_and_shape(make, dtype: type) -> None:
    canceller = make()
    near = np.zeros(FRAME_SIZE, dtype)
    far = np.zeros(FRAME_SIZE, np.float32 if dtype is np.int16 else np.int16)  # mixed is fine
    out = canceller.process(near, far)
    assert out.dtype == dtype and out.shape == (FRAME_SIZE,)


@pytest.mark.parametrize(
    ("near", "far", "message"),
    [
        (np.zeros(320, np.int16), np.zeros(160, np.int16), "near .*160 samples"),
        (np.zeros(160, np.int16), np.zeros(80, np.int16), "far .*160 samples"),
        (np.zeros((1, 160), np.int16), np.zeros(160, np.int16), "1-D"),
        (np.zeros(160, np.float64), np.zeros(160, np.float64), "int16 or float32"),
    ],
)
def test_frames_of_the_wrong_size_or_type_raise_value_error(near, far, message: str) -> None:
    for canceller in [NullCanceller(), *(create_canceller(n) for n in available_backends())]:
        with pytest.raises(ValueError, match=message):
            canceller.process(near, far)


# --- far-end alignment ------------------------------------------------------------------------


def ramp(n: int) -> np.ndarray:
    """Distinct, exactly representable float32 samples: 1/32768 steps."""
    return (np.arange(1, n + 1) / 32768.0).astype(np.float32)


def pop_all(buffer: FarEndBuffer, n_frames: int) -> np.ndarray:
    return np.concatenate([np.zeros(0, np.float32), *(buffer.pop() for _ in range(n_frames))])


def test_far_end_buffer_delays_by_the_bulk_delay() -> None:
    buffer = FarEndBuffer(delay_ms=30)
    signal = ramp(10 * FRAME_SIZE)
    buffer.push(signal)
    out = pop_all(buffer, 13)
    np.testing.assert_array_equal(out[:480], 0.0)
    np.testing.assert_array_equal(out[480:], signal)


@settings(max_examples=50, deadline=None)
@given(
    chunks=st.lists(st.integers(min_value=1, max_value=900), min_size=1, max_size=30),
    delay_ms=st.sampled_from([0, 10, 25, 150]),
)
def test_far_end_buffer_output_does_not_depend_on_chunk_sizes(
    chunks: list[int], delay_ms: int
) -> None:
    """Pushes of any size, with frames popped as soon as they are complete (no underrun)."""
    signal = ramp(sum(chunks))
    buffer = FarEndBuffer(delay_ms=delay_ms, max_buffered_ms=10_000)
    popped, start = [np.zeros(0, np.float32)], 0
    for size in chunks:
        buffer.push(signal[start : start + size])
        start += size
        while buffer.buffered >= FRAME_SIZE:
            popped.append(buffer.pop())
    out = np.concatenate(popped)
    expected = np.concatenate([np.zeros(delay_ms * 16, np.float32), signal])[: len(out)]
    assert len(expected) - len(out) < FRAME_SIZE
    np.testing.assert_array_equal(out, expected)


def test_far_end_buffer_gives_zeros_before_any_far_audio_and_keeps_the_first_push() -> None:
    buffer = FarEndBuffer()
    np.testing.assert_array_equal(pop_all(buffer, 20), 0.0)
    signal = ramp(FRAME_SIZE)
    buffer.push(signal)
    np.testing.assert_array_equal(buffer.pop(), signal)


def test_far_end_buffer_underrun_yields_zeros_and_drops_late_audio_to_stay_aligned() -> None:
    buffer = FarEndBuffer(max_lag_ms=60)
    a, b, c = ramp(3 * FRAME_SIZE).reshape(3, FRAME_SIZE)
    buffer.push(a)
    np.testing.assert_array_equal(buffer.pop(), a)
    np.testing.assert_array_equal(buffer.pop(), 0.0)  # b's slot: b is late
    buffer.push(np.concatenate([b, c]))
    np.testing.assert_array_equal(buffer.pop(), c)  # b was for the slot already gone


def test_far_end_buffer_treats_a_long_gap_as_a_stop_and_restarts_on_time() -> None:
    buffer = FarEndBuffer(max_lag_ms=60)
    a, b = ramp(2 * FRAME_SIZE).reshape(2, FRAME_SIZE)
    buffer.push(a)
    buffer.pop()
    np.testing.assert_array_equal(pop_all(buffer, 10), 0.0)  # 100 ms > max_lag_ms
    buffer.push(b)
    np.testing.assert_array_equal(buffer.pop(), b)


def test_far_end_buffer_drops_the_oldest_audio_when_too_far_ahead_and_warns_once(
    caplog,
) -> None:
    buffer = FarEndBuffer(max_buffered_ms=100)
    signal = ramp(20 * FRAME_SIZE)
    with caplog.at_level(logging.WARNING, logger="audio_dsp.aec"):
        buffer.push(signal[: 15 * FRAME_SIZE])
        buffer.push(signal[15 * FRAME_SIZE :])
    assert buffer.buffered == 10 * FRAME_SIZE
    np.testing.assert_array_equal(buffer.pop(), signal[10 * FRAME_SIZE : 11 * FRAME_SIZE])
    assert caplog.text.count("ahead of the microphone") == 1


def test_far_end_buffer_delay_change_inserts_silence_or_drops_the_oldest() -> None:
    buffer = FarEndBuffer(delay_ms=0)
    signal = ramp(4 * FRAME_SIZE)
    buffer.push(signal)
    buffer.delay_ms = 10
    np.testing.assert_array_equal(buffer.pop(), 0.0)
    np.testing.assert_array_equal(buffer.pop(), signal[:FRAME_SIZE])
    buffer.delay_ms = 0
    np.testing.assert_array_equal(buffer.pop(), signal[2 * FRAME_SIZE : 3 * FRAME_SIZE])
    assert buffer.delay_ms == 0


def test_far_end_buffer_scales_int16_like_the_rest_of_audio_dsp() -> None:
    buffer = FarEndBuffer()
    buffer.push(np.full(FRAME_SIZE, 16384, np.int16))
    np.testing.assert_array_equal(buffer.pop(), 0.5)


def test_far_end_buffer_reset_restarts_from_the_delay() -> None:
    buffer = FarEndBuffer(delay_ms=20)
    buffer.push(ramp(5 * FRAME_SIZE))
    buffer.reset()
    assert buffer.buffered == 2 * FRAME_SIZE
    np.testing.assert_array_equal(pop_all(buffer, 3), 0.0)


def test_far_end_buffer_rejects_a_negative_delay() -> None:
    with pytest.raises(ValueError, match="negative"):
        FarEndBuffer(delay_ms=-1)


@needs_speex
def test_bulk_delay_compensation_lets_a_short_filter_cancel_a_long_echo(
    far_speech: np.ndarray,
) -> None:
    """A 64 ms filter cannot reach a 150 ms echo unless the far end is delayed for it."""
    scene = echo_sim.simulate(far_speech, echo_sim.delay_path())
    echo_only = scene.echo_frames(after_s=CONVERGED_S)
    erle = {}
    for delay_ms in (0, 140):
        session = AlignedEchoCanceller(
            SpeexCanceller(filter_ms=64, residual_suppression=False), FarEndBuffer(delay_ms)
        )
        out = []
        for i, mic in enumerate(echo_sim.frames(scene.mic)):
            if i % 2 == 0:  # sent audio arrives in 20 ms chunks, as from the outbound track
                session.far_end(scene.far[i * FRAME_SIZE : (i + 2) * FRAME_SIZE])
            out.append(session.process(mic))
        erle[delay_ms] = echo_sim.erle_db(scene.mic, np.concatenate(out), echo_only)
    assert erle[0] < 3.0
    assert erle[140] > 10.0


def test_aligned_canceller_reset_clears_the_far_audio() -> None:
    session = AlignedEchoCanceller(NullCanceller(), FarEndBuffer(delay_ms=10))
    session.far_end(ramp(5 * FRAME_SIZE))
    session.reset()
    assert session.buffer.buffered == FRAME_SIZE and session.name == "none"


# --- choosing a backend -----------------------------------------------------------------------


@needs_aec3
def test_auto_picks_aec3_when_installed_and_logs_it(caplog) -> None:
    with caplog.at_level(logging.INFO, logger="audio_dsp.aec"):
        canceller = create_canceller()
    assert isinstance(canceller, WebRtcAec3Canceller)
    assert "echo canceller: aec3" in caplog.text


@needs_speex
def test_auto_falls_back_to_speex_without_pywebrtc_audio(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pywebrtc_audio", None)  # makes the import fail
    assert isinstance(create_canceller(), SpeexCanceller)
    with pytest.raises(EchoCancellerUnavailable, match="pywebrtc-audio"):
        create_canceller("aec3")


def test_auto_falls_back_to_none_without_any_library(monkeypatch) -> None:
    def missing() -> None:
        raise OSError("libspeexdsp not found")

    monkeypatch.setitem(sys.modules, "pywebrtc_audio", None)
    monkeypatch.setattr(aec, "load_speexdsp", missing)
    assert isinstance(create_canceller(), NullCanceller)
    assert available_backends() == ["none"]
    with pytest.raises(EchoCancellerUnavailable, match="libspeexdsp"):
        create_canceller("speex")


@needs_speex
def test_named_backend_takes_its_options() -> None:
    canceller = create_canceller("speex", residual_suppression=False)
    assert canceller.name == "speex" and canceller.latency_ms == 0.0


def test_unknown_backend_or_options_with_auto_raise_value_error() -> None:
    with pytest.raises(ValueError, match="unknown echo canceller"):
        create_canceller("dtln")
    with pytest.raises(ValueError, match="need a backend name"):
        create_canceller("auto", filter_ms=300)


# --- the simulated room itself ----------------------------------------------------------------


def test_echo_path_has_the_requested_delay_and_gain() -> None:
    path = echo_sim.EchoPath(delay_ms=50, gain=0.25, reverb_ms=60)
    h = path.impulse_response()
    assert int(np.flatnonzero(h)[0]) == 800  # nothing arrives before the bulk delay
    head, end = h[800:960], h[-160:]
    assert np.sum(end**2) < 1e-4 * np.sum(head**2)  # the tail has decayed by 40+ dB
    assert np.linalg.norm(h) == pytest.approx(0.25)


def test_synthetic_speech_is_deterministic_and_speech_like() -> None:
    a, b = echo_sim.synthetic_speech(2.0, seed=3), echo_sim.synthetic_speech(2.0, seed=3)
    np.testing.assert_array_equal(a, b)
    energy = echo_sim.frame_energy(a)
    assert 0.1 < np.mean(energy < energy.max() * 1e-4) < 0.6  # pauses between syllables
