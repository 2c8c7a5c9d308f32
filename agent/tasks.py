"""Cancelling owned tasks without hanging on one that swallows its cancellation."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

CANCEL_TIMEOUT_S = 2.0


async def cancel_and_wait(
    task: asyncio.Task[Any],
    logger: logging.Logger | logging.LoggerAdapter[Any],
    timeout_s: float = CANCEL_TIMEOUT_S,
) -> None:
    """Cancel `task` and wait for it to end; warn (and stop waiting) after `timeout_s`.

    Exceptions the task ends with are logged, not raised: the owner is tearing it down.
    """
    if task.done():
        return
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if not done:
        logger.warning("task %s ignored cancellation for %.1f s", task.get_name(), timeout_s)
        return
    if not task.cancelled() and task.exception() is not None:
        logger.error("task %s failed while stopping", task.get_name(), exc_info=task.exception())


__all__ = ["CANCEL_TIMEOUT_S", "cancel_and_wait"]
