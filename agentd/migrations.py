"""The ledger schema, and only here: named, append-only steps, and bringing a database up to date.

Each step is `(name, function)`; the names of applied steps are recorded in `_agentd_migrations`.
A released step is never edited or reordered: a feature that needs a column adds a new step.
`migrate` runs inside the caller's write transaction (`BEGIN IMMEDIATE`), so a step either
applies with its record or not at all, and two processes never apply the same step twice.

Money columns are INTEGER micro-USD; timestamps are `YYYY-MM-DDTHH:MM:SS.ffffffZ` text.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    # Imported for real only when a step runs: an up-to-date ledger (every CLI read) never
    # pays sqlite-utils' import time.
    from sqlite_utils import Database

Migration = Callable[["Database"], None]

MIGRATIONS_TABLE = "_agentd_migrations"

MIGRATIONS: list[tuple[str, Migration]] = []


def migration(step: Migration) -> Migration:
    """Register a step under its function name, in definition order."""
    MIGRATIONS.append((step.__name__, step))
    return step


@migration
def m001_runs(db: Database) -> None:
    """One row per run of a loop, including runs skipped before any call."""
    db.table("runs").create(
        {
            "id": int,
            "loop": str,
            "trigger": str,  # schedule | manual | catchup | on_reply
            "slot": str,  # the scheduled fire time, if any
            "started_at": str,
            "finished_at": str,
            "status": str,  # running | ok | failed | skipped_* | aborted
            "route": str,  # JSON
            "model": str,
            "fallback": int,
            "reply": str,
            "cost_micro_usd": int,
            "simulated": int,
            "error": str,
            "owner": str,  # host:pid:starttime:bootid of the process running it
        },
        pk="id",
        not_null={"loop", "trigger", "started_at", "status", "fallback", "simulated"},
        defaults={"fallback": 0, "simulated": 0},
    )


@migration
def m002_calls(db: Database) -> None:
    """One row per attempt: a reservation (`pending`) that settles to its real cost."""
    db.table("calls").create(
        {
            "id": int,
            "run_id": int,
            "loop": str,
            "purpose": str,  # work | classify | draft | review | escalate
            "tier": str,
            "alias": str,
            "provider": str,
            "model": str,  # the provider's model id, not the alias
            "attempt": int,
            "status": str,  # pending | submitted | ok | error | aborted
            "error_type": str,
            "http_status": int,
            "error": str,
            "input_tokens": int,  # all input, cache reads and writes included
            "output_tokens": int,  # reasoning included
            "cache_read_tokens": int,
            "cache_write_tokens": int,
            "reasoning_tokens": int,
            "reserved_micro_usd": int,
            "cost_micro_usd": int,  # NULL until settled
            "priced": int,
            "simulated": int,
            "batch": int,
            "owner": str,
            "started_at": str,  # reservation time: decides the budget window
            "finished_at": str,
            "latency_ms": int,
            "request_id": str,
        },
        pk="id",
        not_null={
            "loop",
            "purpose",
            "provider",
            "model",
            "attempt",
            "status",
            "reserved_micro_usd",
            "priced",
            "simulated",
            "batch",
            "started_at",
        },
        defaults={"priced": 0, "simulated": 0, "batch": 0},
        foreign_keys=[("run_id", "runs", "id")],
    )


@migration
def m003_loop_state(db: Database) -> None:
    """Per-loop state that survives restarts: pause, last slot and run, failure streak."""
    db.table("loop_state").create(
        {
            "loop": str,
            "paused": int,
            "paused_reason": str,
            "paused_until": str,
            "last_slot": str,
            "last_run_id": int,
            "consecutive_failures": int,
        },
        pk="loop",
        not_null={"paused", "consecutive_failures"},
        defaults={"paused": 0, "consecutive_failures": 0},
    )


@migration
def m004_indexes(db: Database) -> None:
    """Indexes for the budget window sums, reconciliation and the reports."""
    db.table("calls").create_index(["started_at"], index_name="calls_started_at")
    db.table("calls").create_index(["loop", "started_at"], index_name="calls_loop_started_at")
    db.table("calls").create_index(["run_id"], index_name="calls_run_id")
    db.table("runs").create_index(["loop", "started_at"], index_name="runs_loop_started_at")
    # Partial indexes: reconciliation scans only unsettled rows, which are few at any time.
    db.execute(
        "CREATE INDEX calls_unsettled ON calls (owner) WHERE status IN ('pending', 'submitted')"
    )
    db.execute("CREATE INDEX runs_running ON runs (owner) WHERE status = 'running'")


# The run statuses the partial index `runs_skipped` covers: frozen with m005 (a query uses the
# index only when its condition names the same statuses).
SKIPPED_INDEXED = ("skipped_budget", "skipped_noop", "skipped_inactive", "skipped_paused")


@migration
def m005_report_indexes(db: Database) -> None:
    """Indexes for spend reports and pruning: runs by time, and the few fallback/skipped runs."""
    # Pruning and the run-level report columns select runs by start time.
    db.table("runs").create_index(["started_at"], index_name="runs_started_at")
    # Partial indexes: fallback and skipped runs are a few per cent of all runs, so the
    # reports' `fallbacks` and `skipped` columns read only them, not the whole table.
    db.execute("CREATE INDEX runs_fallback ON runs (id) WHERE fallback = 1")
    statuses = ", ".join(f"'{s}'" for s in SKIPPED_INDEXED)
    db.execute(f"CREATE INDEX runs_skipped ON runs (started_at, loop) WHERE status IN ({statuses})")


@migration
def m006_daily_rollup(db: Database) -> None:
    """Per-day totals of pruned calls and runs, so reports over pruned periods keep their sums.

    A row holds what `agentd ledger prune` removed for one UTC day and one combination of
    loop, tier, model, provider, purpose and simulated; absent values (a call without a tier,
    a skipped run without calls) are '' so the key stays unique. Every call is counted exactly
    once: either as a `calls` row or inside a roll-up row, since pruning moves rows from one
    to the other in one transaction.
    """
    db.table("daily_rollup").create(
        {
            "day": str,  # UTC day, YYYY-MM-DD
            "loop": str,
            "tier": str,
            "model": str,
            "provider": str,
            "purpose": str,
            "simulated": int,
            "runs": int,  # runs whose first attempt is in this row
            "fallbacks": int,  # ... of which used a fallback
            # runs skipped before any call (tier, model, provider are ''; purpose is their
            # status, '' in rows rolled up before no-op ticks were counted apart)
            "skipped": int,
            "calls": int,
            "failed": int,
            "input_tokens": int,
            "output_tokens": int,
            "cache_read_tokens": int,
            "cache_write_tokens": int,
            "reasoning_tokens": int,
            "cost_micro_usd": int,
            "latency_count": int,  # settled calls with a latency
            "latency_ms_sum": int,
        },
        pk=("day", "loop", "tier", "model", "provider", "purpose", "simulated"),
        not_null={
            "day",
            "loop",
            "tier",
            "model",
            "provider",
            "purpose",
            "simulated",
            "runs",
            "fallbacks",
            "skipped",
            "calls",
            "failed",
            "input_tokens",
            "output_tokens",
            "cache_read_tokens",
            "cache_write_tokens",
            "reasoning_tokens",
            "cost_micro_usd",
            "latency_count",
            "latency_ms_sum",
        },
        defaults={
            "runs": 0,
            "fallbacks": 0,
            "skipped": 0,
            "calls": 0,
            "failed": 0,
            "input_tokens": 0,
            "output_tokens": 0,
            "cache_read_tokens": 0,
            "cache_write_tokens": 0,
            "reasoning_tokens": 0,
            "cost_micro_usd": 0,
            "latency_count": 0,
            "latency_ms_sum": 0,
        },
    )


@migration
def m007_served_model(db: Database) -> None:
    """`calls.served_model`: the model the provider says answered, beside `model` (asked for).

    They differ only when the provider substitutes (an alias resolved to a dated snapshot, say);
    recording both lets an operator see that a pin never drifted.
    """
    db.table("calls").add_column("served_model", str)


@migration
def m008_budget_covering_indexes(db: Database) -> None:
    """Covering indexes for the budget sums every reservation makes (global and per loop).

    A reservation sums the window's settled and reserved money; with every column it reads in
    the index, SQLite never visits the table rows (about half the time on a large window).
    """
    columns = ["started_at", "status", "cost_micro_usd", "reserved_micro_usd"]
    db.table("calls").create_index(
        ["simulated", *columns], index_name="calls_budget_global", if_not_exists=True
    )
    db.table("calls").create_index(
        ["loop", "simulated", *columns], index_name="calls_budget_loop", if_not_exists=True
    )


@migration
def m009_cache_write_1h(db: Database) -> None:
    """`calls.cache_write_1h_tokens`: the part of `cache_write_tokens` written with a 1-hour TTL.

    1-hour writes cost 2× the input price against 1.25× for 5-minute ones; without the split a
    report cannot re-price or explain them. NULL on rows written before this step (read as 0).
    """
    db.table("calls").add_column("cache_write_1h_tokens", int)


@migration
def m010_report_hours(db: Database) -> None:
    """A derived cache of per-UTC-hour call sums for fast reports (see `spendcache`).

    `report_hours` holds, for each cached hour and combination of loop, tier, model,
    provider, purpose and simulated, the sums a spend report needs and a latency histogram
    (`l00`…); `report_days` the same per whole cached UTC day; `report_cache` the watermark
    (hours before it were considered) and the last call id seen; `report_holes` the hours
    before it that are not cached (unsettled calls, pruned, or a back-dated call).
    Everything here can be rebuilt from `calls`; nothing else reads it.
    """
    from agentd.spendcache import HIST_COLUMNS

    hist = ", ".join(f"{c} INTEGER NOT NULL" for c in HIST_COLUMNS)
    db.execute(
        "CREATE TABLE report_hours (hour TEXT NOT NULL, loop TEXT, tier TEXT, model TEXT,"
        " provider TEXT, purpose TEXT, simulated INTEGER, calls INTEGER, failed INTEGER,"
        " runs INTEGER, input_tokens INTEGER, cache_read_tokens INTEGER,"
        " cache_write_tokens INTEGER, output_tokens INTEGER, reasoning_tokens INTEGER,"
        f" cost_micro_usd INTEGER, latency_count INTEGER, latency_ms_sum INTEGER, {hist})"
    )
    db.execute("CREATE INDEX report_hours_hour ON report_hours (hour)")
    db.execute(
        "CREATE TABLE report_days (day TEXT NOT NULL, loop TEXT, tier TEXT, model TEXT,"
        " provider TEXT, purpose TEXT, simulated INTEGER, calls INTEGER, failed INTEGER,"
        " runs INTEGER, input_tokens INTEGER, cache_read_tokens INTEGER,"
        " cache_write_tokens INTEGER, output_tokens INTEGER, reasoning_tokens INTEGER,"
        f" cost_micro_usd INTEGER, latency_count INTEGER, latency_ms_sum INTEGER, {hist})"
    )
    db.execute("CREATE INDEX report_days_day ON report_days (day)")
    db.execute(
        "CREATE TABLE report_cache (id INTEGER PRIMARY KEY, through TEXT NOT NULL,"
        " last_id INTEGER NOT NULL)"
    )
    db.execute("CREATE TABLE report_holes (hour TEXT PRIMARY KEY)")
    db.execute("CREATE INDEX calls_latency ON calls (latency_ms) WHERE latency_ms IS NOT NULL")


@migration
def m011_batches(db: Database) -> None:
    """Batch calls: `calls.batch_id`, and what a restarted daemon needs to finish their runs.

    A `submitted` call with `batch = 1` waits on a provider batch that outlives the process;
    `batch_requests` keeps, per such call, the request (to fall back to a direct call when
    the item expires) and the run's route so far. Its row goes when the call settles.
    """
    db.table("calls").add_column("batch_id", str)
    db.execute(
        "CREATE TABLE batch_requests (call_id INTEGER PRIMARY KEY REFERENCES calls(id),"
        " run_id INTEGER NOT NULL, request TEXT NOT NULL, route TEXT NOT NULL,"
        " submitted_at TEXT NOT NULL)"
    )
    db.execute(
        "CREATE INDEX calls_batch_submitted ON calls (owner)"
        " WHERE status = 'submitted' AND batch = 1"
    )


@migration
def m012_list_cost(db: Database) -> None:
    """`calls.list_cost_micro_usd`: the call's tokens at list price, so reports show the saving.

    List price is every input token uncached at the plain input rate and output at the output
    rate, standard (non-batch) rates, rounded up; a failed or aborted call's list cost is its
    cost. NULL (rows before this step, unpriced calls) reads as "no saving known": the row's
    own cost. `daily_rollup` keeps the sum for pruned days (its existing rows: their cost, no
    saving known); the report cache gets the column too and is emptied, so the next report
    rebuilds it with the new sum from `calls`.
    """
    db.execute("ALTER TABLE calls ADD COLUMN list_cost_micro_usd INTEGER")
    db.execute("ALTER TABLE daily_rollup ADD COLUMN list_cost_micro_usd INTEGER")
    db.execute("UPDATE daily_rollup SET list_cost_micro_usd = cost_micro_usd")
    for table in ("report_hours", "report_days"):
        db.execute(f"ALTER TABLE {table} ADD COLUMN list_cost_micro_usd INTEGER")
        db.execute(f"DELETE FROM {table}")
    # No watermark and no holes: the cache is empty, and refills from the first call.
    db.execute("DELETE FROM report_cache")
    db.execute("DELETE FROM report_holes")


@migration
def m013_report_cache_reprice(db: Database) -> None:
    """What `agentd reprice` needs in the report cache, so it reads sums instead of raw rows.

    `report_hours` and `report_days` get `alias` and `batch` (in the key beside loop, tier,
    model, provider, purpose and simulated), `band` (how many of the input-size thresholds
    kept in the new `report_cache.bands` a call's input exceeds: tiered prices change there)
    and the sums of `ok` calls alone (`ok_calls`, their cost, input, cache read, cache write,
    1-hour cache write and output tokens). The cache is emptied, as in m012, and the next
    report rebuilds it from `calls`.
    """
    columns = [
        ("alias", str),
        ("batch", int),
        ("band", int),
        ("ok_calls", int),
        ("ok_cost_micro_usd", int),
        ("ok_input_tokens", int),
        ("ok_cache_read_tokens", int),
        ("ok_cache_write_tokens", int),
        ("ok_cache_write_1h_tokens", int),
        ("ok_output_tokens", int),
    ]
    for table in ("report_hours", "report_days"):
        db.execute(f"DELETE FROM {table}")
        for name, kind in columns:
            db.table(table).add_column(name, kind)
    db.table("report_cache").add_column("bands", str)  # JSON list of thresholds, ascending
    # No watermark and no holes: the cache is empty, and refills from the first call.
    db.execute("DELETE FROM report_cache")
    db.execute("DELETE FROM report_holes")


@migration
def m014_drop_budget_covering_indexes(db: Database) -> None:
    """Drop m008's covering indexes: every reservation and settle kept them up to date.

    Reservations read running totals (`agentd.budgetcache`) and a window's full sum reads the
    report cache's closed hours, so nothing needs those indexes any more, while each one cost
    every insert and settle two more index pages: 15-30 % of the ledger's write throughput.
    """
    db.execute("DROP INDEX IF EXISTS calls_budget_global")
    db.execute("DROP INDEX IF EXISTS calls_budget_loop")


@migration
def m015_covering_latency_index(db: Database) -> None:
    """`calls_latency` also holds what a report filters and groups the p95's bucket by.

    A report's exact p95 reads the raw latencies of the one histogram bucket that holds the
    rank (about 2 % of the calls); with the columns in the index it reads them from the index
    alone instead of visiting every row (~35 ms of a whole-ledger report on a million calls).
    The index already gained an entry at every settle; only the entries grow.
    """
    db.execute("DROP INDEX IF EXISTS calls_latency")
    db.execute(
        "CREATE INDEX calls_latency ON calls"
        " (latency_ms, simulated, started_at, loop, tier, model, provider, purpose)"
        " WHERE latency_ms IS NOT NULL"
    )


@migration
def m016_covering_run_indexes(db: Database) -> None:
    """`calls_run_id` and `runs_skipped` hold what a report's run counts read.

    A whole-ledger report counts fallback runs by their first call's group (each fallback
    run → its calls by `run_id`) and skipped runs by time, loop and kind (`simulated`). With
    those columns in the indexes it never visits a row: about 40 % of a million-call
    report. None of the columns changes when a call settles, so a settle touches neither.
    """
    db.execute("DROP INDEX IF EXISTS calls_run_id")
    db.execute(
        "CREATE INDEX calls_run_id ON calls"
        " (run_id, attempt, simulated, started_at, loop, tier, model, provider, purpose)"
    )
    statuses = ", ".join(f"'{s}'" for s in SKIPPED_INDEXED)
    db.execute("DROP INDEX IF EXISTS runs_skipped")
    db.execute(
        "CREATE INDEX runs_skipped ON runs (started_at, loop, simulated, status)"
        f" WHERE status IN ({statuses})"
    )


def _now() -> str:
    # Same fixed-width format as the ledger's timestamps (ledger.py imports this module).
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def applied(conn: sqlite3.Connection) -> list[str]:
    """Names of the steps already applied to this database, in the order they were applied."""
    exists = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (MIGRATIONS_TABLE,)
    ).fetchone()
    if exists is None:
        return []
    rows = conn.execute(f"SELECT name FROM {MIGRATIONS_TABLE} ORDER BY rowid").fetchall()
    return [str(row[0]) for row in rows]


def pending(
    conn: sqlite3.Connection, steps: Sequence[tuple[str, Migration]] = MIGRATIONS
) -> list[str]:
    """Names of the steps this database still needs."""
    done = set(applied(conn))
    return [name for name, _ in steps if name not in done]


def needs_setup(conn: sqlite3.Connection) -> bool:
    """True when the database is not yet in WAL mode or misses a step."""
    mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    return str(mode).lower() != "wal" or bool(pending(conn))


def setup(conn: sqlite3.Connection) -> list[str]:
    """Switch to WAL, then migrate under `BEGIN IMMEDIATE`; the caller holds the setup lock.

    The journal-mode switch cannot run inside a transaction, which is why the caller serializes
    first opens with a lock of its own (see `ledgerfile.setup_lock`).
    """
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise sqlite3.OperationalError(f"cannot switch the ledger to WAL mode (still {mode})")
    conn.execute("BEGIN IMMEDIATE")
    try:
        ran = migrate(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return ran


def migrate(
    conn: sqlite3.Connection, steps: Sequence[tuple[str, Migration]] = MIGRATIONS
) -> list[str]:
    """Apply the missing steps inside the caller's open write transaction; return their names."""
    if not conn.in_transaction:
        # Outside a transaction sqlite-utils would autocommit step by step, and a concurrent
        # opener could apply the same step: refuse rather than half-migrate.
        raise RuntimeError("migrate() must run inside a BEGIN IMMEDIATE transaction")
    conn.execute(
        f"CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} "
        "(name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)"
    )
    # recursive_triggers/plugins would change the connection's settings: leave them alone.
    from sqlite_utils import Database

    db = Database(conn, recursive_triggers=False, execute_plugins=False)
    done = set(applied(conn))
    ran: list[str] = []
    for name, step in steps:
        if name in done:
            continue
        step(db)
        conn.execute(
            f"INSERT INTO {MIGRATIONS_TABLE} (name, applied_at) VALUES (?, ?)", (name, _now())
        )
        ran.append(name)
    return ran
