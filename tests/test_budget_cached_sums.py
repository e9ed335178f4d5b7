"""Budget window sums read from the report cache: always what the rows themselves sum to.

`budgetcache.window_sum` takes the closed hours the report cache holds from `report_hours` /
`report_days` and the rest from `calls`; `raw_window_sum` sums the rows only. They must agree
to the micro-dollar for every window, scope and kind, in any time zone (30-minute offsets
and DST included), with calls in flight, aborted calls, calls without a cost, back-dated
calls written into cached hours, and calls settled after the cache was filled.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from builders import haiku_call

from agentd import budgets, spendcache
from agentd.budgetcache import raw_window_sum, window_sum
from agentd.budgets import window_bounds
from agentd.ledger import Ledger, utc_iso
from agentd.providers.base import Usage

NOW = datetime(2026, 11, 26, 15, 40, tzinfo=UTC)
ZONES = [ZoneInfo("UTC"), ZoneInfo("America/New_York"), ZoneInfo("Asia/Kolkata")]
LOOPS = ("alpha", "beta")


def write_calls(ledger: Ledger, rng: random.Random, n: int, first: datetime) -> list[int]:
    """`n` calls between `first` and NOW; returns the ids left in flight."""
    open_ids: list[int] = []
    span = (NOW - first).total_seconds()
    for _ in range(n):
        at = first + timedelta(seconds=rng.uniform(0, span))
        loop, simulated = rng.choice(LOOPS), rng.random() < 0.3
        reserved = rng.randint(1, 5000)
        call_id = budgets.reserve(
            ledger, haiku_call(loop, simulated=simulated), reserved, [], UTC, now=at
        )
        fate = rng.random()
        if fate < 0.1:
            open_ids.append(call_id)  # still in flight
            continue
        if fate < 0.2:
            status, cost = "aborted", reserved  # charged at its reservation
        elif fate < 0.3:
            status, cost = "error", 0
        else:
            status, cost = "ok", rng.randint(0, reserved * 2)
        budgets.settle(
            ledger,
            call_id,
            status=status,  # type: ignore[arg-type]
            usage=Usage(input_tokens=10, output_tokens=5) if status == "ok" else None,
            cost_micro_usd=cost,
            priced=True,
        )
    return open_ids


def assert_cached_equals_raw(ledger: Ledger, *, expect_cache: bool = True) -> int:
    """Every window containing NOW (and one ending just before it): cached == raw."""
    checked = 0
    with ledger.read() as conn:
        assert (spendcache.plan(conn, NOW - timedelta(days=40), NOW) is not None) == expect_cache
        for tz in ZONES:
            for period in budgets.PERIODS:
                for at in (NOW, NOW - timedelta(days=8), NOW - timedelta(hours=3)):
                    low, high = window_bounds(period, at, tz)
                    for scope in (*LOOPS, "global"):
                        for simulated in (False, True):
                            key = (scope, simulated, utc_iso(low), utc_iso(high))
                            assert window_sum(conn, *key) == raw_window_sum(conn, *key), key
                            checked += 1
    return checked


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    with Ledger.open(tmp_path / "state") as opened:
        yield opened


def test_cached_window_sums_equal_the_rows(ledger: Ledger) -> None:
    rng = random.Random(20261126)
    open_ids = write_calls(ledger, rng, 1500, NOW - timedelta(days=45))
    spendcache.refresh(ledger, NOW)
    with ledger.read() as conn:
        cached_hours = conn.execute("SELECT COUNT(DISTINCT hour) FROM report_hours").fetchone()[0]
        assert cached_hours > 500  # most of the 45 days come from the cache
    assert assert_cached_equals_raw(ledger) == len(ZONES) * 4 * 3 * 3 * 2

    # A back-dated call lands in a cached hour: that hour is read from the rows again.
    back = NOW - timedelta(days=3, minutes=17)
    call_id = budgets.reserve(ledger, haiku_call("alpha"), 777, [], UTC, now=back)
    budgets.settle(ledger, call_id, status="ok", usage=None, cost_micro_usd=555, priced=True)
    assert_cached_equals_raw(ledger)

    # Calls in flight settle after the fill (their hours were holes): still exact.
    for call_id in open_ids[: len(open_ids) // 2]:
        budgets.settle(ledger, call_id, status="ok", usage=None, cost_micro_usd=42, priced=True)
    assert_cached_equals_raw(ledger)
    spendcache.refresh(ledger, NOW)  # and once the holes are filled
    assert_cached_equals_raw(ledger)


def test_without_a_cache_the_rows_are_summed(ledger: Ledger) -> None:
    write_calls(ledger, random.Random(7), 200, NOW - timedelta(days=10))
    assert_cached_equals_raw(ledger, expect_cache=False)


def test_a_reservation_sees_cached_money(ledger: Ledger) -> None:
    """The reservation's first sum of a window goes through the cache too, and refuses what
    does not fit exactly as the rows say."""
    rng = random.Random(3)
    write_calls(ledger, rng, 300, NOW - timedelta(days=20))
    spendcache.refresh(ledger, NOW)
    month = budgets.Window("alpha", "month", 10**12)
    low, high = window_bounds("month", NOW, UTC)
    with ledger.read() as conn:
        settled, reserved = raw_window_sum(conn, "alpha", False, utc_iso(low), utc_iso(high))
    exact = budgets.Window("alpha", "month", settled + reserved + 100)
    budgets.reserve(ledger, haiku_call("alpha"), 100, [exact], UTC, now=NOW)
    with pytest.raises(budgets.BudgetWindowExceeded):
        budgets.reserve(ledger, haiku_call("alpha"), 1, [exact], UTC, now=NOW)
    budgets.reserve(ledger, haiku_call("alpha"), 1, [month], UTC, now=NOW)
