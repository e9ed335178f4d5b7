"""Spend report rows: the ledger's calls (and pruned roll-ups) grouped, filtered and summed.

One pass of SQL aggregates per source, folded in Python into report rows:

- `calls` rows in the range (`started_at` in [since, until)), real or simulated;
- `daily_rollup` rows (what `agentd ledger prune` removed), a whole UTC day each, counted when
  the day's noon (UTC) is in the range. Pruning moves rows from `calls` to the roll-up in one
  transaction, so every call is counted exactly once, from one source or the other.

Calendar groupings (day, week, month) are calendar periods in the given zone (the config's
`timezone`; UTC without a config), like the budget windows. SQL groups raw calls by UTC
quarter-hour (every zone's offset today is a multiple of 15 minutes) and Python folds the
quarters into local periods, which keeps DST-length days exact; a rolled-up UTC day counts in
the local period that holds its noon.

Columns: `runs` counts runs whose first attempt (attempt 1) is in the group, so each run is
counted once and the column sums to the total; `fallbacks` those of them that used a fallback
model; `skipped` runs recorded without any call (budget, no-op, inactive, paused), for the loop
and calendar groupings only; `failed` attempts that ended `error` or `aborted`; `cost` settled
spend (aborted attempts at their reservation) and `reserved` what calls in flight hold now.
Latency is over settled attempts: the mean, and the exact p95 (nearest rank: the
⌈0.95·n⌉-th smallest). A group that includes pruned calls has no p95 (a roll-up keeps sums,
not distributions).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, get_args
from zoneinfo import ZoneInfo

from agentd.budgets import window_bounds
from agentd.ledger import SKIPPED_RUN_STATUSES, Ledger, parse_iso, utc_iso
from agentd.migrations import SKIPPED_INDEXED
from agentd.reports import Column

Grouping = Literal["loop", "tier", "model", "provider", "purpose", "day", "week", "month"]
GROUPINGS: tuple[Grouping, ...] = get_args(Grouping)
Period = Literal["day", "week", "month"]
PERIODS: tuple[Period, ...] = ("day", "week", "month")
COLUMNS = ("loop", "tier", "model", "provider", "purpose")
# Skipped runs have a loop and a time but no call, so no tier, model, provider or purpose.
RUN_GROUPINGS = frozenset({"loop", "day", "week", "month"})
UTC_ZONE = ZoneInfo("UTC")

_SKIPPED = "(" + ", ".join(f"'{s}'" for s in SKIPPED_RUN_STATUSES) + ")"
_SKIPS_INDEXED = tuple(SKIPPED_RUN_STATUSES) == SKIPPED_INDEXED
_UNSETTLED = "status IN ('pending', 'submitted')"
# A quarter-hour bucket of a ledger timestamp: `YYYY-MM-DDTHH:q` with q in 0..3.
_QUARTER = "substr({c}, 1, 13) || ':' || (CAST(substr({c}, 15, 2) AS INTEGER) / 15)"
_SUMS = (
    "runs",
    "fallbacks",
    "skipped",
    "calls",
    "failed",
    "input_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
    "cost_micro_usd",
    "reserved_micro_usd",
    "latency_count",
    "latency_ms_sum",
    "rolled_up_calls",
)

Key = tuple[str | None, str | None]  # (period label, column value)


@dataclass
class _Acc:
    """Running sums of one group."""

    sums: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_SUMS, 0))

    def add(self, names: Sequence[str], values: Iterable[Any]) -> None:
        for name, value in zip(names, values, strict=True):
            self.sums[name] += int(value or 0)


@dataclass(frozen=True)
class SpendReport:
    """Report rows (one dict per group, in display order) and their totals row."""

    by: Grouping
    rows: list[dict[str, Any]]
    total: dict[str, Any]
    timezone: str
    includes_rollup: bool


@dataclass(frozen=True)
class DailySpend:
    """Settled spend per local day (consecutive days, gaps filled) for each stack key."""

    days: list[str]
    series: dict[str, list[int]]  # stack key → micro-USD per day, aligned with `days`
    stack: str

    def totals(self) -> dict[str, int]:
        """Each stack key's spend over all days."""
        return {k: sum(v) for k, v in self.series.items()}


def nearest_rank(n: int) -> int:
    """The 1-based rank of the p95 among n sorted values: ⌈0.95·n⌉ (integers only)."""
    return (95 * n + 99) // 100


def mean_ms(total: int, count: int) -> int | None:
    """An integer mean rounded half up, without floats; None for no values."""
    return None if count == 0 else (2 * total + count) // (2 * count)


def _is_utc(tz: ZoneInfo) -> bool:
    return tz.key in {"UTC", "Etc/UTC", "Etc/Universal", "Universal", "Zulu", "Etc/Zulu"}


class _Periods:
    """Maps SQL time buckets and roll-up days to local period labels (cached), and back."""

    def __init__(self, period: Period, tz: ZoneInfo) -> None:
        self.period = period
        self.tz = tz
        self.utc = _is_utc(tz)
        self.bounds: dict[str, tuple[datetime, datetime]] = {}
        self._cache: dict[str, str] = {}

    def bucket_sql(self, column: str) -> str:
        """SQL for the bucket of a timestamp column; buckets never straddle two periods."""
        if self.utc and self.period == "month":
            return f"substr({column}, 1, 7)"
        if self.utc:
            return f"substr({column}, 1, 10)"
        return _QUARTER.format(c=column)

    def label_of(self, at: datetime) -> str:
        """The period label of an instant: `2026-03-10`, `2026-W11` or `2026-03`."""
        local = at.astimezone(self.tz)
        if self.period == "day":
            label = local.date().isoformat()
        elif self.period == "week":
            year, week, _ = local.isocalendar()
            label = f"{year:04d}-W{week:02d}"
        else:
            label = f"{local.year:04d}-{local.month:02d}"
        if label not in self.bounds:
            self.bounds[label] = window_bounds(self.period, at, self.tz)
        return label

    def bucket_label(self, bucket: str) -> str:
        """The period label of a bucket from `bucket_sql`."""
        label = self._cache.get(bucket)
        if label is None:
            if len(bucket) == 7:  # YYYY-MM
                at = datetime.fromisoformat(bucket + "-01").replace(tzinfo=UTC)
            elif len(bucket) == 10:  # YYYY-MM-DD
                at = datetime.fromisoformat(bucket).replace(tzinfo=UTC)
            else:  # YYYY-MM-DDTHH:q
                hour, quarter = bucket.rsplit(":", 1)
                at = datetime.fromisoformat(hour + ":00").replace(tzinfo=UTC)
                at += timedelta(minutes=15 * int(quarter))
            label = self._cache[bucket] = self.label_of(at)
        return label

    def day_label(self, day: str) -> str:
        """The period of a rolled-up UTC day: the one holding its noon."""
        return self.label_of(datetime.fromisoformat(day).replace(tzinfo=UTC) + timedelta(hours=12))

    def fill(self, labels: Iterable[str]) -> list[str]:
        """Every period from the first to the last of `labels`, in order, gaps included."""
        known = sorted(set(labels), key=lambda label: self.bounds[label][0])
        if not known:
            return []
        out = [known[0]]
        end = self.bounds[known[-1]][0]
        while self.bounds[out[-1]][0] < end:
            out.append(self.label_of(self.bounds[out[-1]][1]))
        return out


@dataclass(frozen=True)
class _Filter:
    since: datetime | None
    until: datetime | None
    simulated: bool
    loop: str | None

    def sql(self, alias: str = "", time_column: str = "started_at") -> tuple[str, list[Any]]:
        p = f"{alias}." if alias else ""
        clauses = [f"{p}simulated = ?"]
        params: list[Any] = [int(self.simulated)]
        if self.since is not None:
            clauses.append(f"{p}{time_column} >= ?")
            params.append(utc_iso(self.since))
        if self.until is not None:
            clauses.append(f"{p}{time_column} < ?")
            params.append(utc_iso(self.until))
        if self.loop is not None:
            clauses.append(f"{p}loop = ?")
            params.append(self.loop)
        return " AND ".join(clauses), params

    def rollup_sql(self) -> tuple[str, list[Any]]:
        # A rolled-up UTC day is in the range when its noon is.
        clauses = ["simulated = ?"]
        params: list[Any] = [int(self.simulated)]
        noon = "day || 'T12:00:00.000000Z'"
        if self.since is not None:
            clauses.append(f"{noon} >= ?")
            params.append(utc_iso(self.since))
        if self.until is not None:
            clauses.append(f"{noon} < ?")
            params.append(utc_iso(self.until))
        if self.loop is not None:
            clauses.append("loop = ?")
            params.append(self.loop)
        return " AND ".join(clauses), params

    def keeps(self, simulated: int, started_at: str, loop: str) -> bool:
        """The same filter in Python, for rows read through a partial index."""
        if bool(simulated) != self.simulated or (self.loop is not None and loop != self.loop):
            return False
        at = parse_iso(started_at)
        return (self.since is None or at >= self.since) and (self.until is None or at < self.until)


_CALL_SUMS = (
    "COUNT(*), SUM(status IN ('error', 'aborted')), SUM(attempt = 1 AND run_id IS NOT NULL),"
    " SUM(input_tokens), SUM(cache_read_tokens), SUM(cache_write_tokens), SUM(output_tokens),"
    " SUM(reasoning_tokens),"
    # In-flight rows count their reservation here; they are moved to `reserved` afterwards
    # from the small partial index, which is cheaper than a CASE on every row.
    " SUM(COALESCE(cost_micro_usd, reserved_micro_usd)), COUNT(latency_ms), SUM(latency_ms)"
)
_CALL_NAMES = (
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
)
# The roll-up's columns carry the same names as the sums above.
_ROLLUP_SUMS = ", ".join(f"SUM({n})" for n in _CALL_NAMES)


class _Collector:
    """Folds the sources of one report into groups keyed by (period label, column value)."""

    def __init__(
        self, conn: Any, flt: _Filter, period: Period | None, column: str | None, tz: ZoneInfo
    ) -> None:
        if column is not None and column not in COLUMNS:
            raise ValueError(f"cannot group by {column!r}")
        self.conn = conn
        self.flt = flt
        self.periods = None if period is None else _Periods(period, tz)
        self.column = column
        self.groups: dict[Key, _Acc] = {}

    @property
    def _ranged(self) -> bool:
        return self.flt.since is not None or self.flt.until is not None

    def _key_sql(self, alias: str = "", time_column: str = "started_at") -> tuple[str, str]:
        """The (bucket, column) select items and the GROUP BY clause that goes with them."""
        p = f"{alias}." if alias else ""
        bucket = "''" if self.periods is None else self.periods.bucket_sql(p + time_column)
        column = "''" if self.column is None else p + self.column
        # Constants stay out of GROUP BY: they would keep SQLite from reading an index in
        # group order and force a sort of every row.
        grouped = [e for e in (bucket, column) if e != "''"]
        group_by = f" GROUP BY {', '.join(grouped)}" if grouped else ""
        return f"{bucket}, {column}", group_by

    def _key(self, bucket: str, value: str | None, rolled_up: bool = False) -> Key:
        label = None
        if self.periods is not None:
            label = (
                self.periods.day_label(bucket) if rolled_up else self.periods.bucket_label(bucket)
            )
        if self.column is None:
            return label, None
        return label, (value or None) if rolled_up else value

    def _acc(self, key: Key) -> _Acc:
        acc = self.groups.get(key)
        if acc is None:
            acc = self.groups[key] = _Acc()
        return acc

    def collect(self, *, runs: bool) -> None:
        """Read every source into the groups; `runs` adds fallback and skipped run counts."""
        where, params = self.flt.sql()
        # With a range, walk the time index: the planner would otherwise scan a whole
        # (loop, started_at) index to get group order for free, which costs far more.
        hint = "INDEXED BY calls_started_at" if self._ranged else ""
        select, group_by = self._key_sql()
        for bucket, value, *sums in self.conn.execute(
            f"SELECT {select}, {_CALL_SUMS} FROM calls {hint} WHERE {where}{group_by}", params
        ):
            self._acc(self._key(bucket, value)).add(_CALL_NAMES, sums)
        # Alone, this condition lets SQLite use the small partial index `calls_unsettled`.
        for bucket, value, simulated, started_at, loop, reserved in self.conn.execute(
            f"SELECT {select}, simulated, started_at, loop, reserved_micro_usd"
            f" FROM calls WHERE {_UNSETTLED}"
        ):
            if self.flt.keeps(simulated, started_at, loop):
                acc = self._acc(self._key(bucket, value))
                acc.sums["cost_micro_usd"] -= int(reserved)
                acc.sums["reserved_micro_usd"] += int(reserved)
        if runs:
            self._collect_runs()
        self._collect_rollup()

    def _collect_runs(self) -> None:
        where, params = self.flt.sql("c")
        select, group_by = self._key_sql("c")
        # CROSS JOIN fixes the join order: over a range, the range's calls look up their run;
        # over all time, the few fallback runs (a partial index) look up their first call.
        if self._ranged:
            source = "calls c INDEXED BY calls_started_at CROSS JOIN runs r ON r.id = c.run_id"
        else:
            source = (
                "runs r INDEXED BY runs_fallback"
                " CROSS JOIN calls c INDEXED BY calls_run_id ON c.run_id = r.id"
            )
        for bucket, value, count in self.conn.execute(
            f"SELECT {select}, COUNT(*) FROM {source}"
            f" WHERE c.attempt = 1 AND r.fallback = 1 AND {where}{group_by}",
            params,
        ):
            self._acc(self._key(bucket, value)).sums["fallbacks"] += int(count)
        if self.column not in (None, "loop"):
            return  # a skipped run has no tier, model, provider or purpose
        where, params = self.flt.sql()
        select, group_by = self._key_sql()
        # The partial index holds only skipped runs; the planner would rather walk a whole
        # (loop, started_at) index for its order. (If the skip statuses ever outgrow the
        # index, the query still runs, without it.)
        hint = "INDEXED BY runs_skipped" if _SKIPS_INDEXED else ""
        for bucket, value, count in self.conn.execute(
            f"SELECT {select}, COUNT(*) FROM runs {hint}"
            f" WHERE status IN {_SKIPPED} AND {where}{group_by}",
            params,
        ):
            self._acc(self._key(bucket, value)).sums["skipped"] += int(count)

    def _collect_rollup(self) -> None:
        where, params = self.flt.rollup_sql()
        bucket = "day" if self.periods is not None else "''"
        column = self.column or "''"
        grouped = [e for e in (bucket, column) if e != "''"]
        group_by = f" GROUP BY {', '.join(grouped)}" if grouped else ""
        if self.column not in (None, "loop"):
            where += " AND calls > 0"  # skipped-run rows have no tier, model, ...
        names = (*_CALL_NAMES, "fallbacks", "skipped")
        for day, value, *sums in self.conn.execute(
            f"SELECT {bucket}, {column}, {_ROLLUP_SUMS}, SUM(fallbacks), SUM(skipped)"
            f" FROM daily_rollup WHERE {where}{group_by}",
            params,
        ):
            acc = self._acc(self._key(day, value, rolled_up=True))
            acc.add(names, sums)
            acc.sums["rolled_up_calls"] += int(sums[0] or 0)

    def latencies(self) -> dict[Key, list[int]]:
        """Every raw settled call's latency in the range, by group (for exact percentiles).

        One pass fetching the values beats one sorting query per group: SQLite's sorter costs
        more per row than Python's list sort, and the range is read once instead of per group.
        """
        where, params = self.flt.sql()
        hint = "INDEXED BY calls_started_at" if self._ranged else ""
        select, _ = self._key_sql()
        out: dict[Key, list[int]] = {}
        for bucket, value, ms in self.conn.execute(
            f"SELECT {select}, latency_ms FROM calls {hint}"
            f" WHERE {where} AND latency_ms IS NOT NULL",
            params,
        ):
            out.setdefault(self._key(bucket, value), []).append(int(ms))
        return out


def percentile_95(values: list[int]) -> int | None:
    """The exact nearest-rank p95 of the values (sorts them in place); None when empty."""
    if not values:
        return None
    values.sort()
    return values[nearest_rank(len(values)) - 1]


def _row(by: str, key_value: str | None, acc: _Acc, p95: int | None, runs: bool) -> dict[str, Any]:
    s = acc.sums
    row: dict[str, Any] = {by: key_value}
    for name in _SUMS[:-3]:
        row[name] = s[name]
    if not runs:
        row["skipped"] = None
    row["avg_latency_ms"] = mean_ms(s["latency_ms_sum"], s["latency_count"])
    row["p95_latency_ms"] = p95
    return row


def spend_report(
    ledger: Ledger,
    *,
    by: Grouping,
    since: datetime | None = None,
    until: datetime | None = None,
    simulated: bool = False,
    tz: ZoneInfo = UTC_ZONE,
    loop: str | None = None,
) -> SpendReport:
    """Spend grouped `by` a column or a calendar period over [since, until), with totals."""
    if by not in GROUPINGS:
        raise ValueError(f"cannot group by {by!r} (one of {', '.join(GROUPINGS)})")
    period: Period | None = by if by in PERIODS else None
    column = None if period is not None else by
    flt = _Filter(since, until, simulated, loop)
    runs = by in RUN_GROUPINGS
    with ledger.read() as conn:
        collector = _Collector(conn, flt, period, column, tz)
        collector.collect(runs=True)
        groups = collector.groups
        if collector.periods is not None:
            order = collector.periods.fill(k[0] for k in groups if k[0] is not None)
            keys: list[Key] = [(label, None) for label in order]
        else:
            keys = sorted(
                groups,
                key=lambda k: (-groups[k].sums["cost_micro_usd"], k[1] is None, k[1] or ""),
            )
        latencies = collector.latencies()
    rows = []
    total = _Acc()
    for key in keys:
        acc = groups.get(key) or _Acc()
        total.add(_SUMS, (acc.sums[n] for n in _SUMS))
        p95 = None if acc.sums["rolled_up_calls"] else percentile_95(latencies.get(key, []))
        rows.append(_row(by, key[0] if period else key[1], acc, p95, runs))
    if total.sums["rolled_up_calls"]:
        total_p95 = None
    else:
        total_p95 = percentile_95([ms for values in latencies.values() for ms in values])
    totals = _row(by, "total", total, total_p95, runs)
    return SpendReport(
        by=by,
        rows=rows,
        total=totals,
        timezone=tz.key,
        includes_rollup=total.sums["rolled_up_calls"] > 0,
    )


def daily_spend(
    ledger: Ledger,
    *,
    stack: Literal["loop", "tier"],
    since: datetime | None = None,
    until: datetime | None = None,
    simulated: bool = False,
    tz: ZoneInfo = UTC_ZONE,
    loop: str | None = None,
) -> DailySpend:
    """Settled spend per local day, split by loop or tier (a missing tier is `(none)`)."""
    if stack not in ("loop", "tier"):
        raise ValueError(f"cannot stack by {stack!r} (loop or tier)")
    with ledger.read() as conn:
        collector = _Collector(conn, _Filter(since, until, simulated, loop), "day", stack, tz)
        collector.collect(runs=False)
    assert collector.periods is not None
    days = collector.periods.fill(k[0] for k in collector.groups if k[0] is not None)
    index = {day: i for i, day in enumerate(days)}
    series: dict[str, list[int]] = {}
    for (day, value), acc in collector.groups.items():
        name = value if value is not None else "(none)"
        line = series.setdefault(name, [0] * len(days))
        if day is not None:
            line[index[day]] += acc.sums["cost_micro_usd"]
    ordered = dict(sorted(series.items(), key=lambda kv: (-sum(kv[1]), kv[0])))
    return DailySpend(days=days, series=ordered, stack=stack)


def report_columns(by: Grouping, fmt: str) -> list[Column]:
    """The columns of a spend report: the table keeps the essentials, JSON/CSV get them all."""
    columns = [
        Column(by, by),
        Column("runs", "runs"),
        Column("calls", "calls"),
        Column("failed", "failed"),
        Column("fallbacks", "fallbacks"),
    ]
    if by in RUN_GROUPINGS:
        columns.append(Column("skipped", "skipped"))
    columns += [
        Column("input_tokens", "input"),
        Column("cache_read_tokens", "cache read"),
        Column("cache_write_tokens", "cache write"),
        Column("output_tokens", "output"),
        Column("reasoning_tokens", "reasoning"),
        Column("cost_micro_usd", "cost_usd", money=True),
    ]
    if fmt != "table":
        columns.append(Column("reserved_micro_usd", "reserved_usd", money=True))
    columns += [Column("avg_latency_ms", "avg ms"), Column("p95_latency_ms", "p95 ms")]
    return columns
