"""Tests of agentd.config and agentd.yamlload: loading, every invalid case, paths, keys, schema."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentd.apikeys import missing_api_keys, read_api_key
from agentd.config import (
    ChainEntry,
    Config,
    ProviderConfig,
    load_config,
    parse_config,
    resolve_config_path,
    resolve_state_dir,
)
from agentd.confignumbers import parse_duration
from agentd.configschema import config_json_schema, config_json_schema_text
from agentd.errors import ConfigError, MissingKeyError
from agentd.loopconfig import LoopConfig
from agentd.pricing import lookup_price
from agentd.yamlload import load_yaml

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "config" / "agent-model-config.yaml"

# Line numbers matter: the invalid-case table below asserts them.
BASE = """\
providers:
  anthropic: {type: anthropic, api_key_env: ANTHROPIC_API_KEY}
  openai: {type: openai, api_key_env: OPENAI_API_KEY}
models:
  haiku: {provider: anthropic, model: claude-haiku-4-5}
  mini: {provider: openai, model: gpt-4o-mini}
  sonnet: {provider: anthropic, model: claude-sonnet-4-5}
tiers:
  fast: [haiku, mini]
  balanced: [sonnet]
loops:
  heartbeat:
    every: 30m
    tier: fast
    max_tokens: 512
    prompt: prompt.md
"""


def write(tmp_path: Path, text: str) -> Path:
    """Write a config and its prompt file into tmp_path; return the config path."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "prompt.md").write_text("Check {loop} at {now}.\n")
    path = tmp_path / "agent-model-config.yaml"
    path.write_text(text)
    return path


def mutate(old: str, new: str, text: str = BASE) -> str:
    """BASE with one exact fragment replaced (fails loudly if the fragment is not there)."""
    assert old in text, old
    return text.replace(old, new, 1)


def error_of(tmp_path: Path, text: str) -> ConfigError:
    """The ConfigError that loading text raises."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.file == str(path)
    return info.value


# ---------------------------------------------------------------------------- valid files


def test_base_loads_with_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, BASE))
    assert config.timezone == "UTC"
    assert config.path == tmp_path / "agent-model-config.yaml"
    assert config.dir == tmp_path
    loop = config.loops["heartbeat"]
    assert (loop.every_seconds, loop.route, loop.when_over_budget, loop.enabled) == (
        1800,
        "static",
        "skip",
        True,
    )
    assert config.providers["anthropic"].timeout_s == 60
    assert config.circuit_breaker.cooldowns_s == [30, 60, 300]
    assert config.prompt_path("heartbeat") == tmp_path / "prompt.md"


def test_shipped_config_loads_and_chains_are_right() -> None:
    config = load_config(SHIPPED)
    assert set(config.loops) == {"heartbeat", "research", "planning", "triage"}

    def aliases(loop: str) -> list[tuple[str | None, str]]:
        return [(e.tier, e.alias) for e in config.chain(loop)]

    assert aliases("heartbeat") == [("fast", "haiku"), ("fast", "gpt-mini")]
    assert aliases("research") == [("balanced", "sonnet"), ("balanced", "gpt")]
    assert aliases("planning") == [("deep", "opus"), ("deep", "gpt-deep")]
    heartbeat = config.loops["heartbeat"]
    assert (heartbeat.every_seconds, heartbeat.max_tokens, heartbeat.route) == (1800, 512, "static")
    assert heartbeat.quiet_token == "HEARTBEAT_OK"
    assert heartbeat.budget is not None and str(heartbeat.budget.per_day_usd) == "0.10"
    assert config.loops["research"].cron == "0 */2 * * *"
    assert config.loops["research"].max_tokens == 4096
    planning = config.loops["planning"]
    assert (planning.cron, planning.max_tokens, planning.min_tokens) == ("0 7 * * *", 8192, 2048)
    assert planning.when_over_budget == "downgrade"
    assert planning.budget is not None and planning.budget.limits() == {"month": Decimal(10)}
    assert config.budgets is not None
    assert config.budgets.limits() == {"day": Decimal(5), "month": Decimal(60)}
    for alias, model in config.models.items():
        assert config.price(alias) is not None, alias
        assert config.providers[model.provider].api_key_env in (
            "ANTHROPIC_API_KEY",
            "OPENAI_API_KEY",
        )
    for loop in config.loops:
        assert config.prompt_path(loop).parent == REPO / "loops"
        assert "{now}" in config.prompt_path(loop).read_text()
    assert "HEARTBEAT_OK" in config.prompt_path("heartbeat").read_text()
    assert SHIPPED.read_text().splitlines()[0] == (
        "# yaml-language-server: $schema=agent-model-config.schema.json"
    )


@pytest.mark.parametrize(
    ("provider", "model"),
    [("anthropic", "claude-haiku-4-5"), ("openai", "gpt-4o-mini"), ("openai", "o1")],
)
def test_older_model_names_mentioned_in_the_shipped_config_are_priced(
    provider: str, model: str
) -> None:
    assert f"model: {model}}}" in SHIPPED.read_text()
    assert lookup_price(provider, model) is not None


def test_model_short_form_and_fallback_chain(tmp_path: Path) -> None:
    text = mutate("    tier: fast\n", "    model: mini\n    fallback_tiers: [fast, balanced]\n")
    text += "  solo:\n    cron: '0 7 * * *'\n    model: opus\n    max_tokens: 5\n"
    text += "    prompt: prompt.md\n"
    text = mutate(
        "models:\n", "models:\n  opus: {provider: anthropic, model: claude-opus-4-1}\n", text
    )
    config = load_config(write(tmp_path, text))
    chain = config.chain("heartbeat")
    # The alias comes first, tagged with the first tier containing it; duplicates are dropped.
    assert [(e.tier, e.alias) for e in chain] == [
        ("fast", "mini"),
        ("fast", "haiku"),
        ("balanced", "sonnet"),
    ]
    assert chain[0] == ChainEntry(
        "fast", "mini", config.models["mini"], "openai", config.providers["openai"]
    )
    assert [(e.tier, e.alias) for e in config.chain("solo")] == [(None, "opus")]
    assert [e.alias for e in config.tier_chain("balanced")] == ["sonnet"]


def test_yaml_11_words_and_times_stay_strings(tmp_path: Path) -> None:
    text = mutate(
        "    tier: fast\n", "    tier: fast\n    quiet_token: off\n    description: 8:30\n"
    )
    loop = load_config(write(tmp_path, text)).loops["heartbeat"]
    assert loop.quiet_token == "off"
    assert loop.description == "8:30"


def test_yaml_scalars_resolve_like_yaml_12() -> None:
    data = load_yaml(
        "a: off\nb: yes\nc: 8:30\nd: true\ne: False\nf: 12\ng: 1.5\nh: 0.10\n"
        "i: 2024-01-01\nj: 1_000\nk: -3\nl: 1e3\nm: null\nn: ~\no: 012\n"
    ).data
    assert data == {
        "a": "off",
        "b": "yes",
        "c": "8:30",
        "d": True,
        "e": False,
        "f": 12,
        "g": Decimal("1.5"),
        "h": Decimal("0.10"),
        "i": "2024-01-01",
        "j": 1000,
        "k": -3,
        "l": Decimal("1e3"),
        "m": None,
        "n": None,
        "o": "012",
    }
    assert type(data["f"]) is int and type(data["d"]) is bool
    assert str(data["h"]) == "0.10"  # built from the text, not from the float 0.1


def test_money_is_exact_decimal_from_the_source_text(tmp_path: Path) -> None:
    text = mutate("    tier: fast\n", "    tier: fast\n    budget: {per_day_usd: 0.10}\n")
    text = mutate(
        "model: gpt-4o-mini}", "model: gpt-4o-mini, price: {input: 0.15, output: 0.6}}", text
    )
    config = load_config(write(tmp_path, text))
    budget = config.loops["heartbeat"].budget
    assert budget is not None and budget.per_day_usd is not None
    assert isinstance(budget.per_day_usd, Decimal) and str(budget.per_day_usd) == "0.10"
    assert budget.per_day_usd != Decimal.from_float(0.1)
    price = config.price("mini")
    assert price is not None and price.source == "config"
    assert (price.base.input, price.base.output) == (Decimal("0.15"), Decimal("0.6"))
    assert config.price("haiku") == lookup_price("anthropic", "claude-haiku-4-5")


def test_quoted_plain_decimals_are_money_too(tmp_path: Path) -> None:
    # Configs that quote amounts to keep them exact were valid before numbers became strict.
    text = mutate("    tier: fast\n", "    tier: fast\n    budget: {per_day_usd: '0.10'}\n")
    text = mutate(
        "model: gpt-4o-mini}", "model: gpt-4o-mini, price: {input: ' 2', output: 3}}", text
    )
    config = load_config(write(tmp_path, text))
    budget = config.loops["heartbeat"].budget
    assert budget is not None and budget.per_day_usd == Decimal("0.10")
    price = config.price("mini")
    assert price is not None and price.base.input == Decimal("2")


def test_numbers_take_ints_where_decimals_are_allowed_and_the_bounds_themselves(
    tmp_path: Path,
) -> None:
    text = mutate(
        "{type: anthropic, api_key_env: ANTHROPIC_API_KEY}",
        "{type: anthropic, api_key_env: ANTHROPIC_API_KEY, timeout_s: 31622400}",
    )
    text = mutate("every: 30m", "every: 366d", text)
    text = mutate("max_tokens: 512", "max_tokens: 10000000", text)
    text = mutate(
        "    tier: fast\n",
        "    tier: fast\n    budget: {per_day_usd: 5, per_month_usd: 1000000000}\n"
        "    limits: {max_usd_per_run: 0.50}\n",
        text,
    )
    text = mutate("loops:\n", "guardrails: {reload_increase_warn: 2}\nloops:\n", text)
    config = load_config(write(tmp_path, text))
    loop = config.loops["heartbeat"]
    assert (loop.every_seconds, loop.max_tokens) == (366 * 86400, 10_000_000)
    assert config.providers["anthropic"].timeout_s == 31622400
    assert loop.budget is not None and loop.budget.limits() == {
        "day": Decimal(5),
        "month": Decimal(1_000_000_000),
    }
    assert loop.limits is not None and str(loop.limits.max_usd_per_run) == "0.50"
    share = config.guardrails.reload_increase_warn
    assert isinstance(share, Decimal) and share == 2
    assert str(load_config(write(tmp_path, BASE)).guardrails.reload_increase_warn) == "0.25"


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({"timeout_s": float("inf")}, "must be a finite number (got inf)"),
        ({"timeout_s": float("nan")}, "must be a finite number (got nan)"),
        ({"timeout_s": Decimal("NaN")}, "must be a finite number (got NaN)"),
    ],
)
def test_non_finite_numbers_are_refused(tmp_path: Path, data: dict[str, Any], problem: str) -> None:
    base = load_yaml(BASE).data
    base["providers"]["anthropic"].update(data)
    with pytest.raises(ConfigError) as info:
        parse_config(base, tmp_path / "agent-model-config.yaml")
    assert (info.value.key_path, info.value.problem) == ("providers.anthropic.timeout_s", problem)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (Decimal("Infinity"), "must be a finite number (got Infinity)"),
        (0.1, "must be an exact decimal, not a binary float (got 0.1)"),
    ],
)
def test_money_is_never_a_float_or_infinite(tmp_path: Path, value: object, problem: str) -> None:
    base = load_yaml(BASE).data
    base["budgets"] = {"per_day_usd": value}
    with pytest.raises(ConfigError) as info:
        parse_config(base, tmp_path / "agent-model-config.yaml")
    assert (info.value.key_path, info.value.problem) == ("budgets.per_day_usd", problem)


def test_durations_are_bounded_to_a_year() -> None:
    assert parse_duration("366d") == 366 * 86400
    assert parse_duration("0000000000001s") == 1  # leading zeros are not a huge number
    for text in ("366d1s", "8785h", "99999999999d", "9" * 5000 + "m"):
        with pytest.raises(ValueError, match="must be at most 366d"):
            parse_duration(text)


def test_merge_keys_work_and_errors_point_at_the_explicit_key(tmp_path: Path) -> None:
    text = mutate(
        "  heartbeat:\n",
        "  base: &base {every: 1h, tier: fast, max_tokens: 5, prompt: prompt.md}\n"
        "  other:\n    <<: *base\n    max_tokens: 0\n  heartbeat:\n",
    )
    error = error_of(tmp_path, text)
    assert (error.key_path, error.line) == ("loops.other.max_tokens", 15)


@given(
    st.integers(0, 9),
    st.integers(0, 30),
    st.integers(0, 90),
    st.integers(0, 90),
)
def test_parse_duration_sums_its_parts(d: int, h: int, m: int, s: int) -> None:
    text = "".join(f"{n}{u}" for n, u in ((d, "d"), (h, "h"), (m, "m"), (s, "s")) if n)
    total = ((d * 24 + h) * 60 + m) * 60 + s
    if total == 0:
        with pytest.raises(ValueError):
            parse_duration(text)
    else:
        assert parse_duration(text) == total


@given(st.decimals(allow_nan=False, allow_infinity=False, places=6))
def test_yaml_floats_are_the_decimal_of_their_text(value: Decimal) -> None:
    text = f"{value:f}"
    if "." not in text:
        text += ".0"
    assert str(load_yaml(f"x: {text}\n").data["x"]) == str(Decimal(text))


# ---------------------------------------------------------------------------- invalid files

# Fragments and key paths shared by many rows of the table below.
LOOP_KEY = "    tier: fast\n"  # a key added after it lands on line 15
ANTHROPIC = "anthropic: {type: anthropic, api_key_env: ANTHROPIC_API_KEY"
MAX_TOKENS = "loops.heartbeat.max_tokens"
EVERY = "loops.heartbeat.every"
TIMEOUT = "providers.anthropic.timeout_s"
PER_DAY = "loops.heartbeat.budget.per_day_usd"
SHARE = "guardrails.reload_increase_warn"
MANY_DIGITS = "every: " + "9" * 5000 + "s"  # int() refuses 4300+ digits

INVALID = [
    # id, old fragment, new fragment, key path, line, problem substring
    ("unknown-top", "loops:\n", "colour: red\nloops:\n", "colour", 11, "unknown key"),
    (
        "unknown-nested",
        "    tier: fast\n",
        "    tier: fast\n    colour: red\n",
        "loops.heartbeat.colour",
        15,
        "unknown key (allowed: every, cron",
    ),
    (
        "typo",
        "    max_tokens: 512\n",
        "    max_token: 512\n",
        "loops.heartbeat.max_token",
        15,
        "unknown key (did you mean 'max_tokens'?)",
    ),
    (
        "wrong-type",
        "max_tokens: 512",
        "max_tokens: lots",
        "loops.heartbeat.max_tokens",
        15,
        "must be an integer (got 'lots')",
    ),
    (
        "wrong-type-mapping",
        "  fast: [haiku, mini]",
        "  fast: haiku",
        "tiers.fast",
        9,
        "must be a list (got 'haiku')",
    ),
    (
        "undefined-tier",
        "    tier: fast",
        "    tier: medium",
        "loops.heartbeat.tier",
        14,
        "undefined tier 'medium' (defined: balanced, fast)",
    ),
    (
        "undefined-alias",
        "    tier: fast",
        "    model: opus",
        "loops.heartbeat.model",
        14,
        "undefined model 'opus' (defined: haiku, mini, sonnet)",
    ),
    (
        "tier-undefined-model",
        "  fast: [haiku, mini]",
        "  fast: [haiku, gpt]",
        "tiers.fast[1]",
        9,
        "undefined model 'gpt' (defined: haiku, mini, sonnet)",
    ),
    ("empty-chain", "  balanced: [sonnet]", "  balanced: []", "tiers.balanced", 10, "empty chain"),
    (
        "both-tier-and-model",
        "    tier: fast\n",
        "    tier: fast\n    model: haiku\n",
        "loops.heartbeat.model",
        15,
        "give tier or model, not both",
    ),
    (
        "neither-tier-nor-model",
        "    tier: fast\n",
        "",
        "loops.heartbeat",
        12,
        "give tier (a key of tiers) or model",
    ),
    (
        "both-every-and-cron",
        "    every: 30m\n",
        "    every: 30m\n    cron: '0 * * * *'\n",
        "loops.heartbeat.cron",
        14,
        "give every or cron, not both",
    ),
    ("neither-every-nor-cron", "    every: 30m\n", "", "loops.heartbeat", 12, "give a schedule"),
    (
        "max-tokens-zero",
        "max_tokens: 512",
        "max_tokens: 0",
        "loops.heartbeat.max_tokens",
        15,
        "must be greater than 0 (got 0)",
    ),
    (
        "max-tokens-negative",
        "max_tokens: 512",
        "max_tokens: -1",
        "loops.heartbeat.max_tokens",
        15,
        "must be greater than 0 (got -1)",
    ),
    (
        "max-tokens-missing",
        "    max_tokens: 512\n",
        "",
        "loops.heartbeat.max_tokens",
        12,
        "required key is missing",
    ),
    (
        "bad-duration",
        "every: 30m",
        "every: 30 minutes",
        "loops.heartbeat.every",
        13,
        "not a duration like 30m, 2h, 45s, 1d or 1h30m (got '30 minutes')",
    ),
    (
        "duration-without-unit",
        "every: 30m",
        "every: 30",
        "loops.heartbeat.every",
        13,
        "needs a unit, e.g. 30s or 30m",
    ),
    (
        "zero-duration",
        "every: 30m",
        "every: 0s",
        "loops.heartbeat.every",
        13,
        "must be longer than zero",
    ),
    (
        "bad-cron-value",
        "every: 30m",
        "cron: '61 * * * *'",
        "loops.heartbeat.cron",
        13,
        "not a 5-field crontab like '0 7 * * *' (got '61 * * * *')",
    ),
    (
        "bad-cron-fields",
        "every: 30m",
        "cron: '* * *'",
        "loops.heartbeat.cron",
        13,
        "wrong number of fields; got 3, expected 5",
    ),
    (
        "budget-zero",
        "    tier: fast\n",
        "    tier: fast\n    budget: {per_day_usd: 0}\n",
        "loops.heartbeat.budget.per_day_usd",
        15,
        "must be greater than 0 (got 0)",
    ),
    (
        "budget-negative",
        "loops:\n",
        "budgets:\n  per_month_usd: -5.00\nloops:\n",
        "budgets.per_month_usd",
        12,
        "must be greater than 0 (got -5.00)",
    ),
    (
        "budget-empty",
        "loops:\n",
        "budgets: {}\nloops:\n",
        "budgets",
        11,
        "give at least one of per_hour_usd",
    ),
    (
        "missing-prompt",
        "prompt: prompt.md",
        "prompt: ../nowhere/missing.md",
        "loops.heartbeat.prompt",
        16,
        "cannot read prompt file",
    ),
    (
        "bad-timezone",
        "providers:\n",
        "timezone: Mars/Olympus\nproviders:\n",
        "timezone",
        1,
        "unknown time zone 'Mars/Olympus'",
    ),
    (
        "duplicate-key",
        "    tier: fast\n",
        "    tier: fast\n    tier: balanced\n",
        "loops.heartbeat.tier",
        15,
        "duplicate key (first given on line 14)",
    ),
    (
        "route-unknown",
        "    tier: fast\n",
        "    tier: fast\n    route: sometimes\n",
        "loops.heartbeat.route",
        15,
        "must be 'static', 'rules', 'classify' or 'cascade' (got 'sometimes')",
    ),
    (
        "when-over-budget",
        "    tier: fast\n",
        "    tier: fast\n    when_over_budget: later\n",
        "loops.heartbeat.when_over_budget",
        15,
        "must be 'skip', 'downgrade' or 'pause' (got 'later')",
    ),
    (
        "undefined-provider",
        "{provider: anthropic, model: claude-haiku-4-5}",
        "{provider: claude, model: claude-haiku-4-5}",
        "models.haiku.provider",
        5,
        "undefined provider 'claude' (defined: anthropic, openai)",
    ),
    (
        "provider-type",
        "{type: openai, api_key_env",
        "{type: gemini, api_key_env",
        "providers.openai.type",
        3,
        "must be 'anthropic' or 'openai' (got 'gemini')",
    ),
    (
        "both-key-sources",
        "api_key_env: OPENAI_API_KEY}",
        "api_key_env: OPENAI_API_KEY, api_key_file: key.txt}",
        "providers.openai.api_key_file",
        3,
        "give api_key_env or api_key_file, not both",
    ),
    (
        "min-tokens-over-max",
        "    tier: fast\n",
        "    tier: fast\n    min_tokens: 513\n",
        "loops.heartbeat.min_tokens",
        15,
        "must not exceed max_tokens (512) (got 513)",
    ),
    (
        "min-tokens-zero",
        "    tier: fast\n",
        "    tier: fast\n    min_tokens: 0\n",
        "loops.heartbeat.min_tokens",
        15,
        "must be greater than 0",
    ),
    (
        "undefined-fallback-tier",
        "    tier: fast\n",
        "    tier: fast\n    fallback_tiers: [balanced, deep]\n",
        "loops.heartbeat.fallback_tiers[1]",
        15,
        "undefined tier 'deep'",
    ),
    (
        "bool-type",
        "    tier: fast\n",
        "    tier: fast\n    enabled: maybe\n",
        "loops.heartbeat.enabled",
        15,
        "must be true or false (got 'maybe')",
    ),
    (
        "no-loops",
        "loops:\n  heartbeat:\n    every: 30m\n    tier: fast\n    max_tokens: 512\n"
        "    prompt: prompt.md\n",
        "loops: {}\n",
        "loops",
        11,
        "must not be empty",
    ),
    (
        "cooldowns-empty",
        "loops:\n",
        "circuit_breaker: {cooldowns_s: []}\nloops:\n",
        "circuit_breaker.cooldowns_s",
        11,
        "must not be empty",
    ),
    (
        "cooldown-not-positive",
        "loops:\n",
        "circuit_breaker:\n  cooldowns_s: [30, 0]\nloops:\n",
        "circuit_breaker.cooldowns_s[1]",
        12,
        "must be greater than 0 (got 0)",
    ),
    (
        "loop-name",
        "  heartbeat:\n",
        "  heart/beat:\n",
        "loops.heart/beat",
        12,
        "loop names use letters, digits",
    ),
    # Numbers are strict: no bool, no numeric string, no fraction for an integer (issue 2).
    (
        "max-tokens-bool",
        "max_tokens: 512",
        "max_tokens: true",
        MAX_TOKENS,
        15,
        "must be an integer (got true)",
    ),
    (
        "max-tokens-string",
        "max_tokens: 512",
        'max_tokens: "512"',
        MAX_TOKENS,
        15,
        "must be an integer (got '512')",
    ),
    (
        "max-tokens-fraction",
        "max_tokens: 512",
        "max_tokens: 512.0",
        MAX_TOKENS,
        15,
        "must be an integer (got 512.0)",
    ),
    (
        "min-tokens-string",
        LOOP_KEY,
        LOOP_KEY + "    min_tokens: '8'\n",
        "loops.heartbeat.min_tokens",
        15,
        "must be an integer (got '8')",
    ),
    (
        "timeout-bool",
        ANTHROPIC,
        ANTHROPIC + ", timeout_s: true",
        TIMEOUT,
        2,
        "must be a number (got true)",
    ),
    (
        "timeout-string",
        ANTHROPIC,
        ANTHROPIC + ", timeout_s: '60'",
        TIMEOUT,
        2,
        "must be a number (got '60')",
    ),
    (
        "timeout-inf",
        ANTHROPIC,
        ANTHROPIC + ", timeout_s: .inf",
        TIMEOUT,
        2,
        "must be a number (got '.inf')",
    ),
    (
        "timeout-overflow",
        ANTHROPIC,
        ANTHROPIC + ", timeout_s: 1e400",
        TIMEOUT,
        2,
        "must be a finite number (got 1E+400)",
    ),
    (
        "retries-bool",
        ANTHROPIC,
        ANTHROPIC + ", max_retries: false",
        "providers.anthropic.max_retries",
        2,
        "must be an integer (got false)",
    ),
    (
        "budget-bool",
        LOOP_KEY,
        LOOP_KEY + "    budget: {per_day_usd: true}\n",
        PER_DAY,
        15,
        "must be a number (got true)",
    ),
    (
        "budget-string",
        LOOP_KEY,
        LOOP_KEY + "    budget: {per_day_usd: '1e-1'}\n",
        PER_DAY,
        15,
        "must be a number (got '1e-1')",
    ),
    (
        "price-string",
        "model: gpt-4o-mini}",
        "model: gpt-4o-mini, price: {input: 'one', output: 2}}",
        "models.mini.price.input",
        6,
        "must be a number (got 'one')",
    ),
    (
        "factor-string",
        "loops:\n",
        "guardrails: {anomaly: {factor: '5x'}}\nloops:\n",
        "guardrails.anomaly.factor",
        11,
        "must be a number (got '5x')",
    ),
    (
        "share-bool",
        "loops:\n",
        "guardrails: {reload_increase_warn: true}\nloops:\n",
        SHARE,
        11,
        "must be a number (got true)",
    ),
    (
        "backoff-bool",
        LOOP_KEY,
        LOOP_KEY + "    on_failure: {backoff_s: [30, true]}\n",
        "loops.heartbeat.on_failure.backoff_s[1]",
        15,
        "must be a number (got true)",
    ),
    (
        "grace-bool",
        "loops:\n",
        "daemon: {shutdown_grace_s: false}\nloops:\n",
        "daemon.shutdown_grace_s",
        11,
        "must be a number (got false)",
    ),
    (
        "enabled-yaml11-word",
        LOOP_KEY,
        LOOP_KEY + "    enabled: off\n",
        "loops.heartbeat.enabled",
        15,
        "must be true or false (got 'off')",
    ),
    (
        "enabled-number",
        LOOP_KEY,
        LOOP_KEY + "    enabled: 1\n",
        "loops.heartbeat.enabled",
        15,
        "must be true or false (got 1)",
    ),
    # Upper bounds: beyond them `check` or `run` used to crash with a traceback (issue 2).
    (
        "every-overflow",
        "every: 30m",
        "every: 99999999999d",
        EVERY,
        13,
        "must be at most 366d (got '99999999999d')",
    ),
    (
        "every-over-a-year",
        "every: 30m",
        "every: 366d1s",
        EVERY,
        13,
        "must be at most 366d (got '366d1s')",
    ),
    (
        "every-many-digits",
        "every: 30m",
        MANY_DIGITS,
        EVERY,
        13,
        "must be at most 366d (got '99999",
    ),
    (
        "jitter-over-a-year",
        LOOP_KEY,
        LOOP_KEY + "    jitter: 400d\n",
        "loops.heartbeat.jitter",
        15,
        "must be at most 366d (got '400d')",
    ),
    (
        "batch-timeout-over-a-year",
        LOOP_KEY,
        LOOP_KEY + "    batch: {timeout: 9999d}\n",
        "loops.heartbeat.batch.timeout",
        15,
        "must be at most 366d (got '9999d')",
    ),
    (
        "timeout-over-a-year",
        ANTHROPIC,
        ANTHROPIC + ", timeout_s: 31622401",
        TIMEOUT,
        2,
        "must be at most 31622400 (got 31622401)",
    ),
    (
        "cooldown-over-a-year",
        "loops:\n",
        "circuit_breaker: {cooldowns_s: [30, 1e12]}\nloops:\n",
        "circuit_breaker.cooldowns_s[1]",
        11,
        "must be at most 31622400 (got 1E+12)",
    ),
    (
        "max-tokens-huge",
        "max_tokens: 512",
        "max_tokens: 99999999999",
        MAX_TOKENS,
        15,
        "must be at most 10000000 (got 99999999999)",
    ),
    (
        "max-bytes-huge",
        LOOP_KEY,
        LOOP_KEY + "    context: [{last_reply: true, max_bytes: 2000000000}]\n",
        "loops.heartbeat.context[0].max_bytes",
        15,
        "must be at most 1073741824 (got 2000000000)",
    ),
    (
        "budget-overflow",
        LOOP_KEY,
        LOOP_KEY + "    budget: {per_day_usd: 1e400}\n",
        PER_DAY,
        15,
        "must be at most 1000000000 (got 1E+400)",
    ),
    (
        "global-budget-huge",
        "loops:\n",
        "budgets: {per_month_usd: 1000000000.01}\nloops:\n",
        "budgets.per_month_usd",
        11,
        "must be at most 1000000000 (got 1000000000.01)",
    ),
    (
        "price-huge",
        "model: gpt-4o-mini}",
        "model: gpt-4o-mini, price: {input: 1, output: 1e10}}",
        "models.mini.price.output",
        6,
        "must be at most 1000000000 (got 1E+10)",
    ),
    (
        "per-run-usd-huge",
        LOOP_KEY,
        LOOP_KEY + "    limits: {max_usd_per_run: 1e400}\n",
        "loops.heartbeat.limits.max_usd_per_run",
        15,
        "must be at most 1000000000 (got 1E+400)",
    ),
    (
        "factor-huge",
        "loops:\n",
        "guardrails: {anomaly: {factor: 1e400}}\nloops:\n",
        "guardrails.anomaly.factor",
        11,
        "must be at most 1000000 (got 1E+400)",
    ),
    (
        "share-negative",
        "loops:\n",
        "guardrails: {reload_increase_warn: -0.25}\nloops:\n",
        SHARE,
        11,
        "must be at least 0 (got -0.25)",
    ),
    (
        "share-huge",
        "loops:\n",
        "guardrails: {reload_increase_warn: 1e400}\nloops:\n",
        SHARE,
        11,
        "must be at most 1000 (got 1E+400)",
    ),
]


@pytest.mark.parametrize(
    ("old", "new", "key_path", "line", "problem"),
    [pytest.param(*case[1:], id=case[0]) for case in INVALID],
)
def test_invalid_config(
    tmp_path: Path, old: str, new: str, key_path: str, line: int, problem: str
) -> None:
    error = error_of(tmp_path, mutate(old, new))
    assert error.key_path == key_path
    assert error.line == line
    assert problem in error.problem
    where = f"{tmp_path / 'agent-model-config.yaml'}:{line}"
    assert str(error) == f"{where}: {key_path}: {error.problem}"
    assert "Traceback" not in str(error) and "pydantic" not in str(error)


def test_budgeted_loop_requires_prices(tmp_path: Path) -> None:
    text = mutate("model: gpt-4o-mini}", "model: llama-3-local}")
    text = mutate("    tier: fast\n", "    tier: fast\n    budget: {per_day_usd: 0.10}\n", text)
    error = error_of(tmp_path, text)
    assert (error.key_path, error.line) == ("loops.heartbeat", 12)
    assert error.problem == (
        "model 'mini' (llama-3-local on provider 'openai') has no known price, so this loop's "
        "budget cannot be enforced: add models.mini.price with input and output in USD per "
        "million tokens"
    )


def test_global_budget_requires_prices_and_a_price_override_satisfies_it(tmp_path: Path) -> None:
    unpriced = mutate("model: gpt-4o-mini}", "model: llama-3-local}")
    assert load_config(write(tmp_path, unpriced)).price("mini") is None  # no budget: fine
    error = error_of(tmp_path, unpriced + "budgets: {per_day_usd: 5}\n")
    assert (error.key_path, error.line) == ("loops.heartbeat", 12)
    assert "llama-3-local" in error.problem and "add models.mini.price" in error.problem
    assert "the global budgets" in error.problem
    priced = mutate(
        "model: llama-3-local}", "model: llama-3-local, price: {input: 0, output: 0}}", unpriced
    )
    config = load_config(write(tmp_path, priced + "budgets: {per_day_usd: 5}\n"))
    price = config.price("mini")
    assert price is not None and price.base.output == 0


def test_unpriced_model_outside_a_budgeted_chain_is_fine(tmp_path: Path) -> None:
    text = mutate("model: claude-sonnet-4-5}", "model: mystery-9}")
    text = mutate("    tier: fast\n", "    tier: fast\n    budget: {per_day_usd: 1}\n", text)
    assert load_config(write(tmp_path, text)).price("sonnet") is None


def test_bad_yaml_names_the_line(tmp_path: Path) -> None:
    error = error_of(tmp_path, mutate("  fast: [haiku, mini]", "  fast: [haiku, mini"))
    assert error.line == 10
    assert error.key_path == ""
    assert error.problem.startswith("invalid YAML: ")
    bad_indent = error_of(tmp_path, mutate("    tier: fast", "   tier: fast"))
    assert bad_indent.line == 14 and "invalid YAML" in bad_indent.problem


def test_yaml_tags_that_build_objects_are_refused(tmp_path: Path) -> None:
    error = error_of(tmp_path, BASE + "x: !!python/object/apply:os.system ['true']\n")
    assert error.line == 17 and "could not determine a constructor" in error.problem


def test_duplicate_top_level_key(tmp_path: Path) -> None:
    error = error_of(tmp_path, BASE + "tiers: {}\n")
    assert (error.key_path, error.line) == ("tiers", 17)
    assert error.problem == "duplicate key (first given on line 8)"


@pytest.mark.parametrize(
    ("text", "problem", "line"),
    [
        ("", "the file is empty", None),
        ("# only a comment\n", "the file is empty", None),
        ("- a\n- b\n", "the top level must be a mapping of settings (got a list)", 1),
        (BASE + "---\nx: 1\n", "but found another document", 17),
        (BASE.replace("  fast: [haiku, mini]", "  fast: &x [haiku, *x]"), "must be a string", 9),
    ],
)
def test_odd_documents(tmp_path: Path, text: str, problem: str, line: int | None) -> None:
    error = error_of(tmp_path, text)
    assert problem in error.problem
    assert error.line == line


def test_unreadable_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"nope\.yaml: file not found \(give --config"):
        load_config(missing)
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"providers: \xff\n")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(binary)


def test_unreadable_prompt(tmp_path: Path) -> None:
    # A directory where the prompt file should be: unreadable even for root (CI runs as root).
    path = write(tmp_path, BASE)
    (tmp_path / "prompt.md").unlink()
    (tmp_path / "prompt.md").mkdir()
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key_path == "loops.heartbeat.prompt"
    assert "directory" in info.value.problem


def test_parse_config_validates_dicts_without_lines(tmp_path: Path) -> None:
    data = load_yaml(BASE).data
    (tmp_path / "prompt.md").write_text("x")
    config = parse_config(data, tmp_path / "c.yaml")
    assert config.dir == tmp_path
    data["loops"]["heartbeat"]["max_tokens"] = 0
    with pytest.raises(ConfigError) as info:
        parse_config(data, tmp_path / "c.yaml")
    assert (info.value.key_path, info.value.line) == ("loops.heartbeat.max_tokens", None)


def test_models_are_frozen(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, BASE))
    with pytest.raises(Exception, match="frozen"):
        config.loops["heartbeat"].max_tokens = 5


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(cut=st.integers(0, len(BASE)), junk=st.text(max_size=8))
def test_any_damage_gives_a_config_error_never_a_traceback(
    tmp_path: Path, cut: int, junk: str
) -> None:
    path = write(tmp_path, BASE[:cut] + junk + BASE[cut + len(junk) :])
    try:
        load_config(path)
    except ConfigError as error:
        assert error.file == str(path)


# ---------------------------------------------------------------------------- paths


def test_resolve_config_path_order(tmp_path: Path) -> None:
    system = tmp_path / "etc" / "agent-model-config.yaml"
    cwd = tmp_path / "work"
    local = cwd / "config" / "agent-model-config.yaml"
    env = {"AGENTD_CONFIG": "/from/env.yaml"}

    def resolve(cli: str | None, env: dict[str, str]) -> Path:
        return resolve_config_path(cli, env=env, cwd=cwd, system_path=system)

    assert resolve(None, {}) == local  # nothing exists: the local path, so the error names it
    system.parent.mkdir(parents=True)
    system.write_text("x")
    assert resolve(None, {}) == system
    local.parent.mkdir(parents=True)
    local.write_text("x")
    assert resolve(None, {}) == local
    assert resolve(None, env) == Path("/from/env.yaml")
    assert resolve(None, {"AGENTD_CONFIG": ""}) == local
    assert resolve("/from/cli.yaml", env) == Path("/from/cli.yaml")


def test_resolve_state_dir_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(write(tmp_path / "etc", "state_dir: ../var/agentd\n" + BASE))
    env = {"AGENTD_STATE_DIR": "/env/state", "STATE_DIRECTORY": "/var/lib/agentd:/var/lib/other"}
    assert resolve_state_dir("/cli/state", config, env) == Path("/cli/state")
    assert resolve_state_dir(None, config, env) == Path("/env/state")
    systemd_only = {"STATE_DIRECTORY": "/var/lib/agentd:/var/lib/other"}
    assert resolve_state_dir(None, config, systemd_only) == Path("/var/lib/agentd")
    assert resolve_state_dir(None, config, {}) == tmp_path / "etc" / ".." / "var" / "agentd"
    assert resolve_state_dir(None, None, {}) == tmp_path / "state"
    assert resolve_state_dir("rel", None, {}) == tmp_path / "rel"
    assert resolve_state_dir(None, None, {"AGENTD_STATE_DIR": ""}) == tmp_path / "state"
    plain = load_config(write(tmp_path / "plain", BASE))
    assert resolve_state_dir(None, plain, {}) == tmp_path / "state"


# ---------------------------------------------------------------------------- API keys

SECRET = "sk-test-do-not-print-4242"


def test_read_api_key_from_env() -> None:
    provider = ProviderConfig(type="anthropic", api_key_env="ANTHROPIC_API_KEY")
    assert read_api_key("anthropic", provider, {"ANTHROPIC_API_KEY": f"  {SECRET}\n"}) == SECRET
    for env in ({}, {"ANTHROPIC_API_KEY": ""}, {"ANTHROPIC_API_KEY": "  "}):
        with pytest.raises(MissingKeyError) as info:
            read_api_key("anthropic", provider, env)
        assert str(info.value) == (
            "provider 'anthropic': environment variable ANTHROPIC_API_KEY is not set "
            "(use --simulate to run without a key)"
        )


def test_keyless_provider() -> None:
    provider = ProviderConfig(type="openai", base_url="http://127.0.0.1:11434/v1")
    assert read_api_key("local", provider, {}) is None


def test_read_api_key_from_file(tmp_path: Path) -> None:
    (tmp_path / "key.txt").write_text(f"{SECRET}\n")
    provider = ProviderConfig(type="openai", api_key_file="key.txt")
    assert read_api_key("openai", provider, {}, base_dir=tmp_path) == SECRET
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "key.txt").write_text("from-credentials\n")
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    assert read_api_key("openai", provider, env, base_dir=tmp_path) == "from-credentials"
    absolute = ProviderConfig(type="openai", api_key_file=str(tmp_path / "key.txt"))
    assert read_api_key("openai", absolute, env) == SECRET


def test_key_file_problems_never_show_the_key(tmp_path: Path) -> None:
    provider = ProviderConfig(type="openai", api_key_file="key.txt")
    with pytest.raises(
        MissingKeyError, match=r"provider 'openai': cannot read api_key_file .*key\.txt"
    ):
        read_api_key("openai", provider, {}, base_dir=tmp_path)
    (tmp_path / "key.txt").write_text(" \n")
    with pytest.raises(MissingKeyError, match="is empty"):
        read_api_key("openai", provider, {}, base_dir=tmp_path)
    (tmp_path / "key.txt").write_bytes(SECRET.encode() + b"\xff\xfe")
    with pytest.raises(MissingKeyError) as info:
        read_api_key("openai", provider, {}, base_dir=tmp_path)
    assert "not UTF-8" in str(info.value)
    assert SECRET not in str(info.value) and "sk-" not in str(info.value)


def test_config_api_key_and_missing_key_warnings(tmp_path: Path) -> None:
    text = mutate(
        "  openai: {type: openai, api_key_env: OPENAI_API_KEY}\n",
        "  openai: {type: openai, api_key_file: openai.key}\n"
        "  local: {type: openai, base_url: 'http://127.0.0.1:11434/v1'}\n",
    )
    config = load_config(write(tmp_path, text))
    assert missing_api_keys(config, {}) == [
        "provider 'anthropic': environment variable ANTHROPIC_API_KEY is not set "
        "(use --simulate to run without a key)",
        f"provider 'openai': cannot read api_key_file {tmp_path / 'openai.key'}: "
        "No such file or directory (use --simulate to run without a key)",
    ]
    (tmp_path / "openai.key").write_text(SECRET)
    env = {"ANTHROPIC_API_KEY": "sk-ant"}
    assert missing_api_keys(config, env) == []
    assert config.api_key("openai", env) == SECRET
    assert config.api_key("local", env) is None


# ---------------------------------------------------------------------------- schema


def test_schema_file_is_in_sync() -> None:
    shipped = (REPO / "config" / "agent-model-config.schema.json").read_text()
    assert shipped == config_json_schema_text(), "regenerate: agentd config schema > config/…"
    schema = json.loads(shipped)
    assert schema == config_json_schema()
    assert schema["$id"] == "urn:agentd:agent-model-config.schema.json"
    assert schema["title"].startswith("agentd configuration")
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == {"providers", "models", "loops"}
    assert "LoopConfig" in schema["$defs"]


def test_schema_numbers_are_numbers_with_bounds() -> None:
    defs = config_json_schema()["$defs"]
    per_day = defs["BudgetConfig"]["properties"]["per_day_usd"]["anyOf"]
    # Money is a number up to the bound validation enforces, or a quoted plain decimal.
    assert per_day[0] == {"type": "number", "exclusiveMinimum": 0, "maximum": 1_000_000_000}
    assert per_day[1] == {"type": "string", "pattern": r"^\s*[0-9]+(\.[0-9]+)?\s*$"}
    share = defs["GuardrailsConfig"]["properties"]["reload_increase_warn"]
    number = share["anyOf"][0]
    assert (number["type"], number["minimum"], number["maximum"], share["default"]) == (
        "number",
        0,
        1000,
        0.25,
    )
    assert defs["LoopConfig"]["properties"]["max_tokens"]["maximum"] == 10_000_000
    assert defs["ProviderConfig"]["properties"]["timeout_s"]["maximum"] == 366 * 86400


def test_loop_config_can_be_built_directly() -> None:
    loop = LoopConfig(every="1h30m", model="haiku", max_tokens=10, prompt="p.md")
    assert loop.every_seconds == 5400
    assert LoopConfig(cron="0 7 * * *", tier="deep", max_tokens=1, prompt="p").every_seconds is None
    assert Config.model_fields["loops"].is_required()


def test_cron_sunday_as_7_is_valid_like_in_crontab(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.replace("every: 30m", "cron: '0 7 * * 7'"))
    assert load_config(path).loops["heartbeat"].cron == "0 7 * * 7"


# ---------------------------------------------------------------------------- routes

ROUTE_INVALID = [
    (
        "rules-needs-kind",
        "    route: rules\n",
        "loops.heartbeat.kind",
        "route: rules needs kind: extraction, classification, content, code or reasoning",
    ),
    (
        "kind-without-rules",
        "    kind: code\n",
        "loops.heartbeat.kind",
        "is read by route: rules only (this loop has route: static)",
    ),
    (
        "latency-without-rules",
        "    route: classify\n    latency: interactive\n",
        "loops.heartbeat.latency",
        "is read by route: rules only (this loop has route: classify)",
    ),
    (
        "unknown-kind",
        "    route: rules\n    kind: poetry\n",
        "loops.heartbeat.kind",
        "(got 'poetry')",
    ),
    (
        "rules-reaching-an-undefined-tier",
        "    route: rules\n    kind: reasoning\n",
        "loops.heartbeat.route",
        "route: rules (kind reasoning, stakes normal, latency background) uses tier 'deep', "
        "which is not defined (defined: balanced, fast)",
    ),
    (
        "routing-key-of-another-strategy",
        "    route: rules\n    kind: code\n    routing: {threshold: 0.5}\n",
        "loops.heartbeat.routing.threshold",
        "is read by route: cascade only (this loop has route: rules)",
    ),
    (
        "classify-label-on-undefined-tier",
        "    route: classify\n",
        "loops.heartbeat.routing.labels.complex_reasoning",
        "complex_reasoning uses tier 'deep', which is not defined (defined: balanced, fast)",
    ),
    (
        "classify-unknown-label",
        "    route: classify\n    routing: {labels: {poetry: fast}}\n",
        "loops.heartbeat.routing.labels.poetry",
        "unknown key",
    ),
    (
        "classifier-tier-undefined",
        "    route: classify\n    routing: {classifier_tier: tiny, labels: "
        "{complex_reasoning: balanced}}\n",
        "loops.heartbeat.routing.classifier_tier",
        "the classifier uses tier 'tiny', which is not defined",
    ),
    (
        "cascade-needs-deep",
        "    route: cascade\n",
        "loops.heartbeat.routing.escalate_tier",
        "the escalation uses tier 'deep', which is not defined (defined: balanced, fast)",
    ),
    (
        "cascade-review-tier-undefined",
        "    route: cascade\n    routing: {review_tier: cheap, escalate_tier: balanced}\n",
        "loops.heartbeat.routing.review_tier",
        "the reviewer uses tier 'cheap'",
    ),
    (
        "threshold-above-one",
        "    route: cascade\n    routing: {threshold: 1.5, escalate_tier: balanced}\n",
        "loops.heartbeat.routing.threshold",
        "must be at most 1 (got 1.5)",
    ),
    (
        "short-input-tokens-zero",
        "    route: rules\n    kind: code\n    routing: {short_input_tokens: 0}\n",
        "loops.heartbeat.routing.short_input_tokens",
        "(got 0)",
    ),
    (
        "missing-reviewer-template",
        "    route: cascade\n    routing: {escalate_tier: balanced, reviewer_prompt: no.md}\n",
        "loops.heartbeat.routing.reviewer_prompt",
        "cannot read template",
    ),
    (
        "reviewer-template-without-draft",
        "    route: cascade\n    routing: {escalate_tier: balanced, reviewer_prompt: prompt.md}\n",
        "loops.heartbeat.routing.reviewer_prompt",
        "lacks {task} and {draft}: the call would not see its input",
    ),
]


@pytest.mark.parametrize(
    ("extra", "key_path", "problem"),
    [pytest.param(*case[1:], id=case[0]) for case in ROUTE_INVALID],
)
def test_invalid_route(tmp_path: Path, extra: str, key_path: str, problem: str) -> None:
    error = error_of(tmp_path, BASE + extra)
    assert error.key_path == key_path
    assert problem in error.problem, error.problem


def test_valid_routes_and_their_defaults(tmp_path: Path) -> None:
    (tmp_path / "review.md").write_text("Task: {task}\nDraft: {draft}\nScore it.\n")
    text = BASE.replace("  balanced: [sonnet]\n", "  balanced: [sonnet]\n  deep: [sonnet]\n")
    text += (
        "  rules:\n    every: 1h\n    tier: fast\n    max_tokens: 100\n    prompt: prompt.md\n"
        "    route: rules\n    kind: extraction\n    stakes: low\n    latency: interactive\n"
        "    routing: {short_input_tokens: 50}\n"
        "  classify:\n    every: 1h\n    tier: balanced\n    max_tokens: 100\n"
        "    prompt: prompt.md\n    route: classify\n"
        "    routing: {labels: {code_task: deep}, classify_max_tokens: 16}\n"
        "  cascade:\n    every: 1h\n    tier: balanced\n    max_tokens: 100\n"
        "    prompt: prompt.md\n    route: cascade\n"
        "    routing: {threshold: 0.65, reviewer_prompt: review.md}\n"
    )
    config = load_config(write(tmp_path, text))
    rules = config.loops["rules"]
    assert (rules.route, rules.kind, rules.stakes, rules.latency) == (
        "rules",
        "extraction",
        "low",
        "interactive",
    )
    assert rules.routing.short_input_tokens == 50
    classify = config.loops["classify"].routing
    assert classify.labels.tier("code_task") == "deep"
    assert classify.labels.tier("simple_extraction") == "fast"  # unnamed labels keep defaults
    assert (classify.classifier_tier, classify.classify_max_tokens) == ("fast", 16)
    cascade = config.loops["cascade"].routing
    assert (cascade.threshold, cascade.review_tier, cascade.escalate_tier) == (0.65, "fast", "deep")
    assert cascade.reviewer_prompt == "review.md" and cascade.escalation_prompt is None
    heartbeat = config.loops["heartbeat"]
    assert (heartbeat.route, heartbeat.kind, heartbeat.stakes, heartbeat.latency) == (
        "static",
        None,
        "normal",
        "background",
    )


def test_a_budgeted_route_needs_prices_for_the_tiers_it_calls(tmp_path: Path) -> None:
    text = BASE.replace("  balanced: [sonnet]\n", "  balanced: [sonnet]\n  deep: [mystery]\n")
    text = text.replace(
        "  sonnet: {provider: anthropic, model: claude-sonnet-4-5}\n",
        "  sonnet: {provider: anthropic, model: claude-sonnet-4-5}\n"
        "  mystery: {provider: anthropic, model: mystery-9}\n",
    )
    error = error_of(tmp_path, text + "    route: cascade\n    budget: {per_day_usd: 1}\n")
    assert error.key_path == "loops.heartbeat"
    assert "model 'mystery' (mystery-9" in error.problem


def test_shipped_config_routes() -> None:
    config = load_config(SHIPPED)
    research, planning = config.loops["research"], config.loops["planning"]
    assert research.route == "cascade" and research.handler is not None
    assert (planning.route, planning.kind, planning.stakes) == ("rules", "reasoning", "high")
    assert config.loops["heartbeat"].route == "static"
