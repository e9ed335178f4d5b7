"""The OpenAI Batch API for `OpenAIProvider`: submit one chat request, poll for its line.

A batch is created from an uploaded JSONL file (one line per request); once it has ended its
results are files too: the output file holds the lines that got a response, the error file
those that failed (a non-2xx response) or were never run (`batch_expired`, `batch_cancelled`).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Final, Literal

from agentd.errors import MalformedResponse, ProviderError
from agentd.providers.base import BatchOutcome, BatchSubmission
from agentd.providers.errormap import (
    CallContext,
    SdkErrors,
    created_batch_id,
    map_error_body,
    map_status,
    translate,
)
from agentd.providers.openai import parse_completion

if TYPE_CHECKING:
    from openai import AsyncOpenAI

CHAT_PATH: Final = "/v1/chat/completions"
# Statuses of a batch that has ended; any other (validating, in_progress, finalizing,
# cancelling, or one added later) means it is still running.
ENDED = frozenset({"completed", "expired", "cancelled", "failed"})
# `error.code` of an error-file line for a request the batch never ran.
NOT_RUN: dict[str, Literal["expired", "canceled"]] = {
    "batch_expired": "expired",
    "batch_cancelled": "canceled",
}


async def submit(
    client: AsyncOpenAI, errors: SdkErrors, ctx: CallContext, body: dict[str, Any], custom_id: str
) -> BatchSubmission:
    """Upload one request line and create a 24h chat-completions batch from it."""
    line = {"custom_id": custom_id, "method": "POST", "url": CHAT_PATH, "body": body}
    data = (json.dumps(line, separators=(",", ":")) + "\n").encode()
    request_id: str | None = None
    status: int | None = None
    try:
        upload = await client.files.create(
            file=("agentd-batch.jsonl", data), purpose="batch", timeout=ctx.timeout_s
        )
        raw = await client.batches.with_raw_response.create(
            input_file_id=upload.id,
            endpoint=CHAT_PATH,
            completion_window="24h",
            timeout=ctx.timeout_s,
        )
        request_id, status = raw.request_id, raw.status_code
        batch = raw.parse()
    except Exception as exc:
        raise translate(exc, errors, ctx, request_id=request_id, status=status) from exc
    batch_id = created_batch_id(batch, ctx, request_id, http_status=status)
    return BatchSubmission(batch_id, custom_id, request_id)


async def poll(
    client: AsyncOpenAI, errors: SdkErrors, ctx: CallContext, batch_id: str, custom_id: str
) -> BatchOutcome:
    """The item's state: in progress, or its line from the output or error file once ended."""
    line: dict[str, Any] | None = None
    try:
        batch = await client.batches.retrieve(batch_id, timeout=ctx.timeout_s)
        status = str(batch.status)
        if status not in ENDED:
            return BatchOutcome("in_progress", detail=status)
        if status == "failed":
            return BatchOutcome("errored", error=_failure(batch, ctx), detail="failed")
        # Read the output file first: a request that got a response is never in both.
        for file_id in (batch.output_file_id, batch.error_file_id):
            if file_id:
                content = await client.files.content(file_id, timeout=ctx.timeout_s)
                line = _find(content.text, custom_id)
                if line is not None:
                    break
    except Exception as exc:
        raise translate(exc, errors, ctx) from exc
    return _outcome(line, status, ctx)


def _find(text: str, custom_id: str) -> dict[str, Any] | None:
    """The JSONL line for `custom_id` (a bad line raises, to be mapped as a malformed body)."""
    for raw in text.splitlines():
        if not raw.strip():
            continue
        line = json.loads(raw)
        if isinstance(line, dict) and line.get("custom_id") == custom_id:
            return line
    return None


def _outcome(line: dict[str, Any] | None, status: str, ctx: CallContext) -> BatchOutcome:
    """The outcome of an ended batch's item from its result line (None: it has none)."""
    if line is None:
        if status == "expired":
            return BatchOutcome("expired", detail="the batch expired before the item ran")
        if status == "cancelled":
            return BatchOutcome("canceled", detail="the batch was cancelled before the item ran")
        # A completed batch lists every request; without ours, it may still have been billed.
        missing = MalformedResponse(
            ctx.say(f"the {status} batch has no result for this item"), may_have_billed=True
        )
        return BatchOutcome("errored", error=missing, detail="no result")
    error = line.get("error")
    if isinstance(error, dict):
        code = error.get("code")
        message = error.get("message")
        if code in NOT_RUN:
            return BatchOutcome(NOT_RUN[code], detail=str(message or code))
        mapped = map_error_body(ctx, error)
        return BatchOutcome("errored", error=mapped, detail=mapped.code)
    response = line.get("response")
    if not isinstance(response, dict):
        bad = MalformedResponse(ctx.say("batch result line with neither response nor error"))
        return BatchOutcome("errored", error=bad, detail="malformed")
    code_raw = response.get("status_code")
    http_status = code_raw if isinstance(code_raw, int) else 0
    request_id = response.get("request_id") if isinstance(response.get("request_id"), str) else None
    body = response.get("body")
    if not 200 <= http_status < 300:
        # Mapped by status like a direct call's error response: same class, same message.
        mapped = map_status(ctx, http_status, body, None, request_id)
        return BatchOutcome("errored", error=mapped, detail=mapped.code)
    try:
        reply = parse_completion(_completion(body, ctx), ctx, "", request_id, http_status=None)
    except ProviderError as exc:
        return BatchOutcome("errored", error=exc, detail="malformed")
    return BatchOutcome("succeeded", reply=reply, detail="completed")


def _completion(body: object, ctx: CallContext) -> Any:
    """The line's body as the SDK's ChatCompletion, as a direct call would have parsed it."""
    from openai.types.chat import ChatCompletion
    from pydantic import ValidationError

    try:
        return ChatCompletion.model_validate(body)
    except ValidationError as exc:
        # Whatever failed validation, the request ran and may have been billed.
        raise MalformedResponse(
            ctx.say(f"batch result body is not a chat completion ({exc.error_count()} errors)"),
            may_have_billed=True,
        ) from exc


def _failure(batch: Any, ctx: CallContext) -> ProviderError:
    """The error for a batch that failed validation: its first listed error, mapped by code."""
    errors = getattr(getattr(batch, "errors", None), "data", None) or []
    first = errors[0] if errors else None
    code = getattr(first, "code", None)
    message = getattr(first, "message", None) or "batch failed validation"
    line = getattr(first, "line", None)
    if line is not None:
        message = f"{message} (line {line})"
    return map_error_body(ctx, {"code": code, "message": message})
