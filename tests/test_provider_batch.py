"""Provider batch APIs: the real SDKs over real HTTP against the fake server's batch endpoints."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from fakeserver import (
    FakeServer,
    Step,
    canceled,
    drop,
    error,
    expired,
    invalid,
    malformed,
    no_usage,
    ok,
    timeout,
)

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
from agentd.providers.anthropic import AnthropicProvider
from agentd.providers.base import (
    BatchOutcome,
    BatchProvider,
    BatchSubmission,
    Message,
    Reply,
    Request,
    Usage,
)
from agentd.providers.openai import OpenAIProvider
from agentd.providers.simulated import SimulatedProvider

ANT_KEY = "sk-ant-api03-TESTSECRET-0001"
OAI_KEY = "sk-proj-TESTSECRET-0002"
HAIKU = "claude-haiku-4-5"
GPT = "gpt-5.4-mini"
APIS = ("anthropic", "openai")
T = TypeVar("T")

Provider = AnthropicProvider | OpenAIProvider


def request(model: str, text: str = "Summarise the queue.") -> Request:
    return Request(
        model=model,
        messages=(Message("user", text),),
        max_tokens=100,
        system="You are terse.",
        timeout_s=5.0,
    )


def provider(server: FakeServer, api: str, *, timeout_s: float = 5.0) -> Provider:
    if api == "anthropic":
        return AnthropicProvider(
            "anthropic", api_key=ANT_KEY, base_url=server.url, timeout_s=timeout_s
        )
    return OpenAIProvider(
        "openai", api_key=OAI_KEY, base_url=f"{server.url}/v1", timeout_s=timeout_s
    )


def model_of(api: str) -> str:
    return HAIKU if api == "anthropic" else GPT


def key_of(api: str) -> str:
    return ANT_KEY if api == "anthropic" else OAI_KEY


def sent_key(headers: dict[str, str]) -> str | None:
    """The API key a request carried, from whichever header the SDK used."""
    if "x-api-key" in headers:
        return headers["x-api-key"]
    auth = headers.get("authorization", "")
    return auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None


def run(prov: Provider, work: Callable[[Provider], Awaitable[T]]) -> T:
    """Run `work` in a fresh event loop and close the provider's client after it."""

    async def go() -> T:
        try:
            return await work(prov)
        finally:
            await prov.aclose()

    return asyncio.run(go())


def submit_and_poll(
    server: FakeServer, api: str, *, polls: int = 1, custom_id: str = "run-1"
) -> tuple[BatchSubmission, list[BatchOutcome]]:
    """Submit one request, then poll `polls` times."""

    async def work(p: Provider) -> tuple[BatchSubmission, list[BatchOutcome]]:
        sub = await p.submit_batch(request(model_of(api)), custom_id)
        return sub, [await p.poll_batch(sub.batch_id, custom_id) for _ in range(polls)]

    return run(provider(server, api), work)


def item_outcome(server: FakeServer, api: str, step: Step) -> BatchOutcome:
    server.script(model_of(api), step)
    _, [outcome] = submit_and_poll(server, api)
    return outcome


def direct_error(server: FakeServer, api: str, step: Step) -> ProviderError:
    server.script(model_of(api), step)
    with pytest.raises(ProviderError) as info:
        run(provider(server, api), lambda p: p.complete(request(model_of(api))))
    return info.value


# --- success -----------------------------------------------------------------------------


def test_providers_are_batch_providers(fake_server: FakeServer) -> None:
    assert isinstance(provider(fake_server, "anthropic"), BatchProvider)
    assert isinstance(provider(fake_server, "openai"), BatchProvider)
    assert isinstance(SimulatedProvider(), BatchProvider)


def test_anthropic_batch_succeeds_with_exact_usage(fake_server: FakeServer) -> None:
    fake_server.script(
        HAIKU,
        ok(
            "Batched.",
            input_tokens=1000,
            output_tokens=200,
            cache_read=200,
            cache_write=100,
            cache_write_1h=40,
            reasoning=30,
        ),
    )
    sub, [outcome] = submit_and_poll(fake_server, "anthropic")
    assert outcome.state == "succeeded" and outcome.error is None
    reply = outcome.reply
    assert reply is not None
    assert reply.usage == Usage(
        input_tokens=1300,
        output_tokens=200,
        cache_read_tokens=200,
        cache_write_tokens=100,
        reasoning_tokens=30,
        cache_write_1h_tokens=40,
    )
    assert (reply.text, reply.model, reply.stop_reason) == ("Batched.", HAIKU, "end_turn")
    assert reply.request_id is None  # Anthropic results carry no per-item request id
    [create] = fake_server.batch_calls("create")
    assert sub.request_id == create.request_id and sub.custom_id == "run-1"
    assert sent_key(create.headers) == ANT_KEY
    [item] = fake_server.requests
    assert (item.batch_id, item.custom_id, item.path) == (sub.batch_id, "run-1", "/v1/messages")
    assert fake_server.count(HAIKU) == 1
    # The item's params are exactly what a direct call sends.
    run(provider(fake_server, "anthropic"), lambda p: p.complete(request(HAIKU)))
    assert fake_server.requests[-1].batch_id is None
    assert item.body == fake_server.requests[-1].body


def test_openai_batch_succeeds_with_exact_usage(fake_server: FakeServer) -> None:
    fake_server.script(
        GPT, ok("Batched.", input_tokens=2000, output_tokens=500, cache_read=1000, reasoning=300)
    )
    sub, [outcome] = submit_and_poll(fake_server, "openai")
    assert outcome.state == "succeeded"
    reply = outcome.reply
    assert reply is not None
    assert reply.usage == Usage(
        input_tokens=2000, output_tokens=500, cache_read_tokens=1000, reasoning_tokens=300
    )
    assert (reply.text, reply.model, reply.stop_reason) == ("Batched.", GPT, "stop")
    [item] = fake_server.requests
    assert reply.request_id == item.request_id  # the output line's response.request_id
    assert (item.batch_id, item.custom_id, item.path) == (
        sub.batch_id,
        "run-1",
        "/v1/chat/completions",
    )
    assert [c.op for c in fake_server.batch_calls()] == ["upload", "create", "retrieve", "results"]
    create = fake_server.batch_calls("create")[0]
    assert sub.request_id == create.request_id
    assert sent_key(create.headers) == OAI_KEY
    run(provider(fake_server, "openai"), lambda p: p.complete(request(GPT)))
    assert item.body == fake_server.requests[-1].body


@pytest.mark.parametrize("api", APIS)
def test_batch_in_progress_then_ended(fake_server: FakeServer, api: str) -> None:
    fake_server.batch_polls = 2
    fake_server.script(model_of(api), ok("Later.", input_tokens=10, output_tokens=5))
    sub, outcomes = submit_and_poll(fake_server, api, polls=4)
    assert [o.state for o in outcomes] == ["in_progress", "in_progress", "succeeded", "succeeded"]
    assert outcomes[0].detail == "in_progress" and outcomes[0].reply is None
    assert outcomes[2].reply is not None and outcomes[2].reply.text == "Later."
    assert outcomes[2] == outcomes[3]  # polling an ended batch again reads the same result
    [info] = fake_server.batches()
    assert (info.id, info.api, info.custom_ids, info.outcomes) == (
        sub.batch_id,
        api,
        ("run-1",),
        ("succeeded",),
    )
    assert info.status == ("ended" if api == "anthropic" else "completed")
    assert info.retrieves == fake_server.retrieves(sub.batch_id)
    # The Anthropic SDK's results() retrieves the batch once more before the download.
    assert fake_server.retrieves(sub.batch_id) == (6 if api == "anthropic" else 4)
    assert fake_server.count(model_of(api)) == 1


def test_finish_batch_ends_it_at_the_next_retrieve(fake_server: FakeServer) -> None:
    fake_server.batch_polls = 1000

    async def work(p: Provider) -> list[str]:
        sub = await p.submit_batch(request(GPT), "run-1")
        first = await p.poll_batch(sub.batch_id, "run-1")
        fake_server.finish_batch(sub.batch_id)
        second = await p.poll_batch(sub.batch_id, "run-1")
        return [first.state, second.state]

    assert run(provider(fake_server, "openai"), work) == ["in_progress", "succeeded"]


# --- errored, expired and canceled items -------------------------------------------------

# Statuses whose Anthropic error type maps back to the same status (the type is all a batch
# item's error carries: 408/504 share `timeout_error`, 422 is `invalid_request_error`, …).
ROUND_TRIP = (400, 401, 402, 403, 404, 413, 429, 500, 529)
ITEM_CLASSES = {
    400: BadRequest,
    401: AuthFailed,
    402: BillingExhausted,
    403: AuthFailed,
    404: ModelUnavailable,
    413: ContextTooLong,
    429: RateLimited,
    500: ServerError,
    529: Overloaded,
}


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("status", ROUND_TRIP)
def test_errored_item_maps_like_a_direct_call(
    fake_server: FakeServer, api: str, status: int
) -> None:
    outcome = item_outcome(fake_server, api, error(status, message="Nope."))
    assert outcome.state == "errored" and outcome.reply is None
    exc = outcome.error
    assert exc is not None
    assert type(exc) is ITEM_CLASSES[status]
    assert exc.http_status == status
    assert exc.may_have_billed is False
    assert exc.request_id == fake_server.requests[-1].request_id
    assert outcome.detail == exc.code
    batch_id = fake_server.batches()[-1].id
    assert str(exc).startswith(f"{api} batch {batch_id}: {status} ")
    assert str(exc).endswith(": Nope.")
    direct = direct_error(fake_server, api, error(status, message="Nope."))
    assert (type(direct), direct.http_status) == (type(exc), exc.http_status)


@pytest.mark.parametrize("status", [408, 422, 502, 503, 504])
def test_openai_errored_item_keeps_its_status_code(fake_server: FakeServer, status: int) -> None:
    exc = item_outcome(fake_server, "openai", error(status)).error
    direct = direct_error(fake_server, "openai", error(status))
    assert exc is not None and exc.http_status == status
    assert type(exc) is type(direct)


@pytest.mark.parametrize(
    ("api", "status", "kwargs", "cls"),
    [
        ("anthropic", 503, {"error_type": "overloaded_error"}, Overloaded),
        ("anthropic", 429, {"code": "enforced_spend_limit_reached"}, BillingExhausted),
        (
            "anthropic",
            400,
            {"message": "prompt is too long: 210000 tokens > 200000"},
            ContextTooLong,
        ),
        ("anthropic", 400, {"message": "Your credit balance is too low."}, BillingExhausted),
        (
            "openai",
            429,
            {"error_type": "insufficient_quota", "code": "insufficient_quota"},
            BillingExhausted,
        ),
        ("openai", 400, {"code": "context_length_exceeded"}, ContextTooLong),
    ],
)
def test_errored_item_reads_type_and_code(
    fake_server: FakeServer,
    api: str,
    status: int,
    kwargs: dict[str, Any],
    cls: type[ProviderError],
) -> None:
    exc = item_outcome(fake_server, api, error(status, **kwargs)).error
    assert type(exc) is cls
    assert type(direct_error(fake_server, api, error(status, **kwargs))) is cls


@pytest.mark.parametrize("api", APIS)
def test_expired_and_canceled_items(fake_server: FakeServer, api: str) -> None:
    gone = item_outcome(fake_server, api, expired())
    assert (gone.state, gone.reply, gone.error) == ("expired", None, None)
    stopped = item_outcome(fake_server, api, canceled())
    assert (stopped.state, stopped.reply, stopped.error) == ("canceled", None, None)
    statuses = [b.status for b in fake_server.batches()]
    assert statuses == (["ended", "ended"] if api == "anthropic" else ["expired", "cancelled"])
    assert [r.step for r in fake_server.requests] == ["Expired", "Canceled"]


def test_openai_validation_failure_errors_the_item(fake_server: FakeServer) -> None:
    outcome = item_outcome(fake_server, "openai", invalid("invalid_request", "Bad max_tokens."))
    assert outcome.state == "errored" and outcome.detail == "failed"
    assert type(outcome.error) is BadRequest
    assert "invalid_request: Bad max_tokens. (line 1)" in str(outcome.error)
    assert fake_server.batches()[-1].status == "failed"
    # A full enqueued-token queue is worth resubmitting later: retryable.
    full = item_outcome(fake_server, "openai", invalid("token_limit_exceeded", "Queue full."))
    assert type(full.error) is RateLimited and full.error.retryable


def test_anthropic_invalid_item_is_a_bad_request(fake_server: FakeServer) -> None:
    outcome = item_outcome(fake_server, "anthropic", invalid(message="max_tokens: too large"))
    assert outcome.state == "errored"
    assert type(outcome.error) is BadRequest and outcome.error.http_status == 400


@pytest.mark.parametrize("api", APIS)
def test_item_without_usage_is_malformed_and_may_have_billed(
    fake_server: FakeServer, api: str
) -> None:
    outcome = item_outcome(fake_server, api, no_usage())
    assert outcome.state == "errored"
    assert type(outcome.error) is MalformedResponse and outcome.error.may_have_billed


@pytest.mark.parametrize("api", APIS)
def test_unreadable_results_line_raises_malformed(fake_server: FakeServer, api: str) -> None:
    fake_server.script(model_of(api), malformed())
    with pytest.raises(MalformedResponse):
        submit_and_poll(fake_server, api)


@pytest.mark.parametrize("api", APIS)
def test_item_error_message_never_contains_the_key(fake_server: FakeServer, api: str) -> None:
    key = key_of(api)
    exc = item_outcome(fake_server, api, error(401, message=f"Bad key {key}.")).error
    assert isinstance(exc, AuthFailed)
    assert key not in str(exc) and "sk-" not in str(exc)


# --- HTTP errors of the batch calls themselves --------------------------------------------


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize(("status", "cls"), [(500, ServerError), (429, RateLimited)])
def test_create_errors_are_retryable(
    fake_server: FakeServer, api: str, status: int, cls: type[ProviderError]
) -> None:
    fake_server.script_batch_calls("create", error(status, retry_after=3))
    with pytest.raises(ProviderError) as info:
        submit_and_poll(fake_server, api)
    exc = info.value
    assert type(exc) is cls and exc.retryable
    assert exc.http_status == status and exc.retry_after_s == 3.0
    assert exc.request_id == fake_server.batch_calls("create")[0].request_id
    assert exc.may_have_billed is False
    assert str(exc).startswith(f"{api} {model_of(api)}: {status} ")
    assert isinstance(exc.__cause__, Exception)
    assert fake_server.batches() == [] and fake_server.count() == 0


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize(("status", "cls"), [(500, ServerError), (429, RateLimited)])
def test_retrieve_errors_are_retryable_and_polling_recovers(
    fake_server: FakeServer, api: str, status: int, cls: type[ProviderError]
) -> None:
    fake_server.script(model_of(api), ok("Fine.", input_tokens=3, output_tokens=2))

    async def work(p: Provider) -> tuple[ProviderError, BatchOutcome, str]:
        sub = await p.submit_batch(request(model_of(api)), "run-1")
        fake_server.script_batch_calls("retrieve", error(status))
        with pytest.raises(ProviderError) as info:
            await p.poll_batch(sub.batch_id, "run-1")
        return info.value, await p.poll_batch(sub.batch_id, "run-1"), sub.batch_id

    exc, outcome, batch_id = run(provider(fake_server, api), work)
    assert type(exc) is cls and exc.retryable and exc.http_status == status
    assert str(exc).startswith(f"{api} batch {batch_id}: {status} ")
    assert outcome.state == "succeeded" and outcome.reply is not None
    assert outcome.reply.usage == Usage(input_tokens=3, output_tokens=2)
    # retrieves() counts the failed GET too; BatchInfo.retrieves only the answered ones.
    extra = 1 if api == "anthropic" else 0  # results() retrieves once more
    assert fake_server.retrieves(batch_id) == 2 + extra
    assert fake_server.batches()[0].retrieves == 1 + extra
    assert fake_server.batch_calls("retrieve")[0].step == "Error"


@pytest.mark.parametrize("api", APIS)
def test_results_download_error_is_mapped(fake_server: FakeServer, api: str) -> None:
    fake_server.script_batch_calls("results", error(503))
    with pytest.raises(ServerError) as info:
        submit_and_poll(fake_server, api)
    assert info.value.http_status == 503


def test_openai_upload_error_is_mapped(fake_server: FakeServer) -> None:
    fake_server.script_batch_calls("upload", error(401, message=f"Incorrect API key {OAI_KEY}"))
    with pytest.raises(AuthFailed) as info:
        submit_and_poll(fake_server, "openai")
    assert OAI_KEY not in str(info.value) and "sk-" not in str(info.value)
    assert fake_server.batch_calls("create") == []


@pytest.mark.parametrize("api", APIS)
def test_create_error_never_contains_the_key(fake_server: FakeServer, api: str) -> None:
    key = key_of(api)
    fake_server.script_batch_calls("create", error(403, message=f"Key {key} may not batch."))
    with pytest.raises(AuthFailed) as info:
        submit_and_poll(fake_server, api)
    assert key not in str(info.value) and "sk-" not in str(info.value)


@pytest.mark.parametrize("api", APIS)
def test_transport_failures_of_batch_calls(fake_server: FakeServer, api: str) -> None:
    fake_server.script_batch_calls("create", drop())
    with pytest.raises(ConnectionFailed) as dropped:
        submit_and_poll(fake_server, api)
    assert dropped.value.may_have_billed  # the batch may exist: the request was sent
    fake_server.script_batch_calls("retrieve", timeout(2))

    async def work(p: Provider) -> None:
        sub = await p.submit_batch(request(model_of(api)), "run-1")
        await p.poll_batch(sub.batch_id, "run-1")

    with pytest.raises(ProviderTimeout):
        run(provider(fake_server, api, timeout_s=0.3), work)


@pytest.mark.parametrize("api", APIS)
def test_unknown_batch_maps_like_a_404(fake_server: FakeServer, api: str) -> None:
    async def work(p: Provider) -> BatchOutcome:
        return await p.poll_batch("nobatch_1", "run-1")

    with pytest.raises(ModelUnavailable) as info:
        run(provider(fake_server, api), work)
    assert info.value.http_status == 404


# --- the simulated provider ---------------------------------------------------------------


def test_simulated_batch_answers_what_complete_would() -> None:
    sim = SimulatedProvider()
    req = request("claude-haiku-5-5", "Reply HEARTBEAT_OK if all is well.")

    async def work() -> tuple[BatchSubmission, BatchSubmission, BatchOutcome, BatchOutcome, Reply]:
        sub = await sim.submit_batch(req, "run-7")
        again = await SimulatedProvider("other").submit_batch(req, "run-7")
        first = await sim.poll_batch(sub.batch_id, "run-7")
        second = await sim.poll_batch(sub.batch_id, "run-7")
        return sub, again, first, second, await sim.complete(req)

    sub, again, first, second, direct = asyncio.run(work())
    assert sub.batch_id.startswith("simbatch_") and len(sub.batch_id) == len("simbatch_") + 24
    assert sub.batch_id == again.batch_id and sub.request_id is None
    assert first.state == "succeeded" and first.reply == direct
    assert first.reply.text == "HEARTBEAT_OK"
    assert second == first


def test_simulated_unknown_batch_succeeds_with_a_placeholder() -> None:
    async def work() -> BatchOutcome:
        return await SimulatedProvider().poll_batch("simbatch_lost", "run-9")

    outcome = asyncio.run(work())
    assert outcome.state == "succeeded" and outcome.error is None
    reply = outcome.reply
    assert reply is not None
    assert "was not kept" in reply.text and "run-9" in reply.text
    assert reply.usage.input_tokens == 1
    assert 1 <= reply.usage.output_tokens <= 100
    assert asyncio.run(work()) == outcome  # deterministic


# --- error mapping without an HTTP response ------------------------------------------------


def test_map_error_body_derives_the_status_from_type_or_code() -> None:
    from agentd.providers.errormap import CallContext, error_status, map_error_body

    ctx = CallContext("anthropic", "batch b1", 5.0, secret="sk-ant-SECRET-1234")
    assert error_status("rate_limit_error", None) == 429
    assert error_status(None, "insufficient_quota") == 429
    assert error_status("whatever", None) is None
    overloaded = map_error_body(ctx, {"type": "overloaded_error", "message": "Busy."})
    assert type(overloaded) is Overloaded and overloaded.http_status == 529
    assert str(overloaded) == "anthropic batch b1: 529 overloaded_error: Busy."
    unknown = map_error_body(ctx, {"type": "mystery_error", "message": "sk-ant-SECRET-1234"})
    assert type(unknown) is BadRequest and unknown.http_status is None
    assert str(unknown) == "anthropic batch b1: mystery_error: ***"
    assert unknown.may_have_billed is False
    quota = map_error_body(ctx, {"code": "insufficient_quota", "message": "Quota."}, status=None)
    assert type(quota) is BillingExhausted and quota.http_status == 429
