"""Fuzzing what a stranger can send: `/offer` bodies, `events` data-channel messages, tokens.

Properties: `/offer` never answers 5xx and never leaves a session behind for a refused offer;
decoding a client message either yields a valid message or raises ProtocolError; nothing a
client sends over the channel raises out of the session's handler.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.messages import EventChannel
from agent.protocol import MESSAGES, ClientMessage, ProtocolError, decode_client
from agent.session import Session
from signaling import REGISTRY_KEY, ServerConfig, create_app
from signaling.tokens import TokenError, mint_token, verify_token
from tests.fakes import FakeChannel, FakeEngine, Script

FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

OFFER_SDP = (
    "v=0\r\no=- 4215 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0 1\r\n"
    "a=msid-semantic:WMS *\r\n"
    "m=audio 9 UDP/TLS/RTP/SAVPF 111 0\r\nc=IN IP4 127.0.0.1\r\na=rtcp:9 IN IP4 0.0.0.0\r\n"
    "a=candidate:1 1 udp 2130706431 127.0.0.1 50000 typ host\r\na=end-of-candidates\r\n"
    "a=sendrecv\r\na=mid:0\r\na=rtcp-mux\r\na=rtpmap:111 opus/48000/2\r\na=rtpmap:0 PCMU/8000\r\n"
    "a=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuvwx\r\n"
    "a=fingerprint:sha-256 " + ":".join(["AB"] * 32) + "\r\na=setup:actpass\r\n"
    "m=application 9 DTLS/SCTP 5000\r\nc=IN IP4 127.0.0.1\r\na=mid:1\r\n"
    "a=sctpmap:5000 webrtc-datachannel 65535\r\na=max-message-size:65536\r\n"
    "a=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuvwx\r\n"
    "a=fingerprint:sha-256 " + ":".join(["AB"] * 32) + "\r\na=setup:actpass\r\n"
)
SDP_LINES = OFFER_SDP.split("\r\n")[:-1]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=20,
)


@st.composite
def weird_sdps(draw: st.DrawFn) -> str:
    """A real offer's lines, some dropped, duplicated, garbled or reordered."""
    lines = list(SDP_LINES)
    for _ in range(draw(st.integers(0, 4))):
        i = draw(st.integers(0, len(lines) - 1))
        action = draw(st.sampled_from(["drop", "dup", "garble", "swap", "insert"]))
        if action == "drop" and len(lines) > 1:
            del lines[i]
        elif action == "dup":
            lines.insert(i, lines[i])
        elif action == "garble":
            lines[i] = lines[i][:2] + draw(st.text(max_size=30))
        elif action == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        else:
            lines.insert(
                i, draw(st.sampled_from(["m=", "a=", "c=", "m=audio"])) + draw(st.text(max_size=20))
            )
    return "\r\n".join(lines) + "\r\n"


offer_bodies = st.one_of(
    st.binary(max_size=2000),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"sdp": json_values, "type": json_values}).map(
        lambda d: json.dumps(d).encode()
    ),
    st.integers(0, 40_000).map(
        lambda n: json.dumps({"sdp": "v=0" + "x" * n, "type": "offer"}).encode()
    ),
    weird_sdps().map(lambda sdp: json.dumps({"sdp": sdp, "type": "offer"}).encode()),
    st.text(max_size=300).map(
        lambda t: json.dumps({"sdp": "v=0\r\nm=audio " + t, "type": "offer"}).encode()
    ),
)


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[TestClient]:
    config = ServerConfig(
        static_dir=tmp_path, max_body_bytes=16 * 1024, offer_burst=100_000, max_sessions=10_000
    )
    async with TestClient(TestServer(create_app(FakeEngine(), config))) as c:
        c.answered = 0  # type: ignore[attr-defined]
        yield c
    assert len(c.server.app[REGISTRY_KEY]) == 0  # shutdown closed whatever was answered


@settings(FUZZ, max_examples=200)
@given(body=offer_bodies, content_type=st.sampled_from(["application/json", "text/plain"]))
async def test_no_offer_body_gets_a_5xx_or_leaves_a_session_behind(
    client: TestClient, body: bytes, content_type: str
) -> None:
    resp = await client.post("/offer", data=body, headers={"Content-Type": content_type})
    assert resp.status < 500
    payload = await resp.json()
    if resp.status == 200:
        assert payload["type"] == "answer"
        client.answered += 1  # type: ignore[attr-defined]
    else:
        assert isinstance(payload["error"], str) and payload["error"]
    assert len(client.server.app[REGISTRY_KEY]) == client.answered  # type: ignore[attr-defined]


# --- the events channel ----------------------------------------------------------------------

client_types = [t for t, (direction, _) in MESSAGES.items() if direction == "client"]
message_objects = st.one_of(
    json_values,
    st.fixed_dictionaries({"type": st.sampled_from(client_types)}, optional={"text": json_values}),
    st.fixed_dictionaries(
        {"type": st.sampled_from([*MESSAGES, "", "TEXT"])},
        optional={"text": st.text(max_size=3000), "extra": json_values},
    ),
)
raw_messages = st.one_of(
    st.text(max_size=500),
    st.binary(max_size=500),
    message_objects.map(json.dumps),
    message_objects.map(lambda m: json.dumps(m).encode()),
    st.integers(16_000, 20_000).map(lambda n: json.dumps({"type": "text", "text": "a" * n})),
)


@settings(max_examples=300, deadline=None)
@given(raw=raw_messages)
def test_decoding_a_client_message_yields_a_message_or_a_protocol_error(raw: str | bytes) -> None:
    try:
        message = decode_client(raw)
    except ProtocolError as exc:
        assert str(exc)
        return
    assert isinstance(message, ClientMessage)
    assert MESSAGES[message.type][0] == "client"
    if message.type == "text":
        assert 0 < len(message.fields["text"]) <= 2000


@settings(max_examples=100, deadline=None)
@given(raw=st.one_of(raw_messages, json_values, st.just(memoryview(b"x"))))
def test_the_event_channel_answers_bad_input_with_an_error_event(raw: object) -> None:
    received: list[ClientMessage] = []
    events = EventChannel(received.append)
    channel = FakeChannel()
    events.attach(channel)
    events.receive(raw)  # type: ignore[arg-type]
    sent = [json.loads(m) for m in channel.sent]
    assert len(received) + len(sent) == 1
    if sent:
        assert sent[0]["type"] == "error" and sent[0]["message"]


@pytest.fixture
async def session() -> AsyncIterator[tuple[Session, FakeChannel]]:
    s = Session(FakeEngine(Script(audio_s=0.1, first_delay_s=0.0)), session_id="fuzz")
    channel = FakeChannel()
    s.attach_channel(channel)
    yield s, channel
    await s.close()


@FUZZ
@given(batch=st.lists(raw_messages, min_size=1, max_size=8))
async def test_nothing_sent_over_the_channel_escapes_the_session_handler(
    session: tuple[Session, FakeChannel], batch: list[str | bytes]
) -> None:
    s, channel = session
    for raw in batch:
        channel.emit("message", raw)  # an exception here would reach aiortc's SCTP reader
    assert not s.closed


# --- tokens ----------------------------------------------------------------------------------

TOKEN_SECRET = "fuzzing-secret-0123456789"


@settings(max_examples=300, deadline=None)
@given(
    token=st.one_of(
        st.text(max_size=700),
        st.builds(lambda a, b: f"{a}.{b}", st.text(max_size=80), st.text(max_size=80)),
        st.builds(
            lambda payload, sig: f"{payload}.{sig}",
            st.binary(max_size=80).map(lambda b: base64.urlsafe_b64encode(b).decode().rstrip("=")),
            st.sampled_from(["", "AAAA", mint_token(TOKEN_SECRET, "x").split(".")[1]]),
        ),
    )
)
def test_verifying_any_string_either_fails_with_token_error_or_is_a_real_token(token: str) -> None:
    try:
        claims = verify_token(TOKEN_SECRET, token)
    except TokenError:
        return
    assert mint_token(TOKEN_SECRET, claims.subject, 1, now=lambda: claims.expires_at - 1) == token
