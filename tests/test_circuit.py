"""Circuit breakers: consecutive failures open a model; cooldowns grow; success closes it."""

from __future__ import annotations

import pytest

from agentd.circuit import CircuitBreakers, counts_against_health
from agentd.errors import (
    AuthFailed,
    BadRequest,
    BillingExhausted,
    ConnectionFailed,
    ContextTooLong,
    MalformedResponse,
    ModelUnavailable,
    Overloaded,
    ProviderError,
    ProviderTimeout,
    RateLimited,
    ServerError,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_n_failures_and_cooldowns_grow() -> None:
    clock = Clock()
    cb = CircuitBreakers(failures=2, cooldowns_s=(30, 60, 300), clock=clock)
    assert cb.record_failure("a/m", "server_error") is False
    assert cb.open_reason("a", "a/m") is None
    assert cb.record_failure("a/m", "server_error") is True
    reason = cb.open_reason("a", "a/m")
    assert reason is not None and "model circuit open for 30s" in reason
    for cooldown in (60, 300, 300):
        clock.now += 1000
        assert cb.open_reason("a", "a/m") is None
        cb.record_failure("a/m", "server_error")
        assert cb.record_failure("a/m", "server_error") is True
        clock.now += cooldown - 1
        assert cb.open_reason("a", "a/m") is not None
        clock.now += 1
        assert cb.open_reason("a", "a/m") is None


def test_success_resets_the_count_and_the_trips() -> None:
    clock = Clock()
    cb = CircuitBreakers(failures=2, cooldowns_s=(30, 600), clock=clock)
    cb.record_failure("a/m", "x")
    cb.record_success("a/m")
    assert cb.record_failure("a/m", "x") is False
    assert cb.record_failure("a/m", "x") is True
    clock.now += 31
    cb.record_success("a/m")
    cb.record_failure("a/m", "x")
    cb.record_failure("a/m", "x")
    reason = cb.open_reason("a", "a/m")
    assert reason is not None and "30s" in reason  # back to the first cooldown


def test_provider_circuit_covers_all_its_models() -> None:
    clock = Clock()
    cb = CircuitBreakers(clock=clock)
    cb.open_provider("anthropic", 900, "auth_error")
    reason = cb.open_reason("anthropic", "anthropic/any-model")
    assert reason is not None and "provider circuit" in reason and "auth_error" in reason
    assert cb.open_reason("openai", "openai/gpt") is None
    clock.now += 900
    assert cb.open_reason("anthropic", "anthropic/any-model") is None


@pytest.mark.parametrize(
    ("exc", "counts"),
    [
        (RateLimited("429"), True),
        (Overloaded("529"), True),
        (ServerError("500"), True),
        (ProviderTimeout("timeout"), True),
        (ConnectionFailed("refused"), True),
        (AuthFailed("401"), True),
        (BillingExhausted("402"), True),
        (ModelUnavailable("404"), True),
        (BadRequest("400"), False),
        (ContextTooLong("too long"), False),
        (MalformedResponse("not JSON"), False),
    ],
)
def test_only_errors_about_the_models_health_count(exc: ProviderError, counts: bool) -> None:
    # A bad request, an oversized prompt or a garbled reply is one call's trouble: it must not
    # open a circuit that every loop shares.
    assert counts_against_health(exc) is counts
