"""Pricing: exact Decimal costs from genai-prices and overrides, rounded up to micro-USD."""

from __future__ import annotations

from decimal import Decimal

import pytest
from genai_prices import Usage as GenaiUsage
from genai_prices import calc_price
from hypothesis import given
from hypothesis import strategies as st

from agentd.pricing import (
    cost_usd,
    format_usd,
    input_token_bound,
    lookup_price,
    override_price,
    to_micro_usd,
    worst_case_usd,
)
from agentd.providers.base import Usage


def test_haiku_45_example_from_the_issue() -> None:
    price = lookup_price("anthropic", "claude-haiku-4-5")
    assert price is not None
    assert to_micro_usd(cost_usd(price, Usage(input_tokens=1000, output_tokens=200))) == 2000


@pytest.mark.parametrize(
    ("provider", "model"),
    [
        ("anthropic", "claude-haiku-4-5"),
        ("anthropic", "claude-haiku-5-5"),
        ("anthropic", "claude-sonnet-4-5"),
        ("anthropic", "claude-opus-5-5"),
        ("openai", "gpt-4o-mini"),
        ("openai", "gpt-5.4"),
        ("openai", "gpt-5.5"),
        ("openai", "o1"),
    ],
)
@pytest.mark.parametrize(
    ("uncached", "read", "write", "output"),
    [(1000, 0, 0, 200), (1200, 300, 100, 50), (250_000, 30_000, 0, 4000), (0, 0, 0, 1)],
)
def test_cost_matches_genai_prices(
    provider: str, model: str, uncached: int, read: int, write: int, output: int
) -> None:
    if provider == "openai":
        write = 0  # OpenAI reports no cache writes
    price = lookup_price(provider, model)
    assert price is not None
    ours = cost_usd(
        price,
        Usage(
            input_tokens=uncached + read + write,
            output_tokens=output,
            cache_read_tokens=read,
            cache_write_tokens=write,
        ),
    )
    theirs = calc_price(
        GenaiUsage(
            input_tokens=uncached + read + write,
            cache_read_tokens=read,
            cache_write_tokens=write,
            output_tokens=output,
        ),
        model_ref=model,
        provider_id=provider,
    ).total_price
    assert ours == theirs
    assert isinstance(ours, Decimal)


def test_tiers_apply_above_the_threshold() -> None:
    price = lookup_price("anthropic", "claude-sonnet-4-5")
    assert price is not None
    small = cost_usd(price, Usage(input_tokens=200_000, output_tokens=0))
    large = cost_usd(price, Usage(input_tokens=200_001, output_tokens=0))
    assert small == Decimal("0.6")  # 200k × $3
    assert large == Decimal("1.200006")  # 200,001 × $6: the cliff applies to all tokens


def test_unknown_model_has_no_price() -> None:
    assert lookup_price("openai", "llama3.1:8b") is None
    assert lookup_price("anthropic", "gpt-4o") is None


def test_override_defaults_cache_rates_to_input() -> None:
    price = override_price(Decimal("2"), Decimal("8"))
    usage = Usage(input_tokens=1000, output_tokens=100, cache_read_tokens=500)
    assert cost_usd(price, usage) == Decimal("0.0028")
    assert price.source == "config"


def test_micro_usd_rounds_up_and_formats_without_float() -> None:
    assert to_micro_usd(Decimal("0.0000001")) == 1
    assert to_micro_usd(Decimal("0.000002")) == 2
    assert to_micro_usd(Decimal("0")) == 0
    assert format_usd(2145) == "0.002145"
    assert format_usd(12_345_678) == "12.345678"


@given(
    text_bytes=st.integers(min_value=0, max_value=400_000),
    read_share=st.integers(min_value=0, max_value=100),
    write_share=st.integers(min_value=0, max_value=100),
    max_tokens=st.integers(min_value=1, max_value=32_000),
    out_share=st.integers(min_value=0, max_value=100),
    model=st.sampled_from(["claude-sonnet-4-5", "claude-haiku-5-5", "gpt-5.4", "o1"]),
)
def test_worst_case_bounds_every_possible_real_cost(
    text_bytes: int,
    read_share: int,
    write_share: int,
    max_tokens: int,
    out_share: int,
    model: str,
) -> None:
    provider = "openai" if model.startswith(("gpt", "o1")) else "anthropic"
    price = lookup_price(provider, model)
    assert price is not None
    bound = input_token_bound(text_bytes, 1)
    # Any real usage has at most `bound` input tokens, split any way, and ≤ max_tokens output.
    read = bound * read_share // 100
    write = (bound - read) * write_share // 100
    actual = Usage(
        input_tokens=bound,
        output_tokens=max_tokens * out_share // 100,
        cache_read_tokens=read,
        cache_write_tokens=write,
    )
    assert cost_usd(price, actual) <= worst_case_usd(price, bound, max_tokens)
