"""The `events` data channel protocol: JSON objects with a `type` field.

This table is the single definition; `static/protocol.js` mirrors it for the browser and a test
keeps the two equal. Every message is one JSON object of at most MAX_MESSAGE_BYTES.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

DATA_CHANNEL_LABEL = "events"
MAX_MESSAGE_BYTES = 16_384
MAX_TEXT_CHARS = 2_000

STATES = ("listening", "thinking", "speaking")
ROLES = ("user", "assistant")

# type -> (direction, {field: python type}); direction is "server" (agent -> client) or "client".
MESSAGES: dict[str, tuple[str, dict[str, type | tuple[type, ...]]]] = {
    "state": ("server", {"state": str}),
    "transcript": ("server", {"role": str, "text": str, "final": bool}),
    "error": ("server", {"message": str}),
    "flush": ("server", {}),  # drop buffered agent audio now (barge-in)
    "duck": ("server", {}),  # the user may be barging in: mute agent audio until unduck/flush
    "unduck": ("server", {}),  # it was not a barge-in: unmute, the answer goes on
    "text": ("client", {"text": str}),
    "interrupt": ("client", {}),
}


class ProtocolError(ValueError):
    """A client message that cannot be accepted; the text is safe to send back."""


@dataclass(frozen=True)
class ClientMessage:
    type: str
    fields: dict[str, Any]


def encode(type_: str, **fields: Any) -> str:
    """Serialize a server message after checking it against the table."""
    spec = MESSAGES.get(type_)
    if spec is None or spec[0] != "server":
        raise ValueError(f"not a server message type: {type_!r}")
    _check_fields(type_, spec[1], fields)
    if type_ == "state" and fields["state"] not in STATES:
        raise ValueError(f"unknown state {fields['state']!r}")
    if type_ == "transcript" and fields["role"] not in ROLES:
        raise ValueError(f"unknown role {fields['role']!r}")
    return json.dumps({"type": type_, **fields}, ensure_ascii=False)


def decode_client(raw: str | bytes) -> ClientMessage:
    """Parse and validate a client message; raises ProtocolError saying what is wrong."""
    if isinstance(raw, bytes):
        if len(raw) > MAX_MESSAGE_BYTES:
            raise ProtocolError(f"message too large (limit {MAX_MESSAGE_BYTES} bytes)")
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError("message is not UTF-8 text") from exc
    if len(raw.encode("utf-8", "surrogatepass")) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message too large (limit {MAX_MESSAGE_BYTES} bytes)")
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError("message is not valid JSON") from exc
    if not isinstance(obj, dict):
        raise ProtocolError("message must be a JSON object")
    try:  # a \ud800-\udfff escape alone: not text, and nothing quoting it could be sent back
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ProtocolError(
            "message holds an unpaired surrogate escape (not Unicode text)"
        ) from exc
    type_ = obj.get("type")
    if not isinstance(type_, str):
        raise ProtocolError("message needs a string 'type' field")
    spec = MESSAGES.get(type_)
    if spec is None or spec[0] != "client":
        accepted = ", ".join(t for t, (d, _) in MESSAGES.items() if d == "client")
        raise ProtocolError(f"unknown message type {type_[:40]!r} (accepted: {accepted})")
    fields = {k: v for k, v in obj.items() if k != "type"}
    _check_fields(type_, spec[1], fields, error=ProtocolError)
    if type_ == "text":
        text = fields["text"].strip()
        if not text:
            raise ProtocolError("'text' must not be empty")
        if len(text) > MAX_TEXT_CHARS:
            raise ProtocolError(f"'text' is longer than {MAX_TEXT_CHARS} characters")
        fields["text"] = text
    return ClientMessage(type_, fields)


def _check_fields(
    type_: str,
    spec: dict[str, type | tuple[type, ...]],
    fields: dict[str, Any],
    error: type[Exception] = ValueError,
) -> None:
    for name, kind in spec.items():
        if name not in fields:
            raise error(f"'{type_}' message needs a '{name}' field")
        value = fields[name]
        # bool is an int subclass in Python: keep them apart so JSON true is never a number.
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            kind_name = (
                kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            )
            raise error(f"'{type_}.{name}' must be of type {kind_name}")
    extra = set(fields) - set(spec)
    if extra:
        raise error(f"'{type_}' message has unknown field(s): {', '.join(sorted(extra))[:80]}")
