"""`agentd reprice`: the ledger's real ok calls priced on another config, by hand arithmetic."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest
from builders import merge
from click.testing import CliRunner
from spendledger import GPT_MINI, HAIKU, SONNET, Call, at, build, config_data, load, write_run

from agentd.cli import main
from agentd.config import Config
from agentd.ledger import Ledger
from agentd.pricing import Price, cost_usd, to_micro_usd, usd_label
from agentd.providers.base import Usage
from agentd.reprice import (
    NOT_IN_OTHER,
    Target,
    config_label,
    format_percent,
    percent_change,
    reprice,
    resolve_target,
    usd_places,
)
from agentd.views import reprice_report

# Every amount of a headline at the same places: here six, as 0.181575 needs them.
ALL_DEEP_HEADLINE = (
    "actual $0.024050 vs all-deep $0.181575 (−86.8 %); saved against list price by caching"
    " $0.002945"
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
    assert rows["alpha"]["cache_saving_micro_usd"] == 245
    assert rows["beta"]["cache_saving_micro_usd"] == 2700
    assert result.total["cache_saving_micro_usd"] == 2945
    assert result.total["note"] is None and result.total["not_compared_micro_usd"] is None


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
    # The total compares like with like, the loops both sides have: alpha and beta's 5 calls,
    # 24 050 vs 19 615. omega's call and 600 µ$ are counted apart, and said so.
    assert result.total["calls"] == 5
    assert result.total["actual_micro_usd"] == 24_050
    assert result.total["other_micro_usd"] == 19_615
    assert result.total["actual_vs_other_pct"] == "22.6"  # 4435 / 19 615 = 22.61 %
    assert result.total["not_compared_calls"] == 1
    assert result.total["not_compared_micro_usd"] == 600
    assert result.total["note"] == "compared loops only; not compared: omega"
    assert result.headline == (
        "actual $0.024050 vs cheap.yaml $0.019615 (+22.6 %); saved against list price by caching"
        " $0.002945; not compared: omega (actual $0.000600)"
    )


def test_target_loops_batch_setting_prices_at_batch_rates(
    config: Config, state: Path, tmp_path: Path
) -> None:
    # OTHER runs alpha on balanced through the batch API: half of sonnet's rates, as
    # `plan --against` projects it. beta has no `batch:` there and keeps its standard rates.
    other = load(
        tmp_path / "other",
        merge(
            config_data(),
            {
                "loops": {
                    "alpha": {"tier": "balanced", "budget": None, "batch": True},
                    "beta": {"tier": "fast"},
                }
            },
        ),
    )
    with Ledger.open(state, create=False) as ledger:
        result = reprice(ledger, config, resolve_target(config, other, other_label="b.yaml"))
    rows = {r["loop"]: r for r in result.rows}
    # 11 265 µ$ at standard rates (test_against_another_config) / 2 = 5632.5, rounded up;
    # (2800 - 5632.5) / 5632.5 = -50.29 %.
    assert rows["alpha"]["other_micro_usd"] == 5633 and rows["alpha"]["change"] == "−50.3 %"
    assert rows["beta"]["other_micro_usd"] == 8350
    assert rows["alpha"]["actual_micro_usd"] == 2800  # the actual side is what was paid
    # --all-tier on a config whose alpha is a batch loop: alpha's 56 325 on opus / 2 = 28 162.5.
    batched = load(
        tmp_path / "batched", merge(config_data(), {"loops": {"alpha": {"batch": True}}})
    )
    with Ledger.open(state, create=False) as ledger:
        result = reprice(ledger, batched, resolve_target(batched, None, all_tier="deep"))
    rows = {r["loop"]: r for r in result.rows}
    assert rows["alpha"]["other_micro_usd"] == 28_163
    assert rows["beta"]["other_micro_usd"] == 125_250


def test_savings_are_micro_usd_and_signed(config: Config, tmp_path: Path) -> None:
    # Loop delta (in no config, so no batch on the target side), re-priced on opus:
    #   D1 haiku, in 11 (cache read 1): caching saved 1 × (1 − 0.1) = 0.9 µ$;
    #      on opus 10 × 15 + 1 × 1.5 = 151.5
    #   D2 haiku, in 2000 (cache write 1000, never read), out 100: caching saved
    #      −1000 × (1.25 − 1) = −250 µ$; on opus 1000 × 15 + 1000 × 18.75 + 100 × 75 = 41 250
    #   D3 gpt-mini batch, in 3, out 1: batching saved (3 × 0.15 + 0.6) / 2 = 0.525 µ$;
    #      on opus 3 × 15 + 75 = 120
    # caching −249.1 -> −249 µ$, batching 0.525 -> 1 µ$ (half up), other 41 521.5 -> 41 522
    # (up), actual 10 + 2750 + 1 = 2761: (2761 − 41521.5) / 41521.5 = −93.35 %.
    with Ledger.open(tmp_path / "s") as ledger:
        write_run(ledger, "delta", at(20, 9), [Call(HAIKU, "ok", Usage(11, 0, 1), 10, 1)])
        write_run(
            ledger, "delta", at(20, 10), [Call(HAIKU, "ok", Usage(2000, 100, 0, 1000), 2750, 1)]
        )
        write_run(
            ledger, "delta", at(20, 11), [Call(GPT_MINI, "ok", Usage(3, 1), 1, 1, batch=True)]
        )
        result = reprice(ledger, config, resolve_target(config, None, all_tier="deep"))
    (row,) = result.rows
    assert row["cache_saving_micro_usd"] == -249 and row["batch_saving_micro_usd"] == 1
    assert row["other_micro_usd"] == 41_522 and row["change"] == "−93.4 %"
    assert result.headline == (
        "actual $0.002761 vs all-deep $0.041522 (−93.4 %); saved against list price by caching"
        " -$0.000249, batching $0.000001"
    )
    data = json.loads(reprice_report(tmp_path / "s", config, all_tier="deep", fmt="json"))
    assert data[0]["cache_saving_usd"] == "-0.000249" and data[0]["batch_saving_usd"] == "0.000001"
    assert data[-1]["cache_saving_usd"] == "-0.000249"


def test_headline_amounts_share_their_places() -> None:
    # The example has whole cents: two places. Any amount with more decides for all.
    assert usd_places([18_400_000, 341_200_000]) == 2
    assert usd_label(18_400_000, 2) == "$18.40" and usd_label(341_200_000, 2) == "$341.20"
    assert usd_places([82_950, 932_325]) == 6 and usd_label(82_950, 6) == "$0.082950"
    assert usd_places([1_234_500, 0]) == 4 and usd_label(-250, 6) == "-$0.000250"


def test_config_labels_tell_same_named_files_apart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    this = load(tmp_path / "a", config_data())
    other = load(tmp_path / "b", config_data())
    assert this.path.name == other.path.name == "agent-model-config.yaml"
    monkeypatch.chdir(tmp_path)
    assert config_label(this) == str(Path("a", "agent-model-config.yaml"))
    assert resolve_target(this, other).label == str(Path("b", "agent-model-config.yaml"))
    monkeypatch.chdir(tmp_path / "a")  # b is not below the current directory: absolute
    assert config_label(other) == str(other.path)


def test_cli_names_the_other_config_by_its_path(
    config: Config, state: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    load(tmp_path / "other", config_data())  # the same file name as the config's own
    monkeypatch.chdir(tmp_path)
    other = str(Path("other", "agent-model-config.yaml"))
    result = CliRunner().invoke(
        main,
        ["--config", str(config.path), "--state-dir", str(state), "reprice", "--against", other,
         "--since", "2026-03-01"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0].endswith(f"re-priced on {other}")
    assert result.stdout.splitlines()[-1].startswith(f"actual $0.024050 vs {other} $")


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
    # Savings are money like the rest: six places, never "0.0027".
    assert data[1]["cache_saving_usd"] == "0.002700" and data[1]["batch_saving_usd"] == "0.000000"
    assert data[-1]["cache_saving_usd"] == "0.002945"
    assert data[-1]["not_compared_calls"] is None and data[-1]["not_compared_usd"] is None
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
