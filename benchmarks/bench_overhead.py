"""Call-path overhead: the raw Anthropic SDK vs the same call through agentd vs LiteLLM's Router.

One zero-latency fake Anthropic server (`fastserver.py`, its own process) on 127.0.0.1. In
one run, interleaved call by call (a new random order each round, so drift and cache warmth
hit every variant alike):

  (a) raw    `anthropic.AsyncAnthropic(max_retries=0).messages.create(...)`
  (a2) raw, the lean way: the same request through `messages.with_raw_response.create`, its
      body decoded with `json.loads` — how agentd itself uses the SDK since the fifth session
      (`agentd/providers/jsonbody.py`): no SDK response model is built. b − a2 is what
      agentd's own routing, reservation and bookkeeping add (and its namespaces for the
      JSON objects and token-count checks, which a2 skips: counted against agentd); a − a2
      is what agentd saves by not building the SDK's model
  (b) agentd route + reserve + call + settle + ledger: `plans_for` + `RunCalls.call` (which is
      `Executor.call`) on a real ledger (WAL, synchronous=NORMAL) in a temp dir, with a loop
      and a global budget so every reservation checks three windows (their running totals,
      `agentd.budgetcache`), structlog JSON logging on (to /dev/null), exactly as the runner
      makes a prompt loop's call; (b0) the same for a loop with no budget at all
  (b+) (optional, `--with-run`) a whole `run_loop`: lock file, runs row, prompt file,
      loop_state, finish — a run's fixed cost on top of its call
  (c) litellm `Router` with one deployment on the same server (skipped when litellm is not
      importable: it is a benchmark-only extra)

A 2 ms untimed pause follows every call: LiteLLM finishes its callbacks in background tasks,
which would otherwise be timed inside the next call (this flatters (c) slightly: its
background work is charged to nobody).

Reports p50/p99 wall time per call, b/a, c/b and agentd's added overhead (b−a) per repeat,
then median (min–max) over repeats. `--profile` then profiles (b) alone with cProfile (and
pyinstrument when installed) and prints the top costs; `--breakdown` times the pieces of (b)
(reserve, settle, the log event) in isolation. `--prefill N` puts N settled calls in the
budget windows before timing (a month of a busy daemon), to show that (b) does not depend on
how full the windows are.
`--gap busy|zero` replaces the 2 ms sleep after each call by a busy wait or nothing (caches
stay warmer; use `--no-litellm` with `zero`). `--server-latency-ms L` makes the server answer
after exactly L ms, as a real provider does,
to show what the same overhead is next to a real call's time (b/a tends to 1 as L grows).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import random
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    ANTHROPIC_MODEL,
    BENCH_ENV,
    call_start,
    config_dict,
    emit_json,
    fmt_mmm,
    percentile,
    print_machine,
    write_config,
)
from fastserver import ServerProcess

from agentd.executor import RunTrace
from agentd.runcalls import RunCalls, plans_for
from agentd.runner import run_loop

PROMPT = "Classify this ticket as bug, feature or question: the export button does nothing."
MAX_TOKENS = 64
GAP_S = 0.002
ORDER_SEED = 20261126
Call = Callable[[], Awaitable[Any]]


def _litellm_router(url: str) -> Any | None:
    """A LiteLLM Router with one Anthropic deployment on the fake server, or None."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch at import
    try:
        import litellm
        from litellm import Router
    except ImportError:
        return None
    litellm.telemetry = False
    litellm.suppress_debug_info = True
    litellm.set_verbose = False
    return Router(
        model_list=[
            {
                "model_name": "haiku",
                "litellm_params": {
                    "model": f"anthropic/{ANTHROPIC_MODEL}",
                    "api_base": url,
                    "api_key": BENCH_ENV["BENCH_ANTHROPIC_KEY"],
                },
            }
        ],
        num_retries=0,
    )


class Variants:
    """The three (or four) ways to make the same call, sharing one event loop."""

    def __init__(self, url: str, tmp: Path, *, with_run: bool, with_litellm: bool) -> None:
        import anthropic

        from agentd import budgets
        from agentd.config import load_config
        from agentd.executor import Executor
        from agentd.ledger import Ledger
        from agentd.logs import configure_logging

        configure_logging("info", json=True)  # what the daemon does under systemd
        loops = {
            "work": {
                "every": "30m",
                "tier": "fast",
                "max_tokens": MAX_TOKENS,
                "prompt": "work.md",
                "budget": {"per_day_usd": 1000},
            }
        }
        data = config_dict(url, loops, budgets={"per_day_usd": 10000, "per_month_usd": 100000})
        self.config = load_config(write_config(tmp / "conf", data, PROMPT))
        self.ledger = Ledger.open(tmp / "state")
        self.executor = Executor(self.config, self.ledger, env=BENCH_ENV)
        loop = self.config.loops["work"]
        self.windows = budgets.windows_for(
            "work",
            loop.budget.limits() if loop.budget else None,
            self.config.budgets.limits() if self.config.budgets else None,
        )
        self.run_id = self.ledger.start_run(loop="work", trigger="manual", simulated=False)
        self.raw = anthropic.AsyncAnthropic(
            api_key=BENCH_ENV["BENCH_ANTHROPIC_KEY"], base_url=url, max_retries=0, timeout=5
        )
        self.router = _litellm_router(url) if with_litellm else None
        self.calls: dict[str, Call] = {
            "a": self.call_raw,
            "a2": self.call_raw_lean,
            "b": self.call_agentd,
            "b0": self.call_agentd_unbudgeted,
        }
        if with_run:
            self.calls["b+"] = self.call_run
        if self.router is not None:
            self.calls["c"] = self.call_litellm

    async def call_raw(self) -> Any:
        return await self.raw.messages.create(
            model=ANTHROPIC_MODEL,
            max_tokens=MAX_TOKENS,
            messages=[{"role": "user", "content": PROMPT}],
        )

    async def call_raw_lean(self) -> Any:
        raw = await self.raw.messages.with_raw_response.create(
            model=ANTHROPIC_MODEL,
            max_tokens=MAX_TOKENS,
            messages=[{"role": "user", "content": PROMPT}],
        )
        body = json.loads(await raw.read())
        assert body["usage"]["output_tokens"]
        return body

    async def call_agentd(self) -> Any:
        plans = plans_for(self.config, "work", PROMPT)
        trace = RunTrace(run_id=self.run_id, loop="work", simulated=False)
        calls = RunCalls(self.config, self.executor, "work", trace, self.windows, {})
        outcome = await calls.call(PROMPT, plans, purpose="work", system=None)
        assert outcome.reply.text
        return outcome

    async def call_agentd_unbudgeted(self) -> Any:
        """(b) for a loop without any budget: no window sums in the reservation."""
        plans = plans_for(self.config, "work", PROMPT)
        trace = RunTrace(run_id=self.run_id, loop="work", simulated=False)
        calls = RunCalls(self.config, self.executor, "work", trace, [], {})
        return await calls.call(PROMPT, plans, purpose="work", system=None)

    async def call_run(self) -> Any:
        result = await run_loop(self.config, self.ledger, self.executor, "work")
        assert result.status == "ok", result.error
        return result

    async def call_litellm(self) -> Any:
        assert self.router is not None
        return await self.router.acompletion(
            model="haiku",
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=MAX_TOKENS,
        )

    async def aclose(self) -> None:
        await self.executor.aclose()
        await self.raw.close()
        self.ledger.close()


async def _gap(kind: str) -> None:
    """The untimed pause after each call: a sleep (the default), a busy wait, or none."""
    if kind == "sleep":
        await asyncio.sleep(GAP_S)
        return
    await asyncio.sleep(0)  # the event loop's turn: owed settles and callbacks run untimed
    if kind == "busy":
        # Keeps the CPU awake (no idle, no descheduled vCPU) for as long as the sleep would.
        end = time.perf_counter() + GAP_S
        while time.perf_counter() < end:
            pass


async def _interleaved(
    v: Variants, n: int, warmup: int, gap: str = "sleep"
) -> dict[str, list[float]]:
    """n rounds; each round times one call of every variant, in a random order (ms)."""
    names = list(v.calls)
    for _ in range(warmup):
        for name in names:
            await v.calls[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    clock = time.perf_counter_ns
    order = list(names)
    shuffle = random.Random(ORDER_SEED).shuffle
    for _ in range(n):
        # A fresh random order every round: each variant follows every other equally often,
        # so none always runs right after the raw SDK call (cold caches) or after agentd (warm).
        shuffle(order)
        for name in order:
            fn = v.calls[name]
            t0 = clock()
            await fn()
            samples[name].append((clock() - t0) / 1e6)
            # Untimed gap: LiteLLM leaves callbacks (logging, cost) running as background
            # tasks; without this they land inside whichever call is timed next.
            await _gap(gap)
    return samples


def _summarize(samples: dict[str, list[float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, vals in samples.items():
        out[f"{name}_p50"] = percentile(vals, 50)
        out[f"{name}_p99"] = percentile(vals, 99)
    a, b = samples["a"], samples["b"]
    diffs = [y - x for x, y in zip(a, b, strict=True)]
    out["b/a_p50"] = out["b_p50"] / out["a_p50"]
    out["b0/a_p50"] = out["b0_p50"] / out["a_p50"]
    out["overhead_unbudgeted_p50"] = out["b0_p50"] - out["a_p50"]
    out["overhead_unbudgeted_p99"] = out["b0_p99"] - out["a_p99"]
    out["overhead_p50"] = out["b_p50"] - out["a_p50"]
    out["overhead_p99"] = out["b_p99"] - out["a_p99"]
    # Paired (same round) difference: less sensitive to drift than p(b) - p(a).
    out["paired_diff_p50"] = percentile(diffs, 50)
    if "a2" in samples:
        out["b/a2_p50"] = out["b_p50"] / out["a2_p50"]
        out["overhead_vs_a2_p50"] = out["b_p50"] - out["a2_p50"]
        out["a-a2_p50"] = out["a_p50"] - out["a2_p50"]
    if "c" in samples:
        out["c/b_p50"] = out["c_p50"] / out["b_p50"]
        out["c/b_p99"] = out["c_p99"] / out["b_p99"]
    return out


async def _profile(v: Variants, n: int, top: int) -> str:
    """Profile n agentd calls with cProfile (and pyinstrument when installed)."""
    report = io.StringIO()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        await v.call_agentd()
    prof.disable()
    stats = pstats.Stats(prof, stream=report)
    report.write(f"\n## cProfile of {n} agentd calls, by own time (tottime)\n")
    stats.sort_stats("tottime").print_stats(top)
    report.write("\n## cProfile by cumulative time, agentd frames\n")
    stats.sort_stats("cumulative").print_stats(r"agentd/", top)
    try:
        from pyinstrument import Profiler
    except ImportError:
        report.write("\n(pyinstrument not installed: only cProfile above)\n")
        return report.getvalue()
    profiler = Profiler(interval=0.0002, async_mode="disabled")
    profiler.start()
    for _ in range(n):
        await v.call_agentd()
    profiler.stop()
    report.write(f"\n## pyinstrument of {n} agentd calls\n")
    report.write(profiler.output_text(unicode=False, color=False, show_all=False))
    return report.getvalue()


def _breakdown(v: Variants, n: int) -> dict[str, float]:
    """Mean µs of the synchronous pieces of (b), each run alone n times."""
    from agentd import budgets
    from agentd.logs import get_logger
    from agentd.providers.base import Usage
    from agentd.runcalls import plans_for

    entry = v.config.chain("work")[0]
    start = call_start(run_id=v.run_id)
    usage = Usage(input_tokens=20, output_tokens=16)
    out: dict[str, float] = {}
    ids: list[int] = []
    t0 = time.perf_counter()
    for _ in range(n):
        ids.append(budgets.reserve(v.ledger, start, 100, v.windows, v.config.tz))
    out["reserve_us"] = (time.perf_counter() - t0) / n * 1e6
    t0 = time.perf_counter()
    for call_id in ids:
        budgets.settle(
            v.ledger,
            call_id,
            status="ok",
            usage=usage,
            cost_micro_usd=50,
            priced=True,
            latency_ms=1,
            request_id="req_x",
        )
    out["settle_us"] = (time.perf_counter() - t0) / n * 1e6
    t0 = time.perf_counter()
    for _ in range(n):
        v.ledger.conn.execute("BEGIN IMMEDIATE")
        v.ledger.conn.execute("COMMIT")
    out["empty_write_txn_us"] = (time.perf_counter() - t0) / n * 1e6
    log = get_logger()
    t0 = time.perf_counter()
    for _ in range(n):
        log.info(
            "call.finished",
            loop="work",
            run_id=1,
            purpose="work",
            provider="anthropic",
            model=ANTHROPIC_MODEL,
            alias="haiku",
            attempt=1,
            status="ok",
            cost_micro_usd=50,
            latency_ms=1,
            input_tokens=20,
            output_tokens=16,
        )
    out["log_event_us"] = (time.perf_counter() - t0) / n * 1e6
    t0 = time.perf_counter()
    for _ in range(n):
        plans_for(v.config, "work", PROMPT)
        v.config.worst_case_micro_usd(entry.alias, None, [PROMPT], MAX_TOKENS)
    out["plans_and_pricing_us"] = (time.perf_counter() - t0) / n * 1e6
    return out


async def _run(args: argparse.Namespace, url: str, tmp: Path) -> dict[str, Any]:
    devnull = open(os.devnull, "w")  # noqa: SIM115 - swapped in and out around the timings
    real_stderr = sys.stderr
    result: dict[str, Any] = {"repeats": [], "rows_at_end": []}
    try:
        sys.stderr = devnull  # structlog writes to the current stderr: JSON lines, discarded
        for rep in range(args.repeats):
            # A fresh ledger each repeat (optionally prefilled: reservations read running
            # totals, so how full the windows are should not matter; bench_ledger --scaling).
            if args.prefill:
                from bench_ledger import _fill

                _fill(tmp / f"r{rep}" / "state", args.prefill)
            v = Variants(
                url, tmp / f"r{rep}", with_run=args.with_run, with_litellm=not args.no_litellm
            )
            try:
                samples = await _interleaved(v, args.calls, args.warmup, args.gap)
                result["repeats"].append(_summarize(samples))
                result["rows_at_end"].append(
                    v.ledger.conn.execute("SELECT COUNT(*) FROM calls").fetchone()[0]
                )
                if rep == args.repeats - 1:
                    if args.breakdown:
                        result["breakdown"] = _breakdown(v, max(200, args.calls // 5))
                    if args.profile:
                        result["profile"] = await _profile(v, args.profile_calls, args.top)
            finally:
                await v.aclose()
        if not args.no_litellm and "c_p50" not in result["repeats"][0]:
            result["note"] = (
                "litellm is not importable here: variant (c) skipped "
                "(install the bench extra, e.g. in /work/benchvenv)"
            )
    finally:
        sys.stderr = real_stderr
        devnull.close()
    return result


def _print(result: dict[str, Any]) -> None:
    reps: list[dict[str, float]] = result["repeats"]
    keys = sorted({k for r in reps for k in r}, key=lambda k: (k.split("_")[0], k))
    print(f"# {len(reps)} repeat(s); median (min–max) over repeats; times in ms")
    print("| metric | value |\n|---|---|")
    for key in keys:
        vals = [r[key] for r in reps if key in r]
        print(f"| {key} | {fmt_mmm(vals, 3)} |")
    print(f"# calls rows in the ledger at the end of each repeat: {result['rows_at_end']}")
    if "note" in result:
        print(f"# note: {result['note']}")
    if "breakdown" in result:
        print("\n# pieces of (b), each alone (mean µs)")
        for key, value in result["breakdown"].items():
            print(f"  {key:24s} {value:8.1f}")
    if "profile" in result:
        print(result["profile"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000, help="rounds per repeat")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--with-run", action="store_true", help="also time a whole run_loop")
    parser.add_argument("--no-litellm", action="store_true")
    parser.add_argument("--breakdown", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--profile-calls", type=int, default=500)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--prefill", type=int, default=0, help="settled rows put in the windows")
    parser.add_argument(
        "--gap",
        choices=("sleep", "busy", "zero"),
        default="sleep",
        help="the untimed pause after each call: 2 ms asleep, 2 ms busy, or none"
        " (without a sleep LiteLLM's background callbacks land in the next timed call)",
    )
    parser.add_argument(
        "--server-latency-ms",
        type=float,
        default=0.0,
        help="the server answers after exactly this long (a real provider's time to answer)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny and quick (CI)")
    parser.add_argument("--json", help="write results as JSON to this path")
    args = parser.parse_args(argv)
    if args.smoke:
        args.calls, args.warmup, args.repeats = 30, 5, 1
        args.breakdown, args.profile = True, True
        args.profile_calls, args.top = 20, 5
        args.with_run = True
    print_machine()
    latency = args.server_latency_ms
    with (
        tempfile.TemporaryDirectory(prefix="agentd-bench-") as tmp,
        ServerProcess(latency_ms=latency, latency_fixed=bool(latency)) as server,
    ):
        result = asyncio.run(_run(args, server.url, Path(tmp)))
    _print(result)
    emit_json(args.json, {"benchmark": "overhead", **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
