"""Crash soak: `kill -9` of `agentd once` / `agentd run` at random moments, then check the ledger.

A fake server (`fastserver.py`, OK answers after a random 0–`--latency-ms`) stands in for
both providers. `--kills` times, alternately, `agentd once work` or `agentd run` (three loops
`every: 1s`) is started on one state directory and killed with SIGKILL, either at a random
moment after start (half the kills: anywhere in start-up, reservation, call or settlement) or
a random 0–latency after the server has seen a new request (the other half: mid-call). A run
that printed its result before its kill (finished, or killed while the interpreter exits) is
recorded too: its `--json` run id must be in the ledger, ok.

Checked after the last kill, first without reconciling, then with the next start's open:
  * `PRAGMA integrity_check` is ok (and `foreign_key_check` is empty);
  * no lost rows: ledger `calls` rows >= requests the server saw (every request was reserved
    and committed before it was sent), every completed `once` run is there with status ok;
  * the only `pending` rows left before the final start belong to the processes killed after
    the last start that got as far as opening the ledger (each start reconciles the dead);
  * after the final start: no `pending`/`submitted` calls, no `running` runs, every aborted
    call is charged its reservation, and every run's cost equals the sum of its calls'.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    AGENTD,
    agentd_env,
    config_dict,
    emit_json,
    print_machine,
    write_config,
)
from fastserver import ServerProcess


def _pid_of_owner(owner: str) -> int:
    return int(owner.split(":")[1])


def _check(state: Path, server_requests: int, completed_runs: list[int]) -> dict[str, Any]:
    """The ledger checks; returns findings (problems listed under `problems`)."""
    from agentd.ledger import EFFECTIVE_COST_SQL, Ledger

    problems: list[str] = []
    db = state / "ledger.db"
    with sqlite3.connect(db) as conn:
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
        fk = conn.execute("PRAGMA foreign_key_check").fetchall()
        pending_before = conn.execute(
            "SELECT owner, COUNT(*) FROM calls WHERE status IN ('pending', 'submitted')"
            " GROUP BY owner"
        ).fetchall()
        running_before = conn.execute(
            "SELECT COUNT(*) FROM runs WHERE status = 'running'"
        ).fetchone()[0]
    if integrity != "ok":
        problems.append(f"integrity_check: {integrity}")
    if fk:
        problems.append(f"foreign_key_check: {fk[:5]}")
    with Ledger.open(state) as ledger:  # the next start: reconciles rows of dead owners
        conn = ledger.conn
        calls = conn.execute("SELECT COUNT(*) FROM calls").fetchone()[0]
        left = conn.execute(
            "SELECT COUNT(*) FROM calls WHERE status IN ('pending', 'submitted')"
        ).fetchone()[0]
        running = conn.execute("SELECT COUNT(*) FROM runs WHERE status = 'running'").fetchone()[0]
        bad_aborted = conn.execute(
            "SELECT COUNT(*) FROM calls WHERE status = 'aborted'"
            " AND cost_micro_usd IS NOT reserved_micro_usd"
        ).fetchone()[0]
        aborted = conn.execute(
            "SELECT COUNT(*) FROM calls WHERE error_type = 'abandoned'"
        ).fetchone()[0]
        bad_cost = conn.execute(
            "SELECT COUNT(*) FROM runs WHERE status NOT IN ('running') AND cost_micro_usd IS NOT"
            f" (SELECT COALESCE(SUM({EFFECTIVE_COST_SQL}), 0) FROM calls"
            " WHERE calls.run_id = runs.id)"
        ).fetchone()[0]
        statuses = dict(conn.execute("SELECT status, COUNT(*) FROM calls GROUP BY status"))
        run_statuses = dict(conn.execute("SELECT status, COUNT(*) FROM runs GROUP BY status"))
        missing = [
            r
            for r in completed_runs
            if conn.execute("SELECT status FROM runs WHERE id = ?", (r,)).fetchone() != ("ok",)
        ]
    if calls < server_requests:
        problems.append(f"lost rows: {calls} calls rows < {server_requests} server requests")
    if missing:
        problems.append(f"completed runs missing or not ok: {missing[:10]}")
    if left or running:
        problems.append(f"after the next start: {left} unsettled calls, {running} running runs")
    if bad_aborted:
        problems.append(f"{bad_aborted} aborted calls not charged their reservation")
    if bad_cost:
        problems.append(f"{bad_cost} runs whose cost is not the sum of their calls")
    return {
        "integrity_check": integrity,
        "calls_rows": calls,
        "server_requests": server_requests,
        "pending_before_final_start": sum(n for _, n in pending_before),
        "pending_owner_pids": sorted(_pid_of_owner(o) for o, _ in pending_before if o),
        "running_runs_before_final_start": running_before,
        "reconciled_as_abandoned_total": aborted,
        "call_statuses": statuses,
        "run_statuses": run_statuses,
        "completed_once_runs": len(completed_runs),
        "problems": problems,
    }


def _printed_run_id(out: str | None) -> int | None:
    """The run id `agentd once --json` printed, or None if it was killed before printing."""
    try:
        data = json.loads(out or "")
    except ValueError:
        return None
    run_id = data.get("run_id") if isinstance(data, dict) else None
    return int(run_id) if isinstance(run_id, int) else None


def _opened_ledger(state: Path, pid: int) -> bool:
    """Whether process `pid` got as far as owning a row (so its open had reconciled)."""
    with sqlite3.connect(state / "ledger.db") as conn:
        like = f"%:{pid}:%"
        return bool(
            conn.execute("SELECT 1 FROM calls WHERE owner LIKE ? LIMIT 1", (like,)).fetchone()
            or conn.execute("SELECT 1 FROM runs WHERE owner LIKE ? LIMIT 1", (like,)).fetchone()
        )


def soak(kills: int, seed: int, latency_ms: float, max_delay_s: float) -> dict[str, Any]:
    rng = random.Random(seed)
    loops = {
        name: {
            "every": "1s",
            "tier": "fast",
            "max_tokens": 64,
            "prompt": "work.md",
            "budget": {"per_day_usd": 100},
        }
        for name in ("work", "work2", "work3")
    }
    completed: list[int] = []
    kinds = {
        "once": 0,
        "run": 0,
        "mid-call": 0,
        "random": 0,
        "finished": 0,
        "printed_then_killed": 0,
    }
    killed_pids: list[int] = []
    with (
        tempfile.TemporaryDirectory(prefix="agentd-crash-") as tmp,
        ServerProcess(latency_ms=latency_ms, seed=seed) as server,
    ):
        data = config_dict(
            server.url,
            loops,
            timeout_s=5,
            extra={"daemon": {"shutdown_grace_s": 1, "misfire_grace_s": 5}},
        )
        config = write_config(Path(tmp) / "conf", data)
        state = Path(tmp) / "state"
        env = agentd_env()
        started = time.monotonic()
        for i in range(kills):
            mode = "once" if i % 2 == 0 else "run"
            kinds[mode] += 1
            cmd = [AGENTD, "--config", str(config), "--state-dir", str(state)]
            cmd += ["once", "work", "--json"] if mode == "once" else ["run"]
            before = server.stats()["requests"]
            proc = subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
            )
            if rng.random() < 0.5:
                kinds["mid-call"] += 1
                deadline = time.monotonic() + 20
                while server.stats()["requests"] == before and proc.poll() is None:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.005)
                time.sleep(rng.uniform(0, latency_ms / 1000))
            else:
                kinds["random"] += 1
                time.sleep(rng.uniform(0, max_delay_s))
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                killed_pids.append(proc.pid)
            out, _ = proc.communicate(timeout=30)
            run_id = _printed_run_id(out) if mode == "once" else None
            if run_id is not None:
                # It printed its result, so the run is over: killed or not, it must be in the
                # ledger, ok (a kill during interpreter exit must not lose it).
                kinds["finished" if proc.returncode == 0 else "printed_then_killed"] += 1
                completed.append(run_id)
        elapsed = time.monotonic() - started
        requests = server.stats()["requests"]
        result = _check(state, requests, completed)
        # Pending rows before the final start may only belong to processes killed after the
        # last one that opened the ledger (its open reconciled everyone dead before it).
        last_opener = max(
            (i for i, pid in enumerate(killed_pids) if _opened_ledger(state, pid)), default=-1
        )
        allowed = set(killed_pids[last_opener:]) if last_opener >= 0 else set(killed_pids)
        stray = [p for p in result["pending_owner_pids"] if p not in allowed]
        if stray:
            result["problems"].append(f"pending rows of earlier dead processes: {stray}")
    result.update(kills=kills, kinds=kinds, seconds=round(elapsed, 1), killed=len(killed_pids))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--seed", type=int, default=9)
    parser.add_argument("--latency-ms", type=float, default=300.0)
    parser.add_argument(
        "--max-delay-s", type=float, default=2.5, help="random kills land 0..this after the start"
    )
    parser.add_argument("--smoke", action="store_true", help="5 kills (CI)")
    parser.add_argument("--json", help="write results as JSON to this path")
    args = parser.parse_args(argv)
    if args.smoke:
        args.kills, args.max_delay_s = 5, 1.0
    print_machine()
    result = soak(args.kills, args.seed, args.latency_ms, args.max_delay_s)
    print("# crash soak")
    print("| check | result |\n|---|---|")
    for key, value in result.items():
        if key != "problems":
            print(f"| {key} | {value} |")
    print(f"| problems | {result['problems'] or 'none'} |")
    emit_json(args.json, {"benchmark": "crash", **result})
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
