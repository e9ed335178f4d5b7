"""`agentd route`: the strategy, tier, models and worst-case cost a task would get, and why.

What TEXT is. Without `--loop` it is the whole prompt. With `--loop` it is what the loop would
work on, and the input is estimated as a run of the loop would build it, its `system` prompt
included: for a prompt loop, the loop's template filled as a run fills it, with TEXT as the
text of its first context source (else of its precheck's output, else appended as context);
for a handler loop, the prompt of one `ctx.complete()` that names no tier or model. The size
estimate, the rules decision, the classifier's input and the worst cases all use that input.

The budget. With `--loop` the loop's windows (and the global ones) are read as `agentd budget`
reads them, and each call walks the plans a run would (`agentd.routebudget`): the tier it
would run on now (downgraded, with `when_over_budget: downgrade`), or that it would be skipped
or the loop paused, and for a cascade whether the review and the escalation would still fit.

`static` and `rules` are explained without any model call. `cascade` is explained as the calls
it may make (the escalation only if the review scores low). `classify` cannot be explained
without its classifier: that call is made for real — one ledger run of the loop (trigger
`manual`, route `explain: true`, no reply, so it never becomes the loop's "last reply") with
one `classify` call under the loop's budget — or, with `simulate`, by the simulated model.

Without a loop, the task is explained as `static` on the `balanced` tier (else the first
tier) with max_tokens 1024 and no budget: the middle tier is where unclassified work goes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from agentd import pricing, routeprompts, routing
from agentd.config import Config
from agentd.errors import EXIT_USAGE, AgentdError
from agentd.executor import Executor, RunTrace
from agentd.ledger import Ledger
from agentd.logs import bind_contextvars, unbind_contextvars
from agentd.loopconfig import LABELS
from agentd.routeplan import (
    BudgetView,
    CallSpec,
    PlannedCall,
    WindowView,
    budget_reasons,
    call_names,
    loop_input,
    loop_windows,
    planned_call,
    read_only_ledger,
    window_statuses,
)
from agentd.runcalls import RunCalls

DEFAULT_TIER = "balanced"
DEFAULT_MAX_TOKENS = 1024


class RouteUsageError(AgentdError):
    """`agentd route` was asked about something the config does not define."""

    exit_code = EXIT_USAGE


@dataclass(frozen=True)
class RouteExplanation:
    """What a task would get under a loop's route, and why."""

    loop: str | None
    strategy: str
    tier: str | None  # of the answering call, after the budget
    chain: tuple[str, ...]
    estimated_input_tokens: int  # the answering call's prompt and system, UTF-8 bytes / 4
    calls: tuple[PlannedCall, ...]
    worst_case_micro_usd: int | None  # every call above, the conditional ones included
    reasons: tuple[str, ...]
    label: str | None = None
    classifier_reply: str | None = None
    model_called: bool = False  # a model was called to explain (classify)
    simulated: bool = False
    run_id: int | None = None
    spent_micro_usd: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # strategy details (kind, threshold…)
    requested_tier: str | None = None  # what the route asks for, before the budget
    input: str = "TEXT is the whole prompt"  # how TEXT became the estimated input
    # no_budget | fits | downgraded | skipped | paused | refused (a handler's call) |
    # no_model_fits: what the budget makes of the run's answering call now
    budget: str = "no_budget"
    when_over_budget: str | None = None
    windows: tuple[WindowView, ...] = ()


async def explain_route(
    config: Config, state_dir: Path, text: str, *, loop: str | None, simulate: bool
) -> RouteExplanation:
    """Explain which strategy, tier, models and worst-case cost the task `text` would get.

    Only `classify` calls a model (a real ledger row under the loop's budget, or simulated);
    otherwise the ledger is only read. Raises RouteUsageError for an undefined loop,
    MissingKeyError for a missing key.
    """
    if loop is None:
        return _default(config, text)
    if loop not in config.loops:
        known = ", ".join(sorted(config.loops))
        raise RouteUsageError(f"no loop named {loop!r} (loops: {known})")
    lc = config.loops[loop]
    prompt, how = loop_input(config, loop, text)
    if lc.route == "classify":
        return await _classify(config, state_dir, loop, prompt, how, simulate)
    with read_only_ledger(state_dir) as ledger:
        view = BudgetView(config, loop, window_statuses(config, ledger, loop, simulate))
        return _explain_offline(config, view, loop, prompt, how)


def _explain_offline(
    config: Config, view: BudgetView, loop: str, prompt: str, how: str
) -> RouteExplanation:
    """static, rules and cascade: no model call, the budget read once."""
    lc = config.loops[loop]
    tokens = routing.estimate_tokens(prompt) + routing.estimate_tokens(lc.system)
    reasons = _handler_note(config, loop)
    if lc.route == "rules":
        assert lc.kind is not None
        short = lc.routing.short_input_tokens
        tier, why = routing.rules_tier(lc.kind, lc.stakes, lc.latency, tokens, short)
        reasons.extend(why)
        spec = CallSpec("work", tier, prompt, lc.system, lc.max_tokens, reason="chosen by rules")
        work, _ = planned_call(config, view, spec)
        extra = {"kind": lc.kind, "stakes": lc.stakes, "latency": lc.latency}
        return _explained(config, view, loop, "rules", tokens, (work,), reasons, how, extra=extra)
    if lc.route == "cascade":
        return _cascade(config, view, loop, prompt, tokens, reasons, how)
    work, _ = planned_call(config, view, CallSpec("work", None, prompt, lc.system, lc.max_tokens))
    reasons.append(f"route: static uses the loop's {routing.own_target(lc)}")
    return _explained(config, view, loop, "static", tokens, (work,), reasons, how)


def _handler_note(config: Config, loop: str) -> list[str]:
    if config.loops[loop].handler is None:
        return []
    return [
        f"loop {loop} is a handler: this is what its ctx.complete() gets when the call names "
        "no tier or model"
    ]


def _default(config: Config, text: str) -> RouteExplanation:
    """No loop given: static on the balanced tier (else the first one), no budget."""
    if not config.tiers:
        raise RouteUsageError("the config defines no tiers: pass --loop LOOP")
    tier = DEFAULT_TIER if DEFAULT_TIER in config.tiers else next(iter(config.tiers))
    entries = tuple(config.tier_chain(tier))
    tokens = routing.estimate_tokens(text)
    fitting, skipped = routing.context_skips(config, entries, tokens, DEFAULT_MAX_TOKENS)
    cost = (
        config.worst_case_micro_usd(fitting[0].alias, None, [text], DEFAULT_MAX_TOKENS)
        if fitting
        else None
    )
    work = PlannedCall(
        purpose="work",
        tier=tier,
        chain=call_names(fitting),
        max_tokens=DEFAULT_MAX_TOKENS,
        worst_case_micro_usd=cost,
        skipped=tuple(skipped),
        requested_tier=tier,
        budget="no_budget",
        plan="default route",
    )
    reasons = [
        f"no --loop: the default route, static on tier {tier} with max_tokens "
        f"{DEFAULT_MAX_TOKENS} and no budget; pass --loop LOOP to explain a loop's own route"
    ]
    return _assemble(None, "static", tokens, (work,), reasons, "TEXT is the whole prompt")


def _cascade(
    config: Config,
    view: BudgetView,
    loop: str,
    prompt: str,
    tokens: int,
    reasons: list[str],
    how: str,
) -> RouteExplanation:
    """Draft, review and (maybe) escalation; the draft's size is bounded by max_tokens."""
    lc = config.loops[loop]
    settings = lc.routing
    draft, draft_fit = planned_call(
        config, view, CallSpec("draft", None, prompt, lc.system, lc.max_tokens)
    )
    # The draft is not written yet: count it as max_tokens of input to the later calls, and
    # count the earlier calls at their worst case against what the windows have left.
    spent = (draft_fit.reservation_micro_usd or 0) if draft_fit.fits else 0
    review_text = routing.reviewer_prompt(config, loop, prompt, "")
    review_spec = CallSpec(
        "review",
        settings.review_tier,
        review_text,
        "",
        settings.review_max_tokens,
        extra_input=lc.max_tokens,
        reason="reviewer",
    )
    review, review_fit = planned_call(config, view, review_spec, spent)
    spent += (review_fit.reservation_micro_usd or 0) if review_fit.fits else 0
    escalation = routing.route_template(config, loop, "escalation_prompt")
    escalate_text = routeprompts.fill(escalation, task=prompt, draft="", score="0.00")
    condition = f"only if the review scores below {settings.threshold:g} or gives no score"
    escalate_spec = CallSpec(
        "escalate",
        settings.escalate_tier,
        escalate_text,
        lc.system,
        lc.max_tokens,
        extra_input=lc.max_tokens,
        when=condition,
        reason="escalation",
        downgrade=False,  # as in a run: only the escalation tier at full size, or the draft
    )
    escalate, _ = planned_call(config, view, escalate_spec, spent)
    reasons.extend(
        [
            f"route: cascade drafts on the loop's {routing.own_target(lc)}",
            f"tier {settings.review_tier} scores the draft from 0.0 to 1.0",
            f"below {settings.threshold:g} (or without a score) tier {settings.escalate_tier} "
            "writes an improved answer from the task and the draft; if that does not fit the "
            "budget, the draft is the reply",
        ]
    )
    extra = {"threshold": settings.threshold}
    calls = (draft, review, escalate)
    return _explained(config, view, loop, "cascade", tokens, calls, reasons, how, extra=extra)


async def _classify(
    config: Config, state_dir: Path, loop: str, prompt: str, how: str, simulate: bool
) -> RouteExplanation:
    """Make the classifier call for real (or simulated) in a run of its own, then plan."""
    lc = config.loops[loop]
    tokens = routing.estimate_tokens(prompt) + routing.estimate_tokens(lc.system)
    reasons = _handler_note(config, loop)
    text = routing.classifier_prompt(config, loop, prompt)
    settings = lc.routing
    spec = CallSpec(
        "classify", settings.classifier_tier, text, "", settings.classify_max_tokens,
        reason="classifier",
    )  # fmt: skip
    with Ledger.open(state_dir) as ledger:
        executor = Executor(config, ledger, simulate=simulate)
        try:
            executor.provider_for(config.tier_chain(settings.classifier_tier)[0])
            before = BudgetView(config, loop, window_statuses(config, ledger, loop, simulate))
            classifier, _ = planned_call(config, before, spec)
            run_id = ledger.start_run(loop=loop, trigger="manual", simulated=simulate)
            bind_contextvars(loop=loop, run_id=run_id)
            trace = RunTrace(run_id=run_id, loop=loop, simulated=simulate)
            route: dict[str, Any] = {"strategy": "classify", "explain": True}
            calls = RunCalls(config, executor, loop, trace, loop_windows(config, loop), route)
            status = "failed"
            try:
                tier = await routing.classify(calls, prompt, route)
                outcome = route.get("classify", "")
                status = outcome if outcome in ("skipped_budget", "failed") else "ok"
            finally:
                route["skipped"] = trace.skipped
                ledger.finish_run(run_id, status=status, route=route, error=None)
                unbind_contextvars("loop", "run_id")
            # The work call fits what the windows have left after the classifier's real cost.
            view = BudgetView(config, loop, window_statuses(config, ledger, loop, simulate))
            reason = "no usable label" if tier is None else f"label {route['label']}"
            work_spec = CallSpec("work", tier, prompt, lc.system, lc.max_tokens, reason=reason)
            work, _ = planned_call(config, view, work_spec)
        finally:
            await executor.aclose()
    step = (route.get("steps") or [{}])[0]
    classifier = replace(classifier, cost_micro_usd=trace.cost_micro_usd)
    who = "the simulated model" if simulate else f"model {step.get('model') or '?'}"
    reasons.append(
        f"the classifier was called to explain this ({who}, run {run_id}, labels: "
        f"{', '.join(LABELS)})"
    )
    reasons.extend(route["reasons"])
    return _explained(
        config,
        view,
        loop,
        "classify",
        tokens,
        (classifier, work),
        reasons,
        how,
        label=route.get("label"),
        classifier_reply=route.get("classifier_reply"),
        model_called=True,
        simulated=simulate,
        run_id=run_id,
        spent_micro_usd=trace.cost_micro_usd,
    )


def _explained(
    config: Config,
    view: BudgetView,
    loop: str,
    strategy: str,
    tokens: int,
    calls: tuple[PlannedCall, ...],
    reasons: list[str],
    how: str,
    **more: Any,
) -> RouteExplanation:
    """A loop's explanation: the reasons the budget adds, then the common assembly."""
    lc = config.loops[loop]
    handler = lc.handler is not None
    answering = _answering(strategy, calls)
    outcome = answering.budget
    if outcome == "over_budget":
        outcome = (
            "refused" if handler else "paused" if lc.when_over_budget == "pause" else "skipped"
        )
    if not view.budgeted:
        reasons.append(f"budget: no window applies to loop {loop}")
    for call in calls:
        reasons.extend(budget_reasons(lc.when_over_budget, handler, answering, call))
    more.update(
        budget=outcome,
        when_over_budget=lc.when_over_budget,
        windows=view.views(),
        requested_tier=answering.requested_tier,
    )
    return _assemble(loop, strategy, tokens, calls, reasons, how, **more)


def _answering(strategy: str, calls: tuple[PlannedCall, ...]) -> PlannedCall:
    """The call a run cannot do without: the draft of a cascade, else the last (work) call."""
    return calls[0] if strategy == "cascade" else calls[-1]


def _assemble(
    loop: str | None,
    strategy: str,
    tokens: int,
    calls: tuple[PlannedCall, ...],
    reasons: list[str],
    how: str,
    **more: Any,
) -> RouteExplanation:
    """The answering call's chain, the total worst case, the context-window reasons."""
    answering = _answering(strategy, calls)
    costs = [c.worst_case_micro_usd for c in calls]
    total = None if any(c is None for c in costs) else sum(c for c in costs if c is not None)
    for call in calls:
        for skip in call.skipped:
            reasons.append(f"{call.purpose}: {skip['alias']} skipped: {skip['reason']}")
        if not call.chain:
            reasons.append(f"{call.purpose}: no model's context window holds this call")
    more.setdefault("requested_tier", answering.requested_tier)
    return RouteExplanation(
        loop=loop,
        strategy=strategy,
        tier=answering.tier,
        chain=answering.chain,
        estimated_input_tokens=tokens,
        calls=calls,
        worst_case_micro_usd=total,
        reasons=tuple(reasons),
        input=how,
        **more,
    )


def _usd(micro: int | None) -> str | None:
    return None if micro is None else pricing.format_usd(micro)


def _worst(call: PlannedCall) -> str:
    if not call.chain:
        return "none: no model's context window holds it"
    cost = _usd(call.worst_case_micro_usd)
    return f"${cost}" if cost is not None else "unpriced"


def format_explanation(expl: RouteExplanation, as_json: bool) -> str:
    """The explanation as readable text, or as JSON with money as decimal strings."""
    if as_json:
        data = asdict(expl)
        data["worst_case_usd"] = _usd(data.pop("worst_case_micro_usd"))
        data["spent_usd"] = pricing.format_usd(data.pop("spent_micro_usd"))
        for call in data["calls"]:
            call["worst_case_usd"] = _usd(call.pop("worst_case_micro_usd"))
            call["cost_usd"] = _usd(call.pop("cost_micro_usd"))
        for window in data["windows"]:
            window["limit_usd"] = pricing.format_usd(window.pop("limit_micro_usd"))
            window["remaining_usd"] = pricing.format_usd(window.pop("remaining_micro_usd"))
        data.update(data.pop("extra"))
        return json.dumps(data, indent=2)
    where = f"loop {expl.loop}" if expl.loop else "no loop (default route)"
    tier = expl.tier or "-"
    if expl.requested_tier not in (None, expl.tier):
        tier += f" (the route asks for {expl.requested_tier})"
    lines = [
        f"{where}: route {expl.strategy}, tier {tier}",
        f"input: ~{expl.estimated_input_tokens} tokens (UTF-8 bytes / 4): {expl.input}",
        "chain: " + (" -> ".join(expl.chain) or "none fits"),
    ]
    if expl.windows:
        left = ", ".join(
            f"{w.window} ${pricing.format_usd(w.remaining_micro_usd)} left of "
            f"${pricing.format_usd(w.limit_micro_usd)}"
            for w in expl.windows
        )
        lines.append(f"budget: {expl.budget} (when_over_budget: {expl.when_over_budget}); {left}")
    if expl.label is not None or expl.model_called:
        reply = expl.classifier_reply
        shown = "no reply" if reply is None else repr(reply)
        lines.append(
            f"classifier: {expl.label or 'no usable label'} ({shown}); "
            f"{'simulated, ' if expl.simulated else ''}cost ${_usd(expl.spent_micro_usd)} "
            f"(run {expl.run_id})"
        )
    lines.append("calls:")
    for call in expl.calls:
        text = (
            f"  {call.purpose:<9} tier {call.tier or '-'}: {' -> '.join(call.chain) or 'none'}"
            f", max_tokens {call.max_tokens}, worst case {_worst(call)}"
        )
        if call.budget in ("downgraded", "over_budget"):
            text += f" [{call.budget.replace('_', ' ')}: {call.plan}]"
        if call.cost_micro_usd is not None:
            text += f", spent ${_usd(call.cost_micro_usd)}"
        if call.when:
            text += f" ({call.when})"
        lines.append(text)
    unfit = [c.purpose for c in expl.calls if not c.chain]
    total = _usd(expl.worst_case_micro_usd)
    if unfit:
        lines.append(
            f"worst case: none: no model's context window holds the {', '.join(unfit)} call"
        )
    else:
        lines.append(f"worst case: ${total}" if total is not None else "worst case: unpriced")
    lines.append("why:")
    lines.extend(f"  - {reason}" for reason in expl.reasons)
    return "\n".join(lines)
