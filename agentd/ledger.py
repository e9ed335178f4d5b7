"""The SQLite spend ledger: opening it safely, runs and their calls, and the report queries."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from agentd import migrations
from agentd.errors import LedgerError
from agentd.eventloop import current_task
from agentd.ledgerfile import WAL_AUTOCHECKPOINT_PAGES as WAL_AUTOCHECKPOINT_PAGES
from agentd.ledgerfile import connect, create_private, setup_lock
from agentd.logs import get_logger
from agentd.owedwrites import OwedWrite, confirm, run_writes
from agentd.owner import current_owner

DB_NAME = "ledger.db"

RUN_TRIGGERS = frozenset({"schedule", "manual", "catchup", "on_reply"})
SKIPPED_RUN_STATUSES = ("skipped_budget", "skipped_noop", "skipped_inactive", "skipped_paused")
RUN_STATUSES = frozenset({"running", "ok", "failed", "aborted", *SKIPPED_RUN_STATUSES})
ABANDONED_ERROR = "owner process gone; settled at reservation"

# What a calls row counts for, in budgets and in a run's cost: an unsettled row holds its
# reservation; a settled row its cost (aborted rows are settled at the reservation by
# reconciliation; a missing cost is never read as free).
EFFECTIVE_COST_SQL = (
    "CASE WHEN status IN ('pending', 'submitted') THEN reserved_micro_usd "
    "ELSE COALESCE(cost_micro_usd, reserved_micro_usd) END"
)

# The call statuses the spend report counts as `failed` (and `ledger calls --failed` lists).
FAILED_CALL_STATUSES = ("error", "aborted")
_ERROR_MAX = 500

log = get_logger()


def utc_iso(dt: datetime) -> str:
    """An aware datetime as the ledger's fixed-width UTC text, `YYYY-MM-DDTHH:MM:SS.ffffffZ`."""
    if dt.tzinfo is not UTC:
        if dt.tzinfo is None or dt.utcoffset() is None:
            raise ValueError(f"naive datetime {dt!r}: the ledger needs an aware datetime")
        dt = dt.astimezone(UTC)
    # isoformat, not strftime: its year is always 4 digits (strftime's %Y does not zero-pad
    # below 1000 on every platform), and text comparison of timestamps (the window queries)
    # needs one fixed width; an aware UTC time ends in "+00:00", swapped for "Z".
    return dt.isoformat(timespec="microseconds")[:-6] + "Z"


def now_iso() -> str:
    """The current time as ledger text."""
    return utc_iso(datetime.now(UTC))


def parse_iso(text: str) -> datetime:
    """Ledger text (or any ISO-8601 string) to an aware UTC datetime; naive input is UTC."""
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC)


def _rows(cursor: sqlite3.Cursor) -> list[dict[str, Any]]:
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def _short(text: str | None) -> str | None:
    return None if text is None else text[:_ERROR_MAX]


_NOTHING_OWED: list[OwedWrite] = []  # shared, never mutated: most transactions carry none


class Ledger:
    """One connection to `<state_dir>/ledger.db` with agentd's settings and write discipline.

    Every use of the connection goes through `write()` or `read()`, which hold a re-entrant lock:
    threads sharing the connection never interleave statements or transactions. Never `await`
    inside them (a second task on the same thread would join the transaction; it is refused).
    The calls block (up to the 30 s busy timeout under contention): from async code, run them
    in a worker thread.
    """

    def __init__(self, conn: sqlite3.Connection, path: Path, *, read_only: bool) -> None:
        self._conn = conn
        self._path = path
        self._read_only = read_only
        self._lock = threading.RLock()
        self._depth = 0
        self._writing = False
        self._task: object | None = None
        # Called with True (committed) or False (rolled back) when an outermost transaction
        # ends: `agentd.budgetcache` undoes its in-memory totals when their writes roll back.
        self.on_transaction_end: Callable[[bool], None] | None = None
        # Called with the connection's total_changes before a `write(calls=False)` block, after
        # it: `agentd.budgetcache` then knows those changes cannot have moved a budget.
        self.on_other_tables_written: Callable[[int], None] | None = None
        # Settles written after their reply (`agentd.owedwrites`), in the order owed.
        self._owed: list[OwedWrite] = []

    @classmethod
    def open(cls, state_dir: Path, *, create: bool = True, reconcile: bool = True) -> Ledger:
        """Open (and with `create`, create and migrate) the ledger of a state directory.

        With `create=False` nothing is created: a missing database is a `LedgerError`. When this
        process is not the database file's owner (an operator reading the daemon's ledger as
        another user) the file is opened read-only (`mode=ro`), unmigrated and unreconciled. SQLite
        creates the `-wal`/`-shm` files if missing, even for a read-only connection; as root it
        gives them to the database's owner, but as any other user they would belong to us and
        lock the daemon out. So a non-root non-owner whose `-wal`/`-shm` are absent (the database
        is fully checkpointed: no connection is open) opens it `immutable=1`, which creates
        nothing; the report is then a snapshot that ignores a writer starting meanwhile.

        A writable open runs `budgets.reconcile_abandoned` unless `reconcile=False`, so every
        process start settles what dead processes left pending.
        """
        state_dir = Path(state_dir)
        path = state_dir / DB_NAME
        conn: sqlite3.Connection | None = None
        try:
            if create:
                # mkdir's mode is narrowed by the umask, never widened: at most 0700.
                state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                # Created 0600 before SQLite sees it; SQLite gives -wal/-shm the same mode.
                create_private(path, state_dir)
            elif not path.exists():
                raise LedgerError(f"{path}: no ledger here (nothing has been recorded yet)")
            st = path.stat()
            read_only = not create and (st.st_uid != os.geteuid() or not os.access(path, os.W_OK))
            immutable = (
                read_only
                and os.geteuid() != 0
                and not (
                    path.with_name(DB_NAME + "-wal").exists()
                    and path.with_name(DB_NAME + "-shm").exists()
                )
            )
            conn = connect(path, read_only=read_only, immutable=immutable)
            if read_only:
                missing = migrations.pending(conn)
                if missing:
                    raise LedgerError(
                        f"{path}: the ledger needs migrations {missing}; open it once as its "
                        "owner (e.g. sudo -u agentd agentd ledger)"
                    )
            elif migrations.needs_setup(conn):
                with setup_lock(state_dir, path):
                    ran = migrations.setup(conn)
                if ran:
                    log.info("ledger.migrated", path=str(path), steps=ran)
        except LedgerError:
            if conn is not None:
                conn.close()
            raise
        except (sqlite3.Error, OSError) as exc:
            if conn is not None:
                conn.close()
            raise LedgerError(f"{path}: cannot open the ledger: {exc}") from exc
        ledger = cls(conn, path, read_only=read_only)
        if reconcile and not read_only:
            from agentd.budgets import reconcile_abandoned  # budgets imports this module

            try:
                reconcile_abandoned(ledger)
            except BaseException:
                ledger.close()
                raise
        return ledger

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    @property
    def read_only(self) -> bool:
        """True when opened read-only (not the file's owner); `write()` then fails."""
        return self._read_only

    @property
    def conn(self) -> sqlite3.Connection:
        """The raw connection (owed writes written first); use it inside `write()`/`read()`."""
        if self._owed and not self._depth:
            self._flush_for_read()
        return self._conn

    def owe(self, item: OwedWrite) -> None:
        """Write `item` with the next transaction, or at the next `flush`."""
        with self._lock:
            self._owed.append(item)

    @property
    def owed(self) -> int:
        """How many writes are owed."""
        return len(self._owed)

    def flush(self) -> None:
        """Write everything owed now, in one transaction (a no-op inside one, or when none)."""
        with self._lock:
            if self._owed and not self._depth:
                with self.write():
                    pass

    def _flush_for_read(self) -> None:
        """Write what is owed before a read (read your own writes); a failure is logged, not
        raised: the rows still read `pending`, a true and conservative state, and the next
        write transaction carries them again and fails its caller."""
        try:
            self.flush()
        except LedgerError as exc:
            log.warning("ledger.flush_failed", owed=len(self._owed), error=str(exc))

    def close(self) -> None:
        """Write what is owed (best effort: unwritten rows are reconciled), then close."""
        with self._lock:
            try:
                self.flush()
            except LedgerError as exc:
                log.error("ledger.flush_failed", owed=len(self._owed), error=str(exc))
            self._conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def vacuum(self) -> None:
        """Rebuild the file to hand space freed by pruning back to the filesystem.

        VACUUM cannot run inside a transaction and holds the write lock while it copies the
        database, so the daemon's writes wait (up to the busy timeout) until it is done.
        """
        if self._read_only:
            raise LedgerError(f"{self._path}: opened read-only; cannot vacuum")
        with self._lock:
            if self._depth:
                raise LedgerError("cannot vacuum inside a ledger transaction")
            try:
                self._conn.execute("VACUUM")
            except sqlite3.Error as exc:
                raise LedgerError(f"{self._path}: vacuum failed: {exc}") from exc

    @contextmanager
    def write(self, *, calls: bool = True) -> Iterator[sqlite3.Connection]:
        """A `BEGIN IMMEDIATE` … `COMMIT` transaction (ROLLBACK on any exception).

        `calls=False` declares that the block changes no `calls` row (runs, loop state): the
        budget totals then need no catch-up for it (a catch-up costs a reservation ~50 µs).

        IMMEDIATE takes the write lock up front, so the reads inside (budget sums) and the write
        that depends on them are atomic across processes; a deferred transaction would fail with
        SQLITE_BUSY when upgrading under concurrent writers. Nested use joins the outer write.
        """
        if self._read_only:
            raise LedgerError(f"{self._path}: opened read-only; cannot write")
        with self._transaction("BEGIN IMMEDIATE", writing=True) as conn:
            if calls or self.on_other_tables_written is None:
                yield conn
                return
            before = conn.total_changes
            yield conn
            self.on_other_tables_written(before)

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: one consistent snapshot for several queries."""
        with self._transaction("BEGIN", writing=False) as conn:
            yield conn

    @contextmanager
    def _transaction(self, begin: str, *, writing: bool) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._owed and not self._depth and not writing and not self._read_only:
                self._flush_for_read()
            if self._depth:
                if current_task() is not self._task:
                    raise LedgerError("ledger transaction re-entered from another task")
                if writing and not self._writing:
                    raise LedgerError("cannot write inside a ledger read transaction")
                self._depth += 1
                try:
                    yield self._conn
                finally:
                    self._depth -= 1
                return
            try:
                self._conn.execute(begin)
            except sqlite3.Error as exc:
                raise LedgerError(f"{self._path}: cannot begin a transaction: {exc}") from exc
            self._depth, self._writing, self._task = 1, writing, current_task()
            committed = False
            owed = _NOTHING_OWED
            if writing and self._owed:
                owed, self._owed = self._owed, []
            written = _NOTHING_OWED
            try:
                if owed:
                    written = run_writes(owed)  # carried in this COMMIT, ahead of its own
                yield self._conn
                self._conn.execute("COMMIT")
                committed = True
            except sqlite3.Error as exc:
                self._rollback()
                raise LedgerError(f"{self._path}: {exc}") from exc
            except BaseException:
                self._rollback()
                raise
            finally:
                if not committed and owed:
                    self._owed[:0] = owed  # rolled back: owed again, ahead of newer ones
                self._depth, self._writing, self._task = 0, False, None
                if self.on_transaction_end is not None:
                    self.on_transaction_end(committed)
            if written:
                confirm(written)

    def _rollback(self) -> None:
        # Some errors (SQLITE_FULL, IOERR) already rolled the transaction back.
        if self._conn.in_transaction:
            self._conn.execute("ROLLBACK")

    # -- runs -------------------------------------------------------------------------------

    def start_run(
        self, *, loop: str, trigger: str, simulated: bool, slot: str | None = None
    ) -> int:
        """Record a run as `running`, owned by this process; return its id."""
        if trigger not in RUN_TRIGGERS:
            raise ValueError(f"unknown run trigger {trigger!r}")
        with self.write(calls=False) as conn:
            cur = conn.execute(
                "INSERT INTO runs (loop, trigger, slot, started_at, status, fallback, simulated,"
                " owner) VALUES (?, ?, ?, ?, 'running', 0, ?, ?)",
                (loop, trigger, slot, now_iso(), int(simulated), current_owner()),
            )
            return _rowid(cur)

    def finish_run(
        self,
        run_id: int,
        *,
        status: str,
        route: dict[str, Any] | None = None,
        model: str | None = None,
        fallback: bool = False,
        reply: str | None = None,
        error: str | None = None,
    ) -> None:
        """Finish a run; its cost is the sum of its calls' effective cost, in one transaction."""
        if status not in RUN_STATUSES or status == "running":
            raise ValueError(f"not a finished run status: {status!r}")
        with self.write(calls=False) as conn:
            cur = conn.execute(
                "UPDATE runs SET status = ?, finished_at = ?, route = ?, model = ?, fallback = ?,"
                " reply = ?, error = ?, cost_micro_usd = (SELECT COALESCE(SUM("
                + EFFECTIVE_COST_SQL
                + "), 0) FROM calls WHERE calls.run_id = runs.id) WHERE id = ?",
                (
                    status,
                    now_iso(),
                    _json(route),
                    model,
                    int(fallback),
                    reply,
                    _short(error),
                    run_id,
                ),
            )
            if cur.rowcount == 0:
                raise LedgerError(f"no run {run_id} in the ledger")

    def record_skipped_run(
        self,
        *,
        loop: str,
        trigger: str,
        simulated: bool,
        status: str,
        route: dict[str, Any] | None = None,
        error: str | None = None,
        slot: str | None = None,
    ) -> int:
        """Record a run that finished before any call (e.g. `skipped_budget`); return its id."""
        if trigger not in RUN_TRIGGERS:
            raise ValueError(f"unknown run trigger {trigger!r}")
        if status not in RUN_STATUSES or status == "running":
            raise ValueError(f"not a finished run status: {status!r}")
        now = now_iso()
        with self.write(calls=False) as conn:
            cur = conn.execute(
                "INSERT INTO runs (loop, trigger, slot, started_at, finished_at, status, route,"
                " fallback, cost_micro_usd, simulated, error, owner)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, 0, 0, ?, ?, ?)",
                (
                    loop,
                    trigger,
                    slot,
                    now,
                    now,
                    status,
                    _json(route),
                    int(simulated),
                    _short(error),
                    current_owner(),
                ),
            )
            return _rowid(cur)

    # -- queries ----------------------------------------------------------------------------

    def get_run(self, run_id: int) -> dict[str, Any] | None:
        """A run as a dict (route parsed from JSON, flags as bool), or None."""
        with self.read() as conn:
            rows = _rows(conn.execute("SELECT * FROM runs WHERE id = ?", (run_id,)))
        return _run_dict(rows[0]) if rows else None

    def calls_for_run(self, run_id: int) -> list[dict[str, Any]]:
        """A run's attempts in order."""
        with self.read() as conn:
            rows = _rows(
                conn.execute("SELECT * FROM calls WHERE run_id = ? ORDER BY id", (run_id,))
            )
        return [_call_dict(r) for r in rows]

    def recent_calls(
        self,
        *,
        loop: str | None = None,
        limit: int = 20,
        simulated: bool | None = None,
        statuses: Sequence[str] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[dict[str, Any]]:
        """The latest attempts started in [since, until), newest first; `simulated=None`: both."""
        where, params = _filters(
            loop=loop, simulated=simulated, statuses=statuses, since=since, until=until
        )
        with self.read() as conn:
            rows = _rows(
                conn.execute(
                    f"SELECT * FROM calls WHERE {where} ORDER BY started_at DESC, id DESC LIMIT ?",
                    (*params, limit),
                )
            )
        return [_call_dict(r) for r in rows]


def _rowid(cur: sqlite3.Cursor) -> int:
    if cur.lastrowid is None:
        raise LedgerError("insert returned no row id")
    return int(cur.lastrowid)


def _json(value: dict[str, Any] | None) -> str | None:
    # default=str: a Decimal or datetime in a route must not lose the run's record.
    return None if value is None else json.dumps(value, default=str, sort_keys=True)


def _filters(
    *,
    loop: str | None,
    simulated: bool | None,
    statuses: Sequence[str] | None,
    since: datetime | None,
    until: datetime | None,
) -> tuple[str, list[Any]]:
    # Only loop and started_at may pick the index: `calls_(loop_)started_at` walked backwards
    # is in `started_at DESC, id DESC` order, so LIMIT stops early. `+` keeps simulated and
    # status out: on `simulated = ?` the planner took m008's budget index (dropped since,
    # m014) and sorted every row.
    clauses: list[str] = ["1 = 1"]
    params: list[Any] = []
    if loop is not None:
        clauses.append("loop = ?")
        params.append(loop)
    if since is not None:
        clauses.append("started_at >= ?")
        params.append(utc_iso(since))
    if until is not None:
        clauses.append("started_at < ?")
        params.append(utc_iso(until))
    if simulated is not None:
        clauses.append("+simulated = ?")
        params.append(int(simulated))
    if statuses is not None:
        clauses.append(f"+status IN ({', '.join('?' * len(statuses))})" if statuses else "0")
        params.extend(statuses)
    return " AND ".join(clauses), params


def _run_dict(row: dict[str, Any]) -> dict[str, Any]:
    route = row.get("route")
    row["route"] = json.loads(route) if route else None
    row["fallback"] = bool(row["fallback"])
    row["simulated"] = bool(row["simulated"])
    return row


def _call_dict(row: dict[str, Any]) -> dict[str, Any]:
    for flag in ("priced", "simulated", "batch"):
        row[flag] = bool(row[flag])
    return row
