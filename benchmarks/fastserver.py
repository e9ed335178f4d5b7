"""A zero-latency fake Anthropic/OpenAI server on raw asyncio, with optional fault injection.

The test suite's `tests/fakeserver.py` is a ThreadingHTTPServer: a thread per connection and
`http.server` parsing cost far more than the client code under test, so the overhead benchmark
would mostly time the server. This one is an `asyncio.Protocol` with keep-alive and minimal
parsing, meant to run in its own process (so it has its own core):

    python benchmarks/fastserver.py [--fault-rate 0.3] [--seed 1] [--slow-s 2] [--latency-ms 0]

It prints `PORT <n>` on stdout once listening. `GET /_stats` returns the request counts as
JSON (total, by model, by answer); `POST /_reset` zeroes them. With `--latency-ms`, each OK
answer waits a uniform 0..latency (so a call is in flight long enough to be killed mid-call);
with `--latency-fixed` too, exactly that long (a provider's time to answer, for overhead).
With `--fault-rate`, that share of model requests gets a fault drawn uniformly from
429/500/503/529/400/404, a slow answer (after `--slow-s`, longer than the client's timeout), a
dropped connection, a non-JSON 200 or a 200 without usage — the mix of `tests/test_faults.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import signal
import subprocess
import sys
import urllib.request
from typing import Any

ANTHROPIC_PATH = b"/v1/messages"
OPENAI_PATH = b"/v1/chat/completions"
FAULTS = (
    "429",
    "500",
    "503",
    "529",
    "400",
    "404",
    "slow",
    "drop",
    "malformed",
    "no_usage",
)
_REASONS = {
    200: b"OK",
    400: b"Bad Request",
    404: b"Not Found",
    429: b"Too Many Requests",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
    529: b"Overloaded",
}
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    429: "rate_limit_error",
    500: "api_error",
    503: "api_error",
    529: "overloaded_error",
}


class Stats:
    """Request counters (one process, one event loop: no locking needed)."""

    def __init__(self) -> None:
        self.total = 0
        self.by_model: collections.Counter[str] = collections.Counter()
        self.by_step: collections.Counter[str] = collections.Counter()
        self.seq = 0

    def as_dict(self) -> dict[str, Any]:
        """The counters as JSON-able data."""
        return {"requests": self.total, "by_model": self.by_model, "by_step": self.by_step}


class FakeApi(asyncio.Protocol):
    """One client connection: parse HTTP/1.1 requests, answer each at once (or as faulted)."""

    def __init__(
        self,
        stats: Stats,
        rng: random.Random,
        fault_rate: float,
        slow_s: float,
        latency_s: float,
        latency_fixed: bool = False,
    ) -> None:
        self.latency_s = latency_s
        self.latency_fixed = latency_fixed
        self.stats = stats
        self.rng = rng
        self.fault_rate = fault_rate
        self.slow_s = slow_s
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport."""
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        """Buffer, then handle every complete request in the buffer."""
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            if len(self.buf) < end + 4 + length:
                return
            body = bytes(self.buf[end + 4 : end + 4 + length])
            del self.buf[: end + 4 + length]
            method, path = head.split(b" ", 2)[:2]
            self.handle(method, path.split(b"?", 1)[0], body)

    def handle(self, method: bytes, path: bytes, body: bytes) -> None:
        """Answer one request."""
        if path == b"/_stats":
            self.send(200, json.dumps(self.stats.as_dict()).encode(), b"")
            return
        if path == b"/_reset":
            self.stats.__init__()  # type: ignore[misc]
            self.send(200, b"{}", b"")
            return
        api = "anthropic" if path == ANTHROPIC_PATH else "openai" if path == OPENAI_PATH else None
        if method != b"POST" or api is None:
            self.send(404, b'{"error": {"message": "no route"}}', b"")
            return
        try:
            req: dict[str, Any] = json.loads(body)
        except ValueError:
            req = {}
        model = str(req.get("model"))
        stats = self.stats
        stats.total += 1
        stats.seq += 1
        stats.by_model[model] += 1
        rid = f"req_fast{stats.seq:016x}".encode()
        step = "ok"
        if self.fault_rate and self.rng.random() < self.fault_rate:
            step = self.rng.choice(FAULTS)
        stats.by_step[step] += 1
        if step == "ok" and self.latency_s:
            asyncio.get_running_loop().call_later(
                self.latency_s if self.latency_fixed else self.rng.uniform(0, self.latency_s),
                self._late,
                _ok(api, req, rid, usage=True),
                rid,
                api,
            )
        elif step == "ok":
            self.send(200, _ok(api, req, rid, usage=True), rid, api)
        elif step == "no_usage":
            self.send(200, _ok(api, req, rid, usage=False), rid, api)
        elif step == "malformed":
            self.send(200, b'{"id": "msg_01", "type": "mess', rid, api)
        elif step == "drop":
            assert self.transport is not None
            self.transport.close()
        elif step == "slow":
            asyncio.get_running_loop().call_later(
                self.slow_s, self._late, _ok(api, req, rid, usage=True), rid, api
            )
        else:
            status = int(step)
            extra = b"retry-after: 0\r\n" if status == 429 else b""
            if status >= 500 or status == 429:
                extra += b"x-should-retry: true\r\n"
            self.send(status, _error_body(api, status, rid), rid, api, extra)

    def _late(self, data: bytes, rid: bytes, api: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.send(200, data, rid, api)

    def send(
        self, status: int, data: bytes, rid: bytes, api: str | None = None, extra: bytes = b""
    ) -> None:
        """Write one response with keep-alive."""
        if self.transport is None or self.transport.is_closing():
            return
        rid_header = b""
        if rid:
            name = b"request-id" if api == "anthropic" else b"x-request-id"
            rid_header = name + b": " + rid + b"\r\n"
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s%s\r\n"
            % (status, _REASONS.get(status, b"X"), len(data), rid_header, extra)
            + data
        )


def _ok(api: str, req: dict[str, Any], rid: bytes, *, usage: bool) -> bytes:
    model = req.get("model")
    max_tokens = int(req.get("max_tokens") or req.get("max_completion_tokens") or 4096)
    out = min(max_tokens, 16)
    prompt = sum(
        len(m.get("content", "").encode())
        for m in req.get("messages") or []
        if isinstance(m, dict) and isinstance(m.get("content"), str)
    )
    inp = max(1, prompt // 4)
    text = f"Fake reply from {model}."
    if api == "anthropic":
        reply: dict[str, Any] = {
            "id": "msg_" + rid.decode()[4:],
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
        }
        if usage:
            reply["usage"] = {
                "input_tokens": inp,
                "output_tokens": out,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "service_tier": "standard",
            }
    else:
        reply = {
            "id": "chatcmpl-" + rid.decode()[4:],
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "system_fingerprint": "fp_fake",
        }
        if usage:
            reply["usage"] = {
                "prompt_tokens": inp,
                "completion_tokens": out,
                "total_tokens": inp + out,
            }
    return json.dumps(reply).encode()


def _error_body(api: str, status: int, rid: bytes) -> bytes:
    err_type = _ANTHROPIC_TYPES.get(status, "api_error")
    if api == "anthropic":
        payload: dict[str, Any] = {
            "type": "error",
            "error": {"type": err_type, "message": f"Fake {err_type}"},
            "request_id": rid.decode(),
        }
    else:
        code = "rate_limit_exceeded" if status == 429 else None
        payload = {
            "error": {"message": f"Fake {status}", "type": err_type, "param": None, "code": code}
        }
    return json.dumps(payload).encode()


async def serve(
    port: int = 0,
    *,
    fault_rate: float = 0.0,
    seed: int = 1,
    slow_s: float = 2.0,
    latency_s: float = 0.0,
    latency_fixed: bool = False,
) -> tuple[asyncio.Server, Stats]:
    """Start listening on 127.0.0.1 in the running loop; returns the server and its counters."""
    stats = Stats()
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: FakeApi(stats, rng, fault_rate, slow_s, latency_s, latency_fixed),
        "127.0.0.1",
        port,
        backlog=1024,
    )
    return server, stats


class ServerProcess:
    """This server in a child process (its own core): `with ServerProcess() as srv: srv.url`."""

    def __init__(
        self,
        *,
        fault_rate: float = 0.0,
        seed: int = 1,
        slow_s: float = 2.0,
        latency_ms: float = 0.0,
        latency_fixed: bool = False,
    ) -> None:
        self.args = [
            *(["--latency-fixed"] if latency_fixed else []),
            "--latency-ms",
            str(latency_ms),
            "--fault-rate",
            str(fault_rate),
            "--seed",
            str(seed),
            "--slow-s",
            str(slow_s),
        ]
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """`http://127.0.0.1:PORT`."""
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerProcess:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, *self.args], stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("PORT "):
            self.proc.kill()
            raise RuntimeError(f"fastserver did not start: {line!r}")
        self.port = int(line.split()[1])
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def stats(self) -> dict[str, Any]:
        """The server's counters."""
        with urllib.request.urlopen(f"{self.url}/_stats", timeout=5) as resp:
            data: dict[str, Any] = json.load(resp)
        return data

    def reset(self) -> None:
        """Zero the counters."""
        req = urllib.request.Request(f"{self.url}/_reset", method="POST", data=b"")
        with urllib.request.urlopen(req, timeout=5):
            pass


async def _main(args: argparse.Namespace) -> None:
    server, _ = await serve(
        args.port,
        fault_rate=args.fault_rate,
        seed=args.seed,
        slow_s=args.slow_s,
        latency_s=args.latency_ms / 1000,
        latency_fixed=args.latency_fixed,
    )
    port = server.sockets[0].getsockname()[1]
    print(f"PORT {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main(argv: list[str] | None = None) -> None:
    """Run the server until SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--fault-rate", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--slow-s", type=float, default=2.0)
    parser.add_argument("--latency-ms", type=float, default=0.0, help="OK answers wait 0..this")
    parser.add_argument("--latency-fixed", action="store_true", help="wait exactly --latency-ms")
    asyncio.run(_main(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
