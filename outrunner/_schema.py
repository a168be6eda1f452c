"""Declarative decoding of parsed YAML into frozen dataclasses.

A config section is a frozen dataclass; every field is a key. The decoder walks
``dataclasses.fields()`` and ``typing.get_type_hints()`` and validates by annotation, so adding
a key is one line::

    boot_timeout: float = field(default=300.0, metadata=rules(positive))

Supported annotations: ``str``, ``int``, ``float``, ``bool``, ``Literal[...]``, ``tuple[T, ...]``,
``Mapping[str, T]``, a nested dataclass, and ``T | None``. ``bool`` is never accepted where a
number is expected, although Python treats it as an ``int``: ``cpus: yes`` is a mistake.

Per-field constraints live in the field metadata built by :func:`rules`. A check is a callable
taking the decoded value and returning an error message, or ``None`` when the value is fine.
Cross-field constraints are checks on the whole object, listed in a ``__schema_checks__``
class attribute.

The decoder does not stop at the first problem: it reports every problem it finds, each with a
dotted key path and, when the data came from :class:`YamlLoader`, a line number.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import os.path
import posixpath
import re
import types
import typing
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Final, NamedTuple, TypeVar

import yaml
import yaml.constructor

__all__ = [
    "INVALID",
    "Check",
    "ConfigProblem",
    "Decoder",
    "FrozenMap",
    "YamlLoader",
    "absolute_path",
    "check_schema",
    "describe",
    "empty_or",
    "exactly_one_of",
    "http_url",
    "no_tilde",
    "non_blank",
    "positive",
    "quote",
    "rules",
    "schema_keys",
    "unique",
    "unique_by",
    "unique_keys_ignoring_case",
    "without_chars",
]

_K = TypeVar("_K")
_V = TypeVar("_V")

Check = Callable[[Any], str | None]
"""A constraint: returns an error message for a bad value, ``None`` for a good one."""


# --------------------------------------------------------------------------------------------
# Field metadata


@dataclasses.dataclass(frozen=True)
class _Rules:
    checks: tuple[Check, ...] = ()
    each: tuple[Check, ...] = ()
    keys: tuple[Check, ...] = ()
    required: bool = False
    nullable: bool = True
    from_key: bool = False
    relative_to_file: bool = False
    path_checks: tuple[Check, ...] = ()
    duration: bool = False


_RULES_KEY: Final = "outrunner.schema"
_DURATION_PART: Final = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_DURATION: Final = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|h|m|s))+")
_DURATION_UNITS: Final = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_NO_RULES: Final = _Rules()


def rules(
    *checks: Check,
    each: Iterable[Check] = (),
    keys: Iterable[Check] = (),
    required: bool = False,
    nullable: bool = True,
    from_key: bool = False,
    relative_to_file: bool = False,
    path_checks: Iterable[Check] = (),
    duration: bool = False,
) -> dict[str, Any]:
    """Field metadata for the decoder.

    checks: run on the decoded value (the whole tuple or mapping for collections).
    each: run on every item of a tuple, or every value of a mapping.
    keys: run on every key of a mapping.
    required: the key must be present even though the field has a default (the default only
        serves code that builds the dataclass directly).
    nullable: for ``T | None`` fields, whether an explicit YAML null is accepted.
    from_key: the field is not a YAML key; the decoder fills it with the key under which the
        enclosing mapping holds this object.
    relative_to_file: a relative path is resolved against the directory of the config file.
    path_checks: run on a path after ``relative_to_file`` resolved it, e.g. that the file it
        names can be read (``checks`` see the value as written).
    duration: a ``float`` field of seconds that also takes a duration string such as ``90s``,
        ``30m``, ``8h`` or ``1h30m`` (Go's units h, m, s, ms).
    """
    return {
        _RULES_KEY: _Rules(
            checks=checks,
            each=tuple(each),
            keys=tuple(keys),
            required=required,
            nullable=nullable,
            from_key=from_key,
            relative_to_file=relative_to_file,
            path_checks=tuple(path_checks),
            duration=duration,
        )
    }


# --------------------------------------------------------------------------------------------
# Immutable mapping


class FrozenMap(Mapping[_K, _V]):
    """A read-only, hashable mapping that keeps insertion order.

    Frozen dataclasses hash their fields; a ``dict`` field would make them unhashable.
    """

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[_K, _V] | Iterable[tuple[_K, _V]] = ()) -> None:
        self._data: dict[_K, _V] = dict(data)

    def __getitem__(self, key: _K) -> _V:
        return self._data[key]

    def __iter__(self) -> Iterator[_K]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(frozenset(self._data.items()))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return self._data == dict(other.items())
        return NotImplemented

    def __repr__(self) -> str:
        return f"FrozenMap({self._data!r})"


# --------------------------------------------------------------------------------------------
# YAML loading with line numbers and duplicate-key detection


class _YamlMap(dict[Any, Any]):
    """A YAML mapping that remembers the line of each key (1-based)."""

    lines: dict[Any, int]


class _YamlList(list[Any]):
    """A YAML sequence that remembers the line of each item (1-based)."""

    lines: list[int]


_MERGE_TAG: Final = "tag:yaml.org,2002:merge"


class YamlLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys and records line numbers.

    PyYAML keeps the last of two equal keys without a word; in a config file that silently
    drops a runner definition. Keys pulled in by a ``<<`` merge are not duplicates: overriding
    them is the point of a merge.
    """

    def construct_yaml_map_with_lines(self, node: yaml.MappingNode) -> Iterator[_YamlMap]:
        data = _YamlMap()
        data.lines = {}
        yield data
        self._reject_duplicate_keys(node)
        data.update(self.construct_mapping(node))
        # After construct_mapping, node.value holds merged pairs first, then the node's own
        # pairs, so later pairs win exactly as they do in the constructed dict.
        for key_node, _ in node.value:
            key = self.construct_object(key_node)
            if _hashable(key):
                data.lines[key] = key_node.start_mark.line + 1

    def construct_yaml_seq_with_lines(self, node: yaml.SequenceNode) -> Iterator[_YamlList]:
        data = _YamlList()
        data.lines = [item.start_mark.line + 1 for item in node.value]
        yield data
        data.extend(self.construct_sequence(node))

    def _reject_duplicate_keys(self, node: yaml.MappingNode) -> None:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)
            if not _hashable(key):
                continue  # construct_mapping reports unhashable keys itself
            if key in seen:
                first = seen[key].start_mark.line + 1
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"found duplicate key {quote(key)} (first defined on line {first})",
                    key_node.start_mark,
                )
            seen[key] = key_node


YamlLoader.add_constructor(
    "tag:yaml.org,2002:map",
    YamlLoader.construct_yaml_map_with_lines,
)
YamlLoader.add_constructor(
    "tag:yaml.org,2002:seq",
    YamlLoader.construct_yaml_seq_with_lines,
)


def _hashable(value: object) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# Value descriptions for messages


_MAX_SHOWN: Final = 100


def quote(value: object, limit: int | None = _MAX_SHOWN) -> str:
    """A value as it appears in messages: strings double-quoted, long ones cut at ``limit``."""
    if isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
        if limit is not None and len(text) > limit:
            text = text[: limit - 4] + '..."'
        return text
    return str(value)


def describe(value: object) -> str:
    """A short, typed rendering of a YAML value: ``string "2"``, ``bool true``, ``a list``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"bool {'true' if value else 'false'}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"number {value}"
    if isinstance(value, str):
        return f"string {quote(value)}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"{type(value).__name__} {quote(str(value))}"


# --------------------------------------------------------------------------------------------
# Checks


def positive(value: int | float) -> str | None:
    if value > 0:
        return None
    return f"must be greater than 0, got {value}"


def non_blank(value: str | tuple[Any, ...] | Mapping[Any, Any]) -> str | None:
    if isinstance(value, str):
        return "must not be empty" if not value.strip() else None
    return "must not be empty" if len(value) == 0 else None


def absolute_path(value: str) -> str | None:
    if value.startswith("~"):
        return f"must be an absolute path, got {quote(value)} (~ is not expanded)"
    if not posixpath.isabs(value):
        return f"must be an absolute path, got {quote(value)}"
    return None


def no_tilde(value: str) -> str | None:
    if value.startswith("~"):
        return f"must not start with ~ (it is not expanded), got {quote(value)}"
    return None


def empty_or(check: Check) -> Check:
    """Accept the empty string (meaning "use the built-in default"), else apply ``check``."""

    def run(value: str) -> str | None:
        return None if value == "" else check(value)

    return run


def without_chars(chars: str, why: str) -> Check:
    def run(value: str) -> str | None:
        bad = sorted({c for c in value if c in chars})
        if not bad:
            return None
        shown = ", ".join(quote(c) for c in bad)
        return f"must not contain {shown} ({why}), got {quote(value)}"

    return run


_URL_BAD_CHARS: Final = re.compile(r"[\s\x00-\x1f\x7f]")


def http_url(value: str) -> str | None:
    example = "like https://github.com/org/repo"
    if _URL_BAD_CHARS.search(value):
        return f"must be an http(s) URL {example} without spaces, got {quote(value)}"
    try:
        parts = urllib.parse.urlsplit(value)
        _ = parts.port  # raises ValueError on a malformed port
    except ValueError:
        return f"must be an http(s) URL {example}, got {quote(value)}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"must be an http(s) URL {example}, got {quote(value)}"
    return None


def unique(*, ignore_case: bool = False, what: str = "item") -> Check:
    def run(values: tuple[str, ...]) -> str | None:
        seen: dict[str, int] = {}
        for i, value in enumerate(values):
            norm = value.casefold() if ignore_case else value
            if norm in seen:
                first = values[seen[norm]]
                note = f" (same as {quote(first)} ignoring case)" if first != value else ""
                return f"duplicate {what} {quote(value)} at [{seen[norm]}] and [{i}]{note}"
            seen[norm] = i
        return None

    return run


def unique_by(attribute: str) -> Check:
    def run(values: tuple[Any, ...]) -> str | None:
        seen: dict[Any, int] = {}
        for i, item in enumerate(values):
            key = getattr(item, attribute)
            if key in seen:
                return f"duplicate {attribute} {quote(key)} at [{seen[key]}] and [{i}]"
            seen[key] = i
        return None

    return run


def unique_keys_ignoring_case(what: str, why: str) -> Check:
    def run(mapping: Mapping[str, Any]) -> str | None:
        seen: dict[str, str] = {}
        for key in mapping:
            norm = key.casefold()
            if norm in seen:
                return f"{what} {quote(seen[norm])} and {quote(key)} differ only in case ({why})"
            seen[norm] = key
        return None

    return run


def exactly_one_of(*names: str) -> Check:
    """A class-level check: exactly one of the named optional fields is set."""
    listed = ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else names[0]

    def run(obj: object) -> str | None:
        present = [n for n in names if getattr(obj, n) is not None]
        if len(present) == 1:
            return None
        found = "none" if not present else " and ".join(present)
        return f"must configure exactly one of {listed} (found {found})"

    return run


# --------------------------------------------------------------------------------------------
# Problems and locations


class ConfigProblem(NamedTuple):
    """One problem found in a config file."""

    path: str
    """Dotted key path, e.g. ``runners.linux.docker.mounts[0].source``; empty for the file."""
    message: str
    line: int | None = None
    """1-based line in the file, when known."""

    def format(self, source: str) -> str:
        where = f"{source}:{self.line}" if self.line is not None else source
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


_PLAIN_KEY: Final = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclasses.dataclass(frozen=True)
class _Loc:
    path: str
    line: int | None

    def key(self, name: str, line: int | None) -> _Loc:
        part = name if _PLAIN_KEY.match(name) else json.dumps(name, ensure_ascii=False)
        return _Loc(f"{self.path}.{part}" if self.path else part, line or self.line)

    def index(self, i: int, line: int | None) -> _Loc:
        return _Loc(f"{self.path}[{i}]", line or self.line)


# --------------------------------------------------------------------------------------------
# Schema introspection


class _Field(NamedTuple):
    name: str
    type: Any
    rules: _Rules
    required: bool


@functools.cache
def _fields(cls: type) -> tuple[_Field, ...]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        r = f.metadata.get(_RULES_KEY, _NO_RULES)
        no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        out.append(_Field(f.name, hints[f.name], r, r.required or no_default))
    return tuple(out)


def schema_keys(cls: type) -> tuple[str, ...]:
    """The YAML keys a dataclass accepts, in declaration order."""
    return tuple(f.name for f in _fields(cls) if not f.rules.from_key)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def check_schema(cls: type) -> None:
    """Raise ``TypeError`` if a dataclass (or one it nests) uses an unsupported annotation.

    Run by the test suite, so that a field added with an annotation the decoder cannot handle
    fails there rather than on a user's machine.
    """

    def visit(tp: Any, where: str) -> None:
        tp, _ = _unwrap_optional(tp)
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if tp in (str, int, float, bool) or origin is typing.Literal:
            return
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            visit(args[0], where)
            return
        if origin in (Mapping, dict) and args and args[0] is str:
            visit(args[1], where)
            return
        if _is_dataclass_type(tp):
            for f in _fields(tp):
                visit(f.type, f"{tp.__name__}.{f.name}")
            return
        raise TypeError(f"{where}: unsupported annotation {tp!r}")

    visit(cls, cls.__name__)


# --------------------------------------------------------------------------------------------
# Decoder


class _Invalid:
    __slots__ = ()

    def __repr__(self) -> str:
        return "<invalid>"


INVALID: Final = _Invalid()

_TYPE_NAMES: Final[Mapping[Any, str]] = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a bool (true or false)",
}


class Decoder:
    """Turns parsed YAML into dataclasses, collecting every problem on the way."""

    def __init__(self, base_dir: str | None = None) -> None:
        self.base_dir = base_dir
        self.problems: list[ConfigProblem] = []

    def decode(self, raw: object, cls: type, path: str = "", line: int | None = None) -> Any:
        """Decode ``raw`` as ``cls``; returns :data:`INVALID` if any problem was recorded."""
        return self._value(raw, cls, _NO_RULES, _Loc(path, line), None)

    def report(self, loc: _Loc | str, message: str, line: int | None = None) -> None:
        path = loc if isinstance(loc, str) else loc.path
        if line is None and isinstance(loc, _Loc):
            line = loc.line
        self.problems.append(ConfigProblem(path, message, line))

    # -- dispatch by annotation -------------------------------------------------------------

    def _value(self, raw: object, tp: Any, r: _Rules, loc: _Loc, key: str | None) -> Any:
        tp, optional = _unwrap_optional(tp)
        if raw is None:
            if optional and r.nullable:
                return None
            self.report(loc, f"expected {_expected(tp)}, got null (the key has no value)")
            return INVALID
        origin = typing.get_origin(tp)
        if origin is typing.Literal:
            value = self._literal(raw, typing.get_args(tp), loc)
        elif origin is tuple:
            value = self._tuple(raw, typing.get_args(tp)[0], r, loc)
        elif origin in (Mapping, dict):
            value = self._mapping(raw, typing.get_args(tp)[1], r, loc)
        elif _is_dataclass_type(tp):
            value = self._dataclass(raw, tp, loc, key)
        elif r.duration and tp is float and isinstance(raw, str):
            value = self._duration(raw, loc)
        else:
            value = self._scalar(raw, tp, loc)
        if value is INVALID:
            return INVALID
        return self._run_checks(value, r.checks, loc)

    def _run_checks(self, value: Any, checks: Iterable[Check], loc: _Loc) -> Any:
        ok = True
        for check in checks:
            message = check(value)
            if message is not None:
                self.report(loc, message)
                ok = False
        return value if ok else INVALID

    def _scalar(self, raw: object, tp: Any, loc: _Loc) -> Any:
        if tp is bool:
            ok = isinstance(raw, bool)
        elif tp is int:
            ok = isinstance(raw, int) and not isinstance(raw, bool)
        elif tp is float:
            ok = isinstance(raw, int | float) and not isinstance(raw, bool)
            if ok and not math.isfinite(float(raw)):  # type: ignore[arg-type]
                self.report(loc, f"must be a finite number, got {raw}")
                return INVALID
        elif tp is str:
            ok = isinstance(raw, str)
        else:  # pragma: no cover - check_schema rejects these
            raise TypeError(f"unsupported annotation {tp!r}")
        if not ok:
            self.report(loc, f"expected {_expected(tp)}, got {describe(raw)}{_hint(raw, tp)}")
            return INVALID
        return float(raw) if tp is float else raw  # type: ignore[arg-type]

    def _duration(self, raw: str, loc: _Loc) -> Any:
        text = raw.strip()
        if not _DURATION.fullmatch(text):
            self.report(
                loc,
                f"expected seconds or a duration such as 90s, 30m, 8h or 1h30m, got {quote(raw)}",
            )
            return INVALID
        return sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(text))

    def _literal(self, raw: object, choices: tuple[Any, ...], loc: _Loc) -> Any:
        for choice in choices:
            if type(raw) is type(choice) and raw == choice:
                return raw
        listed = ", ".join(quote(c) for c in choices)
        message = f"must be one of {listed}, got {describe(raw)}"
        if isinstance(raw, str):
            names = [c for c in choices if isinstance(c, str)]
            close = difflib.get_close_matches(raw, names, n=1)
            if close:
                message += f" (did you mean {quote(close[0])}?)"
        self.report(loc, message)
        return INVALID

    def _tuple(self, raw: object, item_tp: Any, r: _Rules, loc: _Loc) -> Any:
        if not isinstance(raw, list):
            hint = f" (write [{raw}])" if item_tp is str and isinstance(raw, str) else ""
            self.report(loc, f"expected a list, got {describe(raw)}{hint}")
            return INVALID
        lines = getattr(raw, "lines", None)
        items = []
        ok = True
        for i, item in enumerate(raw):
            item_loc = loc.index(i, lines[i] if lines else None)
            value = self._value(item, item_tp, _NO_RULES, item_loc, None)
            if value is not INVALID:
                value = self._run_checks(value, r.each, item_loc)
            ok = ok and value is not INVALID
            items.append(value)
        return tuple(items) if ok else INVALID

    def _mapping(self, raw: object, value_tp: Any, r: _Rules, loc: _Loc) -> Any:
        if not isinstance(raw, dict):
            self.report(loc, f"expected a mapping, got {describe(raw)}")
            return INVALID
        lines = getattr(raw, "lines", {})
        out: dict[str, Any] = {}
        ok = True
        for k, v in raw.items():
            if not isinstance(k, str):
                self.report(
                    loc, f"keys must be strings, got {describe(k)} (quote it)", lines.get(k)
                )
                ok = False
                continue
            item_loc = loc.key(k, lines.get(k))
            key_ok = self._run_checks(k, r.keys, item_loc) is not INVALID
            value = self._value(v, value_tp, _NO_RULES, item_loc, k)
            if value is not INVALID:
                value = self._run_checks(value, r.each, item_loc)
            ok = ok and key_ok and value is not INVALID
            out[k] = value
        return FrozenMap(out) if ok else INVALID

    def _dataclass(self, raw: object, cls: type, loc: _Loc, key: str | None) -> Any:
        if not isinstance(raw, dict):
            self.report(loc, f"expected a mapping, got {describe(raw)}")
            return INVALID
        fields = _fields(cls)
        known = schema_keys(cls)
        lines = getattr(raw, "lines", {})
        ok = True
        for k in raw:
            if not isinstance(k, str):
                self.report(loc, f"keys must be strings, got {describe(k)}", lines.get(k))
                ok = False
            elif k not in known:
                self.report(loc.key(k, lines.get(k)), _unknown_key(k, cls))
                ok = False
        kwargs: dict[str, Any] = {}
        for f in fields:
            if f.rules.from_key:
                if key is not None:
                    kwargs[f.name] = key
                continue
            if f.name not in raw:
                if f.required:
                    self.report(loc.key(f.name, None), "missing required key")
                    ok = False
                continue
            field_loc = loc.key(f.name, lines.get(f.name))
            value = self._value(raw[f.name], f.type, f.rules, field_loc, None)
            if value is not INVALID and value:
                if f.rules.relative_to_file and self.base_dir is not None:
                    value = os.path.normpath(os.path.join(self.base_dir, value))
                value = self._run_checks(value, f.rules.path_checks, field_loc)
            ok = ok and value is not INVALID
            kwargs[f.name] = value
        if not ok:
            return INVALID
        obj = cls(**kwargs)
        return self._run_checks(obj, getattr(cls, "__schema_checks__", ()), loc)


def _expected(tp: Any) -> str:
    if tp in _TYPE_NAMES:
        return _TYPE_NAMES[tp]
    origin = typing.get_origin(tp)
    if origin is tuple:
        return "a list"
    if origin is typing.Literal:
        return "one of " + ", ".join(quote(c) for c in typing.get_args(tp))
    return "a mapping"


def _hint(raw: object, tp: Any) -> str:
    if isinstance(raw, str) and tp in (int, float):
        try:
            float(raw)
        except ValueError:
            return ""
        return " (remove the quotes)"
    if tp is str and isinstance(raw, bool | int | float):
        return " (quote it if you meant a string)"
    return ""


def _unknown_key(key: str, cls: type) -> str:
    known = schema_keys(cls)
    message = "unknown key"
    close = difflib.get_close_matches(key, known, n=1)
    if close:
        return f"{message} (did you mean {quote(close[0])}?)"
    owners = []
    for f in _fields(cls):
        inner, _ = _unwrap_optional(f.type)
        if _is_dataclass_type(inner) and key in schema_keys(inner):
            owners.append(f.name)
    if owners:
        return f"{message} (it belongs under {' or '.join(owners)})"
    return f"{message} (valid keys: {', '.join(known)})"
