"""`agentd route` and `agentd once` through the real CLI, for every route strategy.

Each test writes a config pointed at the fake server, runs the CLI in-process (click's
CliRunner) against a real state directory, and reads the ledger with sqlite3: what `route`
explains (tier, budget, input size, worst case) must be what `once` then does.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from builders import TEST_ENV, base_config, merge
from click.testing import CliRunner, Result
from fakeserver import FakeServer, ok

from agentd.cli import main
from agentd.loopconfig import LABELS

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "config" / "agent-model-config.yaml"
HAIKU, SONNET, OPUS = "claude-haiku-4-5", "claude-sonnet-4-5", "claude-opus-4-1"
ENV: dict[str, str | None] = {
    **TEST_ENV,
    "ANTHROPIC_API_KEY": None,
    "OPENAI_API_KEY": None,
    "AGENTD_CONFIG": None,
    "AGENTD_STATE_DIR": None,
    "STATE_DIRECTORY": None,
}
TEMPLATE = "Extract the due date from the message below. Reply with the date only.\n\n{task}\n"
SYSTEM = "You are a terse assistant. " * 4


class Setup:
    """A config with one loop `L` on the fake server, its files, and a state directory."""

    def __init__(self, tmp_path: Path, server: FakeServer, loop: dict[str, Any]) -> None:
        self.dir = tmp_path / "conf"
        self.dir.mkdir(parents=True)
        (self.dir / "l.md").write_text(TEMPLATE)
        settings = {
            "every": "1h",
            "tier": "balanced",
            "max_tokens": 200,
            "prompt": "l.md",
            # A command source: its text reaches the prompt exactly as written (no header),
            # so `route` TEXT and `once` with the same text build byte-identical prompts.
            "context": [{"command": ["cat", "task.txt"], "name": "task"}],
            **loop,
        }
        data = merge(base_config(server.url), {"loops": {"work": None, "L": settings}})
        self.config = self.dir / "agent-model-config.yaml"
        self.config.write_text(yaml.safe_dump(data, sort_keys=False))
        self.state = tmp_path / "state"
        self.server = server

    def cli(self, *args: str) -> Result:
        """`agentd --config … --state-dir … ARGS` in-process."""
        argv = ["--config", str(self.config), "--state-dir", str(self.state), *args]
        return CliRunner().invoke(main, argv, env=ENV, catch_exceptions=False)

    def route(self, text: str, *more: str) -> dict[str, Any]:
        """`agentd route --loop L --json TEXT` (exit 0), parsed."""
        result = self.cli("route", "--loop", "L", "--json", *more, text)
        assert result.exit_code == 0, result.output
        data: dict[str, Any] = json.loads(result.stdout)
        return data

    def once(self, task: str, expect: int = 0) -> dict[str, Any]:
        """`agentd once L --json` with `task` as the loop's context, parsed."""
        (self.dir / "task.txt").write_text(task)
        result = self.cli("once", "L", "--json")
        assert result.exit_code == expect, result.output
        data: dict[str, Any] = json.loads(result.stdout)
        return data

    def rows(self, run_id: int) -> list[tuple[Any, ...]]:
        """(purpose, tier, model, status) of a run's calls, in order."""
        conn = sqlite3.connect(self.state / "ledger.db")
        try:
            sql = "SELECT purpose, tier, model, status FROM calls WHERE run_id = ? ORDER BY id"
            return [tuple(r) for r in conn.execute(sql, (run_id,))]
        finally:
            conn.close()

    def reserved(self, run_id: int) -> list[int]:
        """The reservation of each call of a run, in micro-USD."""
        conn = sqlite3.connect(self.state / "ledger.db")
        try:
            sql = "SELECT reserved_micro_usd FROM calls WHERE run_id = ? ORDER BY id"
            return [r[0] for r in conn.execute(sql, (run_id,))]
        finally:
            conn.close()

    def prompts(self) -> list[str]:
        """The user message of every request the fake server got, in order."""
        return [r.body["messages"][-1]["content"] for r in self.server.requests]


def micro(usd: str) -> int:
    return int(Decimal(usd) * 1_000_000)


# ---------------------------------------------------------------------------- static, rules


def test_route_static_reads_nothing_but_the_config(tmp_path: Path, fake_server: FakeServer) -> None:
    s = Setup(tmp_path, fake_server, {"system": SYSTEM})
    data = s.route("Invoice due on the 30th.")
    assert (data["strategy"], data["tier"], data["requested_tier"]) == (
        "static",
        "balanced",
        "balanced",
    )
    assert data["chain"] == ["sonnet (anthropic/claude-sonnet-4-5)", "gpt (openai/gpt-4o)"]
    assert data["budget"] == "no_budget" and data["windows"] == []
    assert data["input"] == (
        "TEXT in the loop's template l.md, as its context source {task}; the loop's system "
        "prompt counts too"
    )
    prompt = TEMPLATE.replace("{task}", "Invoice due on the 30th.")
    assert data["estimated_input_tokens"] == -(-len(prompt) // 4) + -(-len(SYSTEM) // 4)
    assert fake_server.count() == 0 and not s.state.exists()  # read-only: nothing created
    text = s.cli("route", "--loop", "L", "Invoice due on the 30th.")
    assert text.exit_code == 0 and "loop L: route static, tier balanced" in text.stdout
    assert "budget: no window applies to loop L" in text.stdout


@pytest.mark.parametrize(
    ("task", "tier", "model"),
    [
        ("Invoice 7, due on the 30th.", "fast", HAIKU),
        # ~56 tokens: short alone, but ~102 with the template and the system prompt.
        ("Invoice 7, due on the 30th. " * 8, "balanced", SONNET),
        ("Invoice 7, due on the 30th. " * 20, "balanced", SONNET),
    ],
)
def test_route_rules_estimates_what_once_sends(
    tmp_path: Path, fake_server: FakeServer, task: str, tier: str, model: str
) -> None:
    # The template and the system prompt are ~46 tokens of every input: the rules (short is
    # < 100) decide on the whole input, in `route` as in `once`, not on TEXT alone.
    s = Setup(tmp_path, fake_server, {"route": "rules", "kind": "extraction", "system": SYSTEM})
    explained = s.route(task)
    assert (explained["strategy"], explained["tier"]) == ("rules", tier)
    prompt = TEMPLATE.replace("{task}", task)
    assert explained["estimated_input_tokens"] == -(-len(prompt) // 4) + len(SYSTEM) // 4
    result = s.once(task)
    route = result["route"]
    assert route["estimated_input_tokens"] == explained["estimated_input_tokens"]
    assert route["reasons"][0] == explained["reasons"][0]
    assert (result["tier"], result["model"]) == (tier, model)
    assert s.rows(result["run_id"]) == [("work", tier, model, "ok")]
    # The worst case `route` shows is the reservation `once` made, to the micro-dollar.
    assert s.reserved(result["run_id"]) == [micro(explained["calls"][0]["worst_case_usd"])]
    assert fake_server.requests[0].body["system"] == SYSTEM


def test_route_rules_downgrades_like_once(tmp_path: Path, fake_server: FakeServer) -> None:
    # deep asks ~0.016 USD and balanced ~0.0032, fast ~0.0011: only fast fits 0.002 USD.
    s = Setup(
        tmp_path,
        fake_server,
        {
            "route": "rules",
            "kind": "reasoning",
            "budget": {"per_day_usd": 0.002},
            "when_over_budget": "downgrade",
        },
    )
    explained = s.route("Plan the week.")
    assert (explained["tier"], explained["requested_tier"]) == ("fast", "deep")
    assert explained["budget"] == "downgraded" and explained["when_over_budget"] == "downgrade"
    [work] = explained["calls"]
    assert (work["tier"], work["requested_tier"], work["budget"]) == ("fast", "deep", "downgraded")
    assert work["plan"] == "downgraded to fast"
    assert [r.split(":")[0] for r in work["refusals"]] == [
        "chosen by rules",
        "downgraded to balanced",
    ]
    assert explained["chain"][0] == "haiku (anthropic/claude-haiku-4-5)"
    assert explained["reasons"][-1].startswith("budget: the work call would be downgraded to fast")
    [window] = explained["windows"]
    assert window["window"] == "loop L per day"
    assert window["limit_usd"] == window["remaining_usd"] == "0.002000"
    assert not s.state.exists()

    result = s.once("Plan the week.")
    assert (result["tier"], result["route"]["reason"]) == ("fast", "downgraded to fast")
    assert s.rows(result["run_id"]) == [("work", "fast", HAIKU, "ok")]
    assert fake_server.count(OPUS) == fake_server.count(SONNET) == 0

    # The spend is read back: what is left now is less, and the text says the same.
    again = s.route("Plan the week.")
    spent = micro(again["windows"][0]["limit_usd"]) - micro(again["windows"][0]["remaining_usd"])
    assert spent > 0
    text = s.cli("route", "--loop", "L", "Plan the week.").stdout
    assert "loop L: route rules, tier fast (the route asks for deep)" in text
    assert "budget: downgraded (when_over_budget: downgrade); loop L per day $" in text


def test_route_skips_a_refused_model_within_the_chain_like_once(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    # haiku asks ~1,300 µ$, gpt-4o-mini ~160 µ$: only the second model of fast fits 500 µ$.
    s = Setup(tmp_path, fake_server, {"tier": "fast", "budget": {"per_day_usd": 0.0005}})
    explained = s.route("Invoice 7, due on the 30th.")
    assert (explained["budget"], explained["tier"]) == ("fits", "fast")
    assert explained["chain"] == ["gpt-mini (openai/gpt-4o-mini)"]
    [refusal] = explained["calls"][0]["refusals"]
    assert refusal.startswith("configured: haiku: over budget: loop L per day: asks ")
    assert "budget: the work call would skip to gpt-mini" in explained["reasons"][-1]
    result = s.once("Invoice 7, due on the 30th.")
    assert s.rows(result["run_id"]) == [("work", "fast", "gpt-4o-mini", "ok")]
    assert s.reserved(result["run_id"]) == [micro(explained["calls"][0]["worst_case_usd"])]


@pytest.mark.parametrize("when", ["skip", "pause"])
def test_route_says_when_the_run_would_be_skipped(
    tmp_path: Path, fake_server: FakeServer, when: str
) -> None:
    s = Setup(
        tmp_path,
        fake_server,
        {"tier": "deep", "budget": {"per_day_usd": 0.001}, "when_over_budget": when},
    )
    explained = s.route("Plan the week.")
    expected = "skipped" if when == "skip" else "paused"
    assert (explained["budget"], explained["tier"]) == (expected, "deep")
    assert explained["calls"][0]["budget"] == "over_budget"
    last = explained["reasons"][-1]
    assert last.startswith(
        "budget: the work call fits no plan (configured: opus: over budget: loop L"
    )
    if when == "skip":
        assert last.endswith("the run would be skipped (when_over_budget: skip)")
    else:
        resets = explained["windows"][0]["resets_at"]
        assert last.endswith(f"loop paused until {resets} (when_over_budget: pause)")
    result = s.once("Plan the week.", expect=75)
    assert result["status"] == "skipped_budget" and fake_server.count() == 0


# ---------------------------------------------------------------------------- classify


@pytest.mark.parametrize("simulate", [False, True])
def test_route_classify(tmp_path: Path, fake_server: FakeServer, simulate: bool) -> None:
    s = Setup(tmp_path, fake_server, {"route": "classify", "budget": {"per_day_usd": 1}})
    fake_server.script(HAIKU, ok("simple_extraction"))
    explained = s.route("Invoice 7, due on the 30th.", *(["--simulate"] if simulate else []))
    assert explained["strategy"] == "classify" and explained["model_called"] is True
    assert explained["simulated"] is simulate
    assert [c["purpose"] for c in explained["calls"]] == ["classify", "work"]
    conn = sqlite3.connect(s.state / "ledger.db")
    try:
        run = conn.execute("SELECT status, trigger, reply, simulated FROM runs").fetchone()
    finally:
        conn.close()
    assert run == ("ok", "manual", None, int(simulate))
    if simulate:
        assert fake_server.count() == 0 and explained["label"] in LABELS
        return
    assert (explained["label"], explained["tier"], explained["requested_tier"]) == (
        "simple_extraction",
        "fast",
        "fast",
    )
    assert explained["budget"] == "fits"
    assert s.rows(explained["run_id"]) == [("classify", "fast", HAIKU, "ok")]
    assert micro(explained["spent_usd"]) > 0
    # The classifier saw the loop's filled template with TEXT in it, as in a run.
    [prompt] = s.prompts()
    assert TEMPLATE.replace("{task}", "Invoice 7, due on the 30th.").strip() in prompt
    assert fake_server.count(SONNET) == 0


@pytest.mark.parametrize(
    ("reply", "tier", "model"),
    [
        ("simple_extraction", "fast", HAIKU),
        ("Complex_Reasoning.", "deep", OPUS),
        ("classification, code_task", "balanced", SONNET),
    ],
)
def test_once_classify_rows(
    tmp_path: Path, fake_server: FakeServer, reply: str, tier: str, model: str
) -> None:
    s = Setup(tmp_path, fake_server, {"route": "classify"})
    fake_server.script(HAIKU, ok(reply))
    fake_server.script(model, ok("the 30th"))
    result = s.once("Invoice 7, due on the 30th.")
    assert (result["status"], result["reply"], result["tier"]) == ("ok", "the 30th", tier)
    assert s.rows(result["run_id"]) == [
        ("classify", "fast", HAIKU, "ok"),
        ("work", tier, model, "ok"),
    ]
    assert result["route"]["classify"] == ("unusable" if tier == "balanced" else "ok")


# ---------------------------------------------------------------------------- cascade


@pytest.mark.parametrize("simulate", [False, True])
def test_route_cascade(tmp_path: Path, fake_server: FakeServer, simulate: bool) -> None:
    s = Setup(tmp_path, fake_server, {"route": "cascade"})
    explained = s.route("Invoice 7, due on the 30th.", *(["--simulate"] if simulate else []))
    assert (explained["strategy"], explained["tier"], explained["threshold"]) == (
        "cascade",
        "balanced",
        0.8,
    )
    calls = [(c["purpose"], c["tier"], c["budget"]) for c in explained["calls"]]
    assert calls == [
        ("draft", "balanced", "no_budget"),
        ("review", "fast", "no_budget"),
        ("escalate", "deep", "no_budget"),
    ]
    assert explained["calls"][2]["when"] == "only if the review scores below 0.8 or gives no score"
    total = sum(micro(c["worst_case_usd"]) for c in explained["calls"])
    assert micro(explained["worst_case_usd"]) == total
    assert fake_server.count() == 0 and not s.state.exists()


def test_route_cascade_says_the_escalation_would_not_fit(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    # Draft (~3,300 µ$) and review (~1,700 µ$) fit 0.01 USD; the opus escalation does not.
    s = Setup(tmp_path, fake_server, {"route": "cascade", "budget": {"per_day_usd": 0.01}})
    explained = s.route("Invoice 7, due on the 30th.")
    assert [c["budget"] for c in explained["calls"]] == ["fits", "fits", "over_budget"]
    assert explained["budget"] == "fits" and explained["tier"] == "balanced"
    assert explained["reasons"][-1].startswith("budget: the escalation would not fit (")
    assert explained["reasons"][-1].endswith(
        "if the review scores low or gives no score, the draft would be the reply"
    )
    fake_server.script(SONNET, ok("draft answer"))
    fake_server.script(HAIKU, ok("0.1"))
    result = s.once("Invoice 7, due on the 30th.")
    assert (result["reply"], result["route"]["escalation"]) == ("draft answer", "skipped_budget")
    assert s.rows(result["run_id"]) == [
        ("draft", "balanced", SONNET, "ok"),
        ("review", "fast", HAIKU, "ok"),
    ]


@pytest.mark.parametrize(("review", "escalated"), [("0.95", False), ("Score: 0.2/1", True)])
def test_once_cascade_rows(
    tmp_path: Path, fake_server: FakeServer, review: str, escalated: bool
) -> None:
    s = Setup(tmp_path, fake_server, {"route": "cascade"})
    fake_server.script(SONNET, ok("draft answer"))
    fake_server.script(HAIKU, ok(review))
    fake_server.script(OPUS, ok("improved answer"))
    result = s.once("Invoice 7, due on the 30th.")
    expected = [("draft", "balanced", SONNET, "ok"), ("review", "fast", HAIKU, "ok")]
    if escalated:
        expected.append(("escalate", "deep", OPUS, "ok"))
    assert s.rows(result["run_id"]) == expected
    assert result["reply"] == ("improved answer" if escalated else "draft answer")
    assert result["route"]["escalated"] is escalated


def test_the_fake_default_reply_is_not_a_negative_score(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    # The fake's default reply names "claude-haiku-4-5": its hyphens are no minus signs, so
    # the first number is the 4 (clamped to 1.0) and the draft stands.
    s = Setup(tmp_path, fake_server, {"route": "cascade"})
    result = s.once("Invoice 7, due on the 30th.")
    assert result["route"]["review_reply"] == f"Fake reply from {HAIKU}."
    assert result["route"]["score"] == 1.0 and result["route"]["escalated"] is False
    assert [r[0] for r in s.rows(result["run_id"])] == ["draft", "review"]


# ---------------------------------------------------------------------------- overrides


def test_routing_prompt_overrides_reach_the_model(tmp_path: Path, fake_server: FakeServer) -> None:
    s = Setup(
        tmp_path,
        fake_server,
        {"route": "classify", "routing": {"classifier_prompt": "myclass.md"}},
    )
    (s.dir / "myclass.md").write_text("CUSTOM CLASSIFIER for <<{task}>>\nLabels: {labels}\n")
    fake_server.script(HAIKU, ok("code_task"))
    result = s.once("Fix the parser.")
    assert result["tier"] == "balanced"
    classifier = s.prompts()[0]
    assert classifier.startswith("CUSTOM CLASSIFIER for <<Extract the due date")
    assert "Fix the parser.\n>>" in classifier and " | ".join(LABELS) in classifier

    fake_server.reset()
    t = Setup(
        tmp_path / "cascade",
        fake_server,
        {
            "route": "cascade",
            "routing": {"reviewer_prompt": "myrev.md", "escalation_prompt": "myesc.md"},
        },
    )
    (t.dir / "myrev.md").write_text("CUSTOM REVIEWER {task} // {draft}\n")
    (t.dir / "myesc.md").write_text("CUSTOM ESCALATION {task} // {draft} scored {score}\n")
    fake_server.script(SONNET, ok("draft answer"))
    fake_server.script(HAIKU, ok("0.3"))
    fake_server.script(OPUS, ok("improved"))
    result = t.once("Fix the parser.")
    assert result["reply"] == "improved"
    draft, review, escalation = t.prompts()
    assert review.startswith("CUSTOM REVIEWER Extract the due date")
    assert review.endswith("Fix the parser.\n // draft answer\n")
    assert escalation.startswith("CUSTOM ESCALATION ") and escalation.endswith(
        " // draft answer scored 0.3\n"
    )
    assert draft == TEMPLATE.replace("{task}", "Fix the parser.")


# ---------------------------------------------------------------------------- shipped config


def shipped_on(tmp_path: Path, server: FakeServer) -> Path:
    """The shipped config and loops under tmp_path, both providers on the fake server."""
    shutil.copytree(REPO / "loops", tmp_path / "loops")
    (tmp_path / "config").mkdir()
    patch = {
        "providers": {
            "anthropic": {"base_url": server.url, "api_key_env": "TEST_ANTHROPIC_KEY"},
            "openai": {"base_url": f"{server.url}/v1", "api_key_env": "TEST_OPENAI_KEY"},
        }
    }
    data = merge(yaml.safe_load(SHIPPED.read_text()), patch)
    path = tmp_path / "config" / "agent-model-config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize(
    ("label", "tier", "model"),
    [
        ("simple_extraction", "fast", "claude-haiku-5-5"),
        ("classification", "fast", "claude-haiku-5-5"),
        ("content_generation", "balanced", "claude-sonnet-5-5"),
        ("complex_reasoning", "deep", "claude-opus-5-5"),
    ],
)
def test_shipped_triage_sends_simple_requests_to_the_fast_tier(
    tmp_path: Path, fake_server: FakeServer, label: str, tier: str, model: str
) -> None:
    config = shipped_on(tmp_path, fake_server)
    state = tmp_path / "state"
    fake_server.script("claude-haiku-5-5", ok(label))
    fake_server.script(model, ok("Dana Whitfield; INV-20931; 1,240.00 EUR"))
    result = CliRunner().invoke(
        main,
        ["--config", str(config), "--state-dir", str(state), "once", "triage", "--json"],
        env=ENV,
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    # The loop's own tier is balanced: a simple request costs only fast-tier calls.
    assert (out["tier"], out["model"], out["route"]["label"]) == (tier, model, label)
    conn = sqlite3.connect(state / "ledger.db")
    try:
        calls = conn.execute("SELECT purpose, tier, model FROM calls ORDER BY id").fetchall()
    finally:
        conn.close()
    assert calls == [("classify", "fast", "claude-haiku-5-5"), ("work", tier, model)]
    inbox = (REPO / "loops" / "inbox.md").read_text()
    assert "INV-20931" in fake_server.requests[0].body["messages"][0]["content"]
    assert "INV-20931" in inbox


@pytest.mark.parametrize("loop", ["heartbeat", "research", "planning", "triage"])
def test_shipped_loops_route_and_run_simulated(tmp_path: Path, loop: str) -> None:
    def cli(*args: str) -> Result:
        argv = ["--config", str(SHIPPED), "--state-dir", str(tmp_path), *args]
        return CliRunner().invoke(main, argv, env=ENV, catch_exceptions=False)

    explained = cli("route", "--loop", loop, "--simulate", "--json", "Is INV-7 overdue?")
    assert explained.exit_code == 0, explained.output
    data = json.loads(explained.stdout)
    strategy = {"heartbeat": "static", "research": "cascade", "planning": "rules"}
    assert data["strategy"] == strategy.get(loop, "classify")
    assert data["budget"] == "fits" and data["windows"]
    ran = cli("once", loop, "--simulate", "--json")
    assert ran.exit_code == 0, ran.output
    assert json.loads(ran.stdout)["status"] == "ok"
