"""Per-loop state kept in the ledger database: paused (and until when), so restarts resume it."""

from __future__ import annotations

from datetime import datetime

from agentd.ledger import Ledger, parse_iso, utc_iso


def paused_reason(ledger: Ledger, loop: str, now: datetime) -> str | None:
    """Why the loop is paused now, or None; a pause whose `paused_until` has passed is over."""
    with ledger.read() as conn:
        row = conn.execute(
            "SELECT paused, paused_reason, paused_until FROM loop_state WHERE loop = ?", (loop,)
        ).fetchone()
    if row is None or not row[0]:
        return None
    reason, until = row[1] or "paused", row[2]
    if until is not None:
        if parse_iso(until) <= now:
            return None
        return f"{reason} (until {until})"
    return str(reason)


def set_paused(ledger: Ledger, loop: str, reason: str, until: datetime | None) -> None:
    """Pause a loop, optionally until a moment (e.g. its budget window resets)."""
    with ledger.write() as conn:
        conn.execute(
            "INSERT INTO loop_state"
            " (loop, paused, paused_reason, paused_until, consecutive_failures)"
            " VALUES (?, 1, ?, ?, 0)"
            " ON CONFLICT(loop) DO UPDATE SET paused = 1, paused_reason = excluded.paused_reason,"
            " paused_until = excluded.paused_until",
            (loop, reason, utc_iso(until) if until is not None else None),
        )


def resume(ledger: Ledger, loop: str) -> bool:
    """Clear a loop's pause; returns whether it was paused."""
    with ledger.write() as conn:
        cur = conn.execute(
            "UPDATE loop_state SET paused = 0, paused_reason = NULL, paused_until = NULL"
            " WHERE loop = ? AND paused = 1",
            (loop,),
        )
        return cur.rowcount > 0


def record_run(ledger: Ledger, loop: str, run_id: int, status: str, slot: str | None) -> int:
    """Note a finished run; returns the loop's consecutive failures after it.

    A success resets the count and a failure adds one; skipped runs leave it as it was.
    """
    with ledger.write() as conn:
        conn.execute(
            "INSERT INTO loop_state (loop, paused, consecutive_failures) VALUES (?, 0, 0)"
            " ON CONFLICT(loop) DO NOTHING",
            (loop,),
        )
        if status == "ok":
            conn.execute("UPDATE loop_state SET consecutive_failures = 0 WHERE loop = ?", (loop,))
        elif status == "failed":
            conn.execute(
                "UPDATE loop_state SET consecutive_failures = consecutive_failures + 1"
                " WHERE loop = ?",
                (loop,),
            )
        conn.execute(
            "UPDATE loop_state SET last_run_id = ?, last_slot = COALESCE(?, last_slot)"
            " WHERE loop = ?",
            (run_id, slot, loop),
        )
        row = conn.execute(
            "SELECT consecutive_failures FROM loop_state WHERE loop = ?", (loop,)
        ).fetchone()
    return int(row[0])
