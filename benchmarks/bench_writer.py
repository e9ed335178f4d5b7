"""Would a writer process take the reservation off the call's path? An IPC experiment.

The fourth session left one idea for §1: write the reservation outside this process's GIL,
in a writer process, while the SDK builds the request, and hold the request until the
writer says the row is committed. This measures that idea without building it into agentd.
One zero-latency fake server (`fastserver.py`); interleaved in a random order each round:

  (a)      the raw SDK call (`messages.create`, through a pass-through httpx transport, so
           every variant pays the same transport layer)
  (in)     `agentd.budgets.reserve` in this process (3 budget windows, a real ledger), then (a)
  (proc)   the same reservation made by a writer process (one byte down a pipe, the row id
           back), waited for, then (a)
  (gate)   the same, but the call starts at once and its transport holds the request until
           the writer's answer arrives: the overlap the idea is about

Each variant's added time is p50 minus (a)'s p50. The writer is `python bench_writer.py
--writer STATE_DIR`: it opens its own ledger and calls the real `budgets.reserve`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ANTHROPIC_MODEL, BENCH_ENV, call_start, emit_json, percentile, print_machine
from fastserver import ServerProcess

from agentd import budgets
from agentd.budgets import Window
from agentd.ledger import Ledger

PROMPT = "Classify this ticket as bug, feature or question: the export button does nothing."
RESERVE_MICRO_USD = 150
GAP_S = 0.002
START = call_start()


def _windows() -> list[Window]:
    """A loop day budget and global day + month budgets, as bench_overhead's (b)."""
    return budgets.windows_for(
        "work",
        {"per_day_usd": Decimal(1000)},
        {"per_day_usd": Decimal(10000), "per_month_usd": Decimal(100000)},
    )


def writer_main(state_dir: Path) -> None:
    """The writer process: one reservation per byte read on stdin, its row id written back."""
    answers = os.dup(1)
    os.dup2(2, 1)  # the ledger's log events go to stderr, not into the answers
    ledger = Ledger.open(state_dir)
    windows, tz = _windows(), ZoneInfo("UTC")
    os.write(answers, b"ready\n")
    while chunk := os.read(0, 64):
        for _ in chunk:
            call_id = budgets.reserve(ledger, START, RESERVE_MICRO_USD, windows, tz)
            os.write(answers, b"%d\n" % call_id)
    ledger.close()


def _transport_module() -> Any:
    """The httpx flavour the installed Anthropic SDK takes (`httpx2` for 2.x)."""
    try:
        import httpx2

        return httpx2
    except ImportError:
        import httpx

        return httpx


class _Answers:
    """The writer's answers on a non-blocking pipe: how many are still owed."""

    def __init__(self, fd: int) -> None:
        self.fd, self.owed, self.buf = fd, 0, b""
        os.set_blocking(fd, False)

    def _drain(self) -> None:
        try:
            self.buf += os.read(self.fd, 4096)
        except BlockingIOError:
            return
        lines = self.buf.split(b"\n")
        self.buf = lines.pop()
        self.owed -= len(lines)

    async def wait(self) -> None:
        """Return once every reservation asked for has been answered."""
        if self.owed <= 0:
            return
        self._drain()
        if self.owed <= 0:
            return
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def readable() -> None:
            self._drain()
            if self.owed <= 0 and not done.done():
                done.set_result(None)

        loop.add_reader(self.fd, readable)
        try:
            await done
        finally:
            loop.remove_reader(self.fd)


def _gated_client(url: str, answers: _Answers | None) -> Any:
    """An SDK client whose transport waits for `answers` (if any) before each request."""
    import anthropic

    httpx = _transport_module()

    class Gate(httpx.AsyncBaseTransport):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            self.inner = httpx.AsyncHTTPTransport()

        async def handle_async_request(self, request: Any) -> Any:
            if answers is not None:
                await answers.wait()
            return await self.inner.handle_async_request(request)

        async def aclose(self) -> None:
            await self.inner.aclose()

    return anthropic.AsyncAnthropic(
        api_key=BENCH_ENV["BENCH_ANTHROPIC_KEY"],
        base_url=url,
        max_retries=0,
        timeout=5,
        http_client=httpx.AsyncClient(transport=Gate()),
    )


async def _measure(url: str, tmp: Path, rounds: int, warmup: int) -> dict[str, list[float]]:
    writer = subprocess.Popen(
        [sys.executable, __file__, "--writer", str(tmp / "writer")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        bufsize=0,
    )
    assert writer.stdin is not None and writer.stdout is not None
    try:
        if writer.stdout.readline() != b"ready\n":
            raise RuntimeError("the writer process did not start")
        answers = _Answers(writer.stdout.fileno())
        to_writer = writer.stdin.fileno()
        plain, gated = _gated_client(url, None), _gated_client(url, answers)
        ledger = Ledger.open(tmp / "inproc")
        windows, tz = _windows(), ZoneInfo("UTC")

        async def create(client: Any) -> None:
            reply = await client.messages.create(
                model=ANTHROPIC_MODEL,
                max_tokens=64,
                messages=[{"role": "user", "content": PROMPT}],
            )
            assert reply.usage.output_tokens

        async def raw() -> None:
            await create(plain)

        async def in_process() -> None:
            budgets.reserve(ledger, START, RESERVE_MICRO_USD, windows, tz)
            await create(plain)

        async def by_process() -> None:
            os.write(to_writer, b"r")
            answers.owed += 1
            await answers.wait()
            await create(plain)

        async def gated_by_process() -> None:
            os.write(to_writer, b"r")
            answers.owed += 1
            await create(gated)

        calls: dict[str, Callable[[], Awaitable[None]]] = {
            "a": raw,
            "in": in_process,
            "proc": by_process,
            "gate": gated_by_process,
        }
        for _ in range(warmup):
            for fn in calls.values():
                await fn()
                await asyncio.sleep(GAP_S)
        samples: dict[str, list[float]] = {name: [] for name in calls}
        order, shuffle = list(calls), random.Random(20261126).shuffle
        for _ in range(rounds):
            shuffle(order)
            for name in order:
                t0 = time.perf_counter_ns()
                await calls[name]()
                samples[name].append((time.perf_counter_ns() - t0) / 1e6)
                await asyncio.sleep(GAP_S)
        await plain.close()
        await gated.close()
        ledger.close()
        return samples
    finally:
        writer.stdin.close()
        writer.wait(timeout=10)


def _summary(samples: dict[str, list[float]]) -> dict[str, float]:
    a = percentile(samples["a"], 50)
    out: dict[str, float] = {}
    for name, values in samples.items():
        p50 = percentile(values, 50)
        out[f"{name}_p50_ms"] = p50
        out[f"{name}_p99_ms"] = percentile(values, 99)
        out[f"{name}_added_us"] = (p50 - a) * 1000
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the experiment (or, with `--writer`, be the writer process)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=800)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny and quick (CI)")
    parser.add_argument("--json", help="write results as JSON to this path")
    parser.add_argument("--writer", help=argparse.SUPPRESS)  # the writer process's mode
    args = parser.parse_args(argv)
    if args.writer:
        writer_main(Path(args.writer))
        return 0
    if args.smoke:
        args.rounds, args.warmup, args.repeats = 30, 5, 1
    print_machine()
    repeats: list[dict[str, float]] = []
    with ServerProcess() as server:
        for rep in range(args.repeats):
            with tempfile.TemporaryDirectory(prefix="agentd-bench-writer-") as tmp:
                samples = asyncio.run(_measure(server.url, Path(tmp), args.rounds, args.warmup))
            repeats.append(_summary(samples))
            shown = ", ".join(f"{k} {v:.3f}" for k, v in repeats[-1].items())
            print(f"# repeat {rep + 1}: {shown}")
    print(f"# {args.repeats} repeat(s) × {args.rounds} rounds; median (min–max) of the repeats")
    print("| variant | p50 ms | p99 ms | added to (a), µs |\n|---|---|---|---|")
    for name in ("a", "in", "proc", "gate"):
        cells = []
        for key in (f"{name}_p50_ms", f"{name}_p99_ms", f"{name}_added_us"):
            vals = sorted(r[key] for r in repeats)
            cells.append(f"{vals[len(vals) // 2]:.3f} ({vals[0]:.3f}–{vals[-1]:.3f})")
        print(f"| {name} | " + " | ".join(cells) + " |")
    emit_json(args.json, {"benchmark": "writer", "repeats": repeats})
    return 0


if __name__ == "__main__":
    sys.exit(main())
