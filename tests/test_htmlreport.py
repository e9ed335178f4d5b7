"""The HTML report: one self-contained file whose tables hold the ledger's sums."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from html.parser import HTMLParser
from pathlib import Path
from zoneinfo import ZoneInfo

from ledgergen import generate_ledger
from spendledger import NOW, build, sql_sums

from agentd.htmlreport import SECTIONS, STACKS, html_report, render_html
from agentd.ledger import Ledger
from agentd.spend import daily_spend, spend_report
from agentd.spendsources import refresh_range
from agentd.views import html_report_file


class _Page(HTMLParser):
    """Collects every report table (by its data-by) as header, body rows and footer."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, dict[str, list[list[str]]]] = {}
        self.attrs: list[tuple[str, str, str | None]] = []
        self.tags: list[str] = []
        self._table: str | None = None
        self._part = ""
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs.extend((tag, k, v) for k, v in attrs)
        if tag == "table":
            self._table = dict(attrs)["data-by"] or ""
            self.tables[self._table] = {"thead": [], "tbody": [], "tfoot": []}
        elif tag in ("thead", "tbody", "tfoot"):
            self._part = tag
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._row is not None and self._cell is not None:
            self._row.append("".join(self._cell))
            self._cell = None
        elif tag == "tr" and self._table is not None and self._row is not None:
            self.tables[self._table][self._part].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def _parse(html: str) -> _Page:
    page = _Page()
    page.feed(html)
    page.close()
    return page


def _micro(usd: str) -> int:
    return int(Decimal(usd) * 1_000_000)


def test_tables_hold_the_ledger_sums(tmp_path: Path) -> None:
    with build(tmp_path / "state") as ledger:
        html = html_report(ledger, since=None, until=None, now=NOW)
        expected = sql_sums(ledger)
    page = _parse(html)
    assert list(page.tables) == list(SECTIONS)
    for by, table in page.tables.items():
        [header] = table["thead"]
        col = {name: i for i, name in enumerate(header)}
        [footer] = table["tfoot"]
        assert footer[0] == "total"
        # The footer equals SQL sums over the rows, and so does the sum of the body rows.
        for name, key in (
            ("calls", "calls"),
            ("failed", "failed"),
            ("runs", "runs"),
            ("fallbacks", "fallbacks"),
            ("input", "input_tokens"),
            ("cache read", "cache_read_tokens"),
            ("cache write", "cache_write_tokens"),
            ("output", "output_tokens"),
            ("reasoning", "reasoning_tokens"),
        ):
            assert int(footer[col[name]]) == expected[key], (by, name)
            assert sum(int(r[col[name]]) for r in table["tbody"]) == expected[key], (by, name)
        assert _micro(footer[col["cost_usd"]]) == expected["cost_micro_usd"] == 29050
        assert sum(_micro(r[col["cost_usd"]]) for r in table["tbody"]) == 29050
    loops = {r[0]: r for r in page.tables["loop"]["tbody"]}
    assert set(loops) == {"alpha", "beta"}
    # Skipped runs, and of them the no-op ticks (K2, beta's skipped_noop), where runs are.
    header = page.tables["loop"]["thead"][0]
    assert header[5:7] == ["skipped", "noop"]
    assert (loops["beta"][5], loops["beta"][6], loops["alpha"][6]) == ("1", "1", "0")
    assert page.tables["loop"]["tfoot"][0][5:7] == ["2", "1"]
    assert "noop" not in page.tables["model"]["thead"][0]
    assert "$0.029050" in html  # the spend card


def test_page_is_self_contained(tmp_path: Path) -> None:
    with build(tmp_path / "state") as ledger:
        html = html_report(ledger, since=None, until=None, now=NOW)
    page = _parse(html)
    # No reference to anything outside the file: no URL, no script, no external stylesheet.
    assert re.search(r"https?://", html) is None
    assert "script" not in page.tags and "link" not in page.tags and "img" not in page.tags
    assert not [a for a in page.attrs if a[1] in ("src", "href", "xlink:href")]
    assert "url(" not in html and "@import" not in html
    assert page.tags.count("svg") == 2  # spend per day by loop and by tier
    assert html.startswith("<!DOCTYPE html>")


def test_write_the_file(tmp_path: Path) -> None:
    build(tmp_path / "state").close()
    out = tmp_path / "report.html"
    note = html_report_file(tmp_path / "state", None, out, now=NOW)
    assert note.startswith(f"wrote {out}") and out.read_text().startswith("<!DOCTYPE html>")
    empty = tmp_path / "empty.html"
    html_report_file(tmp_path / "nothing", None, empty, now=NOW)
    assert "No calls recorded yet" in empty.read_text() and "<table" not in empty.read_text()
    assert not (tmp_path / "nothing").exists()


def test_the_page_equals_its_reports_made_one_by_one(tmp_path: Path) -> None:
    # The page reads its six groupings from one snapshot and shares their scans (fallback
    # runs, skipped runs, p95 buckets); made one by one, every figure is the same.
    end = datetime.now(UTC).replace(microsecond=0)
    generate_ledger(tmp_path / "s", calls=2500, days=4, end=end, seed=5)
    with Ledger.open(tmp_path / "s", reconcile=False) as ledger:
        for zone, since in (
            ("UTC", end - timedelta(days=3, minutes=7)),
            ("America/New_York", None),
            ("Asia/Kolkata", end - timedelta(days=2)),
        ):
            tz = ZoneInfo(zone)
            page = _parse(html_report(ledger, since=since, until=None, now=end, tz=tz))
            refresh_range(ledger, since)
            reports = [spend_report(ledger, by=by, since=since, tz=tz) for by in SECTIONS]
            charts = [daily_spend(ledger, stack=s, since=since, tz=tz) for s in STACKS]
            alone = _parse(render_html(reports, charts, title="t", subtitle="s"))
            assert page.tables == alone.tables, zone
            assert any(int(r[4]) for r in page.tables["loop"]["tbody"])  # fallbacks
            assert any(r[6] != "0" for r in page.tables["loop"]["tbody"])  # no-op ticks
