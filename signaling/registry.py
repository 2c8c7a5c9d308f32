"""Live peer connections and their sessions: supervised, dropped on disconnect, closed on shutdown.

The registry owns, per connection, a connect watchdog (a peer that never connects is dropped) and
a supervisor (a connected peer that goes silent, or a call that reaches its maximum length, is
told why with an `error` event and closed). Whoever closes a connection says why; closed
connections are reported to `on_closed` listeners (metrics, the audit log).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiortc import RTCPeerConnection
from aiortc.mediastreams import MediaStreamTrack
from av.frame import Frame

from agent.protocol import encode
from agent.session import Session
from agent.tasks import cancel_and_wait

log = logging.getLogger(__name__)

ClosedListener = Callable[["Connection"], None]


@dataclass(frozen=True)
class Supervision:
    """When the registry ends a connection on its own (0 disables a limit)."""

    connect_timeout_s: float = 30.0
    idle_timeout_s: float = 10.0
    max_duration_s: float = 3600.0
    # How long the `error` event that explains a close gets to reach the client.
    close_notice_s: float = 0.5

    @property
    def check_interval_s(self) -> float:
        limits = [t for t in (self.idle_timeout_s, self.max_duration_s) if t > 0]
        return max(0.05, min([1.0, *(t / 5 for t in limits)]))


@dataclass(eq=False)
class Connection:
    """One caller: its peer connection, the conversation over it, and who and where it is."""

    id: str
    pc: RTCPeerConnection
    session: Session
    peer: str = "?"
    subject: str | None = None
    engine: str = "?"
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    started: float = field(default_factory=time.monotonic)
    last_activity: float = field(default_factory=time.monotonic)
    close_reason: str | None = None
    watchdog: asyncio.Task[None] | None = field(default=None, repr=False)
    supervisor: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def log(self) -> logging.LoggerAdapter[Any]:
        return self.session.log

    @property
    def connected(self) -> bool:
        return self.pc.connectionState == "connected"

    def touch(self) -> None:
        """Note inbound activity (an audio frame or a client message) now."""
        self.last_activity = time.monotonic()

    def notify(self, message: str) -> None:
        """Tell the client why its call is ending (best effort: the channel may be gone)."""
        self.session.events.send(encode("error", message=message))


class InboundActivityTrack(MediaStreamTrack):
    """Passes the caller's audio through unchanged, calling `on_frame` for every frame."""

    kind = "audio"

    def __init__(self, source: MediaStreamTrack, on_frame: Callable[[], None]) -> None:
        super().__init__()
        self._source = source
        self._on_frame = on_frame

    async def recv(self) -> Frame:
        frame = await self._source.recv()
        self._on_frame()
        return frame


async def close_peer_connection(
    pc: RTCPeerConnection, logger: logging.Logger | logging.LoggerAdapter[Any]
) -> None:
    """Close `pc`; if aiortc fails half-way (it can, after a half-applied offer), stop every
    transport it still holds so no socket outlives the connection."""
    try:
        await pc.close()
        return
    except Exception as exc:
        logger.info("peer connection did not close cleanly (%r): stopping its transports", exc)
    dtls = [t.receiver.transport for t in pc.getTransceivers()]
    if pc.sctp is not None:
        dtls.append(pc.sctp.transport)
    for transport in (t for t in dtls if t is not None):
        for stop in (transport.stop, transport.transport.stop):
            try:
                await stop()
            except Exception:
                logger.debug("a transport failed to stop", exc_info=True)


class ConnectionRegistry:
    """Owns every live connection and the tasks that supervise and close them."""

    def __init__(self, supervision: Supervision | None = None) -> None:
        self.supervision = supervision or Supervision()
        self._live: dict[str, Connection] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._closed_listeners: list[ClosedListener] = []

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, conn_id: object) -> bool:
        return conn_id in self._live

    def connections(self) -> list[Connection]:
        """The live connections, oldest first."""
        return list(self._live.values())

    def get(self, conn_id: str) -> Connection | None:
        return self._live.get(conn_id)

    def on_closed(self, listener: ClosedListener) -> None:
        """Call `listener(conn)` after each connection is closed (keep it quick)."""
        self._closed_listeners.append(listener)

    def add(self, conn: Connection) -> None:
        """Register `conn` and start watching it."""
        self._live[conn.id] = conn
        s = self.supervision
        if s.connect_timeout_s > 0:
            conn.watchdog = self._spawn(self._watch_connect(conn, s.connect_timeout_s), conn, "wd")
        if s.idle_timeout_s > 0 or s.max_duration_s > 0:
            conn.supervisor = self._spawn(self._supervise(conn), conn, "supervisor")

    def schedule_close(self, conn_id: str, reason: str) -> asyncio.Task[None] | None:
        """Start closing a connection (from a callback, say); the registry owns the task.

        The connection leaves the registry at once; the returned task (None when it was not
        live) closes its session and peer connection and reports it closed.
        """
        conn = self._live.pop(conn_id, None)
        if conn is None:
            return None
        conn.log.info("closing: %s", reason)
        conn.close_reason = reason
        task = asyncio.create_task(self._teardown(conn), name=f"{conn_id}-close")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        return task

    async def close(self, conn_id: str, reason: str = "closed") -> None:
        """Close the session and the peer connection, and forget them (idempotent).

        The teardown finishes even if the caller is cancelled meanwhile; `close_all` waits for it.
        """
        task = self.schedule_close(conn_id, reason)
        if task is not None:
            await asyncio.shield(task)

    async def close_all(self, reason: str = "server shutting down", notice: str = "") -> None:
        """Close every connection (telling each client `notice` first, if given), and wait for
        closes already under way."""
        conns = list(self._live.values())
        if conns:
            log.info("closing %d connection(s): %s", len(conns), reason)
        if conns and notice:
            for conn in conns:
                conn.notify(notice)
            await asyncio.sleep(self.supervision.close_notice_s)
        await asyncio.gather(*(self.close(c.id, reason) for c in conns), return_exceptions=True)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    # -- supervision -----------------------------------------------------------------------------

    def _spawn(self, coro: Any, conn: Connection, name: str) -> asyncio.Task[None]:
        return asyncio.create_task(coro, name=f"{conn.id}-{name}")

    async def _stop_watchers(self, conn: Connection) -> None:
        current = asyncio.current_task()
        for task in (conn.watchdog, conn.supervisor):
            if task is not None and task is not current:
                await cancel_and_wait(task, conn.log)

    async def _teardown(self, conn: Connection) -> None:
        await self._stop_watchers(conn)
        try:
            await conn.session.close()
        except Exception:
            conn.log.exception("the session failed to close cleanly")
        await close_peer_connection(conn.pc, conn.log)
        self._report_closed(conn)

    async def _watch_connect(self, conn: Connection, timeout_s: float) -> None:
        await asyncio.sleep(timeout_s)
        if not conn.connected and conn.id in self._live:
            conn.log.warning("not connected after %.0f s", timeout_s)
            await self._close_quietly(conn, "connect timeout")

    async def _supervise(self, conn: Connection) -> None:
        s = self.supervision
        while conn.id in self._live:
            await asyncio.sleep(s.check_interval_s)
            now = time.monotonic()
            if s.max_duration_s > 0 and now - conn.started >= s.max_duration_s:
                minutes = s.max_duration_s / 60
                await self._end(
                    conn, "max duration", f"The call reached its {minutes:g}-minute limit."
                )
                return
            if (
                s.idle_timeout_s > 0
                and conn.connected
                and now - conn.last_activity >= s.idle_timeout_s
            ):
                idle = s.idle_timeout_s
                await self._end(conn, "idle", f"The call was ended after {idle:g} s without audio.")
                return

    async def _end(self, conn: Connection, reason: str, notice: str) -> None:
        conn.log.info("ending the call: %s", reason)
        conn.notify(notice)
        await asyncio.sleep(self.supervision.close_notice_s)
        await self._close_quietly(conn, reason)

    async def _close_quietly(self, conn: Connection, reason: str) -> None:
        try:
            await self.close(conn.id, reason)
        except Exception:
            conn.log.exception("closing failed (%s)", reason)

    def _report_closed(self, conn: Connection) -> None:
        for listener in self._closed_listeners:
            try:
                listener(conn)
            except Exception:
                conn.log.exception("a close listener failed")


__all__ = [
    "Connection",
    "ConnectionRegistry",
    "InboundActivityTrack",
    "Supervision",
    "close_peer_connection",
]
