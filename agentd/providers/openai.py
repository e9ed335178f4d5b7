"""The OpenAI Chat Completions provider, also for any OpenAI-compatible server (Ollama, vLLM)."""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from agentd.providers.base import BatchOutcome, BatchSubmission, Reply, Request, Usage
from agentd.providers.errormap import CallContext, SdkErrors, translate
from agentd.providers.jsonbody import json_body, text_field
from agentd.providers.sdkload import SdkClient
from agentd.providers.usagecounts import CountPlace, read_counts

if TYPE_CHECKING:
    from openai import AsyncOpenAI

DEFAULT_BASE_URL = "https://api.openai.com/v1"
# Keyless local servers ignore the key, but the SDK refuses to start without one and would
# otherwise read OPENAI_API_KEY from the environment (and send it to the local server).
NO_KEY = "agentd-no-key"
# The usage's counts a reply is read for; the first two are required (or it cannot be priced).
COUNTS: tuple[CountPlace, ...] = (
    (None, "prompt_tokens"),
    (None, "completion_tokens"),
    ("prompt_tokens_details", "cached_tokens"),
    ("completion_tokens_details", "reasoning_tokens"),
)


class OpenAIProvider:
    """Calls `chat.completions.create` once per request; no SDK retries (the executor owns them).

    Also a `BatchProvider` (see `agentd.providers.openai_batch`): one request per batch.
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
        # Pinned rather than left to the SDK, which would read OPENAI_BASE_URL and send the key
        # wherever the environment points: the config is the only source of endpoints.
        self._base_url = base_url or DEFAULT_BASE_URL
        # OpenAI itself wants `max_completion_tokens` (reasoning models reject `max_tokens`).
        # Many compatible servers (Ollama, LM Studio, older vLLM/llama.cpp) only read the
        # deprecated `max_tokens` and would silently generate without a cap, so they get both.
        self._send_max_tokens = urlsplit(self._base_url).hostname != "api.openai.com"
        self._timeout_s = timeout_s
        self._sdk: SdkClient[AsyncOpenAI] = SdkClient("openai", self._build)

    def _build(self, openai: ModuleType) -> tuple[AsyncOpenAI, SdkErrors]:
        """The client and the SDK's error classes (runs in a worker thread: see sdkload)."""
        client = openai.AsyncOpenAI(
            api_key=self._api_key or NO_KEY,
            base_url=self._base_url,
            timeout=self._timeout_s,
            max_retries=0,
        )
        return client, SdkErrors.of(openai, "OpenAIError")

    async def prepare(self) -> None:
        """Import the SDK and build the client off the event loop (the first call does it too)."""
        await self._sdk.get()

    def _context(self, model: str, timeout_s: float | None = None) -> CallContext:
        """What this provider's error messages may say (never the key)."""
        return CallContext(self.name, model, timeout_s or self._timeout_s, self._api_key)

    def chat_body(self, request: Request) -> dict[str, Any]:
        """The Chat Completions request body; a batch line's `body` is the same."""
        messages: list[dict[str, str]] = []
        if request.system:
            messages.append({"role": "system", "content": request.system})
        messages.extend({"role": m.role, "content": m.content} for m in request.messages)
        body: dict[str, Any] = {
            "model": request.model,
            "messages": messages,
            "max_completion_tokens": request.max_tokens,
        }
        if self._send_max_tokens:
            body["max_tokens"] = request.max_tokens
        return body

    async def complete(self, request: Request) -> Reply:
        """Make one Chat Completions call and return its text, usage and request id."""
        client, errors = await self._sdk.get()
        ctx = self._context(request.model, request.timeout_s)
        request_id: str | None = None
        status: int | None = None
        try:
            # The raw response keeps the request id even when the body turns out unusable.
            raw = await client.chat.completions.with_raw_response.create(
                **self.chat_body(request), timeout=request.timeout_s
            )
            request_id, status = raw.request_id, raw.status_code
            completion = json_body(raw.content)  # not raw.parse(): see jsonbody
        except Exception as exc:
            raise translate(exc, errors, ctx, request_id=request_id, status=status) from exc
        return parse_completion(completion, ctx, request.model, request_id, http_status=200)

    async def submit_batch(self, request: Request, custom_id: str) -> BatchSubmission:
        """Upload `request` as a one-line JSONL file and create a batch from it."""
        from agentd.providers.openai_batch import submit

        client, errors = await self._sdk.get()
        ctx = self._context(request.model, request.timeout_s)
        return await submit(client, errors, ctx, self.chat_body(request), custom_id)

    async def poll_batch(self, batch_id: str, custom_id: str) -> BatchOutcome:
        """Retrieve the batch; once it has ended, read the item's line from its result files."""
        from agentd.providers.openai_batch import poll

        client, errors = await self._sdk.get()
        return await poll(client, errors, self._context(f"batch {batch_id}"), batch_id, custom_id)

    async def aclose(self) -> None:
        """Close the HTTP client, if one was created (in this event loop)."""
        await self._sdk.aclose()


def parse_completion(
    completion: Any,
    ctx: CallContext,
    model: str,
    request_id: str | None,
    *,
    http_status: int | None,
) -> Reply:
    """The Reply for a ChatCompletion (a direct call's or a batch line's); no usage is an error."""
    prompt, completion_tokens, cached, reasoning = read_counts(
        completion, COUNTS, 2, ctx, request_id, http_status=http_status
    )
    choices = getattr(completion, "choices", None)
    first = choices[0] if isinstance(choices, list) and choices else None
    return Reply(
        text=str(getattr(getattr(first, "message", None), "content", None) or ""),
        usage=Usage(
            # prompt_tokens already includes cached tokens; completion_tokens includes
            # reasoning. Cache writes are billed as plain input on OpenAI, so none here.
            input_tokens=prompt,
            output_tokens=completion_tokens,
            cache_read_tokens=cached,
            cache_write_tokens=0,
            reasoning_tokens=reasoning,
        ),
        model=text_field(getattr(completion, "model", None)) or model,
        request_id=request_id,
        stop_reason=text_field(getattr(first, "finish_reason", None)),
    )
