"""An attempt's settle is owed to the ledger: the reply comes first, the row a turn later.

Real SDKs against the fake server and a real ledger file; a second sqlite3 connection plays
another process reading the ledger (`agentd ledger`, Datasette).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from fakeserver import FakeServer, ok
from structlog.testing import capture_logs
from test_executor import Harness

from agentd.budgets import Window, windows_for
from agentd.errors import LedgerError
from agentd.executor import CallOutcome, RunTrace
from agentd.ledger import Ledger, now_iso
from agentd.owedwrites import OwedWrite
from agentd.providers.base import Message


def _row(path: Path) -> tuple[Any, ...]:
    """The newest calls row, read by another connection (as another process would)."""
    other = sqlite3.connect(path)
    try:
        return tuple(
            other.execute(
                "SELECT status, cost_micro_usd, finished_at FROM calls ORDER BY id DESC LIMIT 1"
            ).fetchone()
        )
    finally:
        other.close()


async def _call(h: Harness, run_id: int, windows: Sequence[Window] = ()) -> CallOutcome:
    trace = RunTrace(run_id=run_id, loop="work", simulated=False)
    return await h.executor.call(
        trace,
        purpose="work",
        chain=h.config.chain("work"),
        system=None,
        messages=(Message("user", "Say hello."),),
        max_tokens=200,
        windows=windows,
    )


def _start(h: Harness) -> int:
    return h.ledger.start_run(loop="work", trigger="manual", simulated=False)


def test_the_reply_comes_first_and_the_row_follows_on_the_next_turn(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    h = Harness(tmp_path, fake_server)
    fake_server.script("claude-haiku-4-5", ok(text="hi", input_tokens=1000, output_tokens=200))
    run_id = _start(h)

    async def go() -> None:
        with capture_logs() as logs:
            outcome = await _call(h, run_id)
            assert outcome.reply.text == "hi" and outcome.cost_micro_usd == 2000
            # Another process still sees the reservation: never less than the cost.
            status, cost, finished = _row(h.ledger.path)
            assert (status, cost, finished) == ("pending", None, None)
            assert h.ledger.owed == 1
            assert not [e for e in logs if e["event"] == "call.finished"]
            ended_by = now_iso()
            time.sleep(0.01)  # the row's finished_at is the attempt's end, not the write's
            await asyncio.sleep(0)  # one turn of the event loop
            status, cost, finished = _row(h.ledger.path)
            assert (status, cost) == ("ok", 2000)
            assert finished <= ended_by
            assert h.ledger.owed == 0
            [event] = [e for e in logs if e["event"] == "call.finished"]
            assert (event["status"], event["cost_micro_usd"]) == ("ok", 2000)

    asyncio.run(go())


def test_this_process_reads_its_own_writes_at_once(tmp_path: Path, fake_server: FakeServer) -> None:
    h = Harness(tmp_path, fake_server)
    run_id = _start(h)

    async def go() -> None:
        await _call(h, run_id)
        assert h.ledger.owed == 1
        [call] = h.ledger.calls_for_run(run_id)  # a read through the ledger writes first
        assert call["status"] == "ok" and h.ledger.owed == 0

    asyncio.run(go())


def test_the_next_reservation_carries_the_owed_settle_in_its_commit(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    h = Harness(tmp_path, fake_server, {"loops": {"work": {"budget": {"per_day_usd": 1}}}})
    loop = h.config.loops["work"]
    windows = windows_for("work", loop.budget.limits() if loop.budget else None, None)
    run_id = _start(h)
    statements: list[str] = []
    h.ledger.conn.set_trace_callback(statements.append)

    async def go() -> None:
        await _call(h, run_id, windows)
        statements.clear()
        # No await between: the second call reserves before the loop's next turn.
        await _call(h, run_id, windows)

    asyncio.run(go())
    verbs = [s.split()[0] for s in statements]
    verbs = [v for v in verbs if v in ("BEGIN", "UPDATE", "INSERT", "COMMIT")]
    # The first settle and the second reservation: one transaction; then the second settle.
    assert verbs[:4] == ["BEGIN", "UPDATE", "INSERT", "COMMIT"]
    assert verbs[4:] == ["BEGIN", "UPDATE", "COMMIT"]
    assert [c["status"] for c in h.calls(run_id)] == ["ok", "ok"]


def test_an_owed_settle_that_cannot_be_written_stops_the_next_call(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    h = Harness(tmp_path, fake_server)
    run_id = _start(h)
    # An SQLite error on every settle, as a full disk would give. A TEMP trigger lives on one
    # connection: the ledger's own (its private name: `conn` would write what is owed first).
    raw = h.ledger._conn
    raw.execute(
        "CREATE TEMP TRIGGER no_settle BEFORE UPDATE ON calls"
        " BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
    )

    async def go() -> None:
        with capture_logs() as logs:
            outcome = await _call(h, run_id)
            assert outcome.reply.text
            await asyncio.sleep(0)
            [failed] = [e for e in logs if e["event"] == "ledger.flush_failed"]
            assert "disk is full" in failed["error"] and failed["owed"] == 1
            # Still owed, so the reservation that would carry it fails: no request is sent.
            with pytest.raises(LedgerError, match="disk is full"):
                await _call(h, run_id)
            assert fake_server.count() == 1
            assert _row(h.ledger.path)[0] == "pending"
            # A read through the ledger still answers (the row as it stands), and says why.
            [call] = h.ledger.calls_for_run(run_id)
            assert call["status"] == "pending"
            assert len([e for e in logs if e["event"] == "ledger.flush_failed"]) == 2
            assert not [e for e in logs if e["event"] == "call.finished"]

    asyncio.run(go())
    raw.execute("DROP TRIGGER no_settle")
    h.ledger.flush()
    assert [c["status"] for c in h.calls(run_id)] == ["ok"]
    assert h.ledger.owed == 0


def test_close_writes_what_is_owed(tmp_path: Path, fake_server: FakeServer) -> None:
    h = Harness(tmp_path, fake_server)
    run_id = _start(h)

    async def go() -> None:
        await _call(h, run_id)
        assert h.ledger.owed == 1
        h.ledger.close()  # e.g. `agentd once` interrupted right after the reply

    asyncio.run(go())
    assert _row(h.ledger.path)[:2] == ("ok", 82)  # 2 in, 16 out: the default reply
    with Ledger.open(tmp_path / "state") as again:
        [call] = again.calls_for_run(run_id)
        assert call["status"] == "ok"


def test_a_write_that_fails_for_its_own_reason_is_dropped_not_blocking(tmp_path: Path) -> None:
    with Ledger.open(tmp_path / "state") as ledger:

        def broken() -> None:
            raise ValueError("a bug in this write")

        with capture_logs() as logs:
            ledger.owe(OwedWrite(broken, label="broken"))
            assert ledger.owed == 1
            ledger.flush()
        [event] = [e for e in logs if e["event"] == "ledger.owed_write_failed"]
        assert event["write"] == "broken" and "a bug in this write" in event["error"]
        assert ledger.owed == 0
        ledger.start_run(loop="work", trigger="manual", simulated=False)  # not wedged
