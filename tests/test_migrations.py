"""The ledger schema: pinned columns, append-only steps, file modes, WAL, concurrent first opens."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlite_utils import Database

from agentd import migrations
from agentd.errors import LedgerError
from agentd.ledger import Ledger

PROCS = Path(__file__).parent / "procs"

# report_hours and report_days (m010, m012, m013) share every column but their first.
REPORT_CACHE_COLUMNS = [
    *[(c, "TEXT") for c in ("loop", "tier", "model", "provider", "purpose")],
    *[
        (c, "INTEGER")
        for c in (
            "simulated",
            "calls",
            "failed",
            "runs",
            "input_tokens",
            "cache_read_tokens",
            "cache_write_tokens",
            "output_tokens",
            "reasoning_tokens",
            "cost_micro_usd",
            "latency_count",
            "latency_ms_sum",
        )
    ],
    *[(f"l{i:02d}", "INTEGER") for i in range(64)],
    ("list_cost_micro_usd", "INTEGER"),
    ("alias", "TEXT"),
    *[
        (c, "INTEGER")
        for c in (
            "batch",
            "band",
            "ok_calls",
            "ok_cost_micro_usd",
            "ok_input_tokens",
            "ok_cache_read_tokens",
            "ok_cache_write_tokens",
            "ok_cache_write_1h_tokens",
            "ok_output_tokens",
        )
    ],
]

EXPECTED_COLUMNS = {
    "runs": [
        ("id", "INTEGER"),
        ("loop", "TEXT"),
        ("trigger", "TEXT"),
        ("slot", "TEXT"),
        ("started_at", "TEXT"),
        ("finished_at", "TEXT"),
        ("status", "TEXT"),
        ("route", "TEXT"),
        ("model", "TEXT"),
        ("fallback", "INTEGER"),
        ("reply", "TEXT"),
        ("cost_micro_usd", "INTEGER"),
        ("simulated", "INTEGER"),
        ("error", "TEXT"),
        ("owner", "TEXT"),
    ],
    "calls": [
        ("id", "INTEGER"),
        ("run_id", "INTEGER"),
        ("loop", "TEXT"),
        ("purpose", "TEXT"),
        ("tier", "TEXT"),
        ("alias", "TEXT"),
        ("provider", "TEXT"),
        ("model", "TEXT"),
        ("attempt", "INTEGER"),
        ("status", "TEXT"),
        ("error_type", "TEXT"),
        ("http_status", "INTEGER"),
        ("error", "TEXT"),
        ("input_tokens", "INTEGER"),
        ("output_tokens", "INTEGER"),
        ("cache_read_tokens", "INTEGER"),
        ("cache_write_tokens", "INTEGER"),
        ("reasoning_tokens", "INTEGER"),
        ("reserved_micro_usd", "INTEGER"),
        ("cost_micro_usd", "INTEGER"),
        ("priced", "INTEGER"),
        ("simulated", "INTEGER"),
        ("batch", "INTEGER"),
        ("owner", "TEXT"),
        ("started_at", "TEXT"),
        ("finished_at", "TEXT"),
        ("latency_ms", "INTEGER"),
        ("request_id", "TEXT"),
        ("served_model", "TEXT"),
        ("cache_write_1h_tokens", "INTEGER"),
        ("batch_id", "TEXT"),
        ("list_cost_micro_usd", "INTEGER"),
    ],
    "batch_requests": [
        ("call_id", "INTEGER"),
        ("run_id", "INTEGER"),
        ("request", "TEXT"),
        ("route", "TEXT"),
        ("submitted_at", "TEXT"),
    ],
    "loop_state": [
        ("loop", "TEXT"),
        ("paused", "INTEGER"),
        ("paused_reason", "TEXT"),
        ("paused_until", "TEXT"),
        ("last_slot", "TEXT"),
        ("last_run_id", "INTEGER"),
        ("consecutive_failures", "INTEGER"),
    ],
    "daily_rollup": [
        ("day", "TEXT"),
        ("loop", "TEXT"),
        ("tier", "TEXT"),
        ("model", "TEXT"),
        ("provider", "TEXT"),
        ("purpose", "TEXT"),
        ("simulated", "INTEGER"),
        ("runs", "INTEGER"),
        ("fallbacks", "INTEGER"),
        ("skipped", "INTEGER"),
        ("calls", "INTEGER"),
        ("failed", "INTEGER"),
        ("input_tokens", "INTEGER"),
        ("output_tokens", "INTEGER"),
        ("cache_read_tokens", "INTEGER"),
        ("cache_write_tokens", "INTEGER"),
        ("reasoning_tokens", "INTEGER"),
        ("cost_micro_usd", "INTEGER"),
        ("latency_count", "INTEGER"),
        ("latency_ms_sum", "INTEGER"),
        ("list_cost_micro_usd", "INTEGER"),
    ],
    "report_hours": [
        ("hour", "TEXT"),
        *REPORT_CACHE_COLUMNS,
    ],
    "report_days": [
        ("day", "TEXT"),
        *REPORT_CACHE_COLUMNS,
    ],
    "report_cache": [
        ("id", "INTEGER"),
        ("through", "TEXT"),
        ("last_id", "INTEGER"),
        ("bands", "TEXT"),
    ],
    "report_holes": [("hour", "TEXT")],
    "_agentd_migrations": [("name", "TEXT"), ("applied_at", "TEXT")],
}

EXPECTED_STEPS = [
    "m001_runs",
    "m002_calls",
    "m003_loop_state",
    "m004_indexes",
    "m005_report_indexes",
    "m006_daily_rollup",
    "m007_served_model",
    "m008_budget_covering_indexes",
    "m009_cache_write_1h",
    "m010_report_hours",
    "m011_batches",
    "m012_list_cost",
    "m013_report_cache_reprice",
    "m014_drop_budget_covering_indexes",
    "m015_covering_latency_index",
    "m016_covering_run_indexes",
]


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    with Ledger.open(tmp_path / "state") as opened:
        yield opened


def columns(conn: sqlite3.Connection, table: str) -> list[tuple[str, str]]:
    return [(r[1], r[2]) for r in conn.execute(f"PRAGMA table_info({table})")]


def test_fresh_database_has_exactly_the_pinned_columns(ledger: Ledger) -> None:
    tables = {
        r[0]
        for r in ledger.conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        )
    }
    assert tables == set(EXPECTED_COLUMNS)
    for table, expected in EXPECTED_COLUMNS.items():
        assert columns(ledger.conn, table) == expected, table


def _pk_order(row: tuple[object, ...]) -> int:
    return int(str(row[5]))


def test_keys_and_constraints(ledger: Ledger) -> None:
    pks = {
        t: [
            r[1]
            for r in sorted(ledger.conn.execute(f"PRAGMA table_info({t})"), key=_pk_order)
            if r[5]
        ]
        for t in ("runs", "calls", "loop_state", "daily_rollup")
    }
    assert pks == {
        "runs": ["id"],
        "calls": ["id"],
        "loop_state": ["loop"],
        "daily_rollup": ["day", "loop", "tier", "model", "provider", "purpose", "simulated"],
    }
    fks = [tuple(r[2:5]) for r in ledger.conn.execute("PRAGMA foreign_key_list(calls)")]
    assert fks == [("runs", "run_id", "id")]
    # Foreign keys are enforced on agentd's connection.
    with pytest.raises(LedgerError), ledger.write() as conn:
        conn.execute(
            "INSERT INTO calls (run_id, loop, purpose, provider, model, attempt, status,"
            " reserved_micro_usd, started_at) VALUES (999, 'x', 'work', 'p', 'm', 1, 'pending',"
            " 1, '2026-01-01T00:00:00.000000Z')"
        )


def test_budget_query_indexes(ledger: Ledger) -> None:
    indexes = {r[1] for r in ledger.conn.execute("PRAGMA index_list(calls)")}
    assert {"calls_started_at", "calls_loop_started_at", "calls_unsettled"} <= indexes
    # m008's covering indexes are gone (m014): every insert and settle paid for them.
    assert not {"calls_budget_global", "calls_budget_loop"} & indexes
    assert "runs_loop_started_at" in {r[1] for r in ledger.conn.execute("PRAGMA index_list(runs)")}
    plan = " ".join(
        str(r[3])
        for r in ledger.conn.execute(
            "EXPLAIN QUERY PLAN SELECT SUM(reserved_micro_usd) FROM calls"
            " WHERE loop = ? AND started_at >= ? AND started_at < ?",
            ("a", "b", "c"),
        )
    )
    assert "calls_loop_started_at" in plan


def test_migrations_are_recorded_and_idempotent(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with Ledger.open(state) as first:
        run_id = first.start_run(loop="l", trigger="manual", simulated=False)
    with Ledger.open(state) as second:
        rows = second.conn.execute("SELECT name FROM _agentd_migrations ORDER BY rowid")
        assert [r[0] for r in rows] == EXPECTED_STEPS
        assert migrations.pending(second.conn) == []
        assert second.get_run(run_id) is not None
        with second.write() as conn:
            assert migrations.migrate(conn) == []


def test_steps_have_unique_names_in_order() -> None:
    names = [name for name, _ in migrations.MIGRATIONS]
    assert names == EXPECTED_STEPS
    assert len(set(names)) == len(names)


def test_a_new_step_applies_once_on_an_existing_database(ledger: Ledger) -> None:
    def m999_extra(db: Database) -> None:
        db.execute("ALTER TABLE runs ADD COLUMN extra TEXT")

    steps = [*migrations.MIGRATIONS, ("m999_extra", m999_extra)]
    assert migrations.pending(ledger.conn, steps) == ["m999_extra"]
    with ledger.write() as conn:
        assert migrations.migrate(conn, steps) == ["m999_extra"]
    with ledger.write() as conn:
        assert migrations.migrate(conn, steps) == []
    assert ("extra", "TEXT") in columns(ledger.conn, "runs")


def test_a_failing_step_leaves_nothing_behind(ledger: Ledger) -> None:
    def m998_half(db: Database) -> None:
        db.execute("CREATE TABLE half (x INTEGER)")
        raise RuntimeError("boom")

    steps = [*migrations.MIGRATIONS, ("m998_half", m998_half)]
    with pytest.raises(RuntimeError), ledger.write() as conn:
        migrations.migrate(conn, steps)
    assert migrations.pending(ledger.conn, steps) == ["m998_half"]
    assert (
        ledger.conn.execute("SELECT name FROM sqlite_master WHERE name = 'half'").fetchone() is None
    )


def test_migrate_refuses_to_run_outside_a_transaction(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "x.db", isolation_level=None)
    with pytest.raises(RuntimeError):
        migrations.migrate(conn)
    conn.close()


def test_file_modes_are_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        with Ledger.open(tmp_path / "state") as ledger:
            ledger.start_run(loop="l", trigger="manual", simulated=False)
            state = tmp_path / "state"
            assert (state.stat().st_mode & 0o777) == 0o700
            for name in ("ledger.db", "ledger.db-wal", "ledger.db-shm"):
                assert ((state / name).stat().st_mode & 0o777) == 0o600, name
    finally:
        os.umask(old)


def test_connection_settings(ledger: Ledger) -> None:
    conn = ledger.conn
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 30000
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert conn.isolation_level is None
    # WAL is persistent: a plain sqlite3 connection (the operator's) sees it too.
    other = sqlite3.connect(ledger.path)
    assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    other.close()


def test_open_problems_are_ledger_errors_naming_the_path(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "ledger.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(LedgerError, match=r"ledger\.db"):
        Ledger.open(state)
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with pytest.raises(LedgerError, match="file"):
        Ledger.open(not_a_dir)


@pytest.mark.slow
def test_several_processes_opening_a_fresh_ledger_at_once(tmp_path: Path) -> None:
    state = tmp_path / "state"
    start_at = time.time() + 1.5  # past every child's interpreter start-up and imports
    procs = [
        subprocess.Popen(
            [sys.executable, str(PROCS / "open_ledger.py"), str(state), str(start_at)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(6)
    ]
    results = [p.communicate(timeout=60) for p in procs]
    for proc, (out, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err
        assert out.startswith("ok "), (out, err)
    with Ledger.open(state) as ledger:
        assert ledger.conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 6
        rows = ledger.conn.execute("SELECT name FROM _agentd_migrations ORDER BY rowid")
        assert [r[0] for r in rows] == EXPECTED_STEPS
