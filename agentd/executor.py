"""One model call: budget reservation, retries, fallback chain, circuit breakers, ledger rows."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from agentd import batches, budgets, pricing
from agentd.attempts import Attempt as Attempt
from agentd.attempts import CallOutcome as CallOutcome
from agentd.attempts import Recorder, chain_over_budget
from agentd.attempts import RunTrace as RunTrace
from agentd.batches import (
    BatchItemFailed,
    BatchMode,
    Submitted,
)
from agentd.budgets import CallStart, Window
from agentd.circuit import CircuitBreakers, counts_against_health
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
from agentd.providers.base import CacheMark, Message, Provider, Reply, Request

Sleep = Callable[[float], Awaitable[None]]

_BACKOFF_BASE_S = 1.0


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
        simulator_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._simulator_clock = simulator_clock  # the simulated prompt cache's clock
        self.recorder = Recorder(config, ledger)  # settles attempts (batchresume uses it too)
        # Tasks waiting on a submitted batch item: a stopping daemon cancels them at once,
        # since their items survive it (see `Dispatcher.drain`).
        self.batch_waiters = batches.BatchWaiters()
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

                self._providers[name] = SimulatedProvider(name, clock=self._simulator_clock)
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
        batch: BatchMode | None = None,
    ) -> CallOutcome:
        """Get one reply from the first model of `chain` that works and fits the budget.

        `cache` marks the prompt's stable prefix for the provider's cache (`agentd.caching`);
        `batch` sends the call through the providers' batch APIs (`agentd.batches`): when no
        batch item comes back with a reply, its `on_failure` makes the call directly or fails.

        A model whose reservation does not fit the budget is skipped like one whose circuit is
        open (no `calls` row; listed in the trace's `skipped` and `budget_refusals`), and the
        chain goes on to the next model.

        Raises BudgetExceeded when no model was tried and at least one was refused by the
        budget (the loop's `when_over_budget` decides then), MissingKeyError when the primary
        model's key is missing, and RunFailed (or CircuitOpen) when every model failed or was
        cooling down.
        """
        args = (trace, purpose, chain, system, messages, max_tokens, windows, cache)
        if batch is None:
            return await self._call_chain(*args, None)
        try:
            return await self._call_chain(*args, batch)
        except (BatchItemFailed, RunFailed) as exc:
            if batch.on_failure == "fail":
                raise RunFailed(f"batch call failed (batch on_failure: fail): {exc}") from exc
            trace.batch_fallback = str(exc)
            self._log.warning(
                "batch.fallback", loop=trace.loop, run_id=trace.run_id, error=str(exc)
            )
        return await self._call_chain(*args, None)

    async def _call_chain(
        self,
        trace: RunTrace,
        purpose: str,
        chain: Sequence[ChainEntry],
        system: str | None,
        messages: Sequence[Message],
        max_tokens: int,
        windows: Sequence[Window],
        cache: CacheMark | None,
        batch: BatchMode | None,
    ) -> CallOutcome:
        """`call` along one chain, directly or (with `batch`) through the batch APIs."""
        tries: list[_ModelTry] = []
        refusals: list[tuple[str, BudgetExceeded]] = []
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
                    batch,
                )
            except BudgetExceeded as exc:
                # A refusal is a skip, like an open circuit: a cheaper model further along the
                # chain may still fit. Only a chain where nothing fitted goes back to the loop's
                # `when_over_budget` (below).
                self._skip(trace, entry, str(exc))
                refusals.append((entry.alias, exc))
                trace.budget_refusals.append(f"{entry.alias}: {exc}")
                trace.budget_refused.append(exc)
                if model_try.attempts == 0:
                    tries.pop()
                else:
                    model_try.last_error = str(exc)
                continue
            except BatchItemFailed:
                raise  # the item ended without a reply: `call` decides, not the chain
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
            if refusals:
                raise chain_over_budget(refusals)
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
        batch: BatchMode | None = None,
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
                    batch,
                )
            except BatchItemFailed as exc:
                model_try.last_error = str(exc)
                raise  # an expired or canceled item says nothing about the model's health
            except ProviderError as exc:
                model_try.last_error = str(exc)
                if exc.opens_provider_circuit:
                    cb = self.config.circuit_breaker
                    cooldown = (
                        cb.billing_cooldown_s if exc.code == "billing_error" else cb.auth_cooldown_s
                    )
                    self.breakers.open_provider(entry.provider_name, cooldown, str(exc))
                opened = False
                if counts_against_health(exc):
                    # The reason keeps the real error, so "every model is cooling down" still
                    # says why.
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
        """Exponential backoff with jitter; the provider's retry-after wins when it says more.

        A retry-after of 0 (or shorter than the backoff) does not shorten the wait: a provider
        that is failing gets the backoff's breathing room whatever its header says.
        """
        jitter: float = random.uniform(0.5, 1.0)
        backoff = _BACKOFF_BASE_S * (2.0**retries) * jitter
        if retry_after_s is None:
            return backoff
        return max(backoff, retry_after_s)

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
        batch: BatchMode | None = None,
    ) -> tuple[Reply, int]:
        """Reserve, call, settle: exactly one `calls` row, settled on every exit path.

        A submitted batch item is the exception: when the wait ends early (shutdown, or
        `--no-wait`) its row stays `submitted` for `agentd.batchresume` to settle.
        """
        entry = model_try.entry
        await provider.prepare()  # the SDK's import (seconds) is not this call's latency
        price = self.config.price(entry.alias, batch=batch is not None)
        amount = _reservation(price, system, messages, max_tokens)  # one price lookup, not two
        if amount is None and windows:
            raise BudgetExceeded(f"{entry.alias} has no known price", window="")
        reserved = amount or 0
        # Held for the request; a batch call gives it back while it waits (hours, maybe).
        slot = _Slot(self._semaphore(entry.provider_name, entry.provider.max_concurrency))
        await slot.acquire()
        try:
            if trace.guard is not None:
                trace.guard(trace, reserved)
            # Numbered once its row exists: a refused reservation is no attempt, and reserve()
            # does not await, so no other call of the run takes a number meanwhile.
            number = trace.numbered + 1
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
                    batch=batch is not None,
                ),
                reserved,
                windows,
                self.config.tz,
            )
            trace.numbered = number
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
            submitted = Submitted()
            try:
                if batch is None:
                    reply = await provider.complete(request)
                else:
                    reply = await batches.submit_and_wait(
                        self.ledger,
                        trace,
                        pending,
                        provider,
                        request,
                        batch,
                        submitted,
                        release=slot.release,
                        waiters=self.batch_waiters,
                        sleep=self._sleep,
                    )
                cost = pricing.to_micro_usd(pricing.cost_usd(price, reply.usage)) if price else 0
                self.recorder.record(
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
                self.recorder.record(
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
                if not settled and submitted.batch_id is None:
                    # Cancellation or an unexpected bug mid-call: the request may have been
                    # sent, so keep its reservation as spent rather than pretend it was free.
                    self.recorder.record(
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
        finally:
            slot.release()


class _Slot:
    """One hold of a provider's concurrency semaphore, released at most once."""

    def __init__(self, semaphore: asyncio.Semaphore) -> None:
        self._semaphore = semaphore
        self._held = False

    async def acquire(self) -> None:
        """Wait for the semaphore."""
        await self._semaphore.acquire()
        self._held = True

    def release(self) -> None:
        """Give the semaphore back, if still held."""
        if self._held:
            self._held = False
            self._semaphore.release()


def _reservation(
    price: pricing.Price | None, system: str | None, messages: Sequence[Message], max_tokens: int
) -> int | None:
    """`Config.worst_case_micro_usd` for a price already looked up."""
    if price is None:
        return None
    bound = pricing.request_token_bound(system, [m.content for m in messages])
    return pricing.reservation_micro_usd(price, bound, max_tokens)


def _ms_since(started: float) -> int:
    """Milliseconds since a `time.monotonic()` reading."""
    return int((time.monotonic() - started) * 1000)
