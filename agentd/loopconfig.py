"""A loop's settings: schedule, model target, budget, context sources, deliveries, failures."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    Field,
    field_validator,
    model_validator,
)

from agentd.confignumbers import (
    MAX_COUNT,
    MAX_TOKENS,
    STRICT,
    Bytes,
    Count,
    Factor,
    Limit,
    Seconds,
    Tokens,
    parse_duration,
)
from agentd.yamlload import ConfigProblem

PERIODS = ("hour", "day", "week", "month")
_CLOCK = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")


class BudgetConfig(BaseModel):
    """Spend limits in USD per calendar window (in the config's timezone)."""

    model_config = STRICT
    per_hour_usd: Limit | None = None
    per_day_usd: Limit | None = None
    per_week_usd: Limit | None = None
    per_month_usd: Limit | None = None

    @model_validator(mode="after")
    def _at_least_one(self) -> BudgetConfig:
        if not self.limits():
            raise ConfigProblem(
                (), "give at least one of per_hour_usd, per_day_usd, per_week_usd, per_month_usd"
            )
        return self

    def limits(self) -> dict[str, Decimal]:
        """Period name (hour, day, week, month) → limit, for the periods that are set."""
        values = (self.per_hour_usd, self.per_day_usd, self.per_week_usd, self.per_month_usd)
        return {p: v for p, v in zip(PERIODS, values, strict=True) if v is not None}


class ActiveHours(BaseModel):
    """Local hours in which a loop may run; `end` before `start` spans midnight."""

    model_config = STRICT
    start: str = Field(description='Local time "HH:MM" from which runs happen')
    end: str = Field(description='Local time "HH:MM" from which runs stop')

    @field_validator("start", "end")
    @classmethod
    def _check_clock(cls, value: str) -> str:
        if not _CLOCK.match(value):
            raise ValueError(f'not a time like "08:00" (got {value!r})')
        return value

    def minutes(self) -> tuple[int, int]:
        """(start, end) as minutes after local midnight."""
        (sh, sm), (eh, em) = (map(int, t.split(":")) for t in (self.start, self.end))
        return sh * 60 + sm, eh * 60 + em

    def contains(self, minute_of_day: int) -> bool:
        """Whether a local minute of the day is inside the active hours."""
        start, end = self.minutes()
        if start == end:
            return True
        if start < end:
            return start <= minute_of_day < end
        return minute_of_day >= start or minute_of_day < end


class ContextSource(BaseModel):
    """One input filled into the prompt: a file (or glob), a command's output, the last reply."""

    model_config = STRICT
    file: str | None = Field(None, description="Path or glob; relative to the config's directory")
    command: list[str] | None = Field(None, min_length=1, description="argv; run without a shell")
    last_reply: bool | None = Field(None, description="The loop's previous reply")
    name: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="Placeholder name in the template"
    )
    timeout_s: Seconds = Field(10, description="Command timeout")
    max_bytes: Bytes = Field(65536, description="Cap on the text taken from this source")

    @model_validator(mode="after")
    def _exactly_one(self) -> ContextSource:
        given = [k for k in ("file", "command", "last_reply") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ConfigProblem((), "give exactly one of file, command, last_reply")
        return self

    @property
    def kind(self) -> Literal["file", "command", "last_reply"]:
        """Which kind of source this is."""
        if self.file is not None:
            return "file"
        return "command" if self.command is not None else "last_reply"

    @property
    def placeholder(self) -> str:
        """The template placeholder this source fills (its `name`, else its kind)."""
        return self.name or self.kind


class Delivery(BaseModel):
    """Where a reply goes: appended to a file, piped to a command, or POSTed to a webhook."""

    model_config = STRICT
    file: str | None = Field(None, description="Append here; relative to the state directory")
    command: list[str] | None = Field(None, min_length=1, description="argv; gets reply on stdin")
    webhook: str | None = Field(None, pattern=r"^https?://", description="POST JSON here")
    timeout_s: Seconds = Field(10, description="Command / webhook timeout")

    @model_validator(mode="after")
    def _exactly_one(self) -> Delivery:
        given = [k for k in ("file", "command", "webhook") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ConfigProblem((), "give exactly one of file, command, webhook")
        return self


class OnReply(BaseModel):
    """Wake another loop when a reply contains some text."""

    model_config = STRICT
    contains: str = Field(min_length=1, description="Text the reply must contain")
    trigger: str = Field(description="The loop to run then")


class OnFailure(BaseModel):
    """How a failing loop backs off, and when it is paused."""

    model_config = STRICT
    backoff_s: list[Seconds] = Field(
        default_factory=lambda: [30.0, 60.0, 300.0, 900.0, 3600.0],
        min_length=1,
        description="Wait after the n-th consecutive failure; the last value repeats",
    )
    pause_after: Count = Field(5, description="Consecutive failures that pause the loop")


class Precheck(BaseModel):
    """A command run before the model: exit 0 = work to do, 1 = nothing to do, else failed."""

    model_config = STRICT
    command: list[str] = Field(min_length=1, description="argv; run without a shell")
    timeout: Seconds | None = Field(None, description="Seconds before it is killed (10)")
    timeout_s: Seconds | None = Field(None, description="Same as timeout")
    max_bytes: Bytes = Field(65536, description="Cap on the stdout fed to {precheck}")

    @model_validator(mode="before")
    @classmethod
    def _argv_form(cls, value: Any) -> Any:
        # `precheck: [argv...]` is short for `precheck: {command: [argv...]}`.
        return {"command": value} if isinstance(value, list) else value

    @model_validator(mode="after")
    def _one_timeout(self) -> Precheck:
        if self.timeout is not None and self.timeout_s is not None:
            raise ConfigProblem(("timeout_s",), "give timeout or timeout_s, not both")
        return self

    @property
    def timeout_seconds(self) -> float:
        """The timeout in seconds (default 10)."""
        return self.timeout or self.timeout_s or 10.0


class RunLimits(BaseModel):
    """Per-run ceilings; checked before every attempt (a reached ceiling fails the run).

    Handler loops get defaults for the keys they leave out (see `guardrails.run_limits`);
    a key set to null means no ceiling.
    """

    model_config = STRICT
    max_calls_per_run: Annotated[int, Field(gt=0, le=MAX_COUNT)] | None = Field(
        None, description="Attempts per run"
    )
    max_tokens_per_run: Annotated[int, Field(gt=0, le=100 * MAX_TOKENS)] | None = Field(
        None,
        description="Input + output tokens per run: settled so far + the next attempt's worst case",
    )
    max_usd_per_run: Limit | None = Field(
        None, description="USD per run: spent + the next attempt's worst case"
    )


class AnomalyConfig(BaseModel):
    """Anomaly breaker: pause a loop whose ok run costs more than factor × its recent median."""

    model_config = STRICT
    enabled: bool = Field(True, description="Whether the breaker watches this loop")
    factor: Factor = Field(
        Decimal(5), description="A run costing more than factor × the median pauses the loop"
    )
    min_runs: Count = Field(10, description="ok runs needed before the breaker acts")
    history: Count = Field(20, description="How many recent ok runs the median is over")

    @model_validator(mode="after")
    def _min_le_history(self) -> AnomalyConfig:
        if self.min_runs > self.history:
            raise ConfigProblem(
                ("min_runs",), f"must not exceed history ({self.history}) (got {self.min_runs})"
            )
        return self


class BatchConfig(BaseModel):
    """`batch:` — send the loop's calls through the providers' batch APIs (half price, slower).

    `batch: true` is short for `batch: {}` (every default); `batch: false` turns it off.
    """

    model_config = STRICT
    on_failure: Literal["call", "fail"] = Field(
        "call",
        description="An expired, canceled or errored batch item: make the call directly "
        "(call, full price) or fail the run (fail)",
    )
    poll_max: str = Field(
        "60s", description="Longest wait between two polls; polling starts at 1s and doubles"
    )
    timeout: str = Field(
        "24h", description="Give up on a batch not ended after this long (then on_failure)"
    )

    @model_validator(mode="before")
    @classmethod
    def _durations(cls, value: Any) -> Any:
        if isinstance(value, dict):
            for key in ("poll_max", "timeout"):
                raw = value.get(key)
                if isinstance(raw, int | Decimal) and not isinstance(raw, bool):
                    raise ConfigProblem((key,), f"needs a unit, e.g. {raw}s or {raw}m")
                if isinstance(raw, str):
                    try:
                        parse_duration(raw)
                    except ValueError as exc:
                        raise ConfigProblem((key,), str(exc)) from exc
        return value

    @property
    def poll_max_seconds(self) -> int:
        """The cap of the polling backoff in seconds."""
        return parse_duration(self.poll_max)

    @property
    def timeout_seconds(self) -> int:
        """How long a batch may run before agentd gives up on it, in seconds."""
        return parse_duration(self.timeout)


ROUTES = ("static", "rules", "classify", "cascade")
Route = Literal["static", "rules", "classify", "cascade"]
TaskKind = Literal["extraction", "classification", "content", "code", "reasoning"]
Stakes = Literal["low", "normal", "high"]
Latency = Literal["interactive", "background"]
# The classifier's labels, in the order its prompt lists them.
LABELS = (
    "simple_extraction",
    "classification",
    "content_generation",
    "code_task",
    "complex_reasoning",
)
_RULES_ONLY = ("kind", "stakes", "latency")


class RouteLabels(BaseModel):
    """`route: classify`: the tier each classifier label sends the task to."""

    model_config = STRICT
    simple_extraction: str = Field("fast", description="Tier for simple_extraction")
    classification: str = Field("fast", description="Tier for classification")
    content_generation: str = Field("balanced", description="Tier for content_generation")
    code_task: str = Field("balanced", description="Tier for code_task")
    complex_reasoning: str = Field("deep", description="Tier for complex_reasoning")

    def tier(self, label: str) -> str:
        """The tier a label maps to (label must be one of LABELS)."""
        value: str = getattr(self, label)
        return value


class RoutingConfig(BaseModel):
    """Settings of a loop's route strategy; each key belongs to one strategy."""

    model_config = STRICT
    short_input_tokens: Tokens = Field(
        100, description="rules: below this estimated input size a task counts as short"
    )
    classifier_tier: str = Field("fast", description="classify: the tier that labels the task")
    labels: RouteLabels = Field(
        default_factory=RouteLabels, description="classify: label -> tier of the work call"
    )
    classifier_prompt: str | None = Field(
        None, description="classify: template with {task} (and {labels}); relative to the config"
    )
    classify_max_tokens: Tokens = Field(64, description="classify: output cap of the label")
    threshold: float = Field(
        0.8,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="cascade: a review score below this escalates",
    )
    review_tier: str = Field("fast", description="cascade: the tier that scores the draft")
    escalate_tier: str = Field("deep", description="cascade: the tier that improves the draft")
    reviewer_prompt: str | None = Field(
        None, description="cascade: template with {task} and {draft}; relative to the config"
    )
    escalation_prompt: str | None = Field(
        None,
        description="cascade: template with {task} and {draft} (and {score}); relative to "
        "the config",
    )
    review_max_tokens: Tokens = Field(64, description="cascade: output cap of the review")


# Which strategy reads each `routing:` key: a key another strategy would ignore is an error.
ROUTING_KEYS: dict[str, str] = {
    "short_input_tokens": "rules",
    "classifier_tier": "classify",
    "labels": "classify",
    "classifier_prompt": "classify",
    "classify_max_tokens": "classify",
    "threshold": "cascade",
    "review_tier": "cascade",
    "escalate_tier": "cascade",
    "reviewer_prompt": "cascade",
    "escalation_prompt": "cascade",
    "review_max_tokens": "cascade",
}


class LoopConfig(BaseModel):
    """One scheduled agent loop."""

    model_config = STRICT
    every: str | None = Field(None, description="Interval like 30m, 2h, 45s, 1d, 1h30m")
    cron: str | None = Field(None, description='5-field crontab, e.g. "0 7 * * *"')
    tier: str | None = Field(None, description="A key of tiers")
    model: str | None = Field(None, description="A model alias (instead of tier)")
    max_tokens: Tokens = Field(description="Output token limit of a call")
    min_tokens: Tokens | None = Field(
        None, description="Smallest max_tokens a budget downgrade may use"
    )
    prompt: str | None = Field(
        None, description="Prompt template; relative to the config file's directory"
    )
    system: str | None = Field(None, description="System prompt")
    budget: BudgetConfig | None = None
    when_over_budget: Literal["skip", "downgrade", "pause"] = "skip"
    route: Route = Field(
        "static",
        description="Routing strategy: static (the loop's tier), rules, classify or cascade",
    )
    kind: TaskKind | None = Field(None, description="rules: what the task is (required by rules)")
    stakes: Stakes = Field("normal", description="rules: high goes to deep")
    latency: Latency = Field("background", description="rules: interactive never uses deep")
    routing: RoutingConfig = Field(
        default_factory=RoutingConfig, description="Settings of the route strategy"
    )
    fallback_tiers: list[str] = Field(
        default_factory=list, description="Tiers tried after the loop's own chain"
    )
    quiet_token: str | None = Field(None, description="A reply containing it is not delivered")
    description: str | None = None
    enabled: bool = True
    jitter: str | None = Field(None, description="Random delay up to this duration, e.g. 30s")
    active_hours: ActiveHours | None = Field(None, description="Run only in these local hours")
    catch_up: Literal["skip", "once"] = Field(
        "skip", description="After downtime: skip missed slots, or run once for them"
    )
    context: list[ContextSource] = Field(
        default_factory=list, description="Inputs filled into the prompt template"
    )
    deliver: list[Delivery] = Field(default_factory=list, description="Where replies go")
    on_reply: OnReply | None = None
    handler: str | None = Field(
        None, description="Python loop: package.module:function or path/to/file.py:function"
    )
    on_failure: OnFailure = Field(default_factory=OnFailure)
    precheck: Precheck | None = Field(
        None, description="argv or {command, timeout}: exit 1 skips the run (skipped_noop)"
    )
    limits: RunLimits | None = Field(None, description="Per-run ceilings (calls, tokens, USD)")
    anomaly: AnomalyConfig | None = Field(
        None, description="Overrides of guardrails.anomaly for this loop (keys given win)"
    )
    cache: Literal["auto", "none", "5m", "1h"] = Field(
        "auto",
        description="Prompt caching of the stable prefix: auto (when it pays), none, 5m or 1h",
    )
    batch: BatchConfig | None = Field(
        None,
        description="true or {on_failure, poll_max, timeout}: calls go through the batch APIs "
        "at 50 % off (background loops only)",
    )

    @field_validator("batch", mode="before")
    @classmethod
    def _batch_flag(cls, value: Any) -> Any:
        # `batch: true` turns it on with the defaults, `batch: false` (or null) leaves it off.
        if value is True:
            return {}
        if value is False:
            return None
        return value

    @field_validator("every", "jitter", mode="before")
    @classmethod
    def _check_every(cls, value: Any) -> Any:
        if isinstance(value, int | Decimal) and not isinstance(value, bool):
            raise ValueError(f"needs a unit, e.g. {value}s or {value}m (got {value})")
        if isinstance(value, str):
            parse_duration(value)
            return value.strip()
        return value

    @model_validator(mode="after")
    def _check_choices(self) -> LoopConfig:
        if self.every is None and self.cron is None:
            raise ConfigProblem((), "give a schedule: every (e.g. 30m) or cron (e.g. '0 7 * * *')")
        if self.every is not None and self.cron is not None:
            raise ConfigProblem(("cron",), "give every or cron, not both")
        if self.prompt is None and self.handler is None:
            raise ConfigProblem((), "give prompt (a template file) or handler (a Python function)")
        if self.tier is None and self.model is None:
            raise ConfigProblem((), "give tier (a key of tiers) or model (a model alias)")
        if self.tier is not None and self.model is not None:
            raise ConfigProblem(("model",), "give tier or model, not both")
        if self.min_tokens is not None and self.min_tokens > self.max_tokens:
            raise ConfigProblem(
                ("min_tokens",),
                f"must not exceed max_tokens ({self.max_tokens}) (got {self.min_tokens})",
            )
        self._check_route()
        self._check_batch()
        return self

    def _check_batch(self) -> None:
        """A batch loop is a one-call prompt loop that can wait: its result resumes a restart."""
        if self.batch is None:
            return
        if self.latency == "interactive":
            raise ConfigProblem(
                ("batch",), "batch results take minutes to hours: not for latency: interactive"
            )
        if self.handler is not None:
            raise ConfigProblem(
                ("batch",), "a handler's calls depend on each other: batch needs a prompt loop"
            )
        if self.route not in ("static", "rules"):
            raise ConfigProblem(
                ("batch",),
                f"route: {self.route} makes dependent calls: batch needs route static or rules",
            )

    def _check_route(self) -> None:
        """The route's own keys: rules needs kind; keys another strategy reads are refused."""
        if self.route == "rules" and self.kind is None:
            raise ConfigProblem(
                ("kind",),
                "route: rules needs kind: extraction, classification, content, code or reasoning",
            )
        for key in _RULES_ONLY:
            if key == "latency" and self.batch is not None:
                continue  # a batch loop may say it is background work
            if self.route != "rules" and key in self.model_fields_set:
                raise ConfigProblem(
                    (key,), f"is read by route: rules only (this loop has route: {self.route})"
                )
        for key in sorted(self.routing.model_fields_set):
            owner = ROUTING_KEYS[key]
            if owner != self.route:
                raise ConfigProblem(
                    ("routing", key),
                    f"is read by route: {owner} only (this loop has route: {self.route})",
                )

    @property
    def every_seconds(self) -> int | None:
        """The interval of an `every:` loop in seconds, None for a cron loop."""
        return None if self.every is None else parse_duration(self.every)

    @property
    def jitter_seconds(self) -> int | None:
        """The maximum random delay of a run in seconds, if any."""
        return None if self.jitter is None else parse_duration(self.jitter)
