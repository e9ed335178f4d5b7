"""Batch loops end to end: the real SDKs against the fake batch endpoints, a real ledger.

Exact rows and costs at batch prices, polling backoff, expired / errored items and
`on_failure`, and a batch that outlives its process (`agentd once --no-wait`, `kill -9`)
finished by the next one (`agentd.batchresume`) and by a restarted daemon.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from builders import TEST_ENV, base_config, merge, write_config
from fakeserver import FakeServer, canceled, error, expired, ok, timeout

from agentd.batches import BatchWaiters
from agentd.batchresume import BatchResumer, find_orphans
from agentd.config import load_config
from agentd.errors import ConfigError
from agentd.executor import Executor
from agentd.ledger import Ledger
from agentd.runend import RunResult
from agentd.runner import run_loop

HAIKU = "claude-haiku-4-5"
MINI = "gpt-4o-mini"
AGENTD = str(Path(sys.executable).with_name("agentd"))


class Harness:
    """A batch loop `work` on the fake server, a ledger, an executor with a recorded sleep."""

    def __init__(self, tmp_path: Path, server: FakeServer, patch: dict[str, Any] | None = None):
        loop = {"loops": {"work": {"batch": True}}}
        data = merge(merge(base_config(server.url), loop), patch or {})
        self.config_path = write_config(tmp_path / "conf", data, "Summarise the queue.")
        self.config = load_config(self.config_path)
        self.state = tmp_path / "state"
        self.ledger = Ledger.open(self.state)
        self.sleeps: list[float] = []
        self.server = server

        async def sleep(seconds: float) -> None:
            self.sleeps.append(seconds)

        self.executor = Executor(self.config, self.ledger, env=TEST_ENV, sleep=sleep)

    def run(self) -> RunResult:
        async def go() -> RunResult:
            try:
                return await run_loop(self.config, self.ledger, self.executor, "work")
            finally:
                await self.executor.aclose()

        return asyncio.run(go())

    def calls(self) -> list[dict[str, Any]]:
        cur = self.ledger.conn.execute("SELECT * FROM calls ORDER BY id")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def stored_requests(self) -> int:
        return int(self.ledger.conn.execute("SELECT COUNT(*) FROM batch_requests").fetchone()[0])


# ---------------------------------------------------------------------------- config


def test_batch_config_forms_and_refusals(tmp_path: Path) -> None:
    data = merge(base_config("http://127.0.0.1:9"), {"loops": {"work": {"batch": True}}})
    config = load_config(write_config(tmp_path / "a", data))
    batch = config.loops["work"].batch
    assert batch is not None
    assert (batch.on_failure, batch.poll_max_seconds, batch.timeout_seconds) == ("call", 60, 86400)
    data = merge(data, {"loops": {"work": {"batch": {"on_failure": "fail", "poll_max": "5m"}}}})
    batch = load_config(write_config(tmp_path / "b", data)).loops["work"].batch
    assert batch is not None and (batch.on_failure, batch.poll_max_seconds) == ("fail", 300)
    off = merge(data, {"loops": {"work": {"batch": False}}})
    assert load_config(write_config(tmp_path / "c", off)).loops["work"].batch is None

    cases = [
        ({"route": "cascade"}, "route: cascade makes dependent calls"),
        ({"route": "rules", "kind": "code", "latency": "interactive"}, "latency: interactive"),
        ({"batch": {"poll_max": 30}}, "needs a unit"),
        ({"batch": {"when": "now"}}, "when"),
    ]
    for index, (patch, problem) in enumerate(cases):
        bad = merge(data, {"loops": {"work": {"batch": True, **patch}}})
        with pytest.raises(ConfigError) as info:
            load_config(write_config(tmp_path / f"bad{index}", bad))
        assert "loops.work.batch" in str(info.value)
        assert problem in str(info.value)


def test_shipped_config_batches_its_background_planning_loop() -> None:
    shipped = load_config(Path(__file__).resolve().parents[1] / "config/agent-model-config.yaml")
    assert shipped.loops["planning"].batch is not None
    assert shipped.loops["planning"].latency == "background"
    assert shipped.loops["heartbeat"].batch is None  # a heartbeat should not wait for hours


# ---------------------------------------------------------------------------- one process


def test_anthropic_batch_call_exact_row_at_batch_price(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    fake_server.batch_polls = 3  # running for three polls, ended at the fourth
    h = Harness(tmp_path, fake_server)
    fake_server.script(HAIKU, ok("queue is fine", input_tokens=1000, output_tokens=200))
    result = h.run()
    assert result.status == "ok" and result.reply == "queue is fine"
    # claude-haiku-4-5 in a batch: $0.50 / $2.50 per MTok (half of $1 / $5).
    assert result.cost_micro_usd == 1000 * 0.5 + 200 * 2.5 == 1000
    [call] = h.calls()
    [batch] = fake_server.batches()
    assert call["batch"] == 1 and call["status"] == "ok" and call["batch_id"] == batch.id
    assert (call["input_tokens"], call["output_tokens"], call["cost_micro_usd"]) == (
        1000,
        200,
        1000,
    )
    assert call["reserved_micro_usd"] > 0 and call["priced"] == 1
    assert call["list_cost_micro_usd"] == 2000  # the same tokens at list price: $1 / $5
    assert result.batch_ids == (batch.id,)
    assert result.route["batch"] == {"batch_ids": [batch.id], "fallback": None}
    # Polls start after 1 s and double; the batch is the only request the model got.
    assert h.sleeps == [1.0, 2.0, 4.0, 8.0]
    assert fake_server.retrieves(batch.id) >= 4
    assert fake_server.count(HAIKU) == 1 and fake_server.requests[0].batch_id == batch.id
    assert h.stored_requests() == 0  # the prompt does not outlive its settled call


def test_openai_batch_call_and_poll_cap(tmp_path: Path, fake_server: FakeServer) -> None:
    fake_server.batch_polls = 6
    patch = {"loops": {"work": {"tier": None, "model": "gpt-mini", "batch": {"poll_max": "5s"}}}}
    h = Harness(tmp_path, fake_server, patch)
    fake_server.script(MINI, ok("ok", input_tokens=1000, output_tokens=200))
    result = h.run()
    assert result.status == "ok"
    # gpt-4o-mini in a batch: $0.075 / $0.30 per MTok.
    assert result.cost_micro_usd == 75 + 60
    [call] = h.calls()
    assert call["batch"] == 1 and call["provider"] == "openai" and call["cost_micro_usd"] == 135
    assert h.sleeps == [1.0, 2.0, 4.0, 5.0, 5.0, 5.0, 5.0]  # capped at poll_max


def test_expired_item_falls_back_to_a_direct_call(tmp_path: Path, fake_server: FakeServer) -> None:
    h = Harness(tmp_path, fake_server)
    fake_server.script(HAIKU, expired(), ok("direct", input_tokens=1000, output_tokens=200))
    result = h.run()
    assert result.status == "ok" and result.reply == "direct"
    first, second = h.calls()
    assert (first["batch"], first["status"], first["error_type"]) == (1, "error", "batch_expired")
    assert first["cost_micro_usd"] == 0  # an expired item is never billed
    assert first["list_cost_micro_usd"] == 0  # and saved nothing
    assert (second["batch"], second["status"], second["attempt"]) == (0, "ok", 2)
    assert second["cost_micro_usd"] == 2000  # the direct call at list price
    assert result.cost_micro_usd == 2000
    assert "expired" in result.route["batch"]["fallback"]
    assert fake_server.count(HAIKU) == 2


def test_failed_item_fails_the_run_with_on_failure_fail(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    h = Harness(tmp_path, fake_server, {"loops": {"work": {"batch": {"on_failure": "fail"}}}})
    fake_server.script(HAIKU, canceled())
    result = h.run()
    assert result.status == "failed" and result.exit_code == 1
    assert result.error is not None and "canceled" in result.error
    [call] = h.calls()
    assert (call["status"], call["error_type"], call["cost_micro_usd"]) == (
        "error",
        "batch_canceled",
        0,
    )
    assert fake_server.count(HAIKU) == 1


def test_errored_item_is_classified_then_made_directly(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    h = Harness(tmp_path, fake_server)
    fake_server.script(HAIKU, error(529), ok("direct", input_tokens=10, output_tokens=5))
    result = h.run()
    assert result.status == "ok"
    first, second = h.calls()
    assert (first["status"], first["error_type"], first["batch"]) == ("error", "overloaded", 1)
    assert (second["status"], second["batch"]) == ("ok", 0)


def test_submit_errors_are_retried_like_any_call(tmp_path: Path, fake_server: FakeServer) -> None:
    h = Harness(tmp_path, fake_server)
    fake_server.script_batch_calls("create", error(500))
    fake_server.script(HAIKU, ok("fine", input_tokens=10, output_tokens=5))
    result = h.run()
    assert result.status == "ok"
    first, second = h.calls()
    assert (first["status"], first["error_type"], first["batch"]) == ("error", "server_error", 1)
    assert (second["status"], second["batch"], second["attempt"]) == ("ok", 1, 2)
    assert second["batch_id"] is not None and first["batch_id"] is None


def test_poll_errors_keep_polling(tmp_path: Path, fake_server: FakeServer) -> None:
    h = Harness(tmp_path, fake_server)
    fake_server.script_batch_calls("retrieve", error(503), error(429))
    fake_server.script(HAIKU, ok("fine", input_tokens=10, output_tokens=5))
    result = h.run()
    assert result.status == "ok"
    [call] = h.calls()
    assert call["status"] == "ok" and call["batch"] == 1
    assert h.sleeps == [1.0, 2.0, 4.0]


# ---------------------------------------------------------------------------- across processes


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTD_")}
    env.update(TEST_ENV)
    return env


def _cli(h: Harness, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [AGENTD, "--config", str(h.config_path), "--state-dir", str(h.state), *args],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )


def _start_daemon(h: Harness, log: Path) -> subprocess.Popen[bytes]:
    """`agentd run` on the harness's config and state, its stderr (the JSON log) into `log`."""
    with log.open("wb") as err:
        return subprocess.Popen(
            [AGENTD, "--config", str(h.config_path), "--state-dir", str(h.state), "run"],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=_env(),
        )


def _wait(predicate: Callable[[], Any], what: str, timeout_s: float = 60) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _resume(h: Harness) -> list[RunResult | None]:
    async def go() -> list[RunResult | None]:
        resumer = BatchResumer(h.ledger, lambda: (h.config, h.executor))
        assert resumer.scan() == 1
        results = await asyncio.gather(*resumer.tasks.values())
        await h.executor.aclose()
        return list(results)

    return asyncio.run(go())


def test_once_no_wait_then_the_next_process_finishes_the_run(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    patch = {
        "loops": {
            "work": {"deliver": [{"file": "replies/work.log"}], "budget": {"per_day_usd": 1}}
        }
    }
    h = Harness(tmp_path, fake_server, patch)
    fake_server.script(HAIKU, ok("the plan", input_tokens=1000, output_tokens=200))
    done = _cli(h, "once", "work", "--no-wait", "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    [batch] = fake_server.batches()
    assert out["status"] == "submitted" and out["batch_ids"] == [batch.id]
    assert "sk-ant-test" not in done.stdout + done.stderr
    [call] = h.calls()
    assert (call["status"], call["batch"], call["batch_id"]) == ("submitted", 1, batch.id)
    assert h.ledger.get_run(call["run_id"])["status"] == "running"  # type: ignore[index]
    # The reservation holds while the provider works: the budget counts it as reserved.
    budget = json.loads(_cli(h, "budget", "--json").stdout)
    [window] = [w for w in budget if w["scope"] == "loop work"]
    assert Decimal(window["reserved_usd"]) * 1_000_000 == call["reserved_micro_usd"] > 0
    assert Decimal(window["spent_usd"]) == 0

    # A new process opening the ledger reconciles dead owners: the batch call is not abandoned.
    with Ledger.open(h.state) as again:
        assert again.get_run(call["run_id"])["status"] == "running"  # type: ignore[index]
    assert [o.call_id for o in find_orphans(h.ledger, simulated=False)] == [call["id"]]
    [result] = _resume(h)
    assert result is not None and result.status == "ok" and result.reply == "the plan"
    [call] = h.calls()
    assert (call["status"], call["cost_micro_usd"]) == ("ok", 1000)
    run = h.ledger.get_run(call["run_id"])
    assert run is not None and run["status"] == "ok" and run["cost_micro_usd"] == 1000
    assert (h.state / "replies/work.log").read_text().count("the plan") == 1
    assert h.stored_requests() == 0
    assert find_orphans(h.ledger, simulated=False) == []
    assert fake_server.count(HAIKU) == 1  # one request, one row, however many processes


def test_kill_9_mid_wait_then_a_restarted_daemon_finishes_it(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    fake_server.batch_polls = 10_000  # still running when the waiting process is killed
    h = Harness(tmp_path, fake_server, {"loops": {"work": {"every": "1d"}}})
    fake_server.script(HAIKU, ok("late plan", input_tokens=1000, output_tokens=200))
    proc = subprocess.Popen(
        [AGENTD, "--config", str(h.config_path), "--state-dir", str(h.state), "once", "work"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=_env(),
    )
    try:
        batch_id = _wait(
            lambda: fake_server.retrieves() >= 1 and fake_server.batches()[0].id, "a poll"
        )
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    [call] = h.calls()
    assert (call["status"], call["batch_id"]) == ("submitted", batch_id)
    fake_server.finish_batch(batch_id)

    log = tmp_path / "daemon.log"
    daemon = _start_daemon(h, log)
    try:

        def finished() -> bool:
            row = sqlite_row(h.state, "SELECT status FROM runs WHERE id = ?", call["run_id"])
            return row == ("ok",)

        _wait(finished, "the resumed run to finish", timeout_s=90)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert any(e.get("event") == "batch.resumed" for e in events)
    final = sqlite_row(
        h.state, "SELECT status, cost_micro_usd, batch FROM calls WHERE id = ?", call["id"]
    )
    assert final == ("ok", 1000, 1)
    assert fake_server.count(HAIKU) == 1


def sqlite_row(state: Path, sql: str, *params: Any) -> tuple[Any, ...] | None:
    """One row from the ledger with a short-lived connection of our own."""
    import sqlite3

    conn = sqlite3.connect(state / "ledger.db", timeout=10)
    try:
        row = conn.execute(sql, params).fetchone()
        return None if row is None else tuple(row)
    finally:
        conn.close()


def test_daemon_stop_mid_wait_leaves_the_batch_for_the_next_start(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    fake_server.batch_polls = 10_000
    h = Harness(tmp_path, fake_server)
    fake_server.script(HAIKU, ok("p", input_tokens=10, output_tokens=5))

    async def go() -> None:
        task = asyncio.create_task(run_loop(h.config, h.ledger, h.executor, "work"))
        while not fake_server.batches():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        task.cancel()  # what the daemon's shutdown does to a run in flight
        with pytest.raises(asyncio.CancelledError):
            await task
        await h.executor.aclose()

    # Real sleeps here: the recorded sleep would spin.
    h.executor = Executor(h.config, h.ledger, env=TEST_ENV)
    asyncio.run(go())
    from agentd.daemonstatus import abort_own_leftovers

    assert abort_own_leftovers(h.ledger) == (0, 0)  # the daemon's safety net leaves it too
    [call] = h.calls()
    assert call["status"] == "submitted"
    assert h.ledger.get_run(call["run_id"])["status"] == "running"  # type: ignore[index]


def test_a_run_that_starts_waiting_after_sigterm_is_let_go_too(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    # The batch is still being created (the server takes 2 s) when SIGTERM comes: the run
    # begins to wait only after the stop began, and must not hold the daemon for the grace.
    fake_server.batch_polls = 10_000
    fake_server.script_batch_calls("create", timeout(2.0))
    patch = {"loops": {"work": {"every": "1s"}}, "daemon": {"shutdown_grace_s": 30}}
    h = Harness(tmp_path, fake_server, patch)
    log_path = tmp_path / "daemon.log"
    daemon = _start_daemon(h, log_path)
    try:
        _wait(lambda: len(fake_server.batch_calls("create")) >= 1, "the batch create")
        daemon.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert daemon.wait(timeout=25) == 0
        stopped_in = time.monotonic() - started
    finally:
        if daemon.poll() is None:
            daemon.kill()
    events = [
        json.loads(x)["event"] for x in log_path.read_text().splitlines() if x.startswith("{")
    ]
    assert "batch.submitted" in events and "daemon.aborting_runs" not in events
    assert stopped_in < 10, stopped_in  # the 2 s create, then let go: not the 30 s grace
    [call] = h.calls()
    assert (call["status"], call["batch"]) == ("submitted", 1)
    assert sqlite_row(h.state, "SELECT status FROM runs WHERE id = ?", call["run_id"]) == (
        "running",
    )


def test_sigterm_mid_wait_stops_at_once_and_the_next_daemon_finishes_it(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    fake_server.batch_polls = 10_000
    patch = {"loops": {"work": {"every": "1s"}}, "daemon": {"shutdown_grace_s": 60}}
    h = Harness(tmp_path, fake_server, patch)
    fake_server.script(HAIKU, ok("night plan", input_tokens=1000, output_tokens=200))
    fake_server.set_default("other", input_tokens=10, output_tokens=5)

    def events(log: Path, name: str) -> list[dict[str, Any]]:
        lines = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
        return [e for e in lines if e.get("event") == name]

    first = _start_daemon(h, tmp_path / "first.log")
    try:
        _wait(lambda: fake_server.retrieves() >= 1, "the first poll")
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=50) == 0  # well inside the 60 s grace
    finally:
        if first.poll() is None:
            first.kill()
    # The waiting run was let go at once (not cancelled at the end of the grace) ...
    assert events(tmp_path / "first.log", "daemon.aborting_runs") == []
    [call] = [c for c in h.calls() if c["batch_id"]]
    assert call["status"] == "submitted"
    run = sqlite_row(h.state, "SELECT status FROM runs WHERE id = ?", call["run_id"])
    assert run == ("running",)

    # ... and the next daemon adopts it and finishes the run when the batch ends.
    fake_server.finish_batch(call["batch_id"])
    second = _start_daemon(h, tmp_path / "second.log")
    try:
        _wait(
            lambda: sqlite_row(h.state, "SELECT status FROM runs WHERE id = ?", call["run_id"])
            == ("ok",),
            "the resumed run",
            timeout_s=90,
        )
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=50) == 0
    finally:
        if second.poll() is None:
            second.kill()
    assert events(tmp_path / "second.log", "batch.resumed")
    final = sqlite_row(h.state, "SELECT status, cost_micro_usd FROM calls WHERE id = ?", call["id"])
    assert final == ("ok", 1000)


def test_batch_waiters_let_go_cancels_the_waiting_and_releases_the_rest() -> None:
    async def go() -> None:
        waiters = BatchWaiters()
        waiting = asyncio.create_task(asyncio.sleep(60))
        done_waiting = asyncio.create_task(asyncio.sleep(60))
        waiters.add(waiting)
        waiters.add(done_waiting)
        waiters.discard(done_waiting)  # stopped waiting before the stop: not cancelled
        assert not waiters.released
        waiters.let_go()
        assert waiters.released  # a run that would begin waiting now stops instead
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert not done_waiting.cancelled()
        done_waiting.cancel()

    asyncio.run(go())
