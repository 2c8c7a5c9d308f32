"""The HTTP side: routes, offer validation, ICE configuration, the connection registry."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import socket
import sys
import time
import types
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiortc import RTCSessionDescription

import run_agent
from agent import metrics
from agent.engine import EngineError, HistoryItem, UserTurn
from signaling import (
    REGISTRY_KEY,
    AuthConfig,
    IceServer,
    ServerConfig,
    create_app,
    ice_servers_from_urls,
)
from signaling.logs import SESSION_ID, SessionFilter, configure_logging
from tests.fakes import FakeEngine, FakeReply, Script, wait_until
from tests.webrtc_client import dial, offering_peer, serve_app

MINIMAL_AUDIO_SDP = (
    "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"
)


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[TestClient]:
    static = tmp_path / "static"
    static.mkdir()
    (static / "index.html").write_text("<!doctype html><title>agent</title>")
    (static / "voice-agent.js").write_text("export {};")
    config = ServerConfig(
        static_dir=static,
        max_body_bytes=8 * 1024,
        ice_servers=(
            IceServer(("stun:stun.example.org:3478",)),
            IceServer(("turn:turn.example.org:3478",), "user", "secret"),
        ),
    )
    async with TestClient(TestServer(create_app(FakeEngine(), config))) as c:
        yield c


async def post_json(client: TestClient, body: object) -> tuple[int, dict]:
    resp = await client.post("/offer", json=body)
    return resp.status, await resp.json()


async def test_healthz_reports_ok_and_the_engine(client: TestClient) -> None:
    resp = await client.get("/healthz")
    assert resp.status == 200
    assert await resp.json() == {"status": "ok", "engine": "fake", "sessions": 0}


async def test_index_and_static_files_are_served(client: TestClient) -> None:
    resp = await client.get("/")
    assert resp.status == 200 and "<title>agent</title>" in await resp.text()
    resp = await client.get("/static/voice-agent.js")
    assert resp.status == 200 and await resp.text() == "export {};"


async def test_config_lists_ice_servers_for_the_page(client: TestClient) -> None:
    resp = await client.get("/config")
    assert await resp.json() == {
        "iceServers": [
            {"urls": ["stun:stun.example.org:3478"]},
            {"urls": ["turn:turn.example.org:3478"], "username": "user", "credential": "secret"},
        ]
    }


def test_ice_servers_configure_the_server_peer_connection_too() -> None:
    servers = ice_servers_from_urls(["stun:s.example.org", "turn:t.example.org"], "u", "p")
    rtc = ServerConfig(ice_servers=servers).rtc_configuration()
    assert [(s.urls, s.username, s.credential) for s in rtc.iceServers] == [
        (["stun:s.example.org"], None, None),
        (["turn:t.example.org"], "u", "p"),
    ]
    assert ServerConfig().rtc_configuration().iceServers == []
    with pytest.raises(ValueError):
        IceServer(("http://example.org",))


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ("[" * 3000 + "]" * 3000, "not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),
        ('{"sdp": 5, "type": "offer"}', "must both be strings"),
        ('{"type": "offer"}', "must both be strings"),
        ('{"sdp": "v=0", "type": "answer"}', "'type' must be 'offer'"),
        ('{"sdp": "hello", "type": "offer"}', "v=0"),
        (json.dumps({"sdp": "v=0\r\nm=application 9 x\r\n", "type": "offer"}), "no audio m-line"),
        (
            json.dumps(
                {"sdp": MINIMAL_AUDIO_SDP + "m=video 9 UDP/TLS/RTP/SAVPF 96\r\n", "type": "offer"}
            ),
            "video is not supported",
        ),
        (json.dumps({"sdp": MINIMAL_AUDIO_SDP, "type": "offer"}), "could not be used"),
    ],
)
async def test_bad_offers_get_a_4xx_json_error_saying_what_is_wrong(
    client: TestClient, body: str | bytes, needle: str
) -> None:
    resp = await client.post("/offer", data=body, headers={"Content-Type": "application/json"})
    assert 400 <= resp.status < 500
    payload = await resp.json()
    assert needle in payload["error"]
    assert len(client.server.app[REGISTRY_KEY]) == 0


async def test_an_offer_that_is_not_json_content_is_refused(client: TestClient) -> None:
    resp = await client.post("/offer", data="sdp", headers={"Content-Type": "text/plain"})
    assert resp.status == 415
    assert "application/json" in (await resp.json())["error"]


async def test_an_oversized_body_gets_413_json(client: TestClient) -> None:
    status, payload = await post_json(client, {"sdp": "v=0" + "x" * 20_000, "type": "offer"})
    assert status == 413
    assert "too large" in payload["error"]


async def test_unknown_routes_and_methods_answer_json_errors(client: TestClient) -> None:
    resp = await client.get("/nope")
    assert resp.status == 404 and "error" in await resp.json()
    resp = await client.get("/offer")
    assert resp.status == 405 and "error" in await resp.json()


async def test_the_server_keeps_serving_after_bad_requests(client: TestClient) -> None:
    for _ in range(3):
        await client.post("/offer", data="{", headers={"Content-Type": "application/json"})
        await post_json(client, {"sdp": "v=0" + "x" * 20_000, "type": "offer"})
    resp = await client.get("/healthz")
    assert resp.status == 200


async def test_a_valid_offer_gets_an_answer_and_a_registered_session(client: TestClient) -> None:
    pc, mic = await offering_peer()
    try:
        status, answer = await post_json(client, {"sdp": pc.localDescription.sdp, "type": "offer"})
        assert status == 200 and answer["type"] == "answer"
        assert "m=audio" in answer["sdp"] and "m=application" in answer["sdp"]
        assert len(client.server.app[REGISTRY_KEY]) == 1
        await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))
    finally:
        mic.stop()
        await pc.close()


async def test_the_session_limit_answers_503(tmp_path: Path) -> None:
    app = create_app(FakeEngine(), ServerConfig(static_dir=tmp_path, max_sessions=1))
    async with TestClient(TestServer(app)) as client:
        pcs = [await offering_peer() for _ in range(2)]
        try:
            first, _ = await post_json(
                client, {"sdp": pcs[0][0].localDescription.sdp, "type": "offer"}
            )
            second, payload = await post_json(
                client, {"sdp": pcs[1][0].localDescription.sdp, "type": "offer"}
            )
            assert (first, second) == (200, 503)
            assert "limit" in payload["error"]
        finally:
            for pc, mic in pcs:
                mic.stop()
                await pc.close()


async def test_shutdown_closes_every_registered_connection(tmp_path: Path) -> None:
    app = create_app(FakeEngine(), ServerConfig(static_dir=tmp_path))
    client = TestClient(TestServer(app))
    await client.start_server()
    pc, mic = await offering_peer()
    await post_json(client, {"sdp": pc.localDescription.sdp, "type": "offer"})
    (conn,) = app[REGISTRY_KEY].connections()
    await client.close()
    assert len(app[REGISTRY_KEY]) == 0
    assert conn.pc.connectionState == "closed"
    assert conn.session.closed
    mic.stop()
    await pc.close()


async def test_a_peer_that_never_connects_is_dropped_after_the_timeout(tmp_path: Path) -> None:
    app = create_app(FakeEngine(), ServerConfig(static_dir=tmp_path, connect_timeout_s=0.3))
    async with TestClient(TestServer(app)) as client:
        pc, mic = await offering_peer()
        status, _ = await post_json(client, {"sdp": pc.localDescription.sdp, "type": "offer"})
        assert status == 200
        mic.stop()
        await pc.close()  # the answer is never applied: ICE never starts
        await wait_until(lambda: len(app[REGISTRY_KEY]) == 0, within=3)


async def test_allowed_origins_get_cors_headers_and_preflight(tmp_path: Path) -> None:
    config = ServerConfig(static_dir=tmp_path, allowed_origins=("https://site.example",))
    async with TestClient(TestServer(create_app(FakeEngine(), config))) as client:
        preflight = await client.options(
            "/offer",
            headers={
                "Origin": "https://site.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            },
        )
        assert preflight.status == 204
        assert preflight.headers["Access-Control-Allow-Origin"] == "https://site.example"
        assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
        resp = await client.get("/config", headers={"Origin": "https://site.example"})
        assert resp.headers["Access-Control-Allow-Origin"] == "https://site.example"
        other = await client.get("/config", headers={"Origin": "https://evil.example"})
        assert "Access-Control-Allow-Origin" not in other.headers


async def test_metrics_expose_session_and_latency_series(client: TestClient) -> None:
    resp = await client.get("/metrics")
    text = await resp.text()
    assert resp.status == 200
    assert "voice_agent_sessions_active" in text
    assert "voice_agent_first_audio_seconds_bucket" in text


# --- run_agent.py -----------------------------------------------------------------------------


def fake_torch(cuda: bool) -> types.ModuleType:
    torch = types.ModuleType("torch")
    torch.cuda = types.SimpleNamespace(is_available=lambda: cuda)  # type: ignore[attr-defined]
    return torch


def test_auto_engine_is_offline_without_a_gpu(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "torch", fake_torch(cuda=False))
    assert run_agent.choose_engine("auto", tmp_path) == ("offline", "no CUDA GPU is available")


def test_auto_engine_needs_the_weights_as_well_as_a_gpu(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    paths = pytest.importorskip("models.glm4voice.paths")
    monkeypatch.setitem(sys.modules, "torch", fake_torch(cuda=True))
    name, reason = run_agent.choose_engine("auto", tmp_path)
    assert name == "offline" and "cannot load" in reason
    layout = {
        paths.TOKENIZER_FOLDER: paths.TOKENIZER_FILES,
        paths.LM_FOLDER: paths.LM_FILES,
        paths.DECODER_FOLDER: paths.DECODER_FILES,
    }
    for folder, names in layout.items():
        (tmp_path / folder).mkdir()
        for file_name in names:
            (tmp_path / folder / file_name).write_text("{}")
    index = tmp_path / paths.LM_FOLDER / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "model-1.safetensors"}}))
    (tmp_path / paths.LM_FOLDER / "model-1.safetensors").write_bytes(b"")
    assert run_agent.choose_engine("auto", tmp_path)[0] == "glm4voice"
    assert run_agent.choose_engine("offline", tmp_path)[0] == "offline"


def test_glm4voice_engine_unavailable_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "models.glm4voice", None)
    with pytest.raises(SystemExit, match="GLM-4-Voice engine is not available"):
        run_agent.make_engine("glm4voice", Path("nowhere"))


def test_cli_options_build_the_server_config() -> None:
    args = run_agent.parse_args(
        [
            "--ice-server",
            "stun:s.example.org",
            "--ice-server",
            "turn:t.example.org",
            "--ice-username",
            "u",
            "--ice-credential",
            "p",
            "--allow-origin",
            "https://a.example",
        ]
    )
    config = run_agent.server_config(args)
    assert config.client_config()["iceServers"][1] == {
        "urls": ["turn:t.example.org"],
        "username": "u",
        "credential": "p",
    }
    assert config.allows_origin("https://a.example")
    with pytest.raises(SystemExit):
        run_agent.parse_args(["--cert-file", "c.pem"])


def test_echo_canceller_option_reaches_every_session_config() -> None:
    assert run_agent.server_config(run_agent.parse_args([])).session.echo_canceller == "auto"
    args = run_agent.parse_args(["--echo-canceller", "none"])
    assert run_agent.server_config(args).session.echo_canceller == "none"


async def test_run_agent_serves_until_sigterm_then_closes_the_engine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = FakeEngine()
    monkeypatch.setattr(run_agent, "make_engine", lambda *args: engine)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = run_agent.parse_args(["--engine", "offline", "--port", str(port)])
    server = asyncio.create_task(run_agent.serve(args))
    async with aiohttp.ClientSession() as http:
        for _ in range(100):
            try:
                async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                    assert (await resp.json())["engine"] == "fake"
                    break
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.05)
        else:
            raise AssertionError("the server did not come up")
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(server, 10)
    assert engine.started and engine.closed


# --- faults ----------------------------------------------------------------------------------


class PickyEngine(FakeEngine):
    """Fails every reply to the text "fail" after one audio chunk; answers the rest normally."""

    def respond(self, turn: UserTurn, history: Sequence[HistoryItem]) -> FakeReply:
        if turn.text != "fail":
            return super().respond(turn, history)
        reply = FakeReply(turn, Script(fail_after_chunks=1))
        self.replies.append(reply)
        return reply


@pytest.mark.slow
async def test_a_client_vanishing_mid_answer_is_torn_down_and_its_reply_cancelled(
    tmp_path: Path,
) -> None:
    engine = FakeEngine(Script(audio_s=30.0, chunk_delay_s=0.05))
    config = ServerConfig(static_dir=tmp_path, idle_timeout_s=1.0, close_notice_s=0.1)
    app = create_app(engine, config)
    registry = app[REGISTRY_KEY]
    async with serve_app(app) as url:
        call = await dial(url)
        call.channel.send(json.dumps({"type": "text", "text": "tell me a long story"}))
        await wait_until(lambda: "speaking" in call.states(), within=5)
        gone_at = time.monotonic()
        await call.vanish()
        await wait_until(lambda: len(registry) == 0, within=5)
        # The connection leaves the registry at once; its teardown then cancels the reply.
        await wait_until(lambda: engine.replies[0].cancelled, within=5)
        assert time.monotonic() - gone_at < 4.0
        await call.hang_up()


@pytest.mark.slow
async def test_an_engine_failure_in_one_session_leaves_the_other_untouched(tmp_path: Path) -> None:
    app = create_app(PickyEngine(), ServerConfig(static_dir=tmp_path))
    async with serve_app(app) as url:
        failing, healthy = await dial(url), await dial(url)
        failing.channel.send(json.dumps({"type": "text", "text": "fail"}))
        healthy.channel.send(json.dumps({"type": "text", "text": "hello"}))
        await wait_until(lambda: failing.of_type("error"), within=5)
        await wait_until(lambda: healthy.states()[-2:] == ["speaking", "listening"], within=5)
        assert not healthy.of_type("error")
        finals = [m["text"] for m in healthy.of_type("transcript") if m["final"]]
        assert finals[-1] == Script().text
        await wait_until(lambda: failing.states()[-1] == "listening", within=5)
        assert len(app[REGISTRY_KEY]) == 2  # the failed turn did not end the call
        for call in (failing, healthy):
            await call.hang_up()


@pytest.mark.slow
async def test_shutdown_tells_live_callers_why_before_closing(tmp_path: Path) -> None:
    app = create_app(FakeEngine(), ServerConfig(static_dir=tmp_path, close_notice_s=0.3))
    async with serve_app(app) as url:
        call = await dial(url)
    # the block's end shut the server down
    assert "shutting down" in call.of_type("error")[0]["message"]
    await call.hang_up()


class OutOfMemoryError(RuntimeError):
    """Named like torch.cuda.OutOfMemoryError, which is matched by name."""


def test_out_of_memory_is_recognised_by_class_name_and_cause() -> None:
    assert metrics.is_out_of_memory(OutOfMemoryError("CUDA out of memory. Tried to allocate"))
    try:
        try:
            raise OutOfMemoryError("boom")
        except OutOfMemoryError as inner:
            raise RuntimeError("worker died") from inner
    except RuntimeError as outer:
        assert metrics.is_out_of_memory(outer)
    assert not metrics.is_out_of_memory(ValueError("nope"))
    assert metrics.error_kind(EngineError("bad turn")) == "engine"
    assert metrics.error_kind(OutOfMemoryError()) == "out_of_memory"
    assert metrics.error_kind(KeyError("x")) == "internal"


async def test_an_engine_running_out_of_memory_at_start_exits_with_advice() -> None:
    class HungryEngine(FakeEngine):
        async def start(self) -> None:
            raise OutOfMemoryError("CUDA out of memory")

    engine = HungryEngine()
    with pytest.raises(SystemExit, match="ran out of memory.*--quantization int4"):
        await run_agent.start_engine(engine)
    assert engine.closed


# --- observability ---------------------------------------------------------------------------


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.addFilter(SessionFilter())
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.slow
async def test_every_log_line_of_a_session_carries_its_id(tmp_path: Path) -> None:
    handler = Records()
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.INFO)
    app = create_app(FakeEngine(), ServerConfig(static_dir=tmp_path))
    try:
        async with serve_app(app) as url:
            call = await dial(url)
            (conn,) = app[REGISTRY_KEY].connections()
            call.channel.send(json.dumps({"type": "text", "text": "hi"}))
            await wait_until(lambda: call.states()[-2:] == ["speaking", "listening"], within=5)
            await call.hang_up()
            await wait_until(lambda: len(app[REGISTRY_KEY]) == 0, within=5)
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    session_lines = [r for r in handler.records if r.name == "agent.session"]
    assert len(session_lines) >= 3
    assert {r.session for r in session_lines} == {conn.id}  # type: ignore[attr-defined]
    # records of libraries working for the session (its ICE transport) are tagged as well
    assert any(r.name.startswith("aioice") and r.session == conn.id for r in handler.records)  # type: ignore[attr-defined]


def test_json_logs_are_one_object_a_line_with_the_session() -> None:
    stream = io.StringIO()
    configure_logging("INFO", "json", stream)
    try:
        token = SESSION_ID.set("abc123")
        logging.getLogger("agent.test").info("hello %s", "world")
        SESSION_ID.reset(token)
        logging.getLogger("agent.test").warning("outside")
    finally:
        configure_logging("WARNING", "text", sys.stderr)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert (first["session"], first["message"], first["level"]) == ("abc123", "hello world", "INFO")
    assert second["session"] == "-"


async def test_metrics_expose_limits_errors_queues_and_model_steps(client: TestClient) -> None:
    await client.post("/offer", data="{", headers={"Content-Type": "application/json"})
    text = await (await client.get("/metrics")).text()
    for series in (
        'voice_agent_offers_total{result="invalid"}',
        'voice_agent_queue_depth{queue="outbound_frames"}',
        "voice_agent_stop_latency_seconds_bucket",
        "voice_agent_model_step_seconds",
        "voice_agent_errors_total",
        "voice_agent_session_duration_seconds_bucket",
    ):
        assert series in text, series


# --- TLS and the command line ----------------------------------------------------------------


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_run_agent_serves_https_from_a_certificate_and_key(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cert_file, key_file = self_signed(tmp_path)
    monkeypatch.setattr(run_agent, "make_engine", lambda *args: FakeEngine())
    port = free_port()
    argv = ["--port", str(port), "--cert-file", str(cert_file), "--key-file", str(key_file)]
    args = run_agent.parse_args(argv)
    assert run_agent.ssl_context(args) is not None
    server = asyncio.create_task(run_agent.serve(args))
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(100):
                try:
                    async with http.get(f"https://127.0.0.1:{port}/healthz", ssl=False) as resp:
                        assert resp.status == 200
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
            else:
                raise AssertionError("the HTTPS server did not come up")
    finally:
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(server, 10)


def test_limit_access_and_log_options_reach_the_server_config(tmp_path: Path) -> None:
    args = run_agent.parse_args(
        [
            "--max-sessions", "4", "--busy-retry-after", "3", "--max-body-kb", "16",
            "--offer-rate", "12", "--offer-burst", "2", "--trust-forwarded-for",
            "--idle-timeout", "20", "--max-call-minutes", "5",
            "--auth-token", "tok", "--token-secret", "0123456789abcdef", "--metrics-token", "m",
            "--audit-log", str(tmp_path / "a.jsonl"), "--log-format", "json",
        ]
    )  # fmt: skip
    config = run_agent.server_config(args)
    assert (config.max_sessions, config.busy_retry_after_s, config.max_body_bytes) == (4, 3, 16384)
    assert (config.offer_rate_per_minute, config.offer_burst, config.trust_forwarded_for) == (
        12,
        2,
        True,
    )
    assert (config.idle_timeout_s, config.max_duration_s) == (20, 300)
    assert config.auth == AuthConfig("tok", "0123456789abcdef", "m")
    assert config.audit_log == tmp_path / "a.jsonl" and args.log_format == "json"
    with pytest.raises(SystemExit):
        run_agent.parse_args(["--token-secret", "short"])


def test_secrets_can_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOICE_AGENT_TOKEN_SECRET", "0123456789abcdef-env")
    monkeypatch.setenv("VOICE_AGENT_METRICS_TOKEN", "scrape")
    auth = run_agent.server_config(run_agent.parse_args([])).auth
    assert (auth.bearer_token, auth.token_secret, auth.metrics_token) == (
        None,
        "0123456789abcdef-env",
        "scrape",
    )


async def test_an_offer_that_breaks_aiortc_half_way_gets_a_4xx_and_no_session(
    client: TestClient,
) -> None:
    """Regression: an audio m-line without `a=mid` made aiortc fail in createAnswer and then
    again in RTCPeerConnection.close(), which escaped from /offer as a 500."""
    from tests.test_fuzz import SDP_LINES

    sdp = "\r\n".join(line for line in SDP_LINES if line != "a=mid:0") + "\r\n"
    for _ in range(3):
        status, payload = await post_json(client, {"sdp": sdp, "type": "offer"})
        assert status == 400 and "could not be used" in payload["error"]
    assert len(client.server.app[REGISTRY_KEY]) == 0
    assert (await client.get("/healthz")).status == 200


async def test_the_inbound_audio_jitter_buffer_holds_back_one_frame_not_four() -> None:
    from aiortc import RTCPeerConnection

    from signaling.app import set_inbound_prefetch

    client, server = RTCPeerConnection(), RTCPeerConnection()
    try:
        client.addTransceiver("audio", direction="sendrecv")
        await client.setLocalDescription(await client.createOffer())
        await server.setRemoteDescription(client.localDescription)
        (receiver,) = server.getReceivers()
        buffer = receiver._RTCRtpReceiver__jitter_buffer
        assert buffer._prefetch == 4  # aiortc's own default: 80 ms
        assert set_inbound_prefetch(server, 1) == 1
        assert buffer._prefetch == 1
    finally:
        await client.close()
        await server.close()


def test_server_config_refuses_a_jitter_buffer_of_no_frames() -> None:
    with pytest.raises(ValueError, match="inbound_prefetch_frames"):
        ServerConfig(inbound_prefetch_frames=0)
    assert ServerConfig().inbound_prefetch_frames == 1
    assert ServerConfig(inbound_prefetch_frames=None).inbound_prefetch_frames is None


def test_a_decode_step_the_device_cannot_run_is_a_clear_error(tmp_path: Path) -> None:
    from models.make_tiny import write_tiny_model_set

    write_tiny_model_set(tmp_path)
    with pytest.raises(SystemExit, match="cannot run that way.*CUDA"):
        run_agent.make_engine(
            "glm4voice", tmp_path, run_agent.GLMChoices(device="cpu", decode_step="graphs")
        )
    args = run_agent.parse_args(["--decode-step", "compile"])
    assert args.decode_step == "compile"


def test_reply_language_and_sampling_options_reach_the_glm4voice_load_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import models.glm4voice
    from models.make_tiny import write_tiny_model_set

    write_tiny_model_set(tmp_path)
    loaded = []
    monkeypatch.setattr(
        models.glm4voice, "load_engine", lambda paths, options: loaded.append(options)
    )
    argv = ["--device", "cpu", "--reply-language", "english", "--temperature", "0.7"]
    run_agent.make_engine(
        "glm4voice", tmp_path, run_agent.GLMChoices.from_args(run_agent.parse_args(argv))
    )
    run_agent.make_engine("glm4voice", tmp_path, run_agent.GLMChoices(device="cpu", top_p=0.5))
    english, default = loaded
    assert english.constraints.reply_language == "english"
    assert (english.sampling.temperature, english.sampling.top_p) == (0.7, 0.8)
    assert default.constraints.reply_language == "any"
    assert (default.sampling.temperature, default.sampling.top_p) == (0.2, 0.5)
    with pytest.raises(SystemExit, match="top_p"):
        run_agent.make_engine("glm4voice", tmp_path, run_agent.GLMChoices(device="cpu", top_p=0))
