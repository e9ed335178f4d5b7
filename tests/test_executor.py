"""The executor over the real SDKs and a real ledger: exact rows, retries, fallback, breakers."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from builders import TEST_ENV, base_config, merge, write_config
from fakeserver import FakeServer, drop, error, malformed, no_usage, ok, timeout
from structlog.testing import capture_logs

from agentd.config import load_config
from agentd.errors import MissingKeyError
from agentd.executor import Executor
from agentd.ledger import Ledger
from agentd.runend import RunResult
from agentd.runner import run_loop


class Harness:
    """A config on the fake server, a ledger in tmp_path, and an executor with a recorded sleep."""

    def __init__(
        self,
        tmp_path: Path,
        server: FakeServer,
        patch: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        prompt: str = "Say hello.",
    ) -> None:
        data = merge(base_config(server.url), patch or {})
        self.config = load_config(write_config(tmp_path / "conf", data, prompt))
        self.ledger = Ledger.open(tmp_path / "state")
        self.sleeps: list[float] = []
        self.server = server

        async def sleep(seconds: float) -> None:
            self.sleeps.append(seconds)

        self.executor = Executor(
            self.config, self.ledger, env=TEST_ENV if env is None else env, sleep=sleep
        )

    def run(self, loop: str = "work") -> RunResult:
        async def go() -> RunResult:
            return await run_loop(self.config, self.ledger, self.executor, loop)

        return asyncio.run(go())

    def calls(self, run_id: int | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM calls" + (" WHERE run_id = ?" if run_id else "") + " ORDER BY id"
        cur = self.ledger.conn.execute(sql, (run_id,) if run_id else ())
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def run_row(self, run_id: int) -> dict[str, Any]:
        row = self.ledger.get_run(run_id)
        assert row is not None
        return row


@pytest.fixture
def harness(tmp_path: Path, fake_server: FakeServer) -> Harness:
    return Harness(tmp_path, fake_server)


def test_one_call_exact_row_and_cost(tmp_path: Path, fake_server: FakeServer) -> None:
    # A prompt of 4,000 bytes, so that the 1,000 input tokens the server reports are plausible.
    harness = Harness(tmp_path, fake_server, prompt="Check the queue. " * 235)
    harness.server.script(
        "claude-haiku-4-5", ok(text="all fine", input_tokens=1000, output_tokens=200)
    )
    result = harness.run()
    assert result.status == "ok"
    assert result.reply == "all fine"
    # 1,000 input at $1/MTok + 200 output at $5/MTok = $0.002 = 2,000 micro-USD.
    assert result.cost_micro_usd == 2000
    [call] = harness.calls(result.run_id)
    assert call["status"] == "ok"
    assert call["model"] == "claude-haiku-4-5"
    # Pins never drift: the model asked for and the model the provider says served it.
    assert call["served_model"] == "claude-haiku-4-5"
    assert call["alias"] == "haiku"
    assert call["provider"] == "anthropic"
    assert call["tier"] == "fast"
    assert call["purpose"] == "work"
    assert call["attempt"] == 1
    assert (call["input_tokens"], call["output_tokens"]) == (1000, 200)
    assert call["cost_micro_usd"] == 2000
    assert call["priced"] == 1 and call["simulated"] == 0
    assert call["request_id"]
    # The reservation bounded the real cost: every byte of input at the dearest input rate.
    assert call["reserved_micro_usd"] >= 2000
    run = harness.run_row(result.run_id)
    assert (run["status"], run["model"], run["fallback"], run["cost_micro_usd"]) == (
        "ok",
        "claude-haiku-4-5",
        0,
        2000,
    )
    # The key went to the server (SDK 2.x sends it as a bearer token) and nowhere into the ledger.
    headers = harness.server.requests[-1].headers
    sent = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ")
    assert sent == TEST_ENV["TEST_ANTHROPIC_KEY"]
    dump = "\n".join(harness.ledger.conn.iterdump())
    assert TEST_ENV["TEST_ANTHROPIC_KEY"] not in dump


def test_cache_tokens_priced_at_their_rates(harness: Harness) -> None:
    harness.server.script(
        "claude-haiku-4-5",
        ok(input_tokens=1000, output_tokens=200, cache_read=200, cache_write=100),
    )
    result = harness.run()
    [call] = harness.calls(result.run_id)
    # Ledger input counts all input: 1000 uncached + 200 read + 100 written.
    assert (call["input_tokens"], call["cache_read_tokens"], call["cache_write_tokens"]) == (
        1300,
        200,
        100,
    )
    # 1000×$1 + 200×$0.10 + 100×$1.25 + 200×$5 per MTok = $0.002145.
    assert call["cost_micro_usd"] == 2145


def test_openai_cached_and_reasoning_tokens(tmp_path: Path, fake_server: FakeServer) -> None:
    h = Harness(tmp_path, fake_server, {"loops": {"work": {"tier": None, "model": "gpt-mini"}}})
    fake_server.script(
        "gpt-4o-mini", ok(input_tokens=2000, output_tokens=500, cache_read=1000, reasoning=100)
    )
    result = h.run()
    [call] = h.calls(result.run_id)
    assert (call["input_tokens"], call["cache_read_tokens"], call["reasoning_tokens"]) == (
        2000,
        1000,
        100,
    )
    # 1000×$0.15 + 1000×$0.075 + 500×$0.60 per MTok = $0.000525.
    assert call["cost_micro_usd"] == 525


def test_rate_limit_retried_honouring_retry_after(harness: Harness) -> None:
    harness.server.script("claude-haiku-4-5", error(429, retry_after=2), ok())
    result = harness.run()
    assert result.status == "ok"
    assert harness.sleeps == [2.0]
    rows = harness.calls(result.run_id)
    assert [(r["attempt"], r["status"], r["error_type"], r["http_status"]) for r in rows] == [
        (1, "error", "rate_limited", 429),
        (2, "ok", None, None),
    ]
    assert rows[0]["cost_micro_usd"] == 0
    assert result.fallback is False


def test_overload_exhausts_retries_then_falls_back(harness: Harness) -> None:
    harness.server.script("claude-haiku-4-5", error(529), error(529), error(529))
    result = harness.run()
    rows = harness.calls(result.run_id)
    assert [(r["model"], r["status"]) for r in rows] == [("claude-haiku-4-5", "error")] * 3 + [
        ("gpt-4o-mini", "ok")
    ]
    assert [r["attempt"] for r in rows] == [1, 2, 3, 4]
    assert result.fallback is True and result.model == "gpt-4o-mini"
    assert harness.run_row(result.run_id)["fallback"] == 1
    assert len(harness.sleeps) == 2


@pytest.mark.parametrize(
    ("status", "error_type"),
    [(404, "model_unavailable"), (401, "auth_error"), (400, "bad_request")],
)
def test_non_retryable_errors_go_to_next_model(
    harness: Harness, status: int, error_type: str
) -> None:
    harness.server.script("claude-haiku-4-5", error(status))
    result = harness.run()
    rows = harness.calls(result.run_id)
    assert [(r["model"], r["status"], r["error_type"]) for r in rows] == [
        ("claude-haiku-4-5", "error", error_type),
        ("gpt-4o-mini", "ok", None),
    ]
    assert harness.sleeps == []


def test_auth_error_opens_provider_circuit(harness: Harness) -> None:
    harness.server.script("claude-haiku-4-5", error(401))
    harness.run()
    second = harness.run()
    assert [r["model"] for r in harness.calls(second.run_id)] == ["gpt-4o-mini"]
    [skip] = second.route["skipped"]
    assert skip["alias"] == "haiku" and "provider circuit open" in skip["reason"]
    assert harness.server.count("claude-haiku-4-5") == 1


@pytest.mark.parametrize("fault", ["timeout", "drop", "malformed", "no_usage"])
def test_maybe_billed_failures_settle_at_reservation(
    tmp_path: Path, fake_server: FakeServer, fault: str
) -> None:
    h = Harness(
        tmp_path, fake_server, {"providers": {"anthropic": {"timeout_s": 0.5, "max_retries": 0}}}
    )
    step = {
        "timeout": timeout(3),
        "drop": drop(),
        "malformed": malformed(),
        "no_usage": no_usage(),
    }[fault]
    fake_server.script("claude-haiku-4-5", step)
    result = h.run()
    first, second = h.calls(result.run_id)
    assert first["status"] == "error"
    assert first["cost_micro_usd"] == first["reserved_micro_usd"] > 0
    assert second["status"] == "ok" and second["model"] == "gpt-4o-mini"


def test_whole_chain_failing_fails_the_run_with_each_error(harness: Harness) -> None:
    harness.server.script("claude-haiku-4-5", error(404))
    harness.server.script("gpt-4o-mini", error(400))
    result = harness.run()
    assert result.status == "failed" and result.exit_code == 1
    assert result.error is not None
    assert "haiku (claude-haiku-4-5)" in result.error and "404" in result.error
    assert "gpt-mini (gpt-4o-mini)" in result.error and "400" in result.error
    assert harness.run_row(result.run_id)["status"] == "failed"


def test_breaker_skips_a_failing_model_then_fails_fast(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    h = Harness(
        tmp_path,
        fake_server,
        {
            "circuit_breaker": {"failures": 2, "cooldowns_s": [60]},
            "providers": {"anthropic": {"max_retries": 1}, "openai": {"max_retries": 1}},
        },
    )
    fake_server.script("claude-haiku-4-5", *[error(500)] * 2)
    fake_server.script("gpt-4o-mini", *[error(500)] * 2)
    first = h.run()
    assert first.status == "failed"
    requests_before = fake_server.count()
    second = h.run()
    assert second.status == "failed"
    assert second.error is not None and "cooling down" in second.error
    assert "500 api_error" in second.error  # the last real error is not hidden
    assert fake_server.count() == requests_before  # failed fast: no request made
    assert h.calls(second.run_id) == []


def test_ledger_rows_equal_server_requests(harness: Harness) -> None:
    harness.server.script("claude-haiku-4-5", error(429, retry_after=0), error(500), error(529))
    harness.server.script("gpt-4o-mini", error(503), ok())
    harness.run()
    harness.run()
    assert len(harness.calls()) == harness.server.count()


def test_missing_primary_key_is_a_config_error(tmp_path: Path, fake_server: FakeServer) -> None:
    h = Harness(tmp_path, fake_server, env={})
    with pytest.raises(MissingKeyError, match="TEST_ANTHROPIC_KEY"):
        h.run()
    assert h.ledger.conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 0
    assert fake_server.count() == 0


def test_cancelled_call_is_settled_aborted(harness: Harness) -> None:
    harness.server.script("claude-haiku-4-5", timeout(3))

    async def go() -> None:
        task = asyncio.create_task(
            run_loop(harness.config, harness.ledger, harness.executor, "work")
        )
        while harness.server.count() == 0:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(go())
    [call] = harness.calls()
    assert call["status"] == "aborted"
    assert call["cost_micro_usd"] == call["reserved_micro_usd"]
    [run] = harness.ledger.conn.execute("SELECT status FROM runs").fetchall()
    assert run[0] == "aborted"


def test_a_retry_after_shorter_than_the_backoff_does_not_shorten_it(harness: Harness) -> None:
    # retry-after: 0 says "now"; the first backoff is 0.5-1 s (jittered) and it wins.
    harness.server.script("claude-haiku-4-5", error(429, retry_after=0), error(503), ok())
    result = harness.run()
    assert result.status == "ok" and result.model == "claude-haiku-4-5"
    first, second = harness.sleeps
    assert 0.5 <= first <= 1.0 and 1.0 <= second <= 2.0  # plain backoff: 1 s, then 2 s, ×0.5-1


def test_a_retry_after_longer_than_the_backoff_wins(harness: Harness) -> None:
    harness.server.script("claude-haiku-4-5", error(429, retry_after=5), ok())
    assert harness.run().status == "ok"
    assert harness.sleeps == [5.0]


def test_a_retry_after_beyond_the_wait_cap_moves_to_the_next_model(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    h = Harness(tmp_path, fake_server, {"providers": {"anthropic": {"retry_max_wait_s": 3}}})
    fake_server.script("claude-haiku-4-5", error(429, retry_after=10))
    result = h.run()
    assert result.status == "ok" and result.model == "gpt-4o-mini"
    assert h.sleeps == []  # no wait at all: the cap would be passed
    assert [(c["model"], c["error_type"]) for c in h.calls()] == [
        ("claude-haiku-4-5", "rate_limited"),
        ("gpt-4o-mini", None),
    ]


# A 400 the provider calls "prompt is too long" (Anthropic's wording).
_TOO_LONG = error(400, message="prompt is too long: 210000 tokens > 200000 maximum")


@pytest.mark.parametrize(
    ("step", "error_type"),
    [
        (error(400), "bad_request"),
        (_TOO_LONG, "context_too_long"),
        (malformed(), "malformed_response"),
    ],
)
def test_errors_of_the_request_do_not_open_the_models_circuit(
    tmp_path: Path, fake_server: FakeServer, step: Any, error_type: str
) -> None:
    # One loop's bad or oversized request says nothing about the model's health: with
    # `failures: 2` three such runs in a row still try haiku every time.
    h = Harness(tmp_path, fake_server, {"circuit_breaker": {"failures": 2, "cooldowns_s": [60]}})
    fake_server.script("claude-haiku-4-5", step, step, step)
    for _ in range(3):
        result = h.run()
        assert result.status == "ok" and result.model == "gpt-4o-mini"
        assert result.route["skipped"] == []  # haiku's circuit never opened
    assert fake_server.count("claude-haiku-4-5") == 3
    assert [c["error_type"] for c in h.calls() if c["model"] == "claude-haiku-4-5"] == [
        error_type
    ] * 3
    assert h.executor.breakers.open_reason("anthropic", "anthropic/claude-haiku-4-5") is None


def test_server_errors_still_open_the_models_circuit(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    h = Harness(
        tmp_path,
        fake_server,
        {
            "circuit_breaker": {"failures": 2, "cooldowns_s": [60]},
            "providers": {"anthropic": {"max_retries": 0}},
        },
    )
    fake_server.script("claude-haiku-4-5", error(500), error(500))
    h.run()
    h.run()
    third = h.run()
    assert third.status == "ok" and third.model == "gpt-4o-mini"
    [skip] = third.route["skipped"]
    assert skip["alias"] == "haiku" and "model circuit open" in skip["reason"]
    assert fake_server.count("claude-haiku-4-5") == 2


def test_a_served_model_other_than_the_one_asked_for_is_logged(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    h = Harness(tmp_path, fake_server)
    fake_server.script(
        "claude-haiku-4-5",
        ok(served_model="claude-haiku-4-5-20251001"),  # the alias resolved to a snapshot
        ok(served_model="claude-3-haiku-20240307"),  # another model altogether
        ok(),
    )
    with capture_logs() as logs:
        runs = [h.run() for _ in range(3)]
    assert [c["served_model"] for c in h.calls()] == [
        "claude-haiku-4-5-20251001",
        "claude-3-haiku-20240307",
        "claude-haiku-4-5",
    ]
    events = [e for e in logs if e["event"] == "call.model_substituted"]
    assert [
        (e["log_level"], e["run_id"], e["asked"], e["served"], e["snapshot"]) for e in events
    ] == [
        ("info", runs[0].run_id, "claude-haiku-4-5", "claude-haiku-4-5-20251001", True),
        ("warning", runs[1].run_id, "claude-haiku-4-5", "claude-3-haiku-20240307", False),
    ]
    assert all(e["loop"] == "work" and e["alias"] == "haiku" for e in events)
