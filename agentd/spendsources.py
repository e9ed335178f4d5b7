"""Where spend report sums come from: raw ledger rows, pruned days' roll-ups and the report
cache (`spendcache`), merged into groups without counting any call twice.

`agentd.spend` turns what this module collects into report rows; see its docstring for what
each column means.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from agentd import spendcache
from agentd.errors import LedgerError
from agentd.ledger import SKIPPED_RUN_STATUSES, Ledger
from agentd.migrations import SKIPPED_INDEXED
from agentd.spendgroups import Acc, Filter, Key, Period, whole_hours
from agentd.spendlatency import GroupReader

_SKIPPED = "(" + ", ".join(f"'{s}'" for s in SKIPPED_RUN_STATUSES) + ")"
_SKIPS_INDEXED = tuple(SKIPPED_RUN_STATUSES) == SKIPPED_INDEXED
_UNSETTLED = "status IN ('pending', 'submitted')"


_LIST_COST = "COALESCE(list_cost_micro_usd, cost_micro_usd, reserved_micro_usd)"
_CALL_SUMS = (
    "COUNT(*), SUM(status IN ('error', 'aborted')), SUM(attempt = 1 AND run_id IS NOT NULL),"
    " SUM(input_tokens), SUM(cache_read_tokens), SUM(cache_write_tokens), SUM(output_tokens),"
    " SUM(reasoning_tokens),"
    # In-flight rows count their reservation here; they are moved to `reserved` afterwards
    # from the small partial index, which is cheaper than a CASE on every row.
    " SUM(COALESCE(cost_micro_usd, reserved_micro_usd)), COUNT(latency_ms), SUM(latency_ms),"
    # A NULL list cost (before m012, unpriced) is "no saving known": the cost itself.
    f" SUM({_LIST_COST})"
)
# The same sums, in the same order, as the report cache keeps (one list serves both).
_CALL_NAMES = spendcache.SUM_NAMES
# What a read of `report_hours`/`report_days` selects: the sums, then the histogram.
_CACHED_SUMS = ", ".join([spendcache.sums_sql(), *(f"SUM({c})" for c in spendcache.HIST_COLUMNS)])
# The roll-up's columns carry the same names as the sums above.
_ROLLUP_SUMS = spendcache.sums_sql()


class _Collector(GroupReader):
    """Folds the sources of one report into groups keyed by (period label, column value)."""

    def __init__(
        self, conn: Any, flt: Filter, period: Period | None, column: str | None, tz: ZoneInfo
    ) -> None:
        super().__init__(conn, flt, period, column, tz)
        self.groups: dict[Key, Acc] = {}
        # Cached parts of the range: (table, time column, first key or None, end key).
        self.cached: list[tuple[str, str, str | None, str]] = []
        self.moved: list[str] = []  # cached hours outside the local period of their UTC day

    def use_cache(self) -> None:
        """Read the cached hours of the range from `report_hours`, the rest raw."""
        periods = self.periods
        if periods is not None and not periods.utc and not whole_hours(periods.tz.key):
            return  # local periods do not start on UTC hours: raw rows only
        flt = self.flt
        plan = spendcache.plan(self.conn, flt.since, flt.until)
        if plan is None:
            return
        self.raw = [Filter(low, high, flt.simulated, flt.loop) for low, high in plan.raw]
        self.cached = plan.parts
        if periods is not None and not periods.utc:
            # A UTC day counts in the period of its noon; its hours in another period move
            # there (added to theirs, subtracted from the day's).
            for key in plan.days:
                day = spendcache.hour_start(key + "T00")
                noon = periods.day_label(key)
                for h in range(24):
                    if periods.label_of(day + timedelta(hours=h)) != noon:
                        self.moved.append(spendcache.hour_key(day + timedelta(hours=h)))

    def _acc(self, key: Key) -> Acc:
        acc = self.groups.get(key)
        if acc is None:
            acc = self.groups[key] = Acc()
        return acc

    def collect(self, *, runs: bool) -> None:
        """Read every source into the groups; `runs` adds fallback and skipped run counts."""
        select, group_by = self._key_sql()
        for flt in self.raw:
            where, params = flt.sql()
            # With a range, walk the time index: the planner would otherwise scan a whole
            # (loop, started_at) index to get group order for free, which costs far more.
            ranged = flt.since is not None or flt.until is not None
            hint = "INDEXED BY calls_started_at" if ranged else ""
            for bucket, value, *sums in self.conn.execute(
                f"SELECT {select}, {_CALL_SUMS} FROM calls {hint} WHERE {where}{group_by}",
                params,
            ):
                self._acc(self._key(bucket, value)).add(_CALL_NAMES, sums)
        for part in self.cached:
            self._collect_cached(*part)
        if self.moved:
            self._collect_moved()
        for key in [k for k, acc in self.groups.items() if acc.sums["calls"] == 0]:
            # Only cached sums can net to nothing (a day whose calls all moved out).
            del self.groups[key]
            self.hists.pop(key, None)
        # Only the small partial index `calls_unsettled` matches this condition; named, since
        # the planner would rather scan a whole covering index (m008's, until m014) holding every
        # selected column: ~70 ms over a million rows, for usually no row at all.
        # A call in flight saves nothing yet: its list cost, as summed above, comes out too.
        for bucket, value, simulated, started_at, loop, reserved, listed in self.conn.execute(
            f"SELECT {select}, simulated, started_at, loop, reserved_micro_usd, {_LIST_COST}"
            f" FROM calls INDEXED BY calls_unsettled WHERE {_UNSETTLED}"
        ):
            if self.flt.keeps(simulated, started_at, loop):
                acc = self._acc(self._key(bucket, value))
                acc.sums["cost_micro_usd"] -= int(reserved)
                acc.sums["reserved_micro_usd"] += int(reserved)
                acc.sums["list_cost_micro_usd"] -= int(listed)
        if runs:
            self._collect_runs()
        self._collect_rollup()

    def _collect_cached(self, table: str, time: str, first: str | None, end: str) -> None:
        if first is not None and first >= end:
            return
        clauses = ["simulated = ?", f"{time} < ?"]
        params: list[Any] = [int(self.flt.simulated), end]
        if first is not None:
            clauses.append(f"{time} >= ?")
            params.append(first)
        if self.flt.loop is not None:
            clauses.append("loop = ?")
            params.append(self.flt.loop)
        if time == "day" and self.periods is not None:
            # Whole UTC days, each in the local period of its noon (see `moved`).
            column = "''" if self.column is None else self.column
            group_by = " GROUP BY day" + ("" if self.column is None else f", {column}")
            select = f"day, {column}"
        else:
            select, group_by = self._key_sql(time_column=time)
        sums = _CACHED_SUMS
        width = len(spendcache.SUM_NAMES)
        for bucket, value, *values in self.conn.execute(
            f"SELECT {select}, {sums} FROM {table} WHERE {' AND '.join(clauses)}{group_by}",
            params,
        ):
            key: Key
            if time == "day" and self.periods is not None:
                key = (self.periods.day_label(bucket), None if self.column is None else value)
            else:
                key = self._key(bucket, value)
            # An hour must lie in one local period (zones with whole-hour offsets).
            periods = self.periods
            if (
                periods is not None
                and not periods.utc
                and time == "hour"
                and periods.bucket_label(bucket[:-1] + "3") != key[0]
            ):
                raise _NotWholeHours
            self._acc(key).add(spendcache.SUM_NAMES, values[:width])
            hist = self.hists.setdefault(key, [0] * len(spendcache.HIST_COLUMNS))
            for i, count in enumerate(values[width:]):
                hist[i] += int(count or 0)

    def _fold(self, key: Key, values: Sequence[Any], sign: int) -> None:
        width = len(spendcache.SUM_NAMES)
        sums = self._acc(key).sums
        for name, value in zip(spendcache.SUM_NAMES, values[:width], strict=True):
            sums[name] += sign * int(value or 0)
        hist = self.hists.setdefault(key, [0] * len(spendcache.HIST_COLUMNS))
        for i, count in enumerate(values[width:]):
            hist[i] += sign * int(count or 0)

    def _collect_moved(self) -> None:
        assert self.periods is not None
        clauses = ["simulated = ?", "hour IN (SELECT value FROM json_each(?))"]
        params: list[Any] = [int(self.flt.simulated), json.dumps(self.moved)]
        if self.flt.loop is not None:
            clauses.append("loop = ?")
            params.append(self.flt.loop)
        column = "''" if self.column is None else self.column
        group_by = "hour" + ("" if self.column is None else f", {column}")
        sums = _CACHED_SUMS
        for hour, value, *values in self.conn.execute(
            f"SELECT hour, {column}, {sums} FROM report_hours"
            f" WHERE {' AND '.join(clauses)} GROUP BY {group_by}",
            params,
        ):
            value = None if self.column is None else value
            label = self.periods.label_of(spendcache.hour_start(hour))
            self._fold((label, value), values, 1)
            self._fold((self.periods.day_label(hour[:10]), value), values, -1)

    def _collect_runs(self) -> None:
        where, params = self.flt.sql("c")
        select, group_by = self._key_sql("c")
        # CROSS JOIN fixes the join order: over a short range, the range's calls look up their
        # run; over a long one (or all time), the fallback runs (a partial index) look up their
        # calls, whichever touches fewer rows (see `_FALLBACK_PROBE_COST`).
        if self._ranged and not self._few_fallbacks():
            source = "calls c INDEXED BY calls_started_at CROSS JOIN runs r ON r.id = c.run_id"
        else:
            source = (
                "runs r INDEXED BY runs_fallback"
                " CROSS JOIN calls c INDEXED BY calls_run_id ON c.run_id = r.id"
            )
        fallbacks = (
            f"SELECT {{select}}, COUNT(*) FROM {source}"
            f" WHERE c.attempt = 1 AND r.fallback = 1 AND {where}{{group_by}}"
        )
        if self.fine is None:
            rows = self.conn.execute(fallbacks.format(select=select, group_by=group_by), params)
            for bucket, value, count in rows:
                self._acc(self._key(bucket, value)).sums["fallbacks"] += int(count)
        else:
            if self.fine.fallbacks is None:
                fine, fine_group_by = self._fine_sql("c")
                sql = fallbacks.format(select=fine, group_by=fine_group_by)
                self.fine.fallbacks = self.conn.execute(sql, params).fetchall()
            for row in self.fine.fallbacks:
                self._acc(self._fine_key(row)).sums["fallbacks"] += int(row[-1])
        if self.column not in (None, "loop"):
            return  # a skipped run has no tier, model, provider or purpose
        self._collect_skipped()

    def _collect_skipped(self) -> None:
        where, params = self.flt.sql()
        select, group_by = self._key_sql()
        if self.fine is not None:
            # Shared by the reports over this range: by day bucket and loop.
            select = f"{self.day_bucket_sql()}, loop"
            group_by = f" GROUP BY {select}"
        # The partial index holds only skipped runs; the planner would rather walk a whole
        # (loop, started_at) index for its order. (If the skip statuses ever outgrow the
        # index, the query still runs, without it.)
        hint = "INDEXED BY runs_skipped" if _SKIPS_INDEXED else ""
        sql = (
            f"SELECT {select}, COUNT(*), SUM(status = 'skipped_noop') FROM runs {hint}"
            f" WHERE status IN {_SKIPPED} AND {where}{group_by}"
        )
        if self.fine is None:
            rows = self.conn.execute(sql, params).fetchall()
        else:
            if self.fine.skipped is None:
                self.fine.skipped = self.conn.execute(sql, params).fetchall()
            rows = [
                (bucket, loop if self.column == "loop" else None, count, noop)
                for bucket, loop, count, noop in self.fine.skipped
            ]
        for bucket, value, count, noop in rows:
            sums = self._acc(self._key(bucket, value)).sums
            sums["skipped"] += int(count)
            sums["noop"] += int(noop)

    def _few_fallbacks(self) -> bool:
        """True when probing every fallback run is cheaper than walking the range's calls."""
        in_range = sum(acc.sums["calls"] for acc in self.groups.values())
        (fallbacks,) = self.conn.execute(
            "SELECT COUNT(*) FROM runs INDEXED BY runs_fallback WHERE fallback = 1"
        ).fetchone()
        return int(fallbacks) * _FALLBACK_PROBE_COST < in_range

    def _collect_rollup(self) -> None:
        where, params = self.flt.rollup_sql()
        bucket = "day" if self.periods is not None else "''"
        column = self.column or "''"
        grouped = [e for e in (bucket, column) if e != "''"]
        group_by = f" GROUP BY {', '.join(grouped)}" if grouped else ""
        if self.column not in (None, "loop"):
            where += " AND calls > 0"  # skipped-run rows have no tier, model, ...
        names = (*_CALL_NAMES, "fallbacks", "skipped", "noop")
        # A skipped runs' roll-up row names the runs' status in `purpose` (see `retention`).
        for day, value, *sums in self.conn.execute(
            f"SELECT {bucket}, {column}, {_ROLLUP_SUMS}, SUM(fallbacks), SUM(skipped),"
            " SUM(skipped * (calls = 0 AND purpose = 'skipped_noop'))"
            f" FROM daily_rollup WHERE {where}{group_by}",
            params,
        ):
            acc = self._acc(self._key(day, value, rolled_up=True))
            acc.add(names, sums)
            acc.sums["rolled_up_calls"] += int(sums[0] or 0)


# What looking up one fallback run's calls costs, in calls walked by the range scan (measured
# on a 1M-row ledger: ~1.7 µs per fallback run against ~0.27 µs per call in the range).
_FALLBACK_PROBE_COST = 6


class _NotWholeHours(Exception):
    """A cached hour straddles two local periods: read raw rows instead."""


def collected(
    ledger: Ledger,
    conn: sqlite3.Connection,
    flt: Filter,
    period: Period | None,
    column: str | None,
    tz: ZoneInfo,
    *,
    runs: bool,
    cache: bool = True,
) -> _Collector:
    """A collector that has read every source, from the cache where it can (and may)."""
    collector = _Collector(conn, flt, period, column, tz)
    if not cache:
        collector.collect(runs=runs)
        return collector
    collector.use_cache()
    try:
        collector.collect(runs=runs)
    except _NotWholeHours:
        collector = _Collector(conn, flt, period, column, tz)
        collector.collect(runs=runs)
    return collector


# What a report that does not say where its range starts gets cached: the default
# `agentd ledger` range (`--since 24h`). The views say (`refresh_range`).
DEFAULT_RANGE = timedelta(hours=24)


def refresh_range(ledger: Ledger, since: datetime | None) -> None:
    """Cache the closed hours a report from `since` (None: all history) reads, if it can."""
    # Busy, read-only or inside a read: the report reads raw rows where the cache is missing.
    with contextlib.suppress(LedgerError, sqlite3.OperationalError):
        spendcache.refresh(ledger, datetime.now(UTC), since=since)


def refresh_cache(ledger: Ledger) -> None:
    """Cache the closed hours of the default report range (the last day); see `refresh_range`."""
    refresh_range(ledger, datetime.now(UTC) - DEFAULT_RANGE)
