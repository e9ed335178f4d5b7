"""A simulated week of the shipped config: batches, prompt-cache reads, and the saving shown.

Every scheduled slot of the shipped loops over seven days runs in order through the real
runner, executor and ledger on the built-in simulator, with the simulator's prompt-cache clock
set to the slot's time. Budgets are left out of the copy: the week's rows all carry today's
timestamps, so its seven days of spend would land in one real day's windows.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from datetime import UTC, datetime, timedelta
from decimal import ROUND_CEILING, ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import yaml
from click.testing import CliRunner

from agentd.cli import main
from agentd.config import load_config
from agentd.executor import Executor
from agentd.ledger import Ledger, utc_iso
from agentd.runner import run_loop
from agentd.scheduling import next_fire_times

REPO = Path(__file__).resolve().parents[1]
START = datetime(2026, 11, 2, 0, 0, tzinfo=UTC)  # a Monday
DAYS = 7


def _shipped_copy(tmp_path: Path) -> Path:
    """The shipped config and loops under tmp_path, without budgets."""
    shutil.copytree(REPO / "loops", tmp_path / "loops")
    (tmp_path / "config").mkdir()
    data = yaml.safe_load((REPO / "config/agent-model-config.yaml").read_text())
    data.pop("budgets", None)
    for loop in data["loops"].values():
        loop.pop("budget", None)
    path = tmp_path / "config/agent-model-config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _week(tmp_path: Path) -> tuple[Path, Path]:
    config_path = _shipped_copy(tmp_path)
    config = load_config(config_path)
    state = tmp_path / "state"
    clock = [START.timestamp()]

    async def no_sleep(_: float) -> None:
        return None

    slots: list[tuple[datetime, str]] = []
    end = START + timedelta(days=DAYS)
    for name, loop in config.loops.items():
        for fire in next_fire_times(loop, config.tz, n=400, now=START - timedelta(seconds=1)):
            if fire < end:
                slots.append((fire, name))

    async def go() -> None:
        with Ledger.open(state) as ledger:
            executor = Executor(
                config, ledger, simulate=True, sleep=no_sleep, simulator_clock=lambda: clock[0]
            )
            for when, name in sorted(slots):
                clock[0] = when.timestamp()
                result = await run_loop(
                    config, ledger, executor, name, trigger="schedule", slot=utc_iso(when), now=when
                )
                assert result.status == "ok", (name, when, result.error)
            await executor.aclose()

    asyncio.run(go())
    return config_path, state


def _calls(state: Path) -> list[dict[str, Any]]:
    with Ledger.open(state, create=False, reconcile=False) as ledger, ledger.read() as conn:
        cur = conn.execute("SELECT * FROM calls ORDER BY id")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def _micro(usd: Decimal) -> int:
    return int((usd * 1_000_000).to_integral_value(rounding=ROUND_CEILING))


def test_a_simulated_week_batches_caches_and_shows_the_saving(tmp_path: Path) -> None:
    config_path, state = _week(tmp_path)
    config = load_config(config_path)
    calls = _calls(state)
    by_loop: dict[str, list[dict[str, Any]]] = {}
    for call in calls:
        by_loop.setdefault(call["loop"], []).append(call)
    assert all(c["status"] == "ok" and c["simulated"] == 1 for c in calls)

    # The background planning loop ran every morning through a batch, at batch prices.
    planning = by_loop["planning"]
    assert len(planning) == DAYS and all(c["batch"] == 1 and c["batch_id"] for c in planning)
    assert all(c["batch"] == 0 for c in by_loop["heartbeat"] + by_loop["research"])

    # Research's calls on its own model share the task and notes: after the first of a run,
    # each reads the prefix from the cache. The 30-minute heartbeat writes nothing.
    sonnet = [c for c in by_loop["research"] if c["alias"] == "sonnet"]
    reads = [c for c in sonnet if c["cache_read_tokens"]]
    writes = [c for c in sonnet if c["cache_write_tokens"]]
    runs = len({c["run_id"] for c in sonnet})
    assert runs == 12 * DAYS and len(writes) == runs and len(reads) == 2 * runs
    assert not any(c["cache_read_tokens"] or c["cache_write_tokens"] for c in by_loop["heartbeat"])
    assert all(c["cache_write_1h_tokens"] == 0 for c in writes)  # 5m: the calls are moments apart

    # Every figure is the providers' published multipliers applied to the row's tokens: a
    # 5-minute write costs 1.25x the input price and a 1-hour one 2x, a read at most 0.1x
    # (the table's own rate: these models' is 0.05x), and a batch half of every rate.
    for call in calls:
        listed = config.price(call["alias"])
        batched = config.price(call["alias"], batch=True)
        assert listed is not None and batched is not None
        for rates, half in zip(
            (listed.base, *(r for _, r in listed.tiers)),
            (batched.base, *(r for _, r in batched.tiers)),
            strict=True,
        ):
            assert rates.cache_write == rates.input * Decimal("1.25")
            assert rates.cache_write_1h == rates.input * 2
            assert rates.cache_read <= rates.input * Decimal("0.1")
            assert half == type(rates)(**{k: v / 2 for k, v in vars(rates).items()})
        rates = (batched if call["batch"] else listed).rates_for(call["input_tokens"])
        uncached = call["input_tokens"] - call["cache_read_tokens"] - call["cache_write_tokens"]
        expected = (
            uncached * rates.input
            + call["cache_read_tokens"] * rates.cache_read
            + call["cache_write_tokens"] * rates.cache_write
            + call["output_tokens"] * rates.output
        )
        assert call["cost_micro_usd"] == _micro(expected / 1_000_000), call

    # `agentd reprice` shows what caching and batching saved against list price.
    result = CliRunner().invoke(
        main,
        ["--config", str(config_path), "--state-dir", str(state), "reprice", "--simulated",
         "--all-tier", "deep", "--since", "3650d", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = {r["loop"]: r for r in json.loads(result.stdout)}
    cache_saved = Decimal(rows["research"]["cache_saving_usd"])
    batch_saved = Decimal(rows["planning"]["batch_saving_usd"])
    assert cache_saved > 0 and batch_saved > 0
    assert Decimal(rows["heartbeat"]["cache_saving_usd"]) == 0
    # The batch saving is exactly the batch calls' cost again (half of list is what was paid).
    paid = sum(c["cost_micro_usd"] for c in planning)
    assert abs(batch_saved * 1_000_000 - paid) <= len(planning)  # per-row micro-USD rounding
    # Cache saving: each read saves input less read rate, each write costs 0.25x more, exactly.
    sonnet_rates = config.price("sonnet").base  # type: ignore[union-attr]
    read_tokens = sum(c["cache_read_tokens"] for c in sonnet)
    write_tokens = sum(c["cache_write_tokens"] for c in sonnet)
    expected_saving = (
        read_tokens * (sonnet_rates.input - sonnet_rates.cache_read)
        - write_tokens * sonnet_rates.input * Decimal("0.25")
    ) / 1_000_000
    assert cache_saved == expected_saving.quantize(Decimal("0.000001"), rounding=ROUND_HALF_UP)
    total = json.loads(result.stdout)[-1]
    assert Decimal(total["batch_saving_usd"]) == batch_saved

    # `agentd ledger` shows the same saving per loop: list price less what was paid.
    ledger = CliRunner().invoke(
        main,
        ["--config", str(config_path), "--state-dir", str(state), "ledger", "--simulated",
         "--since", "3650d", "--json"],
    )  # fmt: skip
    assert ledger.exit_code == 0, ledger.output
    saved = {r["loop"]: Decimal(r["saved_usd"]) for r in json.loads(ledger.stdout)}
    for loop, rows_of_loop in by_loop.items():
        listed_total = sum(c["list_cost_micro_usd"] - c["cost_micro_usd"] for c in rows_of_loop)
        assert saved[loop] * 1_000_000 == listed_total
    assert saved["planning"] > 0 and saved["research"] > 0 and saved["heartbeat"] == 0

    table = CliRunner().invoke(
        main,
        ["--config", str(config_path), "--state-dir", str(state), "reprice", "--simulated",
         "--all-tier", "deep", "--since", "3650d"],
    )  # fmt: skip
    assert table.exit_code == 0, table.output
    headline = table.stdout.strip().splitlines()[-1]
    assert "saved against list price by caching $" in headline and "batching $" in headline
