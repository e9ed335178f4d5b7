"""The batch objects of the fake server and their JSON: items, results lines, batch status.

Each item's result is decided when its batch is created, from the next scripted step of its
model; a batch reports itself running for its first `polls_left` retrieves and has ended
from the next one on (see `fakebatch` for the endpoints).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from fakewire import (
    Api,
    CacheUsage,
    Canceled,
    Drop,
    Error,
    Expired,
    Invalid,
    Malformed,
    NoUsage,
    Ok,
    Step,
    Timeout,
    anthropic_error_body,
    ok_body,
    openai_error_body,
)

CHAT_PATH = "/v1/chat/completions"
EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."
CANCELED_MESSAGE = "This request was not executed because the batch was cancelled."


@dataclass
class Item:
    """One request of a batch and the result line it will have (JSONL, without newline)."""

    custom_id: str
    model: str | None
    request_id: str
    outcome: str  # succeeded | errored | expired | canceled | invalid
    line: bytes = b""
    to_error_file: bool = False  # OpenAI: the line goes to the error file, not the output
    invalid: Invalid | None = None
    usage: dict[str, Any] | None = None  # the usage object the result carries, if any


@dataclass
class Batch:
    """One batch: its items, how many retrieves it still answers `in_progress`, its files."""

    id: str
    api: Api
    created: datetime
    polls_left: int
    items: list[Item] = field(default_factory=list)
    retrieves: int = 0
    ended: bool = False
    failure: list[dict[str, Any]] | None = None  # OpenAI validation errors: the batch `failed`
    input_file_id: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None

    def poll(self) -> None:
        """Count one retrieve: the first `polls_left` of them still find the batch running."""
        self.retrieves += 1
        if self.polls_left > 0:
            self.polls_left -= 1
        else:
            self.ended = True

    def status(self) -> str:
        """The wire status now: Anthropic's processing_status or OpenAI's status."""
        if self.api == "anthropic":
            return "ended" if self.ended else "in_progress"
        if not self.ended:
            return "in_progress" if self.retrieves else "validating"
        if self.failure is not None:
            return "failed"
        outcomes = {item.outcome for item in self.items}
        if "canceled" in outcomes:
            return "cancelled"
        return "expired" if "expired" in outcomes else "completed"


@dataclass(frozen=True)
class BatchInfo:
    """What `FakeServer.batches()` lists: a created batch and its items."""

    id: str
    api: Api
    status: str  # as its last retrieve showed it (before any: `in_progress` / `validating`)
    custom_ids: tuple[str, ...]
    request_ids: tuple[str, ...]  # the items' ReceivedRequest.request_id, in order
    outcomes: tuple[str, ...]  # succeeded | errored | expired | canceled | invalid, per item
    retrieves: int  # GETs of the batch so far (polls; the Anthropic SDK's results() adds one)


@dataclass(frozen=True)
class BatchCall:
    """One call to a batch endpoint (upload, create, retrieve, results); not a model request."""

    api: Api
    op: str  # upload | create | retrieve | results
    method: str
    path: str
    batch_id: str | None
    request_id: str
    headers: dict[str, str]
    step: str  # the scripted step that answered it, or "Ok"


def anthropic_item(
    custom_id: str, params: Any, step: Step, request_id: str, cache: CacheUsage | None
) -> Item:
    """A Message Batch item and its results line, from the model's scripted step."""
    model = params.get("model") if isinstance(params, dict) else None
    item = Item(custom_id, model if isinstance(model, str) else None, request_id, "succeeded")
    result: dict[str, Any]
    if isinstance(step, Ok | NoUsage):
        ok = step if isinstance(step, Ok) else Ok()
        message = ok_body("anthropic", ok, params, request_id, isinstance(step, Ok), cache)
        item.usage = message.get("usage")
        result = {"type": "succeeded", "message": message}
    elif isinstance(step, Expired | Canceled):
        item.outcome = "expired" if isinstance(step, Expired) else "canceled"
        result = {"type": item.outcome}
    elif isinstance(step, Malformed):
        item.line = b'{"custom_id": "' + custom_id.encode() + b'", "result": {"type": "succ'
        return item
    else:
        item.outcome = "errored"
        result = {"type": "errored", "error": anthropic_error_body(_as_error(step), request_id)}
    item.line = json.dumps({"custom_id": custom_id, "result": result}).encode()
    return item


def openai_item(
    custom_id: str, body: Any, step: Step, request_id: str, cache: CacheUsage | None
) -> Item:
    """An OpenAI batch item and its output- or error-file line, from the scripted step."""
    model = body.get("model") if isinstance(body, dict) else None
    item = Item(custom_id, model if isinstance(model, str) else None, request_id, "succeeded")
    line_id = "batch_req_" + request_id.removeprefix("req_")
    response: dict[str, Any] | None = None
    err: dict[str, str] | None = None
    if isinstance(step, Ok | NoUsage):
        ok = step if isinstance(step, Ok) else Ok()
        reply = ok_body("openai", ok, body, request_id, isinstance(step, Ok), cache)
        item.usage = reply.get("usage")
        response = {"status_code": 200, "request_id": request_id, "body": reply}
    elif isinstance(step, Invalid):
        item.outcome, item.invalid = "invalid", step
        return item
    elif isinstance(step, Expired | Canceled):
        item.outcome = "expired" if isinstance(step, Expired) else "canceled"
        code = "batch_expired" if isinstance(step, Expired) else "batch_cancelled"
        message = EXPIRED_MESSAGE if isinstance(step, Expired) else CANCELED_MESSAGE
        err = {"code": code, "message": message}
    elif isinstance(step, Malformed):
        item.line = b'{"id": "' + line_id.encode() + b'", "custom_id": "' + custom_id.encode()
        return item
    else:
        failed = _as_error(step)
        item.outcome = "errored"
        payload: Any = failed.raw_body if failed.raw_body is not None else openai_error_body(failed)
        response = {"status_code": failed.status, "request_id": request_id, "body": payload}
    item.to_error_file = item.outcome != "succeeded"
    line = {"id": line_id, "custom_id": custom_id, "response": response, "error": err}
    item.line = json.dumps(line).encode()
    return item


def _as_error(step: Step) -> Error:
    """The error an item gets from a step that is no success (a timeout: a 500)."""
    if isinstance(step, Error):
        return step
    if isinstance(step, Invalid):
        return Error(400, error_type="invalid_request_error", code=None, message=step.message)
    kind = "timed out" if isinstance(step, Timeout) else "lost its connection"
    assert isinstance(step, Timeout | Drop)
    return Error(500, message=f"Fake: the item's request {kind}.")


def anthropic_json(batch: Batch, base_url: str) -> dict[str, Any]:
    """The MessageBatch object as GET /v1/messages/batches/{id} shows it now."""
    counts = dict.fromkeys(("processing", "succeeded", "errored", "canceled", "expired"), 0)
    for item in batch.items:
        counts["processing" if not batch.ended else _counted(item.outcome)] += 1
    ended = batch.ended
    canceled = ended and counts["canceled"] > 0
    return {
        "id": batch.id,
        "type": "message_batch",
        "processing_status": batch.status(),
        "request_counts": counts,
        "created_at": _iso(batch.created),
        "expires_at": _iso(batch.created + timedelta(hours=24)),
        "ended_at": _iso(batch.created + timedelta(minutes=1)) if ended else None,
        "cancel_initiated_at": _iso(batch.created) if canceled else None,
        "archived_at": None,
        # Absolute, as the API sends it: the SDK fetches the results from exactly this URL.
        "results_url": f"{base_url}/v1/messages/batches/{batch.id}/results" if ended else None,
    }


def openai_json(batch: Batch) -> dict[str, Any]:
    """The Batch object as GET /v1/batches/{id} shows it now."""
    created = int(batch.created.timestamp())
    status = batch.status()
    done = status in ("completed", "expired", "cancelled", "failed")
    failed = sum(1 for i in batch.items if i.outcome != "succeeded") if done else 0
    return {
        "id": batch.id,
        "object": "batch",
        "endpoint": CHAT_PATH,
        "errors": {"object": "list", "data": batch.failure} if batch.failure else None,
        "input_file_id": batch.input_file_id,
        "completion_window": "24h",
        "status": status,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "created_at": created,
        "in_progress_at": created + 1,
        "expires_at": created + 86_400,
        "finalizing_at": created + 60 if done and status != "failed" else None,
        "completed_at": created + 60 if status == "completed" else None,
        "failed_at": created + 1 if status == "failed" else None,
        "expired_at": created + 86_400 if status == "expired" else None,
        "cancelling_at": created + 30 if status == "cancelled" else None,
        "cancelled_at": created + 60 if status == "cancelled" else None,
        "request_counts": {
            "total": len(batch.items),
            "completed": len(batch.items) - failed if done else 0,
            "failed": failed,
        },
        "metadata": None,
    }


def openai_validate(
    lines: list[bytes],
) -> tuple[list[tuple[int, dict[str, Any]]], list[dict[str, Any]]]:
    """((line number, request) pairs, errors) of an input file: errors make the batch `failed`."""
    requests: list[tuple[int, dict[str, Any]]] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except ValueError:
            errors.append(line_error("invalid_json_line", number, "This line is not JSON."))
            continue
        custom_id = line.get("custom_id") if isinstance(line, dict) else None
        body = line.get("body") if isinstance(line, dict) else None
        if not isinstance(custom_id, str) or not custom_id:
            errors.append(line_error("missing_required_parameter", number, "No custom_id."))
        elif custom_id in seen:
            errors.append(line_error("duplicate_custom_id", number, "Duplicate custom_id."))
        elif line.get("method") != "POST" or line.get("url") != CHAT_PATH:
            errors.append(line_error("invalid_url", number, f"The url must be {CHAT_PATH}."))
        elif not isinstance(body, dict) or not isinstance(body.get("model"), str):
            errors.append(line_error("missing_required_parameter", number, "No body.model."))
        else:
            seen.add(custom_id)
            requests.append((number, line))
    if not requests and not errors:
        errors.append(line_error("empty_file", None, "The input file is empty."))
    return requests, errors


def line_error(code: str, line: int | None, message: str) -> dict[str, Any]:
    """One entry of a failed OpenAI batch's `errors.data`."""
    return {"code": code, "line": line, "message": message, "param": None}


def _counted(outcome: str) -> str:
    return "errored" if outcome == "invalid" else outcome


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")
