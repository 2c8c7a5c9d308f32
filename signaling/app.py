"""HTTP signaling: the demo page, ICE configuration, and SDP offer/answer.

Routes:
- `GET /` the demo page, `GET /static/...` the client modules
- `GET /config` `{"iceServers": [...]}` for the browser's RTCPeerConnection
- `POST /offer` `{"sdp", "type": "offer"}` -> `{"sdp", "type": "answer"}`; starts a session
- `GET /healthz` liveness and the number of live sessions; `GET /metrics` Prometheus text

aiortc does not trickle ICE: the offer must already carry the client's candidates, and the answer
carries all of ours. Every error is a JSON `{"error": "..."}` with a 4xx/5xx status.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agent.engine import Engine
from agent.protocol import DATA_CHANNEL_LABEL
from agent.session import Session
from signaling.config import ServerConfig
from signaling.registry import Connection, ConnectionRegistry

log = logging.getLogger(__name__)

ENGINE_KEY = web.AppKey("engine", Engine)
CONFIG_KEY = web.AppKey("config", ServerConfig)
REGISTRY_KEY = web.AppKey("registry", ConnectionRegistry)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class OfferError(Exception):
    """A refused offer: `status` and a message that is safe to show the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def create_app(engine: Engine, config: ServerConfig | None = None) -> web.Application:
    """The aiohttp application serving one shared `engine` (already started)."""
    config = config or ServerConfig()
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=[_cors, _json_errors])
    app[ENGINE_KEY] = engine
    app[CONFIG_KEY] = config
    app[REGISTRY_KEY] = ConnectionRegistry()
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
    return web.json_response({"error": message}, status=status)


@web.middleware
async def _cors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Let pages on the configured origins call /config and /offer and load the modules."""
    origin = request.headers.get("Origin")
    if origin is None or not request.app[CONFIG_KEY].allows_origin(origin):
        return await handler(request)
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        response: web.StreamResponse = web.Response(status=204)
        response.headers["Access-Control-Allow-Methods"] = "GET, POST"
        response.headers["Access-Control-Allow-Headers"] = "Content-Type"
        response.headers["Access-Control-Max-Age"] = "600"
    else:
        response = await handler(request)
    response.headers["Access-Control-Allow-Origin"] = origin
    response.headers["Vary"] = "Origin"
    return response


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
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _close_connections(app: web.Application) -> None:
    await app[REGISTRY_KEY].close_all()


# -- POST /offer ------------------------------------------------------------------------------


async def _offer(request: web.Request) -> web.Response:
    try:
        sdp = await _read_offer(request)
        registry, config = request.app[REGISTRY_KEY], request.app[CONFIG_KEY]
        if len(registry) >= config.max_sessions:
            raise OfferError(503, "the server is at its session limit; try again later")
        answer = await _answer(request.app, sdp, request.remote or "?")
    except OfferError as exc:
        log.info("offer refused (%d): %s", exc.status, exc.message)
        return json_error(exc.status, exc.message)
    return web.json_response({"sdp": answer.sdp, "type": answer.type})


async def _read_offer(request: web.Request) -> str:
    """The offer's SDP, or an OfferError saying what is wrong with the request."""
    if request.content_type != "application/json":
        raise OfferError(415, "send the offer as application/json")
    try:
        body = json.loads(await request.text())
    except (ValueError, RecursionError) as exc:
        raise OfferError(400, "request body is not valid JSON") from exc
    if not isinstance(body, dict):
        raise OfferError(400, "request body must be a JSON object")
    sdp, type_ = body.get("sdp"), body.get("type")
    if not isinstance(sdp, str) or not isinstance(type_, str):
        raise OfferError(400, "'sdp' and 'type' must both be strings")
    if type_ != "offer":
        raise OfferError(400, f"'type' must be 'offer', not {type_[:20]!r}")
    _check_sdp(sdp)
    return sdp


def _check_sdp(sdp: str) -> None:
    media = [
        line.split()[0][2:] for line in sdp.splitlines() if line.startswith("m=") and " " in line
    ]
    if not sdp.startswith("v=0"):
        raise OfferError(400, "'sdp' is not a session description (it must start with v=0)")
    if "audio" not in media:
        raise OfferError(400, "the offer has no audio m-line: send a microphone track")
    if media.count("audio") > 1:
        raise OfferError(400, "the offer has more than one audio m-line: send one microphone")
    if "video" in media:
        raise OfferError(400, "video is not supported: offer audio (and the events channel) only")


async def _answer(app: web.Application, sdp: str, remote: str) -> RTCSessionDescription:
    config, registry = app[CONFIG_KEY], app[REGISTRY_KEY]
    conn_id = uuid.uuid4().hex[:8]
    pc = RTCPeerConnection(config.rtc_configuration())
    factory = config.echo_canceller_factory
    canceller = factory() if factory is not None else None
    session = Session(app[ENGINE_KEY], config.session, conn_id, echo_canceller=canceller)
    conn = Connection(conn_id, pc, session)
    _wire(conn, registry)
    registry.add(conn, config.connect_timeout_s)
    session.log.info("offer from %s", remote)
    try:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        pc.addTrack(session.output_track)
        await pc.setLocalDescription(await pc.createAnswer())
    except Exception as exc:  # aiortc raises ValueError/others on SDP it cannot use
        session.log.info("cannot answer the offer: %s", exc)
        await registry.close(conn_id)
        raise OfferError(400, f"the offer could not be used: {exc}"[:300]) from exc
    return pc.localDescription


def _wire(conn: Connection, registry: ConnectionRegistry) -> None:
    """Route peer connection events to the session and the registry."""
    pc, session = conn.pc, conn.session

    @pc.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        if track.kind == "audio" and not session.has_input:
            session.attach_input(track)
        else:
            conn.log.info("ignoring an extra %s track", track.kind)

    @pc.on("datachannel")
    def on_datachannel(channel: Any) -> None:
        if channel.label != DATA_CHANNEL_LABEL:
            conn.log.info("ignoring data channel %r", channel.label)
            return
        session.attach_channel(channel)

    @pc.on("connectionstatechange")
    def on_state() -> None:
        state = pc.connectionState
        conn.log.info("connection %s", state)
        if state == "connected" and conn.watchdog is not None:
            conn.watchdog.cancel()
        elif state in ("failed", "closed"):
            registry.schedule_close(conn.id, f"connection {state}")


__all__ = ["CONFIG_KEY", "ENGINE_KEY", "REGISTRY_KEY", "create_app", "json_error"]
