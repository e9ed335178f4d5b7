"""Config builder for tests: a valid config dict pointed at the fake server, written as YAML."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

TEST_ENV = {
    "TEST_ANTHROPIC_KEY": "sk-ant-test-secret-0001",
    "TEST_OPENAI_KEY": "sk-oai-test-secret-0002",
}


def base_config(server_url: str) -> dict[str, Any]:
    """Two providers on the fake server, three tiers, one loop `work` on tier fast."""
    return {
        "timezone": "UTC",
        "providers": {
            "anthropic": {
                "type": "anthropic",
                "api_key_env": "TEST_ANTHROPIC_KEY",
                "base_url": server_url,
                "timeout_s": 5,
            },
            "openai": {
                "type": "openai",
                "api_key_env": "TEST_OPENAI_KEY",
                "base_url": f"{server_url}/v1",
                "timeout_s": 5,
            },
        },
        "models": {
            "haiku": {"provider": "anthropic", "model": "claude-haiku-4-5"},
            "sonnet": {"provider": "anthropic", "model": "claude-sonnet-4-5"},
            "opus": {"provider": "anthropic", "model": "claude-opus-4-1"},
            "gpt-mini": {"provider": "openai", "model": "gpt-4o-mini"},
            "gpt": {"provider": "openai", "model": "gpt-4o"},
        },
        "tiers": {
            "fast": ["haiku", "gpt-mini"],
            "balanced": ["sonnet", "gpt"],
            "deep": ["opus"],
        },
        "circuit_breaker": {"failures": 3, "cooldowns_s": [30, 60, 300]},
        "loops": {
            "work": {"every": "30m", "tier": "fast", "max_tokens": 200, "prompt": "work.md"},
        },
    }


def merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `patch` into a copy of `base` (a None value deletes the key)."""
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def write_config(directory: Path, data: dict[str, Any], prompt: str = "Say hello.") -> Path:
    """Write the config and every loop's prompt file; return the config path."""
    directory.mkdir(parents=True, exist_ok=True)
    for loop in data.get("loops", {}).values():
        prompt_path = directory / loop["prompt"]
        if not prompt_path.exists():
            prompt_path.write_text(prompt)
    path = directory / "agent-model-config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def haiku_call(
    loop: str,
    run_id: int | None = None,
    *,
    simulated: bool = False,
    batch: bool = False,
    attempt: int = 1,
) -> Any:
    """A `budgets.CallStart` of a `work` call on haiku (fast tier), for the budget tests."""
    from agentd.budgets import CallStart

    return CallStart(
        run_id=run_id,
        loop=loop,
        purpose="work",
        tier="fast",
        alias="haiku",
        provider="anthropic",
        model="claude-haiku-4-5",
        attempt=attempt,
        simulated=simulated,
        batch=batch,
    )
