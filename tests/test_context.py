"""Context sources in the prompt the provider receives: files, commands, last reply, template."""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import structlog
from fakeserver import FakeServer, error, ok
from test_executor import Harness

from agentd.context import SourceText, cap_utf8, check_context, render_template

PY = sys.executable


def sent_prompt(server: FakeServer) -> str:
    """The user message of the last request the fake provider received."""
    content = server.requests[-1].body["messages"][0]["content"]
    if isinstance(content, list):
        return "".join(block.get("text", "") for block in content)
    assert isinstance(content, str)
    return content


def harness(
    tmp_path: Path,
    server: FakeServer,
    context: list[dict[str, Any]],
    prompt: str = "Say hello.",
    **loop: Any,
) -> Harness:
    return Harness(
        tmp_path, server, {"loops": {"work": {"context": context, **loop}}}, prompt=prompt
    )


def conf(h: Harness) -> Path:
    return h.config.dir


# -- file ---------------------------------------------------------------------------------------


def test_file_source_is_appended_after_the_instructions(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    h = harness(tmp_path, fake_server, [{"file": "notes.md"}])
    (conf(h) / "notes.md").write_text("the queue is empty\n")
    assert h.run().status == "ok"
    prompt = sent_prompt(fake_server)
    # Stable instructions first, changing context last (a stable cacheable prefix).
    assert prompt.startswith("Say hello.\n\n# Context\n\n## file notes.md\n\n")
    assert "--- notes.md ---\nthe queue is empty" in prompt


def test_glob_concatenates_matches_in_sorted_order(tmp_path: Path, fake_server: FakeServer) -> None:
    h = harness(tmp_path, fake_server, [{"file": "inbox/*.txt", "name": "inbox"}])
    inbox = conf(h) / "inbox"
    inbox.mkdir()
    (inbox / "b.txt").write_text("second")
    (inbox / "a.txt").write_text("first")
    (inbox / "skip.md").write_text("not matched")
    h.run()
    prompt = sent_prompt(fake_server)
    assert "--- inbox/a.txt ---\nfirst\n--- inbox/b.txt ---\nsecond" in prompt
    assert "not matched" not in prompt


def test_file_paths_resolve_against_the_config_directory(
    tmp_path: Path, fake_server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness(tmp_path, fake_server, [{"file": "../shared/facts.md"}])
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "facts.md").write_text("water is wet")
    monkeypatch.chdir(tmp_path / "shared")  # the cwd must not matter
    h.run()
    assert "--- ../shared/facts.md ---\nwater is wet" in sent_prompt(fake_server)


def test_file_cap_cuts_on_a_utf8_boundary(tmp_path: Path, fake_server: FakeServer) -> None:
    h = harness(tmp_path, fake_server, [{"file": "big.md", "max_bytes": 40}])
    (conf(h) / "big.md").write_text("é" * 100)  # 2 bytes each
    h.run()
    prompt = sent_prompt(fake_server)
    # The header `--- big.md ---\n` takes 15 bytes; 25 are left: 12 whole characters.
    assert "--- big.md ---\n" + "é" * 12 + "\n[... truncated at 40 bytes]" in prompt
    assert "\ufffd" not in prompt


def test_cap_utf8_never_splits_a_character() -> None:
    data = "aé€😀".encode()  # 1 + 2 + 3 + 4 bytes
    assert cap_utf8(data, 10) == "aé€😀"
    for limit, kept in [(1, "a"), (2, "a"), (3, "aé"), (5, "aé"), (6, "aé€"), (9, "aé€")]:
        assert cap_utf8(data, limit) == f"{kept}\n[... truncated at {limit} bytes]"


def test_a_missing_file_is_visible_and_logged_not_fatal(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    h = harness(tmp_path, fake_server, [{"file": "nothing/*.md"}, {"file": "gone.md"}])
    with structlog.testing.capture_logs() as logs:
        result = h.run()
    assert result.status == "ok"
    prompt = sent_prompt(fake_server)
    assert "[no file matches nothing/*.md]" in prompt
    assert "[no file matches gone.md]" in prompt
    events = [e for e in logs if e["event"] == "context.file_missing"]
    assert [e["file"] for e in events] == ["nothing/*.md", "gone.md"]
    assert {e["log_level"] for e in events} == {"warning"}
    warnings = check_context(h.config, "work")
    assert any("matches nothing" in w for w in warnings)


# -- command ------------------------------------------------------------------------------------


def test_command_output_runs_in_the_config_directory(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    script = "import os; print('cwd=' + os.getcwd())"
    h = harness(tmp_path, fake_server, [{"command": [PY, "-c", script], "name": "where"}])
    h.run()
    assert f"cwd={conf(h)}" in sent_prompt(fake_server)


def test_command_gets_no_provider_keys(
    tmp_path: Path, fake_server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = "import os; print('key=' + str(os.environ.get('TEST_ANTHROPIC_KEY')))"
    h = harness(tmp_path, fake_server, [{"command": [PY, "-c", script]}])
    monkeypatch.setenv("TEST_ANTHROPIC_KEY", "sk-should-not-leak")
    h.run()
    assert "key=None" in sent_prompt(fake_server)


def test_command_failure_is_visible_in_the_prompt_and_logged(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    script = "import sys; print('partial'); sys.stderr.write('disk on fire\\n'); sys.exit(2)"
    h = harness(tmp_path, fake_server, [{"command": [PY, "-c", script]}])
    with structlog.testing.capture_logs() as logs:
        result = h.run()
    assert result.status == "ok"
    prompt = sent_prompt(fake_server)
    assert "partial\n[command failed: exit 2: disk on fire]" in prompt
    [event] = [e for e in logs if e["event"] == "context.command_failed"]
    assert event["error"] == "exit 2: disk on fire" and event["command"] == PY


def test_command_timeout_kills_its_process_group(tmp_path: Path, fake_server: FakeServer) -> None:
    pid_file = tmp_path / "grandchild.pid"
    # A shell whose child sleeps: killing only the shell would leave the sleep holding the pipe.
    # 1 s leaves a loaded machine time to write the pid file (whole, thanks to the mv).
    script = f"sleep 30 & echo $! > {pid_file}.tmp; mv {pid_file}.tmp {pid_file}; wait"
    h = harness(tmp_path, fake_server, [{"command": ["sh", "-c", script], "timeout_s": 1}])
    started = time.monotonic()
    result = h.run()
    assert time.monotonic() - started < 10
    assert result.status == "ok"
    assert "[command failed: timed out after 1s]" in sent_prompt(fake_server)
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _alive(grandchild):
        time.sleep(0.05)
    assert not _alive(grandchild)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie is dead, only not yet reaped by its new parent


def test_command_not_found_is_visible(tmp_path: Path, fake_server: FakeServer) -> None:
    h = harness(tmp_path, fake_server, [{"command": ["agentd-no-such-command-xyz", "--flag"]}])
    assert h.run().status == "ok"
    assert "[command failed: not found: agentd-no-such-command-xyz]" in sent_prompt(fake_server)


def test_command_output_is_capped(tmp_path: Path, fake_server: FakeServer) -> None:
    script = "import sys; sys.stdout.write('x' * 1_000_000)"
    h = harness(tmp_path, fake_server, [{"command": [PY, "-c", script], "max_bytes": 100}])
    h.run()
    prompt = sent_prompt(fake_server)
    assert "x" * 100 + "\n[... truncated at 100 bytes]" in prompt
    assert "x" * 101 not in prompt


# -- last reply ---------------------------------------------------------------------------------


def test_last_reply_is_the_previous_ok_runs_reply(tmp_path: Path, fake_server: FakeServer) -> None:
    h = harness(tmp_path, fake_server, [{"last_reply": True}], prompt="Before: {last_reply}")
    fake_server.script("claude-haiku-4-5", ok("first answer"))
    h.run()
    assert sent_prompt(fake_server) == "Before: [no previous reply]"
    fake_server.script("claude-haiku-4-5", ok("second answer"))
    h.run()
    assert sent_prompt(fake_server) == "Before: first answer"
    # A failed run has no reply to remember: the last ok one stays.
    fake_server.script("claude-haiku-4-5", error(400))
    fake_server.script("gpt-4o-mini", error(400))
    assert h.run().status == "failed"
    h.run()
    assert sent_prompt(fake_server) == "Before: second answer"


# -- the template -------------------------------------------------------------------------------


def test_placeholders_are_filled_and_nothing_is_appended(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    template = 'Checklist:\n{checklist}\nBefore: {last_reply}\nJSON {"a": 1} {unknown} {loop}'
    h = harness(
        tmp_path,
        fake_server,
        [{"file": "list.md", "name": "checklist"}, {"last_reply": True}],
        prompt=template,
    )
    (conf(h) / "list.md").write_text("- backups")
    h.run()
    assert sent_prompt(fake_server) == (
        "Checklist:\n--- list.md ---\n- backups\nBefore: [no previous reply]\n"
        'JSON {"a": 1} {unknown} work'
    )


def test_context_placeholder_holds_every_source_under_a_heading(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    h = harness(
        tmp_path,
        fake_server,
        [{"file": "a.md", "name": "notes"}, {"command": [PY, "-c", "print('out')"]}],
        prompt="Read this:\n{context}\nThen answer.",
    )
    (conf(h) / "a.md").write_text("alpha")
    h.run()
    assert sent_prompt(fake_server) == (
        "Read this:\n## notes: file a.md\n\n--- a.md ---\nalpha\n\n"
        f"## output of {PY}\n\nout\nThen answer."
    )


def test_filled_text_is_not_scanned_again() -> None:
    sources = [SourceText("file", "file x", "a file that says {now} and {loop}")]
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    text = render_template("{file} at {now}", loop="l", now=now, sources=sources)
    assert text == "a file that says {now} and {loop} at 2026-01-02T03:04:05+00:00"


def test_now_and_today_are_in_the_config_timezone() -> None:
    now = datetime(2026, 11, 25, 23, 30, tzinfo=UTC)
    text = render_template("{now} {today}", loop="l", now=now, tz=ZoneInfo("Europe/Berlin"))
    assert text == "2026-11-26T00:30:00+01:00 2026-11-26"


def test_a_template_without_sources_gets_nothing_appended() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert render_template("Hi {loop}", loop="x", now=now) == "Hi x"


def test_builtin_names_win_over_sources_named_like_them() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    sources = [SourceText("now", "file n", "shadowed")]
    text = render_template("at {now}", loop="x", now=now, sources=sources)
    # {now} is the time, so the source is not referenced: it is appended instead of lost.
    assert text.startswith("at 2026-01-01T00:00:00+00:00\n\n# Context\n\n## now: file n")


def test_context_counts_in_the_reservation(tmp_path: Path, fake_server: FakeServer) -> None:
    # 2,000 micro-USD fit "Say hello." on haiku (~1,084) but not 20 KB of context on top, on
    # haiku or on gpt-mini (~3,100).
    h = harness(tmp_path, fake_server, [{"file": "big.md"}], budget={"per_day_usd": "0.002"})
    (conf(h) / "big.md").write_text("word " * 4000)
    result = h.run()
    assert result.status == "skipped_budget"
    assert fake_server.count() == 0
    (conf(h) / "big.md").write_text("small")
    assert h.run().status == "ok"
