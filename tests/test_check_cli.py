"""The guardrails through the command line: `agentd check`, `agentd status`, `agentd resume`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from builders import TEST_ENV, base_config, merge, write_config
from click.testing import CliRunner, Result
from fakeserver import FakeServer, ok

from agentd.cli import main

AGENTD = str(Path(sys.executable).with_name("agentd"))
CLEAN = {"AGENTD_CONFIG": None, "AGENTD_STATE_DIR": None, "STATE_DIRECTORY": None}


def agentd(config: Path, state: Path, *args: str) -> Result:
    """The CLI in-process on this config and state directory, with the test keys."""
    return CliRunner().invoke(
        main,
        ["--config", str(config), "--state-dir", str(state), *args],
        env={**CLEAN, **TEST_ENV, "RUNTIME_DIRECTORY": None},
        catch_exceptions=False,
    )


def make(tmp_path: Path, url: str, patch: dict[str, Any]) -> Path:
    return write_config(tmp_path / "conf", merge(base_config(url), patch))


def loop_block(stdout: str, loop: str) -> list[str]:
    """The lines `agentd check` prints under `loop NAME:` (up to the next blank line)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"loop {loop}:"))
    end = next((i for i in range(start, len(lines)) if not lines[i]), len(lines))
    return lines[start + 1 : end]


def rows(state: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(state / "ledger.db", timeout=10)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


HAIKU = "haiku (anthropic/claude-haiku-4-5) -> gpt-mini (openai/gpt-4o-mini)"
BALANCED = "sonnet (anthropic/claude-sonnet-4-5) -> gpt (openai/gpt-4o)"
DEEP = "opus (anthropic/claude-opus-4-1)"


# ---------------------------------------------------------------------------- chains


def test_check_shows_every_chain_a_loop_may_use(tmp_path: Path) -> None:
    config = make(
        tmp_path,
        "http://127.0.0.1:9",
        {
            "loops": {
                "research": {
                    "every": "2h",
                    "tier": "balanced",
                    "max_tokens": 400,
                    "prompt": "work.md",
                    "route": "cascade",
                    "fallback_tiers": ["deep"],
                    "routing": {"review_tier": "fast", "escalate_tier": "deep"},
                },
                "sorter": {
                    "every": "1h",
                    "tier": "fast",
                    "max_tokens": 100,
                    "prompt": "work.md",
                    "route": "classify",
                },
                "planner": {
                    "cron": "0 7 * * *",
                    "tier": "deep",
                    "max_tokens": 800,
                    "min_tokens": 200,
                    "prompt": "work.md",
                    "budget": {"per_month_usd": 5},
                    "when_over_budget": "downgrade",
                },
            }
        },
    )
    result = agentd(config, tmp_path / "state", "check")
    assert result.exit_code == 0, result.output
    research = loop_block(result.stdout, "research")
    # The draft on the loop's tier then its fallback tier; the review and the escalation walk
    # their tier's chain and then the same fallback tiers (deep is already in escalate's).
    assert research[:4] == [
        "  route: cascade",
        f"  chain (draft): {BALANCED} -> [fallback tier deep] {DEEP}",
        f"  review (fast): {HAIKU} -> [fallback tier deep] {DEEP}",
        f"  escalate (deep): {DEEP}",
    ]
    sorter = loop_block(result.stdout, "sorter")
    assert sorter[:5] == [
        "  route: classify",
        f"  chain (work without a usable label): {HAIKU}",
        f"  classifier (fast): {HAIKU}",
        f"  label simple_extraction, classification (fast): {HAIKU}",
        f"  label content_generation, code_task (balanced): {BALANCED}",
    ]
    assert sorter[5] == f"  label complex_reasoning (deep): {DEEP}"
    planner = loop_block(result.stdout, "planner")
    assert planner[:4] == [
        f"  chain: {DEEP}",
        f"  downgrade to balanced (over budget): {BALANCED}",
        f"  downgrade to fast (over budget): {HAIKU}",
        "  downgrade: then max_tokens halved down to 200",
    ]


# ---------------------------------------------------------------------------- projections


def test_check_projections_and_warnings_on_a_config_built_to_trip_them(tmp_path: Path) -> None:
    config = make(
        tmp_path,
        "http://127.0.0.1:9",
        {
            "budgets": {"per_month_usd": 2},
            "guardrails": {"warn_unbudgeted_usd_per_month": 1},
            "loops": {
                "work": {"budget": {"per_day_usd": 0.01}},
                "free": {"every": "30m", "tier": "fast", "max_tokens": 200, "prompt": "work.md"},
            },
        },
    )
    result = agentd(config, tmp_path / "state", "check")
    assert result.exit_code == 0, result.output
    # "Say hello." = 9 input tokens + all 200 output tokens on claude-haiku-4-5 ($1 / $5 per
    # MTok) = 1009 micro-USD a run; an every-30m loop makes 47.97 runs a day in the next 30.
    estimate = "47.97 runs/day × estimate $0.001009 (simulated estimate: no history)"
    work = loop_block(result.stdout, "work")
    assert f"  projected: $1.451951/month ({estimate})" in work
    assert "  monthly: $0.300000/month (per_day_usd 0.01 × 30)" in work
    assert f"  projected: $1.451951/month ({estimate})" in loop_block(result.stdout, "free")
    assert result.stdout.splitlines()[-1] == "projected total: $2.903902/month over 2 loops"
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: loop work: projected $1.451951/month exceeds its budget $0.300000/month "
        "(per_day_usd 0.01 × 30): the loop would be starved (when_over_budget: skip)",
        "warning: loop free: no budget, projected $1.451951/month is above "
        "guardrails.warn_unbudgeted_usd_per_month $1: add a budget",
        "warning: projected total $2.903902/month of all loops exceeds the global budget "
        "$2.000000/month (per_month_usd 2): loops would be refused once it is spent",
    ]


def test_check_projection_counts_only_the_ticks_that_call_the_model(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    # The precheck finds work only while the flag file exists.
    precheck = [sys.executable, "-c", "import os, sys; sys.exit(0 if os.path.exists('go') else 1)"]
    config = make(
        tmp_path,
        fake_server.url,
        {"loops": {"work": {"every": None, "cron": "0 7 * * *", "precheck": precheck}}},
    )
    state = tmp_path / "state"
    flag = config.parent / "go"
    flag.write_text("")
    fake_server.script("claude-haiku-4-5", ok(input_tokens=100, output_tokens=20))
    assert agentd(config, state, "once", "work").exit_code == 0
    flag.unlink()
    for _ in range(3):
        assert agentd(config, state, "once", "work").exit_code == 0
    assert fake_server.count() == 1
    result = agentd(config, state, "check")
    assert result.exit_code == 0, result.output
    # 30 daily runs × 1 tick in 4 calling the model × the median 200 micro-USD = 1500.
    assert (
        "  projected: $0.001500/month (1 runs/day × 25% calling the model (1 of the last 4 "
        "ticks; the rest were skipped_noop) × median $0.000200 from 1 runs)"
    ) in loop_block(result.stdout, "work")


# ---------------------------------------------------------------------------- status, resume


class Daemon:
    """`agentd run` as a subprocess on a short state path (the socket's length is limited)."""

    def __init__(self, config: Path, state: Path) -> None:
        self.log = state.parent / "daemon.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENTD_", "NOTIFY_"))}
        env.pop("RUNTIME_DIRECTORY", None)
        env.update(TEST_ENV)
        with self.log.open("wb") as log:
            self.popen = subprocess.Popen(
                [AGENTD, "--config", str(config), "--state-dir", str(state), "run"],
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=env,
            )
        deadline = time.monotonic() + 20
        while agentd(config, state, "status").exit_code != 0:
            if self.popen.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the daemon did not come up: {self.log.read_text()}")
            time.sleep(0.1)

    def stop(self) -> int:
        self.popen.send_signal(signal.SIGTERM)
        return self.popen.wait(timeout=15)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(timeout=10)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="agentd-g", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def anomaly_pause(config: Path, state: Path, server: FakeServer) -> int:
    """Two cheap runs, then one 10× as dear: the breaker (min_runs 2) pauses; its run id."""
    for _ in range(2):
        server.script("claude-haiku-4-5", ok(input_tokens=100, output_tokens=20))
        assert agentd(config, state, "once", "work").exit_code == 0
    server.script("claude-haiku-4-5", ok(input_tokens=1000, output_tokens=200))
    result = agentd(config, state, "once", "work", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["paused_reason"].startswith(f"anomaly: run {out['run_id']} cost $0.002000 = ")
    return int(out["run_id"])


def test_status_and_resume_of_an_anomaly_pause(short_dir: Path, fake_server: FakeServer) -> None:
    config = write_config(
        short_dir / "conf",
        merge(
            base_config(fake_server.url),
            {
                "guardrails": {"anomaly": {"min_runs": 2}},
                "daemon": {"shutdown_grace_s": 1},
                "loops": {"work": {"every": "6h"}},
            },
        ),
    )
    state = short_dir / "s"
    run_id = anomaly_pause(config, state, fake_server)

    daemon = Daemon(config, state)
    try:
        text = agentd(config, state, "status")
        assert text.exit_code == 0, text.output
        [row] = [line for line in text.stdout.splitlines() if line.startswith("work ")]
        assert row.split()[:3] == ["work", "paused", "every"]
        assert (
            f"work: paused: anomaly: run {run_id} cost $0.002000 = 10.0× the median $0.000200 "
            "of the loop's last 2 ok runs (limit 5×)"
        ) in text.stdout.splitlines()
        body = json.loads(agentd(config, state, "status", "--json").stdout)
        [work] = body["loops"]
        assert work["paused"] is True and work["paused_run_id"] == run_id
        assert work["next_run"] is None  # as the table's `-`: a paused loop does not run

        resumed = agentd(config, state, "resume", "work")
        assert (resumed.exit_code, resumed.stdout) == (0, "resumed work\n")
        body = json.loads(agentd(config, state, "status", "--json").stdout)
        [work] = body["loops"]
        assert work["paused"] is False and work["paused_run_id"] is None
        assert work["next_run"] is not None
        assert daemon.stop() == 0
    finally:
        daemon.kill()

    # Without a daemon: status says so; resume clears the pause in the ledger itself.
    down = agentd(config, state, "status")
    assert down.exit_code == 1 and "no agentd daemon is running" in down.stderr
    # The resume re-armed the breaker on a new baseline: after min_runs (2) fresh runs, a
    # run 10× as dear pauses the loop again.
    anomaly_pause(config, state, fake_server)
    assert agentd(config, state, "once", "work").exit_code == 75
    resumed = agentd(config, state, "resume", "work")
    assert resumed.exit_code == 0, resumed.output
    assert resumed.stdout == (
        "resumed work (no daemon is running: cleared its pause and failure count in the "
        f"ledger {state / 'ledger.db'})\n"
    )
    assert rows(state, "SELECT paused, paused_reason FROM loop_state WHERE loop = 'work'") == [
        (0, None)
    ]
    fake_server.script("claude-haiku-4-5", ok(input_tokens=100, output_tokens=20))
    assert agentd(config, state, "once", "work").exit_code == 0
    again = agentd(config, state, "resume", "work")
    assert (
        again.stdout
        == f"work was not paused (no daemon is running; ledger {state / 'ledger.db'})\n"
    )


def test_resume_without_a_daemon_checks_the_loop_name(tmp_path: Path) -> None:
    config = make(tmp_path, "http://127.0.0.1:9", {})
    state = tmp_path / "state"
    unknown = agentd(config, state, "resume", "nope")
    assert unknown.exit_code == 2
    assert unknown.stderr == "cannot resume nope: no loop named 'nope' (loops: work)\n"
    fresh = agentd(config, state, "resume", "work")
    assert fresh.exit_code == 0
    assert fresh.stdout == (
        f"work is not paused (no daemon is running and nothing is recorded in "
        f"{state / 'ledger.db'})\n"
    )
    assert not state.exists()
