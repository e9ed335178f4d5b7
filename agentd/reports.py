"""Report rendering: rows computed once, shown as an aligned table, JSON or CSV."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any, Literal
from zoneinfo import ZoneInfo

from agentd.pricing import format_usd

_SPAN = re.compile(r"^(\d+)([smhdw])$")
_SPAN_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
# Calendar keywords: the current period, as the budget windows draw it (weeks start Monday).
_CALENDAR: dict[str, Literal["day", "week", "month"]] = {
    "today": "day",
    "week": "week",
    "month": "month",
}


@dataclass(frozen=True)
class Column:
    """A report column: the row key, its header, and whether it holds micro-USD."""

    key: str
    header: str
    money: bool = False


def parse_since(value: str, now: datetime | None = None, tz: tzinfo | None = None) -> datetime:
    """`24h`, `7d`, `30m`, `2w` back from now, an ISO date/datetime (naive: in `tz`, else UTC),
    or `today`, `week` (since Monday), `month`: the start of the current calendar period in `tz`.

    Also reads `--until`: the same forms name the (exclusive) end of a report's range.
    """
    now = now or datetime.now(tz=UTC)
    match = _SPAN.match(value.strip())
    if match:
        return now - timedelta(seconds=int(match.group(1)) * _SPAN_SECONDS[match.group(2)])
    period = _CALENDAR.get(value.strip().lower())
    if period is not None:
        # Imported here: only these keywords need the budget windows' calendar arithmetic.
        from agentd.budgets import window_bounds

        zone = tz if isinstance(tz, ZoneInfo) else ZoneInfo("UTC")
        return window_bounds(period, now, zone)[0]
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError as exc:
        raise ValueError(
            f"cannot read {value!r}: use a span like 24h, 7d, 30m, a date like 2026-11-01,"
            " or today, week, month"
        ) from exc
    # A bare date or wall-clock time means midnight / that time where the operator lives.
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=tz or UTC)


def _cell(row: Mapping[str, Any], column: Column) -> Any:
    value = row.get(column.key)
    if column.money:
        return None if value is None else format_usd(int(value))
    return value


def format_cell(row: Mapping[str, Any], column: Column) -> str:
    """A cell as the table shows it (money as a decimal string, empty for None)."""
    value = _cell(row, column)
    return "" if value is None else str(value)


def _name(column: Column) -> str:
    """The JSON/CSV field name: money columns say `_usd`, since they carry dollars there."""
    return column.key.replace("_micro_usd", "_usd") if column.money else column.key


def to_json(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """Rows as a JSON array; money as decimal strings, never floats."""
    return json.dumps([{_name(c): _cell(r, c) for c in columns} for r in rows], indent=2)


def to_csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """Rows as CSV with a header line; money as decimal strings."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([_name(c) for c in columns])
    for row in rows:
        writer.writerow(["" if (v := _cell(row, c)) is None else v for c in columns])
    return out.getvalue()


def to_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[Column],
    totals: Mapping[str, Any] | None = None,
) -> str:
    """Rows as an aligned plain-text table (numbers and money right-aligned), totals last."""
    cells = [[c.header for c in columns]]
    for row in [*rows, *([totals] if totals is not None else [])]:
        cells.append(["" if (v := _cell(row, c)) is None else str(v) for c in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    numeric = [
        all(_is_number(line[i]) for line in cells[1:]) and len(cells) > 1
        for i in range(len(columns))
    ]
    lines = []
    for n, line in enumerate(cells):
        parts = [
            text.rjust(w) if numeric[i] and n > 0 else text.ljust(w)
            for i, (text, w) in enumerate(zip(line, widths, strict=True))
        ]
        rule = n == 0 or (totals is not None and n == len(cells) - 2)
        lines.append("  ".join(parts).rstrip())
        if rule:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _is_number(text: str) -> bool:
    # Signed numbers and percentages (`−94.6 %`) are right-aligned too.
    return text == "" or re.fullmatch(r"[-−+]?\d+(\.\d+)?( %)?", text) is not None


def render(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[Column],
    fmt: str,
    totals: Mapping[str, Any] | None = None,
) -> str:
    """Render rows as `table`, `json` or `csv`; a totals row appears in the table form only."""
    if fmt == "json":
        return to_json(rows, columns)
    if fmt == "csv":
        return to_csv(rows, columns).rstrip("\n")
    if fmt != "table":
        raise ValueError(f"unknown report format {fmt!r} (table, json or csv)")
    if not rows:
        return "(no rows)"
    return to_table(rows, columns, totals)
