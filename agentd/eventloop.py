"""The running asyncio loop and task, asked without importing asyncio.

A read-only command (`agentd ledger`) never imports asyncio (~20 ms): without it imported no
loop can be running, so these answer None instead of importing it to find out.
"""

from __future__ import annotations

import sys
from typing import Any


def running_loop() -> Any:
    """The running asyncio event loop, or None."""
    asyncio = sys.modules.get("asyncio")
    if asyncio is None:
        return None
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def current_task() -> object | None:
    """The running asyncio task, or None."""
    asyncio = sys.modules.get("asyncio")
    if asyncio is None:
        return None
    try:
        task: object | None = asyncio.current_task()
    except RuntimeError:
        return None
    return task
