"""Schedules: loops → APScheduler triggers and jobs, their slots, catch-up, jitter, active hours.

A *slot* is a loop's nominal fire time (whole seconds, UTC in the ledger). The daemon records
the slot of every scheduled run, so a loop never runs twice for one slot, and after downtime
`catch_up: once` knows which slots were missed.

Phase of `every:` loops: an interval has no natural time of day, so each `every: N` loop gets
a stable offset within its interval derived from its name (`phase_s`), and its slots are the
grid `Unix epoch + phase + k·N` (like systemd's `RandomizedDelaySec=` with
`FixedRandomDelay=yes`). Many loops with the same interval then fire spread over the interval
instead of all in one second (1,000 `every: 60s` loops started together used to share one
slot), and a loop's slots are the same across restarts and on every host. A new loop's first
run comes within one interval of the start (not exactly one interval after it); a loop whose
last slot is not on its grid (recorded by an older agentd, or before its interval changed)
moves onto it at the first grid point at least one interval after that slot, so it never runs
sooner than its interval. `cron:` loops are exact: their slots are the crontab's.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

if TYPE_CHECKING:
    from apscheduler.triggers.base import BaseTrigger

    from agentd.loopconfig import LoopConfig

JOB_PREFIX = "loop:"
_CRON_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_DOW_TERM = re.compile(r"^(\*|[a-z0-9]+)(?:-([a-z0-9]+))?(?:/(\d+))?$")


def _cron_day(text: str) -> int:
    """A crontab weekday (0-7, Sunday is 0 and 7, or a name) as 0-6 with Sunday 0."""
    if text.isdigit():
        number = int(text)
        if not 0 <= number <= 7:
            raise ValueError(f"weekday {number} is out of range 0-7")
        return number % 7
    if text not in _CRON_DAYS:
        raise ValueError(f"not a weekday: {text!r}")
    return _CRON_DAYS.index(text)


def crontab_weekdays(field: str) -> str:
    """A crontab day-of-week field in APScheduler 3's terms (weekday names, never numbers).

    APScheduler 3 numbers weekdays from Monday = 0, crontab from Sunday = 0 (and 7), so
    `0 7 * * 1-5` would otherwise run Tuesday to Saturday. Names mean the same in both.
    """
    field = field.strip().lower()
    if field in ("*", "?"):
        return "*"
    days: set[int] = set()
    for term in field.split(","):
        match = _DOW_TERM.match(term)
        if match is None:
            raise ValueError(f"not a day-of-week term: {term!r}")
        first, last, step_text = match.groups()
        step = int(step_text) if step_text else 1
        if step <= 0:
            raise ValueError(f"step must be positive in {term!r}")
        if first == "*":
            if last is not None:
                raise ValueError(f"not a day-of-week term: {term!r}")
            lo, hi = 0, 6
        else:
            lo = _cron_day(first)
            # `7` as the end of a range is Sunday at the end of the week (e.g. 5-7).
            hi = lo if last is None else (7 if last == "7" else _cron_day(last))
            if last is None and step_text:
                hi = 6  # `a/n` means from a to the end of the week
        if hi < lo:
            raise ValueError(f"range goes backwards in {term!r}")
        days.update(d % 7 for d in range(lo, hi + 1, step))
    # Listed Monday first; APScheduler accepts a comma list of names.
    return ",".join(_CRON_DAYS[d] for d in (1, 2, 3, 4, 5, 6, 0) if d in days)


def cron_trigger(expr: str, tz: ZoneInfo) -> BaseTrigger:
    """An APScheduler CronTrigger for a 5-field crontab, with crontab's weekday numbering."""
    from apscheduler.triggers.cron import CronTrigger

    fields = expr.split()
    if len(fields) != 5:
        raise ValueError(f"wrong number of fields; got {len(fields)}, expected 5")
    minute, hour, day, month, dow = fields
    return CronTrigger(
        minute=minute,
        hour=hour,
        day=day,
        month=month,
        day_of_week=crontab_weekdays(dow),
        timezone=tz,
    )


def trigger_for(loop: LoopConfig, tz: ZoneInfo, start: datetime | None = None) -> BaseTrigger:
    """The APScheduler trigger of a loop: an interval for `every:`, a crontab for `cron:`.

    `start` is the first fire time of an `every:` loop (APScheduler's default: one interval
    from now); cron loops ignore it.
    """
    # Imported here: APScheduler is not needed by most CLI commands, and start-up time matters.
    from apscheduler.triggers.interval import IntervalTrigger

    seconds = loop.every_seconds
    if seconds is not None:
        return IntervalTrigger(seconds=seconds, start_date=start, timezone=tz)
    if loop.cron is None:  # unreachable for a validated LoopConfig
        raise ValueError("loop has neither every nor cron")
    return cron_trigger(loop.cron, tz)


def next_fire_times(
    loop: LoopConfig,
    tz: ZoneInfo,
    n: int = 3,
    now: datetime | None = None,
    *,
    name: str | None = None,
) -> list[datetime]:
    """The next n fire times after now (default: the current time), in tz.

    With the loop's `name`, an `every:` loop's times are the daemon's (its phased grid, see
    the module docstring); without it they are counted one interval from now.
    """
    if now is None:
        now = datetime.now(tz)
    elif now.tzinfo is None:
        now = now.replace(tzinfo=tz)  # a naive time is read as wall time in the config's zone
    start = None
    if loop.every_seconds is not None:
        if name is not None:
            start = anchor_for(loop, name, None, now)
        else:
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


# ---------------------------------------------------------------------------- slots


def _floor_second(at: datetime) -> datetime:
    return at.replace(microsecond=0)


def phase_s(loop_name: str, every_s: int) -> int:
    """A loop's stable offset into its interval, in whole seconds in [0, every_s).

    A hash of the name, not Python's `hash()` (salted per process): the same loop gets the
    same phase in every process, after every restart and on every host.
    """
    if every_s <= 1:
        return 0
    digest = hashlib.blake2b(loop_name.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % every_s


def grid_at_or_after(loop_name: str, every_s: int, at: datetime) -> datetime:
    """The first slot of an `every:` loop's grid (epoch + phase + k·every) at or after `at`."""
    phase = phase_s(loop_name, every_s)
    # Integer arithmetic on epoch seconds: exact, and the grid is the same in any zone.
    t = int(at.timestamp())
    if t < at.timestamp():
        t += 1  # a fractional `at`: the next whole second
    t += (phase - t) % every_s
    return datetime.fromtimestamp(t, UTC)


def anchor_for(
    loop: LoopConfig, loop_name: str, last_slot: datetime | None, now: datetime
) -> datetime | None:
    """The first slot of an `every:` loop's phased grid that the daemon may fire; None for cron.

    After a last slot: the first grid point at least one interval later (the grid point one
    interval on when the last slot is on the grid, so a restart keeps the cadence). A loop that
    never ran, or whose last slot is in the future (the clock went back): the first grid point
    at or after now (APScheduler moves a start in the past to the next grid point).

    Whole seconds: APScheduler adds intervals as float timestamps, exact only for integers.
    """
    seconds = loop.every_seconds
    if seconds is None:
        return None
    if last_slot is not None and last_slot <= now:
        after = _floor_second(last_slot) + timedelta(seconds=seconds)
        return grid_at_or_after(loop_name, seconds, after)
    return grid_at_or_after(loop_name, seconds, _floor_second(now))


def loop_trigger(loop: LoopConfig, tz: ZoneInfo, anchor: datetime | None) -> BaseTrigger:
    """The daemon's trigger of a loop: its nominal slots, without jitter (applied per run)."""
    return trigger_for(loop, tz, start=anchor)


def latest_fire(trigger: BaseTrigger, after: datetime, until: datetime) -> datetime | None:
    """The latest fire time of `trigger` in (after, until], or None.

    Searches backwards from `until` in growing windows, so a long gap (a daemon down for a
    month, a minutely cron) costs a few steps, not one per missed slot.
    """
    if until <= after:
        return None
    span = timedelta(seconds=1)
    while True:
        lo = max(after, until - span)
        found: datetime | None = None
        fire: datetime | None = trigger.get_next_fire_time(None, lo)
        while fire is not None and fire <= until:
            if fire > after:
                found = fire
            fire = trigger.get_next_fire_time(fire, fire + timedelta(microseconds=1))
        if found is not None or lo == after:
            return None if found is None else found.astimezone(UTC)
        span *= 4


def slot_at(trigger: BaseTrigger, now: datetime, lookback_s: float) -> datetime:
    """The slot a job firing at `now` runs for: the latest nominal fire time at or before now.

    APScheduler does not tell a job its scheduled time; with coalescing, the run is for the
    latest due slot, and a late run is at most the misfire grace (`lookback_s`) behind.
    """
    found = latest_fire(trigger, now - timedelta(seconds=lookback_s), now)
    return found if found is not None else _floor_second(now.astimezone(UTC))


def missed_slot(
    loop: LoopConfig, loop_name: str, tz: ZoneInfo, last_slot: datetime | None, now: datetime
) -> datetime | None:
    """With `catch_up: once`, the latest slot missed since `last_slot` (to run once at start).

    None with `catch_up: skip`, for a loop that never ran on schedule, or when nothing was
    missed.
    """
    if loop.catch_up != "once" or last_slot is None:
        return None
    trigger = loop_trigger(loop, tz, anchor_for(loop, loop_name, last_slot, now))
    return latest_fire(trigger, last_slot, now)


def is_active(loop: LoopConfig, at: datetime, tz: ZoneInfo) -> bool:
    """Whether `at` falls inside the loop's `active_hours` (local time); always without them."""
    if loop.active_hours is None:
        return True
    local = at.astimezone(tz)
    return loop.active_hours.contains(local.hour * 60 + local.minute)


def jitter_delay(loop: LoopConfig, rng: random.Random | None = None) -> float:
    """A random delay in [0, jitter] seconds before a scheduled run (0 without `jitter:`).

    Applied by the daemon to each run rather than by APScheduler's trigger: APScheduler 3's
    interval trigger adds each jitter to the next fire time, so the schedule drifts later and
    slots would no longer be the nominal grid.
    """
    seconds = loop.jitter_seconds
    if not seconds:
        return 0.0
    return (rng or random).uniform(0, seconds)


def schedule_key(loop: LoopConfig) -> tuple[Any, ...]:
    """What of a loop decides its job; a reload reschedules the loop only when this changes."""
    return (loop.enabled, loop.every, loop.cron)


# ---------------------------------------------------------------------------- jobs


def job_id(loop_name: str) -> str:
    """The APScheduler job id of a loop."""
    return JOB_PREFIX + loop_name


def add_loop_job(
    scheduler: Any,
    loop_name: str,
    func: Callable[[str], Awaitable[None]],
    trigger: BaseTrigger,
    misfire_grace_s: float,
) -> Any:
    """Add (or replace) a loop's job: one instance at a time, missed runs coalesced into one.

    `func` is awaited by APScheduler with the loop name; it must return at once (start an
    agentd-owned task), because APScheduler's shutdown cancels coroutine jobs still running.
    """
    return scheduler.add_job(
        func,
        trigger,
        args=[loop_name],
        id=job_id(loop_name),
        name=loop_name,
        max_instances=1,
        coalesce=True,
        misfire_grace_time=max(1, round(misfire_grace_s)),
        replace_existing=True,
    )


def remove_loop_job(scheduler: Any, loop_name: str) -> bool:
    """Remove a loop's job if it has one; returns whether it had."""
    from apscheduler.jobstores.base import JobLookupError

    try:
        scheduler.remove_job(job_id(loop_name))
    except JobLookupError:
        return False
    return True


def next_run_time(scheduler: Any, loop_name: str) -> datetime | None:
    """When the scheduler will next fire a loop's job (None: not scheduled or paused)."""
    job = scheduler.get_job(job_id(loop_name))
    when = None if job is None else job.next_run_time
    return when if isinstance(when, datetime) else None
