"""Config reading: safe YAML (no 1.1 surprises, exact decimals); problems as key path + line."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from types import NoneType, UnionType
from typing import TYPE_CHECKING, Annotated, Any, Union, get_args, get_origin

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.reader import ReaderError

if TYPE_CHECKING:
    # Only reporting a validation error needs pydantic: the light config read of read-only
    # commands (`configpaths.read_basics`) must not pay its import time.
    from pydantic import BaseModel, ValidationError
    from pydantic_core import ErrorDetails

KeyPath = Sequence[str | int]
KeyTuple = tuple[str | int, ...]

_MERGE_TAG = "tag:yaml.org,2002:merge"
# YAML 1.1 resolvers that turn plain text into something else behind the operator's back:
# `off`/`yes` into booleans, `8:30` into 510, `2024-01-01` into a date. They are replaced below
# by YAML 1.2-style ones (only true/false are booleans; only plain decimals are numbers).
_DROPPED_TAGS = {
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:timestamp",
}


class ConfigLoader(yaml.SafeLoader):
    """SafeLoader without YAML 1.1 implicit bool/sexagesimal/timestamp typing; floats as Decimal."""

    # A copy per class: PyYAML's add_implicit_resolver would otherwise mutate SafeLoader's table.
    yaml_implicit_resolvers = {  # noqa: RUF012
        first: [(tag, rx) for tag, rx in resolvers if tag not in _DROPPED_TAGS]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)
ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^[-+]?(?:0|[1-9][0-9_]*)$"),
    list("-+0123456789"),
)
# A float needs a dot or an exponent, so it never competes with the int pattern above.
ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?$"
        r"|^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"
    ),
    list("-+0123456789."),
)


def _construct_decimal(loader: yaml.SafeLoader, node: Node) -> Decimal:
    """Build a Decimal from the source text: money must never pass through a binary float."""
    text = str(loader.construct_scalar(node)).replace("_", "")  # type: ignore[arg-type]
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise ConstructorError(None, None, f"not a number: {text!r}", node.start_mark) from None
    if not value.is_finite():
        raise ConstructorError(None, None, f"not a finite number: {text!r}", node.start_mark)
    return value


def _construct_int(loader: yaml.SafeLoader, node: Node) -> int:
    """Build an int; explicit `!!int` tags may use 0x/0o/0b, a leading zero is still decimal."""
    text = str(loader.construct_scalar(node)).replace("_", "")  # type: ignore[arg-type]
    for base in (0, 10):
        try:
            return int(text, base)
        except ValueError:
            continue
    raise ConstructorError(None, None, f"not an integer: {text!r}", node.start_mark)


ConfigLoader.add_constructor("tag:yaml.org,2002:float", _construct_decimal)
ConfigLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)


class YamlProblem(Exception):
    """A problem found while reading YAML: what, where (1-based line) and at which key path."""

    def __init__(
        self, problem: str, line: int | None = None, key_path: tuple[str | int, ...] = ()
    ) -> None:
        self.problem = problem
        self.line = line
        self.key_path = key_path
        super().__init__(problem)


@dataclass(frozen=True)
class YamlDocument:
    """The constructed data plus the node tree it came from (for mapping key paths to lines)."""

    data: Any
    root: Node | None

    def line_of(self, key_path: KeyPath) -> int | None:
        """The 1-based line of the deepest node along key_path that exists in the file."""
        return line_of(self.root, key_path)


def load_yaml(text: str) -> YamlDocument:
    """Parse one YAML document with ConfigLoader; duplicate keys and YAML errors → YamlProblem."""
    loader: ConfigLoader | None = None
    try:
        loader = ConfigLoader(text)  # the reader refuses control characters right here
        root = loader.get_single_node()
        if root is None:
            return YamlDocument(data=None, root=None)
        _check_duplicates(root, (), set())
        data = loader.construct_document(root)
    except yaml.MarkedYAMLError as exc:
        raise _from_marked(exc) from None
    except ReaderError as exc:
        line = text[: exc.position].count("\n") + 1
        raise YamlProblem(f"invalid YAML: {str(exc).splitlines()[0]}", line) from None
    except yaml.YAMLError as exc:
        raise YamlProblem(f"invalid YAML: {exc}") from None
    except RecursionError:
        raise YamlProblem("invalid YAML: nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()
    return YamlDocument(data=data, root=root)


def read_document(path: Path, missing_hint: str = "") -> YamlDocument:
    """Read and parse a UTF-8 YAML file; an unreadable file is a YamlProblem like bad syntax."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise YamlProblem(
            "file not found" + (f" ({missing_hint})" if missing_hint else "")
        ) from None
    except IsADirectoryError:
        raise YamlProblem("is a directory, not a configuration file") from None
    except OSError as exc:
        raise YamlProblem(f"cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise YamlProblem(f"not UTF-8 text (bad byte at offset {exc.start})") from None
    return load_yaml(text)


def _from_marked(exc: yaml.MarkedYAMLError) -> YamlProblem:
    """A readable one-liner from PyYAML's problem/context pair, with the problem's line."""
    problem = exc.problem or "syntax error"
    before, at = exc.context_mark, exc.problem_mark
    if exc.context:
        where = ""
        if before is not None and at is not None and before.line != at.line:
            where = f" on line {before.line + 1}"
        if problem.startswith("but "):  # PyYAML splits "expected X, but found Y" in two
            problem = f"{exc.context}{where}, {problem}"
        else:
            problem = f"{problem} ({exc.context}{where})"
    mark = exc.problem_mark or exc.context_mark
    return YamlProblem(f"invalid YAML: {problem}", None if mark is None else mark.line + 1)


def _check_duplicates(node: Node, path: tuple[str | int, ...], seen: set[int]) -> None:
    """Refuse a key given twice in one mapping: PyYAML would silently keep the last one."""
    if id(node) in seen:  # an alias back into its own ancestors; construction reports it
        return
    seen = seen | {id(node)}
    if isinstance(node, MappingNode):
        first_line: dict[tuple[str, str], int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode) or key_node.tag == _MERGE_TAG:
                _check_duplicates(value_node, path, seen)
                continue
            ident = (key_node.tag, key_node.value)
            line = key_node.start_mark.line + 1
            if ident in first_line:
                raise YamlProblem(
                    f"duplicate key (first given on line {first_line[ident]})",
                    line,
                    (*path, key_node.value),
                )
            first_line[ident] = line
            _check_duplicates(value_node, (*path, key_node.value), seen)
    elif isinstance(node, SequenceNode):
        for index, item in enumerate(node.value):
            _check_duplicates(item, (*path, index), seen)


def _find_key(node: MappingNode, key: str, depth: int = 0) -> tuple[Node, Node] | None:
    """The (key node, value node) for key in a mapping, looking into `<<` merges as YAML does."""
    # Last match first: constructing flattens `<<` merges into node.value *ahead* of the
    # explicit keys, and the last occurrence is the one the data holds.
    for key_node, value_node in reversed(node.value):
        if (
            isinstance(key_node, ScalarNode)
            and key_node.tag != _MERGE_TAG
            and key_node.value == key
        ):
            return key_node, value_node
    if depth > 20:
        return None
    for key_node, value_node in node.value:
        if isinstance(key_node, ScalarNode) and key_node.tag == _MERGE_TAG:
            sources = value_node.value if isinstance(value_node, SequenceNode) else [value_node]
            for source in sources:
                if isinstance(source, MappingNode):
                    found = _find_key(source, key, depth + 1)
                    if found is not None:
                        return found
    return None


def line_of(root: Node | None, key_path: KeyPath) -> int | None:
    """The 1-based line of the key (or list item) at key_path, or of its deepest existing parent."""
    node = root
    line: int | None = None
    for part in key_path:
        if isinstance(node, MappingNode):
            found = _find_key(node, str(part))
            if found is None:
                break
            key_node, node = found
            line = key_node.start_mark.line + 1
        elif isinstance(node, SequenceNode) and isinstance(part, int):
            if not 0 <= part < len(node.value):
                break
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


class ConfigProblem(ValueError):
    """Raised inside validators: a problem at key_path relative to the model being validated."""

    def __init__(self, key_path: KeyTuple, problem: str) -> None:
        self.key_path = key_path
        self.problem = problem
        super().__init__(problem)


def format_key_path(key_path: tuple[str | int, ...] | list[str | int]) -> str:
    """`('tiers', 'fast', 1)` → `tiers.fast[1]`: the one key-path style of every message."""
    out = ""
    for part in key_path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def show_value(value: Any) -> str:
    """A short description of an offending value for `(got ...)`."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # a bound of a float field: `0`, not `0.0`
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, str):
        return repr(value) if len(value) <= 60 else repr(value[:57] + "...")
    return str(value)


_EXPECTED = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "decimal_type": "a number",
    "decimal_parsing": "a number",
    "finite_number": "a finite number",
    "string_type": "a string",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "list_type": "a list",
}


def describe_error(error: ErrorDetails, root: type[BaseModel]) -> tuple[KeyTuple, str]:
    """A pydantic error of validating `root` as (key path, short human problem)."""
    loc: KeyTuple = tuple(error["loc"])
    kind, ctx, got = error["type"], error.get("ctx", {}), show_value(error.get("input"))
    if "[key]" in loc:  # a mapping key of the wrong type, e.g. a number as a loop name
        at = loc.index("[key]")
        return loc[: max(at - 1, 0)], f"names must be strings (got {show_value(loc[at - 1])})"
    if kind == "value_error" and isinstance(ctx.get("error"), ConfigProblem):
        problem: ConfigProblem = ctx["error"]
        return (*loc, *problem.key_path), problem.problem
    if kind == "value_error":
        return loc, str(ctx.get("error", error["msg"]))
    if kind == "missing":
        return loc, "required key is missing"
    if kind == "extra_forbidden":
        return loc, "unknown key" + _suggest(root, loc)
    if kind in _EXPECTED:
        return loc, f"must be {_EXPECTED[kind]} (got {got})"
    if kind == "greater_than":
        return loc, f"must be greater than {show_value(ctx.get('gt'))} (got {got})"
    if kind == "greater_than_equal":
        return loc, f"must be at least {show_value(ctx.get('ge'))} (got {got})"
    if kind == "less_than_equal":
        return loc, f"must be at most {show_value(ctx.get('le'))} (got {got})"
    if kind == "less_than":
        return loc, f"must be less than {show_value(ctx.get('lt'))} (got {got})"
    if kind in ("too_short", "string_too_short"):
        return loc, "must not be empty"
    if kind == "literal_error":
        return loc, f"must be {ctx.get('expected')} (got {got})"
    return loc, error["msg"][:1].lower() + error["msg"][1:]


def _unwrap(tp: Any) -> Any:
    """`X | None` → X and `Annotated[X, ...]` → X, to walk the models by key path."""
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
        elif origin in (Union, UnionType):
            options = [a for a in get_args(tp) if a is not NoneType]
            tp = options[0] if len(options) == 1 else tp
            if len(options) != 1:
                return tp
        else:
            return tp


def _suggest(root: type[BaseModel], loc: KeyTuple) -> str:
    """` (did you mean 'x'?)` or ` (allowed: ...)` for an unknown key at loc."""
    from pydantic import BaseModel

    tp: Any = root
    for part in loc[:-1]:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(str(part))
            if field is None:
                return ""
            tp = field.annotation
        elif get_origin(tp) in (dict, list):
            tp = get_args(tp)[-1]
        else:
            return ""
    tp = _unwrap(tp)
    if not (isinstance(tp, type) and issubclass(tp, BaseModel)):
        return ""
    allowed = list(tp.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (allowed: {', '.join(allowed)})"


def first_problem(
    exc: ValidationError, document: YamlDocument, root: type[BaseModel]
) -> YamlProblem:
    """The one problem of a ValidationError to report: the first in the file, missing keys last."""
    ranked = []
    for error in exc.errors():
        key_path, problem = describe_error(error, root)
        line = document.line_of(key_path)
        # A missing key is usually the consequence of a misspelt one, which is worth naming.
        rank = (error["type"] == "missing", line is None, line or 0)
        ranked.append((rank, YamlProblem(problem, line, key_path)))
    return min(ranked, key=lambda r: r[0])[1]
