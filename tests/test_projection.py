"""`agentd plan`: runs from schedules, cost per run from history or the simulator, budgets."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import ROUND_FLOOR, Decimal
from pathlib import Path
from typing import Any

import pytest
from builders import merge
from spendledger import HAIKU, Call, build, config_data, load, write_run

from agentd.config import Config
from agentd.ledger import Ledger
from agentd.projection import count_runs, plan, scaled_cap
from agentd.providers.base import Usage
from agentd.reprice import config_label
from agentd.views import plan_report

# Noon, so the schedules' first fires are easy to list.
NOW = datetime(2026, 3, 12, 12, 0, tzinfo=UTC)


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return load(tmp_path / "conf", config_data())


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    return build(tmp_path / "state")


def rows(p: Any) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in p.rows}


def test_runs_from_schedules(config: Config) -> None:
    end = NOW + timedelta(days=30)
    loops = config.loops
    # every 6h: first fire one interval from now (18:00), then every 6 h while < now + 30 d:
    # 720 h / 6 h = 120 slots, minus the one at exactly now + 30 d -> 119.
    assert count_runs(loops["alpha"], config, NOW, end) == 119
    # 07:00 daily from 03-13 to 04-11: 30.
    assert count_runs(loops["beta"], config, NOW, end) == 30
    # every 1h inside 09:00-17:00: today 13-16 (4), 29 whole days × 8, 04-11 9-11 (3) = 239.
    assert count_runs(loops["gamma"], config, NOW, end) == 239
    disabled = loops["alpha"].model_copy(update={"enabled": False})
    assert count_runs(disabled, config, NOW, end) == 0
    assert count_runs(loops["alpha"], config, NOW, NOW + timedelta(hours=6)) == 0


def test_budget_windows_scaled_to_the_period(config: Config) -> None:
    # per_day 0.001 USD = 1000 µ$ × 30 days.
    assert scaled_cap(config.loops["alpha"].budget, 30) == (30_000, "per_day_usd 0.001 × 30")
    # per_month 1 USD: 30 days of a mean month (730.485 h), rounded down to micro-USD.
    month = int((Decimal(1_000_000) * 720 / Decimal("730.485")).to_integral_value(ROUND_FLOOR))
    assert month == 985_646
    assert scaled_cap(config.budgets, 30) == (month, "per_month_usd 1 × 0.9856")
    assert scaled_cap(None, 30) is None


def test_plan_from_history_and_simulator(config: Config, ledger: Ledger) -> None:
    with ledger:
        p = plan(config, ledger, days=30, now=NOW)
    r = rows(p)
    # alpha: its ok runs A1, A2, A3, each ok call priced on haiku (1 / 5, cache 0.1 / 1.25):
    #   A1 600 uncached × 1 + 300 × 0.1 + 100 × 1.25 + 200 × 5 = 1755 µ$
    #   A2 (the gpt-mini call: same tier, so the loop's primary) 500 + 100 × 5 = 1000 µ$
    #   A3 800 + 40 × 5 = 1000 µ$
    # per run 3755 / 3 = 1251.67 (shown rounded up: 1252); 119 runs -> ⌈148 948.33⌉ = 148 949.
    alpha = r["alpha"]
    assert alpha["source"] == "history: 3 run(s)"
    assert alpha["per_run_micro_usd"] == 1252 and alpha["projected_micro_usd"] == 148_949
    assert alpha["input_tokens"] == 767  # (1000 + 500 + 800) / 3
    assert alpha["cap_micro_usd"] == 30_000 and alpha["over_cap"] and alpha["status"] == "OVER CAP"
    # beta: B1 (B2 failed). The draft ran on fast, not beta's own tier, so it stays on fast's
    # primary haiku: 2000 + 50 × 5 = 2250; the work call on sonnet: 2000 uncached × 3 +
    # 1000 × 0.3 + 800 × 15 = 18 300. Per run 20 550, × 30 runs = 616 500.
    beta = r["beta"]
    assert beta["per_run_micro_usd"] == 20_550 and beta["projected_micro_usd"] == 616_500
    assert beta["status"] == "no cap" and beta["cap_micro_usd"] is None
    # gamma: no history, the simulator for "Say hello." (10 bytes): 10 // 4 + 4 + 3 = 9 input
    # tokens, min(max_tokens 20, ≥ 50) = 20 output; on opus 9 × 15 + 20 × 75 = 1635 µ$ × 239.
    gamma = r["gamma"]
    assert gamma["source"] == "simulator"
    assert (gamma["input_tokens"], gamma["output_tokens"]) == (9, 20)
    assert gamma["per_run_micro_usd"] == 1635 and gamma["projected_micro_usd"] == 390_765
    total = p.total
    assert total["name"] == "total" and total["runs"] == 119 + 30 + 239
    assert total["projected_micro_usd"] == 148_949 + 616_500 + 390_765 == 1_156_214
    assert total["cap_micro_usd"] == 985_646 and total["over_cap"]
    assert p.warnings == [
        "warning: loop alpha would spend $0.148949 in 30 days, over its cap $0.030000"
        " (per_day_usd 0.001 × 30); when_over_budget: skip, so runs would be skipped once it"
        " is reached",
        "warning: global budget would spend $1.156214 in 30 days, over its cap $0.985646"
        " (per_month_usd 1 × 0.9856); calls would be refused once it is reached",
    ]


def test_plan_report_table_and_json_share_rows(config: Config, ledger: Ledger) -> None:
    ledger.close()
    state = ledger.path.parent
    table = plan_report(config, state, days=30, now=NOW)
    lines = table.splitlines()
    assert lines[0] == "projected spend of agent-model-config.yaml over 30 days from 2026-03-12"
    assert any(line.startswith("alpha") and "OVER CAP" in line for line in lines)
    total_line = next(line for line in lines if line.startswith("total"))
    assert "1.156214" in total_line and "OVER CAP" in total_line
    assert lines[-2].startswith("warning: loop alpha") and lines[-1].startswith("warning: global")
    data = json.loads(plan_report(config, state, days=30, now=NOW, fmt="json"))
    assert [d["name"] for d in data] == ["alpha", "beta", "gamma", "total"]
    assert data[-1]["scope"] == "global" and data[-1]["projected_usd"] == "1.156214"
    assert data[0]["over_cap"] is True and data[0]["cap_usd"] == "0.030000"


def test_plan_against_another_config(config: Config, ledger: Ledger, tmp_path: Path) -> None:
    other_data = merge(
        config_data(),
        {
            "loops": {
                "alpha": {"tier": "balanced", "budget": None},
                "beta": {"cron": "0 7,19 * * *", "tier": "fast"},
                "gamma": None,
                "delta": {"every": "12h", "tier": "fast", "max_tokens": 20, "prompt": "d.md"},
            }
        },
    )
    other = load(tmp_path / "other", other_data)
    ledger.close()
    text = plan_report(config, ledger.path.parent, days=30, now=NOW, against=other)
    data = json.loads(
        plan_report(config, ledger.path.parent, days=30, now=NOW, against=other, fmt="json")
    )
    by = {d["name"]: d for d in data}
    # alpha on sonnet (3 / 15, cache 0.3 / 3.75): A1 1800 + 90 + 375 + 3000 = 5265,
    # A2 1500 + 1500 = 3000, A3 2400 + 600 = 3000: 11 265 / 3 = 3755 per run × 119 = 446 845.
    assert by["alpha"]["other_projected_usd"] == "0.446845"
    assert by["alpha"]["this_projected_usd"] == "0.148949"
    assert by["alpha"]["difference_usd"] == "0.297896"
    # +200.0 %: 297 896 / 148 949 = 1.99999.
    assert by["alpha"]["other_vs_this_pct"] == "200.0"
    # beta twice a day on fast: the draft stays on fast (haiku 2250), the work call moves to
    # haiku: 2000 + 1000 × 0.1 + 800 × 5 = 6100; 8350 per run × 60 runs = 501 000.
    assert by["beta"]["other_runs"] == 60 and by["beta"]["other_projected_usd"] == "0.501000"
    assert by["gamma"]["other_status"] == "not in other config"
    assert by["gamma"]["other_projected_usd"] is None and by["gamma"]["difference_usd"] is None
    # delta: simulator, haiku 9 + 20 × 5 = 109 per run; every 12 h -> 59 runs = 6431.
    assert by["delta"]["this_status"] == "not in this config"
    assert by["delta"]["other_projected_usd"] == "0.006431"
    assert by["total"]["other_projected_usd"] == "0.954276"  # 446 845 + 501 000 + 6431
    # Both files are named agent-model-config.yaml: the header tells them apart by path.
    mine, theirs = config_label(config), config_label(other)
    assert mine != theirs
    assert text.splitlines()[0].endswith(f"this = {mine}, other = {theirs}")
    assert any("warning" in line for line in text.splitlines())


def test_plan_prices_one_hour_cache_writes_at_their_rate(tmp_path: Path) -> None:
    # haiku with a 1-hour write rate of 2 µ$/token: a run that wrote 1000 tokens for an hour
    # and answered 10 costs 1000 × 2 + 10 × 5 = 2050 µ$ (at the 5-minute rate, 1300).
    data = merge(config_data(), {"models": {"haiku": {"price": {"cache_write_1h": 2}}}})
    config = load(tmp_path / "conf", data)
    usage = Usage(input_tokens=1000, output_tokens=10, cache_write_tokens=1000,
                  cache_write_1h_tokens=1000)  # fmt: skip
    with Ledger.open(tmp_path / "state") as ledger:
        write_run(ledger, "alpha", NOW - timedelta(days=1), [Call(HAIKU, "ok", usage, 2050, 1)])
        p = plan(config, ledger, days=1, now=NOW)
    assert rows(p)["alpha"]["per_run_micro_usd"] == 2050


def test_plan_without_a_ledger(config: Config, tmp_path: Path) -> None:
    p = plan(config, None, days=7, now=NOW)
    assert {r["source"] for r in p.rows[:-1]} == {"simulator"}
    text = plan_report(config, tmp_path / "nowhere", days=7, now=NOW)
    assert "simulator" in text and not (tmp_path / "nowhere").exists()
    with pytest.raises(ValueError):
        plan(config, None, days=0, now=NOW)
