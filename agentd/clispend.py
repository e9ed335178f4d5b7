"""The report commands: `ledger` (and `ledger calls`, `ledger prune`), `budget`, `report`,
`plan` and `reprice`. Thin: parse, call one library function, print."""

from __future__ import annotations

from pathlib import Path

import click

from agentd.clibase import Context, handle_errors, reading, when


def _format(as_json: bool, as_csv: bool) -> str:
    if as_json and as_csv:
        raise click.UsageError("choose one of --json and --csv")
    return "json" if as_json else "csv" if as_csv else "table"


@click.group(invoke_without_command=True)
@click.option(
    "--by",
    "group_by",
    default="loop",
    show_default=True,
    type=click.Choice(["loop", "tier", "model", "provider", "purpose", "day", "week", "month"]),
)
@click.option(
    "--since",
    default=None,
    help="A span (24h, 7d), a date, or today, week, month [default: 24h, 30d with --chart].",
)
@click.option("--until", default=None, help="A span back from now or a date (exclusive).")
@click.option("--loop", "loop_name", default=None, help="Only this loop.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--csv", "as_csv", is_flag=True)
@click.option("--simulated", is_flag=True, help="Report simulated calls instead of real ones.")
@click.option("--chart", is_flag=True, help="Spend per day as a stacked bar chart.")
@click.option("--stack", default="loop", show_default=True, type=click.Choice(["loop", "tier"]))
@click.option("--ascii", "ascii_only", is_flag=True, help="Chart with ASCII characters only.")
@click.pass_context
@handle_errors
def ledger(
    ctx: click.Context,
    group_by: str,
    since: str | None,
    until: str | None,
    loop_name: str | None,
    as_json: bool,
    as_csv: bool,
    simulated: bool,
    chart: bool,
    stack: str,
    ascii_only: bool,
) -> None:
    """Spend from the ledger by loop, tier, model, provider, purpose, day, week or month."""
    if ctx.invoked_subcommand is not None:
        return
    from agentd.spendviews import ledger_report

    config, state_dir = reading(ctx.obj)
    since_at = when(since or ("30d" if chart else "24h"), config, "--since")
    until_at = when(until, config, "--until") if until else None
    try:
        text = ledger_report(
            state_dir,
            config,
            by=group_by,
            since=since_at,
            until=until_at,
            simulated=simulated,
            fmt=_format(as_json, as_csv),
            loop=loop_name,
            chart=chart,
            stack=stack,
            ascii_only=ascii_only,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    click.echo(text)


@ledger.command("prune")
@click.option("--before", required=True, help="Delete whole days before this date.")
@click.option("--dry-run", is_flag=True, help="Say what would be deleted; delete nothing.")
@click.option("--no-rollup", is_flag=True, help="Do not keep daily totals of what is deleted.")
@click.option("--vacuum", is_flag=True, help="Shrink the file afterwards.")
@click.pass_obj
@handle_errors
def ledger_prune(obj: Context, before: str, dry_run: bool, no_rollup: bool, vacuum: bool) -> None:
    """Delete old rows (never those a live budget window needs), keeping daily roll-ups."""
    from agentd.spendviews import prune_ledger

    config, state_dir = reading(obj)
    click.echo(
        prune_ledger(
            state_dir,
            config,
            before=when(before, config, "--before"),
            dry_run=dry_run,
            rollup=not no_rollup,
            vacuum=vacuum,
        )
    )


@ledger.command("calls")
@click.option("--loop", "loop_name", default=None, help="Only this loop's calls.")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(min=1))
@click.option("--failed", is_flag=True, help="Only failed attempts (status error or aborted).")
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice(["ok", "error", "aborted", "pending", "submitted"]),
    help="Only attempts with this status (repeatable; adds to --failed).",
)
@click.option("--since", default=None, help="A span (24h, 7d), a date, today, week or month.")
@click.option("--until", default=None, help="A span back from now or a date (exclusive).")
@click.option("--json", "as_json", is_flag=True)
@click.option("--csv", "as_csv", is_flag=True)
@click.option("--simulated", is_flag=True, help="Show simulated calls instead of real ones.")
@click.pass_obj
@handle_errors
def ledger_calls(
    obj: Context,
    loop_name: str | None,
    limit: int,
    failed: bool,
    statuses: tuple[str, ...],
    since: str | None,
    until: str | None,
    as_json: bool,
    as_csv: bool,
    simulated: bool,
) -> None:
    """The most recent attempts, newest first (`--failed --since 24h`: what failed today)."""
    from agentd.ledger import FAILED_CALL_STATUSES
    from agentd.spendviews import calls_report

    fmt = _format(as_json, as_csv)
    config, state_dir = reading(obj)
    wanted = {*statuses, *(FAILED_CALL_STATUSES if failed else ())}
    text = calls_report(
        state_dir,
        loop_name,
        limit,
        simulated,
        fmt,
        statuses=sorted(wanted) if wanted else None,
        since=when(since, config, "--since") if since else None,
        until=when(until, config, "--until") if until else None,
    )
    click.echo(text)


@click.command()
@click.option("--json", "as_json", is_flag=True)
@click.option("--csv", "as_csv", is_flag=True)
@click.option("--simulated", is_flag=True, help="Show simulated spend against the windows.")
@click.pass_obj
@handle_errors
def budget(obj: Context, as_json: bool, as_csv: bool, simulated: bool) -> None:
    """Every budget window: limit, spent, reserved, remaining, resets at."""
    from agentd.views import budget_report

    config = obj.config()
    click.echo(budget_report(config, obj.state_dir(config), simulated, _format(as_json, as_csv)))


@click.command()
@click.option(
    "--html",
    "html_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write a self-contained HTML page here.",
)
@click.option("--since", default="30d", show_default=True, help="A span or a date.")
@click.option("--until", default=None, help="A span back from now or a date (exclusive).")
@click.option("--simulated", is_flag=True, help="Report simulated calls instead of real ones.")
@click.pass_obj
@handle_errors
def report(obj: Context, html_path: Path, since: str, until: str | None, simulated: bool) -> None:
    """Write spend charts and tables as one HTML file (no network assets)."""
    from agentd.spendviews import html_report_file

    config, state_dir = reading(obj)
    click.echo(
        html_report_file(
            state_dir,
            config,
            html_path,
            since=when(since, config, "--since"),
            until=when(until, config, "--until") if until else None,
            simulated=simulated,
        )
    )


@click.command()
@click.option("--days", default=30, show_default=True, type=click.IntRange(min=1))
@click.option("--against", type=click.Path(dir_okay=False), help="Compare with another config.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--csv", "as_csv", is_flag=True)
@click.pass_obj
@handle_errors
def plan(obj: Context, days: int, against: str | None, as_json: bool, as_csv: bool) -> None:
    """Projected spend of the config (from its schedules and history) against its budgets."""
    from agentd.config import load_config
    from agentd.views import plan_report

    config = obj.config()
    other = load_config(against, missing_hint="check the --against path") if against else None
    click.echo(
        plan_report(
            config, obj.state_dir(config), days=days, against=other, fmt=_format(as_json, as_csv)
        )
    )


@click.command()
@click.option("--against", type=click.Path(dir_okay=False), help="Re-price as if on this config.")
@click.option("--all-tier", default=None, metavar="TIER", help="Re-price everything on one tier.")
@click.option(
    "--all-model", default=None, metavar="ALIAS", help="Re-price everything on one model."
)
@click.option("--since", default="30d", show_default=True, help="A span or a date.")
@click.option("--until", default=None, help="A span back from now or a date (exclusive).")
@click.option("--simulated", is_flag=True, help="Re-price the simulated calls instead.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--csv", "as_csv", is_flag=True)
@click.pass_obj
@handle_errors
def reprice(
    obj: Context,
    against: str | None,
    all_tier: str | None,
    all_model: str | None,
    since: str,
    until: str | None,
    simulated: bool,
    as_json: bool,
    as_csv: bool,
) -> None:
    """The ledger's real tokens re-priced on another config, tier or model, beside the actual."""
    from agentd.config import load_config
    from agentd.views import reprice_report

    config, state_dir = reading(obj, full=True)
    other = load_config(against, missing_hint="check the --against path") if against else None
    try:
        text = reprice_report(
            state_dir,
            config,
            against=other,
            all_tier=all_tier,
            all_model=all_model,
            since=when(since, config, "--since"),
            until=when(until, config, "--until") if until else None,
            fmt=_format(as_json, as_csv),
            simulated=simulated,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    click.echo(text)


def register(main: click.Group) -> None:
    """Add the report commands to the `agentd` group."""
    for command in (ledger, budget, report, plan, reprice):
        main.add_command(command)
