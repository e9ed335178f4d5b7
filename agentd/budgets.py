"""Budget windows, reservations and settlement: sums over the ledger, atomic across processes.

The guarantee: for every window, settled + reserved spend never exceeds its limit. `reserve`
reads every window's sums (running totals that `agentd.budgetcache` keeps exact against the
ledger, in constant time) and inserts the `pending` row in one `BEGIN IMMEDIATE` transaction,
so no other thread or process can slip a reservation in between. Settlement replaces a
reservation by the real cost, which is at most the reservation when the reservation was a true
upper bound, so settling never breaks the guarantee (a cost above its reservation is recorded
as it is, since it was billed, and logged). A call counts in the window of its `started_at`
(its reservation time), whenever it settles.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from decimal import ROUND_FLOOR, Decimal
from typing import Literal, get_args
from zoneinfo import ZoneInfo

from agentd import budgetcache
from agentd.errors import BudgetExceeded, LedgerError
from agentd.ledger import ABANDONED_ERROR, EFFECTIVE_COST_SQL, Ledger, now_iso, utc_iso
from agentd.logs import get_logger
from agentd.owner import current_owner, owner_alive
from agentd.pricing import MICRO, format_usd
from agentd.providers.base import Usage

Period = Literal["hour", "day", "week", "month"]
PERIODS: tuple[Period, ...] = get_args(Period)
GLOBAL = "global"

SettleStatus = Literal["ok", "error", "aborted"]
_SETTLE_STATUSES = frozenset(get_args(SettleStatus))
# Unsettled rows a dead owner leaves behind; a submitted batch call is the provider's to finish.
_ABANDONABLE = "status IN ('pending', 'submitted') AND NOT (status = 'submitted' AND batch = 1)"

log = get_logger()


@dataclass(frozen=True)
class Window:
    """A spend limit over one calendar period, for one loop or for all loops (`global`)."""

    scope: str
    period: Period
    limit_micro_usd: int

    @property
    def label(self) -> str:
        """Human name, e.g. `loop heartbeat per day` or `global per month`."""
        if self.scope == GLOBAL:
            return f"global per {self.period}"
        return f"loop {self.scope} per {self.period}"


@dataclass(frozen=True)
class CallStart:
    """What is known about an attempt when its cost is reserved."""

    run_id: int | None
    loop: str
    purpose: str
    tier: str | None
    alias: str | None
    provider: str
    model: str
    attempt: int
    simulated: bool
    batch: bool = False


@dataclass(frozen=True)
class WindowStatus:
    """A window's state at one moment; `end` is when it resets."""

    window: Window
    start: datetime
    end: datetime
    spent_micro_usd: int
    reserved_micro_usd: int
    remaining_micro_usd: int


class BudgetWindowExceeded(BudgetExceeded):
    """A reservation did not fit: carries the numbers of the first window it did not fit in."""

    def __init__(
        self,
        window: Window,
        *,
        used_micro_usd: int,
        asked_micro_usd: int,
        resets_at: datetime,
    ) -> None:
        self.budget_window = window
        self.limit_micro_usd = window.limit_micro_usd
        self.used_micro_usd = used_micro_usd
        self.asked_micro_usd = asked_micro_usd
        # When every window that refused this call will have reset (for `when_over_budget: pause`).
        self.resets_at = resets_at
        super().__init__(
            f"over budget: {window.label}: limit {format_usd(window.limit_micro_usd)} USD, "
            f"used {format_usd(used_micro_usd)} USD (settled + reserved), "
            f"asked {format_usd(asked_micro_usd)} USD",
            window=window.label,
        )


def _aware(at: datetime) -> datetime:
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"naive datetime {at!r}: budget windows need an aware datetime")
    return at


def _local_midnight(day: datetime, tz: ZoneInfo) -> datetime:
    # fold=0: a midnight skipped by a DST jump maps to the jump's instant, a repeated one to
    # its first occurrence, so consecutive days tile the timeline without gaps or overlaps.
    return datetime.combine(day.date(), time(0), tzinfo=tz).astimezone(UTC)


def _past_hour(t: datetime, tz: ZoneInfo) -> timedelta:
    local = t.astimezone(tz)
    return timedelta(minutes=local.minute, seconds=local.second, microseconds=local.microsecond)


def _hour_bounds(at: datetime, tz: ZoneInfo) -> tuple[datetime, datetime]:
    """The instants around `at` where the local clock last and next reads hh:00:00.

    Stepping on the real (UTC) timeline keeps the repeated hour of a DST fall-back its own
    window; the loops re-check after a step because a zone whose DST shift is not a whole hour
    (Lord Howe) has an hour that is 30 or 90 minutes long, and windows must still tile.
    """
    start = at - _past_hour(at, tz)
    while _past_hour(start, tz):
        start -= _past_hour(start, tz)
    end = at + (timedelta(hours=1) - _past_hour(at, tz))
    while _past_hour(end, tz):
        end += timedelta(hours=1) - _past_hour(end, tz)
    return start, end


def window_bounds(period: Period, at: datetime, tz: ZoneInfo) -> tuple[datetime, datetime]:
    """The calendar window of `period` containing `at`, aligned in `tz`, as aware UTC datetimes."""
    local = _aware(at).astimezone(tz)
    if period == "hour":
        return _hour_bounds(at.astimezone(UTC), tz)
    if period == "day":
        first = local
        following = local + timedelta(days=1)
    elif period == "week":
        first = local - timedelta(days=local.weekday())  # Monday
        following = first + timedelta(days=7)
    elif period == "month":
        first = local.replace(day=1)
        if first.month == 12:
            following = first.replace(year=first.year + 1, month=1)
        else:
            following = first.replace(month=first.month + 1)
    else:
        raise ValueError(f"unknown budget period {period!r}")
    # Date arithmetic on wall time, then midnight re-resolved in tz: a day is 23, 24 or 25 h.
    return _local_midnight(first, tz), _local_midnight(following, tz)


# The window last computed per (period, zone): reservations come many to a window, and
# `window_bounds` (zone arithmetic) plus its ledger text cost more than the rest of one.
_last_bounds: dict[tuple[str, ZoneInfo], tuple[datetime, datetime, str, str]] = {}


def _bounds(period: Period, at: datetime, tz: ZoneInfo) -> tuple[datetime, datetime, str, str]:
    """`window_bounds` and the same bounds as ledger text, remembered while `at` is inside."""
    key = (period, tz)
    hit = _last_bounds.get(key)
    if hit is not None and hit[0] <= at < hit[1]:
        return hit  # windows tile the timeline: the one containing `at` is this one
    start, end = window_bounds(period, at, tz)
    hit = (start, end, utc_iso(start), utc_iso(end))
    _last_bounds[key] = hit
    return hit


def limit_to_micro_usd(usd: Decimal) -> int:
    """An operator's USD limit in micro-USD, rounded down: never allow more than was written."""
    return int((Decimal(usd) * MICRO).to_integral_value(rounding=ROUND_FLOOR))


def _period_of(key: str) -> Period:
    name = key.removeprefix("per_").removesuffix("_usd")
    for period in PERIODS:
        if name == period:
            return period
    raise ValueError(f"unknown budget key {key!r} (expected per_hour_usd … per_month_usd)")


def windows_for(
    loop: str,
    loop_limits: Mapping[str, Decimal | None] | None,
    global_limits: Mapping[str, Decimal | None] | None,
) -> list[Window]:
    """The windows a call of `loop` must fit in: its own, then the global ones.

    Keys are `per_day_usd` (or `day`) style; None values are unset limits.
    """
    windows: list[Window] = []
    for scope, limits in ((loop, loop_limits), (GLOBAL, global_limits)):
        by_period = {_period_of(k): v for k, v in (limits or {}).items() if v is not None}
        for period in PERIODS:
            if period in by_period:
                windows.append(Window(scope, period, limit_to_micro_usd(by_period[period])))
    return windows


def _money(value: int, what: str) -> int:
    # bool is an int, float/Decimal are not: money is integer micro-USD, nothing else.
    if type(value) is not int or value < 0:
        raise ValueError(f"{what} must be a non-negative int of micro-USD, got {value!r}")
    return value


def _usage(
    conn: sqlite3.Connection, window: Window, start: datetime, end: datetime, simulated: bool
) -> tuple[int, int]:
    """(settled, reserved) micro-USD of the rows whose reservation time falls in the window."""
    return budgetcache.window_sum(conn, window.scope, simulated, utc_iso(start), utc_iso(end))


def reserve(
    ledger: Ledger,
    call: CallStart,
    amount_micro_usd: int,
    windows: Sequence[Window],
    tz: ZoneInfo,
    now: datetime | None = None,
) -> int:
    """Reserve `amount_micro_usd` in every window and write the `pending` row; return its id.

    Raises `BudgetWindowExceeded` (a `BudgetExceeded`) and writes nothing when it does not fit
    in some window. Simulated calls count only against simulated rows, and real against real.
    """
    amount = _money(amount_micro_usd, "reservation")
    for window in windows:
        if window.scope not in (GLOBAL, call.loop):
            raise ValueError(f"window {window.label!r} does not apply to loop {call.loop!r}")
    refused: list[tuple[Window, int, datetime]] = []
    with ledger.write() as conn:
        # The clock is read under the write lock, so started_at follows commit order.
        at = datetime.now(UTC) if now is None else _aware(now)
        if windows:
            # Running totals (`agentd.budgetcache`), brought up to date under this write lock:
            # as exact as summing the windows' rows, in time independent of how many there are.
            bounds = [_bounds(window.period, at, tz) for window in windows]
            keys = [
                (window.scope, call.simulated, b[2], b[3])
                for window, b in zip(windows, bounds, strict=True)
            ]
            sums = budgetcache.window_totals(ledger, keys)
            for window, b, (settled, reserved) in zip(windows, bounds, sums, strict=True):
                if settled + reserved + amount > window.limit_micro_usd:
                    refused.append((window, settled + reserved, b[1]))
        if not refused:
            started, owner = utc_iso(at), current_owner()
            cur = conn.execute(
                "INSERT INTO calls (run_id, loop, purpose, tier, alias, provider, model, attempt,"
                " status, reserved_micro_usd, priced, simulated, batch, owner, started_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?, 0, ?, ?, ?, ?)",
                (
                    call.run_id,
                    call.loop,
                    call.purpose,
                    call.tier,
                    call.alias,
                    call.provider,
                    call.model,
                    call.attempt,
                    amount,
                    int(call.simulated),
                    int(call.batch),
                    owner,
                    started,
                ),
            )
            if cur.lastrowid is None:
                raise LedgerError("reservation insert returned no row id")
            call_id = int(cur.lastrowid)
            ident = (
                started,
                call.loop,
                int(call.simulated),
                amount,
                call.attempt,
                call.model,
                call.run_id,
                owner,
            )
            budgetcache.record_insert(ledger, call_id, ident, "pending")
            return call_id
    # Raised after the block: nothing was written to the ledger, and committing keeps the
    # cache's catch-up, so a loop refused again and again does not redo it each time.
    window, used, _ = refused[0]
    raise BudgetWindowExceeded(
        window,
        used_micro_usd=used,
        asked_micro_usd=amount,
        resets_at=max(end for _, _, end in refused),
    )


def mark_submitted(
    ledger: Ledger,
    call_id: int,
    *,
    request_id: str | None = None,
    batch_id: str | None = None,
    batch_request: tuple[int, str, str] | None = None,
) -> None:
    """Move a `pending` call to `submitted`: the request has reached the provider.

    For a batch call, `batch_id` and `batch_request` (run id, request JSON, route JSON) are
    written in the same transaction, so a restart always finds what it needs to finish it.
    """
    with ledger.write() as conn:
        conn.execute(
            "UPDATE calls SET status = 'submitted', request_id = COALESCE(?, request_id),"
            " batch_id = COALESCE(?, batch_id) WHERE id = ? AND status = 'pending'",
            (request_id, batch_id, call_id),
        )
        if batch_request is not None:
            run_id, request, route = batch_request
            conn.execute(
                "INSERT OR REPLACE INTO batch_requests (call_id, run_id, request, route,"
                " submitted_at) VALUES (?, ?, ?, ?, ?)",
                (call_id, run_id, request, route, now_iso()),
            )


def settle(
    ledger: Ledger,
    call_id: int,
    *,
    status: SettleStatus,
    usage: Usage | None,
    cost_micro_usd: int,
    priced: bool,
    error_type: str | None = None,
    http_status: int | None = None,
    request_id: str | None = None,
    error: str | None = None,
    latency_ms: int | None = None,
    served_model: str | None = None,
    list_cost_micro_usd: int | None = None,
    finished_at: str | None = None,
) -> bool:
    """Replace a call's reservation by its real cost and outcome, in one transaction.

    `finished_at` (ledger text) is when the attempt ended; default now (an owed settle,
    `agentd.owedwrites`, is written a moment after).

    `list_cost_micro_usd`: the same tokens at list price (no cache, no batch discount), for
    the reports' `saved_usd`; None when unknown (reports then count no saving).

    Only a `pending`/`submitted` row moves; settling a row that is already settled (twice, or
    after reconciliation charged it) changes nothing, logs `ledger.settle_ignored` and returns
    False, so cleanup paths may settle unconditionally. An unknown id is a `LedgerError`.
    """
    if status not in _SETTLE_STATUSES:
        raise ValueError(f"cannot settle a call as {status!r}")
    cost = _money(cost_micro_usd, "cost")
    u = usage
    with ledger.write() as conn:
        # One statement on the common path: the row moves only if still unsettled, and says
        # what the budget totals need; the SELECT below runs only when nothing moved.
        changes_before = conn.total_changes
        moved = conn.execute(
            "UPDATE calls SET status = ?, cost_micro_usd = ?, priced = ?, input_tokens = ?,"
            " output_tokens = ?, cache_read_tokens = ?, cache_write_tokens = ?,"
            " cache_write_1h_tokens = ?, reasoning_tokens = ?, error_type = ?, http_status = ?,"
            " request_id = COALESCE(?, request_id), error = ?, latency_ms = ?, finished_at = ?,"
            " served_model = ?, list_cost_micro_usd = ?"
            " WHERE id = ? AND status IN ('pending', 'submitted')"
            " RETURNING reserved_micro_usd, loop, simulated, started_at",
            (
                status,
                cost,
                int(priced),
                None if u is None else u.input_tokens,
                None if u is None else u.output_tokens,
                None if u is None else u.cache_read_tokens,
                None if u is None else u.cache_write_tokens,
                None if u is None else u.cache_write_1h_tokens,
                None if u is None else u.reasoning_tokens,
                error_type,
                http_status,
                request_id,
                None if error is None else error[:500],
                latency_ms,
                finished_at or now_iso(),
                served_model,
                list_cost_micro_usd,
                call_id,
            ),
        ).fetchall()
        if not moved:
            found = conn.execute("SELECT status FROM calls WHERE id = ?", (call_id,)).fetchone()
            if found is None:
                raise LedgerError(f"no call {call_id} in the ledger")
            log.warning("ledger.settle_ignored", call_id=call_id, status=found[0], wanted=status)
            return False
        reserved, loop, simulated, started_at = moved[0]
        budgetcache.record_update(
            ledger, call_id, changes_before, (loop, simulated, started_at, status, cost, reserved)
        )
    if cost > reserved:
        log.warning(
            "budget.cost_over_reservation",
            call_id=call_id,
            cost_micro_usd=cost,
            reserved_micro_usd=reserved,
        )
    return True


def reconcile_abandoned(ledger: Ledger) -> int:
    """Abort calls and runs whose owner process is gone; return the number of calls settled.

    Unsettled calls are charged their reservation (the provider may have billed them) and their
    runs are aborted. `submitted` batch calls belong to a provider batch that outlives processes
    and are left alone, and so are their runs (`agentd.batches` finishes them); so is every row
    of a live (or unknowable) owner. `Ledger.open` runs this
    on every writable open; a long-running process may call it again to settle crashed peers.
    """
    with ledger.write() as conn:
        owners = {
            str(row[0])
            for row in conn.execute(
                f"SELECT DISTINCT owner FROM calls WHERE {_ABANDONABLE} AND owner IS NOT NULL"
                " UNION SELECT DISTINCT owner FROM runs"
                " WHERE status = 'running' AND owner IS NOT NULL"
            )
        }
        gone = sorted(o for o in owners if not owner_alive(o))
        if not gone:
            return 0
        # A dead owner stays dead (a recycled pid has another start time), so the set cannot
        # go stale between the check and the updates, which also run under the write lock.
        marks = ", ".join("?" for _ in gone)
        now = now_iso()
        calls = conn.execute(
            "UPDATE calls SET status = 'aborted', cost_micro_usd = reserved_micro_usd,"
            " error_type = 'abandoned', error = ?, finished_at = ?"
            f" WHERE {_ABANDONABLE} AND owner IN ({marks})",
            (ABANDONED_ERROR, now, *gone),
        ).rowcount
        runs = conn.execute(
            "UPDATE runs SET status = 'aborted', finished_at = ?,"
            " error = COALESCE(error, 'owner process gone'),"
            f" cost_micro_usd = (SELECT COALESCE(SUM({EFFECTIVE_COST_SQL}), 0)"
            " FROM calls WHERE calls.run_id = runs.id)"
            f" WHERE status = 'running' AND owner IN ({marks}) AND NOT EXISTS"
            " (SELECT 1 FROM calls WHERE calls.run_id = runs.id"
            " AND calls.status = 'submitted' AND calls.batch = 1)",
            (now, *gone),
        ).rowcount
    if calls or runs:
        log.warning(
            "ledger.reconciled",
            calls=calls,
            runs=runs,
            owners=gone,
            note="abandoned calls charged at their reservation",
        )
    return int(calls)


def window_status(
    ledger: Ledger,
    windows: Sequence[Window],
    tz: ZoneInfo,
    now: datetime | None = None,
    simulated: bool = False,
) -> list[WindowStatus]:
    """Spent, reserved and remaining for each window at `now`, from one ledger snapshot."""
    at = datetime.now(UTC) if now is None else _aware(now)
    result: list[WindowStatus] = []
    with ledger.read() as conn:
        for window in windows:
            start, end = window_bounds(window.period, at, tz)
            settled, reserved = _usage(conn, window, start, end, simulated)
            result.append(
                WindowStatus(
                    window=window,
                    start=start,
                    end=end,
                    spent_micro_usd=settled,
                    reserved_micro_usd=reserved,
                    remaining_micro_usd=max(0, window.limit_micro_usd - settled - reserved),
                )
            )
    return result
