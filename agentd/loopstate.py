"""Per-loop state kept in the ledger database: pause, last slot and run, failure streak, backoff.

It lives in the `loop_state` table, so a restarted daemon resumes where the last one stopped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from agentd.ledger import Ledger, parse_iso, utc_iso
from agentd.loopconfig import OnFailure

# Errors no retry or backoff will fix: the loop is paused at once instead of burning its schedule.
PAUSE_AT_ONCE = ("auth_error", "billing_error")
_REASON_MAX = 300
# An anomaly pause's reason starts with the run that tripped the breaker (`guardrails`).
ANOMALY_PREFIX = "anomaly: run "
_ANOMALY_RUN = re.compile(r"^anomaly: run (\d+) ")


@dataclass(frozen=True)
class LoopState:
    """One loop's row of `loop_state` (defaults when the loop has never run)."""

    loop: str
    paused: bool = False
    paused_reason: str | None = None
    paused_until: str | None = None
    last_slot: str | None = None
    last_run_id: int | None = None
    consecutive_failures: int = 0


_COLUMNS = "loop, paused, paused_reason, paused_until, last_slot, last_run_id, consecutive_failures"


def _state(row: tuple[object, ...]) -> LoopState:
    loop, paused, reason, until, last_slot, last_run_id, failures = row
    return LoopState(
        loop=str(loop),
        paused=bool(paused),
        paused_reason=None if reason is None else str(reason),
        paused_until=None if until is None else str(until),
        last_slot=None if last_slot is None else str(last_slot),
        last_run_id=None if last_run_id is None else int(str(last_run_id)),
        consecutive_failures=int(str(failures or 0)),
    )


def get_state(ledger: Ledger, loop: str) -> LoopState:
    """The loop's state; a loop without a row gets the defaults."""
    with ledger.read() as conn:
        row = conn.execute(f"SELECT {_COLUMNS} FROM loop_state WHERE loop = ?", (loop,)).fetchone()
    return LoopState(loop) if row is None else _state(row)


def all_states(ledger: Ledger) -> dict[str, LoopState]:
    """Every loop's state that has a row, by loop name."""
    with ledger.read() as conn:
        rows = conn.execute(f"SELECT {_COLUMNS} FROM loop_state").fetchall()
    return {str(row[0]): _state(row) for row in rows}


def paused_reason(ledger: Ledger, loop: str, now: datetime) -> str | None:
    """Why the loop is paused now, or None; a pause whose `paused_until` has passed is over."""
    with ledger.read() as conn:
        row = conn.execute(
            "SELECT paused, paused_reason, paused_until FROM loop_state WHERE loop = ?", (loop,)
        ).fetchone()
    if row is None:
        return None
    return pause_of(LoopState(loop, bool(row[0]), row[1], row[2]), now)


def pause_of(state: LoopState, now: datetime) -> str | None:
    """Why a loop with this state is paused at `now`, or None (`paused_reason` without a query)."""
    if not state.paused:
        return None
    reason, until = state.paused_reason or "paused", state.paused_until
    if until is not None:
        if parse_iso(until) <= now:
            return None
        return f"{reason} (until {until})"
    return str(reason)


def set_paused(ledger: Ledger, loop: str, reason: str, until: datetime | None) -> None:
    """Pause a loop, optionally until a moment (e.g. its budget window resets)."""
    with ledger.write(calls=False) as conn:
        conn.execute(
            "INSERT INTO loop_state"
            " (loop, paused, paused_reason, paused_until, consecutive_failures)"
            " VALUES (?, 1, ?, ?, 0)"
            " ON CONFLICT(loop) DO UPDATE SET paused = 1, paused_reason = excluded.paused_reason,"
            " paused_until = excluded.paused_until",
            (loop, reason[:_REASON_MAX], utc_iso(until) if until is not None else None),
        )


def resume(ledger: Ledger, loop: str, now: datetime | None = None) -> bool:
    """Clear a loop's pause and its failure streak (so no backoff is left); was it paused?

    Resuming an anomaly pause also stamps `route.anomaly.resumed_at` on the run that tripped
    the breaker: the breaker's baseline starts after that run (`anomaly_history`).
    """
    with ledger.write(calls=False) as conn:
        row = conn.execute(
            "SELECT paused, paused_reason FROM loop_state WHERE loop = ?", (loop,)
        ).fetchone()
        conn.execute(
            "UPDATE loop_state SET paused = 0, paused_reason = NULL, paused_until = NULL,"
            " consecutive_failures = 0 WHERE loop = ?",
            (loop,),
        )
        was_paused = row is not None and bool(row[0])
        run_id = anomaly_run_id(row[1]) if was_paused else None
        if run_id is not None:
            at = utc_iso(now or datetime.now(UTC))
            conn.execute(
                "UPDATE runs SET route = json_set(COALESCE(route, '{}'), '$.anomaly.resumed_at', ?)"
                " WHERE id = ? AND loop = ?",
                (at, run_id, loop),
            )
    return was_paused


# ---------------------------------------------------------------------------- anomaly pauses


def anomaly_run_id(paused_reason: str | None) -> int | None:
    """The run id named by an anomaly pause reason (for `agentd status`), else None."""
    match = _ANOMALY_RUN.match(paused_reason or "")
    return int(match.group(1)) if match else None


def pause_for_anomaly(
    ledger: Ledger, loop: str, run_id: int, reason: str, details: Mapping[str, object]
) -> None:
    """Pause a loop for the anomaly of one of its runs, and note it in that run's `route`.

    `reason` must start with ANOMALY_PREFIX and the run id; `details` (the figures) go to
    `route.anomaly`, where `resume` later adds `resumed_at`.
    """
    if anomaly_run_id(reason) != run_id:
        raise ValueError(f"an anomaly pause reason must start with {ANOMALY_PREFIX}{run_id}")
    with ledger.write(calls=False) as conn:
        set_paused(ledger, loop, reason, None)
        conn.execute(
            "UPDATE runs SET route = json_set(COALESCE(route, '{}'), '$.anomaly', json(?))"
            " WHERE id = ? AND loop = ?",
            (json.dumps(dict(details), default=str), run_id, loop),
        )


def anomaly_history(
    ledger: Ledger, loop: str, before_run: int, simulated: bool, limit: int
) -> tuple[list[int], int | None]:
    """The costs of the loop's latest ok runs before `before_run`, newest first, that the
    anomaly breaker compares with: at most `limit`, and none from before the last resumed
    anomaly (of runs of the same kind); also the id of that anomaly run, or None.

    Only the `limit` latest runs are read (their routes parsed), so the cost does not grow with
    the loop's history: a resumed anomaly older than them cuts nothing off anyway.
    """
    with ledger.read() as conn:
        rows = conn.execute(
            "SELECT id, cost_micro_usd, json_extract(route, '$.anomaly.resumed_at') IS NOT NULL"
            " FROM runs WHERE loop = ? AND status = 'ok' AND simulated = ? AND id < ?"
            " ORDER BY started_at DESC, id DESC LIMIT ?",
            (loop, int(simulated), before_run, limit),
        ).fetchall()
    costs: list[int] = []
    for run_id, cost, resumed in rows:
        if resumed:
            return costs, int(run_id)
        costs.append(int(cost or 0))
    return costs, None


def set_last_slot(ledger: Ledger, loop: str, slot: str) -> None:
    """Mark a schedule slot as handled without a run (skipped by a pause or a backoff)."""
    with ledger.write(calls=False) as conn:
        conn.execute(
            "INSERT INTO loop_state (loop, paused, consecutive_failures, last_slot)"
            " VALUES (?, 0, 0, ?) ON CONFLICT(loop) DO UPDATE SET last_slot = excluded.last_slot",
            (loop, slot),
        )


def record_run(ledger: Ledger, loop: str, run_id: int, status: str, slot: str | None) -> int:
    """Note a finished run; returns the loop's consecutive failures after it.

    A success resets the count and a failure adds one; skipped runs leave it as it was.
    """
    with ledger.write(calls=False) as conn:
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


# ---------------------------------------------------------------------------- failures


def backoff_delay(on_failure: OnFailure, failures: int) -> float:
    """Seconds to wait after the n-th consecutive failure (the last value repeats); 0 for n=0."""
    if failures <= 0:
        return 0.0
    steps = on_failure.backoff_s
    return float(steps[min(failures, len(steps)) - 1])


def next_allowed_at(
    ledger: Ledger, loop: str, on_failure: OnFailure, failures: int | None = None
) -> datetime | None:
    """When a failing loop may run again: its last failed run's end plus the backoff; else None.

    Computed from the ledger (not kept in memory), so a restart keeps backing off.
    """
    if failures is None:
        failures = get_state(ledger, loop).consecutive_failures
    if failures <= 0:
        return None
    with ledger.read() as conn:
        row = conn.execute(
            "SELECT COALESCE(finished_at, started_at) FROM runs"
            " WHERE loop = ? AND status = 'failed' ORDER BY id DESC LIMIT 1",
            (loop,),
        ).fetchone()
    if row is None or row[0] is None:
        return None
    return parse_iso(str(row[0])) + timedelta(seconds=backoff_delay(on_failure, failures))


def failure_pause_reason(
    failures: int, on_failure: OnFailure, error_types: Iterable[str | None], error: str | None
) -> str | None:
    """Why a loop must be paused after a failed run, or None to let it back off and retry.

    Auth and billing errors pause at once; otherwise `pause_after` consecutive failures do.
    """
    last = " ".join((error or "unknown error").split())
    fatal = next((t for t in error_types if t in PAUSE_AT_ONCE), None)
    if fatal is not None:
        reason = f"{fatal} (pausing at once): {last}"
    elif failures >= on_failure.pause_after:
        reason = f"{failures} consecutive failures: {last}"
    else:
        return None
    return reason[:_REASON_MAX]
