"""A successful reply's JSON body, read from the SDK's raw response instead of its model.

Why not the SDK's `parse()`: it constructs the SDK's pydantic response model (every field,
every nested block) only for agentd to read a handful of them: the text, the usage counts,
the model and the stop reason. That construction is ~0.25 ms of every call, cold, which was
about half of what agentd added to a call (`benchmarks/bench_overhead.py`). The request still
goes through the SDK (its auth, headers, timeout and status-code errors); only the body of a
2xx reply is decoded here, with the standard library's `json`.

Each JSON object becomes a `SimpleNamespace`, so the reply parsers (`parse_message`,
`parse_completion`) read fields by attribute with `getattr(x, name, None)`, exactly as they
read the SDK's own models (batch results arrive as those): one parser for both. The SDK
models also coerced odd numbers (`100.0`, `"64"`) in token counts; that is
`agentd.providers.usagecounts` now, for both.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any


def json_body(content: bytes) -> Any:
    """The decoded body, objects as namespaces; JSONDecodeError/UnicodeDecodeError if not JSON."""
    try:
        return json.loads(content, object_hook=_namespace)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise
    except (ValueError, RecursionError) as exc:
        # JSON that Python will not decode (an integer of over 4,300 digits, nesting deeper
        # than the recursion limit) is as unusable as a body that is not JSON at all.
        raise json.JSONDecodeError(f"undecodable JSON ({type(exc).__name__})", "", 0) from exc


def _namespace(fields: dict[str, Any]) -> SimpleNamespace:
    """One JSON object, its keys as attributes (any string key: a dunder one shadows nothing)."""
    return SimpleNamespace(**fields)


def text_field(value: object) -> str | None:
    """A field that must be text (a model id, a stop reason): None when absent or not a string.

    The ledger binds these as TEXT: an object or a number from an odd server must not reach it.
    """
    return value if isinstance(value, str) and value else None
