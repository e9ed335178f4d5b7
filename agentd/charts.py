"""Charts of spend per day, stacked by loop or tier: plain text for a terminal, inline SVG for HTML.

Both draw the same `DailySpend` with integer arithmetic: money stays integer micro-USD, and SVG
coordinates are exact decimals, so the same ledger always draws the same characters and bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import ROUND_HALF_UP, Decimal
from html import escape

from agentd.pricing import usd_label
from agentd.spend import DailySpend

UNICODE_GLYPHS = ("█", "▓", "▒", "░", "▚", "▞", "▙", "▟", "▛")
ASCII_GLYPHS = ("#", "=", "+", "o", "*", "%", "@", "x", "~")
# Colour-blind-safe palette (Okabe-Ito), then greys.
PALETTE = (
    "#0072B2",
    "#E69F00",
    "#009E73",
    "#CC79A7",
    "#56B4E9",
    "#D55E00",
    "#F0E442",
    "#999999",
    "#555555",
)
OTHER = "(other)"


def _limit_series(daily: DailySpend, slots: int) -> list[tuple[str, list[int]]]:
    """At most `slots` series: the biggest ones, the rest summed as `(other)`."""
    items = list(daily.series.items())  # already biggest first
    if len(items) <= slots:
        return items
    kept = items[: slots - 1]
    rest = [sum(values) for values in zip(*(v for _, v in items[slots - 1 :]), strict=True)]
    return [*kept, (OTHER, rest)]


def _nice_step(top: int, rows: int) -> int:
    """The smallest step of 1, 2, 2.5 or 5 × 10^k micro-USD with `rows` steps reaching `top`."""
    power = 1
    while True:
        # 2.5 × 10^k only where it is a whole number of micro-USD.
        for step in (power, 2 * power, 5 * power // 2 if power >= 10 else 0, 5 * power):
            if step and step * rows >= top:
                return step
        power *= 10


def _decimals(step: int) -> int:
    """Enough decimals to write every multiple of `step` micro-USD exactly (at least 2)."""
    zeros = 0
    while zeros < 6 and step % 10 ** (zeros + 1) == 0:
        zeros += 1
    return max(2, 6 - zeros)


def _cells(values: Sequence[int], step: int) -> list[int]:
    """Cumulative cell heights of stacked segments, each boundary rounded half up.

    Rounding the running sum (not each segment) keeps every bar as tall as its total.
    """
    heights = []
    running = 0
    for value in values:
        running += value
        heights.append((2 * running + step) // (2 * step))
    return heights


def text_chart(daily: DailySpend, *, height: int = 12, ascii_only: bool = False) -> str:
    """A stacked bar chart of spend per day for a terminal, with a USD scale and a legend."""
    glyphs = ASCII_GLYPHS if ascii_only else UNICODE_GLYPHS
    if not daily.days:
        return "(no spend in this period)"
    series = _limit_series(daily, len(glyphs))
    totals = [sum(v[i] for _, v in series) for i in range(len(daily.days))]
    top = max(totals)
    title = f"spend per day (USD), {daily.days[0]} to {daily.days[-1]}, stacked by {daily.stack}"
    if top == 0:
        return title + "\n(no spend in this period)"
    step = _nice_step(top, height)
    decimals = _decimals(step)
    width = 3 if len(daily.days) <= 25 else 2 if len(daily.days) <= 50 else 1
    labels = [usd_label(step * r, decimals) for r in range(height + 1)]
    pad = max(len(label) for label in labels)
    axis, tick, floor, base = ("|", "+", "-", ".") if ascii_only else ("┤", "┼", "─", "▁")
    stacks = [_cells([v[i] for _, v in series], step) for i in range(len(daily.days))]
    lines = [title]
    for row in range(height, 0, -1):
        # Labels on every other row keep the scale readable; the top row always has one.
        label = labels[row] if (height - row) % 2 == 0 else ""
        cells = []
        for day, heights in enumerate(stacks):
            glyph = " "
            below = 0
            for index, cum in enumerate(heights):
                if below < row <= cum:
                    glyph = glyphs[index]
                    break
                below = cum
            if glyph == " " and row == 1 and totals[day] > 0 and heights[-1] == 0:
                glyph = base  # some spend, less than half a row: still visible
            cells.append(glyph * max(1, width - 1) + (" " if width > 1 else ""))
        lines.append(f"{label:>{pad}} {axis}" + "".join(cells).rstrip())
    lines.append(f"{labels[0]:>{pad}} {tick}" + floor * (width * len(daily.days)))
    lines.extend(_day_labels(daily.days, width, pad + 2))
    lines.append("")
    names = [name for name, _ in series]
    wide = max(len(name) for name in [*names, "total"])
    for index, (name, values) in enumerate(series):
        lines.append(f"  {glyphs[index]} {name:<{wide}}  {usd_label(sum(values), 6):>12}")
    lines.append(f"    {'total':<{wide}}  {usd_label(sum(totals), 6):>12}")
    return "\n".join(lines)


def _day_labels(days: Sequence[str], width: int, indent: int) -> list[str]:
    """Day-of-month under each bar: side by side when there is room, else in two rows."""
    numbers = [day[-2:] for day in days]
    if width >= 3:
        return [" " * indent + "".join(n + " " * (width - 2) for n in numbers).rstrip()]
    tens = "".join(n[0] + " " * (width - 1) for n in numbers)
    ones = "".join(n[1] + " " * (width - 1) for n in numbers)
    return [" " * indent + tens.rstrip(), " " * indent + ones.rstrip()]


def _num(value: Decimal) -> str:
    """An SVG coordinate with at most two decimals, without trailing zeros."""
    text = f"{value.quantize(Decimal('0.01'), rounding=ROUND_HALF_UP)}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def svg_chart(
    daily: DailySpend, *, width: int = 720, height: int = 240, title: str | None = None
) -> str:
    """The same stacked chart as inline SVG (no scripts, no external references), with legend."""
    if not daily.days or not any(any(v) for v in daily.series.values()):
        return '<p class="empty">No spend in this period.</p>'
    series = _limit_series(daily, len(PALETTE))
    totals = [sum(v[i] for _, v in series) for i in range(len(daily.days))]
    rows = 5
    step = _nice_step(max(totals), rows)
    top = step * rows
    decimals = _decimals(step)
    left, bottom, top_pad = 72, 28, 10
    plot_w = Decimal(width - left - 8)
    plot_h = Decimal(height - bottom - top_pad)
    slot = plot_w / len(daily.days)
    bar = slot * Decimal("0.8")
    label = escape(title or f"Spend per day, stacked by {daily.stack}")
    parts = [
        f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}"'
        f' role="img" aria-label="{label}">',
        f"<title>{label}</title>",
    ]
    for r in range(rows + 1):
        y = top_pad + plot_h - plot_h * r / rows
        parts.append(
            f'<line x1="{left}" x2="{width - 8}" y1="{_num(y)}" y2="{_num(y)}" class="grid"/>'
            f'<text x="{left - 6}" y="{_num(y + 4)}" text-anchor="end">'
            f"{escape(usd_label(step * r, decimals))}</text>"
        )
    every = max(1, (len(daily.days) + 9) // 10)  # at most ~10 date labels
    for i, day in enumerate(daily.days):
        x = left + slot * i + (slot - bar) / 2
        base = top_pad + plot_h
        for index, (name, values) in enumerate(series):
            if values[i] <= 0:
                continue
            h = plot_h * values[i] / top
            base -= h
            parts.append(
                f'<rect x="{_num(x)}" y="{_num(base)}" width="{_num(bar)}" height="{_num(h)}"'
                f' fill="{PALETTE[index]}"><title>{escape(day)} {escape(name)}'
                f" {escape(usd_label(values[i], 6))}</title></rect>"
            )
        if i % every == 0:
            parts.append(
                f'<text x="{_num(x + bar / 2)}" y="{height - 8}" text-anchor="middle">'
                f"{escape(day[5:])}</text>"
            )
    parts.append("</svg>")
    legend = "".join(
        f'<li><span class="swatch" style="background:{PALETTE[i]}"></span>{escape(name)}'
        f" {escape(usd_label(sum(values), 6))}</li>"
        for i, (name, values) in enumerate(series)
    )
    return "".join(parts) + f'<ul class="legend">{legend}</ul>'
