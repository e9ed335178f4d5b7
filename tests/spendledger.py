"""A small ledger with known rows, written through the real API, for the spend-insight tests.

Runs are started with `Ledger.start_run`, calls reserved with `budgets.reserve(now=...)` (which
places them in time) and settled with `budgets.settle`, runs finished with `finish_run`. Only
the runs' own timestamps are then moved to their first call's time (`start_run` stamps the
real clock and has no `now=`), so runs and calls agree as they would in production.

The known rows (real unless said; UTC, March 2026; 2026-03-09 is a Monday; µ$ = micro-USD):

- A1 alpha 03-09 10:00: haiku (fast, work) ok, in 1000 (cache read 300, write 100), out 200,
  1500 µ$, 100 ms.
- A2 alpha 03-09 22:30, a fallback run: haiku error, 0 µ$, 50 ms; then gpt-mini (fast) ok,
  in 500, out 100, 300 µ$, 400 ms.
- B1 beta 03-10 02:00: haiku (fast, draft) ok, in 2000, out 50, 2250 µ$, 200 ms; then sonnet
  (balanced, work) ok, in 3000 (cache read 1000), out 800 (reasoning 100), 19000 µ$, 1200 ms.
- B2 beta 03-12 12:00, failed: sonnet aborted, settled at its reservation 5000 µ$, 3000 ms.
- A3 alpha 03-12 13:00: haiku ok, in 800, out 40, 1000 µ$, 300 ms.
- A4 alpha 03-12 14:00, still running: haiku pending, 700 µ$ reserved.
- S1 alpha 03-10 08:00, simulated: haiku ok, in 100, out 10, 50000 µ$, 10 ms.
- K1 alpha 03-10 08:00 skipped_budget and K2 beta 03-12 09:00 skipped_noop (no calls).

These rows have no list cost (`list_cost_micro_usd` NULL, as written before m012): they save
nothing. `write_savings` writes another set, with list costs, for the saving column.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from builders import base_config, write_config

from agentd import budgets
from agentd.config import Config, load_config
from agentd.ledger import Ledger, utc_iso
from agentd.providers.base import Usage
from agentd.spend import SpendReport, spend_report
from agentd.spendsources import refresh_range

UTC_ZONE = ZoneInfo("UTC")
D1 = datetime(2026, 3, 9, tzinfo=UTC)  # a Monday
NOW = datetime(2026, 3, 12, 18, 0, tzinfo=UTC)

HAIKU = ("fast", "haiku", "anthropic", "claude-haiku-4-5")
GPT_MINI = ("fast", "gpt-mini", "openai", "gpt-4o-mini")
SONNET = ("balanced", "sonnet", "anthropic", "claude-sonnet-4-5")


@dataclass(frozen=True)
class Call:
    """One attempt to write: where it ran, how it ended, what it used."""

    model: tuple[str, str, str, str]  # tier, alias, provider, model id
    status: str  # ok | error | aborted | pending
    usage: Usage | None = None
    cost: int = 0
    latency: int | None = None
    purpose: str = "work"
    reserved: int = 100_000
    list_cost: int | None = None  # at list price; None: unknown (before m012, unpriced)
    batch: bool = False


def at(day: int, hour: int, minute: int = 0) -> datetime:
    """A time in March 2026 (UTC)."""
    return datetime(2026, 3, day, hour, minute, tzinfo=UTC)


def write_run(
    ledger: Ledger,
    loop: str,
    when: datetime,
    calls: list[Call],
    *,
    status: str = "ok",
    fallback: bool = False,
    simulated: bool = False,
    reply: str | None = "done",
) -> int:
    """A run and its attempts (a minute apart from `when`); returns the run id."""
    run_id = ledger.start_run(loop=loop, trigger="schedule", simulated=simulated)
    for n, call in enumerate(calls, start=1):
        tier, alias, provider, model = call.model
        start = budgets.CallStart(
            run_id=run_id,
            loop=loop,
            purpose=call.purpose,
            tier=tier,
            alias=alias,
            provider=provider,
            model=model,
            attempt=n,
            simulated=simulated,
            batch=call.batch,
        )
        call_id = budgets.reserve(
            ledger,
            start,
            call.reserved,
            [],
            UTC_ZONE,
            now=when.replace(minute=when.minute + n - 1),
        )
        if call.status != "pending":
            budgets.settle(
                ledger,
                call_id,
                status=call.status,  # type: ignore[arg-type]
                usage=call.usage,
                cost_micro_usd=call.cost,
                priced=True,
                latency_ms=call.latency,
                http_status=500 if call.status == "error" else None,
            )
        if call.list_cost is not None:
            # What the executor records at settle time beside the cost (see `write_savings`).
            with ledger.write() as conn:
                conn.execute(
                    "UPDATE calls SET list_cost_micro_usd = ? WHERE id = ?",
                    (call.list_cost, call_id),
                )
    if status != "running":
        ledger.finish_run(
            run_id,
            status=status,
            model=calls[-1].model[3] if calls else None,
            fallback=fallback,
            reply=reply if status == "ok" else None,
        )
    backdate(ledger, run_id, when)
    return run_id


def skipped_run(ledger: Ledger, loop: str, when: datetime, status: str) -> int:
    """A run recorded without any call, at `when`."""
    run_id = ledger.record_skipped_run(
        loop=loop, trigger="schedule", simulated=False, status=status
    )
    backdate(ledger, run_id, when)
    return run_id


def backdate(ledger: Ledger, run_id: int, when: datetime) -> None:
    """Move a run's own timestamps to `when` (its calls are already placed by `reserve`)."""
    with ledger.write() as conn:
        conn.execute(
            "UPDATE runs SET started_at = ?, finished_at = CASE WHEN finished_at IS NULL"
            " THEN NULL ELSE ? END WHERE id = ?",
            (utc_iso(when), utc_iso(when), run_id),
        )


def build(state_dir: Path) -> Ledger:
    """The ledger of the module docstring, open."""
    return write_known(Ledger.open(state_dir))


def write_known(ledger: Ledger) -> Ledger:
    """Write the rows of the module docstring into `ledger`; return it."""
    write_run(
        ledger,
        "alpha",
        at(9, 10),
        [Call(HAIKU, "ok", Usage(1000, 200, 300, 100), 1500, 100)],
    )
    write_run(
        ledger,
        "alpha",
        at(9, 22, 30),
        [
            Call(HAIKU, "error", None, 0, 50),
            Call(GPT_MINI, "ok", Usage(500, 100), 300, 400),
        ],
        fallback=True,
    )
    write_run(
        ledger,
        "beta",
        at(10, 2),
        [
            Call(HAIKU, "ok", Usage(2000, 50), 2250, 200, purpose="draft"),
            Call(SONNET, "ok", Usage(3000, 800, 1000, 0, 100), 19000, 1200),
        ],
    )
    write_run(
        ledger,
        "beta",
        at(12, 12),
        [Call(SONNET, "aborted", None, 5000, 3000, reserved=5000)],
        status="failed",
    )
    write_run(ledger, "alpha", at(12, 13), [Call(HAIKU, "ok", Usage(800, 40), 1000, 300)])
    write_run(
        ledger,
        "alpha",
        at(12, 14),
        [Call(HAIKU, "pending", reserved=700)],
        status="running",
    )
    write_run(
        ledger,
        "alpha",
        at(10, 8),
        [Call(HAIKU, "ok", Usage(100, 10), 50_000, 10)],
        simulated=True,
    )
    skipped_run(ledger, "alpha", at(10, 8), "skipped_budget")
    skipped_run(ledger, "beta", at(12, 9), "skipped_noop")
    return ledger


def write_savings(ledger: Ledger) -> Ledger:
    """Rows whose list cost differs from their cost (week 12, March 2026); return the ledger.

    At `config_data`'s prices (µ$ per token: haiku 1 / 5, cache read 0.1, write 1.25;
    sonnet 3 / 15, 0.3; gpt-mini 0.15 / 0.6), list cost = all input at the input rate + output
    at the output rate; a batch call costs half its price. saved = list − cost:

    - V1 delta 03-16 09:00: haiku ok, in 10000 (cache read 8000), out 500: cost 2000 + 800
      + 2500 = 5300, list 12500, saved 7200.
    - V2 delta 03-16 10:00: sonnet ok, batch, in 4000, out 1000: list 27000, cost 13500,
      saved 13500.
    - V3 delta 03-16 11:00: haiku ok, in 2000 (cache write 1000), out 100: cost 1000 + 1250
      + 500 = 2750, list 2500, saved −250 (the write was never read back).
    - V4 omega 03-17 08:00, a fallback run: haiku error (cost 0, list 0), then gpt-mini ok,
      batch, in 10000, out 2000: list 2700, cost 1350, saved 1350.
    - V5 omega 03-17 09:00, failed: sonnet aborted, at its reservation 6000 (list 6000).
    - V6 omega 03-17 10:00: haiku ok, in 1000, out 100, 1500 µ$, no list cost (NULL).
    - V7 omega 03-18 12:00, still running: sonnet pending, batch, 9000 µ$ reserved.
    - V8 delta 03-18 13:00: sonnet draft ok, in 20000 (cache read 15000), out 1000: cost
      15000 + 4500 + 15000 = 34500, list 75000, saved 40500.
    - V9 delta 03-17 07:00, simulated: haiku ok, in 1000, out 100, cost 50, list 1500.

    Real totals: list 127200, cost 64900, saved 62300 (delta 60950, omega 1350), reserved 9000.
    """
    write_run(
        ledger,
        "delta",
        at(16, 9),
        [Call(HAIKU, "ok", Usage(10_000, 500, 8_000), 5300, 900, list_cost=12_500)],
    )
    write_run(
        ledger,
        "delta",
        at(16, 10),
        [Call(SONNET, "ok", Usage(4_000, 1_000), 13_500, 60_000, list_cost=27_000, batch=True)],
    )
    write_run(
        ledger,
        "delta",
        at(16, 11),
        [Call(HAIKU, "ok", Usage(2_000, 100, 0, 1_000), 2750, 300, list_cost=2_500)],
    )
    write_run(
        ledger,
        "omega",
        at(17, 8),
        [
            Call(HAIKU, "error", None, 0, 40, list_cost=0),
            Call(GPT_MINI, "ok", Usage(10_000, 2_000), 1350, 90_000, list_cost=2_700, batch=True),
        ],
        fallback=True,
    )
    write_run(
        ledger,
        "omega",
        at(17, 9),
        [Call(SONNET, "aborted", None, 6000, 2000, reserved=6000, list_cost=6000)],
        status="failed",
    )
    write_run(ledger, "omega", at(17, 10), [Call(HAIKU, "ok", Usage(1_000, 100), 1500, 200)])
    write_run(
        ledger,
        "omega",
        at(18, 12),
        [Call(SONNET, "pending", reserved=9000, batch=True)],
        status="running",
    )
    write_run(
        ledger,
        "delta",
        at(18, 13),
        [
            Call(
                SONNET,
                "ok",
                Usage(20_000, 1_000, 15_000),
                34_500,
                2500,
                purpose="draft",
                list_cost=75_000,
            )
        ],
    )
    write_run(
        ledger,
        "delta",
        at(17, 7),
        [Call(HAIKU, "ok", Usage(1_000, 100), 50, 10, list_cost=1500)],
        simulated=True,
    )
    return ledger


def sql_sums(
    ledger: Ledger, where: str = "simulated = 0", params: tuple[object, ...] = ()
) -> dict[str, int]:
    """What a report's totals must equal: plain SQL sums over the calls (and runs) rows."""
    with ledger.read() as conn:
        row = conn.execute(
            "SELECT COUNT(*),"
            " SUM(status IN ('error', 'aborted')),"
            " COALESCE(SUM(input_tokens), 0), COALESCE(SUM(cache_read_tokens), 0),"
            " COALESCE(SUM(cache_write_tokens), 0), COALESCE(SUM(output_tokens), 0),"
            " COALESCE(SUM(reasoning_tokens), 0),"
            " COALESCE(SUM(CASE WHEN status IN ('pending', 'submitted') THEN 0"
            "   ELSE cost_micro_usd END), 0),"
            " COALESCE(SUM(CASE WHEN status IN ('pending', 'submitted')"
            "   THEN reserved_micro_usd ELSE 0 END), 0),"
            " COUNT(DISTINCT run_id),"
            " COALESCE(SUM(CASE WHEN status IN ('pending', 'submitted') THEN 0"
            "   ELSE COALESCE(list_cost_micro_usd, cost_micro_usd) - cost_micro_usd END), 0)"
            f" FROM calls WHERE {where}",
            params,
        ).fetchone()
        fallbacks = conn.execute(
            f"SELECT COUNT(*) FROM runs WHERE fallback = 1 AND id IN"
            f" (SELECT run_id FROM calls WHERE {where})",
            params,
        ).fetchone()[0]
    names = (
        "calls",
        "failed",
        "input_tokens",
        "cache_read_tokens",
        "cache_write_tokens",
        "output_tokens",
        "reasoning_tokens",
        "cost_micro_usd",
        "reserved_micro_usd",
        "runs",
        "saved_micro_usd",
    )
    sums = {n: int(v or 0) for n, v in zip(names, row, strict=True)}
    sums["fallbacks"] = int(fallbacks)
    return sums


def config_data() -> dict[str, Any]:
    """A config for the known ledger: loops alpha (fast), beta (balanced), gamma (deep).

    Prices are overrides in USD per million tokens, so hand arithmetic is easy:
    haiku 1 / 5 (cache read 0.1, write 1.25), gpt-mini 0.15 / 0.6, sonnet 3 / 15 (0.3, 3.75),
    gpt 2.5 / 10, opus 15 / 75 (1.5, 18.75).
    """
    data = base_config("http://127.0.0.1:9")
    prices = {
        "haiku": {"input": 1, "output": 5, "cache_read": "0.1", "cache_write": "1.25"},
        "gpt-mini": {"input": "0.15", "output": "0.6"},
        "sonnet": {"input": 3, "output": 15, "cache_read": "0.3", "cache_write": "3.75"},
        "gpt": {"input": "2.5", "output": 10},
        "opus": {"input": 15, "output": 75, "cache_read": "1.5", "cache_write": "18.75"},
    }
    for alias, price in prices.items():
        data["models"][alias]["price"] = price
    data["budgets"] = {"per_month_usd": 1}
    data["loops"] = {
        "alpha": {
            "every": "6h",
            "tier": "fast",
            "max_tokens": 200,
            "prompt": "alpha.md",
            "budget": {"per_day_usd": "0.001"},
        },
        "beta": {"cron": "0 7 * * *", "tier": "balanced", "max_tokens": 1000, "prompt": "beta.md"},
        "gamma": {
            "every": "1h",
            "tier": "deep",
            "max_tokens": 20,
            "prompt": "gamma.md",
            "active_hours": {"start": "09:00", "end": "17:00"},
        },
    }
    return data


def load(directory: Path, data: dict[str, Any]) -> Config:
    """Write a config (prompts `Say hello.`, 10 bytes) and load it as the CLI would."""
    return load_config(write_config(directory, data))


def cached_report(ledger: Ledger, *, cache: bool = True, **kwargs: Any) -> SpendReport:
    """`spend.spend_report` as the views call it: the range's hours cached first."""
    if cache:
        refresh_range(ledger, kwargs.get("since"))
    return spend_report(ledger, cache=cache, **kwargs)
