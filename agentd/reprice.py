"""`agentd reprice`: the ledger's real token counts priced as if on another config's models.

Only `ok` attempts are re-priced (failed attempts have no token counts), and the actual side is
what those same attempts cost in the ledger, so both columns cover the same work.

Which model a call moves to (`Target`): with `--all-tier T` / `--all-model M` every call goes to
the primary model of T (or to M). With `--against OTHER`, a call keeps its role in the loop: a
call on the loop's own tier (its `tier:`, its model's tier, a fallback tier, or no tier at all)
moves to the primary model of that loop's tier or model in OTHER; a call a handler or router
made on another tier on purpose (a `fast` classifier or reviewer, a `deep` escalation) moves to
the primary model of the same tier in OTHER, or of the loop's own there when OTHER has no such
tier. Which tier is the loop's own is read from the current config; without one, every call is.
Loops OTHER does not have are reported as "not in other config" and left out of the
comparison's totals.

Each loop also shows what prompt caching and batching saved on its actual calls against the
list price of the model that made them: caching (`pricing.cache_saving_usd`: reads' discount
less writes' surcharge, 1-hour writes at their own rate, at the batch rates for batch calls;
negative when writes were not read back enough), and batching (the batch calls' tokens at
standard less at batch rates).

Arithmetic is exact `Decimal`: token sums × USD-per-million rates, per price band (a model
whose price changes above some input size is priced per band of calls). Money is shown in
micro-USD rounded up, like the ledger; percentages are (actual − other) / other, one decimal.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from agentd.config import ChainEntry, Config
from agentd.ledger import Ledger, utc_iso
from agentd.pricing import (
    MTOK,
    Price,
    cache_saving_usd,
    format_usd,
    from_micro_usd,
    to_micro_usd,
)
from agentd.reports import Column

NOT_IN_OTHER = "not in other config"


@dataclass(frozen=True)
class Target:
    """Where calls are re-priced: another config, or one tier or model for everything."""

    config: Config
    label: str  # e.g. `all-deep`, `all-opus`, `other.yaml`
    tier: str | None = None
    alias: str | None = None

    def entry(
        self, reference: Config | None, loop: str, call_tier: str | None
    ) -> ChainEntry | None:
        """The chain entry a call of `loop` on `call_tier` moves to; None if OTHER lacks it."""
        other = self.config
        if self.tier is not None:
            return other.tier_chain(self.tier)[0]
        if self.alias is not None:
            home = next((t for t, chain in other.tiers.items() if self.alias in chain), None)
            return ChainEntry(
                home,
                self.alias,
                other.models[self.alias],
                other.models[self.alias].provider,
                other.providers[other.models[self.alias].provider],
            )
        if loop not in other.loops:
            return None
        own = own_tiers(reference, loop)
        helper = own is not None and call_tier not in own
        if helper and call_tier in other.tiers:
            assert call_tier is not None  # None is always among a loop's own tiers
            return other.tier_chain(call_tier)[0]
        return other.chain(loop)[0]


def own_tiers(config: Config | None, loop: str) -> set[str | None] | None:
    """The tiers a loop's own calls run on in `config` (None: unknown, every tier is its own)."""
    if config is None or loop not in config.loops:
        return None
    spec = config.loops[loop]
    chain = config.chain(loop)
    tiers: set[str | None] = {None, chain[0].tier, *spec.fallback_tiers}
    if spec.tier is not None:
        tiers.add(spec.tier)
    return tiers


def resolve_target(
    current: Config | None,
    other: Config | None,
    *,
    all_tier: str | None = None,
    all_model: str | None = None,
    other_label: str | None = None,
) -> Target:
    """The re-pricing target from the CLI options; ValueError names what is wrong."""
    if all_tier is not None and all_model is not None:
        raise ValueError("give --all-tier or --all-model, not both")
    base = other if other is not None else current
    where = "the other config" if other is not None else "the config"
    if base is None:
        raise ValueError("--all-tier and --all-model need a config to resolve names in")
    if all_tier is not None:
        if all_tier not in base.tiers:
            raise ValueError(f"no tier {all_tier!r} in {where} (tiers: {', '.join(base.tiers)})")
        return Target(base, f"all-{all_tier}", tier=all_tier)
    if all_model is not None:
        if all_model not in base.models:
            raise ValueError(
                f"no model {all_model!r} in {where} (models: {', '.join(base.models)})"
            )
        return Target(base, f"all-{all_model}", alias=all_model)
    if other is None:
        raise ValueError("give --against OTHER_CONFIG, --all-tier TIER or --all-model ALIAS")
    return Target(other, other_label or other.path.name)


def _bands(prices: Iterable[Price]) -> list[int]:
    """Every input-size threshold where some target price changes, ascending."""
    return sorted({threshold for price in prices for threshold, _ in price.tiers})


def band_cost(price: Price, band: int, thresholds: Sequence[int], sums: Sequence[int]) -> Decimal:
    """Exact USD of summed tokens (uncached, cache read, 5m write, 1h write, output) in a band."""
    rates = price.rates_for(_representative(band, thresholds))
    uncached, cache_read, write_5m, write_1h, output = sums
    return (
        Decimal(uncached) * rates.input
        + Decimal(cache_read) * rates.cache_read
        + Decimal(write_5m) * rates.cache_write
        + Decimal(write_1h) * rates.cache_write_1h
        + Decimal(output) * rates.output
    ) / MTOK


def _representative(band: int, thresholds: Sequence[int]) -> int:
    # Calls in band b have input in (thresholds[b-1], thresholds[b]]: rates are constant there.
    return 0 if band == 0 else thresholds[band - 1] + 1


# Cache writes split by TTL; rows from before migration m009 have no 1h count (all 5m).
_SUMS = (
    " SUM(input_tokens - cache_read_tokens - cache_write_tokens), SUM(cache_read_tokens),"
    " SUM(cache_write_tokens - COALESCE(cache_write_1h_tokens, 0)),"
    " SUM(COALESCE(cache_write_1h_tokens, 0)), SUM(output_tokens)"
)


def percent_change(actual: Decimal, other: Decimal) -> Decimal | None:
    """(actual − other) / other in per cent, one decimal, half up; None when other is 0."""
    if other == 0:
        return None
    return ((actual - other) * 100 / other).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP)


def format_percent(value: Decimal | None) -> str | None:
    """`−94.6 %` (a true minus sign), or None."""
    if value is None:
        return None
    text = f"{value:+}".replace("-", "−")
    return f"{text} %"


@dataclass(frozen=True)
class RepriceResult:
    """Per-loop rows, a totals row, and the sentence that sums it up."""

    label: str
    rows: list[dict[str, Any]]
    total: dict[str, Any]
    headline: str


def reprice(
    ledger: Ledger | None,
    current: Config | None,
    target: Target,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    simulated: bool = False,
) -> RepriceResult:
    """Re-price the real (or simulated) `ok` calls of [since, until) on `target`."""
    groups: list[tuple[Any, ...]] = []
    entries: dict[tuple[str, str | None], ChainEntry | None] = {}
    if ledger is not None:
        with ledger.read() as conn:
            pairs = conn.execute(
                _select("loop, tier", since, until, group="loop, tier"),
                _params(since, until, simulated),
            ).fetchall()
            for loop, tier in pairs:
                entries[(loop, tier)] = target.entry(current, loop, tier)
            prices = [
                p for e in entries.values() if e is not None
                if (p := target.config.price(e.alias)) is not None
            ]  # fmt: skip
            thresholds = _bands(prices)
            band = " + ".join(f"(input_tokens > {t})" for t in thresholds) or "0"
            groups = conn.execute(
                _select(
                    f"loop, tier, {band}, COUNT(*), SUM(cost_micro_usd)," + _SUMS,
                    since,
                    until,
                    group="loop, tier, 3",
                ),
                _params(since, until, simulated),
            ).fetchall()
            savings = _savings(conn, current, since, until, simulated)
    else:
        thresholds = []
        savings = {}
    per_loop: dict[str, dict[str, Any]] = {}
    for loop, tier, band_no, count, actual, *sums in groups:
        row = per_loop.setdefault(
            loop,
            {"loop": loop, "calls": 0, "actual": 0, "other": Decimal(0), "targets": set(),
             "note": None},
        )  # fmt: skip
        row["calls"] += int(count)
        row["actual"] += int(actual or 0)
        row["cache_saving"], row["batch_saving"] = savings.get(loop, (None, None))
        entry = entries[(loop, tier)]
        if entry is None:
            row["note"] = NOT_IN_OTHER
            continue
        price = target.config.price(entry.alias)
        row["targets"].add(entry.alias)
        if price is None:
            row["note"] = f"no price for {entry.alias} ({entry.model.model})"
            continue
        row["other"] += band_cost(price, int(band_no), thresholds, [int(v or 0) for v in sums])
    return _result(target.label, sorted(per_loop.values(), key=lambda r: r["loop"]))


def _savings(
    conn: Any,
    current: Config | None,
    since: datetime | None,
    until: datetime | None,
    simulated: bool = False,
) -> dict[str, tuple[Decimal | None, Decimal | None]]:
    """Per loop, what caching and what batching saved on its actual calls, against list price.

    Caching: reads' discount less writes' surcharge, at the rates the calls were billed at
    (batch rates for batch calls). Batching: the same tokens at standard less at batch rates.
    None for a loop with a call on a model the current config cannot price.
    """
    if current is None:
        return {}
    pairs = conn.execute(
        _select("alias, batch", since, until, group="alias, batch"),
        _params(since, until, simulated),
    ).fetchall()
    prices: dict[tuple[str, bool], Price | None] = {}
    for alias, batch in pairs:
        for flag in {False, bool(batch)}:
            known = alias in current.models
            prices[(alias, flag)] = current.price(alias, batch=flag) if known else None
    thresholds = _bands(p for p in prices.values() if p is not None)
    band = " + ".join(f"(input_tokens > {t})" for t in thresholds) or "0"
    rows = conn.execute(
        _select(f"loop, alias, batch, {band}," + _SUMS, since, until, group="loop, alias, 3, 4"),
        _params(since, until, simulated),
    ).fetchall()
    cache: dict[str, Decimal | None] = {}
    batched: dict[str, Decimal | None] = {}
    for loop, alias, batch, band_no, *raw in rows:
        sums = [int(v or 0) for v in raw]
        billed, listed = prices.get((alias, bool(batch))), prices.get((alias, False))
        if billed is None or listed is None:
            cache[loop] = batched[loop] = None
            continue
        if loop in cache and cache[loop] is None:
            continue
        rates = billed.rates_for(_representative(int(band_no), thresholds))
        _, read, write_5m, write_1h, _ = sums
        cache[loop] = (cache.get(loop) or Decimal(0)) + cache_saving_usd(
            rates, read, write_5m, write_1h
        )
        saved = Decimal(0)
        if batch:
            saved = band_cost(listed, int(band_no), thresholds, sums) - band_cost(
                billed, int(band_no), thresholds, sums
            )
        batched[loop] = (batched.get(loop) or Decimal(0)) + saved
    return {loop: (cache[loop], batched.get(loop)) for loop in cache}


def _select(what: str, since: datetime | None, until: datetime | None, *, group: str) -> str:
    where = "status = 'ok' AND simulated = ?"
    if since is not None:
        where += " AND started_at >= ?"
    if until is not None:
        where += " AND started_at < ?"
    return f"SELECT {what} FROM calls WHERE {where} GROUP BY {group}"


def _params(
    since: datetime | None, until: datetime | None, simulated: bool = False
) -> list[object]:
    return [int(simulated), *(utc_iso(t) for t in (since, until) if t is not None)]


def _result(label: str, loops: list[dict[str, Any]]) -> RepriceResult:
    rows = []
    actual_all = 0
    actual_cmp = 0
    other_cmp = Decimal(0)
    missing = []
    saving_all = Decimal(0)
    batch_all = Decimal(0)
    for r in loops:
        saving = r.get("cache_saving")
        saving_all += saving or 0
        batch_saving = r.get("batch_saving")
        batch_all += batch_saving or 0
        comparable = r["note"] is None
        other = to_micro_usd(r["other"]) if comparable else None
        actual_all += r["actual"]
        if comparable:
            actual_cmp += r["actual"]
            other_cmp += r["other"]
        else:
            missing.append(r["loop"])
        pct = percent_change(from_micro_usd(r["actual"]), r["other"]) if comparable else None
        rows.append(
            {
                "loop": r["loop"],
                "calls": r["calls"],
                "actual_micro_usd": r["actual"],
                "target": ", ".join(sorted(r["targets"])) or None,
                "other_micro_usd": other,
                "actual_vs_other_pct": None if pct is None else str(pct),
                "change": format_percent(pct),
                "cache_saving_usd": _signed_usd(saving),
                "batch_saving_usd": _signed_usd(batch_saving),
                "note": r["note"],
            }
        )
    pct = percent_change(from_micro_usd(actual_cmp), other_cmp)
    total = {
        "loop": "total",
        "calls": sum(r["calls"] for r in loops),
        "actual_micro_usd": actual_all,
        "target": None,
        "other_micro_usd": to_micro_usd(other_cmp),
        "actual_vs_other_pct": None if pct is None else str(pct),
        "change": format_percent(pct),
        "cache_saving_usd": _signed_usd(saving_all),
        "batch_saving_usd": _signed_usd(batch_all),
        "note": f"compares {len(loops) - len(missing)} loop(s)" if missing else None,
    }
    headline = (
        f"actual ${_short_usd(actual_cmp)} vs {label} ${_short_usd(to_micro_usd(other_cmp))}"
        + (f" ({format_percent(pct)})" if pct is not None else "")
    )
    saved = [(n, v) for n, v in (("caching", saving_all), ("batching", batch_all)) if v]
    if saved:
        parts = ", ".join(f"{name} ${_signed_usd(value)}" for name, value in saved)
        headline += f"; saved against list price by {parts}"
    if missing:
        headline += (
            f"; not compared: {', '.join(missing)} (actual ${_short_usd(actual_all - actual_cmp)})"
        )
    return RepriceResult(label=label, rows=rows, total=total, headline=headline)


def _signed_usd(usd: Decimal | None) -> str | None:
    """Exact USD to six places as a string (negative when caching cost more); None unknown."""
    return None if usd is None else f"{usd.normalize():f}"


def _short_usd(micro: int) -> str:
    """`18.40` for whole cents, else all six decimals (exact, never rounded)."""
    text = format_usd(micro)
    whole, frac = text.split(".")
    frac = frac.rstrip("0")
    return f"{whole}.{frac.ljust(2, '0')}"


REPRICE_COLUMNS = [
    Column("loop", "loop"),
    Column("calls", "ok calls"),
    Column("actual_micro_usd", "actual_usd", money=True),
    Column("target", "repriced on"),
    Column("other_micro_usd", "other_usd", money=True),
    Column("change", "actual vs other"),
    Column("cache_saving_usd", "cache saved"),
    Column("batch_saving_usd", "batch saved"),
    Column("note", "note"),
]
REPRICE_JSON_COLUMNS = [c for c in REPRICE_COLUMNS if c.key != "change"] + [
    Column("actual_vs_other_pct", "actual_vs_other_pct")
]
