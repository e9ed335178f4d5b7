"""Schedules: loops → APScheduler triggers and their upcoming fire times."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

if TYPE_CHECKING:
    from apscheduler.triggers.base import BaseTrigger

    from agentd.loopconfig import LoopConfig


def trigger_for(loop: LoopConfig, tz: ZoneInfo, start: datetime | None = None) -> BaseTrigger:
    """The APScheduler trigger of a loop: an interval for `every:`, a crontab for `cron:`.

    `start` is the first fire time of an `every:` loop (APScheduler's default: one interval
    from now); cron loops ignore it.
    """
    # Imported here: APScheduler is not needed by most CLI commands, and start-up time matters.
    from apscheduler.triggers.cron import CronTrigger
    from apscheduler.triggers.interval import IntervalTrigger

    seconds = loop.every_seconds
    if seconds is not None:
        return IntervalTrigger(seconds=seconds, start_date=start, timezone=tz)
    if loop.cron is None:  # unreachable for a validated LoopConfig
        raise ValueError("loop has neither every nor cron")
    return CronTrigger.from_crontab(loop.cron, timezone=tz)


def next_fire_times(
    loop: LoopConfig, tz: ZoneInfo, n: int = 3, now: datetime | None = None
) -> list[datetime]:
    """The next n fire times after now (default: the current time), in tz."""
    if now is None:
        now = datetime.now(tz)
    elif now.tzinfo is None:
        now = now.replace(tzinfo=tz)  # a naive time is read as wall time in the config's zone
    start = None
    if loop.every_seconds is not None:
        start = now + timedelta(seconds=loop.every_seconds)
    trigger = trigger_for(loop, tz, start=start)
    fires: list[datetime] = []
    previous: datetime | None = None
    current = now
    while len(fires) < n:
        fire: datetime | None = trigger.get_next_fire_time(previous, current)
        if fire is None:
            break
        fires.append(fire)
        previous = current = fire
    return fires
