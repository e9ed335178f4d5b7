"""`agentd reprice`: the ledger's real ok calls priced on another config, by hand arithmetic."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest
from builders import merge
from spendledger import HAIKU, SONNET, Call, at, build, config_data, load, write_run

from agentd.config import Config
from agentd.ledger import Ledger
from agentd.pricing import Price, cost_usd, to_micro_usd
from agentd.providers.base import Usage
from agentd.reprice import (
    NOT_IN_OTHER,
    Target,
    format_percent,
    percent_change,
    reprice,
    resolve_target,
)
from agentd.views import reprice_report

ALL_DEEP_HEADLINE = (
    "actual $0.02405 vs all-deep $0.181575 (−86.8 %); saved against list price by caching $0.002945"
)


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return load(tmp_path / "conf", config_data())


@pytest.fixture
def state(tmp_path: Path) -> Path:
    build(tmp_path / "state").close()
    return tmp_path / "state"


def test_percentages() -> None:
    # The example: actual 18.40 vs 341.20 -> (18.40 - 341.20) / 341.20 = -94.6 %.
    pct = percent_change(Decimal("18.40"), Decimal("341.20"))
    assert pct == Decimal("-94.6") and format_percent(pct) == "−94.6 %"
    assert format_percent(percent_change(Decimal(3), Decimal(2))) == "+50.0 %"
    assert percent_change(Decimal(1), Decimal(0)) is None


def test_all_deep(config: Config, state: Path) -> None:
    target = resolve_target(config, None, all_tier="deep")
    with Ledger.open(state, create=False) as ledger:
        result = reprice(ledger, config, target)
    rows = {r["loop"]: r for r in result.rows}
    # alpha's ok calls on opus (15 / 75, cache read 1.5, write 18.75), in µ$:
    #   A1 600 × 15 + 300 × 1.5 + 100 × 18.75 + 200 × 75 = 9000 + 450 + 1875 + 15000 = 26325
    #   A2 (gpt-mini call) 500 × 15 + 100 × 75 = 15000;  A3 800 × 15 + 40 × 75 = 15000
    # = 56 325 against the actual 1500 + 300 + 1000 = 2800: (2800 - 56325) / 56325 = -95.03 %.
    assert rows["alpha"]["calls"] == 3
    assert rows["alpha"]["actual_micro_usd"] == 2800
    assert rows["alpha"]["other_micro_usd"] == 56_325
    assert rows["alpha"]["actual_vs_other_pct"] == "-95.0"
    assert rows["alpha"]["target"] == "opus"
    # beta: B1's draft 2000 × 15 + 50 × 75 = 33 750; its work call 2000 × 15 + 1000 × 1.5 +
    # 800 × 75 = 91 500; = 125 250 against 2250 + 19000 = 21 250: -83.03 %. (B2 was aborted.)
    assert rows["beta"]["other_micro_usd"] == 125_250 and rows["beta"]["actual_micro_usd"] == 21_250
    assert rows["beta"]["change"] == "−83.0 %"
    # Total: 24 050 vs 181 575: -157 525 / 181 575 = -86.75 %.
    assert result.total["actual_micro_usd"] == 24_050
    assert result.total["other_micro_usd"] == 181_575
    assert result.total["actual_vs_other_pct"] == "-86.8"
    assert result.headline == ALL_DEEP_HEADLINE
    # What caching saved at the actual models' list prices, 1h writes apart (none here):
    # alpha A1 on haiku: 300 reads × (1 − 0.1) − 100 writes × (1.25 − 1) = 245 per MTok;
    # beta's sonnet call: 1000 reads × (3 − 0.3) = 2700 per MTok.
    assert rows["alpha"]["cache_saving_usd"] == "0.000245"
    assert rows["beta"]["cache_saving_usd"] == "0.0027"
    assert result.total["cache_saving_usd"] == "0.002945"


def test_all_model(config: Config, state: Path) -> None:
    target = resolve_target(config, None, all_model="gpt-mini")
    with Ledger.open(state, create=False) as ledger:
        result = reprice(ledger, config, target)
    # gpt-mini 0.15 / 0.6, cache rates default to the input rate: alpha
    # A1 1000 × 0.15 + 200 × 0.6 = 270, A2 75 + 60 = 135, A3 120 + 24 = 144 -> 549.
    assert {r["loop"]: r["other_micro_usd"] for r in result.rows}["alpha"] == 549
    assert result.label == "all-gpt-mini"


def test_against_another_config(config: Config, state: Path, tmp_path: Path) -> None:
    with Ledger.open(state, create=False) as ledger:
        # A loop neither config has any more.
        write_run(ledger, "omega", at(11, 9), [Call(HAIKU, "ok", Usage(100, 100), 600, 5)])
    other = load(
        tmp_path / "other",
        merge(
            config_data(),
            {"loops": {"alpha": {"tier": "balanced", "budget": None}, "beta": {"tier": "fast"}}},
        ),
    )
    target = resolve_target(config, other, other_label="cheap.yaml")
    with Ledger.open(state, create=False) as ledger:
        result = reprice(ledger, config, target)
    rows = {r["loop"]: r for r in result.rows}
    # alpha moves to balanced (sonnet 3 / 15, cache 0.3 / 3.75): 5265 + 3000 + 3000 = 11 265;
    # (2800 - 11265) / 11265 = -75.14 %.
    assert rows["alpha"]["other_micro_usd"] == 11_265 and rows["alpha"]["change"] == "−75.1 %"
    # beta moves to fast: the work call on haiku 2000 + 1000 × 0.1 + 800 × 5 = 6100; the draft
    # was on fast on purpose, so it stays on fast's haiku: 2250. 8350 vs 21 250: +154.5 %.
    assert rows["beta"]["other_micro_usd"] == 8350 and rows["beta"]["change"] == "+154.5 %"
    assert rows["beta"]["target"] == "haiku"
    assert rows["omega"]["note"] == NOT_IN_OTHER and rows["omega"]["other_micro_usd"] is None
    # Totals compare the loops both sides have: 24 050 vs 19 615; omega's 600 is left out.
    assert result.total["actual_micro_usd"] == 24_650
    assert result.total["other_micro_usd"] == 19_615
    assert result.total["actual_vs_other_pct"] == "22.6"  # 4435 / 19 615 = 22.61 %
    assert result.headline == (
        "actual $0.02405 vs cheap.yaml $0.019615 (+22.6 %); saved against list price by caching"
        " $0.002945; not compared: omega (actual $0.0006)"
    )


def test_price_bands_match_per_call_costs(tmp_path: Path) -> None:
    # claude-sonnet-4-5's built-in price changes above 200k input tokens: calls on both sides
    # of the threshold must be priced at their own rates, as `cost_usd` prices one call.
    data = merge(config_data(), {"models": {"sonnet": {"price": None}}})
    config = load(tmp_path / "conf", data)
    price = config.price("sonnet")
    assert price is not None and price.tiers, "the built-in sonnet price has a >200k band"
    usages = [Usage(250_000, 1000, 10_000), Usage(1000, 100), Usage(200_000, 10)]
    with Ledger.open(tmp_path / "s") as ledger:
        for i, usage in enumerate(usages):
            write_run(ledger, "beta", at(10, i), [Call(SONNET, "ok", usage, 1, 1)])
        result = reprice(ledger, config, Target(config, "all-balanced", tier="balanced"))
    exact = sum((cost_usd(price, u) for u in usages), Decimal(0))
    assert result.rows[0]["other_micro_usd"] == to_micro_usd(exact)
    flat = Price(base=price.base)  # the same model without its >200k band
    assert to_micro_usd(sum((cost_usd(flat, u) for u in usages), Decimal(0))) != to_micro_usd(exact)


def test_report_forms(config: Config, state: Path) -> None:
    table = reprice_report(state, config, all_tier="deep")
    lines = table.splitlines()
    assert lines[0].startswith("real ok calls, the beginning to now (UTC), re-priced on all-deep")
    assert lines[-1] == ALL_DEEP_HEADLINE
    assert any(line.startswith("total") and "−86.8 %" in line for line in lines)
    data = json.loads(reprice_report(state, config, all_tier="deep", fmt="json"))
    assert [d["loop"] for d in data] == ["alpha", "beta", "total"]
    assert data[-1]["other_usd"] == "0.181575" and data[-1]["actual_vs_other_pct"] == "-86.8"
    assert reprice_report(state.parent / "none", config, all_tier="deep") == (
        "(no ok calls in this period)"
    )


def test_target_errors(config: Config) -> None:
    with pytest.raises(ValueError, match="no tier 'huge'"):
        resolve_target(config, None, all_tier="huge")
    with pytest.raises(ValueError, match="no model"):
        resolve_target(config, None, all_model="nope")
    with pytest.raises(ValueError, match="not both"):
        resolve_target(config, None, all_tier="deep", all_model="opus")
    with pytest.raises(ValueError, match="--against"):
        resolve_target(config, None)
    with pytest.raises(ValueError, match="need a config"):
        resolve_target(None, None, all_tier="deep")
