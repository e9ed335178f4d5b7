"""What a run's calls did: its attempts, its trace, a chain's budget refusals, and writing an
attempt's outcome."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from agentd import budgets, pricing
from agentd.budgets import BudgetWindowExceeded
from agentd.config import ChainEntry, Config
from agentd.errors import BudgetExceeded, LedgerError
from agentd.eventloop import running_loop
from agentd.ledger import Ledger, now_iso
from agentd.logs import get_logger
from agentd.owedwrites import OwedWrite
from agentd.providers.base import Reply, Usage


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
    # Models the budget refused ("alias: why"), in order; each is also one of `skipped`.
    budget_refusals: list[str] = field(default_factory=list)
    # The exception behind each of `budget_refusals`, same order: its numbers, for alerts, so
    # they never depend on the wording of the message.
    budget_refused: list[BudgetExceeded] = field(default_factory=list)

    numbered: int = 0  # attempts with a `calls` row so far (the executor numbers them)
    tokens: int = 0  # settled input + output tokens of the run's attempts so far
    # Called before each attempt with (trace, reservation in micro-USD); raises to refuse it
    # before anything is reserved (the run's ceilings, `agentd.guardrails.RunGuard`).
    guard: Callable[[RunTrace, int], None] | None = field(default=None, repr=False)
    # The run's route so far (kept with a batch call, so a restart can finish the run).
    route: dict[str, Any] | None = field(default=None, repr=False)
    batch_ids: list[str] = field(default_factory=list)  # batches this run submitted
    batch_fallback: str | None = None  # why a batch call was made directly after all

    @property
    def cost_micro_usd(self) -> int:
        """Money this run has spent (or may have been billed) so far."""
        return sum(a.cost_micro_usd for a in self.attempts)


@dataclass(frozen=True)
class CallOutcome:
    """A successful call: the reply, which chain entry produced it, and what it cost."""

    reply: Reply
    entry: ChainEntry
    cost_micro_usd: int
    fallback: bool


class ChainOverBudget(BudgetWindowExceeded):
    """No model of a chain fitted the budget: each refusal in the message, and the numbers (and
    reset time) of the one nearest to fitting, so `when_over_budget: pause` waits no longer
    than the cheapest model needs."""

    def __init__(self, nearest: BudgetWindowExceeded, message: str) -> None:
        super().__init__(
            nearest.budget_window,
            used_micro_usd=nearest.used_micro_usd,
            asked_micro_usd=nearest.asked_micro_usd,
            resets_at=nearest.resets_at,
        )
        self.args = (message,)


def chain_over_budget(refusals: Sequence[tuple[str, BudgetExceeded]]) -> BudgetExceeded:
    """The refusal of a chain where no model fitted: every model's refusal in the message."""
    message = "; ".join(f"{alias}: {exc}" for alias, exc in refusals)
    windowed = [exc for _, exc in refusals if isinstance(exc, BudgetWindowExceeded)]
    if not windowed:
        return BudgetExceeded(message, window=refusals[0][1].window)
    # The cheapest model is the first to fit again: its window names the refusal.
    nearest = min(windowed, key=lambda exc: (exc.asked_micro_usd, exc.resets_at))
    return ChainOverBudget(nearest, message)


class Recorder:
    """Settles attempts in the ledger (with their list-price cost) and logs `call.finished`."""

    def __init__(self, config: Config, ledger: Ledger) -> None:
        self.config = config
        self.ledger = ledger
        self._list_prices: dict[str, pricing.Price | None] = {}  # alias -> list price
        self._log = get_logger()

    def list_cost(self, alias: str, usage: Usage) -> int | None:
        """The call's tokens at list price: all input uncached, no batch discount."""
        if alias not in self._list_prices:
            known = alias in self.config.models
            self._list_prices[alias] = self.config.price(alias) if known else None
        price = self._list_prices[alias]
        if price is None:
            return None
        plain = Usage(input_tokens=usage.input_tokens, output_tokens=usage.output_tokens)
        return pricing.to_micro_usd(pricing.cost_usd(price, plain))

    def record(
        self,
        trace: RunTrace,
        attempt: Attempt,
        *,
        usage: Usage | None,
        priced: bool,
        served_model: str | None = None,
    ) -> None:
        """Put an attempt's outcome in the run's trace; its ledger row and log event follow.

        The settle (with `list_cost_micro_usd`: the same tokens at list price, for `saved_usd`)
        and the `call.finished` event are owed to the ledger (`agentd.owedwrites`): written on
        the event loop's next turn, or with the next transaction of this ledger, whichever
        comes first, so the caller gets its reply one transaction sooner. Without a running
        event loop they are written before this returns.
        """
        list_cost: int | None = attempt.cost_micro_usd  # a failed attempt saved nothing
        if usage is not None and priced:
            list_cost = self.list_cost(attempt.alias, usage)
        trace.attempts.append(attempt)
        if usage is not None:
            trace.tokens += usage.input_tokens + usage.output_tokens
        finished_at = now_iso()

        def write() -> None:
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
                list_cost_micro_usd=list_cost,
                finished_at=finished_at,
            )

        def written() -> None:
            self._finished(trace, attempt, usage, served_model)

        self.ledger.owe(OwedWrite(write, written, f"settle call {attempt.call_id}"))
        loop = running_loop()
        if loop is None:
            self.ledger.flush()
        else:
            # One turn per attempt: a turn that finds the writes done already is a no-op.
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        """The event loop's turn after an attempt: write what the ledger owes."""
        try:
            self.ledger.flush()
        except LedgerError as exc:
            # Still owed: the next transaction carries them again and fails its caller (a
            # reservation then makes no call), the run's finish included.
            self._log.error("ledger.flush_failed", owed=self.ledger.owed, error=str(exc))

    def _finished(
        self, trace: RunTrace, attempt: Attempt, usage: Usage | None, served_model: str | None
    ) -> None:
        """Log `call.finished` (and a substituted model) once the attempt's row is written."""
        if served_model and served_model != attempt.model:
            self._substituted(trace, attempt, served_model)
        tokens: dict[str, int] = {}
        if usage is not None:
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

    def _substituted(self, trace: RunTrace, attempt: Attempt, served: str) -> None:
        """Log `call.model_substituted`: the provider says another model answered.

        A dated snapshot of the model asked for (`claude-haiku-4-5` served as
        `claude-haiku-4-5-20251001`) is how the providers resolve an alias: logged at info.
        Any other model is a pin that drifted: a warning.
        """
        snapshot = served.startswith(f"{attempt.model}-")
        emit = self._log.info if snapshot else self._log.warning
        emit(
            "call.model_substituted",
            loop=trace.loop,
            run_id=trace.run_id,
            alias=attempt.alias,
            provider=attempt.provider,
            asked=attempt.model,
            served=served,
            snapshot=snapshot,
        )
