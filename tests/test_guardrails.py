"""Guardrails: per-run ceilings, the anomaly breaker, projections for `check` and reload."""

from __future__ import annotations

import textwrap
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from builders import base_config, merge, write_config
from fakeserver import FakeServer, error, ok
from structlog.testing import capture_logs
from test_executor import Harness

from agentd import loopstate
from agentd.config import load_config
from agentd.errors import ConfigError, LoopPaused
from agentd.guardrails import (
    check_projection,
    median,
    reload_cost_change,
    run_limits,
)
from agentd.loopstate import anomaly_run_id

FOREVER = """
    async def run(ctx):
        while True:
            await ctx.complete("x" * 80)
"""

SWALLOWS = """
    async def run(ctx):
        made = 0
        for _ in range(60):
            try:
                await ctx.complete("x" * 80)
                made += 1
            except Exception:
                pass
        return f"made {made} calls and carried on"
"""


def handler_harness(
    tmp_path: Path, server: FakeServer, code: str, limits: dict[str, Any] | None = None
) -> Harness:
    loop: dict[str, Any] = {"handler": "handler.py:run"}
    if limits is not None:
        loop["limits"] = limits
    h = Harness(tmp_path, server, {"loops": {"work": loop}})
    (h.config.dir / "handler.py").write_text(textwrap.dedent(code))
    return h


def pending(h: Harness) -> int:
    (count,) = h.ledger.conn.execute(
        "SELECT COUNT(*) FROM calls WHERE status IN ('pending', 'submitted')"
    ).fetchone()
    return int(count)


@pytest.mark.parametrize("code", [FOREVER, SWALLOWS])
def test_default_call_ceiling_stops_a_runaway_handler(
    tmp_path: Path, fake_server: FakeServer, code: str
) -> None:
    h = handler_harness(tmp_path, fake_server, code)
    result = h.run()
    assert result.status == "failed"
    assert result.error == "limit max_calls_per_run=20 reached"
    assert len(h.calls()) == 20 and fake_server.count() == 20
    assert pending(h) == 0
    row = h.run_row(result.run_id)
    assert row["status"] == "failed" and row["error"] == "limit max_calls_per_run=20 reached"
    assert row["route"]["limit_reached"] == "limit max_calls_per_run=20 reached"


# A handler call of "x" * 80 on the loop's max_tokens 200, as the reservation bounds it:
# 80 bytes + 16 per message + 16 = 112 input tokens at most, + 200 output = 312.
WORST = 312


def run_tokens(h: Harness, run_id: int) -> int:
    (tokens,) = h.ledger.conn.execute(
        "SELECT COALESCE(SUM(input_tokens + output_tokens), 0) FROM calls WHERE run_id = ?",
        (run_id,),
    ).fetchone()
    return int(tokens)


@pytest.mark.parametrize("code", [FOREVER, SWALLOWS])
def test_token_ceiling(tmp_path: Path, fake_server: FakeServer, code: str) -> None:
    # Each call uses 20 input + 16 output tokens (the fake server's default), but may use up
    # to 312: a call is made only while the tokens used + 312 fit in 600.
    h = handler_harness(tmp_path, fake_server, code, {"max_tokens_per_run": 600})
    result = h.run()
    assert result.status == "failed"
    assert result.error == (
        "limit max_tokens_per_run=600 reached (324 tokens used, the next call may use up to 312)"
    )
    assert len(h.calls()) == 9 and fake_server.count() == 9  # 8 × 36 + 312 = 600 fits
    assert run_tokens(h, result.run_id) == 324
    assert pending(h) == 0
    assert h.run_row(result.run_id)["route"]["limit_reached"] == result.error


@pytest.mark.parametrize("code", [FOREVER, SWALLOWS])
@pytest.mark.parametrize("ceiling", [2 * WORST, 2 * WORST + 200, 3 * WORST - 1])
def test_token_ceiling_is_never_exceeded(
    tmp_path: Path, fake_server: FakeServer, code: str, ceiling: int
) -> None:
    # Every reply uses its whole worst case: two calls fit (exactly, for the first ceiling);
    # a third would pass the ceiling, so it is refused before it is made.
    h = handler_harness(tmp_path, fake_server, code, {"max_tokens_per_run": ceiling})
    fake_server.script(
        "claude-haiku-4-5", *[ok(input_tokens=112, output_tokens=200) for _ in range(3)]
    )
    result = h.run()
    assert result.status == "failed"
    assert result.error == (
        f"limit max_tokens_per_run={ceiling} reached ({2 * WORST} tokens used, "
        f"the next call may use up to {WORST})"
    )
    assert fake_server.count() == 2
    assert run_tokens(h, result.run_id) == 2 * WORST <= ceiling
    assert pending(h) == 0


def test_token_ceiling_refuses_a_prompt_loops_only_call_that_could_pass_it(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    # "Say hello." (10 bytes) on max_tokens 200: up to 10 + 32 + 200 = 242 tokens.
    h = Harness(tmp_path, fake_server, {"loops": {"work": {"limits": {"max_tokens_per_run": 241}}}})
    result = h.run()
    assert result.status == "failed"
    assert result.error == (
        "limit max_tokens_per_run=241 reached (0 tokens used, the next call may use up to 242)"
    )
    assert fake_server.count() == 0 and h.calls() == [] and pending(h) == 0
    h2 = Harness(
        tmp_path / "fits",
        fake_server,
        {"loops": {"work": {"limits": {"max_tokens_per_run": 242}}}},
    )
    assert h2.run().status == "ok"


@pytest.mark.parametrize("code", [FOREVER, SWALLOWS])
def test_usd_ceiling_refuses_the_call_that_could_pass_it(
    tmp_path: Path, fake_server: FakeServer, code: str
) -> None:
    h = handler_harness(tmp_path, fake_server, code, {"max_usd_per_run": 0.0015})
    result = h.run()
    assert result.status == "failed"
    assert (result.error or "").startswith("limit max_usd_per_run=0.0015 reached (spent $")
    calls = h.calls()
    costs = [c["cost_micro_usd"] for c in calls]
    reserve = calls[0]["reserved_micro_usd"]
    # Every call made fitted with its worst case; the next one would not have.
    assert len(calls) >= 2
    assert sum(costs[:-1]) + reserve <= 1500 < sum(costs) + reserve
    assert pending(h) == 0
    assert h.run_row(result.run_id)["cost_micro_usd"] == sum(costs) <= 1500


def test_calls_are_attempts_for_a_prompt_loop(tmp_path: Path, fake_server: FakeServer) -> None:
    h = Harness(tmp_path, fake_server, {"loops": {"work": {"limits": {"max_calls_per_run": 1}}}})
    fake_server.script("claude-haiku-4-5", error(529), ok("fine"))
    result = h.run()
    assert result.status == "failed"
    assert result.error == "limit max_calls_per_run=1 reached"
    assert [c["status"] for c in h.calls()] == ["error"]
    assert fake_server.count() == 1 and pending(h) == 0


def test_prompt_loops_have_no_default_ceilings_handlers_do(tmp_path: Path) -> None:
    data = merge(
        base_config("http://127.0.0.1:9"),
        {
            "loops": {
                "h": {
                    "every": "1h",
                    "tier": "fast",
                    "max_tokens": 10,
                    "handler": "h.py:run",
                    "prompt": "work.md",
                },
                "off": {
                    "every": "1h",
                    "tier": "fast",
                    "max_tokens": 10,
                    "handler": "h.py:run",
                    "prompt": "work.md",
                    "limits": {"max_calls_per_run": None, "max_usd_per_run": 1},
                },
            }
        },
    )
    config = load_config(write_config(tmp_path, data))
    assert run_limits(config.loops["work"]).model_dump() == {
        "max_calls_per_run": None,
        "max_tokens_per_run": None,
        "max_usd_per_run": None,
    }
    assert run_limits(config.loops["h"]).max_calls_per_run == 20
    assert run_limits(config.loops["h"]).max_tokens_per_run == 200_000
    off = run_limits(config.loops["off"])
    assert (off.max_calls_per_run, off.max_tokens_per_run) == (None, 200_000)
    assert str(off.max_usd_per_run) == "1"


def test_usd_ceiling_needs_prices(tmp_path: Path) -> None:
    data = merge(
        base_config("http://127.0.0.1:9"),
        {
            "models": {"local": {"provider": "openai", "model": "no-such-model-xyz"}},
            "loops": {"work": {"tier": None, "model": "local", "limits": {"max_usd_per_run": 1}}},
        },
    )
    with pytest.raises(ConfigError, match=r"limits\.max_usd_per_run"):
        load_config(write_config(tmp_path, data))


# ---------------------------------------------------------------------------- anomaly


def seeded(h: Harness, runs: int, input_tokens: int = 100, output_tokens: int = 20) -> None:
    """`runs` ok runs of 100 in + 20 out on haiku-4-5: 100 + 100 = 200 micro-USD each."""
    for _ in range(runs):
        h.server.script(
            "claude-haiku-4-5", ok(input_tokens=input_tokens, output_tokens=output_tokens)
        )
        assert h.run().status == "ok"


def test_a_run_ten_times_the_median_pauses_the_loop(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    h = Harness(tmp_path, fake_server)
    seeded(h, 10)
    fake_server.script("claude-haiku-4-5", ok(input_tokens=1000, output_tokens=200))
    with capture_logs() as logs:
        result = h.run()
    assert result.status == "ok" and result.cost_micro_usd == 2000
    reason = loopstate.paused_reason(h.ledger, "work", datetime.now(UTC))
    assert reason == (
        f"anomaly: run {result.run_id} cost $0.002000 = 10.0× the median $0.000200 "
        "of the loop's last 10 ok runs (limit 5×)"
    )
    assert result.paused_reason == reason
    assert anomaly_run_id(reason) == result.run_id
    [event] = [e for e in logs if e["event"] == "guardrail.anomaly"]
    assert event["run_id"] == result.run_id and event["ratio"] == "10.0"
    with pytest.raises(LoopPaused):
        h.run()
    assert loopstate.resume(h.ledger, "work")
    assert h.run().status == "ok"


def test_resume_rearms_the_breaker_on_a_new_baseline(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    h = Harness(tmp_path, fake_server)
    now = datetime.now(UTC)
    seeded(h, 10)  # 200 micro-USD each
    seeded(h, 1, input_tokens=1000, output_tokens=200)  # 2000: 10×
    tripped = loopstate.get_state(h.ledger, "work").last_run_id
    assert tripped is not None
    reason = loopstate.paused_reason(h.ledger, "work", now)
    assert anomaly_run_id(reason) == tripped
    assert h.run_row(tripped)["route"]["anomaly"] == {
        "ratio": "10.0",
        "median_micro_usd": "200",
        "factor": "5",
        "runs": 10,
        "since_run": None,
    }
    assert loopstate.resume(h.ledger, "work")
    assert "resumed_at" in h.run_row(tripped)["route"]["anomaly"]

    # The loop now costs 2000 a run, legitimately: the breaker waits for 10 fresh runs.
    seeded(h, 1, input_tokens=1000, output_tokens=200)
    assert loopstate.paused_reason(h.ledger, "work", datetime.now(UTC)) is None
    seeded(h, 9, input_tokens=1000, output_tokens=200)
    assert loopstate.paused_reason(h.ledger, "work", datetime.now(UTC)) is None
    # 10 runs at the new level, then one 6× as dear (12000): paused again, on the new median.
    seeded(h, 1, input_tokens=6000, output_tokens=1200)
    run_id = loopstate.get_state(h.ledger, "work").last_run_id
    reason = loopstate.paused_reason(h.ledger, "work", datetime.now(UTC))
    assert reason == (
        f"anomaly: run {run_id} cost $0.012000 = 6.0× the median $0.002000 of the loop's "
        f"last 10 ok runs since the resume after run {tripped} (limit 5×)"
    )
    assert anomaly_run_id(reason) == run_id
    assert h.run_row(run_id or 0)["route"]["anomaly"]["since_run"] == tripped


def test_the_new_baseline_keeps_its_history_window(tmp_path: Path, fake_server: FakeServer) -> None:
    # After a resume the median still covers only the latest `history` runs (3 here), and a
    # second resume starts yet another baseline.
    patch = {"loops": {"work": {"anomaly": {"min_runs": 2, "history": 3}}}}
    h = Harness(tmp_path, fake_server, patch)
    seeded(h, 2)
    seeded(h, 1, input_tokens=1000, output_tokens=200)
    assert loopstate.resume(h.ledger, "work")
    seeded(h, 2, input_tokens=1000, output_tokens=200)  # 2000 each: 1×, and a fresh history
    seeded(h, 3)  # 200 each: cheaper is never an anomaly
    seeded(h, 1, input_tokens=1000, output_tokens=200)  # 10× the last 3 (200 each)
    reason = loopstate.paused_reason(h.ledger, "work", datetime.now(UTC)) or ""
    # The 3 runs compared with all came after the resume: the reason needs no "since".
    assert reason.endswith("= 10.0× the median $0.000200 of the loop's last 3 ok runs (limit 5×)")
    assert loopstate.resume(h.ledger, "work")
    seeded(h, 1, input_tokens=1000, output_tokens=200)  # only 0 runs since: no breaker
    assert loopstate.paused_reason(h.ledger, "work", datetime.now(UTC)) is None


def test_no_breaker_before_min_runs_nor_below_the_factor(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    h = Harness(tmp_path, fake_server)
    seeded(h, 9)
    seeded(h, 1, input_tokens=1000, output_tokens=200)  # 10×, but only 9 runs of history
    assert loopstate.paused_reason(h.ledger, "work", datetime.now(UTC)) is None
    seeded(h, 1, input_tokens=500, output_tokens=100)  # 1000 = 5× the median: not above
    assert loopstate.paused_reason(h.ledger, "work", datetime.now(UTC)) is None


def test_per_loop_anomaly_settings(tmp_path: Path, fake_server: FakeServer) -> None:
    patch = {
        "guardrails": {"anomaly": {"factor": 50}},
        "loops": {"work": {"anomaly": {"min_runs": 2, "factor": 2}}},
    }
    h = Harness(tmp_path, fake_server, patch)
    seeded(h, 2)
    seeded(h, 1, input_tokens=300, output_tokens=20)  # 400 = 2.0×: not above 2
    assert loopstate.paused_reason(h.ledger, "work", datetime.now(UTC)) is None
    seeded(h, 1, input_tokens=400, output_tokens=20)  # 500 = 2.5× the median 200
    assert "= 2.5× the median $0.000200" in (
        loopstate.paused_reason(h.ledger, "work", datetime.now(UTC)) or ""
    )


def test_median() -> None:
    assert median([3, 1, 2]) == 2
    assert str(median([1, 2, 3, 4])) == "2.5"


# ---------------------------------------------------------------------------- projections

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def projection_config(tmp_path: Path, url: str, patch: dict[str, Any]) -> Any:
    data = merge(base_config(url), patch)
    return load_config(write_config(tmp_path / "conf", data, prompt="Say hello."))


def test_check_projection_simulated_starved_and_unbudgeted(tmp_path: Path) -> None:
    config = projection_config(
        tmp_path,
        "http://127.0.0.1:9",
        {
            "guardrails": {"warn_unbudgeted_usd_per_month": 1},
            "loops": {
                "work": {"budget": {"per_day_usd": 0.01}},
                "free": {"every": "30m", "tier": "fast", "max_tokens": 200, "prompt": "work.md"},
                "daily": {
                    "cron": "0 7 * * *",
                    "tier": "fast",
                    "max_tokens": 200,
                    "prompt": "work.md",
                },
            },
        },
    )
    check = check_projection(config, tmp_path / "no-state", now=NOW)
    lines, warnings = check.lines, check.warnings
    # "Say hello." = 10 bytes → 2 + 4 + 3 = 9 input tokens, plus all 200 output tokens on
    # claude-haiku-4-5 ($1 / $5 per MTok): 9 + 1000 = 1009 micro-USD a run; 1439 runs of an
    # every-30m loop in the next 30 days (the first one 30 minutes from now).
    assert lines["work"] == [
        "projected: $1.451951/month (47.97 runs/day × estimate $0.001009 (simulated estimate: "
        "no history))",
        "budget: $0.300000/month (per_day_usd 0.01 × 30)",
    ]
    assert lines["daily"][0] == (
        "projected: $0.030270/month (1 runs/day × estimate $0.001009 (simulated estimate: no "
        "history))"
    )
    assert warnings == [
        "loop work: projected $1.451951/month exceeds its budget $0.300000/month "
        "(per_day_usd 0.01 × 30): the loop would be starved (when_over_budget: skip)",
        "loop free: no budget, projected $1.451951/month is above "
        "guardrails.warn_unbudgeted_usd_per_month $1: add a budget",
    ]


def test_check_projection_uses_the_median_of_the_ledger(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    h = Harness(
        tmp_path,
        fake_server,
        {"loops": {"work": {"every": None, "cron": "0 7 * * *", "budget": {"per_month_usd": 1}}}},
    )
    seeded(h, 2)
    seeded(h, 1, input_tokens=1000, output_tokens=200)
    check = check_projection(h.config, tmp_path / "state", now=NOW)
    assert check.lines["work"] == [
        "projected: $0.006000/month (1 runs/day × median $0.000200 from 3 runs)",
        "budget: $1.000000/month (per_month_usd 1)",
    ]
    assert check.warnings == []


def test_reload_cost_increase_is_a_warning(tmp_path: Path) -> None:
    old = projection_config(tmp_path / "a", "http://127.0.0.1:9", {})
    new = projection_config(
        tmp_path / "b", "http://127.0.0.1:9", {"loops": {"work": {"every": "10m"}}}
    )
    with capture_logs() as logs:
        figures = reload_cost_change(old, new, None, now=NOW)
    assert figures == {
        "before_usd_per_month": "1.451951",
        "after_usd_per_month": "4.357871",  # 4319 runs in 30 days
        "increase_pct": "200.1",
        "threshold_pct": "25",
    }
    [event] = [e for e in logs if e["event"] == "daemon.reload_cost_increase"]
    assert event["log_level"] == "warning" and event["after_usd_per_month"] == "4.357871"
    # A small change stays quiet.
    assert reload_cost_change(old, old, None, now=NOW) is None
