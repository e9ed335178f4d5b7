"""A fake model API on 127.0.0.1 that speaks Anthropic Messages and OpenAI Chat Completions.

Stdlib only. Tests point the real SDKs at it (`base_url=server.url` for Anthropic,
`f"{server.url}/v1"` for OpenAI) and script, per model, what the next requests get:

    with FakeServer() as server:
        server.script("claude-haiku-4-5", error(429, retry_after=2), ok("hi", input_tokens=1000))
        ...  # the 1st request for that model gets a 429, the 2nd the reply, later ones the default
        assert server.count("claude-haiku-4-5") == 2
"""

from __future__ import annotations

import collections
import contextlib
import json
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

Api = Literal["anthropic", "openai"]
ANTHROPIC_PATH = "/v1/messages"
OPENAI_PATH = "/v1/chat/completions"


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


Step = Ok | Error | Timeout | Drop | Malformed | NoUsage


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
) -> Ok:
    """A successful reply.

    `input_tokens` is the API's own input field: Anthropic's `input_tokens` (cache tokens not
    included), OpenAI's `prompt_tokens` (cached tokens included). `reasoning` is OpenAI's
    `completion_tokens_details.reasoning_tokens` / Anthropic's `output_tokens_details.
    thinking_tokens`, part of `output_tokens`. Left as None, the counts are derived from the
    request so that they never exceed agentd's reservation bound: input = max(1, UTF-8 bytes
    of the prompt // 4), output = min(max_tokens, 16). `cache_write_1h` (Anthropic) is the part
    of `cache_write` written with a 1-hour TTL, reported as `usage.cache_creation`.
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


@dataclass(frozen=True)
class ReceivedRequest:
    """One request the server received (recorded before it is answered)."""

    api: Api | None
    path: str
    model: str | None
    body: Any
    headers: dict[str, str]  # lower-cased names; keeps x-api-key / authorization for assertions
    request_id: str
    step: str  # the class name of the step that answered it


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


def _anthropic_error_body(step: Error, request_id: str) -> dict[str, Any]:
    err_type = step.error_type or ANTHROPIC_ERROR_TYPES.get(
        step.status, "api_error" if step.status >= 500 else "invalid_request_error"
    )
    error: dict[str, Any] = {"type": err_type, "message": step.message or f"Fake {err_type}"}
    if step.code is not None:  # the 2.x SDKs read a stable cause from error.details.error_code
        error["details"] = {"error_code": step.code}
    return {"type": "error", "error": error, "request_id": request_id}


def _openai_error_body(step: Error) -> dict[str, Any]:
    err_type, code = OPENAI_ERROR_SHAPES.get(
        step.status, ("server_error" if step.status >= 500 else "invalid_request_error", None)
    )
    err_type = step.error_type or err_type
    code = step.code if step.code is not None else code
    message = step.message or f"Fake {code or err_type}"
    return {"error": {"message": message, "type": err_type, "param": None, "code": code}}


def _prompt_bytes(api: Api, body: Any) -> int:
    if not isinstance(body, dict):
        return 0
    parts = [body.get("system")] if api == "anthropic" else []
    for message in body.get("messages") or []:
        if isinstance(message, dict):
            parts.append(message.get("content"))
    # Content may be a string or a list of text blocks (cache_control splits a prompt in two).
    texts = [b.get("text") for p in parts if isinstance(p, list) for b in p if isinstance(b, dict)]
    return sum(len(t.encode()) for t in [*parts, *texts] if isinstance(t, str))


def _ok_body(api: Api, step: Ok, body: Any, request_id: str, with_usage: bool) -> dict[str, Any]:
    model = body.get("model") if isinstance(body, dict) else None
    max_tokens = 4096
    if isinstance(body, dict):
        max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 4096)
    text = step.text if step.text is not None else f"Fake reply from {model}."
    inp = (
        step.input_tokens
        if step.input_tokens is not None
        else max(1, _prompt_bytes(api, body) // 4)
    )
    out = step.output_tokens if step.output_tokens is not None else min(max_tokens, 16)
    if api == "anthropic":
        usage: dict[str, Any] = {
            "input_tokens": inp,
            "output_tokens": out,
            "cache_creation_input_tokens": step.cache_write,
            "cache_read_input_tokens": step.cache_read,
            "service_tier": "standard",
        }
        if step.cache_write_1h:
            usage["cache_creation"] = {
                "ephemeral_5m_input_tokens": step.cache_write - step.cache_write_1h,
                "ephemeral_1h_input_tokens": step.cache_write_1h,
            }
        if step.reasoning:
            usage["output_tokens_details"] = {"thinking_tokens": step.reasoning}
        reply: dict[str, Any] = {
            "id": "msg_" + request_id.removeprefix("req_"),
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": step.stop_reason,
            "stop_sequence": None,
        }
        if with_usage:
            reply["usage"] = usage
        return reply
    finish = "length" if step.stop_reason == "max_tokens" else "stop"
    prompt_details: dict[str, int] = {"cached_tokens": step.cache_read, "audio_tokens": 0}
    if step.cache_write:
        prompt_details["cache_write_tokens"] = step.cache_write
    reply = {
        "id": "chatcmpl-" + request_id.removeprefix("req_"),
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": model,
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
        }
    return reply


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the real APIs
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: pytest shows failures, not access logs."""

    def do_GET(self) -> None:
        """Nothing is served over GET."""
        self._send_json(404, {"error": {"type": "not_found_error", "message": "Not found"}}, "")

    def do_POST(self) -> None:
        """Record the request, then answer it as the model's script says."""
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = None
        route = self.path.split("?", 1)[0]
        api: Api | None = (
            "anthropic" if route == ANTHROPIC_PATH else "openai" if route == OPENAI_PATH else None
        )
        model = body.get("model") if isinstance(body, dict) else None
        fake = self.server.fake
        # Requests to unknown routes get a 404 and leave the model's script alone.
        step, request_id = fake._next(model if api is not None else None)
        fake._record(
            ReceivedRequest(
                api=api,
                path=self.path,
                model=model if isinstance(model, str) else None,
                body=body,
                headers={k.lower(): v for k, v in self.headers.items()},
                request_id=request_id,
                step=type(step).__name__,
            )
        )
        if api is None:
            self._send_json(404, {"error": {"message": f"No route {self.path}"}}, request_id)
            return
        with contextlib.suppress(OSError):  # the client hung up first (it timed out)
            self._answer(api, step, body, request_id)

    def _answer(self, api: Api, step: Step, body: Any, request_id: str) -> None:
        if isinstance(step, Timeout):
            if self.server.fake._stopping.wait(step.seconds):
                self._hang_up()
                return
            step = self.server.fake._default
        if isinstance(step, Drop):
            self._hang_up()
        elif isinstance(step, Malformed):
            self._send(200, b'{"id": "msg_01", "type": "mess', request_id, api)
        elif isinstance(step, NoUsage):
            self._send_json(200, _ok_body(api, Ok(), body, request_id, False), request_id, api)
        elif isinstance(step, Error):
            payload = (
                _anthropic_error_body(step, request_id)
                if api == "anthropic"
                else _openai_error_body(step)
            )
            extra = dict(step.headers)
            if step.retry_after is not None:
                ra = step.retry_after
                extra["retry-after"] = ra if isinstance(ra, str) else f"{ra:g}"
            if step.status >= 500 or step.status in (408, 429):
                extra.setdefault("x-should-retry", "true")
            if step.raw_body is not None:
                extra["content-type"] = "text/html; charset=utf-8"
                self._send(step.status, step.raw_body.encode(), request_id, api, extra)
            else:
                self._send_json(step.status, payload, request_id, api, extra)
        else:
            self._send_json(200, _ok_body(api, step, body, request_id, True), request_id, api)

    def _hang_up(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _send_json(
        self,
        status: int,
        payload: Any,
        request_id: str,
        api: Api | None = None,
        extra: Mapping[str, str] | None = None,
    ) -> None:
        self._send(status, json.dumps(payload).encode(), request_id, api, extra)

    def _send(
        self,
        status: int,
        data: bytes,
        request_id: str,
        api: Api | None,
        extra: Mapping[str, str] | None = None,
    ) -> None:
        headers = dict(extra or {})
        self.send_response(status)
        self.send_header("content-type", headers.pop("content-type", "application/json"))
        self.send_header("content-length", str(len(data)))
        if request_id:
            self.send_header("request-id" if api == "anthropic" else "x-request-id", request_id)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a handler sleeping in a `timeout` step never blocks shutdown
    block_on_close = False
    # The default backlog of 5 drops SYNs when many clients connect at once; the client's
    # connect timeout then fires before the server ever sees the request.
    request_queue_size = 256
    fake: FakeServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients hanging up mid-answer is normal here; keep the test output clean."""


class FakeServer:
    """A scriptable fake Anthropic/OpenAI server on 127.0.0.1 (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queues: dict[str | None, collections.deque[Step]] = {}
        self._requests: list[ReceivedRequest] = []
        self._default: Ok = Ok()
        self._counter = 0
        self._stopping = threading.Event()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL, e.g. `http://127.0.0.1:PORT` (OpenAI clients use `url + "/v1"`)."""
        if self._httpd is None:
            raise RuntimeError("FakeServer is not started")
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakeServer:
        """Bind a free port and serve in a daemon thread."""
        if self._httpd is not None:
            return self
        self._stopping.clear()
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.fake = self
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; sleeping `timeout` handlers wake up and hang up."""
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def script(self, model: str, *steps: Step) -> None:
        """Queue what the next requests for `model` get, in order; then the default reply."""
        with self._lock:
            self._queues.setdefault(model, collections.deque()).extend(steps)

    def set_default(
        self,
        text: str | None = None,
        *,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
        cache_read: int = 0,
        cache_write: int = 0,
        reasoning: int = 0,
    ) -> None:
        """Set the reply for requests whose model has nothing scripted (arguments as `ok`)."""
        with self._lock:
            self._default = ok(
                text,
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                cache_read=cache_read,
                cache_write=cache_write,
                reasoning=reasoning,
            )

    def reset(self) -> None:
        """Forget scripts, recorded requests and the default reply."""
        with self._lock:
            self._queues.clear()
            self._requests.clear()
            self._default = Ok()

    def pending(self, model: str) -> int:
        """How many scripted steps for `model` are still unused."""
        with self._lock:
            return len(self._queues.get(model, ()))

    @property
    def requests(self) -> list[ReceivedRequest]:
        """A snapshot of every request received so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    def count(self, model: str | None = None) -> int:
        """Requests received (for `model`, or in all)."""
        with self._lock:
            return sum(1 for r in self._requests if model is None or r.model == model)

    def _next(self, model: Any) -> tuple[Step, str]:
        with self._lock:
            self._counter += 1
            request_id = f"req_fake{self._counter:016x}"
            queue = self._queues.get(model) if isinstance(model, str) else None
            return (queue.popleft() if queue else self._default), request_id

    def _record(self, request: ReceivedRequest) -> None:
        with self._lock:
            self._requests.append(request)
