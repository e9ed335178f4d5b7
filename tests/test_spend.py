"""Spend reports over a ledger of known rows: groupings, filters, totals, latency, rendering."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from spendledger import D1, HAIKU, NOW, Call, at, build, sql_sums, write_run

from agentd.ledger import Ledger
from agentd.pricing import format_usd
from agentd.providers.base import Usage
from agentd.spend import GROUPINGS, daily_spend, mean_ms, nearest_rank, spend_report
from agentd.views import ledger_report

SUMMED = (
    "runs",
    "calls",
    "failed",
    "fallbacks",
    "input_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
    "cost_micro_usd",
    "reserved_micro_usd",
    "saved_micro_usd",
)


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    with build(tmp_path / "state") as opened:
        yield opened


@pytest.mark.parametrize("by", GROUPINGS)
def test_every_grouping_totals_equal_sql_sums(ledger: Ledger, by: str) -> None:
    report = spend_report(ledger, by=by)  # type: ignore[arg-type]
    expected = sql_sums(ledger)
    for name in SUMMED:
        assert report.total[name] == expected[name], name
        assert sum(row[name] for row in report.rows) == expected[name], name


def test_by_loop_hand_computed(ledger: Ledger) -> None:
    report = spend_report(ledger, by="loop")
    beta, alpha = report.rows  # most expensive first
    # beta: 2250 + 19000 + 5000 (aborted, at its reservation) = 26250.
    assert beta == {
        "loop": "beta",
        "runs": 2,
        "fallbacks": 0,
        "skipped": 1,
        "noop": 1,  # K2 had nothing to do: skipped_noop
        "calls": 3,
        "failed": 1,
        "input_tokens": 5000,
        "cache_read_tokens": 1000,
        "cache_write_tokens": 0,
        "output_tokens": 850,
        "reasoning_tokens": 100,
        "cost_micro_usd": 26250,
        "reserved_micro_usd": 0,
        "saved_micro_usd": 0,  # no list cost recorded (rows as before m012): no saving known
        "avg_latency_ms": 1467,  # (200 + 1200 + 3000) / 3 = 1466.67, half up
        "p95_latency_ms": 3000,  # n = 3: rank ⌈2.85⌉ = 3, the largest
    }
    # alpha: 1500 + 0 + 300 + 1000 = 2800 settled; A4's 700 is in flight.
    assert alpha["cost_micro_usd"] == 2800 and alpha["reserved_micro_usd"] == 700
    assert (alpha["runs"], alpha["calls"], alpha["failed"], alpha["fallbacks"]) == (4, 5, 1, 1)
    assert (alpha["skipped"], alpha["noop"]) == (1, 0)  # K1 skipped_budget is no no-op
    # Settled latencies 100, 50, 400, 300: mean 212.5 -> 213; p95 rank ⌈3.8⌉ = 4 -> 400.
    assert (alpha["avg_latency_ms"], alpha["p95_latency_ms"]) == (213, 400)
    total = report.total
    assert total["loop"] == "total" and total["cost_micro_usd"] == 29050
    assert (total["skipped"], total["noop"]) == (2, 1)
    # All seven settled latencies: rank ⌈6.65⌉ = 7 -> 3000.
    assert total["p95_latency_ms"] == 3000


def test_call_groupings(ledger: Ledger) -> None:
    def pick(by: str) -> dict[object, tuple[int, int, int]]:
        rows = spend_report(ledger, by=by).rows  # type: ignore[arg-type]
        return {r[by]: (r["calls"], r["cost_micro_usd"], r["runs"]) for r in rows}

    # Runs count where their first attempt is: B1 starts with a fast draft.
    assert pick("tier") == {"fast": (6, 5050, 5), "balanced": (2, 24000, 1)}
    assert pick("purpose") == {"work": (7, 26800, 5), "draft": (1, 2250, 1)}
    assert pick("provider") == {"anthropic": (7, 28750, 6), "openai": (1, 300, 0)}
    assert pick("model") == {
        "claude-sonnet-4-5": (2, 24000, 1),
        "claude-haiku-4-5": (5, 4750, 5),
        "gpt-4o-mini": (1, 300, 0),
    }
    by_tier = spend_report(ledger, by="tier")
    assert all(r["skipped"] is None for r in by_tier.rows)  # skipped runs have no tier
    # The fallback run A2 counts where its first attempt (haiku, fast) is.
    assert {r["tier"]: r["fallbacks"] for r in by_tier.rows} == {"fast": 1, "balanced": 0}


def test_days_weeks_months_in_utc(ledger: Ledger) -> None:
    days = spend_report(ledger, by="day").rows
    # 03-11 has no calls: the gap is filled, so a chart or a reader sees the quiet day.
    assert [(r["day"], r["calls"], r["cost_micro_usd"], r["skipped"], r["noop"]) for r in days] == [
        ("2026-03-09", 3, 1800, 0, 0),
        ("2026-03-10", 2, 21250, 1, 0),
        ("2026-03-11", 0, 0, 0, 0),
        ("2026-03-12", 3, 6000, 1, 1),
    ]
    assert days[2]["avg_latency_ms"] is None and days[2]["p95_latency_ms"] is None
    weeks = spend_report(ledger, by="week").rows
    assert [(r["week"], r["calls"]) for r in weeks] == [("2026-W11", 8)]
    months = spend_report(ledger, by="month").rows
    assert [(r["month"], r["cost_micro_usd"]) for r in months] == [("2026-03", 29050)]


def test_days_in_the_config_timezone(ledger: Ledger) -> None:
    # B1 at 03-10 02:00 UTC is 03-09 22:00 in New York (EDT since 03-08, UTC-4); A2 at 22:30
    # UTC is 18:30 there, still 03-09.
    rows = spend_report(ledger, by="day", tz=ZoneInfo("America/New_York")).rows
    assert [(r["day"], r["calls"]) for r in rows] == [
        ("2026-03-09", 5),
        ("2026-03-10", 0),
        ("2026-03-11", 0),
        ("2026-03-12", 3),
    ]
    # p95 per local day covers exactly that day's calls: 03-09 has 100, 50, 400, 200, 1200.
    assert rows[0]["p95_latency_ms"] == 1200
    kathmandu = spend_report(ledger, by="day", tz=ZoneInfo("Asia/Kathmandu")).rows  # UTC+5:45
    # A2 at 22:30 UTC is 04:15 on 03-10 in Kathmandu; A1 at 10:00 is 15:45 on 03-09.
    assert [(r["day"], r["calls"]) for r in kathmandu][:2] == [("2026-03-09", 1), ("2026-03-10", 4)]


def test_range_and_loop_filters(ledger: Ledger) -> None:
    since, until = at(10, 0), at(12, 12, 30)
    report = spend_report(ledger, by="loop", since=since, until=until)
    expected = sql_sums(
        ledger,
        "simulated = 0 AND started_at >= '2026-03-10' AND started_at < '2026-03-12T12:30'",
    )
    assert report.total["calls"] == expected["calls"] == 3
    assert report.total["cost_micro_usd"] == expected["cost_micro_usd"] == 26250
    only = spend_report(ledger, by="day", loop="alpha")
    assert {r["day"]: r["calls"] for r in only.rows} == {
        "2026-03-09": 3,
        "2026-03-10": 0,
        "2026-03-11": 0,
        "2026-03-12": 2,
    }


def test_simulated_rows_only_when_asked(ledger: Ledger) -> None:
    real = spend_report(ledger, by="loop")
    assert real.total["cost_micro_usd"] == 29050  # S1's 50000 is not in it
    sim = spend_report(ledger, by="loop", simulated=True)
    assert [(r["loop"], r["calls"], r["cost_micro_usd"]) for r in sim.rows] == [
        ("alpha", 1, 50_000)
    ]


def test_p95_is_exact_nearest_rank(tmp_path: Path) -> None:
    assert [nearest_rank(n) for n in (1, 2, 19, 20, 21, 100)] == [1, 2, 19, 19, 20, 95]
    assert mean_ms(5, 2) == 3 and mean_ms(4, 3) == 1 and mean_ms(0, 0) is None
    with Ledger.open(tmp_path / "s") as ledger:
        # 20 latencies 10, 20, ..., 200 in shuffled order: rank ⌈0.95 × 20⌉ = 19 -> 190.
        for i, ms in enumerate([70, 200, 10, 150, 30, 190, 90, 110, 40, 180,
                                20, 130, 60, 170, 80, 140, 50, 160, 100, 120]):  # fmt: skip
            write_run(
                ledger, "p", D1 + timedelta(minutes=i), [Call(HAIKU, "ok", Usage(1, 1), 1, ms)]
            )
        report = spend_report(ledger, by="loop")
        assert report.rows[0]["p95_latency_ms"] == 190
        assert report.rows[0]["avg_latency_ms"] == 105
        # One more (210): n = 21, rank ⌈19.95⌉ = 20 -> 200.
        write_run(ledger, "p", D1 + timedelta(hours=1), [Call(HAIKU, "ok", Usage(1, 1), 1, 210)])
        assert spend_report(ledger, by="loop").total["p95_latency_ms"] == 200


def test_daily_spend_series(ledger: Ledger) -> None:
    daily = daily_spend(ledger, stack="loop")
    assert daily.days == ["2026-03-09", "2026-03-10", "2026-03-11", "2026-03-12"]
    assert daily.series == {"beta": [0, 21250, 0, 5000], "alpha": [1800, 0, 0, 1000]}
    tiers = daily_spend(ledger, stack="tier")
    assert tiers.totals() == {"balanced": 24000, "fast": 5050}


def test_table_json_and_csv_come_from_the_same_rows(ledger: Ledger, tmp_path: Path) -> None:
    state = ledger.path.parent
    table = ledger_report(state, None, by="loop", fmt="table")
    lines = table.splitlines()
    assert lines[0].startswith("real calls by loop, the beginning to now (UTC)")
    assert lines[1].split()[:7] == [
        "loop",
        "runs",
        "calls",
        "failed",
        "fallbacks",
        "skipped",
        "noop",
    ]
    assert lines[-1].split()[0] == "total" and "0.029050" in lines[-1]
    assert set(lines[-2]) == {"-", " "}  # a rule above the totals
    rows = json.loads(ledger_report(state, None, by="loop", fmt="json"))
    assert [r["loop"] for r in rows] == ["beta", "alpha"]  # no totals row in JSON
    assert rows[0]["cost_usd"] == "0.026250" and rows[1]["reserved_usd"] == "0.000700"
    assert rows[0]["p95_latency_ms"] == 3000
    # `noop` comes right after `skipped` (which keeps counting every skipped run).
    assert list(rows[0])[5:7] == ["skipped", "noop"]
    assert [(r["skipped"], r["noop"]) for r in rows] == [(1, 1), (1, 0)]
    parsed = list(csv.DictReader(io.StringIO(ledger_report(state, None, by="loop", fmt="csv"))))
    assert [(r["loop"], r["cost_usd"]) for r in parsed] == [
        ("beta", "0.026250"),
        ("alpha", "0.002800"),
    ]
    assert [(r["skipped"], r["noop"]) for r in parsed] == [("1", "1"), ("1", "0")]
    for line, row in zip(lines[3:5], rows, strict=True):
        assert line.split()[0] == row["loop"] and row["cost_usd"] in line


def test_reports_without_a_ledger(tmp_path: Path) -> None:
    state = tmp_path / "empty"
    assert ledger_report(state, None, fmt="table") == "(no rows)"
    assert json.loads(ledger_report(state, None, fmt="json")) == []
    assert ledger_report(state, None, chart=True) == "(no spend in this period)"
    assert not state.exists()


def test_bad_arguments(ledger: Ledger) -> None:
    state = ledger.path.parent
    with pytest.raises(ValueError, match="cannot group by"):
        ledger_report(state, None, by="hour")
    with pytest.raises(ValueError, match="--chart"):
        ledger_report(state, None, chart=True, fmt="json")
    with pytest.raises(ValueError, match="stack"):
        ledger_report(state, None, chart=True, stack="model")


def test_now_is_after_the_fixture() -> None:
    assert at(12, 14) < NOW


def test_datasette_canned_queries_agree_with_the_reports(ledger: Ledger) -> None:
    metadata = json.loads(
        (Path(__file__).parent.parent / "config" / "datasette-metadata.json").read_text()
    )
    queries = metadata["databases"]["ledger"]["queries"]
    assert set(queries) >= {"spend_by_day", "spend_by_loop", "failures", "most_expensive_runs"}
    with ledger.read() as conn:

        def run(name: str) -> list[dict[str, object]]:
            cur = conn.execute(queries[name]["sql"], {"since": "2026-01-01"})
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

        by_day = run("spend_by_day")
        by_loop = run("spend_by_loop")
        failures = run("failures")
        expensive = run("most_expensive_runs")
        assert run("spend_by_model")
        assert conn.execute(queries["failures"]["sql"], {"since": ""}).fetchall() is not None
    report = spend_report(ledger, by="day")
    assert {r["day"]: r["cost_usd"] for r in by_day} == {
        r["day"]: format_usd(r["cost_micro_usd"]) for r in report.rows if r["calls"]
    }
    assert [(r["loop"], r["runs"], r["calls"], r["cost_usd"]) for r in by_loop] == [
        ("beta", 2, 3, "0.026250"),
        ("alpha", 4, 5, "0.002800"),
    ]
    assert [(r["status"], r["run_status"]) for r in failures] == [
        ("aborted", "failed"),
        ("error", "ok"),
    ]
    assert [r["cost_usd"] for r in expensive][:2] == ["0.021250", "0.005000"]


def test_skip_statuses_match_the_partial_index() -> None:
    # A new skip status needs a migration that rebuilds `runs_skipped`, or the reports lose
    # the index (they stay correct, only slower).
    from agentd.ledger import SKIPPED_RUN_STATUSES
    from agentd.migrations import SKIPPED_INDEXED

    assert tuple(SKIPPED_RUN_STATUSES) == SKIPPED_INDEXED
