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

from agentd.errors import LedgerError, LoopBusy
from agentd.ledger import Ledger
from agentd.runend import RunResult
from agentd.runner import run_loop


def _loops(n: int) -> dict[str, dict[str, object]]:
    """n copies of the `work` loop: one loop never runs twice at once, so concurrency needs many."""
    loop = {"every": "30m", "tier": "fast", "max_tokens": 200, "prompt": "work.md"}
    return {f"work{i}": dict(loop) for i in range(n)}


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
            "loops": _loops(8),
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
                *(run_loop(h.config, h.ledger, h.executor, f"work{i}") for i in range(8))
            )
            await asyncio.sleep(0.06 if batch % 2 else 0)  # let some breakers cool down
        return results

    results = asyncio.run(go())
    statuses = {r.status for r in results}
    assert statuses <= {"ok", "failed"}
    assert "ok" in statuses
    calls = h.calls()
    # Exactly one row per request the server received. The only row that could exist without a
    # request behind it is an attempt whose connection failed before the request left (refused,
    # connect timeout): it is still an attempt, so it is still a row (`connection_error`, cost 0,
    # no HTTP status). Here there is none: on loopback the fake server's accept backlog (256)
    # takes every connection at once, and each provider has at most 4 calls in flight. So no
    # row is subtracted: should one appear, this test shows it.
    never_sent = [
        c for c in calls if c["error_type"] == "connection_error" and not c["cost_micro_usd"]
    ]
    assert never_sent == []
    assert len(calls) == fake_server.count()
    assert not [c for c in calls if c["status"] not in ("ok", "error")]
    # Sent, and no usage came back: may have been billed, so each costs its reservation.
    maybe_billed = {"timeout": None, "connection_error": None, "malformed_response": 200}
    for call in calls:
        if call["error_type"] in maybe_billed:
            assert call["cost_micro_usd"] == call["reserved_micro_usd"] > 0
            assert call["http_status"] == maybe_billed[call["error_type"]]
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
    # The fast tier is haiku alone: with gpt-mini behind it, a run that haiku no longer fits
    # would go to gpt-mini (a refusal is a skip) and the cap would hardly be tested.
    h = Harness(
        tmp_path,
        fake_server,
        {"budgets": {"per_day_usd": 0.01}, "tiers": {"fast": ["haiku"]}, "loops": _loops(30)},
    )
    # Each run reserves ~1,084 µ$ on haiku and really costs 10×$1 + 200×$5 = 1,010 µ$.
    fake_server.script("claude-haiku-4-5", *[ok(input_tokens=10, output_tokens=200)] * 40)

    async def go() -> list[RunResult]:
        return await asyncio.gather(
            *(run_loop(h.config, h.ledger, h.executor, f"work{i}") for i in range(30))
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
    # The route keeps the tier asked for and says which tier answered.
    route = h.run_row(result.run_id)["route"]
    assert (route["tier"], route["answered_tier"], route["model"]) == ("fast", "balanced", "sonnet")
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


def test_a_loop_never_runs_twice_at_once(tmp_path: Path, fake_server: FakeServer) -> None:
    h = Harness(tmp_path, fake_server)
    fake_server.script("claude-haiku-4-5", timeout(0.5))  # a slow answer: 0.5 s, then OK

    async def go() -> list[RunResult | BaseException]:
        return await asyncio.gather(
            run_loop(h.config, h.ledger, h.executor, "work"),
            run_loop(h.config, h.ledger, h.executor, "work"),
            return_exceptions=True,
        )

    first, second = asyncio.run(go())
    assert isinstance(first, RunResult) and first.status == "ok"
    assert isinstance(second, LoopBusy)
    assert fake_server.count() == 1
    assert h.ledger.conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 1


@pytest.mark.slow
def test_a_loop_running_in_another_process_is_busy(tmp_path: Path, fake_server: FakeServer) -> None:
    config = write_config(tmp_path / "c", base_config(fake_server.url))
    state = tmp_path / "state"
    fake_server.script("claude-haiku-4-5", timeout(60))
    exe = Path(sys.executable).with_name("agentd")
    env = {**os.environ, **TEST_ENV}
    proc = subprocess.Popen(
        [str(exe), "--config", str(config), "--state-dir", str(state), "once", "work"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while fake_server.count() == 0:
            assert time.monotonic() < deadline, "the call never reached the server"
            time.sleep(0.02)
        second = subprocess.run(
            [str(exe), "--config", str(config), "--state-dir", str(state), "once", "work"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 75
        assert "already running" in second.stderr
        assert fake_server.count() == 1
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_billing_error_moves_to_another_provider_and_opens_the_circuit(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    h = Harness(
        tmp_path, fake_server, {"loops": {"work": {"tier": "balanced", "fallback_tiers": ["fast"]}}}
    )
    fake_server.script("claude-sonnet-4-5", error(402))
    result = h.run()
    # After a 402 the rest of Anthropic (haiku in the fast tier) is skipped for this call.
    assert [c["model"] for c in h.calls()] == ["claude-sonnet-4-5", "gpt-4o"]
    assert h.calls()[0]["error_type"] == "billing_error"
    assert result.status == "ok" and result.model == "gpt-4o"
    second = h.run()
    assert all(
        s["reason"].startswith(("provider circuit open", "provider failed"))
        for s in second.route["skipped"]
        if s["alias"] in ("sonnet", "haiku")
    )
    assert fake_server.count("claude-sonnet-4-5") == 1


def test_per_provider_concurrency_cap(tmp_path: Path, fake_server: FakeServer) -> None:
    h = Harness(
        tmp_path,
        fake_server,
        {"providers": {"anthropic": {"max_concurrency": 1}}, "loops": _loops(4)},
    )
    fake_server.script("claude-haiku-4-5", *[timeout(0.3)] * 4)  # each answer takes 0.3 s

    async def go() -> None:
        await asyncio.gather(
            *(run_loop(h.config, h.ledger, h.executor, f"work{i}") for i in range(4))
        )

    started = time.monotonic()
    asyncio.run(go())
    # With one call at a time, four 0.3 s calls cannot take less than 1.2 s in total.
    assert time.monotonic() - started >= 1.2
    assert [c["status"] for c in h.calls()] == ["ok"] * 4


def test_no_call_is_made_when_the_ledger_cannot_be_written(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    h = Harness(tmp_path, fake_server)
    h.ledger.conn.execute("PRAGMA query_only = ON")  # every write now fails, like a full disk
    with pytest.raises(LedgerError):
        h.run()
    assert fake_server.count() == 0
