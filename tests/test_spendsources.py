"""Every way the report sources can be read gives the same report (the plans are speed only)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from ledgergen import generate_ledger

from agentd import spendlatency, spendsources
from agentd.ledger import Ledger
from agentd.spend import GROUPINGS, spend_report

NOW = datetime.now(UTC)
RANGES = [
    (None, None),
    (NOW - timedelta(hours=24), None),
    (NOW - timedelta(days=9, hours=3, minutes=5), NOW - timedelta(days=2, minutes=42)),
]


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ledger]:
    state = tmp_path_factory.mktemp("sources") / "s"
    generate_ledger(state, calls=4000, days=10, end=NOW.replace(microsecond=0), seed=5)
    with Ledger.open(state, reconcile=False) as opened:
        yield opened


def reports(ledger: Ledger) -> list[Any]:
    out = []
    for zone in ("UTC", "Europe/Berlin"):
        for by in GROUPINGS:
            for since, until in RANGES:
                for cache in (True, False):
                    out.append(
                        spend_report(
                            ledger, by=by, since=since, until=until, tz=ZoneInfo(zone), cache=cache
                        )
                    )
    out.append(spend_report(ledger, by="tier", since=RANGES[1][0], loop="triage"))
    return out


def test_both_fallback_plans_count_the_same_runs(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spendsources, "_FALLBACK_PROBE_COST", 0)  # always probe fallback runs
    probed = reports(ledger)
    monkeypatch.setattr(spendsources, "_FALLBACK_PROBE_COST", 10**9)  # always walk the range
    walked = reports(ledger)
    assert probed == walked
    assert sum(r.total["fallbacks"] for r in walked) > 0


def test_scanned_and_probed_p95_buckets_agree(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spendlatency, "_SCAN_RANGE", 0)  # probe the latency index per bucket
    probed = reports(ledger)
    monkeypatch.setattr(spendlatency, "_SCAN_RANGE", 10**9)  # one pass over the range
    scanned = reports(ledger)
    assert probed == scanned
    assert all(r.total["p95_latency_ms"] is not None for r in scanned if r.total["calls"])
