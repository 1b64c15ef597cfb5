"""
The HTTP access log written by the gateway itself (``[gateway] access_log``).

An access event through twisted.logger costs a request about a seventh of its
CPU with twistd's text observer and a fifth with the JSON one: the observer
parses the format, builds the time stamp with a time zone per event, and
writes and flushes each line. :class:`AccessLogWriter` writes the same lines
(byte for byte what the text observer, or :class:`logs.JSONLinesObserver`,
would have written for the event) to a file or stdout for a small part of that:
the line is formatted directly, its time stamp computed once a second, and
lines go out in one ``write`` per 64 KiB or per second, and when the gateway
stops. Other events, and WebSocket sessions' access events, still go through
twisted.logger.
"""

from __future__ import annotations

import json
import os
import sys
import time
from json.encoder import encode_basestring_ascii  # what json.dumps uses for a str
from typing import Callable, Iterable, Mapping

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import FileLogObserver, ILogObserver, LogEvent, Logger, LogLevel, formatEventAsClassicLogText

from twisted_gateway import logs
from twisted_gateway.logs import classic_time, iso_time, may_hold_credentials, redact_str
from twisted_gateway.schema import EVENTS as EVENTS, OFF as OFF, STDOUT as STDOUT

#: The access line of a forwarded request (the access event's ``log_format``).
ACCESS_FORMAT = "{method} {target} {status} {bytes} {duration:.3f}s {upstream}"
#: The namespace and level of the access event the lines stand for.
NAMESPACE = "twisted_gateway.access"
#: A buffer this large is written at once; else it waits at most :data:`FLUSH_SECONDS`.
FLUSH_BYTES = 64 * 1024
FLUSH_SECONDS = 1.0


def check_access_log(value: str) -> None:
    """A file named by ``access_log`` can be written: its directory exists and lets us in."""
    if value in (EVENTS, OFF, STDOUT):
        return
    path = os.path.abspath(value)
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise ValueError(f"the directory {directory} does not exist")
    if not os.access(path if os.path.exists(path) else directory, os.W_OK):
        raise ValueError(f"{path} cannot be written")


class AccessLogWriter:
    """
    Access lines, buffered, written to ``fd`` in one ``write`` per 64 KiB or
    per second (a line is at most a second late), and all of them at
    :meth:`close`. ``fmt`` is ``text`` (twistd's text log line) or ``json``
    (the JSON observer's line). ``clock`` schedules the flush; the time
    stamps come from the caller (the request's end on the same clock).
    """

    def __init__(self, fd: int, fmt: str, clock: IReactorTime, *, owns_fd: bool = False) -> None:
        self._fd, self._owns_fd = fd, owns_fd
        self._clock = clock
        self._lines: list[str] = []
        self._size = 0
        self._timer: IDelayedCall | None = None
        self.line: Callable[..., str] = json_line if fmt == "json" else text_line
        self._closed = False

    @classmethod
    def open(cls, where: str, fmt: str, clock: IReactorTime) -> AccessLogWriter:
        """A writer to ``stdout`` (the process's own, even under twistd) or appending to a file."""
        if where == STDOUT:
            if sys.__stdout__ is None:  # started without one (pythonw)
                raise OSError("the process has no stdout")
            return cls(sys.__stdout__.fileno(), fmt, clock)
        fd = os.open(where, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        return cls(fd, fmt, clock, owns_fd=True)

    def write(self, when: float, fields: Mapping[str, str], status: int, sent: int, duration: float, outcome: str) -> None:
        """One request's line; ``fields`` are the access event's (method, target, ...)."""
        if self._closed:
            return
        line = self.line(when, fields, status, sent, duration, outcome)
        self._lines.append(line)
        self._size += len(line)
        if self._size >= FLUSH_BYTES:
            self.flush()
        elif self._timer is None:
            self._timer = self._clock.callLater(FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        """Write what is buffered now."""
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        if not self._lines:
            return
        data = "".join(self._lines).encode("utf-8", "backslashreplace")
        self._lines, self._size = [], 0
        try:
            while data:
                data = data[os.write(self._fd, data) :]
        except OSError:
            pass  # a full disk or a closed stdout: nowhere left to say so

    def close(self) -> None:
        """Write the rest and stop (the file is closed if this writer opened it)."""
        self.flush()
        self._closed = True
        if self._owns_fd:
            self._owns_fd = False
            os.close(self._fd)


# -- the lines (pure) --------------------------------------------------------------


def text_line(when: float, fields: Mapping[str, str], status: int, sent: int, duration: float, outcome: str) -> str:
    """The line twistd's text observer writes for the access event."""
    text = "%s %s %d %d %.3fs %s" % (fields["method"], fields["target"], status, sent, duration, fields["upstream"])
    if "\n" in text:
        text = text.replace("\n", "\n\t")
    return "%s [%s#info%s] %s\n" % (classic_time(when), NAMESPACE, logs.writer_name(), text)


#: The access event's fields in the order the event holds them (``http_proxy.emit_access_event``).
_FIELDS = ("method", "path", "query", "target", "route", "upstream", "peer")


def json_line(when: float, fields: Mapping[str, str], status: int, sent: int, duration: float, outcome: str) -> str:
    """
    The line :class:`logs.JSONLinesObserver` writes for the access event,
    redacted alike (``json.dumps`` with the same separators, keys in the same
    order), written out directly: an encoder walking a dict took a third of
    it, and ``%`` formatting with a long template half of the rest.
    """
    method, path, query, target = fields["method"], fields["path"], fields["query"], fields["target"]
    route, upstream, peer = fields["route"], fields["upstream"], fields["peer"]
    if may_hold_credentials(f"{method}\n{path}\n{query}\n{target}\n{route}\n{upstream}\n{peer}"):
        method, path, query, target, route, upstream, peer = map(
            redact_str, (method, path, query, target, route, upstream, peer)
        )
        message = redact_str(f"{method} {target} {status:d} {sent:d} {duration:.3f}s {upstream}")
    else:
        message = f"{method} {target} {status:d} {sent:d} {duration:.3f}s {upstream}"
    q = encode_basestring_ascii
    worker = "" if logs.worker_label is None else '"worker":%s,' % json.dumps(logs.worker_label)
    return (
        f'{{"time":"{iso_time(when)}",{_LEVEL_NAMESPACE}"message":{q(message)},{worker}'
        f'"status":{status:d},"bytes":{sent:d},"duration":{float.__repr__(duration)},"outcome":{q(outcome)},'
        f'"method":{q(method)},"path":{q(path)},"query":{q(query)},"target":{q(target)},"route":{q(route)},'
        f'"upstream":{q(upstream)},"peer":{q(peer)},{_SOURCE_FORMAT}}}\n'
    )


#: The constant parts of the JSON observer's line for an access event.
_LEVEL_NAMESPACE = '"level":"info","namespace":"' + NAMESPACE + '",'
_SOURCE_FORMAT = '"log_source":null,"log_format":' + encode_basestring_ascii(ACCESS_FORMAT)



# -- the access event (``[gateway] access_log = events``) ----------------------------


def flattened(fields: Mapping[str, str], status: int, sent: int, duration: float) -> dict[str, str]:
    """
    :data:`ACCESS_FORMAT`'s fields already formatted, as ``log_flattened``
    (Twisted's key for them): a log observer then formats the line without
    parsing the format and looking each field up again.
    """
    return {
        "method!s:": fields["method"],
        "target!s:": fields["target"],
        "status!s:": str(status),
        "bytes!s:": str(sent),
        "duration!s:.3f": "%.3f" % duration,
        "upstream!s:": fields["upstream"],
    }


def access_event(
    logger: Logger, fields: Mapping[str, str], status: int, sent: int, duration: float, outcome: str
) -> LogEvent:
    """
    The event ``logger.info(ACCESS_FORMAT, ..., **fields)`` emits, keys in the
    same order, made directly: ``Logger.emit`` checks the level against a
    sorted list of all levels and copies the keys again, per request.
    """
    return {
        "status": status,
        "bytes": sent,
        "duration": duration,
        "outcome": outcome,
        "log_flattened": flattened(fields, status, sent, duration),
        **fields,
        "log_logger": logger,
        "log_level": _INFO,
        "log_namespace": logger.namespace,
        "log_source": logger.source,
        "log_format": ACCESS_FORMAT,
        "log_time": time.time(),
    }


#: The access event's keys, and those it has once ``logs.name_the_writer`` has seen it.
EVENT_KEYS = frozenset(
    {"status", "bytes", "duration", "outcome", "log_flattened", *_FIELDS, "log_logger", "log_level",
     "log_namespace", "log_source", "log_format", "log_time"}
)
NAMED_EVENT_KEYS = EVENT_KEYS | {"log_system", "log_own_system"}
_EVENT_SIZE, _NAMED_EVENT_SIZE = len(EVENT_KEYS), len(NAMED_EVENT_KEYS)
#: The level of every access event.
_INFO = LogLevel.info


def is_access_event(event: LogEvent) -> bool:
    """
    Whether ``event`` is an access event as :func:`access_event` makes it,
    nothing added since but what ``logs.name_the_writer`` adds (its format
    is this module's own string object, and it has as many keys).
    """
    if event.get("log_format") is not ACCESS_FORMAT:
        return False
    size = len(event)
    return size == _EVENT_SIZE or (size == _NAMED_EVENT_SIZE and event.get("log_own_system", False) is None)


def json_event_line(event: LogEvent) -> str | None:
    """:class:`logs.JSONLinesObserver`'s line for an access event (:func:`json_line`), None for any other event."""
    if not is_access_event(event):
        return None
    return json_line(event["log_time"], event, event["status"], event["bytes"], event["duration"], event["outcome"])


logs.json_shortcut = json_event_line


def classic_line(event: LogEvent) -> str | None:
    """
    What twistd's text observer writes for ``event``
    (``formatEventAsClassicLogText``), its time stamp made once a second, and
    an access event's line written out from its ``log_flattened`` values.
    """
    if not is_access_event(event):
        return formatEventAsClassicLogText(event, formatTime=classic_time)
    flat = event["log_flattened"]
    system = event.get("log_system")
    line = "%s [%s] %s %s %s %s %ss %s" % (
        classic_time(event["log_time"]),
        "%s#%s" % (event["log_namespace"], event["log_level"].name) if system is None else system,
        flat["method!s:"],
        flat["target!s:"],
        flat["status!s:"],
        flat["bytes!s:"],
        flat["duration!s:.3f"],
        flat["upstream!s:"],
    )
    if "\n" in line:
        line = line.replace("\n", "\n\t")
    return line + "\n"


def _probes() -> list[LogEvent]:
    """Events whose lines tell twistd's text format from any other."""
    fields = dict(method="GET", path="/p", query="", target="/p\nq", route="r", upstream="http://u", peer="::1")
    access = access_event(Logger(namespace=NAMESPACE), fields, 200, 1, 0.0125, "ok")
    access["log_time"] = 1e9 + 0.25
    return [
        access,
        {"log_format": "a {x!r} {y:.2f}", "x": "b\nc", "y": 1.0, "log_time": 1.5e9 + 0.9999996,
         "log_namespace": "n", "log_level": LogLevel.warn},
        {"log_format": "s", "log_system": "sys", "log_time": 12345.5},
        {"log_format": "no time"},
    ]


def speed_up_text_observers(observers: Iterable[ILogObserver]) -> int:
    """
    Each of ``observers`` that writes twistd's text lines (``twistd``'s own
    log to its file or stdout) formats them through :func:`classic_line`:
    the same lines for every event, at a fraction of the access event's cost.
    An observer is changed only if it writes exactly :func:`classic_line`'s
    line for a few sample events. Returns how many were changed.
    """
    probes = _probes()
    changed = 0
    for observer in observers:
        if not isinstance(observer, FileLogObserver) or observer.formatEvent is classic_line:
            continue
        try:
            same = all(observer.formatEvent(dict(event)) == classic_line(dict(event)) for event in probes)
        except Exception:
            same = False
        if same:
            observer.formatEvent = classic_line
            changed += 1
    return changed
