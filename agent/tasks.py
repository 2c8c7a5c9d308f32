"""Cancelling owned tasks without hanging on one that swallows its cancellation, and running
long blocking work (model loading) so that cancelling it does not hold up the program's exit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

CANCEL_TIMEOUT_S = 2.0

T = TypeVar("T")


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


async def in_daemon_thread(fn: Callable[[], T], name: str) -> T:
    """`fn()` on a daemon thread of its own, awaited.

    Unlike `asyncio.to_thread`, whose executor threads are joined when the loop and the
    program end, cancelling this await (Ctrl-C during a model load of minutes) lets the
    program exit at once: the thread is abandoned, and its result or error is dropped.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():  # the await was cancelled
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        result: T | None = None
        error: BaseException | None = None
        try:
            result = fn()
        except BaseException as exc:  # handed to the awaiting task
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name=name, daemon=True).start()
    return await future


__all__ = ["CANCEL_TIMEOUT_S", "cancel_and_wait", "in_daemon_thread"]
