"""What a call explained by `agentd route` would run on: its input and the plan that fits.

The input: TEXT placed in the loop's template as a run fills it (`loop_input`).

The budget, read-only. The windows' spend comes from the ledger as `agentd budget` reads it
(`budgets.window_status`), and the plans are the ones a run walks (`runcalls.plans_for`): the
requested plan first, then, with `when_over_budget: downgrade`, the cheaper tiers and the
smaller `max_tokens`. As in `RunCalls.call`, a plan whose models' context windows are all too
small is passed over; as in the executor, a model whose reservation (its worst case, at batch
prices for a batch loop) does not fit every window is skipped for the next one of the chain,
and a plan fits when one of its models does.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agentd import budgets, pricing
from agentd.config import ChainEntry, Config
from agentd.context import SourceText, render_template
from agentd.ledger import Ledger
from agentd.loopconfig import ContextSource
from agentd.precheck import PRECHECK_PLACEHOLDER
from agentd.routing import context_skips, estimate_tokens
from agentd.runcalls import Plan, plans_for
from agentd.spendviews import open_for_reading


@dataclass(frozen=True)
class WindowView:
    """A budget window of the loop as `agentd route` shows it."""

    window: str
    limit_micro_usd: int
    remaining_micro_usd: int
    resets_at: str


@dataclass(frozen=True)
class CallSpec:
    """One call a route would make, as `plans_for` is asked for it."""

    purpose: str
    tier: str | None  # None: the loop's own target
    prompt: str
    system: str | None  # "": no system prompt (the classifier, the reviewer)
    max_tokens: int
    extra_input: int = 0  # tokens not in `prompt` yet (a draft still to be written)
    when: str | None = None
    reason: str | None = None
    downgrade: bool = True


@dataclass(frozen=True)
class Fit:
    """The plan a call would run on, or (fits False) the requested one and why none fits."""

    requested: Plan
    plan: Plan
    chain: tuple[ChainEntry, ...]  # from the first model that fits (context window, budget)
    skipped: tuple[dict[str, Any], ...]  # the plan's models whose window is too small
    reservation_micro_usd: int | None  # of the chain's first model
    fits: bool
    refusals: tuple[str, ...]  # why each earlier plan (or model) did not fit
    refused_by_budget: bool  # some model was refused by a window (not only by context size)
    resets_at: datetime | None  # none fits: when the last plan's cheapest model fits again


@dataclass(frozen=True)
class PlannedCall:
    """One call the task would make: the plan it would run on now, and its worst-case cost."""

    purpose: str
    tier: str | None  # the tier it would run on (after a budget downgrade)
    chain: tuple[str, ...]  # "alias (provider/model)" from the first model that would be tried
    max_tokens: int
    worst_case_micro_usd: int | None  # the reservation on that model; None: unpriced or no fit
    skipped: tuple[dict[str, Any], ...] = ()  # models whose context window is too small
    when: str | None = None  # the condition under which it is made, if any
    cost_micro_usd: int | None = None  # what it did cost, when explaining made it
    requested_tier: str | None = None  # the tier the route asks for
    # no_budget | fits | downgraded | over_budget | no_model_fits (context windows too small)
    budget: str = "no_budget"
    plan: str = ""  # the plan's reason: configured, chosen by rules, downgraded to fast, …
    refusals: tuple[str, ...] = ()  # why the plans (or models) before it did not fit
    resets_at: str | None = None  # over budget: when the loop would be resumed (pause)


def loop_windows(config: Config, loop: str) -> list[budgets.Window]:
    """The windows a call of the loop must fit in: its own, then the global ones."""
    lc = config.loops[loop]
    return budgets.windows_for(
        loop,
        lc.budget.limits() if lc.budget else None,
        config.budgets.limits() if config.budgets else None,
    )


def window_statuses(
    config: Config, ledger: Ledger | None, loop: str, simulated: bool
) -> list[budgets.WindowStatus]:
    """The loop's windows now: from the ledger, or untouched when nothing was recorded yet."""
    windows = loop_windows(config, loop)
    now = datetime.now(tz=UTC)
    if ledger is None:
        return [
            budgets.WindowStatus(
                w, *budgets.window_bounds(w.period, now, config.tz), 0, 0, w.limit_micro_usd
            )
            for w in windows
        ]
    return budgets.window_status(ledger, windows, config.tz, now, simulated)


@contextmanager
def read_only_ledger(state_dir: Path) -> Iterator[Ledger | None]:
    """The state directory's ledger opened as `agentd budget` opens it; None when there is none."""
    ledger = open_for_reading(state_dir)
    if ledger is None:
        yield None
        return
    with ledger:
        yield ledger


class BudgetView:
    """The loop's windows at one moment, and the plan each call would run on."""

    def __init__(
        self,
        config: Config,
        loop: str,
        statuses: Sequence[budgets.WindowStatus],
    ) -> None:
        self.config = config
        self.loop = loop
        self.statuses = tuple(statuses)
        self.batch = config.loops[loop].batch is not None

    @property
    def budgeted(self) -> bool:
        """Whether any window applies to the loop."""
        return bool(self.statuses)

    def views(self) -> tuple[WindowView, ...]:
        """The windows as shown: limit, what is left now, when each resets."""
        return tuple(
            WindowView(
                window=s.window.label,
                limit_micro_usd=s.window.limit_micro_usd,
                remaining_micro_usd=s.remaining_micro_usd,
                resets_at=s.end.astimezone(self.config.tz).isoformat(timespec="minutes"),
            )
            for s in self.statuses
        )

    def fit(self, spec: CallSpec, before_micro_usd: int = 0) -> Fit:
        """Walk the call's plans as a run would; `before_micro_usd` is spent by earlier calls."""
        plans = plans_for(
            self.config,
            self.loop,
            spec.prompt,
            tier=spec.tier,
            max_tokens=spec.max_tokens,
            system=spec.system,
            reason=spec.reason,
            downgrade=spec.downgrade,
        )
        tokens = estimate_tokens(spec.prompt) + estimate_tokens(spec.system) + spec.extra_input
        refusals: list[str] = []
        first: Fit | None = None
        by_budget = False
        resets_at: datetime | None = None
        for plan in plans:
            chain, skipped = context_skips(self.config, plan.chain, tokens, plan.max_tokens)
            amount = self._reservation(spec, chain[0], plan.max_tokens) if chain else None
            first = first or Fit(
                plans[0], plan, chain, tuple(skipped), amount, False, (), False, None
            )
            if not plan.chain:
                refusals.append(f"{plan.reason}: no model is left in its chain")
                continue
            if not chain:
                refusals.append(
                    f"{plan.reason}: no model's context window holds ~{tokens} input "
                    f"+ {plan.max_tokens} output tokens"
                )
                continue
            # As the executor walks a chain: a model the budget refuses is skipped and the
            # next one is tried; the plan is refused only when no model of it fits.
            refused: list[tuple[int, datetime | None, str]] = []
            for index, entry in enumerate(chain):
                cost = self._reservation(spec, entry, plan.max_tokens)
                why, resets = self._refusal(entry, cost, before_micro_usd)
                if why is None:
                    notes = [f"{plan.reason}: {text}" for _, _, text in refused]
                    return Fit(
                        plans[0], plan, chain[index:], tuple(skipped), cost, True,
                        (*refusals, *notes), by_budget or bool(notes), None,
                    )  # fmt: skip
                refused.append((cost if cost is not None else 0, resets, f"{entry.alias}: {why}"))
            by_budget = True
            refusals.append(f"{plan.reason}: " + "; ".join(text for _, _, text in refused))
            # The cheapest model is the first to fit again: its windows say when.
            resets_at = min(refused, key=lambda item: item[0])[1]
        assert first is not None  # plans_for always returns the requested plan
        return replace(first, refusals=tuple(refusals), refused_by_budget=by_budget,
                       resets_at=resets_at)  # fmt: skip

    def _reservation(self, spec: CallSpec, entry: ChainEntry, max_tokens: int) -> int | None:
        return self.config.worst_case_micro_usd(
            entry.alias,
            spec.system,
            [spec.prompt],
            max_tokens,
            extra_input_tokens=spec.extra_input,
            batch=self.batch,
        )

    def _refusal(
        self, entry: ChainEntry, amount: int | None, before: int
    ) -> tuple[str | None, datetime | None]:
        """Why a reservation of `amount` would be refused now (None: it fits), and when every
        window refusing it has reset."""
        if not self.statuses:
            return None, None
        if amount is None:
            return "no known price (a budgeted loop needs one)", None
        refusing = [s for s in self.statuses if amount > s.remaining_micro_usd - before]
        if not refusing:
            return None, None
        first = refusing[0]
        left = max(0, first.remaining_micro_usd - before)
        after = " after the earlier calls at their worst case" if before else ""
        text = (
            f"over budget: {first.window.label}: asks {pricing.format_usd(amount)} USD, "
            f"{pricing.format_usd(left)} USD left{after}"
        )
        return text, max(s.end for s in refusing)


def loop_input(config: Config, loop: str, text: str) -> tuple[str, str]:
    """The prompt a call of the loop gets when TEXT is what it works on, and how TEXT got in."""
    lc = config.loops[loop]
    system = "; the loop's system prompt counts too" if lc.system else ""
    if lc.handler is not None or lc.prompt is None:
        return text, f"TEXT is the prompt of one ctx.complete() of handler {lc.handler}{system}"
    template = config.prompt_path(loop).read_text()
    sources = [SourceText(s.placeholder, _title(s), "") for s in lc.context]
    if sources:
        sources[0] = replace(sources[0], text=text)
        others = " (its other sources empty)" if len(sources) > 1 else ""
        where = f"as its context source {{{sources[0].placeholder}}}{others}"
        if lc.precheck is not None:
            # As a run whose precheck printed nothing: an empty {precheck}, not the literal.
            template = template.replace("{" + PRECHECK_PLACEHOLDER + "}", "")
    elif lc.precheck is not None:
        sources = [SourceText(PRECHECK_PLACEHOLDER, "output of precheck", text)]
        where = "as its precheck's output"
    else:
        # As one unnamed source would be: in {context} (or {file}), else appended at the end.
        sources = [SourceText("file", "TEXT", text)]
        where = "as its context (the loop has no context sources)"
    now = datetime.now(tz=UTC)
    prompt = render_template(template, loop=loop, now=now, tz=config.tz, sources=sources)
    return prompt, f"TEXT in the loop's template {lc.prompt}, {where}{system}"


def _title(source: ContextSource) -> str:
    """The heading a run gives a source in `{context}`."""
    if source.file is not None:
        return f"file {source.file}"
    if source.command is not None:
        return f"output of {source.command[0]}"
    return "your previous reply"


def budget_reasons(
    when_over_budget: str, handler: bool, answering: PlannedCall, call: PlannedCall
) -> list[str]:
    """What the budget does to one call, in words."""
    why = "; ".join(call.refusals)
    if call.budget == "fits" and call.refusals:
        first = call.chain[0].split(" ")[0]
        return [
            f"budget: the {call.purpose} call would skip to {first}, the first model that "
            f"fits ({why})"
        ]
    if call.budget == "fits" and call is answering:
        cost = call.worst_case_micro_usd
        shown = "unpriced" if cost is None else f"${pricing.format_usd(cost)}"
        return [f"budget: the {call.purpose} call's worst case {shown} fits every window"]
    if call.budget == "downgraded":
        return [f"budget: the {call.purpose} call would be {call.plan} ({why})"]
    if call.budget != "over_budget":
        return []
    if call.purpose == "classify":
        return []  # the real classifier call's own reasons say what happened
    if call.purpose == "review":
        return [
            f"budget: the review would not fit ({why}): no score, so the run would escalate "
            "if that fits, else the draft would be the reply"
        ]
    if call.purpose == "escalate":
        return [
            f"budget: the escalation would not fit ({why}): if the review scores low or "
            "gives no score, the draft would be the reply"
        ]
    assert call is answering
    if handler:
        then = "ctx.complete() would raise BudgetExceeded in the handler"
    elif when_over_budget == "pause":
        until = call.resets_at or "resumed"
        then = (
            f"the run would be skipped and the loop paused until {until} (when_over_budget: pause)"
        )
    else:
        then = f"the run would be skipped (when_over_budget: {when_over_budget})"
    return [f"budget: the {call.purpose} call fits no plan ({why}): {then}"]


def call_names(entries: tuple[ChainEntry, ...]) -> tuple[str, ...]:
    """A chain as shown: `alias (provider/model)` for each model."""
    return tuple(f"{e.alias} ({e.provider_name}/{e.model.model})" for e in entries)


def planned_call(
    config: Config, view: BudgetView, spec: CallSpec, before_micro_usd: int = 0
) -> tuple[PlannedCall, Fit]:
    """A call of the loop on the plan it would run on now (or its requested one if none fits)."""
    fit = view.fit(spec, before_micro_usd)
    if not fit.fits:
        budget = "over_budget" if fit.refused_by_budget else "no_model_fits"
    elif not view.budgeted:
        budget = "no_budget"
    else:
        budget = "fits" if fit.plan == fit.requested else "downgraded"
    call = PlannedCall(
        purpose=spec.purpose,
        tier=fit.plan.tier,
        chain=call_names(fit.chain),
        max_tokens=fit.plan.max_tokens,
        worst_case_micro_usd=fit.reservation_micro_usd,
        skipped=fit.skipped,
        when=spec.when,
        requested_tier=fit.requested.tier,
        budget=budget,
        plan=fit.plan.reason,
        refusals=fit.refusals,
    )
    if budget == "over_budget" and fit.resets_at is not None:
        resets = fit.resets_at.astimezone(config.tz).isoformat(timespec="minutes")
        call = replace(call, resets_at=resets)
    return call, fit
