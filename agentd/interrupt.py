"""SIGTERM as cancellation: a one-shot command stops the way Ctrl-C stops it, and records it."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Coroutine
from typing import Any, TypeVar

from agentd.errors import Terminated

T = TypeVar("T")


async def cancelled_by_sigterm(work: Coroutine[Any, Any, T]) -> T:
    """Await `work`; SIGTERM cancels it as Ctrl-C does (runs end `aborted`), then Terminated.

    Without this, SIGTERM would kill the process at once and leave its call `pending` and its
    run `running`, holding their reservation until another process reconciles them.
    """
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    terminated = False

    def on_sigterm() -> None:
        nonlocal terminated
        terminated = True
        task.cancel()

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    try:
        return await work
    except asyncio.CancelledError:
        if terminated:
            raise Terminated("terminated by SIGTERM") from None
        raise
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
