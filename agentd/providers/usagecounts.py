"""A reply's token counts, read from its `usage` whatever number shape the server used.

The official APIs send JSON integers. OpenAI-compatible servers (Ollama, vLLM, proxies) have
been seen to send whole floats (`100.0`) and digit strings (`"64"`); the SDKs' response
models used to coerce those, and agentd now reads a reply's JSON itself
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


class UsageCounts:
    """One reply's `usage`, read count by count; a reply without its `required` counts is refused.

    Raises `MalformedResponse` (may have billed) from the constructor when the usage or one
    of its required counts is missing, and from `get` when a count is there but unusable.
    """

    def __init__(
        self,
        body: Any,
        required: tuple[str, ...],
        ctx: CallContext,
        request_id: str | None,
        *,
        http_status: int | None,
    ) -> None:
        self._ctx, self._request_id, self._http_status = ctx, request_id, http_status
        self.usage: Any = getattr(body, "usage", None)
        counts = [self._count(self.usage, name) for name in required]
        if self.usage is None or None in counts:
            raise self._malformed("without usage (may have been billed)")
        self.required = dict(zip(required, [c or 0 for c in counts], strict=True))

    def get(self, name: str, *, within: str | None = None) -> int:
        """A count of the usage, or of its detail object named `within`; 0 when absent."""
        holder = self.usage if within is None else getattr(self.usage, within, None)
        return self._count(holder, name) or 0

    def _count(self, holder: Any, name: str) -> int | None:
        value = getattr(holder, name, None)
        try:
            return token_count(value)
        except ValueError:
            raise self._malformed(f"with an unusable {name} ({value!r:.40})") from None

    def _malformed(self, what: str) -> MalformedResponse:
        where = f"{self._http_status} response" if self._http_status else "batch result"
        return MalformedResponse(
            self._ctx.say(f"{where} {what}"),
            http_status=self._http_status,
            request_id=self._request_id,
            may_have_billed=True,
        )
