"""
The gateway's own HTTP access log (``[gateway] access_log``): its lines are
the lines twistd's text observer and the JSON observer write for the access
event, it writes them in batches, and a forwarder using it emits no event.
"""

from __future__ import annotations

import io
import json
import os
import socket

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.logger import (
    FileLogObserver,
    Logger,
    LogLevel,
    LogPublisher,
    capturedLogs,
    formatEventAsClassicLogText,
    jsonFileLogObserver,
    textFileLogObserver,
)

from zope.interface import implementer

from twisted_gateway import _compat, access_log, logs
from twisted_gateway.access_log import (
    ACCESS_FORMAT,
    FLUSH_BYTES,
    FLUSH_SECONDS,
    NAMESPACE,
    SESSION_FORMAT,
    AccessLogWriter,
    access_event,
    classic_line,
    emit,
    emit_session,
    flattened,
    is_access_event,
    json_event_line,
    json_line,
    session_event,
    session_json_line,
    speed_up_text_observers,
    text_line,
)
from twisted_gateway.config import ConfigError, GatewaySettings, load_settings, parse_config
from twisted_gateway.http_proxy import emit_access_event
from twisted_gateway.logs import event_as_json

from tests.support import settle
from tests.test_http_proxy import Echo, Gateway

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"

FIELDS = [
    dict(method="GET", path="/x", query="", target="/x", route="echo", upstream="http://127.0.0.1:8000",
         peer="127.0.0.1"),
    dict(method="POST", path="/a/b", query="token=REDACTED&x=1", target="/a/b?token=REDACTED&x=1",
         route="api", upstream="https://api.internal", peer="2001:db8::1"),
    # a credential in the path: only the JSON observer redacts it, and so does the JSON line
    dict(method="GET", path=f"/t/{JWT}", query="", target=f"/t/{JWT}", route="r", upstream="http://u",
         peer="10.0.0.1"),
    dict(method="GET", path="/é\"\\", query="a=%22", target="/é\"\\?a=%22", route="r", upstream="http://u",
         peer="10.0.0.1"),
    dict(method="GET", path="/bearer", query="q=Bearer%20abcdefghijk", target="/bearer?q=Bearer%20abcdefghijk",
         route="r", upstream="http://u", peer="10.0.0.1"),
    # a plain request, but a route, upstream or method to escape or redact
    dict(method="GET", path="/x", query="", target="/x", route='r"\\', upstream=f"http://u/{JWT}", peer="10.0.0.1"),
    dict(method="GÉT", path="/x", query="", target="/x", route="r", upstream="http://u/?a=1", peer="10.0.0.1"),
]
#: status, bytes, the duration in microseconds, outcome
OUTCOMES = [(200, 64, 12346, "ok"), (502, 0, 1500000, "error"), (499, 0, 0, "client_gone")]
#: When a request ended (its line's time stamp)
WHEN = 1.5e9 + 0.25


def _event(fields: dict, status: int, sent: int, micros: int, outcome: str) -> dict:
    with capturedLogs() as events:
        emit_access_event(dict(fields), status, sent, micros, outcome)
    [event] = events
    return event


@pytest.mark.parametrize("fields", FIELDS)
@pytest.mark.parametrize("outcome", OUTCOMES)
def test_the_text_line_is_twistds_text_observers_line_for_the_event(fields, outcome):
    event = _event(fields, *outcome)
    written = io.StringIO()
    textFileLogObserver(written)(event)
    assert text_line(event["log_time"], fields, *outcome) == written.getvalue()


@pytest.mark.parametrize("fields", FIELDS)
@pytest.mark.parametrize("outcome", OUTCOMES)
def test_the_json_line_is_the_json_observers_line_for_the_event(fields, outcome):
    event = _event(fields, *outcome)
    line = json_line(event["log_time"], fields, *outcome)
    assert line == event_as_json(event) + "\n"
    assert JWT not in line


@pytest.mark.parametrize(
    "micros",
    [1, 50, 99, 100, 101, 999, 1000, 1234, 1500, 12500, 12501, 12499, 120000, 999499, 999500, 999501, 999999,
     1000000, 1000500, 61234567, 10**15, -1, -1500],
)
def test_a_durations_lines_write_the_events_seconds_as_the_observers_do(micros):
    """Under a second from tables, else from the float: the observers' ``repr`` and ``.3f`` either way."""
    event = _event(FIELDS[0], 200, 64, micros, "ok")
    assert event["duration"] == micros / 1e6
    written = io.StringIO()
    textFileLogObserver(written)(event)
    assert text_line(event["log_time"], FIELDS[0], 200, 64, micros, "ok") == written.getvalue()
    assert json_line(event["log_time"], FIELDS[0], 200, 64, micros, "ok") == event_as_json(event) + "\n"
    assert json_event_line(event) == event_as_json(event) + "\n"


@pytest.mark.parametrize("when", [0.0, 1e9 + 0.9999994, 1e9 + 0.9999996, 1e9 + 1.0, 1.5e9 + 0.25, 1e9 + 0.5])
def test_the_json_lines_time_stamp_is_the_observers_in_any_order_of_seconds(when):
    """A line of another second than the last one's, or one rounded up to the next second, has its own."""
    for stamp in (when, when - 1.0, when, when + 0.5):
        event = _event(FIELDS[0], *OUTCOMES[0])
        event["log_time"] = stamp
        assert json_line(stamp, FIELDS[0], *OUTCOMES[0]) == event_as_json(event) + "\n"


def test_an_access_event_whose_duration_is_not_in_whole_microseconds_goes_the_general_way():
    event = access_event(Logger(namespace=NAMESPACE), FIELDS[0], 200, 64, 0.0123456789, "ok")
    assert json_event_line(event) is None
    written = io.StringIO()
    logs.JSONLinesObserver(written)(event)
    assert written.getvalue() == event_as_json(event) + "\n"
    assert json.loads(written.getvalue())["duration"] == 0.0123456789


def test_the_json_line_checks_a_method_route_upstream_and_peer_once_and_keeps_few_of_them(monkeypatch):
    """What those fields are (plain, or to escape or redact) is kept for a bounded number of sets of them."""
    monkeypatch.setattr(access_log, "STEADY_SETS", 3)
    monkeypatch.setattr(access_log, "_steady", {})
    for peer in ["10.0.0.1", "10.0.0.2", 'a"b', "10.0.0.1", "10.0.0.3", 'a"b']:
        fields = dict(FIELDS[0], peer=peer)
        event = _event(fields, *OUTCOMES[0])
        assert json_line(event["log_time"], fields, *OUTCOMES[0]) == event_as_json(event) + "\n"
        assert len(access_log._steady) <= 3


def test_the_json_line_keeps_few_plain_targets_and_checks_the_path_and_query_of_any_other(monkeypatch):
    """A target seen plain is not checked again only when it is the request's path, with no query."""
    monkeypatch.setattr(access_log, "STEADY_SETS", 3)
    monkeypatch.setattr(access_log, "_plain_targets", set())
    cases = [("/a", "", "/a"), ("/b", "", "/b"), ("/a", "", "/a"), ('/"', "", "/a"), ("/a", "token=x", "/a"),
             ("/c", "", "/c"), ("/d", "", "/d"), ("/a", "", "/a"), ("/e\\", "", "/e\\")]
    for path, query, target in cases:
        fields = dict(FIELDS[0], path=path, query=query, target=path if target == path else target)
        event = _event(fields, *OUTCOMES[0])
        assert json_line(event["log_time"], fields, *OUTCOMES[0]) == event_as_json(event) + "\n"
        assert len(access_log._plain_targets) <= 3
    assert "token=x" not in json_line(0.0, dict(FIELDS[0], query="token=x"), *OUTCOMES[0])


class Output:
    """A file the writer is given, read back from the start."""

    def __init__(self, path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        self.seen = 0

    def new(self) -> bytes:
        data = self.path.read_bytes()[self.seen :]
        self.seen += len(data)
        return data


def test_lines_are_written_together_a_second_after_the_first(tmp_path):
    out = Output(tmp_path / "access.log")
    clock = Clock()
    writer = AccessLogWriter(out.fd, "text", clock, owns_fd=True)
    writer.write(0.0, FIELDS[0], 200, 64, 10000, "ok")
    clock.advance(FLUSH_SECONDS / 2)
    writer.write(0.5, FIELDS[1], 201, 2, 20000, "ok")
    assert out.new() == b""
    clock.advance(FLUSH_SECONDS / 2)
    lines = out.new().decode().splitlines()
    assert [line.split("] ", 1)[1] for line in lines] == [
        "GET /x 200 64 0.010s http://127.0.0.1:8000",
        "POST /a/b?token=REDACTED&x=1 201 2 0.020s https://api.internal",
    ]
    assert clock.getDelayedCalls() == []
    writer.close()


def test_a_full_buffer_is_written_at_once_and_close_writes_the_rest(tmp_path):
    out = Output(tmp_path / "access.log")
    clock = Clock()
    writer = AccessLogWriter(out.fd, "json", clock, owns_fd=True)
    line = json_line(0.0, FIELDS[0], 200, 64, 10000, "ok")
    count = FLUSH_BYTES // len(line) + 1
    for _ in range(count):
        writer.write(0.0, FIELDS[0], 200, 64, 10000, "ok")
    assert out.new() == line.encode() * count
    writer.write(0.0, FIELDS[0], 200, 64, 10000, "ok")
    writer.close()
    assert out.new() == line.encode()
    assert clock.getDelayedCalls() == []
    writer.write(0.0, FIELDS[0], 200, 64, 10000, "ok")  # after close: dropped, no timer
    assert clock.getDelayedCalls() == []
    with pytest.raises(OSError):
        os.fstat(out.fd)  # owned by the writer: closed


def test_a_file_is_appended_to(tmp_path):
    path = tmp_path / "access.log"
    path.write_text("earlier\n")
    writer = AccessLogWriter.open(str(path), "text", Clock())
    writer.write(0.0, FIELDS[0], 200, 64, 10000, "ok")
    writer.close()
    earlier, line = path.read_text().splitlines()
    assert earlier == "earlier" and line.endswith("GET /x 200 64 0.010s http://127.0.0.1:8000")


ROUTE = "[route:a]\nprefix = /\nupstream = http://127.0.0.1:8000\n"


def test_config_keys_and_their_errors(tmp_path):
    assert (GatewaySettings().access_log, GatewaySettings().access_log_format) == ("events", "text")
    target = tmp_path / "a.log"
    settings = parse_config(f"[gateway]\naccess_log = {target}\naccess_log_format = json\n" + ROUTE).gateway
    assert (settings.access_log, settings.access_log_format) == (str(target), "json")
    for value in ("off", "stdout", "events"):
        assert parse_config(f"[gateway]\naccess_log = {value}\n" + ROUTE).gateway.access_log == value
    with pytest.raises(ConfigError, match=r"\[gateway\] access_log: the directory .*nowhere does not exist"):
        load_settings(parse_config(f"[gateway]\naccess_log = {tmp_path}/nowhere/a.log\n" + ROUTE))
    with pytest.raises(ConfigError, match=r"\[gateway\] access_log_format: expected one of text, json"):
        parse_config("[gateway]\naccess_log_format = xml\n" + ROUTE)


def _line_without_time(line: str) -> str:
    return line.split(" ", 1)[1]


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_forwarder_writing_its_own_lines_emits_no_event_and_writes_the_observers_line(tmp_path, fmt):
    raw = b"GET /a?token=s3cret&x=1 HTTP/1.1\r\nHost: gw\r\n\r\n"
    before = Gateway(Echo(), route_name="api")
    with capturedLogs() as events:
        before.request(raw)
    [event] = [e for e in events if e.get("log_namespace") == "twisted_gateway.access"]
    before.close()

    path = tmp_path / "access.log"
    gateway = Gateway(Echo(), GatewaySettings(access_log=str(path), access_log_format=fmt), route_name="api")
    with capturedLogs() as events:
        gateway.request(raw)
    assert [e for e in events if e.get("log_namespace") == "twisted_gateway.access"] == []
    gateway.close()  # writes what is buffered
    [line] = path.read_text().splitlines(keepends=True)
    assert "s3cret" not in line
    if fmt == "text":
        written = io.StringIO()
        textFileLogObserver(written)(event)
        assert _line_without_time(line) == _line_without_time(written.getvalue())
    else:
        ours, theirs = json.loads(line), json.loads(event_as_json(event))
        assert list(ours) == list(theirs)
        for key in ("time", "duration"):  # the clocks differ: wall time vs the test's clock
            ours.pop(key), theirs.pop(key)
        assert ours == theirs


def test_access_log_off_writes_nothing_and_emits_nothing():
    gateway = Gateway(Echo(), GatewaySettings(access_log="off"))
    with capturedLogs() as events:
        gateway.request(b"GET /a HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert [e for e in events if e.get("log_namespace") == "twisted_gateway.access"] == []
    gateway.close()


@pytest.mark.parametrize("label", [2, "supervisor"])
@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_workers_access_lines_say_which_worker_wrote_them_as_the_observers_do(monkeypatch, label, fmt):
    """With workers = N the gateway's own access lines name the worker, as the observers' lines do."""
    from twisted_gateway import logs

    monkeypatch.setattr(logs, "worker_label", label)
    event = _event(FIELDS[1], *OUTCOMES[0])
    logs.name_the_writer(event)
    if fmt == "text":
        written = io.StringIO()
        textFileLogObserver(written)(event)
        expected, line = written.getvalue(), text_line(event["log_time"], FIELDS[1], *OUTCOMES[0])
    else:
        expected, line = event_as_json(event) + "\n", json_line(event["log_time"], FIELDS[1], *OUTCOMES[0])
    assert line == expected
    assert (f"#info {logs.writer_name().strip()}]" in line) if fmt == "text" else (json.loads(line)["worker"] == label)


# -- the access event itself, and twistd's text observer ---------------------------------


def test_the_access_event_is_the_one_logger_info_emits():
    """Made directly, the event has the keys, values and order ``Logger.info`` gives it."""
    logger = Logger(namespace=NAMESPACE)
    with capturedLogs() as events:
        logger.info(ACCESS_FORMAT, status=200, bytes=64, duration=0.5, outcome="ok",
                    log_flattened=flattened(FIELDS[1], 200, 64, 0.5), **FIELDS[1])
    [expected] = events
    made = access_event(logger, FIELDS[1], 200, 64, 0.5, "ok")
    assert list(made) == list(expected)
    assert {**made, "log_time": 0} == {**expected, "log_time": 0}


EVENTS = [
    dict(log_format="plain {x}", x="a\nb", log_time=1.5e9 + 0.9999996, log_namespace="n", log_level=LogLevel.warn),
    dict(log_format="{x!r:>10}", x=[1], log_system="sys", log_time=12.25),
    dict(log_format="no time", log_namespace="n"),
    dict(log_format="broken {", log_time=1e9),
    dict(log_format=None),
    # the WebSocket session's line, and the forms of field its fast path takes or leaves to Twisted
    dict(log_format="websocket {route} {path} {peer} closed by {side} ({code}) after {duration:.3f}s",
         route="echo", path="/x\ny", peer="::1", side="client", code=None, duration=0.0125,
         log_time=1e9 + 0.5, log_namespace="twisted_gateway.access", log_level=LogLevel.info),
    dict(log_format="{{literal}} {a!s:>4}|{b:05d}|{c!r}", a=1, b=42, c="q", log_time=3.0, log_system=7),
    dict(log_format="{missing}", log_time=1e9),
    dict(log_format="{n:.2f}", n="not a number", log_time=1e9),
    dict(log_format="{x.real} {f()} {m[k]} {}", x=1, f=lambda: "called", m={"k": "v"}, log_time=1e9),
    dict(log_format="{x!a} {y:{w}}", x="é", y=1, w=3, log_time=1e9, log_level=LogLevel.error),
    dict(log_format="{x}", x="", log_time=1e9),
    dict(log_format="{x}", x="flat", log_flattened={"x!:": "other"}, log_time=1e9),
    dict(log_format=b"bytes {x}", x=1, log_time=1e9),
    dict(log_format="failed {x}", x=1, log_failure=Failure(ValueError("v")), log_time=1e9),
]


@pytest.mark.parametrize("event", EVENTS)
def test_classic_line_is_twistds_text_line_for_any_event(event):
    written = io.StringIO()
    textFileLogObserver(written)(dict(event))
    assert classic_line(dict(event)) == (written.getvalue() or None)


@pytest.mark.parametrize("fields", FIELDS)
@pytest.mark.parametrize("outcome", OUTCOMES)
@pytest.mark.parametrize("label", [None, 2])
def test_classic_line_is_twistds_text_line_for_the_access_event(monkeypatch, fields, outcome, label):
    """Also once ``name_the_writer`` has added the worker (or found none to add)."""
    monkeypatch.setattr(logs, "worker_label", label)
    event = _event(fields, *outcome)
    logs.name_the_writer(event)
    written = io.StringIO()
    textFileLogObserver(written)(dict(event))
    assert classic_line(event) == written.getvalue()


@pytest.mark.parametrize("fields", FIELDS)
@pytest.mark.parametrize("label", [None, "supervisor"])
def test_the_json_observer_writes_the_same_line_for_the_access_event_either_way(monkeypatch, fields, label):
    monkeypatch.setattr(logs, "worker_label", label)
    event = _event(fields, *OUTCOMES[0])
    logs.name_the_writer(event)
    assert json_event_line(event) is not None
    written = io.StringIO()
    logs.JSONLinesObserver(written)(event)
    assert written.getvalue() == logs.event_as_json(event) + "\n"
    assert JWT not in written.getvalue()


def test_an_access_event_something_added_to_goes_the_general_way():
    event = _event(FIELDS[0], *OUTCOMES[0])
    event["extra"] = "x"
    assert json_event_line(event) is None
    written = io.StringIO()
    logs.JSONLinesObserver(written)(event)
    assert json.loads(written.getvalue())["extra"] == "x"


def test_only_twistds_text_observers_are_sped_up():
    """The gateway changes how twistd's text lines are made, never what they are, nor any other observer."""
    text, text_file = io.StringIO(), io.StringIO()
    observers = [
        textFileLogObserver(text),
        FileLogObserver(text_file, formatEventAsClassicLogText),
        textFileLogObserver(io.StringIO(), timeFormat="%H:%M"),
        jsonFileLogObserver(io.StringIO()),
        logs.JSONLinesObserver(io.StringIO()),
    ]
    assert speed_up_text_observers(observers) == 2
    assert [getattr(o, "formatEvent", None) is classic_line for o in observers] == [True, True, False, False, False]
    assert speed_up_text_observers(observers) == 0
    observers[0](_event(FIELDS[0], *OUTCOMES[0]))
    assert text.getvalue().endswith(" [twisted_gateway.access#info] GET /x 200 64 0.012s http://127.0.0.1:8000\n")


# -- the lines written without the event, when every observer is one whose line we write -----


def _observers(label_first: bool) -> tuple[list, io.StringIO, io.StringIO]:
    json_out, text_out = io.StringIO(), io.StringIO()
    text = textFileLogObserver(text_out)
    speed_up_text_observers([text])
    observers = [logs.JSONLinesObserver(json_out), text]
    return ([logs.name_the_writer] if label_first else []) + observers, json_out, text_out


@pytest.mark.parametrize("fields", FIELDS)
@pytest.mark.parametrize("label", [None, 2])
def test_observers_whose_lines_are_known_get_them_without_the_event(monkeypatch, fields, label):
    monkeypatch.setattr(logs, "worker_label", label)
    direct, json_direct, text_direct = _observers(label_first=True)
    events = []
    monkeypatch.setattr(access_log, "access_event", lambda *a: events.append(a) or {})
    for outcome in OUTCOMES:
        emit(Logger(namespace=NAMESPACE, observer=LogPublisher(*direct)), dict(fields), *outcome, WHEN)
    assert events == []  # no event made
    monkeypatch.undo()
    monkeypatch.setattr(logs, "worker_label", label)
    monkeypatch.setattr(access_log.time, "time", lambda: WHEN)  # the event's time
    by_event, json_event, text_event = _observers(label_first=True)
    publisher = LogPublisher(*by_event)
    for status, sent, micros, outcome in OUTCOMES:
        publisher(access_event(Logger(namespace=NAMESPACE), dict(fields), status, sent, micros / 1e6, outcome))
    assert json_direct.getvalue() == json_event.getvalue()
    assert text_direct.getvalue() == text_event.getvalue()
    assert JWT not in json_direct.getvalue()


def test_any_other_observer_makes_every_observer_get_the_event(monkeypatch):
    known, json_out, text_out = _observers(label_first=False)
    captured: list = []
    publisher = LogPublisher(*known)
    logger = Logger(namespace=NAMESPACE, observer=publisher)
    emit(logger, dict(FIELDS[0]), *OUTCOMES[0], WHEN)
    assert json_out.getvalue().count("\n") == text_out.getvalue().count("\n") == 1
    publisher.addObserver(captured.append)  # seen at the next event
    emit(logger, dict(FIELDS[0]), *OUTCOMES[0], WHEN)
    [event] = captured
    assert is_access_event(event)
    assert json_out.getvalue().splitlines()[1] == event_as_json(event)
    publisher.removeObserver(captured.append)
    emit(logger, dict(FIELDS[0]), *OUTCOMES[0], WHEN)
    assert len(captured) == 1 and json_out.getvalue().count("\n") == 3


def test_a_worker_label_unseen_by_a_text_observer_takes_the_event_way(monkeypatch):
    """``name_the_writer`` after twistd's observer (or none): its lines name no worker, as before."""
    monkeypatch.setattr(logs, "worker_label", 3)
    known, _, text_out = _observers(label_first=False)
    emit(Logger(namespace=NAMESPACE, observer=LogPublisher(*known, logs.name_the_writer)), dict(FIELDS[0]),
         *OUTCOMES[0], WHEN)
    assert "[twisted_gateway.access#info] GET /x" in text_out.getvalue()


def test_a_failing_observer_is_reported_to_the_others_which_still_get_their_lines():
    class Full(io.StringIO):
        def write(self, text: str) -> int:
            raise OSError("disk full")

    json_out = io.StringIO()
    text = FileLogObserver(Full(), classic_line)
    emit(Logger(namespace=NAMESPACE, observer=LogPublisher(text, logs.JSONLinesObserver(json_out))),
         dict(FIELDS[0]), *OUTCOMES[0], WHEN)
    lines = [json.loads(line) for line in json_out.getvalue().splitlines()]
    assert [line.get("status") for line in lines] == [None, 200]
    assert "failed on an access line" in lines[0]["message"] and "disk full" in lines[0]["traceback"]


#: A WebSocket session's values (route, path, peer, upstream, duration, side, code, reason,
#: messages and bytes each way), and whether its JSON line is written without the event
SESSIONS = [
    (("echo", "/x", "127.0.0.1", "ws://127.0.0.1:9000", 0.0125, "client", 1000, None, 1, 5, 2, 10), True),
    (("r", "/a/b", "::1", None, 12.000000001, "gateway", None, "keepalive", 0, 0, 0, 0), True),
    (("r", "/x", "10.0.0.1", "ws://u", 1234.5678, "upstream", 1011, "ping_timeout", 7, 70000, 3, 9), True),
    # a credential, an escape or a new line: the JSON observer redacts and escapes the event's fields
    (("r", f"/t/{JWT}", "10.0.0.1", "ws://u", 0.5, "client", 1000, None, 0, 0, 0, 0), False),
    (("r", '/é"\\\nq', "10.0.0.1", "ws://u", 0.5, "client", 1000, None, 0, 0, 0, 0), False),
    (("r", "/x", "10.0.0.1", "ws://u/?token=abc", 0.5, "client", 1000, None, 0, 0, 0, 0), False),
    (("bearer abcdefghijk", "/x", "10.0.0.1", "ws://u", 0.5, "client", 1000, None, 0, 0, 0, 0), False),
]


@pytest.mark.parametrize("values, direct", SESSIONS)
@pytest.mark.parametrize("label", [None, 2, "supervisor"])
def test_a_sessions_line_is_the_observers_line_for_its_event(monkeypatch, values, direct, label):
    """Written directly or through the event, the text and JSON observers write the same lines."""
    monkeypatch.setattr(logs, "worker_label", label)
    monkeypatch.setattr(access_log.time, "time", lambda: WHEN)  # the event's and the line's time
    made = []
    monkeypatch.setattr(access_log, "session_event", lambda *a: made.append(a) or session_event(*a))
    observers, json_direct, text_direct = _observers(label_first=True)
    emit_session(Logger(namespace=NAMESPACE, observer=LogPublisher(*observers)), values)
    assert len(made) == (0 if direct else 1)
    assert (session_json_line(WHEN, values) is not None) == direct
    observers, json_event, text_event = _observers(label_first=True)
    LogPublisher(*observers)(session_event(Logger(namespace=NAMESPACE), values, WHEN))
    assert json_direct.getvalue() == json_event.getvalue()
    assert text_direct.getvalue() == text_event.getvalue()
    assert text_direct.getvalue().count("\n") == 1 + text_direct.getvalue().count("\n\t")
    assert JWT not in json_direct.getvalue() and "abc" not in json_direct.getvalue()


def test_the_session_event_is_the_one_logger_info_emits_and_any_other_observer_gets_it():
    values = SESSIONS[0][0]
    captured: list = []
    logger = Logger(namespace=NAMESPACE, observer=LogPublisher(captured.append))
    logger.info(SESSION_FORMAT, **dict(zip(access_log.SESSION_FIELDS, values)), event="ws_session")
    emit_session(logger, values)
    [expected, made] = captured
    assert list(made) == list(expected)
    assert {**made, "log_time": 0} == {**expected, "log_time": 0}


class _Writes(io.StringIO):
    """A log file that keeps each ``write`` it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def _sped_up_text_observer(out: io.StringIO) -> FileLogObserver:
    text = textFileLogObserver(out)
    speed_up_text_observers([text])
    return text


@pytest.mark.parametrize("observer, access", [(_sped_up_text_observer, " GET /x 200 "),
                                              (logs.JSONLinesObserver, '"status":200')])
@pytest_twisted.ensureDeferred
async def test_lines_of_one_reactor_turn_go_out_in_one_write_and_in_order(observer, access):
    """
    While the reactor, dispatching plainly as the gateway's service has it,
    handles a poll's events on several descriptors, the access lines wait for
    the turn's end and go out in one write (a WebSocket session's line with
    them, in its place); another event's line comes after
    the lines held before it. A turn of one descriptor (requests one at a
    time), and no turn at all, write each line at once.
    """
    out = _Writes()
    logger = Logger(namespace=NAMESPACE, observer=LogPublisher(observer(out)))
    other = Logger(namespace="other", observer=logger.observer)
    assert _compat.dispatch_plainly(reactor)
    ours, theirs = socket.socketpair()
    idle_ours, idle_theirs = socket.socketpair()  # ready in the same poll, doing nothing

    @implementer(IReadDescriptor)
    class Readable:
        def __init__(self, sock: socket.socket, turn: bool) -> None:
            self.sock, self.turn = sock, turn

        def fileno(self) -> int:
            return self.sock.fileno()

        def doRead(self) -> None:
            for step in self.sock.recv(100).decode():
                if step == "a":
                    emit(logger, dict(FIELDS[0]), *OUTCOMES[0], WHEN)
                elif step == "b":
                    other.info("between")
                elif step == "s":
                    emit_session(logger, SESSIONS[0][0])
            if self.turn:  # nothing of this turn's end yet
                assert out.writes == [] or "between" in out.writes[-1]

        def connectionLost(self, reason: object) -> None:
            pass

        def logPrefix(self) -> str:
            return "readable"

    readers = [Readable(ours, True), Readable(idle_ours, False)]
    for reader in readers:
        reactor.addReader(reader)
    try:
        theirs.send(b"asa")
        idle_theirs.send(b"-")
        await settle(lambda: out.writes, "the first turn's write")
        assert [w.count(access) for w in out.writes] == [2]
        assert out.writes[0].index(access) < out.writes[0].index("closed by client") < out.writes[0].rindex(access)
        del out.writes[:]
        theirs.send(b"aba")
        idle_theirs.send(b"-")
        await settle(lambda: len(out.writes) == 3, "the second turn's three writes")
        assert [(w.count(access), "between" in w) for w in out.writes] == [(1, False), (0, True), (1, False)]
        del out.writes[:]
        readers[0].turn = False
        theirs.send(b"aa")
        await settle(lambda: len(out.writes) == 2, "a turn of one descriptor's two writes")
        assert [w.count(access) for w in out.writes] == [1, 1]
        del out.writes[:]
        emit(logger, dict(FIELDS[0]), *OUTCOMES[0], WHEN)
        assert len(out.writes) == 1
    finally:
        for reader in readers:
            reactor.removeReader(reader)
        for sock in (ours, theirs, idle_ours, idle_theirs):
            sock.close()
