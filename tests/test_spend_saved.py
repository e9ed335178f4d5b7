"""`saved_usd`: what caching and batching saved against list price, in every spend report.

The rows are `spendledger.write_savings` (cached, batch, cache-write-only, failed, aborted,
in-flight, simulated and no-list-cost calls), whose docstring holds the hand arithmetic.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from spendledger import at, cached_report, sql_sums, write_known, write_savings

from agentd import migrations
from agentd.htmlreport import html_report
from agentd.ledger import Ledger
from agentd.pricing import format_usd
from agentd.retention import prune
from agentd.spend import GROUPINGS
from agentd.views import ledger_report

LATER = datetime(2026, 6, 1, tzinfo=UTC)  # "now" for pruning: every March window is closed
SAVED = 62_300
METADATA = Path(__file__).parent.parent / "config" / "datasette-metadata.json"


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    with Ledger.open(tmp_path / "state") as opened:
        yield write_savings(opened)


def saved(ledger: Ledger, by: str, **kwargs: Any) -> dict[object, int]:
    report = cached_report(ledger, by=by, **kwargs)  # type: ignore[arg-type]
    out: dict[object, int] = {r[by]: r["saved_micro_usd"] for r in report.rows}
    out["total"] = report.total["saved_micro_usd"]
    return out


def test_saved_per_group_and_total_hand_computed(ledger: Ledger) -> None:
    # list − cost per call: V1 7200, V2 13500, V3 −250, V4 0 + 1350, V5 0 (aborted), V6 0
    # (no list cost), V7 nothing (in flight), V8 40500.
    assert saved(ledger, "loop") == {"delta": 60_950, "omega": 1_350, "total": SAVED}
    assert saved(ledger, "model") == {
        "claude-sonnet-4-5": 54_000,  # V2 + V5 + V8 (+ V7 in flight)
        "claude-haiku-4-5": 6_950,  # V1 + V3 + V4's error + V6
        "gpt-4o-mini": 1_350,
        "total": SAVED,
    }
    assert saved(ledger, "tier") == {"balanced": 54_000, "fast": 8_300, "total": SAVED}
    assert saved(ledger, "provider") == {"anthropic": 60_950, "openai": 1_350, "total": SAVED}
    assert saved(ledger, "purpose") == {"draft": 40_500, "work": 21_800, "total": SAVED}
    assert saved(ledger, "day") == {
        "2026-03-16": 20_450,
        "2026-03-17": 1_350,
        "2026-03-18": 40_500,
        "total": SAVED,
    }
    assert saved(ledger, "week") == {"2026-W12": SAVED, "total": SAVED}
    assert saved(ledger, "month") == {"2026-03": SAVED, "total": SAVED}
    # V9 is simulated: only in the simulated report.
    assert saved(ledger, "loop", simulated=True) == {"delta": 1_450, "total": 1_450}
    report = cached_report(ledger, by="loop")
    # Cost and reserved are unchanged by the new column: cost 64900, V7's 9000 in flight.
    assert report.total["cost_micro_usd"] == 64_900
    assert report.total["reserved_micro_usd"] == 9_000
    omega = next(r for r in report.rows if r["loop"] == "omega")
    assert (omega["cost_micro_usd"], omega["reserved_micro_usd"]) == (8_850, 9_000)


def test_in_flight_calls_save_nothing_until_settled(ledger: Ledger) -> None:
    from agentd import budgets

    assert saved(ledger, "loop")["omega"] == 1_350
    with ledger.read() as conn:
        (call_id,) = conn.execute("SELECT id FROM calls WHERE status = 'pending'").fetchone()
    with ledger.write() as conn:  # a list cost on an unsettled row still counts nothing
        conn.execute("UPDATE calls SET list_cost_micro_usd = 99999 WHERE id = ?", (call_id,))
    assert saved(ledger, "loop")["omega"] == 1_350
    budgets.settle(
        ledger, call_id, status="ok", usage=None, cost_micro_usd=4_000, priced=True, latency_ms=5
    )
    with ledger.write() as conn:  # what the executor records at settle time
        conn.execute("UPDATE calls SET list_cost_micro_usd = 8000 WHERE id = ?", (call_id,))
    assert saved(ledger, "loop") == {"delta": 60_950, "omega": 5_350, "total": SAVED + 4_000}


@pytest.mark.parametrize("by", GROUPINGS)
def test_totals_equal_sql_sums_with_the_known_rows_too(ledger: Ledger, by: str) -> None:
    write_known(ledger)  # rows without a list cost: they add cost, no saving
    report = cached_report(ledger, by=by)  # type: ignore[arg-type]
    expected = sql_sums(ledger)
    assert expected["saved_micro_usd"] == SAVED
    for name in ("saved_micro_usd", "cost_micro_usd", "reserved_micro_usd", "calls"):
        assert report.total[name] == expected[name], name
        assert sum(r[name] for r in report.rows) == expected[name], name


def reports(ledger: Ledger, cache: bool) -> list[Any]:
    out = []
    for zone in ("UTC", "America/New_York", "Asia/Kolkata"):
        for by in GROUPINGS:
            for since, until in ((None, None), (at(16, 10, 30), at(18, 12, 30))):
                out.append(
                    cached_report(
                        ledger, by=by, since=since, until=until, tz=ZoneInfo(zone), cache=cache
                    )
                )
    return out


def test_the_cache_and_the_raw_rows_agree(ledger: Ledger) -> None:
    raw = reports(ledger, cache=False)
    cached = reports(ledger, cache=True)  # the first fills report_hours and report_days
    with ledger.read() as conn:
        hours = conn.execute(
            "SELECT SUM(list_cost_micro_usd) - SUM(cost_micro_usd) FROM report_hours"
            " WHERE simulated = 0"
        ).fetchone()[0]
        days = conn.execute("SELECT COUNT(*) FROM report_days").fetchone()[0]
    # Every hour is cached but V7's (in flight: a hole, read raw); its sums hold the saving.
    assert hours == SAVED and days > 0
    assert cached == raw
    assert reports(ledger, cache=True) == raw  # read from the cache this time
    # 03-16 10:30 to 03-18 12:30: V3, V4, V5, V6 and V7 (in flight).
    assert [r.total["saved_micro_usd"] for r in raw[:2]] == [SAVED, -250 + 1_350]


def test_a_pruned_day_keeps_its_saving(ledger: Ledger) -> None:
    def everything() -> list[dict[str, Any]]:
        return [
            {k: r[k] for k in (by, "saved_micro_usd", "cost_micro_usd", "calls")}
            for by in GROUPINGS
            for report in [cached_report(ledger, by=by)]
            for r in [*report.rows, report.total]
        ]

    before = everything()
    cached_report(ledger, by="loop")  # fill the cache first: prune must forget pruned hours
    result = prune(ledger, datetime(2026, 3, 19, tzinfo=UTC), now=LATER, tz=UTC)
    # Pruned: V1, V2, V3 (03-16) and V4's two calls (03-17). Kept: V8, V6 and V9 (their
    # loops' latest replied runs), V5 (omega's latest failed run) and V7 (in flight).
    assert result.calls == 5
    with ledger.read() as conn:
        rolled = conn.execute(
            "SELECT SUM(list_cost_micro_usd) - SUM(cost_micro_usd) FROM daily_rollup"
            " WHERE simulated = 0"
        ).fetchone()[0]
    assert rolled == 7_200 + 13_500 - 250 + 1_350
    assert everything() == before
    day = cached_report(ledger, by="day", since=at(16, 0), until=at(17, 0))
    assert day.includes_rollup and day.total["saved_micro_usd"] == 20_450
    assert cached_report(ledger, by="loop", simulated=True).total["saved_micro_usd"] == 1_450
    assert cached_report(ledger, by="loop", cache=False).total["saved_micro_usd"] == SAVED


def test_a_later_prune_adds_list_cost_to_an_old_rollup_row(ledger: Ledger) -> None:
    prune(ledger, datetime(2026, 3, 17, tzinfo=UTC), now=LATER, tz=UTC)
    with ledger.write() as conn:  # a roll-up row from before m012 (list cost NULL) ...
        conn.execute(
            "UPDATE daily_rollup SET list_cost_micro_usd = NULL WHERE loop = 'delta'"
            " AND model = 'claude-haiku-4-5' AND simulated = 0"
        )
        # ... and one more call of the same day and key, written late, then pruned into it.
        conn.execute(
            "INSERT INTO calls (loop, purpose, tier, alias, provider, model, attempt, status,"
            " input_tokens, output_tokens, reserved_micro_usd, cost_micro_usd, priced,"
            " simulated, batch, owner, started_at, finished_at, list_cost_micro_usd)"
            " VALUES ('delta', 'work', 'fast', 'haiku', 'anthropic', 'claude-haiku-4-5', 1,"
            " 'ok', 100, 10, 500, 40, 1, 0, 1, 'o', '2026-03-16T20:00:00.000000Z',"
            " '2026-03-16T20:00:01.000000Z', 150)"
        )
    prune(ledger, datetime(2026, 3, 17, tzinfo=UTC), now=LATER, tz=UTC)
    with ledger.read() as conn:
        row = conn.execute(
            "SELECT calls, cost_micro_usd, list_cost_micro_usd FROM daily_rollup"
            " WHERE loop = 'delta' AND model = 'claude-haiku-4-5' AND simulated = 0"
        ).fetchone()
    # V1 + V3 (no saving known any more: list = their cost 8050) + the new call (saved 110).
    assert tuple(row) == (3, 8_090, 8_050 + 150)
    assert saved(ledger, "loop")["delta"] == 13_500 + 110 + 40_500


def test_json_csv_and_table_show_saved_usd(ledger: Ledger) -> None:
    state = ledger.path.parent
    rows = json.loads(ledger_report(state, None, by="loop", fmt="json"))
    assert [(r["loop"], r["cost_usd"], r["saved_usd"]) for r in rows] == [
        ("delta", "0.056050", "0.060950"),
        ("omega", "0.008850", "0.001350"),
    ]
    assert list(rows[0]).index("saved_usd") == list(rows[0]).index("cost_usd") + 1
    # V3 alone: its cache write cost more than list price, a negative saving.
    since, until = at(16, 11), at(16, 12)
    only = json.loads(ledger_report(state, None, since=since, until=until, fmt="json"))
    assert only[0]["saved_usd"] == "-0.000250"
    parsed = list(csv.DictReader(io.StringIO(ledger_report(state, None, by="day", fmt="csv"))))
    assert [(r["day"], r["saved_usd"]) for r in parsed] == [
        ("2026-03-16", "0.020450"),
        ("2026-03-17", "0.001350"),
        ("2026-03-18", "0.040500"),
    ]
    lines = ledger_report(state, None, by="loop").splitlines()
    assert "cost_usd  saved_usd" in lines[1]  # one more column, right after the cost
    total = lines[-1].split()
    assert total[0] == "total"
    assert total[total.index("0.064900") + 1] == "0.062300"
    negative = ledger_report(state, None, since=since, until=until).splitlines()[-1].split()
    assert negative[negative.index("0.002750") + 1] == "-0.000250"


def test_html_report_shows_the_saving(ledger: Ledger) -> None:
    html = html_report(ledger, since=None, until=None, now=LATER)
    assert "saved vs list price<b>$0.062300</b>" in html
    assert html.count('<th class="num">saved_usd</th>') == 6  # one per table
    assert html.count('<td class="num">0.062300</td>') == 6  # each table's totals row
    negative = html_report(ledger, since=at(16, 11), until=at(16, 12), now=LATER)
    assert "saved vs list price<b>-$0.000250</b>" in negative


def run_query(ledger: Ledger, name: str, since: str = "2026-01-01") -> list[dict[str, Any]]:
    queries = json.loads(METADATA.read_text())["databases"]["ledger"]["queries"]
    with ledger.read() as conn:
        cur = conn.execute(queries[name]["sql"], {"since": since})
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def test_datasette_savings_query_agrees_with_the_reports(ledger: Ledger) -> None:
    def by_report() -> dict[tuple[str, str], tuple[str, str]]:
        out = {}
        for day in ("2026-03-16", "2026-03-17", "2026-03-18"):
            start = datetime.fromisoformat(day).replace(tzinfo=UTC)
            report = cached_report(ledger, by="loop", since=start, until=start + timedelta(1))
            for r in report.rows:
                out[(day, r["loop"])] = (
                    format_usd(r["cost_micro_usd"]),
                    format_usd(r["saved_micro_usd"]),
                )
        return out

    rows = run_query(ledger, "savings_by_loop_and_day")
    assert [(r["day"], r["loop"]) for r in rows] == [
        ("2026-03-18", "delta"),
        ("2026-03-18", "omega"),  # V7 in flight: no cost, no saving
        ("2026-03-17", "omega"),
        ("2026-03-16", "delta"),
    ]
    assert {(r["day"], r["loop"]): (r["cost_usd"], r["saved_usd"]) for r in rows} == by_report()
    first = rows[0]
    assert (first["list_cost_usd"], first["cache_read_tokens"], first["batch_calls"]) == (
        "0.075000",
        15_000,
        0,
    )
    assert [r["batch_calls"] for r in rows] == [0, 1, 1, 1]
    # Exact decimal strings, negative too: V3 alone is −250 µ$.
    assert Decimal(rows[-1]["saved_usd"]) * 1_000_000 == 20_450
    # After a prune, the rolled-up days come from daily_rollup (no batch count kept there).
    prune(ledger, datetime(2026, 3, 17, tzinfo=UTC), now=LATER, tz=UTC)
    after = run_query(ledger, "savings_by_loop_and_day")
    pruned = after[-1]
    assert (pruned["day"], pruned["saved_usd"], pruned["batch_calls"]) == (
        "2026-03-16",
        "0.020450",
        None,
    )
    assert {(r["day"], r["loop"]): (r["cost_usd"], r["saved_usd"]) for r in after} == by_report()
    assert run_query(ledger, "savings_by_loop_and_day", since="") is not None


def test_negative_money_in_the_datasette_query(ledger: Ledger) -> None:
    with ledger.write() as conn:  # only V3 left in the real calls of 03-16
        conn.execute(
            "DELETE FROM calls WHERE started_at LIKE '2026-03-16%' AND cache_write_tokens = 0"
        )
    rows = run_query(ledger, "savings_by_loop_and_day")
    assert rows[-1]["saved_usd"] == "-0.000250" and rows[-1]["cost_usd"] == "0.002750"


def test_upgrading_a_ledger_empties_and_rebuilds_the_report_cache(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with Ledger.open(state) as ledger:
        write_savings(ledger)
        cached_report(ledger, by="loop")  # the cache as the current code fills it
    # The same ledger as m011 left it: drop m012's work by rebuilding the file up to m011
    # and copying the rows that existed then.
    old = tmp_path / "old"
    old.mkdir()
    conn = sqlite3.connect(old / "ledger.db", isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    upto = [s for s in migrations.MIGRATIONS if s[0] <= "m011_batches"]
    migrations.migrate(conn, upto)
    conn.execute("COMMIT")
    conn.execute("ATTACH DATABASE ? AS new", (str(state / "ledger.db"),))
    for table in ("runs", "calls", "report_hours", "report_days", "report_cache", "report_holes"):
        columns = ", ".join(r[1] for r in conn.execute(f"PRAGMA main.table_info({table})"))
        conn.execute(f"INSERT INTO main.{table} ({columns}) SELECT {columns} FROM new.{table}")
    conn.execute(
        "INSERT INTO daily_rollup (day, loop, tier, model, provider, purpose, simulated, calls,"
        " cost_micro_usd) VALUES ('2026-02-01', 'delta', 'fast', 'm', 'p', 'work', 0, 2, 700)"
    )
    conn.execute("DETACH DATABASE new")
    assert conn.execute("SELECT COUNT(*) FROM report_hours").fetchone()[0] > 0
    conn.close()
    with Ledger.open(old) as upgraded:
        with upgraded.read() as c:
            assert c.execute("SELECT COUNT(*) FROM report_hours").fetchone()[0] == 0
            assert c.execute("SELECT COUNT(*) FROM report_days").fetchone()[0] == 0
            assert c.execute("SELECT COUNT(*) FROM report_cache").fetchone()[0] == 0
            assert c.execute("SELECT COUNT(*) FROM report_holes").fetchone()[0] == 0
            assert c.execute("SELECT list_cost_micro_usd FROM daily_rollup").fetchone()[0] == 700
            assert c.execute("SELECT COUNT(list_cost_micro_usd) FROM calls").fetchone()[0] == 0
        # Calls written before the step have no list cost: nothing saved, cost unchanged.
        raw = cached_report(upgraded, by="day", cache=False)
        assert raw.total["saved_micro_usd"] == 0
        assert raw.total["cost_micro_usd"] == 64_900 + 700
        with upgraded.write() as c:  # the executor's list costs, recorded from now on
            c.execute(
                "UPDATE calls SET list_cost_micro_usd = ? WHERE started_at LIKE '2026-03-16T09%'",
                (12_500,),
            )
        rebuilt = cached_report(upgraded, by="day")  # refills the cache from empty
        with upgraded.read() as c:
            assert c.execute("SELECT COUNT(*) FROM report_hours").fetchone()[0] > 0
            assert c.execute("SELECT through FROM report_cache").fetchone()[0] > "2026-03-18"
        assert rebuilt == cached_report(upgraded, by="day", cache=False)
        assert rebuilt.total["saved_micro_usd"] == 7_200
