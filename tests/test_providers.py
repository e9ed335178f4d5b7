"""Providers: the real SDKs over real HTTP against the fake server, and the simulated model."""

from __future__ import annotations

import asyncio
import gc
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from email.utils import formatdate
from typing import Any

import pytest
from fakeserver import FakeServer, drop, error, malformed, no_usage, ok, timeout

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
from agentd.providers import Message, Provider, Reply, Request, Usage, build_provider
from agentd.providers.anthropic import AnthropicProvider
from agentd.providers.errormap import parse_retry_after, status_error_class
from agentd.providers.openai import OpenAIProvider
from agentd.providers.simulated import SimulatedProvider

ANT_KEY = "sk-ant-api03-TESTSECRET-0001"
OAI_KEY = "sk-proj-TESTSECRET-0002"
HAIKU = "claude-haiku-4-5"
GPT = "gpt-5.4-mini"


def request(
    model: str,
    *,
    text: str = "Say hi.",
    max_tokens: int = 100,
    timeout_s: float = 5.0,
    system: str | None = "You are terse.",
) -> Request:
    return Request(
        model=model,
        messages=(Message("user", text),),
        max_tokens=max_tokens,
        system=system,
        timeout_s=timeout_s,
    )


def anthropic(
    server: FakeServer, *, key: str | None = ANT_KEY, timeout_s: float = 5.0
) -> AnthropicProvider:
    return AnthropicProvider("anthropic", api_key=key, base_url=server.url, timeout_s=timeout_s)


def openai(
    server: FakeServer, *, key: str | None = OAI_KEY, timeout_s: float = 5.0
) -> OpenAIProvider:
    return OpenAIProvider("openai", api_key=key, base_url=f"{server.url}/v1", timeout_s=timeout_s)


MakeProvider = Callable[..., Provider]
PROVIDERS: dict[str, tuple[MakeProvider, str, str]] = {
    "anthropic": (anthropic, HAIKU, ANT_KEY),
    "openai": (openai, GPT, OAI_KEY),
}


async def _once(provider: Provider, req: Request) -> Reply:
    try:
        return await provider.complete(req)
    finally:
        await provider.aclose()


def complete(provider: Provider, req: Request) -> Reply:
    return asyncio.run(_once(provider, req))


def fails(provider: Provider, req: Request) -> ProviderError:
    with pytest.raises(ProviderError) as info:
        complete(provider, req)
    return info.value


def sent_key(server: FakeServer) -> str | None:
    """The API key the last request carried, from whichever header the SDK used."""
    headers = server.requests[-1].headers
    if "x-api-key" in headers:
        return headers["x-api-key"]
    auth = headers.get("authorization", "")
    return auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None


# --- successful calls --------------------------------------------------------------------


def test_anthropic_usage_counts_cache_tokens_as_input(fake_server: FakeServer) -> None:
    fake_server.script(
        HAIKU,
        ok("Hi there.", input_tokens=1000, output_tokens=200, cache_read=200, cache_write=100),
    )
    reply = complete(anthropic(fake_server), request(HAIKU))
    assert reply.usage == Usage(
        input_tokens=1300,
        output_tokens=200,
        cache_read_tokens=200,
        cache_write_tokens=100,
        reasoning_tokens=0,
    )
    assert reply.usage.uncached_input_tokens == 1000
    assert reply.text == "Hi there."
    assert reply.model == HAIKU
    assert reply.stop_reason == "end_turn"
    received = fake_server.requests[-1]
    assert reply.request_id == received.request_id
    assert received.path == "/v1/messages"
    assert received.body == {
        "model": HAIKU,
        "max_tokens": 100,
        "system": "You are terse.",
        "messages": [{"role": "user", "content": "Say hi."}],
    }
    assert sent_key(fake_server) == ANT_KEY
    assert "anthropic-version" in received.headers


def test_anthropic_thinking_tokens_are_reported_as_reasoning(fake_server: FakeServer) -> None:
    fake_server.script(HAIKU, ok(input_tokens=10, output_tokens=300, reasoning=120))
    reply = complete(anthropic(fake_server), request(HAIKU, system=None))
    assert reply.usage == Usage(input_tokens=10, output_tokens=300, reasoning_tokens=120)
    assert "system" not in fake_server.requests[-1].body


def test_openai_usage_keeps_cached_and_reasoning_tokens(fake_server: FakeServer) -> None:
    fake_server.script(
        GPT, ok("Hello.", input_tokens=2000, output_tokens=500, cache_read=1000, reasoning=300)
    )
    reply = complete(openai(fake_server), request(GPT))
    assert reply.usage == Usage(
        input_tokens=2000,
        output_tokens=500,
        cache_read_tokens=1000,
        cache_write_tokens=0,
        reasoning_tokens=300,
    )
    assert reply.text == "Hello."
    assert reply.stop_reason == "stop"
    received = fake_server.requests[-1]
    assert reply.request_id == received.request_id
    assert received.path == "/v1/chat/completions"
    assert received.body["messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say hi."},
    ]
    assert received.body["max_completion_tokens"] == 100
    assert received.body["max_tokens"] == 100  # not api.openai.com: older servers read only this
    assert received.headers["authorization"] == f"Bearer {OAI_KEY}"


def test_openai_keyless_provider_ignores_environment_key(
    fake_server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-the-environment")
    reply = complete(openai(fake_server, key=None), request(GPT))
    assert reply.text
    assert "sk-from-the-environment" not in str(fake_server.requests[-1].headers)


def test_anthropic_explicit_key_beats_environment_credentials(
    fake_server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-from-env")
    monkeypatch.setenv("ANTHROPIC_AUTH_TOKEN", "token-from-env")
    complete(anthropic(fake_server), request(HAIKU))
    assert sent_key(fake_server) == ANT_KEY
    assert "from-env" not in str(fake_server.requests[-1].headers)


def test_base_url_from_environment_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_BASE_URL", "http://attacker.invalid")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://attacker.invalid/v1")
    ant = AnthropicProvider("a", api_key="k", base_url=None)
    oai = OpenAIProvider("o", api_key="k", base_url=None)

    async def built() -> tuple[str, str]:
        await ant.prepare()
        await oai.prepare()
        ant_built, oai_built = ant._sdk.built, oai._sdk.built
        assert ant_built is not None and oai_built is not None
        return str(ant_built[0].base_url), str(oai_built[0].base_url)

    ant_url, oai_url = asyncio.run(built())
    assert ant_url.startswith("https://api.anthropic.com")
    assert oai_url.startswith("https://api.openai.com/v1")


# --- HTTP errors -------------------------------------------------------------------------

STATUS_CLASSES = {
    400: BadRequest,
    401: AuthFailed,
    402: BillingExhausted,
    403: AuthFailed,
    404: ModelUnavailable,
    408: ServerError,
    413: ContextTooLong,
    422: BadRequest,
    429: RateLimited,
    500: ServerError,
    501: ModelUnavailable,
    502: ServerError,
    503: ServerError,
    504: ServerError,
    529: Overloaded,
}


@pytest.mark.parametrize("api", sorted(PROVIDERS))
@pytest.mark.parametrize("status", sorted(STATUS_CLASSES))
def test_error_status_maps_to_class(fake_server: FakeServer, api: str, status: int) -> None:
    make, model, key = PROVIDERS[api]
    fake_server.script(model, error(status))
    exc = fails(make(fake_server), request(model))
    assert type(exc) is STATUS_CLASSES[status]
    assert exc.http_status == status
    assert exc.request_id == fake_server.requests[-1].request_id
    assert exc.may_have_billed is False
    assert exc.retry_after_s is None
    assert str(exc).startswith(f"{api} {model}: {status} ")
    assert key not in str(exc)
    assert isinstance(exc.__cause__, Exception)  # raised from the SDK's exception


def test_rate_limit_keeps_retry_after_and_reads_well(fake_server: FakeServer) -> None:
    fake_server.script(HAIKU, error(429, retry_after=2, message="Rate limited"))
    exc = fails(anthropic(fake_server), request(HAIKU))
    assert isinstance(exc, RateLimited)
    assert exc.retry_after_s == 2.0
    assert (
        str(exc)
        == "anthropic claude-haiku-4-5: 429 rate_limit_error: Rate limited (retry after 2s)"
    )


def test_retry_after_http_date_and_ms(fake_server: FakeServer) -> None:
    fake_server.script(
        GPT,
        error(429, retry_after=formatdate(time.time() + 30, usegmt=True)),
        error(429, headers={"retry-after-ms": "1500", "retry-after": "9"}),
    )
    first = fails(openai(fake_server), request(GPT))
    assert first.retry_after_s is not None and 25 <= first.retry_after_s <= 31
    second = fails(openai(fake_server), request(GPT))
    assert second.retry_after_s == 1.5


@pytest.mark.parametrize(
    ("api", "kwargs"),
    [
        (
            "openai",
            {
                "error_type": "insufficient_quota",
                "code": "insufficient_quota",
                "message": "You exceeded your current quota, please check your plan.",
            },
        ),
        ("anthropic", {"code": "enforced_spend_limit_reached", "message": "Spend limit reached."}),
        ("anthropic", {"error_type": "billing_error", "message": "Billing issue."}),
    ],
)
def test_quota_429_is_billing_exhausted(
    fake_server: FakeServer, api: str, kwargs: dict[str, Any]
) -> None:
    make, model, _ = PROVIDERS[api]
    fake_server.script(model, error(429, retry_after=60, **kwargs))
    exc = fails(make(fake_server), request(model))
    assert isinstance(exc, BillingExhausted)
    assert exc.http_status == 429


def test_anthropic_low_credit_400_is_billing_exhausted(fake_server: FakeServer) -> None:
    fake_server.script(
        HAIKU, error(400, message="Your credit balance is too low to access the Anthropic API.")
    )
    assert isinstance(fails(anthropic(fake_server), request(HAIKU)), BillingExhausted)


@pytest.mark.parametrize(
    ("api", "kwargs"),
    [
        (
            "openai",
            {
                "code": "context_length_exceeded",
                "message": "This model's maximum context length is 128000 tokens.",
            },
        ),
        ("anthropic", {"message": "prompt is too long: 210000 tokens > 200000 maximum"}),
    ],
)
def test_context_length_400_is_context_too_long(
    fake_server: FakeServer, api: str, kwargs: dict[str, Any]
) -> None:
    make, model, _ = PROVIDERS[api]
    fake_server.script(model, error(400, **kwargs))
    exc = fails(make(fake_server), request(model))
    assert isinstance(exc, ContextTooLong)
    assert exc.http_status == 400


def test_anthropic_overloaded_type_on_other_status(fake_server: FakeServer) -> None:
    fake_server.script(HAIKU, error(503, error_type="overloaded_error"))
    assert isinstance(fails(anthropic(fake_server), request(HAIKU)), Overloaded)


@pytest.mark.parametrize("api", sorted(PROVIDERS))
def test_error_message_never_contains_the_key(fake_server: FakeServer, api: str) -> None:
    make, model, key = PROVIDERS[api]
    fake_server.script(model, error(401, message=f"Incorrect API key provided: {key}."))
    exc = fails(make(fake_server), request(model))
    assert isinstance(exc, AuthFailed)
    assert key not in str(exc)
    assert "sk-" not in str(exc)


def test_non_json_error_body_still_maps(fake_server: FakeServer) -> None:
    fake_server.script(HAIKU, error(502, raw_body="<html><h1>502 Bad Gateway</h1></html>"))
    exc = fails(anthropic(fake_server), request(HAIKU))
    assert isinstance(exc, ServerError) and exc.http_status == 502
    assert "502 Bad Gateway" in str(exc)


# --- transport failures and unusable bodies ----------------------------------------------


@pytest.mark.parametrize("api", sorted(PROVIDERS))
def test_timeout_may_have_billed(fake_server: FakeServer, api: str) -> None:
    make, model, _ = PROVIDERS[api]
    fake_server.script(model, timeout(2))
    started = time.monotonic()
    exc = fails(make(fake_server, timeout_s=0.3), request(model, timeout_s=0.3))
    assert time.monotonic() - started < 1.5
    assert isinstance(exc, ProviderTimeout)
    assert exc.may_have_billed is True
    assert fake_server.count(model) == 1


@pytest.mark.parametrize("api", sorted(PROVIDERS))
def test_dropped_connection_may_have_billed(fake_server: FakeServer, api: str) -> None:
    make, model, _ = PROVIDERS[api]
    fake_server.script(model, drop())
    exc = fails(make(fake_server), request(model))
    assert isinstance(exc, ConnectionFailed)
    assert exc.may_have_billed is True
    assert fake_server.count(model) == 1


@pytest.mark.parametrize("api", sorted(PROVIDERS))
def test_refused_connection_was_not_billed(api: str) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago and has no listener now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    provider = build_provider(
        api,
        api,
        api_key="sk-x",
        timeout_s=2,
        base_url=f"http://127.0.0.1:{port}" + ("/v1" if api == "openai" else ""),
    )
    exc = fails(provider, request(PROVIDERS[api][1]))
    assert isinstance(exc, ConnectionFailed)
    assert exc.may_have_billed is False


def test_connect_timeout_was_not_billed() -> None:
    import httpx2
    import openai as sdk

    from agentd.providers.errormap import CallContext, SdkErrors, map_exception

    errors = SdkErrors(
        sdk.APIStatusError,
        sdk.APITimeoutError,
        sdk.APIConnectionError,
        sdk.APIResponseValidationError,
        sdk.OpenAIError,
    )
    try:
        try:
            raise httpx2.ConnectTimeout("connect timed out")
        except httpx2.ConnectTimeout as cause:
            raise sdk.APITimeoutError(request=httpx2.Request("POST", "http://x/")) from cause
    except sdk.APITimeoutError as exc:
        mapped = map_exception(exc, errors, CallContext("openai", GPT, 1.0))
    assert isinstance(mapped, ConnectionFailed) and mapped.may_have_billed is False


def assert_malformed_maybe_billed(exc: BaseException, fake_server: FakeServer) -> None:
    """A 200 that cannot be used: may have been billed (charged at the reservation)."""
    assert isinstance(exc, MalformedResponse)
    assert exc.may_have_billed is True
    assert exc.http_status == 200
    assert exc.request_id == fake_server.requests[-1].request_id


@pytest.mark.parametrize("api", sorted(PROVIDERS))
def test_malformed_body_is_malformed_response(fake_server: FakeServer, api: str) -> None:
    make, model, _ = PROVIDERS[api]
    fake_server.script(model, malformed())
    assert_malformed_maybe_billed(fails(make(fake_server), request(model)), fake_server)


@pytest.mark.parametrize("api", sorted(PROVIDERS))
def test_missing_usage_is_malformed_response(fake_server: FakeServer, api: str) -> None:
    make, model, _ = PROVIDERS[api]
    fake_server.script(model, no_usage())
    assert_malformed_maybe_billed(fails(make(fake_server), request(model)), fake_server)


@pytest.mark.parametrize(
    ("api", "odd", "usage"),
    [
        (
            "anthropic",
            {
                "input_tokens": 100.0,
                "output_tokens": "20",
                "cache_read_input_tokens": "5",
                "cache_creation_input_tokens": 8.0,
                "cache_creation": {"ephemeral_1h_input_tokens": "3"},
                "output_tokens_details": {"thinking_tokens": 4.0},
            },
            Usage(
                113,
                20,
                cache_read_tokens=5,
                cache_write_tokens=8,
                cache_write_1h_tokens=3,
                reasoning_tokens=4,
            ),
        ),
        (
            "openai",
            {
                "prompt_tokens": "100",
                "completion_tokens": 20.0,
                "prompt_tokens_details": {"cached_tokens": "64"},
                "completion_tokens_details": {"reasoning_tokens": 3.0},
            },
            Usage(100, 20, cache_read_tokens=64, reasoning_tokens=3),
        ),
    ],
)
def test_counts_sent_as_whole_floats_or_digit_strings_are_read_exactly(
    fake_server: FakeServer, api: str, odd: dict[str, Any], usage: Usage
) -> None:
    # The SDKs' response models used to coerce these; agentd reads the JSON itself now.
    make, model, _ = PROVIDERS[api]
    fake_server.script(model, ok("Hi.", input_tokens=1, output_tokens=1, wire_usage=odd))
    reply = complete(make(fake_server), request(model))
    assert reply.usage == usage
    assert all(type(v) is int for v in vars(reply.usage).values())
    assert reply.text == "Hi."


@pytest.mark.parametrize(
    ("api", "odd"),
    [
        ("anthropic", {"output_tokens": True}),
        ("anthropic", {"input_tokens": 1.5}),
        ("anthropic", {"input_tokens": None}),
        ("anthropic", {"cache_read_input_tokens": "abc"}),
        ("anthropic", {"cache_creation_input_tokens": -1}),
        ("anthropic", {"cache_creation": {"ephemeral_1h_input_tokens": "1e3"}}),
        ("anthropic", {"output_tokens_details": {"thinking_tokens": [1]}}),
        ("openai", {"prompt_tokens": "12 tokens"}),
        ("openai", {"completion_tokens": float("inf")}),
        ("openai", {"prompt_tokens_details": {"cached_tokens": "6.4"}}),
        ("openai", {"completion_tokens_details": {"reasoning_tokens": {}}}),
    ],
)
def test_a_count_that_is_not_a_whole_number_is_malformed_and_may_have_billed(
    fake_server: FakeServer, api: str, odd: dict[str, Any]
) -> None:
    # Never priced as 0 (a cache write costs more than plain input): charged at the reservation.
    make, model, _ = PROVIDERS[api]
    fake_server.script(model, ok("Hi.", input_tokens=1, output_tokens=1, wire_usage=odd))
    assert_malformed_maybe_billed(fails(make(fake_server), request(model)), fake_server)


def test_script_is_per_model_fifo_then_default(fake_server: FakeServer) -> None:
    fake_server.set_default("default", input_tokens=7, output_tokens=3)
    fake_server.script(HAIKU, error(500), ok("second", input_tokens=1, output_tokens=1))

    async def three() -> list[str]:
        provider = anthropic(fake_server)
        out: list[str] = []
        try:
            for _ in range(3):
                try:
                    out.append((await provider.complete(request(HAIKU))).text)
                except ServerError:
                    out.append("500")
        finally:
            await provider.aclose()
        return out

    assert asyncio.run(three()) == ["500", "second", "default"]
    assert fake_server.count(HAIKU) == 3 and fake_server.count(GPT) == 0
    assert complete(openai(fake_server), request(GPT)).usage == Usage(7, 3)


# --- simulated provider and packaging ----------------------------------------------------


def test_simulated_is_deterministic_and_respects_max_tokens() -> None:
    sim = SimulatedProvider()
    first = complete(sim, request("claude-haiku-5-5", max_tokens=10))
    again = complete(SimulatedProvider("other"), request("claude-haiku-5-5", max_tokens=10))
    assert first == again
    assert first.model == "claude-haiku-5-5"
    assert first.text.startswith("[simulated reply from claude-haiku-5-5]")
    assert 1 <= first.usage.output_tokens <= 10
    assert first.usage.cache_read_tokens == first.usage.cache_write_tokens == 0
    other = complete(sim, request("claude-haiku-5-5", text="Something else entirely."))
    assert other.text != first.text
    long = complete(sim, request("m", text="x" * 4000, max_tokens=10_000))
    assert long.usage.input_tokens >= 1000
    assert 50 <= long.usage.output_tokens < 250


def test_simulated_answers_a_quiet_token() -> None:
    reply = complete(
        SimulatedProvider(),
        request("m", text="Check the queue. If nothing needs attention, reply HEARTBEAT_OK."),
    )
    assert reply.text == "HEARTBEAT_OK"


def test_importing_providers_does_not_import_the_sdks() -> None:
    code = (
        "import sys, agentd.providers as p\n"
        "p.build_provider('a', 'anthropic', api_key='k', base_url=None, timeout_s=1)\n"
        "p.build_provider('o', 'openai', api_key=None, base_url=None, timeout_s=1)\n"
        "loaded = {'anthropic', 'openai', 'httpx2'} & set(sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_build_provider_rejects_unknown_type() -> None:
    with pytest.raises(ValueError, match="unknown provider type"):
        build_provider("x", "gemini", api_key=None, base_url=None, timeout_s=1)


# --- error mapping details ---------------------------------------------------------------


def test_parse_retry_after_forms() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after({"retry-after": "3"}) == 3.0
    assert parse_retry_after({"retry-after": "0.5"}) == 0.5
    assert parse_retry_after({"retry-after-ms": "250"}) == 0.25
    assert parse_retry_after({"retry-after": formatdate(now + 10, usegmt=True)}, now=now) == 10.0
    assert parse_retry_after({"retry-after": formatdate(now - 10, usegmt=True)}, now=now) == 0.0
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None


def test_status_error_class_table() -> None:
    assert status_error_class(429, "requests", "rate_limit_exceeded", None) is RateLimited
    assert status_error_class(429, "insufficient_quota", None, None) is BillingExhausted
    assert (
        status_error_class(
            400, "invalid_request_error", None, "input length and `max_tokens` exceed context limit"
        )
        is ContextTooLong
    )
    assert status_error_class(400, "invalid_request_error", None, "messages: empty") is BadRequest
    assert status_error_class(400, None, None, "exceeds the context window") is ContextTooLong
    assert status_error_class(422, None, None, "bad field") is BadRequest
    assert status_error_class(418, None, None, None) is BadRequest
    assert status_error_class(599, None, None, None) is ServerError


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("api", sorted(PROVIDERS))
def test_provider_survives_successive_event_loops(fake_server: FakeServer, api: str) -> None:
    make, model, _ = PROVIDERS[api]
    provider = make(fake_server)
    first = asyncio.run(provider.complete(request(model)))  # no aclose: its loop just ends
    second = complete(provider, request(model))
    assert first.text == second.text
    assert fake_server.count(model) == 2
    gc.collect()  # the abandoned client's socket warns here, not in some later test
