"""HTTP signaling: the demo page, ICE configuration, and SDP offer/answer.

Routes:
- `GET /` the demo page, `GET /static/...` the client modules
- `GET /config` `{"iceServers": [...]}` for the browser's RTCPeerConnection
- `POST /offer` `{"sdp", "type": "offer"}` -> `{"sdp", "type": "answer"}`; starts a session
- `GET /healthz` liveness and the number of live sessions; `GET /metrics` Prometheus text

aiortc does not trickle ICE: the offer must already carry the client's candidates, and the answer
carries all of ours. Every error is a JSON `{"error": "..."}` with a 4xx/5xx status; refusals
the client may retry (429 per-address offer rate, 503 session limit) carry `Retry-After`.
With `ServerConfig.auth` set, `/offer`, `/config` and `/metrics` need a token (signaling.auth).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agent import metrics
from agent.engine import Engine
from agent.protocol import DATA_CHANNEL_LABEL
from agent.session import Session
from signaling.audit import AuditLog
from signaling.auth import SUBJECT_KEY, auth_middleware
from signaling.config import ServerConfig
from signaling.limits import RateLimiter, rate_key, retry_after_header
from signaling.logs import SESSION_ID
from signaling.registry import Connection, ConnectionRegistry, InboundActivityTrack, Supervision

log = logging.getLogger(__name__)

ENGINE_KEY = web.AppKey("engine", Engine)
CONFIG_KEY = web.AppKey("config", ServerConfig)
REGISTRY_KEY = web.AppKey("registry", ConnectionRegistry)
RATE_LIMITER_KEY = web.AppKey("rate_limiter", RateLimiter)
AUDIT_KEY = web.AppKey("audit", AuditLog)

SHUTDOWN_NOTICE = "The server is shutting down; please call again in a moment."

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class OfferError(Exception):
    """A refused offer: `status` and a message that is safe to show the client."""

    def __init__(
        self, status: int, message: str, result: str, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.result = result  # the OFFERS_TOTAL label
        self.retry_after_s = retry_after_s

    def response(self) -> web.Response:
        response = json_error(self.status, self.message)
        if self.retry_after_s is not None:
            response.headers["Retry-After"] = retry_after_header(self.retry_after_s)
        return response


def create_app(engine: Engine, config: ServerConfig | None = None) -> web.Application:
    """The aiohttp application serving one shared `engine` (already started)."""
    config = config or ServerConfig()
    middlewares = [_cors, _json_errors, auth_middleware(config.auth)]
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=middlewares)
    app[ENGINE_KEY] = engine
    app[CONFIG_KEY] = config
    app[REGISTRY_KEY] = ConnectionRegistry(_supervision(config))
    app[REGISTRY_KEY].on_closed(_on_connection_closed)
    app[RATE_LIMITER_KEY] = RateLimiter(config.offer_rate_per_minute, config.offer_burst)
    if config.audit_log is not None:
        app[AUDIT_KEY] = AuditLog(config.audit_log)
        app[REGISTRY_KEY].on_closed(lambda conn: _audit_end(app[AUDIT_KEY], conn))
        app.on_startup.append(_start_audit)
        app.on_cleanup.append(_stop_audit)
    app.router.add_get("/", _index)
    app.router.add_get("/config", _client_config)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_post("/offer", _offer)
    if config.static_dir.is_dir():
        app.router.add_static("/static", config.static_dir)
    app.on_shutdown.append(_close_connections)
    return app


def json_error(status: int, message: str) -> web.Response:
    """The JSON error body every refusal uses."""
    return web.json_response({"error": message}, status=status)


def _supervision(config: ServerConfig) -> Supervision:
    return Supervision(
        connect_timeout_s=config.connect_timeout_s,
        idle_timeout_s=config.idle_timeout_s,
        max_duration_s=config.max_duration_s,
        close_notice_s=config.close_notice_s,
    )


async def _start_audit(app: web.Application) -> None:
    app[AUDIT_KEY].start()


async def _stop_audit(app: web.Application) -> None:
    await app[AUDIT_KEY].close()


def _on_connection_closed(conn: Connection) -> None:
    metrics.SESSIONS_CLOSED_TOTAL.labels(reason=conn.close_reason or "closed").inc()
    metrics.SESSION_DURATION_SECONDS.observe(time.monotonic() - conn.started)


def _audit_end(audit: AuditLog, conn: Connection) -> None:
    audit.record(
        "end",
        **_audit_fields(conn),
        ended_at=datetime.now(UTC).isoformat(),
        duration_s=round(time.monotonic() - conn.started, 3),
        turns=len(conn.session.turns.records),
        reason=conn.close_reason,
    )


def _audit_fields(conn: Connection) -> dict[str, Any]:
    return {
        "session": conn.id,
        "started_at": conn.started_at,
        "peer": conn.peer,
        "subject": conn.subject,
        "engine": conn.engine,
    }


@web.middleware
async def _cors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Let pages on the configured origins call /config and /offer and load the modules."""
    config = request.app[CONFIG_KEY]
    origin = request.headers.get("Origin")
    if origin is None or not config.allows_origin(origin):
        response = await handler(request)
        if config.allowed_origins:
            # Whether the CORS headers are there depends on Origin: a cache must not hand this
            # response (without them) to a page on an allowed origin.
            _vary_on_origin(response)
        return response
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        response: web.StreamResponse = web.Response(status=204)
        response.headers["Access-Control-Allow-Methods"] = "GET, POST"
        response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
        response.headers["Access-Control-Max-Age"] = "600"
    else:
        response = await handler(request)
    response.headers["Access-Control-Allow-Origin"] = origin
    response.headers["Access-Control-Expose-Headers"] = "Retry-After"
    _vary_on_origin(response)
    return response


def _vary_on_origin(response: web.StreamResponse) -> None:
    vary = [v.strip() for v in response.headers.get("Vary", "").split(",") if v.strip()]
    if not any(v.lower() == "origin" or v == "*" for v in vary):
        response.headers["Vary"] = ", ".join([*vary, "Origin"])


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[CONFIG_KEY].max_body_bytes
        return json_error(413, f"request body too large (limit {limit} bytes)")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return json_error(exc.status, exc.reason)


async def _index(request: web.Request) -> web.StreamResponse:
    page = request.app[CONFIG_KEY].static_dir / "index.html"
    if not page.is_file():
        return json_error(404, "the demo page is not installed")
    return web.FileResponse(page)


async def _client_config(request: web.Request) -> web.Response:
    return web.json_response(request.app[CONFIG_KEY].client_config())


async def _healthz(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    sessions = len(request.app[REGISTRY_KEY])
    return web.json_response({"status": "ok", "engine": engine.name, "sessions": sessions})


async def _metrics(request: web.Request) -> web.Response:
    _sample_queue_depths(request.app[REGISTRY_KEY])
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def _sample_queue_depths(registry: ConnectionRegistry) -> None:
    conns = registry.connections()
    outbound = sum(c.session.output_track.queued_frames for c in conns)
    metrics.QUEUE_DEPTH.labels(queue="outbound_frames").set(outbound)


async def _close_connections(app: web.Application) -> None:
    await app[REGISTRY_KEY].close_all(notice=SHUTDOWN_NOTICE)


# -- POST /offer ------------------------------------------------------------------------------


async def _offer(request: web.Request) -> web.Response:
    peer = peer_address(request)
    try:
        _check_rate(request.app, peer)
        sdp = await _read_offer(request)
        _check_capacity(request.app)
        # No await between the capacity check and the registration in _answer: the limit holds
        # under concurrent offers.
        answer = await _answer(request.app, sdp, peer, request[SUBJECT_KEY])
    except OfferError as exc:
        log.info("offer from %s refused (%d): %s", peer, exc.status, exc.message)
        metrics.OFFERS_TOTAL.labels(result=exc.result).inc()
        return exc.response()
    metrics.OFFERS_TOTAL.labels(result="answered").inc()
    return web.json_response({"sdp": answer.sdp, "type": answer.type})


def peer_address(request: web.Request) -> str:
    """The caller's address: the socket peer, or the proxy's last X-Forwarded-For entry."""
    if request.app[CONFIG_KEY].trust_forwarded_for:
        # Repeated headers are one comma-separated list (a proxy may append its own header
        # after one the client sent): the proxy's entry is the last of the last header.
        forwarded = ",".join(request.headers.getall("X-Forwarded-For", ()))
        last = forwarded.rsplit(",", 1)[-1].strip()
        if last:
            return last[:64]
    return request.remote or "?"


def _check_rate(app: web.Application, peer: str) -> None:
    wait_s = app[RATE_LIMITER_KEY].check(rate_key(peer))
    if wait_s > 0:
        message = f"too many calls from your address; try again in {retry_after_header(wait_s)} s"
        raise OfferError(429, message, "rate_limited", wait_s)


def _check_capacity(app: web.Application) -> None:
    config = app[CONFIG_KEY]
    if len(app[REGISTRY_KEY]) >= config.max_sessions:
        retry = config.busy_retry_after_s
        limit = config.max_sessions
        message = f"the server is at its session limit ({limit} calls); try again in {retry:g} s"
        raise OfferError(503, message, "busy", retry)


async def _read_offer(request: web.Request) -> str:
    """The offer's SDP, or an OfferError saying what is wrong with the request."""
    if request.content_type != "application/json":
        raise OfferError(415, "send the offer as application/json", "invalid")
    try:
        text = await request.text()
    except web.HTTPRequestEntityTooLarge as exc:
        limit = request.app[CONFIG_KEY].max_body_bytes
        raise OfferError(413, f"request body too large (limit {limit} bytes)", "invalid") from exc
    except LookupError as exc:  # a charset Python does not know
        message = f"unknown charset {(request.charset or '')[:20]!r}: send the offer as UTF-8"
        raise OfferError(415, message, "invalid") from exc
    except ValueError as exc:  # bytes that are not in the declared charset
        raise OfferError(400, "request body is not valid JSON", "invalid") from exc
    try:
        body = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise OfferError(400, "request body is not valid JSON", "invalid") from exc
    if not isinstance(body, dict):
        raise OfferError(400, "request body must be a JSON object", "invalid")
    sdp, type_ = body.get("sdp"), body.get("type")
    if not isinstance(sdp, str) or not isinstance(type_, str):
        raise OfferError(400, "'sdp' and 'type' must both be strings", "invalid")
    if type_ != "offer":
        raise OfferError(400, f"'type' must be 'offer', not {type_[:20]!r}", "invalid")
    _check_sdp(sdp)
    return sdp


def _check_sdp(sdp: str) -> None:
    media = [
        line.split()[0][2:] for line in sdp.splitlines() if line.startswith("m=") and " " in line
    ]
    if not sdp.startswith("v=0"):
        message = "'sdp' is not a session description (it must start with v=0)"
        raise OfferError(400, message, "invalid")
    if "audio" not in media:
        raise OfferError(400, "the offer has no audio m-line: send a microphone track", "invalid")
    if media.count("audio") > 1:
        message = "the offer has more than one audio m-line: send one microphone"
        raise OfferError(400, message, "invalid")
    if "video" in media:
        message = "video is not supported: offer audio (and the events channel) only"
        raise OfferError(400, message, "invalid")


async def _answer(
    app: web.Application, sdp: str, peer: str, subject: str | None
) -> RTCSessionDescription:
    conn_id = uuid.uuid4().hex[:8]
    # Every task started from here on (session, transports, closing) logs with this session id.
    token = SESSION_ID.set(conn_id)
    try:
        conn = _register(app, conn_id, peer, subject)
        config = app[CONFIG_KEY]
        return await _negotiate(
            app[REGISTRY_KEY],
            conn,
            sdp,
            config.inbound_prefetch_frames,
            config.busy_retry_after_s,
        )
    finally:
        SESSION_ID.reset(token)


def _register(app: web.Application, conn_id: str, peer: str, subject: str | None) -> Connection:
    """Create the session and its peer connection and register them (no awaits)."""
    config, registry, engine = app[CONFIG_KEY], app[REGISTRY_KEY], app[ENGINE_KEY]
    pc = RTCPeerConnection(config.rtc_configuration())
    session = Session(engine, config.session, conn_id)
    conn = Connection(conn_id, pc, session, peer=peer, subject=subject, engine=engine.name)
    _wire(conn, registry)
    registry.add(conn)
    session.log.info("offer from %s (subject %s)", peer, subject or "-")
    if AUDIT_KEY in app:
        app[AUDIT_KEY].record("start", **_audit_fields(conn))
    return conn


def set_inbound_prefetch(pc: RTCPeerConnection, frames: int, logger: Any = log) -> int:
    """Make the audio receivers' jitter buffers hold back `frames` frames; returns how many
    receivers were changed. aiortc has no public setting for it: where its internals differ
    (another version), nothing changes and the default delay stays."""
    changed = 0
    for receiver in pc.getReceivers():
        if receiver.track is None or receiver.track.kind != "audio":
            continue
        buffer = getattr(receiver, "_RTCRtpReceiver__jitter_buffer", None)
        if buffer is None or not isinstance(getattr(buffer, "_prefetch", None), int):
            logger.warning("cannot shorten aiortc's receive jitter buffer in this version")
            continue
        buffer._prefetch = frames
        changed += 1
    return changed


async def _negotiate(
    registry: ConnectionRegistry,
    conn: Connection,
    sdp: str,
    prefetch_frames: int | None = None,
    retry_after_s: float = 10.0,
) -> RTCSessionDescription:
    """The answer to `sdp`. A connection closed meanwhile (server shutdown, connect timeout:
    ICE gathering can take seconds) gets no answer, since it could never connect."""
    pc, session = conn.pc, conn.session
    try:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        if prefetch_frames is not None:
            set_inbound_prefetch(pc, prefetch_frames, session.log)
        pc.addTrack(session.output_track)
        await pc.setLocalDescription(await pc.createAnswer())
    except Exception as exc:  # aiortc raises ValueError/others on SDP it cannot use
        if conn.close_reason is not None:
            raise _closed_while_answering(conn, retry_after_s) from exc
        session.log.info("cannot answer the offer: %s", exc)
        await registry.close(conn.id, "unusable offer")
        raise OfferError(400, f"the offer could not be used: {exc}"[:300], "invalid") from exc
    if conn.close_reason is not None:
        raise _closed_while_answering(conn, retry_after_s)
    return pc.localDescription


def _closed_while_answering(conn: Connection, retry_after_s: float) -> OfferError:
    message = f"the call was closed before it was answered ({conn.close_reason}); please call again"
    return OfferError(503, message, "busy", retry_after_s)


def _wire(conn: Connection, registry: ConnectionRegistry) -> None:
    """Route peer connection events to the session and the registry."""
    pc, session = conn.pc, conn.session

    @pc.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        if track.kind == "audio" and not session.has_input:
            session.attach_input(InboundActivityTrack(track, conn.touch))
        else:
            conn.log.info("ignoring an extra %s track", track.kind)

    @pc.on("datachannel")
    def on_datachannel(channel: Any) -> None:
        if channel.label != DATA_CHANNEL_LABEL:
            conn.log.info("ignoring data channel %r", channel.label)
            return
        channel.on("message", lambda _message: conn.touch())
        session.attach_channel(channel)

    @pc.on("connectionstatechange")
    def on_state() -> None:
        state = pc.connectionState
        conn.log.info("connection %s", state)
        if state == "connected":
            conn.touch()  # the idle clock starts once media can flow
            if conn.watchdog is not None:
                conn.watchdog.cancel()
        elif state in ("failed", "closed"):
            registry.schedule_close(conn.id, f"connection {state}")


__all__ = [
    "AUDIT_KEY",
    "CONFIG_KEY",
    "ENGINE_KEY",
    "RATE_LIMITER_KEY",
    "REGISTRY_KEY",
    "create_app",
    "json_error",
    "peer_address",
]
