"""Could the reservation's commit hide behind the SDK's request building? A GIL experiment.

The idea left by earlier sessions for §1: commit the reservation in a worker thread while the
event loop builds the SDK request, and hold the request in an httpx transport until the
commit is done. This measures the best case of that idea without building it: per round, the
main thread runs `--python-us` of pure Python (standing in for the SDK's request building,
which holds the GIL) while a worker thread makes a reservation-shaped write on a ledger file
agentd created (`BEGIN IMMEDIATE`, the `calls` INSERT a reservation makes, `COMMIT`; WAL,
synchronous=NORMAL); the round ends when both are done. Against that: the same two one after
the other on one thread. At CPython's default switch interval (5 ms) and two shorter ones.

SQLite releases the GIL while a statement runs, but the thread needs it to start each
statement and to return from it, and the main thread gives it up only when forced (after the
switch interval) — so the overlap is small, or negative.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit_json, print_machine

from agentd.ledger import Ledger

INSERT = (
    "INSERT INTO calls (run_id, loop, purpose, tier, alias, provider, model, attempt, status,"
    " reserved_micro_usd, priced, simulated, batch, owner, started_at)"
    " VALUES (?, 'work', 'work', 'fast', 'haiku', 'anthropic', 'claude-haiku-4-5', 1,"
    " 'pending', 1207, 0, 0, 0, 'bench', ?)"
)
SWITCH_INTERVALS_S = (0.005, 0.0002, 0.00005)


def _python_work(us: float) -> None:
    """Pure-Python work for `us` microseconds (dicts and attribute-free arithmetic)."""
    end = time.perf_counter() + us / 1e6
    total = 0
    while time.perf_counter() < end:
        params = {"model": "claude-haiku-4-5", "max_tokens": 64, "n": total}
        total += len(params)


class _Writer:
    """A worker thread that makes one reservation-shaped write per request."""

    def __init__(self, conn: sqlite3.Connection, run_id: int) -> None:
        self.conn = conn
        self.run_id = run_id
        self.todo = threading.Semaphore(0)
        self.done = threading.Semaphore(0)
        self.stop = False
        self.thread = threading.Thread(target=self._loop, name="bench-writer", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            self.todo.acquire()
            if self.stop:
                return
            _reserve(self.conn, self.run_id)
            self.done.release()

    def close(self) -> None:
        self.stop = True
        self.todo.release()
        self.thread.join()


def _reserve(conn: sqlite3.Connection, run_id: int) -> None:
    conn.execute("BEGIN IMMEDIATE")
    conn.execute(INSERT, (run_id, "2026-11-26T00:00:00.000000+00:00"))
    conn.execute("COMMIT")


def _measure(rounds: int, python_us: float, state: Path) -> dict[str, Any]:
    ledger = Ledger.open(state)
    run_id = ledger.start_run(loop="work", trigger="manual", simulated=False)
    ledger.close()
    conn = sqlite3.connect(state / "ledger.db", isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=5000")
    writer = _Writer(conn, run_id)
    out: dict[str, Any] = {"python_us": python_us, "rounds": rounds}
    default = sys.getswitchinterval()
    try:
        t0 = time.perf_counter()
        for _ in range(rounds):
            _reserve(conn, run_id)
        out["reserve_alone_us"] = round((time.perf_counter() - t0) / rounds * 1e6, 1)
        for interval in SWITCH_INTERVALS_S:
            sys.setswitchinterval(interval)
            t0 = time.perf_counter()
            for _ in range(rounds):
                _reserve(conn, run_id)
                _python_work(python_us)
            serial = (time.perf_counter() - t0) / rounds * 1e6
            t0 = time.perf_counter()
            for _ in range(rounds):
                writer.todo.release()
                _python_work(python_us)
                writer.done.acquire()
            threaded = (time.perf_counter() - t0) / rounds * 1e6
            out[f"switch_{interval * 1000:g}ms"] = {
                "serial_us": round(serial, 1),
                "threaded_us": round(threaded, 1),
                "hidden_us": round(serial - threaded, 1),
            }
    finally:
        sys.setswitchinterval(default)
        writer.close()
        conn.close()
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the experiment and print one row per switch interval."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--python-us", type=float, default=800.0, help="main-thread work")
    parser.add_argument("--smoke", action="store_true", help="tiny and quick (CI)")
    parser.add_argument("--json", help="write results as JSON to this path")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds = 50
    print_machine()
    with tempfile.TemporaryDirectory(prefix="agentd-bench-") as tmp:
        result = _measure(args.rounds, args.python_us, Path(tmp) / "state")
    print(f"# {result['rounds']} rounds; main-thread Python {result['python_us']:g} µs per round")
    print(f"# the reservation-shaped write alone: {result['reserve_alone_us']} µs")
    print("| switch interval | serial µs/round | write in a thread µs/round | hidden µs |")
    print("|---|---|---|---|")
    for key, row in result.items():
        if key.startswith("switch_"):
            name = key.removeprefix("switch_")
            print(f"| {name} | {row['serial_us']} | {row['threaded_us']} | {row['hidden_us']} |")
    emit_json(args.json, {"benchmark": "overlap", **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
