"""
Logs: one JSON object per line with the event's fields, no token anywhere in
them or in the access log, and ``twistd --logger`` accepting the observer.
"""

from __future__ import annotations

import io
import json
import queue
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import ILogObserver, Logger
from twisted.web.iweb import IAccessLogFormatter
from twisted.web.server import Site
from twisted.web.resource import Resource

from twisted_gateway.logs import (
    REDACTED,
    JSONLinesObserver,
    access_log_formatter,
    event_as_json,
    json_observer,
    redact,
    redact_query,
    redact_text,
    secret_names,
    redacting_log_formatter,
)

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"

# -- redaction (pure) -----------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("/ws?token=abc", "/ws?token=REDACTED"),
        ("/ws?token=abc&room=1", "/ws?token=REDACTED&room=1"),
        ("/ws?room=1&token=abc", "/ws?room=1&token=REDACTED"),
        ('GET /ws?token=abc HTTP/1.1"', 'GET /ws?token=REDACTED HTTP/1.1"'),
        ("/ws?access_token=abc", "/ws?access_token=REDACTED"),
        ("/ws?TOKEN=abc", "/ws?TOKEN=REDACTED"),
        ("/ws?tok%65n=abc", "/ws?tok%65n=REDACTED"),  # the gateway decodes names too
        ("/ws?token=a;b=c", "/ws?token=REDACTED"),  # a ';' does not end a token value
        ("/login?next=/ws?token=abc", "/login?next=/ws?token=REDACTED"),
        ("/ws?token=", "/ws?token=REDACTED"),
        ("b'/ws?token=abc'", "b'/ws?token=REDACTED'"),
        ("cookie: session=" + JWT + "; theme=dark", "cookie: session=REDACTED; theme=dark"),
        ("Authorization: Bearer abcdefgh12345678", "Authorization: Bearer REDACTED"),
        ("no bearer token in the request", "no bearer token in the request"),
        ("/ws?tokens=5&room=1", "/ws?tokens=5&room=1"),
        ("nothing to see", "nothing to see"),
    ],
)
def test_redact_text_hides_token_values_and_keeps_the_rest(text: str, expected: str) -> None:
    assert redact_text(text) == expected
    assert redact_text(text.encode("latin-1")) == expected.encode("latin-1")


@pytest.mark.parametrize(
    "query, expected",
    [
        pytest.param(b"token=abc", "token=REDACTED", id="alone"),
        pytest.param(b"a=%20x&token=a.b.c&b", "a=%20x&token=REDACTED&b", id="others kept"),
        pytest.param(b"token=1&x=2&token=3", "token=REDACTED&x=2&token=REDACTED", id="every copy"),
        pytest.param(b"%74oken=abc", "%74oken=REDACTED", id="percent-encoded name"),
        pytest.param(b"x=1;token=abc", "x=1;token=REDACTED", id="behind a semicolon"),
        pytest.param(b"x=1;jwt=abc&y=2", "x=1;jwt=REDACTED&y=2", id="configured name"),
        pytest.param(b"sid=abc", "sid=REDACTED", id="configured cookie name"),
        pytest.param(b"mytoken=a&token_type=b", "mytoken=REDACTED&token_type=b", id="*token"),
        pytest.param(b"", "", id="empty query"),
    ],
)
def test_redact_query_is_the_one_rule_for_query_strings(query: bytes, expected: str) -> None:
    """Log lines show REDACTED for every credential parameter, and the rest as it came."""
    assert redact_query(query, ["jwt", "sid"]) == expected


def test_secret_names_are_the_configured_query_parameter_and_cookie() -> None:
    auth = SimpleNamespace(query_param="access_token", cookie="session")
    assert secret_names(auth) == ("access_token", "session")
    assert secret_names(SimpleNamespace(query_param="token", cookie=None)) == ("token",)
    assert secret_names(None) == ()


def test_redact_text_hides_extra_parameter_names_in_any_case() -> None:
    assert redact_text("/ws?Access=abc&x=1", ["access"]) == "/ws?Access=REDACTED&x=1"


def test_redact_text_stays_linear_on_long_hostile_input() -> None:
    """A megabyte of near-matches is processed (no catastrophic backtracking)."""
    for text in ("a" * 1_000_000, "eyJ" * 300_000, "x=" * 300_000):
        assert len(redact_text(text)) == len(text)


def test_redact_drops_sensitive_fields_and_cleans_strings() -> None:
    marker = object()
    event = {
        "log_format": "handshake for {path}",
        "path": b"/ws?token=abc",
        "authorization": "Bearer abcdefgh12345678",
        "Cookie": "session=abc",
        "token": "abc",
        "refresh_token": "abc",
        "headers": [(b"Authorization", b"Bearer xyz"), (b"Host", b"gw")],
        "nested": {"set-cookie": "a=b", "url": "/ws?token=abc", "items": ["?token=abc", 1]},
        "source": marker,
        "count": 3,
    }
    original = {key: value for key, value in event.items()}

    clean = redact(event)

    assert clean["path"] == b"/ws?token=REDACTED"
    assert clean["authorization"] == clean["Cookie"] == clean["token"] == REDACTED
    assert clean["refresh_token"] == REDACTED
    assert clean["headers"] == [(b"Authorization", b"REDACTED"), (b"Host", b"gw")]
    assert clean["nested"] == {
        "set-cookie": REDACTED,
        "url": "/ws?token=REDACTED",
        "items": ["?token=REDACTED", 1],
    }
    assert clean["source"] is marker and clean["count"] == 3
    assert event == original  # pure: the event itself is untouched


# -- JSON lines ------------------------------------------------------------------------


def _logged(emit) -> list[str]:
    """The lines a JSONLinesObserver writes for what ``emit(log)`` logs."""
    stream = io.StringIO()
    emit(Logger(namespace="gateway.test", observer=JSONLinesObserver(stream)))
    text = stream.getvalue()
    assert text.endswith("\n")
    return text.splitlines()


def test_each_event_is_one_json_object_per_line_with_its_fields() -> None:
    lines = _logged(
        lambda log: (
            log.info("route {route} listening on port {port}", route="chat", port=8080),
            log.warn("two\nlines {n}", n=2),
        )
    )
    assert len(lines) == 2
    assert not any("\x1e" in line for line in lines)
    first, second = (json.loads(line) for line in lines)
    assert first["message"] == "route chat listening on port 8080"
    assert first["route"] == "chat" and first["port"] == 8080
    assert first["level"] == "info" and first["namespace"] == "gateway.test"
    assert datetime.fromisoformat(first["time"].replace("Z", "+00:00")).tzinfo is not None
    assert second["message"] == "two\nlines 2" and second["level"] == "warn"


def test_values_json_cannot_hold_are_written_as_their_repr() -> None:
    class Thing:
        def __repr__(self) -> str:
            return "<Thing uri=/ws?token=abc at 0x1>"

    (line,) = _logged(
        lambda log: log.info("x", raw=b"bytes", thing=Thing(), nan=float("nan"), pair=(1, "a"))
    )
    event = json.loads(line)
    assert event["raw"] == "b'bytes'"
    assert event["thing"] == "<Thing uri=/ws?token=REDACTED at 0x1>"
    assert event["nan"] == "nan"
    assert event["pair"] == [1, "a"]


def test_tokens_are_redacted_in_fields_and_in_the_message() -> None:
    (line,) = _logged(
        lambda log: log.info(
            "upgrade {uri} with {authorization}",
            uri="/ws?room=1&token=" + JWT,
            authorization="Bearer " + JWT,
            cookie="session=" + JWT,
        )
    )
    assert JWT not in line
    event = json.loads(line)
    assert event["message"] == "upgrade /ws?room=1&token=REDACTED with REDACTED"
    assert event["authorization"] == event["cookie"] == REDACTED


def test_a_failure_event_carries_a_traceback_string() -> None:
    def emit(log: Logger) -> None:
        try:
            raise ValueError("upstream said /ws?token=abc")
        except ValueError:
            log.failure("relay failed on {route}", route="chat")

    (line,) = _logged(emit)
    event = json.loads(line)
    assert event["message"] == "relay failed on chat"
    assert event["level"] == "critical"
    assert isinstance(event["traceback"], str)
    assert "Traceback" in event["traceback"] and "ValueError" in event["traceback"]
    assert "token=REDACTED" in event["traceback"] and "token=abc" not in line
    assert "log_failure" not in event


def test_an_event_that_cannot_be_rendered_still_gives_a_json_line() -> None:
    class Exploding(dict):
        def items(self):
            raise RuntimeError("no")

    stream = io.StringIO()
    JSONLinesObserver(stream)(Exploding(log_format="x"))
    event = json.loads(stream.getvalue())
    assert event["level"] == "error"


def test_event_as_json_fills_in_an_event_without_twisted_keys() -> None:
    event = json.loads(event_as_json({"log_format": "plain {x}", "x": 1}))
    assert event["message"] == "plain 1" and event["level"] == "info" and event["namespace"] == ""


@pytest.mark.parametrize("label", [None, 0, 3, "supervisor"])
def test_each_json_line_says_which_worker_wrote_it(monkeypatch, label) -> None:
    """With workers = N every line carries ``worker``; an event's own ``worker`` key cannot hide it."""
    from twisted_gateway import logs

    monkeypatch.setattr(logs, "worker_label", label)
    event = json.loads(event_as_json({"log_format": "slot {slot}", "slot": 1, "worker": "other"}))
    assert event.get("worker", "other") == ("other" if label is None else label)


def test_a_flattened_credential_field_stays_out_of_the_json_message() -> None:
    """A field formatted ahead (``log_flattened``) is redacted by its name like the field itself."""
    event = json.loads(
        event_as_json(
            {"log_format": "t={token}", "token": "s3cret", "log_flattened": {"token!s:": "s3cret"}}
        )
    )
    assert event["message"] == "t=REDACTED" and event["token"] == "REDACTED"


@pytest.mark.parametrize(
    "stamp", [0.0, 1.5, 1733330000.9999996, 1733330000.0000004, 1494590098.4556055, -0.25]
)
def test_json_time_is_the_utc_instant_to_the_microsecond(stamp: float) -> None:
    expected = datetime.fromtimestamp(stamp, tz=timezone.utc).isoformat(timespec="microseconds")
    event = json.loads(event_as_json({"log_format": "x", "log_time": stamp}))
    assert event["time"] == expected.replace("+00:00", "Z")


def test_json_observer_is_a_factory_of_an_observer_writing_to_stdout(monkeypatch) -> None:
    """twistd's ``--logger`` calls the named object with no arguments."""
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stdout", stream)
    observer = json_observer()
    assert ILogObserver.providedBy(observer)
    observer({"log_format": "hello", "log_namespace": "n"})
    assert json.loads(stream.getvalue())["message"] == "hello"


# -- access log ----------------------------------------------------------------------


class _Ok(Resource):
    isLeaf = True

    def render_GET(self, request) -> bytes:
        return b"ok"


def _access_log_line(formatter, request_bytes: bytes) -> str:
    clock = MemoryReactorClock()
    site = Site(_Ok(), logFormatter=formatter, reactor=clock)
    site.startFactory()
    log_file = io.StringIO()
    site.logFile = log_file
    try:
        peer = IPv4Address("TCP", "127.0.0.1", 40000)
        channel = site.buildProtocol(peer)
        channel.makeConnection(StringTransport(peerAddress=peer))
        channel.dataReceived(request_bytes)
        channel.connectionLost(None)
        return log_file.getvalue()
    finally:
        site.stopFactory()  # closes the StringIO, read already


def test_the_access_log_keeps_the_combined_format_without_the_token() -> None:
    assert IAccessLogFormatter.providedBy(redacting_log_formatter)
    line = _access_log_line(
        redacting_log_formatter,
        b"GET /v1/chat?room=1&token=" + JWT.encode() + b" HTTP/1.1\r\n"
        b"Host: gw\r\nReferer: https://app/?access_token=secret1\r\n"
        b"User-Agent: curl/8\r\n\r\n",
    )
    assert line.startswith('"127.0.0.1" - - ')
    assert '"GET /v1/chat?room=1&token=REDACTED HTTP/1.1" 200 2 ' in line
    assert '"https://app/?access_token=REDACTED" "curl/8"' in line
    assert JWT not in line and "secret1" not in line


def test_the_access_log_hides_a_route_configured_token_parameter() -> None:
    line = _access_log_line(
        access_log_formatter(["jwt"]), b"GET /ws?jwt=secret2&x=1 HTTP/1.1\r\nHost: gw\r\n\r\n"
    )
    assert '"GET /ws?jwt=REDACTED&x=1 HTTP/1.1"' in line


# -- twistd ----------------------------------------------------------------------------

#: Only against a hung process; not a speed expectation.
GUARD = 30
SITE_STARTING = re.compile(r"Site starting on (\d+)")


def test_twistd_logger_writes_only_json_lines_without_tokens(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("hello")
    command = [
        str(Path(sys.executable).with_name("twistd")),
        "-n",
        "--pidfile=",
        "--logger",
        "twisted_gateway.logs.json_observer",
        "web",
        "--listen",
        "tcp:0:interface=127.0.0.1",
        "--path",
        str(tmp_path),
    ]
    process = subprocess.Popen(
        command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    seen: list[str] = []
    try:
        port = None
        while port is None:
            line = lines.get(timeout=GUARD)
            assert line is not None, f"twistd exited: {process.stderr.read()}"
            seen.append(line)
            match = SITE_STARTING.search(json.loads(line)["message"])
            port = match and match[1]
        url = f"http://127.0.0.1:{port}/index.html?token=secret3&x=1"
        with urllib.request.urlopen(url, timeout=GUARD) as response:
            assert response.read() == b"hello"
        process.send_signal(signal.SIGTERM)
        # twistd ends by re-raising the signal it received: the normal exit
        assert process.wait(timeout=GUARD) == -signal.SIGTERM
        while (line := lines.get(timeout=GUARD)) is not None:
            seen.append(line)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
        process.stderr.close()

    events = [json.loads(line) for line in seen]  # every line is one JSON object
    assert all(line.startswith("{") and line.endswith("}\n") for line in seen)
    assert all({"time", "level", "namespace", "message"} <= set(e) for e in events)
    access = [e for e in events if "GET /index.html" in e["message"]]
    assert access and "token=REDACTED&x=1" in access[0]["message"]
    assert not any("secret3" in line for line in seen)
    assert events[-1]["message"] == "Server Shut Down."


@pytest.mark.parametrize(
    "label, own_system, shown",
    [
        (1, None, "[twisted_gateway.workers#warn worker 1]"),
        ("supervisor", None, "[twisted_gateway.workers#warn supervisor]"),
        (0, "HTTPChannel,3,127.0.0.1", "[HTTPChannel,3,127.0.0.1 worker 0]"),
    ],
)
def test_each_text_line_says_which_worker_wrote_it(monkeypatch, label, own_system, shown) -> None:
    """
    twistd's text lines of a worker or the supervisor name the writer in
    their ``[system]`` part; the JSON line of the same event is unchanged
    (its ``worker`` field says it, its own ``log_system`` only if it had one).
    """
    from twisted.logger import LogLevel, textFileLogObserver

    from twisted_gateway import logs

    event = {"log_format": "worker {slot} started", "slot": 1, "log_namespace": "twisted_gateway.workers",
             "log_level": LogLevel.warn, "log_time": 0.0}
    if own_system is not None:
        event["log_system"] = own_system
    monkeypatch.setattr(logs, "worker_label", label)
    before = json.loads(event_as_json(dict(event)))
    logs.name_the_writer(event)
    logs.name_the_writer(event)  # an event replayed from twistd's start-up buffer: named once
    written = io.StringIO()
    textFileLogObserver(written)(event)
    assert f" {shown} worker 1 started\n" in written.getvalue()
    assert json.loads(event_as_json(event)) == before


def test_a_single_process_names_no_writer(monkeypatch) -> None:
    from twisted_gateway import logs

    monkeypatch.setattr(logs, "worker_label", None)
    event = {"log_format": "x", "log_namespace": "ns", "log_system": "-"}
    logs.name_the_writer(event)
    assert event == {"log_format": "x", "log_namespace": "ns", "log_system": "-"} and logs.writer_name() == ""
