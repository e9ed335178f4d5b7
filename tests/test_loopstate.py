"""Tests of agentd.loopstate: per-loop state in the ledger, failure backoff and pause rules."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agentd import loopstate
from agentd.ledger import Ledger, parse_iso
from agentd.loopconfig import OnFailure


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    with Ledger.open(tmp_path / "state") as opened:
        yield opened


def finished_run(ledger: Ledger, loop: str, status: str, slot: str | None = None) -> int:
    """A run recorded the way the runner does it: start, finish, then record_run."""
    run_id = ledger.start_run(loop=loop, trigger="schedule", simulated=False, slot=slot)
    ledger.finish_run(run_id, status=status, error="boom" if status == "failed" else None)
    loopstate.record_run(ledger, loop, run_id, status, slot)
    return run_id


def test_unknown_loop_has_defaults(ledger: Ledger) -> None:
    assert loopstate.get_state(ledger, "nope") == loopstate.LoopState("nope")
    assert loopstate.all_states(ledger) == {}
    assert loopstate.paused_reason(ledger, "nope", datetime.now(UTC)) is None


def test_record_run_counts_failures_and_keeps_the_last_slot(ledger: Ledger) -> None:
    finished_run(ledger, "a", "failed", "2026-01-01T10:00:00.000000Z")
    finished_run(ledger, "a", "failed", "2026-01-01T11:00:00.000000Z")
    assert loopstate.get_state(ledger, "a").consecutive_failures == 2
    # Skipped runs neither reset nor add; a run without a slot (manual) keeps the last slot.
    skipped = ledger.record_skipped_run(
        loop="a", trigger="manual", simulated=False, status="skipped_noop"
    )
    assert loopstate.record_run(ledger, "a", skipped, "skipped_noop", None) == 2
    state = loopstate.get_state(ledger, "a")
    assert state.last_slot == "2026-01-01T11:00:00.000000Z"
    assert state.last_run_id == skipped
    finished_run(ledger, "a", "ok")
    assert loopstate.get_state(ledger, "a").consecutive_failures == 0
    assert set(loopstate.all_states(ledger)) == {"a"}


def test_pause_until_and_resume_resets_the_failure_streak(ledger: Ledger) -> None:
    now = datetime(2026, 1, 1, 12, tzinfo=UTC)
    finished_run(ledger, "a", "failed")
    loopstate.set_paused(ledger, "a", "over budget", now + timedelta(hours=1))
    assert "over budget (until 2026-01-01T13:00" in str(loopstate.paused_reason(ledger, "a", now))
    # A pause whose moment has passed is over without anyone resuming it.
    assert loopstate.paused_reason(ledger, "a", now + timedelta(hours=2)) is None
    loopstate.set_paused(ledger, "a", "3 consecutive failures: boom", None)
    assert loopstate.get_state(ledger, "a").consecutive_failures == 1
    assert loopstate.resume(ledger, "a") is True
    state = loopstate.get_state(ledger, "a")
    assert not state.paused and state.paused_reason is None and state.paused_until is None
    assert state.consecutive_failures == 0  # so no backoff is left either
    assert loopstate.next_allowed_at(ledger, "a", OnFailure()) is None
    assert loopstate.resume(ledger, "a") is False
    assert loopstate.resume(ledger, "never-ran") is False


def test_set_last_slot_marks_a_slot_handled(ledger: Ledger) -> None:
    loopstate.set_last_slot(ledger, "a", "2026-01-01T10:00:00.000000Z")
    loopstate.set_last_slot(ledger, "a", "2026-01-01T10:30:00.000000Z")
    state = loopstate.get_state(ledger, "a")
    assert state.last_slot == "2026-01-01T10:30:00.000000Z" and state.last_run_id is None


@pytest.mark.parametrize(
    ("failures", "expected"), [(0, 0.0), (1, 30.0), (2, 60.0), (3, 300.0), (9, 300.0)]
)
def test_backoff_delay_last_value_repeats(failures: int, expected: float) -> None:
    assert loopstate.backoff_delay(OnFailure(backoff_s=[30, 60, 300]), failures) == expected


def test_default_backoff_ladder() -> None:
    ladder = [loopstate.backoff_delay(OnFailure(), n) for n in range(1, 8)]
    assert ladder == [30, 60, 300, 900, 3600, 3600, 3600]


def test_next_allowed_at_counts_from_the_last_failed_run(ledger: Ledger) -> None:
    on_failure = OnFailure(backoff_s=[10, 100])
    assert loopstate.next_allowed_at(ledger, "a", on_failure) is None
    first = finished_run(ledger, "a", "failed")
    second = finished_run(ledger, "a", "failed")
    allowed = loopstate.next_allowed_at(ledger, "a", on_failure)
    finished = parse_iso(str(ledger.get_run(second)["finished_at"]))  # type: ignore[index]
    assert allowed == finished + timedelta(seconds=100)
    assert first < second
    finished_run(ledger, "a", "ok")
    assert loopstate.next_allowed_at(ledger, "a", on_failure) is None


def test_failure_pause_reason() -> None:
    rule = OnFailure(pause_after=3)
    assert loopstate.failure_pause_reason(1, rule, ["model_unavailable"], "x") is None
    assert loopstate.failure_pause_reason(2, rule, [None, "timeout"], "x") is None
    reason = loopstate.failure_pause_reason(3, rule, ["model_unavailable"], "every model\nfailed")
    assert reason == "3 consecutive failures: every model failed"
    # Auth and billing errors pause at the first failure: retrying cannot fix them.
    auth = loopstate.failure_pause_reason(1, rule, ["auth_error"], "401")
    assert auth is not None and auth.startswith("auth_error")
    billing = loopstate.failure_pause_reason(1, rule, ["timeout", "billing_error"], "402")
    assert billing is not None and billing.startswith("billing_error")
    assert len(loopstate.failure_pause_reason(5, rule, [], "e" * 1000) or "") <= 300


# ---------------------------------------------------------------------------- anomaly pauses


def ok_run(ledger: Ledger, loop: str, *, simulated: bool = False) -> int:
    run_id = ledger.start_run(loop=loop, trigger="schedule", simulated=simulated)
    ledger.finish_run(run_id, status="ok", route={"strategy": "static"})
    loopstate.record_run(ledger, loop, run_id, "ok", None)
    return run_id


def test_anomaly_run_id() -> None:
    assert loopstate.anomaly_run_id("anomaly: run 12 cost $1 = 9.0× the median") == 12
    assert loopstate.anomaly_run_id("3 consecutive failures: anomaly: run 12 ") is None
    assert loopstate.anomaly_run_id("paused by the operator") is None
    assert loopstate.anomaly_run_id(None) is None


def test_resume_of_an_anomaly_starts_a_new_baseline(ledger: Ledger) -> None:
    old = [ok_run(ledger, "a") for _ in range(3)]
    dear = ok_run(ledger, "a")
    loopstate.pause_for_anomaly(
        ledger, "a", dear, f"anomaly: run {dear} cost $1 = 9.0× the median", {"ratio": "9.0"}
    )
    assert loopstate.get_state(ledger, "a").paused
    assert ledger.get_run(dear)["route"] == {  # type: ignore[index]
        "strategy": "static",
        "anomaly": {"ratio": "9.0"},
    }
    # Before the resume, the dear run and the ones before it are the history.
    assert loopstate.anomaly_history(ledger, "a", dear + 1, False, 20) == ([0] * 4, None)

    at = datetime(2026, 1, 1, 12, tzinfo=UTC)
    assert loopstate.resume(ledger, "a", now=at) is True
    assert ledger.get_run(dear)["route"]["anomaly"] == {  # type: ignore[index]
        "ratio": "9.0",
        "resumed_at": "2026-01-01T12:00:00.000000Z",
    }
    assert [ledger.get_run(r)["route"] for r in old] == [{"strategy": "static"}] * 3  # type: ignore[index]
    # After it, only the runs that followed the resumed anomaly count.
    fresh = [ok_run(ledger, "a") for _ in range(2)]
    assert loopstate.anomaly_history(ledger, "a", fresh[-1] + 1, False, 20) == ([0, 0], dear)
    # At most `limit` runs are read: the cut is not reached, the window is all fresh anyway.
    assert loopstate.anomaly_history(ledger, "a", fresh[-1] + 1, False, 1) == ([0], None)
    # Simulated runs keep their own history, untouched by a real run's anomaly.
    sim = [ok_run(ledger, "a", simulated=True) for _ in range(2)]
    assert loopstate.anomaly_history(ledger, "a", sim[-1] + 1, True, 20) == ([0, 0], None)
    # Another loop's history is its own.
    assert loopstate.anomaly_history(ledger, "b", fresh[-1] + 1, False, 20) == ([], None)


def test_resume_of_another_pause_marks_no_run(ledger: Ledger) -> None:
    run_id = ok_run(ledger, "a")
    loopstate.set_paused(ledger, "a", f"paused by the operator (after run {run_id})", None)
    assert loopstate.resume(ledger, "a") is True
    assert ledger.get_run(run_id)["route"] == {"strategy": "static"}  # type: ignore[index]
    # Resuming a loop that is not paused leaves an old anomaly's run alone too.
    assert loopstate.resume(ledger, "a") is False


def test_pause_for_anomaly_needs_a_reason_naming_the_run(ledger: Ledger) -> None:
    run_id = ok_run(ledger, "a")
    with pytest.raises(ValueError, match="anomaly: run"):
        loopstate.pause_for_anomaly(ledger, "a", run_id, "too dear", {})
    with pytest.raises(ValueError, match="anomaly: run"):
        loopstate.pause_for_anomaly(ledger, "a", run_id, f"anomaly: run {run_id + 1} x", {})
    assert not loopstate.get_state(ledger, "a").paused
