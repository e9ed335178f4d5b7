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
from agentd.errors import AgentdError, BudgetExceeded, RunFailed
from agentd.executor import CallOutcome, Executor, RunTrace
from agentd.guardrails import RunGuard, run_limits
from agentd.logs import get_logger
from agentd.providers.base import Message
from agentd.routing import context_skips, estimate_tokens


@dataclass(frozen=True)
class Plan:
    """One way to make a call: which tier's chain and how many output tokens."""

    tier: str | None
    chain: tuple[ChainEntry, ...]
    max_tokens: int
    reason: str


def target_chain(
    config: Config, loop_name: str, tier: str | None, model: str | None
) -> tuple[ChainEntry, ...]:
    """The loop's chain, or a tier's or model's (then the loop's fallback tiers)."""
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
    executor: Executor,
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
    own_chain = target_chain(config, loop_name, tier, model)
    own_tier = tier or (own_chain[0].tier if model else loop.tier or own_chain[0].tier)
    if reason is None:
        asked = tier is not None or model is not None
        reason = "asked by handler" if asked else "configured"
    own = Plan(own_tier, own_chain, max_tokens, reason)
    if loop.when_over_budget != "downgrade" or not downgrade:
        return [own]
    messages = [Message("user", prompt)]

    def primary_cost(chain: tuple[ChainEntry, ...], tokens: int) -> int:
        amount = executor.reservation_micro_usd(chain[0], system, messages, tokens)
        return amount if amount is not None else 0

    own_cost = primary_cost(own_chain, max_tokens)
    cheaper: list[tuple[int, Plan]] = []
    for other in config.tiers:
        if other == own.tier:
            continue
        chain = tuple(config.tier_chain(other))
        cost = primary_cost(chain, max_tokens)
        if cost < own_cost:
            cheaper.append((cost, Plan(other, chain, max_tokens, f"downgraded to {other}")))
    # Dearest cheaper tier first: give up as little quality as the budget allows.
    cheaper.sort(key=lambda item: -item[0])
    plans = [own, *(plan for _, plan in cheaper)]
    if loop.min_tokens is not None:
        last = plans[-1]
        tokens = max_tokens // 2
        while tokens > loop.min_tokens:
            plans.append(Plan(last.tier, last.chain, tokens, f"max_tokens reduced to {tokens}"))
            tokens //= 2
        if loop.min_tokens < max_tokens:
            reason = f"max_tokens reduced to {loop.min_tokens}"
            plans.append(Plan(last.tier, last.chain, loop.min_tokens, reason))
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
        self.last_refusal: BudgetExceeded | None = None
        self.outcomes: list[CallOutcome] = []
        # The run's prompt-cache decision (set by the runner); None: nothing is marked.
        self.cache: CacheDecision | None = None
        # The loop's batch mode (set by the runner); None: calls are made directly.
        self.batch: BatchMode | None = None
        # The run's ceilings, checked by the executor before every attempt.
        self.guard = RunGuard(run_limits(config.loops[loop_name]))
        trace.guard = self._check_limits
        # A handler may gather() several complete()s; the executor numbers attempts from the
        # trace's length, so the run's calls are made one at a time to keep numbers unique.
        self._lock = asyncio.Lock()

    def _check_limits(self, trace: RunTrace, reserve: int) -> None:
        """The executor's hook before each attempt: refuse it when it would pass a ceiling."""
        self.guard.before_attempt(trace.numbered, trace.tokens, trace.cost_micro_usd, reserve)

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
            self.executor,
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

        `record` (default: the run's route) gets the plan's tier, max_tokens and reason, and the
        model that answered. Models whose context window cannot hold the call are skipped (not
        attempts; listed in the route's `skipped`); RunFailed when no plan has any model left.
        """
        self.guard.refuse_if_reached()
        record = self.route if record is None else record
        messages = (Message("user", prompt),)
        tokens = estimate_tokens(prompt) + estimate_tokens(system)
        refused: list[str] = []
        too_small: list[str] = []
        for plan in plans:
            record.update(tier=plan.tier, max_tokens=plan.max_tokens, reason=plan.reason)
            chain = self._fitting(plan, tokens)
            if not chain:
                too_small.append(
                    f"{plan.reason}: no model's context window holds ~{tokens} input "
                    f"+ {plan.max_tokens} output tokens"
                )
                continue
            mark = None if self.cache is None else self.cache.mark(prompt, chain[0].alias)
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
                refused.append(f"{plan.reason}: {exc}")
                self.refusals.append(refused[-1])
                self.last_refusal = exc
                continue
            if chain[0].alias != plan.chain[0].alias:
                # The plan's primary was skipped: the answer comes from a fallback model.
                outcome = replace(outcome, fallback=True)
            self.outcomes.append(outcome)
            record["model"] = outcome.entry.alias
            return outcome
        if too_small and not refused:
            raise RunFailed(" | ".join(too_small))
        window = self.last_refusal.window if self.last_refusal else ""
        raise BudgetExceeded(" | ".join(refused + too_small), window=window)

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
            self.executor,
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
        self.route.update({k: note[k] for k in ("tier", "max_tokens", "reason", "model")})
        return outcome.reply.text
