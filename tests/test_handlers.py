"""Python loops: loading handlers, their context, complete() through budgets and the ledger."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from builders import TEST_ENV, base_config, merge
from click.testing import CliRunner
from fakeserver import FakeServer, error, ok
from test_executor import Harness

from agentd.cli import main
from agentd.config import load_config
from agentd.errors import ConfigError
from agentd.executor import Executor
from agentd.handlers import check_handler

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "config" / "agent-model-config.yaml"


def handler_harness(
    tmp_path: Path,
    server: FakeServer,
    code: str,
    *,
    reference: str = "handler.py:run",
    prompt: str = "The task: {loop}.",
    **loop: Any,
) -> Harness:
    """A Harness whose loop `work` is the Python handler `code` (written beside the config)."""
    patch = {"loops": {"work": {"handler": reference, **loop}}}
    h = Harness(tmp_path, server, patch, prompt=prompt)
    (h.config.dir / "handler.py").write_text(textwrap.dedent(code))
    return h


def rows(h: Harness) -> list[tuple[Any, ...]]:
    return [(c["purpose"], c["attempt"], c["tier"], c["model"], c["status"]) for c in h.calls()]


TWO_CALLS = """
    async def run(ctx):
        questions = await ctx.complete("list questions", tier="fast", purpose="draft",
                                       max_tokens=50)
        answer = await ctx.complete("answer: " + questions)
        return f"{questions} | {answer}"
"""


def test_file_handler_calls_are_ledger_rows_numbered_across_the_run(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    h = handler_harness(tmp_path, fake_server, TWO_CALLS, tier="balanced")
    fake_server.script("claude-haiku-4-5", ok("Q1"))
    fake_server.script("claude-sonnet-4-5", error(529), ok("A1"))
    result = h.run()
    assert result.status == "ok", result.error
    assert result.reply == "Q1 | A1"
    assert (result.model, result.tier) == ("claude-sonnet-4-5", "balanced")
    assert rows(h) == [
        ("draft", 1, "fast", "claude-haiku-4-5", "ok"),
        ("work", 2, "balanced", "claude-sonnet-4-5", "error"),
        ("work", 3, "balanced", "claude-sonnet-4-5", "ok"),
    ]
    haiku, *_, sonnet = fake_server.requests
    assert haiku.body["max_tokens"] == 50 and sonnet.body["max_tokens"] == 200
    assert sonnet.body["messages"][0]["content"] == "answer: Q1"
    row = h.run_row(result.run_id)
    assert row["status"] == "ok" and row["reply"] == "Q1 | A1"
    assert row["cost_micro_usd"] == sum(c["cost_micro_usd"] for c in h.calls())
    route = row["route"]
    assert route["strategy"] == "handler" and route["handler"] == "handler.py:run"
    assert [(c["purpose"], c["tier"], c["model"]) for c in route["calls"]] == [
        ("draft", "fast", "haiku"),
        ("work", "balanced", "sonnet"),
    ]


def test_module_handler(
    tmp_path: Path, fake_server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "pkgroot" / "agentd_test_loops"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "mod_handler.py").write_text(
        "async def go(ctx):\n    return 'module: ' + await ctx.complete('hi')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "pkgroot"))
    h = handler_harness(tmp_path, fake_server, "", reference="agentd_test_loops.mod_handler:go")
    fake_server.script("claude-haiku-4-5", ok("hello"))
    result = h.run()
    assert result.status == "ok" and result.reply == "module: hello"


def test_handler_context_object(tmp_path: Path, fake_server: FakeServer) -> None:
    code = """
        import json
        async def run(ctx):
            ctx.log.info("handler.hello")
            return json.dumps({
                "loop": ctx.loop, "prompt": ctx.prompt, "context": ctx.context,
                "last_reply": ctx.last_reply, "now": ctx.now.isoformat(),
                "run_id": ctx.run_id, "simulated": ctx.simulated,
                "tz": ctx.config.timezone,
            })
    """
    h = handler_harness(
        tmp_path,
        fake_server,
        code,
        prompt="Task for {loop}: {notes}",
        context=[{"file": "notes.md", "name": "notes"}, {"last_reply": True}],
    )
    (h.config.dir / "notes.md").write_text("n1")
    first = json.loads(h.run().reply or "")
    assert first["loop"] == "work" and first["tz"] == "UTC" and first["simulated"] is False
    assert first["prompt"] == "Task for work: --- notes.md ---\nn1"
    assert first["context"] == {
        "notes": "--- notes.md ---\nn1",
        "last_reply": "[no previous reply]",
    }
    assert first["last_reply"] is None
    second_result = h.run()
    second = json.loads(second_result.reply or "")
    assert second["last_reply"] == json.dumps(first)
    assert second["run_id"] == second_result.run_id
    assert fake_server.count() == 0  # a handler that never calls complete() costs nothing
    assert second_result.cost_micro_usd == 0 and second_result.model is None


def test_handler_without_prompt(tmp_path: Path, fake_server: FakeServer) -> None:
    h = handler_harness(tmp_path, fake_server, "async def run(ctx):\n    return repr(ctx.prompt)\n")
    data = merge(base_config(fake_server.url), {"loops": {"work": {"handler": "handler.py:run"}}})
    del data["loops"]["work"]["prompt"]
    (h.config.dir / "agent-model-config.yaml").write_text(yaml.safe_dump(data))
    h.config = load_config(h.config.dir / "agent-model-config.yaml")
    h.executor = Executor(h.config, h.ledger, env=TEST_ENV)
    assert h.run().reply == "None"


def test_handler_reply_is_delivered_and_can_wake(tmp_path: Path, fake_server: FakeServer) -> None:
    h = handler_harness(
        tmp_path,
        fake_server,
        "async def run(ctx):\n    return 'found it, WAKE_UP'\n",
        deliver=[{"file": "out.log"}],
        on_reply={"contains": "WAKE_UP", "trigger": "work"},
    )
    result = h.run()
    assert result.wake == "work"
    assert "found it, WAKE_UP" in (h.ledger.path.parent / "out.log").read_text()


def test_handler_exception_fails_the_run_and_keeps_its_calls(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    code = """
        async def run(ctx):
            await ctx.complete("one")
            raise RuntimeError("parser broke")
    """
    h = handler_harness(tmp_path, fake_server, code)
    result = h.run()
    assert result.status == "failed" and result.exit_code == 1
    assert result.error == "RuntimeError: parser broke"
    assert rows(h) == [("work", 1, "fast", "claude-haiku-4-5", "ok")]
    row = h.run_row(result.run_id)
    assert row["status"] == "failed" and row["cost_micro_usd"] > 0


def test_every_model_failing_inside_a_handler_fails_the_run(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    h = handler_harness(tmp_path, fake_server, "async def run(ctx):\n    await ctx.complete('x')\n")
    fake_server.script("claude-haiku-4-5", error(400))
    fake_server.script("gpt-4o-mini", error(400))
    result = h.run()
    assert result.status == "failed"
    assert (result.error or "").startswith("RunFailed: every model failed")
    assert h.run_row(result.run_id)["route"]["calls"][0]["status"] == "failed"


def test_handler_over_budget_before_any_call_is_skipped(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    # The first call (50 output tokens) needs ~340 micro-USD on haiku, ~37 on gpt-mini.
    h = handler_harness(tmp_path, fake_server, TWO_CALLS, budget={"per_day_usd": "0.00002"})
    result = h.run()
    assert result.status == "skipped_budget" and result.exit_code == 75
    assert h.calls() == [] and fake_server.count() == 0
    assert "loop work per day" in (result.error or "")
    assert result.route["budget_refusals"]


def test_handler_over_budget_after_a_call_fails(tmp_path: Path, fake_server: FakeServer) -> None:
    # 1,000 micro-USD fit 50 output tokens on haiku, not 2,000 (~10,070 on haiku, ~1,206 on
    # gpt-mini).
    code = """
        async def run(ctx):
            await ctx.complete("small", max_tokens=50)
            return await ctx.complete("big", max_tokens=2000)
    """
    h = handler_harness(tmp_path, fake_server, code, budget={"per_day_usd": "0.001"})
    result = h.run()
    assert result.status == "failed"
    assert (result.error or "").startswith("over budget after 1 successful call(s): ")
    assert len(h.calls()) == 1


def test_handler_can_catch_budget_refusals(tmp_path: Path, fake_server: FakeServer) -> None:
    code = """
        from agentd.errors import BudgetExceeded
        async def run(ctx):
            try:
                return await ctx.complete("big", max_tokens=4000)
            except BudgetExceeded:
                return "too dear today"
    """
    # 4,000 output tokens: ~20,070 micro-USD on haiku, ~2,406 on gpt-mini; neither fits 2,000.
    h = handler_harness(tmp_path, fake_server, code, budget={"per_day_usd": "0.002"})
    result = h.run()
    assert (result.status, result.reply) == ("ok", "too dear today")


def test_handler_calls_downgrade_when_configured(tmp_path: Path, fake_server: FakeServer) -> None:
    h = handler_harness(
        tmp_path,
        fake_server,
        "async def run(ctx):\n    return await ctx.complete('x')\n",
        tier="deep",
        budget={"per_day_usd": "0.002"},
        when_over_budget="downgrade",
    )
    fake_server.script("claude-haiku-4-5", ok("cheap", input_tokens=10, output_tokens=10))
    result = h.run()
    assert (result.status, result.reply, result.tier) == ("ok", "cheap", "fast")
    assert result.route["calls"][0]["reason"] == "downgraded to fast"


def test_concurrent_complete_calls_keep_attempt_numbers_unique(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    code = """
        import asyncio
        async def run(ctx):
            replies = await asyncio.gather(*(ctx.complete(f"q{i}") for i in range(4)))
            return ",".join(replies)
    """
    h = handler_harness(tmp_path, fake_server, code)
    assert h.run().status == "ok"
    assert sorted(c["attempt"] for c in h.calls()) == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ("ctx.complete('x', tier='nope')", "ValueError: undefined tier 'nope'"),
        ("ctx.complete('x', model='nope')", "ValueError: undefined model 'nope'"),
        ("ctx.complete('x', tier='fast', model='haiku')", "ValueError: give tier or model"),
        ("ctx.complete('x', purpose='Bad Purpose')", "ValueError: purpose must be"),
        ("ctx.complete('')", "ValueError: complete() needs a non-empty prompt"),
    ],
)
def test_bad_complete_arguments_fail_the_run(
    tmp_path: Path, fake_server: FakeServer, call: str, message: str
) -> None:
    h = handler_harness(tmp_path, fake_server, f"async def run(ctx):\n    return await {call}\n")
    result = h.run()
    assert result.status == "failed"
    assert (result.error or "").startswith(message)
    assert fake_server.count() == 0


def test_complete_with_a_model_alias(tmp_path: Path, fake_server: FakeServer) -> None:
    code = "async def run(ctx):\n    return await ctx.complete('x', model='gpt')\n"
    h = handler_harness(tmp_path, fake_server, code)
    result = h.run()
    assert result.status == "ok" and result.model == "gpt-4o"


def test_handler_returning_a_non_string_fails(tmp_path: Path, fake_server: FakeServer) -> None:
    h = handler_harness(tmp_path, fake_server, "async def run(ctx):\n    return 42\n")
    result = h.run()
    assert result.status == "failed"
    assert result.error == "handler returned int; expected str or None"


def test_an_edited_handler_file_is_loaded_again(tmp_path: Path, fake_server: FakeServer) -> None:
    h = handler_harness(tmp_path, fake_server, "async def run(ctx):\n    return 'v1'\n")
    assert h.run().reply == "v1"
    path = h.config.dir / "handler.py"
    path.write_text("async def run(ctx):\n    return 'version 2'\n")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert h.run().reply == "version 2"


@pytest.mark.parametrize(
    ("reference", "code", "message"),
    [
        ("handler.py", "", "expected package.module:function or path/to/file.py:function"),
        ("missing.py:run", "", "no handler file"),
        ("handler.py:run", "x = 1\n", "has no function 'run'"),
        ("handler.py:run", "def run(ctx):\n    return 'sync'\n", "must be an async function"),
        ("handler.py:run", "def broken(:\n", "cannot load 'handler.py': SyntaxError"),
        ("handler.py:run", "import agentd_no_such_dep\n", "cannot import 'handler.py'"),
        ("agentd_no_such_module.sub:run", "", "cannot import 'agentd_no_such_module.sub'"),
        ("not a module:run", "", "expected package.module:function"),
    ],
)
def test_bad_handler_references_are_config_errors(
    tmp_path: Path, fake_server: FakeServer, reference: str, code: str, message: str
) -> None:
    h = handler_harness(tmp_path, fake_server, code, reference=reference)
    with pytest.raises(ConfigError) as raised:
        h.run()
    assert message in str(raised.value)
    assert "loops.work.handler" in str(raised.value)
    assert raised.value.exit_code == 78
    assert h.ledger.conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 0
    problem = check_handler(h.config, "work")
    assert problem is not None and message in problem


def test_check_handler_is_none_for_a_good_handler_or_none(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    h = handler_harness(tmp_path, fake_server, "async def run(ctx):\n    return None\n")
    assert check_handler(h.config, "work") is None
    plain = Harness(tmp_path / "plain", fake_server)
    assert check_handler(plain.config, "work") is None


def test_once_with_a_bad_handler_exits_78(tmp_path: Path, fake_server: FakeServer) -> None:
    h = handler_harness(tmp_path, fake_server, "x = 1\n")
    result = CliRunner().invoke(
        main,
        ["--config", str(h.config.path), "--state-dir", str(tmp_path / "s2"), "once", "work"],
        env=TEST_ENV,
    )
    assert result.exit_code == 78, result.output
    assert "has no function 'run'" in result.stderr


def test_shipped_research_handler_runs_simulated(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main,
        [
            "--config",
            str(SHIPPED),
            "--state-dir",
            str(tmp_path),
            "once",
            "research",
            "--simulate",
            "--json",
        ],
        env={"ANTHROPIC_API_KEY": None, "OPENAI_API_KEY": None, "AGENTD_CONFIG": None},
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["status"] == "ok" and out["simulated"] is True
    assert out["reply"].startswith("# Research ")
    assert "Questions considered:\n1. " in out["reply"]
    attempts = [(a["purpose"], a["tier"]) for a in out["attempts"]]
    assert [a["attempt"] for a in out["attempts"]] == list(range(1, len(attempts) + 1))
    # The question list on the fast tier; each of the three answers follows research's
    # `route: cascade`: draft, review, maybe escalate.
    assert attempts[0] == ("work", "fast") and out["reply"].count("\n## ") == 3
    rest = attempts[1:]
    drafts = [i for i, a in enumerate(rest) if a[0] == "draft"]
    assert len(drafts) == 3
    for start, end in zip(drafts, [*drafts[1:], len(rest)], strict=True):
        assert rest[start:end] in (
            [("draft", "balanced"), ("review", "fast")],
            [("draft", "balanced"), ("review", "fast"), ("escalate", "deep")],
        )
    assert out["route"]["strategy"] == "handler" and out["route"]["route"] == "cascade"


def test_shipped_heartbeat_is_quiet_when_simulated(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main,
        [
            "--config",
            str(SHIPPED),
            "--state-dir",
            str(tmp_path),
            "once",
            "heartbeat",
            "--simulate",
            "--json",
        ],
        env={"ANTHROPIC_API_KEY": None, "OPENAI_API_KEY": None, "AGENTD_CONFIG": None},
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["reply"] == "HEARTBEAT_OK" and out["route"]["quiet"] is True
    assert out["wake"] is None


def test_research_question_parsing() -> None:
    sys.path.insert(0, str(REPO / "loops"))
    try:
        import research  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(REPO / "loops"))
    assert research.parse_questions("Sure:\n1. Why?\n2) How?\n- What?\n4. More") == [
        "Why?",
        "How?",
        "What?",
    ]
    assert research.parse_questions("just one line") == ["just one line"]
    assert research.parse_questions("") == []


def test_loop_context_complete_is_async(tmp_path: Path, fake_server: FakeServer) -> None:
    # The documented handler signature works when called directly too (for handler unit tests).
    from agentd.handlers import LoopContext

    class Fake:
        async def complete(self, prompt: str, **kwargs: Any) -> str:
            return f"{prompt}:{kwargs['tier']}:{kwargs['purpose']}"

    h = Harness(tmp_path, fake_server)
    ctx = LoopContext(
        loop="work",
        config=h.config,
        now=datetime.now(tz=UTC),
        prompt=None,
        context={},
        last_reply=None,
        log=None,
        run_id=0,
        simulated=True,
        completer=Fake(),
    )
    assert asyncio.run(ctx.complete("p", tier="fast")) == "p:fast:work"
