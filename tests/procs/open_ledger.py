"""Test helper: wait until a shared start instant, open a (fresh) ledger, record one run.

Usage: open_ledger.py STATE_DIR START_AT_EPOCH_SECONDS
Prints `ok <run_id>`; any failure exits non-zero with the error on stderr.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import structlog

from agentd.ledger import Ledger


def main() -> None:
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    state_dir, start_at = Path(sys.argv[1]), float(sys.argv[2])
    # All imports are done: line the processes up so their first opens really collide.
    time.sleep(max(0.0, start_at - time.time()))
    with Ledger.open(state_dir) as ledger:
        run_id = ledger.start_run(loop="opener", trigger="manual", simulated=False)
    print(f"ok {run_id}", flush=True)


if __name__ == "__main__":
    main()
