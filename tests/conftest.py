"""Shared pytest fixtures: a fake provider server (more fixtures join as modules land)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fakeserver import FakeServer


@pytest.fixture
def fake_server() -> Iterator[FakeServer]:
    """A started FakeServer speaking Anthropic and OpenAI on 127.0.0.1; fresh per test."""
    with FakeServer() as server:
        yield server
