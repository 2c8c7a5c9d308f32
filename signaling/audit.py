"""An audit trail of calls: one JSON line per session start and end, appended to a file.

Records are queued (bounded: when the disk cannot keep up, records are dropped and counted, the
server never stalls) and written by one task that does the file I/O in a worker thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

from agent import metrics

log = logging.getLogger(__name__)

MAX_PENDING_RECORDS = 1024
CLOSE_TIMEOUT_S = 5.0


class AuditLog:
    """Appends JSON records to `path`; `start()` before use, `close()` flushes and stops."""

    def __init__(self, path: Path, max_pending: int = MAX_PENDING_RECORDS) -> None:
        self.path = path
        self._queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(maxsize=max_pending)
        self._writer: asyncio.Task[None] | None = None
        self.dropped = 0

    def start(self) -> None:
        """Start the writer task (once, inside the running loop)."""
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = asyncio.create_task(self._write_loop(), name="audit-writer")

    def record(self, event: str, **fields: Any) -> None:
        """Queue one record (never blocks; dropped and counted when the queue is full)."""
        try:
            self._queue.put_nowait({"event": event, **fields})
        except asyncio.QueueFull:
            self.dropped += 1
            metrics.AUDIT_RECORDS_DROPPED_TOTAL.inc()
        metrics.QUEUE_DEPTH.labels(queue="audit").set(self._queue.qsize())

    async def close(self) -> None:
        """Write what is queued, then stop the writer (giving up after CLOSE_TIMEOUT_S)."""
        writer, self._writer = self._writer, None
        if writer is None:
            return
        try:
            await asyncio.wait_for(self._queue.put(None), CLOSE_TIMEOUT_S)
            await asyncio.wait({writer}, timeout=CLOSE_TIMEOUT_S)
        except TimeoutError:
            pass
        if not writer.done():
            log.warning("the audit writer did not finish in %.0f s", CLOSE_TIMEOUT_S)
            writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)

    async def _write_loop(self) -> None:
        while True:
            batch = await self._next_batch()
            lines = [json.dumps(r, ensure_ascii=False, default=str) for r in batch if r]
            if lines:
                try:
                    await asyncio.to_thread(self._append, lines)
                except OSError:
                    log.exception("cannot write the audit log %s", self.path)
            metrics.QUEUE_DEPTH.labels(queue="audit").set(self._queue.qsize())
            if None in batch:
                return

    async def _next_batch(self) -> list[dict[str, Any] | None]:
        batch = [await self._queue.get()]
        while not self._queue.empty() and batch[-1] is not None:
            batch.append(self._queue.get_nowait())
        return batch

    def _append(self, lines: list[str]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")


__all__ = ["AuditLog"]
