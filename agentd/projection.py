"""`agentd plan`: a config's projected spend over the next days, per loop, against its budgets.

Per loop: **runs** = the loop's scheduled fire times in [now, now + days) — an `every:` loop
first fires one interval from now, like the daemon — less those outside `active_hours`; a
disabled loop runs 0 times. Runs started by `on_reply`, `agentd once` or `trigger` are not
scheduled and not projected. **Cost per run** = the mean, over the loop's latest real `ok` runs
(`history` of them), of the run's `ok` calls re-priced on this config's models (each call on
the primary model of its tier, see `reprice.Target`), each call rounded up to micro-USD like the
ledger; a loop without such runs is estimated by the built-in simulator for one call of its
prompt template (context not filled in) and `max_tokens` on its primary model. Retries and
failed attempts are not projected. A `batch:` loop is priced at batch rates; a loop priced
by the simulator (which does not model caches) takes its cache decision's expected saving.
**Saved** = the same tokens at list price (all input uncached, no batch discount) less the
projection: what caching and batching are expected to save.

Budgets are compared as rates: a window's limit scaled to the period (`per_day_usd` × days,
`per_week_usd` × days / 7, `per_month_usd` × days / 30.436875, the mean Gregorian month,
`per_hour_usd` × 24 × days), the tightest window of the loop (or of the global budget against
the total) deciding. Rounded down to micro-USD, like the limits themselves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import Any

from agentd.budgets import limit_to_micro_usd
from agentd.config import Config
from agentd.ledger import Ledger
from agentd.loopconfig import BudgetConfig, LoopConfig
from agentd.pricing import MICRO, cost_usd, format_usd, to_micro_usd
from agentd.providers.base import Message, Request, Usage
from agentd.providers.simulated import SimulatedProvider
from agentd.reports import Column
from agentd.reprice import Target, config_label, format_percent, percent_change
from agentd.scheduling import is_active, trigger_for

HISTORY_RUNS = 50
# Hours in a budget period; a month is the mean Gregorian month (365.2425 / 12 days).
PERIOD_HOURS = {
    "hour": Decimal(1),
    "day": Decimal(24),
    "week": Decimal(168),
    "month": Decimal("730.485"),
}


def count_runs(loop: LoopConfig, config: Config, start: datetime, end: datetime) -> int:
    """Scheduled fire times of a loop in [start, end) inside its active hours."""
    if not loop.enabled:
        return 0
    tz = config.tz
    seconds = loop.every_seconds
    if seconds is not None:
        first = start + timedelta(seconds=seconds)
        if first >= end:
            return 0
        count = (end - first - timedelta(microseconds=1)) // timedelta(seconds=seconds) + 1
        if loop.active_hours is None:
            return count
        return sum(
            1 for k in range(count) if is_active(loop, first + timedelta(seconds=seconds * k), tz)
        )
    trigger = trigger_for(loop, tz)
    runs = 0
    previous = None
    fire = trigger.get_next_fire_time(None, start)
    while fire is not None and fire < end:
        if is_active(loop, fire, tz):
            runs += 1
        previous = fire
        fire = trigger.get_next_fire_time(previous, fire + timedelta(microseconds=1))
    return runs


def scaled_cap(budget: BudgetConfig | None, days: int) -> tuple[int, str] | None:
    """The tightest window of a budget scaled to `days`, in micro-USD, and how it was scaled."""
    if budget is None:
        return None
    best: tuple[int, str] | None = None
    for period, limit in budget.limits().items():
        micro = limit_to_micro_usd(limit)
        scaled = int(
            (Decimal(micro) * days * 24 / PERIOD_HOURS[period]).to_integral_value(ROUND_FLOOR)
        )
        factor = Decimal(days) * 24 / PERIOD_HOURS[period]
        how = f"per_{period}_usd {limit} × {factor.quantize(Decimal('0.0001')).normalize():f}"
        if best is None or scaled < best[0]:
            best = (scaled, how)
    return best


def _history(ledger: Ledger, loop: str, runs: int) -> list[list[tuple[Any, ...]]]:
    """The `ok` calls (tier, token counts) of the loop's latest real `ok` runs, per run."""
    with ledger.read() as conn:
        ids = [
            int(r[0])
            for r in conn.execute(
                "SELECT id FROM runs WHERE loop = ? AND simulated = 0 AND status = 'ok'"
                " ORDER BY started_at DESC, id DESC LIMIT ?",
                (loop, runs),
            )
        ]
        if not ids:
            return []
        marks = ", ".join("?" for _ in ids)
        per_run: dict[int, list[tuple[Any, ...]]] = {i: [] for i in ids}
        for run_id, *call in conn.execute(
            "SELECT run_id, tier, input_tokens, output_tokens, cache_read_tokens,"
            " cache_write_tokens, cache_write_1h_tokens"
            f" FROM calls WHERE run_id IN ({marks}) AND status = 'ok'",
            ids,
        ):
            per_run[int(run_id)].append(tuple(call))
    return list(per_run.values())


def _simulated_usage(config: Config, name: str) -> Usage:
    """What the built-in simulator reports for one call of the loop's prompt template."""
    loop = config.loops[name]
    text = config.prompt_path(name).read_text(encoding="utf-8") if loop.prompt else ""
    request = Request(
        model=config.chain(name)[0].model.model,
        messages=(Message(role="user", content=text),),
        max_tokens=loop.max_tokens,
        system=loop.system,
    )
    return asyncio.run(SimulatedProvider().complete(request)).usage


@dataclass(frozen=True)
class Plan:
    """A config's projection: one row per loop, the global row, and the warnings."""

    config: Config
    days: int
    start: datetime
    rows: list[dict[str, Any]]  # per loop, then the `global` row
    warnings: list[str]

    @property
    def total(self) -> dict[str, Any]:
        """The global row (the total of every loop, against the global budget)."""
        return self.rows[-1]


def plan(
    config: Config,
    ledger: Ledger | None,
    *,
    days: int = 30,
    now: datetime,
    reference: Config | None = None,
    history: int = HISTORY_RUNS,
) -> Plan:
    """Project the spend of `config` over `days` from `now` (history from `ledger`).

    `reference` is the config that produced the ledger (tells a loop's own calls from its
    helper calls when re-pricing history); it defaults to `config`.
    """
    if days <= 0:
        raise ValueError("days must be at least 1")
    reference = config if reference is None else reference
    end = now + timedelta(days=days)
    target = Target(config, config_label(config))
    rows: list[dict[str, Any]] = []
    warnings: list[str] = []
    total = 0
    saved_total = 0
    unpriced: list[str] = []
    for name, loop in config.loops.items():
        runs = count_runs(loop, config, now, end)
        primary = config.chain(name)[0]
        row: dict[str, Any] = {
            "scope": "loop",
            "name": name,
            "schedule": f"every {loop.every}" if loop.every else f"cron {loop.cron}",
            "runs": runs,
            "model": f"{primary.alias} ({primary.model.model})",
        }
        history_runs = _history(ledger, name, history) if ledger is not None else []
        batch = loop.batch is not None
        per_run: Decimal | None = Decimal(0)
        listed: Decimal | None = Decimal(0)  # the same tokens at list price: no cache, no batch
        tokens = [0, 0, 0, 0]  # input, cache read, cache write, output
        if history_runs:
            row["source"] = f"history: {len(history_runs)} run(s)"
            for calls in history_runs:
                for tier, inp, out, cache_read, cache_write, write_1h in calls:
                    usage = Usage(
                        input_tokens=int(inp or 0),
                        output_tokens=int(out or 0),
                        cache_read_tokens=int(cache_read or 0),
                        cache_write_tokens=int(cache_write or 0),
                        # 1-hour writes cost more than 5-minute ones (NULL before m009: none).
                        cache_write_1h_tokens=int(write_1h or 0),
                    )
                    tokens = [
                        tokens[0] + usage.input_tokens,
                        tokens[1] + usage.cache_read_tokens,
                        tokens[2] + usage.cache_write_tokens,
                        tokens[3] + usage.output_tokens,
                    ]
                    entry = target.entry(reference, name, tier)
                    price = None if entry is None else config.price(entry.alias, batch=batch)
                    if entry is None or price is None or per_run is None:
                        per_run = None
                        continue
                    per_run += to_micro_usd(cost_usd(price, usage))
                    listed = _list_cost(config, entry.alias, usage, listed)
            n = len(history_runs)
            if per_run is not None:
                per_run /= n
            if listed is not None:
                listed /= n
        else:
            # A handler may make several calls per run; the simulator can only price one.
            row["source"] = (
                "disabled"
                if not loop.enabled
                else "simulator (1 call of a handler)"
                if loop.handler is not None
                else "simulator"
            )
            usage = _simulated_usage(config, name)
            tokens = [usage.input_tokens, usage.cache_read_tokens, usage.cache_write_tokens,
                      usage.output_tokens]  # fmt: skip
            n = 1
            price = config.price(primary.alias, batch=batch)
            per_run = None if price is None else Decimal(to_micro_usd(cost_usd(price, usage)))
            listed = _list_cost(config, primary.alias, usage, Decimal(0))
            saving = _cache_saving_per_run(config, name, now)
            if per_run is not None and saving > 0:
                # The simulator does not model the cache: take the decision's expected saving.
                per_run = max(per_run - saving * MICRO, Decimal(0))
                row["source"] += f", cache {loop.cache}"
        for key, value in zip(
            ("input_tokens", "cache_read_tokens", "cache_write_tokens", "output_tokens"),
            tokens,
            strict=True,
        ):
            row[key] = int((Decimal(value) / n).to_integral_value())  # mean per run
        row["batch"] = batch
        row["saved_micro_usd"] = None
        if per_run is None:
            unpriced.append(name)
            row["per_run_micro_usd"] = row["projected_micro_usd"] = None
        else:
            row["per_run_micro_usd"] = int(per_run.to_integral_value(ROUND_CEILING))
            row["projected_micro_usd"] = int((per_run * runs).to_integral_value(ROUND_CEILING))
            total += row["projected_micro_usd"]
            if listed is not None:
                at_list = int((listed * runs).to_integral_value(ROUND_CEILING))
                row["saved_micro_usd"] = max(at_list - row["projected_micro_usd"], 0)
                saved_total += row["saved_micro_usd"]
        _against_cap(row, scaled_cap(loop.budget, days), warnings, f"loop {name}", days, loop)
        rows.append(row)
    glob: dict[str, Any] = {
        "scope": "global",
        "name": "total",
        "runs": sum(r["runs"] for r in rows),
        "projected_micro_usd": total,
        "saved_micro_usd": saved_total,
        "source": f"unpriced loops left out: {', '.join(unpriced)}" if unpriced else None,
    }
    _against_cap(glob, scaled_cap(config.budgets, days), warnings, "global budget", days, None)
    rows.append(glob)
    return Plan(config=config, days=days, start=now, rows=rows, warnings=warnings)


def _list_cost(config: Config, alias: str, usage: Usage, into: Decimal | None) -> Decimal | None:
    """`into` plus the call's cost in micro-USD at list price: every input token uncached."""
    price = config.price(alias)
    if price is None or into is None:
        return None
    plain = Usage(input_tokens=usage.input_tokens, output_tokens=usage.output_tokens)
    return into + to_micro_usd(cost_usd(price, plain))


def _cache_saving_per_run(config: Config, name: str, now: datetime) -> Decimal:
    """USD a run of the loop is expected to save by prompt caching (the `auto` decision's)."""
    loop = config.loops[name]
    if loop.prompt is None:
        return Decimal(0)
    from agentd.caching import decide_for_run
    from agentd.context import stable_prefix, stable_sources

    template = config.prompt_path(name).read_text(encoding="utf-8")
    prefix = stable_prefix(template, loop=name, sources=stable_sources(config, name))
    decision = decide_for_run(config, name, prefix, now)
    return decision.expected_saving_usd if decision.ttl is not None else Decimal(0)


def _against_cap(
    row: dict[str, Any],
    cap: tuple[int, str] | None,
    warnings: list[str],
    who: str,
    days: int,
    loop: LoopConfig | None,
) -> None:
    row["cap_micro_usd"] = None if cap is None else cap[0]
    row["cap_window"] = None if cap is None else cap[1]
    projected = row.get("projected_micro_usd")
    over = cap is not None and projected is not None and projected > cap[0]
    row["over_cap"] = over
    row["status"] = "OVER CAP" if over else ("no cap" if cap is None else "ok")
    if over and cap is not None and projected is not None:
        then = (
            f"; when_over_budget: {loop.when_over_budget}, so runs would be "
            + {"skip": "skipped", "downgrade": "downgraded, then skipped", "pause": "paused"}[
                loop.when_over_budget
            ]
            + " once it is reached"
            if loop is not None
            else "; calls would be refused once it is reached"
        )
        warnings.append(
            f"warning: {who} would spend ${format_usd(projected)} in {days} days, over its cap"
            f" ${format_usd(cap[0])} ({cap[1]}){then}"
        )


PLAN_COLUMNS = [
    Column("name", "loop"),
    Column("schedule", "schedule"),
    Column("runs", "runs"),
    Column("model", "primary model"),
    Column("source", "per-run tokens from"),
    Column("input_tokens", "input/run"),
    Column("output_tokens", "output/run"),
    Column("per_run_micro_usd", "per_run_usd", money=True),
    Column("projected_micro_usd", "projected_usd", money=True),
    Column("saved_micro_usd", "saved_vs_list_usd", money=True),
    Column("cap_micro_usd", "cap_usd", money=True),
    Column("status", "status"),
]
PLAN_JSON_COLUMNS = [
    Column("scope", "scope"),
    *PLAN_COLUMNS[:6],
    Column("cache_read_tokens", "cache_read_tokens"),
    Column("cache_write_tokens", "cache_write_tokens"),
    *PLAN_COLUMNS[6:11],
    Column("batch", "batch"),
    Column("cap_window", "cap_window"),
    Column("over_cap", "over_cap"),
]


def compare(this: Plan, other: Plan) -> list[dict[str, Any]]:
    """Side-by-side rows of two plans (every loop of either, then the totals)."""
    mine = {r["name"]: r for r in this.rows[:-1]}
    theirs = {r["name"]: r for r in other.rows[:-1]}
    names = [*mine, *(n for n in theirs if n not in mine)]
    pairs: Sequence[tuple[str, dict[str, Any] | None, dict[str, Any] | None]] = [
        *((n, mine.get(n), theirs.get(n)) for n in names),
        ("total", this.total, other.total),
    ]
    rows = []
    for name, a, b in pairs:
        pa = None if a is None else a.get("projected_micro_usd")
        pb = None if b is None else b.get("projected_micro_usd")
        diff = None if pa is None or pb is None else pb - pa
        pct = None if diff is None else percent_change(Decimal(pb or 0), Decimal(pa or 0))
        rows.append(
            {
                "name": name,
                "this_runs": None if a is None else a["runs"],
                "this_projected_micro_usd": pa,
                "this_status": "not in this config" if a is None else a["status"],
                "other_runs": None if b is None else b["runs"],
                "other_projected_micro_usd": pb,
                "other_status": "not in other config" if b is None else b["status"],
                "difference_micro_usd": diff,
                "other_vs_this_pct": None if pct is None else str(pct),
                "change": format_percent(pct),
            }
        )
    return rows


COMPARE_COLUMNS = [
    Column("name", "loop"),
    Column("this_runs", "runs"),
    Column("this_projected_micro_usd", "this_usd", money=True),
    Column("this_status", "this"),
    Column("other_runs", "other runs"),
    Column("other_projected_micro_usd", "other_usd", money=True),
    Column("other_status", "other"),
    Column("difference_micro_usd", "other − this", money=True),
    Column("change", "change"),
]
COMPARE_JSON_COLUMNS = [c for c in COMPARE_COLUMNS if c.key != "change"] + [
    Column("other_vs_this_pct", "other_vs_this_pct")
]
