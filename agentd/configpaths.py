"""Where the config file and the state directory are, and the light read of the config file.

The pydantic-free part of `agentd.config` (which re-exports it): read-only commands such as
`agentd ledger` need only the state directory and the timezone, and validating every model of
the file would cost them more than the report itself. `read_basics` reads those two keys with
the same YAML loader and the same messages as the full validation (`file:line: key: problem`,
exit 78), and refuses an unknown top-level key (a misspelt `timezone` would silently report in
UTC); the rest of the file is left to the commands that use it.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from agentd.errors import ConfigError

ENV_CONFIG = "AGENTD_CONFIG"
ENV_STATE_DIR = "AGENTD_STATE_DIR"
ENV_SYSTEMD_STATE = "STATE_DIRECTORY"  # set by systemd's StateDirectory=
CONFIG_FILENAME = "agent-model-config.yaml"
LOCAL_CONFIG_PATH = Path("config") / CONFIG_FILENAME
SYSTEM_CONFIG_PATH = Path("/etc/agentd") / CONFIG_FILENAME

# The top-level keys of `config.Config`, in its field order (a test keeps them in step).
TOP_LEVEL_KEYS = (
    "timezone",
    "state_dir",
    "providers",
    "models",
    "tiers",
    "budgets",
    "circuit_breaker",
    "daemon",
    "guardrails",
    "alerts",
    "loops",
)


class StateDirSource(Protocol):
    """What the state-dir resolution reads from a config: `state_dir:` and the file's dir."""

    @property
    def state_dir(self) -> str | None: ...

    @property
    def dir(self) -> Path: ...


@dataclass(frozen=True)
class ConfigBasics:
    """The config keys read-only commands use: the file, its timezone and its state dir."""

    path: Path
    timezone: str = "UTC"
    state_dir: str | None = None

    @property
    def dir(self) -> Path:
        """The directory of the configuration file: relative paths in it resolve against this."""
        return self.path.parent

    @property
    def tz(self) -> ZoneInfo:
        """The configured time zone."""
        return ZoneInfo(self.timezone)


def timezone_problem(value: str) -> str | None:
    """Why `value` is not a usable IANA zone name, or None when it is."""
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return f"unknown time zone {value!r} (use an IANA name like UTC or Europe/Berlin)"
    return None


def top_level(data: Any, file: str) -> dict[str, Any]:
    """The document as the top-level mapping of settings, or the ConfigError the file gets."""
    from agentd.yamlload import show_value

    if data is None:
        raise ConfigError(file, "the file is empty (expected providers, models, tiers and loops)")
    if not isinstance(data, dict):
        got = show_value(data)
        raise ConfigError(file, f"the top level must be a mapping of settings (got {got})", line=1)
    return data


def read_basics(path: Path | str) -> ConfigBasics:
    """Read only `timezone` and `state_dir` of a config file (and refuse unknown top keys)."""
    from agentd.yamlload import YamlProblem, format_key_path, read_document, show_value

    file = str(path)
    try:
        document = read_document(Path(path), f"give --config PATH or set {ENV_CONFIG}")
    except YamlProblem as exc:
        raise ConfigError(file, exc.problem, format_key_path(exc.key_path), exc.line) from None
    data = top_level(document.data, file)

    def fail(key: str, problem: str) -> ConfigError:
        return ConfigError(file, problem, key, document.line_of((key,)))

    for key in data:
        if key not in TOP_LEVEL_KEYS:
            close = difflib.get_close_matches(str(key), TOP_LEVEL_KEYS, n=1)
            hint = (
                f"did you mean {close[0]!r}?" if close else f"allowed: {', '.join(TOP_LEVEL_KEYS)}"
            )
            raise fail(str(key), f"unknown key ({hint})")
    timezone = data.get("timezone", "UTC")
    if not isinstance(timezone, str):
        raise fail("timezone", f"must be a string (got {show_value(timezone)})")
    problem = timezone_problem(timezone)
    if problem is not None:
        raise fail("timezone", problem)
    state_dir = data.get("state_dir")
    if state_dir is not None and not isinstance(state_dir, str):
        raise fail("state_dir", f"must be a string (got {show_value(state_dir)})")
    return ConfigBasics(Path(path).absolute(), timezone, state_dir)


def resolve_config_path(
    cli_value: str | None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    *,
    system_path: Path = SYSTEM_CONFIG_PATH,
) -> Path:
    """`--config` > `$AGENTD_CONFIG` > `./config/…` > `/etc/agentd/…`: first given or existing."""
    env = os.environ if env is None else env
    if cli_value:
        return Path(cli_value).expanduser()
    if env.get(ENV_CONFIG):
        return Path(env[ENV_CONFIG]).expanduser()
    local = LOCAL_CONFIG_PATH if cwd is None else cwd / LOCAL_CONFIG_PATH
    if local.exists() or not system_path.exists():
        return local  # when neither exists, the error names the local path
    return system_path


def resolve_state_dir(
    cli_value: str | None,
    config: StateDirSource | None,
    env: Mapping[str, str] | None = None,
) -> Path:
    """`--state-dir` > `$AGENTD_STATE_DIR` > `$STATE_DIRECTORY` > `state_dir:` > `./state`."""
    env = os.environ if env is None else env
    # systemd passes one path per StateDirectory= entry, colon-separated: agentd's is the first.
    systemd = env.get(ENV_SYSTEMD_STATE, "").split(":")[0]
    for candidate in (cli_value, env.get(ENV_STATE_DIR), systemd):
        if candidate:
            return Path(candidate).expanduser().absolute()
    if config is not None and config.state_dir:
        return (config.dir / Path(config.state_dir).expanduser()).absolute()
    return Path("state").absolute()
