"""Ledger throughput: settled calls per second (reserve + settle) on a real WAL ledger.

What agentd really does: `budgets.reserve` and `budgets.settle` are synchronous calls made on
the event loop by `Executor._attempt` (not in a worker thread). So "K concurrent tasks" here
are K asyncio tasks on one loop, each doing reserve → `await asyncio.sleep(0)` (the model
call, zero latency) → settle, for its own loop name (a loop never runs twice at once). The
4-process case runs 4 such processes (8 tasks each) on one ledger file; throughput there is
total calls over the wall time from a common start barrier to the last finish.

Every reservation checks three windows (its loop per day, global per day and per month), as
a budgeted loop under global caps does; `--no-windows` measures an unbudgeted loop (no sums).
A reservation reads its windows' running totals (`agentd.budgetcache`), so its cost should not
depend on how many rows the windows already hold: `--scaling` times one reserve + settle
against windows already holding 0 … N rows, and the first reservation of a process (the one
that sums each window once, cold) — with the report cache empty (the rows are summed) and
filled (what a daemon keeps it: the closed hours come from `report_hours`/`report_days`).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import call_start, emit_json, fmt_mmm, print_machine


def _windows(loop: str, with_windows: bool) -> list[Any]:
    from agentd.budgets import GLOBAL, Window

    if not with_windows:
        return []
    big = 10**15  # never refuses: we measure the bookkeeping, not refusals
    return [Window(loop, "day", big), Window(GLOBAL, "day", big), Window(GLOBAL, "month", big)]


async def _tasks(state: Path, tasks: int, per_task: int, with_windows: bool, tag: str) -> int:
    """`tasks` asyncio tasks, each reserving and settling `per_task` calls; returns the count."""
    from zoneinfo import ZoneInfo

    from agentd import budgets
    from agentd.ledger import Ledger
    from agentd.providers.base import Usage

    tz = ZoneInfo("UTC")
    usage = Usage(input_tokens=120, output_tokens=16)
    with Ledger.open(state) as ledger:

        async def worker(i: int) -> int:
            loop = f"{tag}loop{i}"
            windows = _windows(loop, with_windows)
            for n in range(per_task):
                start = call_start(loop, attempt=n + 1)
                call_id = budgets.reserve(ledger, start, 1_000, windows, tz)
                await asyncio.sleep(0)  # the model call
                budgets.settle(
                    ledger,
                    call_id,
                    status="ok",
                    usage=usage,
                    cost_micro_usd=200,
                    priced=True,
                    latency_ms=1,
                    request_id=f"req_{call_id}",
                )
            return per_task

        done = await asyncio.gather(*(worker(i) for i in range(tasks)))
    return sum(done)


def _prepare(state: Path) -> None:
    """Create and migrate a fresh ledger outside the timing."""
    from agentd.ledger import Ledger

    with Ledger.open(state):
        pass


def _one_process(state: Path, tasks: int, per_task: int, with_windows: bool) -> float:
    """Calls per second for K tasks in this process, on a fresh ledger."""
    _prepare(state)
    t0 = time.perf_counter()
    n = asyncio.run(_tasks(state, tasks, per_task, with_windows, "p0"))
    return n / (time.perf_counter() - t0)


def _proc_worker(
    state: str, idx: int, tasks: int, per_task: int, with_windows: bool, barrier: Any, out: Any
) -> None:
    from agentd.logs import configure_logging

    configure_logging("warning")
    barrier.wait()
    start = time.time()
    n = asyncio.run(_tasks(Path(state), tasks, per_task, with_windows, f"p{idx}"))
    out.put((start, time.time(), n))


def _processes(
    state: Path,
    procs: int,
    tasks: int,
    per_task: int,
    with_windows: bool,
) -> float:
    """Calls per second for `procs` processes × `tasks` tasks on one fresh ledger."""
    _prepare(state)
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(procs)
    out = ctx.Queue()
    workers = [
        ctx.Process(
            target=_proc_worker,
            args=(str(state), i, tasks, per_task, with_windows, barrier, out),
        )
        for i in range(procs)
    ]
    for w in workers:
        w.start()
    results = [out.get(timeout=600) for _ in workers]
    for w in workers:
        w.join()
        if w.exitcode != 0:
            raise RuntimeError(f"worker exited {w.exitcode}")
    start = min(r[0] for r in results)
    end = max(r[1] for r in results)
    return sum(r[2] for r in results) / (end - start)


def _fill(state: Path, rows: int, loops: int = 50) -> None:
    """Insert `rows` settled calls inside today's (and this month's) windows, fast."""
    from agentd.ledger import Ledger, utc_iso

    now = datetime.now(UTC)
    # Spread since midnight (inside the day and month windows), never in the future: the
    # hours that closed over an hour ago are what a filled report cache holds.
    span = max(timedelta(minutes=1), now - now.replace(hour=0, minute=0, second=0, microsecond=0))
    with Ledger.open(state) as ledger, ledger.write() as conn:
        conn.executemany(
            "INSERT INTO calls (loop, purpose, tier, alias, provider, model, attempt, status,"
            " reserved_micro_usd, cost_micro_usd, priced, simulated, batch, started_at,"
            " finished_at, input_tokens, output_tokens)"
            " VALUES (?, 'work', 'fast', 'haiku', 'anthropic', 'claude-haiku-4-5', 1, 'ok',"
            " 1000, 200, 1, 0, 0, ?, ?, 120, 16)",
            (
                (
                    f"fill{i % loops}",
                    ts := utc_iso(now - span * (i / max(rows, 1))),
                    ts,
                )
                for i in range(rows)
            ),
        )


def _scaling_point(state: Path, rows: int, cached: bool, n: int) -> tuple[float, float]:
    """(ms of a process's first reserve + settle, mean ms of the next `n`), 3 windows, with
    `rows` rows already in the windows (and with `cached`, the report cache filled first)."""
    from zoneinfo import ZoneInfo

    from agentd import budgets, spendcache
    from agentd.ledger import Ledger

    _prepare(state)
    _fill(state, rows)
    if cached:
        with Ledger.open(state) as ledger:
            spendcache.refresh(ledger, datetime.now(UTC))
    tz = ZoneInfo("UTC")
    windows = _windows("x", True)
    start = call_start("x")
    with Ledger.open(state) as ledger:

        def one() -> None:
            call_id = budgets.reserve(ledger, start, 1_000, windows, tz)
            budgets.settle(
                ledger, call_id, status="ok", usage=None, cost_micro_usd=200, priced=True
            )

        t0 = time.perf_counter()
        one()  # cold: this process sums each window once
        cold = (time.perf_counter() - t0) * 1000
        t0 = time.perf_counter()
        for _ in range(n):
            one()
        warm = (time.perf_counter() - t0) / n * 1000
    return cold, warm


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000, help="settled calls per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-windows", action="store_true", help="only unbudgeted calls")
    parser.add_argument("--scaling", action="store_true", help="reserve cost vs rows in window")
    parser.add_argument("--scaling-rows", default="0,10000,100000,1000000")
    parser.add_argument("--smoke", action="store_true", help="tiny and quick (CI)")
    parser.add_argument("--json", help="write results as JSON to this path")
    args = parser.parse_args(argv)
    if args.smoke:
        args.calls, args.repeats = 256, 1
        args.scaling, args.scaling_rows = True, "0,2000"
    from agentd.logs import configure_logging

    configure_logging("warning")  # the ledgers' "migrated" events would bury the tables
    print_machine()
    # (label, budgeted)
    modes = [("budgeted (3 windows)", True)]
    if args.no_windows:
        modes = [("unbudgeted (no sums)", False)]
    elif not args.smoke:
        modes.append(("unbudgeted (no sums)", False))
    results: dict[str, Any] = {"throughput": {}, "scaling": {}}
    cases = [
        ("1 task", 1, 1),
        ("8 tasks", 1, 8),
        ("64 tasks", 1, 64),
        ("4 processes × 8 tasks", 4, 8),
    ]
    # Repeats outermost: drift on a shared machine then hits every case and mode alike.
    rates: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeats):
        for label, procs, tasks in cases:
            per_task = max(1, args.calls // (procs * tasks))
            for mode, with_windows in modes:
                with tempfile.TemporaryDirectory(prefix="agentd-bench-") as tmp:
                    if procs == 1:
                        rate = _one_process(Path(tmp), tasks, per_task, with_windows)
                    else:
                        rate = _processes(Path(tmp), procs, tasks, per_task, with_windows)
                rates.setdefault((label, mode), []).append(rate)
    print(
        f"# settled calls/s (reserve + settle), {args.calls} calls per measurement, "
        f"median (min–max) of {args.repeats}, fresh ledger each"
    )
    print("| case | " + " | ".join(m for m, _ in modes) + " |")
    print("|---|" + "---|" * len(modes))
    for label, _, _ in cases:
        cells = [fmt_mmm(rates[label, mode], 0) for mode, _ in modes]
        for mode, _ in modes:
            results["throughput"].setdefault(label, {})[mode] = rates[label, mode]
        print(f"| {label} | " + " | ".join(cells) + " |")
    if args.scaling:
        rows_list = [int(r) for r in args.scaling_rows.split(",")]
        print(
            "\n# ms per reserve + settle (3 windows) vs rows already in the windows: a process's"
            " first one (sums each window once), then the mean of the next 300"
        )
        variants = [("report cache empty", False), ("report cache filled", True)]
        heads = [f"{name}: {what}" for name, _ in variants for what in ("first", "next")]
        print("| rows in window | " + " | ".join(heads) + " |")
        print("|---|" + "---|" * len(heads))
        for rows in rows_list:
            cells = []
            n = 50 if args.smoke else 300
            for name, cached in variants:
                with tempfile.TemporaryDirectory(prefix="agentd-bench-") as tmp:
                    cold, warm = _scaling_point(Path(tmp), rows, cached, n)
                results["scaling"].setdefault(name, {})[rows] = {"first": cold, "next": warm}
                cells += [f"{cold:.3f}", f"{warm:.3f}"]
            print(f"| {rows:,} | " + " | ".join(cells) + " |")
    emit_json(args.json, {"benchmark": "ledger", **results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
