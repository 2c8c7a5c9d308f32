"""Access control: signed session tokens, the static bearer token, and which routes need them."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiortc import RTCPeerConnection
from prometheus_client import REGISTRY

from signaling import REGISTRY_KEY, AuthConfig, ServerConfig, create_app
from signaling.tokens import TokenError, main, mint_token, verify_token
from tests.fakes import FakeEngine, MicTrack

SECRET = "s3cret-key-for-tests-only"
BEARER = "static-bearer-token"
METRICS = "scrape-me"


# --- tokens ----------------------------------------------------------------------------------


def test_a_minted_token_verifies_to_its_subject_and_expiry() -> None:
    token = mint_token(SECRET, "alice", ttl_s=60, now=lambda: 1000.0)
    claims = verify_token(SECRET, token, now=lambda: 1030.0)
    assert (claims.subject, claims.expires_at) == ("alice", 1060)
    assert all(c.isalnum() or c in "-_." for c in token)


def test_an_expired_token_is_refused() -> None:
    token = mint_token(SECRET, "alice", ttl_s=60, now=lambda: 1000.0)
    with pytest.raises(TokenError, match="expired"):
        verify_token(SECRET, token, now=lambda: 1070.0, leeway_s=5)


def test_a_token_signed_with_another_secret_is_refused() -> None:
    token = mint_token("another-secret-entirely", "alice")
    with pytest.raises(TokenError, match="signature"):
        verify_token(SECRET, token)


def test_a_token_whose_subject_was_changed_is_refused() -> None:
    token = mint_token(SECRET, "alice")
    forged_payload = mint_token(SECRET, "mallory").split(".")[0]
    with pytest.raises(TokenError, match="signature"):
        verify_token(SECRET, f"{forged_payload}.{token.split('.')[1]}")


@pytest.mark.parametrize("junk", ["", ".", "a.b.c", "x" * 600, "é.é", "abc.", ".abc"])
def test_malformed_tokens_are_refused_with_token_error(junk: str) -> None:
    with pytest.raises(TokenError):
        verify_token(SECRET, junk)


def test_short_secrets_and_bad_subjects_cannot_mint() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        mint_token("short", "alice")
    with pytest.raises(ValueError, match="subject"):
        mint_token(SECRET, "")
    with pytest.raises(ValueError, match="ttl"):
        mint_token(SECRET, "alice", ttl_s=0)


def test_the_cli_mints_a_token_that_verify_accepts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["mint", "--secret", SECRET, "--subject", "bob", "--ttl", "30"]) == 0
    token = capsys.readouterr().out.strip()
    assert verify_token(SECRET, token).subject == "bob"
    assert main(["verify", "--secret", SECRET, token]) == 0
    assert json.loads(capsys.readouterr().out)["subject"] == "bob"
    assert main(["verify", "--secret", SECRET, token + "x"]) == 1
    assert "error" in capsys.readouterr().err


# --- routes ----------------------------------------------------------------------------------


def make_static(tmp_path: Path) -> Path:
    static = tmp_path / "static"
    static.mkdir()
    (static / "index.html").write_text("<!doctype html><title>agent</title>")
    (static / "voice-agent.js").write_text("export {};")
    return static


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[TestClient]:
    auth = AuthConfig(bearer_token=BEARER, token_secret=SECRET, metrics_token=METRICS)
    config = ServerConfig(
        static_dir=make_static(tmp_path),
        auth=auth,
        allowed_origins=("https://site.example",),
        audit_log=tmp_path / "audit.jsonl",
    )
    async with TestClient(TestServer(create_app(FakeEngine(), config))) as client:
        yield client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_the_page_its_modules_and_healthz_stay_open(secured: TestClient) -> None:
    for path in ("/", "/static/voice-agent.js", "/healthz"):
        resp = await secured.get(path)
        assert resp.status == 200, path


@pytest.mark.parametrize("path", ["/config", "/metrics", "/nope", "/static/../config"])
async def test_without_a_token_other_routes_answer_401(secured: TestClient, path: str) -> None:
    resp = await secured.get(path)
    assert resp.status == 401
    assert "token" in (await resp.json())["error"]
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")


async def test_an_offer_without_a_token_is_refused_before_any_session(secured: TestClient) -> None:
    refused_before = REGISTRY.get_sample_value(
        "voice_agent_offers_total", {"result": "unauthorized"}
    )
    resp = await secured.post("/offer", json={"sdp": "v=0", "type": "offer"})
    assert resp.status == 401
    assert len(secured.server.app[REGISTRY_KEY]) == 0
    refused = REGISTRY.get_sample_value("voice_agent_offers_total", {"result": "unauthorized"})
    assert refused == (refused_before or 0) + 1


@pytest.mark.parametrize(
    "headers_or_query",
    [
        {"headers": bearer(BEARER)},
        {"headers": {"Authorization": f"bearer {BEARER}"}},
        {"headers": bearer(mint_token(SECRET, "alice"))},
        {"params": {"token": mint_token(SECRET, "alice")}},
    ],
)
async def test_config_accepts_the_static_or_a_signed_token(
    secured: TestClient, headers_or_query: dict
) -> None:
    resp = await secured.get("/config", **headers_or_query)
    assert resp.status == 200
    assert "iceServers" in await resp.json()


@pytest.mark.parametrize(
    "token",
    ["wrong", mint_token(SECRET, "alice", ttl_s=1, now=lambda: 0.0), mint_token("x" * 20, "eve")],
)
async def test_wrong_or_expired_tokens_get_401(secured: TestClient, token: str) -> None:
    assert (await secured.get("/config", headers=bearer(token))).status == 401
    assert (await secured.get("/config", params={"token": token})).status == 401


async def test_metrics_take_only_the_metrics_token_when_one_is_set(secured: TestClient) -> None:
    assert (await secured.get("/metrics", headers=bearer(METRICS))).status == 200
    assert (await secured.get("/metrics", headers=bearer(BEARER))).status == 401


async def test_metrics_take_a_caller_token_without_a_metrics_token(tmp_path: Path) -> None:
    config = ServerConfig(static_dir=tmp_path, auth=AuthConfig(bearer_token=BEARER))
    async with TestClient(TestServer(create_app(FakeEngine(), config))) as client:
        assert (await client.get("/metrics")).status == 401
        assert (await client.get("/metrics", headers=bearer(BEARER))).status == 200


async def test_a_metrics_token_alone_leaves_calls_open(tmp_path: Path) -> None:
    config = ServerConfig(static_dir=tmp_path, auth=AuthConfig(metrics_token=METRICS))
    async with TestClient(TestServer(create_app(FakeEngine(), config))) as client:
        assert (await client.get("/config")).status == 200
        assert (await client.get("/metrics")).status == 401


async def test_with_auth_off_every_route_is_open(tmp_path: Path) -> None:
    config = ServerConfig(static_dir=make_static(tmp_path))
    async with TestClient(TestServer(create_app(FakeEngine(), config))) as client:
        for path in ("/", "/config", "/metrics", "/healthz"):
            assert (await client.get(path)).status == 200, path


async def test_cors_preflight_allows_the_authorization_header_without_a_token(
    secured: TestClient,
) -> None:
    resp = await secured.options(
        "/offer",
        headers={
            "Origin": "https://site.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert resp.status == 204
    assert "Authorization" in resp.headers["Access-Control-Allow-Headers"]
    refused = await secured.get("/config", headers={"Origin": "https://site.example"})
    assert refused.status == 401
    assert refused.headers["Access-Control-Allow-Origin"] == "https://site.example"


async def test_a_signed_offer_records_the_subject_on_the_session_and_in_the_audit_log(
    secured: TestClient, tmp_path: Path
) -> None:
    pc = RTCPeerConnection()
    mic = MicTrack()
    pc.addTrack(mic)
    pc.createDataChannel("events")
    await pc.setLocalDescription(await pc.createOffer())
    try:
        token = mint_token(SECRET, "alice")
        offer = {"sdp": pc.localDescription.sdp, "type": "offer"}
        resp = await secured.post("/offer", json=offer, params={"token": token})
        assert resp.status == 200
        (conn,) = secured.server.app[REGISTRY_KEY].connections()
        assert conn.subject == "alice"
        await secured.server.app[REGISTRY_KEY].close(conn.id, "test over")
    finally:
        mic.stop()
        await pc.close()
    await secured.close()  # flushes the audit log
    records = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [r["event"] for r in records] == ["start", "end"]
    assert {r["subject"] for r in records} == {"alice"}
    assert records[1]["reason"] == "test over" and records[1]["engine"] == "fake"
    assert records[1]["turns"] == 0 and records[1]["peer"] == "127.0.0.1"
