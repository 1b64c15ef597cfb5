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
import math
import string
import os
import sys
import threading
import time
from json.encoder import encode_basestring_ascii  # what json.dumps uses for a str
from operator import itemgetter
from typing import Callable, Iterable, Mapping, Sequence

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    LogPublisher,
    formatEventAsClassicLogText,
)

from twisted_gateway import logs
from twisted_gateway._compat import file_observer_writer, observer_list, poll_turn
from twisted_gateway.logs import classic_time, iso_time, may_hold_credentials, redact_str
from twisted_gateway.schema import EVENTS as EVENTS, OFF as OFF, STDOUT as STDOUT

#: The access line of a forwarded request (the access event's ``log_format``).
ACCESS_FORMAT = "{method} {target} {status} {bytes} {duration:.3f}s {upstream}"
#: The namespace and level of the access event the lines stand for.
NAMESPACE = "twisted_gateway.access"
#: A buffer this large is written at once; else it waits at most :data:`FLUSH_SECONDS`.
FLUSH_BYTES = 64 * 1024
FLUSH_SECONDS = 1.0


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

    def write(self, when: float, fields: Mapping[str, str], status: int, sent: int, micros: int, outcome: str) -> None:
        """One request's line; ``fields`` are the access event's (method, target, ...), ``micros`` its duration."""
        if self._closed:
            return
        line = self.line(when, fields, status, sent, micros, outcome)
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


def text_line(when: float, fields: Mapping[str, str], status: int, sent: int, micros: int, outcome: str) -> str:
    """
    The line twistd's text observer writes for the access event (``status``
    and ``sent`` are ints, ``micros`` the duration in whole microseconds).
    """
    method, _, _, target, _, upstream, _ = _values(fields)
    return _text_info_line(when, f"{method} {target} {status} {sent}{_seconds(micros)[0]}s {upstream}")


def _text_info_line(when: float, text: str) -> str:
    """twistd's text line of an info event of the access namespace whose message is ``text``."""
    if "\n" in text:
        text = text.replace("\n", "\n\t")
    label = logs.worker_label
    writer = "" if label is None else logs.writer_name()
    return f"{_text_time(when)} [{NAMESPACE}#info{writer}] {text}\n"


def _text_time(when: float) -> str:
    """``classic_time(when)``, the last second's text kept: per line, no rounding helper and no cache call."""
    global _last_text_second
    second = int(when)
    if when < 0 or round((when - second) * 1e6) >= 1000000:
        return classic_time(when)  # rounds up to the next second
    last = _last_text_second
    if last[0] != second:
        _last_text_second = last = (second, classic_time(second))
    return last[1]


_last_text_second: tuple[int | None, str] = (None, "")

#: What became of a forwarded request (the event's ``outcome``): words JSON needs no escape for.
OUTCOMES = frozenset({"ok", "error", "client_gone", "refused", "upstream_body_failed"})
#: The access event's fields in the order the event holds them (``http_proxy.emit_access_event``).
_FIELDS = ("method", "path", "query", "target", "route", "upstream", "peer")
_values: Callable[[Mapping[str, str]], tuple[str, str, str, str, str, str, str]] = itemgetter(*_FIELDS)
#: The fields a request brings, and those its route and connection give (the same few values
#: line after line: :func:`_steady_parts`)
_request_values: Callable[[Mapping[str, str]], tuple[str, str, str]] = itemgetter(*_FIELDS[1:4])
_steady_values: Callable[[Mapping[str, str]], tuple[str, str, str, str]] = itemgetter(_FIELDS[0], *_FIELDS[4:])


def _plain(text: str) -> bool:
    """Whether ``text`` goes into a JSON string as it is, and holds nothing ``logs.redact_str`` would change."""
    return (
        "=" not in text
        and "eyJ" not in text
        and "bearer" not in text.lower()
        and text.isascii()
        and text.isprintable()
        and '"' not in text
        and "\\" not in text
    )


def json_line(when: float, fields: Mapping[str, str], status: int, sent: int, micros: int, outcome: str) -> str:
    """
    The line :class:`logs.JSONLinesObserver` writes for the access event,
    redacted alike (``json.dumps`` with the same separators, keys in the same
    order; ``status`` and ``sent`` are ints, ``micros`` the duration in whole
    microseconds), written out directly. When no field may hold a credential
    nor needs JSON's escapes (what a request mostly brings), the fields go
    into the line as they are: the request's own (path, query, target)
    checked per line, the method, route, upstream and peer once per set of
    them (:func:`_steady_parts`), instead of a redaction check and an encoder
    call per field. The time stamp, status and duration come from tables
    (a float's ``repr`` and formats cost more than the rest of the line).
    """
    path, query, target = _request_values(fields)
    steady = _steady_values(fields)
    parts = _steady.get(steady)
    if parts is None or parts[4] is not logs.worker_label:  # (a label of another identity: made again)
        parts = _steady_parts(steady)
    if not (
        parts[0]
        and outcome in OUTCOMES
        and (target in _plain_targets and target is path and not query or _plain_request(path, query, target))
    ):
        method, route, upstream, peer = steady
        return _escaped_json_line(when, (method, path, query, target, route, upstream, peer), status, sent, micros, outcome)
    last = _last_iso_second
    fraction = ((when - last[0]) * 1e6).__round__()  # iso_time's rounding, in the second last written
    if not 0 <= fraction < 1000000:
        last, fraction = _iso_second(when)
    high = fraction // 1000
    code, status_field = _STATUS.get(status) or _status_texts(status)
    size = str(sent)
    seconds, exact = _seconds(micros)
    message, upstream, method, tail, _ = parts
    return (
        f'{last[1]}{_DIGITS[high]}{_DIGITS[fraction - high * 1000]}{message}{target}{code}{size}{seconds}{upstream}'
        f'{status_field}{size},"duration":{exact},"outcome":"{outcome}{method}{path}","query":"{query}",'
        f'"target":"{target}{tail}'
    )


def _iso_second(when: float) -> tuple[tuple[float, str], int]:
    """
    ``iso_time(when)`` as :func:`json_line` writes it: the line's start to the
    second's ``.``, and the microseconds; the start kept for the lines of the
    same second (unless ``when`` rounds up to the next one).
    """
    global _last_iso_second
    stamp = iso_time(when)
    second = int(when)
    start = (float(second), '{"time":"' + stamp[:-7])
    if 0 <= round((when - second) * 1e6) < 1000000:
        _last_iso_second = start
    return start, int(stamp[-7:-1])


#: The second :func:`json_line` last wrote, and its line's start (none yet: any time is far from it).
_last_iso_second: tuple[float, str] = (-1e18, "")


def _seconds(micros: int) -> tuple[str, str]:
    """
    A duration in whole microseconds as the access event's ``duration``
    field is written: ``" %.3f"`` (the message's) and the ``repr`` (JSON's)
    of ``micros / 1e6``, from tables under a second.
    """
    if 100 <= micros < 1000000:
        high = micros // 1000
        low = micros - high * 1000
        if low:
            exact = _MILLIS[high] + _REST[low]
            return (_ROUNDED[high] if low < 500 else _ROUNDED[high + 1] if low > 500 else _HALF[high]), exact
        return _ROUNDED[high], _WHOLE_MILLIS[high]
    duration = micros / 1e6
    return " %.3f" % duration, repr(duration)


#: ``" %.3f"`` of n ms (and of 1 s), ``"%.3f"`` of n ms + 500 µs (which the float sits above or
#: below), the ``repr`` of n ms, its digits to ms and those of n µs after them (none when 0).
_ROUNDED = [" 0.%03d" % n for n in range(1000)] + [" 1.000"]
_HALF = [" %.3f" % ((n * 1000 + 500) / 1e6) for n in range(1000)]
_WHOLE_MILLIS = [repr(n / 1000) for n in range(1000)]
_MILLIS = ["0.%03d" % n for n in range(1000)]
_REST = [("%03d" % n).rstrip("0") for n in range(1000)]


def _status_texts(status: int) -> tuple[str, str]:
    """A status as :func:`json_line` writes it in the message and as the ``status`` field."""
    return f" {status:d} ", f'"status":{status:d},"bytes":'


#: :func:`_status_texts` of the codes, made once.
_STATUS = {code: _status_texts(code) for code in range(100, 1000)}
#: 000 to 999, for the microseconds of a time stamp.
_DIGITS = ["%03d" % n for n in range(1000)]


def _plain_request(path: str, query: str, target: str) -> bool:
    """
    Whether a request's own fields are :func:`_plain`: a target that is the
    path, with no query, is then kept in :data:`_plain_targets` (the same
    few come again and again: health checks, polling, a page's calls).
    """
    if target is not path or query:
        return _plain(f"{path} {query} {target}")
    if not _plain(target):
        return False
    if len(_plain_targets) >= STEADY_SETS:
        _plain_targets.clear()
    _plain_targets.add(target)
    return True


#: Targets :func:`_plain_request` found plain (at most :data:`STEADY_SETS`, emptied when full).
_plain_targets: set[str] = set()


#: What :func:`_steady_parts` makes: four parts of a line and a worker label.
_SteadyParts = tuple[str, str, str, str, "int | str | None"]


def _steady_parts(steady: tuple[str, ...]) -> _SteadyParts:
    """
    The parts of :func:`json_line`'s line that a method, route, upstream and
    peer make (a request's own fields between them), those fields checked,
    and the worker label they were made for: the first is empty when one of
    the fields must be escaped or redacted. Kept in :data:`_steady` (at most
    :data:`STEADY_SETS` of them).
    """
    method, route, upstream, peer = steady
    label = logs.worker_label
    worker = "" if label is None else '"worker":%s,' % json.dumps(label)
    parts: _SteadyParts = ("", "", "", "", label)
    if _plain(" ".join(steady)):
        parts = (
            f'Z",{_LEVEL_NAMESPACE}"message":"{method} ',
            f's {upstream}",{worker}',
            f'","method":"{method}","path":"',
            f'","route":"{route}","upstream":"{upstream}","peer":"{peer}",{_SOURCE_FORMAT}}}\n',
            label,
        )
    if len(_steady) >= STEADY_SETS:
        _steady.clear()
    _steady[steady] = parts
    return parts


#: :func:`_steady_parts`'s, by method, route, upstream and peer.
_steady: dict[tuple[str, ...], _SteadyParts] = {}
#: How many :data:`_steady` keeps (emptied when full: a new peer costs a check, never a wrong line).
STEADY_SETS = 1024


def _escaped_json_line(
    when: float, values: tuple[str, ...], status: int, sent: int, micros: int, outcome: str
) -> str:
    """:func:`json_line` for fields that may hold a credential or need escapes: each redacted and encoded."""
    method, path, query, target, route, upstream, peer = values
    seconds, exact = _seconds(micros)
    message = f"{method} {target} {status:d} {sent:d}{seconds}s {upstream}"
    if may_hold_credentials("\n".join(values)):
        method, path, query, target, route, upstream, peer = map(redact_str, values)
        message = redact_str(message)
    q = encode_basestring_ascii
    worker = "" if logs.worker_label is None else '"worker":%s,' % json.dumps(logs.worker_label)
    return (
        f'{{"time":"{iso_time(when)}",{_LEVEL_NAMESPACE}"message":{q(message)},{worker}'
        f'"status":{status:d},"bytes":{sent:d},"duration":{exact},"outcome":{q(outcome)},'
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
    """
    :class:`logs.JSONLinesObserver`'s line for an access event (:func:`json_line`), None for any other event
    (or one whose duration is not in whole microseconds).
    Access lines held for the end of the reactor's turn are written first.
    """
    if _held_plan is not None:
        write_held()
    if not is_access_event(event):
        return None
    duration = event["duration"]
    if type(duration) is not float or not abs(duration) < 1e18:
        return None
    micros = round(duration * 1e6)
    if micros / 1e6 != duration:
        return None  # not in whole microseconds (not the gateway's): the general way writes its repr
    return json_line(event["log_time"], event, event["status"], event["bytes"], micros, event["outcome"])


logs.json_shortcut = json_event_line


# -- the access event's lines without the event ----------------------------------------


_FORMATTER = string.Formatter()

#: An access line of the event's values (:func:`json_line`, :func:`text_line`).
_Line = Callable[[float, Mapping[str, str], int, int, int, str], str]


class _Plan:
    """
    What a publisher's observers do with an access event, when each is one
    whose line for it this module writes: :attr:`writers` is None when one
    of them is not.
    """

    def __init__(self, publisher: LogPublisher) -> None:
        self.publisher: object = publisher
        #: the publisher's own list of observers, which changes in place
        self.list = observers = observer_list(publisher)
        #: what it held when this plan was made
        self.observers = list(observers)
        #: a text observer comes before ``name_the_writer`` (or without it): no worker label allowed
        self.unlabelled = False
        #: each observer, how it writes a line, and the line it writes
        self.writers: list[tuple[ILogObserver, Callable[[str], None], _Line]] | None = []
        #: the writers again, each with its lines held in the reactor's turn (made once: a turn's hold costs less)
        self.held: list[tuple[ILogObserver, Callable[[str], None], _Line, list[str]]] = []
        named = False
        for observer in observers:
            if observer is logs.name_the_writer:
                named = True  # its log_system is what text_line writes; JSON lines do not show it
            elif type(observer) is logs.JSONLinesObserver:
                self.writers.append((observer, observer.write_line, json_line))
            elif type(observer) is FileLogObserver and observer.formatEvent is classic_line:
                self.unlabelled = self.unlabelled or not named
                self.writers.append((observer, file_observer_writer(observer), text_line))
            else:
                self.writers = None
                return
        self.held = [(observer, write, line, []) for observer, write, line in self.writers]


_plan: _Plan | None = None


def forget_plan() -> None:
    """Look at the observers again (one of them changed how it formats)."""
    global _plan
    _plan = None


def emit(
    logger: Logger, fields: Mapping[str, str], status: int, sent: int, micros: int, outcome: str, when: float
) -> None:
    """
    The access event to ``logger``'s observers (``[gateway] access_log =
    events``) of a request that ended at ``when`` (the lines' time stamp; the
    event's is the wall clock's), its duration ``micros`` microseconds (the
    event's ``duration`` is in seconds). When each of them is one whose line for the event this
    module writes (:class:`logs.JSONLinesObserver`, twistd's text observer once
    :func:`speed_up_text_observers` has seen it, ``logs.name_the_writer``),
    each gets that line directly and no event is made: the event and the
    publisher's fan-out were a third of its cost. Any other observer (a
    library user's, a test's capture) gets the event, and so does every one.

    While the reactor handles a poll's events on several descriptors
    (``_compat.poll_turn``), the lines are held and each observer gets those
    of the whole turn in one write at its end (:func:`write_held`): under
    load one ``write`` system call for many requests instead of one each.
    """
    plan = _direct_plan(logger.observer)
    if plan is None:
        logger.observer(access_event(logger, fields, status, sent, micros / 1e6, outcome))
        return
    writers = plan.writers
    assert writers is not None  # (a direct plan's)
    texts: list[str | None] = []
    for observer, _, line in writers:
        try:
            texts.append(line(when, fields, status, sent, micros, outcome))
        except Exception:
            texts.append(None)
            _failed(observer, [o for o, _, _ in writers])
    _deliver(plan, texts)


def _deliver(plan: _Plan, texts: Sequence[str | None]) -> None:
    """
    Each of ``plan``'s writers its line of ``texts`` (None: none): held for
    the end of the turn while the reactor handles a poll's events on several
    descriptors (:func:`write_held`), else written now.
    """
    writers = plan.writers
    assert writers is not None  # (a direct plan's)
    if poll_turn.handling:
        # the reactor is handling a poll's events: the lines wait for its end (write_held)
        if _held_plan is not plan:
            _hold(plan)
        if _held_plan is plan:
            for (_, _, _, lines), text in zip(plan.held, texts):
                if text is not None:
                    lines.append(text)
            return
    for (observer, write, _), text in zip(writers, texts):
        if text is None:
            continue
        try:
            write(text)
        except Exception:
            _failed(observer, [o for o, _, _ in writers])


def _direct_plan(publisher: ILogObserver) -> _Plan | None:
    """
    The plan of ``publisher``'s observers when each of them gets its line
    directly (made again when they changed), else None: the event's way.
    """
    global _plan
    plan = _plan
    if plan is None or plan.publisher is not publisher or plan.observers != plan.list:
        if type(publisher) is not LogPublisher:
            return None
        _plan = plan = _Plan(publisher)
    if plan.writers is None or (plan.unlabelled and logs.worker_label is not None):
        return None
    return plan


#: The plan whose writers hold access lines until the end of the reactor's turn
#: (in its ``held``), and the thread that held them (the reactor's)
_held_plan: _Plan | None = None
_held_by = 0


def _hold(plan: _Plan) -> None:
    """
    Hold the lines of ``plan``'s writers until the end of the turn, those
    held for another plan written first (unless another thread holds them:
    ``plan``'s lines are then written at once).
    """
    global _held_plan, _held_by
    if _held_plan is not None:
        write_held()
    if _held_plan is not None or not plan.held:
        return
    _held_plan, _held_by = plan, threading.get_ident()
    poll_turn.after.append(write_held)


def write_held() -> None:
    """
    Write the access lines :func:`emit` held during the reactor's turn, each
    observer's in one ``write``: called at the turn's end, and by the
    observers' formatting before any other event's line, so that lines keep
    their order. Only the reactor's thread writes them.
    """
    global _held_plan
    if _held_plan is None or threading.get_ident() != _held_by:
        return
    held, _held_plan = _held_plan.held, None
    for observer, write, _, lines in held:
        if not lines:
            continue  # (its line failed)
        text = "".join(lines)
        lines.clear()
        try:
            write(text)
        except Exception:
            _failed(observer, [o for o, _, _, _ in held])


def _failed(observer: ILogObserver, observers: list[ILogObserver]) -> None:
    """As the publisher does when an observer fails: the others are told (and still get their lines)."""
    others = [o for o in observers if o is not observer]
    Logger(observer=LogPublisher(*others)).failure(
        "the log observer {observer!r} failed on an access line", observer=observer
    )


# -- a WebSocket's session line ----------------------------------------------------------

#: The ``ws_session`` event's format: one line per WebSocket, when both legs are gone.
SESSION_FORMAT = "websocket {route} {path} {peer} closed by {side} ({code}) after {duration:.3f}s"
#: The session event's fields, in its order.
SESSION_FIELDS = (
    "route", "path", "peer", "upstream", "duration", "side", "code", "reason",
    "messages_in", "bytes_in", "messages_out", "bytes_out",
)
#: A session's values, in :data:`SESSION_FIELDS`' order.
SessionValues = tuple[str, str, str, "str | None", float, str, "int | None", "str | None", int, int, int, int]


def session_event(logger: Logger, values: SessionValues, when: float) -> LogEvent:
    """The event ``logger.info(SESSION_FORMAT, ..., event="ws_session")`` emits (keys in its order), made directly."""
    event: LogEvent = dict(zip(SESSION_FIELDS, values))
    event.update(
        event="ws_session",
        log_logger=logger,
        log_level=_INFO,
        log_namespace=logger.namespace,
        log_source=logger.source,
        log_format=SESSION_FORMAT,
        log_time=when,
    )
    return event


def emit_session(logger: Logger, values: SessionValues) -> None:
    """
    A WebSocket's ``ws_session`` event to ``logger``'s observers, as
    :func:`emit` does an access event: when each of them is one whose line
    this module writes, each gets the line directly (held with the access
    lines in a reactor's turn of several descriptors) and no event is made
    (the event, the publisher and twistd's formatter were most of the cost
    of a session's end). Any other observer, or values the JSON line must
    escape or redact: every observer gets the event.
    """
    when = time.time()
    plan = _direct_plan(logger.observer)
    if plan is not None:
        writers = plan.writers
        assert writers is not None  # (a direct plan's)
        texts: list[str | None] = []
        for _, _, line in writers:
            text = session_json_line(when, values) if line is json_line else session_text_line(when, values)
            if text is None:
                break
            texts.append(text)
        else:
            _deliver(plan, texts)
            return
    logger.observer(session_event(logger, values, when))


def session_text_line(when: float, values: SessionValues) -> str:
    """The line twistd's text observer writes for the session event (:func:`session_event`)."""
    route, path, peer, _, duration, side, code = values[:7]
    return _text_info_line(when, f"websocket {route} {path} {peer} closed by {side} ({code}) after {duration:.3f}s")


def session_json_line(when: float, values: SessionValues) -> str | None:
    """
    The line :class:`logs.JSONLinesObserver` writes for the session event
    (:func:`session_event`), when its text fields need neither JSON's escapes
    nor redaction (:func:`_plain`); None otherwise (the event's way then).
    """
    route, path, peer, upstream, duration, side, code, reason, messages_in, bytes_in, messages_out, bytes_out = values
    if (
        type(duration) is not float
        or not math.isfinite(duration)
        or (code is not None and type(code) is not int)
        or not _plain(f"{route} {path} {peer} {upstream} {side} {reason}")
    ):
        return None
    label = logs.worker_label
    worker = "" if label is None else '"worker":%s,' % json.dumps(label)
    upstream_field = "null" if upstream is None else '"' + upstream + '"'
    reason_field = "null" if reason is None else '"' + reason + '"'
    return (
        f'{{"time":"{iso_time(when)}",{_LEVEL_NAMESPACE}"message":"websocket {route} {path} {peer} closed by '
        f'{side} ({code}) after {duration:.3f}s",{worker}"route":"{route}","path":"{path}","peer":"{peer}",'
        f'"upstream":{upstream_field},"duration":{duration!r},"side":"{side}",'
        f'"code":{"null" if code is None else code},"reason":{reason_field},'
        f'"messages_in":{messages_in},"bytes_in":{bytes_in},"messages_out":{messages_out},"bytes_out":{bytes_out},'
        f'"event":"ws_session","log_source":null,"log_format":{_SESSION_FORMAT_JSON}}}\n'
    )


_SESSION_FORMAT_JSON = encode_basestring_ascii(SESSION_FORMAT)


def classic_line(event: LogEvent) -> str | None:
    """
    What twistd's text observer writes for ``event``
    (``formatEventAsClassicLogText``), its time stamp made once a second, and
    an access event's line written out from its ``log_flattened`` values.
    Access lines held for the end of the reactor's turn are written first.
    """
    if _held_plan is not None:
        write_held()
    if not is_access_event(event):
        line = _plain_line(event)
        return line if line is not None else formatEventAsClassicLogText(event, formatTime=classic_time)
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


#: A log format's parts: (literal, field name or None, conversion, format spec)
_Parts = list[tuple[str, "str | None", "str | None", str]]
#: Formats seen, parsed (None: a field only Twisted's formatter renders)
_parsed: dict[str, _Parts | None] = {}


def _parse(fmt: str) -> _Parts | None:
    """``fmt``'s parts when each field is a plain name, converted by ``!s``, ``!r`` or not at all."""
    parts: _Parts = []
    try:
        for literal, name, spec, conversion in _FORMATTER.parse(fmt):
            if name is not None and (not name.isidentifier() or conversion not in (None, "s", "r") or "{" in (spec or "")):
                return None  # an attribute, an item, a call, "{}", !a or a nested spec
            parts.append((literal, name, conversion, spec or ""))
    except ValueError:
        return None
    return parts


def _plain_line(event: LogEvent) -> str | None:
    """
    ``formatEventAsClassicLogText``'s line for an event whose format has only
    plain fields, each formatted as Twisted's formatter does (``format(value,
    spec)`` after the conversion), from the format parsed once: Twisted's
    formatter parses it and wraps each value anew per event, most of the
    cost of a WebSocket session's line. None for any other event, or one
    that fails to format (Twisted's formatter then writes what it writes).
    """
    fmt = event.get("log_format")
    if type(fmt) is not str or "log_flattened" in event or "log_failure" in event:
        return None
    if fmt in _parsed:
        parts = _parsed[fmt]
    else:
        parts = _parse(fmt)
        if len(_parsed) < 512:  # (formats are the code's constants: a few dozen)
            _parsed[fmt] = parts
    if parts is None:
        return None
    try:
        pieces = []
        for literal, name, conversion, spec in parts:
            pieces.append(literal)
            if name is not None:
                value = event[name]
                if conversion == "r":
                    value = repr(value)
                elif conversion == "s":
                    value = str(value)
                pieces.append(format(value, spec))
        text = "".join(pieces)
        system = event.get("log_system")
        if system is None:
            level = event.get("log_level")
            system = "%s#%s" % (event.get("log_namespace", "-"), "-" if level is None else level.name)
        else:
            system = str(system)
    except Exception:
        return None
    if not text:
        return None
    line = "%s [%s] %s" % (classic_time(event.get("log_time")), system, text)
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
    if changed:
        forget_plan()
    return changed
