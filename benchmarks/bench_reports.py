"""Reports: `agentd ledger` and the other read commands over a 1,000,000-row ledger, end to end.

The ledger is generated once into a temp dir by `tests/ledgergen.py` (runs and calls with a
daemon-like mix, spread over the last `--days` days up to now) or, if that module is not
there, by a simpler generator here (`--state-dir` reuses one). A report caches the closed hours
its range reads (`spendcache`, a one-time cost per hour), so the first reports are timed once
on their own: the default one (the last day) and one over the whole ledger (the rest). Each
command is then timed as a fresh process (hyperfine when installed, else a subprocess loop),
the way an operator runs it: a real config file (timezone, state_dir) and no `--state-dir`;
the default `--since 24h`, the whole ledger (`--since` the first row's day) by loop and by
day, and `--json`; `ledger calls` (the latest 20, and what failed in the last day); the HTML
page (`report --html`, its default 30 days); `reprice --all-tier deep` and `budget` (with the
shipped config: they need a full one). The query alone (`spend.spend_report` in-process,
ledger opened once, no start-up) is timed too, to split start-up from SQL.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    AGENTD,
    REPO,
    agentd_env,
    emit_json,
    fmt_mmm,
    print_machine,
    run_quiet,
    time_commands,
)


def generate(state: Path, calls: int, days: int) -> str:
    """Write about `calls` call rows ending now; returns which generator was used."""
    end = datetime.now(UTC)
    sys.path.insert(0, str(REPO / "tests"))
    try:
        from ledgergen import generate_ledger  # another engineer's generator, if present
    except ImportError:
        _simple_generate(state, calls, days, end)
        return "benchmarks/bench_reports.py (fallback)"
    generate_ledger(state, calls, days=days, end=end)
    return "tests/ledgergen.py"


def _simple_generate(state: Path, calls: int, days: int, end: datetime) -> None:
    """A plain generator: one call per run, six loops, evenly spread, a few errors."""
    from agentd.ledger import Ledger, utc_iso

    loops = ("heartbeat", "triage", "research", "digest", "review", "planning")
    models = (("haiku", "anthropic", "claude-haiku-4-5"), ("gpt-mini", "openai", "gpt-4o-mini"))
    step = timedelta(days=days) / calls
    start = end - timedelta(days=days)
    with Ledger.open(state) as ledger:
        for base in range(0, calls, 50_000):
            chunk = range(base, min(calls, base + 50_000))
            runs = []
            rows = []
            for i in chunk:
                at = utc_iso(start + step * i)
                alias, provider, model = models[i % 2]
                status = "error" if i % 29 == 0 else "ok"
                runs.append((i + 1, loops[i % 6], at, at, "ok" if status == "ok" else "failed"))
                rows.append((i + 1, i + 1, loops[i % 6], alias, provider, model, status, at, at))
            with ledger.write() as conn:
                conn.executemany(
                    "INSERT INTO runs (id, loop, trigger, started_at, finished_at, status,"
                    " fallback, simulated, cost_micro_usd) VALUES (?, ?, 'schedule', ?, ?, ?,"
                    " 0, 0, 700)",
                    runs,
                )
                conn.executemany(
                    "INSERT INTO calls (id, run_id, loop, purpose, tier, alias, provider, model,"
                    " attempt, status, input_tokens, output_tokens, reserved_micro_usd,"
                    " cost_micro_usd, priced, simulated, batch, started_at, finished_at)"
                    " VALUES (?, ?, ?, 'work', 'fast', ?, ?, ?, 1, ?, 300, 80, 2000, 700, 1, 0,"
                    " 0, ?, ?)",
                    rows,
                )


def _query_only(state: Path, since: datetime, by: str, n: int) -> list[float]:
    """ms of `spend.spend_report` alone (the report rows, ledger opened once), n times."""
    from agentd.ledger import Ledger
    from agentd.spend import spend_report

    out = []
    with Ledger.open(state, create=False) as ledger:
        for _ in range(n):
            t0 = time.perf_counter()
            spend_report(ledger, by=by, since=since)  # type: ignore[arg-type]
            out.append((time.perf_counter() - t0) * 1000)
    return out


def _first_run(command: list[str], env: dict[str, str], what: str) -> float:
    """Run a report once (it caches the hours it reads); print and return its wall ms."""
    t0 = time.perf_counter()
    done = run_quiet(command, env=env)
    ms = (time.perf_counter() - t0) * 1000
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[1:])} failed: {done.stderr[-2000:]}")
    print(f"# first {what}: {ms:,.0f} ms")
    return ms


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--runs", type=int, default=10, help="timed runs per command")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--state-dir", type=Path, help="reuse (or keep) the generated ledger here")
    parser.add_argument("--smoke", action="store_true", help="tiny and quick (CI)")
    parser.add_argument("--json", help="write results as JSON to this path")
    args = parser.parse_args(argv)
    if args.smoke:
        args.calls, args.runs, args.warmup = 5_000, 1, 0
    print_machine()
    with tempfile.TemporaryDirectory(prefix="agentd-bench-") as tmp:
        state = args.state_dir or Path(tmp) / "state"
        if (state / "ledger.db").exists():
            made_by = f"existing {state}/ledger.db"
        else:
            t0 = time.perf_counter()
            made_by = generate(state, args.calls, args.days)
            print(f"# generated by {made_by} in {time.perf_counter() - t0:.1f} s")
        import sqlite3

        with sqlite3.connect(state / "ledger.db") as conn:
            rows = conn.execute("SELECT COUNT(*) FROM calls").fetchone()[0]
            first = conn.execute("SELECT MIN(started_at) FROM calls").fetchone()[0]
            cached = conn.execute("SELECT COUNT(*) FROM report_cache").fetchone()[0]
        all_since = first[:10]  # the first row's day: the whole ledger
        print(f"# {rows:,} call rows since {first}")
        # What an operator has: a config naming the state dir (read for timezone and state_dir).
        config = Path(tmp) / "agent-model-config.yaml"
        config.write_text(f"timezone: UTC\nstate_dir: {json.dumps(str(state.resolve()))}\n")
        env = agentd_env(AGENTD_CONFIG=str(config))
        base = [AGENTD, "ledger"]
        before = "cache filled before" if cached else ""
        fill_ms = _first_run(base, env, f"`agentd ledger` ({before or 'caches the last day'})")
        full_fill_ms = _first_run(
            [*base, "--since", all_since],
            env,
            f"`agentd ledger --since {all_since}` ({before or 'caches the rest'})",
        )
        shipped = REPO / "config" / "agent-model-config.yaml"
        commands: dict[str, Sequence[str]] = {
            "ledger (default: --since 24h, by loop)": base,
            "ledger --since <all> (by loop)": [*base, "--since", all_since],
            "ledger --since <all> --by day": [*base, "--since", all_since, "--by", "day"],
            "ledger --since <all> --by model --json": [
                *base,
                "--since",
                all_since,
                "--by",
                "model",
                "--json",
            ],
            "ledger calls --limit 20": [*base, "calls", "--limit", "20"],
            "ledger calls --failed --since 24h": [*base, "calls", "--failed", "--since", "24h"],
            "report --html (default: --since 30d)": [
                AGENTD,
                "report",
                "--html",
                str(Path(tmp) / "report.html"),
            ],
            "budget (shipped config)": [
                AGENTD,
                "--config",
                str(shipped),
                "--state-dir",
                str(state),
                "budget",
            ],
            "reprice --all-tier deep --since 30d (shipped config)": [
                AGENTD,
                "--config",
                str(shipped),
                "--state-dir",
                str(state),
                "reprice",
                "--all-tier",
                "deep",
                "--since",
                "30d",
            ],
        }
        samples, tool = time_commands(commands, runs=args.runs, warmup=args.warmup, env=env)
        since_all = datetime.fromisoformat(all_since).replace(tzinfo=UTC)
        queries = {
            "spend_report by loop, last 24h (in-process)": _query_only(
                state, datetime.now(UTC) - timedelta(hours=24), "loop", args.runs
            ),
            "spend_report by loop, all rows (in-process)": _query_only(
                state, since_all, "loop", args.runs
            ),
            "spend_report by day, all rows (in-process)": _query_only(
                state, since_all, "day", args.runs
            ),
        }
    print(f"# wall ms per command ({tool}), median (min–max) of {args.runs}; goal ≤ 300 ms")
    print("| command | ms |\n|---|---|")
    for name, vals in {**samples, **queries}.items():
        print(f"| {name} | {fmt_mmm(vals, 1)} |")
    result: dict[str, Any] = {
        "rows": rows,
        "generator": made_by,
        "first_report_ms": fill_ms,
        "first_full_report_ms": full_fill_ms,
        "tool": tool,
        "commands": samples,
        "queries": queries,
    }
    emit_json(args.json, {"benchmark": "reports", **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
