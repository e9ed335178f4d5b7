"""What the CLI shows from a config: chains of every route, plan labels of two configs."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from builders import base_config, merge, write_config

from agentd.config import Config, load_config
from agentd.reprice import config_label
from agentd.views import chain_lines, plan_report

URL = "http://127.0.0.1:9"
NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
HAIKU = "haiku (anthropic/claude-haiku-4-5) -> gpt-mini (openai/gpt-4o-mini)"
DEEP = "opus (anthropic/claude-opus-4-1)"


def make(directory: Path, patch: dict[str, Any]) -> Config:
    return load_config(write_config(directory, merge(base_config(URL), patch)))


def test_rules_show_the_tier_they_pick(tmp_path: Path) -> None:
    config = make(
        tmp_path,
        {
            "loops": {
                "work": {
                    "route": "rules",
                    "kind": "reasoning",
                    "stakes": "high",
                    "latency": "background",
                }
            }
        },
    )
    assert chain_lines(config, "work") == [
        f"chain (configured; the rules pick the tier below): {HAIKU}",
        f"rules pick (deep): {DEEP}",
    ]


def test_a_model_pin_with_fallback_tiers_and_no_cheaper_tier(tmp_path: Path) -> None:
    config = make(
        tmp_path,
        {
            "loops": {
                "work": {
                    "tier": None,
                    "model": "gpt-mini",
                    "fallback_tiers": ["deep"],
                    "budget": {"per_day_usd": 1},
                    "when_over_budget": "downgrade",
                }
            }
        },
    )
    # gpt-4o-mini is the cheapest model there is: a downgrade has nowhere to go.
    assert chain_lines(config, "work") == [
        f"chain: gpt-mini (openai/gpt-4o-mini) -> [fallback tier deep] {DEEP}",
        "downgrade: no cheaper tier (over budget the call is skipped)",
    ]


def test_plan_against_a_config_of_the_same_name_labels_both_by_path(
    tmp_path: Path, monkeypatch: Any
) -> None:
    this = make(tmp_path / "a", {})
    other = make(tmp_path / "b", {"loops": {"work": {"every": "10m"}}})
    assert this.path.name == other.path.name
    monkeypatch.chdir(tmp_path)
    head = plan_report(this, tmp_path / "state", against=other, now=NOW).splitlines()[0]
    assert head == (
        "projected spend over 30 days: this = a/agent-model-config.yaml, "
        "other = b/agent-model-config.yaml"
    )
    # Outside the working directory: the absolute path.
    monkeypatch.chdir(tmp_path / "a")
    assert config_label(other) == str(tmp_path / "b" / "agent-model-config.yaml")
    assert config_label(this) == "agent-model-config.yaml"
    assert os.path.isabs(config_label(other))


def test_downgrades_shown_are_the_ones_a_run_would_take(tmp_path: Path) -> None:
    # `tiny` holds only gpt-mini, which is also in `fast`: a run on `fast` already gets
    # gpt-mini's price by skipping a refused haiku, so `tiny` is no cheaper plan (plans_for
    # prices a chain by its cheapest model). `balanced` and `deep` are dearer.
    config = make(
        tmp_path,
        {
            "tiers": {"tiny": ["gpt-mini"]},
            "loops": {"work": {"budget": {"per_day_usd": 1}, "when_over_budget": "downgrade"}},
        },
    )
    assert chain_lines(config, "work") == [
        f"chain: {HAIKU}",
        "downgrade: no cheaper tier (over budget the call is skipped)",
    ]
