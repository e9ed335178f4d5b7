"""The daemon's periodic upkeep: WAL checkpoints, the report cache, leftovers, the C heap."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from agentd.daemonstatus import checkpoint_wal
from agentd.ledger import Ledger
from agentd.logs import get_logger

log = get_logger()


# How often the WAL's size is looked at, and the size that asks for a checkpoint at once,
# whatever `wal_checkpoint_s` says: 4 MB, which is SQLite's default autocheckpoint (1,000
# pages) at the 4 KiB pages of a ledger agentd created; a size, so any page size keeps it.
WAL_POLL_S = 2.0
WAL_CHECKPOINT_BYTES = 4_096_000


async def checkpoint_loop(ledger: Ledger, every_s: Callable[[], float]) -> None:
    """Checkpoint the WAL from a worker thread, so no commit on the event loop has to.

    Every `every_s()` seconds (read each round: a reload may change it), and sooner when the
    WAL passes `WAL_CHECKPOINT_BYTES`: a busy daemon's WAL stays small and the connection's
    own autocheckpoint (`ledger.WAL_AUTOCHECKPOINT_PAGES`), which would stall a call with
    page copies and an fsync, never fires. After each checkpoint, cache the report hours
    that closed since (`refresh_report_cache`).
    """
    wal = Path(f"{ledger.path}-wal")
    waited = 0.0
    while True:
        await asyncio.sleep(WAL_POLL_S)
        waited += WAL_POLL_S
        due = waited >= every_s()
        if not due and _size(wal) < WAL_CHECKPOINT_BYTES:
            continue
        try:
            busy, frames, done = await asyncio.to_thread(checkpoint_wal, ledger.path, 0)
        except Exception as exc:  # a failed checkpoint is retried next time
            log.warning("ledger.checkpoint_failed", error=str(exc))
        else:
            log.debug("ledger.checkpoint", busy=busy, wal_frames=frames, done=done)
        if due:  # the report cache moves by the hour: the periodic round is often enough
            waited = 0.0
            refresh_report_cache(ledger)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:  # no WAL at this moment
        return 0


def refresh_report_cache(ledger: Ledger) -> None:
    """Cache the hours that closed since the last round, so month-long reports find them.

    On the event loop (the ledger's connection belongs to it): in steady state one round sums
    the few calls of the hours that just closed. After a long stop only the last day is filled
    here; older hours stay holes for the report that asks for them.
    """
    from agentd import spendcache

    now = datetime.now(UTC)
    try:
        spendcache.refresh(ledger, now, since=now - timedelta(days=1))
    except Exception as exc:  # the next round, or a report, fills what this one could not
        log.warning("ledger.report_cache_failed", error=str(exc))


async def reconcile_loop(ledger: Ledger, every_s: float) -> None:
    """Settle dead processes' leftovers now and then, not only when the daemon starts.

    `reconcile_abandoned` touches only rows whose owner process is gone (never this daemon's
    own, nor a live `agentd once`'s); it charges their calls at the reservation.
    """
    from agentd.budgets import reconcile_abandoned

    while True:
        await asyncio.sleep(every_s)
        try:
            reconcile_abandoned(ledger)
        except Exception as exc:  # a busy or failing ledger is tried again next time
            log.warning("ledger.reconcile_failed", error=str(exc))


# How often the daemon hands freed C heap back to the kernel (`trim_heap`).
HEAP_TRIM_S = 300.0


def trim_heap() -> bool | None:
    """Give the C heap's free pages back to the kernel (glibc `malloc_trim`).

    True when some were released, False when none were, None without glibc. Freed memory
    otherwise stays in the process: connections dropped and opened again, SQLite statements
    and response bodies leave holes that glibc keeps, and a long-running daemon's RSS creeps
    up with no live object growing (`benchmarks/README.md`, §5).
    """
    import ctypes

    try:
        # The interpreter's own symbols include the C library it runs on.
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        return None
    malloc_trim.argtypes, malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return bool(malloc_trim(0))


async def heap_trim_loop(
    every_s: float = HEAP_TRIM_S, trim: Callable[[], bool | None] = trim_heap
) -> None:
    """`trim` every `every_s` seconds, on the event loop (it takes malloc's own locks, so a
    worker thread would stall the loop's allocations just the same; it takes milliseconds)."""
    while True:
        await asyncio.sleep(every_s)
        started = time.monotonic()
        released = trim()
        if released is None:
            return
        ms = round((time.monotonic() - started) * 1000, 2)
        log.debug("daemon.heap_trimmed", released=released, ms=ms)
