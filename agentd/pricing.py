"""Prices: the cost of a `Usage` on a model, from genai-prices plus config overrides."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from decimal import ROUND_CEILING, ROUND_HALF_UP, Decimal
from typing import Any

from agentd.providers.base import Usage

MTOK = Decimal(1_000_000)
MICRO = Decimal(1_000_000)
# Anthropic's Message Batches and OpenAI's Batch API both bill every token kind at half price.
BATCH_FACTOR = Decimal("0.5")

# genai-prices provider ids for agentd's provider types.
_GENAI_PROVIDER_ID = {"anthropic": "anthropic", "openai": "openai"}


@dataclass(frozen=True)
class Rates:
    """USD per million tokens for each kind of token."""

    input: Decimal
    output: Decimal
    cache_read: Decimal
    cache_write: Decimal
    cache_write_1h: Decimal


@dataclass(frozen=True)
class Price:
    """A model's prices: base rates plus cliff tiers keyed by total input tokens."""

    base: Rates
    # (threshold, rates): when total input tokens exceed threshold, these rates apply to all tokens.
    tiers: tuple[tuple[int, Rates], ...] = ()
    source: str = "genai-prices"
    context_window: int | None = field(default=None, compare=False)

    def rates_for(self, input_tokens: int) -> Rates:
        """The rates that apply to a call with this many input tokens."""
        rates = self.base
        for threshold, tier_rates in self.tiers:
            if input_tokens > threshold:
                rates = tier_rates
        return rates

    def highest(self) -> Rates:
        """Each rate at its highest tier: the worst case a reservation must cover."""
        every = [self.base, *(r for _, r in self.tiers)]
        return Rates(**{f.name: max(getattr(r, f.name) for r in every) for f in fields(Rates)})


def cost_usd(price: Price, usage: Usage) -> Decimal:
    """Exact cost of a call: uncached input, cache reads, cache writes and output at their rates."""
    rates = price.rates_for(usage.input_tokens)
    total = (
        Decimal(usage.uncached_input_tokens) * rates.input
        + Decimal(usage.cache_read_tokens) * rates.cache_read
        + Decimal(usage.cache_write_5m_tokens) * rates.cache_write
        + Decimal(usage.cache_write_1h_tokens) * rates.cache_write_1h
        + Decimal(usage.output_tokens) * rates.output
    )
    return total / MTOK


def cache_saving_usd(rates: Rates, cache_read: int, write_5m: int, write_1h: int) -> Decimal:
    """What caching saved against list price: reads' discount less writes' surcharge (exact).

    Negative when writes were never read back enough to pay for themselves.
    """
    total = (
        Decimal(cache_read) * (rates.input - rates.cache_read)
        - Decimal(write_5m) * (rates.cache_write - rates.input)
        - Decimal(write_1h) * (rates.cache_write_1h - rates.input)
    )
    return total / MTOK


def worst_case_usd(price: Price, max_input_tokens: int, max_output_tokens: int) -> Decimal:
    """Upper bound of a call's cost: all input at the dearest input-side rate, full output."""
    top = price.highest()
    input_rate = max(top.input, top.cache_write, top.cache_write_1h, top.cache_read)
    return (Decimal(max_input_tokens) * input_rate + Decimal(max_output_tokens) * top.output) / MTOK


def to_micro_usd(usd: Decimal) -> int:
    """Dollars to integer micro-USD, rounded up so the ledger never under-counts."""
    return int((usd * MICRO).to_integral_value(rounding=ROUND_CEILING))


def usd_label(micro: int, decimals: int) -> str:
    """`$18.40`, `-$0.000250`: micro-USD with a dollar sign at `decimals` places (half up).

    The sign goes before the `$` (`-$0.000125`, not `$-0.000125`): caching can cost more than
    list price, and reports show that as a negative saving.
    """
    quantum = Decimal(1).scaleb(-decimals)
    text = f"${from_micro_usd(abs(micro)).quantize(quantum, rounding=ROUND_HALF_UP)}"
    return f"-{text}" if micro < 0 else text


def from_micro_usd(micro: int) -> Decimal:
    """Integer micro-USD to dollars (exact)."""
    return Decimal(micro) / MICRO


def format_usd(micro: int) -> str:
    """Micro-USD as a decimal string with six places, e.g. `0.002145`: never a float."""
    return f"{from_micro_usd(micro):.6f}"


def override_price(
    input: Decimal,
    output: Decimal,
    cache_read: Decimal | None = None,
    cache_write: Decimal | None = None,
    cache_write_1h: Decimal | None = None,
) -> Price:
    """A flat price from the config. Missing cache rates default to the input rate (never free)."""
    return Price(
        base=Rates(
            input=input,
            output=output,
            cache_read=input if cache_read is None else cache_read,
            cache_write=input if cache_write is None else cache_write,
            cache_write_1h=(
                (input if cache_write is None else cache_write)
                if cache_write_1h is None
                else cache_write_1h
            ),
        ),
        source="config",
    )


def _tiered(value: Any) -> tuple[Decimal | None, dict[int, Decimal]]:
    """Split a genai-prices value (Decimal, TieredPrices, None) into base and {start: price}."""
    if value is None:
        return None, {}
    if isinstance(value, Decimal):
        return value, {}
    return Decimal(value.base), {int(t.start): Decimal(t.price) for t in value.tiers}


def _price_from_model_price(model_price: Any, context_window: int | None) -> Price | None:
    """Convert genai-prices' ModelPrice into our `Price`; None when it has no token prices."""
    parts = {
        "input": _tiered(getattr(model_price, "input_mtok", None)),
        "output": _tiered(getattr(model_price, "output_mtok", None)),
        "cache_read": _tiered(getattr(model_price, "cache_read_mtok", None)),
        "cache_write": _tiered(getattr(model_price, "cache_write_mtok", None)),
        "cache_write_1h": _tiered(getattr(model_price, "cache_write_1h_mtok", None)),
    }
    base_input, _ = parts["input"]
    base_output, _ = parts["output"]
    if base_input is None or base_output is None:
        return None

    def rates_at(threshold: int | None) -> Rates:
        values: dict[str, Decimal] = {}
        for name, (base, tiers) in parts.items():
            if base is None:
                continue
            chosen = base
            if threshold is not None:
                for start in sorted(tiers):
                    if start <= threshold:
                        chosen = tiers[start]
            values[name] = chosen
        inp = values["input"]
        # A cache rate the table does not list is charged like plain input: never assume free.
        write = values.get("cache_write", inp)
        return Rates(
            input=inp,
            output=values["output"],
            cache_read=values.get("cache_read", inp),
            cache_write=write,
            cache_write_1h=values.get("cache_write_1h", write),
        )

    thresholds = sorted({start for _, tiers in parts.values() for start in tiers})
    return Price(
        base=rates_at(None),
        tiers=tuple((t, rates_at(t)) for t in thresholds),
        context_window=context_window,
    )


# Prices looked up "now", kept for the current UTC minute: every attempt asks for its model's
# price two or three times (route, reservation, list price), and a genai-prices lookup costs
# ~10 µs. Keyed by the minute because genai-prices has time-of-day prices (off-peak rates on
# half-hour boundaries), so a cached price never outlives the minute it was true in.
_NOW_PRICES: dict[tuple[str, str, bool], tuple[int, Price | None]] = {}


def lookup_price(
    provider_type: str, model_id: str, at: datetime | None = None, *, batch: bool = False
) -> Price | None:
    """The built-in (genai-prices, offline snapshot) price of a model, or None if unknown.

    `batch` asks for the batch API's prices (genai-prices' `processing: batch` variant); a
    model without one is priced at `BATCH_FACTOR` of its standard rates, the providers'
    published batch discount.
    """
    if at is not None:
        return _lookup_price(provider_type, model_id, at, batch=batch)
    now = datetime.now(tz=UTC)
    minute = int(now.timestamp()) // 60
    key = (provider_type, model_id, batch)
    cached = _NOW_PRICES.get(key)
    if cached is not None and cached[0] == minute:
        return cached[1]
    price = _lookup_price(provider_type, model_id, now, batch=batch)
    _NOW_PRICES[key] = (minute, price)
    return price


def _lookup_price(
    provider_type: str, model_id: str, when: datetime, *, batch: bool
) -> Price | None:
    provider_id = _GENAI_PROVIDER_ID.get(provider_type)
    if provider_id is None:
        return None
    # The bundled snapshot only: genai-prices' updater fetches from the network, never start it.
    from genai_prices.data_snapshot import get_snapshot

    try:
        _, model = get_snapshot().find_provider_model(model_id, None, provider_id, None)
    except LookupError:
        return None
    if not batch:
        return _price_from_model_price(model.get_prices(when), model.context_window)
    variant = any(v.when.get("processing") == "batch" for v in model.price_variants or ())
    if variant:
        return _price_from_model_price(
            model.get_prices(when, {"processing": "batch"}), model.context_window
        )
    standard = _price_from_model_price(model.get_prices(when), model.context_window)
    return None if standard is None else batch_price(standard)


def batch_price(price: Price) -> Price:
    """A price at the batch discount (every rate × `BATCH_FACTOR`), for prices without a variant."""

    def half(rates: Rates) -> Rates:
        return Rates(**{f.name: getattr(rates, f.name) * BATCH_FACTOR for f in fields(Rates)})

    return Price(
        base=half(price.base),
        tiers=tuple((t, half(r)) for t, r in price.tiers),
        source=f"{price.source} (batch)",
        context_window=price.context_window,
    )


def context_window(provider_type: str, model_id: str) -> int | None:
    """The model's known context window in tokens, if genai-prices knows it."""
    price = lookup_price(provider_type, model_id)
    return None if price is None else price.context_window


def input_token_bound(text_bytes: int, messages: int) -> int:
    """Upper bound of input tokens: one per UTF-8 byte plus a per-message overhead.

    No tokenizer maps fewer than one byte to a token, so the byte count bounds the token count;
    the overhead covers role markers and the system prompt framing.
    """
    return text_bytes + 16 * max(messages, 1) + 16


def request_token_bound(system: str | None, texts: Sequence[str]) -> int:
    """`input_token_bound` of one request: its messages' texts and optional system prompt.

    The one place the reservation's input side is counted: the executor's reservation, the
    route explanations' worst case and the run's token ceiling must price the same bound.
    """
    if isinstance(texts, str):  # a str is a Sequence[str] too: one message per character
        raise TypeError("texts must be a sequence of message texts, not one str")
    text_bytes = sum(len(text.encode()) for text in texts)
    if system:
        text_bytes += len(system.encode())
    return input_token_bound(text_bytes, len(texts) + (1 if system else 0))


def reservation_micro_usd(price: Price, input_tokens: int, max_tokens: int) -> int:
    """What one attempt reserves: its worst case in micro-USD, rounded up."""
    return to_micro_usd(worst_case_usd(price, input_tokens, max_tokens))
