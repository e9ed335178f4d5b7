"""Run every benchmark's `--smoke` (tiny, quick) and fail if any of them crashes.

For CI: `python benchmarks/run_smoke.py`. The two soaks that mostly wait (fault soak, scale)
run in the background while the CPU-bound smokes run one after another, so the whole set
takes well under a minute on 2 cores. The smokes time nothing against a goal: a slow machine
does not fail them, a crash or a broken invariant (leaked reservation, lost row) does.
LiteLLM is optional: without it the overhead smoke skips variant (c) and says so.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BACKGROUND = ("bench_faults.py", "bench_scale.py")
FOREGROUND = (
    "bench_overhead.py",
    "bench_ledger.py",
    "bench_reports.py",
    "bench_cli.py",
    "bench_crash.py",
    "bench_overlap.py",
    "bench_writer.py",
)


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.splitlines()[-lines:])


def main() -> int:
    started = time.monotonic()
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(HERE / name), "--smoke"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name in BACKGROUND
    }
    failed: list[str] = []
    for name in FOREGROUND:
        t0 = time.monotonic()
        res = subprocess.run(
            [sys.executable, str(HERE / name), "--smoke"],
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )
        status = "ok" if res.returncode == 0 else f"FAILED (exit {res.returncode})"
        print(f"smoke {name:20s} {status:18s} {time.monotonic() - t0:5.1f} s", flush=True)
        for line in res.stdout.splitlines():
            if line.startswith("# note:"):
                print(f"  {line}")
        if res.returncode != 0:
            failed.append(name)
            print(_tail(res.stdout + res.stderr))
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
        print(f"smoke {name:20s} {status:18s} (background)", flush=True)
        if proc.returncode != 0:
            failed.append(name)
            print(_tail(out))
    print(f"smoke: {len(failed)} failed, {time.monotonic() - started:.1f} s in all")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
