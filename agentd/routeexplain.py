"""`agentd route`: the strategy, tier, models and worst-case cost a task would get, and why.

`static` and `rules` are explained without any model call. `cascade` is explained as the calls
it may make (the escalation only if the review scores low). `classify` cannot be explained
without its classifier: that call is made for real — one ledger run of the loop (trigger
`manual`, route `explain: true`, no reply, so it never becomes the loop's "last reply") with
one `classify` call under the loop's budget — or, with `simulate`, by the simulated model.

Without a loop, the task is explained as `static` on the `balanced` tier (else the first
tier) with max_tokens 1024: the middle tier is where the design sends unclassified work.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import structlog

from agentd import budgets, pricing, routeprompts, routing
from agentd.config import ChainEntry, Config
from agentd.errors import EXIT_USAGE, AgentdError
from agentd.executor import Executor, RunTrace
from agentd.ledger import Ledger
from agentd.loopconfig import LABELS
from agentd.runcalls import RunCalls, target_chain

DEFAULT_TIER = "balanced"
DEFAULT_MAX_TOKENS = 1024


class RouteUsageError(AgentdError):
    """`agentd route` was asked about something the config does not define."""

    exit_code = EXIT_USAGE


@dataclass(frozen=True)
class PlannedCall:
    """One call the task would make: its purpose, chain and worst-case cost."""

    purpose: str
    tier: str | None
    chain: tuple[str, ...]  # "alias (provider/model)", primary first, context skips removed
    max_tokens: int
    worst_case_micro_usd: int | None  # the reservation on its primary; None when unpriced
    skipped: tuple[dict[str, Any], ...] = ()  # models whose context window is too small
    when: str | None = None  # the condition under which it is made, if any
    cost_micro_usd: int | None = None  # what it did cost, when explaining made it


@dataclass(frozen=True)
class RouteExplanation:
    """What a task would get under a loop's route, and why."""

    loop: str | None
    strategy: str
    tier: str | None
    chain: tuple[str, ...]
    estimated_input_tokens: int
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


async def explain_route(
    config: Config, state_dir: Path, text: str, *, loop: str | None, simulate: bool
) -> RouteExplanation:
    """Explain which strategy, tier, models and worst-case cost the task `text` would get.

    Only `classify` calls a model (a real ledger row under the loop's budget, or simulated).
    Raises RouteUsageError for an undefined loop, MissingKeyError for a missing key.
    """
    if loop is None:
        return _default(config, text)
    if loop not in config.loops:
        known = ", ".join(sorted(config.loops))
        raise RouteUsageError(f"no loop named {loop!r} (loops: {known})")
    lc = config.loops[loop]
    tokens = routing.estimate_tokens(text)
    reasons: list[str] = []
    if lc.handler is not None:
        reasons.append(
            f"loop {loop} is a handler: this is what its ctx.complete() gets when the call "
            "names no tier or model"
        )
    if lc.route == "rules":
        assert lc.kind is not None
        short = lc.routing.short_input_tokens
        tier, why = routing.rules_tier(lc.kind, lc.stakes, lc.latency, tokens, short)
        reasons.extend(why)
        work = _planned(config, loop, "work", tier, text, lc.system, lc.max_tokens)
        extra = {"kind": lc.kind, "stakes": lc.stakes, "latency": lc.latency}
        return _explained(config, loop, "rules", tier, tokens, (work,), reasons, extra=extra)
    if lc.route == "classify":
        return await _classify(config, state_dir, loop, text, simulate, reasons)
    if lc.route == "cascade":
        draft = _planned(config, loop, "draft", None, text, lc.system, lc.max_tokens)
        return _cascade(config, loop, text, tokens, draft, reasons)
    own = _planned(config, loop, "work", None, text, lc.system, lc.max_tokens)
    reasons.append(f"route: static uses the loop's {routing.own_target(lc)}")
    return _explained(config, loop, "static", own.tier, tokens, (own,), reasons)


def _default(config: Config, text: str) -> RouteExplanation:
    """No loop given: static on the balanced tier (else the first one)."""
    if not config.tiers:
        raise RouteUsageError("the config defines no tiers: pass --loop LOOP")
    tier = DEFAULT_TIER if DEFAULT_TIER in config.tiers else next(iter(config.tiers))
    entries = tuple(config.tier_chain(tier))
    work = _call("work", tier, entries, config, text, None, DEFAULT_MAX_TOKENS)
    reasons = [
        f"no --loop: the default route, static on tier {tier} with max_tokens "
        f"{DEFAULT_MAX_TOKENS}; pass --loop LOOP to explain a loop's own route"
    ]
    tokens = routing.estimate_tokens(text)
    return _explained(config, None, "static", tier, tokens, (work,), reasons)


def _cascade(
    config: Config,
    loop: str,
    text: str,
    tokens: int,
    draft: PlannedCall,
    reasons: list[str],
) -> RouteExplanation:
    """Draft, review and (maybe) escalation; the draft's size is bounded by max_tokens."""
    lc = config.loops[loop]
    settings = lc.routing
    # The draft is not written yet: count it as max_tokens of input to the later calls.
    review_text = routing.reviewer_prompt(config, loop, text, "")
    escalation = routing.route_template(config, loop, "escalation_prompt")
    escalate_text = routeprompts.fill(escalation, task=text, draft="", score="0.00")
    review = _planned(
        config,
        loop,
        "review",
        settings.review_tier,
        review_text,
        None,
        settings.review_max_tokens,
        extra_input=lc.max_tokens,
    )
    condition = f"only if the review scores below {settings.threshold:g} or gives no score"
    escalate = _planned(
        config,
        loop,
        "escalate",
        settings.escalate_tier,
        escalate_text,
        lc.system,
        lc.max_tokens,
        extra_input=lc.max_tokens,
        when=condition,
    )
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
    return _explained(config, loop, "cascade", draft.tier, tokens, calls, reasons, extra=extra)


async def _classify(
    config: Config, state_dir: Path, loop: str, text: str, simulate: bool, reasons: list[str]
) -> RouteExplanation:
    """Make the classifier call for real (or simulated) in a run of its own, then plan."""
    lc = config.loops[loop]
    tokens = routing.estimate_tokens(text)
    with Ledger.open(state_dir) as ledger:
        executor = Executor(config, ledger, simulate=simulate)
        try:
            executor.provider_for(config.tier_chain(lc.routing.classifier_tier)[0])
            run_id = ledger.start_run(loop=loop, trigger="manual", simulated=simulate)
            structlog.contextvars.bind_contextvars(loop=loop, run_id=run_id)
            trace = RunTrace(run_id=run_id, loop=loop, simulated=simulate)
            windows = budgets.windows_for(
                loop,
                lc.budget.limits() if lc.budget else None,
                config.budgets.limits() if config.budgets else None,
            )
            route: dict[str, Any] = {"strategy": "classify", "explain": True}
            calls = RunCalls(config, executor, loop, trace, windows, route)
            status = "failed"
            try:
                tier = await routing.classify(calls, text, route)
                outcome = route.get("classify", "")
                status = outcome if outcome in ("skipped_budget", "failed") else "ok"
            finally:
                route["skipped"] = trace.skipped
                ledger.finish_run(run_id, status=status, route=route, error=None)
                structlog.contextvars.unbind_contextvars("loop", "run_id")
        finally:
            await executor.aclose()
    step = (route.get("steps") or [{}])[0]
    classifier_chain = tuple(config.tier_chain(lc.routing.classifier_tier))
    classifier = _call(
        "classify",
        lc.routing.classifier_tier,
        classifier_chain,
        config,
        routing.classifier_prompt(config, loop, text),
        None,
        lc.routing.classify_max_tokens,
    )
    classifier = replace(classifier, cost_micro_usd=trace.cost_micro_usd)
    work = _planned(config, loop, "work", tier, text, lc.system, lc.max_tokens)
    how = "the simulated model" if simulate else f"model {step.get('model') or '?'}"
    reasons.append(
        f"the classifier was called to explain this ({how}, run {run_id}, labels: "
        f"{', '.join(LABELS)})"
    )
    reasons.extend(route["reasons"])
    return _explained(
        config,
        loop,
        "classify",
        work.tier,
        tokens,
        (classifier, work),
        reasons,
        label=route.get("label"),
        classifier_reply=route.get("classifier_reply"),
        model_called=True,
        simulated=simulate,
        run_id=run_id,
        spent_micro_usd=trace.cost_micro_usd,
    )


def _planned(
    config: Config,
    loop: str,
    purpose: str,
    tier: str | None,
    text: str,
    system: str | None,
    max_tokens: int,
    *,
    extra_input: int = 0,
    when: str | None = None,
) -> PlannedCall:
    """A call of the loop on a tier (None: the loop's own target), with its fallback tiers."""
    entries = target_chain(config, loop, tier, None)
    if tier is None:
        tier = config.loops[loop].tier or entries[0].tier
    return _call(purpose, tier, entries, config, text, system, max_tokens, extra_input, when)


def _call(
    purpose: str,
    tier: str | None,
    entries: tuple[ChainEntry, ...],
    config: Config,
    text: str,
    system: str | None,
    max_tokens: int,
    extra_input: int = 0,
    when: str | None = None,
) -> PlannedCall:
    """Filter the chain by context window and price the call on its (new) primary."""
    tokens = routing.estimate_tokens(text) + routing.estimate_tokens(system) + extra_input
    fitting, skipped = routing.context_skips(config, entries, tokens, max_tokens)
    cost = (
        worst_case_micro_usd(config, fitting[0], system, text, max_tokens, extra_input)
        if fitting
        else None
    )
    return PlannedCall(
        purpose=purpose,
        tier=tier,
        chain=tuple(f"{e.alias} ({e.provider_name}/{e.model.model})" for e in fitting),
        max_tokens=max_tokens,
        worst_case_micro_usd=cost,
        skipped=tuple(skipped),
        when=when,
    )


def worst_case_micro_usd(
    config: Config,
    entry: ChainEntry,
    system: str | None,
    prompt: str,
    max_tokens: int,
    extra_input_tokens: int = 0,
) -> int | None:
    """The reservation one attempt of this call would make (the executor's byte bound)."""
    price = config.price(entry.alias)
    if price is None:
        return None
    text_bytes = len(prompt.encode()) + (len(system.encode()) if system else 0)
    bound = pricing.input_token_bound(text_bytes, 1 + (1 if system else 0))
    usd = pricing.worst_case_usd(price, bound + extra_input_tokens, max_tokens)
    return pricing.to_micro_usd(usd)


def _explained(
    config: Config,
    loop: str | None,
    strategy: str,
    tier: str | None,
    tokens: int,
    calls: tuple[PlannedCall, ...],
    reasons: list[str],
    **more: Any,
) -> RouteExplanation:
    """Assemble the explanation: the answering call's chain, the total worst case."""
    answering = calls[-1] if strategy != "cascade" else calls[0]
    costs = [c.worst_case_micro_usd for c in calls]
    total = None if any(c is None for c in costs) else sum(c for c in costs if c is not None)
    for call in calls:
        for skip in call.skipped:
            reasons.append(f"{call.purpose}: {skip['alias']} skipped: {skip['reason']}")
        if not call.chain:
            reasons.append(f"{call.purpose}: no model's context window holds this call")
    return RouteExplanation(
        loop=loop,
        strategy=strategy,
        tier=tier,
        chain=answering.chain,
        estimated_input_tokens=tokens,
        calls=calls,
        worst_case_micro_usd=total,
        reasons=tuple(reasons),
        **more,
    )


def _usd(micro: int | None) -> str | None:
    return None if micro is None else pricing.format_usd(micro)


def format_explanation(expl: RouteExplanation, as_json: bool) -> str:
    """The explanation as readable text, or as JSON with money as decimal strings."""
    if as_json:
        data = asdict(expl)
        data["worst_case_usd"] = _usd(data.pop("worst_case_micro_usd"))
        data["spent_usd"] = pricing.format_usd(data.pop("spent_micro_usd"))
        for call in data["calls"]:
            call["worst_case_usd"] = _usd(call.pop("worst_case_micro_usd"))
            call["cost_usd"] = _usd(call.pop("cost_micro_usd"))
        data.update(data.pop("extra"))
        return json.dumps(data, indent=2)
    where = f"loop {expl.loop}" if expl.loop else "no loop (default route)"
    lines = [
        f"{where}: route {expl.strategy}, tier {expl.tier or '-'}",
        f"task: ~{expl.estimated_input_tokens} input tokens (estimated as UTF-8 bytes / 4)",
        "chain: " + (" -> ".join(expl.chain) or "none fits"),
    ]
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
        cost = _usd(call.worst_case_micro_usd)
        text = (
            f"  {call.purpose:<9} tier {call.tier or '-'}: {' -> '.join(call.chain) or 'none'}"
            f", max_tokens {call.max_tokens}, worst case "
            + (f"${cost}" if cost is not None else "unpriced")
        )
        if call.cost_micro_usd is not None:
            text += f", spent ${_usd(call.cost_micro_usd)}"
        if call.when:
            text += f" ({call.when})"
        lines.append(text)
    total = _usd(expl.worst_case_micro_usd)
    lines.append(f"worst case: ${total}" if total is not None else "worst case: unpriced")
    lines.append("why:")
    lines.extend(f"  - {reason}" for reason in expl.reasons)
    return "\n".join(lines)
