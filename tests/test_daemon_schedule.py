"""The daemon's schedule in-process: phased `every:` grids, exact cron, coalesced STATUS= lines.

Real APScheduler, real SQLite ledger in tmp_path, `--simulate` (no provider is called).
Nothing here asserts a duration: schedules are compared as fire times, not waited for.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from builders import base_config, write_config

from agentd import loopstate, scheduling
from agentd.config import load_config
from agentd.daemon import Daemon
from agentd.ledger import Ledger, parse_iso, utc_iso
from agentd.notify import Notifier


async def wait_async(predicate: Callable[[], Any], timeout_s: float = 10) -> None:
    """Poll until predicate() is truthy (fails after timeout_s; not a timing assertion)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail("timed out")
        await asyncio.sleep(0.02)


def quiet_name(prefix: str, every_s: int, now: datetime) -> str:
    """A loop name whose phased grid has no slot in the next 10 minutes (so nothing fires)."""
    for i in range(100):
        name = f"{prefix}{i}"
        if scheduling.grid_at_or_after(name, every_s, now) - now > timedelta(minutes=10):
            return name
    raise AssertionError("no quiet loop name")


def loop_spec(**schedule: str) -> dict[str, Any]:
    return {"tier": "fast", "max_tokens": 50, "prompt": "work.md", **schedule}


class RecordingNotifier(Notifier):
    """A notifier with a service manager that only records what it was sent."""

    def __init__(self) -> None:
        super().__init__("/nonexistent/notify.sock")
        self.sent: list[tuple[str, ...]] = []

    def send(self, *assignments: str) -> bool:
        self.sent.append(assignments)
        return True

    def statuses(self) -> list[str]:
        return [a[0] for a in self.sent if len(a) == 1 and a[0].startswith("STATUS=")]


def test_every_loops_fire_on_their_phased_grid_and_cron_loops_exactly(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    fresh, moved = quiet_name("fresh", 3600, now), quiet_name("moved", 1800, now)
    loops = {
        fresh: loop_spec(every="1h"),
        moved: loop_spec(every="30m"),
        "daily": loop_spec(cron="0 7 * * *"),
    }
    data = {**base_config("http://127.0.0.1:9"), "loops": loops}
    config = load_config(write_config(tmp_path / "cfg", data))
    state = tmp_path / "state"
    # `moved` last ran 5 minutes ago on an old grid (an older agentd): it moves onto its own
    # grid no sooner than one interval after that run.
    last = now.replace(microsecond=0) - timedelta(minutes=5)
    with Ledger.open(state) as ledger:
        loopstate.set_last_slot(ledger, moved, utc_iso(last))

    async def main() -> dict[str, Any]:
        daemon = Daemon(config, state, simulate=True, env={})
        task = asyncio.create_task(daemon.run(install_signals=False))
        await wait_async(lambda: daemon.health()["ok"])
        status = {entry["loop"]: entry for entry in daemon.status()["loops"]}
        daemon.request_stop()
        assert await task == 0
        return status

    status = asyncio.run(main())
    next_fresh = parse_iso(status[fresh]["next_run"])
    assert next_fresh == scheduling.grid_at_or_after(fresh, 3600, now)
    assert int(next_fresh.timestamp()) % 3600 == scheduling.phase_s(fresh, 3600)
    next_moved = parse_iso(status[moved]["next_run"])
    assert next_moved >= last + timedelta(minutes=30)
    assert next_moved == scheduling.grid_at_or_after(moved, 1800, last + timedelta(minutes=30))
    # `agentd check` shows the same times when given the loop's name.
    (shown,) = scheduling.next_fire_times(config.loops[fresh], config.tz, 1, now, name=fresh)
    assert shown == next_fresh
    daily = parse_iso(status["daily"]["next_run"])
    assert (daily.hour, daily.minute, daily.second) == (7, 0, 0)  # cron: no phase
    with Ledger.open(state) as ledger, ledger.read() as conn:
        assert conn.execute("SELECT COUNT(*) FROM runs").fetchone() == (0,)


def test_status_lines_after_runs_are_coalesced(tmp_path: Path) -> None:
    """Many runs settling together send one STATUS= at once and one more later, not one each."""
    data = {**base_config("http://127.0.0.1:9"), "loops": {"a": loop_spec(every="1h")}}
    config = load_config(write_config(tmp_path / "cfg", data))
    notifier = RecordingNotifier()

    async def main() -> None:
        daemon = Daemon(config, tmp_path / "state", simulate=True, env={}, notifier=notifier)
        task = asyncio.create_task(daemon.run(install_signals=False))
        await wait_async(lambda: daemon.health()["ok"])
        before = len(notifier.statuses())
        for _ in range(200):  # what 200 runs finishing in one burst call
            daemon._refresh_status()
        assert len(notifier.statuses()) == before + 1  # the first one goes out at once
        await wait_async(lambda: len(notifier.statuses()) == before + 2)  # the rest: one
        await asyncio.sleep(0)
        assert len(notifier.statuses()) == before + 2
        daemon.request_stop()
        assert await task == 0

    asyncio.run(main())
    assert any(a[0] == "READY=1" for a in notifier.sent)


def test_no_status_line_is_computed_without_a_service_manager(tmp_path: Path) -> None:
    data = {**base_config("http://127.0.0.1:9"), "loops": {"a": loop_spec(every="1h")}}
    config = load_config(write_config(tmp_path / "cfg", data))
    computed: list[int] = []

    class CountingDaemon(Daemon):
        def status_line(self) -> str:
            computed.append(1)
            return super().status_line()

    async def main() -> None:
        daemon = CountingDaemon(config, tmp_path / "state", simulate=True, env={})
        task = asyncio.create_task(daemon.run(install_signals=False))
        await wait_async(lambda: daemon.health()["ok"])
        before = len(computed)
        for _ in range(50):
            daemon._refresh_status()
        assert len(computed) == before
        daemon.request_stop()
        assert await task == 0

    asyncio.run(main())
