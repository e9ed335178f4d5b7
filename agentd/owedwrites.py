"""Ledger writes owed by the call path: a finished attempt's settle, written just after its reply.

Why owe them: the settle is the second durable SQLite transaction of every attempt, and the
caller (the loop's next step, or the next call of a cascade) does not need it to use the reply.
The reservation is what keeps every budget safe, and until its settle is written the row still
counts at that reservation, which is never less than the cost: owing a settle can only make a
budget look fuller for a moment, never emptier. So the executor hands the reply back first and
the settle follows on the next turn of the event loop.

Where they are written (`Ledger` does it; nothing here touches SQLite):

- inside the next write transaction of the same `Ledger`, before its own statements: a
  reservation that follows carries the previous attempt's settle in the same COMMIT, and a
  run's finish always sees its calls settled;
- before the next read through the `Ledger` (its own transaction), so this process always
  reads its own writes;
- by `Ledger.flush`, which the recorder schedules on the event loop's next turn after each
  attempt, and which `Ledger.close` calls.

What a write may do when it fails: an SQLite error (disk full, the busy timeout) is the
ledger's state, not the write's, so the write stays owed and the transaction that carried it
fails with that error (a reservation then makes no call). Any other exception is a bug in that
one write; it is logged and dropped rather than block every later transaction. A process
killed with writes still owed leaves their rows `pending`: the next start reconciles them at
their reservation, as for a kill during the call.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass

from agentd.logs import get_logger


@dataclass(frozen=True)
class OwedWrite:
    """A write to run inside a ledger transaction, and what to do once it is committed."""

    write: Callable[[], object]
    after_commit: Callable[[], object] | None = None
    label: str = "write"


def run_writes(items: list[OwedWrite]) -> list[OwedWrite]:
    """Run owed writes inside the caller's transaction; the ones to confirm after its COMMIT.

    An SQLite error propagates (the caller rolls back and restores every item); any other
    exception drops only its own write, logged as `ledger.owed_write_failed`.
    """
    done: list[OwedWrite] = []
    for item in items:
        try:
            item.write()
        except sqlite3.Error:
            raise
        except Exception as exc:
            get_logger().error(
                "ledger.owed_write_failed", write=item.label, error=f"{type(exc).__name__}: {exc}"
            )
            continue
        done.append(item)
    return done


def confirm(items: list[OwedWrite]) -> None:
    """Run the after-commit part of written items (their log events)."""
    for item in items:
        if item.after_commit is not None:
            item.after_commit()
