"""The daemon: the real `agentd run` subprocess, real APScheduler, fake provider server.

A NOTIFY_SOCKET datagram listener plays systemd: READY, WATCHDOG, STATUS, RELOADING and
STOPPING arrive as they would under `Type=notify`. Pure logic (slots, backoff, diffs) is
tested in-process here and in test_scheduling.py / test_loopstate.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from builders import TEST_ENV, base_config, haiku_call, merge, write_config
from fakeserver import FakeServer, error, timeout

from agentd import budgets, loopstate, scheduling
from agentd.config import load_config
from agentd.daemon import Daemon
from agentd.errors import LoopBusy, LoopPaused, MissingKeyError
from agentd.ledger import Ledger, parse_iso, utc_iso
from agentd.notify import Notifier, notify_address, watchdog_interval
from agentd.pidlock import DaemonRunning, acquire_pid_lock
from agentd.reload import check_primary_keys, diff_configs

pytestmark = pytest.mark.slow

AGENTD = str(Path(sys.executable).with_name("agentd"))
REPO = Path(__file__).resolve().parent.parent
SHIPPED_CONFIG = REPO / "config" / "agent-model-config.yaml"
UNIT = REPO / "systemd" / "agentd.service"


# ---------------------------------------------------------------------------- harness


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Poll until predicate() is truthy; its value, or fail naming what was awaited."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)


class Notifications:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET; records every line."""

    def __init__(self) -> None:
        # Under /tmp, short: a Unix socket path has at most 107 bytes.
        self.dir = tempfile.mkdtemp(prefix="agentd-n", dir="/tmp")
        self.path = os.path.join(self.dir, "n.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.05)
        self.lines: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            now = time.monotonic()
            with self._lock:
                self.lines.extend((now, line) for line in data.decode().splitlines())

    def snapshot(self) -> list[str]:
        with self._lock:
            return [line for _, line in self.lines]

    def count(self, line: str) -> int:
        return self.snapshot().count(line)

    def wait_for(self, prefix: str, since: int = 0, timeout_s: float = 15) -> int:
        """Index of the first line at or after `since` that starts with `prefix`."""

        def find() -> int | None:
            lines = self.snapshot()
            for index in range(since, len(lines)):
                if lines[index].startswith(prefix):
                    return index + 1  # +1: a found index 0 must be truthy
            return None

        return int(wait_until(find, timeout_s, f"notification {prefix!r}")) - 1

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        self._thread.join(timeout=2)
        shutil.rmtree(self.dir, ignore_errors=True)


class DaemonProcess:
    """`agentd --config C --state-dir S run` as a subprocess, its stderr in a file."""

    def __init__(
        self,
        config: Path,
        state: Path,
        notify: Notifications | None,
        *args: str,
        env: dict[str, str] | None = None,
    ) -> None:
        self.state = state
        self.log_path = state.parent / f"daemon-{time.monotonic_ns()}.log"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENTD_", "NOTIFY_"))}
        full_env.update(TEST_ENV)
        full_env.pop("RUNTIME_DIRECTORY", None)
        if notify is not None:
            full_env.update(NOTIFY_SOCKET=notify.path, WATCHDOG_USEC="400000")
        full_env.update(env or {})
        with self.log_path.open("wb") as log:
            self.popen = subprocess.Popen(
                [AGENTD, "--config", str(config), "--state-dir", str(state), "run", *args],
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=full_env,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self, name: str) -> list[dict[str, Any]]:
        out = []
        for line in self.log().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == name:
                out.append(event)
        return out

    def signal(self, sig: int) -> None:
        self.popen.send_signal(sig)

    def wait(self, timeout_s: float) -> int:
        return self.popen.wait(timeout=timeout_s)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(timeout=10)


@pytest.fixture
def notify() -> Iterator[Notifications]:
    listener = Notifications()
    try:
        yield listener
    finally:
        listener.close()


@pytest.fixture
def daemons() -> Iterator[list[DaemonProcess]]:
    """Every daemon a test starts; killed at the end whatever happened."""
    started: list[DaemonProcess] = []
    try:
        yield started
    finally:
        for proc in started:
            proc.kill()


def rows(state: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Query the daemon's ledger with a short-lived connection of our own."""
    conn = sqlite3.connect(state / "ledger.db", timeout=10)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def runs(state: Path, loop: str, *, trigger: str | None = None) -> list[tuple[Any, ...]]:
    """(id, trigger, slot, status, started_at, error) of a loop's runs, oldest first."""
    if not (state / "ledger.db").exists():
        return []
    sql = "SELECT id, trigger, slot, status, started_at, error FROM runs WHERE loop = ?"
    params: list[Any] = [loop]
    if trigger is not None:
        sql += " AND trigger = ?"
        params.append(trigger)
    return rows(state, sql + " ORDER BY id", *params)


def assert_nothing_unsettled(state: Path) -> None:
    assert rows(state, "SELECT id FROM calls WHERE status IN ('pending', 'submitted')") == []
    assert rows(state, "SELECT id FROM runs WHERE status = 'running'") == []


def config_with(server: FakeServer, loops: dict[str, Any], **extra: Any) -> dict[str, Any]:
    data = base_config(server.url)
    data["loops"] = loops
    return merge(data, {"daemon": {"shutdown_grace_s": 1}, **extra})


def every(seconds: str = "1s", **settings: Any) -> dict[str, Any]:
    return {"every": seconds, "tier": "fast", "max_tokens": 50, "prompt": "work.md", **settings}


# ---------------------------------------------------------------------------- subprocess tests


def test_fires_reloads_and_stops(
    tmp_path: Path,
    fake_server: FakeServer,
    notify: Notifications,
    daemons: list[DaemonProcess],
) -> None:
    """READY, watchdog, 1 s loops recorded per slot, reload (valid and broken), clean stop."""
    cfg_dir, state = tmp_path / "cfg", tmp_path / "state"
    path = write_config(cfg_dir, config_with(fake_server, {"work": every()}))
    proc = DaemonProcess(path, state, notify)
    daemons.append(proc)
    notify.wait_for("READY=1")
    wait_until(lambda: notify.count("WATCHDOG=1") >= 2, 5, "two WATCHDOG=1 pings")

    def finished() -> list[tuple[Any, ...]]:
        # A run may be in flight when we look: judge only the finished ones.
        return [r for r in runs(state, "work") if r[3] != "running"]

    work = wait_until(lambda: len(finished()) >= 2 and finished(), 10, "runs")
    assert all(r[1] == "schedule" and r[3] == "ok" for r in work)
    slots = [parse_iso(r[2]) for r in work]
    assert len(set(slots)) == len(slots) and all(s.microsecond == 0 for s in slots)
    # On the 1 s grid; a slot that fires while the previous run still runs is dropped.
    assert slots == sorted(slots) and (slots[1] - slots[0]) % timedelta(seconds=1) == timedelta()
    wait_until(
        lambda: any(re.match(r"STATUS=1 loops, \d+ runs today", x) for x in notify.snapshot()),
        5,
        "a STATUS= line",
    )

    # A valid new config: `extra` is added, `work` is not disturbed.
    write_config(cfg_dir, config_with(fake_server, {"work": every(), "extra": every()}))
    mark = len(notify.snapshot())
    proc.signal(signal.SIGHUP)
    reloading = notify.wait_for("RELOADING=1", since=mark)
    assert notify.snapshot()[reloading + 1].startswith("MONOTONIC_USEC=")
    usec = int(notify.snapshot()[reloading + 1].split("=")[1])
    assert abs(usec - time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000) < 10_000_000
    notify.wait_for("READY=1", since=reloading)
    wait_until(lambda: runs(state, "extra"), 10, "the added loop to fire")
    (reloaded,) = proc.events("daemon.reloaded")
    assert reloaded["added"] == ["extra"] and reloaded["changed"] == []

    # A broken config is refused; READY=1 follows anyway and both loops keep firing.
    (cfg_dir / "agent-model-config.yaml").write_text("loops: {work: {every: 1s, max_tokens: 0}")
    mark = len(notify.snapshot())
    proc.signal(signal.SIGHUP)
    notify.wait_for("READY=1", since=notify.wait_for("RELOADING=1", since=mark))
    (refused,) = wait_until(lambda: proc.events("daemon.reload_refused"), 5, "the refusal")
    assert "agent-model-config.yaml" in refused["error"]
    before = {loop: len(runs(state, loop)) for loop in ("work", "extra")}
    wait_until(
        lambda: all(len(runs(state, loop)) >= before[loop] + 2 for loop in before),
        10,
        "the old loops to keep firing",
    )

    mark = len(notify.snapshot())
    proc.signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    notify.wait_for("STOPPING=1", since=mark, timeout_s=2)
    assert_nothing_unsettled(state)
    assert "Traceback" not in proc.log()
    assert proc.events("daemon.stopped")


def test_sigterm_during_a_slow_call_aborts_it_within_the_grace(
    tmp_path: Path,
    fake_server: FakeServer,
    notify: Notifications,
    daemons: list[DaemonProcess],
) -> None:
    fake_server.script("claude-haiku-4-5", timeout(30))
    state = tmp_path / "state"
    path = write_config(tmp_path / "cfg", config_with(fake_server, {"slow": every()}))
    proc = DaemonProcess(path, state, notify)
    daemons.append(proc)
    notify.wait_for("READY=1")
    wait_until(
        lambda: (
            (state / "ledger.db").exists()
            and rows(state, "SELECT id FROM calls WHERE status = 'pending'")
        ),
        10,
        "a call in flight",
    )
    sent = datetime.now(UTC)
    proc.signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    # From the signal to the daemon's last event: the grace (1 s) plus settling. The
    # interpreter's exit after it is not the daemon's doing (and slow on a loaded machine).
    (stopped,) = proc.events("daemon.stopped")
    assert (parse_iso(stopped["timestamp"]) - sent).total_seconds() < 1 + 3
    notify.wait_for("STOPPING=1", timeout_s=2)
    assert_nothing_unsettled(state)
    ((status, cost, reserved),) = rows(
        state, "SELECT status, cost_micro_usd, reserved_micro_usd FROM calls"
    )
    assert status == "aborted" and cost == reserved > 0  # settled at its reservation
    assert [r[3] for r in runs(state, "slow")] == ["aborted"]
    assert proc.events("daemon.aborting_runs")[0]["loops"] == ["slow"]


def test_invalid_config_or_missing_key_exits_78(tmp_path: Path, fake_server: FakeServer) -> None:
    path = write_config(tmp_path / "cfg", config_with(fake_server, {"work": every()}))
    bad = path.with_name("bad.yaml")
    bad.write_text(path.read_text().replace("max_tokens: 50", "max_tokens: 0"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTD_")}
    result = subprocess.run(
        [AGENTD, "--config", str(bad), "--state-dir", str(tmp_path / "s"), "run"],
        capture_output=True,
        text=True,
        env={**env, **TEST_ENV},
        timeout=30,
    )
    assert result.returncode == 78
    assert "max_tokens" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    env.pop("TEST_ANTHROPIC_KEY", None)
    result = subprocess.run(
        [AGENTD, "--config", str(path), "--state-dir", str(tmp_path / "s"), "run"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert result.returncode == 78
    assert "TEST_ANTHROPIC_KEY" in result.stderr and "Traceback" not in result.stderr


def test_shipped_config_simulated_one_daemon_per_state_dir_and_control(
    tmp_path: Path, notify: Notifications, daemons: list[DaemonProcess]
) -> None:
    """`agentd run --simulate` on the shipped config: READY, control socket, clean stop."""
    state = Path(tempfile.mkdtemp(prefix="agentd-s", dir="/tmp"))  # short socket path
    try:
        proc = DaemonProcess(SHIPPED_CONFIG, state, notify, "--simulate")
        daemons.append(proc)
        notify.wait_for("READY=1")
        (started,) = proc.events("daemon.started")
        assert started["loops"] == ["heartbeat", "planning", "research", "triage"]
        assert started["simulate"]

        second = DaemonProcess(SHIPPED_CONFIG, state, None, "--simulate")
        daemons.append(second)
        assert second.wait(30) == 75
        assert "already running" in second.log() and str(proc.popen.pid) in second.log()

        from agentd import control_client as client

        sock = state / "agentd.sock"
        code, body = client.request(sock, "GET", "/status")
        assert code == 200 and body["simulated"] is True
        heartbeat = next(loop for loop in body["loops"] if loop["loop"] == "heartbeat")
        assert heartbeat["next_run"] and heartbeat["tier"] == "fast"
        code, body = client.request(sock, "GET", "/health")
        assert code == 200 and body["ok"] is True and body["loops"] == 4
        code, body = client.request(sock, "POST", "/trigger/heartbeat")
        assert code == 200 and body["started"] is True
        wait_until(
            lambda: [r for r in runs(state, "heartbeat") if r[3] != "running"], 10, "the run"
        )
        assert runs(state, "heartbeat")[0][1] == "manual"
        assert client.request(sock, "POST", "/trigger/nope")[0] == 404
        assert client.request(sock, "POST", "/pause/planning")[0] == 200
        assert client.request(sock, "POST", "/trigger/planning")[0] == 409
        code, body = client.request(sock, "POST", "/resume/planning")
        assert code == 200 and body["was_paused"] is True
        code, body = client.request(sock, "POST", "/reload")
        assert code == 200 and body["ok"] is True

        proc.signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        notify.wait_for("STOPPING=1", timeout_s=2)
        assert not sock.exists()
        assert_nothing_unsettled(state)
    finally:
        shutil.rmtree(state, ignore_errors=True)


def _quiet_name(prefix: str, every_s: int, now: datetime) -> str:
    """A loop name whose phased grid has no slot in the next 10 minutes (no stray fire)."""
    for i in range(100):
        name = f"{prefix}{i}"
        if scheduling.grid_at_or_after(name, every_s, now) - now > timedelta(minutes=10):
            return name
    raise AssertionError("no quiet loop name")


def test_catch_up_after_downtime_runs_once_and_never_twice(
    tmp_path: Path,
    fake_server: FakeServer,
    notify: Notifications,
    daemons: list[DaemonProcess],
) -> None:
    state = tmp_path / "state"
    now = datetime.now(UTC)
    once, skip = _quiet_name("once", 3600, now), _quiet_name("skip", 3600, now)
    loops = {once: every("1h", catch_up="once"), skip: every("1h", catch_up="skip")}
    path = write_config(tmp_path / "cfg", config_with(fake_server, loops))
    last = now.replace(microsecond=0) - timedelta(hours=3, minutes=10)
    with Ledger.open(state) as ledger:  # the slots of an earlier daemon, 3 h 10 m ago
        for name in loops:
            loopstate.set_last_slot(ledger, name, utc_iso(last))

    proc = DaemonProcess(path, state, notify)
    daemons.append(proc)
    notify.wait_for("READY=1")
    (caught,) = wait_until(lambda: runs(state, once, trigger="catchup"), 10, "the catch-up")
    # The latest missed slot of the loop's phased grid (no slot is due in the next 10 min).
    missed = scheduling.grid_at_or_after(once, 3600, now) - timedelta(hours=1)
    assert caught[2] == utc_iso(missed) and missed > last + timedelta(hours=1)
    wait_until(lambda: runs(state, once)[0][3] == "ok", 10, "the catch-up to finish")
    assert runs(state, skip) == []
    proc.signal(signal.SIGTERM)
    assert proc.wait(10) == 0

    # Restarted: that slot already ran, and the next one is not due: nothing runs.
    proc = DaemonProcess(path, state, notify)
    daemons.append(proc)
    mark = len(notify.snapshot())
    notify.wait_for("READY=1", since=mark)
    time.sleep(0.5)
    proc.signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    assert len(runs(state, once)) == 1 and runs(state, skip) == []
    assert not proc.events("loop.catch_up")


def test_failures_back_off_then_pause_and_resume_clears_it(
    tmp_path: Path,
    fake_server: FakeServer,
    notify: Notifications,
    daemons: list[DaemonProcess],
) -> None:
    for model in ("claude-haiku-4-5", "gpt-4o-mini"):
        fake_server.script(model, *[error(404)] * 50)
    fake_server.script("gpt-4o", *[error(401)] * 10)
    loops = {
        "failing": every(on_failure={"backoff_s": [2], "pause_after": 2}),
        "auth": {**every(), "tier": None, "model": "gpt"},
    }
    data = config_with(fake_server, loops)
    del data["loops"]["auth"]["tier"]
    state = tmp_path / "state"
    proc = DaemonProcess(write_config(tmp_path / "cfg", data), state, notify)
    daemons.append(proc)
    notify.wait_for("READY=1")

    def state_row(loop: str) -> tuple[Any, ...]:
        return rows(
            state,
            "SELECT paused, paused_reason, consecutive_failures FROM loop_state WHERE loop = ?",
            loop,
        )[0]

    wait_until(lambda: len(runs(state, "failing")) >= 2, 12, "two failed runs")
    wait_until(lambda: state_row("failing")[0] == 1, 5, "the pause after two failures")
    failed = runs(state, "failing")
    assert [r[3] for r in failed] == ["failed", "failed"]
    gap = parse_iso(failed[1][4]) - parse_iso(failed[0][4])
    assert gap >= timedelta(seconds=2)  # the 2 s backoff skipped the slots in between
    _, reason, failures = state_row("failing")
    assert reason.startswith("2 consecutive failures: ") and failures == 2
    assert proc.events("loop.backing_off")[0]["backoff_s"] == 2
    assert any(e["reason"] == "backoff" for e in proc.events("loop.skipped"))
    # The auth error paused its loop at once.
    assert [r[3] for r in runs(state, "auth")] == ["failed"]
    assert state_row("auth")[1].startswith("auth_error")
    wait_until(lambda: "paused: " in "".join(notify.snapshot()), 5, "a STATUS= with the pause")

    time.sleep(1.2)  # paused: no more runs, and no rows for the skipped slots
    assert len(runs(state, "failing")) == 2 and len(runs(state, "auth")) == 1

    with Ledger.open(state) as ledger:  # what `agentd resume failing` does
        assert loopstate.resume(ledger, "failing")
    wait_until(lambda: len(runs(state, "failing")) >= 3, 5, "a run after resume")
    wait_until(lambda: state_row("failing")[2] == 1, 5, "the streak restarted at 1")
    proc.signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    assert_nothing_unsettled(state)


# ---------------------------------------------------------------------------- systemd unit


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_unit_passes_systemd_analyze_verify_and_security(tmp_path: Path) -> None:
    # verify insists that ExecStart's binary exists: point a copy at this venv's agentd.
    unit = tmp_path / "agentd.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/agentd", AGENTD))
    verify = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert verify.returncode == 0 and verify.stdout + verify.stderr == ""
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for agentd\.service: (\d+\.\d+)", security.stdout)
    assert match is not None, security.stdout + security.stderr
    assert float(match.group(1)) <= 2.0


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="needs systemd-sysusers")
def test_sysusers_file_creates_the_agentd_user(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            "systemd-sysusers",
            "--dry-run",
            f"--root={tmp_path}",
            str(REPO / "systemd" / "agentd.sysusers.conf"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "Creating user 'agentd'" in result.stdout + result.stderr


def test_unit_file_settings() -> None:
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "NotifyAccess=main",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "RestartPreventExitStatus=78",
        "StateDirectory=agentd",
        "RuntimeDirectory=agentd",
        "ConfigurationDirectory=agentd",
        "User=agentd",
        "UMask=0077",
        "EnvironmentFile=-/etc/agentd/agentd.env",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
    ):
        assert f"\n{line}\n" in text, line
    assert "\nIPAddressDeny=" not in text  # HTTPS egress to the providers must work
    assert re.search(r"\nWatchdogSec=\d+s\n", text)
    assert re.search(r"\nLoadCredential=\w+\n", text)


# ---------------------------------------------------------------------------- in-process


def test_notifier_sends_datagrams_and_is_a_noop_without_a_socket(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        name = f"agentd-test-{os.getpid()}"
        listener.bind("\0" + name)  # the abstract namespace, `@name` in NOTIFY_SOCKET
        env = {"NOTIFY_SOCKET": "@" + name}
        notifier = Notifier.from_env(env)
        assert env == {}  # unset, so commands the loops run cannot talk to systemd
        assert notifier.ready("3 loops,\n0 runs")
        assert listener.recv(1024) == b"READY=1\nSTATUS=3 loops, 0 runs"
        assert notifier.reloading()
        lines = listener.recv(1024).decode().splitlines()
        assert lines[0] == "RELOADING=1" and lines[1].startswith("MONOTONIC_USEC=")
        assert notifier.stopping() and listener.recv(1024) == b"STOPPING=1"
        notifier.close()
    assert not Notifier.from_env({}).ready()
    assert not Notifier(str(tmp_path / "missing.sock")).watchdog()  # never raises
    assert notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert notify_address("") is None and notify_address("vsock:2:5") is None


def test_watchdog_interval() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "400000"}) == 0.2
    assert watchdog_interval({}) is None and watchdog_interval({"WATCHDOG_USEC": "x"}) is None
    mine = {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval(mine) == 0.5
    assert watchdog_interval({**mine, "WATCHDOG_PID": "1"}) is None  # someone else's


def test_pid_lock_is_exclusive_per_state_dir(tmp_path: Path) -> None:
    fd = acquire_pid_lock(tmp_path / "state")
    try:
        assert (tmp_path / "state" / "agentd.pid").read_text() == f"{os.getpid()}\n"
        with pytest.raises(DaemonRunning, match=f"pid {os.getpid()}"):
            acquire_pid_lock(tmp_path / "state")
        acquire_pid_lock_other = acquire_pid_lock(tmp_path / "other")
        os.close(acquire_pid_lock_other)
    finally:
        os.close(fd)
    os.close(acquire_pid_lock(tmp_path / "state"))  # released with the descriptor


def test_diff_configs_and_primary_keys(tmp_path: Path, fake_server: FakeServer) -> None:
    base = config_with(fake_server, {"a": every(), "b": every(), "c": every()})
    old = load_config(write_config(tmp_path / "old", base))
    changed = merge(
        base,
        {
            "loops": {
                "a": {"max_tokens": 60},  # changed, same schedule
                "b": {"every": "2s"},  # rescheduled
                "c": {"enabled": False},  # removed
                "d": every(),  # added
            },
            "budgets": {"per_day_usd": 1},
        },
    )
    new = load_config(write_config(tmp_path / "new", changed))
    diff = diff_configs(old, new)
    assert diff.added == ("d",) and diff.removed == ("c",)
    assert diff.changed == ("a", "b") and diff.rescheduled == ("b",)
    assert "budgets" in diff.settings and "path" in diff.settings
    assert diff.summary().startswith("reloaded: added d; removed c; changed a, b")
    zone = load_config(write_config(tmp_path / "zone", merge(base, {"timezone": "Asia/Tokyo"})))
    assert diff_configs(old, zone).rescheduled == ("a", "b", "c")
    assert diff_configs(old, old).summary() == "reloaded: no changes"
    check_primary_keys(old, simulate=False, env=TEST_ENV)
    check_primary_keys(old, simulate=True, env={})
    with pytest.raises(MissingKeyError, match="TEST_ANTHROPIC_KEY"):
        check_primary_keys(old, simulate=False, env={})


def test_control_target_in_process(tmp_path: Path, fake_server: FakeServer) -> None:
    """The methods the control server calls, on a daemon running in this event loop."""
    config = load_config(
        write_config(tmp_path / "cfg", config_with(fake_server, {"a": every("1h"), "b": every()}))
    )
    state = tmp_path / "state"

    async def main() -> None:
        daemon = Daemon(config, state, simulate=True, env={})
        task = asyncio.create_task(daemon.run(install_signals=False))
        await wait_async(lambda: daemon.health()["ok"])
        health = daemon.health()
        assert health == {"ok": True, "scheduler_running": True, "ledger_ok": True, "loops": 2}
        with pytest.raises(KeyError):
            await daemon.trigger("nope")
        assert await daemon.trigger("a") == {"loop": "a", "trigger": "manual", "started": True}
        with pytest.raises(LoopBusy):
            await daemon.trigger("a")
        await wait_async(lambda: not daemon.is_running("a") and "a" not in daemon.dispatch.active)
        assert daemon.pause("a")["paused"] is True
        with pytest.raises(LoopPaused):
            await daemon.trigger("a")
        status = daemon.status()
        json.dumps(status)  # JSON-able as it is
        a = next(loop for loop in status["loops"] if loop["loop"] == "a")
        assert a["paused"] and a["last_run"]["status"] == "ok" and a["last_run"]["run_id"]
        assert a["next_run"] is None and a["schedule"].startswith("every 1h") and a["budgets"] == []
        assert status["simulate"] is True and status["pid"] == os.getpid()
        assert re.fullmatch(r"\d+\.\d{6}", status["spent_today_usd"])
        assert daemon.resume("a") == {"loop": "a", "paused": False, "was_paused": True}
        with pytest.raises(KeyError):
            daemon.pause("nope")
        reloaded = await daemon.reload()
        assert reloaded["ok"] and reloaded["changed"]["added"] == []
        assert "agentd_up 1" in await asyncio.to_thread(daemon.metrics)
        daemon.request_stop()
        assert await task == 0

    asyncio.run(main())
    with Ledger.open(state) as ledger, ledger.read() as conn:
        assert conn.execute("SELECT COUNT(*) FROM runs WHERE status = 'running'").fetchone() == (0,)


async def wait_async(predicate: Callable[[], Any], timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail("timed out")
        await asyncio.sleep(0.02)


def test_a_once_killed_mid_call_is_reconciled_while_the_daemon_runs(
    tmp_path: Path, fake_server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon settles a dead `agentd once`'s call within its reconcile period, not only at
    its own start; its own call in flight (a live owner) is left alone."""
    for key, value in TEST_ENV.items():
        monkeypatch.setenv(key, value)
    fake_server.script("claude-haiku-4-5", timeout(60))  # the `once`'s call
    fake_server.script("claude-sonnet-4-5", timeout(60))  # the daemon's own
    never = {"cron": "0 0 1 1 *", "max_tokens": 50, "prompt": "work.md"}
    loops = {"work": {**never, "tier": "fast"}, "mine": {**never, "tier": "balanced"}}
    data = merge(config_with(fake_server, loops), {"providers": {"anthropic": {"timeout_s": 60}}})
    path = write_config(tmp_path / "cfg", data)
    state = tmp_path / "state"

    def call(model: str) -> tuple[Any, ...] | None:
        sql = "SELECT status, cost_micro_usd, reserved_micro_usd, error_type FROM calls"
        found = (
            rows(state, sql + " WHERE model = ?", model) if (state / "ledger.db").exists() else []
        )
        return found[0] if found else None

    async def main() -> None:
        daemon = Daemon(load_config(path), state, env={}, reconcile_s=0.3)
        task = asyncio.create_task(daemon.run(install_signals=False))
        await wait_async(lambda: daemon.health()["ok"])
        await daemon.trigger("mine")
        await wait_async(lambda: call("claude-sonnet-4-5"))
        once = subprocess.Popen(
            [AGENTD, "--config", str(path), "--state-dir", str(state), "once", "work"],
            env={**os.environ, **TEST_ENV},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            await wait_async(lambda: fake_server.count("claude-haiku-4-5"), timeout_s=30)
            assert (call("claude-haiku-4-5") or ())[:2] == ("pending", None)
            once.kill()  # SIGKILL: no handler runs, the row stays pending
            await asyncio.to_thread(once.wait, 10)
            # A few reconcile periods; nothing else opens the ledger meanwhile.
            await wait_async(lambda: (call("claude-haiku-4-5") or ("",))[0] == "aborted", 5)
        finally:
            if once.poll() is None:
                once.kill()
                once.wait(timeout=10)
        _, cost, reserved, error_type = call("claude-haiku-4-5") or ()
        assert cost == reserved > 0 and error_type == "abandoned"  # charged at its reservation
        assert [r[3] for r in runs(state, "work")] == ["aborted"]
        # The daemon's own call in flight has a live owner: untouched.
        assert (call("claude-sonnet-4-5") or ("",))[0] == "pending"
        assert [r[3] for r in runs(state, "mine")] == ["running"]
        daemon.request_stop()
        assert await task == 0

    asyncio.run(main())
    assert_nothing_unsettled(state)
    assert [r[3] for r in runs(state, "mine")] == ["aborted"]


def test_the_daemon_checkpoints_a_growing_wal_from_a_thread(tmp_path: Path) -> None:
    """A WAL past 1,000 pages is checkpointed within a few seconds, long before the hourly
    `wal_checkpoint_s` and before any commit on the event loop would have to do it."""
    data = {
        "timezone": "UTC",
        "providers": {"anthropic": {"type": "anthropic", "api_key_env": "NO_KEY_NEEDED"}},
        "models": {"haiku": {"provider": "anthropic", "model": "claude-haiku-4-5"}},
        "tiers": {"fast": ["haiku"]},
        "daemon": {"wal_checkpoint_s": 3600},
        "loops": {
            "work": {"cron": "0 0 1 1 *", "tier": "fast", "max_tokens": 50, "prompt": "work.md"}
        },
    }
    state = tmp_path / "state"
    wal = state / "ledger.db-wal"

    async def main() -> None:
        daemon = Daemon(
            load_config(write_config(tmp_path / "cfg", data)), state, simulate=True, env={}
        )
        task = asyncio.create_task(daemon.run(install_signals=False))
        await wait_async(lambda: daemon.health()["ok"])
        # Another writer (it never checkpoints itself) grows the WAL past 4 MB.
        writer = sqlite3.connect(state / "ledger.db", isolation_level=None)
        writer.execute("PRAGMA wal_autocheckpoint = 0")
        writer.execute("CREATE TABLE filler (blob BLOB)")
        for _ in range(6):
            writer.execute("INSERT INTO filler VALUES (zeroblob(1000000))")
        writer.close()
        assert wal.stat().st_size > 4 * 1024 * 1024
        await wait_async(lambda: wal.stat().st_size == 0, timeout_s=8)  # TRUNCATE: emptied
        daemon.request_stop()
        assert await task == 0

    asyncio.run(main())


def test_the_daemon_fills_the_report_cache_as_hours_close(tmp_path: Path) -> None:
    """Each periodic round caches the closed hours of the last day, so a month's report (and
    a budget window's sum) later finds them cached instead of reading every row."""
    data = {
        "timezone": "UTC",
        "providers": {"anthropic": {"type": "anthropic", "api_key_env": "NO_KEY_NEEDED"}},
        "models": {"haiku": {"provider": "anthropic", "model": "claude-haiku-4-5"}},
        "tiers": {"fast": ["haiku"]},
        "daemon": {"wal_checkpoint_s": 2},
        "loops": {
            "work": {"cron": "0 0 1 1 *", "tier": "fast", "max_tokens": 50, "prompt": "work.md"}
        },
    }
    state = tmp_path / "state"
    three_hours_ago = datetime.now(UTC) - timedelta(hours=3)
    with Ledger.open(state) as ledger:
        call_id = budgets.reserve(ledger, haiku_call("work"), 500, [], UTC, now=three_hours_ago)
        budgets.settle(ledger, call_id, status="ok", usage=None, cost_micro_usd=321, priced=True)

    def cached() -> int:
        return int(rows(state, "SELECT COALESCE(SUM(cost_micro_usd), 0) FROM report_hours")[0][0])

    assert cached() == 0

    async def main() -> None:
        daemon = Daemon(
            load_config(write_config(tmp_path / "cfg", data)), state, simulate=True, env={}
        )
        task = asyncio.create_task(daemon.run(install_signals=False))
        await wait_async(lambda: daemon.health()["ok"])
        await wait_async(lambda: cached() == 321, timeout_s=10)
        daemon.request_stop()
        assert await task == 0

    asyncio.run(main())


def test_on_reply_wakes_a_loop_and_inactive_hours_are_recorded_not_billed(
    tmp_path: Path, fake_server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in TEST_ENV.items():
        monkeypatch.setenv(key, value)
    fake_server.set_default("all fine, WAKE_DEEP please")
    later = datetime.now(UTC) + timedelta(hours=2)
    hours = {
        "start": later.strftime("%H:00"),
        "end": (later + timedelta(hours=1)).strftime("%H:00"),
    }
    loops = {
        "hb": every("1h", on_reply={"contains": "WAKE_DEEP", "trigger": "deep"}),
        "deep": every("1h"),
        "night": every("1s", active_hours=hours),
    }
    config = load_config(write_config(tmp_path / "cfg", config_with(fake_server, loops)))
    state = tmp_path / "state"

    async def main() -> None:
        daemon = Daemon(config, state, env={})
        task = asyncio.create_task(daemon.run(install_signals=False))
        await wait_async(lambda: daemon.health()["ok"])
        await daemon.trigger("hb")
        await wait_async(
            lambda: len(runs(state, "deep")) == 1 and runs(state, "deep")[0][3] == "ok"
        )
        await wait_async(lambda: len(runs(state, "night")) >= 1)
        daemon.request_stop()
        await task

    asyncio.run(main())
    assert [(r[1], r[3]) for r in runs(state, "hb")] == [("manual", "ok")]
    assert [(r[1], r[3]) for r in runs(state, "deep")] == [("on_reply", "ok")]
    night = runs(state, "night")
    assert {(r[1], r[3]) for r in night} == {("schedule", "skipped_inactive")}
    assert all(r[2] and "outside active hours" in r[5] for r in night)
    assert rows(state, "SELECT COUNT(*) FROM calls WHERE loop = 'night'") == [(0,)]
    assert rows(state, "SELECT SUM(cost_micro_usd) FROM runs WHERE loop = 'night'") == [(0,)]
