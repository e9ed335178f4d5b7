"""Where `agentd reprice` reads the sums of `ok` calls: the report cache, raw rows elsewhere.

The cache (`spendcache`) keeps, per hour or whole UTC day and (loop, tier, model, provider,
purpose, simulated, alias, batch flag, input band), the `ok_*` sums of the `ok` calls alone, so
a month of a million calls is a few thousand cached rows. The range is split as the spend
reports split it (`spendcache.plan`): cached days and hours, and raw rows for its edges, the
holes (hours with calls in flight, back-dated calls, pruned days' remains) and the hours after
the watermark. Without a cache (a read-only ledger nobody reported on, `cache=False`), or when
a price changes at an input size the cached bands do not split at, every row is read raw, in
one grouped scan of `calls`.

Either way each group's calls fall between two consecutive thresholds of some list that holds
every threshold of the prices involved, so every price has one rate for the whole group: a
group carries an input size from its band (`size`) that `Price.rates_for` prices it at.
Sums are exact integers, so a group split across sources prices to the same Decimal.

`daily_rollup` (days `agentd ledger prune` removed) has no alias, batch flag, 1-hour writes,
bands nor `ok`-only token sums: its days cannot be re-priced, only counted (`pruned`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from agentd import spendcache
from agentd.ledger import utc_iso


@dataclass(frozen=True)
class OkGroup:
    """The summed `ok` calls of one loop, tier, alias, batch flag and input band."""

    loop: str
    tier: str | None  # None when the target does not look at the call's tier
    alias: str | None
    batch: bool
    size: int  # an input size in the group's band: every price has its rates there
    calls: int
    actual: int  # their cost in the ledger, micro-USD
    # Uncached input, cache read, 5-minute write, 1-hour write, output tokens.
    tokens: tuple[int, int, int, int, int]


# What a raw scan sums per group; the token columns are NULL together (a call without usage).
# Cache writes split by TTL; rows from before migration m009 have no 1h count (all 5m).
_RAW_SUMS = (
    "COUNT(*), SUM(cost_micro_usd), SUM(input_tokens), SUM(cache_read_tokens),"
    " SUM(cache_write_tokens), SUM(cache_write_1h_tokens), SUM(output_tokens)"
)
_CACHED_SUMS = ", ".join(f"SUM({name})" for name in spendcache.OK_NAMES)


def ok_groups(
    conn: sqlite3.Connection,
    thresholds: Sequence[int],
    *,
    by_tier: bool,
    since: datetime | None,
    until: datetime | None,
    simulated: bool,
    cache: bool = True,
) -> list[OkGroup]:
    """The `ok` calls of [since, until), grouped; split at every one of `thresholds`.

    Read from the cache where it holds the range and splits at every threshold; a group may
    come in several parts (summing them is the caller's business).
    """
    stored = spendcache.bands(conn) if cache else None
    plan = None
    if stored is not None and set(thresholds) <= set(stored):
        plan = spendcache.plan(conn, since, until)
    if plan is None:
        return _raw(conn, thresholds, by_tier, since, until, simulated, ranged=False)
    assert stored is not None
    groups: list[OkGroup] = []
    for low, high in plan.raw:
        groups += _raw(conn, thresholds, by_tier, low, high, simulated, ranged=True)
    for table, time, first, end in plan.parts:
        if first is None or first < end:
            groups += _cached(conn, stored, by_tier, simulated, table, time, first, end)
    return groups


def _size(band: int, thresholds: Sequence[int]) -> int:
    # Calls in band b have input in (thresholds[b-1], thresholds[b]]: one input size stands
    # for them all.
    return 0 if band == 0 else thresholds[band - 1] + 1


def _group(row: Sequence[Any], thresholds: Sequence[int], by_tier: bool) -> OkGroup:
    loop, tier, alias, batch, band, count, actual = row[:7]
    inp, read, write, write_1h, output = (int(v or 0) for v in row[7:])
    return OkGroup(
        loop=str(loop),
        tier=tier if by_tier else None,
        alias=alias,
        batch=bool(batch),
        size=_size(int(band), thresholds),
        calls=int(count),
        actual=int(actual or 0),
        tokens=(inp - read - write, read, write - write_1h, write_1h, output),
    )


def _raw(
    conn: sqlite3.Connection,
    thresholds: Sequence[int],
    by_tier: bool,
    since: datetime | None,
    until: datetime | None,
    simulated: bool,
    *,
    ranged: bool,
) -> list[OkGroup]:
    """One grouped scan of the `ok` calls of [since, until)."""
    # A constant key (the tier when the target ignores it, the band when no price has one)
    # is left out of the GROUP BY, whose sort is most of the scan's cost.
    keys = [
        "loop",
        "tier" if by_tier else "NULL",
        "alias",
        "batch",
        spendcache.band_sql(thresholds),
    ]
    group = ", ".join(str(n) for n, key in enumerate(keys, 1) if key not in ("NULL", "0"))
    where = "status = 'ok' AND simulated = ?"
    params: list[object] = [int(simulated)]
    if since is not None:
        where += " AND started_at >= ?"
        params.append(utc_iso(since))
    if until is not None:
        where += " AND started_at < ?"
        params.append(utc_iso(until))
    # An edge or a hole of a cached range: walk the time index, as the spend reports do.
    hint = "INDEXED BY calls_started_at" if ranged else ""
    rows = conn.execute(
        f"SELECT {', '.join(keys)}, {_RAW_SUMS} FROM calls {hint} WHERE {where} GROUP BY {group}",
        params,
    ).fetchall()
    return [_group(row, thresholds, by_tier) for row in rows]


def _cached(
    conn: sqlite3.Connection,
    stored: Sequence[int],
    by_tier: bool,
    simulated: bool,
    table: str,
    time: str,
    first: str | None,
    end: str,
) -> list[OkGroup]:
    """The `ok_*` sums of one cached part (days of `report_days` or hours of `report_hours`)."""
    where = f"simulated = ? AND {time} < ?"
    params: list[object] = [int(simulated), end]
    if first is not None:
        where += f" AND {time} >= ?"
        params.append(first)
    tier = "tier" if by_tier else "NULL"
    group = "loop, tier, alias, batch, band" if by_tier else "loop, alias, batch, band"
    rows = conn.execute(
        f"SELECT loop, {tier}, alias, batch, band, {_CACHED_SUMS} FROM {table}"
        f" WHERE {where} GROUP BY {group} HAVING SUM(ok_calls) > 0",
        params,
    ).fetchall()
    return [_group(row, stored, by_tier) for row in rows]


@dataclass(frozen=True)
class Pruned:
    """Days of the range `agentd ledger prune` rolled up: their `ok` calls are not re-priced."""

    days: int
    calls: int


def pruned(
    conn: sqlite3.Connection, since: datetime | None, until: datetime | None, simulated: bool
) -> Pruned:
    """The rolled-up UTC days that overlap [since, until), and their `ok` calls."""
    where = "simulated = ? AND calls > failed"
    params: list[object] = [int(simulated)]
    if since is not None:
        where += " AND day >= ?"
        params.append(utc_iso(since)[:10])
    if until is not None:
        where += " AND day || 'T00:00:00.000000Z' < ?"
        params.append(utc_iso(until))
    days, calls = conn.execute(
        f"SELECT COUNT(DISTINCT day), SUM(calls - failed) FROM daily_rollup WHERE {where}", params
    ).fetchone()
    return Pruned(int(days), int(calls or 0))
