"""A big, realistic ledger for benchmarks: runs and calls written with executemany.

Rows go straight into the real schema (the ledger is opened, and so migrated, through
`Ledger.open`), bypassing `budgets.reserve`, which would take minutes for a million rows. The
mix resembles a daemon's: a few loops on different tiers, runs of one to three attempts, a few
per cent failed attempts and fallback runs, cache tokens, batch calls (half price) on the
loops that can wait, some simulated runs and skipped runs, and a handful of calls still in
flight. List costs (`list_cost_micro_usd`) are filled as the executor writes them, except on
the oldest twentieth of the rows (NULL, as written before m012). Deterministic for a seed.

    python tests/ledgergen.py STATE_DIR [--calls 1000000] [--days 365] [--seed 0]

or, from a benchmark: `from ledgergen import generate_ledger`.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from agentd.ledger import Ledger  # noqa: E402

# An owner on another host counts as alive: reconciliation leaves the generated in-flight rows
# alone. As long as a real one (host:pid:starttime:bootid), so rows are as wide as real rows.
OWNER = "ledgergen-host:48213:91234567:7f3c2a1e-5b4d-4c6e-9a8b-0d1e2f3a4b5c"
END = datetime(2026, 6, 1, tzinfo=UTC)

# (loop, tier, purposes, weight): heartbeat-like loops dominate the row count.
_LOOPS: tuple[tuple[str, str, tuple[str, ...], int], ...] = (
    ("heartbeat", "fast", ("work",), 40),
    ("triage", "fast", ("classify", "work"), 20),
    ("research", "balanced", ("draft", "work"), 15),
    ("digest", "balanced", ("work",), 10),
    ("review", "balanced", ("draft", "review", "escalate"), 10),
    ("planning", "deep", ("work",), 5),
)
_CHAINS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "fast": (("haiku", "anthropic", "claude-haiku-4-5"), ("gpt-mini", "openai", "gpt-4o-mini")),
    "balanced": (("sonnet", "anthropic", "claude-sonnet-4-5"), ("gpt", "openai", "gpt-4o")),
    "deep": (("opus", "anthropic", "claude-opus-4-1"), ("o1", "openai", "o1")),
}
# Micro-USD per token (input, output): rough list prices, enough for realistic sums.
_RATES = {"fast": (1, 5), "balanced": (3, 15), "deep": (15, 75)}
_PURPOSE_TIER = {"classify": "fast", "review": "fast", "escalate": "deep"}
# Loops whose runs can wait for a batch, and the share of their calls sent as one.
_BATCH_LOOPS = frozenset({"research", "digest"})
_BATCH_SHARE = 0.3


@dataclass(frozen=True)
class Generated:
    """What was written: row counts and the time span."""

    runs: int
    calls: int
    start: datetime
    end: datetime
    seconds: float


_DAY_US = 86_400_000_000
_DAYS: dict[int, str] = {}


def _iso(epoch_us: int) -> str:
    """Ledger text of a UTC instant in microseconds since the epoch (days cached: it is hot)."""
    day, rest = divmod(epoch_us, _DAY_US)
    prefix = _DAYS.get(day)
    if prefix is None:
        prefix = _DAYS[day] = (datetime(1970, 1, 1) + timedelta(days=day)).strftime("%Y-%m-%d")
    seconds, micro = divmod(rest, 1_000_000)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    return f"{prefix}T{hours:02d}:{minutes:02d}:{seconds:02d}.{micro:06d}Z"


def generate_ledger(
    state_dir: Path,
    calls: int = 1_000_000,
    *,
    days: int = 365,
    end: datetime = END,
    seed: int = 0,
    batch: int = 50_000,
) -> Generated:
    """Write about `calls` call rows (and their runs) spread evenly over `days` before `end`."""
    started = time.perf_counter()
    rng = random.Random(seed)
    weights = [w for *_, w in _LOOPS]
    start_us = int((end - timedelta(days=days)).timestamp() * 1_000_000)
    span_us = days * 86_400 * 1_000_000
    # Runs average ~1.56 attempts: slot them on an even grid with a little noise.
    n_runs = max(1, int(calls / 1.5625))
    step_us = span_us // n_runs
    listed_from = start_us + span_us // 20  # rows before it have no list cost (pre-m012)
    runs: list[tuple[Any, ...]] = []
    rows: list[tuple[Any, ...]] = []
    written_calls = 0
    run_id = 0
    call_id = 0
    with Ledger.open(state_dir) as ledger:
        run_sql = (
            "INSERT INTO runs (id, loop, trigger, slot, started_at, finished_at, status, route,"
            " model, fallback, reply, cost_micro_usd, simulated, error, owner)"
            " VALUES (?, ?, 'schedule', NULL, ?, ?, ?, NULL, ?, ?, NULL, ?, ?, NULL, ?)"
        )
        call_sql = (
            "INSERT INTO calls (id, run_id, loop, purpose, tier, alias, provider, model, attempt,"
            " status, error_type, http_status, error, input_tokens, output_tokens,"
            " cache_read_tokens, cache_write_tokens, reasoning_tokens, reserved_micro_usd,"
            " cost_micro_usd, priced, simulated, batch, owner, started_at, finished_at,"
            " latency_ms, request_id, list_cost_micro_usd)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?,"
            " ?, ?, ?, ?, 'req_011CVgenerated0000000000', ?)"
        )

        def flush() -> None:
            with ledger.write() as c:
                c.executemany(run_sql, runs)
                c.executemany(call_sql, rows)
            runs.clear()
            rows.clear()

        while written_calls < calls:
            run_id += 1
            at = start_us + (run_id - 1) * step_us + rng.randrange(max(1, step_us // 2))
            loop, tier, purposes, _ = rng.choices(_LOOPS, weights)[0]
            simulated = int(rng.random() < 0.05)
            if rng.random() < 0.03:  # skipped before any call: a run without calls
                status = rng.choice(("skipped_budget", "skipped_noop", "skipped_inactive"))
                runs.append(
                    (run_id, loop, _iso(at), _iso(at), status, None, 0, 0, simulated, OWNER)
                )
                continue
            attempt = 0
            run_cost = 0
            fallback = 0
            last_model: str | None = None
            run_ok = True
            for purpose in purposes:
                call_tier = _PURPOSE_TIER.get(purpose, tier)
                chain = _CHAINS[call_tier]
                for position, (alias, provider, model) in enumerate(chain):
                    attempt += 1
                    call_id += 1
                    at += rng.randrange(1_000, 200_000)
                    latency = int(rng.lognormvariate(7.0, 0.8)) + 50
                    fails = rng.random() < 0.04 and position < len(chain) - 1
                    in_rate, out_rate = _RATES[call_tier]
                    reserved = 4_000 * in_rate + 1_000 * out_rate
                    batch = int(loop in _BATCH_LOOPS and rng.random() < _BATCH_SHARE)
                    listed = at >= listed_from
                    near_end = at > start_us + span_us - 60_000_000
                    if near_end and rng.random() < 0.3:
                        rows.append(
                            (call_id, run_id, loop, purpose, call_tier, alias, provider, model,
                             attempt, "pending", None, None, None, None, None, None, None,
                             reserved, None, simulated, batch, OWNER, _iso(at), None, None, None)
                        )  # fmt: skip
                        run_ok = False
                        break
                    if fails:
                        status = "aborted" if rng.random() < 0.1 else "error"
                        cost = reserved if status == "aborted" else 0
                        rows.append(
                            (call_id, run_id, loop, purpose, call_tier, alias, provider, model,
                             attempt, status, "RateLimited", 429, None, None, None, None, None,
                             reserved, cost, simulated, batch, OWNER, _iso(at),
                             _iso(at + latency * 1000), latency, cost if listed else None)
                        )  # fmt: skip
                        run_cost += cost
                        continue
                    inp = rng.randrange(200, 4_000)
                    cache_read = rng.randrange(0, inp // 2) if rng.random() < 0.3 else 0
                    cache_write = rng.randrange(0, inp // 4) if rng.random() < 0.1 else 0
                    out = rng.randrange(10, 1_000)
                    reasoning = rng.randrange(0, out // 2) if call_tier == "deep" else 0
                    # Cache reads at a tenth of the input rate, writes at 1.25 times it.
                    cost = (
                        (inp - cache_read) * in_rate
                        + cache_read * in_rate // 10
                        + cache_write * in_rate // 4
                        + out * out_rate
                    )
                    if batch:
                        cost = (cost + 1) // 2  # half price, rounded up
                    list_cost = inp * in_rate + out * out_rate
                    rows.append(
                        (call_id, run_id, loop, purpose, call_tier, alias, provider, model,
                         attempt, "ok", None, None, inp, out, cache_read, cache_write, reasoning,
                         reserved, cost, simulated, batch, OWNER, _iso(at),
                         _iso(at + latency * 1000), latency, list_cost if listed else None)
                    )  # fmt: skip
                    run_cost += cost
                    fallback |= int(position > 0)
                    last_model = model
                    break
                else:
                    run_ok = False
                if not run_ok:
                    break
            written_calls += attempt
            status = "ok" if run_ok else ("running" if rows[-1][9] == "pending" else "failed")
            finished = None if status == "running" else _iso(at + 1000)
            runs.append(
                (run_id, loop, _iso(start_us + (run_id - 1) * step_us), finished, status,
                 last_model, fallback, run_cost, simulated, OWNER)
            )  # fmt: skip
            if len(rows) >= batch:
                flush()
        flush()
    return Generated(
        runs=run_id,
        calls=written_calls,
        start=end - timedelta(days=days),
        end=end,
        seconds=time.perf_counter() - started,
    )


def main(argv: list[str] | None = None) -> int:
    """Command line: generate a ledger in STATE_DIR."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("state_dir", type=Path)
    parser.add_argument("--calls", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if (args.state_dir / "ledger.db").exists():
        parser.error(f"{args.state_dir}/ledger.db exists: give an empty state directory")
    made = generate_ledger(args.state_dir, args.calls, days=args.days, seed=args.seed)
    print(
        f"{made.calls} calls in {made.runs} runs, {made.start:%Y-%m-%d} to {made.end:%Y-%m-%d},"
        f" in {made.seconds:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
