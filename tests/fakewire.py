"""The fake server's scripted steps and the Anthropic/OpenAI JSON it answers with.

Stdlib only; `fakeserver` re-exports the public names (tests import them from there).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Api = Literal["anthropic", "openai"]


@dataclass(frozen=True)
class Ok:
    """A 200 with a reply. Token counts are each API's own wire fields (see `ok`)."""

    text: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read: int = 0
    cache_write: int = 0
    reasoning: int = 0
    stop_reason: str = "end_turn"
    cache_write_1h: int = 0  # the part of cache_write written with a 1-hour TTL (Anthropic)
    served_model: str | None = None  # the reply's `model` (None: the model asked for)
    # Sent as the usage's fields over the generated ones: odd servers' shapes (`100.0`, "64").
    wire_usage: Mapping[str, Any] | None = None

    @property
    def fixes_cache(self) -> bool:
        """True when the step sets input or cache numbers itself (no cache simulation then)."""
        return self.input_tokens is not None or bool(self.cache_read or self.cache_write)


@dataclass(frozen=True)
class Error:
    """An error response with the provider's real error body shape."""

    status: int
    retry_after: float | str | None = None
    error_type: str | None = None
    code: str | None = None
    message: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    raw_body: str | None = None  # sent as text/html instead of the JSON error body


@dataclass(frozen=True)
class Timeout:
    """Read the request, then wait `seconds` (longer than the client's timeout) before answering."""

    seconds: float


@dataclass(frozen=True)
class Drop:
    """Read the request, then close the socket without any response."""


@dataclass(frozen=True)
class Malformed:
    """A 200 with `content-type: application/json` and a body that is not JSON."""


@dataclass(frozen=True)
class NoUsage:
    """A 200 with a valid JSON reply that has no `usage`."""


@dataclass(frozen=True)
class Expired:
    """Batch items only: the batch ended before the item ran (not billed)."""


@dataclass(frozen=True)
class Canceled:
    """Batch items only: the batch was canceled before the item ran (not billed)."""


@dataclass(frozen=True)
class Invalid:
    """Batch items only: the item fails validation (OpenAI: the whole batch `failed`)."""

    code: str = "invalid_request"
    message: str = "Fake: the request failed batch validation."


Step = Ok | Error | Timeout | Drop | Malformed | NoUsage | Expired | Canceled | Invalid
BATCH_ONLY = (Expired, Canceled, Invalid)


def ok(
    text: str | None = None,
    *,
    input_tokens: int | None = None,
    output_tokens: int | None = None,
    cache_read: int = 0,
    cache_write: int = 0,
    reasoning: int = 0,
    stop_reason: str = "end_turn",
    cache_write_1h: int = 0,
    served_model: str | None = None,
    wire_usage: Mapping[str, Any] | None = None,
) -> Ok:
    """A successful reply.

    `input_tokens` is the API's own input field: Anthropic's `input_tokens` (cache tokens not
    included), OpenAI's `prompt_tokens` (cached tokens included). `reasoning` is OpenAI's
    `completion_tokens_details.reasoning_tokens` / Anthropic's `output_tokens_details.
    thinking_tokens`, part of `output_tokens`. Left as None, the counts are derived from the
    request so that they never exceed agentd's reservation bound: input = max(1, UTF-8 bytes
    of the prompt // 4), output = min(max_tokens, 16). `cache_write_1h` (Anthropic) is the part
    of `cache_write` written with a 1-hour TTL, reported as `usage.cache_creation`.
    `served_model` is the model the reply says answered (a dated snapshot, or a substitute);
    left as None, it is the model of the request. `wire_usage` replaces fields of the usage
    object as sent (any JSON value: how some compatible servers write their numbers).
    """
    if not 0 <= cache_write_1h <= cache_write:
        raise ValueError("cache_write_1h is part of cache_write")
    return Ok(
        text,
        input_tokens,
        output_tokens,
        cache_read,
        cache_write,
        reasoning,
        stop_reason,
        cache_write_1h,
        served_model,
        wire_usage,
    )


def error(
    status: int,
    *,
    retry_after: float | str | None = None,
    error_type: str | None = None,
    code: str | None = None,
    message: str | None = None,
    headers: Mapping[str, str] | None = None,
    raw_body: str | None = None,
) -> Error:
    """An error response in the API's own shape.

    `retry_after` may be seconds or an HTTP-date; `headers` adds more (e.g. `retry-after-ms`);
    `code` is OpenAI's `error.code` / Anthropic's `error.details.error_code`; `raw_body` sends
    that text as HTML instead, like a proxy's error page.
    """
    return Error(status, retry_after, error_type, code, message, dict(headers or {}), raw_body)


def timeout(seconds: float) -> Timeout:
    """Answer only after `seconds` (the client should have timed out by then)."""
    return Timeout(seconds)


def drop() -> Drop:
    """Close the connection after reading the request, without a response."""
    return Drop()


def malformed() -> Malformed:
    """A 200 whose body is not JSON."""
    return Malformed()


def no_usage() -> NoUsage:
    """A 200 whose JSON body has no usage."""
    return NoUsage()


def expired() -> Expired:
    """A batch item that expires unprocessed (a direct request gets a 400 saying so)."""
    return Expired()


def canceled() -> Canceled:
    """A batch item canceled unprocessed (a direct request gets a 400 saying so)."""
    return Canceled()


def invalid(code: str = "invalid_request", message: str | None = None) -> Invalid:
    """A batch item that fails validation: OpenAI fails its batch, Anthropic errors the item."""
    return Invalid(code, message or Invalid.message)


@dataclass(frozen=True)
class ReceivedRequest:
    """One request the server received (recorded before it is answered).

    A batch item is recorded as a request too, when its batch is created: `path` is the
    endpoint the item stands for, `body` its params, `headers` the create call's, and
    `batch_id` its batch (None for a direct request).
    """

    api: Api | None
    path: str
    model: str | None
    body: Any
    headers: dict[str, str]  # lower-cased names; keeps x-api-key / authorization for assertions
    request_id: str
    step: str  # the class name of the step that answered it
    batch_id: str | None = None
    custom_id: str | None = None


ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
OPENAI_ERROR_SHAPES: dict[int, tuple[str, str | None]] = {  # status -> (type, code)
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "unsupported_country_region_territory"),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", None),
    503: ("server_error", None),
}


def anthropic_error_body(step: Error, request_id: str) -> dict[str, Any]:
    """Anthropic's `{"type": "error", "error": {...}, "request_id"}` for an error step."""
    err_type = step.error_type or ANTHROPIC_ERROR_TYPES.get(
        step.status, "api_error" if step.status >= 500 else "invalid_request_error"
    )
    error: dict[str, Any] = {"type": err_type, "message": step.message or f"Fake {err_type}"}
    if step.code is not None:  # the 2.x SDKs read a stable cause from error.details.error_code
        error["details"] = {"error_code": step.code}
    return {"type": "error", "error": error, "request_id": request_id}


def openai_error_body(step: Error) -> dict[str, Any]:
    """OpenAI's `{"error": {message, type, param, code}}` for an error step."""
    err_type, code = OPENAI_ERROR_SHAPES.get(
        step.status, ("server_error" if step.status >= 500 else "invalid_request_error", None)
    )
    err_type = step.error_type or err_type
    code = step.code if step.code is not None else code
    message = step.message or f"Fake {code or err_type}"
    return {"error": {"message": message, "type": err_type, "param": None, "code": code}}


def prompt_bytes(api: Api, body: Any) -> int:
    """UTF-8 bytes of the prompt's text (system and messages): the base of token estimates."""
    if not isinstance(body, dict):
        return 0
    parts = [body.get("system")] if api == "anthropic" else []
    for message in body.get("messages") or []:
        if isinstance(message, dict):
            parts.append(message.get("content"))
    # Content may be a string or a list of text blocks (cache_control splits a prompt in two).
    texts = [b.get("text") for p in parts if isinstance(p, list) for b in p if isinstance(b, dict)]
    return sum(len(t.encode()) for t in [*parts, *texts] if isinstance(t, str))


def input_estimate(api: Api, body: Any) -> int:
    """The input tokens reported when a step does not fix them: max(1, prompt bytes // 4)."""
    return max(1, prompt_bytes(api, body) // 4)


@dataclass(frozen=True)
class CacheUsage:
    """What the cache simulation decided for one request: tokens read or written."""

    read: int = 0
    write: int = 0
    write_1h: int = 0  # the part of `write` with a 1-hour TTL


def ok_body(
    api: Api,
    step: Ok,
    body: Any,
    request_id: str,
    with_usage: bool,
    cache: CacheUsage | None = None,
) -> dict[str, Any]:
    """The 200 body for an Ok step: a Message or a ChatCompletion with the step's usage.

    With `cache` (the simulation's decision for a step that fixes no numbers), the cache
    fields come from it and Anthropic's `input_tokens` is the rest of the estimate.
    """
    model = body.get("model") if isinstance(body, dict) else None
    served = step.served_model or model
    max_tokens = 4096
    if isinstance(body, dict):
        max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 4096)
    text = step.text if step.text is not None else f"Fake reply from {model}."
    inp = step.input_tokens if step.input_tokens is not None else input_estimate(api, body)
    out = step.output_tokens if step.output_tokens is not None else min(max_tokens, 16)
    read, write, write_1h = step.cache_read, step.cache_write, step.cache_write_1h
    if cache is not None:
        read, write, write_1h = cache.read, cache.write, cache.write_1h
    if api == "anthropic":
        usage: dict[str, Any] = {
            # Anthropic's input_tokens leaves cache traffic out; the estimate counted it all.
            "input_tokens": inp - read - write if cache is not None else inp,
            "output_tokens": out,
            "cache_creation_input_tokens": write,
            "cache_read_input_tokens": read,
            "service_tier": "standard",
        }
        if write_1h or cache is not None:
            usage["cache_creation"] = {
                "ephemeral_5m_input_tokens": write - write_1h,
                "ephemeral_1h_input_tokens": write_1h,
            }
        if step.reasoning:
            usage["output_tokens_details"] = {"thinking_tokens": step.reasoning}
        reply: dict[str, Any] = {
            "id": "msg_" + request_id.removeprefix("req_"),
            "type": "message",
            "role": "assistant",
            "model": served,
            "content": [{"type": "text", "text": text}],
            "stop_reason": step.stop_reason,
            "stop_sequence": None,
        }
        if with_usage:
            reply["usage"] = {**usage, **(step.wire_usage or {})}
        return reply
    finish = "length" if step.stop_reason == "max_tokens" else "stop"
    prompt_details: dict[str, int] = {"cached_tokens": read, "audio_tokens": 0}
    if write:
        prompt_details["cache_write_tokens"] = write
    reply = {
        "id": "chatcmpl-" + request_id.removeprefix("req_"),
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": served,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish,
            }
        ],
        "system_fingerprint": "fp_fake",
    }
    if with_usage:
        reply["usage"] = {
            "prompt_tokens": inp,
            "completion_tokens": out,
            "total_tokens": inp + out,
            "prompt_tokens_details": prompt_details,
            "completion_tokens_details": {"reasoning_tokens": step.reasoning, "audio_tokens": 0},
            **(step.wire_usage or {}),
        }
    return reply
