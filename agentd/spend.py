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
and calendar groupings only; `noop` those of them skipped because there was nothing to do
(`skipped_noop`); `failed` attempts that ended `error` or `aborted`; `cost` settled
spend (aborted attempts at their reservation) and `reserved` what calls in flight hold now;
`saved` what prompt caching and batching saved against list price: the settled calls' list
cost (`calls.list_cost_micro_usd`, a NULL read as the call's cost: no saving known) less their
cost. Failed, aborted and in-flight calls save nothing; cache writes cost more than list, so a
group can save a negative amount.
Latency is over settled attempts: the mean, and the exact p95 (nearest rank: the
⌈0.95·n⌉-th smallest). A group that includes pruned calls has no p95 (a roll-up keeps sums,
not distributions).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal
from zoneinfo import ZoneInfo

from agentd.ledger import Ledger
from agentd.reports import Column
from agentd.spendgroups import (
    COLUMNS,
    GROUPINGS,
    PERIODS,
    RUN_GROUPINGS,
    SUMS,
    UTC_ZONE,
    Acc,
    Filter,
    Grouping,
    Key,
    Period,
    mean_ms,
    nearest_rank,
    percentile_95,
)
from agentd.spendsources import collected, refresh_range

__all__ = [
    "COLUMNS",
    "GROUPINGS",
    "PERIODS",
    "RUN_GROUPINGS",
    "UTC_ZONE",
    "DailySpend",
    "Grouping",
    "Period",
    "SpendReport",
    "daily_spend",
    "mean_ms",
    "nearest_rank",
    "percentile_95",
    "report_columns",
    "spend_report",
]


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


# The sums a report row shows as they are (the others feed the latency mean, p95 and saving).
_SHOWN = SUMS[: SUMS.index("reserved_micro_usd") + 1]


def _row(by: str, key_value: str | None, acc: Acc, p95: int | None, runs: bool) -> dict[str, Any]:
    s = acc.sums
    row: dict[str, Any] = {by: key_value}
    for name in _SHOWN:
        row[name] = s[name]
    if not runs:
        row["skipped"] = row["noop"] = None
    row["saved_micro_usd"] = s["list_cost_micro_usd"] - s["cost_micro_usd"]
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
    cache: bool = True,
) -> SpendReport:
    """Spend grouped `by` a column or a calendar period over [since, until), with totals.

    `cache=False` reads raw rows only (same result, slower): the reference the cache is
    tested against.
    """
    if by not in GROUPINGS:
        raise ValueError(f"cannot group by {by!r} (one of {', '.join(GROUPINGS)})")
    period: Period | None = by if by in PERIODS else None
    column = None if period is not None else by
    flt = Filter(since, until, simulated, loop)
    runs = by in RUN_GROUPINGS
    if cache:
        refresh_range(ledger, since)
    with ledger.read() as conn:
        collector = collected(ledger, conn, flt, period, column, tz, runs=True, cache=cache)
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
        p95s, total_p95 = collector.p95s(keys, latencies)
    rows = []
    total = Acc()
    for key in keys:
        acc = groups.get(key) or Acc()
        total.add(SUMS, (acc.sums[n] for n in SUMS))
        p95 = None if acc.sums["rolled_up_calls"] else p95s[key]
        rows.append(_row(by, key[0] if period else key[1], acc, p95, runs))
    if total.sums["rolled_up_calls"]:
        total_p95 = None
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
    cache: bool = True,
) -> DailySpend:
    """Settled spend per local day, split by loop or tier (a missing tier is `(none)`)."""
    if stack not in ("loop", "tier"):
        raise ValueError(f"cannot stack by {stack!r} (loop or tier)")
    if cache:
        refresh_range(ledger, since)
    with ledger.read() as conn:
        flt = Filter(since, until, simulated, loop)
        collector = collected(ledger, conn, flt, "day", stack, tz, runs=False, cache=cache)
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
        columns.append(Column("noop", "noop"))
    columns += [
        Column("input_tokens", "input"),
        Column("cache_read_tokens", "cache read"),
        Column("cache_write_tokens", "cache write"),
        Column("output_tokens", "output"),
        Column("reasoning_tokens", "reasoning"),
        Column("cost_micro_usd", "cost_usd", money=True),
        Column("saved_micro_usd", "saved_usd", money=True),
    ]
    if fmt != "table":
        columns.append(Column("reserved_micro_usd", "reserved_usd", money=True))
    columns += [Column("avg_latency_ms", "avg ms"), Column("p95_latency_ms", "p95 ms")]
    return columns
