"""The Anthropic Messages API provider (official async SDK, imported off the event loop)."""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Any, cast

from agentd.errors import MalformedResponse, ProviderError
from agentd.providers.base import (
    BatchOutcome,
    BatchSubmission,
    CacheMark,
    Message,
    Reply,
    Request,
    Usage,
)
from agentd.providers.errormap import (
    CallContext,
    SdkErrors,
    created_batch_id,
    map_error_body,
    translate,
)
from agentd.providers.jsonbody import json_body, text_field
from agentd.providers.sdkload import SdkClient
from agentd.providers.usagecounts import CountPlace, read_counts

if TYPE_CHECKING:
    from anthropic import AsyncAnthropic
    from anthropic.types import CacheControlEphemeralParam, MessageParam, TextBlockParam
    from anthropic.types.messages import MessageBatchIndividualResponse

DEFAULT_BASE_URL = "https://api.anthropic.com"
# A keyless provider (a local Anthropic-compatible proxy) still needs an explicit credential,
# or the SDK would go looking in ANTHROPIC_API_KEY, profiles and federation settings.
NO_KEY = "agentd-no-key"
# The usage's counts a reply is read for; the first two are required (or it cannot be priced).
COUNTS: tuple[CountPlace, ...] = (
    (None, "input_tokens"),
    (None, "output_tokens"),
    (None, "cache_read_input_tokens"),
    (None, "cache_creation_input_tokens"),
    # Newer responses split writes by TTL; 1-hour writes are billed at their own (2×) rate.
    ("cache_creation", "ephemeral_1h_input_tokens"),
    # 2.x reports thinking separately; it is already part of output_tokens.
    ("output_tokens_details", "thinking_tokens"),
)


class AnthropicProvider:
    """Calls `messages.create` once per request; no SDK retries (the executor owns them).

    Also a `BatchProvider`: one request per Message Batch, polled until it ends.
    """

    def __init__(
        self,
        name: str,
        *,
        api_key: str | None,
        base_url: str | None = None,
        timeout_s: float = 60.0,
    ) -> None:
        self.name = name
        self._api_key = api_key
        # Pinned rather than left to the SDK, which would read ANTHROPIC_BASE_URL and send the
        # key wherever the environment points: the config is the only source of endpoints.
        self._base_url = base_url or DEFAULT_BASE_URL
        self._timeout_s = timeout_s
        self._sdk: SdkClient[AsyncAnthropic] = SdkClient("anthropic", self._build)

    def _build(self, anthropic: ModuleType) -> tuple[AsyncAnthropic, SdkErrors]:
        """The client and the SDK's error classes (runs in a worker thread: see sdkload)."""
        # An explicit api_key makes the 2.x client skip every other credential source
        # (env vars, `config`/`profile`, workload identity).
        client = anthropic.AsyncAnthropic(
            api_key=self._api_key or NO_KEY,
            base_url=self._base_url,
            timeout=self._timeout_s,
            max_retries=0,
        )
        return client, SdkErrors.of(anthropic, "AnthropicError")

    async def prepare(self) -> None:
        """Import the SDK and build the client off the event loop (the first call does it too)."""
        await self._sdk.get()

    async def complete(self, request: Request) -> Reply:
        """Make one Messages API call and return its text, usage and request id."""
        client, errors = await self._sdk.get()
        ctx = CallContext(self.name, request.model, request.timeout_s, self._api_key)
        request_id: str | None = None
        status: int | None = None
        try:
            # The raw response keeps the request id even when the body turns out unusable.
            raw = await client.messages.with_raw_response.create(
                **message_params(request), timeout=request.timeout_s
            )
            request_id, status = raw.request_id, raw.status_code
            message = json_body(await raw.read())  # not raw.parse(): see jsonbody
        except Exception as exc:
            raise translate(exc, errors, ctx, request_id=request_id, status=status) from exc
        return parse_message(message, ctx, request.model, request_id, http_status=200)

    async def submit_batch(self, request: Request, custom_id: str) -> BatchSubmission:
        """Create a Message Batch whose only item is `request` (the same params as `complete`)."""
        client, errors = await self._sdk.get()
        ctx = CallContext(self.name, request.model, request.timeout_s, self._api_key)
        item = {"custom_id": custom_id, "params": message_params(request)}
        request_id: str | None = None
        status: int | None = None
        try:
            raw = await client.messages.batches.with_raw_response.create(
                requests=[cast(Any, item)], timeout=request.timeout_s
            )
            request_id, status = raw.request_id, raw.status_code
            batch = await raw.parse()
        except Exception as exc:
            raise translate(exc, errors, ctx, request_id=request_id, status=status) from exc
        batch_id = created_batch_id(batch, ctx, request_id, http_status=status)
        return BatchSubmission(batch_id, custom_id, request_id)

    async def poll_batch(self, batch_id: str, custom_id: str) -> BatchOutcome:
        """Retrieve the batch; once it has ended, read the item's result from its results."""
        client, errors = await self._sdk.get()
        ctx = CallContext(self.name, f"batch {batch_id}", self._timeout_s, self._api_key)
        found: MessageBatchIndividualResponse | None = None
        try:
            batch = await client.messages.batches.retrieve(batch_id, timeout=self._timeout_s)
            if batch.processing_status != "ended":
                return BatchOutcome("in_progress", detail=str(batch.processing_status))
            results = await client.messages.batches.results(batch_id, timeout=self._timeout_s)
            try:
                async for line in results:
                    if getattr(line, "custom_id", None) == custom_id:
                        found = line
                        break
            finally:
                await results.close()
        except Exception as exc:
            raise translate(exc, errors, ctx) from exc
        return _outcome(found, ctx)

    async def aclose(self) -> None:
        """Close the HTTP client, if one was created (in this event loop)."""
        await self._sdk.aclose()


def message_params(request: Request) -> dict[str, Any]:
    """The `messages.create` parameters for a request; a batch item's `params` are the same."""
    params: dict[str, Any] = {"model": request.model, "max_tokens": request.max_tokens}
    messages = [_message_param(m) for m in request.messages]
    mark = request.cache
    if request.system:
        params["system"] = request.system
        if mark is not None and mark.prefix_chars == 0:
            params["system"] = [_text_block(request.system, mark)]
    if mark is not None and mark.prefix_chars > 0 and messages:
        messages[0] = _split_first(request.messages[0], mark)
    params["messages"] = messages
    return params


def parse_message(
    message: Any,
    ctx: CallContext,
    model: str,
    request_id: str | None,
    *,
    http_status: int | None,
) -> Reply:
    """The Reply for a Message (a direct call's or a batch result's); no usage is an error."""
    inp, out, read, write, write_1h, thinking = read_counts(
        message, COUNTS, 2, ctx, request_id, http_status=http_status
    )
    blocks = getattr(message, "content", None)
    return Reply(
        text="".join(
            str(getattr(block, "text", None) or "")
            for block in (blocks if isinstance(blocks, list) else [])
            if getattr(block, "type", None) == "text"
        ),
        usage=Usage(
            # Anthropic's input_tokens excludes cache traffic; the ledger's counts all input.
            input_tokens=inp + read + write,
            output_tokens=out,
            cache_read_tokens=read,
            cache_write_tokens=write,
            cache_write_1h_tokens=min(write_1h, write),
            reasoning_tokens=thinking,
        ),
        model=text_field(getattr(message, "model", None)) or model,
        request_id=request_id,
        stop_reason=text_field(getattr(message, "stop_reason", None)),
    )


def _outcome(line: MessageBatchIndividualResponse | None, ctx: CallContext) -> BatchOutcome:
    """The outcome of an ended batch's item from its results line (None: it had none)."""
    if line is None:
        # An ended batch always lists every item; without ours, it may still have been billed.
        missing = MalformedResponse(
            ctx.say("the ended batch has no result for this item"), may_have_billed=True
        )
        return BatchOutcome("errored", error=missing, detail="no result")
    result = line.result
    kind = getattr(result, "type", None)
    if kind == "succeeded":
        message = getattr(result, "message", None)
        try:
            reply = parse_message(message, ctx, "", None, http_status=None)
        except ProviderError as exc:
            return BatchOutcome("errored", error=exc, detail="succeeded without usage")
        return BatchOutcome("succeeded", reply=reply, detail="succeeded")
    if kind == "errored":
        body = _as_dict(getattr(result, "error", None))
        request_id = body.get("request_id") if isinstance(body.get("request_id"), str) else None
        error = map_error_body(ctx, body, request_id=request_id)
        return BatchOutcome("errored", error=error, detail=error.code)
    if kind == "canceled":
        return BatchOutcome("canceled", detail="the batch was canceled before the item ran")
    if kind == "expired":
        return BatchOutcome("expired", detail="not processed within 24 hours")
    unknown = MalformedResponse(ctx.say(f"unknown batch result type {kind!r}"))
    return BatchOutcome("errored", error=unknown, detail=str(kind))


def _as_dict(value: object) -> dict[str, Any]:
    """An SDK model as the plain dict the API sent (extra fields such as `details` included)."""
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        # The SDK's union of error objects has no member for some types the API sends
        # (`request_too_large`); the value is kept as sent, so its warning is noise.
        data = to_dict(warnings=False)
        return data if isinstance(data, dict) else {}
    return value if isinstance(value, dict) else {}


def _message_param(message: Message) -> MessageParam:
    # Spelled out per role so the SDK's TypedDict union type-checks.
    if message.role == "user":
        return {"role": "user", "content": message.content}
    return {"role": "assistant", "content": message.content}


def _text_block(text: str, mark: CacheMark | None = None) -> TextBlockParam:
    """A text content block; with a mark, the end of the cached prefix (`cache_control`)."""
    block: TextBlockParam = {"type": "text", "text": text}
    if mark is not None:
        control: CacheControlEphemeralParam = {"type": "ephemeral"}
        if mark.ttl == "1h":
            control["ttl"] = "1h"  # 5m is the API's default: leave it unsaid
        block["cache_control"] = control
    return block


def _split_first(message: Message, mark: CacheMark) -> MessageParam:
    """The first message as two blocks: the stable prefix (marked), then the changing rest."""
    head, tail = message.content[: mark.prefix_chars], message.content[mark.prefix_chars :]
    # The API refuses empty text blocks: a prompt that is all prefix is one marked block.
    blocks = [_text_block(head, mark)] + ([_text_block(tail)] if tail else [])
    if message.role == "user":
        return {"role": "user", "content": blocks}
    return {"role": "assistant", "content": blocks}
