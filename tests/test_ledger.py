"""The ledger on a real SQLite file: runs, costs, reports, transactions, read-only opens."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st
from spendledger import at, build

from agentd import budgets
from agentd.errors import LedgerError
from agentd.ledger import FAILED_CALL_STATUSES, Ledger, now_iso, parse_iso, utc_iso
from agentd.owner import current_owner
from agentd.providers.base import Usage
from agentd.spend import spend_report

UTC_ZONE = ZoneInfo("UTC")
T0 = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    with Ledger.open(tmp_path / "state") as opened:
        yield opened


def reserve(
    ledger: Ledger,
    run_id: int | None,
    amount: int,
    *,
    loop: str = "alpha",
    tier: str = "fast",
    model: str = "claude-haiku-4-5",
    provider: str = "anthropic",
    simulated: bool = False,
    at: datetime = T0,
    attempt: int = 1,
) -> int:
    call = budgets.CallStart(
        run_id=run_id,
        loop=loop,
        purpose="work",
        tier=tier,
        alias=model,
        provider=provider,
        model=model,
        attempt=attempt,
        simulated=simulated,
    )
    return budgets.reserve(ledger, call, amount, [], UTC_ZONE, now=at)


def settle_ok(ledger: Ledger, call_id: int, cost: int, usage: Usage | None = None) -> None:
    budgets.settle(
        ledger,
        call_id,
        status="ok",
        usage=usage or Usage(input_tokens=100, output_tokens=10),
        cost_micro_usd=cost,
        priced=True,
    )


def test_start_and_finish_a_run(ledger: Ledger) -> None:
    run_id = ledger.start_run(loop="alpha", trigger="schedule", simulated=False, slot="2026-03-10")
    row = ledger.get_run(run_id)
    assert row is not None
    assert row["status"] == "running"
    assert row["owner"] == current_owner()
    assert row["slot"] == "2026-03-10"
    assert row["finished_at"] is None and row["cost_micro_usd"] is None
    ledger.finish_run(
        run_id,
        status="ok",
        route={"strategy": "static", "tier": "fast", "skipped": ["opus"]},
        model="claude-haiku-4-5",
        fallback=True,
        reply="HEARTBEAT_OK",
    )
    row = ledger.get_run(run_id)
    assert row is not None
    assert row["status"] == "ok"
    assert row["route"] == {"strategy": "static", "tier": "fast", "skipped": ["opus"]}
    assert row["fallback"] is True and row["simulated"] is False
    assert row["model"] == "claude-haiku-4-5" and row["reply"] == "HEARTBEAT_OK"
    assert row["cost_micro_usd"] == 0
    assert parse_iso(row["finished_at"]) >= parse_iso(row["started_at"])
    assert ledger.get_run(run_id + 100) is None


def test_run_cost_is_the_sum_of_its_calls_effective_cost(ledger: Ledger) -> None:
    run_id = ledger.start_run(loop="alpha", trigger="manual", simulated=False)
    other = ledger.start_run(loop="alpha", trigger="manual", simulated=False)
    settle_ok(ledger, reserve(ledger, run_id, 5_000), 2_000)
    failed = reserve(ledger, run_id, 5_000, attempt=2)
    budgets.settle(
        ledger, failed, status="error", usage=None, cost_micro_usd=0, priced=True, http_status=500
    )
    maybe_billed = reserve(ledger, run_id, 3_000, attempt=3)
    budgets.settle(
        ledger, maybe_billed, status="aborted", usage=None, cost_micro_usd=3_000, priced=True
    )
    reserve(ledger, run_id, 700, attempt=4)  # still pending: its reservation counts
    settle_ok(ledger, reserve(ledger, other, 9_999), 9_999)
    ledger.finish_run(run_id, status="failed", error="x" * 2_000)
    row = ledger.get_run(run_id)
    assert row is not None
    assert row["cost_micro_usd"] == 2_000 + 0 + 3_000 + 700
    assert len(row["error"]) == 500  # short message text only


def test_finish_run_checks_its_arguments(ledger: Ledger) -> None:
    run_id = ledger.start_run(loop="alpha", trigger="manual", simulated=False)
    with pytest.raises(ValueError):
        ledger.finish_run(run_id, status="running")
    with pytest.raises(ValueError):
        ledger.finish_run(run_id, status="done")
    with pytest.raises(LedgerError, match="no run"):
        ledger.finish_run(run_id + 1, status="ok")
    with pytest.raises(ValueError):
        ledger.start_run(loop="alpha", trigger="cron", simulated=False)


def test_record_skipped_run(ledger: Ledger) -> None:
    run_id = ledger.record_skipped_run(
        loop="alpha",
        trigger="schedule",
        simulated=True,
        status="skipped_budget",
        route={"refused": "loop alpha per day"},
        error="over budget",
    )
    row = ledger.get_run(run_id)
    assert row is not None
    assert row["status"] == "skipped_budget" and row["simulated"] is True
    assert row["cost_micro_usd"] == 0 and row["finished_at"] == row["started_at"]
    assert row["route"] == {"refused": "loop alpha per day"}
    assert ledger.calls_for_run(run_id) == []
    with pytest.raises(ValueError):
        ledger.record_skipped_run(loop="a", trigger="manual", simulated=False, status="running")


def test_calls_for_run_and_recent_calls(ledger: Ledger) -> None:
    run_a = ledger.start_run(loop="alpha", trigger="manual", simulated=False)
    run_b = ledger.start_run(loop="beta", trigger="manual", simulated=True)
    first = reserve(ledger, run_a, 10, attempt=1)
    second = reserve(ledger, run_a, 10, attempt=2)
    sim = reserve(ledger, run_b, 10, loop="beta", simulated=True)
    assert [c["id"] for c in ledger.calls_for_run(run_a)] == [first, second]
    call = ledger.calls_for_run(run_b)[0]
    assert call["simulated"] is True and call["batch"] is False and call["priced"] is False
    assert call["status"] == "pending" and call["cost_micro_usd"] is None
    assert [c["id"] for c in ledger.recent_calls()] == [sim, second, first]
    assert [c["id"] for c in ledger.recent_calls(limit=2)] == [sim, second]
    assert [c["id"] for c in ledger.recent_calls(loop="alpha")] == [second, first]
    assert [c["id"] for c in ledger.recent_calls(simulated=True)] == [sim]
    assert [c["id"] for c in ledger.recent_calls(simulated=False)] == [second, first]


def test_recent_calls_by_status_and_time(tmp_path: Path) -> None:
    # The known rows: A2's haiku attempt failed (03-09 22:30), B2's sonnet was aborted
    # (03-12 12:00), A4's call is still pending.
    with build(tmp_path / "state") as known:

        def pick(**kwargs: object) -> list[tuple[str, str]]:
            rows = known.recent_calls(simulated=False, **kwargs)  # type: ignore[arg-type]
            return [(c["loop"], c["status"]) for c in rows]

        failed = list(FAILED_CALL_STATUSES)
        assert pick(statuses=failed) == [("beta", "aborted"), ("alpha", "error")]
        assert pick(statuses=failed, since=at(10, 0)) == [("beta", "aborted")]
        assert pick(statuses=failed, until=at(10, 0)) == [("alpha", "error")]
        assert pick(statuses=failed, loop="alpha") == [("alpha", "error")]
        assert pick(statuses=["pending"]) == [("alpha", "pending")]
        assert pick(statuses=[]) == []
        # Newest first, within [since, until): 03-12 13:00 (A3), 14:00 (A4) are out.
        window = pick(since=at(10, 0), until=at(12, 13))
        assert window == [("beta", "aborted"), ("beta", "ok"), ("beta", "ok")]
        assert len(known.recent_calls(simulated=None, limit=100)) == 9  # the simulated S1 too


def test_recent_calls_walk_an_index_newest_first(tmp_path: Path) -> None:
    # On a 1M-call ledger, `simulated = ?` alone took a budget index and sorted every row
    # (1.5 s for 20 rows). Every filter combination must read an index in the order asked.
    with build(tmp_path / "state") as known:
        known.conn.execute("ANALYZE")  # statistics, as a long-lived ledger gathers
        statements: list[str] = []
        known.conn.set_trace_callback(statements.append)
        since, until = at(10, 0), at(12, 0)
        for loop in (None, "alpha"):
            for simulated in (None, False):
                for statuses in (None, ["error", "aborted"]):
                    for span in ((None, None), (since, None), (since, until)):
                        known.recent_calls(
                            loop=loop,
                            simulated=simulated,
                            statuses=statuses,
                            since=span[0],
                            until=span[1],
                        )
        known.conn.set_trace_callback(None)
        selects = [s for s in statements if s.startswith("SELECT * FROM calls")]
        assert len(selects) == 24
        for sql in selects:
            plan = " | ".join(str(r[3]) for r in known.conn.execute("EXPLAIN QUERY PLAN " + sql))
            assert "TEMP B-TREE" not in plan, (sql, plan)
            assert "calls_budget" not in plan, (sql, plan)


def test_create_false_on_a_missing_ledger_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(LedgerError, match="no ledger"):
        Ledger.open(missing, create=False)
    assert not missing.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LedgerError):
        Ledger.open(empty, create=False)
    assert list(empty.iterdir()) == []


def test_create_false_on_an_existing_ledger(tmp_path: Path) -> None:
    with Ledger.open(tmp_path / "s") as ledger:
        run_id = ledger.start_run(loop="alpha", trigger="manual", simulated=False)
    with Ledger.open(tmp_path / "s", create=False) as ledger:
        assert not ledger.read_only
        assert ledger.get_run(run_id) is not None


needs_root = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to act as other users"
)


@needs_root
def test_root_reading_another_users_ledger_is_read_only_and_leaves_it_usable(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    with Ledger.open(state) as ledger:
        ledger.start_run(loop="alpha", trigger="manual", simulated=False)
    for path in (state, *state.iterdir()):
        os.chown(path, 4242, 4242)  # the service user
    with Ledger.open(state, create=False) as ledger:
        assert ledger.read_only
        assert ledger.get_run(1) is not None
        with pytest.raises(LedgerError, match="read-only"), ledger.write():
            pass
    # SQLite gives the -wal/-shm it creates as root to the database's owner.
    assert {p.name: p.stat().st_uid for p in state.iterdir()} == {
        "ledger.db": 4242,
        "ledger.db-wal": 4242,
        "ledger.db-shm": 4242,
        "ledger.lock": 4242,
    }


@needs_root
@pytest.mark.slow
def test_another_user_reading_the_ledger_leaves_no_files(tmp_path: Path) -> None:
    # pytest's tmp_path is private to root: use a directory the other user can traverse.
    base = Path(tempfile.mkdtemp(prefix="agentd-ro-"))
    try:
        base.chmod(0o755)
        state = base / "state"
        with Ledger.open(state) as ledger:
            ledger.start_run(loop="alpha", trigger="manual", simulated=False)
        state.chmod(0o755)
        (state / "ledger.db").chmod(0o644)  # an operator granted read access
        before = sorted(p.name for p in state.iterdir())
        code = textwrap.dedent(
            f"""
            import os, sys
            from pathlib import Path
            from agentd.ledger import Ledger
            from agentd.spend import spend_report
            os.setgid(65534); os.setuid(65534)  # after imports: the interpreter lives in ~root
            with Ledger.open(Path({str(state)!r}), create=False) as ledger:
                print(ledger.read_only, len(spend_report(ledger, by="loop").rows))
            """
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["True", "0"]
        assert sorted(p.name for p in state.iterdir()) == before
    finally:
        shutil.rmtree(base)


def test_write_commits_or_rolls_back(ledger: Ledger) -> None:
    with pytest.raises(KeyError), ledger.write() as conn:
        conn.execute("INSERT INTO loop_state (loop) VALUES ('alpha')")
        raise KeyError("boom")
    assert ledger.conn.execute("SELECT COUNT(*) FROM loop_state").fetchone()[0] == 0
    assert not ledger.conn.in_transaction
    with pytest.raises(LedgerError), ledger.write() as conn:
        conn.execute("INSERT INTO loop_state (loop) VALUES ('alpha')")
        conn.execute("INSERT INTO loop_state (loop) VALUES ('alpha')")  # PK violation
    assert ledger.conn.execute("SELECT COUNT(*) FROM loop_state").fetchone()[0] == 0
    with ledger.write() as conn:
        conn.execute("INSERT INTO loop_state (loop) VALUES ('alpha')")
        with ledger.write() as inner:  # nested: joins the outer transaction
            inner.execute("INSERT INTO loop_state (loop) VALUES ('beta')")
        with ledger.read() as reader:
            assert reader.execute("SELECT COUNT(*) FROM loop_state").fetchone()[0] == 2
    assert ledger.conn.execute("SELECT COUNT(*) FROM loop_state").fetchone()[0] == 2
    with pytest.raises(LedgerError, match="read transaction"), ledger.read(), ledger.write():
        pass


def test_threads_share_one_ledger(ledger: Ledger) -> None:
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(25):
                run_id = ledger.start_run(loop="alpha", trigger="manual", simulated=False)
                settle_ok(ledger, reserve(ledger, run_id, 10), 5)
                ledger.finish_run(run_id, status="ok")
                spend_report(ledger, by="loop")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    [row] = spend_report(ledger, by="loop").rows
    assert (row["calls"], row["runs"], row["cost_micro_usd"]) == (200, 200, 1_000)


def test_a_task_cannot_join_another_tasks_transaction(ledger: Ledger) -> None:
    async def main() -> None:
        holding = asyncio.Event()
        release = asyncio.Event()

        async def holder() -> None:
            with ledger.write():
                holding.set()
                await release.wait()  # the mistake the guard catches

        task = asyncio.create_task(holder())
        await holding.wait()
        with pytest.raises(LedgerError, match="another task"):
            ledger.start_run(loop="alpha", trigger="manual", simulated=False)
        release.set()
        await task

    asyncio.run(main())
    assert ledger.conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 0


def test_timestamp_format() -> None:
    assert utc_iso(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)) == "2026-01-02T03:04:05.000000Z"
    berlin = datetime(2026, 7, 1, 2, 0, 0, 5, tzinfo=ZoneInfo("Europe/Berlin"))
    assert utc_iso(berlin) == "2026-07-01T00:00:00.000005Z"
    assert utc_iso(datetime(999, 1, 1, tzinfo=UTC)) == "0999-01-01T00:00:00.000000Z"
    with pytest.raises(ValueError):
        utc_iso(datetime(2026, 1, 1))
    assert parse_iso("2026-01-02T03:04:05.000000Z") == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert parse_iso("2026-01-02T03:04:05") == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert len(now_iso()) == 27 and now_iso().endswith("Z")


@given(
    st.datetimes(timezones=st.just(UTC), min_value=datetime(1, 1, 1), allow_imaginary=False),
    st.datetimes(timezones=st.just(UTC), min_value=datetime(1, 1, 1), allow_imaginary=False),
)
def test_timestamp_text_orders_like_time(a: datetime, b: datetime) -> None:
    assert (utc_iso(a) < utc_iso(b)) == (a < b)
    assert parse_iso(utc_iso(a)) == a
