"""The daemon's control API: a small HTTP/1.1 server on a Unix socket, and the status it reports.

Routes (JSON bodies unless noted; one request per connection, `Connection: close`):

| method | path              | answer                                                         |
|--------|-------------------|----------------------------------------------------------------|
| GET    | /status           | 200 `ControlTarget.status()` (see `build_status`)              |
| GET    | /health           | 200 when `health()["ok"]`, else 503                            |
| GET    | /metrics          | 200 Prometheus text (`text/plain; version=0.0.4`)              |
| POST   | /trigger/LOOP     | 200; 404 unknown loop; 409 busy (or paused, over budget)       |
| POST   | /pause/LOOP       | 200; 404 unknown loop                                          |
| POST   | /resume/LOOP      | 200; 404 unknown loop                                          |
| POST   | /reload           | 200 when `reload()["ok"]`, else 422 (old config keeps running) |

Anything else: 404 unknown path, 405 wrong method (with `Allow`), 400 malformed request or a
loop name outside `[A-Za-z0-9][A-Za-z0-9_-]*`, 500 `{"error": ...}` when the target raises (the
server logs it and keeps serving). The client side is `agentd.control_client`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import stat
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from http import HTTPStatus
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote

from agentd.errors import EXIT_NOT_NOW, AgentdError
from agentd.logs import get_logger

SOCKET_NAME = "agentd.sock"
ENV_RUNTIME_DIRECTORY = "RUNTIME_DIRECTORY"  # set by systemd's RuntimeDirectory=
# sun_path is 108 bytes on Linux, one of them the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107
JSON_TYPE = "application/json"
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LOOP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")

_READ_TIMEOUT_S = 10.0  # a client that sends nothing must not hold a handler forever
_MAX_HEAD_BYTES = 16 * 1024
_MAX_BODY_BYTES = 64 * 1024
_GET_ROUTES = frozenset({"status", "health", "metrics"})
_LOOP_ROUTES = frozenset({"trigger", "pause", "resume"})

log = get_logger()


class ControlTarget(Protocol):
    """What the control server drives: the daemon.

    The synchronous methods run on the event loop's thread (so they may touch the scheduler),
    except `metrics()`, which runs in a worker thread: a scrape reads the ledger, and the first
    one of a process aggregates it all. Raise `KeyError(loop)` for an unknown loop and
    `LoopBusy` (or another `AgentdError` with exit code 75) when it cannot run now.
    """

    def status(self) -> dict[str, Any]:
        """The daemon and every loop (see `build_status`)."""
        ...

    async def trigger(self, loop: str) -> dict[str, Any]:
        """Start a run of `loop` now; return promptly (e.g. `{"ok": true, "run_id": 7}`)."""
        ...

    def pause(self, loop: str) -> dict[str, Any]:
        """Pause `loop` until resumed (kept in the ledger across restarts)."""
        ...

    def resume(self, loop: str) -> dict[str, Any]:
        """Resume a paused `loop`."""
        ...

    async def reload(self) -> dict[str, Any]:
        """Re-read the config: `{"ok": bool, "message": str, ...}`; refused keeps the old one."""
        ...

    def health(self) -> dict[str, Any]:
        """`{"ok": bool, ...}`: whether the daemon is healthy (scheduler up, ledger writable)."""
        ...

    def metrics(self) -> str:
        """Prometheus text exposition (e.g. `agentd.metrics.render_metrics`)."""
        ...


def socket_path(state_dir: Path, env: Mapping[str, str] | None = None) -> Path:
    """`$RUNTIME_DIRECTORY/agentd.sock` when systemd sets it, else `<state_dir>/agentd.sock`."""
    env = os.environ if env is None else env
    # systemd passes one path per RuntimeDirectory= entry, colon-separated: agentd's is first.
    runtime = env.get(ENV_RUNTIME_DIRECTORY, "").split(":")[0]
    return (Path(runtime) if runtime else Path(state_dir)) / SOCKET_NAME


def check_socket_path(path: Path) -> None:
    """Raise AgentdError when `path` does not fit in a Unix socket address (107 bytes)."""
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH_BYTES:
        raise AgentdError(
            f"control socket path {path} is {size} bytes long, but Unix socket paths are limited "
            f"to {MAX_SOCKET_PATH_BYTES}: use a shorter state directory (--state-dir or "
            f"AGENTD_STATE_DIR) or set {ENV_RUNTIME_DIRECTORY} to a short directory"
        )


def _answers(path: Path) -> bool:
    """Whether something accepts connections on the socket file `path`."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(os.fspath(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        # Busy, slow or not ours to probe: we cannot prove it dead, so it is not displaced.
        return True
    finally:
        probe.close()
    return True


def _bind(path: Path) -> socket.socket:
    """A listening-ready Unix socket bound at `path` with mode 0600, never more open than that.

    The socket file is created under umask 077, so it is owner-only from its first instant (a
    socket's x bits mean nothing; the chmod right after drops them). 077 rather than 177: the
    umask is process-wide, and a directory another thread creates meanwhile must stay usable.
    """
    if path.is_symlink() or (path.exists() and not stat.S_ISSOCK(path.stat().st_mode)):
        raise AgentdError(f"{path} exists and is not a socket; refusing to replace it")
    if path.exists():
        if _answers(path):
            raise AgentdError(
                f"another agentd is already answering on {path}; stop it first (one daemon per "
                "state directory)"
            )
        path.unlink()
        log.warning("control.stale_socket_removed", path=str(path))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o077)
        try:
            sock.bind(os.fspath(path))
        finally:
            os.umask(old)
        try:
            os.chmod(path, 0o600)
        except OSError:
            path.unlink()
            raise
    except OSError as exc:
        sock.close()
        raise AgentdError(
            f"cannot create the control socket {path}: {exc.strerror or exc}"
        ) from exc
    return sock


class ControlServer(asyncio.AbstractServer):
    """The running control server; `close()` also removes its socket file (if still ours)."""

    def __init__(self, server: asyncio.AbstractServer, path: Path, inode: tuple[int, int]) -> None:
        self._server = server
        self.path = path
        self._inode = inode

    def close(self) -> None:
        """Stop listening and remove the socket file, unless another process replaced it."""
        self._server.close()
        with contextlib.suppress(OSError):
            st = self.path.stat()
            if (st.st_dev, st.st_ino) == self._inode:
                self.path.unlink()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        """The event loop serving the socket."""
        return self._server.get_loop()

    def is_serving(self) -> bool:
        """True while accepting connections."""
        return self._server.is_serving()

    async def start_serving(self) -> None:
        """Start accepting connections (`serve` already did)."""
        await self._server.start_serving()

    async def serve_forever(self) -> None:
        """Accept connections until cancelled."""
        await self._server.serve_forever()

    async def wait_closed(self) -> None:
        """Wait until the server is closed."""
        await self._server.wait_closed()


async def serve(target: ControlTarget, path: Path) -> asyncio.AbstractServer:
    """Serve the control API on the Unix socket `path` (mode 0600) until the server is closed.

    Refuses an overlong path, a path held by something that is not a socket, and a socket on
    which another process still answers; a stale socket file (nothing answers) is replaced.
    """
    path = Path(path)
    check_socket_path(path)
    sock = _bind(path)
    st = path.stat()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _handle(target, reader, writer)

    try:
        server = await asyncio.start_unix_server(handle, sock=sock, limit=_MAX_HEAD_BYTES)
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    log.info("control.listening", path=str(path))
    return ControlServer(server, path, (st.st_dev, st.st_ino))


# ---------------------------------------------------------------------------- HTTP


class _BadRequest(Exception):
    """The bytes on the connection are not a request we can answer."""


@dataclass(frozen=True)
class _Reply:
    status: int
    body: Any  # JSON-able, or str for text bodies
    content_type: str = JSON_TYPE
    allow: str | None = None


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str]:
    """Read the request head (and drain a small body); return (method, target)."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise _BadRequest("request head too large") from None
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _BadRequest("malformed request line")
    headers = {}
    for line in lines[1:]:
        if line:
            name, sep, value = line.partition(":")
            if not sep:
                raise _BadRequest("malformed header line")
            headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raise _BadRequest("chunked request bodies are not supported")
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        raise _BadRequest("bad Content-Length") from None
    if length < 0 or length > _MAX_BODY_BYTES:
        raise _BadRequest("request body too large")
    if length:
        await reader.readexactly(length)  # no route takes a body: read it so the close is clean
    return parts[0], parts[1]


def _json_default(value: object) -> object:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, set | frozenset | tuple):
        return sorted(value) if isinstance(value, set | frozenset) else list(value)
    return str(value)  # Decimal money, Path: as text, never a float


def _encode(reply: _Reply) -> tuple[int, bytes]:
    """(status, bytes) of a reply; an answer that cannot be encoded becomes a 500."""
    if reply.content_type == JSON_TYPE:
        try:
            payload = (json.dumps(reply.body, default=_json_default) + "\n").encode()
        except (TypeError, ValueError) as exc:  # e.g. a circular structure from the target
            return _encode(_internal_error("encoding the answer", exc))
    else:
        payload = str(reply.body).encode()
    try:
        reason = HTTPStatus(reply.status).phrase
    except ValueError:
        reason = "Unknown"
    head = [
        f"HTTP/1.1 {reply.status} {reason}",
        f"Content-Type: {reply.content_type}",
        f"Content-Length: {len(payload)}",
        "Connection: close",
        "Cache-Control: no-store",
    ]
    if reply.allow:
        head.append(f"Allow: {reply.allow}")
    return reply.status, ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload


async def _handle(
    target: ControlTarget, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Answer one request on one connection, whatever happens inside the target."""
    started = time.monotonic()
    method = url = "-"
    try:
        try:
            method, url = await asyncio.wait_for(_read_request(reader), _READ_TIMEOUT_S)
        except _BadRequest as exc:
            reply = _Reply(400, {"error": f"bad request: {exc}"})
        except TimeoutError:
            reply = _Reply(408, {"error": "no complete request within the timeout"})
        else:
            reply = await _dispatch(target, method, url)
        status, data = _encode(reply)
        writer.write(data)
        await writer.drain()
        log.debug(
            "control.request",
            method=method,
            path=url,
            status=status,
            ms=round((time.monotonic() - started) * 1000, 1),
        )
    except (asyncio.IncompleteReadError, ConnectionError):
        pass  # the client went away; nobody to answer
    except Exception:
        log.exception("control.handler_failed", method=method, path=url)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def _route(method: str, url: str) -> tuple[str, str | None] | _Reply:
    """(action, loop) for a valid request, else the error reply."""
    path = url.split("?", 1)[0].split("#", 1)[0]
    if len(path) > 1:
        path = path.rstrip("/")
    parts = [unquote(p) for p in path.split("/")[1:]]
    if len(parts) == 1 and parts[0] in _GET_ROUTES | {"reload"}:
        action, loop, allowed = parts[0], None, "GET" if parts[0] in _GET_ROUTES else "POST"
    elif len(parts) == 2 and parts[0] in _LOOP_ROUTES:
        action, loop, allowed = parts[0], parts[1], "POST"
        if not LOOP_NAME.match(loop):
            return _Reply(400, {"error": f"invalid loop name {loop!r}"})
    else:
        return _Reply(404, {"error": f"no such endpoint: {path}"})
    if method != allowed:
        return _Reply(
            405, {"error": f"{method} not allowed on {path} (use {allowed})"}, allow=allowed
        )
    return action, loop


async def _dispatch(target: ControlTarget, method: str, url: str) -> _Reply:
    """Call the target for one request and turn its answer (or exception) into a reply."""
    routed = _route(method, url)
    if isinstance(routed, _Reply):
        return routed
    action, loop = routed
    calls: dict[str, Callable[[], Awaitable[Any]]] = {
        "status": lambda: _sync(target.status),
        "health": lambda: _sync(target.health),
        "metrics": lambda: asyncio.to_thread(target.metrics),
        "reload": target.reload,
        "trigger": lambda: target.trigger(str(loop)),
        "pause": lambda: _sync(target.pause, str(loop)),
        "resume": lambda: _sync(target.resume, str(loop)),
    }
    try:
        result = await calls[action]()
    except KeyError as exc:
        if loop is not None and (not exc.args or loop in str(exc.args[0])):
            return _Reply(404, {"error": f"no loop named {loop!r}", "loop": loop})
        return _internal_error(action, exc)
    except AgentdError as exc:
        if loop is not None and exc.exit_code == EXIT_NOT_NOW:
            return _Reply(409, {"error": str(exc), "loop": loop})
        if action == "reload":  # e.g. a ConfigError raised instead of returned
            return _Reply(422, {"ok": False, "message": str(exc), "error": str(exc)})
        log.warning("control.action_failed", action=action, loop=loop, error=str(exc))
        return _Reply(500, {"error": str(exc)})
    except Exception as exc:
        return _internal_error(action, exc)
    if action == "metrics":
        return _Reply(200, str(result), METRICS_TYPE)
    if not isinstance(result, dict):
        return _internal_error(action, TypeError(f"{action}() returned {type(result).__name__}"))
    if action == "health":
        return _Reply(200 if result.get("ok") else 503, result)
    if action == "reload":
        return _Reply(200 if result.get("ok") else 422, result)
    return _Reply(200, result)


async def _sync(func: Callable[..., Any], *args: Any) -> Any:
    return func(*args)


def _internal_error(action: str, exc: BaseException) -> _Reply:
    log.error("control.target_failed", action=action, exc_info=exc)
    return _Reply(500, {"error": f"internal error in {action}: {type(exc).__name__}: {exc}"[:300]})
