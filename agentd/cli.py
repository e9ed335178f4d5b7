"""The `agentd` command line: thin click commands that parse, call one library function, format."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from agentd.clibase import Context, fail, handle_errors, reading
from agentd.errors import EXIT_USAGE


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
        fail(f"no loop named {loop!r} (loops: {', '.join(sorted(config.loops))})", EXIT_USAGE)
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

    state_dir = reading(obj, full=True)[1]
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
        config, state_dir = reading(obj, full=True)
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


@main.group("config")
def config_group() -> None:
    """Configuration helpers."""


@config_group.command("schema")
def config_schema() -> None:
    """Print the config file's JSON Schema (for editor completion and checks)."""
    from agentd.configschema import config_json_schema

    click.echo(json.dumps(config_json_schema(), indent=2, sort_keys=True))


# The report commands (ledger, budget, report, plan, reprice) live in agentd.clispend.
from agentd import clispend  # noqa: E402

clispend.register(main)
