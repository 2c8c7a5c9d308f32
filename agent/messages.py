"""The `events` data channel as seen by a session: outgoing queue, incoming validation.

Outgoing messages sent before the channel is open are held (up to a bound) and sent on open.
Incoming messages are validated with `agent.protocol.decode_client`; anything malformed is
answered with an `error` event and never reaches the session.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from agent import metrics
from agent.protocol import ClientMessage, ProtocolError, decode_client, encode

MAX_PENDING_MESSAGES = 256


class DataChannel(Protocol):
    """The parts of `aiortc.RTCDataChannel` a session uses."""

    label: str

    @property
    def readyState(self) -> str: ...  # noqa: N802 - aiortc's name

    def send(self, data: str | bytes) -> None: ...
    def on(self, event: str, f: Callable[..., Any] | None = None) -> Any: ...


class EventChannel:
    """Sends server messages and hands valid client messages to `on_message`."""

    def __init__(
        self,
        on_message: Callable[[ClientMessage], None],
        logger: logging.Logger | logging.LoggerAdapter[Any] | None = None,
    ) -> None:
        self._on_message = on_message
        self._log = logger or logging.getLogger(__name__)
        self._channel: DataChannel | None = None
        self._pending: deque[str] = deque(maxlen=MAX_PENDING_MESSAGES)

    @property
    def is_open(self) -> bool:
        return self._channel is not None and self._channel.readyState == "open"

    def attach(self, channel: DataChannel) -> None:
        """Use `channel` from now on; held messages go out once it is open."""
        self._channel = channel
        channel.on("message", self.receive)
        channel.on("open", self._send_pending)
        if channel.readyState == "open":
            self._send_pending()

    def send(self, message: str) -> None:
        """Send one encoded server message (held until the channel is open)."""
        if not self.is_open:
            self._pending.append(message)
            return
        self._send_now(message)

    def receive(self, raw: str | bytes) -> None:
        """Validate one incoming message; errors are reported back to the client."""
        try:
            message = _decode(raw)
        except ProtocolError as exc:
            self._log.info("rejected client message: %s", exc)
            metrics.ERRORS_TOTAL.labels(kind="protocol").inc()
            self.send(encode("error", message=str(exc)))
            return
        self._on_message(message)

    def _send_pending(self) -> None:
        while self._pending and self.is_open:
            self._send_now(self._pending.popleft())

    def _send_now(self, message: str) -> None:
        assert self._channel is not None
        try:
            self._channel.send(message)
        except Exception as exc:  # a closing SCTP transport raises; the peer is gone anyway
            self._log.debug("could not send on the events channel: %s", exc)


def _decode(raw: object) -> ClientMessage:
    if not isinstance(raw, str | bytes):
        raise ProtocolError("message must be text")
    return decode_client(raw)


__all__ = ["DataChannel", "EventChannel"]
