"""Test helper: open a ledger, start a run, reserve one call, report it, then sleep until killed.

Usage: hold_reservation.py STATE_DIR LOOP AMOUNT_MICRO_USD
Prints `reserved <run_id> <call_id> <owner>` on stdout once the pending row is committed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from zoneinfo import ZoneInfo

import structlog

from agentd import budgets
from agentd.ledger import Ledger
from agentd.owner import current_owner


def main() -> None:
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    state_dir, loop, amount = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    # reconcile=False: this helper must not settle rows of a peer the test has just killed.
    ledger = Ledger.open(state_dir, reconcile=False)
    run_id = ledger.start_run(loop=loop, trigger="manual", simulated=False)
    call = budgets.CallStart(
        run_id=run_id,
        loop=loop,
        purpose="work",
        tier="fast",
        alias="haiku",
        provider="anthropic",
        model="claude-haiku-4-5",
        attempt=1,
        simulated=False,
    )
    call_id = budgets.reserve(ledger, call, amount, [], ZoneInfo("UTC"))
    print(f"reserved {run_id} {call_id} {current_owner()}", flush=True)
    while True:
        time.sleep(60)


if __name__ == "__main__":
    main()
