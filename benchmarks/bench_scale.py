"""Scale: 1,000 loops in `agentd run --simulate` — RSS, CPU idle and under load, fire-time drift.

A generated config in a temp dir: `--loops` loops (default 1,000) sharing one prompt file,
simulated (no provider is called; keys are not needed). Two phases, each a fresh daemon:

  idle  the loops are scheduled `every: 1d`, so nothing fires in the window: the daemon's
        own cost (scheduler timers, checkpoints) — `--idle-minutes`
  load  the loops are scheduled `every: 60s` (≈ 16.7 runs/s): RSS and CPU sampled every
        second for `--minutes`; CPU reported as the window average, the median 1-s sample
        (between bursts) and the busiest 1-s sample

Fire-time drift (load phase): for every scheduled run, `started_at − slot` from the ledger,
p50/p99/max overall and in the first and the last minute (drift that grows over time would
show there), and the slots that never ran (expected = loops × slots in the window).
Goals (issue 9): RSS ≤ 120 MB, idle CPU ≤ 0.5 %, no drift.
"""

from __future__ import annotations

import argparse
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import itertools

from _common import (
    AGENTD,
    agentd_env,
    config_dict,
    emit_json,
    percentile,
    print_machine,
    proc_cpu_s,
    proc_rss_kb,
    write_config,
)


def _config(loops: int, every: str) -> dict[str, Any]:
    specs = {
        f"loop{i:04d}": {"every": every, "tier": "fast", "max_tokens": 128, "prompt": "work.md"}
        for i in range(loops)
    }
    # The providers are never called in --simulate; the URL points nowhere on purpose.
    return config_dict("http://127.0.0.1:9", specs, extra={"daemon": {"misfire_grace_s": 60}})


def _phase(tmp: Path, loops: int, every: str, minutes: float) -> dict[str, Any]:
    """Run one daemon for `minutes`, sampling it every second; returns samples and drift."""
    directory = tmp / f"every-{every}"
    config = write_config(directory / "conf", _config(loops, every), "Heartbeat. Reply HB_OK.")
    state = directory / "state"
    log = (directory / "daemon.log").open("w")
    t_start = time.monotonic()
    proc = subprocess.Popen(
        [AGENTD, "--config", str(config), "--state-dir", str(state), "run", "--simulate"],
        env=agentd_env(),
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    samples: list[tuple[float, int, float]] = []
    try:
        # Start-up: wait until the daemon has logged daemon.started (all jobs scheduled).
        log_path = directory / "daemon.log"
        deadline = time.monotonic() + 120
        while b"daemon.started" not in log_path.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daemon did not start: {log_path.read_text()[-2000:]}")
            time.sleep(0.1)
        startup_s = time.monotonic() - t_start
        t0 = time.monotonic()
        next_t = t0
        while time.monotonic() - t0 < minutes * 60 and proc.poll() is None:
            rss, cpu = proc_rss_kb(proc.pid), proc_cpu_s(proc.pid)
            if rss is not None and cpu is not None:
                samples.append((time.monotonic() - t0, rss, cpu))
            next_t += 1.0
            time.sleep(max(0.0, next_t - time.monotonic()))
        crashed = proc.poll()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    cpu_1s = [(b[2] - a[2]) / (b[0] - a[0]) * 100 for a, b in itertools.pairwise(samples)]
    rss_mb = [s[1] / 1024 for s in samples]
    out: dict[str, Any] = {
        "every": every,
        "minutes": minutes,
        "startup_s": round(startup_s, 2),
        "exit_code": code,
        "crashed": crashed,
        "rss_mb_p50_max": (round(percentile(rss_mb, 50), 1), round(max(rss_mb, default=0), 1)),
        "rss_mb_first_last": (
            round(rss_mb[0], 1) if rss_mb else None,
            round(rss_mb[-1], 1) if rss_mb else None,
        ),
        "cpu_pct_avg": round(
            (samples[-1][2] - samples[0][2]) / (samples[-1][0] - samples[0][0]) * 100, 3
        )
        if len(samples) > 1
        else None,
        "cpu_pct_1s_p50": round(percentile(cpu_1s, 50), 2),
        "cpu_pct_1s_max": round(max(cpu_1s, default=0), 1),
    }
    out.update(_drift(state / "ledger.db", loops, samples, t0, every))
    return out


def _drift(db: Path, loops: int, samples: list[Any], t0: float, every: str) -> dict[str, Any]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT slot, started_at, status FROM runs WHERE trigger = 'schedule'"
            " AND slot IS NOT NULL ORDER BY slot"
        ).fetchall()
        statuses = dict(conn.execute("SELECT status, COUNT(*) FROM runs GROUP BY status"))
        calls = conn.execute("SELECT COUNT(*) FROM calls").fetchone()[0]
    if not rows:
        return {"scheduled_runs": 0, "run_statuses": statuses, "calls": calls}

    def ts(text: str) -> float:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()

    drift = [(ts(s), ts(st) - ts(s)) for s, st, _ in rows]
    values = [d for _, d in drift]
    slots = sorted({s for s, _ in drift})
    first_slot, last_slot = slots[0], slots[-1]
    first = [d for s, d in drift if s < first_slot + 60]
    last = [d for s, d in drift if s > last_slot - 60]
    expected = loops * len(slots)
    return {
        "scheduled_runs": len(rows),
        "slots": len(slots),
        "missed_runs": expected - len(rows),
        "run_statuses": statuses,
        "calls": calls,
        "drift_ms_p50_p99_max": tuple(
            round(v * 1000, 1)
            for v in (percentile(values, 50), percentile(values, 99), max(values))
        ),
        "drift_ms_p99_first_min": round(percentile(first, 99) * 1000, 1),
        "drift_ms_p99_last_min": round(percentile(last, 99) * 1000, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loops", type=int, default=1000)
    parser.add_argument("--minutes", type=float, default=10.0, help="load phase window")
    parser.add_argument("--idle-minutes", type=float, default=2.0)
    parser.add_argument("--every", default="60s", help="load phase schedule")
    parser.add_argument("--smoke", action="store_true", help="50 loops every 3s, ~12 s (CI)")
    parser.add_argument("--json", help="write results as JSON to this path")
    args = parser.parse_args(argv)
    if args.smoke:
        args.loops, args.minutes, args.idle_minutes, args.every = 50, 0.12, 0.02, "3s"
    print_machine()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="agentd-scale-") as tmp:
        if args.idle_minutes > 0:
            results["idle"] = _phase(Path(tmp), args.loops, "1d", args.idle_minutes)
        results["load"] = _phase(Path(tmp), args.loops, args.every, args.minutes)
    print(
        f"# scale: {args.loops} loops, --simulate; idle {args.idle_minutes:g} min "
        f"(every: 1d), load {args.minutes:g} min (every: {args.every})"
    )
    print("| phase | metric | value |\n|---|---|---|")
    for phase, res in results.items():
        for key, value in res.items():
            print(f"| {phase} | {key} | {value} |")
    emit_json(args.json, {"benchmark": "scale", "loops": args.loops, **results})
    bad = [r for r in results.values() if r["crashed"] is not None or r["exit_code"] != 0]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
