"""Pruning: live windows and unsettled rows are kept, the roll-up keeps every report's totals."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from spendledger import GPT_MINI, HAIKU, NOW, SONNET, Call, skipped_run, write_known, write_run

from agentd import budgets, loopstate
from agentd.ledger import Ledger
from agentd.providers.base import Usage
from agentd.retention import PruneRefused, earliest_live_start, prune
from agentd.spend import GROUPINGS, spend_report
from agentd.views import ledger_report, prune_ledger

UTC_ZONE = ZoneInfo("UTC")
CUTOFF = datetime(2026, 3, 1, tzinfo=UTC)
# What a prune must keep equal: every summed column and the mean latency.
KEPT = (
    "runs",
    "fallbacks",
    "skipped",
    "noop",
    "calls",
    "failed",
    "input_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
    "cost_micro_usd",
    "reserved_micro_usd",
    "avg_latency_ms",
)


def feb(day: int, hour: int) -> datetime:
    return datetime(2026, 2, day, hour, tzinfo=UTC)


def old_rows(ledger: Ledger) -> dict[str, int]:
    """February rows before the known March ones; returns the interesting run ids."""
    ids = {
        "F1": write_run(ledger, "alpha", feb(10, 10), [Call(HAIKU, "ok", Usage(100, 10), 100, 20)]),
        "F2": write_run(
            ledger,
            "alpha",
            feb(10, 11),
            [Call(HAIKU, "error", None, 0, 30), Call(GPT_MINI, "ok", Usage(200, 20), 50, 40)],
            fallback=True,
        ),
        # beta's latest run per loop_state below: the daemon reads it, so it stays.
        "F3": write_run(
            ledger,
            "beta",
            feb(11, 2),
            [
                Call(HAIKU, "ok", Usage(300, 30), 300, 50, purpose="draft"),
                Call(SONNET, "ok", Usage(400, 40, 100, 50, 5), 900, 60),
            ],
        ),
        # alpha's latest failed run (failure backoff reads it): kept.
        "F4": write_run(
            ledger,
            "alpha",
            feb(12, 3),
            [Call(HAIKU, "aborted", None, 70, 80, reserved=70)],
            status="failed",
        ),
        # Still in flight: never pruned, and so neither is its run.
        "F5": write_run(
            ledger, "alpha", feb(13, 10), [Call(HAIKU, "pending", reserved=500)], status="running"
        ),
        "F7": write_run(
            ledger, "alpha", feb(13, 9), [Call(HAIKU, "ok", Usage(1000, 100, 400, 0), 200, 90)]
        ),
        "F6": write_run(
            ledger,
            "alpha",
            feb(10, 12),
            [Call(HAIKU, "ok", Usage(10, 1), 7, 3)],
            simulated=True,
        ),
        "K3": skipped_run(ledger, "alpha", feb(14, 0), "skipped_inactive"),
        "K4": skipped_run(ledger, "alpha", feb(15, 0), "skipped_inactive"),  # latest: kept
    }
    loopstate.record_run(ledger, "beta", ids["F3"], "ok", None)
    return ids


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    # February first: ids grow with time, as they do in production (the daemon's "latest run"
    # queries order by id).
    opened = Ledger.open(tmp_path / "state")
    old_rows(opened)
    return write_known(opened)


def totals(ledger: Ledger, simulated: bool = False) -> dict[str, list[dict[str, Any]]]:
    out = {}
    for by in GROUPINGS:
        report = spend_report(ledger, by=by, simulated=simulated)  # type: ignore[arg-type]
        out[by] = [{k: r[k] for k in (by, *KEPT)} for r in [*report.rows, report.total]]
    return out


def ids(ledger: Ledger, table: str) -> set[int]:
    with ledger.read() as conn:
        return {int(r[0]) for r in conn.execute(f"SELECT id FROM {table}")}


def test_earliest_live_start() -> None:
    # Thursday 03-12: the month window (03-01) starts before the week's (Monday 03-09).
    assert earliest_live_start(NOW, UTC_ZONE) == CUTOFF
    # Wednesday 04-01: this week began on Monday 03-30, before the month.
    assert earliest_live_start(datetime(2026, 4, 1, 9, tzinfo=UTC), UTC_ZONE) == datetime(
        2026, 3, 30, tzinfo=UTC
    )
    # In Berlin the month began at 02-28 23:00 UTC.
    berlin = earliest_live_start(NOW, ZoneInfo("Europe/Berlin"))
    assert berlin == datetime(2026, 2, 28, 23, tzinfo=UTC)
    # Without a zone: 14 hours before UTC's, which no zone's window starts before.
    assert earliest_live_start(NOW, None) == datetime(2026, 2, 28, 10, tzinfo=UTC)


def test_refuses_to_touch_a_live_window(ledger: Ledger) -> None:
    with ledger, pytest.raises(PruneRefused, match="latest allowed --before is 2026-03-01"):
        prune(ledger, datetime(2026, 3, 2, tzinfo=UTC), now=NOW, tz=UTC_ZONE)
    with ledger, pytest.raises(PruneRefused, match="in any time zone"):
        prune(ledger, CUTOFF, now=NOW, tz=None)  # 03-01 > 02-28 10:00 without a zone
    assert PruneRefused.exit_code == 2


def test_dry_run_counts_and_changes_nothing(ledger: Ledger) -> None:
    with ledger:
        before = totals(ledger)
        result = prune(ledger, CUTOFF, now=NOW, tz=UTC_ZONE, dry_run=True)
        # F1 (1 call), F2 (2), F7 (1), F6 (1, simulated) and the skipped K3: 4 runs with calls
        # + K3 = 5 runs, 5 calls; cost 100 + 0 + 50 + 200 + 7 = 357 µ$.
        assert (result.runs, result.calls, result.cost_micro_usd) == (5, 5, 357)
        assert result.days == 3  # 02-10 (F1, F2, F6), 02-13 (F7), 02-14 (K3)
        assert totals(ledger) == before
        assert "would prune 5 call(s) and 5 run(s) from before 2026-03-01" in result.describe()


def test_prune_keeps_what_must_stay_and_rolls_up_the_rest(ledger: Ledger) -> None:
    with ledger:
        before, before_sim = totals(ledger), totals(ledger, simulated=True)
        runs_before = ids(ledger, "runs")
        result = prune(ledger, CUTOFF, now=NOW, tz=UTC_ZONE)
        assert (result.runs, result.calls, result.cost_micro_usd) == (5, 5, 357)
        # Kept: F3 (loop_state's last run), F4 (latest failed), F5 (pending), K4 (latest skip).
        assert result.kept_unsettled == 1 and result.kept_protected == 3
        gone = runs_before - ids(ledger, "runs")
        assert len(gone) == 5
        with ledger.read() as conn:
            kept_old = conn.execute(
                "SELECT loop, status FROM runs WHERE started_at < '2026-03' ORDER BY started_at"
            ).fetchall()
            rollup = conn.execute(
                "SELECT SUM(calls), SUM(cost_micro_usd), SUM(runs), SUM(fallbacks), SUM(skipped),"
                " SUM(failed), SUM(input_tokens), SUM(latency_count), SUM(latency_ms_sum)"
                " FROM daily_rollup"
            ).fetchone()
        assert kept_old == [
            ("beta", "ok"),
            ("alpha", "failed"),
            ("alpha", "running"),
            ("alpha", "skipped_inactive"),
        ]
        # The roll-up holds exactly what was pruned: F1 + F2 + F7 (real) and F6 (simulated):
        # 5 calls, 357 µ$, 4 first attempts, F2's fallback, K3, F2's error, 100 + 200 + 1000
        # + 10 input tokens, latencies 20 + 30 + 40 + 90 + 3.
        assert tuple(rollup) == (5, 357, 4, 1, 1, 1, 1310, 5, 183)
        # Every report's sums are unchanged: roll-up + remaining rows, nothing counted twice.
        after, after_sim = totals(ledger), totals(ledger, simulated=True)
        assert after == before and after_sim == before_sim
        # ... but a group with pruned calls has no p95 any more.
        days = {r["day"]: r for r in spend_report(ledger, by="day").rows}
        assert days["2026-02-10"]["p95_latency_ms"] is None
        assert days["2026-02-11"]["p95_latency_ms"] == 60  # F3 is still raw
        assert days["2026-03-09"]["p95_latency_ms"] == 400
        assert spend_report(ledger, by="loop").total["p95_latency_ms"] is None
        # Again: nothing left to prune.
        assert prune(ledger, CUTOFF, now=NOW, tz=UTC_ZONE).calls == 0


def test_a_later_prune_adds_to_the_same_rollup_rows(ledger: Ledger) -> None:
    with ledger:
        prune(ledger, CUTOFF, now=NOW, tz=UTC_ZONE)
        # F5's call settles, its run finishes: a second prune rolls it into 02-13's haiku row,
        # which F7 already filled.
        with ledger.read() as conn:
            call_id, run_id = conn.execute(
                "SELECT id, run_id FROM calls WHERE status = 'pending' AND started_at < '2026-03'"
            ).fetchone()
        budgets.settle(
            ledger,
            call_id,
            status="ok",
            usage=Usage(50, 5),
            cost_micro_usd=40,
            priced=True,
            latency_ms=10,
        )
        ledger.finish_run(run_id, status="ok")
        with ledger.write() as conn:  # the run keeps its February start, not "now"
            conn.execute("UPDATE runs SET finished_at = started_at WHERE id = ?", (run_id,))
        before = totals(ledger)
        assert prune(ledger, CUTOFF, now=NOW, tz=UTC_ZONE).calls == 1
        assert totals(ledger) == before
        with ledger.read() as conn:
            row = conn.execute(
                "SELECT calls, runs, cost_micro_usd, input_tokens FROM daily_rollup"
                " WHERE day = '2026-02-13' AND loop = 'alpha' AND model = 'claude-haiku-4-5'"
            ).fetchone()
        assert tuple(row) == (2, 2, 240, 1050)


def test_prune_without_rollup_loses_the_totals(ledger: Ledger) -> None:
    with ledger:
        before = spend_report(ledger, by="loop").total
        result = prune(ledger, CUTOFF, now=NOW, tz=UTC_ZONE, rollup=False, vacuum=True)
        after = spend_report(ledger, by="loop").total
        assert result.vacuumed and "without a roll-up" in result.describe()
        assert before["cost_micro_usd"] - after["cost_micro_usd"] == 350  # the real part
        with ledger.read() as conn:
            assert conn.execute("SELECT COUNT(*) FROM daily_rollup").fetchone()[0] == 0


def test_reports_over_pruned_days(ledger: Ledger) -> None:
    state = ledger.path.parent
    with ledger:
        prune(ledger, CUTOFF, now=NOW, tz=UTC_ZONE)
    text = ledger_report(state, None, by="day")
    assert "daily roll-up" in text.splitlines()[0]
    with Ledger.open(state, create=False) as reopened:
        feb_only = spend_report(
            reopened, by="loop", since=datetime(2026, 2, 1, tzinfo=UTC), until=CUTOFF
        )
    # February: roll-up (F1, F2, F7: 4 calls, 350 µ$) + raw rows kept (F3 1200, F4 70, F5).
    assert feb_only.total["cost_micro_usd"] == 350 + 1200 + 70
    assert feb_only.total["calls"] == 4 + 2 + 1 + 1


def test_prune_ledger_for_the_cli(ledger: Ledger, tmp_path: Path) -> None:
    ledger.close()
    text = prune_ledger(ledger.path.parent, None, before=datetime(2026, 2, 11, tzinfo=UTC), now=NOW)
    # 02-10: F1, F2 and the simulated F6.
    assert text.startswith("pruned 4 call(s) and 3 run(s) from before 2026-02-11 (UTC)")
    assert prune_ledger(tmp_path / "none", None, before=CUTOFF, now=NOW).startswith("nothing")


def test_pruned_no_op_ticks_keep_their_own_count(ledger: Ledger) -> None:
    with ledger:
        skipped_run(ledger, "beta", feb(14, 1), "skipped_noop")  # pruned
        skipped_run(ledger, "beta", feb(15, 2), "skipped_noop")  # beta's latest no-op: kept
        before = totals(ledger)
        beta = next(r for r in before["loop"] if r["loop"] == "beta")
        assert (beta["skipped"], beta["noop"]) == (3, 3)  # with K2 (03-12)
        prune(ledger, CUTOFF, now=NOW, tz=UTC_ZONE)
        assert totals(ledger) == before
        with ledger.read() as conn:
            rows = conn.execute(
                "SELECT day, loop, purpose, skipped FROM daily_rollup WHERE calls = 0 ORDER BY loop"
            ).fetchall()
        # A skipped runs' roll-up row names their status, so the no-op stays apart from K3.
        assert rows == [
            ("2026-02-14", "alpha", "skipped_inactive", 1),
            ("2026-02-14", "beta", "skipped_noop", 1),
        ]
        days = {r["day"]: r for r in spend_report(ledger, by="day").rows}
        assert (days["2026-02-14"]["skipped"], days["2026-02-14"]["noop"]) == (2, 1)
