"""Tests for outrunner.log: the slog-style text/JSON output, BoundLogger, redaction, configuration.

The first six tests port gha-outrunner's log_test.go one to one (named in their docstrings).
Timestamps are pinned by a handler filter that sets ``record.created``, never by sleeping.
"""

from __future__ import annotations

import inspect
import io
import itertools
import json
import logging
import re
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from unittest import mock

import pytest

from outrunner.log import (
    BoundLogger,
    JsonFormatter,
    Redactor,
    SimpleHandler,
    TextFormatter,
    configure_logging,
    get_logger,
    parse_level,
    redact,
    register_secret,
    registered_secrets,
    unregister_secret,
)

FIXED = datetime(2026, 3, 30, 14, 5, 9, tzinfo=UTC).timestamp()
FIXED_TEXT = "2026-03-30 14:05:09"
_names = itertools.count()


def _pin_time(record: logging.LogRecord) -> bool:
    record.created = FIXED
    return True


@dataclass
class Sink:
    logger: logging.Logger
    handler: SimpleHandler
    stream: io.StringIO

    def bound(self, **attrs: object) -> BoundLogger:
        return BoundLogger(self.logger, **attrs)

    def text(self) -> str:
        return self.stream.getvalue()

    def lines(self) -> list[str]:
        return self.stream.getvalue().splitlines()

    def json_lines(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.lines()]

    def reset(self) -> None:
        self.stream.seek(0)
        self.stream.truncate()


def _sink(level: int | str = logging.INFO, *, json: bool = False) -> Sink:
    # A fresh, non-propagating logger per sink keeps tests independent of each other and of root.
    logger = logging.getLogger(f"outrunner_test.{next(_names)}")
    logger.setLevel(1)  # everything; the handler's level is what filters
    logger.propagate = False
    stream = io.StringIO()
    handler = SimpleHandler(stream, level, utc=True, json=json)
    handler.addFilter(_pin_time)
    logger.addHandler(handler)
    return Sink(logger, handler, stream)


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = _sink()
    yield s
    s.logger.removeHandler(s.handler)


@pytest.fixture
def json_sink() -> Iterator[Sink]:
    s = _sink(json=True)
    yield s
    s.logger.removeHandler(s.handler)


def _record(
    msg: str = "hello world", level: int = logging.INFO, **extra: object
) -> logging.LogRecord:
    record = logging.LogRecord("outrunner", level, __file__, 1, msg, None, None)
    record.created = FIXED
    record.__dict__.update(extra)
    return record


# --------------------------------------------------------------------------- ports of log_test.go


def test_simple_handler_output(sink: Sink) -> None:
    """Go: TestSimpleHandlerOutput."""
    sink.handler.handle(_record("hello world"))
    assert sink.text() == f"{FIXED_TEXT} INFO hello world\n"

    sink.reset()
    sink.bound().info("loaded", runners=3, file="config.yml")
    assert sink.text() == f"{FIXED_TEXT} INFO loaded runners=3 file=config.yml\n"


def test_simple_handler_level_filtering() -> None:
    """Go: TestSimpleHandlerLevelFiltering."""
    s = _sink(logging.WARNING)
    assert s.handler.level == logging.WARNING
    log = s.bound()
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    assert [line.split()[2:] for line in s.lines()] == [["WARN", "w"], ["ERROR", "e"]]
    # Level names work for the handler too, slog's "warn" included.
    assert SimpleHandler(io.StringIO(), "warn").level == logging.WARNING


def test_simple_handler_with_group(sink: Sink) -> None:
    """Go: TestSimpleHandlerWithGroup."""
    sink.bound().group("scaler").info("started", name="test-runner")
    assert "scaler.name=test-runner" in sink.text()


def test_simple_handler_nested_groups(sink: Sink) -> None:
    """Go: TestSimpleHandlerNestedGroups."""
    sink.bound().group("docker").group("container").info("created", id="abc123")
    assert sink.text() == f"{FIXED_TEXT} INFO created docker.container.id=abc123\n"


def test_simple_handler_with_attrs(sink: Sink) -> None:
    """Go: TestSimpleHandlerWithAttrs."""
    log = sink.bound().bind(scaleSet="linux")
    log.info("ready")
    log.info("second")
    assert sink.lines() == [
        f"{FIXED_TEXT} INFO ready scaleSet=linux",
        f"{FIXED_TEXT} INFO second scaleSet=linux",
    ]


def test_simple_handler_empty_attr(sink: Sink) -> None:
    """Go: TestSimpleHandlerEmptyAttr (empty and None keys are skipped, no double space)."""
    sink.handler.handle(_record("test", attrs={"": "x", None: "y", "key": "val"}))
    assert sink.text() == f"{FIXED_TEXT} INFO test key=val\n"
    assert "  " not in sink.text()


# --------------------------------------------------------------------------- text format


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("plain", "plain"),
        ("path/to-file_1.yml", "path/to-file_1.yml"),
        ("naïve", "naïve"),
        ("back\\slash", "back\\slash"),
        ("", '""'),
        ("two words", '"two words"'),
        ("a=b", '"a=b"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("line\nbreak", '"line\\nbreak"'),
        ("tab\there", '"tab\\there"'),
        ("bidi\u202eoverride", '"bidi\\u202eoverride"'),
        ("sep\u2028arator", '"sep\\u2028arator"'),
        (None, "null"),
        (True, "true"),
        (False, "false"),
        (3, "3"),
        (1.5, "1.5"),
        (["a", "b"], "\"['a', 'b']\""),
    ],
)
def test_text_value_quoting(sink: Sink, value: object, shown: str) -> None:
    sink.bound().info("m", v=value)
    assert sink.text() == f"{FIXED_TEXT} INFO m v={shown}\n"
    if shown.startswith('"'):
        # A quoted value is a JSON string literal, so a reader gets the exact string back.
        assert json.loads(shown) == (value if isinstance(value, str) else str(value))


def test_text_lines_split_unambiguously(sink: Sink) -> None:
    tricky = {"a": 'x" b=c', "b": "", "c": "new\nline", "d": "ok"}
    sink.logger.info("m", extra={"attrs": tricky})
    (line,) = sink.lines()  # the newline in a value did not start a second line
    pairs = re.findall(r' (\w+)=("(?:[^"\\]|\\.)*"|\S*)', line)
    parsed = {k: json.loads(v) if v.startswith('"') else v for k, v in pairs}
    assert parsed == tricky


def test_text_keys_are_quoted_when_needed(sink: Sink) -> None:
    sink.handler.handle(_record("m", attrs={"my key": 1}))
    assert sink.text() == f'{FIXED_TEXT} INFO m "my key"=1\n'


def test_text_empty_message_has_no_double_space(sink: Sink) -> None:
    sink.bound().info("", k="v")
    assert sink.text() == f"{FIXED_TEXT} INFO k=v\n"


@pytest.mark.parametrize(
    ("level", "label"),
    [
        (logging.DEBUG, "DEBUG"),
        (logging.INFO, "INFO"),
        (logging.WARNING, "WARN"),
        (logging.ERROR, "ERROR"),
        (logging.CRITICAL, "CRITICAL"),
        (25, "INFO+5"),
        (5, "DEBUG-5"),
        (45, "ERROR+5"),
    ],
)
def test_level_labels(level: int, label: str) -> None:
    s = _sink(0)
    s.bound().log(level, "m")
    assert s.text() == f"{FIXED_TEXT} {label} m\n"


def test_registered_level_name_is_used() -> None:
    s = _sink(0)
    logging.addLevelName(7, "TRACE")
    try:
        s.bound().log(7, "m")
    finally:
        logging.addLevelName(7, "Level 7")
    assert s.text() == f"{FIXED_TEXT} TRACE m\n"


def test_local_time_by_default() -> None:
    handler = SimpleHandler(io.StringIO())
    line = handler.format(_record("m"))
    local = datetime.fromtimestamp(FIXED).strftime("%Y-%m-%d %H:%M:%S")
    assert line == f"{local} INFO m"


def test_exception_traceback_follows_the_line(sink: Sink) -> None:
    log = sink.bound()
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("failed", step="start")
    lines = sink.lines()
    assert lines[0] == f"{FIXED_TEXT} ERROR failed step=start"
    assert lines[1] == "Traceback (most recent call last):"
    assert lines[-1] == "RuntimeError: boom"


def test_exc_info_on_other_levels_and_stack_info(sink: Sink) -> None:
    log = sink.bound()
    log.warning("w", exc_info=ValueError("bad"))
    assert sink.lines() == [f"{FIXED_TEXT} WARN w", "ValueError: bad"]
    sink.reset()
    sink.logger.info("s", stack_info=True)
    assert sink.lines()[1] == "Stack (most recent call last):"


def test_unprintable_value_does_not_lose_the_line(sink: Sink) -> None:
    class Broken:
        def __str__(self) -> str:
            raise RuntimeError("no")

    sink.bound().info("m", obj=Broken())
    assert sink.text() == f'{FIXED_TEXT} INFO m obj="<unprintable Broken: RuntimeError>"\n'


def test_concurrent_writes_never_interleave(sink: Sink) -> None:
    log = sink.bound()

    def work(n: int) -> None:
        for i in range(200):
            log.info("tick", worker=n, i=i, pad="x" * 50)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = sink.lines()
    assert len(lines) == 1600
    pattern = re.compile(rf"{FIXED_TEXT} INFO tick worker=\d i=\d+ pad=x{{50}}")
    assert all(pattern.fullmatch(line) for line in lines)


# --------------------------------------------------------------------------- BoundLogger


def test_bound_then_group_ordering(sink: Sink, json_sink: Sink) -> None:
    """slog order: bound attrs first; attrs bound before a group stay unprefixed."""
    for s in (sink, json_sink):
        s.bound(a=1).group("g").bind(b=2).group("h").info("m", c=3)
    assert sink.text() == f"{FIXED_TEXT} INFO m a=1 g.b=2 g.h.c=3\n"
    (obj,) = json_sink.json_lines()
    assert obj["a"] == 1
    assert obj["g"] == {"b": 2, "h": {"c": 3}}
    assert list(obj) == ["time", "level", "msg", "logger", "a", "g"]


def test_record_attr_replaces_bound_attr_in_place(sink: Sink) -> None:
    sink.bound(a=1, b=2).info("m", a=9, c=3)
    assert sink.text() == f"{FIXED_TEXT} INFO m a=9 b=2 c=3\n"


def test_group_without_attrs_prints_nothing(sink: Sink) -> None:
    sink.bound(a=1).group("empty").info("m")
    assert sink.text() == f"{FIXED_TEXT} INFO m a=1\n"


def test_bind_and_group_do_not_change_the_parent(sink: Sink) -> None:
    parent = sink.bound(a=1)
    parent.group("g").bind(b=2).info("child")
    parent.bind(c=3).info("sibling")
    parent.info("parent")
    assert sink.lines() == [
        f"{FIXED_TEXT} INFO child a=1 g.b=2",
        f"{FIXED_TEXT} INFO sibling a=1 c=3",
        f"{FIXED_TEXT} INFO parent a=1",
    ]
    assert parent.group("") is parent
    assert parent.bind() is parent


def test_msg_is_not_percent_formatted_and_reserved_names_are_free(sink: Sink) -> None:
    # "msg" and "name" are ordinary attribute names: msg is positional-only.
    sink.bound().info("100% done %s", msg="x", name="runner-1")
    assert sink.text() == f"{FIXED_TEXT} INFO 100% done %s msg=x name=runner-1\n"


def test_record_points_at_the_caller(sink: Sink) -> None:
    records: list[logging.LogRecord] = []

    def keep(record: logging.LogRecord) -> bool:
        records.append(record)
        return True

    sink.handler.addFilter(keep)
    sink.bound().info("m")
    assert records[0].funcName == "test_record_points_at_the_caller"
    assert records[0].pathname == __file__


def test_every_method_points_at_its_caller_and_takes_exc_info_as_logging_does(
    sink: Sink,
) -> None:
    records: list[logging.LogRecord] = []

    def keep(record: logging.LogRecord) -> bool:
        records.append(record)
        return True

    sink.handler.addFilter(keep)
    sink.logger.setLevel(logging.DEBUG)
    sink.handler.setLevel(logging.DEBUG)
    log = sink.bound()
    error = ValueError("bad")
    here = inspect.currentframe()
    assert here is not None
    line = here.f_lineno
    log.debug("d")
    log.info("i", exc_info=False)
    log.warning("w", exc_info=(ValueError, error, None))
    log.error("e", exc_info=error)
    log.log(logging.INFO, "l")
    try:
        raise error
    except ValueError:
        log.exception("x")
    assert [r.lineno for r in records[:5]] == [line + n for n in range(1, 6)]
    assert {r.funcName for r in records} == {
        "test_every_method_points_at_its_caller_and_takes_exc_info_as_logging_does"
    }
    assert [bool(r.exc_info) for r in records] == [False, False, True, True, False, True]
    assert records[2].exc_info == (ValueError, error, None)
    assert records[3].exc_info == (ValueError, error, None)  # not raised yet then
    assert records[5].exc_info is not None
    assert records[5].exc_info[1] is error
    # A disabled logger, as logging's own, emits nothing.
    sink.logger.disabled = True
    try:
        log.info("gone")
    finally:
        sink.logger.disabled = False
    assert [r.getMessage() for r in records][-1] == "x"


def test_disabled_level_is_cheap() -> None:
    s = _sink()
    s.logger.setLevel(logging.INFO)

    class Explosive:
        def __str__(self) -> str:
            raise AssertionError("formatted although DEBUG is disabled")

        __repr__ = __str__

    log = s.bound().bind(ok=1).group("g")
    with mock.patch.object(s.logger, "makeRecord", wraps=s.logger.makeRecord) as make:
        log.debug("hidden", bomb=Explosive())
        assert not make.called  # not even a LogRecord was built
        log.info("shown")
        assert make.call_count == 1
    assert s.lines() == [f"{FIXED_TEXT} INFO shown ok=1"]
    assert not log.is_enabled_for(logging.DEBUG)
    assert log.is_enabled_for(logging.INFO)


def test_get_logger_and_properties() -> None:
    log = get_logger(service="x")
    assert log.logger is logging.getLogger("outrunner")
    assert log.name == "outrunner"
    assert get_logger("outrunner.scaler", name="n").logger.name == "outrunner.scaler"
    assert "service" in repr(log)


def test_record_attrs_convention_with_plain_stdlib(sink: Sink) -> None:
    """outrunner.scaleset logs structured attributes without importing outrunner.log."""
    sink.logger.info("session", extra={"attrs": {"id": 7, "scale_set": {"name": "linux"}}})
    assert sink.text() == f"{FIXED_TEXT} INFO session id=7 scale_set.name=linux\n"


def test_third_party_record_prints_just_the_message(sink: Sink, json_sink: Sink) -> None:
    for s in (sink, json_sink):
        s.logger.warning("connection %s to %s", "reset", "api.github.com")
    assert sink.text() == f"{FIXED_TEXT} WARN connection reset to api.github.com\n"
    (obj,) = json_sink.json_lines()
    assert set(obj) == {"time", "level", "msg", "logger"}
    assert obj["msg"] == "connection reset to api.github.com"


def test_foreign_attrs_shape_is_not_lost(sink: Sink) -> None:
    sink.logger.info("m", extra={"attrs": ["a", "b"]})
    assert sink.text() == f"{FIXED_TEXT} INFO m attrs=\"['a', 'b']\"\n"


# --------------------------------------------------------------------------- JSON format


def test_json_output(json_sink: Sink) -> None:
    log = json_sink.bound(scale_set="linux")
    log.info("loaded", runners=3, file="config.yml", ok=True, none=None, labels=["a", "b"])
    log.group("docker").warning("gone", ratio=float("nan"), obj=object)
    first, second = json_sink.json_lines()
    assert first == {
        "time": "2026-03-30T14:05:09.000Z",
        "level": "INFO",
        "msg": "loaded",
        "logger": json_sink.logger.name,
        "scale_set": "linux",
        "runners": 3,
        "file": "config.yml",
        "ok": True,
        "none": None,
        "labels": ["a", "b"],
    }
    assert second["level"] == "WARN"
    assert second["docker"] == {"ratio": "nan", "obj": "<class 'object'>"}


def test_json_attr_cannot_overwrite_fields(json_sink: Sink) -> None:
    json_sink.bound().info("real", level="fake", time="t", msg="m2")
    (obj,) = json_sink.json_lines()
    assert (obj["msg"], obj["level"]) == ("real", "INFO")
    assert (obj["_level"], obj["_time"], obj["_msg"]) == ("fake", "t", "m2")


def test_json_exception_and_dotted_keys(json_sink: Sink) -> None:
    try:
        raise KeyError("k")
    except KeyError:
        json_sink.logger.exception("x", extra={"attrs": {"a.b": 1, "": 2, "g": {}}})
    (obj,) = json_sink.json_lines()
    assert obj["a.b"] == 1  # dotted keys are kept, not split into groups
    assert "g" not in obj  # empty groups are omitted, as in slog
    assert "" not in obj
    assert isinstance(obj["exc"], str)
    assert obj["exc"].startswith("Traceback (most recent call last):")
    assert obj["exc"].endswith("KeyError: 'k'")


def test_json_local_time_has_offset() -> None:
    out = JsonFormatter().format(_record("m"))
    stamp = json.loads(out)["time"]
    parsed = datetime.fromisoformat(stamp)
    assert parsed.tzinfo is not None
    assert parsed.timestamp() == FIXED


# --------------------------------------------------------------------------- redaction

TOKEN = "ghp_abcdefghijklmnop0123456789"


def test_redaction_in_text_output(sink: Sink) -> None:
    with registered_secrets(TOKEN):
        log = sink.bound(auth=f"Bearer {TOKEN}")
        log.info(f"token is {TOKEN}", token=TOKEN, nested={"t": TOKEN})
    assert TOKEN not in sink.text()
    assert sink.text() == (
        f'{FIXED_TEXT} INFO token is *** auth="Bearer ***" token=*** nested.t=***\n'
    )
    sink.reset()
    sink.bound().info("after", token=TOKEN)  # unregistered on leaving the block
    assert TOKEN in sink.text()


def test_redaction_in_json_output(json_sink: Sink) -> None:
    with registered_secrets(TOKEN):
        try:
            raise PermissionError(f"bad credentials {TOKEN}")
        except PermissionError:
            json_sink.bound(g={"t": TOKEN}).exception(TOKEN, items=[TOKEN], tok=TOKEN)
    raw = json_sink.text()
    assert TOKEN not in raw
    (obj,) = json_sink.json_lines()
    assert obj["msg"] == "***"
    assert obj["tok"] == "***"
    assert obj["items"] == ["***"]
    assert obj["g"] == {"t": "***"}
    assert isinstance(obj["exc"], str)
    assert obj["exc"].endswith("PermissionError: bad credentials ***")


def test_redaction_in_exception_text(sink: Sink) -> None:
    with registered_secrets(TOKEN):
        try:
            raise RuntimeError(f"request failed with {TOKEN}")
        except RuntimeError:
            sink.bound().exception("failed")
    assert TOKEN not in sink.text()
    assert sink.lines()[-1] == "RuntimeError: request failed with ***"


def test_redaction_of_multiline_secret_even_in_repr(sink: Sink) -> None:
    pem = (
        "-----BEGIN RSA PRIVATE KEY-----\n"
        "MIIEpAIBAAKCAQEA0abc\nq1w2e3r4t5y6\n"
        "-----END RSA PRIVATE KEY-----\n"
    )
    with registered_secrets(pem):
        sink.bound().info("cfg", key=pem, cfg=repr({"key": pem}))
    out = sink.text()
    for line in pem.splitlines():
        assert line not in out
    assert "MII" not in out


def test_redactor_rules() -> None:
    r = Redactor()
    assert r.redact("abc") == "abc"
    r.register("abc")  # shorter than four characters: would mask noise, ignored
    assert r.redact("abc") == "abc"
    assert len(r) == 0

    r.register("secret")
    r.register("secret-long")
    assert r.redact("x secret-long secret y") == "x *** *** y"  # longest wins on overlap
    assert r.redact("a.b*c") == "a.b*c"  # secrets are literals, not regexes

    r.register("secret")  # reference counted: needs two unregisters
    assert len(r) == 2
    r.unregister("secret")
    assert r.redact("secret") == "***"
    r.unregister("secret")
    assert r.redact("secret") == "secret"
    r.unregister("never-registered")
    r.unregister("secret-long")
    assert len(r) == 0
    assert r.redact("x secret-long y") == "x secret-long y"


def test_overlapping_secrets_are_masked_as_their_union() -> None:
    r = Redactor()
    r.register("abcdef")
    r.register("xxabc")
    # A regex alternation would mask "xxabc" and leave "def" of the other secret.
    assert r.redact("1 xxabcdef 2") == "1 *** 2"
    assert r.redact("abcdefabcdef") == "******"  # adjacent matches: one mask each
    r.register("aaaa")
    assert r.redact("aaaaaa!") == "***!"  # overlapping occurrences of one secret
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJpc3MiOiIxIn0.c2ln"
    r.register("c2ln-tail")
    assert r.redact(f"{jwt}-tail end") == "*** end"  # a shape and a registered secret


def test_formatter_takes_its_own_redactor() -> None:
    mine = Redactor()
    mine.register("hunter2!")
    line = TextFormatter(utc=True, redactor=mine).format(_record("pw hunter2!"))
    assert line == f"{FIXED_TEXT} INFO pw ***"


def test_module_level_register_and_unregister() -> None:
    register_secret("module-secret")
    try:
        assert redact("a module-secret b") == "a *** b"
    finally:
        unregister_secret("module-secret")
    assert redact("a module-secret b") == "a module-secret b"


# --------------------------------------------------------------------------- configure_logging


@pytest.fixture
def outrunner_logger() -> Iterator[logging.Logger]:
    logger = logging.getLogger("outrunner")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield logger
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


def test_configure_logging_is_idempotent(outrunner_logger: logging.Logger) -> None:
    foreign = logging.NullHandler()
    outrunner_logger.addHandler(foreign)
    first, second = io.StringIO(), io.StringIO()
    configure_logging("debug", stream=first)
    handler = configure_logging("INFO", stream=second)
    assert isinstance(handler, SimpleHandler)
    # Filter by type: pytest attaches its own capture handlers to some loggers.
    assert [h for h in outrunner_logger.handlers if isinstance(h, SimpleHandler)] == [handler]
    assert foreign in outrunner_logger.handlers  # someone else's handler is left alone
    assert outrunner_logger.level == logging.INFO

    get_logger("outrunner.test").info("once", n=1)
    get_logger("outrunner.test").debug("filtered")
    assert first.getvalue() == ""
    assert second.getvalue().count("\n") == 1
    assert second.getvalue().endswith(" INFO once n=1\n")


def test_configure_logging_json(outrunner_logger: logging.Logger) -> None:
    stream = io.StringIO()
    configure_logging("warn", "json", stream)
    get_logger().warning("w", k="v")
    obj = json.loads(stream.getvalue())
    assert (obj["level"], obj["msg"], obj["k"], obj["logger"]) == ("WARN", "w", "v", "outrunner")
    assert outrunner_logger.propagate is True  # left at the default


def test_configure_logging_defaults_to_stderr(
    outrunner_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    handler = configure_logging()
    assert isinstance(handler, SimpleHandler)
    assert handler.stream is sys.stderr
    get_logger().info("to stderr")
    assert "INFO to stderr" in capsys.readouterr().err


def test_configure_logging_rejects_bad_values(outrunner_logger: logging.Logger) -> None:
    before = list(outrunner_logger.handlers)
    with pytest.raises(ValueError, match="'verbose'"):
        configure_logging("verbose")
    with pytest.raises(ValueError, match="'xml'"):
        configure_logging("info", "xml")  # type: ignore[arg-type]
    assert outrunner_logger.handlers == before  # a bad call changes nothing


@pytest.mark.parametrize(
    ("name", "level"),
    [
        ("debug", logging.DEBUG),
        ("Info", logging.INFO),
        ("WARN", logging.WARNING),
        ("warning", logging.WARNING),
        (" error ", logging.ERROR),
        ("critical", logging.CRITICAL),
        (15, 15),
    ],
)
def test_parse_level(name: str | int, level: int) -> None:
    assert parse_level(name) == level


@pytest.mark.parametrize("bad", ["", "trace", "10", -1, True])
def test_parse_level_rejects(bad: str | int) -> None:
    with pytest.raises(ValueError, match="invalid log level"):
        parse_level(bad)
