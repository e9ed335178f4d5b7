"""Runs end to end: budgets refuse before any request, downgrade, pause, simulate, prompts."""

from __future__ import annotations

import asyncio
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fakeserver import FakeServer, ok
from test_executor import Harness

from agentd import loopstate
from agentd.errors import LoopPaused, MissingKeyError
from agentd.runend import RunResult
from agentd.runner import render_prompt, run_loop


def test_over_budget_is_skipped_without_any_request(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    # The worst case of one call is ~1,084 micro-USD on haiku and ~127 on gpt-mini; a 100
    # micro-USD cap refuses both (a refused model is skipped and the next one tried).
    h = Harness(tmp_path, fake_server, {"loops": {"work": {"budget": {"per_day_usd": "0.0001"}}}})
    result = h.run()
    assert result.status == "skipped_budget" and result.exit_code == 75
    assert h.calls() == []
    assert fake_server.count() == 0
    assert h.run_row(result.run_id)["status"] == "skipped_budget"
    assert result.route["budget_refusals"]
    assert "loop work per day" in (result.error or "")


def test_downgrade_moves_to_a_cheaper_tier(tmp_path: Path, fake_server: FakeServer) -> None:
    h = Harness(
        tmp_path,
        fake_server,
        {
            "loops": {
                "work": {
                    "tier": "deep",
                    "budget": {"per_day_usd": "0.002"},
                    "when_over_budget": "downgrade",
                }
            }
        },
    )
    fake_server.script("claude-haiku-4-5", ok(input_tokens=100, output_tokens=100))
    result = h.run()
    assert result.status == "ok"
    assert result.tier == "fast" and result.model == "claude-haiku-4-5"
    assert result.route["reason"] == "downgraded to fast"
    assert [r["model"] for r in h.calls()] == ["claude-haiku-4-5"]
    assert fake_server.count("claude-opus-4-1") == 0


def test_downgrade_reduces_max_tokens_down_to_min_tokens(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    # 2,000 output tokens on haiku need ~10,084 micro-USD; 4,000 micro-USD fits 500 tokens.
    # The fast tier is haiku alone: gpt-mini would fit all 2,000 tokens (~1,207 micro-USD).
    h = Harness(
        tmp_path,
        fake_server,
        {
            "tiers": {"fast": ["haiku"]},
            "loops": {
                "work": {
                    "max_tokens": 2000,
                    "min_tokens": 500,
                    "budget": {"per_day_usd": "0.004"},
                    "when_over_budget": "downgrade",
                }
            },
        },
    )
    result = h.run()
    assert result.status == "ok"
    assert result.route["max_tokens"] == 500
    assert fake_server.requests[-1].body["max_tokens"] == 500


def test_pause_when_over_budget(tmp_path: Path, fake_server: FakeServer) -> None:
    h = Harness(
        tmp_path,
        fake_server,
        {"loops": {"work": {"budget": {"per_day_usd": "0.0001"}, "when_over_budget": "pause"}}},
    )
    first = h.run()
    assert first.status == "skipped_budget"
    with pytest.raises(LoopPaused, match="over budget"):
        h.run()
    statuses = [r[0] for r in h.ledger.conn.execute("SELECT status FROM runs ORDER BY id")]
    assert statuses == ["skipped_budget", "skipped_paused"]


def test_global_budget_applies_to_every_loop(tmp_path: Path, fake_server: FakeServer) -> None:
    h = Harness(tmp_path, fake_server, {"budgets": {"per_hour_usd": "0.0001"}})
    assert h.run().status == "skipped_budget"


def test_simulated_run_is_marked_and_priced(tmp_path: Path, fake_server: FakeServer) -> None:
    h = Harness(tmp_path, fake_server, env={})
    h.executor.simulate = True
    result = h.run()
    assert result.status == "ok" and result.simulated
    [call] = h.calls()
    assert call["simulated"] == 1 and call["priced"] == 1
    assert call["cost_micro_usd"] > 0
    assert fake_server.count() == 0


def test_simulated_spend_does_not_use_real_budget(tmp_path: Path, fake_server: FakeServer) -> None:
    h = Harness(tmp_path, fake_server, {"loops": {"work": {"budget": {"per_day_usd": "0.002"}}}})
    h.executor.simulate = True
    for _ in range(3):
        h.run()
    h.executor.simulate = False
    fake_server.script("claude-haiku-4-5", ok(input_tokens=10, output_tokens=10))
    assert h.run().status == "ok"


def test_render_prompt_fills_placeholders_and_keeps_other_braces() -> None:
    now = datetime(2026, 11, 25, 7, 0, tzinfo=UTC)
    text = render_prompt('{loop} at {now}: reply {"ok": true} {unknown}', loop="planning", now=now)
    assert text == 'planning at 2026-11-25T07:00:00+00:00: reply {"ok": true} {unknown}'


def test_a_paused_loop_runs_no_context_command(tmp_path: Path, fake_server: FakeServer) -> None:
    marker = tmp_path / "ran"
    command = [sys.executable, "-c", f"open({str(marker)!r}, 'w')"]
    h = Harness(tmp_path, fake_server, {"loops": {"work": {"context": [{"command": command}]}}})
    loopstate.set_paused(h.ledger, "work", "operator", None)
    with pytest.raises(LoopPaused):
        h.run()
    assert not marker.exists()


def test_a_missing_key_fails_before_context_commands_run(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    marker = tmp_path / "ran"
    command = [sys.executable, "-c", f"open({str(marker)!r}, 'w')"]
    h = Harness(
        tmp_path, fake_server, {"loops": {"work": {"context": [{"command": command}]}}}, env={}
    )
    with pytest.raises(MissingKeyError):
        h.run()
    assert not marker.exists()
    assert h.ledger.conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 0


def test_cancelled_delivery_still_records_the_paid_reply(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    started = tmp_path / "started"
    script = f"import time; open({str(started)!r}, 'w'); time.sleep(30)"
    h = Harness(
        tmp_path,
        fake_server,
        {"loops": {"work": {"deliver": [{"command": [sys.executable, "-c", script]}]}}},
    )
    fake_server.script("claude-haiku-4-5", ok("paid for"))

    async def go() -> None:
        task = asyncio.create_task(run_loop(h.config, h.ledger, h.executor, "work"))
        while not started.exists():
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(go())
    [row] = h.ledger.conn.execute("SELECT id FROM runs").fetchall()
    run = h.run_row(row[0])
    assert (run["status"], run["reply"]) == ("ok", "paid for")
    assert run["route"]["deliveries_interrupted"] == "CancelledError"


def test_an_unexpected_error_fails_the_run_instead_of_leaving_it_running(
    tmp_path: Path, fake_server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = Harness(tmp_path, fake_server)

    async def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("a bug")

    monkeypatch.setattr(h.executor, "call", broken)
    with pytest.raises(ValueError, match="a bug"):
        h.run()
    [(status, error)] = h.ledger.conn.execute("SELECT status, error FROM runs").fetchall()
    assert status == "failed" and "a bug" in error


def test_render_prompt_uses_the_config_timezone(tmp_path: Path, fake_server: FakeServer) -> None:
    h = Harness(tmp_path, fake_server, {"timezone": "Asia/Tokyo"}, prompt="at {now} on {today}")

    async def go() -> RunResult:
        now = datetime(2026, 11, 25, 20, 0, tzinfo=UTC)
        return await run_loop(h.config, h.ledger, h.executor, "work", now=now)

    asyncio.run(go())
    content = fake_server.requests[-1].body["messages"][0]["content"]
    assert content == "at 2026-11-26T05:00:00+09:00 on 2026-11-26"


def test_a_model_whose_context_window_is_too_small_is_skipped(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    # 400 bytes ≈ 100 estimated input tokens + 200 max_tokens > haiku's 250-token window.
    h = Harness(
        tmp_path, fake_server, {"models": {"haiku": {"context_window": 250}}}, prompt="x" * 400
    )
    result = h.run()
    assert result.status == "ok" and result.model == "gpt-4o-mini" and result.fallback
    assert [c["model"] for c in h.calls(result.run_id)] == ["gpt-4o-mini"]
    assert fake_server.count("claude-haiku-4-5") == 0
    [skip] = h.run_row(result.run_id)["route"]["skipped"]
    assert skip == {
        "alias": "haiku",
        "model": "claude-haiku-4-5",
        "reason": "context window of 250 tokens < ~100 estimated input + 200 max_tokens",
    }


def test_a_config_context_window_wins_over_the_price_table(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    h = Harness(tmp_path, fake_server, {"models": {"haiku": {"context_window": 300}}})
    assert h.config.context_window("haiku") == 300
    assert h.config.context_window("gpt-mini") == 128_000  # genai-prices
    h = Harness(tmp_path / "b", fake_server, prompt="x" * 400)
    assert h.run().model == "claude-haiku-4-5"  # 200k tokens: fits


def test_no_model_with_a_large_enough_window_fails_the_run_without_a_call(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    h = Harness(
        tmp_path,
        fake_server,
        {"models": {"haiku": {"context_window": 100}, "gpt-mini": {"context_window": 100}}},
        prompt="x" * 400,
    )
    result = h.run()
    assert result.status == "failed" and fake_server.count() == 0 and h.calls() == []
    assert "no model's context window holds ~100 input + 200 output tokens" in (result.error or "")
    assert {s["alias"] for s in result.route["skipped"]} == {"haiku", "gpt-mini"}


def test_a_smaller_max_tokens_plan_may_fit_the_context_window(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    # At 200 max_tokens no model fits; the downgrade's 100-token plan fits haiku's window.
    h = Harness(
        tmp_path,
        fake_server,
        {
            "models": {"haiku": {"context_window": 220}, "gpt-mini": {"context_window": 220}},
            "loops": {"work": {"when_over_budget": "downgrade", "min_tokens": 100}},
        },
        prompt="x" * 400,
    )
    result = h.run()
    assert result.status == "ok" and result.route["max_tokens"] == 100
    assert fake_server.requests[-1].body["max_tokens"] == 100


# ---------------------------------------------------------------------------- the run's model

HAIKU, SONNET, OPUS = "claude-haiku-4-5", "claude-sonnet-4-5", "claude-opus-4-1"
CASCADE = {"tier": "balanced", "route": "cascade", "handler": "handler.py:run"}


def handler_harness(tmp_path: Path, server: FakeServer, code: str) -> Harness:
    h = Harness(tmp_path, server, {"loops": {"work": CASCADE}})
    (h.config.dir / "handler.py").write_text(textwrap.dedent(code))
    return h


def run_model(h: Harness, result: RunResult) -> tuple[str | None, str | None]:
    """(runs.model in the ledger, the result's model): both must name the reply's author."""
    return h.run_row(result.run_id)["model"], result.model


def test_a_kept_cascade_draft_is_the_runs_model_not_the_reviewer(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    code = """
        async def run(ctx):
            return await ctx.complete("Explain TCP slow start.")
    """
    h = handler_harness(tmp_path, fake_server, code)
    fake_server.script(SONNET, ok("draft answer"))
    fake_server.script(HAIKU, ok("0.95"))  # the review keeps the draft
    result = h.run()
    assert (result.status, result.reply) == ("ok", "draft answer")
    assert [c["model"] for c in h.calls(result.run_id)] == [SONNET, HAIKU]  # the review is last
    assert run_model(h, result) == (SONNET, SONNET)
    assert result.tier == "balanced"


def test_an_escalated_cascade_answer_is_the_runs_model(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    code = """
        async def run(ctx):
            answer = await ctx.complete("Explain TCP slow start.")
            await ctx.complete("Rate this: " + answer, tier="fast", purpose="check")
            return answer
    """
    h = handler_harness(tmp_path, fake_server, code)
    fake_server.script(SONNET, ok("draft answer"))
    fake_server.script(HAIKU, ok("0.2"), ok("fine"))  # review escalates; then the check
    fake_server.script(OPUS, ok("improved answer"))
    result = h.run()
    assert (result.status, result.reply) == ("ok", "improved answer")
    assert [c["model"] for c in h.calls(result.run_id)] == [SONNET, HAIKU, OPUS, HAIKU]
    assert run_model(h, result) == (OPUS, OPUS) and result.tier == "deep"


def test_a_composed_reply_takes_the_model_of_the_last_answer(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    # The handler writes its own reply: no call's text matches it, so the run's model is the
    # one that answered its last complete() (the kept draft), not the review after it.
    code = """
        async def run(ctx):
            notes = await ctx.complete("List the facts.", tier="fast", max_tokens=50)
            answer = await ctx.complete("Explain: " + notes)
            return "Summary: " + answer
    """
    h = handler_harness(tmp_path, fake_server, code)
    fake_server.script(HAIKU, ok("facts"), ok("0.9"))
    fake_server.script(SONNET, ok("draft answer"))
    result = h.run()
    assert (result.status, result.reply) == ("ok", "Summary: draft answer")
    assert [c["model"] for c in h.calls(result.run_id)] == [HAIKU, SONNET, HAIKU]
    assert run_model(h, result) == (SONNET, SONNET)


def test_a_prompt_loops_kept_cascade_draft_is_the_runs_model(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    h = Harness(
        tmp_path, fake_server, {"loops": {"work": {"tier": "balanced", "route": "cascade"}}}
    )
    fake_server.script(SONNET, ok("draft answer"))
    fake_server.script(HAIKU, ok("0.95"))
    result = h.run()
    assert result.reply == "draft answer"
    assert run_model(h, result) == (SONNET, SONNET)
