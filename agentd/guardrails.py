"""Guardrails beyond budgets: per-run ceilings, the anomaly breaker, projected monthly cost.

- **Ceilings** (`limits:` on a loop): checked before every attempt of the run, so a runaway
  handler is stopped before the call that would pass one. Calls are attempts (retries and
  fallbacks count); tokens are the settled input + output tokens so far; USD is what the run
  has spent (or may have been billed) plus the worst-case reservation of the next attempt. A
  refused attempt writes no `calls` row and reserves nothing; the run is recorded `failed`
  with the reason, whatever a handler does with the exception. Handler loops default to
  20 calls and 200,000 tokens (no USD ceiling unless set); prompt loops have none unless set
  (their route already bounds their calls). A key set to null means no ceiling.
- **Anomaly breaker**: after an `ok` run, if its cost exceeds `factor` × the median cost of
  the loop's previous `history` ok runs (of the same kind, real or simulated; only once there
  are `min_runs` of them, and only when that median is above zero) the loop is paused with a
  reason that names the run. `agentd resume LOOP` clears it.
- **Projections** for `agentd check` and reload: runs in the next 30 days × the median cost
  of the loop's latest real ok runs, or the simulator's estimate of one call of its prompt
  template on its primary model when it has no history.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import Any

from agentd import budgets, loopstate
from agentd.config import Config
from agentd.errors import AgentdError
from agentd.ledger import Ledger
from agentd.logs import get_logger
from agentd.loopconfig import AnomalyConfig, LoopConfig, RunLimits
from agentd.pricing import format_usd, from_micro_usd

HANDLER_DEFAULT_LIMITS = RunLimits(max_calls_per_run=20, max_tokens_per_run=200_000)
PROJECTION_DAYS = 30
PROJECTION_HISTORY = 50
_ANOMALY_RUN = re.compile(r"^anomaly: run (\d+) ")


class RunLimitReached(AgentdError):
    """A per-run ceiling stops the run (not a RunFailed: route steps must not swallow it)."""


# ---------------------------------------------------------------------------- ceilings


def run_limits(loop: LoopConfig) -> RunLimits:
    """The loop's effective ceilings: its `limits:`, with handler defaults for keys not given."""
    given = loop.limits or RunLimits()
    if loop.handler is None:
        return given
    defaults = HANDLER_DEFAULT_LIMITS.model_dump()
    return RunLimits(**{**defaults, **given.model_dump(include=given.model_fields_set)})


class RunGuard:
    """Checks a run's ceilings before each attempt; once one is reached, every call refuses."""

    def __init__(self, limits: RunLimits) -> None:
        self.limits = limits
        self.reached: str | None = None
        self.max_usd_micro = (
            None
            if limits.max_usd_per_run is None
            else budgets.limit_to_micro_usd(limits.max_usd_per_run)
        )

    def refuse_if_reached(self) -> None:
        """RunLimitReached when a ceiling was already reached in this run."""
        if self.reached is not None:
            raise RunLimitReached(self.reached)

    def before_attempt(self, calls_made: int, tokens: int, spent: int, reserve: int) -> None:
        """Refuse the next attempt when it would pass a ceiling (RunLimitReached)."""
        self.refuse_if_reached()
        lim = self.limits
        reason = None
        if lim.max_calls_per_run is not None and calls_made >= lim.max_calls_per_run:
            reason = f"limit max_calls_per_run={lim.max_calls_per_run} reached"
        elif lim.max_tokens_per_run is not None and tokens >= lim.max_tokens_per_run:
            reason = (
                f"limit max_tokens_per_run={lim.max_tokens_per_run} reached ({tokens} tokens used)"
            )
        elif self.max_usd_micro is not None and spent + reserve > self.max_usd_micro:
            reason = (
                f"limit max_usd_per_run={lim.max_usd_per_run} reached "
                f"(spent ${format_usd(spent)}, the next call may cost up to "
                f"${format_usd(reserve)})"
            )
        if reason is not None:
            self.reached = reason
            get_logger().warning("guardrail.limit_reached", reason=reason, calls=calls_made)
            raise RunLimitReached(reason)


# ---------------------------------------------------------------------------- anomaly breaker


def anomaly_settings(config: Config, loop_name: str) -> AnomalyConfig:
    """`guardrails.anomaly` with the loop's own `anomaly:` keys laid over it."""
    base = config.guardrails.anomaly
    own = config.loops[loop_name].anomaly
    if own is None:
        return base
    merged = {**base.model_dump(), **own.model_dump(include=own.model_fields_set)}
    return AnomalyConfig(**merged)


def median(values: list[int]) -> Decimal:
    """The median of integers, exactly (the mean of the middle two for an even count)."""
    ordered = sorted(values)
    mid = len(ordered) // 2
    if len(ordered) % 2:
        return Decimal(ordered[mid])
    return (Decimal(ordered[mid - 1]) + Decimal(ordered[mid])) / 2


def _usd4(micro: Decimal | int) -> str:
    """Money for a human sentence: USD with 4 decimals (exact figures are in the ledger)."""
    value = from_micro_usd(micro) if isinstance(micro, int) else Decimal(micro) / 1_000_000
    return f"${value.quantize(Decimal('0.0001'))}"


def check_anomaly(
    config: Config, ledger: Ledger, loop_name: str, run_id: int, *, simulated: bool = False
) -> str | None:
    """After an ok run: pause the loop when its cost is an anomaly; the pause reason, or None."""
    settings = anomaly_settings(config, loop_name)
    if not settings.enabled:
        return None
    with ledger.read() as conn:
        row = conn.execute(
            "SELECT cost_micro_usd, status FROM runs WHERE id = ?", (run_id,)
        ).fetchone()
        if row is None or row[1] != "ok":
            return None
        cost = int(row[0] or 0)
        history = [
            int(r[0] or 0)
            for r in conn.execute(
                "SELECT cost_micro_usd FROM runs WHERE loop = ? AND status = 'ok'"
                " AND simulated = ? AND id < ? ORDER BY started_at DESC, id DESC LIMIT ?",
                (loop_name, int(simulated), run_id, settings.history),
            )
        ]
    if len(history) < settings.min_runs:
        return None
    mid = median(history)
    if mid <= 0 or Decimal(cost) <= settings.factor * mid:
        return None
    ratio = (Decimal(cost) / mid).quantize(Decimal("0.1"))
    reason = (
        f"anomaly: run {run_id} cost {_usd4(cost)} = {ratio}× the median {_usd4(mid)} "
        f"of the loop's last {len(history)} ok runs (limit {settings.factor}×)"
    )
    loopstate.set_paused(ledger, loop_name, reason, None)
    get_logger().warning(
        "guardrail.anomaly",
        loop=loop_name,
        run_id=run_id,
        cost_micro_usd=cost,
        median_micro_usd=str(mid),
        ratio=str(ratio),
        factor=str(settings.factor),
        runs=len(history),
        note=f"loop paused; agentd resume {loop_name} clears it",
    )
    return reason


def anomaly_run_id(paused_reason: str | None) -> int | None:
    """The run id named by an anomaly pause reason (for `agentd status`), else None."""
    match = _ANOMALY_RUN.match(paused_reason or "")
    return int(match.group(1)) if match else None


# ---------------------------------------------------------------------------- projections


@dataclass(frozen=True)
class LoopProjection:
    """A loop's projected spend over PROJECTION_DAYS days and where the per-run cost came from."""

    loop: str
    runs: int
    per_run_micro_usd: Decimal | None  # None: a model without a price
    history_runs: int  # 0: simulated estimate
    monthly_micro_usd: int | None

    @property
    def runs_per_day(self) -> Decimal:
        """Scheduled runs per day (may be a fraction for weekly crons)."""
        return (Decimal(self.runs) / PROJECTION_DAYS).quantize(Decimal("0.01")).normalize()


def _median_history(ledger: Ledger | None, loop_name: str) -> list[int]:
    if ledger is None:
        return []
    with ledger.read() as conn:
        return [
            int(r[0] or 0)
            for r in conn.execute(
                "SELECT cost_micro_usd FROM runs WHERE loop = ? AND status = 'ok'"
                " AND simulated = 0 ORDER BY started_at DESC, id DESC LIMIT ?",
                (loop_name, PROJECTION_HISTORY),
            )
        ]


def simulated_run_micro_usd(config: Config, loop_name: str) -> Decimal | None:
    """The simulator's cost of one call of the loop's prompt template on its primary model."""
    from agentd.pricing import cost_usd, to_micro_usd
    from agentd.providers.base import Usage
    from agentd.providers.simulated import MESSAGE_OVERHEAD, REPLY_OVERHEAD

    loop = config.loops[loop_name]
    primary = config.chain(loop_name)[0]
    price = config.price(primary.alias, batch=loop.batch is not None)  # a batch loop pays half
    if price is None:
        return None
    text = ""
    if loop.prompt is not None:
        try:
            text = config.prompt_path(loop_name).read_text(encoding="utf-8")
        except OSError:
            text = ""
    prompt_bytes = len(text.encode()) + len((loop.system or "").encode())
    # The simulator's own token estimate (see providers/simulated.py), and all of max_tokens:
    # a projection should err on the dear side.
    usage = Usage(
        input_tokens=max(1, prompt_bytes // 4 + MESSAGE_OVERHEAD + REPLY_OVERHEAD),
        output_tokens=loop.max_tokens,
    )
    return Decimal(to_micro_usd(cost_usd(price, usage)))


def project_loop(
    config: Config, ledger: Ledger | None, loop_name: str, now: datetime
) -> LoopProjection:
    """One loop's projection over the next PROJECTION_DAYS days."""
    from datetime import timedelta

    from agentd.projection import count_runs

    loop = config.loops[loop_name]
    runs = count_runs(loop, config, now, now + timedelta(days=PROJECTION_DAYS))
    history = _median_history(ledger, loop_name)
    per_run = median(history) if history else simulated_run_micro_usd(config, loop_name)
    monthly = None if per_run is None else int((per_run * runs).to_integral_value(ROUND_CEILING))
    return LoopProjection(loop_name, runs, per_run, len(history), monthly)


def projected_total(
    config: Config, ledger: Ledger | None, now: datetime | None = None
) -> tuple[int, dict[str, LoopProjection]]:
    """Every loop's projection and their total in micro-USD (unpriced loops count 0)."""
    at = now or datetime.now(UTC)
    rows = {name: project_loop(config, ledger, name, at) for name in config.loops}
    return sum(p.monthly_micro_usd or 0 for p in rows.values()), rows


def _monthly_caps(loop: LoopConfig) -> list[tuple[str, int]]:
    """A loop's budget windows scaled to PROJECTION_DAYS days: (how, micro-USD)."""
    if loop.budget is None:
        return []
    factors: dict[str, Decimal] = {
        "hour": Decimal(24 * PROJECTION_DAYS),
        "day": Decimal(PROJECTION_DAYS),
        "week": Decimal(PROJECTION_DAYS) / 7,
    }
    caps = []
    for period, limit in loop.budget.limits().items():
        micro = budgets.limit_to_micro_usd(limit)
        if period == "month":
            caps.append((f"per_month_usd {limit}", micro))
        else:
            factor = factors[period]
            scaled = int(Decimal(micro) * factor)  # rounded down, like the limits themselves
            shown = factor.quantize(Decimal("0.01")).normalize()
            caps.append((f"per_{period}_usd {limit} × {shown:f}", scaled))
    return caps


def projection_lines(config: Config, projection: LoopProjection) -> tuple[list[str], list[str]]:
    """The `agentd check` lines of one loop, and its warnings."""
    loop = config.loops[projection.loop]
    name = projection.loop
    if projection.monthly_micro_usd is None or projection.per_run_micro_usd is None:
        return ["projected: unknown (a model of this loop has no price)"], []
    monthly = projection.monthly_micro_usd
    source = (
        f"from {projection.history_runs} runs"
        if projection.history_runs
        else "(simulated estimate: no history)"
    )
    what = "median" if projection.history_runs else "estimate"
    line = (
        f"projected: {_usd4(monthly)}/month ({projection.runs_per_day} runs/day × {what} "
        f"{_usd4(projection.per_run_micro_usd)} {source})"
    )
    lines = [line]
    warnings: list[str] = []
    caps = _monthly_caps(loop)
    if caps:
        how, cap = min(caps, key=lambda c: c[1])
        lines.append(f"budget: {_usd4(cap)}/month ({how})")
        if monthly > cap:
            warnings.append(
                f"loop {name}: projected {_usd4(monthly)}/month exceeds its budget "
                f"{_usd4(cap)}/month ({how}): the loop would be starved "
                f"(when_over_budget: {loop.when_over_budget})"
            )
    else:
        threshold = config.guardrails.warn_unbudgeted_usd_per_month
        if from_micro_usd(monthly) > threshold:
            warnings.append(
                f"loop {name}: no budget, projected {_usd4(monthly)}/month is above "
                f"guardrails.warn_unbudgeted_usd_per_month ${threshold}: add a budget"
            )
    return lines, warnings


def check_projection(
    config: Config, state_dir: Path, *, now: datetime | None = None
) -> tuple[dict[str, list[str]], list[str]]:
    """For `agentd check`: per loop its projection lines, and the warnings of all loops.

    The ledger is opened read-only when it exists (history); without one, every loop is a
    simulated estimate. Disabled loops project 0 runs.
    """
    ledger = _open_read_only(state_dir)
    try:
        _, rows = projected_total(config, ledger, now)
    finally:
        if ledger is not None:
            ledger.close()
    lines: dict[str, list[str]] = {}
    warnings: list[str] = []
    for name, projection in rows.items():
        loop_lines, loop_warnings = projection_lines(config, projection)
        lines[name] = loop_lines
        warnings.extend(loop_warnings)
    return lines, warnings


def _open_read_only(state_dir: Path) -> Ledger | None:
    from agentd.ledger import DB_NAME

    if not (state_dir / DB_NAME).exists():
        return None
    try:
        return Ledger.open(state_dir, create=False, reconcile=False)
    except AgentdError:
        return None


def reload_cost_change(
    old: Config, new: Config, ledger: Ledger | None, *, now: datetime | None = None
) -> dict[str, Any] | None:
    """Log `daemon.reload_cost_increase` when a reload raises the projected monthly total by
    more than `guardrails.reload_increase_warn`; the figures (decimal strings) when it does."""
    at = now or datetime.now(UTC)
    before, _ = projected_total(old, ledger, at)
    after, _ = projected_total(new, ledger, at)
    share = new.guardrails.reload_increase_warn
    if after <= before * (1 + share) or after == before:
        return None
    figures: dict[str, Any] = {
        "before_usd_per_month": format_usd(before),
        "after_usd_per_month": format_usd(after),
        "increase_pct": (
            None
            if before == 0
            else str(((Decimal(after) - before) * 100 / before).quantize(Decimal("0.1")))
        ),
        "threshold_pct": str((share * 100).normalize()),
    }
    get_logger().warning("daemon.reload_cost_increase", **figures)
    return figures
