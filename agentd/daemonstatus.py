"""What the running daemon reports (status, STATUS= line) and its ledger housekeeping."""

from __future__ import annotations

import os
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agentd import budgets, loopstate, scheduling
from agentd.config import Config
from agentd.errors import LedgerError
from agentd.ledger import EFFECTIVE_COST_SQL, Ledger, now_iso, utc_iso
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
    reconciling a dead process (an unsettled call is charged its reservation).
    """
    owner, now = current_owner(), now_iso()
    with ledger.write() as conn:
        calls = conn.execute(
            "UPDATE calls SET status = 'aborted', cost_micro_usd = reserved_micro_usd,"
            " error_type = 'aborted', error = 'daemon stopped', finished_at = ?"
            " WHERE status IN ('pending', 'submitted') AND batch = 0 AND owner = ?",
            (now, owner),
        ).rowcount
        runs = conn.execute(
            "UPDATE runs SET status = 'aborted', finished_at = ?,"
            " error = COALESCE(error, 'daemon stopped'),"
            f" cost_micro_usd = (SELECT COALESCE(SUM({EFFECTIVE_COST_SQL}), 0)"
            " FROM calls WHERE calls.run_id = runs.id)"
            " WHERE status = 'running' AND owner = ?",
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
        try:
            from agentd.control import build_status
        except ImportError:  # the control module is optional for the daemon itself
            body: dict[str, Any] = {"daemon": facts, "loops": [{"name": n} for n in config.loops]}
        else:
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
        entry.setdefault("schedule", scheduling.describe_schedule(loop))
        entry.setdefault("next_run", None if next_run is None else utc_iso(next_run))
        entry.setdefault("running", self.is_running(name))
        entry.setdefault("consecutive_failures", state.consecutive_failures)
        if "paused" not in entry:
            reason = loopstate.paused_reason(self.ledger, name, now)
            entry.update(paused=reason is not None, paused_reason=reason)
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
