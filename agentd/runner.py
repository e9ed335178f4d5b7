"""One run of a loop: gather context, fill the prompt, plan, execute within budget, deliver."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agentd import budgets, caching, loopstate, precheck
from agentd.batches import BatchDetached, BatchMode, submitted_batch_calls
from agentd.budgets import BudgetWindowExceeded
from agentd.config import Config
from agentd.context import (
    gather_sources,
    last_ok_reply,
    merge_sources,
    render_template,
    stable_prefix,
)
from agentd.errors import (
    AgentdError,
    BudgetExceeded,
    LoopPaused,
    RunFailed,
)
from agentd.executor import CallOutcome, Executor, RunTrace
from agentd.handlers import Handler, LoopContext, load_handler
from agentd.ledger import Ledger
from agentd.logs import bind_contextvars, get_logger, unbind_contextvars
from agentd.looplock import loop_lock
from agentd.routing import route_call, tiers_used
from agentd.runcalls import RunCalls
from agentd.runend import Done, RunResult, after_run, conclude, finish

# Kept under its old name: the template is filled by `agentd.context`.
render_prompt = render_template


async def run_loop(
    config: Config,
    ledger: Ledger,
    executor: Executor,
    loop_name: str,
    *,
    trigger: str = "manual",
    slot: str | None = None,
    now: datetime | None = None,
    wait: bool = True,
) -> RunResult:
    """Run a loop once now and record it (errors become a failed run).

    `wait=False` (`agentd once --no-wait`): a batch loop returns once its call is submitted,
    with status `submitted`; the daemon finishes the run.

    Raises LoopBusy when the loop is already running anywhere, LoopPaused when it is paused,
    MissingKeyError when its primary model's key is missing, and ConfigError when its handler
    cannot be loaded.
    """
    with loop_lock(ledger.path.parent, loop_name):
        result = await _run_locked(
            config, ledger, executor, loop_name, trigger=trigger, slot=slot, now=now, wait=wait
        )
    return after_run(config, ledger, result, slot)


async def _run_locked(
    config: Config,
    ledger: Ledger,
    executor: Executor,
    loop_name: str,
    *,
    trigger: str,
    slot: str | None,
    now: datetime | None,
    wait: bool = True,
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

    # Configuration problems (a bad handler, a missing key on the primary model) fail before a
    # run is recorded and before any context command runs.
    handler = load_handler(config, loop_name) if loop.handler is not None else None
    executor.provider_for(config.chain(loop_name)[0])
    for tier in {tier for _, tier, _ in tiers_used(loop)}:
        executor.provider_for(config.tier_chain(tier)[0])  # the route's primaries need keys too
    # Step 0: a tick with nothing to do costs nothing (no context commands, no model call).
    check = await precheck.run_precheck(config, loop_name)
    if check.decision != "work":
        return _record_precheck(ledger, loop_name, trigger, slot, simulated, check)
    last_reply = last_ok_reply(ledger, loop_name, simulated=simulated)
    # Context first: its text is part of the prompt, so the reservation counts it.
    sources = await gather_sources(config, loop_name, last_reply=last_reply)
    if check.source is not None:
        sources.append(check.source)
    prompt = None
    prefix = ""
    if loop.prompt is not None:
        template = config.prompt_path(loop_name).read_text()
        if check.source is None and loop.precheck is not None:
            # A precheck that printed nothing leaves an empty {precheck}, not the literal.
            template = template.replace("{" + precheck.PRECHECK_PLACEHOLDER + "}", "")
        prompt = render_prompt(template, loop=loop_name, now=now, tz=config.tz, sources=sources)
        prefix = stable_prefix(template, loop=loop_name, sources=sources)
    windows = budgets.windows_for(
        loop_name,
        loop.budget.limits() if loop.budget else None,
        config.budgets.limits() if config.budgets else None,
    )
    # Decided before the run row exists, so nothing here can leave a run unfinished.
    cache = caching.decide_for_run(config, loop_name, prefix, now)
    run_id = ledger.start_run(loop=loop_name, trigger=trigger, simulated=simulated, slot=slot)
    bind_contextvars(loop=loop_name, run_id=run_id)
    trace = RunTrace(run_id=run_id, loop=loop_name, simulated=simulated)
    route: dict[str, Any] = {"strategy": loop.route, **check.route}
    if handler is not None:
        # A handler's calls that name no tier or model follow `route:` (see RunCalls.complete).
        route = {"strategy": "handler", "handler": loop.handler, **check.route}
        if loop.route != "static":
            route["route"] = loop.route
    calls = RunCalls(config, executor, loop_name, trace, windows, route, router=route_call)
    calls.cache = cache
    calls.batch = BatchMode.for_loop(config, loop_name, wait=wait)
    trace.route = route
    route["cache"] = cache.route()
    get_logger().info("cache.decision", loop=loop_name, run_id=run_id, **route["cache"])
    done: Done | None = None
    try:
        if handler is not None:
            context = LoopContext(
                loop=loop_name,
                config=config,
                now=now,
                prompt=prompt,
                context=merge_sources(sources),
                last_reply=last_reply,
                log=get_logger(loop=loop_name, run_id=run_id, handler=loop.handler),
                run_id=run_id,
                simulated=simulated,
                completer=calls,
            )
            done = await _run_handler(handler, context, calls, ledger)
        else:
            assert prompt is not None
            done = await _run_prompt(calls, ledger, prompt)
        if calls.limit_reached is not None:
            # A ceiling stopped the run: failed, whatever the handler made of the exception.
            route["limit_reached"] = calls.limit_reached
            done = Done("failed", "run.limit_reached", error=calls.limit_reached)
        return await conclude(
            config, ledger, trace, route, calls.refusals, done, refused=calls.window_refusals
        )
    except BatchDetached as exc:
        # `agentd once --no-wait`: the run goes on at the provider; the daemon finishes it.
        get_logger().info(
            "run.batch_detached", loop=loop_name, run_id=run_id, batch_id=exc.batch_id
        )
        return RunResult(
            run_id=run_id,
            loop=loop_name,
            status="submitted",
            simulated=simulated,
            route=dict(route),
            attempts=tuple(trace.attempts),
            batch_ids=tuple(trace.batch_ids),
        )
    except BaseException as exc:
        if done is not None and done.status == "ok":
            # The reply is paid for: record it even when its delivery was cut short.
            route["deliveries_interrupted"] = type(exc).__name__
            finish(ledger, trace, route, calls.refusals, done, route.get("wake"))
        elif submitted_batch_calls(ledger, run_id):
            # Stopped while a batch item is out: the run stays `running` and the next daemon
            # start picks the result up (`agentd.batchresume`); nothing is lost or charged twice.
            get_logger().info("run.batch_left_running", loop=loop_name, run_id=run_id)
        elif isinstance(exc, Exception):
            ledger.finish_run(run_id, status="failed", route=route, error=repr(exc))
        else:  # cancelled (daemon shutdown) or interrupted
            ledger.finish_run(run_id, status="aborted", route=route, error="cancelled")
        raise
    finally:
        unbind_contextvars("loop", "run_id")


async def _run_prompt(calls: RunCalls, ledger: Ledger, prompt: str) -> Done:
    """A prompt loop: the `work` call along the loop's route, on the first plan that fits."""
    loop = calls.config.loops[calls.loop_name]
    try:
        outcome = await route_call(
            calls, prompt, purpose="work", system=loop.system, max_tokens=None, record=calls.route
        )
    except BudgetExceeded as exc:
        return _over_budget(calls, ledger, str(exc))
    except BatchDetached:
        raise
    except AgentdError as exc:
        return Done("failed", "run.failed", error=str(exc))
    return Done(
        "ok",
        "run.finished",
        reply=outcome.reply.text,
        fallback=outcome.fallback,
        entry=outcome.entry,
    )


async def _run_handler(
    handler: Handler, context: LoopContext, calls: RunCalls, ledger: Ledger
) -> Done:
    """A Python loop: the handler's return value is the reply; its calls are already recorded."""
    try:
        reply = await handler(context)
    except BudgetExceeded as exc:
        if not calls.outcomes:
            return _over_budget(calls, ledger, str(exc))
        done = len(calls.outcomes)
        error = f"over budget after {done} successful call(s): {exc}"
        return Done("failed", "run.failed", error=error)
    except Exception as exc:
        context.log.warning("handler.failed", exc_info=True)
        # NoModelFits reads as the RunFailed it is: run errors keep their prefixes.
        name = "RunFailed" if isinstance(exc, RunFailed) else type(exc).__name__
        return Done("failed", "run.failed", error=f"{name}: {exc}")
    if reply is not None and not isinstance(reply, str):
        error = f"handler returned {type(reply).__name__}; expected str or None"
        return Done("failed", "run.failed", error=error)
    answer = _answering_outcome(reply, calls.outcomes, calls.route.get("model"))
    return Done(
        "ok",
        "run.finished",
        reply=reply,
        fallback=any(o.fallback for o in calls.outcomes),
        entry=answer.entry if answer else None,
    )


def _answering_outcome(
    reply: str | None, outcomes: list[CallOutcome], answer_alias: object
) -> CallOutcome | None:
    """The call that produced a handler's reply, whose model is the run's (not just the last).

    1. A reply that is a call's text verbatim came from that call (the latest such): when a
       cascade keeps its draft, the review is the last call but the reply is the draft's.
    2. A reply the handler composed: the answer of its last `complete()`, whose alias
       `RunCalls` keeps in the route's `model` (a routed call's draft or escalation, never
       its review); the latest call of that alias. 3. Else the last call.
    """
    if not outcomes:
        return None
    if reply is not None:
        for outcome in reversed(outcomes):
            if outcome.reply.text == reply:
                return outcome
    for outcome in reversed(outcomes):
        if outcome.entry.alias == answer_alias:
            return outcome
    return outcomes[-1]


def _record_precheck(
    ledger: Ledger,
    loop_name: str,
    trigger: str,
    slot: str | None,
    simulated: bool,
    check: precheck.PrecheckOutcome,
) -> RunResult:
    """A run decided by step 0: `skipped_noop` (nothing to do) or `failed` (precheck broke)."""
    status = "skipped_noop" if check.decision == "noop" else "failed"
    route = dict(check.route)
    run_id = ledger.record_skipped_run(
        loop=loop_name,
        trigger=trigger,
        simulated=simulated,
        status=status,
        route=route,
        error=check.reason,
        slot=slot,
    )
    log = get_logger().info if status == "skipped_noop" else get_logger().warning
    log(
        "run.skipped_noop" if status == "skipped_noop" else "run.failed",
        loop=loop_name,
        run_id=run_id,
        status=status,
        error=check.reason,
    )
    return RunResult(
        run_id=run_id,
        loop=loop_name,
        status=status,
        simulated=simulated,
        error=check.reason,
        route=route,
    )


def _over_budget(calls: RunCalls, ledger: Ledger, error: str) -> Done:
    """No plan fitted: skip the run, and with `when_over_budget: pause` pause the loop."""
    loop = calls.config.loops[calls.loop_name]
    if loop.when_over_budget == "pause":
        # Paused until the refusing window resets, so the schedule doesn't burn skipped runs.
        refusal = calls.last_refusal
        until = refusal.resets_at if isinstance(refusal, BudgetWindowExceeded) else None
        loopstate.set_paused(ledger, calls.loop_name, "over budget", until)
        error += f" (loop paused until {until.isoformat() if until else 'resumed'})"
    return Done("skipped_budget", "run.skipped_budget", error=error)


async def run_once(
    config: Config,
    state_dir: Path,
    loop_name: str,
    *,
    simulate: bool = False,
    wait: bool = True,
) -> RunResult:
    """`agentd once`: open the ledger, run the loop one time, close everything."""
    # Opening the ledger for writing reconciles rows left pending by dead processes.
    with Ledger.open(state_dir) as ledger:
        executor = Executor(config, ledger, simulate=simulate)
        try:
            result = await run_loop(
                config, ledger, executor, loop_name, trigger="manual", wait=wait
            )
        finally:
            await executor.aclose()
        await _alert_once(config, ledger, result)
        return result


async def _alert_once(config: Config, ledger: Ledger, result: RunResult) -> None:
    """`agentd once`: the run's alerts, waited for (bounded by the sinks' timeouts)."""
    if not config.alerts.sinks:
        return
    from agentd.alerts import Alerter

    alerter = Alerter(config, ledger.path.parent)
    alerter.after_run(ledger, result)  # budget levels, a failed chain, an anomaly pause
    wait = max((s.timeout_s for s in config.alerts.sinks), default=0) + 2
    await alerter.drain(wait)
