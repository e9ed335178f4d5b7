"""A run's model calls: budget plans (downgrade), attempts numbered across the run, refusals."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from agentd import budgets
from agentd.batches import BatchMode
from agentd.caching import CacheDecision
from agentd.config import ChainEntry, Config
from agentd.errors import AgentdError, BudgetExceeded, NoModelFits
from agentd.executor import CallOutcome, Executor, RunTrace
from agentd.guardrails import RunGuard, call_token_bound, run_limits
from agentd.logs import get_logger
from agentd.providers.base import Message
from agentd.routing import context_skips, estimate_tokens

DEEP_TIER = "deep"
# Why an interactive loop's chains leave the deep tier out (route reasons and skips say so).
INTERACTIVE_NO_DEEP = "latency: interactive never uses deep"


@dataclass(frozen=True)
class Plan:
    """One way to make a call: which tier's chain and how many output tokens.

    `left_out`: models of the chain an interactive loop may not use (the deep tier's).
    """

    tier: str | None
    chain: tuple[ChainEntry, ...]
    max_tokens: int
    reason: str
    left_out: tuple[ChainEntry, ...] = ()


def latency_split(
    config: Config, loop_name: str, entries: Sequence[ChainEntry]
) -> tuple[tuple[ChainEntry, ...], tuple[ChainEntry, ...]]:
    """(the chain the loop may use, the models left out): `latency: interactive` never goes to
    the deep tier, whether as its target, a fallback tier or a downgrade."""
    if config.loops[loop_name].latency != "interactive":
        return tuple(entries), ()
    kept = tuple(e for e in entries if e.tier != DEEP_TIER)
    return kept, tuple(e for e in entries if e.tier == DEEP_TIER)


def target_chain(
    config: Config, loop_name: str, tier: str | None, model: str | None
) -> tuple[ChainEntry, ...]:
    """The loop's chain, or a tier's or model's (then the loop's fallback tiers).

    An interactive loop's chain leaves the deep tier out (`latency_split`).
    """
    return latency_split(config, loop_name, _full_chain(config, loop_name, tier, model))[0]


def _full_chain(
    config: Config, loop_name: str, tier: str | None, model: str | None
) -> tuple[ChainEntry, ...]:
    """`target_chain` before the latency filter."""
    if tier is None and model is None:
        return tuple(config.chain(loop_name))
    if tier is not None:
        entries = config.tier_chain(tier)
    else:
        assert model is not None
        home = next((t for t, aliases in config.tiers.items() if model in aliases), None)
        spec = config.models[model]
        entries = [ChainEntry(home, model, spec, spec.provider, config.providers[spec.provider])]
    for extra in config.loops[loop_name].fallback_tiers:
        entries.extend(config.tier_chain(extra))
    unique: dict[str, ChainEntry] = {}
    for entry in entries:
        unique.setdefault(entry.alias, entry)
    return tuple(unique.values())


def plans_for(
    config: Config,
    loop_name: str,
    prompt: str,
    *,
    tier: str | None = None,
    model: str | None = None,
    max_tokens: int | None = None,
    system: str | None = None,
    reason: str | None = None,
    downgrade: bool = True,
) -> list[Plan]:
    """The requested plan, then, with `when_over_budget: downgrade`, cheaper ones to fall to.

    `reason` names why this target was asked for (default: configured / asked by handler);
    `downgrade=False` keeps to the requested plan whatever the loop's `when_over_budget`.
    """
    loop = config.loops[loop_name]
    max_tokens = max_tokens or loop.max_tokens
    system = loop.system if system is None else system
    full = _full_chain(config, loop_name, tier, model)
    own_chain, left_out = latency_split(config, loop_name, full)
    own_tier = tier or (full[0].tier if model else loop.tier or full[0].tier)
    if reason is None:
        asked = tier is not None or model is not None
        reason = "asked by handler" if asked else "configured"
    own = Plan(own_tier, own_chain, max_tokens, reason, left_out)
    if loop.when_over_budget != "downgrade" or not downgrade:
        return [own]

    def cheapest_cost(chain: tuple[ChainEntry, ...], tokens: int) -> int:
        # A refused model is skipped and the chain goes on, so a chain fits as soon as its
        # cheapest model does: that model's worst case is the chain's (0: none is priced).
        amounts = (config.worst_case_micro_usd(e.alias, system, [prompt], tokens) for e in chain)
        return min((a for a in amounts if a is not None), default=0)

    own_cost = cheapest_cost(own_chain, max_tokens)
    cheaper: list[tuple[int, Plan]] = []
    for other in config.tiers:
        if other == own.tier:
            continue
        chain, dropped = latency_split(config, loop_name, config.tier_chain(other))
        if not chain:
            continue  # the deep tier, for an interactive loop: never a plan
        cost = cheapest_cost(chain, max_tokens)
        if cost < own_cost:
            plan = Plan(other, chain, max_tokens, f"downgraded to {other}", dropped)
            cheaper.append((cost, plan))
    # Dearest cheaper tier first: give up as little quality as the budget allows.
    cheaper.sort(key=lambda item: -item[0])
    plans = [own, *(plan for _, plan in cheaper)]
    if loop.min_tokens is not None:
        last = plans[-1]
        tokens = max_tokens // 2
        while tokens > loop.min_tokens:
            reduced = f"max_tokens reduced to {tokens}"
            plans.append(Plan(last.tier, last.chain, tokens, reduced, last.left_out))
            tokens //= 2
        if loop.min_tokens < max_tokens:
            reason = f"max_tokens reduced to {loop.min_tokens}"
            plans.append(Plan(last.tier, last.chain, loop.min_tokens, reason, last.left_out))
    return plans


class RouteCall(Protocol):
    """A route strategy's entry point (`agentd.routing.route_call`), as RunCalls calls it."""

    def __call__(
        self,
        calls: RunCalls,
        prompt: str,
        *,
        purpose: str,
        system: str | None,
        max_tokens: int | None,
        record: dict[str, Any],
    ) -> Awaitable[CallOutcome]:
        """One logical call along the loop's route; `record` gets the decision."""
        ...


class RunCalls:
    """The model calls of one run: budget plans, one trace numbering every attempt, refusals.

    Both a prompt loop's call(s) and every `complete()` of a handler go through `call`.
    """

    def __init__(
        self,
        config: Config,
        executor: Executor,
        loop_name: str,
        trace: RunTrace,
        windows: Sequence[budgets.Window],
        route: dict[str, Any],
        router: RouteCall | None = None,
    ) -> None:
        self.config = config
        self.executor = executor
        self.loop_name = loop_name
        self.trace = trace
        self.windows = windows
        self.route = route
        self.router = router
        self.refusals: list[str] = []
        # The window refusals behind `refusals`: what each asked of which window (alerts).
        self.window_refusals: list[budgets.BudgetWindowExceeded] = []
        self.last_refusal: BudgetExceeded | None = None
        self.outcomes: list[CallOutcome] = []
        # The run's prompt-cache decision (set by the runner); None: nothing is marked.
        self.cache: CacheDecision | None = None
        # The loop's batch mode (set by the runner); None: calls are made directly.
        self.batch: BatchMode | None = None
        # The run's ceilings, checked by the executor before every attempt.
        self.guard = RunGuard(run_limits(config.loops[loop_name]))
        trace.guard = self._check_limits
        self._call_tokens = 0  # the worst-case tokens of the call being made (call_token_bound)
        # A handler may gather() several complete()s; the executor numbers attempts from the
        # trace's length, so the run's calls are made one at a time to keep numbers unique.
        self._lock = asyncio.Lock()

    def _check_limits(self, trace: RunTrace, reserve: int) -> None:
        """The executor's hook before each attempt: refuse it when it would pass a ceiling."""
        self.guard.before_attempt(
            trace.numbered, trace.tokens, trace.cost_micro_usd, reserve, self._call_tokens
        )

    @property
    def limit_reached(self) -> str | None:
        """Why a ceiling stopped this run, or None."""
        return self.guard.reached

    def plans(
        self,
        prompt: str,
        *,
        tier: str | None = None,
        max_tokens: int | None = None,
        system: str | None = None,
        reason: str | None = None,
        downgrade: bool = True,
    ) -> list[Plan]:
        """`plans_for` this run's loop: a tier (None: the loop's own target) and its downgrades."""
        return plans_for(
            self.config,
            self.loop_name,
            prompt,
            tier=tier,
            max_tokens=max_tokens,
            system=system,
            reason=reason,
            downgrade=downgrade,
        )

    async def call(
        self,
        prompt: str,
        plans: Sequence[Plan],
        *,
        purpose: str,
        system: str | None,
        record: dict[str, Any] | None = None,
    ) -> CallOutcome:
        """Try the plans in order until one fits the budget; BudgetExceeded when none does.

        `record` (default: the run's route) gets the plan's tier, max_tokens and reason, the
        model that answered and the tier it answered from (`answered_tier`: a fallback tier's
        model answers for the plan's `tier`). Models whose context window cannot hold the call,
        and an interactive loop's deep models, are skipped (not attempts; listed in the route's
        `skipped`); NoModelFits (a RunFailed) when no plan has any model left. Every model the
        budget refused is listed in `refusals` (the route's `budget_refusals`), also when
        another answered.
        """
        self.guard.refuse_if_reached()
        record = self.route if record is None else record
        messages = (Message("user", prompt),)
        tokens = estimate_tokens(prompt) + estimate_tokens(system)
        refused: list[str] = []
        unusable: list[str] = []
        for plan in plans:
            record.update(tier=plan.tier, max_tokens=plan.max_tokens, reason=plan.reason)
            self._leave_out(plan, record)
            if not plan.chain:
                unusable.append(f"{plan.reason}: {INTERACTIVE_NO_DEEP}, and no other model is left")
                continue
            chain = self._fitting(plan, tokens)
            if not chain:
                unusable.append(
                    f"{plan.reason}: no model's context window holds ~{tokens} input "
                    f"+ {plan.max_tokens} output tokens"
                )
                continue
            mark = None if self.cache is None else self.cache.mark(prompt, chain[0].alias)
            self._call_tokens = call_token_bound(prompt, system, plan.max_tokens)
            seen = len(self.trace.budget_refusals)
            try:
                outcome = await self.executor.call(
                    self.trace,
                    purpose=purpose,
                    chain=chain,
                    system=system,
                    messages=messages,
                    max_tokens=plan.max_tokens,
                    windows=self.windows,
                    cache=mark,
                    batch=self.batch,
                )
            except BudgetExceeded as exc:
                refused.extend(self._take_refusals(plan, seen, exc))
                self.last_refusal = exc
                continue
            self._take_refusals(plan, seen)  # models refused on the way to the answer
            if chain[0].alias != plan.chain[0].alias:
                # The plan's primary was skipped: the answer comes from a fallback model.
                outcome = replace(outcome, fallback=True)
            self.outcomes.append(outcome)
            record["model"] = outcome.entry.alias
            record["answered_tier"] = outcome.entry.tier
            return outcome
        if unusable and not refused:
            raise NoModelFits(" | ".join(unusable))
        window = self.last_refusal.window if self.last_refusal else ""
        raise BudgetExceeded(" | ".join(refused + unusable), window=window)

    def _take_refusals(self, plan: Plan, seen: int, exc: BudgetExceeded | None = None) -> list[str]:
        """The models the budget refused since `seen` (else `exc` itself), each with the plan's
        reason; added to the run's `refusals` (the route's `budget_refusals`), and their
        exceptions to `window_refusals`."""
        lines = [f"{plan.reason}: {refusal}" for refusal in self.trace.budget_refusals[seen:]]
        refused = self.trace.budget_refused[seen:]
        if not lines and exc is not None:
            lines = [f"{plan.reason}: {exc}"]
            refused = [exc]
        self.refusals.extend(lines)
        self.window_refusals.extend(
            r for r in refused if isinstance(r, budgets.BudgetWindowExceeded)
        )
        return lines

    def _leave_out(self, plan: Plan, record: dict[str, Any]) -> None:
        """Record the models an interactive loop's plan left out: skips and a route reason."""
        if not plan.left_out:
            return
        for entry in plan.left_out:
            skip = {"alias": entry.alias, "model": entry.model.model, "reason": INTERACTIVE_NO_DEEP}
            if skip not in self.trace.skipped:
                self.trace.skipped.append(skip)
                get_logger().info("call.skipped", **skip)
        reasons = record.get("reasons", self.route.get("reasons"))
        if isinstance(reasons, list):
            aliases = ", ".join(e.alias for e in plan.left_out)
            reason = f"{INTERACTIVE_NO_DEEP}: {aliases} left out of the chain"
            if reason not in reasons:
                reasons.append(reason)

    def _fitting(self, plan: Plan, input_tokens: int) -> tuple[ChainEntry, ...]:
        """The plan's chain without models too small for the call; skips go into the trace."""
        chain, skipped = context_skips(self.config, plan.chain, input_tokens, plan.max_tokens)
        for skip in skipped:
            if skip not in self.trace.skipped:
                self.trace.skipped.append(skip)
                get_logger().info("call.skipped", **skip)
        return chain

    async def complete(
        self,
        prompt: str,
        *,
        tier: str | None,
        model: str | None,
        max_tokens: int | None,
        purpose: str,
        system: str | None,
    ) -> str:
        """A handler's call (`LoopContext.complete`): the reply's text.

        A call that names neither tier nor model follows the loop's `route:` (with a router);
        one that names them goes where it asks.
        """
        self.guard.refuse_if_reached()  # a handler that swallowed it gets it again
        loop = self.config.loops[self.loop_name]
        system = loop.system if system is None else system
        if tier is None and model is None and loop.route != "static" and self.router:
            return await self._routed(prompt, max_tokens=max_tokens, purpose=purpose, system=system)
        plans = plans_for(
            self.config,
            self.loop_name,
            prompt,
            tier=tier,
            model=model,
            max_tokens=max_tokens,
            system=system,
        )
        note: dict[str, Any] = {"purpose": purpose, "requested_tier": plans[0].tier}
        self.route.setdefault("calls", []).append(note)
        try:
            async with self._lock:
                outcome = await self.call(prompt, plans, purpose=purpose, system=system)
        except BudgetExceeded:
            note["status"] = "skipped_budget"
            raise
        except AgentdError:
            note["status"] = "failed"
            raise
        note.update(
            status="ok",
            tier=self.route["tier"],
            answered_tier=outcome.entry.tier,
            model=outcome.entry.alias,
            max_tokens=self.route["max_tokens"],
            reason=self.route["reason"],
        )
        return outcome.reply.text

    async def _routed(
        self, prompt: str, *, max_tokens: int | None, purpose: str, system: str | None
    ) -> str:
        """A handler's call along the loop's route, recorded as one entry of `route.calls`."""
        assert self.router is not None
        note: dict[str, Any] = {
            "purpose": purpose,
            "strategy": self.config.loops[self.loop_name].route,
        }
        self.route.setdefault("calls", []).append(note)
        try:
            async with self._lock:
                outcome = await self.router(
                    self, prompt, purpose=purpose, system=system, max_tokens=max_tokens, record=note
                )
        except BudgetExceeded:
            note["status"] = "skipped_budget"
            raise
        except AgentdError:
            note["status"] = "failed"
            raise
        note["status"] = "ok"
        # As for a static call: the run's top-level tier and model are those of its last call.
        keys = ("tier", "answered_tier", "max_tokens", "reason", "model")
        self.route.update({k: note[k] for k in keys if k in note})
        return outcome.reply.text
