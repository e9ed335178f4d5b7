"""A fake model API on 127.0.0.1 that speaks Anthropic Messages and OpenAI Chat Completions.

Stdlib only. Tests point the real SDKs at it (`base_url=server.url` for Anthropic,
`f"{server.url}/v1"` for OpenAI) and script, per model, what the next requests get:

    with FakeServer() as server:
        server.script("claude-haiku-4-5", error(429, retry_after=2), ok("hi", input_tokens=1000))
        ...  # the 1st request for that model gets a 429, the 2nd the reply, later ones the default
        assert server.count("claude-haiku-4-5") == 2

Batches (see `fakebatch`): both batch APIs are served; each item consumes its model's next
step when its batch is created and is recorded in `requests` (with `batch_id`), so it counts
like a direct request. `batch_polls` sets how many retrieves find a batch still running;
`script_batch_calls` makes the batch endpoints themselves fail; `batches()` and
`batch_calls()` show what happened. Prompt caching is simulated (see `fakecache`; off with
`simulate_cache = False`) on a clock that `advance()` moves forward; `sent_usage()` shows
the usage object an answer carried.
"""

from __future__ import annotations

import collections
import contextlib
import json
import re
import socket
import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

from fakebatch import BatchStore
from fakebatchwire import CHAT_PATH, BatchCall, BatchInfo
from fakecache import PromptCache
from fakewire import (
    ANTHROPIC_ERROR_TYPES,
    BATCH_ONLY,
    OPENAI_ERROR_SHAPES,
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
    ReceivedRequest,
    Step,
    Timeout,
    anthropic_error_body,
    canceled,
    drop,
    error,
    expired,
    input_estimate,
    invalid,
    malformed,
    no_usage,
    ok,
    ok_body,
    openai_error_body,
    timeout,
)

__all__ = [  # the test-facing API; tests import these from here
    "ANTHROPIC_ERROR_TYPES",
    "OPENAI_ERROR_SHAPES",
    "Api",
    "BatchCall",
    "BatchInfo",
    "BatchOp",
    "Canceled",
    "Drop",
    "Error",
    "Expired",
    "FakeServer",
    "Invalid",
    "Malformed",
    "NoUsage",
    "Ok",
    "ReceivedRequest",
    "Step",
    "Timeout",
    "canceled",
    "drop",
    "error",
    "expired",
    "invalid",
    "malformed",
    "no_usage",
    "ok",
    "timeout",
]

ANTHROPIC_PATH = "/v1/messages"
OPENAI_PATH = CHAT_PATH
ANTHROPIC_BATCHES = "/v1/messages/batches"
BatchOp = Literal["upload", "create", "retrieve", "results"]
BATCH_OPS = ("upload", "create", "retrieve", "results")
CallStep = Error | Timeout | Drop | Malformed  # what a batch endpoint can be scripted to do
ANTHROPIC_GET = re.compile(r"/v1/messages/batches/([^/]+)(/results)?")
OPENAI_BATCH_GET = re.compile(r"/v1/batches/([^/]+)")
OPENAI_FILE_GET = re.compile(r"/v1/files/([^/]+)/content")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the real APIs
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: pytest shows failures, not access logs."""

    def do_GET(self) -> None:
        """Batch retrieves and results; anything else is a 404."""
        route = self.path.split("?", 1)[0]
        if match := ANTHROPIC_GET.fullmatch(route):
            op: BatchOp = "results" if match.group(2) else "retrieve"
            self._batch_call("anthropic", op, match.group(1), b"")
        elif match := OPENAI_BATCH_GET.fullmatch(route):
            self._batch_call("openai", "retrieve", match.group(1), b"")
        elif match := OPENAI_FILE_GET.fullmatch(route):
            self._batch_call("openai", "results", match.group(1), b"")
        else:
            self._send_json(404, {"error": {"type": "not_found_error", "message": "Not found"}}, "")

    def do_POST(self) -> None:
        """Record the request, then answer it as the model's script says."""
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        route = self.path.split("?", 1)[0]
        if route == ANTHROPIC_BATCHES:
            self._batch_call("anthropic", "create", None, raw)
            return
        if route in ("/v1/files", "/v1/batches"):
            self._batch_call("openai", "upload" if route == "/v1/files" else "create", None, raw)
            return
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = None
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
                headers=self._headers(),
                request_id=request_id,
                step=type(step).__name__,
            )
        )
        if api is None:
            self._send_json(404, {"error": {"message": f"No route {self.path}"}}, request_id)
            return
        with contextlib.suppress(OSError):  # the client hung up first (it timed out)
            self._answer(api, step, body, request_id)

    def _headers(self) -> dict[str, str]:
        return {k.lower(): v for k, v in self.headers.items()}

    def _answer(self, api: Api, step: Step, body: Any, request_id: str) -> None:
        if isinstance(step, BATCH_ONLY):
            message = f"Fake: {type(step).__name__.lower()}() is a batch item step"
            step = Error(400, message=message)
        if self._failed(api, step, request_id):
            return
        if isinstance(step, NoUsage):
            self._send_json(200, ok_body(api, Ok(), body, request_id, False), request_id, api)
            return
        answer = step if isinstance(step, Ok) else self.server.fake._default
        cache = self.server.fake._cache_usage(api, body, answer)
        payload = ok_body(api, answer, body, request_id, True, cache)
        self.server.fake._record_usage(request_id, payload.get("usage"))
        self._send_json(200, payload, request_id, api)

    def _failed(self, api: Api, step: Step, request_id: str) -> bool:
        """Answer a failure step (error, drop, bad body); True when the request is answered.

        A `timeout` step sleeps first and then lets the normal answer go out, if the client
        is still there to read it.
        """
        if isinstance(step, Timeout):
            if self.server.fake._stopping.wait(step.seconds):
                self._hang_up()
                return True
            return False
        if isinstance(step, Drop):
            self._hang_up()
        elif isinstance(step, Malformed):
            self._send(200, b'{"id": "msg_01", "type": "mess', request_id, api)
        elif isinstance(step, Error):
            payload = (
                anthropic_error_body(step, request_id)
                if api == "anthropic"
                else openai_error_body(step)
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
            return False
        return True

    def _batch_call(self, api: Api, op: BatchOp, key: str | None, raw: bytes) -> None:
        """One call to a batch endpoint: a scripted failure, or the batch store's answer."""
        fake = self.server.fake
        step, request_id = fake._next_call(op)
        # The batch a call concerns, also when a scripted failure keeps it from being served.
        status, payload = 0, b""
        batch_id = key if op == "retrieve" or (api, op) == ("anthropic", "results") else None
        if step is None or isinstance(step, Timeout):
            status, payload, batch_id = fake._serve_batch(api, op, key, raw, self._headers())
        fake._record_call(
            BatchCall(
                api=api,
                op=op,
                method=self.command,
                path=self.path,
                batch_id=batch_id,
                request_id=request_id,
                headers=self._headers(),
                step=type(step).__name__ if step is not None else "Ok",
            )
        )
        with contextlib.suppress(OSError):
            if step is not None and self._failed(api, step, request_id):
                return
            content_type = "application/json"
            if status == 200 and op == "results":
                content_type = "application/binary" if api == "anthropic" else "text/plain"
            self._send(status, payload, request_id, api, {"content-type": content_type})

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
    """A scriptable fake Anthropic/OpenAI server on 127.0.0.1 (see the module docstring).

    `simulate_cache` (default on, as on the real APIs) reports cache reads and writes for
    `ok` steps that fix neither input nor cache numbers; scripted numbers always win.
    `batch_polls` (default 0) is how many retrieves of a new batch still report it running;
    the next one ends it. Both may be changed at any time.
    """

    def __init__(self, *, simulate_cache: bool = True, batch_polls: int = 0) -> None:
        # Re-entrant: creating a batch takes each item's step and records it under one hold.
        self._lock = threading.RLock()
        self._queues: dict[str | None, collections.deque[Step]] = {}
        self._call_queues: dict[str, collections.deque[CallStep]] = {}
        self._requests: list[ReceivedRequest] = []
        self._calls: list[BatchCall] = []
        self._usages: dict[str, dict[str, Any]] = {}  # request id -> the usage object sent
        self._store = BatchStore()
        self._default: Ok = Ok()
        self._counter = 0
        self._stopping = threading.Event()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self.cache = PromptCache()
        self.simulate_cache = simulate_cache
        self.batch_polls = batch_polls

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

    def script_batch_calls(self, op: BatchOp, *steps: CallStep) -> None:
        """Queue failures for the next calls to a batch endpoint, of either API.

        `op`: `upload` (OpenAI POST /v1/files), `create`, `retrieve` (also the one the
        Anthropic SDK's `results()` makes first) or `results` (Anthropic results, OpenAI file
        content). Steps: `error`, `drop`, `malformed`, `timeout` (answers normally after it).
        """
        if op not in BATCH_OPS:
            raise ValueError(f"unknown batch op {op!r} (one of {', '.join(BATCH_OPS)})")
        for step in steps:
            if not isinstance(step, Error | Timeout | Drop | Malformed):
                raise ValueError(f"a batch call cannot be answered with {step!r}")
        with self._lock:
            self._call_queues.setdefault(op, collections.deque()).extend(steps)

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
        """Forget scripts, recorded requests, batches, cache entries and the default reply.

        The settings `simulate_cache` and `batch_polls` stay as they are.
        """
        with self._lock:
            self._queues.clear()
            self._call_queues.clear()
            self._requests.clear()
            self._calls.clear()
            self._usages.clear()
            self._store.clear()
            self._default = Ok()
        self.cache.clear()

    def pending(self, model: str) -> int:
        """How many scripted steps for `model` are still unused."""
        with self._lock:
            return len(self._queues.get(model, ()))

    @property
    def requests(self) -> list[ReceivedRequest]:
        """A snapshot of every request received so far (batch items included), in order."""
        with self._lock:
            return list(self._requests)

    def count(self, model: str | None = None) -> int:
        """Requests received (for `model`, or in all), batch items included."""
        with self._lock:
            return sum(1 for r in self._requests if model is None or r.model == model)

    def sent_usage(self, request_id: str | None = None) -> dict[str, Any] | None:
        """The `usage` object answered to a request (batch items too), as sent on the wire.

        Without `request_id`: that of the last answer that had one. None if there is none.
        """
        with self._lock:
            if request_id is not None:
                return self._usages.get(request_id)
            return next(reversed(self._usages.values()), None)

    def advance(self, seconds: float) -> None:
        """Move the prompt-cache clock forward (cache entries age; nothing else does)."""
        self.cache.advance(seconds)

    def batches(self) -> list[BatchInfo]:
        """Every batch created so far, in order, with its items and answered retrieves."""
        with self._lock:
            return self._store.infos()

    def batch_calls(self, op: BatchOp | None = None) -> list[BatchCall]:
        """Calls to the batch endpoints (not model requests), optionally of one op."""
        with self._lock:
            return [c for c in self._calls if op is None or c.op == op]

    def retrieves(self, batch_id: str | None = None) -> int:
        """Retrieve calls received (of one batch, or all), scripted failures included."""
        return sum(1 for c in self.batch_calls("retrieve") if batch_id in (None, c.batch_id))

    def finish_batch(self, batch_id: str) -> None:
        """End a batch at its next retrieve, whatever polls it had left."""
        with self._lock:
            self._store.batches[batch_id].polls_left = 0

    def _next(self, model: Any) -> tuple[Step, str]:
        with self._lock:
            queue = self._queues.get(model) if isinstance(model, str) else None
            return (queue.popleft() if queue else self._default), self._new_id()

    def _next_call(self, op: str) -> tuple[CallStep | None, str]:
        with self._lock:
            queue = self._call_queues.get(op)
            return (queue.popleft() if queue else None), self._new_id()

    def _new_id(self) -> str:
        with self._lock:
            self._counter += 1
            return f"req_fake{self._counter:016x}"

    def _record(self, request: ReceivedRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def _record_usage(self, request_id: str, usage: dict[str, Any] | None) -> None:
        if usage is not None:
            with self._lock:
                self._usages[request_id] = usage

    def _record_call(self, call: BatchCall) -> None:
        with self._lock:
            self._calls.append(call)

    def _cache_usage(self, api: Api, body: Any, step: Ok) -> CacheUsage | None:
        """The simulated cache traffic of a request, when simulated and the step allows it."""
        if not self.simulate_cache or step.fixes_cache or not isinstance(body, dict):
            return None
        return self.cache.usage(api, body.get("model"), body, input_estimate(api, body))

    def _serve_batch(
        self, api: Api, op: str, key: str | None, raw: bytes, headers: dict[str, str]
    ) -> tuple[int, bytes, str | None]:
        """(status, body, batch id) for a call to a batch endpoint."""
        with self._lock:
            return self._store.serve(self, api, op, key, raw, headers)
