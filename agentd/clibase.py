"""What every `agentd` command shares: global options, one-line errors, exit codes."""

from __future__ import annotations

import functools
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click

from agentd.errors import EXIT_CONFIG, AgentdError, ConfigError, Terminated

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


def fail(message: str, code: int) -> None:
    click.echo(f"agentd: {message}", err=True)
    sys.exit(code)


def handle_errors(func: F) -> F:
    """Turn agentd's errors into one line and the design's exit code: never a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ConfigError as exc:
            fail(f"invalid configuration: {exc}", EXIT_CONFIG)
        except AgentdError as exc:
            fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            fail("interrupted", EXIT_INTERRUPTED)
        except Terminated:
            fail("terminated", EXIT_TERMINATED)

    return wrapper  # type: ignore[return-value]


def when(value: str, config: Any | None, option: str) -> datetime:
    """A span back from now or a date (midnight in the config's timezone)."""
    from agentd.reports import parse_since

    try:
        return parse_since(value, datetime.now(tz=UTC), tz=config.tz if config else None)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from exc


def reading(obj: Context, *, full: bool = False) -> tuple[Any | None, Path]:
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
