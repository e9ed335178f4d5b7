"""Prometheus metrics: the ledger's calls, tokens, spend, runs and budget windows as text.

Counters are totals over the whole ledger, aggregated in SQL. A scrape must stay cheap on a
ledger of millions of rows, so totals are kept incrementally per database file: a settled call
or a finished run never changes again (the ledger is append-only plus the one
`pending → settled` / `running → finished` transition), so each scrape aggregates only the rows
added since the previous one, plus the few rows that were still in flight then (found through
the partial indexes `calls_unsettled` and `runs_running`). The first scrape of a process pays
for one full pass.

Only rows of one kind are shown: real rows by default, simulated rows with `simulated=True`
(what a `--simulate` daemon passes). Simulated spend would mislead a dashboard of real spend,
and it counts only against simulated budgets anyway; `agentd_simulated` says which kind it is.
"""

from __future__ import annotations

import json
import math
import os
import re
import sqlite3
import threading
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from agentd import budgets, loopstate
from agentd.config import Config
from agentd.ledger import Ledger

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Run latency buckets in seconds: from a quick heartbeat to a long multi-call research run.
DURATION_BUCKETS: tuple[float, ...] = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
# Runs that made (or tried) model calls; skipped runs take no time and would drown the latency.
_TIMED_RUN_STATUSES = ("ok", "failed", "aborted")
TOKEN_KINDS = ("input", "output", "cache_read", "cache_write", "reasoning")

_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_UNSETTLED = "status IN ('pending', 'submitted')"

# HELP texts of the gauges the daemon usually passes as `extra`.
EXTRA_HELP = {
    "agentd_up": "1 while the daemon is running and serving its control socket.",
    "agentd_loops": "Loops in the running configuration.",
    "agentd_running_runs": "Runs of this daemon in progress now.",
}

_NOTHING_SEEN = -(2**63)  # below every SQLite rowid


def escape_label_value(value: str) -> str:
    """A label value escaped for the text format: backslash, double quote and newline."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    """A sample value: integers without a fraction, and Prometheus' spellings of NaN and ±Inf."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    number = float(value)
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "+Inf" if number > 0 else "-Inf"
    if number.is_integer() and abs(number) < 2**53:
        return str(int(number))
    return repr(number)


def _bucket_label(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(float(bound))


@dataclass
class _Family:
    """One metric family: its HELP/TYPE header and its samples (suffix, labels, value)."""

    name: str
    kind: str
    help: str
    samples: list[tuple[str, Sequence[tuple[str, str]], float]] = field(default_factory=list)

    def add(self, labels: Sequence[tuple[str, str]], value: float, suffix: str = "") -> None:
        self.samples.append((suffix, labels, value))

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]
        for suffix, labels, value in self.samples:
            text = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in labels)
            where = f"{{{text}}}" if text else ""
            lines.append(f"{self.name}{suffix}{where} {format_value(value)}")
        return lines


# ---------------------------------------------------------------------------- incremental totals


@dataclass
class _Totals:
    """Totals over the settled calls and finished runs of one database file, kept between scrapes.

    `calls_seen` / `runs_seen` are the highest ids already looked at; `open_calls` / `open_runs`
    are the ids at or below them that were still in flight then, so they are added once they
    settle. Keys start with the `simulated` flag, so one cache serves both kinds.
    """

    calls_seen: int = _NOTHING_SEEN
    runs_seen: int = _NOTHING_SEEN
    open_calls: list[int] = field(default_factory=list)
    open_runs: list[int] = field(default_factory=list)
    # (simulated, loop, model, status) -> [count, input, output, cache_read, cache_write,
    #                                      reasoning, cost]
    calls: dict[tuple[int, str, str, str], list[int]] = field(
        default_factory=lambda: defaultdict(lambda: [0] * 7)
    )
    # (simulated, loop, status) -> count
    runs: dict[tuple[int, str, str], int] = field(default_factory=lambda: defaultdict(int))
    # (simulated, loop) -> [per-bucket counts..., count, sum of milliseconds]
    durations: dict[tuple[int, str], list[int]] = field(
        default_factory=lambda: defaultdict(lambda: [0] * (len(DURATION_BUCKETS) + 2))
    )
    # The first call's and first run's timestamps: a different file behind the same path and
    # inode (inode numbers are reused) shows up as a different fingerprint.
    fingerprint: tuple[Any, ...] = ()
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self) -> None:
        """Forget everything counted so far (the next refresh recounts from the first row)."""
        fresh = _Totals()
        self.calls_seen, self.runs_seen = _NOTHING_SEEN, _NOTHING_SEEN
        self.open_calls, self.open_runs = [], []
        self.calls, self.runs, self.durations = fresh.calls, fresh.runs, fresh.durations
        self.fingerprint = ()


_CALL_SUMS = (
    "COUNT(*), COALESCE(SUM(input_tokens), 0), COALESCE(SUM(output_tokens), 0),"
    " COALESCE(SUM(cache_read_tokens), 0), COALESCE(SUM(cache_write_tokens), 0),"
    " COALESCE(SUM(reasoning_tokens), 0),"
    # A settled row's cost; aborted rows were settled at their reservation (as in the reports).
    " COALESCE(SUM(COALESCE(cost_micro_usd, reserved_micro_usd)), 0)"
)
_CALLS_SQL = (
    f"SELECT simulated, loop, model, status, {_CALL_SUMS} FROM calls"
    f" WHERE {{where}} AND NOT {_UNSETTLED} GROUP BY simulated, loop, model, status"
)


def _epoch_ms(column: str) -> str:
    # Whole milliseconds from SQLite's own clock arithmetic: `%s` and `%f` come from the same
    # internal millisecond count, while a difference of two julianday() doubles is off by tens
    # of microseconds, enough to put a run on the wrong side of a bucket bound.
    return (
        f"(CAST(strftime('%s', {column}) AS INTEGER) * 1000"
        f" + CAST(substr(strftime('%f', {column}), 4) AS INTEGER))"
    )


_RUNS_SQL = (
    "SELECT simulated, loop, status, COUNT(*),"
    + "".join(
        f" SUM(CASE WHEN timed AND ms <= {round(b * 1000)} THEN 1 ELSE 0 END),"
        for b in DURATION_BUCKETS
    )
    + " SUM(CASE WHEN timed THEN 1 ELSE 0 END), COALESCE(SUM(CASE WHEN timed THEN ms END), 0)"
    + " FROM (SELECT simulated, loop, status,"
    + f" MAX({_epoch_ms('finished_at')} - {_epoch_ms('started_at')}, 0) AS ms,"
    + f" (status IN {_TIMED_RUN_STATUSES!r} AND finished_at IS NOT NULL) AS timed"
    + " FROM runs WHERE {where} AND status != 'running')"
    + " GROUP BY simulated, loop, status"
)
_IDS = "id IN (SELECT value FROM json_each(?))"

# One cache per database file (device, inode): a replaced file starts afresh.
_CACHES: dict[tuple[str, int, int], _Totals] = {}
_CACHES_LOCK = threading.Lock()


def _totals_for(ledger: Ledger) -> _Totals:
    st = os.stat(ledger.path)
    key = (str(ledger.path.resolve()), st.st_dev, st.st_ino)
    with _CACHES_LOCK:
        return _CACHES.setdefault(key, _Totals())


def _add_calls(totals: _Totals, rows: Iterable[Any]) -> None:
    for simulated, loop, model, status, *sums in rows:
        acc = totals.calls[(int(simulated), str(loop), str(model), str(status))]
        for i, value in enumerate(sums):
            acc[i] += int(value)


def _add_runs(totals: _Totals, rows: Iterable[Any]) -> None:
    for simulated, loop, status, count, *hist in rows:
        totals.runs[(int(simulated), str(loop), str(status))] += int(count)
        acc = totals.durations[(int(simulated), str(loop))]
        for i, value in enumerate(hist):
            acc[i] += int(value or 0)


def _refresh(totals: _Totals, conn: sqlite3.Connection) -> list[Any]:
    """Fold the rows settled or finished since the last scrape into `totals` (one snapshot).

    Returns the calls in flight now as (id, simulated, loop, model, reserved) rows.
    """
    max_call = int(
        conn.execute("SELECT COALESCE(MAX(id), ?) FROM calls", (_NOTHING_SEEN,)).fetchone()[0]
    )
    max_run = int(
        conn.execute("SELECT COALESCE(MAX(id), ?) FROM runs", (_NOTHING_SEEN,)).fetchone()[0]
    )
    fingerprint = tuple(
        conn.execute(
            "SELECT (SELECT started_at FROM calls ORDER BY id LIMIT 1),"
            " (SELECT started_at FROM runs ORDER BY id LIMIT 1)"
        ).fetchone()
    )
    if (
        fingerprint != totals.fingerprint
        or max_call < totals.calls_seen
        or max_run < totals.runs_seen
    ):
        # Another file, or rows vanished (restored from a backup?): not the ledger we counted.
        totals.reset()
        totals.fingerprint = fingerprint
    span = "id > ? AND id <= ?"
    _add_calls(totals, conn.execute(_CALLS_SQL.format(where=span), (totals.calls_seen, max_call)))
    if totals.open_calls:
        _add_calls(
            totals, conn.execute(_CALLS_SQL.format(where=_IDS), (json.dumps(totals.open_calls),))
        )
    # No other condition and no GROUP BY here: either makes the planner trade the small
    # partial index `calls_unsettled` for a full scan of the table.
    unsettled = conn.execute(
        f"SELECT id, simulated, loop, model, reserved_micro_usd FROM calls WHERE {_UNSETTLED}"
    ).fetchall()
    totals.open_calls = [int(r[0]) for r in unsettled if r[0] <= max_call]
    totals.calls_seen = max_call
    _add_runs(totals, conn.execute(_RUNS_SQL.format(where=span), (totals.runs_seen, max_run)))
    if totals.open_runs:
        _add_runs(
            totals, conn.execute(_RUNS_SQL.format(where=_IDS), (json.dumps(totals.open_runs),))
        )
    running = conn.execute("SELECT id FROM runs WHERE status = 'running'").fetchall()
    totals.open_runs = [int(r[0]) for r in running if r[0] <= max_run]
    totals.runs_seen = max_run
    return unsettled


# ---------------------------------------------------------------------------- rendering


def _config_windows(config: Config) -> list[budgets.Window]:
    """Every budget window of the config, global first, then each loop's own."""
    windows: list[budgets.Window] = []
    if config.budgets is not None:
        windows += budgets.windows_for("", None, config.budgets.limits())
    for name, loop in config.loops.items():
        if loop.budget is not None:
            windows += budgets.windows_for(name, loop.budget.limits(), None)
    return windows


def render_metrics(
    ledger: Ledger,
    config: Config,
    *,
    now: datetime | None = None,
    extra: Mapping[str, float] | None = None,
    simulated: bool = False,
) -> str:
    """The Prometheus text exposition (format 0.0.4) of the ledger and the config's budgets.

    `extra` adds plain gauges (e.g. `agentd_up`, `agentd_loops`, `agentd_running_runs`); their
    names must be valid metric names. This blocks on SQLite: from async code, call it in a
    worker thread, ideally on a Ledger of its own so a scrape never waits on the run's writes.
    """
    at = datetime.now(UTC) if now is None else now
    sim = int(simulated)
    extra = dict(extra or {})
    for name in extra:
        if not _METRIC_NAME.match(name):
            raise ValueError(f"not a Prometheus metric name: {name!r}")

    totals = _totals_for(ledger)
    with totals.lock, ledger.read() as conn:
        try:
            unsettled = _refresh(totals, conn)
        except BaseException:
            totals.reset()  # half-folded totals would count rows twice: recount next time
            raise
        calls = {k[1:]: list(v) for k, v in totals.calls.items() if k[0] == sim}
        runs = {k[1:]: v for k, v in totals.runs.items() if k[0] == sim}
        durations = {k[1]: list(v) for k, v in totals.durations.items() if k[0] == sim}
        failures = dict(
            conn.execute("SELECT loop, consecutive_failures FROM loop_state").fetchall()
        )
    in_flight: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for _, row_sim, loop, model, reserved in unsettled:
        if row_sim == sim:
            in_flight[(str(loop), str(model))][0] += 1
            in_flight[(str(loop), str(model))][1] += int(reserved)
    windows = budgets.window_status(ledger, _config_windows(config), config.tz, at, simulated)
    paused = {name: loopstate.paused_reason(ledger, name, at) is not None for name in config.loops}

    families = _families(calls, runs, durations, in_flight, windows, paused, failures, sim)
    taken = {family.name for family in families} & set(extra)
    if taken:
        raise ValueError(f"extra gauges would shadow agentd's own metrics: {sorted(taken)}")
    for name in sorted(extra):
        family = _Family(name, "gauge", EXTRA_HELP.get(name, f"Daemon gauge {name}."))
        family.add((), extra[name])
        families.append(family)
    lines = [line for family in families for line in family.render()]
    return "\n".join(lines) + "\n"


def _families(
    calls: Mapping[tuple[str, str, str], Sequence[int]],
    runs: Mapping[tuple[str, str], int],
    durations: Mapping[str, Sequence[int]],
    in_flight: Mapping[tuple[str, str], Sequence[int]],
    windows: Sequence[budgets.WindowStatus],
    paused: Mapping[str, bool],
    failures: Mapping[str, int],
    sim: int,
) -> list[_Family]:
    calls_f = _Family(
        "agentd_calls_total",
        "counter",
        "Settled model call attempts by loop, model (the provider's model id) and status "
        "(ok, error, aborted).",
    )
    tokens_f = _Family(
        "agentd_tokens_total",
        "counter",
        "Tokens of settled calls by loop, model, status and kind: input (all input, cache "
        "included), output (reasoning included), cache_read, cache_write, reasoning.",
    )
    cost_f = _Family(
        "agentd_cost_micro_usd_total",
        "counter",
        "Spend of settled calls in micro-USD by loop, model and status (aborted calls at "
        "their reservation).",
    )
    # One series per (loop, model, status) in all three families, so a dashboard can split
    # tokens and spend by outcome exactly like the call counts (e.g. what failed calls cost).
    for (loop, model, status), sums in sorted(calls.items()):
        series = (("loop", loop), ("model", model), ("status", status))
        calls_f.add(series, sums[0])
        for kind, value in zip(TOKEN_KINDS, sums[1:6], strict=True):
            tokens_f.add((*series, ("kind", kind)), value)
        cost_f.add(series, sums[6])

    flight_f = _Family(
        "agentd_calls_in_flight",
        "gauge",
        "Calls reserved and not yet settled (pending or submitted).",
    )
    reserved_f = _Family(
        "agentd_reserved_micro_usd", "gauge", "Budget reserved by calls in flight, in micro-USD."
    )
    for (loop, model), (count, reserved) in sorted(in_flight.items()):
        flight_f.add((("loop", loop), ("model", model)), count)
        reserved_f.add((("loop", loop), ("model", model)), reserved)

    runs_f = _Family(
        "agentd_runs_total",
        "counter",
        "Finished runs by loop and status (ok, failed, skipped_*, aborted).",
    )
    for (loop, status), count in sorted(runs.items()):
        runs_f.add((("loop", loop), ("status", status)), count)
    hist_f = _Family(
        "agentd_run_duration_seconds",
        "histogram",
        "Wall time of runs that made model calls (ok, failed, aborted), from start to finish.",
    )
    for loop, hist in sorted(durations.items()):
        timed = int(hist[len(DURATION_BUCKETS)])
        if not timed:
            continue  # only skipped runs so far: no latency to show
        for bound, n in zip(DURATION_BUCKETS, hist, strict=False):
            hist_f.add((("loop", loop), ("le", _bucket_label(bound))), int(n), "_bucket")
        hist_f.add((("loop", loop), ("le", "+Inf")), timed, "_bucket")
        hist_f.add((("loop", loop),), hist[len(DURATION_BUCKETS) + 1] / 1000, "_sum")
        hist_f.add((("loop", loop),), timed, "_count")

    budget_fs = [
        _Family(f"agentd_budget_{what}_micro_usd", "gauge", text)
        for what, text in (
            ("limit", "Budget window limit in micro-USD; scope is a loop or global."),
            ("spent", "Settled spend in the current budget window, in micro-USD."),
            ("reserved", "Reservations of calls in flight in the current window, in micro-USD."),
            ("remaining", "What the current budget window still allows, in micro-USD."),
        )
    ]
    resets_f = _Family(
        "agentd_budget_resets_timestamp_seconds", "gauge", "When the current budget window ends."
    )
    for ws in windows:
        labels = (("scope", ws.window.scope), ("period", ws.window.period))
        values = (
            ws.window.limit_micro_usd,
            ws.spent_micro_usd,
            ws.reserved_micro_usd,
            ws.remaining_micro_usd,
        )
        for family, value in zip(budget_fs, values, strict=True):
            family.add(labels, value)
        resets_f.add(labels, int(ws.end.timestamp()))

    paused_f = _Family("agentd_loop_paused", "gauge", "1 when the loop is paused now.")
    fails_f = _Family(
        "agentd_loop_consecutive_failures", "gauge", "Failed runs in a row of each configured loop."
    )
    for loop in sorted(paused):
        paused_f.add((("loop", loop),), int(paused[loop]))
        fails_f.add((("loop", loop),), int(failures.get(loop, 0)))
    sim_f = _Family(
        "agentd_simulated", "gauge", "1 when these figures count simulated rows, 0 for real ones."
    )
    sim_f.add((), sim)
    return [
        calls_f,
        tokens_f,
        cost_f,
        flight_f,
        reserved_f,
        runs_f,
        hist_f,
        *budget_fs,
        resets_f,
        paused_f,
        fails_f,
        sim_f,
    ]
