"""The configuration: pydantic models of the YAML, load_config(), path resolution, API keys.

This module (with `agentd.configpaths`, its pydantic-free part: path resolution and the light
read of read-only commands) is the only reader of `AGENTD_*` environment variables. Everything
downstream gets typed objects and never re-reads YAML or the environment.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

from pydantic import (
    BaseModel,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from agentd.confignumbers import (
    MAX_COUNT,
    MAX_TOKENS,
    STRICT,
    Count,
    Seconds,
    Share,
    Usd,
    Wait,
)

# Re-exported (`as`): config.py stays the one place to import the configuration from.
from agentd.configpaths import CONFIG_FILENAME as CONFIG_FILENAME
from agentd.configpaths import ENV_CONFIG as ENV_CONFIG
from agentd.configpaths import ENV_STATE_DIR as ENV_STATE_DIR
from agentd.configpaths import ENV_SYSTEMD_STATE as ENV_SYSTEMD_STATE
from agentd.configpaths import LOCAL_CONFIG_PATH as LOCAL_CONFIG_PATH
from agentd.configpaths import SYSTEM_CONFIG_PATH as SYSTEM_CONFIG_PATH
from agentd.configpaths import ConfigBasics as ConfigBasics
from agentd.configpaths import read_basics as read_basics
from agentd.configpaths import resolve_config_path as resolve_config_path
from agentd.configpaths import resolve_state_dir as resolve_state_dir
from agentd.configpaths import timezone_problem, top_level
from agentd.errors import ConfigError
from agentd.loopconfig import AnomalyConfig, BudgetConfig, LoopConfig
from agentd.pricing import (
    Price,
    batch_price,
    lookup_price,
    override_price,
    request_token_bound,
    reservation_micro_usd,
)
from agentd.routeprompts import REQUIRED as ROUTE_TEMPLATE_PLACEHOLDERS
from agentd.yamlload import (
    ConfigProblem,
    YamlDocument,
    YamlProblem,
    first_problem,
    format_key_path,
    read_document,
)

KeyPath = tuple[str | int, ...]
_LOOP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def _defined(names: Mapping[str, Any] | list[str]) -> str:
    """`(defined: a, b, c)` for error messages that name an undefined reference."""
    return f"(defined: {', '.join(sorted(names)) or 'none'})"


class ProviderConfig(BaseModel):
    """An API endpoint and how to authenticate to it."""

    model_config = STRICT
    type: Literal["anthropic", "openai"] = Field(
        description="Wire protocol: anthropic (Messages) or openai (Chat Completions, any "
        "OpenAI-compatible server)"
    )
    api_key_env: str | None = Field(None, min_length=1, description="Env var holding the key")
    api_key_file: str | None = Field(
        None,
        min_length=1,
        description="File holding the key; relative to $CREDENTIALS_DIRECTORY if set, else to "
        "the config file's directory",
    )
    base_url: str | None = Field(None, description="Override the API base URL")
    timeout_s: Seconds = Field(60, description="Per-request timeout in seconds")
    max_retries: Annotated[int, Field(ge=0, le=MAX_COUNT)] = Field(
        2, description="Retries of one model on transient errors"
    )
    retry_max_wait_s: Wait = Field(30, description="Total backoff wait per model")
    max_concurrency: Count = Field(4, description="Concurrent calls to this provider")

    @model_validator(mode="after")
    def _one_key_source(self) -> ProviderConfig:
        if self.api_key_env is not None and self.api_key_file is not None:
            raise ConfigProblem(("api_key_file",), "give api_key_env or api_key_file, not both")
        return self


class PriceConfig(BaseModel):
    """A price override in USD per million tokens (wins over the built-in table)."""

    model_config = STRICT
    input: Usd = Field(description="USD per million input tokens")
    output: Usd = Field(description="USD per million output tokens")
    cache_read: Usd | None = Field(None, description="Cache reads; default: the input price")
    cache_write: Usd | None = Field(None, description="Cache writes; default: the input price")
    cache_write_1h: Usd | None = Field(None, description="1-hour cache writes")


class ModelConfig(BaseModel):
    """A model alias: which provider serves it under which model id, and maybe its price."""

    model_config = STRICT
    provider: str = Field(description="A key of providers")
    model: str = Field(min_length=1, description="The provider's model id")
    price: PriceConfig | None = None
    context_window: Annotated[int, Field(gt=0, le=100 * MAX_TOKENS)] | None = Field(
        None, description="Context window in tokens"
    )


class DaemonConfig(BaseModel):
    """How the daemon (`agentd run`) schedules, drains and keeps its ledger tidy."""

    model_config = STRICT
    shutdown_grace_s: Wait = Field(
        30, description="On SIGTERM, wait this long for in-flight runs before aborting them"
    )
    misfire_grace_s: Seconds = Field(
        300, description="A run this late is still run; later ones count as missed"
    )
    wal_checkpoint_s: Seconds = Field(
        300, description="How often to checkpoint the WAL (sooner once it passes 4 MB)"
    )


class CircuitBreakerConfig(BaseModel):
    """When a failing model is skipped, and for how long."""

    model_config = STRICT
    failures: Count = Field(3, description="Consecutive failures that open a circuit")
    cooldowns_s: list[Seconds] = Field(
        default_factory=lambda: [30.0, 60.0, 300.0],
        min_length=1,
        description="Cooldown of the n-th consecutive trip; the last value repeats",
    )
    auth_cooldown_s: Seconds = Field(900, description="Cooldown after a 401/403")
    billing_cooldown_s: Seconds = Field(3600, description="Cooldown after billing errors")


class GuardrailsConfig(BaseModel):
    """Guardrails over all loops: the anomaly breaker and cost warnings (`check`, reload)."""

    model_config = STRICT
    anomaly: AnomalyConfig = Field(
        default_factory=AnomalyConfig, description="Defaults of every loop's anomaly breaker"
    )
    warn_unbudgeted_usd_per_month: Usd = Field(
        Decimal(10), description="Warn when a loop without a budget is projected above this"
    )
    reload_increase_warn: Share = Field(
        Decimal("0.25"),
        description="Warn on a reload that raises the projected monthly total by more than "
        "this share (0.25 = 25 %)",
    )


class AlertSink(BaseModel):
    """Where alert events go: POSTed as JSON to a webhook, or on a command's stdin."""

    model_config = STRICT
    webhook: str | None = Field(None, pattern=r"^https?://", description="POST JSON here")
    command: list[str] | None = Field(None, min_length=1, description="argv; gets JSON on stdin")
    timeout_s: Seconds = Field(10, description="Command / webhook timeout")

    @model_validator(mode="after")
    def _exactly_one(self) -> AlertSink:
        if (self.webhook is None) == (self.command is None):
            raise ConfigProblem((), "give exactly one of webhook, command")
        return self


class AlertsConfig(BaseModel):
    """Alerts an operator must not miss: budget at 80 % / 100 %, pauses, chain failures."""

    model_config = STRICT
    sinks: list[AlertSink] = Field(default_factory=list, description="Where alerts go")
    min_interval_s: Wait = Field(
        3600, description="The same event (key) is sent at most once per this many seconds"
    )


@dataclass(frozen=True)
class ChainEntry:
    """One model a loop's call may use, in chain order, with the tier it came from."""

    tier: str | None
    alias: str
    model: ModelConfig
    provider_name: str
    provider: ProviderConfig


# A new top-level key goes into `configpaths.TOP_LEVEL_KEYS` too (the light read of read-only
# commands refuses unknown keys; tests/test_configpaths.py keeps the two in step).
class Config(BaseModel):
    """The whole configuration file."""

    model_config = STRICT
    timezone: str = Field("UTC", description="IANA zone for cron schedules and budget windows")
    state_dir: str | None = Field(None, description="Ledger and socket directory")
    providers: dict[str, ProviderConfig]
    models: dict[str, ModelConfig] = Field(description="Model aliases")
    # Not required: a config whose loops all name `model:` needs no tiers.
    tiers: dict[str, list[str]] = Field(
        default_factory=dict, description="Ordered chains of model aliases: primary first"
    )
    budgets: BudgetConfig | None = Field(None, description="Global caps over all loops")
    circuit_breaker: CircuitBreakerConfig = Field(default_factory=CircuitBreakerConfig)
    daemon: DaemonConfig = Field(default_factory=DaemonConfig)
    guardrails: GuardrailsConfig = Field(default_factory=GuardrailsConfig)
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)
    loops: dict[str, LoopConfig] = Field(min_length=1)

    # Set by load_config (validation context "path"); programmatic configs live in the cwd.
    _path: Path = PrivateAttr(default_factory=lambda: Path.cwd() / CONFIG_FILENAME)

    @field_validator("timezone")
    @classmethod
    def _check_timezone(cls, value: str) -> str:
        problem = timezone_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _check_references(self, info: ValidationInfo) -> Config:
        context = info.context if isinstance(info.context, Mapping) else {}
        if context.get("path") is not None:
            self._path = Path(context["path"]).absolute()
        for alias, model in self.models.items():
            if model.provider not in self.providers:
                raise ConfigProblem(
                    ("models", alias, "provider"),
                    f"undefined provider {model.provider!r} {_defined(self.providers)}",
                )
        for tier, chain in self.tiers.items():
            if not chain:
                raise ConfigProblem(("tiers", tier), "empty chain: list at least one model alias")
            for index, alias in enumerate(chain):
                if alias not in self.models:
                    raise ConfigProblem(
                        ("tiers", tier, index), f"undefined model {alias!r} {_defined(self.models)}"
                    )
                if alias in chain[:index]:
                    raise ConfigProblem(("tiers", tier, index), f"{alias!r} is listed twice")
        for name, loop in self.loops.items():
            self._check_loop(name, loop, check_prompt=context.get("path") is not None)
        return self

    def _check_loop(self, name: str, loop: LoopConfig, check_prompt: bool) -> None:
        """Cross-references of one loop: names, cron, prompt file, prices for budgets."""
        where: KeyPath = ("loops", name)
        if not _LOOP_NAME.match(name):
            raise ConfigProblem(where, "loop names use letters, digits, '-' and '_' only")
        if loop.tier is not None and loop.tier not in self.tiers:
            raise ConfigProblem(
                (*where, "tier"), f"undefined tier {loop.tier!r} {_defined(self.tiers)}"
            )
        if loop.model is not None and loop.model not in self.models:
            raise ConfigProblem(
                (*where, "model"), f"undefined model {loop.model!r} {_defined(self.models)}"
            )
        for index, tier in enumerate(loop.fallback_tiers):
            if tier not in self.tiers:
                raise ConfigProblem(
                    (*where, "fallback_tiers", index),
                    f"undefined tier {tier!r} {_defined(self.tiers)}",
                )
        if loop.cron is not None:
            from agentd.scheduling import cron_trigger

            try:
                # The daemon's own reading of the crontab (Sunday = 0 or 7, as in cron).
                cron_trigger(loop.cron, self.tz)
            except ValueError as exc:
                raise ConfigProblem(
                    (*where, "cron"),
                    f"not a 5-field crontab like '0 7 * * *' (got {loop.cron!r}): {exc}",
                ) from None
        if loop.on_reply is not None and loop.on_reply.trigger not in self.loops:
            raise ConfigProblem(
                (*where, "on_reply", "trigger"),
                f"undefined loop {loop.on_reply.trigger!r} {_defined(self.loops)}",
            )
        if check_prompt and loop.prompt is not None:
            path = self.prompt_path(name)
            try:
                with path.open("rb"):
                    pass
            except OSError as exc:
                raise ConfigProblem(
                    (*where, "prompt"),
                    f"cannot read prompt file {path}: {exc.strerror or exc} (relative paths "
                    "resolve against the config file's directory)",
                ) from None
        route_entries = self._check_route(name, loop, check_prompt)
        usd_cap = loop.limits is not None and loop.limits.max_usd_per_run is not None
        if loop.budget is None and self.budgets is None and not usd_cap:
            return
        for entry in [*self.chain(name), *route_entries]:
            if self.price(entry.alias) is None:
                whose = (
                    "this loop's budget"
                    if loop.budget is not None
                    else "the global budgets"
                    if self.budgets is not None
                    else "limits.max_usd_per_run"
                )
                raise ConfigProblem(
                    where,
                    f"model {entry.alias!r} ({entry.model.model} on provider "
                    f"{entry.provider_name!r}) has no known price, so {whose} cannot be "
                    f"enforced: add models.{entry.alias}.price with input and output "
                    "in USD per million tokens",
                )

    def _check_route(self, name: str, loop: LoopConfig, check_prompt: bool) -> list[ChainEntry]:
        """The route's tiers exist and its templates are readable; the models it may call."""
        from agentd.routing import tiers_used

        where: KeyPath = ("loops", name)
        entries: list[ChainEntry] = []
        for key_path, tier, who in tiers_used(loop):
            if tier not in self.tiers:
                raise ConfigProblem(
                    (*where, *key_path),
                    f"{who} uses tier {tier!r}, which is not defined {_defined(self.tiers)}",
                )
            entries.extend(self.tier_chain(tier))
        for key, placeholders in ROUTE_TEMPLATE_PLACEHOLDERS.items():
            value = getattr(loop.routing, key)
            if value is None or not check_prompt:
                continue
            path = self.resolve_path(value)
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                problem = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
                raise ConfigProblem(
                    (*where, "routing", key),
                    f"cannot read template {path}: {problem or exc} (relative paths resolve "
                    "against the config file's directory)",
                ) from None
            missing = [p for p in placeholders if p not in text]
            if missing:
                raise ConfigProblem(
                    (*where, "routing", key),
                    f"template {path} lacks {' and '.join(missing)}: the call would not see "
                    "its input",
                )
        return entries

    @property
    def path(self) -> Path:
        """The absolute path of the configuration file."""
        return self._path

    @property
    def dir(self) -> Path:
        """The directory of the configuration file: relative paths in it resolve against this."""
        return self._path.parent

    @property
    def tz(self) -> ZoneInfo:
        """The configured time zone."""
        return ZoneInfo(self.timezone)

    def _entry(self, tier: str | None, alias: str) -> ChainEntry:
        model = self.models[alias]
        return ChainEntry(tier, alias, model, model.provider, self.providers[model.provider])

    def tier_chain(self, tier: str) -> list[ChainEntry]:
        """The models of one tier, primary first. KeyError for an undefined tier."""
        return [self._entry(tier, alias) for alias in self.tiers[tier]]

    def chain(self, loop_name: str) -> list[ChainEntry]:
        """Every model a loop's call may use, in order: its tier (or model), then fallback tiers."""
        loop = self.loops[loop_name]
        if loop.tier is not None:
            entries = self.tier_chain(loop.tier)
        else:
            assert loop.model is not None  # the validator guarantees tier xor model
            home = next((t for t, chain in self.tiers.items() if loop.model in chain), None)
            entries = [self._entry(home, loop.model)]
        for tier in loop.fallback_tiers:
            entries.extend(self.tier_chain(tier))
        seen: set[str] = set()
        unique = []
        for entry in entries:
            if entry.alias not in seen:
                seen.add(entry.alias)
                unique.append(entry)
        return unique

    def price(self, alias: str, *, batch: bool = False) -> Price | None:
        """A model's price: the config override if given, else the built-in table, else None.

        `batch`: the batch API's price (an override is discounted like the providers do).
        """
        model = self.models[alias]
        if model.price is not None:
            p = model.price
            price = override_price(p.input, p.output, p.cache_read, p.cache_write, p.cache_write_1h)
            return batch_price(price) if batch else price
        return lookup_price(self.providers[model.provider].type, model.model, batch=batch)

    def worst_case_micro_usd(
        self,
        alias: str,
        system: str | None,
        texts: Sequence[str],
        max_tokens: int,
        *,
        extra_input_tokens: int = 0,
        batch: bool = False,
    ) -> int | None:
        """What one attempt on `alias` reserves for these messages' texts (None: unpriced)."""
        price = self.price(alias, batch=batch)
        if price is None:
            return None
        bound = request_token_bound(system, texts) + extra_input_tokens
        return reservation_micro_usd(price, bound, max_tokens)

    def context_window(self, alias: str) -> int | None:
        """A model's context window in tokens: `models.X.context_window`, else the price table's."""
        model = self.models[alias]
        if model.context_window is not None:
            return model.context_window
        price = lookup_price(self.providers[model.provider].type, model.model)
        return None if price is None else price.context_window

    def prompt_path(self, loop_name: str) -> Path:
        """The absolute path of a loop's prompt template (relative to the config's directory)."""
        prompt = self.loops[loop_name].prompt
        if prompt is None:
            raise ValueError(f"loop {loop_name!r} has no prompt template")
        return self.resolve_path(prompt)

    def resolve_path(self, path: str) -> Path:
        """A path named in the config, resolved against the config file's directory."""
        return (self.dir / Path(path).expanduser()).resolve()

    def api_key(self, provider_name: str, env: Mapping[str, str] | None = None) -> str | None:
        """The provider's API key (None when keyless); relative key files resolve against dir."""
        from agentd.apikeys import read_api_key

        return read_api_key(provider_name, self.providers[provider_name], env, base_dir=self.dir)


# ---------------------------------------------------------------------------- loading


def load_config(
    path: Path | str, *, missing_hint: str = f"give --config PATH or set {ENV_CONFIG}"
) -> Config:
    """Read and validate a config file; every problem raises one ConfigError, never a traceback.

    `missing_hint` ends the message for a file that is not there (where to give another).
    """
    try:
        document = read_document(Path(path), missing_hint)
    except YamlProblem as exc:
        raise _config_error(str(path), exc) from None
    return _validate(document, Path(path), str(path))


def parse_config(data: Any, path: Path | str) -> Config:
    """Validate already-parsed data as if it were read from path (for tests and tools)."""
    return _validate(YamlDocument(data=data, root=None), Path(path), str(path))


def _config_error(file: str, problem: YamlProblem) -> ConfigError:
    return ConfigError(file, problem.problem, format_key_path(problem.key_path), problem.line)


def _validate(document: YamlDocument, path: Path, file: str) -> Config:
    """Build the Config from parsed YAML, translating pydantic errors into one ConfigError."""
    data = top_level(document.data, file)
    try:
        return Config.model_validate(data, context={"path": path})
    except ValidationError as exc:
        raise _config_error(file, first_problem(exc, document, Config)) from None
    except RecursionError:
        raise ConfigError(file, "a YAML alias refers to its own anchor") from None
