"""A chain under a budget: a refused model is a skip, the chain goes on; interactive never deep.

Real SDKs against the fake server, a real ledger: the fast tier is [haiku, gpt-mini]. With the
prompt "Say hello." and max_tokens 200 a call's worst case is ~1,084 micro-USD on haiku and
~127 on gpt-mini, so a 500 micro-USD cap refuses haiku and lets gpt-mini through.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from fakeserver import FakeServer, error
from test_executor import Harness

from agentd.ledger import parse_iso
from agentd.runcalls import INTERACTIVE_NO_DEEP, plans_for


def _refused(route: dict[str, Any]) -> list[str]:
    """The aliases a run's route lists as skipped by the budget."""
    return [s["alias"] for s in route["skipped"] if s["reason"].startswith("over budget")]


def test_a_refused_model_is_skipped_and_a_cheaper_one_answers(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    h = Harness(tmp_path, fake_server, {"loops": {"work": {"budget": {"per_day_usd": 0.0005}}}})
    result = h.run()
    assert result.status == "ok" and result.exit_code == 0
    assert result.model == "gpt-4o-mini" and result.fallback is True
    [call] = h.calls(result.run_id)  # the refusal is no attempt: no row
    assert (call["alias"], call["attempt"], call["status"]) == ("gpt-mini", 1, "ok")
    assert call["reserved_micro_usd"] <= 500
    assert fake_server.count() == 1 and fake_server.count("claude-haiku-4-5") == 0
    run = h.run_row(result.run_id)
    assert (run["status"], run["model"], run["fallback"]) == ("ok", "gpt-4o-mini", 1)
    route = result.route
    assert _refused(route) == ["haiku"]
    [refusal] = route["budget_refusals"]
    assert refusal.startswith("configured: haiku: over budget: loop work per day: limit 0.000500")
    assert (route["tier"], route["answered_tier"], route["model"]) == ("fast", "fast", "gpt-mini")
    assert route["max_tokens"] == 200


def test_skip_when_no_model_of_the_chain_fits(tmp_path: Path, fake_server: FakeServer) -> None:
    h = Harness(tmp_path, fake_server, {"loops": {"work": {"budget": {"per_day_usd": 0.0001}}}})
    result = h.run()
    assert result.status == "skipped_budget" and result.exit_code == 75
    assert h.calls() == [] and fake_server.count() == 0
    assert h.run_row(result.run_id)["status"] == "skipped_budget"
    assert _refused(result.route) == ["haiku", "gpt-mini"]
    haiku, mini = result.route["budget_refusals"]
    assert haiku.startswith("configured: haiku: over budget: loop work per day")
    assert mini.startswith("configured: gpt-mini: over budget: loop work per day")
    error_text = result.error or ""
    assert "haiku: over budget" in error_text and "gpt-mini: over budget" in error_text


def test_pause_waits_for_the_window_of_the_model_nearest_to_fitting(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    # haiku is refused by the loop's day window, gpt-mini only by the global hour window: the
    # loop can run again when the hour resets, so it pauses until then, not until tomorrow.
    h = Harness(
        tmp_path,
        fake_server,
        {
            "budgets": {"per_hour_usd": 0.0001},
            "loops": {"work": {"budget": {"per_day_usd": 0.0005}, "when_over_budget": "pause"}},
        },
    )
    result = h.run()
    assert result.status == "skipped_budget" and fake_server.count() == 0
    [(paused, until)] = h.ledger.conn.execute("SELECT paused, paused_until FROM loop_state")
    assert paused == 1
    started = parse_iso(h.run_row(result.run_id)["started_at"])
    resumes = parse_iso(until)
    assert (resumes.minute, resumes.second) == (0, 0)
    assert timedelta(0) < resumes - started <= timedelta(hours=1, seconds=5)


def test_downgrade_keeps_full_max_tokens_when_a_cheaper_model_of_the_chain_fits(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    # 2,000 output tokens: ~10,084 micro-USD on haiku, ~1,207 on gpt-mini. A 3,000 cap fits
    # gpt-mini at full size: no reason to cut max_tokens on haiku.
    h = Harness(
        tmp_path,
        fake_server,
        {
            "loops": {
                "work": {
                    "max_tokens": 2000,
                    "min_tokens": 500,
                    "budget": {"per_day_usd": 0.003},
                    "when_over_budget": "downgrade",
                }
            }
        },
    )
    result = h.run()
    assert result.status == "ok" and result.model == "gpt-4o-mini"
    assert (result.route["max_tokens"], result.route["reason"]) == (2000, "configured")
    [call] = h.calls(result.run_id)
    assert call["alias"] == "gpt-mini"
    assert _refused(result.route) == ["haiku"]


def test_downgrade_plans_are_ordered_by_each_chains_cheapest_model(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    # balanced's primary (gpt) is dearer than fast's (haiku), but balanced also holds gpt-mini,
    # the cheapest model of all: a chain fits when its cheapest model does, so balanced is the
    # cheaper plan and comes last (dearest cheaper plan first).
    h = Harness(
        tmp_path,
        fake_server,
        {
            "tiers": {"fast": ["haiku"], "balanced": ["gpt", "gpt-mini"], "deep": ["opus"]},
            "loops": {"work": {"tier": "deep", "when_over_budget": "downgrade"}},
        },
    )
    plans = plans_for(h.config, "work", "Say hello.")
    assert [(p.tier, p.reason) for p in plans] == [
        ("deep", "configured"),
        ("fast", "downgraded to fast"),
        ("balanced", "downgraded to balanced"),
    ]


def _interactive(patch: dict[str, Any] | None = None) -> dict[str, Any]:
    """A rules loop that asks for deep (kind: reasoning) but is interactive: capped at balanced."""
    loop: dict[str, Any] = {
        "route": "rules",
        "kind": "reasoning",
        "latency": "interactive",
        "tier": "balanced",
        "fallback_tiers": ["deep"],
    }
    loop.update(patch or {})
    return {"loops": {"work": loop}}


def test_interactive_never_falls_back_to_deep(tmp_path: Path, fake_server: FakeServer) -> None:
    h = Harness(tmp_path, fake_server, _interactive())
    fake_server.script("claude-sonnet-4-5", error(404))
    fake_server.script("gpt-4o", error(404))
    result = h.run()
    # Before: opus (fallback tier deep) answered. Now the chain has no deep model left.
    assert result.status == "failed"
    assert fake_server.count("claude-opus-4-1") == 0
    assert [c["model"] for c in h.calls()] == ["claude-sonnet-4-5", "gpt-4o"]
    route = result.route
    assert {"alias": "opus", "model": "claude-opus-4-1", "reason": INTERACTIVE_NO_DEEP} in route[
        "skipped"
    ]
    assert "latency: interactive never uses deep → balanced" in route["reasons"]
    assert f"{INTERACTIVE_NO_DEEP}: opus left out of the chain" in route["reasons"]


def test_interactive_falls_back_to_other_tiers_and_records_the_tier_that_answered(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    h = Harness(tmp_path, fake_server, _interactive({"fallback_tiers": ["deep", "fast"]}))
    fake_server.script("claude-sonnet-4-5", error(404))
    fake_server.script("gpt-4o", error(404))
    result = h.run()
    assert result.status == "ok" and result.model == "claude-haiku-4-5" and result.fallback
    assert [c["model"] for c in h.calls()] == [
        "claude-sonnet-4-5",
        "gpt-4o",
        "claude-haiku-4-5",
    ]
    assert fake_server.count("claude-opus-4-1") == 0
    route = result.route
    # `tier` stays what was asked for; `answered_tier` is where the reply came from.
    assert (route["requested_tier"], route["tier"], route["answered_tier"]) == (
        "balanced",
        "balanced",
        "fast",
    )
    assert h.calls()[-1]["tier"] == "fast"


def test_interactive_downgrade_plans_never_use_deep(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    # A deep tier cheaper than balanced (gpt-mini under another alias) would be a downgrade
    # plan for a background loop; an interactive loop never gets it.
    patch = {
        "models": {"mini-deep": {"provider": "openai", "model": "gpt-4o-mini"}},
        "tiers": {"fast": ["haiku"], "deep": ["mini-deep"]},
    }
    interactive = Harness(
        tmp_path / "i",
        fake_server,
        {**patch, **_interactive({"when_over_budget": "downgrade", "fallback_tiers": []})},
    )
    plans = plans_for(interactive.config, "work", "x", tier="balanced")
    assert [p.tier for p in plans] == ["balanced", "fast"]
    background = Harness(
        tmp_path / "b",
        fake_server,
        {
            **patch,
            **_interactive(
                {"when_over_budget": "downgrade", "fallback_tiers": [], "latency": "background"}
            ),
        },
    )
    plans = plans_for(background.config, "work", "x", tier="balanced")
    assert [p.tier for p in plans] == ["balanced", "fast", "deep"]
