"""One run of a loop: build the prompt, pick the plan, execute within budget, record the run."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from agentd import budgets, loopstate
from agentd.budgets import BudgetWindowExceeded
from agentd.config import ChainEntry, Config
from agentd.errors import (
    EXIT_FAILED,
    EXIT_NOT_NOW,
    EXIT_OK,
    AgentdError,
    BudgetExceeded,
    LoopPaused,
)
from agentd.executor import Attempt, Executor, RunTrace
from agentd.ledger import Ledger
from agentd.logs import get_logger
from agentd.looplock import loop_lock
from agentd.providers.base import Message

_PLACEHOLDER = re.compile(r"\{(now|loop)\}")


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

    @property
    def exit_code(self) -> int:
        """The CLI exit code for this outcome (design: 0 ok, 1 failed, 75 not run now)."""
        if self.status in ("ok", "skipped_noop", "skipped_inactive"):
            return EXIT_OK
        if self.status in ("skipped_budget", "skipped_paused"):
            return EXIT_NOT_NOW
        return EXIT_FAILED


@dataclass(frozen=True)
class Plan:
    """One way to make the run's call: which tier's chain and how many output tokens."""

    tier: str | None
    chain: tuple[ChainEntry, ...]
    max_tokens: int
    reason: str


def render_prompt(template: str, *, loop: str, now: datetime) -> str:
    """Fill `{now}` and `{loop}`; any other braces stay as written (prompts often hold JSON)."""
    values = {"now": now.isoformat(timespec="seconds"), "loop": loop}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def plans_for(config: Config, executor: Executor, loop_name: str, prompt: str) -> list[Plan]:
    """The loop's own plan, then, with `when_over_budget: downgrade`, cheaper ones to fall to."""
    loop = config.loops[loop_name]
    own_chain = tuple(config.chain(loop_name))
    own = Plan(loop.tier or own_chain[0].tier, own_chain, loop.max_tokens, "configured")
    if loop.when_over_budget != "downgrade":
        return [own]
    messages = [Message("user", prompt)]

    def primary_cost(chain: tuple[ChainEntry, ...], max_tokens: int) -> int:
        amount = executor.reservation_micro_usd(chain[0], loop.system, messages, max_tokens)
        return amount if amount is not None else 0

    own_cost = primary_cost(own_chain, loop.max_tokens)
    cheaper: list[tuple[int, Plan]] = []
    for tier in config.tiers:
        if tier == own.tier:
            continue
        chain = tuple(config.tier_chain(tier))
        cost = primary_cost(chain, loop.max_tokens)
        if cost < own_cost:
            cheaper.append((cost, Plan(tier, chain, loop.max_tokens, f"downgraded to {tier}")))
    # Dearest cheaper tier first: give up as little quality as the budget allows.
    cheaper.sort(key=lambda item: -item[0])
    plans = [own, *(plan for _, plan in cheaper)]
    if loop.min_tokens is not None:
        last = plans[-1]
        tokens = loop.max_tokens // 2
        while tokens > loop.min_tokens:
            plans.append(Plan(last.tier, last.chain, tokens, f"max_tokens reduced to {tokens}"))
            tokens //= 2
        if loop.min_tokens < loop.max_tokens:
            plans.append(
                Plan(
                    last.tier,
                    last.chain,
                    loop.min_tokens,
                    f"max_tokens reduced to {loop.min_tokens}",
                )
            )
    return plans


async def run_loop(
    config: Config,
    ledger: Ledger,
    executor: Executor,
    loop_name: str,
    *,
    trigger: str = "manual",
    slot: str | None = None,
    now: datetime | None = None,
) -> RunResult:
    """Run a loop once now and record it (errors become a failed run).

    Raises LoopBusy when the loop is already running anywhere, LoopPaused when it is paused,
    and MissingKeyError when its primary model's key is missing.
    """
    with loop_lock(ledger.path.parent, loop_name):
        result = await _run_locked(
            config, ledger, executor, loop_name, trigger=trigger, slot=slot, now=now
        )
    loopstate.record_run(ledger, loop_name, result.run_id, result.status, slot)
    return result


async def _run_locked(
    config: Config,
    ledger: Ledger,
    executor: Executor,
    loop_name: str,
    *,
    trigger: str,
    slot: str | None,
    now: datetime | None,
) -> RunResult:
    """The run itself, with the loop's lock held."""
    loop = config.loops[loop_name]
    simulated = executor.simulate
    now = now or datetime.now(tz=UTC)
    paused = loopstate.paused_reason(ledger, loop_name, now)
    if paused is not None:
        run_id = ledger.record_skipped_run(
            loop=loop_name,
            trigger=trigger,
            simulated=simulated,
            status="skipped_paused",
            error=paused,
            slot=slot,
        )
        raise LoopPaused(f"loop {loop_name!r} is paused: {paused} (run {run_id})")

    prompt = render_prompt(config.prompt_path(loop_name).read_text(), loop=loop_name, now=now)
    plans = plans_for(config, executor, loop_name, prompt)
    # A missing key on the primary model is a configuration error: fail before recording a run.
    executor.provider_for(plans[0].chain[0])
    windows = budgets.windows_for(
        loop_name,
        loop.budget.limits() if loop.budget else None,
        config.budgets.limits() if config.budgets else None,
    )
    run_id = ledger.start_run(loop=loop_name, trigger=trigger, simulated=simulated, slot=slot)
    structlog.contextvars.bind_contextvars(loop=loop_name, run_id=run_id)
    trace = RunTrace(run_id=run_id, loop=loop_name, simulated=simulated)
    route: dict[str, Any] = {"strategy": loop.route, "requested_tier": plans[0].tier}
    try:
        return await _execute(
            config, ledger, executor, loop_name, trace, plans, prompt, windows, route, now
        )
    except asyncio.CancelledError:
        ledger.finish_run(run_id, status="aborted", route=route, error="cancelled")
        raise
    finally:
        structlog.contextvars.unbind_contextvars("loop", "run_id")


async def _execute(
    config: Config,
    ledger: Ledger,
    executor: Executor,
    loop_name: str,
    trace: RunTrace,
    plans: list[Plan],
    prompt: str,
    windows: list[budgets.Window],
    route: dict[str, Any],
    now: datetime,
) -> RunResult:
    """Try the plans in order until one gets a reply; record the run's end either way."""
    loop = config.loops[loop_name]
    refusals: list[str] = []
    last_refusal: BudgetExceeded | None = None
    messages = (Message("user", prompt),)
    for plan in plans:
        route.update(tier=plan.tier, max_tokens=plan.max_tokens, reason=plan.reason)
        try:
            outcome = await executor.call(
                trace,
                purpose="work",
                chain=plan.chain,
                system=loop.system,
                messages=messages,
                max_tokens=plan.max_tokens,
                windows=windows,
            )
        except BudgetExceeded as exc:
            refusals.append(f"{plan.reason}: {exc}")
            last_refusal = exc
            continue
        except AgentdError as exc:
            return _finish(
                ledger,
                trace,
                route,
                refusals,
                status="failed",
                error=str(exc),
                log_event="run.failed",
            )
        route["model"] = outcome.entry.alias
        return _finish(
            ledger,
            trace,
            route,
            refusals,
            status="ok",
            outcome_entry=outcome.entry,
            reply=outcome.reply.text,
            fallback=outcome.fallback,
            log_event="run.finished",
        )
    error = " | ".join(refusals)
    if loop.when_over_budget == "pause":
        # Paused until the refusing window resets, so the schedule doesn't burn skipped runs.
        until = last_refusal.resets_at if isinstance(last_refusal, BudgetWindowExceeded) else None
        loopstate.set_paused(ledger, loop_name, "over budget", until)
        error += f" (loop paused until {until.isoformat() if until else 'resumed'})"
    return _finish(
        ledger,
        trace,
        route,
        refusals,
        status="skipped_budget",
        error=error,
        log_event="run.skipped_budget",
    )


def _finish(
    ledger: Ledger,
    trace: RunTrace,
    route: dict[str, Any],
    refusals: list[str],
    *,
    status: str,
    log_event: str,
    error: str | None = None,
    reply: str | None = None,
    fallback: bool = False,
    outcome_entry: ChainEntry | None = None,
) -> RunResult:
    """Write the run's final row and build its result."""
    route["skipped"] = trace.skipped
    if refusals:
        route["budget_refusals"] = refusals
    model = outcome_entry.model.model if outcome_entry else None
    ledger.finish_run(
        trace.run_id,
        status=status,
        route=route,
        model=model,
        fallback=fallback,
        reply=reply,
        error=error,
    )
    row = ledger.get_run(trace.run_id) or {}
    cost = int(row.get("cost_micro_usd") or 0)
    get_logger().info(
        log_event,
        loop=trace.loop,
        run_id=trace.run_id,
        status=status,
        model=model,
        cost_micro_usd=cost,
        attempts=len(trace.attempts),
        error=error,
    )
    return RunResult(
        run_id=trace.run_id,
        loop=trace.loop,
        status=status,
        simulated=trace.simulated,
        tier=outcome_entry.tier if outcome_entry else route.get("tier"),
        alias=outcome_entry.alias if outcome_entry else None,
        provider=outcome_entry.provider_name if outcome_entry else None,
        model=model,
        reply=reply,
        cost_micro_usd=cost,
        fallback=fallback,
        error=error,
        route=dict(route),
        attempts=tuple(trace.attempts),
    )


async def run_once(
    config: Config, state_dir: Path, loop_name: str, *, simulate: bool = False
) -> RunResult:
    """`agentd once`: open the ledger, run the loop one time, close everything."""
    # Opening the ledger for writing reconciles rows left pending by dead processes.
    with Ledger.open(state_dir) as ledger:
        executor = Executor(config, ledger, simulate=simulate)
        try:
            return await run_loop(config, ledger, executor, loop_name, trigger="manual")
        finally:
            await executor.aclose()
