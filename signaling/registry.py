"""Live peer connections and their sessions: dropped on disconnect, all closed on shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

from aiortc import RTCPeerConnection

from agent.session import Session

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Connection:
    """One caller: its peer connection and the conversation running over it."""

    id: str
    pc: RTCPeerConnection
    session: Session
    watchdog: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def log(self) -> logging.LoggerAdapter[Any]:
        return self.session.log


class ConnectionRegistry:
    """Owns every live connection and the tasks that close them."""

    def __init__(self) -> None:
        self._live: dict[str, Connection] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, conn_id: object) -> bool:
        return conn_id in self._live

    def connections(self) -> list[Connection]:
        """The live connections, oldest first."""
        return list(self._live.values())

    def get(self, conn_id: str) -> Connection | None:
        return self._live.get(conn_id)

    def add(self, conn: Connection, connect_timeout_s: float | None = None) -> None:
        """Register `conn`; if it is not connected within the timeout it is closed."""
        self._live[conn.id] = conn
        if connect_timeout_s is not None:
            conn.watchdog = asyncio.create_task(
                self._watch(conn, connect_timeout_s), name=f"{conn.id}-watchdog"
            )

    def schedule_close(self, conn_id: str, reason: str) -> None:
        """Close a connection from a callback (the registry owns the closing task)."""
        conn = self._live.get(conn_id)
        if conn is None:
            return
        conn.log.info("closing: %s", reason)
        task = asyncio.create_task(self.close(conn_id), name=f"{conn_id}-close")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self, conn_id: str) -> None:
        """Close the session and the peer connection, and forget them (idempotent)."""
        conn = self._live.pop(conn_id, None)
        if conn is None:
            return
        if conn.watchdog is not None and conn.watchdog is not asyncio.current_task():
            conn.watchdog.cancel()
        try:
            await conn.session.close()
        finally:
            await conn.pc.close()

    async def close_all(self) -> None:
        """Close every connection and wait for closes already under way."""
        ids = list(self._live)
        if ids:
            log.info("closing %d connection(s)", len(ids))
        await asyncio.gather(*(self.close(i) for i in ids), return_exceptions=True)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    async def _watch(self, conn: Connection, timeout_s: float) -> None:
        await asyncio.sleep(timeout_s)
        if conn.pc.connectionState != "connected" and conn.id in self._live:
            conn.log.warning("not connected after %.0f s", timeout_s)
            with contextlib.suppress(Exception):
                await self.close(conn.id)


__all__ = ["Connection", "ConnectionRegistry"]
