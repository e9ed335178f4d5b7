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
    grid_at_or_after,
    is_active,
    jitter_delay,
    job_id,
    latest_fire,
    loop_trigger,
    missed_slot,
    next_fire_times,
    next_run_time,
    phase_s,
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
    on_grid = grid_at_or_after("hb", 3600, T0)
    # A restart continues the grid: the next slot is one interval after the last one.
    later = on_grid + timedelta(hours=5)
    assert anchor_for(every, "hb", on_grid + timedelta(microseconds=5), later) == on_grid + (
        timedelta(hours=1)
    )
    # A loop that never ran: its first grid point from now on (within one interval).
    now = T0 + timedelta(seconds=0.7)
    first = anchor_for(every, "hb", None, now)
    assert first is not None and T0 <= first < T0 + timedelta(hours=1)
    assert first == grid_at_or_after("hb", 3600, T0)
    # A last slot in the future (the clock went back) is not trusted.
    assert anchor_for(every, "hb", T0 + timedelta(days=1), T0) == grid_at_or_after("hb", 3600, T0)
    assert anchor_for(loop(cron="0 7 * * *"), "hb", T0, T0) is None


def test_every_loops_get_a_stable_phase_within_their_interval() -> None:
    # Pinned: a different hash would move every deployed loop's schedule once.
    assert [phase_s(name, 1800) for name in ("heartbeat", "research", "x")] == [1777, 196, 1383]
    assert phase_s("anything", 1) == 0 and phase_s("anything", 0) == 0
    phases = [phase_s(f"loop{i:04d}", 60) for i in range(1000)]
    assert all(0 <= p < 60 for p in phases)
    # 1,000 loops `every: 60s` land on all 60 seconds of the minute, not on one.
    assert len(set(phases)) == 60 and max(phases.count(p) for p in set(phases)) < 40
    # The grid: epoch + phase + k·interval, whole seconds, the same instants in any zone.
    slot = grid_at_or_after("heartbeat", 1800, T0)
    assert T0 <= slot < T0 + timedelta(minutes=30) and slot.microsecond == 0
    assert int(slot.timestamp()) % 1800 == 1777
    assert grid_at_or_after("heartbeat", 1800, slot) == slot
    assert grid_at_or_after("heartbeat", 1800, slot + timedelta(microseconds=1)) == slot + (
        timedelta(minutes=30)
    )
    assert grid_at_or_after("heartbeat", 1800, T0.astimezone(BERLIN)) == slot


def test_a_loop_off_its_grid_moves_onto_it_never_sooner_than_its_interval() -> None:
    every = loop(every="30m")
    phase = phase_s("heartbeat", 1800)  # 29m37s into each half hour
    last = T0  # 10:00:00, recorded by an older agentd (or before the interval changed)
    start = anchor_for(every, "heartbeat", last, T0 + timedelta(minutes=5))
    assert start == T0 + timedelta(minutes=30 + 29, seconds=37)
    assert start is not None and int(start.timestamp()) % 1800 == phase
    # The trigger fires there and every 30 minutes after it; the grid point at 10:29:37 is
    # less than an interval after the last run, so it is no slot, not even for catch-up.
    trigger = loop_trigger(every, UTC_ZONE, start)
    first = trigger.get_next_fire_time(None, T0 + timedelta(minutes=5))
    assert first == start
    assert trigger.get_next_fire_time(first, first) == start + timedelta(minutes=30)
    once = loop(every="30m", catch_up="once")
    assert missed_slot(once, "heartbeat", UTC_ZONE, last, T0 + timedelta(minutes=40)) is None


def test_next_fire_times_with_a_name_are_the_daemons() -> None:
    now = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
    fires = next_fire_times(loop(every="30m"), UTC_ZONE, 3, now, name="research")
    first = datetime(2025, 1, 1, 12, 3, 16, tzinfo=UTC)  # phase 196 s
    assert fires == [first + timedelta(minutes=m) for m in (0, 30, 60)]
    # cron loops are exact, named or not.
    cron = loop(cron="0 7 * * *")
    assert next_fire_times(cron, BERLIN, 2, now, name="research") == next_fire_times(
        cron, BERLIN, 2, now
    )


def test_missed_slot_every_once() -> None:
    once = loop(every="1h", catch_up="once")
    last = grid_at_or_after("once", 3600, T0)
    hours = [last + timedelta(hours=h) for h in range(5)]
    assert missed_slot(once, "once", UTC_ZONE, last, hours[3] + timedelta(minutes=30)) == hours[3]
    assert missed_slot(once, "once", UTC_ZONE, last, last + timedelta(minutes=59)) is None
    assert missed_slot(once, "once", UTC_ZONE, last, hours[1]) == hours[1]
    # Off the grid: the grid points less than an interval after the last slot are not missed.
    assert missed_slot(once, "once", UTC_ZONE, T0, T0 + timedelta(minutes=59)) is None
    assert missed_slot(once, "once", UTC_ZONE, T0, T0 + timedelta(hours=3)) == T0 + timedelta(
        hours=2, seconds=phase_s("once", 3600)
    )


def test_missed_slot_cron_and_skip_and_never_ran() -> None:
    cron = loop(cron="0 */2 * * *", catch_up="once")
    last = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
    now = datetime(2026, 3, 2, 13, 10, tzinfo=UTC)
    assert missed_slot(cron, "c", UTC_ZONE, last, now) == datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
    assert missed_slot(cron, "c", UTC_ZONE, last, last + timedelta(minutes=119)) is None
    skip = loop(cron="0 */2 * * *")
    assert missed_slot(skip, "c", UTC_ZONE, last, now) is None  # catch_up: skip
    assert missed_slot(cron, "c", UTC_ZONE, None, now) is None  # never ran on schedule


def test_missed_slot_after_a_long_outage_is_cheap() -> None:
    minutely = loop(cron="* * * * *", catch_up="once")
    last = datetime(2025, 1, 1, tzinfo=UTC)
    now = datetime(2026, 1, 1, 0, 0, 30, tzinfo=UTC)
    started = time.monotonic()
    assert missed_slot(minutely, "m", UTC_ZONE, last, now) == datetime(2026, 1, 1, tzinfo=UTC)
    yearly = loop(cron="0 7 1 1 *", catch_up="once")
    assert missed_slot(yearly, "y", BERLIN, last, now) == datetime(2025, 1, 1, 6, 0, tzinfo=UTC)
    hourly = loop(every="1h", catch_up="once")
    found = missed_slot(hourly, "h", UTC_ZONE, last, now)
    assert found == grid_at_or_after("h", 3600, now - timedelta(hours=1))
    assert time.monotonic() - started < 1.0


def test_missed_slot_cron_in_a_zone() -> None:
    daily = loop(cron="0 7 * * *", catch_up="once")
    last = datetime(2026, 3, 27, 6, 0, tzinfo=UTC)  # 07:00 Berlin (winter)
    now = datetime(2026, 3, 30, 12, 0, tzinfo=UTC)  # after the switch to summer time
    assert missed_slot(daily, "d", BERLIN, last, now) == datetime(2026, 3, 30, 5, 0, tzinfo=UTC)


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
            trigger = loop_trigger(every, UTC_ZONE, anchor_for(every, "tick", None, now))
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
