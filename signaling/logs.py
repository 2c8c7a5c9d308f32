"""Log records tagged with the session they belong to, as text or JSON lines.

The signaling server sets `SESSION_ID` while it creates a session; every task started from there
(the session's own tasks, aiortc's transports, the close task) inherits it, so every record those
tasks log carries `record.session`. Records from outside any session carry "-".
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

SESSION_ID: contextvars.ContextVar[str] = contextvars.ContextVar("session_id", default="-")

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(session)s]: %(message)s"
LOG_FORMATS = ("text", "json")


class SessionFilter(logging.Filter):
    """Adds `record.session` (the current session id, or "-") to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "session"):
            record.session = SESSION_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, session, message (+ exception)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "session": getattr(record, "session", SESSION_ID.get()),
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str = "INFO", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Send every log record to `stream` (stderr) as text or JSON, tagged with its session."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {LOG_FORMATS}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(SessionFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


__all__ = ["LOG_FORMATS", "SESSION_ID", "JsonFormatter", "SessionFilter", "configure_logging"]
