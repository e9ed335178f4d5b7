"""Fault soak: `agentd run` for N minutes against both providers with 30 % injected faults.

`fastserver.py` answers Anthropic and OpenAI; `--fault-rate` of the requests get one of
429/500/503/529/400/404, a slow answer (after 2 s, past the 1 s client timeout), a dropped
connection, a non-JSON 200 or a 200 without usage. `--loops` loops run `every: 2s`, half on a
tier that starts on Anthropic, half on one that starts on OpenAI (each falls back to the
other), with one retry and short breaker cooldowns so faults exercise every path.

Sampled every few seconds: the daemon's RSS and CPU. After SIGTERM (the daemon drains and
exits), checked on the ledger without reconciling anything:
  * no run stuck: no `running` run; longest run; every loop kept firing (none ended paused);
  * no reservation leaked: no `pending`/`submitted` call;
  * ledger rows = server requests, minus attempts whose connection was never established
    (`connection_error` rows charged nothing: the server cannot count them);
  * memory flat: RSS of the last third of the window vs the first third (after warm-up).
"""

from __future__ import annotations

import argparse
import collections
import json
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
    ANTHROPIC_MODEL,
    OPENAI_MODEL,
    agentd_env,
    config_dict,
    emit_json,
    percentile,
    print_machine,
    proc_cpu_s,
    proc_rss_kb,
    proc_rss_parts_kb,
    write_config,
)
from fastserver import ServerProcess


def _config(url: str, loops: int, every: str) -> dict[str, Any]:
    specs = {
        f"loop{i:02d}": {
            "every": every,
            "tier": "fast" if i % 2 == 0 else "fast_oa",
            "max_tokens": 64,
            "prompt": "work.md",
            "budget": {"per_day_usd": 100},
            # The anomaly breaker pauses a loop whose ok run costs > 5× its median, which a
            # run that retried past a timeout (settled at its reservation) does: with it on,
            # every loop ends paused within minutes and the soak stops exercising faults.
            "anomaly": {"enabled": False},
        }
        for i in range(loops)
    }
    return config_dict(
        url,
        specs,
        budgets={"per_day_usd": 1000},
        timeout_s=1,
        max_retries=1,
        breaker={"failures": 4, "cooldowns_s": [1, 2, 5]},
        extra={
            "tiers": {"fast": ["haiku", "gpt-mini"], "fast_oa": ["gpt-mini", "haiku"]},
            "daemon": {"shutdown_grace_s": 10, "misfire_grace_s": 30, "wal_checkpoint_s": 30},
        },
    )


def _by_minute(samples: list[tuple[float, int, float]]) -> list[float]:
    """Median RSS (MB) of each minute of the window: a leak climbs, warm-up levels off."""
    minutes: dict[int, list[float]] = collections.defaultdict(list)
    for t, rss, _ in samples:
        minutes[int(t // 60)].append(rss / 1024)
    return [round(percentile(minutes[m], 50), 1) for m in sorted(minutes)]


def soak(
    minutes: float, loops: int, fault_rate: float, every: str, sample_s: float
) -> dict[str, Any]:
    samples: list[tuple[float, int, float]] = []
    parts: list[tuple[float, int, float]] = []  # (t, anon KiB, file + shmem KiB)
    with (
        tempfile.TemporaryDirectory(prefix="agentd-faults-") as tmp,
        ServerProcess(fault_rate=fault_rate, slow_s=2.0, seed=7) as server,
    ):
        config = write_config(Path(tmp) / "conf", _config(server.url, loops, every))
        state = Path(tmp) / "state"
        log_path = Path(tmp) / "daemon.log"
        with log_path.open("w") as log:
            proc = subprocess.Popen(
                [AGENTD, "--config", str(config), "--state-dir", str(state), "run"],
                env=agentd_env(),
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
            t0 = time.monotonic()
            end = t0 + minutes * 60
            try:
                while time.monotonic() < end and proc.poll() is None:
                    rss, cpu = proc_rss_kb(proc.pid), proc_cpu_s(proc.pid)
                    if rss and cpu is not None:  # 0 while the process is still exec-ing
                        samples.append((time.monotonic() - t0, rss, cpu))
                        kinds = proc_rss_parts_kb(proc.pid)
                        if kinds:
                            parts.append(
                                (samples[-1][0], kinds["anon"], kinds["file"] + kinds["shmem"])
                            )
                    time.sleep(sample_s)
                crashed = proc.poll()
                proc.send_signal(signal.SIGTERM)
                stop_t = time.monotonic()
                code = proc.wait(timeout=60)
                stop_s = time.monotonic() - stop_t
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        stats = server.stats()
        log_lines = log_path.read_text().splitlines()
        events: collections.Counter[str] = collections.Counter()
        for line in log_lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            name = str(event.get("event"))
            if name == "loop.skipped":
                name += f" ({event.get('reason', '?')})"
            events[name] += 1
        with sqlite3.connect(state / "ledger.db") as conn:
            q = lambda sql: conn.execute(sql).fetchone()[0]  # noqa: E731
            calls = q("SELECT COUNT(*) FROM calls")
            never_sent = q(
                "SELECT COUNT(*) FROM calls WHERE error_type = 'connection_error'"
                " AND COALESCE(cost_micro_usd, 0) = 0"
            )
            pending = q("SELECT COUNT(*) FROM calls WHERE status IN ('pending', 'submitted')")
            running = q("SELECT COUNT(*) FROM runs WHERE status = 'running'")
            longest = q(
                "SELECT MAX((julianday(finished_at) - julianday(started_at)) * 86400) FROM runs"
            )
            per_loop = [r[0] for r in conn.execute("SELECT COUNT(*) FROM runs GROUP BY loop")]
            run_status = dict(conn.execute("SELECT status, COUNT(*) FROM runs GROUP BY status"))
            call_errors = dict(
                conn.execute("SELECT COALESCE(error_type, status), COUNT(*) FROM calls GROUP BY 1")
            )
            integrity = q("PRAGMA integrity_check")
            paused = [r[0] for r in conn.execute("SELECT loop FROM loop_state WHERE paused = 1")]
    problems: list[str] = []
    if crashed is not None:
        problems.append(f"daemon exited on its own with {crashed}")
    if code != 0:
        problems.append(f"daemon exit code after SIGTERM: {code}")
    if pending:
        problems.append(f"{pending} reservations left pending")
    if running:
        problems.append(f"{running} runs left running")
    if calls - never_sent != stats["requests"]:
        problems.append(
            f"ledger rows {calls} - never-sent {never_sent} != server requests {stats['requests']}"
        )
    if integrity != "ok":
        problems.append(f"integrity_check: {integrity}")
    if paused:
        problems.append(f"loops paused at the end (no longer exercised): {paused}")
    if len(per_loop) < loops or min(per_loop) == 0:
        problems.append(f"some loop never ran: {len(per_loop)} loops with runs")
    rss_mb = [s[1] / 1024 for s in samples]
    third = max(1, len(samples) // 3)
    warm = samples[third:]  # the first third is warm-up (imports, first clients, caches)
    first = [s[1] / 1024 for s in warm[: max(1, len(warm) // 2)]]
    last = [s[1] / 1024 for s in samples[-third:]]
    cpu_pct = 0.0
    if len(samples) > 1:
        cpu_pct = (samples[-1][2] - samples[0][2]) / (samples[-1][0] - samples[0][0]) * 100
    return {
        "minutes": minutes,
        "loops": loops,
        "every": every,
        "fault_rate": fault_rate,
        "server_requests": stats["requests"],
        "server_answers": dict(stats["by_step"]),
        "server_by_model": {
            m: stats["by_model"].get(m, 0) for m in (ANTHROPIC_MODEL, OPENAI_MODEL)
        },
        "ledger_calls": calls,
        "never_connected": never_sent,
        "pending_after_stop": pending,
        "running_after_stop": running,
        "runs": run_status,
        "runs_per_loop_min_max": (min(per_loop, default=0), max(per_loop, default=0)),
        "paused_loops_at_end": len(paused),
        "longest_run_s": round(longest or 0, 2),
        "call_outcomes": call_errors,
        "stop_s": round(stop_s, 2),
        "rss_mb_start_p50_end": (
            round(rss_mb[0], 1) if rss_mb else None,
            round(percentile(rss_mb, 50), 1),
            round(rss_mb[-1], 1) if rss_mb else None,
        ),
        "rss_growth_mb_after_warmup": round(percentile(last, 50) - percentile(first, 50), 2),
        "rss_mb_p50_by_minute": _by_minute(samples),
        # The heap alone: mapped files (libraries, SQLite's -shm index) are page cache.
        "rss_anon_mb_p50_by_minute": _by_minute([(t, a, 0.0) for t, a, _ in parts]),
        "rss_file_shmem_mb_p50_by_minute": _by_minute([(t, int(f), 0.0) for t, _, f in parts]),
        "cpu_pct_avg": round(cpu_pct, 2),
        "log_events": dict(events.most_common(12)),
        "problems": problems,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--loops", type=int, default=20)
    parser.add_argument("--every", default="2s")
    parser.add_argument("--fault-rate", type=float, default=0.3)
    parser.add_argument("--sample-s", type=float, default=5.0)
    parser.add_argument("--smoke", action="store_true", help="20 s (CI)")
    parser.add_argument("--json", help="write results as JSON to this path")
    args = parser.parse_args(argv)
    if args.smoke:
        args.minutes, args.loops, args.sample_s = 20 / 60, 6, 1.0
    print_machine()
    result = soak(args.minutes, args.loops, args.fault_rate, args.every, args.sample_s)
    print(
        f"# fault soak: {args.minutes:g} min, {args.loops} loops every {args.every}, "
        f"{args.fault_rate:.0%} faults"
    )
    print("| check | result |\n|---|---|")
    for key, value in result.items():
        if key != "problems":
            print(f"| {key} | {value} |")
    print(f"| problems | {result['problems'] or 'none'} |")
    emit_json(args.json, {"benchmark": "faults", **result})
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
