"""The fast read path of `agentd ledger`: what it reads of the config, and what it imports."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from builders import base_config, merge, write_config
from click.testing import CliRunner, Result
from spendledger import build

from agentd.cli import main
from agentd.reports import parse_since

NO_ENV = {"AGENTD_CONFIG": None, "AGENTD_STATE_DIR": None, "STATE_DIRECTORY": None}
SINCE = ["--since", "2026-03-01", "--until", "2026-04-01"]

# Modules `agentd ledger` must not import: the validated config (pydantic), the migration
# tool, the SDKs, the scheduler, the run path and the terminal-table library.
HEAVY = (
    "pydantic",
    "agentd.config",
    "agentd.loopconfig",
    "sqlite_utils",
    "anthropic",
    "openai",
    "httpx",
    "apscheduler",
    "rich",
    "agentd.runner",
    "agentd.views",
    "agentd.charts",
)


def agentd(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), env=NO_ENV, catch_exceptions=False)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    build(tmp_path / "state").close()
    return tmp_path / "state"


def config_with(tmp_path: Path, state: Path, patch: dict[str, object]) -> Path:
    data = merge(base_config("http://127.0.0.1:9"), {"state_dir": str(state), **patch})
    return write_config(tmp_path / "conf", data)


def test_a_config_invalid_elsewhere_still_gives_its_state_dir_and_zone(
    tmp_path: Path, state: Path
) -> None:
    # The report needs only state_dir and timezone; a loop's mistake is `check`'s business.
    bad_loop = {"timezone": "America/New_York", "loops": {"work": {"max_tokens": 0}}}
    config = config_with(tmp_path, state, bad_loop)
    assert agentd("--config", str(config), "check").exit_code == 78
    result = agentd("--config", str(config), "ledger", "--by", "day", *SINCE)
    assert result.exit_code == 0, result.output
    assert "(America/New_York)" in result.stdout
    # 22:30 UTC on 03-09 is still 03-09 in New York; 02:00 UTC on 03-10 is 03-09 there too.
    days = json.loads(
        agentd("--config", str(config), "ledger", "--by", "day", "--json", *SINCE).stdout
    )
    assert [d["day"] for d in days][:2] == ["2026-03-09", "2026-03-10"]
    assert days[0]["calls"] == 5  # A1, A2 (two attempts) and B1 (two attempts)


def test_a_misspelt_timezone_is_exit_78_with_file_line_and_key(tmp_path: Path, state: Path) -> None:
    config = config_with(tmp_path, state, {"timezone": None, "timzone": "Europe/Berlin"})
    result = agentd("--config", str(config), "ledger")
    assert result.exit_code == 78
    assert f"{config}:" in result.stderr and "timzone: unknown key" in result.stderr
    assert "did you mean 'timezone'?" in result.stderr


def test_an_unusable_config_with_state_dir_reports_in_utc(tmp_path: Path, state: Path) -> None:
    config = config_with(tmp_path, state, {"timezone": "Nowhere/Special"})
    assert agentd("--config", str(config), "ledger").exit_code == 78
    result = agentd("--config", str(config), "--state-dir", str(state), "ledger", *SINCE)
    assert result.exit_code == 0 and "(UTC)" in result.stdout


def test_ledger_calls_and_prune_read_the_light_config_too(tmp_path: Path, state: Path) -> None:
    config = config_with(tmp_path, state, {"loops": {"work": {"max_tokens": 0}}})
    calls = agentd("--config", str(config), "ledger", "calls", "--limit", "2", "--json")
    assert calls.exit_code == 0 and len(json.loads(calls.stdout)) == 2
    prune = agentd("--config", str(config), "ledger", "prune", "--before", "2026-03-01")
    assert prune.exit_code == 0, prune.output


def test_ledger_calls_lists_what_failed(tmp_path: Path, state: Path) -> None:
    config = config_with(tmp_path, state, {"timezone": "UTC"})
    base = ["--config", str(config), "ledger", "calls"]
    failed = json.loads(agentd(*base, "--failed", "--json").stdout)
    # A2's haiku error (03-09 22:30) and B2's aborted sonnet (03-12 12:00), newest first.
    assert [(c["loop"], c["status"], c["model"]) for c in failed] == [
        ("beta", "aborted", "claude-sonnet-4-5"),
        ("alpha", "error", "claude-haiku-4-5"),
    ]
    assert "served_model" in failed[0]
    since = agentd(*base, "--failed", "--since", "2026-03-10", "--csv").stdout.splitlines()
    assert len(since) == 2 and ",beta," in since[1] and ",aborted," in since[1]
    until = json.loads(agentd(*base, "--failed", "--until", "2026-03-10", "--json").stdout)
    assert [c["status"] for c in until] == ["error"]
    both = json.loads(agentd(*base, "--status", "pending", "--status", "ok", "--json").stdout)
    assert {c["status"] for c in both} == {"pending", "ok"} and len(both) == 6
    assert json.loads(agentd(*base, "--failed", "--since", "week", "--json").stdout) == []
    table = agentd(*base, "--failed")
    assert table.exit_code == 0
    assert table.stdout.splitlines()[0].split()[7:10] == ["model", "served", "status"]
    bad = agentd(*base, "--since", "fortnight")
    assert bad.exit_code == 2 and "today, week, month" in bad.stderr
    assert agentd(*base, "--status", "broken").exit_code == 2


def test_calendar_keywords_start_the_current_period() -> None:
    # Thursday 2026-03-12 01:30 UTC is Wednesday 03-11 21:30 in New York (EDT, UTC-4).
    now = datetime(2026, 3, 12, 1, 30, tzinfo=UTC)
    utc = ZoneInfo("UTC")
    assert parse_since("today", now, tz=utc) == datetime(2026, 3, 12, tzinfo=UTC)
    assert parse_since("week", now, tz=utc) == datetime(2026, 3, 9, tzinfo=UTC)  # Monday
    assert parse_since("Month", now, tz=utc) == datetime(2026, 3, 1, tzinfo=UTC)
    assert parse_since("today", now) == datetime(2026, 3, 12, tzinfo=UTC)  # no zone: UTC
    york = ZoneInfo("America/New_York")
    assert parse_since("today", now, tz=york) == datetime(2026, 3, 11, 4, tzinfo=UTC)
    assert parse_since("week", now, tz=york) == datetime(2026, 3, 9, 4, tzinfo=UTC)
    # March 1st was still EST (UTC-5): DST began on 03-08.
    assert parse_since("month", now, tz=york) == datetime(2026, 3, 1, 5, tzinfo=UTC)


def run_and_list_modules(
    args: list[str], cwd: Path
) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run the CLI in a fresh interpreter; return the result and the modules it imported."""
    code = (
        "import json, sys\n"
        "from agentd.cli import main\n"
        "try:\n"
        "    main(sys.argv[1:], prog_name='agentd', standalone_mode=False)\n"
        "finally:\n"
        "    print(json.dumps(sorted(sys.modules)), file=sys.stderr)\n"
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(cwd)}
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env=env,
    )
    modules = set(json.loads(proc.stderr.strip().splitlines()[-1]))
    return proc, modules


def test_the_ledger_report_imports_nothing_heavy(tmp_path: Path, state: Path) -> None:
    config = config_with(tmp_path, state, {"timezone": "Europe/Berlin"})
    for args in (
        ["--config", str(config), "ledger", *SINCE],
        ["--config", str(config), "ledger", "--by", "model", "--json", *SINCE],
        ["--config", str(config), "ledger", "calls"],
        ["--config", str(config), "ledger", "calls", "--failed", "--since", "week"],
    ):
        proc, modules = run_and_list_modules(args, tmp_path)
        assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr[-2000:]
        loaded = sorted(m for m in modules if m.split(".")[0] in HEAVY or m in HEAVY)
        assert loaded == [], args
    help_proc, help_modules = run_and_list_modules(["--help"], tmp_path)
    assert help_proc.returncode == 0 and "ledger" in help_proc.stdout
    assert not {"agentd.ledger", "asyncio", "structlog", "yaml"} & help_modules
