"""How a run ends: its result, its final row, an ok reply's wake and delivery, loop state."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from agentd import guardrails, loopstate
from agentd.budgets import BudgetWindowExceeded
from agentd.config import ChainEntry, Config
from agentd.delivery import deliver_reply, wake_for
from agentd.errors import EXIT_FAILED, EXIT_NOT_NOW, EXIT_OK
from agentd.executor import Attempt, CallOutcome, RunTrace
from agentd.ledger import Ledger
from agentd.logs import get_logger


@dataclass(frozen=True)
class RunResult:
    """The outcome of one run, as recorded in the ledger."""

    run_id: int
    loop: str
    status: str
    simulated: bool
    tier: str | None = None
    alias: str | None = None
    provider: str | None = None
    model: str | None = None
    reply: str | None = None
    cost_micro_usd: int = 0
    fallback: bool = False
    error: str | None = None
    route: dict[str, Any] = field(default_factory=dict)
    attempts: tuple[Attempt, ...] = ()
    wake: str | None = None  # the loop `on_reply` asks to run next (trigger `on_reply`)
    batch_ids: tuple[str, ...] = ()  # provider batches the run's calls went through
    paused_reason: str | None = None  # set when a guardrail paused the loop after this run
    # The window refusals behind `route["budget_refusals"]` (alerts read their numbers).
    window_refusals: tuple[BudgetWindowExceeded, ...] = ()

    @property
    def exit_code(self) -> int:
        """The CLI exit code for this outcome (design: 0 ok, 1 failed, 75 not run now)."""
        if self.status in ("ok", "skipped_noop", "skipped_inactive", "submitted"):
            return EXIT_OK
        if self.status in ("skipped_budget", "skipped_paused"):
            return EXIT_NOT_NOW
        return EXIT_FAILED


@dataclass(frozen=True)
class Done:
    """How the work part of a run ended, before delivery and the final ledger write."""

    status: str
    log_event: str
    error: str | None = None
    reply: str | None = None
    fallback: bool = False
    entry: ChainEntry | None = None


async def conclude(
    config: Config,
    ledger: Ledger,
    trace: RunTrace,
    route: dict[str, Any],
    refusals: list[str],
    done: Done,
    *,
    refused: Sequence[BudgetWindowExceeded] = (),
) -> RunResult:
    """The end of a run whose work is done: wake, deliver an ok reply, write the final row."""
    wake = None
    if done.status == "ok":
        wake = wake_for(config.loops[trace.loop], done.reply)
        if wake is not None:
            route["wake"] = wake
        model = done.entry.model.model if done.entry else None
        route.update(
            await deliver_reply(
                config,
                trace.loop,
                done.reply,
                state_dir=ledger.path.parent,
                run_id=trace.run_id,
                model=model,
                cost_micro_usd=trace.cost_micro_usd,
            )
        )
    return finish(ledger, trace, route, refusals, done, wake, refused=refused)


async def conclude_resumed(
    config: Config,
    ledger: Ledger,
    trace: RunTrace,
    route: dict[str, Any],
    outcome: CallOutcome | str,
    slot: str | None,
) -> RunResult:
    """Finish a run a restarted daemon resumed (`agentd.batchresume`) as `run_loop` would.

    `outcome` is the call's outcome, or the error that failed the run.
    """
    if isinstance(outcome, str):
        done = Done("failed", "run.failed", error=outcome)
    else:
        route["model"] = outcome.entry.alias
        done = Done(
            "ok",
            "run.finished",
            reply=outcome.reply.text,
            fallback=outcome.fallback,
            entry=outcome.entry,
        )
    result = await conclude(config, ledger, trace, route, [], done)
    return after_run(config, ledger, result, slot)


def after_run(config: Config, ledger: Ledger, result: RunResult, slot: str | None) -> RunResult:
    """Loop state and the anomaly breaker, once a run is over."""
    loopstate.record_run(ledger, result.loop, result.run_id, result.status, slot)
    if result.status == "ok":
        # The anomaly breaker: the run is done and paid for; a pause stops the next ones.
        reason = guardrails.check_anomaly(
            config, ledger, result.loop, result.run_id, simulated=result.simulated
        )
        if reason is not None:
            result = replace(result, paused_reason=reason)
    return result


def finish(
    ledger: Ledger,
    trace: RunTrace,
    route: dict[str, Any],
    refusals: list[str],
    done: Done,
    wake: str | None,
    *,
    refused: Sequence[BudgetWindowExceeded] = (),
) -> RunResult:
    """Write the run's final row and build its result; `refused`: the exceptions behind
    `refusals`."""
    route["skipped"] = trace.skipped
    if refusals:
        route["budget_refusals"] = refusals
    if trace.batch_ids or trace.batch_fallback:
        route["batch"] = {"batch_ids": trace.batch_ids, "fallback": trace.batch_fallback}
    entry = done.entry
    model = entry.model.model if entry else None
    ledger.finish_run(
        trace.run_id,
        status=done.status,
        route=route,
        model=model,
        fallback=done.fallback,
        reply=done.reply,
        error=done.error,
    )
    row = ledger.get_run(trace.run_id) or {}
    cost = int(row.get("cost_micro_usd") or 0)
    get_logger().info(
        done.log_event,
        loop=trace.loop,
        run_id=trace.run_id,
        status=done.status,
        model=model,
        cost_micro_usd=cost,
        attempts=len(trace.attempts),
        error=done.error,
        wake=wake,
    )
    return RunResult(
        run_id=trace.run_id,
        loop=trace.loop,
        status=done.status,
        simulated=trace.simulated,
        tier=entry.tier if entry else route.get("tier"),
        alias=entry.alias if entry else None,
        provider=entry.provider_name if entry else None,
        model=model,
        reply=done.reply,
        cost_micro_usd=cost,
        fallback=done.fallback,
        error=done.error,
        route=dict(route),
        attempts=tuple(trace.attempts),
        wake=wake,
        batch_ids=tuple(trace.batch_ids),
        window_refusals=tuple(refused),
    )
