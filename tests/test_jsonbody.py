"""How the providers read a successful reply: its JSON (jsonbody) and its token counts."""

from __future__ import annotations

import copy
import json

import pytest

from agentd.providers.anthropic import parse_message
from agentd.providers.errormap import CallContext
from agentd.providers.jsonbody import JsonView, json_body
from agentd.providers.openai import parse_completion
from agentd.providers.usagecounts import token_count


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


def test_private_and_dunder_lookups_are_not_answered() -> None:
    body = json_body(b'{"__deepcopy__": 1, "_repr_html_": 2}')
    with pytest.raises(AttributeError):
        body.__deepcopy__  # noqa: B018
    with pytest.raises(AttributeError):
        body._repr_html_  # noqa: B018
    assert copy.copy(body) is not None
    bare = JsonView.__new__(JsonView)  # no __init__: must not recurse looking for _data
    with pytest.raises(AttributeError):
        bare.usage  # noqa: B018


@pytest.mark.parametrize(
    "raw",
    [
        b"<html>busy</html>",
        b"",
        b"\xff\xfe{",
        b'{"usage": {"input_tokens": ' + b"9" * 5000 + b"}}",  # past int()'s digit limit
        b"[" * 100_000 + b"]" * 100_000,  # deeper than the recursion limit
    ],
)
def test_a_body_that_is_not_json_raises_what_the_sdks_raise(raw: bytes) -> None:
    with pytest.raises((json.JSONDecodeError, UnicodeDecodeError)):
        json_body(raw)


@pytest.mark.parametrize(
    ("sent", "count"), [(0, 0), (17, 17), (17.0, 17), ("17", 17), (None, None), (-0.0, 0)]
)
def test_token_counts_as_servers_send_them(sent: object, count: int | None) -> None:
    got = token_count(sent)
    assert got == count and (got is None or type(got) is int)


@pytest.mark.parametrize(
    "sent", [True, False, -1, 1.5, float("nan"), float("inf"), "1.0", "-3", "²", "", [], {}]
)
def test_anything_else_is_not_a_token_count(sent: object) -> None:
    with pytest.raises(ValueError, match="not a token count"):
        token_count(sent)


def test_a_reply_whose_content_is_not_a_list_has_no_text_but_keeps_its_usage() -> None:
    ctx = CallContext("anthropic", "m", 5.0, None)
    body = json_body(
        b'{"content": {"type": "text"}, "usage": {"input_tokens": 3, "output_tokens": 2}}'
    )
    reply = parse_message(body, ctx, "m", "req_1", http_status=200)
    assert reply.text == "" and reply.usage.input_tokens == 3 and reply.usage.output_tokens == 2
    nulls = json_body(
        b'{"content": [{"type": "text", "text": null}],'
        b' "usage": {"input_tokens": 1, "output_tokens": 1}}'
    )
    assert parse_message(nulls, ctx, "m", None, http_status=200).text == ""
    choices = json_body(
        b'{"choices": {"0": 1}, "usage": {"prompt_tokens": 4, "completion_tokens": 1}}'
    )
    assert parse_completion(choices, ctx, "m", None, http_status=200).usage.input_tokens == 4
