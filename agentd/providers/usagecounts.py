"""A reply's token counts, read from its `usage` whatever number shape the server used.

The official APIs send JSON integers. An OpenAI-compatible server (Ollama, vLLM, a proxy)
may send whole floats (`100.0`) or digit strings (`"64"`); the SDKs' response models used
to coerce those, and agentd now reads a reply's JSON itself
(`agentd.providers.jsonbody`), so the coercion lives here — the same for direct replies and
for the SDK models of batch results. Anything else where a count belongs (a bool, a
fraction, a negative number, other text) is not a count: the reply is a `MalformedResponse`
that may have been billed, so it is charged at its reservation. Never a guessed 0, which
would under-charge (a cache write is billed above plain input).
"""

from __future__ import annotations

from typing import Any

from agentd.errors import MalformedResponse
from agentd.providers.errormap import CallContext


def token_count(value: object) -> int | None:
    """A count as sent (an int, a whole float, a digit string); None if absent; else ValueError."""
    if value is None:
        return None
    if isinstance(value, bool):  # an int to Python, but `true` is not a count
        raise ValueError(f"{value!r} is not a token count")
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    raise ValueError(f"{value!r:.40} is not a token count")


# Where a count is: (the usage's detail object holding it, or None for the usage itself, name).
CountPlace = tuple[str | None, str]


def read_counts(
    body: Any,
    places: tuple[CountPlace, ...],
    required: int,
    ctx: CallContext,
    request_id: str | None,
    *,
    http_status: int | None,
) -> list[int]:
    """The counts at `places` in the body's `usage`; the first `required` must be there.

    An absent optional count is 0. A missing usage or required count, or a count that is
    not one (`token_count`), is a `MalformedResponse` that may have been billed.
    """
    usage = getattr(body, "usage", None)
    counts: list[int] = []
    for index, (within, name) in enumerate(places):
        holder = usage if within is None else getattr(usage, within, None)
        value = getattr(holder, name, None)
        if type(value) is int and value >= 0:  # what the official APIs send: no more work
            counts.append(value)
            continue
        try:
            count = token_count(value)
        except ValueError:
            raise _malformed(
                f"with an unusable {name} ({value!r:.40})", ctx, request_id, http_status
            ) from None
        if count is None and (usage is None or index < required):
            raise _malformed("without usage (may have been billed)", ctx, request_id, http_status)
        counts.append(count or 0)
    return counts


def _malformed(
    what: str, ctx: CallContext, request_id: str | None, http_status: int | None
) -> MalformedResponse:
    where = f"{http_status} response" if http_status else "batch result"
    return MalformedResponse(
        ctx.say(f"{where} {what}"),
        http_status=http_status,
        request_id=request_id,
        may_have_billed=True,
    )
