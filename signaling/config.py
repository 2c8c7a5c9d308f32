"""Server settings: ICE servers, limits and where the page lives."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiortc import RTCConfiguration, RTCIceServer

from agent.session import SessionConfig
from signaling.auth import AuthConfig

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
    # Further offers get 503 with Retry-After while this many sessions are live (0: refuse all,
    # e.g. to drain a server before maintenance).
    max_sessions: int = 32
    # Retry-After (seconds) sent with a 503 at the session limit.
    busy_retry_after_s: float = 10.0
    # A peer that has not connected by then is dropped (it may never come back).
    connect_timeout_s: float = 30.0
    # Offers per peer address: a token bucket of `offer_burst` refilled at this rate (429 beyond).
    offer_rate_per_minute: float = 30.0
    offer_burst: int = 10
    # Take the peer address from the last X-Forwarded-For entry (only behind a trusted proxy).
    trust_forwarded_for: bool = False
    # No inbound audio frame or client message for this long closes the session: browsers send
    # audio continuously (silence too), so this is how a vanished peer is noticed. 0 disables.
    idle_timeout_s: float = 10.0
    # A call is ended (after an `error` event telling the client why) at this length. 0 disables.
    max_duration_s: float = 3600.0
    # Sent to the client before a limit closes its session, so it can show why.
    close_notice_s: float = 0.5
    # Origins of other sites allowed to call this server from a page (CORS); "*" allows any.
    allowed_origins: tuple[str, ...] = ()
    session: SessionConfig = field(default_factory=SessionConfig)
    # Tokens for /offer, /config and /metrics; the default asks for none.
    auth: AuthConfig = field(default_factory=AuthConfig)
    # JSON lines describing each session's start and end; None writes none.
    audit_log: Path | None = None
    # 20 ms frames aiortc's receive jitter buffer holds back after the one it plays out (its
    # default, 4, delays the user's audio, and so every barge-in and end of turn, by 80 ms).
    # One packet per audio frame: reordering and loss are handled by sequence number whatever
    # this is, so 1 costs no robustness. None keeps aiortc's default.
    inbound_prefetch_frames: int | None = 1

    def __post_init__(self) -> None:
        if self.max_sessions < 0 or self.max_body_bytes < 1024:
            raise ValueError("max_sessions must be >= 0 and max_body_bytes >= 1024")
        if self.offer_rate_per_minute <= 0 or self.offer_burst < 1:
            raise ValueError("the offer rate must be positive and the burst at least 1")
        if min(self.idle_timeout_s, self.max_duration_s, self.connect_timeout_s) < 0:
            raise ValueError("timeouts cannot be negative")
        if self.inbound_prefetch_frames is not None and self.inbound_prefetch_frames < 1:
            raise ValueError("inbound_prefetch_frames must be >= 1 (or None)")

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
