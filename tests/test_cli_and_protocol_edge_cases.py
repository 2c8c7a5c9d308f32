"""Edge cases of the command line (run_agent.py) and of client messages on the events channel."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import run_agent
from agent import metrics
from agent.messages import EventChannel
from agent.protocol import ClientMessage, ProtocolError, decode_client
from agent.session import Session, SessionConfig
from agent.tasks import in_daemon_thread
from tests.fakes import FakeChannel, FakeEngine, Script, wait_until

# --- command line ------------------------------------------------------------------------------


def parse_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The argparse error `argv` ends with (exit status 2, usage on stderr)."""
    with pytest.raises(SystemExit) as exited:
        run_agent.parse_args(argv)
    assert exited.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--port", "99999"], "--port: must be a port number from 1 to 65535"),
        (["--port", "-1"], "--port: must be a port number"),
        (["--port", "http"], "--port: invalid int value"),
        (["--temperature", "-0.5"], "--temperature: must be a number >= 0"),
        (["--temperature", "nan"], "--temperature: must be a number >= 0"),
        (["--top-p", "0"], "--top-p: must be a number above 0 and at most 1"),
        (["--top-p", "1.5"], "--top-p: must be a number above 0 and at most 1"),
        (["--max-sessions", "-1"], "--max-sessions: must be an integer >= 0"),
        (["--max-body-kb", "0"], "--max-body-kb: must be an integer >= 1"),
        (["--offer-rate", "0"], "--offer-rate: must be a number > 0"),
        (["--offer-burst", "0"], "--offer-burst: must be an integer >= 1"),
        (["--busy-retry-after", "inf"], "--busy-retry-after: must be a number >= 0"),
        (["--idle-timeout", "-3"], "--idle-timeout: must be a number >= 0"),
        (["--max-call-minutes", "nan"], "--max-call-minutes: must be a number >= 0"),
        (["--ice-server", "https://turn.example.org"], "--ice-server: not a STUN/TURN URL"),
    ],
)
def test_out_of_range_options_are_argparse_errors_naming_the_flag(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert says in parse_error(argv, capsys)


def test_zero_keeps_its_documented_meaning_for_limits() -> None:
    args = run_agent.parse_args(
        [
            "--max-sessions",
            "0",
            "--idle-timeout",
            "0",
            "--max-call-minutes",
            "0",
            "--temperature",
            "0",
        ]
    )
    config = run_agent.server_config(args)
    assert (config.max_sessions, config.idle_timeout_s, config.max_duration_s) == (0, 0, 0)
    assert args.temperature == 0


@pytest.mark.parametrize(
    "argv",
    [
        ["--engine", "offline", "--quantization", "int4"],
        ["--engine", "offline", "--temperature", "0.5"],
        ["--engine", "offline", "--decode-step", "dynamic"],
        ["--engine", "offline", "--device", "cuda:1"],
    ],
)
def test_glm4voice_options_with_the_offline_engine_are_refused(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert "only for GLM-4-Voice, not --engine offline" in parse_error(argv, capsys)


def test_glm4voice_options_are_accepted_where_glm4voice_may_run() -> None:
    for engine in ("auto", "glm4voice"):
        args = run_agent.parse_args(["--engine", engine, "--quantization", "int4"])
        assert args.quantization == "int4"


def test_a_missing_certificate_or_key_file_is_an_argparse_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "key.pem"
    key.write_text("not used")
    argv = ["--cert-file", str(tmp_path / "nope.pem"), "--key-file", str(key)]
    assert "--cert-file" in (err := parse_error(argv, capsys)) and "no such file" in err


def test_an_unusable_certificate_ends_the_program_with_a_message_before_the_engine_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("not a certificate")
    key.write_text("not a key")
    made: list[str] = []
    monkeypatch.setattr(run_agent, "make_engine", lambda *a: made.append("engine") or FakeEngine())
    args = run_agent.parse_args(
        ["--echo-canceller", "none", "--cert-file", str(cert), "--key-file", str(key)]
    )
    with pytest.raises(SystemExit, match="cannot serve HTTPS with --cert-file"):
        asyncio.run(run_agent.serve(args))
    assert made == []


@pytest.mark.parametrize(
    "env_name", ["VOICE_AGENT_AUTH_TOKEN", "VOICE_AGENT_TOKEN_SECRET", "VOICE_AGENT_METRICS_TOKEN"]
)
def test_an_empty_secret_in_the_environment_is_refused_not_taken_as_no_auth(
    env_name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(env_name, "")
    assert f"(or {env_name}) is empty" in parse_error([], capsys)


def test_an_empty_auth_token_flag_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert "--auth-token (or VOICE_AGENT_AUTH_TOKEN) is empty" in parse_error(
        ["--auth-token", " "], capsys
    )


def test_a_short_token_secret_from_the_environment_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("VOICE_AGENT_TOKEN_SECRET", "short")
    assert "VOICE_AGENT_TOKEN_SECRET" in parse_error([], capsys)


async def test_a_port_in_use_ends_the_program_with_a_message_and_closes_the_engine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = FakeEngine()
    monkeypatch.setattr(run_agent, "make_engine", lambda *a: engine)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = run_agent.parse_args(["--echo-canceller", "none", "--port", str(port)])
        with pytest.raises(SystemExit, match=f"cannot listen on 127.0.0.1:{port}: .*in use"):
            await run_agent.serve(args)
    assert engine.started and engine.closed


def test_an_auto_fallback_to_offline_warns_that_glm4voice_options_are_ignored(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(run_agent, "choose_engine", lambda *a: ("offline", "no CUDA GPU"))

    def stop_here(*args: object) -> None:
        raise SystemExit("stopped before loading")

    monkeypatch.setattr(run_agent, "make_engine", stop_here)
    args = run_agent.parse_args(["--echo-canceller", "none", "--quantization", "int4"])
    with pytest.raises(SystemExit, match="stopped before loading"):
        asyncio.run(run_agent.serve(args))
    assert "ignoring --quantization: the offline engine runs" in caplog.text


# --- the events channel ------------------------------------------------------------------------


class StrictChannel(FakeChannel):
    """Encodes text as UTF-8 like aiortc does: an unpaired surrogate cannot be sent."""

    def send(self, data: str | bytes) -> None:
        if isinstance(data, str):
            data.encode("utf-8")
        super().send(data)


@pytest.mark.parametrize(
    "raw",
    [
        '{"type": "text", "text": "half an emoji \\ud83d"}',
        '{"type": "interrupt", "\\udc00": 1}',
        '{"type": "\\ud800"}',
    ],
)
def test_unpaired_surrogate_escapes_are_rejected(raw: str) -> None:
    with pytest.raises(ProtocolError, match="unpaired surrogate"):
        decode_client(raw)


def test_a_paired_surrogate_escape_is_text() -> None:
    assert (
        decode_client('{"type": "text", "text": "\\ud83d\\ude00"}').fields["text"] == "\U0001f600"
    )


def test_the_error_answering_a_message_with_an_unpaired_surrogate_reaches_the_client() -> None:
    received: list[object] = []
    events = EventChannel(received.append)
    channel = StrictChannel()
    events.attach(channel)
    events.receive('{"type": "interrupt", "\\udc00": 1}')
    assert received == []
    (error,) = [json.loads(m) for m in channel.sent]
    assert error["type"] == "error" and "surrogate" in error["message"]


async def test_a_message_flood_is_answered_for_what_it_drops_and_the_session_keeps_serving() -> (
    None
):
    engine = FakeEngine(Script(audio_s=2.0))
    session = Session(engine, SessionConfig(echo_canceller="none"))
    channel = FakeChannel()
    session.attach_channel(channel)
    for i in range(200):
        channel.emit("message", json.dumps({"type": "text", "text": f"turn {i}"}))
    await wait_until(lambda: len(engine.calls) >= 64)
    errors = [json.loads(m) for m in channel.sent if json.loads(m)["type"] == "error"]
    assert len(errors) == 200 - len(engine.calls)
    assert all("'text' message was dropped" in e["message"] for e in errors)
    channel.emit("message", json.dumps({"type": "text", "text": "still there?"}))
    await wait_until(lambda: engine.calls[-1][0].text == "still there?")
    await session.close()


async def test_sessions_active_returns_to_its_level_after_many_calls_and_double_closes() -> None:
    before = metrics.SESSIONS_ACTIVE._value.get()
    for i in range(30):
        session = Session(FakeEngine(), SessionConfig(echo_canceller="none"))
        if i % 2:
            session.attach_channel(FakeChannel())
            session.events.receive('{"type": "text", "text": "hi"}')
        await asyncio.gather(session.close(), session.close())
        await session.close()
    assert metrics.SESSIONS_ACTIVE._value.get() == before


def test_rejected_client_messages_are_counted_as_protocol_errors() -> None:
    counter = metrics.ERRORS_TOTAL.labels(kind="protocol")
    before = counter._value.get()
    events = EventChannel(lambda message: None)
    events.attach(FakeChannel())
    for raw in ("not json", "[]", '{"type": "dance"}', b"\xff"):
        events.receive(raw)
    events.receive('{"type": "interrupt"}')
    assert counter._value.get() == before + 4


async def test_in_daemon_thread_returns_the_result_and_raises_the_error() -> None:
    assert await in_daemon_thread(lambda: 6 * 7, "answer") == 42

    def fail() -> None:
        raise ValueError("bad weights")

    with pytest.raises(ValueError, match="bad weights"):
        await in_daemon_thread(fail, "fail")


async def test_cancelling_in_daemon_thread_returns_at_once_and_leaves_a_daemon() -> None:
    release = threading.Event()
    task = asyncio.create_task(in_daemon_thread(release.wait, "slow-load"))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 1.0)
    (thread,) = [t for t in threading.enumerate() if t.name == "slow-load"]
    assert thread.daemon
    release.set()
    thread.join(2.0)


SLOW_LOAD = """
import sys, time
import run_agent
from models.glm4voice.engine import GLM4VoiceEngine

run_agent.make_engine = lambda name, model_dir, glm: GLM4VoiceEngine(lambda: time.sleep(120))
sys.exit(run_agent.main(["--engine", "offline", "--port", "1"]))
"""


def test_ctrl_c_while_the_model_loads_exits_without_waiting_for_the_load() -> None:
    root = Path(run_agent.__file__).resolve().parent
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_LOAD],
        cwd=root,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        lines = []
        for line in proc.stderr:  # until the engine starts loading
            lines.append(line)
            if "engine: offline" in line:
                break
        time.sleep(0.5)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=60)
        elapsed = time.monotonic() - sent
    finally:
        proc.kill()
    assert proc.returncode == 0, "".join(lines) + rest
    assert "stopped while the offline engine was loading" in rest
    assert elapsed < 30, f"exit took {elapsed:.1f} s: it waited for the 120 s load"


async def test_an_interrupt_that_finds_the_inbox_full_still_winds_its_answer_up() -> None:
    engine = FakeEngine(Script(audio_s=5.0))
    session = Session(engine, SessionConfig(echo_canceller="none"))
    channel = FakeChannel()
    session.attach_channel(channel)

    def states() -> list[str]:
        return [m["state"] for m in map(json.loads, channel.sent) if m["type"] == "state"]

    channel.emit("message", json.dumps({"type": "text", "text": "tell me a story"}))
    await wait_until(lambda: states()[-1:] == ["speaking"])
    async with session.turns._lock:  # the control loop waits while the inbox fills
        while not session._inbox.full():  # interrupts of an answer over already
            session._inbox.put_nowait((ClientMessage("interrupt", {}), object()))
        channel.emit("message", json.dumps({"type": "interrupt"}))
    await wait_until(lambda: states()[-1:] == ["listening"])
    assert engine.replies[-1].cancelled
    await session.close()
