"""The daemon (`agentd run`): process lifecycle — scheduler, run tasks, signals, sd_notify, drain.

The scheduler only decides *when*: each APScheduler job starts an agentd-owned task and returns,
so APScheduler's shutdown (which cancels coroutine jobs) never interrupts a run. Shutdown stops
new runs, drains the tasks up to `daemon.shutdown_grace_s`, cancels the rest (the runner and
executor record them `aborted`, reservations settled), and only then stops the scheduler.

Choices an operator sees (the gates themselves live in `agentd.dispatch`):

- Exit codes: 0 clean stop; 78 invalid config or a missing key for a loop's primary model;
  75 another daemon holds `<state_dir>/agentd.pid`; 1 anything else.
- A paused loop (by the operator, by failures, or by `when_over_budget: pause` until its window
  resets) is skipped at fire time without a runs row; so is a slot inside a failure backoff.
  Both log `loop.skipped` and mark the slot handled, so a restart does not catch it up.
- `trigger` (manual) bypasses backoff and active hours, not a pause; `on_reply` and catch-up
  runs pass the same gates as scheduled ones.
- `jitter:` delays each scheduled run inside its task, so slots stay on the nominal grid.
- `every:` loops fire at a stable per-loop phase within their interval (a hash of the name),
  so loops sharing an interval do not all fire in the same second; `cron:` loops are exact.
- READY=1 waits for the SDKs of the providers that have a key to import (in threads).
- Every `RECONCILE_INTERVAL_S` the ledger's rows of dead processes are settled (as at start).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
from collections.abc import Mapping
from concurrent.futures import Future
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from agentd import housekeeping, loopstate, scheduling
from agentd.config import Config, load_config
from agentd.daemonstatus import DaemonView, abort_own_leftovers, checkpoint_wal
from agentd.dispatch import Dispatcher
from agentd.errors import (
    EXIT_NOT_NOW,
    EXIT_OK,
    AgentdError,
    ConfigError,
    LoopBusy,
    LoopPaused,
    MissingKeyError,
)
from agentd.ledger import Ledger, parse_iso, utc_iso
from agentd.logs import get_logger
from agentd.loopconfig import LoopConfig
from agentd.looplock import loop_lock
from agentd.notify import Notifier, watchdog_interval
from agentd.pidlock import acquire_pid_lock
from agentd.reload import ConfigChange, check_primary_keys, diff_configs, reload_cost_warning

if TYPE_CHECKING:
    from apscheduler.triggers.base import BaseTrigger

    from agentd.control import ControlTarget

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# STATUS= after runs at most once a second, and never more than ~2 % of the event loop's
# time: the line counts today's runs and spend, which grows through a busy day.
_STATUS_INTERVAL_S = 1.0
_STATUS_COST_FACTOR = 50
# How often the daemon settles calls and runs of processes that died (an `agentd once` killed
# by SIGKILL or OOM): their reservations would otherwise hold budget until the next open.
RECONCILE_INTERVAL_S = 60.0


class DaemonStopping(AgentdError):
    """The daemon is shutting down and starts no more runs."""

    exit_code = EXIT_NOT_NOW


class Daemon(DaemonView):
    """The running daemon; also the control server's target (status, trigger, pause, …)."""

    def __init__(
        self,
        config: Config,
        state_dir: Path,
        *,
        simulate: bool = False,
        notifier: Notifier | None = None,
        env: Mapping[str, str] | None = None,
        reconcile_s: float = RECONCILE_INTERVAL_S,
    ) -> None:
        super().__init__(state_dir, simulate)
        self._reconcile_s = reconcile_s
        self._env: Mapping[str, str] = os.environ if env is None else env
        self._notifier = notifier or Notifier(None)
        self._initial = config
        self._dispatch: Dispatcher | None = None
        self._triggers: dict[str, BaseTrigger] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._server: Any = None
        self._stopping = False
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._metrics_lock = threading.Lock()
        self._metrics_ledger: Ledger | None = None
        self._status_pending = False
        self._status_sent = float("-inf")  # event-loop time of the last STATUS= after a run
        self._status_cost = 0.0  # seconds the last STATUS= line took to compute
        self._log = get_logger()

    @property
    def config(self) -> Config:
        """The configuration new runs use (the latest valid one)."""
        return self._initial if self._dispatch is None else self._dispatch.config

    @property
    def dispatch(self) -> Dispatcher:
        """The run tasks; DaemonStopping before start-up created them."""
        if self._dispatch is None:
            raise DaemonStopping("the daemon is not started")
        return self._dispatch

    def is_running(self, loop: str) -> bool:
        """Whether a run of the loop is in progress in this daemon."""
        return self._dispatch is not None and self._dispatch.active.get(loop) == "running"

    # -- lifecycle ----------------------------------------------------------------------------

    async def run(self, *, install_signals: bool = True) -> int:
        """Start, serve until SIGTERM/SIGINT (or `request_stop`), drain, stop; returns 0."""
        loop = asyncio.get_running_loop()
        if install_signals:
            for sig in _STOP_SIGNALS:
                loop.add_signal_handler(sig, self.request_stop, sig.name)
            loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        try:
            async with self._reload_lock:
                await self._start()
            await self._stop.wait()
        finally:
            await self._shutdown()
            if install_signals:
                for sig in (*_STOP_SIGNALS, signal.SIGHUP):
                    loop.remove_signal_handler(sig)
        return EXIT_OK

    def request_stop(self, reason: str = "requested") -> None:
        """Begin a graceful stop; a second request cuts the grace period short."""
        if self._stop.is_set():
            self._log.warning("daemon.stop_forced", signal=reason)
            self._force.set()
            return
        self._log.info("daemon.stop_requested", signal=reason)
        self._stop.set()

    def _on_sighup(self) -> None:
        self._background_task(self._reload(source="SIGHUP"))

    def _background_task(self, coro: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _start(self) -> None:
        """Open the ledger, schedule every enabled loop, catch up, serve control, READY=1."""
        config = self._initial
        # The SDKs import in threads meanwhile; READY=1 waits for them (see _sdks_imported).
        imports = self._start_sdk_imports(config)
        self._ledger = Ledger.open(self.state_dir)  # reconciles rows of dead processes
        self._dispatch = Dispatcher(
            config, self._ledger, simulate=self.simulate, on_settled=self._refresh_status
        )
        interval = watchdog_interval(self._env)
        if interval is not None:
            self._background_task(self._watchdog(interval))
        from apscheduler.schedulers.asyncio import AsyncIOScheduler

        # Created and started inside the running loop: it binds to the loop it starts in.
        self._scheduler = AsyncIOScheduler(timezone=config.tz)
        self._scheduler.start()
        now = datetime.now(UTC)
        states = loopstate.all_states(self._ledger)
        for name, loop in config.loops.items():
            if loop.enabled:
                self._schedule(config, name, loop, states.get(name), now)
        for name, loop in config.loops.items():
            state = states.get(name)
            last = parse_iso(state.last_slot) if state and state.last_slot else None
            missed = (
                scheduling.missed_slot(loop, name, config.tz, last, now) if loop.enabled else None
            )
            if missed is not None:
                self._log.info("loop.catch_up", loop=name, slot=utc_iso(missed))
                self._dispatch.spawn(name, "catchup", missed)
        await self._start_control()
        self._background_task(
            housekeeping.checkpoint_loop(self._ledger, lambda: self.config.daemon.wal_checkpoint_s)
        )
        self._background_task(housekeeping.reconcile_loop(self._ledger, self._reconcile_s))
        self._background_task(housekeeping.heap_trim_loop())
        # Batch calls a stopped process left submitted: adopt them and finish their runs.
        from agentd.batchresume import BatchResumer

        dispatch = self._dispatch
        resumer = BatchResumer(
            self._ledger,
            lambda: (dispatch.config, dispatch.current.executor),
            on_result=dispatch.after_resumed,
        )
        self._background_task(resumer.run_forever())
        await self._sdks_imported(imports)
        self._notifier.ready(self.status_line())
        self._log.info(
            "daemon.started",
            pid=os.getpid(),
            loops=sorted(n for n, lp in config.loops.items() if lp.enabled),
            simulate=self.simulate,
            config=str(config.path),
            state_dir=str(self.state_dir),
            watchdog_s=interval,
        )

    async def _shutdown(self) -> None:
        """Stop starting runs, drain, abort the rest, stop the scheduler, close the ledger."""
        self._stopping = True
        grace = self.config.daemon.shutdown_grace_s
        in_flight = [] if self._dispatch is None else self._dispatch.in_flight()
        self._notifier.stopping(f"stopping: {len(in_flight)} runs in flight")
        self._log.info("daemon.stopping", in_flight=in_flight, grace_s=grace)
        if self._scheduler is not None and self._scheduler.running:
            self._scheduler.pause()
        await self._stop_control()
        if self._dispatch is not None:
            await self._dispatch.drain(grace, self._force)
        if self._scheduler is not None and self._scheduler.running:
            self._scheduler.shutdown(wait=False)
            await asyncio.sleep(0)  # AsyncIOScheduler.shutdown runs on the next loop turn
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._dispatch is not None:
            await self._dispatch.close()
        if self._ledger is not None:
            calls, runs = abort_own_leftovers(self._ledger)
            if calls or runs:
                self._log.warning("daemon.settled_leftovers", calls=calls, runs=runs)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(checkpoint_wal, self._ledger.path, 2000)
            self._ledger.close()
        with self._metrics_lock:
            if self._metrics_ledger is not None:
                self._metrics_ledger.close()
                self._metrics_ledger = None
        self._notifier.close()
        self._log.info("daemon.stopped")

    async def _watchdog(self, interval: float) -> None:
        """WATCHDOG=1 every half watchdog period: a stuck event loop misses it and is restarted."""
        while True:
            self._notifier.watchdog()
            await asyncio.sleep(interval)

    def _start_sdk_imports(self, config: Config) -> dict[str, Future[ModuleType]]:
        """Start importing the SDKs a run could need, in threads (see agentd.providers.sdkload)."""
        from agentd.providers.sdkload import warm_up

        return {} if self.simulate else warm_up(config, self._env)

    async def _sdks_imported(self, imports: dict[str, Future[ModuleType]]) -> None:
        """Wait for the SDK imports; a failed one is logged and fails the calls that need it."""
        from agentd.providers.sdkload import wait_imports

        for module, error in (await wait_imports(imports)).items():
            self._log.error("provider.sdk_import_failed", sdk=module, error=error)

    async def _start_control(self) -> None:
        from agentd import control

        path = control.socket_path(self.state_dir, self._env)
        try:
            self._server = await control.serve(self, path)
        except (OSError, AgentdError) as exc:
            # The schedule matters more than the socket: keep running, say so loudly.
            self._log.error("control.failed", path=str(path), error=str(exc))

    async def _stop_control(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), timeout=2)

    def _refresh_status(self) -> None:
        """Send STATUS= after a run settles: at once when calm, at most once per interval.

        The line costs a query per loop; sent after every run, 1,000 loops finishing together
        cost O(loops²) queries on the event loop and made every run ~25 ms late. Without a
        service manager to tell there is nothing to compute.
        """
        if self._ledger is None or self._stopping or not self._notifier.enabled:
            return
        if self._status_pending:
            return  # a refresh is already scheduled; it will see this run too
        loop = asyncio.get_running_loop()
        gap = max(_STATUS_INTERVAL_S, _STATUS_COST_FACTOR * self._status_cost)
        wait = self._status_sent + gap - loop.time()
        if wait <= 0:
            self._send_status()
        else:
            self._status_pending = True
            loop.call_later(wait, self._send_status)

    def _send_status(self) -> None:
        self._status_pending = False
        if self._ledger is None or self._stopping:
            return
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            self._notifier.status(self.status_line())
        except Exception as exc:  # status is cosmetic; never fail a run over it
            self._log.debug("notify.status_failed", error=str(exc))
        self._status_sent = loop.time()
        self._status_cost = self._status_sent - started

    # -- scheduling -----------------------------------------------------------------------------

    def _schedule(
        self,
        config: Config,
        name: str,
        loop: LoopConfig,
        state: loopstate.LoopState | None,
        now: datetime,
    ) -> None:
        """Add or replace a loop's job; an `every:` loop fires on its phased grid (scheduling)."""
        last = parse_iso(state.last_slot) if state and state.last_slot else None
        anchor = scheduling.anchor_for(loop, name, last, now)
        trigger = scheduling.loop_trigger(loop, config.tz, anchor)
        self._triggers[name] = trigger
        scheduling.add_loop_job(
            self._scheduler, name, self._on_fire, trigger, config.daemon.misfire_grace_s
        )

    async def _on_fire(self, name: str) -> None:
        """The APScheduler job: work out the slot and start a run task; return at once."""
        trigger = self._triggers.get(name)
        if trigger is None or self._stopping:
            return
        lookback = self.config.daemon.misfire_grace_s + 1
        slot = scheduling.slot_at(trigger, datetime.now(UTC), lookback)
        self.dispatch.spawn(name, "schedule", slot)

    # -- reload ---------------------------------------------------------------------------------

    async def _reload(self, *, source: str) -> dict[str, Any]:
        """Load the config file again; apply it if valid, else keep the old one. READY=1 after."""
        async with self._reload_lock:
            if self._stopping or self._dispatch is None:
                return {"ok": False, "message": "the daemon is stopping", "changed": {}}
            self._notifier.reloading()
            try:
                return self._reload_locked(source)
            finally:
                # Also after a refusal: without READY=1 systemd keeps the unit "reloading".
                self._notifier.ready(self.status_line())

    def _reload_locked(self, source: str) -> dict[str, Any]:
        old = self.config
        try:
            new = load_config(old.path)
            check_primary_keys(new, simulate=self.simulate, env=self._env)
        except (ConfigError, MissingKeyError) as exc:
            self._log.error("daemon.reload_refused", error=str(exc), source=source)
            message = f"reload refused, the running configuration is kept: {exc}"
            return {"ok": False, "message": message, "changed": {}}
        change = self._apply(old, new)
        self._start_sdk_imports(new)  # a newly added provider's SDK, without waiting for it
        self._log.info("daemon.reloaded", source=source, **change.as_dict())
        body: dict[str, Any] = {
            "ok": True,
            "message": change.summary(),
            "changed": change.as_dict(),
        }
        increase = reload_cost_warning(old, new, self.ledger)
        if increase is not None:
            body["cost_increase"] = increase
        return body

    def _apply(self, old: Config, new: Config) -> ConfigChange:
        """Swap in the new config and reschedule what changed; unchanged jobs are left alone."""
        change = diff_configs(old, new)
        self.dispatch.swap(new)
        for name in change.removed:
            scheduling.remove_loop_job(self._scheduler, name)
            self._triggers.pop(name, None)
        now = datetime.now(UTC)
        for name in (*change.added, *change.rescheduled):
            state = loopstate.get_state(self.ledger, name)
            self._schedule(new, name, new.loops[name], state, now)
        return change

    # -- the control API (agentd.control's ControlTarget) ----------------------------------

    async def trigger(self, loop: str) -> dict[str, Any]:
        """Start a run of `loop` now (trigger `manual`) without waiting for it.

        KeyError for an unknown loop; LoopBusy when it is running (here or in another
        process); LoopPaused when it is paused; DaemonStopping during shutdown.
        """
        if loop not in self.config.loops:
            raise KeyError(loop)
        if self._stopping:
            raise DaemonStopping("the daemon is stopping; no new runs")
        if loop in self.dispatch.active:
            raise LoopBusy(f"loop {loop!r} is already running")
        with loop_lock(self.state_dir, loop):  # LoopBusy when `agentd once` holds it
            pass
        reason = loopstate.paused_reason(self.ledger, loop, datetime.now(UTC))
        if reason is not None:
            raise LoopPaused(f"loop {loop!r} is paused: {reason} (agentd resume {loop})")
        self.dispatch.spawn(loop, "manual", None)
        self._log.info("loop.triggered", loop=loop)
        return {"loop": loop, "trigger": "manual", "started": True}

    def pause(self, loop: str) -> dict[str, Any]:
        """Pause a loop until resumed; KeyError for an unknown loop."""
        if loop not in self.config.loops:
            raise KeyError(loop)
        reason = "paused by the operator"
        loopstate.set_paused(self.ledger, loop, reason, None)
        self._log.info("loop.paused", loop=loop, reason=reason)
        self._refresh_status()
        return {"loop": loop, "paused": True, "reason": reason}

    def resume(self, loop: str) -> dict[str, Any]:
        """Clear a loop's pause and failure streak; KeyError for an unknown loop."""
        if loop not in self.config.loops:
            raise KeyError(loop)
        was_paused = loopstate.resume(self.ledger, loop)
        self._log.info("loop.resumed", loop=loop, was_paused=was_paused)
        self._refresh_status()
        return {"loop": loop, "paused": False, "was_paused": was_paused}

    async def reload(self) -> dict[str, Any]:
        """Reload the config file, as SIGHUP does: `{"ok", "message", "changed"}`."""
        return await self._reload(source="control")

    def metrics(self) -> str:
        """Prometheus text; runs in a worker thread, on a ledger connection of its own."""
        from agentd.metrics import render_metrics

        with self._metrics_lock:
            if self._metrics_ledger is None:
                self._metrics_ledger = Ledger.open(self.state_dir, create=False, reconcile=False)
            ledger = self._metrics_ledger
        extra = {
            "agentd_up": 1.0,
            "agentd_loops": float(sum(1 for lp in self.config.loops.values() if lp.enabled)),
            "agentd_running_runs": float(len(self.loops_running())),
        }
        return render_metrics(ledger, self.config, extra=extra, simulated=self.simulate)

    def health(self) -> dict[str, Any]:
        """Liveness: the scheduler runs and the ledger answers."""
        from apscheduler.schedulers.base import STATE_RUNNING

        running = self._scheduler is not None and self._scheduler.state == STATE_RUNNING
        ledger_ok = self.ledger_ok()
        return {
            "ok": running and ledger_ok and not self._stopping,
            "scheduler_running": running,
            "ledger_ok": ledger_ok,
            "loops": sum(1 for lp in self.config.loops.values() if lp.enabled),
        }


def run_daemon(
    config: Config, state_dir: Path, *, simulate: bool = False, install_signals: bool = True
) -> int:
    """`agentd run`: lock the state directory, run the daemon until stopped; the exit code.

    Raises MissingKeyError (exit 78) when an enabled loop's primary model has no key, and
    `agentd.pidlock.DaemonRunning` (exit 75) when another daemon holds the state directory.
    """
    check_primary_keys(config, simulate=simulate)
    fd = acquire_pid_lock(state_dir)
    try:
        notifier = Notifier.from_env()

        async def main() -> int:
            daemon = Daemon(config, state_dir, simulate=simulate, notifier=notifier)
            return await daemon.run(install_signals=install_signals)

        return asyncio.run(main())
    finally:
        os.close(fd)  # releases the lock


if TYPE_CHECKING:

    def _implements_control_target(daemon: Daemon) -> ControlTarget:
        """mypy checks here that Daemon satisfies agentd.control's ControlTarget Protocol."""
        return daemon
