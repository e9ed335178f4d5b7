"""Reload checks: every primary model a loop's route needs must have its key."""

from __future__ import annotations

from pathlib import Path

import pytest
from builders import TEST_ENV, base_config, merge, write_config

from agentd.config import load_config
from agentd.errors import MissingKeyError
from agentd.reload import check_primary_keys


def test_a_route_tier_without_a_key_is_refused(tmp_path: Path) -> None:
    # The loop's own tier (balanced) is Anthropic; its cascade reviews on fast and escalates
    # on deep. Move fast to OpenAI-only, then drop the OpenAI key.
    data = merge(
        base_config("http://127.0.0.1:9"),
        {
            "tiers": {"fast": ["gpt-mini"]},
            "loops": {"work": {"tier": "balanced", "route": "cascade"}},
        },
    )
    config = load_config(write_config(tmp_path, data))
    check_primary_keys(config, simulate=False, env=TEST_ENV)  # both keys: fine
    anthropic_only = {"TEST_ANTHROPIC_KEY": TEST_ENV["TEST_ANTHROPIC_KEY"]}
    with pytest.raises(MissingKeyError, match=r"loop 'work'.*TEST_OPENAI_KEY"):
        check_primary_keys(config, simulate=False, env=anthropic_only)
    check_primary_keys(config, simulate=True, env={})  # simulation needs no key
