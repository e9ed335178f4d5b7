"""The Anthropic Messages API provider (official async SDK, imported on first use)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from agentd.errors import MalformedResponse
from agentd.providers.base import CacheMark, Message, Reply, Request, Usage
from agentd.providers.errormap import CallContext, SdkErrors, map_exception

if TYPE_CHECKING:
    from anthropic import AsyncAnthropic
    from anthropic.types import CacheControlEphemeralParam, MessageParam, TextBlockParam

DEFAULT_BASE_URL = "https://api.anthropic.com"
# A keyless provider (a local Anthropic-compatible proxy) still needs an explicit credential,
# or the SDK would go looking in ANTHROPIC_API_KEY, profiles and federation settings.
NO_KEY = "agentd-no-key"
USAGE_FIELDS = ("input_tokens", "output_tokens")  # without them the call cannot be priced


class AnthropicProvider:
    """Calls `messages.create` once per request; no SDK retries (the executor owns them)."""

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
        self._client: AsyncAnthropic | None = None
        self._errors: SdkErrors | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _sdk(self) -> tuple[AsyncAnthropic, SdkErrors]:
        """The client, created on first use (importing the SDK takes seconds) and per event loop.

        An async HTTP client is bound to the loop it first ran in; a caller that makes calls
        from successive `asyncio.run()`s gets a fresh client instead of "Event loop is closed".
        """
        loop = _running_loop()
        if self._client is None or self._errors is None or self._loop is not loop:
            self._loop = loop
            import anthropic

            # An explicit api_key makes the 2.x client skip every other credential source
            # (env vars, `config`/`profile`, workload identity).
            self._client = anthropic.AsyncAnthropic(
                api_key=self._api_key or NO_KEY,
                base_url=self._base_url,
                timeout=self._timeout_s,
                max_retries=0,
            )
            self._errors = SdkErrors(
                status=anthropic.APIStatusError,
                timeout=anthropic.APITimeoutError,
                connection=anthropic.APIConnectionError,
                validation=anthropic.APIResponseValidationError,
                base=anthropic.AnthropicError,
            )
        return self._client, self._errors

    async def complete(self, request: Request) -> Reply:
        """Make one Messages API call and return its text, usage and request id."""
        client, errors = self._sdk()
        ctx = CallContext(self.name, request.model, request.timeout_s, self._api_key)
        kwargs: dict[str, Any] = {}
        messages = [_message_param(m) for m in request.messages]
        mark = request.cache
        if request.system:
            kwargs["system"] = request.system
            if mark is not None and mark.prefix_chars == 0:
                kwargs["system"] = [_text_block(request.system, mark)]
        if mark is not None and mark.prefix_chars > 0 and messages:
            messages[0] = _split_first(request.messages[0], mark)
        request_id: str | None = None
        status: int | None = None
        try:
            # The raw response keeps the request id even when the body turns out unusable.
            raw = await client.messages.with_raw_response.create(
                model=request.model,
                max_tokens=request.max_tokens,
                messages=messages,
                timeout=request.timeout_s,
                **kwargs,
            )
            request_id, status = raw.request_id, raw.status_code
            message = await raw.parse()
        except Exception as exc:
            mapped = map_exception(exc, errors, ctx)
            if mapped is None:
                raise
            # A body that fails to parse still came with a status and a request id.
            mapped.request_id = mapped.request_id or request_id
            mapped.http_status = mapped.http_status or status
            raise mapped from exc
        usage = getattr(message, "usage", None)
        if usage is None or not all(isinstance(getattr(usage, f, None), int) for f in USAGE_FIELDS):
            raise MalformedResponse(
                ctx.say("200 response without usage (may have been billed)"),
                http_status=200,
                request_id=request_id,
                may_have_billed=True,
            )
        cache_read = usage.cache_read_input_tokens or 0
        cache_write = usage.cache_creation_input_tokens or 0
        # Newer responses split writes by TTL; 1-hour writes are billed at their own (2×) rate.
        split = getattr(usage, "cache_creation", None)
        write_1h = min(getattr(split, "ephemeral_1h_input_tokens", None) or 0, cache_write)
        details = getattr(usage, "output_tokens_details", None)
        return Reply(
            text="".join(
                str(getattr(block, "text", ""))
                for block in (getattr(message, "content", None) or [])
                if getattr(block, "type", None) == "text"
            ),
            usage=Usage(
                # Anthropic's input_tokens excludes cache traffic; the ledger's counts all input.
                input_tokens=usage.input_tokens + cache_read + cache_write,
                output_tokens=usage.output_tokens,
                cache_read_tokens=cache_read,
                cache_write_tokens=cache_write,
                cache_write_1h_tokens=write_1h,
                # 2.x reports thinking separately; it is already part of output_tokens.
                reasoning_tokens=(getattr(details, "thinking_tokens", None) or 0),
            ),
            model=getattr(message, "model", None) or request.model,
            request_id=request_id,
            stop_reason=getattr(message, "stop_reason", None),
        )

    async def aclose(self) -> None:
        """Close the HTTP client, if one was created (in this event loop)."""
        client, self._client = self._client, None
        if client is not None and self._loop is _running_loop():
            await client.close()


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


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
