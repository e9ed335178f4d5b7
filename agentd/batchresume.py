"""Finishing batch runs a stopped process left behind: adopt, wait, settle, conclude.

A batch call outlives the process that submitted it (`agentd.batches`): the daemon stopped
mid-wait, or `agentd once --no-wait` returned at submission. Its row stays `submitted`
with the batch id and the stored request, and its run stays `running`. The daemon scans for
such calls whose owner is gone (at start, then every `SCAN_INTERVAL_S`), adopts each one
(compare-and-set of the owner, under the loop's lock, so two processes never both finish
it), waits for the item with the loop's backoff, settles the call at the batch price and
finishes the run as `run_loop` would: delivery, wake, loop state, anomaly check. An item
that ended without a reply follows the loop's `on_failure`, as in a live run.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from agentd import budgets, pricing
from agentd.batches import (
    BatchItemFailed,
    BatchMode,
    StoredRequest,
    as_batch_provider,
    forget_request,
    wait_for_item,
)
from agentd.config import ChainEntry, Config
from agentd.errors import AgentdError, LoopBusy
from agentd.executor import Attempt, CallOutcome, Executor, RunTrace
from agentd.ledger import Ledger, parse_iso
from agentd.logs import get_logger
from agentd.looplock import loop_lock
from agentd.owner import current_owner, owner_alive
from agentd.runend import RunResult, conclude_resumed

SCAN_INTERVAL_S = 60.0


@dataclass(frozen=True)
class Orphan:
    """A submitted batch call whose process is gone, with what finishing its run needs."""

    call_id: int
    run_id: int
    loop: str
    owner: str | None
    batch_id: str
    attempt: int
    reserved_micro_usd: int
    stored: StoredRequest
    route: dict[str, Any]
    submitted_at: str
    slot: str | None
    provider: str


def find_orphans(ledger: Ledger, *, simulated: bool) -> list[Orphan]:
    """Submitted batch calls of this mode (real or simulated) whose owner process is gone."""
    with ledger.read() as conn:
        rows = conn.execute(
            "SELECT c.id, c.run_id, c.loop, c.owner, c.batch_id, c.attempt,"
            " c.reserved_micro_usd, b.request, b.route, b.submitted_at, r.slot, c.provider"
            " FROM calls c JOIN batch_requests b ON b.call_id = c.id"
            " JOIN runs r ON r.id = c.run_id"
            " WHERE c.status = 'submitted' AND c.batch = 1 AND c.simulated = ?"
            " ORDER BY c.id",
            (int(simulated),),
        ).fetchall()
    orphans = []
    for row in rows:
        owner = None if row[3] is None else str(row[3])
        if owner is not None and owner_alive(owner):
            continue
        orphans.append(
            Orphan(
                call_id=int(row[0]),
                run_id=int(row[1]),
                loop=str(row[2]),
                owner=owner,
                batch_id=str(row[4]),
                attempt=int(row[5]),
                reserved_micro_usd=int(row[6]),
                stored=StoredRequest.from_json(str(row[7])),
                route=json.loads(str(row[8])),
                submitted_at=str(row[9]),
                slot=None if row[10] is None else str(row[10]),
                provider=str(row[11]),
            )
        )
    return orphans


def adopt(ledger: Ledger, orphan: Orphan) -> bool:
    """Make this process the owner of the call and its run; False when another got it first."""
    me = current_owner()
    with ledger.write() as conn:
        taken = conn.execute(
            "UPDATE calls SET owner = ? WHERE id = ? AND status = 'submitted' AND owner IS ?",
            (me, orphan.call_id, orphan.owner),
        ).rowcount
        if taken:
            conn.execute("UPDATE runs SET owner = ? WHERE id = ?", (me, orphan.run_id))
    return bool(taken)


class BatchResumer:
    """The daemon's part: scan for orphaned batch calls and finish each in its own task."""

    def __init__(
        self,
        ledger: Ledger,
        current: Callable[[], tuple[Config, Executor]],
        on_result: Callable[[RunResult], None] = lambda _: None,
    ) -> None:
        self.ledger = ledger
        # What the daemon does after any run (alerts, backoff, `on_reply` wakes).
        self._on_result = on_result
        # The config and executor in force now (a reload swaps them): read at each scan.
        self._current = current
        self.tasks: dict[int, asyncio.Task[RunResult | None]] = {}
        self._log = get_logger()

    def scan(self) -> int:
        """Start a task for every orphan not already being finished; return how many started."""
        started = 0
        config, executor = self._current()
        for orphan in find_orphans(self.ledger, simulated=executor.simulate):
            if orphan.call_id in self.tasks:
                continue
            task = asyncio.create_task(
                self.finish(config, executor, orphan), name=f"batch-{orphan.call_id}"
            )
            self.tasks[orphan.call_id] = task
            task.add_done_callback(self._forget_task)
            started += 1
        return started

    def _forget_task(self, task: asyncio.Task[RunResult | None]) -> None:
        self.tasks = {cid: t for cid, t in self.tasks.items() if t is not task}

    async def run_forever(self, interval_s: float = SCAN_INTERVAL_S) -> None:
        """Scan now and then every `interval_s` (picks up `agentd once --no-wait` submissions)."""
        try:
            while True:
                try:
                    self.scan()
                except AgentdError as exc:
                    self._log.warning("batch.scan_failed", error=str(exc))
                await asyncio.sleep(interval_s)
        finally:
            # Shutdown: stop waiting; each call stays `submitted` for the next start.
            for task in list(self.tasks.values()):
                task.cancel()
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)

    async def finish(self, config: Config, executor: Executor, orphan: Orphan) -> RunResult | None:
        """Adopt one orphan and finish its run; None when it was not ours to finish."""
        try:
            with loop_lock(self.ledger.path.parent, orphan.loop):
                if not adopt(self.ledger, orphan):
                    return None
                self._log.info(
                    "batch.resumed", call_id=orphan.call_id, run_id=orphan.run_id, loop=orphan.loop
                )
                result = await finish_orphan(config, self.ledger, executor, orphan)
            self._on_result(result)
            return result
        except LoopBusy:
            return None  # the loop is running here or elsewhere: the next scan tries again
        except AgentdError as exc:
            # Left `submitted`: the next scan (or start) tries again, and the log says why.
            self._log.error("batch.resume_failed", call_id=orphan.call_id, error=str(exc))
            return None


async def finish_orphan(
    config: Config, ledger: Ledger, executor: Executor, orphan: Orphan
) -> RunResult:
    """Wait for the orphan's item, settle it, and conclude its run (caller holds the lock)."""
    stored = orphan.stored
    entry = _entry(config, orphan)
    trace = RunTrace(run_id=orphan.run_id, loop=orphan.loop, simulated=executor.simulate)
    trace.numbered = orphan.attempt
    trace.route = orphan.route
    trace.batch_ids.append(orphan.batch_id)
    route = orphan.route
    mode = BatchMode.for_loop(config, orphan.loop) if orphan.loop in config.loops else None
    mode = mode or BatchMode()
    provider = executor.provider_for(entry)
    pending = Attempt(
        call_id=orphan.call_id,
        attempt=orphan.attempt,
        purpose=stored.purpose,
        tier=stored.tier,
        alias=stored.alias,
        provider=orphan.provider,
        model=stored.model,
        status="pending",
        cost_micro_usd=0,
        reserved_micro_usd=orphan.reserved_micro_usd,
    )
    waited = (datetime.now(UTC) - parse_iso(orphan.submitted_at)).total_seconds()
    price = config.price(stored.alias, batch=True) if stored.alias in config.models else None
    try:
        reply = await wait_for_item(
            as_batch_provider(provider),
            orphan.batch_id,
            stored.custom_id,
            mode,
            call_id=orphan.call_id,
            waited_s=max(waited, 0.0),
        )
    except BatchItemFailed as exc:
        executor.recorder.record(
            trace,
            replace(pending, status="error", error_type=exc.code, error=str(exc)),
            usage=None,
            priced=price is not None,
        )
        forget_request(ledger, orphan.call_id)
        if mode.on_failure == "fail" or orphan.loop not in config.loops:
            return await conclude_resumed(config, ledger, trace, route, str(exc), orphan.slot)
        trace.batch_fallback = str(exc)
        return await _direct(config, ledger, executor, trace, route, orphan)
    cost = pricing.to_micro_usd(pricing.cost_usd(price, reply.usage)) if price else 0
    executor.recorder.record(
        trace,
        replace(pending, status="ok", cost_micro_usd=cost, request_id=reply.request_id),
        usage=reply.usage,
        priced=price is not None,
        served_model=reply.model,
    )
    forget_request(ledger, orphan.call_id)
    outcome = CallOutcome(reply=reply, entry=entry, cost_micro_usd=cost, fallback=False)
    return await conclude_resumed(config, ledger, trace, route, outcome, orphan.slot)


async def _direct(
    config: Config,
    ledger: Ledger,
    executor: Executor,
    trace: RunTrace,
    route: dict[str, Any],
    orphan: Orphan,
) -> RunResult:
    """`on_failure: call` after a restart: the stored request, made directly along the chain."""
    stored = orphan.stored
    request = stored.request()
    chain = (
        config.tier_chain(stored.tier) if stored.tier in config.tiers else config.chain(orphan.loop)
    )
    loop = config.loops[orphan.loop]
    windows = budgets.windows_for(
        orphan.loop,
        loop.budget.limits() if loop.budget else None,
        config.budgets.limits() if config.budgets else None,
    )
    try:
        outcome = await executor.call(
            trace,
            purpose=stored.purpose,
            chain=chain,
            system=request.system,
            messages=request.messages,
            max_tokens=request.max_tokens,
            windows=windows,
            cache=request.cache,
        )
    except AgentdError as exc:
        return await conclude_resumed(config, ledger, trace, route, str(exc), orphan.slot)
    return await conclude_resumed(config, ledger, trace, route, outcome, orphan.slot)


def _entry(config: Config, orphan: Orphan) -> ChainEntry:
    """The chain entry the call was made on (its alias must still be configured)."""
    stored = orphan.stored
    if stored.alias not in config.models:
        raise AgentdError(
            f"batch call {orphan.call_id}: model alias {stored.alias!r} is no longer configured"
        )
    model = config.models[stored.alias]
    return ChainEntry(
        tier=stored.tier,
        alias=stored.alias,
        model=model,
        provider_name=model.provider,
        provider=config.providers[model.provider],
    )
