"""What the running daemon reports (status, STATUS= line) and its ledger housekeeping."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Collection, Mapping
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import Any

from agentd import budgets, loopstate, scheduling
from agentd.config import Config
from agentd.errors import LedgerError
from agentd.ledger import EFFECTIVE_COST_SQL, Ledger, now_iso, utc_iso
from agentd.loopconfig import LoopConfig
from agentd.loopstate import anomaly_run_id
from agentd.owner import current_owner
from agentd.pricing import format_usd

_STATUS_REASON_MAX = 80


def checkpoint_wal(db_path: Path, busy_ms: int) -> tuple[int, int, int]:
    """`PRAGMA wal_checkpoint(TRUNCATE)` on a connection of its own: (busy, wal frames, done).

    With a 0 busy timeout it never waits: when readers hold old snapshots SQLite checkpoints
    what it can (like PASSIVE) and says busy; the next round gets the rest. Its own connection
    lets it run in a worker thread without holding the ledger's lock.
    """
    conn = sqlite3.connect(str(db_path), timeout=busy_ms / 1000, isolation_level=None)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_ms)}")
        row = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    finally:
        conn.close()
    return int(row[0]), int(row[1]), int(row[2])


def abort_own_leftovers(ledger: Ledger) -> tuple[int, int]:
    """After the drain: abort this process's calls and runs still unsettled; (calls, runs).

    Cancelled runs settle themselves (runner and executor); this is the safety net that
    guarantees a stopped daemon leaves nothing `pending` or `running`, with the same rules as
    reconciling a dead process (an unsettled call is charged its reservation). A submitted
    batch call and its run are left as they are: the next start finishes them.
    """
    owner, now = current_owner(), now_iso()
    with ledger.write() as conn:
        calls = conn.execute(
            "UPDATE calls SET status = 'aborted', cost_micro_usd = reserved_micro_usd,"
            " error_type = 'aborted', error = 'daemon stopped', finished_at = ?"
            " WHERE status IN ('pending', 'submitted') AND owner = ?"
            " AND NOT (status = 'submitted' AND batch = 1)",
            (now, owner),
        ).rowcount
        runs = conn.execute(
            "UPDATE runs SET status = 'aborted', finished_at = ?,"
            " error = COALESCE(error, 'daemon stopped'),"
            f" cost_micro_usd = (SELECT COALESCE(SUM({EFFECTIVE_COST_SQL}), 0)"
            " FROM calls WHERE calls.run_id = runs.id)"
            " WHERE status = 'running' AND owner = ? AND NOT EXISTS (SELECT 1 FROM calls"
            " WHERE calls.run_id = runs.id AND calls.status = 'submitted' AND calls.batch = 1)",
            (now, owner),
        ).rowcount
    return int(calls), int(runs)


class DaemonView:
    """The read side of the daemon: `status()`, the STATUS= line, ledger health."""

    def __init__(self, state_dir: Path, simulate: bool) -> None:
        self.state_dir = state_dir
        self.simulate = simulate
        self.started_at = datetime.now(UTC)
        self._ledger: Ledger | None = None
        self._scheduler: Any = None

    @property
    def config(self) -> Config:
        """The configuration in force (the daemon overrides this)."""
        raise NotImplementedError

    def is_running(self, loop: str) -> bool:
        """Whether a run of the loop is in progress in this daemon (the daemon overrides this)."""
        return False

    @property
    def ledger(self) -> Ledger:
        """The open ledger; LedgerError before start-up opened it."""
        if self._ledger is None:
            raise LedgerError("the daemon has not opened its ledger yet")
        return self._ledger

    def ledger_ok(self) -> bool:
        """Whether the ledger answers a query."""
        try:
            with self.ledger.read() as conn:
                conn.execute("SELECT 1 FROM loop_state LIMIT 1").fetchall()
        except (LedgerError, sqlite3.Error):
            return False
        return True

    def today(self, now: datetime | None = None) -> tuple[int, int]:
        """(runs made, micro-USD spent) today in the config's zone; skipped runs do not count."""
        now = now or datetime.now(UTC)
        start, end = budgets.window_bounds("day", now, self.config.tz)
        day = budgets.Window(budgets.GLOBAL, "day", 0)
        (spend,) = budgets.window_status(self.ledger, [day], self.config.tz, now, self.simulate)
        with self.ledger.read() as conn:
            (runs,) = conn.execute(
                "SELECT COUNT(*) FROM runs WHERE started_at >= ? AND started_at < ?"
                " AND simulated = ? AND status NOT LIKE 'skipped%'",
                (utc_iso(start), utc_iso(end), int(self.simulate)),
            ).fetchone()
        return int(runs), spend.spent_micro_usd

    def status_line(self) -> str:
        """The STATUS= line: loops, runs and spend today, and which loops are paused and why."""
        config = self.config
        loops = sum(1 for lp in config.loops.values() if lp.enabled)
        runs, spent = self.today()
        line = f"{loops} loops, {runs} runs today, ${format_usd(spent)} spent today"
        if self.simulate:
            line += " (simulated)"
        now = datetime.now(UTC)
        paused = []
        for name in config.loops:
            reason = loopstate.paused_reason(self.ledger, name, now)
            if reason is not None:
                short = reason if len(reason) <= _STATUS_REASON_MAX else reason[:77] + "..."
                paused.append(f"{name} ({short})")
        if paused:
            line += "; paused: " + ", ".join(paused)
        return line

    def loops_running(self) -> list[str]:
        """Loops with a run in progress in this daemon (the daemon overrides this)."""
        return [name for name in self.config.loops if self.is_running(name)]

    def daemon_facts(self) -> dict[str, Any]:
        """Who is answering: pid, start time, version, config and state directory."""
        from importlib.metadata import PackageNotFoundError, version

        try:
            agentd_version = version("agentd")
        except PackageNotFoundError:
            agentd_version = None
        return {
            "pid": os.getpid(),
            "started_at": utc_iso(self.started_at),
            "version": agentd_version,
            "simulate": self.simulate,
            "config": str(self.config.path),
            "state_dir": str(self.state_dir),
        }

    def status(self) -> dict[str, Any]:
        """Everything `agentd status` shows, JSON-able, money as decimal strings.

        The shape is `agentd.control.build_status` (what the CLI renders), plus the daemon's
        own facts at the top level and, per loop, `loop`, `tier`, `model`, `last_slot`,
        `backoff_until`, `budgets` (its own windows) and `last_run.run_id`.
        """
        config = self.config
        now = datetime.now(UTC)
        next_runs: dict[str, datetime | None] = {}
        for name, loop in config.loops.items():
            if loop.enabled and self._scheduler is not None:
                next_runs[name] = scheduling.next_run_time(self._scheduler, name)
        facts = self.daemon_facts()
        body = build_status(
            self.ledger,
            config,
            now=now,
            next_runs=next_runs,
            running=self.loops_running(),
            simulated=self.simulate,
            daemon=facts,
        )
        states = loopstate.all_states(self.ledger)
        for entry in body["loops"]:
            self._add_loop_facts(entry, states.get(entry["name"]), next_runs, now)
        runs, spent = self.today(now)
        body.update(facts)
        body.update(runs_today=runs, spent_today_usd=format_usd(spent))
        return body

    def _add_loop_facts(
        self,
        entry: dict[str, Any],
        state: loopstate.LoopState | None,
        next_runs: dict[str, datetime | None],
        now: datetime,
    ) -> None:
        name = entry["name"]
        loop = self.config.loops[name]
        state = state or loopstate.LoopState(name)
        backoff = loopstate.next_allowed_at(
            self.ledger, name, loop.on_failure, state.consecutive_failures
        )
        next_run = next_runs.get(name)
        entry.setdefault("next_run", None if next_run is None else utc_iso(next_run))
        entry.setdefault("running", self.is_running(name))
        entry.setdefault("consecutive_failures", state.consecutive_failures)
        if "paused" not in entry:
            reason = loopstate.paused_reason(self.ledger, name, now)
            entry.update(paused=reason is not None, paused_reason=reason)
        # An anomaly pause names the run that tripped it (`agentd resume LOOP` clears it).
        entry["paused_run_id"] = anomaly_run_id(entry.get("paused_reason"))
        entry.update(
            loop=name,
            tier=loop.tier,
            model=loop.model,
            last_slot=state.last_slot,
            backoff_until=utc_iso(backoff) if backoff is not None and backoff > now else None,
        )
        # The loop's own windows (build_status's `windows` also lists the global ones).
        entry.setdefault("budgets", [w for w in entry.get("windows", []) if w.get("scope") == name])
        last = entry.get("last_run")
        if isinstance(last, dict) and "id" in last:
            last.setdefault("run_id", last["id"])


# ---------------------------------------------------------------------------- status body


def schedule_text(loop: LoopConfig) -> str:
    """A loop's schedule in a few words, e.g. `every 30m, jitter 30s, 08:00-22:00`."""
    parts = [f"every {loop.every}" if loop.every else f"cron {loop.cron}"]
    if loop.jitter:
        parts.append(f"jitter {loop.jitter}")
    if loop.active_hours is not None:
        parts.append(f"{loop.active_hours.start}-{loop.active_hours.end}")
    return ", ".join(parts)


def _window_dict(ws: budgets.WindowStatus, tz: tzinfo) -> dict[str, Any]:
    return {
        "scope": ws.window.scope,
        "period": ws.window.period,
        "limit_usd": format_usd(ws.window.limit_micro_usd),
        "spent_usd": format_usd(ws.spent_micro_usd),
        "reserved_usd": format_usd(ws.reserved_micro_usd),
        "remaining_usd": format_usd(ws.remaining_micro_usd),
        "resets_at": ws.end.astimezone(tz).isoformat(),
    }


def _iso(value: datetime | None) -> str | None:
    return None if value is None else utc_iso(value)


def build_status(
    ledger: Ledger,
    config: Config,
    *,
    now: datetime | None = None,
    next_runs: Mapping[str, datetime | None] | None = None,
    running: Collection[str] = (),
    simulated: bool = False,
    daemon: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The `/status` body: each loop's schedule, next and last run, pause, failures and spend.

    `next_runs` are the scheduler's next fire times (a loop missing from it, or paused, has
    none);
    `running` the loops with a run in progress; `daemon` extra facts (pid, started_at,
    version, config path) shown as they are. Money is decimal strings, times ISO-8601.
    Only ledger rows of the daemon's kind (`simulated`) count.
    """
    at = datetime.now(UTC) if now is None else now
    tz = config.tz
    global_windows = budgets.windows_for(
        "", None, config.budgets.limits() if config.budgets else None
    )
    global_status = budgets.window_status(ledger, global_windows, tz, at, simulated)
    with ledger.read() as conn:
        failures = dict(
            conn.execute("SELECT loop, consecutive_failures FROM loop_state").fetchall()
        )
    loops = []
    for name, loop in config.loops.items():
        own = budgets.windows_for(name, loop.budget.limits() if loop.budget else None, None)
        # A zero-limit day window of the loop: only its spent figure is used ("spend today").
        today = budgets.Window(name, "day", 0)
        statuses = budgets.window_status(ledger, [*own, today], tz, at, simulated)
        windows = [*statuses[:-1], *global_status]
        tightest = min(windows, key=lambda ws: ws.remaining_micro_usd, default=None)
        with ledger.read() as conn:
            row = conn.execute(
                "SELECT id, status, trigger, started_at, finished_at, model, cost_micro_usd,"
                " error FROM runs WHERE loop = ? AND simulated = ? AND status != 'running'"
                " ORDER BY started_at DESC, id DESC LIMIT 1",
                (name, int(simulated)),
            ).fetchone()
        last = None
        if row is not None:
            keys = ("id", "status", "trigger", "started_at", "finished_at", "model")
            last = dict(zip(keys, row[:6], strict=True))
            last["cost_usd"] = format_usd(int(row[6] or 0))
            last["error"] = row[7]
        reason = loopstate.paused_reason(ledger, name, at)
        loops.append(
            {
                "name": name,
                "enabled": loop.enabled,
                "schedule": schedule_text(loop),
                "target": f"tier {loop.tier}" if loop.tier else f"model {loop.model}",
                # A paused loop's job may still be scheduled, but it will not run: no next run.
                "next_run": None if reason is not None else _iso((next_runs or {}).get(name)),
                "running": name in running,
                "paused": reason is not None,
                "paused_reason": reason,
                "consecutive_failures": int(failures.get(name, 0)),
                "last_run": last,
                "spent_today_usd": format_usd(statuses[-1].spent_micro_usd),
                "windows": [_window_dict(ws, tz) for ws in windows],
                "tightest": None if tightest is None else _window_dict(tightest, tz),
            }
        )
    return {
        "daemon": dict(daemon or {}),
        "now": utc_iso(at),
        "timezone": config.timezone,
        "simulated": simulated,
        "budgets": [_window_dict(ws, tz) for ws in global_status],
        "loops": loops,
    }
