"""Retention: `agentd ledger prune` rolls old calls and runs up into daily totals, deletes them.

What is never deleted:

- anything a live budget window still sums: the cutoff may not be later than the earliest start
  of the current hour, day, week or month window (the longest periods), computed in the
  config's time zone — without one, 14 hours earlier than in UTC, which covers every zone;
- calls still `pending` or `submitted`, and their runs; runs still `running`;
- the runs the daemon reads back: each loop's latest run of every status (failure backoff),
  its latest `ok` run with a reply (the `last_reply` context source), and `loop_state`'s
  `last_run_id`;
- a run any of whose calls is kept, and the calls of a kept run (a run and its calls go together).

Pruning works on whole UTC days before the cutoff (a DATE is floored to UTC midnight), one write
transaction per day, so the daemon's reservations never wait long. With the roll-up (the
default), each day's calls are summed into `daily_rollup` in the same transaction that deletes
them, so every call is counted exactly once — as a row or inside a roll-up row — and reports
(`agentd.spend`) add both sources without double counting. The roll-up keeps the list cost
too, so a pruned day's saving against list price is still reported. A roll-up row of skipped
runs (no calls: tier, model and provider are '') names their status in `purpose`, so reports
still count the no-op ticks (`skipped_noop`) apart; rows rolled up before that have ''.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

from agentd.budgets import PERIODS, window_bounds
from agentd.errors import EXIT_USAGE, AgentdError
from agentd.ledger import SKIPPED_RUN_STATUSES, Ledger, parse_iso, utc_iso
from agentd.pricing import format_usd
from agentd.spendcache import forget_day

# The widest UTC offset east (UTC+14): a local midnight is at most this much before UTC's.
_MAX_EAST = timedelta(hours=14)
_UNSETTLED = "('pending', 'submitted')"
_SKIPPED = "(" + ", ".join(f"'{s}'" for s in SKIPPED_RUN_STATUSES) + ")"

# The runs and calls of one UTC day that may go (see the module docstring).
_SETS = f"""
WITH pr(id) AS (
    SELECT r.id FROM runs r
    WHERE r.started_at >= :day AND r.started_at < :next AND r.status != 'running'
      AND r.id NOT IN (SELECT value FROM json_each(:protected))
      AND NOT EXISTS (
          SELECT 1 FROM calls k WHERE k.run_id = r.id
          AND (k.started_at >= :cutoff OR k.status IN {_UNSETTLED}))
),
pc(id) AS (
    SELECT c.id FROM calls c WHERE c.run_id IN (SELECT id FROM pr)
    UNION ALL
    SELECT c.id FROM calls c
    WHERE c.run_id IS NULL AND c.started_at >= :day AND c.started_at < :next
      AND c.status NOT IN {_UNSETTLED}
)
"""
_COUNT = (
    _SETS + "SELECT (SELECT COUNT(*) FROM pr), (SELECT COUNT(*) FROM pc),"
    " (SELECT COALESCE(SUM(COALESCE(cost_micro_usd, reserved_micro_usd)), 0) FROM calls"
    "  WHERE id IN (SELECT id FROM pc))"
)
_ROLLUP_CALLS = (
    _SETS
    + """
INSERT INTO daily_rollup (day, loop, tier, model, provider, purpose, simulated, runs, fallbacks,
    calls, failed, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens,
    reasoning_tokens, cost_micro_usd, latency_count, latency_ms_sum, list_cost_micro_usd)
SELECT substr(c.started_at, 1, 10), c.loop, COALESCE(c.tier, ''), c.model, c.provider,
    c.purpose, c.simulated,
    SUM(c.attempt = 1 AND c.run_id IS NOT NULL),
    SUM(c.attempt = 1 AND COALESCE(r.fallback, 0) = 1),
    COUNT(*), SUM(c.status IN ('error', 'aborted')),
    COALESCE(SUM(c.input_tokens), 0), COALESCE(SUM(c.output_tokens), 0),
    COALESCE(SUM(c.cache_read_tokens), 0), COALESCE(SUM(c.cache_write_tokens), 0),
    COALESCE(SUM(c.reasoning_tokens), 0),
    COALESCE(SUM(COALESCE(c.cost_micro_usd, c.reserved_micro_usd)), 0),
    COUNT(c.latency_ms), COALESCE(SUM(c.latency_ms), 0),
    COALESCE(SUM(COALESCE(c.list_cost_micro_usd, c.cost_micro_usd, c.reserved_micro_usd)), 0)
FROM calls c LEFT JOIN runs r ON r.id = c.run_id
WHERE c.id IN (SELECT id FROM pc)
GROUP BY 1, 2, 3, 4, 5, 6, 7
ON CONFLICT (day, loop, tier, model, provider, purpose, simulated) DO UPDATE SET
    runs = runs + excluded.runs, fallbacks = fallbacks + excluded.fallbacks,
    calls = calls + excluded.calls, failed = failed + excluded.failed,
    input_tokens = input_tokens + excluded.input_tokens,
    output_tokens = output_tokens + excluded.output_tokens,
    cache_read_tokens = cache_read_tokens + excluded.cache_read_tokens,
    cache_write_tokens = cache_write_tokens + excluded.cache_write_tokens,
    reasoning_tokens = reasoning_tokens + excluded.reasoning_tokens,
    cost_micro_usd = cost_micro_usd + excluded.cost_micro_usd,
    latency_count = latency_count + excluded.latency_count,
    latency_ms_sum = latency_ms_sum + excluded.latency_ms_sum,
    list_cost_micro_usd = COALESCE(list_cost_micro_usd, cost_micro_usd)
        + excluded.list_cost_micro_usd
"""
)
_ROLLUP_SKIPPED = (
    _SETS
    + f"""
INSERT INTO daily_rollup (day, loop, tier, model, provider, purpose, simulated, skipped,
    list_cost_micro_usd)
SELECT substr(started_at, 1, 10), loop, '', '', '', status, simulated, COUNT(*), 0
FROM runs WHERE id IN (SELECT id FROM pr) AND status IN {_SKIPPED}
GROUP BY 1, 2, 6, 7
ON CONFLICT (day, loop, tier, model, provider, purpose, simulated) DO UPDATE SET
    skipped = skipped + excluded.skipped
"""
)
_DELETE_CALLS = _SETS + "DELETE FROM calls WHERE id IN (SELECT id FROM pc)"
_DELETE_RUNS = _SETS + "DELETE FROM runs WHERE id IN (SELECT id FROM pr)"


class PruneRefused(AgentdError):
    """The cutoff would delete rows a live budget window still needs."""

    exit_code = EXIT_USAGE


@dataclass(frozen=True)
class PruneResult:
    """What a prune removed (or, with `dry_run`, would remove) and what it kept."""

    cutoff: datetime
    dry_run: bool
    runs: int
    calls: int
    cost_micro_usd: int
    days: int
    kept_unsettled: int
    kept_protected: int
    rolled_up: bool
    vacuumed: bool

    def describe(self) -> str:
        """One paragraph for the terminal."""
        verb = "would prune" if self.dry_run else "pruned"
        day = self.cutoff.date().isoformat()
        text = (
            f"{verb} {self.calls} call(s) and {self.runs} run(s) from before {day} (UTC)"
            f" over {self.days} day(s), ${format_usd(self.cost_micro_usd)} of spend"
        )
        if self.rolled_up:
            text += ", kept as daily totals in daily_rollup"
        else:
            text += ", without a roll-up (reports lose those totals)"
        kept = []
        if self.kept_unsettled:
            kept.append(f"{self.kept_unsettled} call(s) still in flight")
        if self.kept_protected:
            kept.append(f"{self.kept_protected} run(s) the daemon still reads")
        if kept:
            text += "; kept " + " and ".join(kept)
        if self.vacuumed:
            text += "; database vacuumed"
        return text + "."


def earliest_live_start(now: datetime, tz: ZoneInfo | None) -> datetime:
    """The earliest start of any budget window that applies at `now` (hour to month)."""
    zone = tz or ZoneInfo("UTC")
    start = min(window_bounds(period, now, zone)[0] for period in PERIODS)
    return start if tz is not None else start - _MAX_EAST


def _utc_midnight(at: datetime) -> datetime:
    return datetime.combine(at.astimezone(UTC).date(), time(0), tzinfo=UTC)


def _protected(ledger: Ledger) -> list[int]:
    """Runs the daemon reads back: latest per loop and status, latest replied ok, last_run_id."""
    with ledger.read() as conn:
        rows = conn.execute(
            "SELECT MAX(id) FROM runs GROUP BY loop, simulated, status"
            " UNION SELECT MAX(id) FROM runs WHERE status = 'ok' AND reply IS NOT NULL"
            " GROUP BY loop, simulated"
            " UNION SELECT last_run_id FROM loop_state WHERE last_run_id IS NOT NULL"
        ).fetchall()
    return sorted(int(r[0]) for r in rows if r[0] is not None)


def _next_day(conn: sqlite3.Connection, after: datetime, cutoff: datetime) -> datetime | None:
    """The UTC midnight of the next day at or after `after` with rows before the cutoff."""
    row = conn.execute(
        "SELECT MIN(t) FROM ("
        " SELECT MIN(started_at) AS t FROM runs WHERE started_at >= ? AND started_at < ?"
        " UNION ALL SELECT MIN(started_at) FROM calls"
        " WHERE run_id IS NULL AND started_at >= ? AND started_at < ?)",
        (utc_iso(after), utc_iso(cutoff)) * 2,
    ).fetchone()
    if row is None or row[0] is None:
        return None
    return _utc_midnight(parse_iso(str(row[0])))


def prune(
    ledger: Ledger,
    before: datetime,
    *,
    now: datetime,
    tz: ZoneInfo | None,
    dry_run: bool = False,
    rollup: bool = True,
    vacuum: bool = False,
) -> PruneResult:
    """Delete whole UTC days of calls and runs before `before` (see the module docstring).

    Raises `PruneRefused` when the cutoff reaches into a live budget window.
    """
    cutoff = _utc_midnight(before)
    live = earliest_live_start(now, tz)
    if cutoff > live:
        raise PruneRefused(
            f"refusing to prune rows from before {cutoff.date().isoformat()} (UTC): rows from "
            f"{utc_iso(live)} on are still summed by a live budget window (this week or month"
            f"{'' if tz else ', in any time zone: no config was given'}); "
            f"the latest allowed --before is {_utc_midnight(live).date().isoformat()}"
        )
    protected = _protected(ledger)
    params = {"cutoff": utc_iso(cutoff), "protected": json.dumps(protected)}
    runs = calls = cost = days = 0
    day = datetime(1, 1, 1, tzinfo=UTC)
    while True:
        with ledger.read() as conn:
            found = _next_day(conn, day, cutoff)
        if found is None:
            break
        day = found
        following = day + timedelta(days=1)
        step = {**params, "day": utc_iso(day), "next": utc_iso(min(following, cutoff))}
        if dry_run:
            with ledger.read() as conn:
                n_runs, n_calls, spent = conn.execute(_COUNT, step).fetchone()
        else:
            # One transaction per day: the roll-up and the deletes it accounts for commit
            # together, and the daemon's write lock is never held for long.
            with ledger.write() as conn:
                n_runs, n_calls, spent = conn.execute(_COUNT, step).fetchone()
                if rollup:
                    conn.execute(_ROLLUP_CALLS, step)
                    conn.execute(_ROLLUP_SKIPPED, step)
                conn.execute(_DELETE_CALLS, step)
                forget_day(conn, day, min(following, cutoff))
                conn.execute(_DELETE_RUNS, step)
        if n_runs or n_calls:
            days += 1
        runs += int(n_runs)
        calls += int(n_calls)
        cost += int(spent)
        day = following
    with ledger.read() as conn:
        kept_unsettled = conn.execute(
            f"SELECT COUNT(*) FROM calls WHERE status IN {_UNSETTLED} AND started_at < ?",
            (utc_iso(cutoff),),
        ).fetchone()[0]
        kept_protected = conn.execute(
            "SELECT COUNT(*) FROM runs WHERE started_at < ?"
            " AND id IN (SELECT value FROM json_each(?))",
            (utc_iso(cutoff), json.dumps(protected)),
        ).fetchone()[0]
    vacuumed = False
    if vacuum and not dry_run:
        ledger.vacuum()
        vacuumed = True
    return PruneResult(
        cutoff=cutoff,
        dry_run=dry_run,
        runs=runs,
        calls=calls,
        cost_micro_usd=cost,
        days=days,
        kept_unsettled=int(kept_unsettled),
        kept_protected=int(kept_protected),
        rolled_up=rollup,
        vacuumed=vacuumed,
    )
