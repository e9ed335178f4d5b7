"""The groups of a spend report, and their exact p95 latencies.

`GroupReader` holds what every source of one report shares (its filter, and how a row or a
cached bucket maps to a group); `spendsources` adds the sums. Latency is over settled
attempts: the exact nearest-rank p95 from raw values, with cached histograms (`spendcache`)
locating the bucket that holds the rank so only that bucket's raw latencies are read.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo

from agentd import spendcache
from agentd.spendgroups import (
    COLUMNS,
    Filter,
    Key,
    Period,
    Periods,
    nearest_rank,
    percentile_95,
)

_SCAN_RANGE = 100_000  # cached latencies in a range below which it is scanned, not probed


@dataclass
class FineRows:
    """Rows of one range keyed by (day bucket, *COLUMNS), which every report over it can fold.

    `fallbacks`: (bucket, loop, tier, model, provider, purpose, count); `skipped`: (bucket,
    loop, count, noop); `latencies`: histogram bucket → (bucket, *COLUMNS) → latencies.
    """

    fallbacks: list[tuple[Any, ...]] | None = None
    skipped: list[tuple[Any, ...]] | None = None
    latencies: dict[int, dict[tuple[Any, ...], list[int]]] = field(default_factory=dict)


_SHARED: ContextVar[dict[tuple[Filter, str], FineRows] | None] = ContextVar(
    "agentd_spend_shared", default=None
)


@contextmanager
def shared_reads() -> Iterator[None]:
    """Within it, reports over the same range read their run counts and p95 buckets once.

    `agentd report --html` draws six groupings of one range: each would repeat the same three
    scans (fallback runs, skipped runs, the p95 buckets' latencies), which were most of its
    time. Use it inside one read transaction, so every report folds rows of one snapshot.
    """
    token = _SHARED.set({})
    try:
        yield
    finally:
        _SHARED.reset(token)


class GroupReader:
    """Maps rows of one report to groups keyed by (period label, column value); reads p95s."""

    def __init__(
        self, conn: Any, flt: Filter, period: Period | None, column: str | None, tz: ZoneInfo
    ) -> None:
        if column is not None and column not in COLUMNS:
            raise ValueError(f"cannot group by {column!r}")
        self.conn = conn
        self.flt = flt
        self.tz = tz
        self.periods = None if period is None else Periods(period, tz)
        self.column = column
        # Shared rows are keyed by the day grouping's buckets: those fold into no period or days.
        shared = _SHARED.get()
        self.fine: FineRows | None = None
        if shared is not None and period in (None, "day"):
            self.fine = shared.setdefault((flt, tz.key), FineRows())
        self.hists: dict[Key, list[int]] = {}  # cached latency histograms, by group
        self.raw = [flt]  # the parts of the range read from raw rows

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

    def _fine_sql(self, alias: str = "") -> tuple[str, str]:
        """Select items and GROUP BY of the shared key: the day bucket and every column."""
        p = f"{alias}." if alias else ""
        items = ", ".join([self.day_bucket_sql(alias), *(p + c for c in COLUMNS)])
        return items, f" GROUP BY {items}"

    def day_bucket_sql(self, alias: str = "") -> str:
        """The SQL bucket of `started_at` that the day grouping of this zone reads."""
        return Periods("day", self.tz).bucket_sql(f"{alias}.started_at" if alias else "started_at")

    def _fine_key(self, row: Sequence[Any]) -> Key:
        """This report's group of a shared row (bucket, *COLUMNS, ...)."""
        value = None if self.column is None else row[1 + COLUMNS.index(self.column)]
        return self._key(row[0], value)

    def _key(self, bucket: str, value: str | None, rolled_up: bool = False) -> Key:
        label = None
        if self.periods is not None:
            label = (
                self.periods.day_label(bucket) if rolled_up else self.periods.bucket_label(bucket)
            )
        if self.column is None:
            return label, None
        return label, (value or None) if rolled_up else value

    def latencies(self) -> dict[Key, list[int]]:
        """Every raw settled call's latency in the range, by group (for exact percentiles).

        One pass fetching the values beats one sorting query per group: SQLite's sorter costs
        more per row than Python's list sort, and the range is read once instead of per group.
        """
        select, _ = self._key_sql()
        out: dict[Key, list[int]] = {}
        for flt in self.raw:
            where, params = flt.sql()
            ranged = flt.since is not None or flt.until is not None
            hint = "INDEXED BY calls_started_at" if ranged else ""
            for bucket, value, ms in self.conn.execute(
                f"SELECT {select}, latency_ms FROM calls {hint}"
                f" WHERE {where} AND latency_ms IS NOT NULL",
                params,
            ):
                out.setdefault(self._key(bucket, value), []).append(int(ms))
        return out

    def p95s(
        self, keys: Sequence[Key], latencies: dict[Key, list[int]]
    ) -> tuple[dict[Key, int | None], int | None]:
        """The exact p95 of each group and of all of them (the total).

        Raw values are sorted directly; where cached histograms are involved, they locate the
        bucket holding the rank and only that bucket's raw latencies are read (by index).
        """
        nb = len(spendcache.HIST_COLUMNS)
        total_hist = [0] * nb
        for hist in self.hists.values():
            for i, count in enumerate(hist):
                total_hist[i] += count
        wanted: dict[tuple[Key | None, int], int] = {}  # (group or None: total, bucket) → rank
        out: dict[Key, int | None] = {}
        total: int | None = None

        def plan(target: Key | None, hist: list[int], values: list[int]) -> int | None:
            if not any(hist):
                return percentile_95(values)
            merged = list(hist)
            for ms in values:
                merged[spendcache.bucket_of(ms)] += 1
            rank = nearest_rank(sum(merged))
            for index, count in enumerate(merged):
                if rank <= count:
                    wanted[(target, index)] = rank
                    return None
                rank -= count
            raise AssertionError("rank beyond the histogram")

        for key in keys:
            out[key] = plan(key, self.hists.get(key, [0] * nb), latencies.get(key, []))
        total = plan(None, total_hist, [ms for values in latencies.values() for ms in values])
        if wanted:
            found = self._bucket_values({index for _, index in wanted})
            for (target, index), rank in wanted.items():
                if target is None:
                    pool = [ms for (_, i), v in found.items() if i == index for ms in v]
                else:
                    pool = found.get((target, index), [])
                pool.sort()
                if target is None:
                    total = pool[rank - 1]
                else:
                    out[target] = pool[rank - 1]
        return out, total

    def _bucket_values(self, buckets: set[int]) -> dict[tuple[Key, int], list[int]]:
        """Every raw latency in the range that falls in one of the buckets, by group."""
        found: dict[tuple[Key, int], list[int]] = {}
        if self.fine is None:
            select, _ = self._key_sql()
            for bucket, value, ms in self._bucket_rows(buckets, select):
                index = spendcache.bucket_of(int(ms))
                found.setdefault((self._key(bucket, value), index), []).append(int(ms))
            return found
        shared = self.fine.latencies
        missing = buckets - shared.keys()
        for index in missing:
            shared[index] = {}
        if missing:
            for *fine, ms in self._bucket_rows(missing, self._fine_sql()[0]):
                index = spendcache.bucket_of(int(ms))
                shared[index].setdefault(tuple(fine), []).append(int(ms))
        for index in buckets:
            for fine_key, values in shared[index].items():
                found.setdefault((self._fine_key(fine_key), index), []).extend(values)
        return found

    def _bucket_rows(self, buckets: Iterable[int], select: str) -> Iterator[tuple[Any, ...]]:
        """(select items..., latency_ms) of every raw latency in the range in the buckets."""
        where, params = self.flt.sql()
        if self._ranged and sum(sum(h) for h in self.hists.values()) < _SCAN_RANGE:
            # A short range: one pass over its rows beats probing the buckets ledger-wide.
            # SQLite keeps only the wanted buckets' rows (a few per cent): building a Python
            # row for every latency of the range cost more than the rest of the report.
            ranges, extra = [], []
            for index in sorted(buckets):
                clause, bounds = spendcache.bucket_sql(index)
                ranges.append(f"({clause})")
                extra.extend(bounds)
            yield from self.conn.execute(
                f"SELECT {select}, latency_ms FROM calls INDEXED BY calls_started_at"
                f" WHERE {where} AND latency_ms IS NOT NULL AND ({' OR '.join(ranges)})",
                [*params, *extra],
            )
            return
        for index in sorted(buckets):
            clause, bounds = spendcache.bucket_sql(index)
            yield from self.conn.execute(
                f"SELECT {select}, latency_ms FROM calls INDEXED BY calls_latency"
                f" WHERE {where} AND latency_ms IS NOT NULL AND {clause}",
                [*params, *bounds],
            )
