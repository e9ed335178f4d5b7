"""Route strategies: which tier a call goes to, and why — static, rules, classify, cascade.

Every strategy works through the run's `RunCalls`, so each call it makes (the classifier, the
draft, the review, the escalation) has its own ledger rows with its `purpose`, fits the loop's
budget windows, walks its chain's fallbacks and, with `when_over_budget: downgrade`, falls to
cheaper plans like any call. What a strategy decided lands in a `record` dict: the run's `route`
JSON for a prompt loop, or the entry of one `complete()` in `route.calls` for a handler.

- static: the loop's tier (or model).
- rules: a decision tree over the loop's `kind`, `stakes` and `latency` and the estimated input
  size (`rules_tier`). No model call.
- classify: the classifier tier labels the task with one of `LABELS`; `routing.labels` maps the
  label to the tier of the work call. A reply that is not exactly one label (after
  `normalise_reply`), a failed classifier call or one that does not fit the budget leaves the
  work on the loop's own tier; each case is logged and recorded.
- cascade: a draft on the loop's tier, a score from the review tier (`parse_score`), and below
  `routing.threshold` (or without a parseable score) the escalation tier improves the draft.
  A review call that fails on every model or does not fit the budget gives no score, and a
  missing score is a failed review: the run escalates (an escalation that does not fit the
  budget is refused before any request). When the escalation fails or does not fit the
  budget, the draft is the reply. The record says which.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from agentd import routeprompts
from agentd.config import ChainEntry, Config
from agentd.errors import BudgetExceeded, CircuitOpen, NoModelFits, RunFailed
from agentd.logs import get_logger
from agentd.loopconfig import LABELS, LoopConfig
from agentd.routeprompts import parse_label, parse_score

if TYPE_CHECKING:
    from agentd.executor import CallOutcome
    from agentd.runcalls import Plan, RunCalls

KeyPath = tuple[str | int, ...]
RAW_REPLY_CHARS = 200  # how much of an odd classifier or reviewer reply is logged and recorded
_DEFAULT_TEMPLATES = {
    "classifier_prompt": routeprompts.CLASSIFIER,
    "reviewer_prompt": routeprompts.REVIEWER,
    "escalation_prompt": routeprompts.ESCALATION,
}
# A call that failed or did not fit: the strategies degrade instead of failing the run.
_STEP_FAILED = (RunFailed, CircuitOpen)


# ---------------------------------------------------------------------------- pure decisions


def estimate_tokens(text: str | None) -> int:
    """Rough input tokens of a text, for routing only: UTF-8 bytes / 4, rounded up.

    Four bytes per token is the usual size of English text in current tokenizers. Routing and
    context-window checks use it; budget reservations never do (they keep the byte bound).
    """
    return -(-len(text.encode()) // 4) if text else 0


def rules_tier(
    kind: str, stakes: str, latency: str, tokens: int, short_input_tokens: int
) -> tuple[str, list[str]]:
    """The `rules` decision tree: (tier, reasons).

    stakes high → deep; kind reasoning → deep; extraction or classification → fast when the
    input is short (< short_input_tokens) or the stakes are low, else balanced; content and
    code → balanced. Last, `latency: interactive` caps deep at balanced (background: any tier).
    """
    short = tokens < short_input_tokens
    size = "short" if short else "not short"
    reasons = [f"estimated input ~{tokens} tokens: {size} (short is < {short_input_tokens})"]
    if stakes == "high":
        tier = "deep"
        reasons.append("stakes: high → deep")
    elif kind == "reasoning":
        tier = "deep"
        reasons.append("kind: reasoning → deep")
    elif kind in ("extraction", "classification"):
        if short:
            tier = "fast"
            reasons.append(f"short {kind} → fast")
        elif stakes == "low":
            tier = "fast"
            reasons.append(f"{kind} with stakes: low → fast although the input is not short")
        else:
            tier = "balanced"
            reasons.append(f"{kind} of a long input → balanced")
    else:
        tier = "balanced"
        reasons.append(f"kind: {kind} → balanced")
    if tier == "deep" and latency == "interactive":
        tier = "balanced"
        reasons.append("latency: interactive never uses deep → balanced")
    return tier, reasons


def tiers_used(loop: LoopConfig) -> list[tuple[KeyPath, str, str]]:
    """The tiers the loop's route may call beyond its own: (key path, tier, who uses it)."""
    if loop.route == "rules":
        assert loop.kind is not None  # the loop validator requires kind for rules
        short = loop.routing.short_input_tokens
        picks = {
            rules_tier(loop.kind, loop.stakes, loop.latency, tokens, short)[0]
            for tokens in (0, short)
        }
        what = f"route: rules (kind {loop.kind}, stakes {loop.stakes}, latency {loop.latency})"
        return [(("route",), tier, what) for tier in sorted(picks)]
    settings = loop.routing
    if loop.route == "classify":
        used: list[tuple[KeyPath, str, str]] = [
            (("routing", "classifier_tier"), settings.classifier_tier, "the classifier")
        ]
        for label in LABELS:
            used.append((("routing", "labels", label), settings.labels.tier(label), label))
        return used
    if loop.route == "cascade":
        return [
            (("routing", "review_tier"), settings.review_tier, "the reviewer"),
            (("routing", "escalate_tier"), settings.escalate_tier, "the escalation"),
        ]
    return []


def context_skips(
    config: Config, chain: Sequence[ChainEntry], input_tokens: int, max_tokens: int
) -> tuple[tuple[ChainEntry, ...], list[dict[str, Any]]]:
    """Split a chain into the models whose context window fits the call and the skipped ones.

    A model without a known window (config `context_window` or the price table) is kept.
    """
    fitting: list[ChainEntry] = []
    skipped: list[dict[str, Any]] = []
    for entry in chain:
        window = config.context_window(entry.alias)
        if window is not None and window < input_tokens + max_tokens:
            reason = (
                f"context window of {window} tokens < ~{input_tokens} estimated input "
                f"+ {max_tokens} max_tokens"
            )
            skipped.append({"alias": entry.alias, "model": entry.model.model, "reason": reason})
        else:
            fitting.append(entry)
    return tuple(fitting), skipped


def route_template(config: Config, loop_name: str, key: str) -> str:
    """A loop's classifier, reviewer or escalation template: its override file or the default."""
    path: str | None = getattr(config.loops[loop_name].routing, key)
    if path is None:
        return _DEFAULT_TEMPLATES[key]
    return config.resolve_path(path).read_text(encoding="utf-8")


def own_target(loop: LoopConfig) -> str:
    """The loop's own tier or model, as reasons name it."""
    return f"tier {loop.tier}" if loop.tier is not None else f"model {loop.model}"


def classifier_prompt(config: Config, loop_name: str, task: str) -> str:
    """The classifier's prompt for a task."""
    template = route_template(config, loop_name, "classifier_prompt")
    return routeprompts.fill(template, task=task, labels=" | ".join(LABELS))


def reviewer_prompt(config: Config, loop_name: str, task: str, draft: str) -> str:
    """The reviewer's prompt for a task and its draft."""
    template = route_template(config, loop_name, "reviewer_prompt")
    return routeprompts.fill(template, task=task, draft=draft)


def _clip(text: str) -> str:
    return text[:RAW_REPLY_CHARS]


# ---------------------------------------------------------------------------- the calls


async def route_call(
    calls: RunCalls,
    prompt: str,
    *,
    purpose: str,
    system: str | None,
    max_tokens: int | None,
    record: dict[str, Any],
) -> CallOutcome:
    """One logical call along the loop's route; the outcome whose reply is the answer.

    Raises BudgetExceeded when the answering call fits no plan, RunFailed/CircuitOpen when it
    failed on every model; `record` gets the strategy's decision, its steps and reasons.
    """
    loop = calls.config.loops[calls.loop_name]
    record.setdefault("reasons", [])
    if loop.route == "rules":
        return await _rules(calls, prompt, purpose, system, max_tokens, record)
    if loop.route == "classify":
        return await _classify(calls, prompt, purpose, system, max_tokens, record)
    if loop.route == "cascade":
        return await _cascade(calls, prompt, system, max_tokens, record)
    record["reasons"].append(f"route: static uses the loop's {own_target(loop)}")
    plans = calls.plans(prompt, max_tokens=max_tokens, system=system)
    record["requested_tier"] = plans[0].tier
    return await _single(calls, prompt, plans, purpose, system, record)


async def _single(
    calls: RunCalls,
    prompt: str,
    plans: Sequence[Plan],
    purpose: str,
    system: str | None,
    record: dict[str, Any],
) -> CallOutcome:
    """The one call of static and rules, recorded at the top of `record`."""
    outcome = await calls.call(prompt, plans, purpose=purpose, system=system, record=record)
    if record.get("reason") != plans[0].reason:
        record["reasons"].append(f"budget: {record['reason']}")
    return outcome


async def _rules(
    calls: RunCalls,
    prompt: str,
    purpose: str,
    system: str | None,
    max_tokens: int | None,
    record: dict[str, Any],
) -> CallOutcome:
    """`rules`: the decision tree picks the tier; one call there (or on its downgrades)."""
    loop = calls.config.loops[calls.loop_name]
    assert loop.kind is not None
    # The whole input, as the context-window check counts it: the prompt and the system text.
    tokens = estimate_tokens(prompt) + estimate_tokens(system)
    short = loop.routing.short_input_tokens
    tier, reasons = rules_tier(loop.kind, loop.stakes, loop.latency, tokens, short)
    record.update(
        requested_tier=tier,
        kind=loop.kind,
        stakes=loop.stakes,
        latency=loop.latency,
        estimated_input_tokens=tokens,
    )
    record["reasons"].extend(reasons)
    plans = calls.plans(
        prompt, tier=tier, max_tokens=max_tokens, system=system, reason="chosen by rules"
    )
    return await _single(calls, prompt, plans, purpose, system, record)


async def _step(
    calls: RunCalls,
    record: dict[str, Any],
    prompt: str,
    plans: Sequence[Plan],
    purpose: str,
    system: str | None,
) -> tuple[CallOutcome, dict[str, Any]]:
    """One call of a multi-call strategy, recorded as an entry of `record["steps"]`."""
    step: dict[str, Any] = {"purpose": purpose}
    record.setdefault("steps", []).append(step)
    try:
        outcome = await calls.call(prompt, plans, purpose=purpose, system=system, record=step)
    except BudgetExceeded:
        step["status"] = "skipped_budget"
        raise
    except Exception:
        step["status"] = "failed"
        raise
    step["status"] = "ok"
    return outcome, step


async def _optional_step(
    calls: RunCalls,
    record: dict[str, Any],
    prompt: str,
    plans: Sequence[Plan],
    purpose: str,
    system: str | None,
    *,
    key: str,
    what: str,
    instead: str,
) -> tuple[CallOutcome, dict[str, Any]] | None:
    """A step the run can do without: None (recorded under `key`, logged) when it cannot be made.

    A classifier, review or escalation that does not fit the budget or fails on every model
    leaves the run on what it already has (`instead`); it never fails the run.
    """
    reasons: list[str] = record["reasons"]
    log = get_logger(loop=calls.loop_name)
    try:
        return await _step(calls, record, prompt, plans, purpose, system)
    except BudgetExceeded as exc:
        record[key] = "skipped_budget"
        reasons.append(f"the {what} did not fit the budget ({exc}); {instead}")
        log.warning(f"route.{key}_skipped_budget", error=str(exc))
    except _STEP_FAILED as exc:
        record[key] = "failed"
        if isinstance(exc, NoModelFits):
            # Never attempted: RunCalls found no model whose context window holds the call.
            reasons.append(f"the {what} fits no model's context window ({exc}); {instead}")
        else:
            reasons.append(f"the {what} failed on every model; {instead}")
        log.warning(f"route.{key}_failed", error=str(exc))
    return None


def _answer(record: dict[str, Any], step: dict[str, Any]) -> None:
    """Make a step the one whose reply is the answer (the run's tier, model and plan)."""
    for key in ("tier", "answered_tier", "model", "max_tokens", "reason"):
        if key in step:
            record[key] = step[key]


async def classify(calls: RunCalls, task: str, record: dict[str, Any]) -> str | None:
    """The classifier step: the tier its label maps to, or None to stay on the loop's own.

    None when the reply is not exactly one label, the call failed on every model, or it did
    not fit the budget; each case is logged and recorded (`classify` in the record).
    """
    config, loop_name = calls.config, calls.loop_name
    loop = config.loops[loop_name]
    settings = loop.routing
    reasons: list[str] = record.setdefault("reasons", [])
    own = own_target(loop)
    log = get_logger(loop=loop_name)
    # The router's prompt stands alone: the loop's system prompt is for the task ("" = none).
    text = classifier_prompt(config, loop_name, task)
    plans = calls.plans(
        text,
        tier=settings.classifier_tier,
        max_tokens=settings.classify_max_tokens,
        system="",
        reason="classifier",
    )
    done = await _optional_step(
        calls,
        record,
        text,
        plans,
        "classify",
        None,
        key="classify",
        what="classifier call",
        instead=f"using the {own}",
    )
    if done is None:
        record["label"] = None
        return None
    raw = done[0].reply.text
    label = parse_label(raw)
    record.update(label=label, classifier_reply=_clip(raw))
    if label is None:
        record["classify"] = "unusable"
        reasons.append(f"classifier reply {_clip(raw)!r} is not exactly one label; using the {own}")
        log.warning("route.classify_unusable", reply=_clip(raw), fallback=own)
        return None
    tier = settings.labels.tier(label)
    record["classify"] = "ok"
    reasons.append(f"classifier label {label} → tier {tier}")
    log.info("route.classified", label=label, tier=tier)
    return tier


async def _classify(
    calls: RunCalls,
    prompt: str,
    purpose: str,
    system: str | None,
    max_tokens: int | None,
    record: dict[str, Any],
) -> CallOutcome:
    """`classify`: the classifier step, then the work call on the label's (or own) tier."""
    tier = await classify(calls, prompt, record)
    if tier is None:
        plans = calls.plans(prompt, max_tokens=max_tokens, system=system, reason="no usable label")
    else:
        plans = calls.plans(
            prompt,
            tier=tier,
            max_tokens=max_tokens,
            system=system,
            reason=f"label {record['label']}",
        )
    record["requested_tier"] = plans[0].tier
    try:
        outcome, step = await _step(calls, record, prompt, plans, purpose, system)
    finally:
        _answer(record, record["steps"][-1])
    if step["reason"] != plans[0].reason:
        record["reasons"].append(f"budget: {step['reason']}")
    return outcome


async def _cascade(
    calls: RunCalls,
    prompt: str,
    system: str | None,
    max_tokens: int | None,
    record: dict[str, Any],
) -> CallOutcome:
    """`cascade`: draft, review, and below the threshold an escalation; never worse than the
    draft when a later step cannot be made."""
    config, loop_name = calls.config, calls.loop_name
    loop = config.loops[loop_name]
    settings = loop.routing
    reasons: list[str] = record["reasons"]
    log = get_logger(loop=loop_name)
    plans = calls.plans(prompt, max_tokens=max_tokens, system=system)
    record.update(requested_tier=plans[0].tier, threshold=settings.threshold)
    try:
        draft, draft_step = await _step(calls, record, prompt, plans, "draft", system)
    finally:
        _answer(record, record["steps"][-1])
    reasons.append(f"draft on tier {draft_step['tier']} ({draft_step['reason']})")
    record.update(score=None, escalated=False)

    text = reviewer_prompt(config, loop_name, prompt, draft.reply.text)
    review_plans = calls.plans(
        text,
        tier=settings.review_tier,
        max_tokens=settings.review_max_tokens,
        system="",
        reason="reviewer",
    )
    reviewed = await _optional_step(
        calls,
        record,
        text,
        review_plans,
        "review",
        None,
        key="review",
        what="review call",
        instead="no score, a failed review: escalating",
    )
    threshold = settings.threshold
    raw = None if reviewed is None else reviewed[0].reply.text
    score = None if raw is None else parse_score(raw)
    if raw is None:
        log.warning("route.review_missing", review=record["review"], escalate=True)
    else:
        record.update(score=score, review_reply=_clip(raw), review="ok")
    if raw is not None and score is None:
        record["review"] = "unparseable"
        reasons.append(f"review reply {_clip(raw)!r} has no score: a failed review, escalating")
        log.warning("route.review_unparseable", reply=_clip(raw))
    elif score is not None and score >= threshold:
        reasons.append(f"review score {score:g} ≥ threshold {threshold:g}: the draft is the reply")
        log.info("route.reviewed", score=score, escalate=False)
        return draft
    elif score is not None:
        reasons.append(f"review score {score:g} < threshold {threshold:g}: escalating")
        log.info("route.reviewed", score=score, escalate=True)

    template = route_template(config, loop_name, "escalation_prompt")
    shown = f"{score:g}" if score is not None else "unparseable" if raw else "missing"
    text = routeprompts.fill(template, task=prompt, draft=draft.reply.text, score=shown)
    # Only the escalation tier at full size: a cheaper or shorter "improvement" of the draft
    # is not worth paying for, so when it does not fit, the draft stands.
    escalate_plans = calls.plans(
        text,
        tier=settings.escalate_tier,
        max_tokens=max_tokens,
        system=system,
        reason="escalation",
        downgrade=False,
    )
    escalated = await _optional_step(
        calls,
        record,
        text,
        escalate_plans,
        "escalate",
        system,
        key="escalation",
        what="escalation",
        instead="the draft is the reply",
    )
    if escalated is None:
        return draft
    improved, step = escalated
    record.update(escalated=True, escalation="ok")
    reasons.append(f"escalated to tier {step['tier']}: its answer is the reply")
    _answer(record, step)
    return improved
