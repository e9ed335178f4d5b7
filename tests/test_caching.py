"""Prompt caching: the auto decision, the cache_control marks on the wire, 1h write prices."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from builders import base_config, merge, write_config
from fakeserver import FakeServer, ok
from genai_prices import Usage as GenaiUsage
from genai_prices import calc_price
from test_executor import Harness

from agentd.caching import CacheDecision, CallPattern, call_pattern, decide
from agentd.config import load_config
from agentd.context import render_template, stable_prefix
from agentd.pricing import Rates, cache_saving_usd, cost_usd, lookup_price, to_micro_usd
from agentd.providers.anthropic import AnthropicProvider
from agentd.providers.base import CacheMark, Message, Request, Usage
from agentd.providers.openai import OpenAIProvider

# Sonnet-like list prices per MTok: writes 1.25× (5m) and 2× (1h) the input price, reads 0.1×.
RATES = Rates(
    input=Decimal(3),
    output=Decimal(15),
    cache_read=Decimal("0.3"),
    cache_write=Decimal("3.75"),
    cache_write_1h=Decimal(6),
)
PREFIX = "x" * 8000  # ~2000 tokens at UTF-8 bytes / 4
NOW = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


def _decide(
    pattern: CallPattern,
    setting: Any = "auto",
    prefix: str = PREFIX,
    provider: str = "anthropic",
    model: str = "claude-sonnet-4-5",
) -> CacheDecision:
    return decide(
        setting,
        prefix=prefix,
        system=None,
        pattern=pattern,
        rates=RATES,
        provider_type=provider,
        model_id=model,
        alias="sonnet",
    )


@pytest.mark.parametrize(
    ("pattern", "setting", "mode", "saving"),
    [
        # A handler's 2 calls, 2-hourly: 1 read saves 2.7, the 5m write costs 0.75 extra:
        # 2000 × 1.95 / 1e6 per run.
        (CallPattern(7200, 2), "auto", "5m", "0.0039"),
        # Every 2 minutes, one call: a write is read by the next 2 runs (ceil(300/120) − 1):
        # (2 × 2.7 − 0.75) / 3 runs × 2000 / 1e6. 1h is not considered below 5 minutes.
        (CallPattern(120, 1), "auto", "5m", "0.0031"),
        # Every 20 minutes: 1h is read by 2 later runs: (2 × 2.7 − 3) / 3 × 2000 / 1e6.
        (CallPattern(1200, 1), "auto", "1h", "0.0016"),
        # Every 30 minutes, one call: 2× to write, one 0.1× read: (2.7 − 3) / 2 × 2000 / 1e6.
        (CallPattern(1800, 1), "auto", "none", "-0.0003"),
        # Daily, one call: nothing ever reads the 5m write: −0.75 × 2000 / 1e6.
        (CallPattern(86400, 1), "auto", "none", "-0.0015"),
        # Forced modes mark whatever the arithmetic says; none never marks.
        (CallPattern(1800, 1), "5m", "5m", "-0.0015"),
        (CallPattern(1800, 1), "1h", "1h", "-0.0003"),
        (CallPattern(120, 1), "none", "none", "0"),
    ],
)
def test_decision_table(pattern: CallPattern, setting: str, mode: str, saving: str) -> None:
    decision = _decide(pattern, setting)
    assert decision.route()["mode"] == mode
    assert decision.expected_saving_usd == Decimal(saving)
    assert decision.route()["expected_saving_usd"] == str(Decimal(saving).quantize(Decimal("1e-6")))
    assert (decision.mark(PREFIX + " changing", "sonnet") is not None) == (mode != "none")


def test_tiny_prefix_or_other_provider_is_not_marked() -> None:
    tiny = _decide(CallPattern(120, 2), prefix="Short instructions. " * 40)
    assert tiny.ttl is None and "below the 1024-token" in tiny.reason
    assert tiny.route()["prefix_tokens"] == 200  # 800 bytes / 4
    # Haiku-class models need 2048 tokens; ~2000 is not enough.
    assert _decide(CallPattern(120, 2), model="claude-haiku-4-5").ttl is None
    assert _decide(CallPattern(120, 2), provider="openai").ttl is None


def test_mark_only_for_its_model_and_prefix() -> None:
    decision = _decide(CallPattern(120, 1))
    assert decision.mark(PREFIX + "now", "sonnet") == CacheMark("5m", len(PREFIX))
    assert decision.mark(PREFIX + "now", "haiku") is None  # a cache belongs to one model
    assert decision.mark("You review a draft..." + PREFIX, "sonnet") is None


def test_call_pattern_from_schedule_handler_and_cascade(tmp_path: Path) -> None:
    data = merge(
        base_config("http://127.0.0.1:9"),
        {
            "loops": {
                "work": {"cron": "*/2 * * * *", "every": None},
                "casc": {"every": "1h", "tier": "deep", "max_tokens": 100, "prompt": "work.md",
                         "route": "cascade"},
                "hand": {"every": "2h", "tier": "fast", "max_tokens": 100, "handler": "h.py:run",
                         "prompt": "work.md"},
            }
        },
    )  # fmt: skip
    (tmp_path / "conf").mkdir(parents=True)
    (tmp_path / "conf" / "h.py").write_text("async def run(ctx):\n    return None\n")
    config = load_config(write_config(tmp_path / "conf", data, "Say hello."))
    assert call_pattern(config, "work", NOW) == CallPattern(120, 1)
    assert call_pattern(config, "casc", NOW).calls_per_run == 2  # escalation on deep = draft's
    assert call_pattern(config, "hand", NOW).calls_per_run == 2
    assert config.loops["work"].cache == "auto"


def test_stable_prefix_stops_before_the_changing_part() -> None:
    template = (Path(__file__).parents[1] / "loops" / "heartbeat.md").read_text()
    prefix = stable_prefix(template, loop="heartbeat")
    prompt = render_template(template, loop="heartbeat", now=NOW)
    assert prompt.startswith(prefix)
    assert "{now}" not in prefix and "this is loop `heartbeat`" in prefix
    assert prompt[len(prefix) :].startswith("2026-03-02T09:00")  # "It is {now}" comes last


def _request(mark: CacheMark | None, system: str | None = None) -> Request:
    return Request(
        model="claude-haiku-4-5",
        messages=(Message("user", "STABLE PART|changing part"),),
        max_tokens=50,
        system=system,
        timeout_s=5,
        cache=mark,
    )


async def _send(provider: Any, request: Request) -> Usage:
    try:
        return (await provider.complete(request)).usage
    finally:
        await provider.aclose()


def test_anthropic_marks_the_prefix_block(fake_server: FakeServer) -> None:
    def body(mark: CacheMark | None, system: str | None = None) -> Any:
        provider = AnthropicProvider("anthropic", api_key="k", base_url=fake_server.url)
        asyncio.run(_send(provider, _request(mark, system)))
        return fake_server.requests[-1].body

    five = body(CacheMark("5m", len("STABLE PART|")))
    assert five["messages"][0]["content"] == [
        {"type": "text", "text": "STABLE PART|", "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "changing part"},
    ]
    hour = body(CacheMark("1h", len("STABLE PART|")))
    assert hour["messages"][0]["content"][0]["cache_control"] == {"type": "ephemeral", "ttl": "1h"}
    system_only = body(CacheMark("5m", 0), system="Be terse.")
    assert system_only["system"] == [
        {"type": "text", "text": "Be terse.", "cache_control": {"type": "ephemeral"}}
    ]
    assert system_only["messages"][0]["content"] == "STABLE PART|changing part"
    off = body(None, system="Be terse.")
    assert off["system"] == "Be terse."
    assert off["messages"][0]["content"] == "STABLE PART|changing part"


def test_openai_body_ignores_the_mark(fake_server: FakeServer) -> None:
    provider = OpenAIProvider("openai", api_key="k", base_url=f"{fake_server.url}/v1")
    request = Request(
        model="gpt-4o-mini",
        messages=(Message("user", "STABLE PART|changing part"),),
        max_tokens=50,
        timeout_s=5,
        cache=CacheMark("1h", 12),
    )
    asyncio.run(_send(provider, request))
    assert fake_server.requests[-1].body["messages"] == [
        {"role": "user", "content": "STABLE PART|changing part"}
    ]


def test_anthropic_reads_the_1h_split(fake_server: FakeServer) -> None:
    fake_server.script(
        "claude-haiku-4-5", ok(input_tokens=10, cache_write=300, cache_write_1h=200, cache_read=50)
    )
    provider = AnthropicProvider("anthropic", api_key="k", base_url=fake_server.url)
    usage = asyncio.run(_send(provider, _request(CacheMark("1h", 12))))
    assert usage == Usage(
        input_tokens=360,
        output_tokens=usage.output_tokens,
        cache_read_tokens=50,
        cache_write_tokens=300,
        cache_write_1h_tokens=200,
    )


def test_1h_writes_cost_exactly_and_match_genai_prices() -> None:
    price = lookup_price("anthropic", "claude-sonnet-4-5")
    assert price is not None
    usage = Usage(
        input_tokens=10_000,
        output_tokens=500,
        cache_read_tokens=2_000,
        cache_write_tokens=5_000,
        cache_write_1h_tokens=3_000,
    )
    # 3,000 uncached × $3 + 2,000 reads × $0.30 + 2,000 5m writes × $3.75
    # + 3,000 1h writes × $6 + 500 output × $15 = 9,000 + 600 + 7,500 + 18,000 + 7,500
    # = $42,600 per MTok = $0.0426.
    assert cost_usd(price, usage) == Decimal("0.0426")
    theirs = calc_price(
        GenaiUsage(
            input_tokens=10_000,
            cache_read_tokens=2_000,
            cache_write_tokens=5_000,
            cache_write_1h_tokens=3_000,
            output_tokens=500,
        ),
        model_ref="claude-sonnet-4-5",
        provider_id="anthropic",
    ).total_price
    assert theirs == Decimal("0.0426")
    # Saved against list: 2,000 × 2.70 − 2,000 × 0.75 − 3,000 × 3 = −5,100 per MTok.
    assert cache_saving_usd(price.base, 2_000, 2_000, 3_000) == Decimal("-0.0051")


def test_run_marks_prefix_records_decision_and_1h_writes(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    prompt = "Follow these standing rules carefully. " * 230 + "\nIt is {now}.\n"  # ~2,200 tok
    harness = Harness(tmp_path, fake_server, {"loops": {"work": {"cache": "1h"}}}, prompt=prompt)
    fake_server.script(
        "claude-haiku-4-5",
        ok(input_tokens=10, output_tokens=16, cache_write=2275, cache_write_1h=2275),
    )
    result = harness.run()
    assert result.status == "ok"
    cache = harness.run_row(result.run_id)["route"]["cache"]
    assert cache["mode"] == "1h" and cache["reason"] == "cache: 1h in the config"
    Decimal(cache["expected_saving_usd"])  # a decimal string
    first = fake_server.requests[-1].body["messages"][0]["content"]
    assert first[0]["cache_control"] == {"type": "ephemeral", "ttl": "1h"}
    assert first[0]["text"].endswith("It is ") and first[1]["text"].startswith("20")
    [call] = harness.calls(result.run_id)
    assert call["cache_write_tokens"] == 2275 and call["cache_write_1h_tokens"] == 2275
    # 10 uncached × $1 + 2,275 1h writes × $2 + 16 output × $5 = 4,640 per MTok (Haiku 4.5).
    assert call["cost_micro_usd"] == 4640 == to_micro_usd(Decimal("0.00464"))
    harness.ledger.close()


def test_auto_on_a_30_minute_loop_sends_no_mark(tmp_path: Path, fake_server: FakeServer) -> None:
    prompt = "Follow these standing rules carefully. " * 230 + "\nIt is {now}.\n"
    harness = Harness(tmp_path, fake_server, prompt=prompt)
    result = harness.run()
    cache = harness.run_row(result.run_id)["route"]["cache"]
    assert cache["mode"] == "none" and "no read within a TTL pays" in cache["reason"]
    assert isinstance(fake_server.requests[-1].body["messages"][0]["content"], str)
    harness.ledger.close()
