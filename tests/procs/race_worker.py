"""Test helper for the budget race: many threads reserving and settling against small caps.

Usage: race_worker.py STATE_DIR SEED THREADS ITERATIONS CAP_A CAP_B GLOBAL_CAP START_AT
Each thread alternates between two loops and two Ledger connections, reserves a random amount,
holds it briefly, then settles at a random cost no larger than the reservation. Every refusal
is checked to carry numbers showing the call did not fit at that moment, and every so often a
thread checks that no window's settled + reserved spend is above its cap. Prints one JSON line.
"""

from __future__ import annotations

import json
import random
import sys
import threading
import time
from pathlib import Path
from zoneinfo import ZoneInfo

import structlog

from agentd import budgets
from agentd.ledger import Ledger

UTC_ZONE = ZoneInfo("UTC")
LOOPS = ("race-a", "race-b")
STATUSES: tuple[budgets.SettleStatus, ...] = ("ok", "ok", "error", "aborted")


def main() -> None:
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    state_dir = Path(sys.argv[1])
    seed, threads, iterations = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    caps = {LOOPS[0]: int(sys.argv[5]), LOOPS[1]: int(sys.argv[6])}
    global_cap, start_at = int(sys.argv[7]), float(sys.argv[8])
    ledgers = [Ledger.open(state_dir, reconcile=False) for _ in range(2)]
    runs = {
        loop: ledgers[0].start_run(loop=loop, trigger="manual", simulated=False) for loop in LOOPS
    }
    windows = {
        loop: [
            budgets.Window(loop, "day", caps[loop]),
            budgets.Window("global", "month", global_cap),
        ]
        for loop in LOOPS
    }
    lock = threading.Lock()
    totals = {"reserved": 0, "refused": 0, "settled": 0, "checks": 0}
    problems: list[str] = []
    by_window: dict[str, int] = {}

    def work(index: int) -> None:
        try:
            attempts(index)
        except Exception as exc:  # any crash is a test failure, reported by the parent
            with lock:
                problems.append(f"thread {index}: {exc!r}")

    def attempts(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        ledger = ledgers[index % 2]
        for i in range(iterations):
            loop = LOOPS[(index + i) % 2]
            amount = rng.randint(1, 2_000)
            call = budgets.CallStart(
                run_id=runs[loop],
                loop=loop,
                purpose="work",
                tier="fast",
                alias="haiku",
                provider="anthropic",
                model="claude-haiku-4-5",
                attempt=i + 1,
                simulated=False,
            )
            try:
                call_id = budgets.reserve(ledger, call, amount, windows[loop], UTC_ZONE)
            except budgets.BudgetWindowExceeded as exc:
                fits = exc.used_micro_usd + exc.asked_micro_usd <= exc.limit_micro_usd
                if (
                    fits
                    or exc.used_micro_usd > exc.limit_micro_usd
                    or exc.asked_micro_usd != amount
                ):
                    with lock:
                        problems.append(f"bad refusal: {exc}")
                with lock:
                    totals["refused"] += 1
                    by_window[exc.window] = by_window.get(exc.window, 0) + 1
                continue
            with lock:
                totals["reserved"] += 1
            time.sleep(rng.random() * 0.002)  # keep reservations in flight across threads
            status = rng.choice(STATUSES)
            cost = rng.randint(0, amount)
            budgets.settle(
                ledger, call_id, status=status, usage=None, cost_micro_usd=cost, priced=True
            )
            with lock:
                totals["settled"] += 1
            if i % 5 == 0:
                for status_row in budgets.window_status(ledger, windows[loop], UTC_ZONE):
                    used = status_row.spent_micro_usd + status_row.reserved_micro_usd
                    if used > status_row.window.limit_micro_usd:
                        with lock:
                            problems.append(f"over cap: {status_row}")
                with lock:
                    totals["checks"] += 1

    pool = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    time.sleep(max(0.0, start_at - time.time()))
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    for ledger in ledgers:
        ledger.close()
    print(json.dumps({**totals, "refused_by": by_window, "problems": problems}), flush=True)


if __name__ == "__main__":
    main()
