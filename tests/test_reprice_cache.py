"""`agentd reprice` from the report cache: the same figures as the raw rows, to the micro-dollar."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import pytest
from builders import merge
from spendledger import (
    GPT_MINI,
    HAIKU,
    SONNET,
    Call,
    at,
    build,
    config_data,
    load,
    write_run,
)

from agentd import budgets, spendcache
from agentd.config import Config
from agentd.ledger import Ledger
from agentd.pricing import cost_usd, to_micro_usd
from agentd.providers.base import Usage
from agentd.reprice import RepriceResult, Target, reprice, resolve_target
from agentd.retention import prune
from agentd.views import reprice_report

OPUS = ("deep", "opus", "anthropic", "claude-opus-4-1")
# Every real ok call of the ledger below: (usage, batch).
OK_USAGES: list[tuple[Usage, bool]] = []


def _ok(
    model: tuple[str, str, str, str], usage: Usage, *, purpose: str = "work", batch: bool = False
) -> Call:
    """A real ok call, recorded in `OK_USAGES`; its cost is anything (the actual side)."""
    OK_USAGES.append((usage, batch))
    cost = 1000 + usage.input_tokens // 7
    return Call(model, "ok", usage, cost, 50, purpose=purpose, batch=batch)


def write_ledger(ledger: Ledger) -> None:
    """Three days of calls: every kind `reprice` tells apart, in several hours and days."""
    OK_USAGES.clear()
    # 03-20: plain, cached and 1-hour-written calls, a failed attempt, a batch call.
    write_run(ledger, "alpha", at(20, 9, 5), [_ok(HAIKU, Usage(1000, 200, 300, 100))])
    write_run(
        ledger,
        "alpha",
        at(20, 10, 40),
        [
            Call(HAIKU, "error", None, 0, 50),
            _ok(GPT_MINI, Usage(5000, 100, 1000, 3000, 0, 2000)),
        ],
        fallback=True,
    )
    write_run(ledger, "alpha", at(20, 15), [_ok(GPT_MINI, Usage(4000, 900), batch=True)])
    # 03-21: tiered input sizes (the built-in sonnet price changes above 200k), a helper call
    # on another tier, an aborted call, a simulated call.
    write_run(
        ledger,
        "beta",
        at(21, 2),
        [
            _ok(HAIKU, Usage(2000, 50), purpose="draft"),
            _ok(SONNET, Usage(250_000, 800, 10_000, 40_000, 100, 30_000)),
        ],
    )
    write_run(ledger, "beta", at(21, 2, 30), [_ok(SONNET, Usage(150_000, 400, 0, 0))])
    write_run(ledger, "beta", at(21, 11), [_ok(OPUS, Usage(300_000, 10, 5, 7), purpose="review")])
    write_run(
        ledger,
        "beta",
        at(21, 12),
        [Call(SONNET, "aborted", None, 5000, 3000, reserved=5000)],
        status="failed",
    )
    write_run(
        ledger, "alpha", at(21, 13), [Call(HAIKU, "ok", Usage(100, 10), 7, 10)], simulated=True
    )
    write_run(
        ledger, "beta", at(21, 23, 59), [_ok(SONNET, Usage(200_001, 1, 0, 200_000), batch=True)]
    )
    # 03-22: an hour with a call still in flight (a hole until it settles), and a loop only
    # the current config knows.
    write_run(ledger, "alpha", at(22, 4), [_ok(HAIKU, Usage(800, 40))])
    write_run(
        ledger, "alpha", at(22, 4, 20), [Call(HAIKU, "pending", reserved=700)], status="running"
    )
    write_run(ledger, "gamma", at(22, 6), [_ok(OPUS, Usage(272_001, 1000, 272_000, 0))])


@pytest.fixture
def config(tmp_path: Path) -> Config:
    # sonnet at its built-in, tiered price; the others at the round overrides.
    return load(tmp_path / "conf", merge(config_data(), {"models": {"sonnet": {"price": None}}}))


@pytest.fixture
def targets(config: Config, tmp_path: Path) -> list[Target]:
    other = load(
        tmp_path / "other",
        merge(
            config_data(),
            {
                "models": {"sonnet": {"price": None}},
                "loops": {
                    "alpha": {"tier": "balanced", "budget": None, "batch": True},
                    "beta": {"tier": "fast"},
                    "gamma": None,
                },
            },
        ),
    )
    return [
        resolve_target(config, None, all_tier="deep"),
        resolve_target(config, None, all_tier="balanced"),
        resolve_target(config, None, all_model="gpt-mini"),
        resolve_target(config, other, other_label="other.yaml"),
    ]


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    with Ledger.open(tmp_path / "state") as opened:
        write_ledger(opened)
        yield opened


RANGES: list[tuple[datetime | None, datetime | None]] = [
    (None, None),
    (at(20, 10, 17), None),
    (at(20, 10, 17), at(22, 4, 41)),
    (at(21, 0), at(22, 0)),
    (at(21, 2, 10), at(21, 2, 50)),
]


def results(
    ledger: Ledger, config: Config, targets: list[Target], *, cache: bool, simulated: bool = False
) -> list[RepriceResult]:
    return [
        reprice(ledger, config, t, since=s, until=u, cache=cache, simulated=simulated)
        for t in targets
        for s, u in RANGES
    ]


def cached_hours(ledger: Ledger) -> int:
    return int(ledger.conn.execute("SELECT COUNT(*) FROM report_hours").fetchone()[0])


def test_cached_and_raw_reprice_are_identical(
    ledger: Ledger, config: Config, targets: list[Target]
) -> None:
    raw = results(ledger, config, targets, cache=False)
    assert cached_hours(ledger) == 0
    assert results(ledger, config, targets, cache=True) == raw  # the first fills the cache
    assert cached_hours(ledger) > 0
    assert ledger.conn.execute("SELECT COUNT(*) FROM report_days").fetchone()[0] > 0
    assert results(ledger, config, targets, cache=True) == raw
    simulated = results(ledger, config, targets, cache=False, simulated=True)
    assert results(ledger, config, targets, cache=True, simulated=True) == simulated
    # The hour with the call in flight is read raw.
    holes = {r[0] for r in ledger.conn.execute("SELECT hour FROM report_holes")}
    assert holes == {"2026-03-22T04"}
    # Independent of both: every ok call priced on its own on the all-balanced target.
    balanced = config.price("sonnet")
    assert balanced is not None and balanced.tiers
    exact = sum((cost_usd(balanced, u) for u, _ in OK_USAGES), Decimal(0))
    everything = raw[len(RANGES)]  # all-balanced over all time
    assert everything.total["other_micro_usd"] == to_micro_usd(exact)
    assert everything.total["calls"] == len(OK_USAGES)


def test_back_dated_and_settled_calls_keep_cached_figures_exact(
    ledger: Ledger, config: Config, targets: list[Target]
) -> None:
    results(ledger, config, targets, cache=True)  # fills the cache
    # A call written now into an hour cached long ago (clock skew, an import) ...
    write_run(ledger, "beta", at(21, 2, 45), [Call(SONNET, "ok", Usage(210_000, 5, 0, 9, 0, 9), 3)])
    raw = results(ledger, config, targets, cache=False)
    assert results(ledger, config, targets, cache=True) == raw
    # ... and the call in flight settles, with a 1-hour cache write.
    call_id = ledger.conn.execute("SELECT id FROM calls WHERE status = 'pending'").fetchone()[0]
    budgets.settle(
        ledger,
        int(call_id),
        status="ok",
        usage=Usage(120_000, 30, 0, 100_000, 0, 60_000),
        cost_micro_usd=640,
        priced=True,
        latency_ms=5,
    )
    raw_after = results(ledger, config, targets, cache=False)
    assert raw_after != raw
    assert results(ledger, config, targets, cache=True) == raw_after
    assert not {r[0] for r in ledger.conn.execute("SELECT hour FROM report_holes")}


def test_reprice_reads_the_cache(ledger: Ledger, config: Config, targets: list[Target]) -> None:
    # A settled row never changes, so the cache need not look at it again: changing one
    # behind its back shows which figures came from the cache (03-21, a whole cached day).
    def day_results(cache: bool) -> list[RepriceResult]:
        return [
            reprice(ledger, config, t, since=s, until=u, cache=cache)
            for t in targets
            for s, u in ((None, None), (at(21, 0), at(22, 0)))
        ]

    before = day_results(cache=True)
    with ledger.write() as conn:
        conn.execute(
            "UPDATE calls SET output_tokens = output_tokens + 1000000"
            " WHERE status = 'ok' AND started_at LIKE '2026-03-21%'"
        )
    assert day_results(cache=True) == before
    assert all(a != b for a, b in zip(day_results(cache=False), before, strict=True))


def read_only(ledger: Ledger) -> Ledger:
    conn = sqlite3.connect(f"file:{ledger.path}?mode=ro", uri=True, isolation_level=None)
    return Ledger(conn, ledger.path, read_only=True)


def test_a_read_only_ledger_reprices_exactly(
    ledger: Ledger, config: Config, targets: list[Target]
) -> None:
    raw = results(ledger, config, targets, cache=False)
    reader = read_only(ledger)
    try:
        assert results(reader, config, targets, cache=True) == raw  # nothing cached: all raw
        # The owner caches 03-21 12:00 on only: the hours before it become holes, and a call
        # back-dated into a cached hour is one the reader cannot cache.
        reprice(ledger, config, targets[0], since=at(21, 12))
        assert cached_hours(ledger) > 0
        write_run(ledger, "alpha", at(22, 6, 5), [Call(HAIKU, "ok", Usage(70, 7, 0, 7, 0, 7), 1)])
        raw = results(ledger, config, targets, cache=False)
        assert results(reader, config, targets, cache=True) == raw
    finally:
        reader.close()


def test_a_cache_with_other_bands_is_not_used_and_is_rebuilt(
    ledger: Ledger, config: Config, targets: list[Target]
) -> None:
    raw = results(ledger, config, targets, cache=False)
    results(ledger, config, targets, cache=True)
    # As if an older agentd had filled the cache with bands that miss sonnet's 200k.
    with ledger.write() as conn:
        conn.execute("UPDATE report_cache SET bands = '[272000]'")
    reader = read_only(ledger)
    try:
        assert results(reader, config, targets, cache=True) == raw  # read raw, not misbanded
    finally:
        reader.close()
    assert results(ledger, config, targets, cache=True) == raw  # refilled with `BANDS`
    assert spendcache.bands(ledger.conn) == spendcache.BANDS
    assert cached_hours(ledger) > 0


def test_band_thresholds_cover_the_built_in_prices() -> None:
    # Every input size where a built-in Anthropic or OpenAI price changes is a cached band
    # boundary; a genai-prices update that adds one must add it to `BANDS` (reprice would
    # read raw rows meanwhile: right, but slow).
    from genai_prices.data_snapshot import get_snapshot

    found = set()
    for provider in get_snapshot().providers:
        if provider.id not in ("anthropic", "openai"):
            continue
        for model in provider.models:
            prices = model.prices if isinstance(model.prices, list) else [model.prices]
            every = [getattr(p, "prices", p) for p in prices]
            every += [v.prices for v in model.price_variants or ()]
            for price in every:
                for name in ("input_mtok", "output_mtok", "cache_read_mtok", "cache_write_mtok"):
                    for tier in getattr(getattr(price, name, None), "tiers", ()):
                        found.add(int(tier.start))
    assert found and found <= set(spendcache.BANDS)


def test_pruned_days_are_counted_not_repriced(tmp_path: Path) -> None:
    config = load(tmp_path / "conf", config_data())
    state = tmp_path / "state"
    with build(state) as ledger:
        target = resolve_target(config, None, all_tier="deep")
        whole = reprice(ledger, config, target)
        assert whole.total["pruned_days"] is None and whole.total["pruned_calls"] is None
        pruned = prune(ledger, at(11, 0), now=at(11, 0).replace(month=9), tz=None)
        assert pruned.days == 1  # 03-09; 03-10's runs are kept (`kept_protected`)
        result = reprice(ledger, config, target)
        # Rolled up: A1 and A2's gpt-mini call (its haiku error is no ok call).
        assert result.total["pruned_days"] == 1 and result.total["pruned_calls"] == 2
        # Left: alpha's A3 on opus 800 × 15 + 40 × 75 = 15 000 µ$, beta's 125 250 as before.
        rows = {r["loop"]: r for r in result.rows}
        assert rows["alpha"]["calls"] == 1 and rows["alpha"]["other_micro_usd"] == 15_000
        assert rows["beta"]["other_micro_usd"] == 125_250
        assert result.total["other_micro_usd"] == 140_250
        assert result.total["note"] == "1 pruned day (2 ok calls) not re-priced"
        assert result.headline.endswith(
            "; 1 pruned day (2 ok calls) not re-priced: prune kept only day totals"
        )
        assert reprice(ledger, config, target, cache=False) == result
        # A pruned day counts when the range overlaps it.
        late = reprice(ledger, config, target, since=at(9, 23))
        assert late.total["pruned_days"] == 1 and late.total["pruned_calls"] == 2
        after = reprice(ledger, config, target, since=at(10, 0))
        assert after.total["pruned_days"] is None and after.total["note"] is None
        before = reprice(ledger, config, target, until=at(9, 0, 1))
        assert before.total["pruned_days"] == 1 and before.rows == []
        assert reprice(ledger, config, target, until=at(9, 0)).total["pruned_days"] is None
        simulated = reprice(ledger, config, target, simulated=True)
        assert simulated.total["pruned_days"] is None
    data = json.loads(reprice_report(state, config, all_tier="deep", fmt="json"))
    assert data[-1]["pruned_days"] == 1 and data[-1]["pruned_calls"] == 2
    assert data[0]["pruned_days"] is None


def test_upgrading_a_ledger_rebuilds_the_cache_for_reprice(
    tmp_path: Path, config: Config, targets: list[Target]
) -> None:
    from agentd import migrations

    # A ledger as m012 left it, with a cache filled by that version's rows (no alias, batch,
    # band nor ok sums): the upgrade empties the cache, the next reprice refills it.
    old = tmp_path / "old"
    old.mkdir()
    conn = sqlite3.connect(old / "ledger.db", isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    migrations.migrate(conn, [s for s in migrations.MIGRATIONS if s[0] <= "m012_list_cost"])
    conn.execute("COMMIT")
    conn.execute(
        "INSERT INTO report_hours (hour, loop, tier, model, provider, purpose, simulated, calls,"
        " failed, runs, input_tokens, cost_micro_usd, "
        + ", ".join(spendcache.HIST_COLUMNS)
        + ") VALUES ('2026-03-20T09', 'alpha', 'fast', 'claude-haiku-4-5', 'anthropic', 'work',"
        " 0, 1, 0, 1, 1000, 1500, " + ", ".join("0" for _ in spendcache.HIST_COLUMNS) + ")"
    )
    conn.execute("INSERT INTO report_cache (id, through, last_id) VALUES (1, '2026-03-23T00', 0)")
    conn.close()
    with Ledger.open(old) as upgraded:
        for table in ("report_hours", "report_days", "report_cache", "report_holes"):
            assert upgraded.conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] == 0
        write_ledger(upgraded)
        raw = results(upgraded, config, targets, cache=False)
        assert results(upgraded, config, targets, cache=True) == raw
        assert cached_hours(upgraded) > 0
