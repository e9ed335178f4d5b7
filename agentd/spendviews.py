"""What the CLI shows from the ledger alone: spend reports and charts, recent calls, pruning.

These are the read commands that must start fast (`agentd ledger` ≤ 250 ms cold): they need
only the state directory and, for calendar groupings and dates, the config's timezone
(`configpaths.read_basics`), never the validated config. So this module imports nothing heavy
at the top; each view imports what it draws with (charts, the HTML page, pruning) when asked.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol
from zoneinfo import ZoneInfo

from agentd.errors import LedgerError
from agentd.ledger import Ledger
from agentd.reports import Column, render


class Zoned(Protocol):
    """What these views read from a config: its timezone (a `Config` or `ConfigBasics`)."""

    @property
    def tz(self) -> ZoneInfo: ...


# Reports of a short-lived CLI process read the ledger through a memory map: a long range
# reads tens of thousands of scattered pages, and a mapped page costs no read() and no copy
# (~15 % of a report over a million rows). Only here: mapped pages would count in the
# daemon's RSS. SQLite keeps mapped reads consistent with WAL writers.
_REPORT_MMAP_BYTES = 1 << 30


def open_for_reading(state_dir: Path) -> Ledger | None:
    """The ledger of a state directory for a report, or None when nothing was recorded yet."""
    try:
        ledger = Ledger.open(state_dir, create=False)
    except LedgerError:
        if not (state_dir / "ledger.db").exists():
            return None
        raise
    with ledger.read() as conn:
        conn.execute(f"PRAGMA mmap_size = {_REPORT_MMAP_BYTES}")
    return ledger


CALL_COLUMNS = [
    Column("id", "id"),
    Column("run_id", "run"),
    Column("started_at", "started_at"),
    Column("loop", "loop"),
    Column("purpose", "purpose"),
    Column("attempt", "attempt"),
    Column("alias", "alias"),
    Column("model", "model"),
    Column("served_model", "served"),  # what the provider says answered (may be a snapshot)
    Column("status", "status"),
    Column("error_type", "error_type"),
    Column("http_status", "http"),
    Column("input_tokens", "input"),
    Column("output_tokens", "output"),
    Column("cost_micro_usd", "cost_usd", money=True),
    Column("latency_ms", "ms"),
]


def calls_report(
    state_dir: Path,
    loop: str | None,
    limit: int,
    simulated: bool,
    fmt: str,
    *,
    statuses: Sequence[str] | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> str:
    """`agentd ledger calls`: the most recent attempts (with these statuses, in the range)."""
    ledger = open_for_reading(state_dir)
    if ledger is None:
        rows: list[dict[str, Any]] = []
    else:
        with ledger:
            rows = ledger.recent_calls(
                loop=loop,
                limit=limit,
                simulated=simulated,
                statuses=statuses,
                since=since,
                until=until,
            )
    columns = CALL_COLUMNS
    if fmt == "json":
        columns = [
            *CALL_COLUMNS,
            Column("reserved_micro_usd", "reserved_usd", money=True),
            Column("cache_read_tokens", "cache_read_tokens"),
            Column("cache_write_tokens", "cache_write_tokens"),
            Column("reasoning_tokens", "reasoning_tokens"),
            Column("provider", "provider"),
            Column("tier", "tier"),
            Column("request_id", "request_id"),
            Column("simulated", "simulated"),
            Column("batch", "batch"),
            Column("batch_id", "batch_id"),
            Column("list_cost_micro_usd", "list_cost_usd", money=True),
        ]
    return render(rows, columns, fmt)


def zone_of(config: Zoned | None) -> ZoneInfo:
    """The zone of calendar groupings and windows: the config's, else UTC."""
    return config.tz if config is not None else ZoneInfo("UTC")


def range_text(since: datetime | None, until: datetime | None, tz: ZoneInfo) -> str:
    """`<since> to <until> (<zone>)` for a report's heading."""
    start = "the beginning" if since is None else since.astimezone(tz).isoformat(timespec="minutes")
    end = "now" if until is None else until.astimezone(tz).isoformat(timespec="minutes")
    return f"{start} to {end} ({tz.key})"


def ledger_report(
    state_dir: Path,
    config: Zoned | None,
    *,
    by: str = "loop",
    since: datetime | None = None,
    until: datetime | None = None,
    simulated: bool = False,
    fmt: str = "table",
    loop: str | None = None,
    chart: bool = False,
    stack: str = "loop",
    ascii_only: bool = False,
) -> str:
    """`agentd ledger`: spend grouped `by`, as a table (with totals), JSON or CSV; or a chart.

    Calendar groupings and the chart's days use the config's timezone (UTC without a config).
    """
    from agentd.spend import GROUPINGS, daily_spend, report_columns, spend_report

    tz = zone_of(config)
    if by not in GROUPINGS:
        raise ValueError(f"cannot group by {by!r} (one of {', '.join(GROUPINGS)})")
    if chart and fmt != "table":
        raise ValueError("--chart draws for a terminal: it does not combine with --json or --csv")
    ledger = open_for_reading(state_dir)
    if chart:
        if stack not in ("loop", "tier"):
            raise ValueError(f"cannot stack by {stack!r} (loop or tier)")
        stack_by: Literal["loop", "tier"] = "loop" if stack == "loop" else "tier"
        if ledger is None:
            return "(no spend in this period)"
        with ledger:
            daily = daily_spend(  # it caches the hours this range reads, not all history
                ledger,
                stack=stack_by,
                since=since,
                until=until,
                simulated=simulated,
                tz=tz,
                loop=loop,
            )
        from agentd.charts import text_chart

        return text_chart(daily, ascii_only=ascii_only)
    columns = report_columns(by, fmt)
    if ledger is None:
        return render([], columns, fmt)
    with ledger:
        report = spend_report(
            ledger,
            by=by,
            since=since,
            until=until,
            simulated=simulated,
            tz=tz,
            loop=loop,
        )
    text = render(report.rows, columns, fmt, totals=report.total)
    if fmt != "table" or not report.rows:
        return text
    kind = "simulated" if simulated else "real"
    head = f"{kind} calls by {by}, {range_text(since, until, tz)}"
    if report.includes_rollup:
        head += "; pruned days come from the daily roll-up (no p95 there)"
    return f"{head}\n{text}"


def html_report_file(
    state_dir: Path,
    config: Zoned | None,
    path: Path,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    simulated: bool = False,
    now: datetime | None = None,
) -> str:
    """`agentd report --html FILE`: write the self-contained page; return a one-line note."""
    from agentd.htmlreport import html_report, write_html_report

    now = now or datetime.now(UTC)
    ledger = open_for_reading(state_dir)
    try:
        html = html_report(
            ledger, since=since, until=until, now=now, simulated=simulated, tz=zone_of(config)
        )
    finally:
        if ledger is not None:
            ledger.close()
    write_html_report(path, html)
    return f"wrote {path} ({len(html.encode())} bytes)"


def prune_ledger(
    state_dir: Path,
    config: Zoned | None,
    *,
    before: datetime,
    dry_run: bool = False,
    rollup: bool = True,
    vacuum: bool = False,
    now: datetime | None = None,
) -> str:
    """`agentd ledger prune --before DATE`: delete old rows (rolled up first); describe it."""
    from agentd.retention import prune

    now = now or datetime.now(UTC)
    ledger = open_for_reading(state_dir)
    if ledger is None:
        return "nothing to prune: no ledger yet"
    with ledger:
        result = prune(
            ledger,
            before,
            now=now,
            tz=None if config is None else config.tz,
            dry_run=dry_run,
            rollup=rollup,
            vacuum=vacuum,
        )
    return result.describe()
