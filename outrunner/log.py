"""Logging for outrunner: stdlib ``logging`` with slog-style structured attributes.

outrunner logs through the standard :mod:`logging` module, so it plugs into whatever logging an
application already has. On top of that it adds structured attributes, the way Go's ``log/slog``
does, and two output formats::

    2026-03-30 21:08:31 INFO Loaded config runners=1 file=config.yml      (SimpleHandler)
    {"time":"2026-03-30T21:08:31.000+02:00","level":"INFO","msg":"Loaded config",...}  (json=True)

Record convention (public)
--------------------------
Structured attributes travel on a :class:`logging.LogRecord` as ``record.attrs``: a mapping of
key -> value, attached with plain stdlib logging::

    logging.getLogger("outrunner.scaleset").info("session created", extra={"attrs": {"id": 7}})

A value that is itself a mapping is a *group* (slog's ``slog.Group``): the text format prints its
members as ``group.key=value``, the JSON format as a nested object; an empty group prints
nothing. Dotted keys are not split (``{"a.b": 1}`` prints ``a.b=1`` and JSON ``"a.b": 1``).
Attributes with an empty or ``None`` key are skipped. Formatters treat ``record.attrs`` as
read-only. Records without ``attrs`` (third-party loggers) print just their message. This is what
lets :mod:`outrunner.scaleset`, which imports nothing else from outrunner, log structured data.

:class:`BoundLogger` (from :func:`get_logger`) is the convenient way to build such records:
``log.info("msg", runners=3)``, ``log.bind(scale_set="linux")`` (slog ``With``) and
``log.group("docker")`` (slog ``WithGroup``). Bound attributes print before the record's own,
and a record attribute replaces a bound one of the same key (at the bound one's position).

Output decisions
----------------
* Level labels are slog's: ``DEBUG``, ``INFO``, ``WARN``, ``ERROR``; Python's ``CRITICAL`` prints as
  ``CRITICAL`` (one greppable word, which Python users know); other numeric levels print
  slog-style relative to the standard level below them (``INFO+5`` for 25) unless registered with
  :func:`logging.addLevelName`.
* Text values: strings print bare unless empty or containing a space, ``=``, ``"`` or any
  non-printable character (newline, tab, control or bidi characters); then they print as a JSON
  string literal (``msg="a \\"b\\""``), so every line splits unambiguously and a value can never
  start a forged log line. Keys follow the same rule. ``None`` prints ``null`` and booleans
  ``true``/``false`` (as slog does, and as the JSON format does); numbers via ``str``; anything
  else via ``str`` and then the string rule. The message itself prints bare, as in Go.
* Exceptions (``exc_info``) and ``stack_info`` follow the line as the usual Python traceback text.
* JSON: one object per line with ``time`` (RFC 3339 with offset, milliseconds; ``Z`` in UTC),
  ``level``, ``msg``, ``logger``, then the attributes as top-level keys (groups nested like slog's
  JSONHandler), then ``exc``/``stack``. An attribute named like one of those fields is written as
  ``_<name>`` so it cannot overwrite them. Lists and tuples become arrays, non-finite floats and
  other non-JSON values strings.

Secret redaction
----------------
Both formats replace secrets in the message, the attribute values and traceback text with
``***``, on raw text before quoting or JSON escaping, so a secret containing quotes or newlines is
still found. Two kinds of secret are masked:

* By shape, with no registration: JIT configs and JWTs (admin tokens, GitHub App JWTs). Both are
  base64 of a JSON object, so they start with ``eyJ`` or ``eyI`` (``{"`` and a letter, as in
  ``{"alg"``, or a punctuation mark, as in a real JIT config's ``{".runner"``); one precompiled
  pattern masks every such string of 19 or more characters, with the base64 and base64url
  alphabets, ``=`` padding and the dots between a JWT's parts, and ``%`` and ``\\`` so that a
  percent- or JSON-escaped copy is masked whole. A farm holds one JIT config per live runner, so
  registering each made every log record's cost (and every registration's) grow with the number
  of runners.
* By value: :func:`register_secret` adds a string (the PAT, the installation token, the GitHub App
  private key) to a process-wide registry, reference counted. Strings shorter than four characters
  are ignored (they would mask noise, not secrets); each line of a multi-line secret (a PEM key) is
  also registered, because a ``repr`` escapes the newlines and would hide the whole value from the
  match; a string (or line) that the shape pattern masks anyway is not kept. Registering costs a
  dictionary update, and masking a text is one ``str.find`` per registered secret: no regular
  expression is compiled for them, so registering and unregistering never fills Python's regex
  cache. Where matches of different secrets overlap, the union of them is masked.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
import threading
import time
import weakref
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from types import TracebackType
from typing import Final, Literal, TextIO, TypeAlias, TypeGuard

__all__ = [
    "BoundLogger",
    "JsonFormatter",
    "Redactor",
    "SimpleHandler",
    "TextFormatter",
    "configure_logging",
    "get_logger",
    "parse_level",
    "redact",
    "register_secret",
    "registered_secrets",
    "unregister_secret",
]

_SysExcInfo: TypeAlias = (
    tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None] | None
)
ExcInfo: TypeAlias = bool | BaseException | _SysExcInfo

# ---------------------------------------------------------------------------------------------
# Secret redaction


_SHAPE = re.compile(r"ey[IJ][A-Za-z0-9+/=_\-.%\\]{16,}")


class Redactor:
    """A thread-safe registry of secret strings, and the masking of them (and of every JIT config
    and JWT, by shape) out of text.

    Registrations are reference counted, so two components registering the same token do not
    unmask it for each other when one of them unregisters. Registering and unregistering cost
    O(1); the tuple of secrets that :meth:`redact` looks for (shortest first, so that a text
    shorter than a secret skips it and every longer one) is rebuilt at the next call after the set
    changed.
    """

    MASK = "***"
    MIN_LENGTH = 4
    SHAPE: re.Pattern[str] = _SHAPE
    """What is masked without registration: JIT configs and JWTs (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        # (length, secret), shortest first; replaced wholesale (None when the set changed) and
        # read without the lock: attribute assignment is atomic, so the hot path (redact) takes
        # the lock only to rebuild it.
        self._secrets: tuple[tuple[int, str], ...] | None = ()

    def register(self, secret: str) -> None:
        """Mask ``secret`` (and each line of it, when multi-line) from now on."""
        pieces = self._pieces(secret)
        if not pieces:
            return
        with self._lock:
            before = len(self._counts)
            self._counts.update(pieces)
            if len(self._counts) != before:
                self._secrets = None

    def unregister(self, secret: str) -> None:
        """Undo one :meth:`register` of ``secret``; unknown secrets are ignored."""
        pieces = self._pieces(secret)
        if not pieces:
            return
        with self._lock:
            for piece in pieces:
                count = self._counts.get(piece, 0)
                if count <= 1:
                    if self._counts.pop(piece, None) is not None:
                        self._secrets = None
                else:
                    self._counts[piece] = count - 1

    @contextmanager
    def scoped(self, *secrets: str) -> Iterator[None]:
        """Register ``secrets`` for the duration of a ``with`` block."""
        for secret in secrets:
            self.register(secret)
        try:
            yield
        finally:
            for secret in secrets:
                self.unregister(secret)

    def redact(self, text: str) -> str:
        """Return ``text`` with every JIT config, JWT and registered secret replaced by ``***``."""
        secrets = self._secrets
        if secrets is None:
            with self._lock:
                secrets = self._secrets = tuple(sorted((len(s), s) for s in self._counts))
        # Most texts are short values (names, ids) without "ey" and shorter than any registered
        # secret: they cost a couple of checks.
        spans = [match.span() for match in self.SHAPE.finditer(text)] if "ey" in text else []
        size = len(text)
        for length, secret in secrets:
            if length > size:
                break  # this one and all after it are longer than the text
            start = text.find(secret)
            while start >= 0:
                spans.append((start, start + length))
                start = text.find(secret, start + 1)
        if not spans:
            return text
        if len(spans) > 1:
            spans.sort()
        parts: list[str] = []
        done = 0  # text[:done] is already in parts
        start, end = spans[0]
        for next_start, next_end in spans[1:]:
            if next_start < end:  # overlapping matches: mask their union
                end = max(end, next_end)
                continue
            parts += (text[done:start], self.MASK)
            done = end
            start, end = next_start, next_end
        parts += (text[done:start], self.MASK, text[end:])
        return "".join(parts)

    def __len__(self) -> int:
        """The number of distinct registered strings (lines of a multi-line secret count)."""
        return len(self._counts)

    def _pieces(self, secret: str) -> list[str]:
        pieces = [secret] if len(secret) >= self.MIN_LENGTH else []
        if "\n" in secret or "\r" in secret:
            for line in secret.splitlines():
                stripped = line.strip()
                if len(stripped) >= self.MIN_LENGTH and stripped not in pieces:
                    pieces.append(stripped)
        # A string the shape pattern matches whole is masked wherever it occurs: the pattern's
        # match cannot end inside it, as it runs over the characters it is made of.
        return [piece for piece in pieces if not self.SHAPE.fullmatch(piece)]


_REDACTOR = Redactor()


def register_secret(secret: str) -> None:
    """Mask ``secret`` in all outrunner log output (process-wide registry)."""
    _REDACTOR.register(secret)


def unregister_secret(secret: str) -> None:
    """Undo one :func:`register_secret` of ``secret``."""
    _REDACTOR.unregister(secret)


def registered_secrets(*secrets: str) -> AbstractContextManager[None]:
    """Context manager registering ``secrets`` process-wide for the duration of a block."""
    return _REDACTOR.scoped(*secrets)


def redact(text: str) -> str:
    """Mask the process-wide registered secrets in ``text`` (for messages built elsewhere)."""
    return _REDACTOR.redact(text)


# ---------------------------------------------------------------------------------------------
# Levels

_LEVELS_BY_NAME = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

_LEVEL_LABELS = {
    logging.DEBUG: "DEBUG",
    logging.INFO: "INFO",
    logging.WARNING: "WARN",
    logging.ERROR: "ERROR",
    logging.CRITICAL: "CRITICAL",
}


def parse_level(level: str | int) -> int:
    """Turn ``"debug"``/``"info"``/``"warn"``/``"warning"``/``"error"``/``"critical"`` (any case)
    or a numeric level into a :mod:`logging` level; raise :class:`ValueError` otherwise."""
    if isinstance(level, bool):  # bool is an int; True as a level is surely a mistake
        raise ValueError(f"invalid log level {level!r}")
    if isinstance(level, int):
        if level < 0:
            raise ValueError(f"invalid log level {level!r}")
        return level
    found = _LEVELS_BY_NAME.get(level.strip().lower())
    if found is None:
        raise ValueError(
            f"invalid log level {level!r}: expected one of debug, info, warn, error, critical"
        )
    return found


def _level_label(record: logging.LogRecord) -> str:
    label = _LEVEL_LABELS.get(record.levelno)
    if label is not None:
        return label
    if not record.levelname.startswith("Level "):  # registered with logging.addLevelName
        return record.levelname
    below = [lv for lv in _LEVEL_LABELS if lv <= record.levelno]
    base = max(below) if below else logging.DEBUG
    return f"{_LEVEL_LABELS[base]}{record.levelno - base:+d}"


# ---------------------------------------------------------------------------------------------
# Formatters


def _safe_str(value: object) -> str:
    # A broken __str__ must not cost the whole log line (slog prints !PANIC for the same reason).
    try:
        return str(value)
    except Exception as exc:
        return f"<unprintable {type(value).__name__}: {type(exc).__name__}>"


_PLAIN: Final = frozenset({str, int, float, bool, type(None)})


def _is_group(value: object) -> TypeGuard[Mapping[object, object]]:
    """Whether ``value`` is a group of attributes (a mapping). Most values are plain: telling
    them apart by type first skips ``Mapping``'s abstract-class check, several per record."""
    kind = type(value)
    return kind is dict or (kind not in _PLAIN and isinstance(value, Mapping))


def _quote(text: str) -> str:
    """Print ``text`` bare when that is unambiguous, else as a JSON string literal."""
    if text and text.isprintable() and " " not in text and "=" not in text and '"' not in text:
        return text
    quoted = json.dumps(text, ensure_ascii=False)
    if not quoted.isprintable():
        # json.dumps leaves DEL, C1 controls, line/paragraph separators and bidi overrides raw;
        # escape them too so a value cannot break or visually forge a line.
        quoted = "".join(c if c.isprintable() else json.dumps(c)[1:-1] for c in quoted)
    return quoted


class _Base(logging.Formatter):
    def __init__(self, *, utc: bool = False, redactor: Redactor | None = None) -> None:
        super().__init__()
        self.utc = utc
        self._redactor = redactor if redactor is not None else _REDACTOR

    def _exc_text(self, record: logging.LogRecord) -> str:
        # Same caching as logging.Formatter.format, so several handlers format a traceback once;
        # the cache holds the raw text and masking is applied on every output.
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        return self._redactor.redact(record.exc_text) if record.exc_text else ""


class TextFormatter(_Base):
    """Formats ``YYYY-MM-DD HH:MM:SS LEVEL message k=v k2=v2`` (local time, or UTC if ``utc``).

    ``redactor`` defaults to the process-wide registry fed by :func:`register_secret`.
    """

    _stamp: tuple[int, bool, str] = (-1, False, "")
    """The last second formatted (whole seconds since the epoch, utc, text): most records of a
    busy second share it."""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        cached, utc, stamp = self._stamp
        if cached != second or utc != self.utc:
            convert = time.gmtime if self.utc else time.localtime
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", convert(second))
            self._stamp = (second, self.utc, stamp)
        parts = [stamp, _level_label(record)]
        message = self._redactor.redact(record.getMessage())
        if message:  # Go would print a double space for an empty message
            parts.append(message)
        attrs = getattr(record, "attrs", None)
        if _is_group(attrs):
            self._append_attrs(parts, attrs, "")
        elif attrs is not None:  # not our convention, but do not lose it
            parts.append("attrs=" + self._value(attrs))
        line = " ".join(parts)
        exc_text = self._exc_text(record)
        if exc_text:
            line += "\n" + exc_text
        if record.stack_info:
            line += "\n" + self._redactor.redact(self.formatStack(record.stack_info))
        return line

    def _append_attrs(self, parts: list[str], attrs: Mapping[object, object], prefix: str) -> None:
        for key, value in attrs.items():
            if key is None or key == "":
                continue
            name = prefix + str(key)
            if _is_group(value):
                self._append_attrs(parts, value, name + ".")
            else:
                parts.append(f"{_quote(name)}={self._value(value)}")

    def _value(self, value: object) -> str:
        if value is None:
            return "null"
        if value is True:
            return "true"
        if value is False:
            return "false"
        text = value if isinstance(value, str) else _safe_str(value)
        return _quote(self._redactor.redact(text))


class JsonFormatter(_Base):
    """Formats one JSON object per line: ``time``, ``level``, ``msg``, ``logger``, attributes, and
    ``exc``/``stack`` when present. Groups are nested objects. Output is ASCII-only JSON.

    ``redactor`` defaults to the process-wide registry fed by :func:`register_secret`.
    """

    _FIELDS = frozenset({"time", "level", "msg", "logger", "exc", "stack"})

    def format(self, record: logging.LogRecord) -> str:
        tz = UTC if self.utc else None
        when = datetime.fromtimestamp(record.created, tz)
        if tz is None:
            when = when.astimezone()  # attach the local offset
        stamp = when.isoformat(timespec="milliseconds")
        if self.utc:
            stamp = stamp.removesuffix("+00:00") + "Z"
        out: dict[str, object] = {
            "time": stamp,
            "level": _level_label(record),
            "msg": self._redactor.redact(record.getMessage()),
            "logger": record.name,
        }
        attrs = getattr(record, "attrs", None)
        if _is_group(attrs):
            for key, value in self._object(attrs).items():
                out["_" + key if key in self._FIELDS else key] = value
        elif attrs is not None:
            out["attrs"] = self._value(attrs)
        exc_text = self._exc_text(record)
        if exc_text:
            out["exc"] = exc_text
        if record.stack_info:
            out["stack"] = self._redactor.redact(self.formatStack(record.stack_info))
        return json.dumps(out, separators=(",", ":"))

    def _object(self, attrs: Mapping[object, object]) -> dict[str, object]:
        out: dict[str, object] = {}
        for key, value in attrs.items():
            if key is None or key == "":
                continue
            if _is_group(value):
                group = self._object(value)
                if group:  # slog omits empty groups
                    out[str(key)] = group
            else:
                out[str(key)] = self._value(value)
        return out

    def _value(self, value: object) -> object:
        if value is None or isinstance(value, bool | int):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else str(value)  # NaN is not JSON
        if isinstance(value, str):
            return self._redactor.redact(value)
        if isinstance(value, Mapping):
            return self._object(value)
        if isinstance(value, list | tuple):
            return [self._value(item) for item in value]
        return self._redactor.redact(_safe_str(value))


# ---------------------------------------------------------------------------------------------
# Handler


class SimpleHandler(logging.StreamHandler[TextIO]):
    """Writes records to ``stream`` (default ``sys.stderr``) one line each, Go-outrunner style::

        2026-03-30 21:08:31 INFO Loaded config runners=1

    ``level`` accepts a number or a name (see :func:`parse_level`); ``utc`` prints UTC instead of
    local time; ``json=True`` writes JSON lines instead (a :class:`JsonFormatter`). Writes are
    serialized by :class:`logging.Handler`'s lock, so one line is never interleaved with another.
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        level: int | str = logging.INFO,
        *,
        utc: bool = False,
        json: bool = False,
    ) -> None:
        super().__init__(stream if stream is not None else sys.stderr)
        self.setLevel(parse_level(level))
        self.setFormatter(JsonFormatter(utc=utc) if json else TextFormatter(utc=utc))


_configure_lock = threading.Lock()
# Handlers configure_logging installed; weak so a handler removed elsewhere can be collected.
_installed: weakref.WeakSet[logging.Handler] = weakref.WeakSet()


def configure_logging(
    level: str | int = "info",
    fmt: Literal["text", "json"] = "text",
    stream: TextIO | None = None,
    *,
    utc: bool = False,
) -> logging.Handler:
    """Install one :class:`SimpleHandler` on the ``outrunner`` logger and set its level.

    Calling it again replaces the handler it installed before (output is never duplicated) and
    leaves handlers installed by anyone else alone. ``propagate`` is untouched, so records still
    reach root handlers the application configured. Returns the installed handler.
    """
    levelno = parse_level(level)  # validate everything before touching the logger
    if fmt not in ("text", "json"):
        raise ValueError(f"invalid log format {fmt!r}: expected 'text' or 'json'")
    handler = SimpleHandler(stream, levelno, utc=utc, json=fmt == "json")
    logger = logging.getLogger("outrunner")
    with _configure_lock:
        for old in [h for h in logger.handlers if h in _installed]:
            logger.removeHandler(old)
            old.close()
        logger.addHandler(handler)
        logger.setLevel(levelno)
        _installed.add(handler)
    return handler


# ---------------------------------------------------------------------------------------------
# BoundLogger

_Attrs: TypeAlias = dict[str, object]


def _merge(
    base: Mapping[str, object], path: tuple[str, ...], attrs: Mapping[str, object]
) -> _Attrs:
    """Copy ``base`` with ``attrs`` added inside the nested group ``path``.

    Only the dicts along ``path`` are copied: bound attribute trees are shared between loggers
    and records and are never mutated.
    """
    merged = dict(base)
    if not path:
        merged.update(attrs)
        return merged
    inner = base.get(path[0])
    # A bound non-group value under the group's name is replaced by the group (slog would print
    # both under one key, which no reader could tell apart).
    merged[path[0]] = _merge(inner if isinstance(inner, Mapping) else {}, path[1:], attrs)
    return merged


class BoundLogger:
    """A :class:`logging.Logger` plus bound attributes and a group, like a Go ``*slog.Logger``.

    ``info(msg, **attrs)`` etc. log ``msg`` with ``attrs`` as the record's structured attributes
    (``record.attrs``). ``msg`` is never %-formatted. ``exc_info`` is the one reserved keyword;
    :meth:`exception` sets it. Nothing is built when the level is disabled: the cost is one
    ``isEnabledFor`` check, and attribute values are not converted to text unless printed.
    """

    __slots__ = ("_attrs", "_group", "_logger")

    def __init__(self, logger: logging.Logger, /, **attrs: object) -> None:
        self._logger = logger
        self._attrs: _Attrs = dict(attrs)
        self._group: tuple[str, ...] = ()

    @property
    def logger(self) -> logging.Logger:
        """The underlying stdlib logger."""
        return self._logger

    @property
    def name(self) -> str:
        return self._logger.name

    def bind(self, **attrs: object) -> BoundLogger:
        """Return a logger adding ``attrs`` to every record (slog ``With``), inside the current
        group."""
        if not attrs:
            return self
        return self._derive(_merge(self._attrs, self._group, attrs), self._group)

    def group(self, name: str, /) -> BoundLogger:
        """Return a logger whose later attributes (bound or per record) nest under ``name``
        (slog ``WithGroup``); attributes bound before stay where they are."""
        if not name:  # as slog: WithGroup("") is the same logger
            return self
        return self._derive(self._attrs, (*self._group, name))

    def is_enabled_for(self, level: int) -> bool:
        return self._logger.isEnabledFor(level)

    def log(self, level: int, msg: str, /, *, exc_info: ExcInfo = None, **attrs: object) -> None:
        if self._logger.isEnabledFor(level):
            self._emit(level, msg, attrs, exc_info)

    def debug(self, msg: str, /, *, exc_info: ExcInfo = None, **attrs: object) -> None:
        if self._logger.isEnabledFor(logging.DEBUG):
            self._emit(logging.DEBUG, msg, attrs, exc_info)

    def info(self, msg: str, /, *, exc_info: ExcInfo = None, **attrs: object) -> None:
        if self._logger.isEnabledFor(logging.INFO):
            self._emit(logging.INFO, msg, attrs, exc_info)

    def warning(self, msg: str, /, *, exc_info: ExcInfo = None, **attrs: object) -> None:
        if self._logger.isEnabledFor(logging.WARNING):
            self._emit(logging.WARNING, msg, attrs, exc_info)

    def error(self, msg: str, /, *, exc_info: ExcInfo = None, **attrs: object) -> None:
        if self._logger.isEnabledFor(logging.ERROR):
            self._emit(logging.ERROR, msg, attrs, exc_info)

    def exception(self, msg: str, /, *, exc_info: ExcInfo = True, **attrs: object) -> None:
        """Log at ERROR with the exception being handled."""
        if self._logger.isEnabledFor(logging.ERROR):
            self._emit(logging.ERROR, msg, attrs, exc_info)

    def _emit(self, level: int, msg: str, attrs: Mapping[str, object], exc_info: ExcInfo) -> None:
        merged = _merge(self._attrs, self._group, attrs) if attrs else dict(self._attrs)
        # What Logger.log does, less its search for the caller (a walk up the stack testing
        # each frame's file, a tenth of a record's cost): the caller is two frames up, past
        # the public method, so funcName and lineno name it.
        caller = sys._getframe(2)
        code = caller.f_code
        error: _SysExcInfo = None
        if isinstance(exc_info, BaseException):
            error = (type(exc_info), exc_info, exc_info.__traceback__)
        elif isinstance(exc_info, tuple):
            error = exc_info
        elif exc_info:
            error = sys.exc_info()
        logger = self._logger
        record = logger.makeRecord(
            logger.name,
            level,
            code.co_filename,
            caller.f_lineno,
            msg,
            (),
            error,
            code.co_name,
            {"attrs": merged},
        )
        logger.handle(record)

    def _derive(self, attrs: _Attrs, group: tuple[str, ...]) -> BoundLogger:
        new = object.__new__(type(self))
        new._logger = self._logger
        new._attrs = attrs
        new._group = group
        return new

    def __repr__(self) -> str:
        group = ".".join(self._group)
        return f"<BoundLogger {self._logger.name!r} group={group!r} attrs={self._attrs!r}>"


def get_logger(name: str = "outrunner", /, **attrs: object) -> BoundLogger:
    """Return a :class:`BoundLogger` over ``logging.getLogger(name)`` with ``attrs`` bound."""
    return BoundLogger(logging.getLogger(name), **attrs)
