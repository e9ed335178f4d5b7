"""Running totals of the budget windows, per ledger connection, kept exact against the ledger.

Why: a reservation must know each of its windows' settled + reserved spend inside its
`BEGIN IMMEDIATE` transaction. Summing the window's rows there costs time linear in those rows
(≈ 80 ms per reservation at 100,000 rows, on the event loop). Here each window's two sums are
kept as rows change, so a reservation costs one `PRAGMA` and a few dict lookups however full its
windows are — and stays as exact as the SUM (`window_sum`, still the reference).

The totals are a cache of ledger sums, never a counter the ledger does not back: each process
computes them from the ledger (a window's first use sums it), and before every reservation,
under the write lock, brings them up to date with everything committed since:

- Writes by this connection through `budgets.reserve` / `budgets.settle` apply their own change
  (reserve adds its amount to `reserved`; settle moves the row's reservation to `settled` at
  its real cost, even above the reservation or after the window ended; settling a settled row
  changes nothing). Any other write on this connection (reconciliation, `mark_submitted`,
  shutdown aborts, prune, runs and loop state) shows as `Connection.total_changes` moving by
  more than those, and triggers the catch-up below.
- Writes by other connections (other processes, another `Ledger` of this process) show as a
  new `PRAGMA data_version`, and trigger the catch-up: count the rows above the watermark (the
  highest id counted: a rowid range scan) and re-read the rows held as unsettled (a few: the
  calls in flight, and submitted batch calls). Those are the only rows agentd changes after
  inserting them — settle, mark_submitted, reconciliation and abort move `pending`/`submitted`
  rows; prune deletes only settled rows older than every live window (`agentd.retention`).
  Anything else that edits settled rows of a live window must call `invalidate`.
- Sums are read and updated only inside the caller's `BEGIN IMMEDIATE`, which holds the write
  lock: nothing can commit between the catch-up and the reservation's insert, so settled +
  reserved ≤ limit holds exactly as with the SUM, across threads and processes. A transaction
  that rolls back restores the totals as they were when it began (`Ledger.on_transaction_end`).
- Windows are keyed by their exact bounds as ledger text (computed in the configured zone by
  `budgets.window_bounds`, DST included) and a row belongs to one by the same text comparison
  of `started_at` the SUM makes, so no calendar logic lives here. Reports (`window_status`)
  keep summing.
- Safety nets: a vanished or replaced watermark row (ids of deleted top rows are reused) or a
  backlog of more than `SCAN_MAX` unseen rows rebuilds the cache; a cached window is summed
  again every `REVALIDATE_S` seconds (a hand edit of a settled row is the one change the
  catch-up cannot see) and a difference is logged as `budget.cache_drift`.

Why in memory and not in SQL: the same bookkeeping in TEMP tables kept by triggers was exact
for every writer, but its extra statements cost about 100 µs per reserve + settle on a
2-core VM, half the budget of the throughput goal. A running-totals table in the database
file would share the sums across processes but needs a migration and cannot know the windows
(time zone, periods) that only the configuration defines. Money is integer micro-USD.
"""

from __future__ import annotations

import sqlite3
import time
import weakref
from collections.abc import Sequence
from typing import Any

from agentd import spendcache
from agentd.ledger import Ledger, parse_iso, utc_iso
from agentd.logs import get_logger

# A window: (scope, simulated, start, end); start and end as ledger text (`ledger.utc_iso`).
WindowKey = tuple[str, bool, str, str]
# A row's columns that never change after its insert: another row inserted under a reused id
# shows here. (started_at, loop, simulated, reserved, attempt, model, run_id, owner)
Ident = tuple[str, str, int, int, int, str, int | None, str | None]

GLOBAL = "global"  # the scope of the whole daemon's windows (same as `budgets.GLOBAL`)
REVALIDATE_S = 3600  # sum a cached window again at least this often (see the docstring)
SCAN_MAX = 20_000  # more unseen rows than this: rebuild rather than catch up row by row
_CHUNK = 500  # ids per `IN (...)` when re-reading unsettled rows
_OPEN = ("pending", "submitted")

log = get_logger()

_SUM_SQL = (
    "SELECT COALESCE(SUM(CASE WHEN status IN ('pending', 'submitted') THEN 0"
    " ELSE COALESCE(cost_micro_usd, reserved_micro_usd) END), 0),"
    " COALESCE(SUM(CASE WHEN status IN ('pending', 'submitted')"
    " THEN reserved_micro_usd ELSE 0 END), 0)"
    " FROM calls WHERE started_at >= ? AND started_at < ? AND simulated = ?"
)
_ROW = "id, loop, simulated, started_at, status, cost_micro_usd, reserved_micro_usd"


def window_sum(
    conn: sqlite3.Connection, scope: str, simulated: bool, start: str, end: str
) -> tuple[int, int]:
    """(settled, reserved) micro-USD of the rows whose reservation time falls in the window.

    Settled money comes from the report cache (`agentd.spendcache`) for the closed hours it
    holds and from the rows elsewhere; the two agree to the micro-dollar, because an hour is
    cached only once every call in it is settled, and a call written into a cached hour
    later turns that hour back into a hole read from the rows. Money held by calls in
    flight is always read from their rows (the small partial index `calls_unsettled`). A
    month's window over a million rows then costs what a report of it costs, not a scan.
    """
    plan = spendcache.plan(conn, parse_iso(start), parse_iso(end))
    if plan is None:
        return raw_window_sum(conn, scope, simulated, start, end)
    settled = 0
    for low, high in plan.raw:
        low_iso = start if low is None else utc_iso(low)
        high_iso = end if high is None else utc_iso(high)
        if low_iso < high_iso:
            settled += raw_window_sum(conn, scope, simulated, low_iso, high_iso)[0]
    loop_clause = "" if scope == GLOBAL else " AND loop = ?"
    loop_params: list[object] = [] if scope == GLOBAL else [scope]
    for table, column, first, stop in plan.parts:
        if first is not None and first >= stop:
            continue
        (cached,) = conn.execute(
            f"SELECT COALESCE(SUM(cost_micro_usd), 0) FROM {table}"
            f" WHERE simulated = ? AND {column} >= ? AND {column} < ?{loop_clause}",
            [int(simulated), first or "", stop, *loop_params],
        ).fetchone()
        settled += int(cached)
    (reserved,) = conn.execute(
        "SELECT COALESCE(SUM(reserved_micro_usd), 0) FROM calls INDEXED BY calls_unsettled"
        f" WHERE status IN ('pending', 'submitted') AND simulated = ? AND started_at >= ?"
        f" AND started_at < ?{loop_clause}",
        [int(simulated), start, end, *loop_params],
    ).fetchone()
    return settled, int(reserved)


def raw_window_sum(
    conn: sqlite3.Connection, scope: str, simulated: bool, start: str, end: str
) -> tuple[int, int]:
    """`window_sum` from the rows alone: the reference the cached sum is tested against."""
    sql = _SUM_SQL
    params: list[object] = [start, end, int(simulated)]
    if scope != GLOBAL:
        sql += " AND loop = ?"
        params.append(scope)
    settled, reserved = conn.execute(sql, params).fetchone()
    return int(settled), int(reserved)


_SCAN_SQL = (
    f"SELECT {_ROW}, attempt, model, run_id, owner FROM calls WHERE id >= ? ORDER BY id LIMIT ?"
)


def _ident(row: Sequence[Any]) -> Ident:
    """The `Ident` of a `_SCAN_SQL` row."""
    return (row[3], row[1], row[2], row[6], row[7], row[8], row[9], row[10])


def _parts(status: str, cost: int | None, reserved: int | None) -> tuple[int, int]:
    """(settled, reserved) one row adds to its windows, as `window_sum` counts it."""
    if status in _OPEN:
        return 0, int(reserved or 0)
    return int(cost if cost is not None else reserved or 0), 0


class _Open:
    """An unsettled row as counted: where, and how much it holds."""

    __slots__ = ("loop", "reserved", "simulated", "started_at")

    def __init__(self, loop: str, simulated: bool, started_at: str, reserved: int) -> None:
        self.loop, self.simulated, self.started_at, self.reserved = (
            loop,
            simulated,
            started_at,
            reserved,
        )


class _Totals:
    """One connection's cached windows and what is needed to keep them current."""

    def __init__(self, ledger: Ledger) -> None:
        self.conn = ledger.conn
        self.ready = False  # False until the first `reset` (and after `invalidate`)
        # key -> (settled, reserved, monotonic second of the last SUM); tuples, so a shallow
        # copy is a snapshot.
        self.windows: dict[WindowKey, tuple[int, int, int]] = {}
        self.by_scope: dict[tuple[str, bool], tuple[WindowKey, ...]] = {}
        self.open: dict[int, _Open] = {}  # unsettled rows at or below the watermark
        self.wm = 0  # every row with id <= wm is counted
        self.ident: Ident | None = None  # the watermark row's, to notice a reused id
        self.dv: int | None = None  # PRAGMA data_version when last caught up
        self.changes = -1  # conn.total_changes when every change on it was accounted for
        self.saved: tuple[Any, ...] | None = None  # the state when this transaction began

    # -- transactions ----------------------------------------------------------------------

    def touch(self) -> None:
        """Remember the state before the first change in a transaction (for a rollback)."""
        if self.saved is None:
            self.saved = (
                self.ready,
                self.windows.copy(),
                self.by_scope.copy(),
                self.open.copy(),  # _Open entries are replaced, never mutated
                self.wm,
                self.ident,
                self.dv,
                self.changes,
            )

    def transaction_ended(self, committed: bool) -> None:
        """`Ledger.on_transaction_end`: keep the changes, or go back to the saved state."""
        saved, self.saved = self.saved, None
        if saved is not None and not committed:
            (
                self.ready,
                self.windows,
                self.by_scope,
                self.open,
                self.wm,
                self.ident,
                self.dv,
                self.changes,
            ) = saved

    def other_tables_written(self, changes_before: int) -> None:
        """`Ledger.on_other_tables_written`: changes to no `calls` row need no catch-up."""
        if self.ready and changes_before == self.changes:
            self.touch()
            self.changes = self.conn.total_changes

    # -- bookkeeping ------------------------------------------------------------------------

    def apply(
        self, loop: str, simulated: bool, started_at: str, settled: int, reserved: int
    ) -> None:
        """Add a row's change to every cached window containing its reservation time."""
        if not (settled or reserved):
            return
        for scope in (loop, GLOBAL) if loop != GLOBAL else (GLOBAL,):
            for key in self.by_scope.get((scope, simulated), ()):
                if key[2] <= started_at < key[3]:
                    s, r, checked = self.windows[key]
                    self.windows[key] = (s + settled, r + reserved, checked)

    def count_row(self, row: Sequence[Any]) -> None:
        """Count a row not counted before (id, loop, simulated, started_at, status, cost, …)."""
        cid, loop, sim, started, status, cost, reserved = row
        settled_part, reserved_part = _parts(status, cost, reserved)
        self.apply(loop, bool(sim), started, settled_part, reserved_part)
        if status in _OPEN:
            self.open[cid] = _Open(loop, bool(sim), started, int(reserved or 0))

    def uncount_open(self, call_id: int) -> None:
        """Take back what an unsettled row was counted for."""
        old = self.open.pop(call_id)
        self.apply(old.loop, old.simulated, old.started_at, 0, -old.reserved)

    # -- keeping up with the ledger ---------------------------------------------------------

    def reset(self) -> None:
        """Rebuild from the ledger: no window cached, the watermark at the newest row."""
        conn = self.conn
        self.touch()
        self.windows, self.by_scope, self.open = {}, {}, {}
        rows = conn.execute(f"SELECT {_ROW} FROM calls WHERE status IN ('pending', 'submitted')")
        for row in rows.fetchall():
            self.open[row[0]] = _Open(row[1], bool(row[2]), row[3], int(row[6] or 0))
        top = conn.execute(
            f"SELECT {_ROW}, attempt, model, run_id, owner FROM calls ORDER BY id DESC LIMIT 1"
        ).fetchone()
        self.wm, self.ident = (0, None) if top is None else (int(top[0]), _ident(top))
        self.dv = int(conn.execute("PRAGMA data_version").fetchone()[0])
        self.changes = conn.total_changes
        self.ready = True

    def sync(self) -> None:
        """Bring the totals up to the committed ledger; inside the caller's write transaction."""
        conn = self.conn
        if not self.ready:
            self.reset()
            return
        dv = int(conn.execute("PRAGMA data_version").fetchone()[0])
        if dv == self.dv and conn.total_changes == self.changes:
            return  # nobody else wrote: the totals are current
        self.touch()
        self._recheck_open()
        # The watermark row itself first: gone or another row under its id means the top rows
        # were deleted, and ids at or below the watermark may have been reused.
        rows = conn.execute(_SCAN_SQL, (self.wm, SCAN_MAX + 2)).fetchall()
        if self.wm:
            if not rows or rows[0][0] != self.wm or _ident(rows[0]) != self.ident:
                self.reset()
                return
            rows = rows[1:]
        if len(rows) > SCAN_MAX:
            self.reset()
            return
        for row in rows:
            self.count_row(row[:7])
        if rows:
            self.wm, self.ident = int(rows[-1][0]), _ident(rows[-1])
        self.dv, self.changes = dv, conn.total_changes

    def _recheck_open(self) -> None:
        """Apply what happened to the rows held as unsettled (settled, deleted, …) elsewhere."""
        ids = list(self.open)
        for i in range(0, len(ids), _CHUNK):
            chunk = ids[i : i + _CHUNK]
            marks = ", ".join("?" * len(chunk))
            found = {
                row[0]: row
                for row in self.conn.execute(
                    f"SELECT {_ROW} FROM calls WHERE id IN ({marks})", chunk
                ).fetchall()
            }
            for cid in chunk:
                row, old = found.get(cid), self.open[cid]
                if row is not None and (
                    row[4] in _OPEN
                    and int(row[6] or 0) == old.reserved
                    and row[1] == old.loop
                    and bool(row[2]) == old.simulated
                    and row[3] == old.started_at
                ):
                    continue  # still counted right (pending → submitted changes nothing)
                self.uncount_open(cid)
                if row is not None:
                    self.count_row(row)

    def lookup(self, keys: Sequence[WindowKey]) -> list[tuple[int, int]]:
        """The sums of `keys`, summing (and caching) a window not cached or due for a check."""
        now = int(time.monotonic())
        result: list[tuple[int, int]] = []
        for key in keys:
            hit = self.windows.get(key)
            if hit is not None and now - hit[2] < REVALIDATE_S:
                result.append((hit[0], hit[1]))
                continue
            sums = window_sum(self.conn, *key)
            self.touch()
            if hit is None:
                scope_key = (key[0], key[1])
                # Windows that ended before this one started are over: never asked for again.
                self.windows = {k: v for k, v in self.windows.items() if k[3] > key[2]}
                self.by_scope = {
                    s: kept
                    for s, ks in self.by_scope.items()
                    if (kept := tuple(k for k in ks if k in self.windows))
                }
                self.by_scope[scope_key] = (*self.by_scope.get(scope_key, ()), key)
            elif (hit[0], hit[1]) != sums:
                log.warning(
                    "budget.cache_drift",
                    scope=key[0],
                    simulated=key[1],
                    start=key[2],
                    cached_settled=hit[0],
                    cached_reserved=hit[1],
                    settled=sums[0],
                    reserved=sums[1],
                    note="the ledger changed outside agentd's writers; summed again",
                )
            self.windows[key] = (sums[0], sums[1], now)
            result.append(sums)
        return result


_caches: weakref.WeakKeyDictionary[Ledger, _Totals] = weakref.WeakKeyDictionary()


def _totals(ledger: Ledger, *, create: bool) -> _Totals | None:
    totals = _caches.get(ledger)
    if totals is None and create:
        totals = _Totals(ledger)
        _caches[ledger] = totals
        ledger.on_transaction_end = totals.transaction_ended
        ledger.on_other_tables_written = totals.other_tables_written
    return totals


def _in_write(ledger: Ledger) -> sqlite3.Connection:
    conn = ledger.conn
    if not conn.in_transaction:
        raise RuntimeError("budget totals are read and kept inside a ledger write transaction")
    return conn


def window_totals(ledger: Ledger, keys: Sequence[WindowKey]) -> list[tuple[int, int]]:
    """(settled, reserved) of each window, current under the caller's `ledger.write()`.

    The caller holds the write lock (`BEGIN IMMEDIATE`) until it commits, so the sums stay
    true for what it writes in the same transaction.
    """
    _in_write(ledger)
    totals = _totals(ledger, create=True)
    assert totals is not None
    totals.sync()
    return totals.lookup(keys)


def record_insert(ledger: Ledger, call_id: int, ident: Ident, status: str) -> None:
    """Count a row `budgets.reserve` just inserted (in the same write transaction)."""
    totals = _totals(ledger, create=False)
    if totals is None or not totals.ready:
        return
    conn = _in_write(ledger)
    # Counted now only if it is the very next row and the insert was the only change since
    # the totals were current; otherwise the next catch-up counts it.
    if call_id == totals.wm + 1 and conn.total_changes == totals.changes + 1:
        totals.touch()
        started, loop, sim, reserved = ident[0], ident[1], bool(ident[2]), ident[3]
        totals.count_row((call_id, loop, sim, started, status, None, reserved))
        totals.wm, totals.ident, totals.changes = call_id, ident, conn.total_changes


def record_update(ledger: Ledger, call_id: int, changes_before: int, row: Sequence[Any]) -> None:
    """Apply a row `budgets.settle` just updated; `row` is its new (loop, simulated,
    started_at, status, cost, reserved), `changes_before` the connection's total_changes
    before the update."""
    totals = _totals(ledger, create=False)
    if totals is None or not totals.ready:
        return
    conn = _in_write(ledger)
    totals.touch()
    if call_id in totals.open:
        loop, sim, started, status, cost, reserved = row
        totals.uncount_open(call_id)
        totals.count_row((call_id, loop, sim, started, status, cost, reserved))
    # A row above the watermark is counted, as it then is, by the next catch-up.
    if changes_before == totals.changes:
        totals.changes = conn.total_changes


def invalidate(ledger: Ledger) -> None:
    """Forget this connection's totals: the next reservation sums its windows again.

    For code that changes settled rows of a live window in a way the catch-up cannot see.
    """
    totals = _totals(ledger, create=False)
    if totals is not None:
        if ledger.conn.in_transaction:
            totals.touch()  # a rollback of this transaction brings the totals back
        totals.ready = False


def cached_windows(ledger: Ledger) -> list[tuple[WindowKey, tuple[int, int]]]:
    """Every cached window and its sums as they stand (for tests and diagnostics)."""
    totals = _totals(ledger, create=False)
    if totals is None:
        return []
    return [(key, (v[0], v[1])) for key, v in totals.windows.items()]
