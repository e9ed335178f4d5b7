"""Scale: 1,000 loops in `agentd run --simulate` — RSS, CPU idle and under load, fire-time drift.

A generated config in a temp dir: `--loops` loops (default 1,000) sharing one prompt file,
simulated (no provider is called; keys are not needed). The daemon runs as under systemd:
`NOTIFY_SOCKET` points at a datagram socket this script drains, so the STATUS= line the daemon
sends after runs is part of what is measured. Phases, each a fresh daemon:

  idle  the loops are scheduled `every: 1d` — each fires once a day at its own phase, so a
        2-minute window sees one or two runs: the daemon's own cost (scheduler timers,
        checkpoints) — `--idle-minutes`
  load  the loops are scheduled `every: 60s` (≈ 16.7 runs/s): RSS and CPU sampled every second
        for `--minutes`; CPU as the window average, the median 1-s sample and the busiest one
  herd  (`--herd-minutes`) the same loops as `cron: "* * * * *"`: cron loops are exact, so all
        of them share one slot each minute — the burst `every:` loops used to make before they
        were phased; it measures the daemon's cost per run under a burst

Drift, for every scheduled run: lateness = `started_at − slot` (the runs row is written when
the run starts, after its context is gathered). Reported: p50/p99/max over the window; p99 per
minute of the window; the least-squares slope of lateness after the first minute (ms per
minute: does it grow?); and slots off each loop's grid (`every:` loops: epoch + phase +
k·interval; cron: second :00) — the nominal schedule itself must not drift. Missed runs: slots
of the window (after start-up, up to 5 s before the stop) without a run.
Goals (issue 9): RSS ≤ 120 MB, idle CPU ≤ 0.5 %, no drift.
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

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

_STOP_MARGIN_S = 5.0  # slots this close to the stop may not have started yet: not counted


def _config(loops: int, schedule: dict[str, str]) -> dict[str, Any]:
    specs = {
        f"loop{i:04d}": {**schedule, "tier": "fast", "max_tokens": 128, "prompt": "work.md"}
        for i in range(loops)
    }
    # The providers are never called in --simulate; the URL points nowhere on purpose.
    return config_dict("http://127.0.0.1:9", specs, extra={"daemon": {"misfire_grace_s": 60}})


class _NotifySink:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET; counts what arrives."""

    def __init__(self, directory: Path) -> None:
        self.path = str(directory / "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.counts: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            for line in data.decode(errors="replace").splitlines():
                self.counts[line.split("=", 1)[0]] += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


def _phase(tmp: Path, loops: int, label: str, schedule: dict[str, str], minutes: float) -> Any:
    """Run one daemon for `minutes`, sampling it every second; returns samples and drift."""
    directory = tmp / label
    directory.mkdir(parents=True)
    config = write_config(directory / "conf", _config(loops, schedule), "Heartbeat. Reply HB_OK.")
    state = directory / "state"
    log_path = directory / "daemon.log"
    sink = _NotifySink(directory)
    log = log_path.open("w")
    t_start = time.monotonic()
    proc = subprocess.Popen(
        [AGENTD, "--config", str(config), "--state-dir", str(state), "run", "--simulate"],
        env=agentd_env(NOTIFY_SOCKET=sink.path),
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    samples: list[tuple[float, int, float]] = []
    load_before = os.getloadavg()[0]  # the machine is shared: how busy it was
    try:
        # Start-up: wait until the daemon has logged daemon.started (all jobs scheduled).
        deadline = time.monotonic() + 120
        while b"daemon.started" not in log_path.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daemon did not start: {log_path.read_text()[-2000:]}")
            time.sleep(0.1)
        startup_s = time.monotonic() - t_start
        wall_ready = time.time()
        t0 = time.monotonic()
        next_t = t0
        while time.monotonic() - t0 < minutes * 60 and proc.poll() is None:
            rss, cpu = proc_rss_kb(proc.pid), proc_cpu_s(proc.pid)
            if rss is not None and cpu is not None:
                samples.append((time.monotonic() - t0, rss, cpu))
            next_t += 1.0
            time.sleep(max(0.0, next_t - time.monotonic()))
        wall_stop = time.time()
        crashed = proc.poll()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        sink.close()
    cpu_1s = [(b[2] - a[2]) / (b[0] - a[0]) * 100 for a, b in itertools.pairwise(samples)]
    rss_mb = [s[1] / 1024 for s in samples]
    cpu_s = samples[-1][2] - samples[0][2] if len(samples) > 1 else 0.0
    out: dict[str, Any] = {
        "schedule": schedule,
        "minutes": minutes,
        "startup_s": round(startup_s, 2),
        "exit_code": code,
        "crashed": crashed,
        "rss_mb_p50_max": (round(percentile(rss_mb, 50), 1), round(max(rss_mb, default=0), 1)),
        "rss_mb_first_last": (
            round(rss_mb[0], 1) if rss_mb else None,
            round(rss_mb[-1], 1) if rss_mb else None,
        ),
        "rss_mb_p50_first_last_third": _thirds(rss_mb),
        "cpu_s": round(cpu_s, 2),
        "cpu_pct_avg": round(cpu_s / (samples[-1][0] - samples[0][0]) * 100, 3)
        if len(samples) > 1
        else None,
        "cpu_pct_1s_p50": round(percentile(cpu_1s, 50), 2),
        "cpu_pct_1s_max": round(max(cpu_1s, default=0), 1),
        "notify": dict(sink.counts),
        "loadavg_1m_start_end": (round(load_before, 2), round(os.getloadavg()[0], 2)),
    }
    every_s = _seconds(schedule["every"]) if "every" in schedule else None
    out.update(_drift(state / "ledger.db", loops, every_s, wall_ready, wall_stop))
    if out.get("runs_while_sampled"):
        out["cpu_ms_per_run"] = round(cpu_s * 1000 / out["runs_while_sampled"], 2)
    return out


def _thirds(values: list[float]) -> tuple[float, float] | None:
    """Median of the first and of the last third: flat memory has them close."""
    third = len(values) // 3
    if third == 0:
        return None
    return round(percentile(values[:third], 50), 1), round(percentile(values[-third:], 50), 1)


def _seconds(every: str) -> int:
    from agentd.confignumbers import parse_duration

    return int(parse_duration(every))


def _ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _expected_slots(name: str, every_s: int | None, lo: int, hi: float) -> int:
    """How many slots of a loop fall in (lo, hi]: its phased grid, or each minute for cron."""
    if every_s is None:
        every_s, phase = 60, 0  # `cron: "* * * * *"`
    else:
        from agentd.scheduling import phase_s

        phase = phase_s(name, every_s)
    first = lo + 1 + (phase - lo - 1) % every_s  # the first grid point after lo
    return 0 if first > hi else int((hi - first) // every_s) + 1


def _drift(
    db: Path, loops: int, every_s: int | None, wall_ready: float, wall_stop: float
) -> dict[str, Any]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT loop, slot, started_at FROM runs WHERE trigger = 'schedule'"
            " AND slot IS NOT NULL ORDER BY slot"
        ).fetchall()
        statuses = dict(conn.execute("SELECT status, COUNT(*) FROM runs GROUP BY status"))
        calls = conn.execute("SELECT COUNT(*) FROM calls").fetchone()[0]
    out: dict[str, Any] = {"scheduled_runs": len(rows), "run_statuses": statuses, "calls": calls}
    if not rows:
        return out
    # The runs the CPU samples (ready → stop) paid for, for CPU per run.
    out["runs_while_sampled"] = sum(1 for _, _, st in rows if wall_ready <= _ts(st) <= wall_stop)
    lo, hi = int(wall_ready), wall_stop - _STOP_MARGIN_S
    runs = [(loop, _ts(slot), _ts(started) - _ts(slot)) for loop, slot, started in rows]
    counted = [r for r in runs if lo < r[1] <= hi]
    names = [f"loop{i:04d}" for i in range(loops)]
    expected = sum(_expected_slots(n, every_s, lo, hi) for n in names)
    late = [d for _, _, d in counted]
    per_second = Counter(int(s) for _, s, _ in counted)
    by_minute: dict[int, list[float]] = defaultdict(list)
    for _, slot, d in counted:
        by_minute[int((slot - lo) // 60)].append(d)
    p99_by_minute = [round(percentile(by_minute[m], 99) * 1000, 1) for m in sorted(by_minute)]
    out.update(
        {
            "window_runs": len(counted),
            "expected_runs": expected,
            "missed_runs": expected - len(counted),
            "distinct_slot_seconds": len(per_second),
            "max_runs_per_slot_second": max(per_second.values()),
            "lateness_ms_p50_p99_max": tuple(
                round(v * 1000, 1)
                for v in (percentile(late, 50), percentile(late, 99), max(late, default=0))
            ),
            "lateness_ms_p99_by_minute": p99_by_minute,
            # After the first minute: the first runs import the provider and pricing modules.
            "lateness_slope_ms_per_min_after_1st": round(
                _slope([r for r in counted if r[1] > lo + 60]) * 1000 * 60, 3
            ),
            "slots_off_grid": _off_grid(runs, every_s),
        }
    )
    return out


def _slope(runs: list[tuple[str, float, float]]) -> float:
    """Least-squares slope of lateness (s) against slot time (s): > 0 means it grows."""
    if len(runs) < 2:
        return 0.0
    xs = [r[1] for r in runs]
    ys = [r[2] for r in runs]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return 0.0 if var == 0 else sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var


def _off_grid(runs: list[tuple[str, float, float]], every_s: int | None) -> int:
    """Runs whose slot is not on the loop's grid (epoch + phase + k·interval; cron: :00)."""
    from agentd.scheduling import phase_s

    step = every_s or 60
    bad = 0
    for loop, slot, _ in runs:
        phase = 0 if every_s is None else phase_s(loop, every_s)
        if slot != int(slot) or int(slot) % step != phase:
            bad += 1
    return bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loops", type=int, default=1000)
    parser.add_argument("--minutes", type=float, default=10.0, help="load phase window")
    parser.add_argument("--idle-minutes", type=float, default=2.0)
    parser.add_argument("--herd-minutes", type=float, default=0.0, help="cron burst phase")
    parser.add_argument("--every", default="60s", help="load phase schedule")
    parser.add_argument("--smoke", action="store_true", help="50 loops every 3s, ~20 s (CI)")
    parser.add_argument("--json", help="write results as JSON to this path")
    args = parser.parse_args(argv)
    if args.smoke:
        args.loops, args.minutes, args.idle_minutes, args.every = 50, 0.2, 0.02, "3s"
        args.herd_minutes = 0.0
    print_machine()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="agentd-scale-") as tmp:
        if args.idle_minutes > 0:
            results["idle"] = _phase(
                Path(tmp), args.loops, "idle", {"every": "1d"}, args.idle_minutes
            )
        results["load"] = _phase(Path(tmp), args.loops, "load", {"every": args.every}, args.minutes)
        if args.herd_minutes > 0:
            results["herd"] = _phase(
                Path(tmp), args.loops, "herd", {"cron": "* * * * *"}, args.herd_minutes
            )
    print(
        f"# scale: {args.loops} loops, --simulate; idle {args.idle_minutes:g} min "
        f"(every: 1d), load {args.minutes:g} min (every: {args.every}), "
        f"herd {args.herd_minutes:g} min (cron: * * * * *)"
    )
    print("| phase | metric | value |\n|---|---|---|")
    for phase, res in results.items():
        for key, value in res.items():
            print(f"| {phase} | {key} | {value} |")
    emit_json(args.json, {"benchmark": "scale", "loops": args.loops, **results})
    bad = [r for r in results.values() if r["crashed"] is not None or r["exit_code"] != 0]
    load = results["load"]
    if load.get("slots_off_grid") or load.get("missed_runs", 0) > 0:
        print(
            f"# note: load phase: {load.get('slots_off_grid')} slots off grid, "
            f"{load.get('missed_runs')} missed runs"
        )
        bad.append(load)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
