"""The provider interface: the `Provider` protocol and its `Request`/`Reply`/`Usage` values."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

Role = Literal["user", "assistant"]
CacheTtl = Literal["5m", "1h"]


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

    async def complete(self, request: Request) -> Reply:
        """Make one call (no retries: the executor owns them) and return the reply."""
        ...

    async def aclose(self) -> None:
        """Release the HTTP client."""
        ...
