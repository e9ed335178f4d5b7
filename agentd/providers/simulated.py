"""The offline simulated model behind `--simulate`: deterministic replies and token counts.

What it answers, so that every loop behaves like a healthy real run:

- a prompt with a line `Labels: a | b | c` (the classifier's last line, see
  `agentd.routeprompts`) gets one of those labels;
- a prompt asking for `one number from 0.0 to 1.0` (the reviewer's last line) gets a score
  from 0.50 to 1.00;
- a prompt asking for a list `numbered 1. to N` gets N numbered lines;
- a prompt that offers a quiet token such as `HEARTBEAT_OK` gets the token back;
- anything else gets a short placeholder text.

It also simulates Anthropic's prompt cache for requests that mark a prefix (see `_cached`),
and a batch API: `submit_batch` keeps the request in memory under a batch id
derived from it, and `poll_batch` answers at once with what `complete` would have. A batch
it does not know (submitted before a daemon restart) succeeds with a placeholder reply that
says so and a token count that only covers that placeholder: the request is gone, so its
real size cannot be known, and a simulated poll must never fail a run.

When a prompt has several of these, the one nearest its end wins: it is the instruction that
frames everything before it. The choice among labels and the score come from a hash of the
request, so the same request always gets the same answer.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable

from agentd.providers.base import BatchOutcome, BatchSubmission, Message, Reply, Request, Usage

# A quiet token such as HEARTBEAT_OK: a prompt that offers one gets it back, so simulated
# heartbeats behave like a healthy real run (recorded, not delivered).
QUIET_TOKEN = re.compile(r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)*_OK\b")
LABELS_LINE = re.compile(r"^Labels: *([a-z0-9_]+(?: *\| *[a-z0-9_]+)*) *$", re.MULTILINE)
SCORE_REQUEST = re.compile(r"one number from 0\.0 to 1\.0")
LIST_REQUEST = re.compile(r"numbered 1\. to (\d+)")
MESSAGE_OVERHEAD = 4  # tokens a chat format spends around each message (role, separators)
REPLY_OVERHEAD = 3  # and to prime the reply
MAX_BATCHES = 10_000  # simulated batches kept for polling (a poll answers at once, so few wait)


class SimulatedProvider:
    """A stand-in model that never touches the network and always answers the same way."""

    def __init__(self, name: str = "simulated", *, clock: Callable[[], float] = time.time) -> None:
        self.name = name
        # (batch id, custom id) -> the request; in memory only, like the rest of --simulate.
        self._batches: dict[tuple[str, str], Request] = {}
        # The prompt cache: (model, prefix digest, ttl) -> when the entry expires (`clock`).
        self._cache: dict[tuple[str, bytes, str], float] = {}
        self._clock = clock

    async def complete(self, request: Request) -> Reply:
        """Answer from a hash of the request: same request, same reply and usage."""
        parts = [request.system or "", *(m.content for m in request.messages)]
        digest = _digest(request)
        h = int.from_bytes(digest[:8], "big")
        prompt_bytes = sum(len(p.encode()) for p in parts)
        # An estimate of what a real model would report (~4 bytes per token), not a bound.
        input_tokens = max(
            1, prompt_bytes // 4 + MESSAGE_OVERHEAD * len(request.messages) + REPLY_OVERHEAD
        )
        output_tokens = min(request.max_tokens, 50 + h % 200)
        text = _answer("\n".join(parts), h) or (
            f"[simulated reply from {request.model}] Simulated answer {h % 10_000:04d} to a "
            f"{len(request.messages)}-message prompt; no model was called."
        )
        read, write = self._cached(request)
        return Reply(
            text=text,
            usage=Usage(
                input_tokens=max(input_tokens, read + write),
                output_tokens=output_tokens,
                cache_read_tokens=read,
                cache_write_tokens=write,
                cache_write_1h_tokens=write if request.cache and request.cache.ttl == "1h" else 0,
            ),
            model=request.model,
            request_id=None,  # no provider was called, so there is no request to trace
            stop_reason="end_turn",
        )

    def _cached(self, request: Request) -> tuple[int, int]:
        """(cache read, cache write) tokens of a request, like Anthropic's prompt cache.

        The marked prefix (the system prompt, then the first message's first `prefix_chars`)
        is read when the same model saw it within its TTL (a read refreshes the entry), and
        written otherwise; prefixes below the model's cache minimum are neither.
        """
        mark = request.cache
        if mark is None:
            return 0, 0
        from agentd.caching import min_prefix_tokens  # the provider's minimum, kept in one place

        head = request.messages[0].content[: mark.prefix_chars] if request.messages else ""
        prefix = (request.system or "") + head
        tokens = len(prefix.encode()) // 4
        if tokens < min_prefix_tokens(request.model):
            return 0, 0
        key = (request.model, hashlib.sha256(prefix.encode()).digest(), mark.ttl)
        now = self._clock()
        hit = self._cache.get(key, 0.0) > now
        self._cache[key] = now + (3600 if mark.ttl == "1h" else 300)
        return (tokens, 0) if hit else (0, tokens)

    async def submit_batch(self, request: Request, custom_id: str) -> BatchSubmission:
        """Remember the request under a batch id derived from it and `custom_id`."""
        batch_id = (
            "simbatch_" + hashlib.sha256(custom_id.encode() + _digest(request)).hexdigest()[:24]
        )
        self._batches[(batch_id, custom_id)] = request
        if len(self._batches) > MAX_BATCHES:  # a long --simulate daemon: forget the oldest
            del self._batches[next(iter(self._batches))]
        return BatchSubmission(batch_id, custom_id, request_id=None)

    async def poll_batch(self, batch_id: str, custom_id: str) -> BatchOutcome:
        """`succeeded` at once: `complete`'s reply, or a placeholder for a batch not kept."""
        request = self._batches.get((batch_id, custom_id))
        if request is not None:
            return BatchOutcome("succeeded", reply=await self.complete(request))
        text = (
            f"[simulated batch result for {custom_id}] The simulated request of batch {batch_id} "
            "was not kept (simulated batches live in memory and agentd restarted); "
            "no model was called."
        )
        reply = Reply(
            text=text,
            # Only the placeholder is counted: the request, and so its size, is gone.
            usage=Usage(input_tokens=1, output_tokens=max(1, len(text.encode()) // 4)),
            model="simulated",
            request_id=None,
            stop_reason="end_turn",
        )
        return BatchOutcome("succeeded", reply=reply, detail="unknown simulated batch")

    async def prepare(self) -> None:
        """Nothing to import or build."""

    async def aclose(self) -> None:
        """Nothing to release."""


def _answer(prompt: str, h: int) -> str | None:
    """A label, a score or a quiet token, when the prompt asks for one (the last ask wins)."""
    asks: list[tuple[int, str]] = []
    labels = list(LABELS_LINE.finditer(prompt))
    if labels:
        names = [name.strip() for name in labels[-1].group(1).split("|")]
        asks.append((labels[-1].start(), names[h % len(names)]))
    lists = list(LIST_REQUEST.finditer(prompt))
    if lists:
        count = max(1, min(int(lists[-1].group(1)), 9))
        items = "\n".join(
            f"{i}. Simulated question {i} ({h % 1000:03d})" for i in range(1, count + 1)
        )
        asks.append((lists[-1].start(), items))
    scores = list(SCORE_REQUEST.finditer(prompt))
    if scores:
        asks.append((scores[-1].start(), f"{0.5 + (h % 51) / 100:.2f}"))
    quiet = list(QUIET_TOKEN.finditer(prompt))
    if quiet:
        asks.append((quiet[-1].start(), quiet[-1].group(0)))
    return max(asks)[1] if asks else None


def _digest(request: Request) -> bytes:
    """A hash of everything that shapes the reply, so equal requests get equal answers."""
    return hashlib.sha256(
        json.dumps(
            [request.model, request.max_tokens, request.system, *map(_pair, request.messages)]
        ).encode()
    ).digest()


def _pair(message: Message) -> list[str]:
    return [message.role, message.content]
