"""`agentd report --html`: one self-contained HTML page of spend charts and report tables.

Everything is inline (CSS, SVG): no scripts, fonts, images or links to anything outside the
file, so it can be mailed, archived or opened offline. The tables are the `agentd ledger`
rows, formatted by the same helpers as the terminal tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from html import escape
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo

from agentd.charts import svg_chart
from agentd.ledger import Ledger
from agentd.pricing import usd_label
from agentd.reports import Column, format_cell
from agentd.spend import (
    UTC_ZONE,
    DailySpend,
    Grouping,
    SpendReport,
    daily_spend,
    report_columns,
    spend_report,
)
from agentd.spendlatency import shared_reads
from agentd.spendsources import refresh_range

SECTIONS: tuple[Grouping, ...] = ("loop", "tier", "model", "provider", "purpose", "day")
STACKS: tuple[Literal["loop", "tier"], ...] = ("loop", "tier")

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; color: #1d1d1f; margin: 2rem auto;
       max-width: 1100px; padding: 0 1rem; }
h1 { font-size: 1.5rem; margin-bottom: .2rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
.meta { color: #555; margin-top: 0; }
.cards { display: flex; gap: 1rem; flex-wrap: wrap; margin: 1rem 0; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: .6rem 1rem; min-width: 9rem; }
.card b { display: block; font-size: 1.3rem; }
table { border-collapse: collapse; margin: .5rem 0 1rem; font-variant-numeric: tabular-nums; }
th, td { padding: .25rem .6rem; border-bottom: 1px solid #e5e5e5; text-align: left; }
td.num, th.num { text-align: right; }
tfoot td { font-weight: 600; border-top: 2px solid #999; }
.chart text { font-size: 11px; fill: #444; } .chart .grid { stroke: #e5e5e5; }
.legend { list-style: none; padding: 0; display: flex; flex-wrap: wrap; gap: .4rem 1.2rem; }
.swatch { display: inline-block; width: .8rem; height: .8rem; margin-right: .3rem;
          vertical-align: -1px; }
.empty { color: #777; }
"""

_NUMERIC = frozenset(
    {
        "runs",
        "calls",
        "failed",
        "fallbacks",
        "skipped",
        "noop",
        "input_tokens",
        "cache_read_tokens",
        "cache_write_tokens",
        "output_tokens",
        "reasoning_tokens",
        "cost_micro_usd",
        "saved_micro_usd",
        "reserved_micro_usd",
        "avg_latency_ms",
        "p95_latency_ms",
    }
)


def _table(report: SpendReport, columns: Sequence[Column]) -> str:
    """A report as an HTML table: the rows, and the totals row in the footer."""

    def cells(row: dict[str, object], tag: str) -> str:
        return "".join(
            f'<{tag} class="num">{escape(format_cell(row, c))}</{tag}>'
            if c.key in _NUMERIC
            else f"<{tag}>{escape(format_cell(row, c))}</{tag}>"
            for c in columns
        )

    head = "".join(
        f'<th class="num">{escape(c.header)}</th>'
        if c.key in _NUMERIC
        else f"<th>{escape(c.header)}</th>"
        for c in columns
    )
    body = "".join(f"<tr>{cells(row, 'td')}</tr>" for row in report.rows)
    return (
        f'<table class="report" data-by="{escape(report.by)}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody><tfoot><tr>{cells(report.total, 'td')}</tr></tfoot></table>"
    )


def render_html(
    reports: Sequence[SpendReport],
    charts: Sequence[DailySpend],
    *,
    title: str,
    subtitle: str,
) -> str:
    """The page from computed report rows and chart series."""
    total = reports[0].total if reports else None
    cards = ""
    if total is not None:
        figures = [
            ("spend", usd_label(int(total["cost_micro_usd"]), 6)),
            ("saved vs list price", usd_label(int(total["saved_micro_usd"]), 6)),
            ("runs", str(total["runs"])),
            ("calls", str(total["calls"])),
            ("failed attempts", str(total["failed"])),
            ("fallbacks used", str(total["fallbacks"])),
        ]
        cards = (
            '<div class="cards">'
            + "".join(
                f'<div class="card">{escape(name)}<b>{escape(value)}</b></div>'
                for name, value in figures
            )
            + "</div>"
        )
    chart_html = "".join(
        f"<h2>Spend per day by {escape(daily.stack)}</h2>{svg_chart(daily)}" for daily in charts
    )
    if not reports:
        cards = '<p class="empty">No calls recorded yet.</p>'
    tables = "".join(
        f"<h2>By {escape(report.by)}</h2>"
        + _table(report, report_columns(report.by, "html"))
        for report in reports
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{_CSS}</style></head>"
        f'<body><h1>{escape(title)}</h1><p class="meta">{escape(subtitle)}</p>'
        f"{cards}{chart_html}{tables}</body></html>\n"
    )


def html_report(
    ledger: Ledger | None,
    *,
    since: datetime | None,
    until: datetime | None,
    now: datetime,
    simulated: bool = False,
    tz: ZoneInfo = UTC_ZONE,
) -> str:
    """The HTML page for a ledger (None: no ledger yet, an empty page) over [since, until)."""
    reports: list[SpendReport] = []
    charts: list[DailySpend] = []
    if ledger is not None:
        refresh_range(ledger, since)
        # One snapshot for the whole page (every table and chart adds up to the same totals),
        # and the groupings share their scans of it. (Each report's own cache refresh is
        # refused inside the read: it was done just above.)
        with ledger.read(), shared_reads():
            reports = [
                spend_report(ledger, by=by, since=since, until=until, simulated=simulated, tz=tz)
                for by in SECTIONS
            ]
            charts = [
                daily_spend(
                    ledger, stack=stack, since=since, until=until, simulated=simulated, tz=tz
                )
                for stack in STACKS
            ]
    start = "the beginning" if since is None else since.astimezone(tz).isoformat(timespec="minutes")
    end = (until or now).astimezone(tz).isoformat(timespec="minutes")
    kind = "simulated calls" if simulated else "real calls"
    subtitle = (
        f"{kind}, {start} to {end} ({tz.key}); generated "
        f"{now.astimezone(tz).isoformat(timespec='seconds')}"
    )
    if any(r.includes_rollup for r in reports):
        subtitle += "; includes pruned days from the daily roll-up (no p95 for those)"
    return render_html(reports, charts, title="agentd spend report", subtitle=subtitle)


def write_html_report(path: Path, html: str) -> None:
    """Write the page (UTF-8), replacing the file atomically so a reader never sees half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(path)
