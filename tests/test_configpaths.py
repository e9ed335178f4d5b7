"""The light config read of read-only commands agrees with the full validation where it looks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from builders import base_config, merge, write_config

from agentd.config import Config, load_config
from agentd.configpaths import TOP_LEVEL_KEYS, ConfigBasics, read_basics, resolve_state_dir
from agentd.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "config" / "agent-model-config.yaml"


def config_file(tmp_path: Path, patch: dict[str, Any] | None = None) -> Path:
    return write_config(tmp_path, merge(base_config("http://127.0.0.1:9"), patch or {}))


def problem(call: Any, path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        call(path)
    assert info.value.exit_code == 78
    return str(info.value)


def test_top_level_keys_are_the_config_models_fields() -> None:
    assert tuple(Config.model_fields) == TOP_LEVEL_KEYS


@pytest.mark.parametrize("path", [SHIPPED, None])
def test_basics_equal_the_validated_config(tmp_path: Path, path: Path | None) -> None:
    path = path or config_file(tmp_path, {"timezone": "Europe/Berlin", "state_dir": "../var"})
    full, basics = load_config(path), read_basics(path)
    assert (basics.timezone, basics.state_dir, basics.path) == (
        full.timezone,
        full.state_dir,
        full.path,
    )
    assert basics.tz == full.tz and basics.dir == full.dir
    env: dict[str, str] = {}
    assert resolve_state_dir(None, basics, env) == resolve_state_dir(None, full, env)


@pytest.mark.parametrize(
    "patch",
    [
        {"timzone": "Europe/Berlin"},  # misspelt: would silently report in UTC
        {"stat_dir": "/var/lib/agentd"},
        {"timezone": "Mars/Olympus_Mons"},
        {"timezone": 5},
        {"timezone": None},
        {"timezone": ["UTC"]},
        {"state_dir": 7},
    ],
)
def test_problems_in_the_keys_it_reads_are_the_full_validations(
    tmp_path: Path, patch: dict[str, Any]
) -> None:
    path = config_file(tmp_path)
    data = yaml.safe_load(path.read_text())
    data.update(patch)  # `merge` would drop a None value
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    light = problem(read_basics, path)
    assert light == problem(load_config, path)
    assert f"{path}:" in light  # file:line: key: problem


@pytest.mark.parametrize(
    "text", ["", "- a list\n", "timezone: [unclosed\n", "timezone: UTC\ntimezone: UTC\n"]
)
def test_unreadable_files_fail_like_the_full_validation(tmp_path: Path, text: str) -> None:
    path = tmp_path / "agent-model-config.yaml"
    path.write_text(text)
    assert problem(read_basics, path) == problem(load_config, path)


def test_a_missing_file_fails_like_the_full_validation(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.yaml"
    assert problem(read_basics, path) == problem(load_config, path)


def test_problems_elsewhere_are_left_to_the_commands_that_use_them(tmp_path: Path) -> None:
    path = config_file(tmp_path, {"timezone": "Asia/Kolkata", "loops": {"work": {"max_tokens": 0}}})
    assert "loops.work.max_tokens" in problem(load_config, path)
    assert read_basics(path) == ConfigBasics(path.absolute(), "Asia/Kolkata", None)
