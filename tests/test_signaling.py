"""The HTTP side: routes, offer validation, ICE configuration, the connection registry."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import types
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiortc import RTCPeerConnection, RTCSessionDescription

import run_agent
from signaling import REGISTRY_KEY, IceServer, ServerConfig, create_app, ice_servers_from_urls
from tests.fakes import FakeEngine, MicTrack, wait_until

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


async def client_offer() -> tuple[RTCPeerConnection, MicTrack]:
    pc = RTCPeerConnection()
    mic = MicTrack()
    pc.addTrack(mic)
    pc.createDataChannel("events")
    await pc.setLocalDescription(await pc.createOffer())
    return pc, mic


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
    pc, mic = await client_offer()
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
        pcs = [await client_offer() for _ in range(2)]
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
    pc, mic = await client_offer()
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
        pc, mic = await client_offer()
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


def test_echo_canceller_option_builds_one_canceller_per_session() -> None:
    pytest.importorskip("audio_dsp.aec")
    assert run_agent.server_config(run_agent.parse_args([])).echo_canceller_factory is None
    args = run_agent.parse_args(["--echo-canceller", "auto"])
    factory = run_agent.server_config(args).echo_canceller_factory
    assert factory is not None
    first, second = factory(), factory()
    assert first is not second
    assert first.process(np.zeros(160, np.float32)).shape == (160,)


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
