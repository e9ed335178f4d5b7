"""One run of a loop at a time, across the scheduler, `trigger` and `agentd once` in any process."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from agentd.errors import LoopBusy


@contextlib.contextmanager
def loop_lock(state_dir: Path, loop: str) -> Iterator[None]:
    """Hold the loop's lock file for the duration of a run; raise LoopBusy if another holds it.

    flock locks belong to the open file description, so they conflict between processes and
    between two opens in one process alike, and the kernel drops them when a holder dies
    (even by kill -9): a crash never leaves a loop locked.
    """
    locks = state_dir / "locks"
    locks.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(locks / f"{loop}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LoopBusy(f"loop {loop!r} is already running") from None
        yield
    finally:
        os.close(fd)
