"""The JSON view the providers read successful replies through (agentd.providers.jsonbody)."""

from __future__ import annotations

import copy
import json

import pytest

from agentd.providers.jsonbody import JsonView, json_body


def test_fields_read_by_attribute_nested_and_in_arrays() -> None:
    body = json_body(
        b'{"model": "m", "usage": {"input_tokens": 12, "cache_creation": {"x": 1}},'
        b' "content": [{"type": "text", "text": "hi"}, 3, null]}'
    )
    assert body.model == "m"
    assert body.usage.input_tokens == 12
    assert body.usage.cache_creation.x == 1
    blocks = body.content
    assert isinstance(blocks[0], JsonView) and blocks[0].text == "hi"
    assert blocks[1:] == [3, None]


def test_missing_keys_and_non_objects_read_as_none() -> None:
    body = json_body(b'{"usage": null, "n": 5}')
    assert body.usage is None
    assert body.absent is None
    assert getattr(body, "absent", "default") is None  # present-but-None, like an SDK model
    assert json_body(b'"just a string"').usage is None
    assert json_body(b"[1, 2]").usage is None


def test_dunder_lookups_are_not_answered() -> None:
    body = json_body(b'{"__deepcopy__": 1}')
    with pytest.raises(AttributeError):
        body.__deepcopy__  # noqa: B018
    assert copy.copy(body) is not None


@pytest.mark.parametrize("raw", [b"<html>busy</html>", b"", b"\xff\xfe{"])
def test_a_body_that_is_not_json_raises_what_the_sdks_raise(raw: bytes) -> None:
    with pytest.raises((json.JSONDecodeError, UnicodeDecodeError)):
        json_body(raw)
