"""
Logs as JSON lines, and an access log, with tokens kept out of both.

Log collectors want one JSON object per line; Twisted's ``jsonFileLogObserver``
writes RFC 7464 records (each prefixed by ``\\x1e``) and keeps formatting for
later, so :func:`json_observer` writes its own: the event's fields as keys,
plus ``time``, ``level``, ``namespace``, the formatted ``message`` and, for a
failure, a ``traceback``. Run ``twistd --logger twisted_gateway.logs.json_observer``.

Tokens travel in query strings, headers and cookies, so everything written is
redacted first (:func:`redact`, :func:`redact_text`); the access log of a
``Site`` goes through :func:`redacting_log_formatter` for the same reason.
This is a safety net: code should still never log a ``Request`` or a raw URI.
"""

from __future__ import annotations

import functools
import json
import math
import re
import sys
import threading
import time
from datetime import datetime, timezone
from typing import IO, TYPE_CHECKING, AnyStr, Callable, Generic, Iterable, Mapping, TypeVar
from urllib.parse import unquote, unquote_to_bytes

from twisted.logger import ILogObserver, LogEvent, LoggingFile, formatEvent, formatTime
from twisted.python.failure import Failure
from twisted.web.http import Request, combinedLogFormatter
from twisted.web.iweb import IAccessLogFormatter
from zope.interface import directlyProvides, implementer

if TYPE_CHECKING:
    from twisted_gateway.schema import AuthSettings

REDACTED = "REDACTED"
#: Field and header names whose values are never written (compared lower-case, ``-`` as ``_``).
SENSITIVE_NAMES = frozenset(
    {"authorization", "proxy_authorization", "cookie", "set_cookie", "token"}
)
#: Containers deeper than this are written as their (redacted) repr.
MAX_DEPTH = 8

_Text = TypeVar("_Text", str, bytes)


# -- redaction (pure) -----------------------------------------------------------


def is_sensitive_name(name: str | bytes) -> bool:
    """Whether a field or header of this name holds a credential (``*_token`` too)."""
    if isinstance(name, bytes):
        name = name.decode("latin-1")
    return _sensitive_key(name)


@functools.lru_cache(maxsize=1024)
def _sensitive_key(name: str) -> bool:
    # cached: every event asks again about the same few field names. A
    # ``log_flattened`` key is the field's name, ``!``, and its format.
    key = name.partition("!")[0].lower().replace("-", "_")
    return key in SENSITIVE_NAMES or key.endswith("_token")


# The start of a ``name=`` field (query string, cookie, ``key=value`` text);
# the lookbehind only lets a name start after a delimiter, which keeps the
# scan linear. A sensitive field's value runs to ``&``, whitespace or a quote.
_NAME = r"(?<![^\s&?=;,/\"'])(?P<name>[^\s&?=;,/\"']*)="
_VALUE_END = r"[&\s\"']"
# A JWT (or the first segments of a JWE) anywhere, e.g. in a cookie or a repr.
_JWT = r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]*){2,4}"
# ``Bearer <credentials>`` (the length keeps prose such as "bearer token" intact).
_BEARER = r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/-]{8,}=*"


class _Redactor(Generic[AnyStr]):
    """
    The patterns and the replacement for one text type (str or bytes):
    ``encode`` turns the (ASCII) patterns and words into it, ``decode`` reads
    a field's percent-encoded name.
    """

    def __init__(self, encode: Callable[[str], AnyStr], decode: Callable[[AnyStr], str]) -> None:
        self.name: re.Pattern[AnyStr] = re.compile(encode(_NAME))
        self.value_end: re.Pattern[AnyStr] = re.compile(encode(_VALUE_END))
        self.jwt: re.Pattern[AnyStr] = re.compile(encode(_JWT))
        self.bearer: re.Pattern[AnyStr] = re.compile(encode(_BEARER))
        self.redacted: AnyStr = encode(REDACTED)
        self.empty: AnyStr = encode("")
        self.encode: Callable[[str], AnyStr] = encode
        self.eq: AnyStr = encode("=")
        self.percent: AnyStr = encode("%")
        self.jwt_start: AnyStr = encode("eyJ")
        self.bearer_word: AnyStr = encode("bearer")
        self.decode: Callable[[AnyStr], str] = decode

    def __call__(self, text: AnyStr, names: frozenset[str]) -> AnyStr:
        lower = text.lower()
        if self.eq in text and (
            self.percent in text or any(self.encode(n) in lower for n in (*names, "token"))
        ):
            text = self._fields(text, names)
        if self.jwt_start in text:
            text = self.jwt.sub(self.redacted, text)
        if self.bearer_word in lower:
            text = self.bearer.sub(lambda m: m[1] + self.redacted, text)
        return text

    def _fields(self, text: AnyStr, names: frozenset[str]) -> AnyStr:
        parts: list[AnyStr] = []
        pos = 0
        for m in self.name.finditer(text):
            if m.start() < pos:
                continue  # inside a value already redacted
            name = self.decode(m["name"]).lower()
            if name.endswith("token") or name in names:
                end = self.value_end.search(text, m.end())
                parts += [text[pos : m.end()], self.redacted]
                pos = end.start() if end else len(text)
        if not parts:
            return text
        return self.empty.join(parts) + text[pos:]


_STR_REDACTOR = _Redactor[str](lambda t: t, lambda name: unquote(name, errors="replace"))
_BYTES_REDACTOR = _Redactor[bytes](
    lambda t: t.encode("latin-1"), lambda name: unquote_to_bytes(name).decode("latin-1")
)


def redact_text(text: _Text, names: Iterable[str] = ()) -> _Text:
    """
    ``text`` with credentials replaced by ``REDACTED``: the value of every
    ``name=value`` field whose percent-decoded name ends with ``token`` (or is
    one of ``names``; any case), JWTs, and ``Bearer`` credentials.
    """
    lowered = frozenset(n.lower() for n in names) if names else _NO_NAMES
    if isinstance(text, (bytes, bytearray)):
        return _BYTES_REDACTOR(text, lowered)
    return _STR_REDACTOR(text, lowered)


_NO_NAMES: frozenset[str] = frozenset()


def redact_str(text: str) -> str:
    """:func:`redact_text` for a ``str`` and no extra names, the common case, without its checks."""
    return _STR_REDACTOR(text, _NO_NAMES)


def may_hold_credentials(text: str) -> bool:
    """False when :func:`redact_text` (with or without names) surely leaves ``text`` as it is."""
    return "=" in text or "eyJ" in text or "bearer" in text.lower()

#: Types whose values cannot hold a credential (most of an event's fields).
_PLAIN = frozenset({int, float, bool, type(None)})
#: Types JSON holds as they are (a float may be infinite: :func:`_jsonable`).
_JSON_PLAIN = frozenset({int, bool, str, type(None)})


def redact_query(query: bytes, names: Iterable[str] = ()) -> str:
    """A raw query string as a log line may show it: :func:`redact_text`'s rule, as text."""
    if not query:
        return ""
    return redact_text(query.decode("latin-1"), names)


def secret_names(auth: AuthSettings | None) -> tuple[str, ...]:
    """
    The names an ``[auth]`` section (an ``AuthSettings``, or None) gives to
    credentials, which redaction must know besides ``*token``: the query
    parameter and the cookie.
    """
    if auth is None:
        return ()
    return tuple(name for name in (auth.query_param, auth.cookie) if name)


def redact(event: Mapping[str, object]) -> dict[str, object]:
    """
    A copy of a log event that holds no credential: a field with a sensitive
    name becomes ``REDACTED``, strings and bytes (also inside dicts, lists and
    tuples) go through :func:`redact_text`, and a ``(name, value)`` header pair
    with a sensitive name keeps its name only. Other objects are kept as they
    are, for formatting; :func:`event_as_json` redacts their repr.
    """
    clean: dict[str, object] = {}
    for key, value in event.items():
        # the common cases first: a log event is mostly short strings and numbers
        sensitive = _sensitive_key(key) if type(key) is str else is_sensitive_name(key)
        if sensitive:
            clean[key] = REDACTED
        elif type(value) in _PLAIN:
            clean[key] = value
        elif type(value) is str:
            clean[key] = _STR_REDACTOR(value, _NO_NAMES)
        else:
            clean[key] = _redact_value(value, 0)
    return clean


def _redact_value(value: object, depth: int) -> object:
    kind = type(value)
    if kind in _PLAIN:
        return value
    if isinstance(value, str):  # (a str subclass too, as redact_text does it)
        return _STR_REDACTOR(value, _NO_NAMES)
    if isinstance(value, bytes):
        return _BYTES_REDACTOR(value, _NO_NAMES)
    if depth >= MAX_DEPTH:
        return value
    if isinstance(value, dict):
        return {
            k: _redacted_like(v)
            if isinstance(k, (str, bytes)) and is_sensitive_name(k)
            else _redact_value(v, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        if (
            len(value) == 2
            and isinstance(value[0], (str, bytes))
            and is_sensitive_name(value[0])
        ):
            same_kind: Callable[[Iterable[object]], object] = type(value)
            return same_kind((value[0], _redacted_like(value[1])))
        items = [_redact_value(v, depth + 1) for v in value]
        return items if isinstance(value, list) else tuple(items)
    return value


def _redacted_like(value: object) -> str | bytes:
    """``REDACTED`` as bytes for a bytes value, as text otherwise."""
    return REDACTED.encode("ascii") if isinstance(value, bytes) else REDACTED


# -- JSON lines -------------------------------------------------------------------

#: Event keys rendered as ``time``, ``level``, ``namespace``, ``traceback`` or not at all.
_RENDERED = frozenset(
    {"log_time", "log_level", "log_namespace", "log_failure", "log_logger", "log_flattened", "log_trace",
     "log_own_system"}
)


#: Which process of a gateway of several writes (the ``worker`` field): a
#: worker's number or ``"supervisor"``; None for a single process (no field).
worker_label: int | str | None = None


def writer_name() -> str:
    """How a text line names its writer: `` worker N``, `` supervisor``, or nothing for a single process."""
    if worker_label is None:
        return ""
    return " supervisor" if worker_label == "supervisor" else f" worker {worker_label}"


_naming = False


def label_process(label: int | str | None) -> None:
    """
    This process is one of a gateway of several: JSON lines get a ``worker``
    field, and the ``[system]`` part of twistd's text lines names the writer
    (``[twisted_gateway.workers#info worker 1]``). None: a single process
    that may become a supervisor later (SIGHUP, ``worker_handover.py``).
    Called first before twistd starts its log, so that :func:`name_the_writer`
    sees each event before twistd's observer.
    """
    global worker_label, _naming
    if not _naming:
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(name_the_writer)
        _naming = True
    worker_label = label


@implementer(ILogObserver)
def name_the_writer(event: LogEvent) -> None:
    """
    Adds the writer to the event's ``log_system`` (what the text observer
    shows in brackets, else ``namespace#level``); the event's own system is
    kept under ``log_own_system`` for the JSON line, which has ``worker``.
    """
    if worker_label is None or "log_own_system" in event:
        return
    own = event.get("log_system")
    event["log_own_system"] = own
    if own is None:
        level = event.get("log_level")
        own = "%s#%s" % (event.get("log_namespace", "-"), getattr(level, "name", "-"))
    event["log_system"] = own + writer_name()


def event_as_json(event: LogEvent) -> str:
    """One log event as one line of JSON (no newline), redacted."""
    clean = redact(event)
    out: dict[str, object] = {
        "time": iso_time(event.get("log_time")),
        "level": getattr(event.get("log_level"), "name", "info"),
        "namespace": str(event.get("log_namespace", "")),
        "message": redact_text(formatEvent(clean)),
    }
    if worker_label is not None:
        out["worker"] = worker_label
    failure = event.get("log_failure")
    if failure is not None:
        out["traceback"] = redact_text(_traceback(failure))
    if "log_own_system" in clean:  # name_the_writer's text system: the event's own, if any
        clean["log_system"] = clean.pop("log_own_system")
        if clean["log_system"] is None:
            del clean["log_system"]
    for key, value in clean.items():
        if key not in out and key not in _RENDERED:
            out[str(key)] = value if type(value) in _JSON_PLAIN else _jsonable(value, 0)
    return json.dumps(out, separators=(",", ":"))


def iso_time(stamp: object) -> str:
    if not isinstance(stamp, (int, float)):
        stamp = time.time()
    second = int(stamp)  # the rounding datetime.fromtimestamp does, without its calls
    micros = round((stamp - second) * 1e6)
    if micros >= 1000000:
        second, micros = second + 1, micros - 1000000
    elif micros < 0:
        second, micros = second - 1, micros + 1000000
    global _last_iso
    last = _last_iso  # (one read: another thread may replace it)
    if last[0] != second:
        _last_iso = last = (second, _iso_second(second))
    return "%s.%06dZ" % (last[1], micros)


#: The last second :func:`iso_time` wrote, and its text.
_last_iso: tuple[int | None, str] = (None, "")


def _split(stamp: float) -> tuple[int, int]:
    """A time stamp's second and microseconds, rounded as ``datetime.fromtimestamp`` rounds."""
    fraction, second = math.modf(stamp)
    micros = round(fraction * 1e6)
    if micros >= 1000000:
        second, micros = second + 1, micros - 1000000
    elif micros < 0:
        second, micros = second - 1, micros + 1000000
    return int(second), micros


def classic_time(stamp: float | None) -> str:
    """
    ``formatTime(stamp)``, the time stamp of twistd's text lines (local time to
    the second), computed once a second: per event it cost more than the rest
    of the line.
    """
    if type(stamp) is not float and type(stamp) is not int:
        return formatTime(stamp)
    return _classic_second(_split(stamp)[0])


@functools.lru_cache(maxsize=4)
def _classic_second(second: int) -> str:
    return formatTime(second)


@functools.lru_cache(maxsize=4)
def _iso_second(second: int) -> str:
    # events come many to a second: the calendar part is computed once per second
    return datetime.fromtimestamp(second, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")


def _traceback(failure: Failure) -> str:
    try:
        return failure.getTraceback()
    except Exception:
        return _repr(failure)


def _jsonable(value: object, depth: int) -> object:
    """The value itself if JSON can hold it, else its redacted repr."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if depth < MAX_DEPTH:
        if isinstance(value, dict):
            return {
                k if isinstance(k, str) else _repr(k): _jsonable(v, depth + 1)
                for k, v in value.items()
            }
        if isinstance(value, (list, tuple)):
            return [_jsonable(v, depth + 1) for v in value]
    return _repr(value)


def _repr(value: object) -> str:
    try:
        text = repr(value)
    except Exception:
        text = f"<unrepresentable {type(value).__name__}>"
    return redact_text(text)


def _no_shortcut(event: LogEvent) -> str | None:
    return None


#: The JSON line of an event written out directly, the same line :func:`event_as_json`
#: gives; None for an event it does not know. ``access_log`` sets it for the access event.
json_shortcut: Callable[[LogEvent], str | None] = _no_shortcut


@implementer(ILogObserver)
class JSONLinesObserver:
    """Writes each event as one JSON object per line to ``stream``, flushed."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self._lock = threading.Lock()  # events may come from threadpool threads

    def __call__(self, event: LogEvent) -> None:
        try:
            line = json_shortcut(event)
            if line is None:
                line = event_as_json(event) + "\n"
        except Exception as e:
            line = json.dumps(
                {
                    "time": iso_time(None),
                    "level": "error",
                    "namespace": __name__,
                    "message": "cannot write a log event as JSON",
                    "error": _repr(e),
                }
            ) + "\n"
        self.write_line(line)

    def write_line(self, line: str) -> None:
        """Write one line (its newline included), flushed."""
        lock = self._lock
        lock.acquire()  # (a ``with`` block cost a sixth of the write more)
        try:
            self.stream.write(line)
            self.stream.flush()
        except (OSError, ValueError):
            pass  # stdout is gone: there is nowhere left to report it
        finally:
            lock.release()


def json_observer() -> ILogObserver:
    """
    The observer factory for ``twistd --logger twisted_gateway.logs.json_observer``.

    twistd imports this name and calls it with no arguments before it
    redirects ``sys.stdout`` into the log, so the observer keeps the real
    stdout. Meant for foreground runs (``-n``, containers, systemd).
    """
    stream = sys.stdout
    if isinstance(stream, LoggingFile):  # called after the redirect: avoid a loop
        stream = sys.__stdout__
    assert stream is not None, "no stdout to write the log to"
    return JSONLinesObserver(stream)


# -- access log ------------------------------------------------------------------


def access_log_formatter(query_params: Iterable[str] = ()) -> Callable[[str, Request], str]:
    """
    A ``Site(logFormatter=...)`` writing the combined log format with
    credentials redacted: fields named ``*token`` and any of ``query_params``
    (the routes' configured token parameters), JWTs and ``Bearer`` values,
    in the URI and in the ``Referer`` and ``User-Agent`` fields alike.
    """
    names = frozenset(p.lower() for p in query_params)

    def formatter(timestamp: str, request: Request) -> str:
        line: str = combinedLogFormatter(timestamp, request)
        return redact_text(line, names)

    directlyProvides(formatter, IAccessLogFormatter)
    return formatter


#: The access-log formatter for the default token parameter, ``token``.
redacting_log_formatter = access_log_formatter()
