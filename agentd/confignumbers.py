"""The numbers of the config file: strict types with upper bounds, exact money, durations.

Every number in the config goes through one of these types, so a typo (`true` for a count, a
duration of 99999999999d, a budget of 1e400) is an exit-78 error naming its key, never a
traceback further on.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Annotated, Any

from pydantic import BeforeValidator, ConfigDict, Field, WithJsonSchema
from pydantic_core import PydanticCustomError

from agentd.yamlload import ConfigProblem, show_value

_DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")

# Models forbid unknown keys, and values are never coerced: `true` is not 1, "512" is not 512.
STRICT = ConfigDict(extra="forbid", frozen=True, strict=True)

# Upper bounds of numbers in the config. A value beyond them is a typo, and letting it through
# would end in a traceback further on (datetime overflow, Decimal precision, SQLite integers).
MAX_SECONDS = 366 * 86400  # every duration and every `*_s` setting
MAX_USD = 1_000_000_000  # every budget, price (per million tokens) and USD threshold
MAX_TOKENS = 10_000_000  # a token count of one call (max_tokens, a context window...)
MAX_COUNT = 1_000_000  # counts: retries, failures, runs, calls
MAX_BYTES = 1 << 30  # a cap on bytes read into a prompt


def parse_duration(text: str) -> int:
    """Seconds in a duration like `45s`, `30m`, `2h` or `1h30m`, up to 366d; else ValueError."""
    match = _DURATION.match(text.strip())
    got = show_value(text)
    if not text.strip() or match is None:
        raise ValueError(f"not a duration like 30m, 2h, 45s, 1d or 1h30m (got {got})")
    # A part of 10+ digits is over the bound anyway (and int() refuses 4300+ digits).
    if any(g and len(g.lstrip("0")) > 9 for g in match.groups()):
        raise ValueError(f"must be at most 366d (got {got})")
    days, hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if total <= 0:
        raise ValueError(f"must be longer than zero (got {got})")
    if total > MAX_SECONDS:
        raise ValueError(f"must be at most 366d (got {got})")
    return total


# A quoted plain decimal ("0.50") is still money: quoting is how many operators keep amounts
# exact in YAML, and configs written that way were accepted before numbers became strict.
_DECIMAL_TEXT = re.compile(r"\s*[0-9]+(\.[0-9]+)?\s*")


def _exact_decimal(value: Any) -> Any:
    """Money and shares: a YAML number (int, or Decimal from its text) or a quoted plain decimal.

    No bool, no float, no other string (`"1e3"`, `"five"`, `"true"`).
    """
    if isinstance(value, Decimal):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return Decimal(value)
    if isinstance(value, str) and _DECIMAL_TEXT.fullmatch(value):
        return Decimal(value.strip())
    if isinstance(value, float):
        raise ConfigProblem((), f"must be an exact decimal, not a binary float (got {value})")
    raise PydanticCustomError("decimal_type", "Input should be a valid decimal")


def _number(low: int, high: int, *, above: bool = False) -> WithJsonSchema:
    """The JSON schema of an exact Decimal: a number, or a quoted plain decimal like "0.50"."""
    bound = "exclusiveMinimum" if above else "minimum"
    return WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", bound: low, "maximum": high},
                {"type": "string", "pattern": r"^\s*[0-9]+(\.[0-9]+)?\s*$"},
            ]
        }
    )


EXACT = BeforeValidator(_exact_decimal)
Limit = Annotated[Decimal, EXACT, Field(gt=0, le=MAX_USD), _number(0, MAX_USD, above=True)]
Usd = Annotated[Decimal, EXACT, Field(ge=0, le=MAX_USD), _number(0, MAX_USD)]
# A share of an amount: 0.25 = 25 %, 2 = 200 %.
Share = Annotated[Decimal, EXACT, Field(ge=0, le=1000), _number(0, 1000)]
Factor = Annotated[Decimal, EXACT, Field(gt=1, le=1_000_000), _number(1, 1_000_000, above=True)]
Seconds = Annotated[float, Field(gt=0, le=MAX_SECONDS, allow_inf_nan=False)]
Wait = Annotated[float, Field(ge=0, le=MAX_SECONDS, allow_inf_nan=False)]  # zero allowed
Tokens = Annotated[int, Field(gt=0, le=MAX_TOKENS)]
Count = Annotated[int, Field(ge=1, le=MAX_COUNT)]
Bytes = Annotated[int, Field(gt=0, le=MAX_BYTES)]
