"""Tests of agentd.scheduling: triggers and next fire times with the real APScheduler."""

from __future__ import annotations

import asyncio
import random
import time
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from agentd.loopconfig import LoopConfig
from agentd.scheduling import (
    add_loop_job,
    anchor_for,
    crontab_weekdays,
    is_active,
    jitter_delay,
    job_id,
    latest_fire,
    loop_trigger,
    missed_slot,
    next_fire_times,
    next_run_time,
    remove_loop_job,
    schedule_key,
    slot_at,
    trigger_for,
)

BERLIN = ZoneInfo("Europe/Berlin")
UTC_ZONE = ZoneInfo("UTC")


def loop(**settings: Any) -> LoopConfig:
    """A minimal loop with the given schedule (and other settings)."""
    return LoopConfig(tier="fast", max_tokens=10, prompt="p.md", **settings)


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


# ---------------------------------------------------------------------------- crontab weekdays


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("*", "*"),
        ("1-5", "mon,tue,wed,thu,fri"),
        ("mon-fri", "mon,tue,wed,thu,fri"),
        ("0", "sun"),
        ("7", "sun"),
        ("5-7", "fri,sat,sun"),
        ("*/2", "tue,thu,sat,sun"),  # crontab: 0,2,4,6 = Sun, Tue, Thu, Sat
        ("1,3,SAT", "mon,wed,sat"),
        ("1-5/2", "mon,wed,fri"),
    ],
)
def test_crontab_weekdays_use_crontab_numbering(field: str, expected: str) -> None:
    assert crontab_weekdays(field) == expected


@pytest.mark.parametrize("field", ["8", "5-1", "monday", "*-3", "1/0", ""])
def test_crontab_weekdays_rejects_nonsense(field: str) -> None:
    with pytest.raises(ValueError):
        crontab_weekdays(field)


def test_cron_weekday_1_is_monday() -> None:
    # APScheduler 3's own from_crontab would read 1 as Tuesday.
    friday = datetime(2025, 1, 3, 12, tzinfo=UTC)
    fires = next_fire_times(loop(cron="0 7 * * 1-5"), ZoneInfo("UTC"), 3, friday)
    assert [f.strftime("%a %d") for f in fires] == ["Mon 06", "Tue 07", "Wed 08"]
    (sunday,) = next_fire_times(loop(cron="30 6 * * 0"), ZoneInfo("UTC"), 1, friday)
    assert sunday == datetime(2025, 1, 5, 6, 30, tzinfo=UTC)


# ---------------------------------------------------------------------------- slots


T0 = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)


def test_anchor_for_every_loops() -> None:
    every = loop(every="1h")
    # Continues the last slot's grid (whole seconds) so a restart keeps the cadence.
    assert anchor_for(every, T0 + timedelta(microseconds=5), T0 + timedelta(hours=5)) == T0
    # A loop that never ran: one interval from now.
    now = T0 + timedelta(seconds=0.7)
    assert anchor_for(every, None, now) == T0 + timedelta(hours=1)
    # A last slot in the future (the clock went back) is not trusted.
    assert anchor_for(every, T0 + timedelta(days=1), T0) == T0 + timedelta(hours=1)
    assert anchor_for(loop(cron="0 7 * * *"), T0, T0) is None


def test_missed_slot_every_once() -> None:
    once = loop(every="1h", catch_up="once")
    assert missed_slot(once, UTC_ZONE, T0, T0 + timedelta(hours=3, minutes=30)) == T0 + timedelta(
        hours=3
    )
    assert missed_slot(once, UTC_ZONE, T0, T0 + timedelta(minutes=59)) is None
    assert missed_slot(once, UTC_ZONE, T0, T0 + timedelta(hours=1)) == T0 + timedelta(hours=1)


def test_missed_slot_cron_and_skip_and_never_ran() -> None:
    cron = loop(cron="0 */2 * * *", catch_up="once")
    last = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
    now = datetime(2026, 3, 2, 13, 10, tzinfo=UTC)
    assert missed_slot(cron, UTC_ZONE, last, now) == datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
    assert missed_slot(cron, UTC_ZONE, last, last + timedelta(minutes=119)) is None
    assert missed_slot(loop(cron="0 */2 * * *"), UTC_ZONE, last, now) is None  # catch_up: skip
    assert missed_slot(cron, UTC_ZONE, None, now) is None  # never ran on schedule


def test_missed_slot_after_a_long_outage_is_cheap() -> None:
    minutely = loop(cron="* * * * *", catch_up="once")
    last = datetime(2025, 1, 1, tzinfo=UTC)
    now = datetime(2026, 1, 1, 0, 0, 30, tzinfo=UTC)
    started = time.monotonic()
    assert missed_slot(minutely, UTC_ZONE, last, now) == datetime(2026, 1, 1, tzinfo=UTC)
    yearly = loop(cron="0 7 1 1 *", catch_up="once")
    assert missed_slot(yearly, BERLIN, last, now) == datetime(2025, 1, 1, 6, 0, tzinfo=UTC)
    assert time.monotonic() - started < 1.0


def test_missed_slot_cron_in_a_zone() -> None:
    daily = loop(cron="0 7 * * *", catch_up="once")
    last = datetime(2026, 3, 27, 6, 0, tzinfo=UTC)  # 07:00 Berlin (winter)
    now = datetime(2026, 3, 30, 12, 0, tzinfo=UTC)  # after the switch to summer time
    assert missed_slot(daily, BERLIN, last, now) == datetime(2026, 3, 30, 5, 0, tzinfo=UTC)


def test_slot_at_is_the_nominal_fire_time() -> None:
    every = loop(every="10s")
    trigger = loop_trigger(every, UTC_ZONE, T0)
    assert slot_at(trigger, T0 + timedelta(seconds=20, microseconds=900), 60) == T0 + timedelta(
        seconds=20
    )
    # A late (coalesced) run is for the latest due slot.
    assert slot_at(trigger, T0 + timedelta(seconds=47), 60) == T0 + timedelta(seconds=40)
    cron = loop_trigger(loop(cron="*/5 * * * *"), UTC_ZONE, None)
    assert slot_at(cron, T0 + timedelta(minutes=7), 300) == T0 + timedelta(minutes=5)
    # Nothing within the lookback: the current second stands in.
    assert slot_at(cron, T0 + timedelta(minutes=3, seconds=1.5), 60) == T0 + timedelta(
        minutes=3, seconds=1
    )


def test_latest_fire_bounds() -> None:
    trigger = loop_trigger(loop(every="1h"), UTC_ZONE, T0)
    assert latest_fire(trigger, T0, T0) is None
    assert latest_fire(trigger, T0 - timedelta(hours=5), T0) == T0
    assert latest_fire(trigger, T0, T0 + timedelta(hours=2)) == T0 + timedelta(hours=2)


# ---------------------------------------------------------------------------- active hours, jitter


def test_is_active_in_the_config_zone() -> None:
    day = loop(every="1h", active_hours={"start": "08:00", "end": "22:00"})
    assert not is_active(day, datetime(2026, 1, 5, 6, 30, tzinfo=UTC), BERLIN)  # 07:30 local
    assert is_active(day, datetime(2026, 1, 5, 7, 0, tzinfo=UTC), BERLIN)  # 08:00 local
    assert not is_active(day, datetime(2026, 1, 5, 21, 0, tzinfo=UTC), BERLIN)  # 22:00 local
    night = loop(every="1h", active_hours={"start": "22:00", "end": "06:00"})
    assert is_active(night, datetime(2026, 1, 5, 23, 0, tzinfo=UTC), UTC_ZONE)
    assert is_active(night, datetime(2026, 1, 5, 5, 59, tzinfo=UTC), UTC_ZONE)
    assert not is_active(night, datetime(2026, 1, 5, 12, 0, tzinfo=UTC), UTC_ZONE)
    assert is_active(loop(every="1h"), datetime(2026, 1, 5, 3, 0, tzinfo=UTC), UTC_ZONE)


def test_jitter_delay() -> None:
    assert jitter_delay(loop(every="1m")) == 0.0
    rng = random.Random(7)
    delays = [jitter_delay(loop(every="1m", jitter="30s"), rng) for _ in range(200)]
    assert all(0 <= d <= 30 for d in delays) and max(delays) > 20


def test_schedule_key() -> None:
    assert schedule_key(loop(every="30m")) == schedule_key(
        LoopConfig(tier="deep", max_tokens=99, prompt="q.md", every="30m")
    )
    assert schedule_key(loop(every="30m")) != schedule_key(loop(every="31m"))


# ---------------------------------------------------------------------------- jobs


def test_loop_job_fires_on_a_real_scheduler() -> None:
    """One job per loop on a real AsyncIOScheduler, started inside the running loop."""
    fired: list[tuple[str, float]] = []

    async def job(name: str) -> None:
        fired.append((name, time.monotonic()))

    async def main() -> None:
        from apscheduler.schedulers.asyncio import AsyncIOScheduler

        scheduler = AsyncIOScheduler(timezone=UTC_ZONE)
        scheduler.start()
        try:
            now = datetime.now(UTC)
            every = loop(every="1s")
            trigger = loop_trigger(every, UTC_ZONE, anchor_for(every, None, now))
            job_obj = add_loop_job(scheduler, "tick", job, trigger, 300)
            assert job_obj.max_instances == 1 and job_obj.coalesce
            assert job_obj.misfire_grace_time == 300
            # Replacing keeps one job; removing reports whether there was one.
            add_loop_job(scheduler, "tick", job, trigger, 300)
            assert [j.id for j in scheduler.get_jobs()] == [job_id("tick")]
            assert next_run_time(scheduler, "tick") is not None
            await asyncio.sleep(2.2)
            assert remove_loop_job(scheduler, "tick") and not remove_loop_job(scheduler, "tick")
            assert next_run_time(scheduler, "tick") is None
        finally:
            scheduler.shutdown(wait=False)
            await asyncio.sleep(0)

    asyncio.run(main())
    assert [name for name, _ in fired] in (["tick", "tick"], ["tick", "tick", "tick"])
