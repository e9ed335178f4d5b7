"""The fake server's batch endpoints, for both APIs, wire-exact enough for the real SDKs.

Anthropic Message Batches: `POST /v1/messages/batches`, `GET /v1/messages/batches/{id}` (an
absolute `results_url` once ended), `GET /v1/messages/batches/{id}/results` (JSONL). OpenAI
Batch API: `POST /v1/files` (multipart upload of the JSONL input), `POST /v1/batches`,
`GET /v1/batches/{id}`, `GET /v1/files/{id}/content` (the output and error files).
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from email.parser import BytesParser
from email.policy import HTTP
from typing import TYPE_CHECKING, Any

from fakebatchwire import (
    CHAT_PATH,
    Batch,
    BatchInfo,
    Item,
    anthropic_item,
    anthropic_json,
    line_error,
    openai_item,
    openai_json,
    openai_validate,
)
from fakewire import (
    Api,
    Error,
    Ok,
    ReceivedRequest,
    Step,
    anthropic_error_body,
    openai_error_body,
)

if TYPE_CHECKING:
    from fakeserver import FakeServer

CUSTOM_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # the Message Batches API's own rule
Answer = tuple[int, bytes, str | None]  # (HTTP status, body, the batch concerned)


class BatchStore:
    """The batches and uploaded files of one fake server (its lock held by the caller)."""

    def __init__(self) -> None:
        self.batches: dict[str, Batch] = {}
        self._files: dict[str, bytes] = {}
        self._file_batch: dict[str, str] = {}  # output/error file id -> its batch

    def clear(self) -> None:
        """Forget every batch and file."""
        self.batches.clear()
        self._files.clear()
        self._file_batch.clear()

    def infos(self) -> list[BatchInfo]:
        """What `FakeServer.batches()` shows."""
        return [
            BatchInfo(
                id=b.id,
                api=b.api,
                status=b.status(),
                custom_ids=tuple(i.custom_id for i in b.items),
                request_ids=tuple(i.request_id for i in b.items),
                outcomes=tuple(i.outcome for i in b.items),
                retrieves=b.retrieves,
            )
            for b in self.batches.values()
        ]

    def serve(
        self,
        fake: FakeServer,
        api: Api,
        op: str,
        key: str | None,
        raw: bytes,
        headers: dict[str, str],
    ) -> Answer:
        """Answer one batch endpoint call (`key`: the batch id, or the file id for content)."""
        if op == "create":
            if api == "anthropic":
                return self._anthropic_create(fake, raw, headers)
            return self._openai_create(fake, raw, headers)
        if op == "upload":
            return self._upload(fake, raw, headers)
        if api == "openai" and op == "results":
            content = self._files.get(key or "")
            if content is None:
                return _error(api, 404, f"No such File object: {key}")
            return 200, content, self._file_batch.get(key or "")
        batch = self.batches.get(key or "")
        if batch is None or batch.api != api:
            return _error(api, 404, f"No batch found with id {key}")
        if op == "retrieve":
            batch.poll()
            if api == "anthropic":
                return 200, _json(anthropic_json(batch, fake.url)), batch.id
            if batch.ended and batch.failure is None and batch.output_file_id is None:
                self._write_files(fake, batch)
            return 200, _json(openai_json(batch)), batch.id
        if not batch.ended:  # Anthropic results of a batch still processing
            return _error(api, 400, f"Batch {batch.id} is still processing.", batch.id)
        return 200, b"".join(item.line + b"\n" for item in batch.items), batch.id

    def _anthropic_create(self, fake: FakeServer, raw: bytes, headers: dict[str, str]) -> Answer:
        body = _loads(raw)
        requests = body.get("requests") if isinstance(body, dict) else None
        if not isinstance(requests, list) or not requests:
            return _error("anthropic", 400, "requests: must be a non-empty list")
        seen: set[str] = set()
        for number, entry in enumerate(requests):
            custom_id = entry.get("custom_id") if isinstance(entry, dict) else None
            params = entry.get("params") if isinstance(entry, dict) else None
            if not isinstance(custom_id, str) or not CUSTOM_ID.fullmatch(custom_id):
                return _error("anthropic", 400, f"requests.{number}.custom_id: invalid")
            if custom_id in seen:
                return _error("anthropic", 400, f"requests.{number}.custom_id: duplicate")
            if not isinstance(params, dict) or not isinstance(params.get("model"), str):
                return _error("anthropic", 400, f"requests.{number}.params.model: required")
            seen.add(custom_id)
        batch = Batch(_new_id(fake, "msgbatch_"), "anthropic", _now(), fake.batch_polls)
        for entry in requests:
            params = entry["params"]
            step, request_id = fake._next(params["model"])
            cache = fake._cache_usage("anthropic", params, step) if isinstance(step, Ok) else None
            item = anthropic_item(entry["custom_id"], params, step, request_id, cache)
            batch.items.append(item)
            fake._record_usage(item.request_id, item.usage)
            fake._record(_received("anthropic", "/v1/messages", params, headers, item, step, batch))
        self.batches[batch.id] = batch
        return 200, _json(anthropic_json(batch, fake.url)), batch.id

    def _upload(self, fake: FakeServer, raw: bytes, headers: dict[str, str]) -> Answer:
        content_type = headers.get("content-type", "")
        if not content_type.startswith("multipart/form-data"):
            return _error("openai", 400, "Expected a multipart/form-data upload.")
        message = BytesParser(policy=HTTP).parsebytes(
            b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw
        )
        fields: dict[str, str] = {}
        filename, data = None, None
        for part in message.iter_parts() if message.is_multipart() else ():
            payload = part.get_payload(decode=True)
            payload = payload if isinstance(payload, bytes) else b""
            if part.get_filename():
                filename, data = part.get_filename(), payload
            else:
                fields[str(part.get_param("name", header="content-disposition"))] = payload.decode()
        if data is None or fields.get("purpose") != "batch":
            return _error("openai", 400, "Upload a file with purpose 'batch'.")
        file_id = _new_id(fake, "file-")
        self._files[file_id] = data
        return 200, _json(_file_json(file_id, str(filename), "batch", data)), None

    def _openai_create(self, fake: FakeServer, raw: bytes, headers: dict[str, str]) -> Answer:
        body = _loads(raw)
        body = body if isinstance(body, dict) else {}
        input_file_id = body.get("input_file_id")
        content = self._files.get(input_file_id) if isinstance(input_file_id, str) else None
        if content is None:
            return _error("openai", 404, f"No such File object: {input_file_id}")
        if body.get("endpoint") != CHAT_PATH:
            return _error("openai", 400, f"This fake batches only {CHAT_PATH}.")
        if body.get("completion_window") != "24h":
            return _error("openai", 400, "completion_window must be '24h'.")
        requests, errors = openai_validate(content.splitlines())
        batch = Batch(_new_id(fake, "batch_"), "openai", _now(), fake.batch_polls)
        batch.input_file_id = input_file_id
        if errors:
            batch.failure = errors  # nothing ran: no step is taken, no request recorded
        for number, line in requests if not errors else []:
            request = line["body"]
            step, request_id = fake._next(request["model"])
            cache = fake._cache_usage("openai", request, step) if isinstance(step, Ok) else None
            item = openai_item(line["custom_id"], request, step, request_id, cache)
            batch.items.append(item)
            fake._record_usage(item.request_id, item.usage)
            fake._record(_received("openai", CHAT_PATH, request, headers, item, step, batch))
            if item.invalid is not None and batch.failure is None:
                batch.failure = [line_error(item.invalid.code, number, item.invalid.message)]
        self.batches[batch.id] = batch
        return 200, _json(openai_json(batch)), batch.id

    def _write_files(self, fake: FakeServer, batch: Batch) -> None:
        """The output and error files of an OpenAI batch that just ended."""
        output = [i.line for i in batch.items if not i.to_error_file]
        errors = [i.line for i in batch.items if i.to_error_file]
        if output:
            batch.output_file_id = self._add_file(fake, batch, output)
        if errors:
            batch.error_file_id = self._add_file(fake, batch, errors)

    def _add_file(self, fake: FakeServer, batch: Batch, lines: list[bytes]) -> str:
        file_id = _new_id(fake, "file-")
        self._files[file_id] = b"".join(line + b"\n" for line in lines)
        self._file_batch[file_id] = batch.id
        return file_id


def _received(
    api: Api,
    path: str,
    body: Any,
    headers: dict[str, str],
    item: Item,
    step: Step,
    batch: Batch,
) -> ReceivedRequest:
    """A batch item as a recorded request (the create call's headers: they carry the key)."""
    return ReceivedRequest(
        api=api,
        path=path,
        model=item.model,
        body=body,
        headers=headers,
        request_id=item.request_id,
        step=type(step).__name__,
        batch_id=batch.id,
        custom_id=item.custom_id,
    )


def _error(api: Api, status: int, message: str, batch_id: str | None = None) -> Answer:
    step = Error(status, message=message)
    body = anthropic_error_body(step, "") if api == "anthropic" else openai_error_body(step)
    return status, _json(body), batch_id


def _file_json(file_id: str, filename: str, purpose: str, data: bytes) -> dict[str, Any]:
    return {
        "id": file_id,
        "object": "file",
        "bytes": len(data),
        "created_at": int(_now().timestamp()),
        "filename": filename,
        "purpose": purpose,
        "status": "processed",
        "expires_at": None,
        "status_details": None,
    }


def _new_id(fake: FakeServer, prefix: str) -> str:
    return prefix + fake._new_id().removeprefix("req_")


def _loads(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def _json(payload: Any) -> bytes:
    return json.dumps(payload).encode()


def _now() -> datetime:
    return datetime.now(UTC)
