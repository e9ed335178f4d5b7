"""Translation of SDK exceptions (Anthropic and OpenAI alike) into agentd's error tree."""

from __future__ import annotations

import email.utils
import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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

# Error types/codes that mean "the account cannot pay", whatever the status (often a 429).
BILLING_CODES = frozenset(
    {
        "insufficient_quota",  # OpenAI quota 429
        "billing_error",  # Anthropic 402 type
        "billing_not_active",  # OpenAI account without active billing
        "billing_hard_limit_reached",  # OpenAI spend cap set by the account
        "contract_spend_limit_reached",  # Anthropic 429 error.details.error_code
        "enforced_spend_limit_reached",
        "linked_organization_spend_limit_reached",
        "linked_organization_billing_unavailable",
    }
)
# Anthropic answers an empty prepaid balance with a plain 400 invalid_request_error.
BILLING_MESSAGE = re.compile(r"credit balance is too low", re.IGNORECASE)
CONTEXT_CODES = frozenset(
    {"context_length_exceeded", "request_too_large", "string_above_max_length"}
)
# Messages only for servers that send no code: Anthropic ("prompt is too long"), vLLM/Ollama/
# llama.cpp ("maximum context length", "exceeds the context window").
CONTEXT_MESSAGE = re.compile(
    r"prompt is too long|context[ _](length|limit|size|window)|maximum context",
    re.IGNORECASE,
)
# Key-shaped tokens an error message may echo back (OpenAI echoes a masked key on 401):
# OpenAI `sk-...`/`sk-proj-...` and Anthropic `sk-ant-...`.
KEY_SHAPED = re.compile(r"\bsk-[A-Za-z0-9_\-*.]{4,}")
MAX_MESSAGE = 240
# The HTTP status an error type or code stands for, for errors that arrive without one (a batch
# item's error): a batch item then maps to the same class as a direct call with that error.
# Anthropic's documented error types:
ERROR_TYPE_STATUS: dict[str, int] = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
    "server_error": 500,  # OpenAI's type for its 5xx errors
}
# OpenAI's error codes (`error.code`) and the status its API sends them with:
ERROR_CODE_STATUS: dict[str, int] = {
    "invalid_api_key": 401,
    "unsupported_country_region_territory": 403,
    "model_not_found": 404,
    "context_length_exceeded": 400,
    "rate_limit_exceeded": 429,
    "insufficient_quota": 429,
    # A batch refused because the organisation's enqueued-token limit is full: wait, resubmit.
    "token_limit_exceeded": 429,
    "server_error": 500,
}


@dataclass(frozen=True)
class SdkErrors:
    """The exception classes of one SDK, so this module never imports an SDK itself."""

    status: type[BaseException]  # APIStatusError
    timeout: type[BaseException]  # APITimeoutError (checked before connection: it subclasses it)
    connection: type[BaseException]  # APIConnectionError
    validation: type[BaseException]  # APIResponseValidationError
    base: type[BaseException]  # AnthropicError / OpenAIError

    @classmethod
    def of(cls, sdk: Any, base: str) -> SdkErrors:
        """The classes of an imported SDK module; both SDKs name them alike but for `base`."""
        return cls(
            status=sdk.APIStatusError,
            timeout=sdk.APITimeoutError,
            connection=sdk.APIConnectionError,
            validation=sdk.APIResponseValidationError,
            base=getattr(sdk, base),
        )


@dataclass(frozen=True)
class CallContext:
    """What an error message may say about the call, and the secret it must never say."""

    provider: str
    model: str
    timeout_s: float
    secret: str | None = None

    def redact(self, text: str) -> str:
        """Remove the API key (and anything key-shaped) from text bound for a message."""
        if self.secret and len(self.secret) >= 4:
            text = text.replace(self.secret, "***")
        text = KEY_SHAPED.sub("***", text)
        text = " ".join(text.split())
        return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 1] + "…"

    def say(self, text: str) -> str:
        """`provider model: text`, redacted."""
        return self.redact(f"{self.provider} {self.model}: {text}")


def parse_retry_after(headers: Mapping[str, str] | None, now: float | None = None) -> float | None:
    """Seconds to wait from `retry-after-ms`, or `retry-after` as seconds or an HTTP-date."""
    if headers is None:
        return None
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        try:
            return max(0.0, float(raw_ms) / 1000)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP-date is always GMT
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def error_fields(body: object) -> tuple[str | None, str | None, str | None]:
    """(type, code, message) from either API's error body (or the bare `error` object)."""
    err: object = body
    if isinstance(body, Mapping) and isinstance(body.get("error"), Mapping):
        err = body["error"]
    if isinstance(err, Mapping):
        details = err.get("details")
        code = err.get("code")
        if code is None and isinstance(details, Mapping):
            code = details.get("error_code")
        return _str(err.get("type")), _str(code), _str(err.get("message"))
    if isinstance(body, str) and body.strip():
        return None, None, body.strip().splitlines()[0]
    return None, None, None


def status_error_class(
    status: int, err_type: str | None, code: str | None, message: str | None
) -> type[ProviderError]:
    """The agentd class for an HTTP error status and what its body says."""
    labels = {err_type, code}
    text = message or ""
    if labels & BILLING_CODES or status == 402 or BILLING_MESSAGE.search(text):
        return BillingExhausted
    if status == 529 or "overloaded_error" in labels:
        return Overloaded
    if status == 429:
        return RateLimited
    if status in (401, 403):
        return AuthFailed
    if status in (404, 501):
        return ModelUnavailable
    if status == 413 or labels & CONTEXT_CODES:
        return ContextTooLong
    if status in (400, 422) and CONTEXT_MESSAGE.search(text):
        return ContextTooLong
    if status >= 500 or status == 408:
        return ServerError
    return BadRequest


def map_status(
    ctx: CallContext,
    status: int,
    body: object,
    headers: Mapping[str, str] | None,
    request_id: str | None,
) -> ProviderError:
    """An agentd error for an HTTP error response."""
    err_type, code, message = error_fields(body)
    cls = status_error_class(status, err_type, code, message)
    retry_after = parse_retry_after(headers)
    label = code or err_type
    text = f"{status} {label}: {message}" if label else f"{status}: {message or 'error'}"
    if retry_after is not None:
        text += f" (retry after {round(retry_after, 1):g}s)"
    return cls(
        ctx.say(text),
        http_status=status,
        request_id=request_id,
        retry_after_s=retry_after,
        may_have_billed=False,
    )


def error_status(err_type: str | None, code: str | None) -> int | None:
    """The HTTP status a direct call gets with this error type or code, if one is known."""
    if code is not None and code in ERROR_CODE_STATUS:
        return ERROR_CODE_STATUS[code]
    if err_type is not None:
        return ERROR_TYPE_STATUS.get(err_type)
    return None


def map_error_body(
    ctx: CallContext,
    body: object,
    *,
    status: int | None = None,
    request_id: str | None = None,
) -> ProviderError:
    """An agentd error for an error object that came without an HTTP response (a batch item).

    `body` is either API's error body or its bare `error` object. Without `status`, the one a
    direct call would get is derived from the error type (Anthropic) or code (OpenAI), so the
    item raises the same class as that call; the error was not billed.
    """
    err_type, code, message = error_fields(body)
    status = status or error_status(err_type, code)
    if status is not None:
        return map_status(ctx, status, body, None, request_id)
    cls = status_error_class(0, err_type, code, message)
    label = code or err_type
    text = f"{label}: {message}" if label else (message or "error")
    return cls(ctx.say(text), request_id=request_id, may_have_billed=False)


def translate(
    exc: BaseException,
    sdk: SdkErrors,
    ctx: CallContext,
    *,
    request_id: str | None = None,
    status: int | None = None,
) -> ProviderError:
    """`map_exception` for an `except` block: re-raises what is not an SDK error.

    `request_id` and `status` come from a raw response whose body then failed to parse.
    """
    mapped = map_exception(exc, sdk, ctx)
    if mapped is None:
        raise exc
    mapped.request_id = mapped.request_id or request_id
    mapped.http_status = mapped.http_status or status
    return mapped


def map_exception(exc: BaseException, sdk: SdkErrors, ctx: CallContext) -> ProviderError | None:
    """The agentd error for an exception raised by an SDK call, or None if it is not one of ours."""
    if isinstance(exc, sdk.status):
        response: Any = getattr(exc, "response", None)
        headers = getattr(response, "headers", None)
        status = int(getattr(exc, "status_code", 0) or 0)
        request_id = getattr(exc, "request_id", None)
        return map_status(ctx, status, getattr(exc, "body", None), headers, request_id)
    if isinstance(exc, sdk.timeout):
        if _never_connected(exc):
            return ConnectionFailed(
                ctx.say(f"could not connect within {ctx.timeout_s:g}s"), may_have_billed=False
            )
        return ProviderTimeout(
            ctx.say(f"no answer within {ctx.timeout_s:g}s"), may_have_billed=True
        )
    if isinstance(exc, sdk.connection):
        never = _never_connected(exc)
        return ConnectionFailed(
            ctx.say(f"{'could not connect' if never else 'connection lost'}: {_cause(exc)}"),
            may_have_billed=not never,
        )
    if isinstance(exc, sdk.validation):
        response = getattr(exc, "response", None)
        return MalformedResponse(
            ctx.say(f"{getattr(exc, 'status_code', '')} response does not match the API schema"),
            http_status=getattr(exc, "status_code", None),
            request_id=_request_id(response),
            may_have_billed=True,
        )
    if isinstance(exc, json.JSONDecodeError | UnicodeDecodeError):
        return MalformedResponse(ctx.say("response body is not JSON"), may_have_billed=True)
    if isinstance(exc, sdk.base):
        # Raised before anything was sent (bad client options, credentials): not billed.
        return BadRequest(ctx.say(f"{type(exc).__name__}: {exc}"), may_have_billed=False)
    return None


def _never_connected(exc: BaseException) -> bool:
    """True when the transport failed before the request could reach the server."""
    import httpx2  # already loaded by the SDK that raised `exc`

    early = (
        httpx2.ConnectError,  # refused, DNS, TLS handshake
        httpx2.ConnectTimeout,
        httpx2.PoolTimeout,
        httpx2.UnsupportedProtocol,
        httpx2.ProxyError,
    )
    cause: BaseException | None = exc.__cause__ or exc.__context__
    seen = 0
    while cause is not None and seen < 8:
        if isinstance(cause, early):
            return True
        if isinstance(cause, httpx2.HTTPError):
            return False
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    return False


def _cause(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    if cause is None:
        return str(exc) or type(exc).__name__
    detail = str(cause)
    return f"{type(cause).__name__}: {detail}" if detail else type(cause).__name__


def _request_id(response: Any) -> str | None:
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    value = headers.get("request-id") or headers.get("x-request-id")
    return str(value) if value else None


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def created_batch_id(
    batch: Any, ctx: CallContext, request_id: str | None, *, http_status: int | None
) -> str:
    """The id of a batch just created, or a MalformedResponse (maybe billed) without one."""
    batch_id = getattr(batch, "id", None)
    if not isinstance(batch_id, str) or not batch_id:
        # The batch may exist (and be billed) without our knowing its id.
        raise MalformedResponse(
            ctx.say(f"{http_status} batch created without an id"),
            http_status=http_status,
            request_id=request_id,
            may_have_billed=True,
        )
    return batch_id
