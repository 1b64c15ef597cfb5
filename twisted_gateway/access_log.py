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

import functools
import json
import os
import sys
from json.encoder import encode_basestring_ascii  # what json.dumps uses for a str
from typing import Callable, Mapping

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import formatTime

from twisted_gateway import logs
from twisted_gateway.logs import iso_time, may_hold_credentials, redact_str
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


@functools.lru_cache(maxsize=4)
def _text_time(second: int) -> str:
    """twistd's time stamp (local time, ``%Y-%m-%dT%H:%M:%S%z``), computed once a second."""
    return formatTime(second)


def text_line(when: float, fields: Mapping[str, str], status: int, sent: int, duration: float, outcome: str) -> str:
    """The line twistd's text observer writes for the access event."""
    text = "%s %s %d %d %.3fs %s" % (fields["method"], fields["target"], status, sent, duration, fields["upstream"])
    if "\n" in text:
        text = text.replace("\n", "\n\t")
    return "%s [%s#info%s] %s\n" % (_text_time(int(when)), NAMESPACE, logs.writer_name(), text)


#: The access event's fields in the order the event holds them (``http_proxy.emit_access_event``).
_FIELDS = ("method", "path", "query", "target", "route", "upstream", "peer")


def json_line(when: float, fields: Mapping[str, str], status: int, sent: int, duration: float, outcome: str) -> str:
    """
    The line :class:`logs.JSONLinesObserver` writes for the access event,
    redacted alike (``json.dumps`` with the same separators, keys in the same
    order), written out directly: an encoder walking a dict took a third of it.
    """
    values = [fields[name] for name in _FIELDS]
    message = "%s %s %d %d %.3fs %s" % (values[0], values[3], status, sent, duration, values[5])
    if may_hold_credentials("\n".join(values)):
        values = [redact_str(value) for value in values]
        message = redact_str("%s %s %d %d %.3fs %s" % (values[0], values[3], status, sent, duration, values[5]))
    return _JSON_LINE % (
        iso_time(when),
        _quote(message),
        "" if logs.worker_label is None else '"worker":%s,' % json.dumps(logs.worker_label),
        status,
        sent,
        float.__repr__(duration),
        _quote(outcome),
        *map(_quote, values),
    )


#: The JSON observer's line for an access event (the order of ``Logger.emit``'s event).
_JSON_LINE = (
    '{"time":"%s","level":"info","namespace":"' + NAMESPACE + '","message":%s,%s'
    '"status":%d,"bytes":%d,"duration":%s,"outcome":%s,'
    + ",".join('"%s":%%s' % name for name in _FIELDS)
    + ',"log_source":null,"log_format":' + encode_basestring_ascii(ACCESS_FORMAT) + "}\n"
)
_quote = encode_basestring_ascii

