"""The `agentd` command line: thin click commands that parse, call one library function, format."""

from __future__ import annotations

import functools
import json
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click

from agentd.errors import EXIT_CONFIG, EXIT_USAGE, AgentdError, ConfigError, Terminated

F = TypeVar("F", bound=Callable[..., Any])
# Killed by a signal, a command exits 128 + its number, as a shell reports it: 130 after
# Ctrl-C (SIGINT), 143 after SIGTERM (`kill`, `timeout`, a stopping service manager).
EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_TERMINATED = 128 + signal.SIGTERM


@dataclass
class Context:
    """Global options, resolved lazily so `--help` and `config schema` need no config file."""

    config_option: str | None
    state_dir_option: str | None

    def config(self) -> Any:
        """Load and validate the configuration (exit 78 on any problem)."""
        from agentd.config import load_config, resolve_config_path

        return load_config(resolve_config_path(self.config_option))

    def basics(self) -> Any:
        """Only the config's `timezone` and `state_dir`, for read-only commands (exit 78 if bad).

        Validating the whole file would cost a report more than the report itself.
        """
        from agentd.configpaths import read_basics, resolve_config_path

        return read_basics(resolve_config_path(self.config_option))

    def state_dir(self, config: Any | None) -> Path:
        """The state directory, by the design's resolution order."""
        from agentd.configpaths import resolve_state_dir

        return resolve_state_dir(self.state_dir_option, config)


def _fail(message: str, code: int) -> None:
    click.echo(f"agentd: {message}", err=True)
    sys.exit(code)


def handle_errors(func: F) -> F:
    """Turn agentd's errors into one line and the design's exit code: never a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ConfigError as exc:
            _fail(f"invalid configuration: {exc}", EXIT_CONFIG)
        except AgentdError as exc:
            _fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted", EXIT_INTERRUPTED)
        except Terminated:
            _fail("terminated", EXIT_TERMINATED)

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    metavar="PATH",
    help="Config file (default: $AGENTD_CONFIG, ./config/agent-model-config.yaml, "
    "/etc/agentd/agent-model-config.yaml).",
)
@click.option(
    "--state-dir",
    metavar="DIR",
    help="State directory for the ledger (default: $AGENTD_STATE_DIR, $STATE_DIRECTORY, "
    "state_dir:, ./state).",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
@click.version_option(package_name="agentd")
@click.pass_context
def main(
    ctx: click.Context, config_path: str | None, state_dir: str | None, log_level: str
) -> None:
    """Run LLM agent loops on schedules, on the cheapest tier, inside a hard budget."""
    from agentd.logs import configure_logging

    configure_logging(log_level)
    ctx.obj = Context(config_path, state_dir)


@main.command()
@click.pass_obj
@handle_errors
def check(obj: Context) -> None:
    """Validate the config; print loops, chains, budgets and next fire times."""
    from agentd.views import describe_config

    config = obj.config()
    text, warnings = describe_config(config, obj.state_dir(config))
    click.echo(text)
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)


@main.command()
@click.argument("loop")
@click.option(
    "--simulate", is_flag=True, help="Use the built-in offline model (no key, no network)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option(
    "--no-wait",
    is_flag=True,
    help="A batch loop: print the batch id once submitted and leave the rest to the daemon.",
)
@click.pass_obj
@handle_errors
def once(obj: Context, loop: str, simulate: bool, as_json: bool, no_wait: bool) -> None:
    """Run LOOP once now; print its reply and cost (a batch loop waits for its batch).

    SIGINT exits 130 and SIGTERM 143, with the run and its call recorded `aborted`.
    """
    import asyncio

    from agentd.interrupt import cancelled_by_sigterm
    from agentd.runner import run_once
    from agentd.views import once_result_json, once_result_text

    config = obj.config()
    if loop not in config.loops:
        _fail(f"no loop named {loop!r} (loops: {', '.join(sorted(config.loops))})", EXIT_USAGE)
    result = asyncio.run(
        cancelled_by_sigterm(
            run_once(config, obj.state_dir(config), loop, simulate=simulate, wait=not no_wait)
        )
    )
    click.echo(once_result_json(result) if as_json else once_result_text(result))
    sys.exit(result.exit_code)


@main.command()
@click.option(
    "--simulate", is_flag=True, help="Use the built-in offline model (no key, no network)."
)
@click.pass_obj
@handle_errors
def run(obj: Context, simulate: bool) -> None:
    """Run the daemon in the foreground (what systemd starts); stop it with SIGTERM.

    Exits 0 after a clean stop, 78 on an invalid config or a missing API key, and 75 when
    another daemon already runs on the same state directory.
    """
    from agentd.daemon import run_daemon

    config = obj.config()
    sys.exit(run_daemon(config, obj.state_dir(config), simulate=simulate))


def _socket(obj: Context) -> Path:
    """The running daemon's control socket, found the way the daemon chose it."""
    from agentd.control_client import find_socket

    state_dir = _reading(obj, full=True)[1]
    # With an explicit --state-dir, don't fall back to the systemd socket of another daemon.
    if obj.state_dir_option:
        return find_socket(state_dir, fallbacks=())
    return find_socket(state_dir)


def _action(obj: Context, action: str, loop: str | None) -> None:
    from agentd.control_client import action_command

    text, code = action_command(_socket(obj), action, loop)
    click.echo(text, err=code != 0)
    sys.exit(code)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the daemon's status as JSON.")
@click.pass_obj
@handle_errors
def status(obj: Context, as_json: bool) -> None:
    """Ask the running daemon: each loop's schedule, next and last run, pause, spend."""
    from agentd.control_client import status_command

    click.echo(status_command(_socket(obj), as_json))


@main.command()
@click.argument("loop")
@click.pass_obj
@handle_errors
def trigger(obj: Context, loop: str) -> None:
    """Ask the running daemon to run LOOP now."""
    _action(obj, "trigger", loop)


@main.command()
@click.argument("loop")
@click.pass_obj
@handle_errors
def pause(obj: Context, loop: str) -> None:
    """Pause LOOP in the running daemon (until `agentd resume LOOP`)."""
    _action(obj, "pause", loop)


@main.command()
@click.argument("loop")
@click.pass_obj
@handle_errors
def resume(obj: Context, loop: str) -> None:
    """Resume a paused LOOP (also clears its failure count); with no daemon, in the ledger."""
    from agentd.control_client import DaemonNotRunning, action_command, resume_in_ledger

    try:
        text, code = action_command(_socket(obj), "resume", loop)
    except DaemonNotRunning:
        # The pause lives in the ledger: clear it there, so a pause set by `agentd once`
        # (the anomaly breaker, failures) can be cleared without starting the daemon.
        config, state_dir = _reading(obj, full=True)
        text, code = resume_in_ledger(state_dir, loop, None if config is None else config.loops)
    click.echo(text, err=code != 0)
    sys.exit(code)


@main.command()
@click.pass_obj
@handle_errors
def reload(obj: Context) -> None:
    """Ask the running daemon to reload its config (same as SIGHUP)."""
    _action(obj, "reload", None)


@main.command()
@click.argument("text")
@click.option(
    "--loop",
    "loop_name",
    metavar="LOOP",
    help="Explain this loop's route: TEXT is what the loop works on (its template is filled"
    " with TEXT as its context, its system prompt counts, its budget windows are read)."
    " Default: TEXT is the whole prompt, static on tier balanced, no budget.",
)
@click.option(
    "--simulate",
    is_flag=True,
    help="Classify with the built-in offline model (no key, no network) and read the"
    " simulated spend.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the explanation as JSON.")
@click.pass_obj
@handle_errors
def route(obj: Context, text: str, loop_name: str | None, simulate: bool, as_json: bool) -> None:
    """Explain which tier and model TEXT would get now, what it may cost, and why.

    With --loop, the input is estimated as `agentd once` builds it (template, TEXT in place of
    the context, system prompt) and the loop's budget decides: the tier after a downgrade, or
    that the run would be skipped or the loop paused. Only a classify loop calls a model.
    """
    import asyncio

    from agentd.routeexplain import explain_route, format_explanation

    config = obj.config()
    explanation = asyncio.run(
        explain_route(config, obj.state_dir(config), text, loop=loop_name, simulate=simulate)
    )
    click.echo(format_explanation(explanation, as_json))


def _format(as_json: bool, as_csv: bool) -> str:
    if as_json and as_csv:
        raise click.UsageError("choose one of --json and --csv")
    return "json" if as_json else "csv" if as_csv else "table"


@main.group(invoke_without_command=True)
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

    config, state_dir = _reading(ctx.obj)
    since_at = _when(since or ("30d" if chart else "24h"), config, "--since")
    until_at = _when(until, config, "--until") if until else None
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

    config, state_dir = _reading(obj)
    click.echo(
        prune_ledger(
            state_dir,
            config,
            before=_when(before, config, "--before"),
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
    config, state_dir = _reading(obj)
    wanted = {*statuses, *(FAILED_CALL_STATUSES if failed else ())}
    text = calls_report(
        state_dir,
        loop_name,
        limit,
        simulated,
        fmt,
        statuses=sorted(wanted) if wanted else None,
        since=_when(since, config, "--since") if since else None,
        until=_when(until, config, "--until") if until else None,
    )
    click.echo(text)


@main.command()
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


@main.command()
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

    config, state_dir = _reading(obj)
    click.echo(
        html_report_file(
            state_dir,
            config,
            html_path,
            since=_when(since, config, "--since"),
            until=_when(until, config, "--until") if until else None,
            simulated=simulated,
        )
    )


@main.command()
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


@main.command()
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

    config, state_dir = _reading(obj, full=True)
    other = load_config(against, missing_hint="check the --against path") if against else None
    try:
        text = reprice_report(
            state_dir,
            config,
            against=other,
            all_tier=all_tier,
            all_model=all_model,
            since=_when(since, config, "--since"),
            until=_when(until, config, "--until") if until else None,
            fmt=_format(as_json, as_csv),
            simulated=simulated,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    click.echo(text)


@main.group("config")
def config_group() -> None:
    """Configuration helpers."""


@config_group.command("schema")
def config_schema() -> None:
    """Print the config file's JSON Schema (for editor completion and checks)."""
    from agentd.configschema import config_json_schema

    click.echo(json.dumps(config_json_schema(), indent=2, sort_keys=True))


def _when(value: str, config: Any | None, option: str) -> datetime:
    """A span back from now or a date (midnight in the config's timezone)."""
    from agentd.reports import parse_since

    try:
        return parse_since(value, datetime.now(tz=UTC), tz=config.tz if config else None)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from exc


def _reading(obj: Context, *, full: bool = False) -> tuple[Any | None, Path]:
    """Reports need the state dir; the config helps but is optional (it may be elsewhere).

    Without `full` only the keys a report reads are checked (`timezone`, `state_dir`, and no
    unknown top-level key): the rest of the file is the business of the commands that use it.
    """
    try:
        config = obj.config() if full else obj.basics()
    except ConfigError:
        if obj.state_dir_option is None:
            raise
        config = None
    return config, obj.state_dir(config)
