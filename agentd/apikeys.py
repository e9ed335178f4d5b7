"""API keys: where each provider's key comes from (env var or credential file), never shown."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from agentd.errors import MissingKeyError

if TYPE_CHECKING:
    from agentd.config import Config, ProviderConfig

ENV_CREDENTIALS = "CREDENTIALS_DIRECTORY"  # set by systemd's LoadCredential=
_SIMULATE_HINT = "use --simulate to run without a key"


def api_key_file_path(
    provider: ProviderConfig, env: Mapping[str, str] | None = None, base_dir: Path | None = None
) -> Path | None:
    """Where a provider's api_key_file is: relative to $CREDENTIALS_DIRECTORY, else base_dir."""
    if provider.api_key_file is None:
        return None
    env = os.environ if env is None else env
    path = Path(provider.api_key_file).expanduser()
    base = env.get(ENV_CREDENTIALS) or base_dir
    return path if base is None else Path(base) / path


def read_api_key(
    provider_name: str,
    provider: ProviderConfig,
    env: Mapping[str, str] | None = None,
    base_dir: Path | None = None,
) -> str | None:
    """The provider's API key, stripped; None if keyless; MissingKeyError (no value) if unset.

    A relative `api_key_file` resolves against `$CREDENTIALS_DIRECTORY` when set (systemd
    credentials), else against base_dir (pass the config's directory; `Config.api_key` does).
    """
    env = os.environ if env is None else env
    who = f"provider {provider_name!r}"
    if provider.api_key_env is not None:
        value = env.get(provider.api_key_env, "").strip()
        if not value:
            raise MissingKeyError(
                f"{who}: environment variable {provider.api_key_env} is not set ({_SIMULATE_HINT})"
            )
        return value
    path = api_key_file_path(provider, env, base_dir)
    if path is None:
        return None
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        problem = f"cannot read api_key_file {path}: {exc.strerror or type(exc).__name__}"
        raise MissingKeyError(f"{who}: {problem} ({_SIMULATE_HINT})") from None
    except UnicodeDecodeError:
        raise MissingKeyError(f"{who}: api_key_file {path} is not UTF-8 text") from None
    if not value:
        raise MissingKeyError(f"{who}: api_key_file {path} is empty ({_SIMULATE_HINT})")
    return value


def missing_api_keys(config: Config, env: Mapping[str, str] | None = None) -> list[str]:
    """One warning line per provider whose API key is not available (for `agentd check`)."""
    warnings = []
    for name in config.providers:
        try:
            config.api_key(name, env)
        except MissingKeyError as exc:
            warnings.append(str(exc))
    return warnings
