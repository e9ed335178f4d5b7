"""The daemon's run tasks: one at a time per loop, gated by slot, pause, backoff, active hours.

Every run the daemon makes is an asyncio task owned here (never an APScheduler job), so
shutdown can drain them, and cancel what is left, before the scheduler stops.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from agentd import loopstate, scheduling
from agentd.alerts import Alerter
from agentd.config import Config
from agentd.errors import ConfigError, LoopBusy, LoopPaused, MissingKeyError
from agentd.executor import Executor
from agentd.ledger import Ledger, parse_iso, utc_iso
from agentd.logs import get_logger
from agentd.loopconfig import LoopConfig
from agentd.runend import RunResult
from agentd.runner import run_loop

_CANCEL_WAIT_S = 10.0  # after cancelling, how long cancelled runs get to write `aborted`


def _slot_done(state: loopstate.LoopState, slot: datetime) -> bool:
    """Whether the loop already handled this slot (ran it, or skipped it paused)."""
    return state.last_slot is not None and parse_iso(state.last_slot) >= slot


@dataclass(eq=False)
class Generation:
    """A config and the executor built for it; a run keeps the generation it started with."""

    config: Config
    executor: Executor
    runs: int = 0
    retired: bool = False


class Dispatcher:
    """Starts, tracks, drains and cancels the daemon's loop runs."""

    def __init__(
        self,
        config: Config,
        ledger: Ledger,
        *,
        simulate: bool,
        on_settled: Callable[[], None] = lambda: None,
    ) -> None:
        self.ledger = ledger
        self.simulate = simulate
        self.current = Generation(config, Executor(config, ledger, simulate=simulate))
        self.active: dict[str, str] = {}  # loop → "waiting" (jitter) | "running"
        self.stopping = False
        self._retired: list[Generation] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing: set[asyncio.Task[None]] = set()
        self._on_settled = on_settled
        self._log = get_logger()
        # Alert memory (rate limits, budget levels sent) lives as long as the daemon.
        self.alerter = Alerter(config, ledger.path.parent)

    @property
    def config(self) -> Config:
        """The configuration new runs use."""
        return self.current.config

    def in_flight(self) -> list[str]:
        """Loops with a run task (running or waiting out their jitter)."""
        return sorted(self.active)

    # -- generations ----------------------------------------------------------------------------

    def swap(self, config: Config) -> None:
        """Use a new config for new runs; in-flight runs finish on the old one, then it closes."""
        old = self.current
        # Circuit state is knowledge about the providers: keep it unless its settings changed.
        same = old.config.circuit_breaker == config.circuit_breaker
        executor = Executor(
            config,
            self.ledger,
            simulate=self.simulate,
            breakers=old.executor.breakers if same else None,
        )
        self.current = Generation(config, executor)
        self.alerter.config = config
        old.retired = True
        if old.runs == 0:
            self._close_later(old)
        else:
            self._retired.append(old)

    def _close_later(self, gen: Generation) -> None:
        task = asyncio.create_task(self._close(gen))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close(self, gen: Generation) -> None:
        try:
            await gen.executor.aclose()
        except Exception as exc:
            self._log.warning("executor.close_failed", error=str(exc))

    async def close(self) -> None:
        """Close every executor (after the drain)."""
        await asyncio.gather(*self._closing, return_exceptions=True)
        for gen in [*self._retired, self.current]:
            await self._close(gen)
        self._retired.clear()

    # -- starting runs --------------------------------------------------------------------------

    def spawn(self, name: str, trigger: str, slot: datetime | None) -> bool:
        """Start a run task unless stopping or the loop already has one; returns if it did."""
        if self.stopping:
            return False
        if name in self.active:
            self._log.info(
                "loop.busy",
                loop=name,
                trigger=trigger,
                slot=None if slot is None else utc_iso(slot),
                note="a run of this loop is in progress; this one is not started",
            )
            return False
        self.active[name] = "waiting"
        task = asyncio.create_task(self._run(name, trigger, slot), name=f"agentd-run-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _run(self, name: str, trigger: str, slot: datetime | None) -> None:
        """One run task: gates (slot, jitter, pause, backoff, hours), the run, what follows."""
        slot_text = None if slot is None else utc_iso(slot)
        log = self._log.bind(loop=name, trigger=trigger, slot=slot_text)
        try:
            # One read for the slot, pause and backoff gates (a scheduled run with no jitter
            # reads the state only here; 1,000 loops make this a hot path).
            state = loopstate.get_state(self.ledger, name)
            if slot is not None and _slot_done(state, slot):
                log.info("loop.slot_done", note="this slot already ran; not running it again")
                return
            loop = self.config.loops.get(name)
            if trigger == "schedule" and loop is not None:
                delay = scheduling.jitter_delay(loop)
                if delay:
                    await asyncio.sleep(delay)
                    state = loopstate.get_state(self.ledger, name)  # it may have changed
            gen = self.current
            loop = gen.config.loops.get(name)
            if loop is None or self.stopping:
                return  # removed by a reload, or the daemon began stopping, while waiting
            if trigger != "manual" and self._skip(gen, name, loop, state, trigger, slot, log):
                return
            result = await self._execute(gen, name, trigger, slot_text, log)
            if result is not None:
                self._after_run(gen, name, result, log)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("run.crashed")
        finally:
            self.active.pop(name, None)
            if not self.stopping:
                self._on_settled()

    def _skip(
        self,
        gen: Generation,
        name: str,
        loop: LoopConfig,
        state: loopstate.LoopState,
        trigger: str,
        slot: datetime | None,
        log: Any,
    ) -> bool:
        """Pause, failure backoff and active hours gate automatic runs (not `trigger`)."""
        now = datetime.now(UTC)
        slot_text = None if slot is None else utc_iso(slot)
        # A paused loop is skipped here without a runs row: the pause is recorded once, in
        # loop_state with its reason, rather than as one skipped row per slot.
        reason = loopstate.pause_of(state, now)
        allowed = None
        if reason is None and state.consecutive_failures:
            allowed = loopstate.next_allowed_at(
                self.ledger, name, loop.on_failure, state.consecutive_failures
            )
        if reason is not None or (allowed is not None and now < allowed):
            if slot_text is not None:
                loopstate.set_last_slot(self.ledger, name, slot_text)  # handled: no catch-up
            if reason is not None:
                log.info("loop.skipped", reason="paused", detail=reason)
            else:
                log.info("loop.skipped", reason="backoff", until=utc_iso(allowed or now))
            return True
        if not scheduling.is_active(loop, slot or now, gen.config.tz):
            hours = loop.active_hours
            span = f"{hours.start}-{hours.end}" if hours else ""
            run_id = self.ledger.record_skipped_run(
                loop=name,
                trigger=trigger,
                simulated=self.simulate,
                status="skipped_inactive",
                error=f"outside active hours {span} ({gen.config.timezone})",
                slot=slot_text,
            )
            loopstate.record_run(self.ledger, name, run_id, "skipped_inactive", slot_text)
            log.info("run.skipped_inactive", run_id=run_id, active_hours=span)
            return True
        return False

    async def _execute(
        self, gen: Generation, name: str, trigger: str, slot_text: str | None, log: Any
    ) -> RunResult | None:
        """run_loop with the generation's config and executor; None when it did not run."""
        self.active[name] = "running"
        gen.runs += 1
        try:
            return await run_loop(
                gen.config, self.ledger, gen.executor, name, trigger=trigger, slot=slot_text
            )
        except LoopBusy as exc:  # another process (`agentd once`) is running it
            log.info("loop.busy", error=str(exc))
        except LoopPaused as exc:  # paused between our check and the runner's (recorded)
            log.info("loop.skipped", reason="paused", detail=str(exc))
        except (MissingKeyError, ConfigError) as exc:  # a key or handler problem: not a run
            log.error("run.not_started", error=str(exc))
        finally:
            gen.runs -= 1
            if gen.retired and gen.runs == 0 and gen in self._retired:
                self._retired.remove(gen)
                self._close_later(gen)
        return None

    def after_resumed(self, result: RunResult) -> None:
        """What follows a run `agentd.batchresume` finished: backoff or pause, alerts, wake."""
        if result.loop not in self.config.loops:
            self.alerter.after_run(self.ledger, result)  # removed by a reload meanwhile
            return
        self._after_run(self.current, result.loop, result, self._log.bind(loop=result.loop))

    def _after_run(self, gen: Generation, name: str, result: RunResult, log: Any) -> None:
        """Back off or pause a failing loop; alerts; wake the loop named by `on_reply`."""
        self.alerter.after_run(self.ledger, result)
        if result.status == "failed":
            loop = gen.config.loops[name]
            failures = loopstate.get_state(self.ledger, name).consecutive_failures
            reason = loopstate.failure_pause_reason(
                failures, loop.on_failure, [a.error_type for a in result.attempts], result.error
            )
            if reason is not None:
                loopstate.set_paused(self.ledger, name, reason, None)
                log.warning(
                    "loop.paused",
                    reason=reason,
                    consecutive_failures=failures,
                    run_id=result.run_id,
                    note=f"agentd resume {name} clears it",
                )
                self.alerter.loop_paused(name, reason, result.run_id)
            else:
                delay = loopstate.backoff_delay(loop.on_failure, failures)
                log.warning(
                    "loop.backing_off",
                    consecutive_failures=failures,
                    pause_after=loop.on_failure.pause_after,
                    backoff_s=delay,
                    until=utc_iso(datetime.now(UTC) + timedelta(seconds=delay)),
                )
        wake = getattr(result, "wake", None)  # set by the runner when `on_reply` matched
        if isinstance(wake, str) and wake:
            if wake not in self.config.loops:
                log.warning("loop.wake_unknown", wake=wake)
            elif self.spawn(wake, "on_reply", None):
                log.info("loop.wake", wake=wake, run_id=result.run_id)

    # -- stopping -------------------------------------------------------------------------------

    async def drain(self, grace: float, force: asyncio.Event) -> list[str]:
        """Stop starting runs; wait up to `grace` s (or until `force`); cancel what is left.

        Returns the loops whose runs were cancelled (the runner records them `aborted`, the
        executor settles their calls at the reservation).
        """
        self.stopping = True
        # A run waiting on a batch item could wait hours: stop waiting now, and let go of a run
        # that begins waiting later (it was still submitting). The item and the run stay in
        # the ledger and the next start finishes them (`agentd.batchresume`).
        for gen in (self.current, *self._retired):
            gen.executor.batch_waiters.let_go()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        forced = asyncio.ensure_future(force.wait())
        try:
            while True:
                remaining = [t for t in self._tasks if not t.done()]
                left = deadline - loop.time()
                if not remaining or left <= 0 or force.is_set():
                    break
                await asyncio.wait(
                    [*remaining, forced],
                    timeout=left,
                    return_when=asyncio.FIRST_COMPLETED,
                )
        finally:
            forced.cancel()
        remaining = [t for t in self._tasks if not t.done()]
        cancelled = self.in_flight()
        if not remaining:
            return []
        self._log.warning("daemon.aborting_runs", loops=cancelled, grace_s=grace)
        for task in remaining:
            task.cancel()
        await asyncio.wait(remaining, timeout=_CANCEL_WAIT_S)
        return cancelled
