"""One model call: budget reservation, retries, fallback chain, circuit breakers, ledger rows."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from agentd import budgets, pricing
from agentd.budgets import CallStart, Window
from agentd.circuit import CircuitBreakers
from agentd.config import ChainEntry, Config
from agentd.errors import (
    BudgetExceeded,
    CircuitOpen,
    MissingKeyError,
    ProviderError,
    RunFailed,
)
from agentd.ledger import Ledger
from agentd.logs import get_logger
from agentd.providers import build_provider
from agentd.providers.base import CacheMark, Message, Provider, Reply, Request, Usage

Sleep = Callable[[float], Awaitable[None]]

_BACKOFF_BASE_S = 1.0


@dataclass(frozen=True)
class Attempt:
    """One attempt as written to the ledger, for reports and `--json` output."""

    call_id: int
    attempt: int
    purpose: str
    tier: str | None
    alias: str
    provider: str
    model: str
    status: str
    cost_micro_usd: int
    reserved_micro_usd: int
    error_type: str | None = None
    http_status: int | None = None
    error: str | None = None
    latency_ms: int | None = None
    request_id: str | None = None


@dataclass
class RunTrace:
    """What one run has done so far: its attempts (numbered across the run) and skipped models."""

    run_id: int
    loop: str
    simulated: bool
    attempts: list[Attempt] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)

    numbered: int = 0
    tokens: int = 0  # settled input + output tokens of the run's attempts so far
    # Called before each attempt with (trace, reservation in micro-USD); raises to refuse it
    # before anything is reserved (the run's ceilings, `agentd.guardrails.RunGuard`).
    guard: Callable[[RunTrace, int], None] | None = field(default=None, repr=False)

    @property
    def cost_micro_usd(self) -> int:
        """Money this run has spent (or may have been billed) so far."""
        return sum(a.cost_micro_usd for a in self.attempts)

    def next_attempt(self) -> int:
        """Number the run's next attempt (at reservation, so concurrent calls never share one)."""
        self.numbered += 1
        return self.numbered


@dataclass(frozen=True)
class CallOutcome:
    """A successful call: the reply, which chain entry produced it, and what it cost."""

    reply: Reply
    entry: ChainEntry
    cost_micro_usd: int
    fallback: bool


@dataclass
class _ModelTry:
    """Bookkeeping for one chain entry during a call."""

    entry: ChainEntry
    last_error: str | None = None
    attempts: int = 0


class Executor:
    """Makes calls for runs: owns providers, concurrency caps, breakers, retries and settlement."""

    def __init__(
        self,
        config: Config,
        ledger: Ledger,
        *,
        simulate: bool = False,
        env: Mapping[str, str] | None = None,
        sleep: Sleep = asyncio.sleep,
        breakers: CircuitBreakers | None = None,
    ) -> None:
        self.config = config
        self.ledger = ledger
        self.simulate = simulate
        self._env = env
        self._sleep = sleep
        cb = config.circuit_breaker
        self.breakers = breakers or CircuitBreakers(
            failures=cb.failures, cooldowns_s=tuple(cb.cooldowns_s)
        )
        self._providers: dict[str, Provider] = {}
        self._semaphores: dict[str, asyncio.Semaphore] = {}
        self._log = get_logger()

    def provider_for(self, entry: ChainEntry) -> Provider:
        """The (cached) provider client for a chain entry; raises MissingKeyError without a key."""
        name = entry.provider_name
        if name not in self._providers:
            if self.simulate:
                from agentd.providers.simulated import SimulatedProvider

                self._providers[name] = SimulatedProvider(name)
            else:
                key = self.config.api_key(name, self._env)
                self._providers[name] = build_provider(
                    name,
                    entry.provider.type,
                    api_key=key,
                    base_url=entry.provider.base_url,
                    timeout_s=entry.provider.timeout_s,
                )
        return self._providers[name]

    def _semaphore(self, provider_name: str, cap: int) -> asyncio.Semaphore:
        if provider_name not in self._semaphores:
            self._semaphores[provider_name] = asyncio.Semaphore(cap)
        return self._semaphores[provider_name]

    async def aclose(self) -> None:
        """Close every provider client."""
        for provider in self._providers.values():
            await provider.aclose()
        self._providers.clear()

    def reservation_micro_usd(
        self, entry: ChainEntry, system: str | None, messages: Sequence[Message], max_tokens: int
    ) -> int | None:
        """Worst-case cost of one attempt in micro-USD, or None when the model has no price."""
        price = self.config.price(entry.alias)
        if price is None:
            return None
        text_bytes = sum(len(m.content.encode()) for m in messages)
        if system:
            text_bytes += len(system.encode())
        bound = pricing.input_token_bound(text_bytes, len(messages) + (1 if system else 0))
        return pricing.to_micro_usd(pricing.worst_case_usd(price, bound, max_tokens))

    async def call(
        self,
        trace: RunTrace,
        *,
        purpose: str,
        chain: Sequence[ChainEntry],
        system: str | None,
        messages: Sequence[Message],
        max_tokens: int,
        windows: Sequence[Window],
        cache: CacheMark | None = None,
    ) -> CallOutcome:
        """Get one reply from the first model of `chain` that works and fits the budget.

        `cache` marks the prompt's stable prefix for the provider's cache (`agentd.caching`).

        Raises BudgetExceeded when no model fitted and none was tried, MissingKeyError when the
        primary model's key is missing, and RunFailed (or CircuitOpen) when every model failed or
        was cooling down.
        """
        tries: list[_ModelTry] = []
        attempts_before = len(trace.attempts)
        missing_key: MissingKeyError | None = None
        skipped_providers: set[str] = set()
        for index, entry in enumerate(chain):
            model_key = f"{entry.provider_name}/{entry.model.model}"
            if entry.provider_name in skipped_providers:
                self._skip(trace, entry, "provider failed earlier in this call")
                continue
            reason = self.breakers.open_reason(entry.provider_name, model_key)
            if reason is not None:
                self._skip(trace, entry, reason)
                continue
            try:
                provider = self.provider_for(entry)
            except MissingKeyError as exc:
                if index == 0:
                    raise
                missing_key = missing_key or exc
                self._skip(trace, entry, str(exc))
                continue
            model_try = _ModelTry(entry)
            tries.append(model_try)
            try:
                reply, cost = await self._call_model(
                    trace,
                    model_try,
                    provider,
                    model_key,
                    purpose,
                    system,
                    messages,
                    max_tokens,
                    windows,
                    cache,
                )
            except BudgetExceeded as exc:
                self._skip(trace, entry, str(exc))
                if len(trace.attempts) == attempts_before:
                    # Nothing tried yet: the loop's `when_over_budget` decides, not the chain.
                    raise
                if model_try.attempts == 0:
                    tries.pop()
                else:
                    model_try.last_error = str(exc)
                continue
            except ProviderError as exc:
                if exc.next_provider_only:
                    skipped_providers.add(entry.provider_name)
                continue
            return CallOutcome(
                reply=reply,
                entry=entry,
                cost_micro_usd=cost,
                fallback=entry.alias != chain[0].alias,
            )
        if not tries:
            if missing_key is not None:
                raise missing_key
            reasons = "; ".join(f"{s['alias']}: {s['reason']}" for s in trace.skipped)
            raise CircuitOpen(f"every model is cooling down ({reasons})")
        lines = [f"{t.entry.alias} ({t.entry.model.model}): {t.last_error}" for t in tries]
        skipped = [f"{s['alias']}: {s['reason']}" for s in trace.skipped]
        raise RunFailed(
            "every model failed — " + "; ".join(lines + [f"skipped {s}" for s in skipped])
        )

    def _skip(self, trace: RunTrace, entry: ChainEntry, reason: str) -> None:
        trace.skipped.append({"alias": entry.alias, "model": entry.model.model, "reason": reason})
        self._log.info("call.skipped", alias=entry.alias, model=entry.model.model, reason=reason)

    async def _call_model(
        self,
        trace: RunTrace,
        model_try: _ModelTry,
        provider: Provider,
        model_key: str,
        purpose: str,
        system: str | None,
        messages: Sequence[Message],
        max_tokens: int,
        windows: Sequence[Window],
        cache: CacheMark | None = None,
    ) -> tuple[Reply, int]:
        """Attempt one model, retrying transient errors with capped backoff."""
        entry = model_try.entry
        settings = entry.provider
        waited = 0.0
        retries = 0
        while True:
            try:
                return await self._attempt(
                    trace,
                    model_try,
                    provider,
                    purpose,
                    system,
                    messages,
                    max_tokens,
                    windows,
                    cache,
                )
            except ProviderError as exc:
                model_try.last_error = str(exc)
                if exc.opens_provider_circuit:
                    cb = self.config.circuit_breaker
                    cooldown = (
                        cb.billing_cooldown_s if exc.code == "billing_error" else cb.auth_cooldown_s
                    )
                    self.breakers.open_provider(entry.provider_name, cooldown, str(exc))
                # The reason keeps the real error, so "every model is cooling down" still says why.
                opened = self.breakers.record_failure(model_key, str(exc))
                if opened:
                    self._log.warning("circuit.opened", model=model_key, reason=exc.code)
                if not exc.retryable or opened or retries >= settings.max_retries:
                    raise
                delay = self._backoff(retries, exc.retry_after_s)
                if waited + delay > settings.retry_max_wait_s:
                    raise
                retries += 1
                waited += delay
                self._log.info("call.retry", model=model_key, delay_s=round(delay, 3))
                await self._sleep(delay)

    @staticmethod
    def _backoff(retries: int, retry_after_s: float | None) -> float:
        """Exponential backoff with jitter; the provider's retry-after wins when it says more."""
        if retry_after_s is not None:
            return max(retry_after_s, 0.0)
        jitter: float = random.uniform(0.5, 1.0)
        return _BACKOFF_BASE_S * (2.0**retries) * jitter

    async def _attempt(
        self,
        trace: RunTrace,
        model_try: _ModelTry,
        provider: Provider,
        purpose: str,
        system: str | None,
        messages: Sequence[Message],
        max_tokens: int,
        windows: Sequence[Window],
        cache: CacheMark | None = None,
    ) -> tuple[Reply, int]:
        """Reserve, call, settle: exactly one `calls` row, settled on every exit path."""
        entry = model_try.entry
        price = self.config.price(entry.alias)
        amount = self.reservation_micro_usd(entry, system, messages, max_tokens)
        if amount is None and windows:
            raise BudgetExceeded(f"{entry.alias} has no known price", window="")
        reserved = amount or 0
        async with self._semaphore(entry.provider_name, entry.provider.max_concurrency):
            if trace.guard is not None:
                trace.guard(trace, reserved)
            number = trace.next_attempt()
            call_id = budgets.reserve(
                self.ledger,
                CallStart(
                    run_id=trace.run_id,
                    loop=trace.loop,
                    purpose=purpose,
                    tier=entry.tier,
                    alias=entry.alias,
                    provider=entry.provider_name,
                    model=entry.model.model,
                    attempt=number,
                    simulated=trace.simulated,
                ),
                reserved,
                windows,
                self.config.tz,
            )
            model_try.attempts += 1
            request = Request(
                model=entry.model.model,
                messages=tuple(messages),
                max_tokens=max_tokens,
                system=system,
                timeout_s=entry.provider.timeout_s,
                cache=cache,
            )
            started = time.monotonic()
            pending = Attempt(
                call_id=call_id,
                attempt=number,
                purpose=purpose,
                tier=entry.tier,
                alias=entry.alias,
                provider=entry.provider_name,
                model=entry.model.model,
                status="pending",
                cost_micro_usd=0,
                reserved_micro_usd=reserved,
            )
            priced = price is not None
            settled = False
            try:
                reply = await provider.complete(request)
                cost = pricing.to_micro_usd(pricing.cost_usd(price, reply.usage)) if price else 0
                self._settle(
                    trace,
                    replace(
                        pending,
                        status="ok",
                        cost_micro_usd=cost,
                        latency_ms=_ms_since(started),
                        request_id=reply.request_id,
                    ),
                    usage=reply.usage,
                    priced=priced,
                    served_model=reply.model,
                )
                settled = True
                self.breakers.record_success(f"{entry.provider_name}/{entry.model.model}")
                return reply, cost
            except ProviderError as exc:
                # A request that reached the provider without a usage report may be billed.
                self._settle(
                    trace,
                    replace(
                        pending,
                        status="error",
                        cost_micro_usd=reserved if exc.may_have_billed else 0,
                        error_type=exc.code,
                        http_status=exc.http_status,
                        error=str(exc),
                        latency_ms=_ms_since(started),
                        request_id=exc.request_id,
                    ),
                    usage=None,
                    priced=priced,
                )
                settled = True
                raise
            finally:
                if not settled:
                    # Cancellation or an unexpected bug mid-call: the request may have been
                    # sent, so keep its reservation as spent rather than pretend it was free.
                    self._settle(
                        trace,
                        replace(
                            pending,
                            status="aborted",
                            cost_micro_usd=reserved,
                            error_type="aborted",
                            error="call interrupted before it finished",
                            latency_ms=_ms_since(started),
                        ),
                        usage=None,
                        priced=priced,
                    )

    def _settle(
        self,
        trace: RunTrace,
        attempt: Attempt,
        *,
        usage: Usage | None,
        priced: bool,
        served_model: str | None = None,
    ) -> None:
        """Write an attempt's outcome to its ledger row, the run's trace and the log."""
        budgets.settle(
            self.ledger,
            attempt.call_id,
            status=attempt.status,  # type: ignore[arg-type]
            usage=usage,
            cost_micro_usd=attempt.cost_micro_usd,
            priced=priced,
            error_type=attempt.error_type,
            http_status=attempt.http_status,
            request_id=attempt.request_id,
            error=attempt.error,
            latency_ms=attempt.latency_ms,
            served_model=served_model,
        )
        trace.attempts.append(attempt)
        tokens: dict[str, int] = {}
        if usage is not None:
            trace.tokens += usage.input_tokens + usage.output_tokens
            tokens = {
                "input_tokens": usage.input_tokens,
                "output_tokens": usage.output_tokens,
                "cache_read_tokens": usage.cache_read_tokens,
                "cache_write_tokens": usage.cache_write_tokens,
                "cache_write_1h_tokens": usage.cache_write_1h_tokens,
                "reasoning_tokens": usage.reasoning_tokens,
            }
        emit = self._log.info if attempt.status == "ok" else self._log.warning
        emit(
            "call.finished",
            loop=trace.loop,
            run_id=trace.run_id,
            purpose=attempt.purpose,
            provider=attempt.provider,
            model=attempt.model,
            alias=attempt.alias,
            attempt=attempt.attempt,
            status=attempt.status,
            error_type=attempt.error_type,
            http_status=attempt.http_status,
            error=attempt.error,
            cost_micro_usd=attempt.cost_micro_usd,
            latency_ms=attempt.latency_ms,
            simulated=trace.simulated,
            **tokens,
        )


def _ms_since(started: float) -> int:
    """Milliseconds since a `time.monotonic()` reading."""
    return int((time.monotonic() - started) * 1000)
