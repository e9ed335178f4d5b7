"""CLI cold start: wall time of `agentd --help`, `agentd ledger` on an empty ledger, and more.

Each command is a fresh process (hyperfine when installed, else a subprocess loop), so the
number includes interpreter start-up and every import. `python -X importtime` then lists the
modules that cost the most to import in `agentd ledger`, to show what lazy imports would save,
and which of the notable heavy packages it imports at all.
Goal (issue 9): ≤ 250 ms for `agentd --help` and `agentd ledger`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    AGENTD,
    PYTHON,
    agentd_env,
    config_dict,
    emit_json,
    fmt_mmm,
    print_machine,
    run_quiet,
    time_commands,
    write_config,
)


def import_top(cmd: list[str], env: dict[str, str], top: int) -> list[tuple[float, str]]:
    """The `top` modules by cumulative import time (ms) in one run of `cmd`."""
    res = run_quiet(
        [
            PYTHON,
            "-X",
            "importtime",
            "-c",
            "import sys; from agentd.cli import main; sys.argv = ['agentd', *sys.argv[1:]]; main()",
            *cmd,
        ],
        env=env,
    )
    rows: list[tuple[float, str]] = []
    for line in res.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)", line)
        if m and len(m.group(2)) <= 3:  # top-level and first-level imports only
            rows.append((int(m.group(1)) / 1000, m.group(2) + m.group(3)))
    rows.sort(reverse=True)
    return rows[:top]


# Packages worth knowing about on a read path: (name, why it is heavy or notable).
NOTABLE = (
    "pydantic",
    "sqlite_utils",
    "asyncio",
    "structlog",
    "yaml",
    "rich",
    "httpx",
    "anthropic",
    "openai",
    "apscheduler",
)


def notable_imports(cmd: list[str], env: dict[str, str]) -> dict[str, bool]:
    """Which NOTABLE packages one run of `agentd *cmd` imports."""
    code = (
        "import json, sys\n"
        "from agentd.cli import main\n"
        "try:\n"
        "    main(sys.argv[1:], prog_name='agentd', standalone_mode=False)\n"
        "finally:\n"
        "    print(json.dumps(sorted(sys.modules)), file=sys.stderr)\n"
    )
    res = run_quiet([PYTHON, "-c", code, *cmd], env=env)
    loaded = set(json.loads(res.stderr.strip().splitlines()[-1]))
    return {name: name in loaded for name in NOTABLE}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--smoke", action="store_true", help="tiny and quick (CI)")
    parser.add_argument("--json", help="write results as JSON to this path")
    args = parser.parse_args(argv)
    if args.smoke:
        args.runs, args.top, args.warmup = 1, 5, 0
    print_machine()
    from agentd.ledger import Ledger

    with tempfile.TemporaryDirectory(prefix="agentd-cli-") as tmp:
        state = Path(tmp) / "state"
        Ledger.open(state).close()  # an empty, migrated ledger
        loops = {"work": {"every": "30m", "tier": "fast", "max_tokens": 64, "prompt": "w.md"}}
        config = write_config(Path(tmp) / "conf", config_dict("http://127.0.0.1:9", loops))
        env = agentd_env(AGENTD_CONFIG=str(config))
        commands: dict[str, list[str]] = {
            "python -c pass (interpreter floor)": [PYTHON, "-c", "pass"],
            "agentd --help": [AGENTD, "--help"],
            "agentd ledger (empty ledger)": [AGENTD, "--state-dir", str(state), "ledger"],
            "agentd check": [AGENTD, "check"],
        }
        samples, tool = time_commands(commands, runs=args.runs, warmup=args.warmup, env=env)
        top = import_top(["--state-dir", str(state), "ledger"], env, args.top)
        notable = notable_imports(["--state-dir", str(state), "ledger"], env)
    print(f"# cold start, wall ms ({tool}), median (min–max) of {args.runs}; goal ≤ 250 ms")
    print("| command | ms |\n|---|---|")
    for name, vals in samples.items():
        print(f"| {name} | {fmt_mmm(vals, 1)} |")
    print("\n# top imports of `agentd ledger` (cumulative ms, -X importtime, one run)")
    for ms, name in top:
        print(f"  {ms:8.1f}  {name}")
    print("\n# notable packages imported by `agentd ledger`")
    print("  " + ", ".join(f"{name} {'yes' if hit else 'no'}" for name, hit in notable.items()))
    result: dict[str, Any] = {
        "tool": tool,
        "commands": samples,
        "imports": top,
        "notable": notable,
    }
    emit_json(args.json, {"benchmark": "cli", **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
