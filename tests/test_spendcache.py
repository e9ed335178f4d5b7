"""The per-hour report cache never changes a report: cached and raw results are identical."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from ledgergen import generate_ledger

from agentd import spendcache
from agentd.ledger import Ledger, utc_iso
from agentd.retention import prune
from agentd.spend import GROUPINGS, DailySpend, SpendReport
from agentd.spend import daily_spend as _daily_spend
from agentd.spend import spend_report as _spend_report
from agentd.spendsources import refresh_cache, refresh_range

NOW = datetime.now(UTC)
ZONES = ("UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata")


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    # Rows up to now: closed hours get cached, the last ones stay raw; a few calls in flight.
    end = NOW.replace(microsecond=0)
    generate_ledger(tmp_path / "s", calls=6000, days=12, end=end, seed=3)
    with Ledger.open(tmp_path / "s", reconcile=False) as opened:
        yield opened


def spend_report(ledger: Ledger, *, cache: bool = True, **kwargs: Any) -> SpendReport:
    """A report as the views make it: the range's hours cached first (with the cache on)."""
    if cache:
        refresh_range(ledger, kwargs.get("since"))
    return _spend_report(ledger, cache=cache, **kwargs)


def daily_spend(ledger: Ledger, *, cache: bool = True, **kwargs: Any) -> DailySpend:
    """A chart's series as the views make it (see `spend_report`)."""
    if cache:
        refresh_range(ledger, kwargs.get("since"))
    return _daily_spend(ledger, cache=cache, **kwargs)


def reports(ledger: Ledger, cache: bool = True) -> list[Any]:
    out: list[Any] = []
    ranges = [
        (None, None),
        (NOW - timedelta(days=5, minutes=17), None),
        (NOW - timedelta(days=9, hours=3, minutes=5), NOW - timedelta(days=2, minutes=42)),
    ]
    for zone in ZONES:
        tz = ZoneInfo(zone)
        for by in GROUPINGS:
            for since, until in ranges:
                out.append(
                    spend_report(ledger, by=by, since=since, until=until, tz=tz, cache=cache)
                )
        out.append(spend_report(ledger, by="day", tz=tz, loop="triage", cache=cache))
        out.append(spend_report(ledger, by="week", tz=tz, simulated=True, cache=cache))
        out.append(daily_spend(ledger, stack="tier", tz=tz, cache=cache))
        out.append(daily_spend(ledger, stack="loop", tz=tz, since=ranges[2][0], cache=cache))
    for by in GROUPINGS:
        out.append(spend_report(ledger, by=by, simulated=True, cache=cache))
    return out


def raw_reports(ledger: Ledger) -> list[Any]:
    return reports(ledger, cache=False)


def cached_hours(ledger: Ledger) -> int:
    return int(ledger.conn.execute("SELECT COUNT(DISTINCT hour) FROM report_hours").fetchone()[0])


def test_cached_reports_equal_raw_reports(ledger: Ledger) -> None:
    raw = raw_reports(ledger)
    assert cached_hours(ledger) == 0
    first = reports(ledger)  # fills the cache
    assert cached_hours(ledger) > 200
    assert ledger.conn.execute("SELECT COUNT(*) FROM report_days").fetchone()[0] > 0
    assert first == raw
    assert reports(ledger) == raw
    # A p95 that needs the histogram: some group's p95 comes from cached hours.
    assert any(r.total["p95_latency_ms"] for r in raw if hasattr(r, "total"))


def test_unsettled_hours_stay_raw_until_settled(ledger: Ledger) -> None:
    pending = ledger.conn.execute(
        "SELECT id, substr(started_at, 1, 13) FROM calls WHERE status = 'ok'"
        " AND started_at < ? ORDER BY id DESC LIMIT 1",
        (utc_iso(NOW - timedelta(days=2)),),
    ).fetchone()
    with ledger.write() as conn:  # in flight (its owner alive) in an old hour
        conn.execute(
            "UPDATE calls SET status = 'pending', cost_micro_usd = NULL, latency_ms = NULL,"
            " finished_at = NULL WHERE id = ?",
            (pending[0],),
        )
    spend_report(ledger, by="loop")
    holes = {r[0] for r in ledger.conn.execute("SELECT hour FROM report_holes")}
    assert pending[1] in holes
    with ledger.write() as conn:  # settle it, as `budgets.settle` does
        conn.execute(
            "UPDATE calls SET status = 'ok', cost_micro_usd = 123, latency_ms = 77777,"
            " finished_at = started_at, input_tokens = 10, output_tokens = 5 WHERE id = ?",
            (pending[0],),
        )
    assert reports(ledger) == raw_reports(ledger)
    holes = {r[0] for r in ledger.conn.execute("SELECT hour FROM report_holes")}
    assert pending[1] not in holes


def test_back_dated_call_invalidates_its_hour(ledger: Ledger) -> None:
    spend_report(ledger, by="loop")
    with ledger.write() as conn:
        conn.execute(
            "INSERT INTO calls (run_id, loop, purpose, tier, alias, provider, model, attempt,"
            " status, input_tokens, output_tokens, reserved_micro_usd, cost_micro_usd, priced,"
            " simulated, batch, owner, started_at, finished_at, latency_ms)"
            " SELECT NULL, loop, purpose, tier, alias, provider, model, 2, 'ok', 1, 1, 5, 5, 1,"
            " 0, 0, owner, started_at, finished_at, 99999 FROM calls"
            " WHERE status = 'ok' AND simulated = 0 ORDER BY id LIMIT 1"
        )
    assert reports(ledger) == raw_reports(ledger)


def test_prune_drops_cached_hours(ledger: Ledger) -> None:
    spend_report(ledger, by="loop")
    before = (NOW - timedelta(days=6)).replace(hour=0, minute=0, second=0, microsecond=0)
    result = prune(ledger, before, now=NOW + timedelta(days=90), tz=None)
    assert result.calls > 0
    left = ledger.conn.execute(
        "SELECT COUNT(*) FROM report_hours WHERE hour < ?", (spendcache.hour_key(before),)
    ).fetchone()[0]
    assert left == 0
    assert reports(ledger) == raw_reports(ledger)


def test_a_read_only_ledger_reads_what_is_cached(ledger: Ledger) -> None:
    spend_report(ledger, by="loop")  # the owner fills the cache
    with ledger.write() as conn:  # a back-dated call the read-only reader cannot cache
        conn.execute(
            "INSERT INTO calls (loop, purpose, tier, provider, model, attempt, status,"
            " cost_micro_usd, reserved_micro_usd, simulated, owner, started_at, latency_ms)"
            " VALUES ('late', 'work', 'fast', 'p', 'm', 1, 'ok', 9, 9, 0, 'o', ?, 4321)",
            (utc_iso(NOW - timedelta(days=3)),),
        )
    # A real read-only connection, as another user's `agentd ledger` gets.
    conn = sqlite3.connect(f"file:{ledger.path}?mode=ro", uri=True, isolation_level=None)
    reader = Ledger(conn, ledger.path, read_only=True)
    try:
        assert reports(reader) == raw_reports(reader)
    finally:
        reader.close()
    assert (
        ledger.conn.execute("SELECT last_id FROM report_cache").fetchone()[0]
        < (ledger.conn.execute("SELECT MAX(id) FROM calls").fetchone()[0])
    )


def holes(ledger: Ledger) -> set[str]:
    return {str(r[0]) for r in ledger.conn.execute("SELECT hour FROM report_holes")}


def test_a_short_report_after_a_long_gap_caches_only_its_range(ledger: Ledger) -> None:
    # Twelve days nobody reported on, then the default report (the last day): it caches the
    # day it reads, not the eleven before it, which become holes until a report reaches back.
    raw = raw_reports(ledger)
    day_ago = NOW - timedelta(hours=24)
    last_day = spend_report(ledger, by="loop", since=day_ago)
    assert last_day == _spend_report(ledger, by="loop", since=day_ago, cache=False)
    assert 0 < cached_hours(ledger) <= 24
    first = ledger.conn.execute("SELECT MIN(substr(started_at, 1, 13)) FROM calls").fetchone()[0]
    gap = holes(ledger)
    assert min(gap) == first
    assert max(gap) == spendcache.hour_key(day_ago - timedelta(hours=1))
    # Reports over the holes read them raw: the same figures.
    assert [_spend_report(ledger, by=by, tz=ZoneInfo("Europe/Berlin")) for by in GROUPINGS] == [
        _spend_report(ledger, by=by, tz=ZoneInfo("Europe/Berlin"), cache=False) for by in GROUPINGS
    ]
    # A report over everything fills them (but the hours with calls in flight).
    assert reports(ledger) == raw
    unsettled = {
        str(r[0])
        for r in ledger.conn.execute(
            "SELECT DISTINCT substr(started_at, 1, 13) FROM calls"
            " WHERE status IN ('pending', 'submitted')"
        )
    }
    assert holes(ledger) <= unsettled
    assert cached_hours(ledger) > 200


def test_the_default_refresh_caches_the_last_day_only(ledger: Ledger) -> None:
    refresh_cache(ledger)  # what a report of the default range (`--since 24h`) fills
    oldest = ledger.conn.execute("SELECT MIN(hour) FROM report_hours").fetchone()[0]
    assert oldest >= spendcache.hour_key(NOW - timedelta(hours=25))
    assert reports(ledger) == raw_reports(ledger)


def test_a_refresh_leaves_recorded_holes_alone(ledger: Ledger) -> None:
    # Eleven days of holes (a report of the last day only); every later refresh used to delete
    # and re-insert each of their ~260 rows and rebuild their days, changing nothing.
    day_ago = NOW - timedelta(hours=24)
    spend_report(ledger, by="loop", since=day_ago)
    gap = holes(ledger)
    assert len(gap) > 200
    statements: list[str] = []
    ledger.conn.set_trace_callback(statements.append)
    try:
        refresh_range(ledger, day_ago)
    finally:
        ledger.conn.set_trace_callback(None)
    tables = ("report_holes", "report_days", "report_hours")
    rewrites = [s for s in statements if not s.startswith("SELECT") and any(t in s for t in tables)]
    assert rewrites == [], rewrites[:3]
    assert holes(ledger) == gap
