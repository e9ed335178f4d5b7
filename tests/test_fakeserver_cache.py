"""The fake server's prompt-cache simulation, read through the real SDKs and our providers."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from fakeserver import FakeServer, ok

from agentd.providers.anthropic import AnthropicProvider
from agentd.providers.base import CacheMark, CacheTtl, Message, Request, Usage
from agentd.providers.openai import OpenAIProvider

SONNET = "claude-sonnet-5-5"
OPUS = "claude-opus-5-5"
HAIKU = "claude-haiku-4-5"
GPT = "gpt-5.4-mini"
SYSTEM = "You are terse."  # 14 bytes
RULES = "Standing rules. " * 500  # 8,000 bytes
TAIL = "What changed today?"  # 19 bytes
# Estimates are UTF-8 bytes // 4. Marked prefix: system + rules = 8,014 bytes = 2,003 tokens;
# the whole prompt: 8,033 bytes = 2,008 tokens, so 5 tokens stay uncached.
PREFIX_TOKENS = 2003
TOTAL_TOKENS = 2008


@pytest.fixture
def server(fake_server: FakeServer) -> FakeServer:
    """The shared fake server: its cache simulation is on by default."""
    assert fake_server.simulate_cache
    return fake_server


def marked(
    model: str = SONNET, ttl: CacheTtl = "5m", rules: str = RULES, tail: str = TAIL
) -> Request:
    """The rules then the tail as one user message, cached up to the end of the rules."""
    return Request(
        model=model,
        messages=(Message("user", rules + tail),),
        max_tokens=50,
        system=SYSTEM,
        timeout_s=5,
        cache=CacheMark(ttl, len(rules)),
    )


def usage(server: FakeServer, req: Request) -> Usage:
    """Send one request through the provider for its API and return the parsed usage."""
    if req.model.startswith("claude"):
        provider: AnthropicProvider | OpenAIProvider = AnthropicProvider(
            "anthropic", api_key="k", base_url=server.url
        )
    else:
        provider = OpenAIProvider("openai", api_key="k", base_url=f"{server.url}/v1")

    async def once() -> Usage:
        try:
            return (await provider.complete(req)).usage
        finally:
            await provider.aclose()

    return asyncio.run(once())


def wrote(tokens: int = PREFIX_TOKENS, total: int = TOTAL_TOKENS, one_hour: bool = False) -> Usage:
    return Usage(
        input_tokens=total,
        output_tokens=16,
        cache_write_tokens=tokens,
        cache_write_1h_tokens=tokens if one_hour else 0,
    )


def read(tokens: int = PREFIX_TOKENS, total: int = TOTAL_TOKENS) -> Usage:
    return Usage(input_tokens=total, output_tokens=16, cache_read_tokens=tokens)


PLAIN = Usage(input_tokens=TOTAL_TOKENS, output_tokens=16)


# --- Anthropic: explicit cache_control -----------------------------------------------------


def test_first_request_writes_repeat_within_ttl_reads(server: FakeServer) -> None:
    assert usage(server, marked()) == wrote()
    wire = usage_wire(server)
    assert wire["input_tokens"] == TOTAL_TOKENS - PREFIX_TOKENS == 5
    assert wire["cache_creation"] == {
        "ephemeral_5m_input_tokens": PREFIX_TOKENS,
        "ephemeral_1h_input_tokens": 0,
    }
    server.advance(299)
    assert usage(server, marked()) == read()
    assert usage_wire(server)["input_tokens"] == 5
    server.advance(299)  # the read refreshed the entry: still alive 598 s after the write
    assert usage(server, marked()) == read()
    server.advance(301)
    assert usage(server, marked()) == wrote()


def test_one_hour_ttl_reports_the_split_and_lives_an_hour(server: FakeServer) -> None:
    assert usage(server, marked(ttl="1h")) == wrote(one_hour=True)
    assert usage_wire(server)["cache_creation"] == {
        "ephemeral_5m_input_tokens": 0,
        "ephemeral_1h_input_tokens": PREFIX_TOKENS,
    }
    server.advance(3000)
    assert usage(server, marked(ttl="1h")) == read()
    server.advance(3601)
    assert usage(server, marked(ttl="1h")) == wrote(one_hour=True)


def test_the_key_is_model_prefix_and_ttl(server: FakeServer) -> None:
    assert usage(server, marked()) == wrote()
    assert usage(server, marked(model=OPUS)) == wrote()  # another model never reads it
    assert usage(server, marked(ttl="1h")) == wrote(one_hour=True)
    other = "Other rules here. " * 445  # 8,010 bytes: system + rules = 8,024 bytes = 2,006
    assert usage(server, marked(rules=other)) == wrote(2006, (8024 + 19) // 4)
    # A changed tail after the marked block still reads the prefix.
    assert usage(server, marked(tail="Anything new?")) == read(total=(8014 + 13) // 4)


def test_system_only_mark(server: FakeServer) -> None:
    req = Request(
        model=SONNET,
        messages=(Message("user", TAIL),),
        max_tokens=50,
        system=RULES,
        timeout_s=5,
        cache=CacheMark("5m", 0),
    )
    assert usage(server, req) == wrote(2000, (8000 + 19) // 4)
    assert usage(server, req) == read(2000, (8000 + 19) // 4)


def test_short_prefixes_are_not_cached(server: FakeServer) -> None:
    short = "Rules. " * 500  # 3,500 bytes + 14: 878 tokens, under 1,024
    total = (3514 + 19) // 4
    for _ in range(2):
        assert usage(server, marked(rules=short)) == Usage(input_tokens=total, output_tokens=16)
    # Haiku needs 2,048: the 2,003-token prefix that Sonnet caches is too short for it.
    for _ in range(2):
        assert usage(server, marked(model=HAIKU)) == PLAIN
    longer = "Standing rules. " * 513  # 8,208 bytes: system + rules = 8,222 bytes = 2,055
    assert usage(server, marked(model=HAIKU, rules=longer)) == wrote(2055, (8222 + 19) // 4)
    assert usage(server, marked(model=HAIKU, rules=longer)) == read(2055, (8222 + 19) // 4)


def test_unmarked_requests_and_fixed_steps_are_left_alone(server: FakeServer) -> None:
    plain = Request(
        model=SONNET,
        messages=(Message("user", RULES + TAIL),),
        max_tokens=50,
        system=SYSTEM,
        timeout_s=5,
    )
    assert usage(server, plain) == PLAIN
    assert usage(server, plain) == PLAIN
    assert usage(server, marked()) == wrote()
    server.script(SONNET, ok(input_tokens=10, cache_read=7), ok(input_tokens=10))
    assert usage(server, marked()) == Usage(input_tokens=17, output_tokens=16, cache_read_tokens=7)
    assert usage(server, marked()) == Usage(input_tokens=10, output_tokens=16)
    assert usage(server, marked()) == read()  # the entry outlived the fixed steps


def test_simulation_can_be_turned_off() -> None:
    with FakeServer(simulate_cache=False) as off:
        assert usage(off, marked()) == PLAIN
        assert usage(off, marked()) == PLAIN
        off.simulate_cache = True
        assert usage(off, marked()) == wrote()


def test_batch_items_write_and_read_the_same_cache(server: FakeServer) -> None:
    provider = AnthropicProvider("anthropic", api_key="k", base_url=server.url)

    async def batch() -> Usage:
        try:
            sub = await provider.submit_batch(marked(), "run-1")
            outcome = await provider.poll_batch(sub.batch_id, "run-1")
            assert outcome.reply is not None
            return outcome.reply.usage
        finally:
            await provider.aclose()

    assert asyncio.run(batch()) == wrote()
    assert usage(server, marked()) == read()


def test_reset_forgets_entries_and_the_clock(server: FakeServer) -> None:
    assert usage(server, marked()) == wrote()
    server.reset()
    assert server.simulate_cache
    assert usage(server, marked()) == wrote()


# --- OpenAI: automatic prefix caching ------------------------------------------------------

FACTS = "Background facts. " * 1100  # 19,800 bytes
# system 14 + facts 19,800 + tail 19 = 19,833 bytes = 4,958 tokens; a full repeat caches
# 1,024 + 128 × ((4,958 − 1,024) // 128) = 1,024 + 128 × 30 = 4,864 of them.
GPT_TOTAL = 4958


def chat(text: str, model: str = GPT) -> Request:
    return Request(
        model=model,
        messages=(Message("user", text),),
        max_tokens=50,
        system=SYSTEM,
        timeout_s=5,
    )


def test_openai_repeated_prefix_reports_cached_tokens(server: FakeServer) -> None:
    assert usage(server, chat(FACTS + TAIL)) == Usage(input_tokens=GPT_TOTAL, output_tokens=16)
    assert usage(server, chat(FACTS + TAIL)) == Usage(
        input_tokens=GPT_TOTAL, output_tokens=16, cache_read_tokens=4864
    )
    assert usage_wire(server)["prompt_tokens_details"]["cached_tokens"] == 4864
    # Only the shared head counts: the first 2,000 bytes of the facts (2,014 with the system
    # prompt = 503 tokens) are too short; 12,000 bytes (12,014 = 3,003 tokens) cache 2,944.
    changed = FACTS[:2000] + "x" * 17_800 + TAIL
    assert usage(server, chat(changed)).cache_read_tokens == 0
    half = FACTS[:12_000] + "y" * 7_800 + TAIL
    assert usage(server, chat(half)).cache_read_tokens == 1024 + 128 * ((3003 - 1024) // 128)


def test_openai_cache_expires_is_per_model_and_needs_1024_tokens(server: FakeServer) -> None:
    assert usage(server, chat(FACTS + TAIL)).cache_read_tokens == 0
    assert usage(server, chat(FACTS + TAIL, model="gpt-5.4")).cache_read_tokens == 0
    server.advance(301)
    assert usage(server, chat(FACTS + TAIL)).cache_read_tokens == 0
    short = "Short facts. " * 300  # 3,900 bytes + 33: 983 tokens
    assert usage(server, chat(short + TAIL)).cache_read_tokens == 0
    assert usage(server, chat(short + TAIL)) == Usage(input_tokens=983, output_tokens=16)


def test_openai_fixed_cache_numbers_win(server: FakeServer) -> None:
    usage(server, chat(FACTS + TAIL))
    server.script(GPT, ok(input_tokens=2000, cache_read=1000))
    assert usage(server, chat(FACTS + TAIL)) == Usage(
        input_tokens=2000, output_tokens=16, cache_read_tokens=1000
    )


def usage_wire(server: FakeServer) -> dict[str, Any]:
    """The `usage` object the fake server sent last, as on the wire."""
    sent = server.sent_usage()
    assert sent is not None
    return sent
