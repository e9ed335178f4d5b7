"""Prometheus metrics from a real ledger: exact counters, labels, budgets, incremental scrapes."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from builders import base_config, merge, write_config

from agentd import budgets, loopstate, metrics
from agentd.budgets import CallStart
from agentd.config import Config, load_config
from agentd.ledger import Ledger, utc_iso
from agentd.metrics import escape_label_value, format_value, render_metrics
from agentd.providers.base import Usage

T0 = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
HAIKU = "claude-haiku-4-5"
MINI = "gpt-4o-mini"

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(?:,|$)')

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), text)


def parse(text: str) -> tuple[Samples, dict[str, str], dict[str, str]]:
    """Samples by (name, labels), and each family's TYPE and HELP; checks the layout as it goes."""
    samples: Samples = {}
    types: dict[str, str] = {}
    helps: dict[str, str] = {}
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            assert name not in helps, f"two HELP lines for {name}"
            helps[name] = help_text
            continue
        if line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert name in helps and name not in types, f"TYPE of {name} out of place"
            types[name] = kind
            continue
        match = _SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        name, labels_text, value = match.groups()
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
        assert family in types, f"sample {name} before its TYPE line"
        labels: frozenset[tuple[str, str]] = frozenset()
        if labels_text:
            found = _LABEL.findall(labels_text)
            assert ",".join(f'{k}="{v}"' for k, v in found) == labels_text, labels_text
            labels = frozenset((k, _unescape(v)) for k, v in found)
        key = (name, labels)
        assert key not in samples, f"duplicate sample {line!r}"
        samples[key] = float(value)
    return samples, types, helps


def val(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def names(samples: Samples, name: str) -> list[dict[str, str]]:
    return [dict(labels) for (n, labels) in samples if n == name]


@pytest.fixture
def config(tmp_path: Path) -> Config:
    data = merge(
        base_config("http://127.0.0.1:9"),
        {
            "budgets": {"per_day_usd": 5, "per_month_usd": 60},
            "loops": {
                "work": {"budget": {"per_day_usd": 1}},
                "other": {"every": "1h", "tier": "balanced", "max_tokens": 100, "prompt": "o.md"},
            },
        },
    )
    return load_config(write_config(tmp_path / "config", data))


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    with Ledger.open(tmp_path / "state") as opened:
        yield opened


def _windows(config: Config, loop: str) -> list[budgets.Window]:
    own = config.loops[loop].budget
    glob = config.budgets
    return budgets.windows_for(loop, own.limits() if own else None, glob.limits() if glob else None)


def call(
    ledger: Ledger,
    config: Config,
    run_id: int | None,
    *,
    loop: str = "work",
    model: str = HAIKU,
    attempt: int = 1,
    reserve: int = 5000,
    simulated: bool = False,
) -> int:
    start = CallStart(
        run_id=run_id,
        loop=loop,
        purpose="work",
        tier="fast",
        alias="haiku",
        provider="anthropic",
        model=model,
        attempt=attempt,
        simulated=simulated,
    )
    return budgets.reserve(ledger, start, reserve, _windows(config, loop), config.tz, now=T0)


def settle(
    ledger: Ledger, call_id: int, cost: int, usage: Usage | None, status: Any = "ok"
) -> None:
    budgets.settle(ledger, call_id, status=status, usage=usage, cost_micro_usd=cost, priced=True)


def set_times(ledger: Ledger, run_id: int, seconds: float) -> None:
    """Give a run an exact duration: the API stamps the wall clock, too fast to assert on."""
    start = datetime(2026, 3, 10, 11, 0, tzinfo=UTC)
    with ledger.write() as conn:
        conn.execute(
            "UPDATE runs SET started_at = ?, finished_at = ? WHERE id = ?",
            (utc_iso(start), utc_iso(start + timedelta(seconds=seconds)), run_id),
        )


@pytest.fixture
def populated(ledger: Ledger, config: Config) -> Ledger:
    """Real rows: a retried ok run, a failed run, a skipped one, one in flight, a simulated one."""
    run1 = ledger.start_run(loop="work", trigger="schedule", simulated=False)
    settle(ledger, call(ledger, config, run1), 0, None, status="error")
    settle(ledger, call(ledger, config, run1, attempt=2), 1234, Usage(1000, 200, 300, 100, 50))
    ledger.finish_run(run1, status="ok", model=HAIKU)
    set_times(ledger, run1, 3.0)

    run2 = ledger.start_run(loop="work", trigger="manual", simulated=False)
    settle(ledger, call(ledger, config, run2, model=MINI), 7, Usage(10, 5))
    settle(ledger, call(ledger, config, run2, model=MINI, attempt=2), 3000, None, "aborted")
    ledger.finish_run(run2, status="failed", error="every model failed")
    set_times(ledger, run2, 0.25)

    ledger.record_skipped_run(
        loop="other", trigger="schedule", simulated=False, status="skipped_budget"
    )
    run3 = ledger.start_run(loop="other", trigger="schedule", simulated=False)
    call(ledger, config, run3, loop="other", reserve=4000)  # still in flight

    run4 = ledger.start_run(loop="work", trigger="manual", simulated=True)
    settle(ledger, call(ledger, config, run4, simulated=True), 999, Usage(1, 1))
    ledger.finish_run(run4, status="ok")
    set_times(ledger, run4, 1.0)
    return ledger


def test_counters_are_exact(populated: Ledger, config: Config) -> None:
    samples, types, _ = parse(render_metrics(populated, config, now=T0))

    assert names(samples, "agentd_calls_total") == [
        {"loop": "work", "model": HAIKU, "status": "error"},
        {"loop": "work", "model": HAIKU, "status": "ok"},
        {"loop": "work", "model": MINI, "status": "aborted"},
        {"loop": "work", "model": MINI, "status": "ok"},
    ]
    assert val(samples, "agentd_calls_total", loop="work", model=HAIKU, status="ok") == 1
    assert val(samples, "agentd_calls_total", loop="work", model=HAIKU, status="error") == 1

    # Tokens and spend carry the same loop/model/status series as the call counts.
    series = names(samples, "agentd_calls_total")
    assert names(samples, "agentd_cost_micro_usd_total") == series
    assert names(samples, "agentd_tokens_total") == [
        {**labels, "kind": kind} for labels in series for kind in metrics.TOKEN_KINDS
    ]
    tokens = {
        kind: val(samples, "agentd_tokens_total", loop="work", model=HAIKU, status="ok", kind=kind)
        for kind in metrics.TOKEN_KINDS
    }
    assert tokens == {
        "input": 1000,
        "output": 200,
        "cache_read": 300,
        "cache_write": 100,
        "reasoning": 50,
    }
    for kind in metrics.TOKEN_KINDS:  # the failed attempt reported no usage
        assert (
            val(samples, "agentd_tokens_total", loop="work", model=HAIKU, status="error", kind=kind)
            == 0
        )
    mini_ok = {"loop": "work", "model": MINI, "status": "ok"}
    assert val(samples, "agentd_tokens_total", **mini_ok, kind="input") == 10
    assert val(samples, "agentd_tokens_total", **mini_ok, kind="output") == 5
    cost = {
        (x["model"], x["status"]): val(samples, "agentd_cost_micro_usd_total", **x) for x in series
    }
    # An aborted call counts at its reservation, as in the ledger reports.
    assert cost == {
        (HAIKU, "error"): 0,
        (HAIKU, "ok"): 1234,
        (MINI, "aborted"): 3000,
        (MINI, "ok"): 7,
    }

    assert val(samples, "agentd_calls_in_flight", loop="other", model=HAIKU) == 1
    assert val(samples, "agentd_reserved_micro_usd", loop="other", model=HAIKU) == 4000

    assert val(samples, "agentd_runs_total", loop="work", status="ok") == 1
    assert val(samples, "agentd_runs_total", loop="work", status="failed") == 1
    assert val(samples, "agentd_runs_total", loop="other", status="skipped_budget") == 1
    assert len(names(samples, "agentd_runs_total")) == 3  # the running run is not counted yet

    assert types["agentd_calls_total"] == "counter"
    assert types["agentd_cost_micro_usd_total"] == "counter"
    assert types["agentd_run_duration_seconds"] == "histogram"
    assert types["agentd_budget_remaining_micro_usd"] == "gauge"
    # Money is integer micro-USD on the wire, never a float.
    text = render_metrics(populated, config, now=T0)
    assert 'agentd_cost_micro_usd_total{loop="work",model="gpt-4o-mini",status="ok"} 7\n' in text
    assert (
        'agentd_tokens_total{loop="work",model="gpt-4o-mini",status="aborted",kind="input"} 0\n'
        in text
    )


def test_run_duration_histogram(populated: Ledger, config: Config) -> None:
    samples, _, _ = parse(render_metrics(populated, config, now=T0))
    buckets = {
        labels["le"]: val(samples, "agentd_run_duration_seconds_bucket", **labels)
        for labels in names(samples, "agentd_run_duration_seconds_bucket")
        if labels["loop"] == "work"
    }
    assert buckets["0.5"] == 1  # the failed run, 0.25 s
    assert buckets["2.5"] == 1
    assert buckets["5.0"] == 2  # and the ok run, 3 s
    assert buckets["+Inf"] == 2
    assert list(buckets.values()) == sorted(buckets.values())  # cumulative
    assert val(samples, "agentd_run_duration_seconds_count", loop="work") == 2
    assert val(samples, "agentd_run_duration_seconds_sum", loop="work") == pytest.approx(3.25)
    # Skipped runs take no time and would drown the latency: `other` has no histogram.
    assert not [
        x for x in names(samples, "agentd_run_duration_seconds_count") if x["loop"] == "other"
    ]


def test_budget_gauges(populated: Ledger, config: Config) -> None:
    samples, _, helps = parse(render_metrics(populated, config, now=T0))
    limits = {
        (x["scope"], x["period"]): val(samples, "agentd_budget_limit_micro_usd", **x)
        for x in names(samples, "agentd_budget_limit_micro_usd")
    }
    assert limits == {
        ("global", "day"): 5_000_000,
        ("global", "month"): 60_000_000,
        ("work", "day"): 1_000_000,
    }
    spent_work = 1234 + 7 + 3000  # settled, aborted at its reservation
    assert val(samples, "agentd_budget_spent_micro_usd", scope="work", period="day") == spent_work
    assert val(samples, "agentd_budget_reserved_micro_usd", scope="work", period="day") == 0
    assert val(samples, "agentd_budget_remaining_micro_usd", scope="work", period="day") == (
        1_000_000 - spent_work
    )
    # Global windows also hold the other loop's call in flight.
    assert val(samples, "agentd_budget_reserved_micro_usd", scope="global", period="day") == 4000
    assert val(samples, "agentd_budget_remaining_micro_usd", scope="global", period="month") == (
        60_000_000 - spent_work - 4000
    )
    end_of_day = datetime(2026, 3, 11, tzinfo=UTC).timestamp()
    assert (
        val(samples, "agentd_budget_resets_timestamp_seconds", scope="global", period="day")
        == end_of_day
    )
    assert "agentd_budget_limit_micro_usd" in helps


def test_simulated_rows_are_excluded_by_default(populated: Ledger, config: Config) -> None:
    real, _, _ = parse(render_metrics(populated, config, now=T0))
    assert val(real, "agentd_simulated") == 0
    assert all(labels.get("model") != "x" for labels in names(real, "agentd_calls_total"))
    assert val(real, "agentd_calls_total", loop="work", model=HAIKU, status="ok") == 1

    sim, _, _ = parse(render_metrics(populated, config, now=T0, simulated=True))
    assert val(sim, "agentd_simulated") == 1
    assert names(sim, "agentd_calls_total") == [{"loop": "work", "model": HAIKU, "status": "ok"}]
    assert val(sim, "agentd_cost_micro_usd_total", loop="work", model=HAIKU, status="ok") == 999
    assert val(sim, "agentd_tokens_total", loop="work", model=HAIKU, status="ok", kind="input") == 1
    assert val(sim, "agentd_runs_total", loop="work", status="ok") == 1
    assert val(sim, "agentd_run_duration_seconds_sum", loop="work") == 1.0
    assert val(sim, "agentd_budget_spent_micro_usd", scope="work", period="day") == 999
    assert not names(sim, "agentd_calls_in_flight")


def test_help_and_type_lines_for_every_family(ledger: Ledger, config: Config) -> None:
    """An empty ledger still describes every family, so dashboards find them from the start."""
    text = render_metrics(ledger, config, now=T0)
    _, types, helps = parse(text)
    for family in (
        "agentd_calls_total",
        "agentd_tokens_total",
        "agentd_cost_micro_usd_total",
        "agentd_runs_total",
        "agentd_run_duration_seconds",
        "agentd_budget_remaining_micro_usd",
        "agentd_budget_limit_micro_usd",
        "agentd_loop_paused",
    ):
        assert family in types and helps[family]
    assert text.index("# HELP agentd_calls_total") < text.index("# TYPE agentd_calls_total")


def test_label_values_are_escaped(ledger: Ledger, config: Config) -> None:
    weird = 'we"ird\\mo\ndel'
    run = ledger.start_run(loop="work", trigger="manual", simulated=False)
    settle(ledger, call(ledger, config, run, model=weird), 5, Usage(1, 1))
    text = render_metrics(ledger, config, now=T0)
    assert 'agentd_calls_total{loop="work",model="we\\"ird\\\\mo\\ndel",status="ok"} 1\n' in text
    samples, _, _ = parse(text)
    assert val(samples, "agentd_calls_total", loop="work", model=weird, status="ok") == 1
    assert escape_label_value('a"b\\c\nd') == 'a\\"b\\\\c\\nd'


def test_value_formatting() -> None:
    assert format_value(3) == "3"
    assert format_value(3.0) == "3"
    assert format_value(0.25) == "0.25"
    assert format_value(float("inf")) == "+Inf"
    assert format_value(float("-inf")) == "-Inf"
    assert format_value(float("nan")) == "NaN"


def test_loop_state_gauges(ledger: Ledger, config: Config) -> None:
    loopstate.set_paused(ledger, "other", "paused by the operator", None)
    run = ledger.start_run(loop="work", trigger="schedule", simulated=False)
    ledger.finish_run(run, status="failed")
    loopstate.record_run(ledger, "work", run, "failed", None)
    samples, _, _ = parse(render_metrics(ledger, config, now=T0))
    assert val(samples, "agentd_loop_paused", loop="other") == 1
    assert val(samples, "agentd_loop_paused", loop="work") == 0
    assert val(samples, "agentd_loop_consecutive_failures", loop="work") == 1
    assert val(samples, "agentd_loop_consecutive_failures", loop="other") == 0


def test_extra_gauges(ledger: Ledger, config: Config) -> None:
    extra = {"agentd_up": 1, "agentd_running_runs": 2, "agentd_custom": 0.5}
    samples, types, helps = parse(render_metrics(ledger, config, now=T0, extra=extra))
    assert val(samples, "agentd_up") == 1
    assert val(samples, "agentd_running_runs") == 2
    assert val(samples, "agentd_custom") == 0.5
    assert types["agentd_up"] == "gauge"
    assert helps["agentd_up"].startswith("1 while")
    with pytest.raises(ValueError, match="metric name"):
        render_metrics(ledger, config, now=T0, extra={'agentd_up{x="1"}': 1})
    with pytest.raises(ValueError, match="shadow"):
        render_metrics(ledger, config, now=T0, extra={"agentd_simulated": 1})


def test_incremental_scrapes_match_a_full_recount(populated: Ledger, config: Config) -> None:
    """Rows settled or finished between scrapes are counted once, whatever order they settle in."""
    render_metrics(populated, config, now=T0)  # warm the cache
    with populated.read() as conn:
        pending = conn.execute("SELECT id FROM calls WHERE status = 'pending'").fetchone()[0]
        running = conn.execute("SELECT id FROM runs WHERE status = 'running'").fetchone()[0]
    later = populated.start_run(loop="work", trigger="manual", simulated=False)
    settle(populated, call(populated, config, later), 11, Usage(3, 2))
    settle(populated, pending, 40, Usage(8, 4))  # an older call settles after a newer one
    populated.finish_run(running, status="ok")
    populated.finish_run(later, status="ok")

    incremental = render_metrics(populated, config, now=T0)
    metrics._CACHES.clear()
    full = render_metrics(populated, config, now=T0)
    assert incremental == full
    samples, _, _ = parse(full)
    assert val(samples, "agentd_cost_micro_usd_total", loop="other", model=HAIKU, status="ok") == 40
    assert val(samples, "agentd_calls_total", loop="work", model=HAIKU, status="ok") == 2
    assert not names(samples, "agentd_calls_in_flight")
    assert val(samples, "agentd_runs_total", loop="other", status="ok") == 1


def test_a_warm_scrape_reads_only_new_rows(tmp_path: Path, config: Config) -> None:
    """On a big ledger the second scrape costs a small fraction of the first (SQLite VM steps)."""
    ledger = Ledger.open(tmp_path / "big")
    n = 30_000
    # Bulk rows (not through the API: that would take long) dated before every budget window
    # at T0, so what remains of a warm scrape is the incremental part alone.
    with ledger.write() as conn:
        conn.executemany(
            "INSERT INTO runs (id, loop, trigger, started_at, finished_at, status, simulated)"
            " VALUES (?, 'work', 'schedule', ?, ?, 'ok', 0)",
            [
                (i, "2026-01-01T00:00:00.000000Z", "2026-01-01T00:00:02.000000Z")
                for i in range(1, n + 1)
            ],
        )
        conn.executemany(
            "INSERT INTO calls (run_id, loop, purpose, provider, model, attempt, status,"
            " reserved_micro_usd, cost_micro_usd, input_tokens, output_tokens, simulated,"
            " started_at) VALUES (?, 'work', 'work', 'anthropic', ?, 1, 'ok', 9, 5, 10, 2, 0,"
            " '2026-01-01T00:00:00.000000Z')",
            [(i, HAIKU if i % 2 else MINI) for i in range(1, n + 1)],
        )
    steps = [0]

    def count() -> int:
        steps[0] += 1
        return 0

    def measured() -> int:
        steps[0] = 0
        ledger.conn.set_progress_handler(count, 100)
        try:
            render_metrics(ledger, config, now=T0)
        finally:
            ledger.conn.set_progress_handler(None, 0)
        return steps[0]

    cold = measured()
    warm = measured()
    assert warm * 50 < cold, (cold, warm)
    samples, _, _ = parse(render_metrics(ledger, config, now=T0))
    assert val(samples, "agentd_calls_total", loop="work", model=HAIKU, status="ok") == n // 2
    assert val(samples, "agentd_run_duration_seconds_sum", loop="work") == pytest.approx(2.0 * n)
    ledger.close()


def test_a_replaced_ledger_is_recounted(tmp_path: Path, config: Config) -> None:
    state = tmp_path / "state"
    with Ledger.open(state) as first:
        run = first.start_run(loop="work", trigger="manual", simulated=False)
        settle(first, call(first, config, run), 5, Usage(1, 1))
        samples, _, _ = parse(render_metrics(first, config, now=T0))
        assert val(samples, "agentd_calls_total", loop="work", model=HAIKU, status="ok") == 1
    for name in ("ledger.db", "ledger.db-wal", "ledger.db-shm"):
        (state / name).unlink(missing_ok=True)
    with Ledger.open(state) as second:
        # As many rows as before, or more: only the fingerprint tells the files apart.
        for _ in range(2):
            run = second.start_run(loop="work", trigger="manual", simulated=False)
            settle(second, call(second, config, run, model=MINI), 5, Usage(1, 1))
        samples, _, _ = parse(render_metrics(second, config, now=T0))
        assert names(samples, "agentd_calls_total") == [
            {"loop": "work", "model": MINI, "status": "ok"}
        ]
        assert val(samples, "agentd_calls_total", loop="work", model=MINI, status="ok") == 2


def test_rows_that_vanish_reset_the_totals(ledger: Ledger, config: Config) -> None:
    run = ledger.start_run(loop="work", trigger="manual", simulated=False)
    settle(ledger, call(ledger, config, run), 5, Usage(1, 1))
    render_metrics(ledger, config, now=T0)
    # Not something agentd does (the ledger is append-only): a restore from an older copy.
    raw = sqlite3.connect(ledger.path)
    raw.execute("DELETE FROM calls")
    raw.commit()
    raw.close()
    samples, _, _ = parse(render_metrics(ledger, config, now=T0))
    assert not names(samples, "agentd_calls_total")
