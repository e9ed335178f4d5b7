"""A successful reply's JSON body, read from the SDK's raw response instead of its model.

Why not the SDK's `parse()`: it constructs the SDK's pydantic response model (every field,
every nested block) only for agentd to read a handful of them: the text, the usage counts,
the model and the stop reason. That construction is ~0.2 ms of every call, cold, which was
about half of what agentd added to a call (`benchmarks/bench_overhead.py`). The request still
goes through the SDK (its auth, headers, timeout and status-code errors); only the body of a
2xx reply is decoded here, with the standard library's `json`.

The reply parsers (`parse_message`, `parse_completion`) read fields by attribute, so one
parser serves both this view and the SDK's own models (batch results arrive as those). The
SDK models also coerced odd numbers (`100.0`, `"64"`) in token counts; that is
`agentd.providers.usagecounts` now, for both.
"""

from __future__ import annotations

import json
from typing import Any


class JsonView:
    """Attribute access over decoded JSON: a missing key, or a non-object, reads as None.

    Only what a reply parser needs: `view.usage.input_tokens`, lists of views for arrays.
    """

    __slots__ = ("_data",)

    def __init__(self, data: object) -> None:
        self._data = data

    def __getattr__(self, name: str) -> Any:
        # Private and dunder lookups (copy, pickle, IPython's `_repr_html_`, `_data` before
        # __init__ ran) must not see every name as present; no API field starts with "_".
        if name.startswith("_"):
            raise AttributeError(name)
        data = self._data
        if not isinstance(data, dict):
            return None
        return _view(data.get(name))

    def __repr__(self) -> str:
        return f"JsonView({self._data!r})"


def _view(value: object) -> Any:
    """Objects become views and arrays lists of views; scalars stay as JSON decoded them."""
    if isinstance(value, dict):
        return JsonView(value)
    if isinstance(value, list):
        return [_view(item) for item in value]
    return value


def json_body(content: bytes) -> JsonView:
    """The decoded body; `json.JSONDecodeError`/`UnicodeDecodeError` when it is not JSON."""
    try:
        return JsonView(json.loads(content))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise
    except (ValueError, RecursionError) as exc:
        # JSON that Python will not decode (an integer of over 4,300 digits, nesting deeper
        # than the recursion limit) is as unusable as a body that is not JSON at all.
        raise json.JSONDecodeError(f"undecodable JSON ({type(exc).__name__})", "", 0) from exc
