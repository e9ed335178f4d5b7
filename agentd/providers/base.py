"""The provider interface: the `Provider` protocol and its `Request`/`Reply`/`Usage` values."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    from agentd.errors import ProviderError

Role = Literal["user", "assistant"]
CacheTtl = Literal["5m", "1h"]
# Where one batch item stands: still running, or how it ended (`expired` and `canceled` items
# were never processed and are not billed; `errored` ones carry the provider's error).
BatchState = Literal["in_progress", "succeeded", "errored", "expired", "canceled"]


@dataclass(frozen=True)
class Message:
    """One chat message."""

    role: Role
    content: str


@dataclass(frozen=True)
class CacheMark:
    """Mark a stable prefix for prompt caching: the system prompt and the first message's head.

    `prefix_chars` counts characters of the first message's content that belong to the prefix
    (0: only the system prompt). Providers without explicit caching ignore the mark.
    """

    ttl: CacheTtl
    prefix_chars: int = 0


@dataclass(frozen=True)
class Request:
    """One model call, provider-neutral. `model` is the provider's model id, not the alias."""

    model: str
    messages: tuple[Message, ...]
    max_tokens: int
    system: str | None = None
    timeout_s: float = 60.0
    cache: CacheMark | None = None


@dataclass(frozen=True)
class Usage:
    """Token counts with the ledger's semantics, the same for every provider.

    `input_tokens` is all input, cache reads and writes included; `cache_read_tokens` and
    `cache_write_tokens` are the parts of it billed at cache rates. `cache_write_1h_tokens` is
    the part of `cache_write_tokens` written with a 1-hour TTL (billed at the 1h write rate).
    `output_tokens` includes `reasoning_tokens`.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    cache_write_1h_tokens: int = 0

    @property
    def cache_write_5m_tokens(self) -> int:
        """Cache writes billed at the 5-minute write rate."""
        return self.cache_write_tokens - self.cache_write_1h_tokens

    @property
    def uncached_input_tokens(self) -> int:
        """Input tokens billed at the plain input price."""
        return self.input_tokens - self.cache_read_tokens - self.cache_write_tokens


@dataclass(frozen=True)
class Reply:
    """What a provider answered: text, usage, the model it says it used, its request id."""

    text: str
    usage: Usage
    model: str
    request_id: str | None = None
    stop_reason: str | None = None


class Provider(Protocol):
    """A model API. Implementations translate SDK errors into `agentd.errors` at this boundary."""

    name: str

    async def prepare(self) -> None:
        """Import the SDK and build the client off the event loop; `complete` does it too.

        Awaited before a call's latency clock starts, so the first call's latency is the
        request's and not the SDK's import (seconds).
        """
        ...

    async def complete(self, request: Request) -> Reply:
        """Make one call (no retries: the executor owns them) and return the reply."""
        ...

    async def aclose(self) -> None:
        """Release the HTTP client."""
        ...


@dataclass(frozen=True)
class BatchSubmission:
    """A request accepted into a provider batch: the batch's id and the item's `custom_id`."""

    batch_id: str
    custom_id: str
    request_id: str | None = None  # the HTTP request id of the create call


@dataclass(frozen=True)
class BatchOutcome:
    """One poll of a batch item: its state and, once it ended, its reply or its error."""

    state: BatchState
    reply: Reply | None = None  # set when `succeeded`
    error: ProviderError | None = None  # set when `errored`, mapped like a direct call's error
    detail: str | None = None  # a short human note (the batch's status, an expiry reason)


@runtime_checkable
class BatchProvider(Protocol):
    """A provider with a batch API (half price, results within 24 hours).

    agentd submits one item per batch: a run waits for its own result, and one item per batch
    keeps a failed or expired batch from taking other runs' calls with it.
    """

    name: str

    async def submit_batch(self, request: Request, custom_id: str) -> BatchSubmission:
        """Create a batch holding `request` as its only item; errors map like `complete`'s."""
        ...

    async def poll_batch(self, batch_id: str, custom_id: str) -> BatchOutcome:
        """The item's state now; its reply or error once the batch has ended."""
        ...
