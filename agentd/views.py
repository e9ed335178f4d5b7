"""What the CLI shows from a validated config: the check, a run, budgets, plans, re-pricing."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agentd import budgets
from agentd.apikeys import missing_api_keys
from agentd.caching import decide_for_run
from agentd.config import ChainEntry, Config
from agentd.context import check_context, stable_prefix, stable_sources
from agentd.delivery import redact_url
from agentd.guardrails import check_projection
from agentd.handlers import load_handler
from agentd.pricing import format_usd
from agentd.reports import Column, render
from agentd.runend import RunResult
from agentd.scheduling import next_fire_times

# The ledger-only views live in `spendviews` (the fast read path); re-exported here.
from agentd.spendviews import CALL_COLUMNS as CALL_COLUMNS
from agentd.spendviews import calls_report as calls_report
from agentd.spendviews import html_report_file as html_report_file
from agentd.spendviews import ledger_report as ledger_report
from agentd.spendviews import open_for_reading, range_text, zone_of
from agentd.spendviews import prune_ledger as prune_ledger


def _usd(amount: Any) -> str:
    # `:f`: a limit written 1e9 is shown $1000000000, not $1E+9; 0.50 keeps its digits.
    return f"${amount:f}"


def describe_config(config: Config, state_dir: Path) -> tuple[str, list[str]]:
    """`agentd check`: a readable summary of a valid config, and warnings worth a look."""
    tz = config.tz
    lines = [f"config: {config.path}", f"state dir: {state_dir}", f"timezone: {config.timezone}"]
    if config.budgets:
        caps = ", ".join(f"{_usd(v)}/{p}" for p, v in config.budgets.limits().items())
        lines.append(f"global budget: {caps}")
    warnings = list(missing_api_keys(config))
    projection = check_projection(config, state_dir)
    projections = projection.lines
    now = datetime.now(tz=UTC)
    for name, loop in config.loops.items():
        schedule = f"every {loop.every}" if loop.every else f"cron {loop.cron!r}"
        target = f"tier {loop.tier}" if loop.tier else f"model {loop.model}"
        lines.append("")
        lines.append(
            f"loop {name}: {schedule}, {target}, max_tokens {loop.max_tokens}"
            + ("" if loop.enabled else " (disabled)")
        )
        chain = config.chain(name)
        if loop.route != "static":
            lines.append(f"  route: {loop.route}")
        lines.extend(f"  {line}" for line in chain_lines(config, name))
        if loop.batch is not None:
            lines.append(
                f"  batch: via the providers' batch APIs at batch prices (polls up to every "
                f"{loop.batch.poll_max}, gives up after {loop.batch.timeout}, then "
                + ("a direct call)" if loop.batch.on_failure == "call" else "fails the run)")
            )
        lines.extend(_loop_io_lines(config, name))
        warnings.extend(check_context(config, name))
        for entry in chain:
            if config.price(entry.alias) is None:
                warnings.append(
                    f"loop {name}: model {entry.alias} ({entry.model.model}) has "
                    "no known price; its calls are recorded unpriced"
                )
        if loop.budget:
            caps = ", ".join(f"{_usd(v)}/{p}" for p, v in loop.budget.limits().items())
            lines.append(f"  budget: {caps}, when over budget: {loop.when_over_budget}")
        else:
            lines.append(
                "  budget: none (global caps only)" if config.budgets else "  budget: none"
            )
        if loop.prompt is not None:
            prefix = stable_prefix(
                config.prompt_path(name).read_text(),
                loop=name,
                sources=stable_sources(config, name),
            )
            decision = decide_for_run(config, name, prefix, now)
            lines.append(f"  prompt cache: {decision.ttl or 'none'} ({decision.reason})")
        for line in projections.get(name, []):
            # The budget line of the projection is the loop's budget as a monthly rate.
            shown = "monthly" + line.removeprefix("budget") if line.startswith("budget:") else line
            lines.append(f"  {shown}")
        fires = next_fire_times(loop, tz, 3, now, name=name)
        lines.append(
            "  next: " + ", ".join(f.astimezone(tz).isoformat(timespec="minutes") for f in fires)
        )
    lines += ["", *projection.total]
    return "\n".join(lines), warnings + projection.warnings


def _entry_text(entry: ChainEntry) -> str:
    return f"{entry.alias} ({entry.provider_name}/{entry.model.model})"


def _chain_text(config: Config, loop_name: str, entries: Sequence[ChainEntry]) -> str:
    """A chain as `a (p/m) -> b (p/m)`, marking where the loop's fallback tiers begin."""
    fallbacks = config.loops[loop_name].fallback_tiers
    parts: list[str] = []
    for index, entry in enumerate(entries):
        text = _entry_text(entry)
        if index and entry.tier != entries[index - 1].tier and entry.tier in fallbacks:
            text = f"[fallback tier {entry.tier}] {text}"
        parts.append(text)
    return " -> ".join(parts)


def chain_lines(config: Config, loop_name: str) -> list[str]:
    """Every chain a loop's calls may walk: its own, its route's tiers, its budget downgrades."""
    from agentd.routing import tiers_used
    from agentd.runcalls import target_chain

    loop = config.loops[loop_name]
    own = config.chain(loop_name)
    what = {
        "cascade": "chain (draft)",
        "classify": "chain (work without a usable label)",
        "rules": "chain (configured; the rules pick the tier below)",
    }
    lines = [f"{what.get(loop.route, 'chain')}: {_chain_text(config, loop_name, own)}"]
    # Route steps go through the same chain building as the loop's calls: tier + fallbacks.
    steps: dict[tuple[str, str], list[str]] = {}
    for key_path, tier, who in tiers_used(loop):
        if key_path[-1] == "review_tier":
            step = "review"
        elif key_path[-1] == "escalate_tier":
            step = "escalate"
        elif key_path[-1] == "classifier_tier":
            step = "classifier"
        elif key_path[0] == "route":
            step = "rules pick"
        else:
            step = "label"
        steps.setdefault((step, tier), []).append(who)
    for (step, tier), whos in steps.items():
        label = f"{step} {', '.join(whos)}" if step == "label" else step
        chain = target_chain(config, loop_name, tier, None)
        lines.append(f"{label} ({tier}): {_chain_text(config, loop_name, chain)}")
    if loop.when_over_budget == "downgrade":
        lines.extend(_downgrade_lines(config, loop_name))
    return lines


def _downgrade_lines(config: Config, loop_name: str) -> list[str]:
    """The cheaper tiers a budget downgrade may fall to, dearest first: the plans `plans_for`
    makes (estimated with the prompt template, so a much longer rendered prompt may differ)."""
    from agentd.runcalls import plans_for

    loop = config.loops[loop_name]
    prompt = config.prompt_path(loop_name).read_text(encoding="utf-8") if loop.prompt else ""
    plans = plans_for(config, loop_name, prompt)
    lines = [
        f"downgrade to {plan.tier} (over budget): {' -> '.join(_entry_text(e) for e in plan.chain)}"
        for plan in plans[1:]
        if plan.max_tokens == loop.max_tokens
    ]
    if loop.min_tokens is not None and loop.min_tokens < loop.max_tokens:
        lines.append(f"downgrade: then max_tokens halved down to {loop.min_tokens}")
    if not lines:
        lines.append("downgrade: no cheaper tier (over budget the call is skipped)")
    return lines


def _loop_io_lines(config: Config, name: str) -> list[str]:
    """The handler, context sources, deliveries and on_reply of a loop, for `agentd check`."""
    loop = config.loops[name]
    lines = []
    if loop.handler is not None:
        load_handler(config, name)  # a handler that cannot load is a ConfigError (exit 78)
        lines.append(
            f"  handler: {loop.handler} (a call naming a tier or model walks that tier's chain,"
            " then fallback_tiers)"
        )
    if loop.context:
        sources = []
        for source in loop.context:
            what = source.file or (" ".join(source.command) if source.command else "")
            detail = f"{source.kind}: {what}" if what else source.kind
            sources.append(
                source.placeholder
                if detail == source.placeholder
                else f"{source.placeholder} ({detail})"
            )
        lines.append("  context: " + ", ".join(sources))
    if loop.deliver:
        targets = [
            f"file {d.file}"
            if d.file
            else f"command {d.command[0]}"
            if d.command
            else f"webhook {redact_url(d.webhook or '')}"
            for d in loop.deliver
        ]
        lines.append("  deliver: " + ", ".join(targets))
    if loop.quiet_token:
        lines.append(f"  quiet token: {loop.quiet_token} (such replies are not delivered)")
    if loop.on_reply is not None:
        lines.append(
            f"  on reply containing {loop.on_reply.contains!r}: run {loop.on_reply.trigger}"
        )
    return lines


def _attempt_dict(attempt: Any) -> dict[str, Any]:
    return {
        "attempt": attempt.attempt,
        "purpose": attempt.purpose,
        "tier": attempt.tier,
        "alias": attempt.alias,
        "provider": attempt.provider,
        "model": attempt.model,
        "status": attempt.status,
        "error_type": attempt.error_type,
        "http_status": attempt.http_status,
        "error": attempt.error,
        "cost_usd": format_usd(attempt.cost_micro_usd),
        "reserved_usd": format_usd(attempt.reserved_micro_usd),
        "latency_ms": attempt.latency_ms,
        "request_id": attempt.request_id,
    }


def once_result_json(result: RunResult) -> str:
    """`agentd once --json`: the run, its cost as a decimal string, and every attempt."""
    return json.dumps(
        {
            "run_id": result.run_id,
            "loop": result.loop,
            "status": result.status,
            "tier": result.tier,
            "model": result.model,
            "alias": result.alias,
            "provider": result.provider,
            "reply": result.reply,
            "cost_usd": format_usd(result.cost_micro_usd),
            "fallback": result.fallback,
            "simulated": result.simulated,
            "error": result.error,
            "route": result.route,
            "attempts": [_attempt_dict(a) for a in result.attempts],
            "wake": result.wake,
            "paused_reason": result.paused_reason,
            "batch_ids": list(result.batch_ids),
        },
        indent=2,
    )


def once_result_text(result: RunResult) -> str:
    """`agentd once`: the reply, then one line with status, model and cost."""
    parts = []
    if result.reply is not None:
        parts.append(result.reply.rstrip())
    who = f"{result.alias} ({result.model})" if result.model else "no model"
    sim = " [simulated]" if result.simulated else ""
    line = (
        f"-- {result.loop}: {result.status}, {who}, cost ${format_usd(result.cost_micro_usd)}, "
        f"{len(result.attempts)} attempt(s), run {result.run_id}{sim}"
    )
    if result.fallback:
        line += ", fallback used"
    parts.append(line)
    if result.error:
        parts.append(f"-- {result.error}")
    if result.wake:
        parts.append(f"-- would wake {result.wake} (on_reply)")
    if result.paused_reason:
        parts.append(f"-- loop paused: {result.paused_reason}")
    if result.status == "submitted":
        parts.append(
            f"-- batch {', '.join(result.batch_ids)} submitted; the daemon (agentd run) "
            "picks up its result and finishes the run"
        )
    elif result.batch_ids:
        parts.append(f"-- via batch {', '.join(result.batch_ids)} (batch price)")
    return "\n".join(parts)


BUDGET_COLUMNS = [
    Column("scope", "scope"),
    Column("period", "period"),
    Column("limit_micro_usd", "limit_usd", money=True),
    Column("spent_micro_usd", "spent_usd", money=True),
    Column("reserved_micro_usd", "reserved_usd", money=True),
    Column("remaining_micro_usd", "remaining_usd", money=True),
    Column("resets_at", "resets_at"),
]


def budget_report(config: Config, state_dir: Path, simulated: bool, fmt: str) -> str:
    """`agentd budget`: every window with its limit, spend, reservations and reset time."""
    windows: list[budgets.Window] = []
    if config.budgets:
        windows += budgets.windows_for("", None, config.budgets.limits())
    for name, loop in config.loops.items():
        if loop.budget:
            windows += budgets.windows_for(name, loop.budget.limits(), None)
    ledger = open_for_reading(state_dir)
    now = datetime.now(tz=UTC)
    if ledger is None:
        statuses = [
            budgets.WindowStatus(
                w, *budgets.window_bounds(w.period, now, config.tz), 0, 0, w.limit_micro_usd
            )
            for w in windows
        ]
    else:
        with ledger:
            statuses = budgets.window_status(ledger, windows, config.tz, now, simulated)
    rows = [
        {
            "scope": "global" if s.window.scope == "global" else f"loop {s.window.scope}",
            "period": s.window.period,
            "limit_micro_usd": s.window.limit_micro_usd,
            "spent_micro_usd": s.spent_micro_usd,
            "reserved_micro_usd": s.reserved_micro_usd,
            "remaining_micro_usd": s.remaining_micro_usd,
            "resets_at": s.end.astimezone(config.tz).isoformat(timespec="minutes"),
        }
        for s in statuses
    ]
    return render(rows, BUDGET_COLUMNS, fmt)


# ---------------------------------------------------------------------------- spend insight


def plan_report(
    config: Config,
    state_dir: Path,
    *,
    days: int = 30,
    against: Config | None = None,
    fmt: str = "table",
    now: datetime | None = None,
) -> str:
    """`agentd plan`: projected spend per loop against the budgets; `against` side by side."""
    from agentd.projection import (
        COMPARE_COLUMNS,
        COMPARE_JSON_COLUMNS,
        PLAN_COLUMNS,
        PLAN_JSON_COLUMNS,
        compare,
        plan,
    )

    now = now or datetime.now(UTC)
    ledger = open_for_reading(state_dir)
    try:
        this = plan(config, ledger, days=days, now=now)
        other = (
            None if against is None else plan(against, ledger, days=days, now=now, reference=config)
        )
    finally:
        if ledger is not None:
            ledger.close()
    table = fmt == "table"
    if other is None:
        rows, totals = this.rows[:-1], this.total
        columns = PLAN_COLUMNS if table else PLAN_JSON_COLUMNS
        head = f"projected spend of {config.path.name} over {days} days from {now:%Y-%m-%d}"
        warnings = this.warnings
    else:
        compared = compare(this, other)
        rows, totals = compared[:-1], compared[-1]
        columns = COMPARE_COLUMNS if table else COMPARE_JSON_COLUMNS
        from agentd.reprice import config_label

        mine, name = config_label(config), config_label(other.config)
        head = f"projected spend over {days} days: this = {mine}, other = {name}"
        warnings = [f"{mine}: {w}" for w in this.warnings]
        warnings += [f"{name}: {w}" for w in other.warnings]
    if not table:
        # Scripts get the totals as the last row (scope `global` / name `total`).
        return render([*rows, totals], columns, fmt)
    return "\n".join([head, render(rows, columns, fmt, totals=totals), *warnings])


def reprice_report(
    state_dir: Path,
    config: Config | None,
    *,
    against: Config | None = None,
    all_tier: str | None = None,
    all_model: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    fmt: str = "table",
    simulated: bool = False,
) -> str:
    """`agentd reprice`: real (or simulated) ok calls re-priced on another config or tier/model."""
    from agentd.reprice import REPRICE_COLUMNS, REPRICE_JSON_COLUMNS, reprice, resolve_target

    target = resolve_target(config, against, all_tier=all_tier, all_model=all_model)
    ledger = open_for_reading(state_dir)
    try:
        result = reprice(ledger, config, target, since=since, until=until, simulated=simulated)
    finally:
        if ledger is not None:
            ledger.close()
    if fmt != "table":
        return render([*result.rows, result.total], REPRICE_JSON_COLUMNS, fmt)
    if not result.rows:
        note = result.total["note"]
        return "(no ok calls in this period)" + (f"; {note}" if note else "")
    tz = zone_of(config)
    return "\n".join(
        [
            f"{'simulated' if simulated else 'real'} ok calls, {range_text(since, until, tz)},"
            f" re-priced on {result.label}",
            render(result.rows, REPRICE_COLUMNS, fmt, totals=result.total),
            result.headline,
        ]
    )
