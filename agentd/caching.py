"""Prompt caching: whether marking a loop's stable prompt prefix for the provider's cache pays.

A cache write costs more than plain input (Anthropic: 1.25× for a 5-minute entry, 2× for a
1-hour one) and a read far less (0.1×); an entry belongs to one model and one exact prefix. So
marking pays only when the same model reads the same prefix again within the TTL: several calls
of one run that share it, or the next runs of a frequent loop.

The accounting is deliberately conservative: each write is assumed to serve only the reads
inside one TTL after it (a hit refreshes an entry, but a skipped run, jitter or a changed prefix
breaks the chain), and retries are a bonus that is not counted. Hence "a loop every 30 minutes
with one call per run gains nothing": a 1-hour write at 2× is followed by one 0.1× read.

The TTL is the shortest one that spans the gap between two reads: below 5 minutes between runs,
each run's read refreshes a 5-minute entry, and a 1-hour write would only cost more.

Prefix size is estimated as UTF-8 bytes / 4 (about four bytes per token for English text):
Anthropic ignores `cache_control` on prefixes below a model's minimum (1024 tokens on most
models, 2048 on Haiku-class ones), so `auto` does not mark smaller ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

from agentd.config import Config
from agentd.pricing import MTOK, Rates
from agentd.providers.base import CacheMark, CacheTtl

CacheSetting = Literal["auto", "none", "5m", "1h"]
TTL_SECONDS: dict[CacheTtl, int] = {"5m": 300, "1h": 3600}
MIN_PREFIX_TOKENS = 1024
MIN_PREFIX_TOKENS_HAIKU = 2048
BYTES_PER_TOKEN = 4
_SAVING_PLACES = Decimal("0.000001")


@dataclass(frozen=True)
class CallPattern:
    """How a loop uses its prefix: seconds between runs and same-model calls per run."""

    interval_s: int | None  # None: unknown (no consecutive-run reads are counted)
    calls_per_run: int = 1
    why_calls: str = "one call per run"


@dataclass(frozen=True)
class CacheDecision:
    """Whether (and with which TTL) a run marks its stable prefix, why, and what it expects."""

    ttl: CacheTtl | None
    reason: str
    expected_saving_usd: Decimal = Decimal(0)  # per run, against list price
    prefix: str = ""
    alias: str | None = None  # the model whose cache it is
    prefix_tokens: int = 0  # estimated size of system prompt + prefix, marked or not

    def route(self) -> dict[str, Any]:
        """The decision as recorded in the run's `route.cache` (money as a decimal string)."""
        saving = self.expected_saving_usd.quantize(_SAVING_PLACES)
        return {
            "mode": self.ttl or "none",
            "reason": self.reason,
            "expected_saving_usd": str(saving),
            "model": self.alias,
            "prefix_tokens": self.prefix_tokens,
        }

    def mark(self, prompt: str, alias: str) -> CacheMark | None:
        """The mark for a call on `alias` with `prompt`: only its own model and prefix."""
        if self.ttl is None or alias != self.alias or not self.prefix:
            return None
        if not prompt.startswith(self.prefix):
            return None  # a reviewer's or classifier's prompt: another prefix, no reuse
        return CacheMark(self.ttl, len(self.prefix))


def estimate_tokens(text: str | None) -> int:
    """Tokens in a text, estimated as UTF-8 bytes / 4 (good enough to compare with a minimum)."""
    return len((text or "").encode()) // BYTES_PER_TOKEN


def min_prefix_tokens(model_id: str) -> int:
    """The smallest prefix the provider caches for this model (approximate, per family)."""
    return MIN_PREFIX_TOKENS_HAIKU if "haiku" in model_id.lower() else MIN_PREFIX_TOKENS


def expected_saving_usd(
    ttl: CacheTtl, rates: Rates, prefix_tokens: int, pattern: CallPattern
) -> Decimal:
    """Expected saving per run of marking the prefix with `ttl` (negative: it costs more).

    A write at t0 is read by the run's other calls and by the runs inside the TTL after it
    (ceil(ttl / interval) − 1 of them); a cycle of runs pays one write and saves on each read.
    """
    ttl_s = TTL_SECONDS[ttl]
    interval = pattern.interval_s
    later_runs = math.ceil(ttl_s / interval) - 1 if interval and interval < ttl_s else 0
    cycle_runs = later_runs + 1
    reads = cycle_runs * pattern.calls_per_run - 1
    write_rate = rates.cache_write if ttl == "5m" else rates.cache_write_1h
    per_token = reads * (rates.input - rates.cache_read) - (write_rate - rates.input)
    return Decimal(prefix_tokens) * per_token / cycle_runs / MTOK


def decide(
    setting: CacheSetting,
    *,
    prefix: str,
    system: str | None,
    pattern: CallPattern,
    rates: Rates | None,
    provider_type: str,
    model_id: str,
    alias: str | None = None,
) -> CacheDecision:
    """Decide for one run: `none` never marks, `5m`/`1h` always do, `auto` marks when it pays."""
    tokens = estimate_tokens(prefix) + estimate_tokens(system)

    def made(ttl: CacheTtl | None, reason: str, saving: Decimal = Decimal(0)) -> CacheDecision:
        return CacheDecision(ttl, reason, saving, prefix if ttl else "", alias, tokens)

    def saving(ttl: CacheTtl) -> Decimal:
        return Decimal(0) if rates is None else expected_saving_usd(ttl, rates, tokens, pattern)

    if setting == "none":
        return made(None, "cache: none in the config")
    if not prefix and not system:
        return made(None, "the prompt has no stable prefix")
    if setting in ("5m", "1h"):
        return made(setting, f"cache: {setting} in the config", saving(setting))
    if provider_type != "anthropic":
        return made(None, f"{provider_type} caches long prefixes by itself; no mark needed")
    if rates is None:
        return made(None, "the model has no price: the saving cannot be computed")
    least = min_prefix_tokens(model_id)
    if tokens < least:
        return made(None, f"prefix ~{tokens} tokens is below the {least}-token cache minimum")
    # 1h only when runs are 5 min or more apart: below that every run refreshes a 5m entry.
    candidates: list[CacheTtl] = ["5m"]
    if pattern.interval_s is None or pattern.interval_s >= TTL_SECONDS["5m"]:
        candidates.append("1h")
    best = max(candidates, key=saving)
    every = "unknown interval" if pattern.interval_s is None else f"every {pattern.interval_s}s"
    why = f"{pattern.why_calls}, {every}, prefix ~{tokens} tokens"
    if saving(best) <= 0:
        return made(None, f"no read within a TTL pays for the write ({why})", saving(best))
    return made(best, f"{best} pays ({why})", saving(best))


def interval_s(every_s: int | None, fire_times: list[datetime]) -> int | None:
    """Seconds between runs: the `every:` interval, else the gap between the next two fires."""
    if every_s is not None:
        return every_s
    if len(fire_times) < 2:
        return None
    return int((fire_times[1] - fire_times[0]).total_seconds())


def call_pattern(config: Config, loop_name: str, now: datetime) -> CallPattern:
    """A loop's pattern from its schedule, its handler or route (cascade escalation)."""
    loop = config.loops[loop_name]
    fires: list[datetime] = []
    if loop.every_seconds is None:
        from agentd.scheduling import next_fire_times

        fires = next_fire_times(loop, config.tz, n=2, now=now)
    interval = interval_s(loop.every_seconds, fires)
    if loop.handler is not None:
        # A handler's calls usually start with ctx.prompt; only those on the loop's own model
        # are marked (see CacheDecision.mark), so a wrong guess costs one unread write.
        return CallPattern(interval, 2, "a handler's calls share the prompt (assumed 2 per run)")
    if loop.route == "cascade" and loop.routing.escalation_prompt is None:
        own = config.chain(loop_name)[0].alias
        escalate = config.tier_chain(loop.routing.escalate_tier)[0].alias
        if own == escalate:
            # The built-in escalation prompt starts with the task: same model, same prefix.
            return CallPattern(interval, 2, "a cascade escalation re-sends the prompt")
    return CallPattern(interval, 1)


def decide_for_run(config: Config, loop_name: str, prefix: str, now: datetime) -> CacheDecision:
    """The decision for one run of a loop, on its primary model (a cache is per model)."""
    loop = config.loops[loop_name]
    entry = config.chain(loop_name)[0]
    # A batch loop is billed at batch rates, cache reads and writes included.
    price = config.price(entry.alias, batch=loop.batch is not None)
    return decide(
        loop.cache,
        prefix=prefix,
        system=loop.system,
        pattern=call_pattern(config, loop_name, now),
        rates=None if price is None else price.base,
        provider_type=entry.provider.type,
        model_id=entry.model.model,
        alias=entry.alias,
    )
