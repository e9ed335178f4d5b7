"""Budget running totals (`agentd.budgetcache`): always what a fresh SUM over the ledger says.

Random sequences of reserve / settle / mark_submitted / reconcile / rollbacks / foreign writes
over two `Ledger` connections and a plain sqlite3 one, several processes at once, schema
rebuilds, reused row ids, hand edits, and time-zone windows around DST changes.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import random
import sqlite3
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from builders import haiku_call
from structlog.testing import capture_logs

from agentd import budgetcache, budgets, retention
from agentd.budgetcache import WindowKey, window_sum
from agentd.budgets import BudgetWindowExceeded, CallStart, Window, window_bounds
from agentd.daemonstatus import abort_own_leftovers
from agentd.ledger import Ledger, parse_iso, utc_iso
from agentd.owner import current_owner

UTC_ZONE = ZoneInfo("UTC")
BERLIN = ZoneInfo("Europe/Berlin")
LORD_HOWE = ZoneInfo("Australia/Lord_Howe")  # DST shift of 30 minutes
# Berlin's spring-forward instant (02:00 local becomes 03:00) and its fall-back one.
SPRING = datetime(2026, 3, 29, 1, 0, tzinfo=UTC)
AUTUMN = datetime(2026, 10, 25, 1, 0, tzinfo=UTC)
BIG = 10**12
LOOPS = ("alpha", "beta")


def call_for(loop: str, *, simulated: bool = False, batch: bool = False) -> CallStart:
    return haiku_call(loop, simulated=simulated, batch=batch)


def dead_owner() -> str:
    """Our own pid with another start time: what a recycled pid looks like."""
    host, pid, start, boot = current_owner().split(":")
    return f"{host}:{pid}:{int(start) + 1}:{boot}"


def keys_at(at: datetime, tz: ZoneInfo) -> list[WindowKey]:
    """Every window (each period, each loop and global, real and simulated) containing `at`."""
    keys: list[WindowKey] = []
    for period in budgets.PERIODS:
        start, end = window_bounds(period, at, tz)
        for scope in (*LOOPS, "global"):
            for simulated in (False, True):
                keys.append((scope, simulated, utc_iso(start), utc_iso(end)))
    return keys


def assert_exact(ledger: Ledger, keys: list[WindowKey]) -> None:
    """The cached sums of `keys` and of every other cached window equal a fresh SUM."""
    with ledger.write() as conn:
        totals = budgetcache.window_totals(ledger, keys)
        for key, got in zip(keys, totals, strict=True):
            assert got == window_sum(conn, *key), key
        for key, got in budgetcache.cached_windows(ledger):
            assert got == window_sum(conn, *key), key


def open_ids(ledger: Ledger) -> list[int]:
    rows = ledger.conn.execute(
        "SELECT id FROM calls WHERE status IN ('pending', 'submitted') ORDER BY id"
    ).fetchall()
    return [int(r[0]) for r in rows]


@pytest.fixture
def two(tmp_path: Path) -> Iterator[tuple[Ledger, Ledger, sqlite3.Connection]]:
    state = tmp_path / "state"
    with Ledger.open(state) as a, Ledger.open(state) as b:
        foreign = sqlite3.connect(str(state / "ledger.db"), isolation_level=None, timeout=30)
        try:
            yield a, b, foreign
        finally:
            foreign.close()


def _foreign_insert(
    conn: sqlite3.Connection, loop: str, at: datetime, status: str, reserved: int, cost: int | None
) -> None:
    conn.execute(
        "INSERT INTO calls (loop, purpose, provider, model, attempt, status, reserved_micro_usd,"
        " cost_micro_usd, priced, simulated, batch, started_at)"
        " VALUES (?, 'work', 'anthropic', 'm', 1, ?, ?, ?, 1, 0, 0, ?)",
        (loop, status, reserved, cost, utc_iso(at)),
    )


# -- random sequences over two connections and a foreign one -------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_random_operations_keep_the_totals_exact(
    seed: int, two: tuple[Ledger, Ledger, sqlite3.Connection]
) -> None:
    a, b, foreign = two
    rng = random.Random(seed)
    tz = BERLIN if seed % 2 else UTC_ZONE
    base = SPRING if seed % 3 else AUTUMN
    # Old settled rows a prune may delete (outside every window the test asks about).
    for i in range(5):
        _foreign_insert(foreign, "alpha", base - timedelta(days=60 + i), "ok", 100, 50)
    ledgers = (a, b)
    for step in range(160):
        at = base + timedelta(minutes=rng.randint(-150, 150))
        ledger = rng.choice(ledgers)
        op = rng.random()
        opened = open_ids(ledger)
        if op < 0.35 or not opened:
            loop, sim = rng.choice(LOOPS), rng.random() < 0.3
            tight = rng.random() < 0.2
            windows = [
                Window(loop, rng.choice(budgets.PERIODS), 5_000 if tight else BIG),
                Window("global", rng.choice(budgets.PERIODS), BIG),
            ]
            with contextlib.suppress(BudgetWindowExceeded):
                budgets.reserve(
                    ledger,
                    call_for(loop, simulated=sim, batch=rng.random() < 0.1),
                    rng.randint(0, 3_000),
                    windows,
                    tz,
                    now=at,
                )
        elif op < 0.65:
            call_id = rng.choice(opened)
            reserved = int(
                ledger.conn.execute(
                    "SELECT reserved_micro_usd FROM calls WHERE id = ?", (call_id,)
                ).fetchone()[0]
            )
            budgets.settle(
                ledger,
                call_id,
                status=rng.choice(("ok", "error", "aborted")),
                usage=None,
                cost_micro_usd=rng.randint(0, 2 * reserved + 1),  # above reservation too
                priced=True,
            )
            if rng.random() < 0.2:  # settling twice changes nothing
                budgets.settle(
                    ledger, call_id, status="ok", usage=None, cost_micro_usd=1, priced=True
                )
        elif op < 0.72:
            budgets.mark_submitted(ledger, rng.choice(opened), request_id=f"r{step}")
        elif op < 0.78:
            with ledger.write() as conn:
                conn.execute(
                    "UPDATE calls SET owner = ? WHERE id = ?", (dead_owner(), rng.choice(opened))
                )
            budgets.reconcile_abandoned(rng.choice(ledgers))
        elif op < 0.84:
            # Another process: a new row, or a settle of someone's open row.
            if rng.random() < 0.5:
                _foreign_insert(foreign, rng.choice(LOOPS), at, "ok", 700, rng.randint(0, 900))
            else:
                foreign.execute(
                    "UPDATE calls SET status = 'ok', cost_micro_usd = 11 WHERE id = ?",
                    (rng.choice(opened),),
                )
        elif op < 0.88:
            # A transaction that reserves and then fails: both the row and its totals go.
            with pytest.raises(RuntimeError), ledger.write():
                budgets.reserve(
                    ledger, call_for("alpha"), 10, [Window("alpha", "day", BIG)], tz, now=at
                )
                raise RuntimeError("boom")
        elif op < 0.92:
            # A statement that fails half-way (the second row breaks NOT NULL) inside a
            # transaction that still commits: the first row's trigger work is undone too.
            with ledger.write() as conn:
                budgets.reserve(
                    ledger, call_for("beta"), 10, [Window("global", "hour", BIG)], tz, now=at
                )
                with pytest.raises(sqlite3.IntegrityError):
                    conn.execute(
                        "INSERT INTO calls (loop, purpose, provider, model, attempt, status,"
                        " reserved_micro_usd, priced, simulated, batch, started_at)"
                        " SELECT loop, purpose, provider, model, attempt, status,"
                        " reserved_micro_usd, priced, simulated, batch,"
                        " CASE WHEN id = ? THEN NULL ELSE started_at END FROM calls"
                        " WHERE id IN (?, ?) ORDER BY id",
                        (opened[-1], opened[0], opened[-1]),
                    )
        elif op < 0.95:
            # Prune-like: settled rows older than every live window go (own or foreign).
            cutoff = utc_iso(base - timedelta(days=40))
            target = rng.choice((ledger.conn, foreign))
            if target is foreign:
                foreign.execute(
                    "DELETE FROM calls WHERE started_at < ? AND status = 'ok'", (cutoff,)
                )
            else:
                with ledger.write() as conn:
                    conn.execute(
                        "DELETE FROM calls WHERE started_at < ? AND status = 'ok'", (cutoff,)
                    )
        else:
            abort_own_leftovers(ledger)
        if step % 4 == 0 or op >= 0.72:
            for checked in ledgers:
                assert_exact(checked, keys_at(at, tz))
    for checked in ledgers:
        assert_exact(checked, keys_at(base, tz))


# -- several processes ---------------------------------------------------------------------


def _worker(state: str, seed: int, cap: int, rounds: int, out: Any) -> None:
    """One process: reserve/settle against `cap`, checking its totals against SUMs as it goes."""
    problems: list[str] = []
    rng = random.Random(seed)
    at = datetime.now(UTC)
    windows = [Window("global", "day", cap), Window(f"w{seed % 2}", "day", cap)]
    held: list[tuple[int, int]] = []
    with Ledger.open(Path(state), reconcile=False) as ledger:
        for i in range(rounds):
            if held and (rng.random() < 0.5 or len(held) > 4):
                call_id, reserved = held.pop(rng.randrange(len(held)))
                budgets.settle(
                    ledger,
                    call_id,
                    status="ok",
                    usage=None,
                    cost_micro_usd=rng.randint(0, reserved),
                    priced=True,
                )
            else:
                amount = rng.randint(1, 400)
                try:
                    call_id = budgets.reserve(
                        ledger, call_for(f"w{seed % 2}"), amount, windows, UTC_ZONE
                    )
                    held.append((call_id, amount))
                except BudgetWindowExceeded as exc:
                    if exc.used_micro_usd + amount <= exc.limit_micro_usd:
                        problems.append(f"refused although it fit: {exc}")
            if i % 10 == 0:
                keys: list[WindowKey] = []
                for w in windows:
                    start, end = window_bounds(w.period, at, UTC_ZONE)
                    keys.append((w.scope, False, utc_iso(start), utc_iso(end)))
                with ledger.write() as conn:
                    sums = budgetcache.window_totals(ledger, keys)
                    fresh = [window_sum(conn, *k) for k in keys]
                    if sums != fresh:
                        problems.append(f"cache {sums} != sum {fresh}")
                    if any(s + r > cap for s, r in fresh):
                        problems.append(f"over the cap: {fresh}")
        for call_id, reserved in held:
            budgets.settle(
                ledger, call_id, status="ok", usage=None, cost_micro_usd=reserved, priced=True
            )
    out.put(problems)


@pytest.mark.slow
def test_processes_share_the_ledger_and_never_exceed_a_limit(tmp_path: Path) -> None:
    state = tmp_path / "state"
    Ledger.open(state).close()
    cap = 30_000
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(str(state), seed, cap, 300, out)) for seed in range(3)
    ]
    for p in procs:
        p.start()
    _worker(str(state), 99, cap, 300, out)  # the parent takes part too
    problems = [out.get(timeout=120) for _ in range(len(procs) + 1)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert [x for group in problems for x in group] == []
    with Ledger.open(state) as ledger:
        rows = ledger.conn.execute(
            "SELECT loop, started_at, finished_at, reserved_micro_usd, cost_micro_usd FROM calls"
        ).fetchall()
        assert_exact(ledger, keys_at(parse_iso(rows[-1][1]), UTC_ZONE))
    # Replay the global day windows: reservations at started_at, settlements at finished_at.
    per_window: dict[datetime, list[tuple[str, int, int]]] = defaultdict(list)
    for _, started, finished, reserved, cost in rows:
        key = window_bounds("day", parse_iso(started), UTC_ZONE)[0]
        per_window[key].append((started, 0, reserved))
        per_window[key].append((finished, 1, cost - reserved))
    for events in per_window.values():
        total = peak = 0
        for _, _, delta in sorted(events):
            total += delta
            peak = max(peak, total)
        assert peak <= cap


def _other_process_writes(state: str, loop: str, started: str) -> None:
    """Another process: insert a settled and a pending row, settle an older pending one."""
    with Ledger.open(Path(state), reconcile=False) as ledger, ledger.write() as conn:
        for status, cost in (("ok", 400), ("pending", None)):
            conn.execute(
                "INSERT INTO calls (loop, purpose, provider, model, attempt, status,"
                " reserved_micro_usd, cost_micro_usd, priced, simulated, batch, started_at)"
                " VALUES (?, 'work', 'anthropic', 'm', 1, ?, 1000, ?, 1, 0, 0, ?)",
                (loop, status, cost, started),
            )
        conn.execute(
            "UPDATE calls SET status = 'ok', cost_micro_usd = 5"
            " WHERE id = (SELECT min(id) FROM calls WHERE status = 'pending')"
        )


@pytest.mark.slow
def test_another_process_writing_is_seen(tmp_path: Path) -> None:
    state = tmp_path / "state"
    at = datetime.now(UTC)
    windows = [Window("alpha", "day", BIG), Window("global", "month", BIG)]
    with Ledger.open(state) as ledger:
        first = budgets.reserve(ledger, call_for("alpha"), 300, windows, UTC_ZONE, now=at)
        assert_exact(ledger, keys_at(at, UTC_ZONE))
        proc = mp.get_context("spawn").Process(
            target=_other_process_writes, args=(str(state), "alpha", utc_iso(at))
        )
        proc.start()
        proc.join(timeout=60)
        assert proc.exitcode == 0
        # Our pending row was settled over there (cost 5): reserved 300 became settled 5.
        assert ledger.conn.execute(
            "SELECT status, cost_micro_usd FROM calls WHERE id = ?", (first,)
        ).fetchone() == ("ok", 5)
        day = window_bounds("day", at, UTC_ZONE)
        key = ("alpha", False, utc_iso(day[0]), utc_iso(day[1]))
        with ledger.write():
            assert budgetcache.window_totals(ledger, [key]) == [(405, 1000)]
        assert_exact(ledger, keys_at(at, UTC_ZONE))


# -- the cases the sync has to notice ------------------------------------------------------


def test_a_rebuilt_calls_table_keeps_the_totals(
    two: tuple[Ledger, Ledger, sqlite3.Connection],
) -> None:
    a, _, foreign = two
    at = datetime(2026, 5, 5, 12, tzinfo=UTC)
    windows = [Window("alpha", "day", BIG)]
    first = budgets.reserve(a, call_for("alpha"), 100, windows, UTC_ZONE, now=at)
    assert_exact(a, keys_at(at, UTC_ZONE))
    # What a migration that rebuilds the table does: same rows, same ids, a new table.
    schema = foreign.execute("SELECT sql FROM sqlite_master WHERE name = 'calls'").fetchone()[0]
    foreign.execute("BEGIN IMMEDIATE")
    table = '"calls"' if '"calls"' in schema else "calls"
    foreign.execute(schema.replace(table, "calls_new", 1))
    foreign.execute("INSERT INTO calls_new SELECT * FROM calls")
    foreign.execute("DROP TABLE calls")
    foreign.execute("ALTER TABLE calls_new RENAME TO calls")
    foreign.execute("COMMIT")
    # The first row was counted before the rebuild, and settles after it.
    budgets.settle(a, first, status="ok", usage=None, cost_micro_usd=80, priced=True)
    second = budgets.reserve(a, call_for("alpha"), 200, windows, UTC_ZONE, now=at)
    budgets.settle(a, second, status="ok", usage=None, cost_micro_usd=150, priced=True)
    assert_exact(a, keys_at(at, UTC_ZONE))
    budgets.reserve(a, call_for("alpha"), 300, windows, UTC_ZONE, now=at)
    assert_exact(a, keys_at(at, UTC_ZONE))


def test_reused_row_ids_after_the_top_rows_go(
    two: tuple[Ledger, Ledger, sqlite3.Connection],
) -> None:
    a, _, foreign = two
    at = datetime(2026, 5, 5, 12, tzinfo=UTC)
    windows = [Window("alpha", "day", BIG)]
    ids = [budgets.reserve(a, call_for("alpha"), 100, windows, UTC_ZONE, now=at) for _ in range(3)]
    for call_id in ids:  # settled: no longer among the rows re-read as unsettled
        budgets.settle(a, call_id, status="ok", usage=None, cost_micro_usd=90, priced=True)
    assert_exact(a, keys_at(at, UTC_ZONE))
    # Another connection deletes the newest rows and inserts new ones: they get the same ids.
    foreign.execute("DELETE FROM calls WHERE id >= ?", (ids[1],))
    _foreign_insert(foreign, "alpha", at, "ok", 900, 800)
    _foreign_insert(foreign, "alpha", at, "pending", 900, None)
    assert foreign.execute("SELECT max(id) FROM calls").fetchone()[0] == ids[2]
    assert_exact(a, keys_at(at, UTC_ZONE))
    # The same on our own connection.
    with a.write() as conn:
        conn.execute("DELETE FROM calls WHERE id >= ?", (ids[1],))
        conn.execute(
            "INSERT INTO calls (loop, purpose, provider, model, attempt, status,"
            " reserved_micro_usd, priced, simulated, batch, started_at)"
            " VALUES ('alpha', 'work', 'anthropic', 'm', 1, 'pending', 55, 0, 0, 0, ?)",
            (utc_iso(at),),
        )
    assert_exact(a, keys_at(at, UTC_ZONE))


def test_other_writes_on_the_same_connection_are_caught_up(tmp_path: Path) -> None:
    at = datetime(2026, 5, 5, 12, tzinfo=UTC)
    keys = keys_at(at, UTC_ZONE) + keys_at(at - timedelta(days=3), UTC_ZONE)
    with Ledger.open(tmp_path / "state") as ledger:
        windows = [Window("alpha", "day", BIG), Window("global", "month", BIG)]
        ids = [
            budgets.reserve(ledger, call_for("alpha"), 100 + i, windows, UTC_ZONE, now=at)
            for i in range(9)
        ]
        budgets.settle(ledger, ids[0], status="ok", usage=None, cost_micro_usd=40, priced=True)
        assert_exact(ledger, keys)
        # What agentd's other writers do to unsettled rows, and raw edits of them.
        budgets.mark_submitted(ledger, ids[1], request_id="req")
        with ledger.write() as conn:
            conn.execute("UPDATE calls SET owner = ? WHERE id = ?", (dead_owner(), ids[2]))
        assert budgets.reconcile_abandoned(ledger) == 1
        # A settle right after another write, before any reservation catches up.
        budgets.settle(ledger, ids[3], status="error", usage=None, cost_micro_usd=0, priced=True)
        assert_exact(ledger, keys)
        edits = [
            ("DELETE FROM calls WHERE id = ?", (ids[4],)),
            ("UPDATE calls SET loop = 'beta' WHERE id = ?", (ids[5],)),
            (
                "UPDATE calls SET started_at = ? WHERE id = ?",
                (utc_iso(at - timedelta(days=3)), ids[6]),
            ),
            (
                "UPDATE calls SET simulated = 1, status = 'ok', cost_micro_usd = 9 WHERE id = ?",
                (ids[7],),
            ),
            ("UPDATE calls SET id = id + 1000 WHERE id = ?", (ids[8],)),
            (
                "INSERT OR REPLACE INTO calls (id, loop, purpose, provider, model, attempt,"
                " status, reserved_micro_usd, cost_micro_usd, priced, simulated, batch,"
                " started_at) SELECT id, loop, purpose, provider, model, attempt, 'ok',"
                " reserved_micro_usd, 5, 1, simulated, batch, started_at FROM calls WHERE id = ?",
                (ids[5],),
            ),
            (
                "INSERT INTO calls (loop, purpose, provider, model, attempt, status,"
                " reserved_micro_usd, cost_micro_usd, priced, simulated, batch, started_at)"
                " VALUES ('alpha', 'work', 'p', 'm', 1, 'ok', 10, 7, 1, 0, 0, ?)",
                (utc_iso(at),),
            ),
        ]
        for sql, params in edits:
            with ledger.write() as conn:
                conn.execute(sql, params)
            assert_exact(ledger, keys)
        budgets.reserve(ledger, call_for("alpha"), 1, windows, UTC_ZONE, now=at)
        abort_own_leftovers(ledger)
        assert_exact(ledger, keys)
        # A settled row of a live window changed by hand: `invalidate` makes the totals sum it.
        with ledger.write() as conn:
            conn.execute("DELETE FROM calls WHERE id = ?", (ids[0],))
        budgetcache.invalidate(ledger)
        assert_exact(ledger, keys)


def test_writes_declared_outside_calls_need_no_catch_up(tmp_path: Path) -> None:
    """A run's own writes (runs, loop state) leave the totals current: no catch-up scan."""
    at = datetime(2026, 5, 5, 12, tzinfo=UTC)
    keys = keys_at(at, UTC_ZONE)
    windows = [Window("alpha", "day", BIG), Window("global", "month", BIG)]
    with Ledger.open(tmp_path / "state") as ledger:
        first = budgets.reserve(ledger, call_for("alpha"), 100, windows, UTC_ZONE, now=at)
        statements: list[str] = []
        ledger.conn.set_trace_callback(statements.append)
        run_id = ledger.start_run(loop="alpha", trigger="manual", simulated=False)
        budgets.settle(ledger, first, status="ok", usage=None, cost_micro_usd=60, priced=True)
        ledger.finish_run(run_id, status="ok")
        ledger.record_skipped_run(
            loop="alpha", trigger="schedule", simulated=False, status="skipped_noop"
        )
        statements.clear()
        budgets.reserve(ledger, call_for("alpha"), 7, windows, UTC_ZONE, now=at)
        assert not [s for s in statements if "FROM calls WHERE id >=" in s], statements
        assert_exact(ledger, keys)
        # The same statements through an undeclared write are caught up (and stay exact).
        with ledger.write() as conn:
            conn.execute("UPDATE runs SET error = 'x' WHERE id = ?", (run_id,))
        statements.clear()
        budgets.reserve(ledger, call_for("alpha"), 8, windows, UTC_ZONE, now=at)
        assert [s for s in statements if "FROM calls WHERE id >=" in s]
        assert_exact(ledger, keys)
        # A declared write that rolls back leaves them exact too.
        with pytest.raises(RuntimeError), ledger.write(calls=False) as conn:
            conn.execute("UPDATE runs SET error = 'y' WHERE id = ?", (run_id,))
            raise RuntimeError("the block failed")
        budgets.reserve(ledger, call_for("alpha"), 9, windows, UTC_ZONE, now=at)
        assert_exact(ledger, keys)


def test_a_failed_statement_or_transaction_leaves_no_trace(tmp_path: Path) -> None:
    at = datetime(2026, 5, 5, 12, tzinfo=UTC)
    windows = [Window("alpha", "day", BIG)]
    day = window_bounds("day", at, UTC_ZONE)
    key = ("alpha", False, utc_iso(day[0]), utc_iso(day[1]))
    with Ledger.open(tmp_path / "state") as ledger:
        first = budgets.reserve(ledger, call_for("alpha"), 100, windows, UTC_ZONE, now=at)
        with ledger.write() as conn:
            # Two rows copied in one statement; the second breaks NOT NULL after the first
            # row's trigger ran: SQLite undoes the statement, TEMP tables included.
            with pytest.raises(sqlite3.IntegrityError):
                conn.execute(
                    "INSERT INTO calls (loop, purpose, provider, model, attempt, status,"
                    " reserved_micro_usd, priced, simulated, batch, started_at)"
                    " SELECT loop, purpose, provider, model, attempt, status, reserved_micro_usd,"
                    " priced, simulated, batch, CASE WHEN n = 2 THEN NULL ELSE started_at END"
                    " FROM calls, (SELECT 1 AS n UNION ALL SELECT 2) WHERE id = ? ORDER BY n",
                    (first,),
                )
            assert budgetcache.window_totals(ledger, [key]) == [(0, 100)]
        with pytest.raises(RuntimeError), ledger.write():
            budgets.reserve(ledger, call_for("alpha"), 50, windows, UTC_ZONE, now=at)
            budgets.settle(ledger, first, status="ok", usage=None, cost_micro_usd=1, priced=True)
            raise RuntimeError("rolled back")
        with ledger.write() as conn:
            assert budgetcache.window_totals(ledger, [key]) == [(0, 100)]
        assert_exact(ledger, keys_at(at, UTC_ZONE))


def test_a_hand_edit_is_caught_by_the_periodic_check(
    two: tuple[Ledger, Ledger, sqlite3.Connection], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, _, foreign = two
    at = datetime(2026, 5, 5, 12, tzinfo=UTC)
    day = window_bounds("day", at, UTC_ZONE)
    key = ("alpha", False, utc_iso(day[0]), utc_iso(day[1]))
    call_id = budgets.reserve(
        a, call_for("alpha"), 100, [Window("alpha", "day", BIG)], UTC_ZONE, now=at
    )
    budgets.settle(a, call_id, status="ok", usage=None, cost_micro_usd=70, priced=True)
    with a.write():
        assert budgetcache.window_totals(a, [key]) == [(70, 0)]
    # A settled row changed by another tool: the one change the sync cannot see by itself.
    foreign.execute("UPDATE calls SET cost_micro_usd = 90 WHERE id = ?", (call_id,))
    monkeypatch.setattr(budgetcache, "REVALIDATE_S", 0)
    with capture_logs() as logs, a.write():
        assert budgetcache.window_totals(a, [key]) == [(90, 0)]
    assert [e["event"] for e in logs] == ["budget.cache_drift"]


def test_refusals_write_nothing_and_batch_rows_stay_reserved(
    two: tuple[Ledger, Ledger, sqlite3.Connection],
) -> None:
    a, b, _ = two
    at = datetime(2026, 5, 5, 12, tzinfo=UTC)
    windows = [Window("alpha", "day", 1_000)]
    batch_id = budgets.reserve(a, call_for("alpha", batch=True), 600, windows, UTC_ZONE, now=at)
    budgets.mark_submitted(a, batch_id, request_id="req")
    before = a.conn.execute("SELECT COUNT(*) FROM calls").fetchone()[0]
    with pytest.raises(BudgetWindowExceeded) as refused:
        budgets.reserve(b, call_for("alpha"), 500, windows, UTC_ZONE, now=at)
    assert refused.value.used_micro_usd == 600
    assert a.conn.execute("SELECT COUNT(*) FROM calls").fetchone()[0] == before
    # The owner dies: a submitted batch call is the provider's to finish, still reserved.
    with b.write() as conn:
        conn.execute("UPDATE calls SET owner = ? WHERE id = ?", (dead_owner(), batch_id))
    budgets.reconcile_abandoned(b)
    assert_exact(a, keys_at(at, UTC_ZONE))
    assert_exact(b, keys_at(at, UTC_ZONE))
    with pytest.raises(BudgetWindowExceeded):
        budgets.reserve(a, call_for("alpha"), 401, windows, UTC_ZONE, now=at)
    budgets.settle(b, batch_id, status="ok", usage=None, cost_micro_usd=300, priced=True)
    budgets.reserve(a, call_for("alpha"), 700, windows, UTC_ZONE, now=at)
    assert_exact(a, keys_at(at, UTC_ZONE))


def test_prune_on_the_same_connection(tmp_path: Path) -> None:
    now = datetime(2026, 5, 20, 12, tzinfo=UTC)
    with Ledger.open(tmp_path / "state") as ledger:
        for days in (70, 50, 0):
            at = now - timedelta(days=days)
            call_id = budgets.reserve(
                ledger, call_for("alpha"), 100, [Window("global", "month", BIG)], BERLIN, now=at
            )
            budgets.settle(ledger, call_id, status="ok", usage=None, cost_micro_usd=60, priced=True)
        assert_exact(ledger, keys_at(now, BERLIN))
        result = retention.prune(ledger, now - timedelta(days=40), now=now, tz=BERLIN)
        assert result.calls == 2
        assert_exact(ledger, keys_at(now, BERLIN))


# -- time zones and DST --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tz", "switch"),
    [
        (BERLIN, SPRING),
        (BERLIN, AUTUMN),
        # Lord Howe: 02:00 local becomes 01:30 on 2026-04-05 (UTC+11 to UTC+10:30).
        (LORD_HOWE, datetime(2026, 4, 4, 15, 0, tzinfo=UTC)),
    ],
)
def test_windows_around_a_dst_change(tmp_path: Path, tz: ZoneInfo, switch: datetime) -> None:
    tick = timedelta(microseconds=1)
    with Ledger.open(tmp_path / "state") as ledger:
        windows = [Window("alpha", period, BIG) for period in budgets.PERIODS] + [
            Window("global", "hour", BIG)
        ]
        instants = [
            switch - timedelta(minutes=30),
            switch - tick,
            switch,
            switch + timedelta(minutes=45),
        ]
        ids = [
            budgets.reserve(ledger, call_for("alpha"), 1_000 + i, windows, tz, now=t)
            for i, t in enumerate(instants)
        ]
        for t in instants:
            assert_exact(ledger, keys_at(t, tz))
        # Settled after its hour ended (a later hour is cached by now): the old window moves.
        budgets.settle(ledger, ids[1], status="ok", usage=None, cost_micro_usd=7, priced=True)
        for t in instants:
            assert_exact(ledger, keys_at(t, tz))
        start, end = window_bounds("hour", switch - tick, tz)
        key = ("alpha", False, utc_iso(start), utc_iso(end))
        with ledger.write():
            settled, reserved = budgetcache.window_totals(ledger, [key])[0]
        in_hour = [i for i, t in enumerate(instants) if start <= t < end]
        assert settled == (7 if 1 in in_hour else 0)
        assert reserved == sum(1_000 + i for i in in_hour if i != 1)


def test_a_loop_named_like_the_global_scope_counts_once(tmp_path: Path) -> None:
    at = datetime(2026, 5, 5, 12, tzinfo=UTC)
    with Ledger.open(tmp_path / "state") as ledger:
        windows = [Window("global", "day", BIG)]
        budgets.reserve(ledger, call_for("alpha"), 100, windows, UTC_ZONE, now=at)
        assert_exact(ledger, keys_at(at, UTC_ZONE))
        budgets.reserve(ledger, call_for("global"), 50, windows, UTC_ZONE, now=at)
        assert_exact(ledger, keys_at(at, UTC_ZONE))


def test_catching_up_with_other_writers_does_not_rebuild(
    two: tuple[Ledger, Ledger, sqlite3.Connection], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b, foreign = two
    at = datetime(2026, 5, 5, 12, tzinfo=UTC)
    windows = [Window("alpha", "day", BIG), Window("global", "month", BIG)]
    rebuilds: list[int] = []
    reset = budgetcache._Totals.reset

    def counted(self: Any) -> None:
        rebuilds.append(1)
        reset(self)

    monkeypatch.setattr(budgetcache._Totals, "reset", counted)
    for i in range(6):
        ledger = (a, b)[i % 2]
        run_id = ledger.start_run(loop="alpha", trigger="manual", simulated=False)
        call = CallStart(run_id, "alpha", "work", "fast", "haiku", "anthropic", "m", i + 1, False)
        call_id = budgets.reserve(ledger, call, 100, windows, UTC_ZONE, now=at)
        _foreign_insert(foreign, "alpha", at, "ok", 10, 10)
        budgets.settle(ledger, call_id, status="ok", usage=None, cost_micro_usd=50, priced=True)
    assert_exact(a, keys_at(at, UTC_ZONE))
    assert_exact(b, keys_at(at, UTC_ZONE))
    assert len(rebuilds) == 2  # each connection built its totals once, then only caught up
