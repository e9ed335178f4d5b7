"""Route strategies over the real SDKs and a real ledger: rules, classify, cascade, explain."""

from __future__ import annotations

import asyncio
import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
import structlog
from builders import TEST_ENV
from fakeserver import FakeServer, error, ok
from test_executor import Harness

from agentd import routeprompts
from agentd.config import ChainEntry, load_config
from agentd.errors import MissingKeyError
from agentd.executor import RunTrace
from agentd.loopconfig import LABELS
from agentd.providers.base import Message, Request
from agentd.providers.simulated import SimulatedProvider
from agentd.routeexplain import RouteUsageError, explain_route, format_explanation
from agentd.routeprompts import normalise_reply, parse_label, parse_score
from agentd.routing import estimate_tokens, rules_tier
from agentd.runner import run_once

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "config" / "agent-model-config.yaml"
HAIKU, SONNET, OPUS = "claude-haiku-4-5", "claude-sonnet-4-5", "claude-opus-4-1"


def rows(h: Harness, run_id: int) -> list[tuple[Any, ...]]:
    """(purpose, tier, model, status) of a run's calls, in order."""
    return [(c["purpose"], c["tier"], c["model"], c["status"]) for c in h.calls(run_id)]


def routed(tmp_path: Path, server: FakeServer, prompt: str = "Say hello.", **loop: Any) -> Harness:
    """A Harness whose loop `work` has the given route settings."""
    return Harness(tmp_path, server, {"loops": {"work": loop}}, prompt=prompt)


# ---------------------------------------------------------------------------- pure decisions


@pytest.mark.parametrize(
    ("kind", "stakes", "latency", "tokens", "tier"),
    [
        ("extraction", "normal", "background", 10, "fast"),
        ("classification", "normal", "background", 99, "fast"),
        ("classification", "normal", "background", 100, "balanced"),  # 100 is not short
        ("extraction", "normal", "background", 5000, "balanced"),
        ("extraction", "low", "background", 5000, "fast"),
        ("extraction", "normal", "interactive", 10, "fast"),
        ("content", "normal", "background", 10, "balanced"),
        ("content", "low", "background", 10, "balanced"),
        ("code", "normal", "background", 5000, "balanced"),
        ("content", "high", "background", 10, "deep"),
        ("extraction", "high", "background", 10, "deep"),
        ("reasoning", "normal", "background", 10, "deep"),
        ("reasoning", "low", "background", 10, "deep"),
        ("reasoning", "normal", "interactive", 10, "balanced"),
        ("code", "high", "interactive", 10, "balanced"),
    ],
)
def test_rules_tree(kind: str, stakes: str, latency: str, tokens: int, tier: str) -> None:
    chosen, reasons = rules_tier(kind, stakes, latency, tokens, 100)
    assert chosen == tier
    assert reasons[0].startswith(f"estimated input ~{tokens} tokens")
    if latency == "interactive" and (stakes == "high" or kind == "reasoning"):
        assert reasons[-1] == "latency: interactive never uses deep → balanced"


def test_token_estimate_is_utf8_bytes_over_four_rounded_up() -> None:
    assert [estimate_tokens(t) for t in ("", None, "abcd", "abcde", "é", "€")] == [
        0,
        0,
        1,
        2,
        1,
        1,
    ]
    assert estimate_tokens("x" * 400) == 100


@pytest.mark.parametrize(
    ("reply", "label"),
    [
        ("classification", "classification"),
        ('  "Code_Task".', "code_task"),
        ("`simple_extraction`", "simple_extraction"),
        ("'COMPLEX_REASONING'\n", "complex_reasoning"),
        ("content_generation.", "content_generation"),
        ("", None),
        ("   ", None),
        ("classification, code_task", None),
        ("classification code_task", None),
        ("I think this is a classification task.", None),
        ("code task", None),
    ],
)
def test_label_parsing(reply: str, label: str | None) -> None:
    assert parse_label(reply) == label


def test_normalise_reply() -> None:
    assert normalise_reply(' "`Code_Task`". ') == "code_task"


@pytest.mark.parametrize(
    ("reply", "score"),
    [
        ("0.95", 0.95),
        ("0.2", 0.2),
        ("Score: 0.7/1", 0.7),
        ("8/10", 0.8),
        ("85%", 0.85),
        ("Score: 0.9 (confident)", 0.9),
        (".5", 0.5),
        ("7", 1.0),
        ("-0.3", 0.0),
        ("1/0", None),
        ("excellent", None),
        ("", None),
        # A hyphen inside a word is no minus sign: "-4" of a model name is the number 4.
        ("Fake reply from claude-haiku-4-5.", 1.0),
        ("gpt-0.3", 0.3),
        ("v1.2-3", 1.0),
        ("range 0.2-0.4", 0.2),
        ("Score: -0.5", 0.0),
        ("score:-0.2", 0.0),
        ("(-0.4)", 0.0),
        ("+0.6", 0.6),
    ],
)
def test_score_parsing(reply: str, score: float | None) -> None:
    got = parse_score(reply)
    assert got == (pytest.approx(score) if score is not None else None)


def test_the_simulated_model_answers_the_router_prompts() -> None:
    async def ask(text: str) -> str:
        request = Request(model="m", messages=(Message("user", text),), max_tokens=64)
        return (await SimulatedProvider().complete(request)).text

    classifier = routeprompts.fill(routeprompts.CLASSIFIER, task="t", labels=" | ".join(LABELS))
    assert parse_label(asyncio.run(ask(classifier))) in LABELS
    reviewer = routeprompts.fill(routeprompts.REVIEWER, task="say HEARTBEAT_OK", draft="d")
    score = parse_score(asyncio.run(ask(reviewer)))
    assert score is not None and 0.5 <= score <= 1.0
    assert asyncio.run(ask("Reply HEARTBEAT_OK if fine.")) == "HEARTBEAT_OK"


# ---------------------------------------------------------------------------- rules


def test_rules_end_to_end(tmp_path: Path, fake_server: FakeServer) -> None:
    h = routed(tmp_path, fake_server, route="rules", kind="code")
    fake_server.script(SONNET, ok("def f(): ..."))
    result = h.run()
    assert (result.status, result.reply, result.tier) == ("ok", "def f(): ...", "balanced")
    assert rows(h, result.run_id) == [("work", "balanced", SONNET, "ok")]
    route = h.run_row(result.run_id)["route"]
    assert route["strategy"] == "rules" and route["tier"] == "balanced"
    assert route["model"] == "sonnet" and route["reason"] == "chosen by rules"
    assert (route["kind"], route["stakes"], route["latency"]) == ("code", "normal", "background")
    assert route["estimated_input_tokens"] == 3  # "Say hello." is 10 bytes
    assert route["reasons"] == [
        "estimated input ~3 tokens: short (short is < 100)",
        "kind: code → balanced",
    ]
    assert route["skipped"] == []


def test_rules_count_the_system_prompt_too(tmp_path: Path, fake_server: FakeServer) -> None:
    # "Say hello." is ~3 tokens, the system prompt 100: together not short (< 100).
    h = routed(tmp_path, fake_server, route="rules", kind="extraction", system="x" * 400)
    result = h.run()
    assert result.route["estimated_input_tokens"] == 103 and result.tier == "balanced"
    assert result.route["reasons"][0] == "estimated input ~103 tokens: not short (short is < 100)"


def test_rules_with_budget_downgrade(tmp_path: Path, fake_server: FakeServer) -> None:
    h = routed(
        tmp_path,
        fake_server,
        route="rules",
        kind="reasoning",
        budget={"per_day_usd": 0.002},
        when_over_budget="downgrade",
    )
    result = h.run()
    assert result.status == "ok" and result.tier == "fast"
    route = result.route
    assert route["requested_tier"] == "deep" and route["reason"] == "downgraded to fast"
    assert route["reasons"][-1] == "budget: downgraded to fast"
    assert route["budget_refusals"]
    assert fake_server.count(OPUS) == 0


# ---------------------------------------------------------------------------- classify


@pytest.mark.parametrize(
    ("reply", "label", "tier", "model"),
    [
        ("classification", "classification", "fast", HAIKU),
        ('  "Code_Task".', "code_task", "balanced", SONNET),
        ("", None, "deep", OPUS),
        ("classification, code_task", None, "deep", OPUS),
        ("This task is about classification.", None, "deep", OPUS),
    ],
)
def test_classify(
    tmp_path: Path, fake_server: FakeServer, reply: str, label: str | None, tier: str, model: str
) -> None:
    h = routed(tmp_path, fake_server, "Is this spam? 'WIN A PRIZE'", tier="deep", route="classify")
    fake_server.script(HAIKU, ok(reply))
    fake_server.script(model, ok("the work"))
    with structlog.testing.capture_logs() as logs:
        result = h.run()
    assert (result.status, result.reply, result.tier) == ("ok", "the work", tier)
    assert rows(h, result.run_id) == [
        ("classify", "fast", HAIKU, "ok"),
        ("work", tier, model, "ok"),
    ]
    classifier_prompt = fake_server.requests[0].body["messages"][0]["content"]
    assert "Is this spam? 'WIN A PRIZE'" in classifier_prompt
    assert all(name in classifier_prompt for name in LABELS)
    assert fake_server.requests[0].body["max_tokens"] == 64
    assert fake_server.requests[1].body["messages"][0]["content"] == "Is this spam? 'WIN A PRIZE'"
    route = h.run_row(result.run_id)["route"]
    assert route["strategy"] == "classify" and route["label"] == label
    assert route["classifier_reply"] == reply
    assert route["tier"] == tier and route["requested_tier"] == tier
    assert [s["purpose"] for s in route["steps"]] == ["classify", "work"]
    unusable = [e for e in logs if e["event"] == "route.classify_unusable"]
    if label is None:
        assert route["classify"] == "unusable"
        assert route["reason"] == "no usable label"
        assert "is not exactly one label; using the tier deep" in route["reasons"][-1]
        assert [(e["reply"], e["fallback"]) for e in unusable] == [(reply, "tier deep")]
    else:
        assert route["classify"] == "ok"
        assert route["reasons"] == [f"classifier label {label} → tier {tier}"]
        assert unusable == []


def test_classifier_failing_on_every_model_keeps_the_loops_tier(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    h = routed(tmp_path, fake_server, tier="balanced", route="classify")
    fake_server.script(HAIKU, error(400))
    fake_server.script("gpt-4o-mini", error(400))
    result = h.run()
    assert result.status == "ok" and result.model == SONNET
    assert rows(h, result.run_id) == [
        ("classify", "fast", HAIKU, "error"),
        ("classify", "fast", "gpt-4o-mini", "error"),
        ("work", "balanced", SONNET, "ok"),
    ]
    assert result.route["classify"] == "failed" and result.route["label"] is None


def test_a_long_classifier_reply_is_logged_truncated(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    h = routed(tmp_path, fake_server, route="classify")
    fake_server.script(HAIKU, ok("x" * 1000))
    with structlog.testing.capture_logs() as logs:
        result = h.run()
    [event] = [e for e in logs if e["event"] == "route.classify_unusable"]
    assert event["reply"] == "x" * 200 and result.route["classifier_reply"] == "x" * 200


# ---------------------------------------------------------------------------- cascade


@pytest.mark.parametrize(
    ("review", "score", "escalated"),
    [
        ("0.95", 0.95, False),
        ("0.2", 0.2, True),
        ("Score: 0.7/1", 0.7, True),
        ("excellent", None, True),
        ("", None, True),
    ],
)
def test_cascade(
    tmp_path: Path, fake_server: FakeServer, review: str, score: float | None, escalated: bool
) -> None:
    h = routed(tmp_path, fake_server, "Explain TCP slow start.", tier="balanced", route="cascade")
    fake_server.script(SONNET, ok("draft answer"))
    fake_server.script(HAIKU, ok(review))
    fake_server.script(OPUS, ok("improved answer"))
    with structlog.testing.capture_logs() as logs:
        result = h.run()
    assert result.status == "ok"
    expected = [("draft", "balanced", SONNET, "ok"), ("review", "fast", HAIKU, "ok")]
    if escalated:
        expected.append(("escalate", "deep", OPUS, "ok"))
    assert rows(h, result.run_id) == expected
    route = h.run_row(result.run_id)["route"]
    assert route["strategy"] == "cascade" and route["threshold"] == 0.8
    assert route["score"] == (pytest.approx(score) if score is not None else None)
    assert route["escalated"] is escalated and route["review_reply"] == review
    assert [s["purpose"] for s in route["steps"]] == [r[0] for r in expected]
    reviewer = fake_server.requests[1].body["messages"][0]["content"]
    assert "Explain TCP slow start." in reviewer and "draft answer" in reviewer
    if escalated:
        assert (result.reply, result.tier, result.model) == ("improved answer", "deep", OPUS)
        assert (route["tier"], route["model"], route["escalation"]) == ("deep", "opus", "ok")
        escalation = fake_server.requests[2].body["messages"][0]["content"]
        assert "Explain TCP slow start." in escalation and "draft answer" in escalation
        assert route["reasons"][-1] == "escalated to tier deep: its answer is the reply"
    else:
        assert (result.reply, result.tier, route["tier"]) == (
            "draft answer",
            "balanced",
            "balanced",
        )
        assert "≥ threshold 0.8: the draft is the reply" in route["reasons"][-1]
    if score is None:
        assert route["review"] == "unparseable"
        assert [e["reply"] for e in logs if e["event"] == "route.review_unparseable"] == [review]
    else:
        assert route["review"] == "ok"


def test_cascade_escalation_over_budget_returns_the_draft(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    # Draft (~3,200 µ$ reserved) and review (~1,000 µ$) fit 0.01 USD; opus (~27,000 µ$) does not.
    h = routed(
        tmp_path, fake_server, tier="balanced", route="cascade", budget={"per_day_usd": 0.01}
    )
    fake_server.script(SONNET, ok("draft answer"))
    fake_server.script(HAIKU, ok("0.1"))
    result = h.run()
    assert (result.status, result.reply, result.tier) == ("ok", "draft answer", "balanced")
    assert rows(h, result.run_id) == [
        ("draft", "balanced", SONNET, "ok"),
        ("review", "fast", HAIKU, "ok"),
    ]
    assert fake_server.count(OPUS) == 0
    route = h.run_row(result.run_id)["route"]
    assert route["escalated"] is False and route["escalation"] == "skipped_budget"
    assert route["steps"][-1]["status"] == "skipped_budget"
    assert "the escalation did not fit the budget" in route["reasons"][-1]
    assert "the draft is the reply" in route["reasons"][-1]
    assert route["budget_refusals"] and (route["tier"], route["model"]) == ("balanced", "sonnet")


def test_cascade_escalation_too_large_for_every_model_says_so(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    h = Harness(
        tmp_path,
        fake_server,
        {
            "models": {"opus": {"context_window": 150}},
            "loops": {"work": {"tier": "balanced", "route": "cascade"}},
        },
    )
    fake_server.script(SONNET, ok("draft answer"))
    fake_server.script(HAIKU, ok("0.1"))
    result = h.run()
    assert (result.status, result.reply) == ("ok", "draft answer")
    assert [r[0] for r in rows(h, result.run_id)] == ["draft", "review"]
    route = h.run_row(result.run_id)["route"]
    assert route["escalation"] == "failed" and fake_server.count(OPUS) == 0
    assert route["reasons"][-1].startswith("the escalation fits no model's context window (")
    assert "no model's context window holds" in route["reasons"][-1]
    assert route["reasons"][-1].endswith("; the draft is the reply")
    # `agentd route` says the same instead of calling the priced escalation "unpriced".
    expl = asyncio.run(explain_route(h.config, tmp_path / "s", "Hi.", loop="work", simulate=False))
    escalate = expl.calls[2]
    assert escalate.chain == () and escalate.budget == "no_model_fits"
    assert escalate.worst_case_micro_usd is None and expl.worst_case_micro_usd is None
    text = format_explanation(expl, as_json=False)
    assert "worst case none: no model's context window holds it" in text
    assert "worst case: none: no model's context window holds the escalate call" in text
    assert "unpriced" not in text


def test_cascade_review_failing_is_a_missing_score_and_escalates(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    h = routed(tmp_path, fake_server, tier="balanced", route="cascade")
    fake_server.script(SONNET, ok("draft answer"))
    fake_server.script(HAIKU, error(400))
    fake_server.script("gpt-4o-mini", error(400))
    fake_server.script(OPUS, ok("better answer"))
    result = h.run()
    assert (result.status, result.reply, result.model) == ("ok", "better answer", OPUS)
    assert [r[0] for r in rows(h, result.run_id)] == ["draft", "review", "review", "escalate"]
    assert result.route["review"] == "failed" and result.route["score"] is None
    assert result.route["escalated"] is True
    assert any("no score, a failed review: escalating" in r for r in result.route["reasons"])
    # The escalation prompt says why it was asked for.
    (escalation,) = [r for r in fake_server.requests if r.model == OPUS]
    assert "missing" in json.dumps(escalation.body["messages"])


def test_cascade_draft_over_budget_skips_the_run(tmp_path: Path, fake_server: FakeServer) -> None:
    h = routed(
        tmp_path, fake_server, tier="balanced", route="cascade", budget={"per_day_usd": 0.001}
    )
    result = h.run()
    assert result.status == "skipped_budget" and fake_server.count() == 0
    assert result.route["steps"][0]["status"] == "skipped_budget"


# ---------------------------------------------------------------------------- handlers


def test_a_handlers_default_calls_follow_the_route(tmp_path: Path, fake_server: FakeServer) -> None:
    code = """
        async def run(ctx):
            listing = await ctx.complete("list questions", tier="fast", max_tokens=50)
            return await ctx.complete("answer: " + listing)
    """
    h = routed(tmp_path, fake_server, tier="balanced", route="cascade", handler="handler.py:run")
    (h.config.dir / "handler.py").write_text(textwrap.dedent(code))
    fake_server.script(HAIKU, ok("Q1"), ok("0.3"))
    fake_server.script(SONNET, ok("draft"))
    fake_server.script(OPUS, ok("better"))
    result = h.run()
    assert (result.status, result.reply, result.model) == ("ok", "better", OPUS)
    assert rows(h, result.run_id) == [
        ("work", "fast", HAIKU, "ok"),
        ("draft", "balanced", SONNET, "ok"),
        ("review", "fast", HAIKU, "ok"),
        ("escalate", "deep", OPUS, "ok"),
    ]
    route = h.run_row(result.run_id)["route"]
    assert route["strategy"] == "handler" and route["route"] == "cascade"
    static, cascade = route["calls"]
    assert static["tier"] == "fast" and "strategy" not in static
    assert cascade["strategy"] == "cascade" and cascade["escalated"] is True
    assert cascade["status"] == "ok" and cascade["score"] == 0.3
    assert (route["tier"], route["model"]) == ("deep", "opus")


# ---------------------------------------------------------------------------- keys, shipped


def test_a_missing_key_of_a_route_tier_fails_before_the_run(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    h = Harness(
        tmp_path,
        fake_server,
        {
            "tiers": {"mini": ["gpt-mini"]},
            "loops": {"work": {"route": "cascade", "routing": {"review_tier": "mini"}}},
        },
        env={"TEST_ANTHROPIC_KEY": "k"},
    )
    with pytest.raises(MissingKeyError, match="TEST_OPENAI_KEY"):
        h.run()
    assert h.ledger.conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 0


@pytest.mark.parametrize("loop", ["research", "planning", "triage"])
def test_shipped_routed_loops_run_simulated(tmp_path: Path, loop: str) -> None:
    config = load_config(SHIPPED)
    result = asyncio.run(run_once(config, tmp_path, loop, simulate=True))
    assert result.status == "ok" and result.simulated and result.reply
    purposes = [a.purpose for a in result.attempts]
    if loop == "research":
        # The question list on the fast tier, then each of three questions along the cascade.
        calls = result.route["calls"]
        assert len(calls) == 4 and purposes[0] == "work"
        expected = ["work"]
        for step in calls[1:]:
            assert step["strategy"] == "cascade" and step["score"] is not None
            expected += ["draft", "review"] + (["escalate"] if step["escalated"] else [])
        assert purposes == expected
    elif loop == "planning":
        assert result.route["strategy"] == "rules" and result.tier == "deep"
        assert purposes == ["work"]
    else:
        route = result.route
        assert route["strategy"] == "classify" and route["label"] in LABELS
        assert result.tier == config.loops["triage"].routing.labels.tier(route["label"])
        assert purposes == ["classify", "work"]


# ---------------------------------------------------------------------------- explain


def test_explain_static_and_default_make_no_call(tmp_path: Path, fake_server: FakeServer) -> None:
    h = Harness(tmp_path, fake_server)

    async def go(loop: str | None) -> Any:
        return await explain_route(h.config, tmp_path / "s", "Hi.", loop=loop, simulate=False)

    static = asyncio.run(go("work"))
    assert (static.strategy, static.tier, static.loop) == ("static", "fast", "work")
    assert static.chain == ("haiku (anthropic/claude-haiku-4-5)", "gpt-mini (openai/gpt-4o-mini)")
    # The loop has no context source: TEXT is appended to its template as context would be.
    prompt = "Say hello.\n\n# Context\n\n## TEXT\n\nHi.\n"
    assert (
        static.input
        == "TEXT in the loop's template work.md, as its context (the loop has no context sources)"
    )
    assert static.estimated_input_tokens == estimate_tokens(prompt)
    [call] = static.calls
    default = asyncio.run(go(None))
    assert (default.strategy, default.tier, default.loop) == ("static", "balanced", None)
    assert default.estimated_input_tokens == 1 and default.input == "TEXT is the whole prompt"
    assert default.calls[0].max_tokens == 1024 and "no --loop" in default.reasons[0]
    with pytest.raises(RouteUsageError, match="no loop named 'nope'"):
        asyncio.run(go("nope"))
    assert fake_server.count() == 0
    assert not (tmp_path / "s").exists()  # nothing written for a static explanation
    # What the explanation calls the worst case is what a real call of the loop reserves.
    reserved = _reserved_by_executor(h, h.config.chain("work")[0], None, prompt, 200)
    assert call.worst_case_micro_usd == static.worst_case_micro_usd == reserved
    text = format_explanation(static, as_json=False)
    assert "loop work: route static, tier fast" in text
    assert f"worst case: ${reserved / 1_000_000:.6f}" in text
    data = json.loads(format_explanation(static, as_json=True))
    assert data["worst_case_usd"] == f"{reserved / 1_000_000:.6f}"
    assert data["calls"][0]["worst_case_usd"] == data["worst_case_usd"]


def test_explain_rules_and_cascade(tmp_path: Path, fake_server: FakeServer) -> None:
    h = Harness(
        tmp_path,
        fake_server,
        {
            "loops": {
                "work": {"route": "rules", "kind": "reasoning", "latency": "interactive"},
                "review": {
                    "every": "1h",
                    "tier": "balanced",
                    "max_tokens": 300,
                    "prompt": "work.md",
                    "route": "cascade",
                    "routing": {"threshold": 0.6},
                },
            }
        },
    )
    rules = asyncio.run(explain_route(h.config, tmp_path, "Plan.", loop="work", simulate=False))
    assert (rules.strategy, rules.tier) == ("rules", "balanced")
    assert "latency: interactive never uses deep → balanced" in rules.reasons
    assert rules.reasons[-1] == "budget: no window applies to loop work"
    assert rules.extra == {"kind": "reasoning", "stakes": "normal", "latency": "interactive"}
    cascade = asyncio.run(explain_route(h.config, tmp_path, "Do.", loop="review", simulate=False))
    assert (cascade.strategy, cascade.tier) == ("cascade", "balanced")
    assert [(c.purpose, c.tier) for c in cascade.calls] == [
        ("draft", "balanced"),
        ("review", "fast"),
        ("escalate", "deep"),
    ]
    assert cascade.calls[2].when == "only if the review scores below 0.6 or gives no score"
    costs = [c.worst_case_micro_usd or 0 for c in cascade.calls]
    assert cascade.worst_case_micro_usd == sum(costs) and all(costs)
    data = json.loads(format_explanation(cascade, as_json=True))
    assert data["threshold"] == 0.6 and isinstance(data["worst_case_usd"], str)
    assert fake_server.count() == 0


def test_explain_classify_calls_the_classifier_for_real(
    tmp_path: Path, fake_server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in TEST_ENV.items():
        monkeypatch.setenv(name, value)
    h = routed(tmp_path, fake_server, tier="balanced", route="classify", budget={"per_day_usd": 1})
    fake_server.script(HAIKU, ok("code_task"))
    state = h.ledger.path.parent
    expl = asyncio.run(explain_route(h.config, state, "Fix this bug.", loop="work", simulate=False))
    assert (expl.strategy, expl.label, expl.tier) == ("classify", "code_task", "balanced")
    assert expl.model_called and not expl.simulated and expl.spent_micro_usd > 0
    assert [c.purpose for c in expl.calls] == ["classify", "work"]
    assert expl.calls[0].cost_micro_usd == expl.spent_micro_usd
    assert fake_server.count(HAIKU) == 1 and fake_server.count(SONNET) == 0
    [call] = h.calls()
    assert (call["purpose"], call["run_id"], call["status"]) == ("classify", expl.run_id, "ok")
    run = h.run_row(expl.run_id or 0)
    assert (run["status"], run["reply"], run["trigger"]) == ("ok", None, "manual")
    assert run["route"]["explain"] is True and run["route"]["label"] == "code_task"
    text = format_explanation(expl, as_json=False)
    assert "classifier: code_task ('code_task')" in text and f"(run {expl.run_id})" in text


def test_explain_classify_simulated(tmp_path: Path, fake_server: FakeServer) -> None:
    h = Harness(tmp_path / "b", fake_server, {"loops": {"work": {"route": "classify"}}}, env={})
    expl = asyncio.run(
        explain_route(h.config, tmp_path / "s", "Fix this bug.", loop="work", simulate=True)
    )
    assert expl.simulated and expl.label in LABELS and fake_server.count() == 0
    assert "the simulated model" in expl.reasons[0]


def _reserved_by_executor(
    h: Harness, entry: ChainEntry, system: str | None, prompt: str, max_tokens: int
) -> int:
    """Make one real call on `entry` and read back what its reservation wrote to the ledger."""
    run_id = h.ledger.start_run(loop="work", trigger="manual", simulated=False)

    async def go() -> None:
        await h.executor.call(
            RunTrace(run_id=run_id, loop="work", simulated=False),
            purpose="work",
            chain=[entry],
            system=system,
            messages=(Message("user", prompt),),
            max_tokens=max_tokens,
            windows=(),
        )

    asyncio.run(go())
    [reserved] = h.ledger.conn.execute(
        "SELECT reserved_micro_usd FROM calls WHERE run_id = ?", (run_id,)
    ).fetchone()
    return int(reserved)


def test_worst_case_matches_the_executors_reservation(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    h = Harness(tmp_path, fake_server)
    for entry in h.config.chain("work"):
        for system in (None, "Be brief."):
            reserved = _reserved_by_executor(h, entry, system, "héllo " * 50, 300)
            worst = h.config.worst_case_micro_usd(entry.alias, system, ["héllo " * 50], 300)
            assert worst == reserved > 0
