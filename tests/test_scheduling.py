"""Tests of agentd.scheduling: triggers and next fire times with the real APScheduler."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from agentd.loopconfig import LoopConfig
from agentd.scheduling import next_fire_times, trigger_for

BERLIN = ZoneInfo("Europe/Berlin")


def loop(**schedule: str) -> LoopConfig:
    """A minimal loop with the given schedule."""
    return LoopConfig(tier="fast", max_tokens=10, prompt="p.md", **schedule)


def test_trigger_types() -> None:
    assert isinstance(trigger_for(loop(every="30m"), ZoneInfo("UTC")), IntervalTrigger)
    cron = trigger_for(loop(cron="0 7 * * *"), BERLIN)
    assert isinstance(cron, CronTrigger)
    assert cron.timezone == BERLIN


def test_every_30m_next_three() -> None:
    now = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
    fires = next_fire_times(loop(every="30m"), ZoneInfo("UTC"), 3, now)
    assert fires == [now + timedelta(minutes=m) for m in (30, 60, 90)]


def test_every_compound_duration_in_a_zone() -> None:
    now = datetime(2025, 6, 1, 8, 15, tzinfo=BERLIN)
    fires = next_fire_times(loop(every="1h30m"), BERLIN, 2, now)
    assert fires == [
        datetime(2025, 6, 1, 9, 45, tzinfo=BERLIN),
        datetime(2025, 6, 1, 11, 15, tzinfo=BERLIN),
    ]


def test_cron_in_a_non_utc_zone_across_dst() -> None:
    # 07:00 Berlin is 06:00 UTC in winter and 05:00 UTC after the switch on 2025-03-30.
    now = datetime(2025, 3, 28, 12, 0, tzinfo=UTC)
    fires = next_fire_times(loop(cron="0 7 * * *"), BERLIN, 3, now)
    assert [f.astimezone(UTC) for f in fires] == [
        datetime(2025, 3, 29, 6, 0, tzinfo=UTC),
        datetime(2025, 3, 30, 5, 0, tzinfo=UTC),
        datetime(2025, 3, 31, 5, 0, tzinfo=UTC),
    ]
    assert all(f.astimezone(BERLIN).hour == 7 for f in fires)


def test_cron_every_two_hours_and_naive_now_is_wall_time() -> None:
    fires = next_fire_times(loop(cron="0 */2 * * *"), BERLIN, 3, datetime(2025, 1, 1, 9, 30))
    assert fires == [datetime(2025, 1, 1, h, 0, tzinfo=BERLIN) for h in (10, 12, 14)]


def test_default_now_and_zero_count() -> None:
    before = datetime.now(UTC)
    (first,) = next_fire_times(loop(every="45s"), ZoneInfo("UTC"), 1)
    assert before + timedelta(seconds=45) <= first <= datetime.now(UTC) + timedelta(seconds=45)
    assert next_fire_times(loop(every="45s"), ZoneInfo("UTC"), 0) == []
