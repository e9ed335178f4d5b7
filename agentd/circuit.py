"""Circuit breakers: skip a model (or a whole provider) for a growing cooldown after failures."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from agentd.errors import ModelUnavailable, ProviderError


def counts_against_health(exc: ProviderError) -> bool:
    """True when a failed attempt counts towards opening the model's circuit.

    Only errors that say something about the model's (or its provider's) health, whoever sent
    the request, count: the retryable ones (rate limit, overload, 5xx, timeouts, connection
    errors), auth or billing trouble, and a model the provider does not serve. A bad request,
    a prompt too long for the context window or a malformed reply do not: one loop's oversized
    prompt must not open a model's circuit for every loop.
    """
    return exc.retryable or exc.opens_provider_circuit or isinstance(exc, ModelUnavailable)


@dataclass
class _State:
    consecutive_failures: int = 0
    trips: int = 0
    open_until: float = 0.0
    reason: str = ""


@dataclass
class CircuitBreakers:
    """Per-model and per-provider circuits, kept in process memory.

    A model's circuit opens after `failures` consecutive failed attempts; each trip uses the next
    cooldown of `cooldowns_s` (the last one repeats), and a success closes it and resets the trip
    count. A provider's circuit is opened directly by auth or billing errors.
    """

    failures: int = 3
    cooldowns_s: Sequence[float] = (30.0, 60.0, 300.0)
    clock: Callable[[], float] = time.monotonic
    _models: dict[str, _State] = field(default_factory=dict)
    _providers: dict[str, _State] = field(default_factory=dict)

    def open_reason(self, provider: str, model_key: str) -> str | None:
        """Why calls to this model are skipped now, or None when its circuits are closed."""
        now = self.clock()
        for scope, state in (
            ("provider", self._providers.get(provider)),
            ("model", self._models.get(model_key)),
        ):
            if state is not None and state.open_until > now:
                left = state.open_until - now
                return f"{scope} circuit open for {left:.0f}s more ({state.reason})"
        return None

    def record_success(self, model_key: str) -> None:
        """Close the model's circuit."""
        self._models.pop(model_key, None)

    def record_failure(self, model_key: str, reason: str) -> bool:
        """Count a failed attempt; return True when this failure opened the circuit."""
        state = self._models.setdefault(model_key, _State())
        state.consecutive_failures += 1
        if state.consecutive_failures < self.failures:
            return False
        cooldown = self.cooldowns_s[min(state.trips, len(self.cooldowns_s) - 1)]
        state.trips += 1
        state.consecutive_failures = 0
        state.open_until = self.clock() + cooldown
        state.reason = reason
        return True

    def open_provider(self, provider: str, cooldown_s: float, reason: str) -> None:
        """Stop calling a provider for `cooldown_s` (auth or billing trouble)."""
        state = self._providers.setdefault(provider, _State())
        state.trips += 1
        state.open_until = self.clock() + cooldown_s
        state.reason = reason
