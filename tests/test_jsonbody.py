"""How the providers read a successful reply: its JSON (jsonbody) and its token counts."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest

from agentd.providers.anthropic import parse_message
from agentd.providers.errormap import CallContext
from agentd.providers.jsonbody import json_body
from agentd.providers.openai import parse_completion
from agentd.providers.usagecounts import token_count


def test_fields_read_by_attribute_nested_and_in_arrays() -> None:
    body = json_body(
        b'{"model": "m", "usage": {"input_tokens": 12, "cache_creation": {"x": 1}},'
        b' "content": [{"type": "text", "text": "hi"}, 3, null], "odd-key": true}'
    )
    assert body.model == "m"
    assert body.usage.input_tokens == 12
    assert body.usage.cache_creation.x == 1
    blocks = body.content
    assert isinstance(blocks[0], SimpleNamespace) and blocks[0].text == "hi"
    assert blocks[1:] == [3, None]
    assert getattr(body, "odd-key") is True


def test_what_the_parsers_read_with_a_default_is_none_when_absent_or_not_an_object() -> None:
    body = json_body(b'{"usage": null, "n": 5}')
    assert body.usage is None
    assert getattr(body, "absent", None) is None
    for other in (b'"just a string"', b"[1, 2]", b"7", b"null"):
        assert getattr(json_body(other), "usage", None) is None


def test_dunder_keys_shadow_nothing() -> None:
    body = json_body(b'{"__class__": 1, "__dict__": 2, "usage": {"input_tokens": 3}}')
    assert type(body) is SimpleNamespace
    assert body.usage.input_tokens == 3
    assert copy.copy(body).usage.input_tokens == 3


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


def test_model_and_stop_reason_that_are_not_text_are_left_out() -> None:
    # They are bound as TEXT in the ledger: an object from an odd server must not reach it.
    ctx = CallContext("anthropic", "m", 5.0, None)
    usage = b'"usage": {"input_tokens": 1, "output_tokens": 1, "prompt_tokens": 1,'
    usage += b' "completion_tokens": 1}'
    message = json_body(b'{"model": {"id": 1}, "stop_reason": 7, ' + usage + b"}")
    reply = parse_message(message, ctx, "asked", None, http_status=200)
    assert (reply.model, reply.stop_reason) == ("asked", None)
    completion = json_body(b'{"model": 5, "choices": [{"finish_reason": []}], ' + usage + b"}")
    reply = parse_completion(completion, ctx, "asked", None, http_status=200)
    assert (reply.model, reply.stop_reason) == ("asked", None)
