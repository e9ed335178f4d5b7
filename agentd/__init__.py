"""agentd: scheduled LLM agent loops on the cheapest tier, inside a hard budget."""

from __future__ import annotations

__version__ = "0.1.0"
