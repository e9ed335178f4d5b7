"""Prompt caching as the fake server simulates it, on a clock tests can move forward.

Anthropic (explicit): a request whose system or message blocks carry `cache_control` caches
the prefix up to and including the last marked block (system first, then messages, in API
order). The entry's key is (model, prefix, ttl); a request with a live entry reads it (and
refreshes its TTL), any other writes it. TTL: 5 minutes, or 1 hour with `ttl: "1h"`. Prefixes
under 1,024 tokens (2,048 for a model with "haiku" in its name) are not cached, as on the API.

OpenAI (automatic): every prompt of 1,024 tokens or more is remembered per model for 5
minutes (refreshed on use); a later prompt sharing a prefix of at least 1,024 tokens with a
remembered one reports it as `cached_tokens`, in steps of 128 tokens past the first 1,024.

Tokens are the server's usual estimate, UTF-8 bytes // 4 of the prompt's text, so cached and
uncached parts add up to the input a request without caching reports.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from fakewire import Api, CacheUsage

TTL_S = {"5m": 300.0, "1h": 3600.0}
OPENAI_TTL_S = 300.0
MIN_TOKENS = 1024
MIN_TOKENS_HAIKU = 2048
OPENAI_STEP = 128
MAX_OPENAI_ENTRIES = 256  # per model; the oldest go first

Segment = tuple[str, str]  # (role, text) of one message, OpenAI


class PromptCache:
    """The cache entries of one fake server and its clock (`now()` = monotonic + offset)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._offset = 0.0
        self._anthropic: dict[tuple[str, str, str], float] = {}  # key -> expiry
        self._openai: dict[str, list[tuple[tuple[Segment, ...], float]]] = {}

    def now(self) -> float:
        """The fake clock, in seconds (only differences matter)."""
        return time.monotonic() + self._offset

    def advance(self, seconds: float) -> None:
        """Move the fake clock forward: entries whose TTL has passed are gone."""
        with self._lock:
            self._offset += seconds

    def clear(self) -> None:
        """Forget every entry and reset the clock."""
        with self._lock:
            self._offset = 0.0
            self._anthropic.clear()
            self._openai.clear()

    def usage(self, api: Api, model: str | None, body: Any, total: int) -> CacheUsage | None:
        """The cache reads/writes of a request whose input estimate is `total` tokens."""
        if not isinstance(body, dict) or not isinstance(model, str):
            return None
        if api == "anthropic":
            return self._anthropic_usage(model, body)
        return self._openai_usage(model, body, total)

    def _anthropic_usage(self, model: str, body: dict[str, Any]) -> CacheUsage | None:
        marked = _anthropic_prefix(body)
        if marked is None:
            return None
        prefix, prefix_bytes, ttl = marked
        tokens = prefix_bytes // 4
        if tokens < (MIN_TOKENS_HAIKU if "haiku" in model else MIN_TOKENS):
            return None  # too short to cache: the API bills it as plain input, silently
        key = (model, prefix, ttl)
        with self._lock:
            now = self.now()
            hit = self._anthropic.get(key, -1.0) > now
            self._anthropic[key] = now + TTL_S[ttl]  # a write, or a read refreshing the TTL
        if hit:
            return CacheUsage(read=tokens)
        return CacheUsage(write=tokens, write_1h=tokens if ttl == "1h" else 0)

    def _openai_usage(self, model: str, body: dict[str, Any], total: int) -> CacheUsage | None:
        if total < MIN_TOKENS:
            return None
        segments = _openai_segments(body)
        with self._lock:
            now = self.now()
            live = [(s, exp) for s, exp in self._openai.get(model, []) if exp > now]
            common = max((_common_bytes(s, segments) for s, _ in live), default=0) // 4
            # Refresh this prompt's entry (a repeat replaces the old one).
            live = [(s, exp) for s, exp in live if s != segments]
            live.append((segments, now + OPENAI_TTL_S))
            self._openai[model] = live[-MAX_OPENAI_ENTRIES:]
        if common < MIN_TOKENS:
            return CacheUsage()
        return CacheUsage(read=MIN_TOKENS + (common - MIN_TOKENS) // OPENAI_STEP * OPENAI_STEP)


def _anthropic_prefix(body: dict[str, Any]) -> tuple[str, int, str] | None:
    """(prefix key text, prefix bytes, ttl) up to the last `cache_control` block, if any."""
    blocks: list[tuple[str, str, Any]] = []  # (where, text, cache_control)
    system = body.get("system")
    if isinstance(system, str):
        blocks.append(("system", system, None))
    elif isinstance(system, list):
        blocks.extend(("system", *_text_and_mark(b)) for b in system)
    for message in body.get("messages") or []:
        if not isinstance(message, dict):
            continue
        role, content = str(message.get("role")), message.get("content")
        if isinstance(content, str):
            blocks.append((role, content, None))
        elif isinstance(content, list):
            blocks.extend((role, *_text_and_mark(b)) for b in content)
    last = max((i for i, b in enumerate(blocks) if isinstance(b[2], dict)), default=None)
    if last is None:
        return None
    head = blocks[: last + 1]
    ttl = "1h" if head[-1][2].get("ttl") == "1h" else "5m"
    key = json.dumps([[where, text] for where, text, _ in head])
    return key, sum(len(text.encode()) for _, text, _ in head), ttl


def _text_and_mark(block: Any) -> tuple[str, Any]:
    if not isinstance(block, dict):
        return "", None
    text = block.get("text")
    return (text if isinstance(text, str) else ""), block.get("cache_control")


def _openai_segments(body: dict[str, Any]) -> tuple[Segment, ...]:
    out: list[Segment] = []
    for message in body.get("messages") or []:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(str(b.get("text", "")) for b in content if isinstance(b, dict))
        out.append((str(message.get("role")), content if isinstance(content, str) else ""))
    return tuple(out)


def _common_bytes(a: tuple[Segment, ...], b: tuple[Segment, ...]) -> int:
    """Bytes of message text two prompts share from their start (roles must match too)."""
    shared = 0
    for (role_a, text_a), (role_b, text_b) in zip(a, b, strict=False):
        if role_a != role_b:
            break
        if text_a != text_b:
            same = next(
                (i for i, (x, y) in enumerate(zip(text_a, text_b, strict=False)) if x != y),
                min(len(text_a), len(text_b)),
            )
            return shared + len(text_a[:same].encode())
        shared += len(text_a.encode())
    return shared
