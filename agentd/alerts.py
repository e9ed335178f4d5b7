"""Alerts: events an operator must not miss, sent as JSON to `alerts.sinks`, rate-limited.

Events (`event` field): `budget_threshold` (a window at 80 % or at 100 % of its limit),
`loop_paused` (failures, billing/auth errors, the anomaly breaker), `chain_failed` (every model
of a run's chain failed). Each has a `key`; the same key is sent at most once per
`alerts.min_interval_s`. A budget key names the window instance (scope, period, start, level),
so each window reaches each level once.

A budget level is sent when the run that just settled crossed it (the window's settled +
reserved spend minus this run's cost was below the level, and is now at or above it), or, for
100 %, when the window refused one of the run's calls: that event says `refused: true` and the
`asked_usd` of the call that did not fit (its `used_pct` may be well below 100). Every budget
event carries `used_pct`, the share of the limit actually spent or reserved. Crossing is judged
per run, so a restart does not send the alerts of the day again; two runs settling at the same
instant may each see the other's cost as "before" and miss a crossing between them. The
"already sent" memory is kept in the process (the daemon's lifetime; one `agentd once`), not
in the ledger.

Sending never blocks or fails a run: each event goes out in its own task with the sink's
timeout; failures are logged (`alert.failed`, webhook URLs redacted). Bodies carry loop
names, figures and agentd's own error texts, never keys or sink URLs.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agentd import budgets
from agentd.config import AlertSink, Config
from agentd.delivery import DeliveryOutcome, post_to_webhook, redact_url, send_to_command
from agentd.ledger import Ledger, now_iso, utc_iso
from agentd.logs import get_logger
from agentd.loopconfig import Delivery
from agentd.pricing import format_usd

if TYPE_CHECKING:
    from agentd.runend import RunResult

LEVELS = (80, 100)
_CHAIN_FAILED = "every model"  # RunFailed ("every model failed") and CircuitOpen ("... cooling")


class Alerter:
    """Sends alert events to the configured sinks; remembers what it sent (rate limit)."""

    def __init__(
        self,
        config: Config,
        state_dir: Path,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.state_dir = state_dir
        self._clock = clock
        self._sent: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._log = get_logger()

    # -- the events ------------------------------------------------------------------------

    def emit(self, event: str, key: str, **fields: Any) -> bool:
        """Queue an event for every sink unless its key was sent within min_interval_s."""
        settings = self.config.alerts
        if not settings.sinks:
            return False
        now = self._clock()
        last = self._sent.get(key)
        if last is not None and now - last < settings.min_interval_s:
            self._log.debug("alert.rate_limited", alert=event, key=key)
            return False
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._log.warning("alert.not_sent", alert=event, key=key, reason="no event loop")
            return False
        self._sent[key] = now
        body = {"event": event, "key": key, "at": now_iso(), **fields}
        for sink in settings.sinks:
            task = loop.create_task(self._send(sink, body))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._log.info("alert.queued", alert=event, key=key, sinks=len(settings.sinks))
        return True

    def loop_paused(self, loop: str, reason: str, run_id: int | None) -> None:
        """A loop was paused (failures, billing/auth, anomaly)."""
        self.emit(
            "loop_paused",
            f"loop_paused:{loop}:{reason}",
            loop=loop,
            run_id=run_id,
            reason=reason,
            note=f"agentd resume {loop} clears it",
        )

    def after_run(
        self, ledger: Ledger, result: RunResult, *, now: datetime | None = None
    ) -> None:
        """After a settled run: budget levels crossed, a failed chain, an anomaly pause."""
        try:
            self._after_run(ledger, result, now or datetime.now(UTC))
        except Exception as exc:  # an alert problem must never become a run problem
            self._log.warning("alert.check_failed", error=str(exc))

    def _after_run(self, ledger: Ledger, result: RunResult, now: datetime) -> None:
        if result.status == "failed" and _CHAIN_FAILED in (result.error or ""):
            self.emit(
                "chain_failed",
                f"chain_failed:{result.loop}",
                loop=result.loop,
                run_id=result.run_id,
                error=result.error,
            )
        if result.paused_reason:
            self.loop_paused(result.loop, result.paused_reason, result.run_id)
        self.budget_levels(ledger, result, now)

    def budget_levels(self, ledger: Ledger, result: RunResult, now: datetime) -> None:
        """Send `budget_threshold` for each of the run's windows that this run took to a level."""
        config = self.config
        loop = config.loops.get(result.loop)
        if loop is None:
            return
        windows = budgets.windows_for(
            result.loop,
            loop.budget.limits() if loop.budget else None,
            config.budgets.limits() if config.budgets else None,
        )
        if not windows:
            return
        # The refusals' own numbers, not their messages: a reworded message cannot hide one.
        refused: tuple[budgets.BudgetWindowExceeded, ...] = result.window_refusals
        for ws in budgets.window_status(ledger, windows, config.tz, now, result.simulated):
            limit = ws.window.limit_micro_usd
            used = ws.spent_micro_usd + ws.reserved_micro_usd
            before = used - int(result.cost_micro_usd or 0)
            # The smallest ask this window refused (the call nearest to fitting), or None.
            asks = [r.asked_micro_usd for r in refused if r.budget_window.label == ws.window.label]
            asked = min(asks) if asks else None
            for level in reversed(LEVELS):
                mark = Decimal(limit) * level / 100
                crossed = before < mark <= used
                if crossed:
                    self._budget_event(result, ws, level, used)
                    break  # the highest level reached is the news
                if level == 100 and asked is not None:
                    self._budget_event(result, ws, level, used, asked=asked)
                    break

    def _budget_event(
        self,
        result: RunResult,
        ws: budgets.WindowStatus,
        level: int,
        used: int,
        *,
        asked: int | None = None,
    ) -> None:
        """One `budget_threshold` event; `asked`: the window refused a call asking that much."""
        window = ws.window
        key = f"budget:{window.scope}:{window.period}:{utc_iso(ws.start)}:{level}"
        used_pct = (Decimal(used) * 100 / window.limit_micro_usd).quantize(Decimal("0.1"))
        fields: dict[str, Any] = {
            "level_pct": level,
            # Reached by spend (refused false) or by a call whose worst case did not fit in
            # what was left (refused true, asked_usd): then used_pct may be far below 100.
            "refused": asked is not None,
            "used_pct": str(used_pct),
        }
        if asked is not None:
            fields["asked_usd"] = format_usd(asked)
            fields["note"] = (
                f"a call asking up to {format_usd(asked)} USD did not fit in the "
                f"{format_usd(max(window.limit_micro_usd - used, 0))} USD left"
            )
        self.emit(
            "budget_threshold",
            key,
            **fields,
            window=window.label,
            scope=window.scope,
            period=window.period,
            limit_usd=format_usd(window.limit_micro_usd),
            used_usd=format_usd(used),
            window_start=utc_iso(ws.start),
            resets_at=utc_iso(ws.end),
            loop=result.loop,
            run_id=result.run_id,
        )

    # -- sending ---------------------------------------------------------------------------

    async def _send(self, sink: AlertSink, body: dict[str, Any]) -> None:
        target = redact_url(sink.webhook) if sink.webhook else (sink.command or ["?"])[0]
        try:
            async with asyncio.timeout(sink.timeout_s + 1):
                if sink.webhook is not None:
                    delivery = Delivery(webhook=sink.webhook, timeout_s=sink.timeout_s)
                    outcome: DeliveryOutcome = await post_to_webhook(delivery, body)
                else:
                    delivery = Delivery(command=sink.command, timeout_s=sink.timeout_s)
                    text = json.dumps(body) + "\n"
                    outcome = await send_to_command(self.config, self.state_dir, delivery, text)
        except Exception as exc:
            self._log.warning("alert.failed", target=target, alert=body["event"], error=str(exc))
            return
        if outcome.ok:
            self._log.info("alert.sent", target=target, alert=body["event"], key=body["key"])
        else:
            self._log.warning(
                "alert.failed", target=target, alert=body["event"], error=outcome.error
            )

    async def drain(self, timeout_s: float | None = None) -> None:
        """Wait for queued sends (each is bounded by its sink's timeout anyway)."""
        tasks = list(self._tasks)
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)
