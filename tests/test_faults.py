"""Faults, concurrency and crashes through the whole call path (real SDKs, server, SQLite)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from builders import TEST_ENV, base_config, merge, write_config
from fakeserver import FakeServer, Step, drop, error, malformed, no_usage, ok, timeout
from test_executor import Harness

from agentd.ledger import Ledger
from agentd.runner import RunResult, run_loop


def _fault(rng: random.Random) -> Step:
    return rng.choice(
        [
            error(429, retry_after=0),
            error(500),
            error(503),
            error(529),
            error(400),
            error(404),
            timeout(2),
            drop(),
            malformed(),
            no_usage(),
        ]
    )


def test_a_third_of_requests_failing_every_run_ends_cleanly(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    rng = random.Random(20261125)
    h = Harness(
        tmp_path,
        fake_server,
        {
            "providers": {
                "anthropic": {"timeout_s": 1, "max_retries": 1},
                "openai": {"timeout_s": 1, "max_retries": 1},
            },
            "circuit_breaker": {"failures": 4, "cooldowns_s": [0.05]},
        },
    )
    for model in ("claude-haiku-4-5", "gpt-4o-mini"):
        fake_server.script(
            model,
            *[_fault(rng) if rng.random() < 1 / 3 else ok(output_tokens=20) for _ in range(400)],
        )

    async def go() -> list[RunResult]:
        results = []
        for batch in range(6):
            results += await asyncio.gather(
                *(run_loop(h.config, h.ledger, h.executor, "work") for _ in range(8))
            )
            await asyncio.sleep(0.06 if batch % 2 else 0)  # let some breakers cool down
        return results

    results = asyncio.run(go())
    statuses = {r.status for r in results}
    assert statuses <= {"ok", "failed"}
    assert "ok" in statuses
    calls = h.calls()
    # An attempt whose connection was never established is still a row (it was an attempt), but
    # no server can count it: those are the only rows allowed beyond the server's count.
    never_sent = [
        c for c in calls if c["error_type"] == "connection_error" and not c["cost_micro_usd"]
    ]
    assert len(calls) - len(never_sent) == fake_server.count()
    assert not [c for c in calls if c["status"] not in ("ok", "error")]
    for result in results:
        rows = h.calls(result.run_id)
        run = h.run_row(result.run_id)
        assert run["cost_micro_usd"] == sum(c["cost_micro_usd"] for c in rows)
        assert [c["attempt"] for c in rows] == list(range(1, len(rows) + 1))
        if result.status == "ok":
            assert rows[-1]["status"] == "ok" and rows[-1]["model"] == result.model
        else:
            assert all(c["status"] == "error" for c in rows)


def test_concurrent_runs_never_overspend_a_shared_cap(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    h = Harness(tmp_path, fake_server, {"budgets": {"per_day_usd": "0.01"}})
    # Each run reserves ~1,084 µ$ on haiku and really costs 10×$1 + 200×$5 = 1,010 µ$.
    fake_server.script("claude-haiku-4-5", *[ok(input_tokens=10, output_tokens=200)] * 40)

    async def go() -> list[RunResult]:
        return await asyncio.gather(
            *(run_loop(h.config, h.ledger, h.executor, "work") for _ in range(30))
        )

    results = asyncio.run(go())
    spent = sum(c["cost_micro_usd"] for c in h.calls())
    assert spent <= 10_000
    assert sum(r.status == "ok" for r in results) >= 9
    assert {r.status for r in results} == {"ok", "skipped_budget"}
    assert len(h.calls()) == fake_server.count()


def test_fallback_tiers_are_tried_after_the_chain(tmp_path: Path, fake_server: FakeServer) -> None:
    h = Harness(tmp_path, fake_server, {"loops": {"work": {"fallback_tiers": ["balanced"]}}})
    fake_server.script("claude-haiku-4-5", error(404))
    fake_server.script("gpt-4o-mini", error(404))
    fake_server.script("claude-sonnet-4-5", ok())
    result = h.run()
    assert result.status == "ok" and result.model == "claude-sonnet-4-5"
    assert result.tier == "balanced" and result.fallback
    assert [c["model"] for c in h.calls()] == [
        "claude-haiku-4-5",
        "gpt-4o-mini",
        "claude-sonnet-4-5",
    ]


@pytest.mark.slow
def test_kill_9_mid_call_is_reconciled_at_its_reservation(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    config = write_config(tmp_path / "c", merge(base_config(fake_server.url), {}))
    state = tmp_path / "state"
    fake_server.script("claude-haiku-4-5", timeout(60))
    exe = Path(sys.executable).with_name("agentd")
    proc = subprocess.Popen(
        [str(exe), "--config", str(config), "--state-dir", str(state), "once", "work"],
        env={**os.environ, **TEST_ENV},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while fake_server.count() == 0:
            assert time.monotonic() < deadline, "the call never reached the server"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    with Ledger.open(state, reconcile=False) as ledger:
        [(status,)] = ledger.conn.execute("SELECT status FROM calls").fetchall()
        assert status == "pending"
    with Ledger.open(state) as ledger:  # a new process's open reconciles dead owners' rows
        [call] = ledger.conn.execute(
            "SELECT status, cost_micro_usd, reserved_micro_usd FROM calls"
        ).fetchall()
        assert call[0] == "aborted" and call[1] == call[2] > 0
        [(run_status,)] = ledger.conn.execute("SELECT status FROM runs").fetchall()
        assert run_status == "aborted"
