"""Guardrails beyond budgets: per-run ceilings, the anomaly breaker, projected monthly cost.

- **Ceilings** (`limits:` on a loop): checked before every attempt of the run, so a runaway
  handler is stopped before the call that would pass one: a ceiling is never exceeded. Calls
  are attempts (retries and fallbacks count); tokens are the settled input + output tokens so
  far plus the next attempt's worst case (its input bound, one token per UTF-8 byte as the
  reservation counts it, plus its max_tokens); USD is what the run has spent (or may have been
  billed) plus the worst-case reservation of the next attempt. A refused attempt writes no
  `calls` row and reserves nothing; the run is recorded `failed` with the reason, whatever a
  handler does with the exception. Handler loops default to 20 calls and 200,000 tokens (no
  USD ceiling unless set); prompt loops have none unless set (their route already bounds
  their calls). A key set to null means no ceiling.
- **Anomaly breaker** (`check_anomaly`): after an `ok` run, if its cost exceeds `factor` ×
  the median cost of the loop's previous `history` ok runs since the last anomaly resume (of
  the same kind, real or simulated; only once there are `min_runs` of them, and only when that
  median is above zero) the loop is paused with a reason that names the run. `agentd resume
  LOOP` clears it and re-arms the breaker on a new baseline.
- **Projections** for `agentd check` and reload: runs in the next 30 days × the share of the
  loop's latest real ticks that called the model (the rest were `skipped_noop`) × the median
  cost of its latest real ok runs, or the simulator's estimate of one call of its prompt
  template on its primary model when it has no history. `check` also compares the total with
  the global budgets.
"""

from __future__ import annotations

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
from agentd.loopconfig import AnomalyConfig, BudgetConfig, LoopConfig, RunLimits
from agentd.pricing import format_usd, from_micro_usd, request_token_bound

HANDLER_DEFAULT_LIMITS = RunLimits(max_calls_per_run=20, max_tokens_per_run=200_000)
PROJECTION_DAYS = 30
PROJECTION_HISTORY = 50


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

    def before_attempt(
        self, calls_made: int, tokens: int, spent: int, reserve: int, call_tokens: int = 0
    ) -> None:
        """Refuse the next attempt when it would pass a ceiling (RunLimitReached).

        `call_tokens` is the attempt's worst case (`call_token_bound`); 0 when unknown, which
        only refuses once the ceiling is already reached.
        """
        self.refuse_if_reached()
        lim = self.limits
        reason = None
        if lim.max_calls_per_run is not None and calls_made >= lim.max_calls_per_run:
            reason = f"limit max_calls_per_run={lim.max_calls_per_run} reached"
        elif lim.max_tokens_per_run is not None and (
            tokens >= lim.max_tokens_per_run or tokens + call_tokens > lim.max_tokens_per_run
        ):
            # The attempt is refused, not shrunk to the tokens left: a smaller max_tokens would
            # hand the caller a reply cut short (a handler cannot tell it from a whole one; a
            # JSON answer would not parse), and since the input bound counts one token per byte
            # (about 4× the real count) what is "left" would often be no useful reply at all.
            # Refusing also matches max_usd_per_run, which never shrinks a call either.
            reason = (
                f"limit max_tokens_per_run={lim.max_tokens_per_run} reached ({tokens} tokens "
                f"used, the next call may use up to {call_tokens})"
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


def call_token_bound(prompt: str, system: str | None, max_tokens: int) -> int:
    """An attempt's worst-case tokens: the reservation's input bound plus all of max_tokens."""
    return request_token_bound(system, [prompt]) + max_tokens


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


def usd6(micro: Decimal | int) -> str:
    """Money for a human sentence: `$` and USD with 6 decimals, like the reports' figures."""
    value = from_micro_usd(micro) if isinstance(micro, int) else Decimal(micro) / 1_000_000
    return f"${value.quantize(Decimal('0.000001'))}"


def check_anomaly(
    config: Config, ledger: Ledger, loop_name: str, run_id: int, *, simulated: bool = False
) -> str | None:
    """After an ok run: pause the loop when its cost is an anomaly; the pause reason, or None.

    The run is an anomaly when it costs more than `factor` × the median cost of the loop's
    previous `history` ok runs of the same kind (real or simulated), once there are `min_runs`
    of them and their median is above zero. The pause names the run (`agentd status` shows
    it) and is noted in its route (`route.anomaly`: ratio, median, factor, runs).

    `agentd resume LOOP` re-arms the breaker on a new baseline: the median only counts the ok
    runs after the resumed anomaly run (`loopstate.anomaly_history`), so the breaker waits for
    `min_runs` fresh runs before it can trip again, and then compares with what the loop costs
    now. A loop whose cost has legitimately risen thus gets out with one resume (the next
    `min_runs` runs are watched only by budgets and ceilings), while one that keeps rising is
    paused again once it has a fresh history.
    """
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
    history, since = loopstate.anomaly_history(
        ledger, loop_name, run_id, simulated, settings.history
    )
    if len(history) < settings.min_runs:
        return None
    mid = median(history)
    if mid <= 0 or Decimal(cost) <= settings.factor * mid:
        return None
    ratio = (Decimal(cost) / mid).quantize(Decimal("0.1"))
    baseline = "" if since is None else f" since the resume after run {since}"
    reason = (
        f"{loopstate.ANOMALY_PREFIX}{run_id} cost {usd6(cost)} = {ratio}× the median "
        f"{usd6(mid)} of the loop's last {len(history)} ok runs{baseline} "
        f"(limit {settings.factor}×)"
    )
    details = {
        "ratio": str(ratio),
        "median_micro_usd": str(mid),
        "factor": str(settings.factor),
        "runs": len(history),
        "since_run": since,
    }
    loopstate.pause_for_anomaly(ledger, loop_name, run_id, reason, details)
    get_logger().warning(
        "guardrail.anomaly",
        loop=loop_name,
        run_id=run_id,
        cost_micro_usd=cost,
        median_micro_usd=str(mid),
        ratio=str(ratio),
        factor=str(settings.factor),
        runs=len(history),
        since_run=since,
        note=f"loop paused; agentd resume {loop_name} clears it",
    )
    return reason


# ---------------------------------------------------------------------------- projections


@dataclass(frozen=True)
class LoopProjection:
    """A loop's projected spend over PROJECTION_DAYS days and where the per-run cost came from."""

    loop: str
    runs: int
    per_run_micro_usd: Decimal | None  # None: a model without a price
    history_runs: int  # 0: simulated estimate
    monthly_micro_usd: int | None
    ticks: int = 0  # the loop's latest real ticks that got past scheduling (ok, failed, no-op)
    model_ticks: int = 0  # of those, the ones that went on to call the model (not skipped_noop)

    @property
    def runs_per_day(self) -> Decimal:
        """Scheduled runs per day (may be a fraction for weekly crons)."""
        return (Decimal(self.runs) / PROJECTION_DAYS).quantize(Decimal("0.01")).normalize()

    @property
    def call_share(self) -> Decimal:
        """The share of ticks that call the model (1 without history of ticks)."""
        return Decimal(1) if self.ticks == 0 else Decimal(self.model_ticks) / self.ticks


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


def _tick_history(ledger: Ledger | None, loop_name: str) -> tuple[int, int]:
    """(ticks, ticks that called the model) over the loop's latest real ticks.

    A tick is a run that was due and not held back by a budget, a pause or active hours: the
    precheck or an empty checklist decides whether it calls the model (`skipped_noop` if not).
    """
    if ledger is None:
        return 0, 0
    with ledger.read() as conn:
        row = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(status != 'skipped_noop'), 0) FROM (SELECT status"
            " FROM runs WHERE loop = ? AND simulated = 0"
            " AND status IN ('ok', 'failed', 'aborted', 'skipped_noop')"
            " ORDER BY started_at DESC, id DESC LIMIT ?)",
            (loop_name, PROJECTION_HISTORY),
        ).fetchone()
    return int(row[0]), int(row[1])


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
    ticks, model_ticks = _tick_history(ledger, loop_name)
    per_run = median(history) if history else simulated_run_micro_usd(config, loop_name)
    monthly = None
    if per_run is not None:
        # Ticks skipped as no-ops cost nothing: only the share that calls the model is paid.
        share = Decimal(1) if ticks == 0 else Decimal(model_ticks) / ticks
        monthly = int((per_run * runs * share).to_integral_value(ROUND_CEILING))
    return LoopProjection(loop_name, runs, per_run, len(history), monthly, ticks, model_ticks)


def projected_total(
    config: Config, ledger: Ledger | None, now: datetime | None = None
) -> tuple[int, dict[str, LoopProjection]]:
    """Every loop's projection and their total in micro-USD (unpriced loops count 0)."""
    at = now or datetime.now(UTC)
    rows = {name: project_loop(config, ledger, name, at) for name in config.loops}
    return sum(p.monthly_micro_usd or 0 for p in rows.values()), rows


def _monthly_caps(budget: BudgetConfig | None) -> list[tuple[str, int]]:
    """Budget windows scaled to PROJECTION_DAYS days: (how, micro-USD)."""
    if budget is None:
        return []
    factors: dict[str, Decimal] = {
        "hour": Decimal(24 * PROJECTION_DAYS),
        "day": Decimal(PROJECTION_DAYS),
        "week": Decimal(PROJECTION_DAYS) / 7,
    }
    caps = []
    for period, limit in budget.limits().items():
        micro = budgets.limit_to_micro_usd(limit)
        if period == "month":
            caps.append((f"per_month_usd {limit}", micro))
        else:
            factor = factors[period]
            scaled = int(Decimal(micro) * factor)  # rounded down, like the limits themselves
            shown = factor.quantize(Decimal("0.01")).normalize()
            caps.append((f"per_{period}_usd {limit} × {shown:f}", scaled))
    return caps


def _per_run_text(projection: LoopProjection) -> str:
    """How a projection was made: runs/day, the share of ticks that call the model, per run."""
    assert projection.per_run_micro_usd is not None
    parts = [f"{projection.runs_per_day} runs/day"]
    if projection.model_ticks < projection.ticks:
        pct = (projection.call_share * 100).quantize(Decimal("0.1")).normalize()
        parts.append(
            f"{pct:f}% calling the model ({projection.model_ticks} of the last "
            f"{projection.ticks} ticks; the rest were skipped_noop)"
        )
    if projection.history_runs:
        parts.append(
            f"median {usd6(projection.per_run_micro_usd)} from {projection.history_runs} runs"
        )
    else:
        parts.append(
            f"estimate {usd6(projection.per_run_micro_usd)} (simulated estimate: no history)"
        )
    return " × ".join(parts)


def projection_lines(config: Config, projection: LoopProjection) -> tuple[list[str], list[str]]:
    """The `agentd check` lines of one loop, and its warnings."""
    loop = config.loops[projection.loop]
    name = projection.loop
    if projection.monthly_micro_usd is None or projection.per_run_micro_usd is None:
        return ["projected: unknown (a model of this loop has no price)"], []
    monthly = projection.monthly_micro_usd
    lines = [f"projected: {usd6(monthly)}/month ({_per_run_text(projection)})"]
    warnings: list[str] = []
    caps = _monthly_caps(loop.budget)
    if caps:
        how, cap = min(caps, key=lambda c: c[1])
        lines.append(f"budget: {usd6(cap)}/month ({how})")
        if monthly > cap:
            warnings.append(
                f"loop {name}: projected {usd6(monthly)}/month exceeds its budget "
                f"{usd6(cap)}/month ({how}): the loop would be starved "
                f"(when_over_budget: {loop.when_over_budget})"
            )
    else:
        threshold = config.guardrails.warn_unbudgeted_usd_per_month
        if from_micro_usd(monthly) > threshold:
            warnings.append(
                f"loop {name}: no budget, projected {usd6(monthly)}/month is above "
                f"guardrails.warn_unbudgeted_usd_per_month ${threshold}: add a budget"
            )
    return lines, warnings


def total_lines(
    config: Config, total: int, rows: dict[str, LoopProjection]
) -> tuple[list[str], list[str]]:
    """The projected total of all loops, and a warning per global budget it exceeds."""
    unpriced = sorted(name for name, p in rows.items() if p.monthly_micro_usd is None)
    note = f" (not counted, no price: {', '.join(unpriced)})" if unpriced else ""
    lines = [f"projected total: {usd6(total)}/month over {len(rows)} loops{note}"]
    warnings = []
    for how, cap in _monthly_caps(config.budgets):
        if total > cap:
            warnings.append(
                f"projected total {usd6(total)}/month of all loops exceeds the global budget "
                f"{usd6(cap)}/month ({how}): loops would be refused once it is spent"
            )
    return lines, warnings


@dataclass(frozen=True)
class ProjectionCheck:
    """What `agentd check` shows of the projections: per loop, the total, and the warnings."""

    lines: dict[str, list[str]]
    total: list[str]
    warnings: list[str]


def check_projection(
    config: Config, state_dir: Path, *, now: datetime | None = None
) -> ProjectionCheck:
    """For `agentd check`: per loop its projection lines, the total, and every warning.

    The ledger is opened read-only when it exists (history); without one, every loop is a
    simulated estimate. Disabled loops project 0 runs.
    """
    ledger = _open_read_only(state_dir)
    try:
        total, rows = projected_total(config, ledger, now)
    finally:
        if ledger is not None:
            ledger.close()
    lines: dict[str, list[str]] = {}
    warnings: list[str] = []
    for name, projection in rows.items():
        loop_lines, loop_warnings = projection_lines(config, projection)
        lines[name] = loop_lines
        warnings.extend(loop_warnings)
    overall, global_warnings = total_lines(config, total, rows)
    return ProjectionCheck(lines, overall, warnings + global_warnings)


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
