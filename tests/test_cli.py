"""The CLI as a user runs it: shipped config, exit codes, JSON money, reports, no secrets."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from builders import TEST_ENV, base_config, merge, write_config
from click.testing import CliRunner, Result
from fakeserver import FakeServer, error, ok, timeout

from agentd.cli import main

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "config" / "agent-model-config.yaml"
NO_KEYS = {
    "ANTHROPIC_API_KEY": None,
    "OPENAI_API_KEY": None,
    "AGENTD_CONFIG": None,
    "AGENTD_STATE_DIR": None,
    "STATE_DIRECTORY": None,
}


def agentd(*args: str, env: dict[str, str | None] | None = None) -> Result:
    """Run the CLI in-process with a clean environment for keys and paths."""
    runner = CliRunner()
    return runner.invoke(main, list(args), env={**NO_KEYS, **(env or {})}, catch_exceptions=False)


def rows(db: Path, sql: str) -> list[dict[str, Any]]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql)]
    finally:
        conn.close()


def shipped_copy(tmp_path: Path, patch: dict[str, Any] | None = None) -> Path:
    """The shipped config and prompts copied into tmp_path (same layout), optionally patched."""
    (tmp_path / "config").mkdir()
    shutil.copytree(REPO / "loops", tmp_path / "loops")
    data = merge(yaml.safe_load(SHIPPED.read_text()), patch or {})
    path = tmp_path / "config" / "agent-model-config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_check_passes_on_the_shipped_config(tmp_path: Path) -> None:
    result = agentd("--config", str(SHIPPED), "--state-dir", str(tmp_path), "check")
    assert result.exit_code == 0, result.output
    for loop in ("heartbeat", "research", "planning", "triage"):
        assert f"loop {loop}:" in result.stdout
    assert "haiku (anthropic/claude-haiku-5-5) -> gpt-mini (openai/gpt-5.4-mini)" in result.stdout
    assert result.stdout.count("  next: ") == 4
    assert "ANTHROPIC_API_KEY is not set" in result.stderr


def test_once_simulated_json_leaves_one_ok_run_with_one_simulated_call(tmp_path: Path) -> None:
    state = tmp_path / "state"
    result = agentd(
        "--config",
        str(SHIPPED),
        "--state-dir",
        str(state),
        "once",
        "heartbeat",
        "--simulate",
        "--json",
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["status"] == "ok" and out["loop"] == "heartbeat" and out["tier"] == "fast"
    assert out["model"] == "claude-haiku-5-5" and out["reply"]
    assert isinstance(out["cost_usd"], str) and out["cost_usd"] != "0.000000"
    assert len(out["attempts"]) == 1
    db = state / "ledger.db"
    assert rows(db, "SELECT status, simulated FROM runs") == [{"status": "ok", "simulated": 1}]
    [call] = rows(db, "SELECT * FROM calls")
    assert call["simulated"] == 1 and call["status"] == "ok"
    assert Decimal(out["cost_usd"]) * 1_000_000 == call["cost_micro_usd"]


def test_real_call_through_base_url_matches_the_server_to_the_micro_dollar(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    config = shipped_copy(tmp_path, {"providers": {"anthropic": {"base_url": fake_server.url}}})
    fake_server.script(
        "claude-haiku-5-5",
        ok(text="HEARTBEAT_OK", input_tokens=900, output_tokens=150, cache_read=40),
    )
    result = agentd(
        "--config",
        str(config),
        "--state-dir",
        str(tmp_path / "s"),
        "once",
        "heartbeat",
        "--json",
        env={"ANTHROPIC_API_KEY": TEST_ENV["TEST_ANTHROPIC_KEY"]},
    )
    assert result.exit_code == 0, result.output
    [call] = rows(tmp_path / "s" / "ledger.db", "SELECT * FROM calls")
    assert (call["input_tokens"], call["cache_read_tokens"], call["output_tokens"]) == (
        940,
        40,
        150,
    )
    # claude-haiku-5-5: 900 × $0.10 + 40 × $0.01 + 150 × $0.50 per MTok = $0.0001654 → 166 µ$.
    assert call["cost_micro_usd"] == 166
    assert json.loads(result.stdout)["cost_usd"] == "0.000166"
    assert TEST_ENV["TEST_ANTHROPIC_KEY"] not in result.stderr + result.stdout


def test_missing_key_exits_78_naming_the_variable(tmp_path: Path) -> None:
    result = agentd("--config", str(SHIPPED), "--state-dir", str(tmp_path), "once", "heartbeat")
    assert result.exit_code == 78
    assert "ANTHROPIC_API_KEY" in result.stderr and "Traceback" not in result.output


def test_invalid_config_exits_78_with_file_line_and_key_path(tmp_path: Path) -> None:
    config = shipped_copy(tmp_path, {"loops": {"heartbeat": {"max_tokens": 0}}})
    result = agentd("--config", str(config), "check")
    assert result.exit_code == 78
    assert str(config) in result.stderr
    assert "loops.heartbeat.max_tokens" in result.stderr
    assert "Traceback" not in result.output


def test_unknown_loop_is_a_usage_error(tmp_path: Path) -> None:
    result = agentd("--config", str(SHIPPED), "--state-dir", str(tmp_path), "once", "nope")
    assert result.exit_code == 2 and "no loop named 'nope'" in result.stderr


def test_over_budget_exits_75_and_failed_run_exits_1(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    data = merge(
        base_config(fake_server.url),
        {
            "loops": {
                "tight": {
                    "every": "1h",
                    "tier": "fast",
                    "max_tokens": 100,
                    "prompt": "work.md",
                    "budget": {"per_day_usd": "0.00001"},
                }
            }
        },
    )
    config = write_config(tmp_path / "c", data)
    env: dict[str, str | None] = dict(TEST_ENV)
    over = agentd(
        "--config", str(config), "--state-dir", str(tmp_path / "s"), "once", "tight", env=env
    )
    assert over.exit_code == 75, over.output
    assert "skipped_budget" in over.stdout
    fake_server.script("claude-haiku-4-5", error(404))
    fake_server.script("gpt-4o-mini", error(404))
    failed = agentd(
        "--config", str(config), "--state-dir", str(tmp_path / "s"), "once", "work", env=env
    )
    assert failed.exit_code == 1
    assert "every model failed" in failed.stdout


# Exec argv[1:] with SIGINT at its default disposition (exec keeps an ignored signal ignored).
_DEFAULT_SIGINT_EXEC = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_mid_call_aborts_the_run_at_its_reservation(
    tmp_path: Path, fake_server: FakeServer, sig: signal.Signals, code: int
) -> None:
    """SIGTERM (`kill`, `timeout`) ends `once` like Ctrl-C: nothing is left pending."""
    data = merge(base_config(fake_server.url), {"providers": {"anthropic": {"timeout_s": 60}}})
    config = write_config(tmp_path / "c", data)
    state = tmp_path / "s"
    fake_server.script("claude-haiku-4-5", timeout(60))  # a slow response
    exe = Path(sys.executable).with_name("agentd")
    # Ctrl-C's SIGINT as a terminal delivers it: a child inherits an *ignored* SIGINT from a
    # parent that ignores it (a test run started as a background job of a non-interactive
    # shell), and then rightly ignores it too, as POSIX background jobs do.
    proc = subprocess.Popen(
        [
            *(sys.executable, "-c", _DEFAULT_SIGINT_EXEC, str(exe)),
            *("--config", str(config), "--state-dir", str(state), "once", "work"),
        ],
        env={**os.environ, **TEST_ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while fake_server.count() == 0:
            assert time.monotonic() < deadline, "the call never reached the server"
            time.sleep(0.02)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == code, stderr
    assert stderr.splitlines()[-1] == f"agentd: {'terminated' if code == 143 else 'interrupted'}"
    db = state / "ledger.db"
    [call] = rows(db, "SELECT status, cost_micro_usd, reserved_micro_usd FROM calls")
    assert call["status"] == "aborted"
    assert call["cost_micro_usd"] == call["reserved_micro_usd"] > 0  # charged at reservation
    [run] = rows(db, "SELECT status, cost_micro_usd FROM runs")
    assert run == {"status": "aborted", "cost_micro_usd": call["cost_micro_usd"]}
    assert fake_server.count() == 1


def test_ledger_reports_render_money_as_strings(tmp_path: Path) -> None:
    state = tmp_path / "state"
    for _ in range(2):
        agentd(
            "--config", str(SHIPPED), "--state-dir", str(state), "once", "heartbeat", "--simulate"
        )
    real = agentd("--config", str(SHIPPED), "--state-dir", str(state), "ledger", "--json")
    assert json.loads(real.stdout) == []  # simulated rows stay out unless asked for
    sim = agentd(
        "--config",
        str(SHIPPED),
        "--state-dir",
        str(state),
        "ledger",
        "--simulated",
        "--by",
        "model",
        "--json",
    )
    [row] = json.loads(sim.stdout)
    assert row["model"] == "claude-haiku-5-5" and row["calls"] == 2 and row["runs"] == 2
    assert isinstance(row["cost_usd"], str)
    csv_out = agentd(
        "--config", str(SHIPPED), "--state-dir", str(state), "ledger", "--simulated", "--csv"
    )
    assert csv_out.stdout.splitlines()[0].startswith("loop,runs,calls,failed")
    calls = agentd(
        "--config",
        str(SHIPPED),
        "--state-dir",
        str(state),
        "ledger",
        "calls",
        "--simulated",
        "--limit",
        "1",
        "--json",
    )
    assert len(json.loads(calls.stdout)) == 1
    budget = agentd(
        "--config", str(SHIPPED), "--state-dir", str(state), "budget", "--json", "--simulated"
    )
    windows = {(w["scope"], w["period"]): w for w in json.loads(budget.stdout)}
    assert windows[("loop heartbeat", "day")]["limit_usd"] == "0.100000"
    assert windows[("global", "month")]["spent_usd"] == row["cost_usd"]


def test_reports_on_a_fresh_state_dir_create_nothing(tmp_path: Path) -> None:
    state = tmp_path / "empty"
    result = agentd("--config", str(SHIPPED), "--state-dir", str(state), "ledger")
    assert result.exit_code == 0 and "(no rows)" in result.stdout
    assert not (state / "ledger.db").exists()


def test_config_schema_matches_the_shipped_schema_file() -> None:
    result = agentd("config", "schema")
    shipped = json.loads((REPO / "config" / "agent-model-config.schema.json").read_text())
    assert json.loads(result.stdout) == shipped


@pytest.mark.slow
def test_console_script_keeps_stdout_clean_and_logs_json_on_stderr(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("agentd")
    proc = subprocess.run(
        [
            str(exe),
            "--config",
            str(SHIPPED),
            "--state-dir",
            str(tmp_path),
            "once",
            "heartbeat",
            "--simulate",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1].startswith("-- heartbeat: ok, haiku (claude-haiku-5-5)")
    events = [json.loads(line) for line in proc.stderr.splitlines()]
    finished = [e for e in events if e["event"] == "call.finished"]
    assert finished and finished[0]["loop"] == "heartbeat" and "cost_micro_usd" in finished[0]
    module = subprocess.run(
        [sys.executable, "-m", "agentd", "--help"], capture_output=True, text=True, timeout=60
    )
    assert module.returncode == 0 and "once" in module.stdout
