"""Spend report groups: groupings, the filter of a report, running sums, calendar periods."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, get_args
from zoneinfo import ZoneInfo

from agentd import spendcache
from agentd.ledger import parse_iso, utc_iso

# A quarter-hour bucket of a ledger timestamp: `YYYY-MM-DDTHH:q` with q in 0..3.
_QUARTER = "substr({c}, 1, 13) || ':' || (CAST(substr({c}, 15, 2) AS INTEGER) / 15)"

Grouping = Literal["loop", "tier", "model", "provider", "purpose", "day", "week", "month"]
GROUPINGS: tuple[Grouping, ...] = get_args(Grouping)
Period = Literal["day", "week", "month"]
PERIODS: tuple[Period, ...] = ("day", "week", "month")
COLUMNS = ("loop", "tier", "model", "provider", "purpose")
# Skipped runs have a loop and a time but no call, so no tier, model, provider or purpose.
RUN_GROUPINGS = frozenset({"loop", "day", "week", "month"})
UTC_ZONE = ZoneInfo("UTC")

SUMS = (
    "runs",
    "fallbacks",
    "skipped",
    "noop",  # of the skipped runs, those with nothing to do (`skipped_noop`): no money spent
    "calls",
    "failed",
    "input_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
    "cost_micro_usd",
    "reserved_micro_usd",
    "list_cost_micro_usd",  # shown as `saved_micro_usd`, list cost − cost
    "latency_count",
    "latency_ms_sum",
    "rolled_up_calls",
)

Key = tuple[str | None, str | None]  # (period label, column value)


@dataclass
class Acc:
    """Running sums of one group."""

    sums: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SUMS, 0))

    def add(self, names: Sequence[str], values: Iterable[Any]) -> None:
        for name, value in zip(names, values, strict=True):
            self.sums[name] += int(value or 0)


def nearest_rank(n: int) -> int:
    """The 1-based rank of the p95 among n sorted values: ⌈0.95·n⌉ (integers only)."""
    return (95 * n + 99) // 100


def mean_ms(total: int, count: int) -> int | None:
    """An integer mean rounded half up, without floats; None for no values."""
    return None if count == 0 else (2 * total + count) // (2 * count)


@functools.lru_cache(maxsize=32)
def whole_hours(zone: str) -> bool:
    """True when the zone's offset is a whole number of hours (sampled twice a month)."""
    tz = ZoneInfo(zone)
    for year in range(1990, 2050):
        for month in range(1, 13):
            for day in (1, 15):
                offset = datetime(year, month, day, tzinfo=UTC).astimezone(tz).utcoffset()
                if offset is None or offset.total_seconds() % 3600:
                    return False
    return True


def is_utc(tz: ZoneInfo) -> bool:
    return tz.key in {"UTC", "Etc/UTC", "Etc/Universal", "Universal", "Zulu", "Etc/Zulu"}


class Periods:
    """Maps SQL time buckets and roll-up days to local period labels (cached), and back."""

    def __init__(self, period: Period, tz: ZoneInfo) -> None:
        self.period = period
        self.tz = tz
        self.utc = is_utc(tz)
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
            # Imported here: only calendar groupings need it, and `agentd ledger` by loop must
            # not pay for budgets' imports.
            from agentd.budgets import window_bounds

            self.bounds[label] = window_bounds(self.period, at, self.tz)
        return label

    def bucket_label(self, bucket: str) -> str:
        """The period label of a bucket from `bucket_sql`."""
        label = self._cache.get(bucket)
        if label is None:
            if len(bucket) == 7:  # YYYY-MM
                at = datetime.fromisoformat(bucket + "-01").replace(tzinfo=UTC)
            elif len(bucket) == 13:  # YYYY-MM-DDTHH
                at = spendcache.hour_start(bucket)
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
class Filter:
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


def percentile_95(values: list[int]) -> int | None:
    """The exact nearest-rank p95 of the values (sorts them in place); None when empty."""
    if not values:
        return None
    values.sort()
    return values[nearest_rank(len(values)) - 1]
