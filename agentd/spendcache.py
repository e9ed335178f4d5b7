"""A derived cache of per-UTC-hour call sums, so reports over long ranges skip most raw rows.

`report_hours` holds one row per cached hour and (loop, tier, model, provider, purpose,
simulated, alias, batch, band): the sums a spend report needs and a histogram of latencies over
fixed buckets (`HIST_BOUNDS`). The exact p95 merges the histograms to find the bucket holding
the rank, then reads only that bucket's raw latencies through the `calls_latency` index.
Spend reports sum over the key, so its extra columns change none of their figures; alias,
batch flag, `band` (how many of the input-size thresholds in `report_cache.bands` a call's input
exceeds) and the `ok_*` sums of `ok` calls alone are what `agentd reprice` needs
(`repricesources`).

`report_days` holds the same sums per UTC day, for days whose every hour is cached (a day
with a hole has none), so long ranges read a row per day and key rather than per hour.

Which hours are cached: every hour before the watermark `report_cache.through` except the
`report_holes`. An hour is cached only once it is *closed*: it ended more than `SETTLE_MARGIN`
ago (new calls are written with `started_at` = now) and it holds no `pending`/`submitted`
call. A settled call never changes again (the ledger is append-only history plus the
`pending → ok|error|aborted` transition; `reconcile_abandoned` and the daemon's shutdown only
touch unsettled rows), so a cached hour stays exact until `prune` deletes raw rows: prune
deletes the cached hours it covers and turns them into holes (its roll-up carries the pruned
calls; what it keeps is read raw). An hour with unsettled calls becomes a hole and is retried
on the next fill. Runs (fallbacks, skipped) are never cached: a run's fallback flag is set
when the run ends, possibly hours after its first attempt.

Calendar groupings in zones whose offsets are not whole hours read raw rows (see `spend`).
The cache is filled lazily by reports (`refresh`), in chunks of `CHUNK` per write transaction
so the daemon's writers never wait long, and only from the start of the report's range: the
hours between the watermark and that start become holes, filled when a report reaches back to
them. A read-only ledger uses what is cached and reads the rest raw.

Whoever records a hole drops that hour's `report_hours` rows and its day's `report_days` row
in the same transaction (late hours in `refresh`, `forget_day` in a prune; a skipped gap and
an unsettled hour were never cached): a refresh rewrites only the hours that newly became
holes, and relies on that.
"""

from __future__ import annotations

import bisect
import json
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from agentd.ledger import Ledger

HIST_BOUNDS: tuple[int, ...] = (0, *sorted({int(50 * 1.15**i) for i in range(63)}))
HIST_COLUMNS: tuple[str, ...] = tuple(f"l{i:02d}" for i in range(len(HIST_BOUNDS)))
SETTLE_MARGIN = timedelta(hours=1)
CHUNK = timedelta(days=7)
_UNSETTLED = "status IN ('pending', 'submitted')"
_KEY = "loop, tier, model, provider, purpose, simulated, alias, batch"
# The input-size thresholds at which a built-in (genai-prices) price of an Anthropic or OpenAI
# model changes, ascending (a test checks the snapshot against it). A cached row's `band`
# counts how many of them its calls' input exceeds, so a price whose thresholds are all here
# has one rate per band. The list a cache was filled with is kept in `report_cache.bands`;
# `refresh` empties a cache filled with another list.
BANDS: tuple[int, ...] = (100_000, 200_000, 272_000)
# The sums of `ok` calls alone (failed calls have no token counts to re-price).
OK_NAMES = (
    "ok_calls",
    "ok_cost_micro_usd",
    "ok_input_tokens",
    "ok_cache_read_tokens",
    "ok_cache_write_tokens",
    "ok_cache_write_1h_tokens",
    "ok_output_tokens",
)
_OK_SUMS = "SUM(status = 'ok'), " + ", ".join(
    f"SUM(CASE WHEN status = 'ok' THEN {name[3:]} END)" for name in OK_NAMES[1:]
)
SUM_NAMES = (
    "calls",
    "failed",
    "runs",
    "input_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
    "cost_micro_usd",
    "latency_count",
    "latency_ms_sum",
    "list_cost_micro_usd",
)
# A NULL list cost means "no saving known": the cost itself. Cache rows written by a version
# before m012 (a downgrade, then an upgrade) hold NULL there too, hence the COALESCE on read.
LIST_COST_SUM = "SUM(COALESCE(list_cost_micro_usd, cost_micro_usd))"


def sums_sql(names: tuple[str, ...] = SUM_NAMES) -> str:
    """`SUM(...)` of each summed column of `report_hours`/`report_days`/`daily_rollup`."""
    return ", ".join(LIST_COST_SUM if n == "list_cost_micro_usd" else f"SUM({n})" for n in names)


def _hist_sql() -> str:
    parts = []
    for i, lo in enumerate(HIST_BOUNDS):
        cond = "latency_ms < " + str(HIST_BOUNDS[1]) if i == 0 else f"latency_ms >= {lo}"
        if 0 < i < len(HIST_BOUNDS) - 1:
            cond += f" AND latency_ms < {HIST_BOUNDS[i + 1]}"
        parts.append(f"COALESCE(SUM({cond}), 0)")
    return ", ".join(parts)


def band_sql(thresholds: Iterable[int]) -> str:
    """How many of `thresholds` a call's input exceeds (0 for a call without token counts)."""
    exceeds = " + ".join(f"(input_tokens > {int(t)})" for t in thresholds)
    return f"COALESCE({exceeds}, 0)" if exceeds else "0"


_COLUMNS = f"{_KEY}, band, {', '.join(SUM_NAMES)}, {', '.join(OK_NAMES)}, {', '.join(HIST_COLUMNS)}"
_FILL = (
    f"INSERT INTO report_hours (hour, {_COLUMNS})"
    f" SELECT substr(started_at, 1, 13), {_KEY}, {band_sql(BANDS)}, COUNT(*),"
    " SUM(status IN ('error', 'aborted')),"
    " SUM(attempt = 1 AND run_id IS NOT NULL), SUM(input_tokens), SUM(cache_read_tokens),"
    " SUM(cache_write_tokens), SUM(output_tokens), SUM(reasoning_tokens),"
    " SUM(COALESCE(cost_micro_usd, reserved_micro_usd)), COUNT(latency_ms), SUM(latency_ms),"
    " SUM(COALESCE(list_cost_micro_usd, cost_micro_usd, reserved_micro_usd)),"
    f" {_OK_SUMS}, {_hist_sql()}"
    " FROM calls INDEXED BY calls_started_at WHERE started_at >= ? AND started_at < ?"
    " AND substr(started_at, 1, 13) NOT IN (SELECT value FROM json_each(?))"
    f" GROUP BY 1, {_KEY}, {len(_KEY.split(',')) + 2}"
)


_ROLL_DAY = (
    f"INSERT INTO report_days (day, {_COLUMNS})"
    f" SELECT substr(hour, 1, 10), {_KEY}, band, {sums_sql()},"
    f" {', '.join(f'SUM({c})' for c in (*OK_NAMES, *HIST_COLUMNS))}"
    f" FROM report_hours WHERE hour >= ? AND hour < ? GROUP BY 1, {_KEY}, band"
)


def _roll_days(conn: sqlite3.Connection, days: set[str]) -> None:
    """Rebuild the day sums of days whose every hour is cached (drop the others')."""
    if not days:
        return
    through, holes = state(conn)
    hole_days = {h[:10] for h in holes}
    for day in sorted(days):
        start = hour_start(day + "T00")
        following = hour_key(start + timedelta(days=1))
        conn.execute("DELETE FROM report_days WHERE day = ?", (day,))
        if following <= through and day not in hole_days:
            conn.execute(_ROLL_DAY, (day + "T00", following))


def _days(start: str, end: str) -> set[str]:
    """The UTC days overlapping hours [start, end)."""
    out, cur = set(), hour_start(start[:10] + "T00")
    while hour_key(cur) < end:
        out.add(cur.date().isoformat())
        cur += timedelta(days=1)
    return out


def bucket_of(ms: int) -> int:
    """The histogram bucket of a latency."""
    return max(0, bisect.bisect_right(HIST_BOUNDS, ms) - 1)


def bucket_range(index: int) -> tuple[int | None, int | None]:
    """The [low, high) latency bounds of a bucket (None: unbounded)."""
    low = None if index == 0 else HIST_BOUNDS[index]
    high = HIST_BOUNDS[index + 1] if index + 1 < len(HIST_BOUNDS) else None
    return low, high


def bucket_sql(index: int) -> tuple[str, list[int]]:
    """The SQL condition (and its parameters) of a latency falling in bucket `index`."""
    low, high = bucket_range(index)
    clauses, bounds = [], []
    if low is not None:
        clauses.append("latency_ms >= ?")
        bounds.append(low)
    if high is not None:
        clauses.append("latency_ms < ?")
        bounds.append(high)
    return " AND ".join(clauses) or "1", bounds


def hour_key(at: datetime) -> str:
    """`YYYY-MM-DDTHH` of an instant (UTC)."""
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H")


def hour_start(key: str) -> datetime:
    """The instant an hour key starts."""
    return datetime.fromisoformat(key + ":00").replace(tzinfo=UTC)


def state(conn: sqlite3.Connection) -> tuple[str, set[str]]:
    """The watermark and the holes (cached hours are those before it, minus the holes).

    Calls written since the last fill (id above `last_id`) into hours before the watermark
    (a back-dated row: clock skew, an import) make their hours holes until the next fill.
    """
    through, last_id = _watermark(conn)
    holes = {str(r[0]) for r in conn.execute("SELECT hour FROM report_holes")}
    holes |= _late_hours(conn, through, last_id)
    return through, holes


def _watermark(conn: sqlite3.Connection) -> tuple[str, int]:
    """The cache's watermark hour and the last call id it has seen ("", 0: nothing cached)."""
    row = conn.execute("SELECT through, last_id FROM report_cache WHERE id = 1").fetchone()
    return ("", 0) if row is None else (str(row[0]), int(row[1]))


def _late_hours(conn: sqlite3.Connection, through: str, last_id: int) -> set[str]:
    if not through:
        return set()
    return {
        str(r[0])
        for r in conn.execute(
            # `+` keeps the planner on the primary key: few rows are newer than last_id.
            "SELECT DISTINCT substr(started_at, 1, 13) FROM calls WHERE id > ? AND +started_at < ?",
            (last_id, through),
        )
    }


def _unsettled_hours(conn: sqlite3.Connection) -> set[str]:
    return {
        str(r[0])
        for r in conn.execute(
            f"SELECT DISTINCT substr(started_at, 1, 13) FROM calls WHERE {_UNSETTLED}"
        )
    }


def _fill(conn: sqlite3.Connection, start: str, end: str, skip: set[str]) -> None:
    conn.execute(_FILL, (start, end, json.dumps(sorted(skip))))


def _set_state(conn: sqlite3.Connection, through: str, last_id: int) -> None:
    conn.execute(
        "INSERT INTO report_cache (id, through, last_id, bands) VALUES (1, ?, ?, ?)"
        " ON CONFLICT (id) DO UPDATE SET through = excluded.through, last_id = excluded.last_id",
        (through, last_id, json.dumps(BANDS)),
    )


def bands(conn: sqlite3.Connection) -> tuple[int, ...] | None:
    """The thresholds the cached rows' `band` counts (None: no cache, or filled without one)."""
    row = conn.execute("SELECT bands FROM report_cache WHERE id = 1").fetchone()
    if row is None or row[0] is None:
        return None
    return tuple(int(t) for t in json.loads(row[0]))


def _reset_if_rebanded(conn: sqlite3.Connection) -> None:
    """Empty a cache filled with other band thresholds than `BANDS`: it refills from scratch.

    Its `band` counts would mean other input sizes; the thresholds change only when a new
    version of agentd does (a genai-prices snapshot with a new price band).
    """
    row = conn.execute("SELECT bands FROM report_cache WHERE id = 1").fetchone()
    if row is None or bands(conn) == BANDS:
        return
    for table in ("report_hours", "report_days", "report_holes", "report_cache"):
        conn.execute(f"DELETE FROM {table}")


def refresh(ledger: Ledger, now: datetime, *, since: datetime | None = None) -> None:
    """Cache the closed hours from `since` on (None: all history) that are not cached yet.

    A no-op on a read-only ledger. Hours between the watermark and `since` are left for a
    report that needs them: they become holes (read raw meanwhile), and the watermark moves
    to `since`, so a report over the last day never pays for a month nobody reported on.
    """
    if ledger.read_only:
        return
    target = hour_key(now - SETTLE_MARGIN)  # hours before it ended at least the margin ago
    first = None if since is None else hour_key(since)
    with ledger.write() as conn:
        _reset_if_rebanded(conn)
        through, seen_id = _watermark(conn)
        # The hours of back-dated calls: only these are new holes. A recorded hole has no
        # cached sums already, so rewriting it (a skipped month: 720 rows) on every refresh
        # would change nothing.
        late = _late_hours(conn, through, seen_id)
        last_id = conn.execute("SELECT COALESCE(MAX(id), 0) FROM calls").fetchone()[0]
        # Each new hole is recorded (a back-dated call's hour loses its sums) before `last_id`
        # moves past the calls that made it one; the holes in range are filled below.
        conn.executemany("DELETE FROM report_hours WHERE hour = ?", [(h,) for h in late])
        conn.executemany(
            "INSERT OR IGNORE INTO report_holes (hour) VALUES (?)", [(h,) for h in late]
        )
        if first is not None and through < min(first, target):
            through = _skip_gap(conn, through, min(first, target))
        _set_state(conn, through, int(last_id))
        _roll_days(conn, {h[:10] for h in late})
    while _fill_holes(ledger, first, target):
        pass
    while _fill_next(ledger, target):
        pass


def _skip_gap(conn: sqlite3.Connection, through: str, to: str) -> str:
    """Record every hour from the watermark (or the first call) to `to` as a hole; return `to`."""
    row = conn.execute("SELECT MIN(started_at) FROM calls WHERE started_at >= ?", (through,))
    earliest = row.fetchone()[0]
    cur = hour_start(max(through, earliest[:13])) if earliest else hour_start(to)
    hours = []
    while hour_key(cur) < to:
        hours.append((hour_key(cur),))
        cur += timedelta(hours=1)
    conn.executemany("INSERT OR IGNORE INTO report_holes (hour) VALUES (?)", hours)
    return to


def _fill_holes(ledger: Ledger, first: str | None, target: str) -> bool:
    """Fill the holes from `first` on in one span of at most `CHUNK`; False when none is left.

    Holes whose hour still has calls in flight stay holes (retried on the next refresh).
    """
    with ledger.write() as conn:
        unsettled = _unsettled_hours(conn)
        todo = [
            str(r[0])
            for r in conn.execute(
                "SELECT hour FROM report_holes WHERE hour >= ? AND hour < ? ORDER BY hour",
                (first or "", target),
            )
            if str(r[0]) not in unsettled
        ]
        if not todo:
            return False
        start = todo[0]
        end = hour_key(hour_start(start) + CHUNK)
        batch = {h for h in todo if h < end}
        end = hour_key(hour_start(max(batch)) + timedelta(hours=1))
        # Hours of the span that are no holes are cached already: the fill skips them.
        skip, cur = set(), hour_start(start)
        while hour_key(cur) < end:
            if hour_key(cur) not in batch:
                skip.add(hour_key(cur))
            cur += timedelta(hours=1)
        conn.executemany("DELETE FROM report_hours WHERE hour = ?", [(h,) for h in batch])
        _fill(conn, start, end, skip)
        conn.executemany("DELETE FROM report_holes WHERE hour = ?", [(h,) for h in batch])
        _roll_days(conn, {h[:10] for h in batch})
    return True


def _fill_next(ledger: Ledger, target: str) -> bool:
    """Cache the next span (at most `CHUNK`) after the watermark; False when it reached `target`.

    One write transaction per span, so the daemon's writers never wait long.
    """
    with ledger.write() as conn:
        through, _ = state(conn)
        last_id = conn.execute("SELECT last_id FROM report_cache WHERE id = 1").fetchone()[0]
        first = conn.execute(
            "SELECT MIN(started_at) FROM calls WHERE started_at >= ?", (through,)
        ).fetchone()[0]
        start = max(through, first[:13] if first else target)
        if start >= target:
            _set_state(conn, max(through, target), int(last_id))
            return False
        end = min(target, hour_key(hour_start(start) + CHUNK))
        skip = {h for h in _unsettled_hours(conn) if start <= h < end}
        _fill(conn, start, end, skip)
        conn.executemany(
            "INSERT OR IGNORE INTO report_holes (hour) VALUES (?)", [(h,) for h in skip]
        )
        _set_state(conn, end, int(last_id))
        _roll_days(conn, _days(start, end))
    return True


def forget_day(conn: sqlite3.Connection, day: datetime, following: datetime) -> None:
    """Inside prune's transaction: the hours of [day, following) are no longer cached."""
    through, _ = state(conn)
    start, stop = hour_key(day), hour_key(following)
    conn.execute("DELETE FROM report_hours WHERE hour >= ? AND hour < ?", (start, stop))
    conn.execute("DELETE FROM report_days WHERE day >= ? AND day < ?", (start[:10], stop[:10]))
    hours, cur = [], day
    while cur < following:
        if hour_key(cur) < through:
            hours.append((hour_key(cur),))
        cur += timedelta(hours=1)
    conn.executemany("INSERT OR IGNORE INTO report_holes (hour) VALUES (?)", hours)


@dataclass(frozen=True)
class Plan:
    """Where a range's sums come from: raw spans of `calls`, and cached parts.

    `parts` are (table, time column, first key or None, end key): whole UTC days from
    `report_days` (`days` lists them), the other cached hours from `report_hours`.
    """

    raw: list[tuple[datetime | None, datetime | None]]
    parts: list[tuple[str, str, str | None, str]]
    days: list[str]


def plan(conn: sqlite3.Connection, since: datetime | None, until: datetime | None) -> Plan | None:
    """Split [since, until) into cached parts and raw spans; None when nothing is cached."""
    through, holes = state(conn)
    if not through:
        return None
    first = None if since is None else _ceil_hour(since)
    end = hour_start(through)
    if until is not None:
        end = min(end, _floor_hour(until))
    if first is not None and first >= end:
        return None
    raw: list[tuple[datetime | None, datetime | None]] = []
    if since is not None and first is not None and since < first:
        raw.append((since, first))
    first_key = None if first is None else hour_key(first)
    end_key = hour_key(end)
    raw.extend(spans(h for h in holes if h < end_key and h >= (first_key or "")))
    raw.append((end, until))
    days, parts = _cached_parts(conn, first_key, end_key, holes)
    return Plan(raw, parts, days)


def _floor_hour(at: datetime) -> datetime:
    return at.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def _ceil_hour(at: datetime) -> datetime:
    floor = _floor_hour(at)
    return floor if floor == at else floor + timedelta(hours=1)


def _next_day(day: str) -> str:
    return (datetime.fromisoformat(day) + timedelta(days=1)).date().isoformat()


def _cached_parts(
    conn: sqlite3.Connection, first: str | None, end: str, holes: set[str]
) -> tuple[list[str], list[tuple[str, str, str | None, str]]]:
    """Split cached hours [first, end) into whole UTC days (`report_days`) and hours."""
    start = first
    if start is None:
        row = conn.execute("SELECT MIN(hour) FROM report_hours").fetchone()
        if row[0] is None:
            return [], []
        start = str(row[0])
    day = hour_start(start[:10] + "T00")
    if start[11:13] != "00":
        day += timedelta(days=1)
    stop = hour_start(end[:10] + "T00")
    days: list[str] = []
    hole_days = {h[:10] for h in holes}
    while day < stop:
        key = day.date().isoformat()
        if key not in hole_days:
            days.append(key)
        day += timedelta(days=1)
    # Hours to skip in `report_hours`: the holes (read raw) and the days read whole.
    skips: list[tuple[str, str, str | None]] = []  # (first hour, end hour, day part)
    for span_start, span_end in spans(h for h in holes if h < end and h >= (first or "")):
        skips.append((hour_key(span_start), hour_key(span_end), None))
    i = 0
    while i < len(days):
        j = i
        while j + 1 < len(days) and _next_day(days[j]) == days[j + 1]:
            j += 1
        skips.append((days[i] + "T00", _next_day(days[j]) + "T00", days[i]))
        i = j + 1
    parts: list[tuple[str, str, str | None, str]] = []
    cursor = first
    for low, high, day_first in sorted(skips):
        parts.append(("report_hours", "hour", cursor, low))
        if day_first is not None:
            parts.append(("report_days", "day", day_first, high[:10]))
        cursor = high
    parts.append(("report_hours", "hour", cursor, end))
    return days, parts


def spans(hours: Iterable[str]) -> list[tuple[datetime, datetime]]:
    """Hour keys as [start, end) spans of consecutive hours: a month of holes is one range."""
    out: list[tuple[datetime, datetime]] = []
    for hour in sorted(hours):
        start = hour_start(hour)
        if out and out[-1][1] == start:
            out[-1] = (out[-1][0], start + timedelta(hours=1))
        else:
            out.append((start, start + timedelta(hours=1)))
    return out
