"""Step 0: a precheck command or an empty checklist skips the tick without calling a model."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from builders import TEST_ENV
from click.testing import CliRunner
from fakeserver import FakeServer
from test_executor import Harness

from agentd.cli import main
from agentd.config import load_config
from agentd.precheck import checklist_is_empty, empty_checklist

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


def _script(code: str) -> list[str]:
    return [PY, "-c", code]


def precheck_harness(
    tmp_path: Path, server: FakeServer, precheck: Any, prompt: str = "Say hello."
) -> Harness:
    return Harness(tmp_path, server, {"loops": {"work": {"precheck": precheck}}}, prompt=prompt)


def test_exit_1_is_a_free_skipped_noop_run(tmp_path: Path, fake_server: FakeServer) -> None:
    h = precheck_harness(tmp_path, fake_server, _script("import sys; sys.exit(1)"))
    result = h.run()
    assert result.status == "skipped_noop"
    assert result.exit_code == 0
    assert fake_server.count() == 0
    assert h.calls() == []
    row = h.run_row(result.run_id)
    assert row["status"] == "skipped_noop"
    assert row["cost_micro_usd"] == 0
    assert row["error"] == f"nothing to do: precheck {PY} exited 1"
    assert row["route"] == {"noop": "precheck", "precheck": {"command": PY, "exit": 1}}


def test_exit_0_calls_the_model_with_stdout_in_the_prompt(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    h = precheck_harness(
        tmp_path,
        fake_server,
        {"command": _script("print('3 new tickets')"), "timeout": 5},
        prompt="Triage these: {precheck}",
    )
    result = h.run()
    assert result.status == "ok"
    assert fake_server.count() == 1
    body = str(fake_server.requests[-1].body)
    assert "Triage these: 3 new tickets" in body
    assert result.route["precheck"]["exit"] == 0


def test_precheck_output_is_appended_when_the_template_does_not_use_it(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    h = precheck_harness(tmp_path, fake_server, _script("print('disk at 91%')"))
    assert h.run().status == "ok"
    body = str(fake_server.requests[-1].body)
    assert "Say hello." in body and "disk at 91%" in body


def test_empty_stdout_leaves_an_empty_placeholder(tmp_path: Path, fake_server: FakeServer) -> None:
    h = precheck_harness(tmp_path, fake_server, _script("pass"), prompt="Go[{precheck}]")
    assert h.run().status == "ok"
    assert "Go[]" in str(fake_server.requests[-1].body)


@pytest.mark.parametrize(
    ("precheck", "reason"),
    [
        (_script("import sys; sys.exit(2)"), "exit 2"),
        ({"command": _script("import time; time.sleep(5)"), "timeout_s": 0.3}, "timed out"),
        (["/nonexistent/agentd-precheck"], "not found: /nonexistent/agentd-precheck"),
    ],
)
def test_a_broken_precheck_fails_the_run_without_a_call(
    tmp_path: Path, fake_server: FakeServer, precheck: Any, reason: str
) -> None:
    h = precheck_harness(tmp_path, fake_server, precheck)
    result = h.run()
    assert result.status == "failed"
    assert result.exit_code == 1
    assert reason in (result.error or "")
    assert (result.error or "").startswith("precheck ")
    assert fake_server.count() == 0 and h.calls() == []
    assert h.run_row(result.run_id)["status"] == "failed"


def test_timeout_and_timeout_s_are_exclusive(tmp_path: Path, fake_server: FakeServer) -> None:
    from agentd.errors import ConfigError

    with pytest.raises(ConfigError, match="timeout"):
        precheck_harness(tmp_path, fake_server, {"command": ["true"], "timeout": 1, "timeout_s": 2})


@pytest.mark.parametrize(
    "text",
    [
        "",
        "# Checklist\n\n- [ ]\n-\n* [ ]  \n1.\n",
        "Checklist\n=========\n\n<!-- add items here\n- like this -->\n- [ ]\n---\n",
    ],
)
def test_empty_checklists(text: str) -> None:
    assert checklist_is_empty(text)


@pytest.mark.parametrize(
    "text",
    ["- [ ] check the backups\n---\n", "# Heading\n\nsomething to look at\n", "- [x] done\n"],
)
def test_non_empty_checklists(text: str) -> None:
    assert not checklist_is_empty(text)


def checklist_harness(tmp_path: Path, server: FakeServer, text: str | None) -> Harness:
    patch = {"loops": {"work": {"context": [{"file": "checklist.md", "name": "checklist"}]}}}
    h = Harness(tmp_path, server, patch)
    if text is not None:
        (h.config.dir / "checklist.md").write_text(text)
    return h


def test_an_empty_checklist_skips_the_tick(tmp_path: Path, fake_server: FakeServer) -> None:
    h = checklist_harness(tmp_path, fake_server, "# Things to watch\n\n- [ ]\n\n")
    result = h.run()
    assert result.status == "skipped_noop"
    assert result.error == "nothing to do: checklist checklist.md is empty"
    assert fake_server.count() == 0 and h.calls() == []


def test_a_checklist_with_items_calls_the_model(tmp_path: Path, fake_server: FakeServer) -> None:
    h = checklist_harness(tmp_path, fake_server, "- [ ] the backups ran\n")
    assert h.run().status == "ok"
    assert fake_server.count() == 1


def test_a_missing_checklist_is_not_a_noop(tmp_path: Path, fake_server: FakeServer) -> None:
    h = checklist_harness(tmp_path, fake_server, None)
    assert h.run().status == "ok"


def test_shipped_heartbeat_checklist_has_items() -> None:
    config = load_config(REPO / "config" / "agent-model-config.yaml")
    assert empty_checklist(config, "heartbeat") is None


def test_shipped_checklist_without_its_items_is_empty() -> None:
    """The guidance in the shipped checklist is in comments: removing the items makes ticks free."""
    text = (REPO / "loops" / "heartbeat-checklist.md").read_text(encoding="utf-8")
    assert not checklist_is_empty(text)
    lines = text.splitlines(keepends=True)
    items = [line for line in lines if line.startswith("- ")]
    assert len(items) == 4
    emptied = "".join(line for line in lines if not line.startswith("- "))
    assert checklist_is_empty(emptied)
    # The same with the items left as empty checkboxes, as an operator might.
    assert checklist_is_empty("".join("- [ ]\n" if line in items else line for line in lines))


def test_shipped_heartbeat_with_its_items_removed_is_free(tmp_path: Path) -> None:
    shutil.copytree(REPO / "config", tmp_path / "config")
    shutil.copytree(REPO / "loops", tmp_path / "loops")
    checklist = tmp_path / "loops" / "heartbeat-checklist.md"
    lines = checklist.read_text(encoding="utf-8").splitlines(keepends=True)
    checklist.write_text("".join(line for line in lines if not line.startswith("- ")))
    config, state = tmp_path / "config" / "agent-model-config.yaml", tmp_path / "state"
    args = ["--config", str(config), "--state-dir", str(state), "once", "heartbeat"]
    result = CliRunner().invoke(main, [*args, "--simulate", "--json"], env={"AGENTD_CONFIG": None})
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["status"] == "skipped_noop" and out["attempts"] == []
    assert out["error"] == "nothing to do: checklist ../loops/heartbeat-checklist.md is empty"


def test_once_exits_0_for_a_skipped_tick(tmp_path: Path, fake_server: FakeServer) -> None:
    h = precheck_harness(tmp_path, fake_server, _script("import sys; sys.exit(1)"))
    result = CliRunner().invoke(
        main,
        ["--config", str(h.config.path), "--state-dir", str(tmp_path / "state2"), "once", "work"],
        env=TEST_ENV,
    )
    assert result.exit_code == 0, result.output
    assert fake_server.count() == 0


def test_a_relative_script_resolves_against_the_config_dir(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    h = precheck_harness(tmp_path, fake_server, ["./check.sh"])
    script = h.config.dir / "check.sh"
    script.write_text("#!/bin/sh\nexit 1\n")
    script.chmod(0o755)
    assert h.run().status == "skipped_noop"
