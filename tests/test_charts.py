"""Charts: stable text for a known ledger, a USD scale, a legend, and self-contained SVG."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

from spendledger import build

from agentd.charts import svg_chart, text_chart
from agentd.pricing import usd_label
from agentd.spend import DailySpend, daily_spend
from agentd.views import ledger_report

KNOWN = DailySpend(
    days=["2026-03-09", "2026-03-10", "2026-03-11", "2026-03-12"],
    series={"beta": [0, 21250, 0, 5000], "alpha": [1800, 0, 0, 1000]},
    stack="loop",
)

# Scale: the tallest day is 0.021250 USD; six rows of a nice step (1, 2, 2.5 or 5 × 10^k
# micro-USD) must reach it: 5000 × 6 = 0.030. Each bar's running sum is rounded to rows:
# 03-10 beta 21250 / 5000 = 4.25 -> 4 rows; 03-12 beta 1 row, beta+alpha 6000 -> 1.2 -> 1
# (alpha vanishes); 03-09 alpha 0.36 of a row -> 0 rows, drawn as a low mark.
EXPECTED = """\
spend per day (USD), 2026-03-09 to 2026-03-12, stacked by loop
$0.030 ┤
       ┤
$0.020 ┤   ██
       ┤   ██
$0.010 ┤   ██
       ┤▁▁ ██    ██
$0.000 ┼────────────
        09 10 11 12

  █ beta      $0.026250
  ▓ alpha     $0.002800
    total     $0.029050"""


def test_text_chart_is_stable_for_a_known_series() -> None:
    assert text_chart(KNOWN, height=6) == EXPECTED


def test_ascii_chart_uses_only_ascii() -> None:
    text = text_chart(KNOWN, height=6, ascii_only=True)
    assert text.isascii()
    assert "$0.020 |   ##" in text and "|.. ##    ##" in text and "  # beta" in text


def test_chart_from_the_ledger_matches_its_sums(tmp_path: Path) -> None:
    with build(tmp_path / "state") as ledger:
        daily = daily_spend(ledger, stack="loop")
    assert daily == KNOWN
    chart = ledger_report(tmp_path / "state", None, chart=True)
    assert chart == text_chart(KNOWN)  # default height 12
    by_tier = ledger_report(tmp_path / "state", None, chart=True, stack="tier")
    assert "stacked by tier" in by_tier and "balanced" in by_tier and "$0.024000" in by_tier


def test_many_days_and_many_series() -> None:
    days = [f"2026-03-{d:02d}" for d in range(1, 32)] + [f"2026-04-{d:02d}" for d in range(1, 15)]
    series = {f"loop{i}": [i * 100 + d for d in range(len(days))] for i in range(12)}
    chart = text_chart(DailySpend(days=days, series=series, stack="loop"))
    lines = chart.splitlines()
    # 45 days: two characters per day and the day of month written in two rows.
    axis = next(i for i, line in enumerate(lines) if "┼" in line)
    assert lines[axis + 1].strip().startswith("0 0 0") and lines[axis + 2].strip().startswith(
        "1 2 3"
    )
    # Nine glyphs: eight biggest series, the rest summed as (other).
    assert (
        "(other)" in chart
        and sum(1 for line in lines if line.startswith("  ") and "$" in line) == 10
    )


def test_empty_and_zero_series() -> None:
    assert text_chart(DailySpend(days=[], series={}, stack="loop")) == "(no spend in this period)"
    zero = DailySpend(days=["2026-03-01"], series={"a": [0]}, stack="loop")
    assert text_chart(zero).endswith("(no spend in this period)")
    assert "No spend" in svg_chart(zero)


def test_usd_labels_never_use_floats() -> None:
    assert usd_label(2500, 4) == "$0.0025"
    assert usd_label(18_400_000, 2) == "$18.40"
    assert usd_label(5, 6) == "$0.000005"


class _Svg(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.rect_titles: list[str] = []
        self._in_rect = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self._in_rect = tag == "rect" or (self._in_rect and tag == "title")

    def handle_endtag(self, tag: str) -> None:
        if tag == "rect":
            self._in_rect = False

    def handle_data(self, data: str) -> None:
        if self._in_rect and self.tags[-1] == "title":
            self.rect_titles.append(data)


def test_svg_chart_is_self_contained() -> None:
    svg = svg_chart(KNOWN)
    assert "http" not in svg and "<script" not in svg and "href" not in svg
    parser = _Svg()
    parser.feed(svg)
    # One rectangle per non-zero segment, each with its exact amount as a tooltip.
    assert sorted(parser.rect_titles) == [
        "2026-03-09 alpha $0.001800",
        "2026-03-10 beta $0.021250",
        "2026-03-12 alpha $0.001000",
        "2026-03-12 beta $0.005000",
    ]
    assert svg_chart(KNOWN) == svg  # stable bytes
