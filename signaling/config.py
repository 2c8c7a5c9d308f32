"""Server settings: ICE servers, limits and where the page lives."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiortc import RTCConfiguration, RTCIceServer

from agent.session import EchoCanceller, SessionConfig

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"


@dataclass(frozen=True)
class IceServer:
    """One STUN or TURN server, as both the browser and the server's peer connection use it."""

    urls: tuple[str, ...]
    username: str | None = None
    credential: str | None = None

    def __post_init__(self) -> None:
        if not self.urls:
            raise ValueError("an ICE server needs at least one URL")
        for url in self.urls:
            if not url.startswith(("stun:", "stuns:", "turn:", "turns:")):
                raise ValueError(f"not a STUN/TURN URL: {url!r}")

    def to_json(self) -> dict[str, Any]:
        """The browser's RTCIceServer dictionary."""
        entry: dict[str, Any] = {"urls": list(self.urls)}
        if self.username is not None:
            entry["username"] = self.username
        if self.credential is not None:
            entry["credential"] = self.credential
        return entry

    def to_rtc(self) -> RTCIceServer:
        return RTCIceServer(list(self.urls), self.username, self.credential)


@dataclass(frozen=True)
class ServerConfig:
    """Everything the HTTP side needs; defaults suit a local demo."""

    # Empty means host candidates only (aiortc would otherwise query a public STUN server).
    ice_servers: tuple[IceServer, ...] = ()
    static_dir: Path = STATIC_DIR
    # An SDP offer is a few kB; anything far larger is refused with 413.
    max_body_bytes: int = 64 * 1024
    max_sessions: int = 32
    # A peer that has not connected by then is dropped (it may never come back).
    connect_timeout_s: float = 30.0
    # Origins of other sites allowed to call this server from a page (CORS); "*" allows any.
    allowed_origins: tuple[str, ...] = ()
    session: SessionConfig = field(default_factory=SessionConfig)
    # Builds one server-side echo canceller per session; None relies on the browser's AEC.
    echo_canceller_factory: Callable[[], EchoCanceller] | None = None

    def allows_origin(self, origin: str) -> bool:
        return "*" in self.allowed_origins or origin in self.allowed_origins

    def rtc_configuration(self) -> RTCConfiguration:
        return RTCConfiguration(iceServers=[s.to_rtc() for s in self.ice_servers])

    def client_config(self) -> dict[str, Any]:
        """What `GET /config` tells the page."""
        return {"iceServers": [s.to_json() for s in self.ice_servers]}


def ice_servers_from_urls(
    urls: list[str], username: str | None = None, credential: str | None = None
) -> tuple[IceServer, ...]:
    """One IceServer per URL; the credentials go to TURN URLs only (STUN takes none)."""
    servers = []
    for url in urls:
        is_turn = url.startswith(("turn:", "turns:"))
        servers.append(
            IceServer(
                (url,),
                username if is_turn else None,
                credential if is_turn else None,
            )
        )
    return tuple(servers)


__all__ = ["STATIC_DIR", "IceServer", "ServerConfig", "ice_servers_from_urls"]
