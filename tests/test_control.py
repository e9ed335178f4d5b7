"""The control API: the real server on a Unix socket, driven by the real synchronous client.

The daemon is replaced by `FakeTarget`, a small implementation of `ControlTarget`: these are
unit tests of the server, the client and their formatting; the daemon tests drive the real one.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from builders import base_config, merge, write_config
from structlog.testing import capture_logs

from agentd import budgets, loopstate
from agentd.budgets import CallStart
from agentd.config import Config, load_config
from agentd.control import (
    MAX_SOCKET_PATH_BYTES,
    ControlTarget,
    check_socket_path,
    serve,
    socket_path,
)
from agentd.control_client import (
    DaemonNotRunning,
    UnixHTTPConnection,
    action_command,
    find_socket,
    format_result,
    format_status,
    request,
    status_command,
)
from agentd.daemonstatus import build_status
from agentd.errors import EXIT_FAILED, AgentdError, ConfigError, LoopBusy, LoopPaused
from agentd.ledger import Ledger
from agentd.providers.base import Usage

T = TypeVar("T")
LOOPS = ("alpha", "beta")
METRICS_TEXT = "# HELP agentd_up Up.\n# TYPE agentd_up gauge\nagentd_up 1\n"


class FakeTarget:
    """A scriptable daemon: two loops, flags for busy, failing and refusing behaviour."""

    def __init__(self) -> None:
        self.busy: set[str] = set()
        self.paused: dict[str, str] = {}
        self.reload_ok = True
        self.healthy = True
        self.explode: str | None = None  # name of a method that raises a bug
        self.calls: list[tuple[str, str | None]] = []
        self.threads: dict[str, str] = {}

    def _enter(self, method: str, loop: str | None = None) -> None:
        self.calls.append((method, loop))
        self.threads[method] = threading.current_thread().name
        if self.explode == method:
            raise RuntimeError(f"{method} exploded")
        if loop is not None and loop not in LOOPS:
            raise KeyError(loop)

    def status(self) -> dict[str, Any]:
        self._enter("status")
        return {"loops": [{"name": n, "paused": n in self.paused} for n in LOOPS]}

    async def trigger(self, loop: str) -> dict[str, Any]:
        self._enter("trigger", loop)
        await asyncio.sleep(0)
        if loop in self.busy:
            raise LoopBusy(f"loop {loop!r} is already running")
        if loop in self.paused:
            raise LoopPaused(f"loop {loop!r} is paused")
        return {"ok": True, "loop": loop, "run_id": 7}

    def pause(self, loop: str) -> dict[str, Any]:
        self._enter("pause", loop)
        self.paused[loop] = "paused by the operator"
        return {"ok": True, "loop": loop, "paused": True}

    def resume(self, loop: str) -> dict[str, Any]:
        self._enter("resume", loop)
        was = self.paused.pop(loop, None) is not None
        return {"ok": True, "loop": loop, "was_paused": was}

    async def reload(self) -> dict[str, Any]:
        self._enter("reload")
        if self.reload_ok:
            return {"ok": True, "message": "2 loops, 1 changed"}
        return {"ok": False, "message": "config.yaml:3: loops.x.every: not a duration"}

    def health(self) -> dict[str, Any]:
        self._enter("health")
        return {"ok": self.healthy, "scheduler": "running" if self.healthy else "stopped"}

    def metrics(self) -> str:
        self._enter("metrics")
        return METRICS_TEXT


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory for sockets: pytest's tmp_path can exceed the 107-byte limit."""
    path = Path(tempfile.mkdtemp(prefix="agentd-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sock(sock_dir: Path) -> Path:
    return sock_dir / "agentd.sock"


def with_server(target: ControlTarget, path: Path, body: Callable[[Path], T]) -> T:
    """Serve `target` on `path` in a fresh event loop; run the synchronous `body` in a thread."""

    async def main() -> T:
        server = await serve(target, path)
        try:
            return await asyncio.to_thread(body, path)
        finally:
            server.close()
            await server.wait_closed()

    return asyncio.run(main())


def dead_socket(path: Path) -> None:
    """Leave a socket file nothing listens on, as a killed daemon does."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(os.fspath(path))
    s.close()


# ---------------------------------------------------------------------------- the socket


def test_socket_path_follows_runtime_directory(tmp_path: Path) -> None:
    assert socket_path(tmp_path, {}) == tmp_path / "agentd.sock"
    assert socket_path(tmp_path, {"RUNTIME_DIRECTORY": ""}) == tmp_path / "agentd.sock"
    assert socket_path(tmp_path, {"RUNTIME_DIRECTORY": "/run/agentd"}) == Path(
        "/run/agentd/agentd.sock"
    )
    # systemd lists one path per RuntimeDirectory= entry: agentd's is the first.
    env = {"RUNTIME_DIRECTORY": "/run/agentd:/run/other"}
    assert socket_path(tmp_path, env) == Path("/run/agentd/agentd.sock")


def test_socket_is_mode_0600_whatever_the_umask(sock: Path) -> None:
    old = os.umask(0)
    try:
        mode = with_server(FakeTarget(), sock, lambda p: p.stat().st_mode)
    finally:
        os.umask(old)
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600
    assert not sock.exists()  # close() removed it


def test_an_overlong_path_is_refused_with_advice(sock_dir: Path) -> None:
    long_dir = sock_dir / ("d" * (MAX_SOCKET_PATH_BYTES - len(str(sock_dir))))
    path = long_dir / "agentd.sock"
    assert len(os.fsencode(path)) > MAX_SOCKET_PATH_BYTES
    with pytest.raises(AgentdError) as excinfo:
        asyncio.run(serve(FakeTarget(), path))
    message = str(excinfo.value)
    assert str(path) in message
    assert "shorter state directory" in message and "RUNTIME_DIRECTORY" in message
    with pytest.raises(AgentdError, match="RUNTIME_DIRECTORY"):
        request(path, "GET", "/status")
    check_socket_path(sock_dir / ("x" * (MAX_SOCKET_PATH_BYTES - len(str(sock_dir)) - 1)))


def test_a_stale_socket_file_is_replaced(sock: Path) -> None:
    dead_socket(sock)
    with capture_logs() as logs:
        status, body = with_server(FakeTarget(), sock, lambda p: request(p, "GET", "/health"))
    assert (status, body["ok"]) == (200, True)
    assert any(e["event"] == "control.stale_socket_removed" for e in logs)


def test_a_live_socket_is_not_displaced(sock: Path) -> None:
    async def main() -> tuple[int, Any]:
        first = await serve(FakeTarget(), sock)
        try:
            with pytest.raises(AgentdError, match="already answering"):
                await serve(FakeTarget(), sock)
            return await asyncio.to_thread(request, sock, "GET", "/health")
        finally:
            first.close()
            await first.wait_closed()

    assert asyncio.run(main())[0] == 200


def test_a_file_that_is_not_a_socket_is_left_alone(sock: Path) -> None:
    sock.write_text("not a socket")
    with pytest.raises(AgentdError, match="not a socket"):
        asyncio.run(serve(FakeTarget(), sock))
    assert sock.read_text() == "not a socket"


def test_close_leaves_a_socket_that_replaced_ours(sock: Path) -> None:
    async def main() -> None:
        server = await serve(FakeTarget(), sock)
        sock.unlink()
        dead_socket(sock)  # another daemon's socket now
        server.close()
        await server.wait_closed()

    asyncio.run(main())
    assert sock.exists()


# ---------------------------------------------------------------------------- the client


def test_no_socket_means_no_daemon(sock: Path) -> None:
    with pytest.raises(DaemonNotRunning) as excinfo:
        request(sock, "GET", "/status")
    assert str(excinfo.value) == (
        f"no agentd daemon is running (no socket at {sock}); start it with 'agentd run' or "
        "'systemctl start agentd'"
    )
    assert excinfo.value.exit_code == EXIT_FAILED == 1
    with pytest.raises(DaemonNotRunning):
        action_command(sock, "trigger", "alpha")
    with pytest.raises(DaemonNotRunning):
        request(sock.parent / "missing-dir" / "agentd.sock", "GET", "/status")


def test_a_dead_socket_means_no_daemon(sock: Path) -> None:
    dead_socket(sock)
    with pytest.raises(DaemonNotRunning, match=f"nothing answers on {sock}"):
        status_command(sock, as_json=False)


def test_find_socket_falls_back_to_the_system_socket(sock_dir: Path, tmp_path: Path) -> None:
    system = sock_dir / "system.sock"
    assert find_socket(tmp_path, {}, fallbacks=(system,)) == tmp_path / "agentd.sock"
    dead_socket(system)
    assert find_socket(tmp_path, {}, fallbacks=(system,)) == system
    (tmp_path / "agentd.sock").touch()
    assert find_socket(tmp_path, {}, fallbacks=(system,)) == tmp_path / "agentd.sock"
    assert find_socket(tmp_path, {"RUNTIME_DIRECTORY": str(sock_dir)}, fallbacks=()) == (
        sock_dir / "agentd.sock"
    )


# ---------------------------------------------------------------------------- routes


@pytest.mark.parametrize(
    ("method", "url", "status", "body"),
    [
        ("GET", "/status", 200, {"loops": [{"name": "alpha", "paused": False}]}),
        ("GET", "/health", 200, {"ok": True}),
        ("POST", "/trigger/alpha", 200, {"ok": True, "loop": "alpha", "run_id": 7}),
        ("POST", "/trigger/gamma", 404, {"error": "no loop named 'gamma'", "loop": "gamma"}),
        ("POST", "/pause/beta", 200, {"ok": True, "loop": "beta", "paused": True}),
        ("POST", "/pause/gamma", 404, {"loop": "gamma"}),
        ("POST", "/resume/alpha", 200, {"ok": True, "was_paused": False}),
        ("POST", "/resume/gamma", 404, {"loop": "gamma"}),
        ("POST", "/reload", 200, {"ok": True, "message": "2 loops, 1 changed"}),
        ("POST", "/status", 405, {"error": "POST not allowed on /status (use GET)"}),
        ("GET", "/trigger/alpha", 405, {"error": "GET not allowed on /trigger/alpha (use POST)"}),
        ("GET", "/reload", 405, {}),
        ("DELETE", "/pause/alpha", 405, {}),
        ("GET", "/nope", 404, {"error": "no such endpoint: /nope"}),
        ("POST", "/trigger", 404, {}),
        ("POST", "/trigger/alpha/extra", 404, {}),
        ("GET", "/", 404, {}),
        ("POST", "/trigger/..%2Fetc", 400, {"error": "invalid loop name '../etc'"}),
        ("POST", "/trigger/-alpha", 400, {}),
        ("POST", "/pause/al%20pha", 400, {}),
        ("GET", "/status/", 200, {}),  # a trailing slash is forgiven
        ("GET", "/status?verbose=1", 200, {}),
    ],
)
def test_routes(sock: Path, method: str, url: str, status: int, body: dict[str, Any]) -> None:
    got_status, got = with_server(FakeTarget(), sock, lambda p: request(p, method, url))
    assert got_status == status
    assert isinstance(got, dict)
    for key, value in body.items():
        assert (got[key][0] if key == "loops" else got[key]) == (
            value[0] if key == "loops" else value
        )
    if status >= 400:
        assert isinstance(got["error"], str) and got["error"]


def test_busy_and_paused_loops_are_409(sock: Path) -> None:
    target = FakeTarget()
    target.busy.add("alpha")
    target.paused["beta"] = "by hand"

    def calls(p: Path) -> list[tuple[int, Any]]:
        return [request(p, "POST", "/trigger/alpha"), request(p, "POST", "/trigger/beta")]

    (busy_status, busy), (paused_status, paused) = with_server(target, sock, calls)
    assert busy_status == 409
    assert busy == {"error": "loop 'alpha' is already running", "loop": "alpha"}
    assert paused_status == 409
    assert paused["error"] == "loop 'beta' is paused"


def test_unhealthy_is_503_and_refused_reload_is_422(sock: Path) -> None:
    target = FakeTarget()
    target.healthy = False
    target.reload_ok = False

    def calls(p: Path) -> list[tuple[int, Any]]:
        return [request(p, "GET", "/health"), request(p, "POST", "/reload")]

    (health_status, health), (reload_status, reload) = with_server(target, sock, calls)
    assert (health_status, health) == (503, {"ok": False, "scheduler": "stopped"})
    assert reload_status == 422
    assert reload["ok"] is False and "not a duration" in reload["message"]


def test_metrics_route_headers(sock: Path) -> None:
    def raw(p: Path) -> list[tuple[int, dict[str, str], bytes]]:
        out = []
        for method, url in (("GET", "/metrics"), ("POST", "/metrics")):
            conn = UnixHTTPConnection(p, timeout=5)
            conn.request(method, url)
            response = conn.getresponse()
            out.append((response.status, dict(response.getheaders()), response.read()))
            conn.close()
        return out

    target = FakeTarget()
    (ok, headers, payload), (refused, refused_headers, _) = with_server(target, sock, raw)
    assert ok == 200
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert headers["Connection"] == "close"
    assert int(headers["Content-Length"]) == len(payload)
    assert payload.decode() == METRICS_TEXT
    assert refused == 405 and refused_headers["Allow"] == "GET"
    # A scrape reads the whole ledger the first time: it runs off the event loop's thread.
    assert target.threads["metrics"] != "MainThread"


def test_sync_methods_run_on_the_event_loop_thread(sock: Path) -> None:
    """So the daemon's status/pause/resume may touch the scheduler without locks."""
    target = FakeTarget()

    def calls(p: Path) -> None:
        request(p, "GET", "/status")
        request(p, "POST", "/pause/alpha")
        request(p, "POST", "/resume/alpha")
        request(p, "GET", "/health")

    with_server(target, sock, calls)
    main = threading.main_thread().name
    assert {target.threads[m] for m in ("status", "pause", "resume", "health")} == {main}


def test_json_routes_answer_json(sock: Path) -> None:
    def raw(p: Path) -> dict[str, str]:
        conn = UnixHTTPConnection(p, timeout=5)
        conn.request("GET", "/status")
        response = conn.getresponse()
        response.read()
        conn.close()
        return dict(response.getheaders())

    headers = with_server(FakeTarget(), sock, raw)
    assert headers["Content-Type"] == "application/json"
    assert headers["Connection"] == "close"


def test_a_bug_in_the_target_is_500_and_the_server_keeps_serving(sock: Path) -> None:
    target = FakeTarget()
    target.explode = "status"

    def calls(p: Path) -> list[tuple[int, Any]]:
        return [request(p, "GET", "/status"), request(p, "GET", "/health")]

    with capture_logs() as logs:
        (status, body), (after, health) = with_server(target, sock, calls)
    assert status == 500
    assert body == {"error": "internal error in status: RuntimeError: status exploded"}
    assert (after, health["ok"]) == (200, True)
    events = [e for e in logs if e["event"] == "control.target_failed"]
    assert events and events[0]["action"] == "status" and events[0]["log_level"] == "error"


def test_other_target_failures_are_500(sock: Path) -> None:
    class Odd(FakeTarget):
        def pause(self, loop: str) -> dict[str, Any]:
            raise KeyError("scheduler_job_id")  # a bug, not an unknown loop

        def resume(self, loop: str) -> Any:
            return ["not", "a", "dict"]

        def health(self) -> dict[str, Any]:
            raise AgentdError("ledger unavailable")

        async def reload(self) -> dict[str, Any]:
            raise ConfigError("config.yaml", "bad", "loops.x")

        def status(self) -> dict[str, Any]:
            circular: dict[str, Any] = {}
            circular["self"] = circular
            return circular

    def calls(p: Path) -> list[tuple[int, Any]]:
        return [
            request(p, "POST", "/pause/alpha"),
            request(p, "POST", "/resume/alpha"),
            request(p, "GET", "/health"),
            request(p, "POST", "/reload"),
            request(p, "GET", "/status"),
        ]

    with capture_logs():
        pause, resume, health, reload, status = with_server(Odd(), sock, calls)
    assert pause[0] == 500 and "KeyError" in pause[1]["error"]
    assert resume[0] == 500 and "returned list" in resume[1]["error"]
    assert health == (500, {"error": "ledger unavailable"})
    assert reload[0] == 422 and reload[1]["ok"] is False
    assert "loops.x: bad" in reload[1]["message"]
    assert status[0] == 500 and "Circular reference" in status[1]["error"]


def test_malformed_and_silent_clients_do_not_stop_the_server(sock: Path) -> None:
    def calls(p: Path) -> tuple[bytes, bytes, tuple[int, Any]]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(os.fspath(p))  # connects and hangs up without a word
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(os.fspath(p))
            s.sendall(b"garbage\r\n\r\n")
            garbage = s.recv(4096)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(os.fspath(p))
            s.sendall(b"GET /status HTTP/1.1\r\nContent-Length: 999999\r\n\r\n")
            huge = s.recv(4096)
        return garbage, huge, request(p, "GET", "/health")

    garbage, huge, health = with_server(FakeTarget(), sock, calls)
    assert garbage.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"malformed request line" in garbage
    assert huge.startswith(b"HTTP/1.1 400 ")
    assert health[0] == 200


def test_concurrent_clients(sock: Path) -> None:
    def calls(p: Path) -> list[int]:
        results: list[int] = []

        def one() -> None:
            results.append(request(p, "GET", "/status")[0])

        threads = [threading.Thread(target=one) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results

    assert with_server(FakeTarget(), sock, calls) == [200] * 12


# ---------------------------------------------------------------------------- CLI functions


def test_action_command_texts_and_exit_codes(sock: Path) -> None:
    target = FakeTarget()
    target.busy.add("beta")

    def calls(p: Path) -> list[tuple[str, int]]:
        out = [
            action_command(p, "trigger", "alpha"),
            action_command(p, "trigger", "gamma"),
            action_command(p, "trigger", "beta"),
            action_command(p, "trigger", "../x"),
            action_command(p, "pause", "alpha"),
            action_command(p, "resume", "alpha"),
            action_command(p, "reload"),
        ]
        target.reload_ok = False
        out.append(action_command(p, "reload"))
        target.explode = "pause"
        out.append(action_command(p, "pause", "alpha"))
        return out

    with capture_logs():
        results = with_server(target, sock, calls)
    assert results == [
        ("triggered alpha (run 7)", 0),
        ("cannot trigger gamma: no loop named 'gamma'", 2),
        ("cannot trigger beta: loop 'beta' is already running", 75),
        ("invalid loop name '../x': use letters, digits, '-' and '_'", 2),
        ("paused alpha", 0),
        ("resumed alpha", 0),
        ("reloaded: 2 loops, 1 changed", 0),
        (
            "reload refused: config.yaml:3: loops.x.every: not a duration; the old "
            "configuration keeps running",
            1,
        ),
        ("cannot pause alpha: internal error in pause: RuntimeError: pause exploded", 1),
    ]
    assert ("trigger", "../x") not in target.calls  # refused before any request
    with pytest.raises(ValueError):
        action_command(sock, "reload", "alpha")
    with pytest.raises(ValueError):
        action_command(sock, "trigger")
    with pytest.raises(ValueError):
        action_command(sock, "explode", "alpha")


def test_status_command(sock: Path) -> None:
    def calls(p: Path) -> tuple[str, str]:
        return status_command(p, as_json=True), status_command(p, as_json=False)

    as_json, as_text = with_server(FakeTarget(), sock, calls)
    assert '"name": "alpha"' in as_json
    assert "alpha" in as_text and "beta" in as_text


def test_status_command_reports_a_failing_daemon(sock: Path) -> None:
    target = FakeTarget()
    target.explode = "status"
    with capture_logs(), pytest.raises(AgentdError, match="answered 500: internal error"):
        with_server(target, sock, lambda p: status_command(p, as_json=False))


def test_format_result() -> None:
    assert format_result("trigger", {"loop": "a", "run_id": 3}) == "triggered a (run 3)"
    assert format_result("trigger", {"loop": "a", "message": "started a"}) == "started a"
    assert format_result("pause", {"loop": "a"}) == "paused a"
    assert format_result("resume", {"loop": "a"}) == "resumed a"
    assert format_result("reload", {"ok": True}) == "reloaded: configuration reloaded"
    assert format_result("reload", {"ok": True, "message": "reloaded: no changes"}) == (
        "reloaded: no changes"
    )
    refused = "reload refused, the running configuration is kept: bad"
    assert format_result("reload", {"ok": False, "message": refused}) == refused
    assert format_result("reload", {"ok": False}) == (
        "reload refused: no reason given; the old configuration keeps running"
    )
    assert format_result("pause", {"loop": "a", "error": "nope"}) == "cannot pause a: nope"


# ---------------------------------------------------------------------------- status


T0 = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)


@pytest.fixture
def config(tmp_path: Path) -> Config:
    data = merge(
        base_config("http://127.0.0.1:9"),
        {
            "budgets": {"per_day_usd": 5},
            "loops": {
                "work": {"budget": {"per_day_usd": 1}, "jitter": "30s"},
                "other": {
                    "cron": "0 7 * * *",
                    "tier": "fast",
                    "max_tokens": 100,
                    "prompt": "o.md",
                    "active_hours": {"start": "08:00", "end": "22:00"},
                },
            },
        },
    )
    return load_config(write_config(tmp_path / "config", data))


def _spend(ledger: Ledger, config: Config, loop: str, cost: int, *, status: str) -> int:
    run = ledger.start_run(loop=loop, trigger="schedule", simulated=False)
    limits = config.loops[loop].budget
    windows = budgets.windows_for(
        loop,
        limits.limits() if limits else None,
        config.budgets.limits() if config.budgets else None,
    )
    start = CallStart(run, loop, "work", "fast", "haiku", "anthropic", "claude-haiku-4-5", 1, False)
    call = budgets.reserve(ledger, start, 10_000, windows, config.tz, now=T0)
    budgets.settle(ledger, call, status="ok", usage=Usage(10, 5), cost_micro_usd=cost, priced=True)
    error = "every model failed: haiku: rate_limited" if status == "failed" else None
    ledger.finish_run(run, status=status, model="claude-haiku-4-5", error=error)
    loopstate.record_run(ledger, loop, run, status, None)
    return run


def test_build_status_from_the_ledger(tmp_path: Path, config: Config) -> None:
    with Ledger.open(tmp_path / "state") as ledger:
        _spend(ledger, config, "work", 2500, status="ok")
        _spend(ledger, config, "other", 4_000_000, status="failed")
        loopstate.set_paused(ledger, "other", "3 consecutive failures", None)
        started = T0 - timedelta(hours=2, minutes=5)
        status = build_status(
            ledger,
            config,
            now=T0,
            next_runs={"work": T0 + timedelta(minutes=12)},
            running={"work"},
            daemon={"pid": 4242, "started_at": started.isoformat(), "version": "0.1.0"},
        )

    work, other = status["loops"]
    assert work["name"] == "work" and other["name"] == "other"
    assert work["schedule"] == "every 30m, jitter 30s"
    assert other["schedule"] == "cron 0 7 * * *, 08:00-22:00"
    assert work["next_run"] == "2026-03-10T12:12:00.000000Z"
    assert other["next_run"] is None
    assert work["running"] is True and other["running"] is False
    assert work["last_run"]["status"] == "ok" and work["last_run"]["cost_usd"] == "0.002500"
    assert other["last_run"]["error"].startswith("every model failed")
    assert other["paused"] is True and other["paused_reason"] == "3 consecutive failures"
    assert other["consecutive_failures"] == 1 and work["consecutive_failures"] == 0
    assert work["spent_today_usd"] == "0.002500"
    # work's tightest window is its own $1/day; other has only the global $5/day, shared.
    assert work["tightest"]["scope"] == "work"
    assert work["tightest"]["remaining_usd"] == "0.997500"
    assert other["tightest"] == status["budgets"][0]
    assert status["budgets"][0]["remaining_usd"] == "0.997500"  # 5 - 4 - 0.0025
    assert status["budgets"][0]["limit_usd"] == "5.000000"

    text = format_status(status)
    lines = text.splitlines()
    assert lines[0] == (
        "agentd 0.1.0, pid 4242, up 2h05m, 2 loops (1 running, 1 paused), times in UTC"
    )
    assert lines[1].startswith("global budget per day: 4.002500 of 5.000000 USD spent")
    header = next(line for line in lines if line.startswith("loop "))
    assert "next run" in header and "left usd (tightest)" in header
    work_row = next(line for line in lines if line.startswith("work "))
    assert "running" in work_row and "12:12 (in 12m)" in work_row
    assert "0.002500" in work_row and "0.997500 (loop/day)" in work_row
    other_row = next(line for line in lines if line.startswith("other "))
    assert "paused" in other_row and "failed" in other_row and "(global/day)" in other_row
    assert "other: paused: 3 consecutive failures" in lines
    assert any(line.startswith("other: last run failed: every model failed") for line in lines)


def test_format_status_tolerates_a_sparse_body() -> None:
    text = format_status({"loops": [{"name": "solo"}]})
    assert "solo" in text and "active" in text
    assert "(no loops configured)" in format_status({})


def test_format_status_shows_a_backoff() -> None:
    status = {
        "now": "2026-03-10T12:00:00Z",
        "timezone": "Europe/Berlin",
        "loops": [
            {
                "name": "work",
                "consecutive_failures": 2,
                "backoff_until": "2026-03-10T12:05:00Z",
                "next_run": "2026-03-11T06:00:00Z",
            }
        ],
    }
    lines = format_status(status).splitlines()
    assert "times in Europe/Berlin" in lines[0]
    assert "work: backing off after 2 failure(s) until 13:05 (in 5m)" in lines
    row = next(line for line in lines if line.startswith("work "))
    assert "03-11 07:00 (in 18h00m)" in row  # local time, another day: with its date
