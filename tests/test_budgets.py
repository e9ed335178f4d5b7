"""Budgets on a real ledger: windows, reservations, settlement, reconciliation, races, kill -9."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from builders import haiku_call
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from agentd import budgets
from agentd.budgets import BudgetWindowExceeded, CallStart, Window, window_bounds
from agentd.errors import BudgetExceeded, LedgerError
from agentd.ledger import Ledger, parse_iso
from agentd.owner import current_owner, owner_alive
from agentd.providers.base import Usage

PROCS = Path(__file__).parent / "procs"
UTC_ZONE = ZoneInfo("UTC")
BERLIN = ZoneInfo("Europe/Berlin")
T0 = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)


def z(text: str) -> datetime:
    return parse_iso(text)


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    with Ledger.open(tmp_path / "state") as opened:
        yield opened


def call_for(loop: str, run_id: int | None = None, *, simulated: bool = False) -> CallStart:
    return haiku_call(loop, run_id, simulated=simulated)


def count_calls(ledger: Ledger) -> int:
    return int(ledger.conn.execute("SELECT COUNT(*) FROM calls").fetchone()[0])


# Owner liveness reads /proc: the tests that fake or kill owners need Linux.
linux_only = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")


def dead_owner() -> str:
    """Our own pid with another start time: what a recycled pid looks like."""
    host, pid, start, boot = current_owner().split(":")
    return f"{host}:{pid}:{int(start) + 1}:{boot}"


def set_owner(
    ledger: Ledger, owner: str, *, call_id: int | None = None, run_id: int | None = None
) -> None:
    with ledger.write() as conn:
        if call_id is not None:
            conn.execute("UPDATE calls SET owner = ? WHERE id = ?", (owner, call_id))
        if run_id is not None:
            conn.execute("UPDATE runs SET owner = ? WHERE id = ?", (owner, run_id))


# -- windows ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("period", "at", "tz", "start", "end"),
    [
        ("hour", "2026-03-10T12:34:56Z", UTC_ZONE, "2026-03-10T12:00:00Z", "2026-03-10T13:00:00Z"),
        ("day", "2026-03-10T12:34:56Z", UTC_ZONE, "2026-03-10T00:00:00Z", "2026-03-11T00:00:00Z"),
        # Berlin is UTC+1 in winter: its day starts at 23:00 UTC the day before.
        ("day", "2026-03-10T23:30:00Z", BERLIN, "2026-03-10T23:00:00Z", "2026-03-11T23:00:00Z"),
        # Kathmandu (+05:45): the local hour starts at :15 UTC.
        (
            "hour",
            "2026-03-10T10:20:00Z",
            ZoneInfo("Asia/Kathmandu"),
            "2026-03-10T10:15:00Z",
            "2026-03-10T11:15:00Z",
        ),
        # Week: Thursday 2026-03-12 belongs to the week of Monday 2026-03-09.
        ("week", "2026-03-12T08:00:00Z", UTC_ZONE, "2026-03-09T00:00:00Z", "2026-03-16T00:00:00Z"),
        ("week", "2026-03-15T23:59:59Z", UTC_ZONE, "2026-03-09T00:00:00Z", "2026-03-16T00:00:00Z"),
        ("week", "2026-03-16T00:00:00Z", UTC_ZONE, "2026-03-16T00:00:00Z", "2026-03-23T00:00:00Z"),
        # Month rollovers: 31 days, leap February, December into the next year.
        ("month", "2026-01-31T23:59:59Z", UTC_ZONE, "2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z"),
        ("month", "2028-02-29T12:00:00Z", UTC_ZONE, "2028-02-01T00:00:00Z", "2028-03-01T00:00:00Z"),
        ("month", "2026-12-15T00:00:00Z", UTC_ZONE, "2026-12-01T00:00:00Z", "2027-01-01T00:00:00Z"),
        # Year rollover for day and week (2026-12-31 is a Thursday).
        ("day", "2026-12-31T23:59:59Z", UTC_ZONE, "2026-12-31T00:00:00Z", "2027-01-01T00:00:00Z"),
        ("week", "2027-01-02T00:00:00Z", UTC_ZONE, "2026-12-28T00:00:00Z", "2027-01-04T00:00:00Z"),
        # A Berlin month across the spring DST change: starts at +01:00, ends at +02:00.
        ("month", "2026-03-15T00:00:00Z", BERLIN, "2026-02-28T23:00:00Z", "2026-03-31T22:00:00Z"),
        # The week that contains the change is 167 hours long.
        ("week", "2026-03-25T00:00:00Z", BERLIN, "2026-03-22T23:00:00Z", "2026-03-29T22:00:00Z"),
    ],
)
def test_window_bounds(period: budgets.Period, at: str, tz: ZoneInfo, start: str, end: str) -> None:
    assert window_bounds(period, z(at), tz) == (z(start), z(end))
    # The same instant given in another zone is the same window.
    assert window_bounds(period, z(at).astimezone(BERLIN), tz) == (z(start), z(end))


def test_dst_days_in_berlin_are_23_and_25_hours() -> None:
    start, end = window_bounds("day", z("2026-03-29T12:00:00Z"), BERLIN)
    assert (start, end) == (z("2026-03-28T23:00:00Z"), z("2026-03-29T22:00:00Z"))
    assert end - start == timedelta(hours=23)
    start, end = window_bounds("day", z("2026-10-25T12:00:00Z"), BERLIN)
    assert (start, end) == (z("2026-10-24T22:00:00Z"), z("2026-10-25T23:00:00Z"))
    assert end - start == timedelta(hours=25)


def test_dst_hours_in_berlin() -> None:
    # Autumn: 02:00-03:00 local happens twice; each is its own window.
    assert window_bounds("hour", z("2026-10-25T00:30:00Z"), BERLIN) == (
        z("2026-10-25T00:00:00Z"),
        z("2026-10-25T01:00:00Z"),
    )
    assert window_bounds("hour", z("2026-10-25T01:30:00Z"), BERLIN) == (
        z("2026-10-25T01:00:00Z"),
        z("2026-10-25T02:00:00Z"),
    )
    # Spring: 01:00 CET is followed by 03:00 CEST.
    assert window_bounds("hour", z("2026-03-29T00:59:59Z"), BERLIN) == (
        z("2026-03-29T00:00:00Z"),
        z("2026-03-29T01:00:00Z"),
    )
    assert window_bounds("hour", z("2026-03-29T01:00:00Z"), BERLIN) == (
        z("2026-03-29T01:00:00Z"),
        z("2026-03-29T02:00:00Z"),
    )


def test_window_bounds_rejects_naive_and_unknown() -> None:
    with pytest.raises(ValueError):
        window_bounds("day", datetime(2026, 1, 1), UTC_ZONE)
    with pytest.raises(ValueError):
        window_bounds("year", T0, UTC_ZONE)  # type: ignore[arg-type]


ZONES = [
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "America/Santiago",  # DST changes at midnight
    "Asia/Beirut",  # falls back from midnight into the previous day
    "Australia/Lord_Howe",  # half-hour DST shift
    "Asia/Kathmandu",
]


@given(
    at=st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2040, 1, 1), timezones=st.just(UTC)
    ),
    zone=st.sampled_from(ZONES),
    period=st.sampled_from(budgets.PERIODS),
)
def test_windows_contain_their_instant_and_tile(
    at: datetime, zone: str, period: budgets.Period
) -> None:
    tz = ZoneInfo(zone)
    start, end = window_bounds(period, at, tz)
    assert start.tzinfo is UTC and end.tzinfo is UTC
    assert start <= at < end
    # Consecutive windows meet exactly: no instant is in two windows or in none.
    assert window_bounds(period, end, tz)[0] == end
    assert window_bounds(period, start - timedelta(microseconds=1), tz)[1] == start
    if period != "hour":
        assert end - start <= timedelta(days=32)


def test_windows_for_converts_and_orders() -> None:
    windows = budgets.windows_for(
        "heartbeat",
        {"per_day_usd": Decimal("0.10"), "per_hour_usd": Decimal("0.0000019"), "week": None},
        {"month": Decimal("60"), "day": Decimal(5)},
    )
    assert windows == [
        Window("heartbeat", "hour", 1),  # rounded down: never more than the operator wrote
        Window("heartbeat", "day", 100_000),
        Window("global", "day", 5_000_000),
        Window("global", "month", 60_000_000),
    ]
    assert [w.label for w in windows] == [
        "loop heartbeat per hour",
        "loop heartbeat per day",
        "global per day",
        "global per month",
    ]
    assert budgets.windows_for("x", None, None) == []
    with pytest.raises(ValueError):
        budgets.windows_for("x", {"per_year_usd": Decimal(1)}, None)


# -- reserve / settle ---------------------------------------------------------------------


def test_reserve_settle_arithmetic_and_refusals(ledger: Ledger) -> None:
    alpha = [Window("alpha", "day", 10_000), Window("global", "day", 15_000)]
    beta = [Window("beta", "day", 100_000), Window("global", "day", 15_000)]
    first = budgets.reserve(ledger, call_for("alpha"), 6_000, alpha, UTC_ZONE, now=T0)
    row = ledger.calls_for_run(0) or ledger.recent_calls(limit=1)
    assert row[0]["status"] == "pending" and row[0]["reserved_micro_usd"] == 6_000
    assert row[0]["owner"] == current_owner() and row[0]["cost_micro_usd"] is None
    assert row[0]["started_at"] == "2026-03-10T12:00:00.000000Z"

    before = count_calls(ledger)
    with pytest.raises(BudgetWindowExceeded) as refused:
        budgets.reserve(ledger, call_for("alpha"), 5_000, alpha, UTC_ZONE, now=T0)
    exc = refused.value
    assert isinstance(exc, BudgetExceeded) and exc.exit_code == 75
    assert exc.window == "loop alpha per day"
    assert (exc.limit_micro_usd, exc.used_micro_usd, exc.asked_micro_usd) == (10_000, 6_000, 5_000)
    assert exc.resets_at == z("2026-03-11T00:00:00Z")
    assert str(exc) == (
        "over budget: loop alpha per day: limit 0.010000 USD, used 0.006000 USD"
        " (settled + reserved), asked 0.005000 USD"
    )
    assert count_calls(ledger) == before  # a refusal writes nothing

    assert budgets.settle(
        ledger, first, status="ok", usage=Usage(10, 5), cost_micro_usd=2_000, priced=True
    )
    second = budgets.reserve(ledger, call_for("alpha"), 5_000, alpha, UTC_ZONE, now=T0)
    budgets.reserve(ledger, call_for("beta"), 8_000, beta, UTC_ZONE, now=T0)  # global now full
    with pytest.raises(BudgetWindowExceeded, match="global per day") as refused:
        budgets.reserve(ledger, call_for("beta"), 1, beta, UTC_ZONE, now=T0)
    assert refused.value.used_micro_usd == 15_000
    # Exactly filling a window is allowed; one more micro-dollar is not.
    budgets.settle(ledger, second, status="error", usage=None, cost_micro_usd=0, priced=True)
    budgets.reserve(ledger, call_for("alpha"), 5_000, alpha, UTC_ZONE, now=T0)
    status = {s.window.label: s for s in budgets.window_status(ledger, alpha, UTC_ZONE, T0)}
    assert status["loop alpha per day"].spent_micro_usd == 2_000
    assert status["loop alpha per day"].reserved_micro_usd == 5_000
    assert status["loop alpha per day"].remaining_micro_usd == 3_000
    assert status["global per day"].reserved_micro_usd == 13_000
    assert status["global per day"].remaining_micro_usd == 0
    assert status["global per day"].end == z("2026-03-11T00:00:00Z")


def test_refusal_names_the_first_window_and_the_latest_reset(ledger: Ledger) -> None:
    windows = [Window("alpha", "day", 100), Window("global", "month", 100)]
    with pytest.raises(BudgetWindowExceeded) as refused:
        budgets.reserve(ledger, call_for("alpha"), 101, windows, UTC_ZONE, now=T0)
    assert refused.value.window == "loop alpha per day"
    assert refused.value.resets_at == z("2026-04-01T00:00:00Z")  # when both have reset


def test_a_call_counts_in_the_window_of_its_reservation(ledger: Ledger) -> None:
    windows = [Window("alpha", "day", 1_000)]
    late = z("2026-03-10T23:59:59.999999Z")
    call_id = budgets.reserve(ledger, call_for("alpha"), 1_000, windows, UTC_ZONE, now=late)
    budgets.settle(ledger, call_id, status="ok", usage=None, cost_micro_usd=900, priced=True)
    [today] = budgets.window_status(ledger, windows, UTC_ZONE, late)
    [tomorrow] = budgets.window_status(ledger, windows, UTC_ZONE, late + timedelta(seconds=1))
    assert (today.spent_micro_usd, tomorrow.spent_micro_usd) == (900, 0)
    budgets.reserve(
        ledger, call_for("alpha"), 1_000, windows, UTC_ZONE, now=late + timedelta(microseconds=1)
    )


def test_simulated_and_real_spend_are_separate(ledger: Ledger) -> None:
    windows = [Window("alpha", "day", 1_000), Window("global", "day", 1_000)]
    budgets.reserve(ledger, call_for("alpha"), 1_000, windows, UTC_ZONE, now=T0)
    sim = budgets.reserve(
        ledger, call_for("alpha", simulated=True), 1_000, windows, UTC_ZONE, now=T0
    )
    with pytest.raises(BudgetExceeded):
        budgets.reserve(ledger, call_for("alpha", simulated=True), 1, windows, UTC_ZONE, now=T0)
    with pytest.raises(BudgetExceeded):
        budgets.reserve(ledger, call_for("alpha"), 1, windows, UTC_ZONE, now=T0)
    budgets.settle(ledger, sim, status="ok", usage=None, cost_micro_usd=250, priced=True)
    [real] = budgets.window_status(ledger, windows[:1], UTC_ZONE, T0)
    [fake] = budgets.window_status(ledger, windows[:1], UTC_ZONE, T0, simulated=True)
    assert (real.spent_micro_usd, real.reserved_micro_usd) == (0, 1_000)
    assert (fake.spent_micro_usd, fake.reserved_micro_usd, fake.remaining_micro_usd) == (
        250,
        0,
        750,
    )


def test_loop_windows_only_see_their_loop(ledger: Ledger) -> None:
    budgets.reserve(ledger, call_for("beta"), 5_000, [], UTC_ZONE, now=T0)
    budgets.reserve(
        ledger, call_for("alpha"), 1_000, [Window("alpha", "day", 1_000)], UTC_ZONE, now=T0
    )
    with pytest.raises(BudgetExceeded, match="global per day"):
        budgets.reserve(
            ledger, call_for("alpha"), 1, [Window("global", "day", 6_000)], UTC_ZONE, now=T0
        )


def test_reserve_checks_its_arguments(ledger: Ledger) -> None:
    for bad in (1.5, Decimal("1"), True, -1):
        with pytest.raises(ValueError):
            budgets.reserve(ledger, call_for("alpha"), bad, [], UTC_ZONE)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="does not apply"):
        budgets.reserve(ledger, call_for("alpha"), 1, [Window("beta", "day", 9)], UTC_ZONE)
    assert count_calls(ledger) == 0


def test_settle_writes_the_outcome_once(ledger: Ledger) -> None:
    run_id = ledger.start_run(loop="alpha", trigger="manual", simulated=False)
    call_id = budgets.reserve(ledger, call_for("alpha", run_id), 3_000, [], UTC_ZONE)
    budgets.mark_submitted(ledger, call_id, request_id="req_1")
    assert ledger.calls_for_run(run_id)[0]["status"] == "submitted"
    usage = Usage(
        input_tokens=1_000,
        output_tokens=200,
        cache_read_tokens=300,
        cache_write_tokens=100,
        reasoning_tokens=50,
    )
    assert budgets.settle(
        ledger, call_id, status="ok", usage=usage, cost_micro_usd=2_000, priced=True, latency_ms=123
    )
    [row] = ledger.calls_for_run(run_id)
    assert {
        k: row[k]
        for k in (
            "status",
            "cost_micro_usd",
            "reserved_micro_usd",
            "priced",
            "input_tokens",
            "output_tokens",
            "cache_read_tokens",
            "cache_write_tokens",
            "reasoning_tokens",
            "latency_ms",
            "request_id",
        )
    } == {
        "status": "ok",
        "cost_micro_usd": 2_000,
        "reserved_micro_usd": 3_000,
        "priced": True,
        "input_tokens": 1_000,
        "output_tokens": 200,
        "cache_read_tokens": 300,
        "cache_write_tokens": 100,
        "reasoning_tokens": 50,
        "latency_ms": 123,
        "request_id": "req_1",
    }
    assert parse_iso(row["finished_at"]) >= parse_iso(row["started_at"])
    # A second settlement is ignored (and says so), whatever it asks for.
    with capture_logs() as logs:
        assert not budgets.settle(
            ledger, call_id, status="aborted", usage=None, cost_micro_usd=3_000, priced=True
        )
    assert ledger.calls_for_run(run_id)[0]["cost_micro_usd"] == 2_000
    assert [e["event"] for e in logs] == ["ledger.settle_ignored"]
    with pytest.raises(LedgerError, match="no call"):
        budgets.settle(ledger, call_id + 1, status="ok", usage=None, cost_micro_usd=0, priced=True)
    with pytest.raises(ValueError):
        budgets.settle(
            ledger,
            call_id,
            status="pending",  # type: ignore[arg-type]
            usage=None,
            cost_micro_usd=0,
            priced=True,
        )


def test_a_cost_above_its_reservation_is_recorded_and_logged(ledger: Ledger) -> None:
    windows = [Window("alpha", "day", 1_000)]
    call_id = budgets.reserve(ledger, call_for("alpha"), 100, windows, UTC_ZONE, now=T0)
    with capture_logs() as logs:
        budgets.settle(
            ledger,
            call_id,
            status="ok",
            usage=None,
            cost_micro_usd=1_500,
            priced=True,
            error_type=None,
        )
    assert [e["event"] for e in logs] == ["budget.cost_over_reservation"]
    [status] = budgets.window_status(ledger, windows, UTC_ZONE, T0)
    assert (status.spent_micro_usd, status.remaining_micro_usd) == (1_500, 0)


# -- owners and reconciliation ------------------------------------------------------------


@linux_only
def test_owner_identity() -> None:
    me = current_owner()
    host, pid, start, boot = me.split(":")
    assert pid == str(os.getpid()) and start.isdigit() and boot
    assert owner_alive(me)
    assert owner_alive(f"elsewhere:{pid}:1:{boot}")  # another host: we cannot tell
    assert owner_alive("garbage") and owner_alive("")
    assert not owner_alive(dead_owner())  # recycled pid
    assert not owner_alive(f"{host}:{pid}:{start}:another-boot")
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not owner_alive(f"{host}:{child.pid}:{start}:{boot}")  # no such process


@linux_only
def test_reconcile_settles_only_dead_owners_rows(ledger: Ledger) -> None:
    live_run = ledger.start_run(loop="alpha", trigger="manual", simulated=False)
    dead_run = ledger.start_run(loop="alpha", trigger="manual", simulated=False)
    live = budgets.reserve(ledger, call_for("alpha", live_run), 100, [], UTC_ZONE)
    dead_pending = budgets.reserve(ledger, call_for("alpha", dead_run), 200, [], UTC_ZONE)
    dead_submitted = budgets.reserve(ledger, call_for("alpha", dead_run), 300, [], UTC_ZONE)
    budgets.mark_submitted(ledger, dead_submitted)
    batch_run = ledger.start_run(loop="alpha", trigger="manual", simulated=False)
    batch = CallStart(**{**call_for("alpha", batch_run).__dict__, "batch": True})
    batch_submitted = budgets.reserve(ledger, batch, 400, [], UTC_ZONE)
    budgets.mark_submitted(ledger, batch_submitted)
    batch = CallStart(**{**call_for("alpha", dead_run).__dict__, "batch": True})
    batch_pending = budgets.reserve(ledger, batch, 500, [], UTC_ZONE)
    settled = budgets.reserve(ledger, call_for("alpha", dead_run), 600, [], UTC_ZONE)
    budgets.settle(ledger, settled, status="ok", usage=None, cost_micro_usd=50, priced=True)
    remote = budgets.reserve(ledger, call_for("alpha"), 700, [], UTC_ZONE)
    gone = dead_owner()
    for call_id in (dead_pending, dead_submitted, batch_submitted, batch_pending, settled):
        set_owner(ledger, gone, call_id=call_id)
    set_owner(ledger, gone, run_id=dead_run)
    set_owner(ledger, gone, run_id=batch_run)
    set_owner(ledger, "another-host:1:1:x", call_id=remote)

    with capture_logs() as logs:
        assert budgets.reconcile_abandoned(ledger) == 3
    rows = {c["id"]: c for c in ledger.recent_calls(limit=100)}
    for call_id, reserved in ((dead_pending, 200), (dead_submitted, 300), (batch_pending, 500)):
        assert rows[call_id]["status"] == "aborted"
        assert rows[call_id]["cost_micro_usd"] == reserved
        assert rows[call_id]["error"] == "owner process gone; settled at reservation"
        assert rows[call_id]["finished_at"] is not None
    assert rows[batch_submitted]["status"] == "submitted"  # a provider batch outlives us
    assert rows[live]["status"] == "pending" and rows[remote]["status"] == "pending"
    assert rows[settled]["cost_micro_usd"] == 50
    dead = ledger.get_run(dead_run)
    assert dead is not None and dead["status"] == "aborted"
    assert dead["cost_micro_usd"] == 200 + 300 + 500 + 50
    # The run waiting on a provider batch is not abandoned: `agentd.batchresume` finishes it.
    waiting = ledger.get_run(batch_run)
    assert waiting is not None and waiting["status"] == "running"
    live_row = ledger.get_run(live_run)
    assert live_row is not None and live_row["status"] == "running"
    [event] = [e for e in logs if e["event"] == "ledger.reconciled"]
    assert (event["calls"], event["runs"]) == (3, 1)
    assert budgets.reconcile_abandoned(ledger) == 0  # idempotent


# -- property: the reservation arithmetic -------------------------------------------------

LIMITS = {"alpha": 10_000, "beta": 6_000, "global": 12_000}
Op = tuple[Any, ...]
OPS = st.lists(
    st.one_of(
        st.tuples(
            st.just("reserve"),
            st.sampled_from(["alpha", "beta"]),
            st.booleans(),
            st.integers(0, 5_000),
        ),
        st.tuples(st.just("settle"), st.integers(0, 40), st.integers(0, 100)),
        st.tuples(st.just("release"), st.integers(0, 40)),
        st.tuples(st.just("crash"), st.integers(0, 40)),
    ),
    max_size=30,
)


@linux_only
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS)
def test_reservation_arithmetic_property(ops: list[Op]) -> None:
    windows = {
        loop: [Window(loop, "day", LIMITS[loop]), Window("global", "day", LIMITS["global"])]
        for loop in ("alpha", "beta")
    }
    every = [windows["alpha"][0], windows["beta"][0], windows["alpha"][1]]
    # The model: settled and reserved micro-USD per (simulated, scope).
    spent: dict[tuple[bool, str], int] = defaultdict(int)
    held: dict[tuple[bool, str], int] = defaultdict(int)
    open_calls: list[tuple[int, str, bool, int]] = []  # (id, loop, simulated, reserved)
    gone = dead_owner()
    with tempfile.TemporaryDirectory() as tmp, Ledger.open(Path(tmp)) as ledger:
        for op in ops:
            if op[0] == "reserve":
                _, loop, sim, amount = op
                fits = [
                    spent[sim, w.scope] + held[sim, w.scope] + amount <= w.limit_micro_usd
                    for w in windows[loop]
                ]
                rows_before = count_calls(ledger)
                try:
                    call_id = budgets.reserve(
                        ledger,
                        call_for(loop, simulated=sim),
                        amount,
                        windows[loop],
                        UTC_ZONE,
                        now=T0,
                    )
                except BudgetWindowExceeded as exc:
                    assert not all(fits)
                    assert exc.window == windows[loop][fits.index(False)].label
                    assert exc.used_micro_usd + amount > exc.limit_micro_usd
                    assert count_calls(ledger) == rows_before
                    continue
                assert all(fits)
                for scope in (loop, "global"):
                    held[sim, scope] += amount
                open_calls.append((call_id, loop, sim, amount))
            elif open_calls:
                call_id, loop, sim, reserved = open_calls.pop(op[1] % len(open_calls))
                if op[0] == "settle":
                    cost = reserved * op[2] // 100
                    budgets.settle(
                        ledger, call_id, status="ok", usage=None, cost_micro_usd=cost, priced=True
                    )
                elif op[0] == "release":
                    cost = 0
                    budgets.settle(
                        ledger, call_id, status="error", usage=None, cost_micro_usd=0, priced=True
                    )
                else:  # crash: the owner dies with the call in flight
                    cost = reserved  # reconciliation charges the reservation
                    set_owner(ledger, gone, call_id=call_id)
                    assert budgets.reconcile_abandoned(ledger) == 1
                for scope in (loop, "global"):
                    held[sim, scope] -= reserved
                    spent[sim, scope] += cost
            for sim in (False, True):
                for status in budgets.window_status(ledger, every, UTC_ZONE, T0, simulated=sim):
                    scope, limit = status.window.scope, status.window.limit_micro_usd
                    assert status.spent_micro_usd == spent[sim, scope]
                    assert status.reserved_micro_usd == held[sim, scope]
                    assert status.spent_micro_usd + status.reserved_micro_usd <= limit
                    assert (
                        status.remaining_micro_usd == limit - spent[sim, scope] - held[sim, scope]
                    )


# -- several processes --------------------------------------------------------------------


def read_line(proc: subprocess.Popen[str], timeout: float = 30.0) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        proc.kill()
        raise AssertionError("helper process printed nothing in time")
    return proc.stdout.readline().strip()


def replay_peak(events: list[tuple[str, int, int]]) -> int:
    """Highest settled + reserved total over time; at equal timestamps reservations go first."""
    total = peak = 0
    for _, _, delta in sorted(events):
        total += delta
        peak = max(peak, total)
    return peak


@pytest.mark.slow
def test_race_of_four_processes_never_overspends(tmp_path: Path) -> None:
    state = tmp_path / "state"
    Ledger.open(state).close()
    caps = {"race-a": 15_000, "race-b": 100_000}
    global_cap = 50_000
    start_at = time.time() + 1.5
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(PROCS / "race_worker.py"),
                str(state),
                str(seed),
                "8",
                "40",
                str(caps["race-a"]),
                str(caps["race-b"]),
                str(global_cap),
                str(start_at),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in range(4)
    ]
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        reports.append(json.loads(out))
    assert [p for r in reports for p in r["problems"]] == []
    refused_by: dict[str, int] = defaultdict(int)
    for r in reports:
        for label, n in r["refused_by"].items():
            refused_by[label] += n
    # Both the loop cap and the global cap turned calls away.
    assert refused_by["loop race-a per day"] > 0 and refused_by["global per month"] > 0

    with Ledger.open(state) as ledger:
        rows = ledger.conn.execute(
            "SELECT loop, started_at, finished_at, status, reserved_micro_usd, cost_micro_usd"
            " FROM calls"
        ).fetchall()
    assert len(rows) == sum(r["reserved"] for r in reports)  # no phantom rows from refusals
    assert all(status in ("ok", "error", "aborted") for _, _, _, status, _, _ in rows)
    assert all(cost <= reserved for *_, reserved, cost in rows)
    # Replay every window's history: reservation at started_at, settlement at finished_at.
    scopes = [
        ("race-a", "day", caps["race-a"]),
        ("race-b", "day", caps["race-b"]),
        ("global", "month", global_cap),
    ]
    for scope, period, cap in scopes:
        per_window: dict[datetime, list[tuple[str, int, int]]] = defaultdict(list)
        for loop, started, finished, _, reserved, cost in rows:
            if scope not in ("global", loop):
                continue
            key = window_bounds(period, parse_iso(started), UTC_ZONE)[0]  # type: ignore[arg-type]
            per_window[key].append((started, 0, reserved))
            per_window[key].append((finished, 1, cost - reserved))
        for events in per_window.values():
            assert replay_peak(events) <= cap, scope
            assert sum(delta for *_, delta in events) <= cap


@linux_only
@pytest.mark.slow
def test_kill_9_mid_call_is_reconciled_and_live_peers_are_not(tmp_path: Path) -> None:
    state = tmp_path / "state"
    Ledger.open(state).close()

    def hold(loop: str, amount: int) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, str(PROCS / "hold_reservation.py"), str(state), loop, str(amount)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )

    victim, survivor = hold("victim", 5_000), hold("survivor", 700)
    try:
        v_word, v_run, v_call, v_owner = read_line(victim).split()
        s_word, s_run, s_call, _ = read_line(survivor).split()
        assert v_word == s_word == "reserved"
        assert owner_alive(v_owner)
        os.kill(victim.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{victim.pid}/stat").read_text().split(")")[-1].split()[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert not owner_alive(v_owner)  # a zombie will never settle its row
        victim.wait()
        assert not owner_alive(v_owner)

        with Ledger.open(state, reconcile=False) as ledger:
            assert budgets.reconcile_abandoned(ledger) == 1
            [v_row] = ledger.calls_for_run(int(v_run))
            assert v_row["id"] == int(v_call)
            assert (v_row["status"], v_row["cost_micro_usd"]) == ("aborted", 5_000)
            v_run_row = ledger.get_run(int(v_run))
            assert v_run_row is not None
            assert (v_run_row["status"], v_run_row["cost_micro_usd"]) == ("aborted", 5_000)
            [s_row] = ledger.calls_for_run(int(s_run))
            assert s_row["id"] == int(s_call) and s_row["status"] == "pending"
            s_run_row = ledger.get_run(int(s_run))
            assert s_run_row is not None and s_run_row["status"] == "running"
    finally:
        survivor.kill()
        survivor.wait()
        victim.kill()
        victim.wait()
    # The next start reconciles by itself: opening the ledger settles the survivor's row now.
    with Ledger.open(state) as ledger:
        [s_row] = ledger.calls_for_run(int(s_run))
        assert (s_row["status"], s_row["cost_micro_usd"]) == ("aborted", 700)
