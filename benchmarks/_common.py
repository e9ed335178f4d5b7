"""Helpers shared by the benchmarks: machine facts, statistics, configs, /proc sampling.

Nothing here is timed itself; every benchmark script imports it as `_common`.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
PYTHON = sys.executable
AGENTD = str(Path(sys.executable).with_name("agentd"))
ANTHROPIC_MODEL = "claude-haiku-4-5"
OPENAI_MODEL = "gpt-4o-mini"
BENCH_ENV = {"BENCH_ANTHROPIC_KEY": "sk-ant-bench-0001", "BENCH_OPENAI_KEY": "sk-oai-bench-0002"}
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def machine() -> dict[str, str]:
    """What the numbers were measured on: cores, CPU model, Python, kernel."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "sqlite": __import__("sqlite3").sqlite_version,
    }


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def med_min_max(values: Iterable[float]) -> tuple[float, float, float]:
    """(median, min, max) of a few repeated measurements."""
    vals = list(values)
    return statistics.median(vals), min(vals), max(vals)


def fmt_mmm(values: Iterable[float], digits: int = 2) -> str:
    """`median (min–max)` for a README table cell."""
    med, lo, hi = med_min_max(values)
    return f"{med:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


def print_machine() -> None:
    """Print the machine line every benchmark starts with."""
    m = machine()
    print(
        f"# machine: nproc={m['nproc']} cpu={m['cpu']!r} python={m['python']} "
        f"sqlite={m['sqlite']} kernel={m['kernel']}"
    )


def emit_json(path: str | None, payload: dict[str, Any]) -> None:
    """Write a benchmark's results as JSON when `--json PATH` was given."""
    if path:
        payload = {"machine": machine(), **payload}
        Path(path).write_text(json.dumps(payload, indent=2, default=str))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config_dict(
    server_url: str,
    loops: dict[str, dict[str, Any]],
    *,
    budgets: dict[str, Any] | None = None,
    timeout_s: float = 5,
    max_retries: int | None = None,
    breaker: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """An agentd config with both providers on one fake server and a fast tier over both."""
    providers: dict[str, Any] = {
        "anthropic": {
            "type": "anthropic",
            "api_key_env": "BENCH_ANTHROPIC_KEY",
            "base_url": server_url,
            "timeout_s": timeout_s,
        },
        "openai": {
            "type": "openai",
            "api_key_env": "BENCH_OPENAI_KEY",
            "base_url": f"{server_url}/v1",
            "timeout_s": timeout_s,
        },
    }
    if max_retries is not None:
        for p in providers.values():
            p["max_retries"] = max_retries
    data: dict[str, Any] = {
        "timezone": "UTC",
        "providers": providers,
        "models": {
            "haiku": {"provider": "anthropic", "model": ANTHROPIC_MODEL},
            "gpt-mini": {"provider": "openai", "model": OPENAI_MODEL},
        },
        "tiers": {"fast": ["haiku", "gpt-mini"]},
        "loops": loops,
    }
    if budgets:
        data["budgets"] = budgets
    if breaker:
        data["circuit_breaker"] = breaker
    data.update(extra or {})
    return data


def write_config(directory: Path, data: dict[str, Any], prompt: str = "Say hello.") -> Path:
    """Write the config and each loop's prompt file; return the config path."""
    directory.mkdir(parents=True, exist_ok=True)
    for loop in data.get("loops", {}).values():
        p = directory / loop["prompt"]
        if not p.exists():
            p.write_text(prompt)
    path = directory / "agent-model-config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def agentd_env(**extra: str) -> dict[str, str]:
    """The environment for an `agentd` subprocess: the fake keys, no proxies, no TTY colours."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(BENCH_ENV)
    env.update(extra)
    return env


def proc_rss_kb(pid: int) -> int | None:
    """Resident set size of a process in KiB (None once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/statm").read_text().split()
    except OSError:
        return None
    return int(fields[1]) * PAGE_KB


def proc_rss_parts_kb(pid: int) -> dict[str, int] | None:
    """RSS split by kind, KiB: `anon` (the heap), `file` (mapped files), `shmem` (SQLite's -shm)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    parts: dict[str, int] = {}
    for line in text.splitlines():
        for kind in ("Anon", "File", "Shmem"):
            if line.startswith(f"Rss{kind}:"):
                parts[kind.lower()] = int(line.split()[1])
    return parts if len(parts) == 3 else None


def proc_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds a process has used so far."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll `predicate()` until true; RuntimeError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def hyperfine() -> str | None:
    """The hyperfine binary, if installed."""
    return shutil.which("hyperfine")


def run_quiet(args: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a command capturing its output as text."""
    return subprocess.run(list(args), capture_output=True, text=True, check=False, **kwargs)


def time_commands(
    commands: dict[str, Sequence[str]],
    *,
    runs: int,
    warmup: int = 1,
    env: dict[str, str] | None = None,
) -> tuple[dict[str, list[float]], str]:
    """Wall ms of each run of each command: hyperfine when installed, else a Python loop.

    Returns (samples by name, the tool used). Commands must exit 0.
    """
    import shlex
    import tempfile

    tool = hyperfine()
    out: dict[str, list[float]] = {}
    for name, cmd in commands.items():
        if tool is not None:
            with tempfile.NamedTemporaryFile(suffix=".json") as export:
                res = subprocess.run(
                    [
                        tool,
                        "--style",
                        "none",
                        "--shell=none",
                        "--warmup",
                        str(warmup),
                        "--runs",
                        str(runs),
                        "--export-json",
                        export.name,
                        shlex.join(cmd),
                    ],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if res.returncode != 0:
                    raise RuntimeError(f"hyperfine failed for {name}: {res.stderr[-2000:]}")
                data = json.loads(Path(export.name).read_text())
            out[name] = [t * 1000 for t in data["results"][0]["times"]]
            continue
        samples = []
        for i in range(warmup + runs):
            t0 = time.perf_counter()
            res = subprocess.run(list(cmd), env=env, capture_output=True, check=False)
            elapsed = (time.perf_counter() - t0) * 1000
            if res.returncode != 0:
                raise RuntimeError(f"{name} exited {res.returncode}: {res.stderr[-2000:]!r}")
            if i >= warmup:
                samples.append(elapsed)
        out[name] = samples
    return out, "hyperfine" if tool else "python subprocess loop"


def call_start(loop: str = "work", *, run_id: int | None = None, attempt: int = 1) -> Any:
    """The `CallStart` of a fast-tier Anthropic work call: the tests' `builders.haiku_call`."""
    return _haiku_call()(loop, run_id, attempt=attempt)


@functools.cache
def _haiku_call() -> Any:
    """The tests' builder, imported once (benchmarks call `call_start` thousands of times)."""
    tests = str(REPO / "tests")
    if tests not in sys.path:
        sys.path.append(tests)
    from builders import haiku_call

    return haiku_call
