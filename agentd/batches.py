"""Batch calls: submit one request to a provider's batch API, wait for its item, settle it.

A loop with `batch:` gets half-price calls that finish within minutes to hours. The ledger
row is reserved (at the batch price) before submission like any call, becomes `submitted`
with its `batch_id` once the provider took it, and is settled when the item ends. While it
is `submitted` it belongs to the provider, not to a process: a daemon that stops mid-wait
leaves it (and its run) for the next start to finish (`agentd.batchresume`), and the
reconciliation of dead owners never charges it as abandoned.

Polling starts after 1 s and doubles up to the loop's `poll_max`; a batch not ended after
`timeout` (or an item that expired, was canceled or errored) is a `BatchItemFailed`, and
the loop's `on_failure` decides: a direct call at full price, or a failed run.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

from agentd import budgets
from agentd.errors import AgentdError, ModelUnavailable, ProviderError
from agentd.ledger import Ledger
from agentd.logs import get_logger
from agentd.providers.base import (
    BatchProvider,
    BatchSubmission,
    CacheMark,
    Message,
    Reply,
    Request,
)

if TYPE_CHECKING:
    from agentd.attempts import Attempt, RunTrace
    from agentd.config import Config

Sleep = Callable[[float], Awaitable[None]]

FIRST_POLL_S = 1.0


@dataclass(frozen=True)
class BatchMode:
    """How a run uses batches: the loop's `batch:` settings, and whether to wait at all."""

    on_failure: Literal["call", "fail"] = "call"
    poll_max_s: float = 60.0
    timeout_s: float = 86_400.0
    wait: bool = True  # False: `agentd once --no-wait` returns once the item is submitted

    @classmethod
    def for_loop(cls, config: Config, loop_name: str, *, wait: bool = True) -> BatchMode | None:
        """The loop's batch mode, or None when the loop does not batch."""
        setting = config.loops[loop_name].batch
        if setting is None:
            return None
        return cls(
            on_failure=setting.on_failure,
            poll_max_s=float(setting.poll_max_seconds),
            timeout_s=float(setting.timeout_seconds),
            wait=wait,
        )


class BatchItemFailed(ProviderError):
    """A batch item that ended without a reply: expired, canceled, errored, or timed out."""

    retryable = False

    def __init__(
        self,
        message: str,
        *,
        code: str,
        http_status: int | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message, http_status=http_status, request_id=request_id)
        self.code = code


class BatchDetached(AgentdError):
    """The item is submitted and the caller chose not to wait: the daemon finishes the run."""

    exit_code = 0

    def __init__(self, call_id: int, batch_id: str) -> None:
        self.call_id = call_id
        self.batch_id = batch_id
        super().__init__(f"submitted to batch {batch_id} (call {call_id}); the daemon finishes it")


@dataclass
class Submitted:
    """Set once the provider took the item: from then on the row is the provider's to finish."""

    batch_id: str | None = None
    custom_id: str | None = None


@dataclass
class StoredRequest:
    """What a restarted daemon needs to wait for a batch call and, if need be, make it directly."""

    model: str
    messages: list[dict[str, str]]
    max_tokens: int
    system: str | None
    timeout_s: float
    cache: dict[str, Any] | None
    purpose: str
    tier: str | None
    alias: str
    custom_id: str

    @classmethod
    def of(cls, request: Request, attempt: Attempt, custom_id: str) -> StoredRequest:
        """Keep a request and the attempt's purpose, tier and alias."""
        return cls(
            model=request.model,
            messages=[{"role": m.role, "content": m.content} for m in request.messages],
            max_tokens=request.max_tokens,
            system=request.system,
            timeout_s=request.timeout_s,
            cache=None if request.cache is None else asdict(request.cache),
            purpose=attempt.purpose,
            tier=attempt.tier,
            alias=attempt.alias,
            custom_id=custom_id,
        )

    def request(self) -> Request:
        """The provider-neutral request again."""
        return Request(
            model=self.model,
            messages=tuple(Message(m["role"], m["content"]) for m in self.messages),  # type: ignore[arg-type]
            max_tokens=self.max_tokens,
            system=self.system,
            timeout_s=self.timeout_s,
            cache=None if self.cache is None else CacheMark(**self.cache),
        )

    def to_json(self) -> str:
        """The JSON kept in `batch_requests.request`."""
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> StoredRequest:
        """Read it back."""
        return cls(**json.loads(text))


class BatchWaiters:
    """The runs waiting on a batch item; once let go, every waiter is cancelled.

    A stopping daemon lets its waiters go rather than wait hours for their items: the rows stay
    `submitted` and the next start finishes them (`agentd.batchresume`). A run still submitting
    its item when the stop began does not start waiting (`released`).
    """

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._released = False

    @property
    def released(self) -> bool:
        """True once let go: a run about to wait must stop instead."""
        return self._released

    def add(self, task: asyncio.Task[Any]) -> None:
        """`task` waits on an item from now on."""
        self._tasks.add(task)

    def discard(self, task: asyncio.Task[Any]) -> None:
        """`task` no longer waits."""
        self._tasks.discard(task)

    def let_go(self) -> None:
        """Cancel every waiting run, and mark the waiters released for the runs still to come."""
        self._released = True
        for task in list(self._tasks):
            task.cancel()


def custom_id_for(call_id: int) -> str:
    """The batch item's `custom_id`: the ledger's call id, so a result finds its row."""
    return f"agentd-call-{call_id}"


def as_batch_provider(provider: object) -> BatchProvider:
    """The provider as a `BatchProvider`, or a `BatchItemFailed` when it has no batch API."""
    if isinstance(provider, BatchProvider):
        return provider
    name = getattr(provider, "name", type(provider).__name__)
    raise BatchItemFailed(f"{name}: provider has no batch API", code="batch_unsupported")


async def submit(
    ledger: Ledger,
    provider: BatchProvider,
    request: Request,
    *,
    call_id: int,
    run_id: int,
    stored: StoredRequest,
    route: dict[str, Any],
    into: Submitted,
) -> BatchSubmission:
    """Create the batch and mark the row `submitted` with its batch id and stored request."""
    submission = await provider.submit_batch(request, stored.custom_id)
    into.batch_id, into.custom_id = submission.batch_id, submission.custom_id
    budgets.mark_submitted(
        ledger,
        call_id,
        request_id=submission.request_id,
        batch_id=submission.batch_id,
        batch_request=(run_id, stored.to_json(), json.dumps(route, default=str)),
    )
    get_logger().info(
        "batch.submitted", call_id=call_id, batch_id=submission.batch_id, model=request.model
    )
    return submission


async def wait_for_item(
    provider: BatchProvider,
    batch_id: str,
    custom_id: str,
    mode: BatchMode,
    *,
    call_id: int,
    waited_s: float = 0.0,
    sleep: Sleep = asyncio.sleep,
) -> Reply:
    """Poll until the item ends: its reply, or `BatchItemFailed` (ended badly or timed out).

    `waited_s` is how long the batch has already run (a resumed wait keeps its deadline).
    A failed poll (network, 5xx, 429) is logged and polled again later: the batch lives on
    at the provider whatever happened to one status request.
    """
    log = get_logger()
    started = time.monotonic() - waited_s
    delay = FIRST_POLL_S
    while True:
        await sleep(delay)
        delay = min(delay * 2, mode.poll_max_s)
        try:
            outcome = await provider.poll_batch(batch_id, custom_id)
        except ModelUnavailable as exc:
            # 404: the provider no longer knows the batch (deleted, or another account's key).
            raise BatchItemFailed(f"batch {batch_id}: {exc}", code="batch_not_found") from exc
        except ProviderError as exc:
            log.warning("batch.poll_failed", batch_id=batch_id, call_id=call_id, error=str(exc))
            outcome = None
        if outcome is not None and outcome.state == "succeeded":
            if outcome.reply is None:
                raise BatchItemFailed(
                    f"batch {batch_id}: succeeded item without a reply", code="batch_errored"
                )
            return outcome.reply
        if outcome is not None and outcome.state != "in_progress":
            error = outcome.error
            detail = str(error) if error is not None else (outcome.detail or outcome.state)
            raise BatchItemFailed(
                f"batch {batch_id}: item {outcome.state}: {detail}",
                code=f"batch_{outcome.state}" if error is None else error.code,
                http_status=None if error is None else error.http_status,
                request_id=None if error is None else error.request_id,
            )
        if time.monotonic() - started >= mode.timeout_s:
            raise BatchItemFailed(
                f"batch {batch_id}: not ended after {mode.timeout_s:g}s", code="batch_timeout"
            )


def submitted_batch_calls(ledger: Ledger, run_id: int) -> list[int]:
    """Ids of the run's calls still waiting on a provider batch."""
    with ledger.read() as conn:
        rows = conn.execute(
            "SELECT id FROM calls WHERE run_id = ? AND status = 'submitted' AND batch = 1",
            (run_id,),
        ).fetchall()
    return [int(r[0]) for r in rows]


def forget_request(ledger: Ledger, call_id: int) -> None:
    """Drop a settled call's stored request (the prompt need not outlive its call)."""
    with ledger.write() as conn:
        conn.execute("DELETE FROM batch_requests WHERE call_id = ?", (call_id,))


async def submit_and_wait(
    ledger: Ledger,
    trace: RunTrace,
    pending: Attempt,
    provider: object,
    request: Request,
    mode: BatchMode,
    submitted: Submitted,
    *,
    release: Callable[[], None],
    waiters: BatchWaiters,
    sleep: Sleep = asyncio.sleep,
) -> Reply:
    """Submit a pending attempt as a one-item batch and wait for its reply.

    `release` gives back the provider's concurrency slot once the item is submitted; the
    waiting task is in `waiters` meanwhile (a stopping daemon lets those go at once). On
    cancellation the row stays `submitted`, its request kept, for the next start to finish;
    `submitted.batch_id` is cleared whenever the caller is to settle the row itself.
    `BatchDetached` when `mode.wait` is off: the item is submitted and nobody waits.
    """
    batcher = as_batch_provider(provider)
    stored = StoredRequest.of(request, pending, custom_id_for(pending.call_id))
    await submit(
        ledger,
        batcher,
        request,
        call_id=pending.call_id,
        run_id=trace.run_id,
        stored=stored,
        route=trace.route or {},
        into=submitted,
    )
    assert submitted.batch_id is not None and submitted.custom_id is not None
    trace.batch_ids.append(submitted.batch_id)
    if not mode.wait:
        raise BatchDetached(pending.call_id, submitted.batch_id)
    release()  # the provider holds the work now; let other calls use the slot
    waiter = asyncio.current_task()
    if waiter is not None:
        waiters.add(waiter)
    try:
        if waiters.released:
            # The daemon began stopping while this run was submitting: stop as a waiting run
            # let go does, the item left for the next start.
            raise asyncio.CancelledError
        reply = await wait_for_item(
            batcher,
            submitted.batch_id,
            submitted.custom_id,
            mode,
            call_id=pending.call_id,
            sleep=sleep,
        )
    except asyncio.CancelledError:
        raise  # shutdown: the row stays `submitted` for the next start to finish
    except BaseException:
        submitted.batch_id = None  # ended (or broke): the caller settles the row
        forget_request(ledger, pending.call_id)
        raise
    finally:
        if waiter is not None:
            waiters.discard(waiter)
    submitted.batch_id = None
    forget_request(ledger, pending.call_id)
    return reply
