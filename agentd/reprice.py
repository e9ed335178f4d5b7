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
A loop that has `batch:` in the target config (OTHER, else the current one) is re-priced at
batch rates, as `agentd plan` projects it. Loops OTHER does not have are reported as "not in
other config" and left out of the comparison: the total row covers the compared loops only (its
note names the others, and JSON/CSV carry their calls and actual cost as `not_compared_*`).

Each loop also shows what prompt caching and batching saved on its actual calls against the
list price of the model that made them: caching (`pricing.cache_saving_usd`: reads' discount
less writes' surcharge, 1-hour writes at their own rate, at the batch rates for batch calls;
negative when writes were not read back enough), and batching (the batch calls' tokens at
standard less at batch rates).

Arithmetic is exact `Decimal`: token sums × USD-per-million rates, per price band (a model
whose price changes above some input size is priced per band of calls). The sums per loop,
tier, alias, batch flag and band come from the report cache where it holds them, raw `calls`
elsewhere (`repricesources`): the same figures either way, to the micro-dollar. Days that
`agentd ledger prune` rolled up keep no per-alias or per-band token sums: they are not
re-priced, and the total says how many there were. Money is shown in micro-USD like the
ledger (re-priced costs rounded up, savings half up); percentages are (actual − other) /
other, one decimal.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

from agentd.config import ChainEntry, Config
from agentd.ledger import Ledger
from agentd.pricing import (
    MICRO,
    MTOK,
    Price,
    cache_saving_usd,
    from_micro_usd,
    to_micro_usd,
    usd_label,
)
from agentd.reports import Column
from agentd.repricesources import OkGroup, Pruned, ok_groups, pruned
from agentd.spendsources import refresh_range

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
    return Target(other, other_label or config_label(other))


def config_label(config: Config) -> str:
    """How a report names a config file: relative to the current directory when inside it.

    Otherwise the absolute path, so two files both named `agent-model-config.yaml` (the usual
    case) can be told apart.
    """
    try:
        cwd = Path.cwd()  # resolved, while the config's path keeps the symlinks it was given
    except OSError:  # the current directory is gone
        return str(config.path)
    for path in (config.path, config.path.resolve()):
        if path.is_relative_to(cwd):
            return str(path.relative_to(cwd))
    return str(config.path)


def _bands(prices: Iterable[Price]) -> list[int]:
    """Every input-size threshold where some target price changes, ascending."""
    return sorted({threshold for price in prices for threshold, _ in price.tiers})


def band_cost(price: Price, size: int, sums: Sequence[int]) -> Decimal:
    """Exact USD of summed tokens (uncached, read, 5m/1h write, output) at `size`'s rates."""
    rates = price.rates_for(size)
    uncached, cache_read, write_5m, write_1h, output = sums
    return (
        Decimal(uncached) * rates.input
        + Decimal(cache_read) * rates.cache_read
        + Decimal(write_5m) * rates.cache_write
        + Decimal(write_1h) * rates.cache_write_1h
        + Decimal(output) * rates.output
    ) / MTOK


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
    cache: bool = True,
) -> RepriceResult:
    """Re-price the real (or simulated) `ok` calls of [since, until) on `target`.

    `cache=False` reads raw rows only (the cache never changes a figure; tests compare).
    """
    if ledger is None:
        return _result(target.label, [])
    thresholds = _bands(_known_prices(current, target.config))
    if cache:
        refresh_range(ledger, since)  # a no-op on a read-only ledger: raw rows fill in
    with ledger.read() as conn:
        groups = ok_groups(
            conn,
            thresholds,
            # The call's tier only matters when a call keeps its role (`--against`).
            by_tier=target.tier is None and target.alias is None,
            since=since,
            until=until,
            simulated=simulated,
            cache=cache,
        )
        rolled_up = pruned(conn, since, until, simulated)
    pricer = _Pricer(current, target)
    per_loop: dict[str, dict[str, Any]] = {}
    for group in groups:
        row = per_loop.setdefault(
            group.loop,
            {"loop": group.loop, "calls": 0, "actual": 0, "other": Decimal(0), "targets": set(),
             "note": None, "cache_saving": Decimal(0), "batch_saving": Decimal(0)},
        )  # fmt: skip
        row["calls"] += group.calls
        row["actual"] += group.actual
        _add_savings(row, pricer, group)
        entry = pricer.entry(group.loop, group.tier)
        if entry is None:
            row["note"] = NOT_IN_OTHER
            continue
        price = pricer.target_price(group.loop, entry.alias)
        row["targets"].add(entry.alias)
        if price is None:
            row["note"] = f"no price for {entry.alias} ({entry.model.model})"
            continue
        row["other"] += band_cost(price, group.size, group.tokens)
    loops = sorted(per_loop.values(), key=lambda r: r["loop"])
    return _result(target.label, loops, rolled_up)


def _known_prices(*configs: Config | None) -> Iterable[Price]:
    """Every price, standard and batch, of every model of the configs given.

    The scan splits calls at every input-size threshold of these before it knows which models
    the calls move to: a superset of the thresholds that matter, so each band is still priced
    at one rate by every model involved.
    """
    for config in configs:
        if config is None:
            continue
        for alias in config.models:
            for batch in (False, True):
                price = config.price(alias, batch=batch)
                if price is not None:
                    yield price


class _Pricer:
    """Memoised look-ups for one re-pricing: chain entries and prices on both sides."""

    def __init__(self, current: Config | None, target: Target) -> None:
        self.current = current
        self.target = target
        self._entries: dict[tuple[str, str | None], ChainEntry | None] = {}
        self._prices: dict[tuple[bool, str, bool], Price | None] = {}

    def entry(self, loop: str, call_tier: str | None) -> ChainEntry | None:
        """The chain entry a call of `loop` on `call_tier` moves to (see `Target.entry`)."""
        key = (loop, call_tier)
        if key not in self._entries:
            self._entries[key] = self.target.entry(self.current, loop, call_tier)
        return self._entries[key]

    def target_price(self, loop: str, alias: str) -> Price | None:
        """The target's price of `alias`, at batch rates when `loop` runs batched there."""
        spec = self.target.config.loops.get(loop)
        return self._price(True, alias, spec is not None and spec.batch is not None)

    def current_price(self, alias: str | None, batch: bool) -> Price | None:
        """The current config's price of `alias` (None: no current config, or unknown alias)."""
        if self.current is None or alias is None or alias not in self.current.models:
            return None
        return self._price(False, alias, batch)

    def _price(self, on_target: bool, alias: str, batch: bool) -> Price | None:
        key = (on_target, alias, batch)
        if key not in self._prices:
            config = self.target.config if on_target else self.current
            assert config is not None
            self._prices[key] = config.price(alias, batch=batch)
        return self._prices[key]


def _add_savings(row: dict[str, Any], pricer: _Pricer, group: OkGroup) -> None:
    """Add what caching and batching saved on a group of a loop's calls, against list price.

    Caching: reads' discount less writes' surcharge, at the rates the calls were billed at
    (batch rates for batch calls). Batching: the same tokens at standard less at batch rates.
    Either becomes None (unknown) for the loop once a call's model has no current price.
    """
    billed = pricer.current_price(group.alias, group.batch)
    listed = pricer.current_price(group.alias, False)
    if billed is None or listed is None:
        row["cache_saving"] = row["batch_saving"] = None
        return
    if row["cache_saving"] is None:
        return
    _, read, write_5m, write_1h, _ = group.tokens
    rates = billed.rates_for(group.size)
    row["cache_saving"] += cache_saving_usd(rates, read, write_5m, write_1h)
    if group.batch:
        row["batch_saving"] += band_cost(listed, group.size, group.tokens) - band_cost(
            billed, group.size, group.tokens
        )


_NONE_PRUNED = Pruned(0, 0)


def _result(
    label: str, loops: list[dict[str, Any]], rolled_up: Pruned = _NONE_PRUNED
) -> RepriceResult:
    """The rows, the total of the compared loops, and the headline (with any pruned days)."""
    rows = []
    calls = actual = missing_calls = missing_actual = 0
    other, cache, batch = Decimal(0), Decimal(0), Decimal(0)
    missing: list[str] = []
    for r in loops:
        comparable = r["note"] is None
        if comparable:
            calls += r["calls"]
            actual += r["actual"]
            other += r["other"]
            # An unknown saving (a model the current config cannot price) adds nothing.
            cache += r["cache_saving"] or 0
            batch += r["batch_saving"] or 0
        else:
            missing.append(r["loop"])
            missing_calls += r["calls"]
            missing_actual += r["actual"]
        pct = percent_change(from_micro_usd(r["actual"]), r["other"]) if comparable else None
        rows.append(
            {
                "loop": r["loop"],
                "calls": r["calls"],
                "actual_micro_usd": r["actual"],
                "target": ", ".join(sorted(r["targets"])) or None,
                "other_micro_usd": to_micro_usd(r["other"]) if comparable else None,
                "actual_vs_other_pct": None if pct is None else str(pct),
                "change": format_percent(pct),
                "cache_saving_micro_usd": saving_micro_usd(r["cache_saving"]),
                "batch_saving_micro_usd": saving_micro_usd(r["batch_saving"]),
                "note": r["note"],
            }
        )
    pct = percent_change(from_micro_usd(actual), other)
    other_micro = to_micro_usd(other)
    cache_micro, batch_micro = _half_up_micro(cache), _half_up_micro(batch)
    # Like with like: the total covers the compared loops only; the others are counted apart.
    total = {
        "loop": "total",
        "calls": calls,
        "actual_micro_usd": actual,
        "target": None,
        "other_micro_usd": other_micro,
        "actual_vs_other_pct": None if pct is None else str(pct),
        "change": format_percent(pct),
        "cache_saving_micro_usd": cache_micro,
        "batch_saving_micro_usd": batch_micro,
        "note": None,
        "not_compared_calls": missing_calls if missing else None,
        "not_compared_micro_usd": missing_actual if missing else None,
        # Pruned days keep only day totals (no alias, band or ok-only tokens): never re-priced.
        "pruned_days": rolled_up.days or None,
        "pruned_calls": rolled_up.calls if rolled_up.days else None,
    }
    notes = [f"compared loops only; not compared: {', '.join(missing)}"] if missing else []
    if rolled_up.days:
        notes.append(_pruned_text(rolled_up))
    total["note"] = "; ".join(notes) or None
    saved = [(n, v) for n, v in (("caching", cache_micro), ("batching", batch_micro)) if v]
    places = usd_places([actual, other_micro, missing_actual, *(v for _, v in saved)])
    headline = f"actual {usd_label(actual, places)} vs {label} {usd_label(other_micro, places)}"
    if pct is not None:
        headline += f" ({format_percent(pct)})"
    if saved:
        parts = ", ".join(f"{name} {usd_label(value, places)}" for name, value in saved)
        headline += f"; saved against list price by {parts}"
    if missing:
        headline += (
            f"; not compared: {', '.join(missing)} (actual {usd_label(missing_actual, places)})"
        )
    if rolled_up.days:
        headline += f"; {_pruned_text(rolled_up)}: prune kept only day totals"
    return RepriceResult(label=label, rows=rows, total=total, headline=headline)


def _pruned_text(rolled_up: Pruned) -> str:
    days = "day" if rolled_up.days == 1 else "days"
    calls = "call" if rolled_up.calls == 1 else "calls"
    return f"{rolled_up.days} pruned {days} ({rolled_up.calls} ok {calls}) not re-priced"


def saving_micro_usd(usd: Decimal | None) -> int | None:
    """An exact saving in micro-USD, rounded half up (a saving, not a charge); None: unknown."""
    return None if usd is None else _half_up_micro(usd)


def _half_up_micro(usd: Decimal) -> int:
    return int((usd * MICRO).to_integral_value(rounding=ROUND_HALF_UP))


def usd_places(amounts: Iterable[int]) -> int:
    """The fewest decimals, 2 to 6, that show every micro-USD amount exactly."""
    for places in range(2, 6):
        if all(amount % 10 ** (6 - places) == 0 for amount in amounts):
            return places
    return 6


REPRICE_COLUMNS = [
    Column("loop", "loop"),
    Column("calls", "ok calls"),
    Column("actual_micro_usd", "actual_usd", money=True),
    Column("target", "repriced on"),
    Column("other_micro_usd", "other_usd", money=True),
    Column("change", "actual vs other"),
    Column("cache_saving_micro_usd", "cache saved", money=True),
    Column("batch_saving_micro_usd", "batch saved", money=True),
    Column("note", "note"),
]
# Scripts get the percentage as a plain number, and the not-compared loops' share on the total.
REPRICE_JSON_COLUMNS = [c for c in REPRICE_COLUMNS if c.key != "change"] + [
    Column("actual_vs_other_pct", "actual_vs_other_pct"),
    Column("not_compared_calls", "not_compared_calls"),
    Column("not_compared_micro_usd", "not_compared_usd", money=True),
    Column("pruned_days", "pruned_days"),
    Column("pruned_calls", "pruned_calls"),
]
