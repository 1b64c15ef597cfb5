"""
Whose fault a failed upstream attempt was: the one rule of passive health.

An instance is taken out of service only for what the upstream did (or did
not do): a refused or timed-out connect, a TLS failure, a connection closed
before the response head, an answer whose head could not be read as HTTP/1.1
(ambiguous or malformed framing), no head in time, an open WebSocket that
stopped answering (keepalive). What the client did (went away, at any stage), what
the gateway did (cancelled an attempt, ran out of file
descriptors or ports), and any answer the upstream gave (4xx and 5xx, a 200
to an upgrade request, a body cut short after its head) never count. The
HTTP forwarder and the WebSocket handshake both ask :func:`classify`, so the
rule lives here only, as a pure function over an exception and two facts.

A request that fails on a kept-alive connection, before any answer, and cannot
be sent again (a POST that may have reached the upstream) does not count
either: upstreams close idle connections on their own schedule, and a request
sent as the close is on its way meets it. A dead upstream shows on the next
fresh connection, which counts.
"""

from __future__ import annotations

import builtins
import errno
from dataclasses import dataclass
from typing import Callable

from twisted.internet.defer import CancelledError
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.error import (
    ConnectBindError,
    ConnectError,
    ConnectingCancelledError,
    ConnectionRefusedError,
    DNSLookupError,
)
from twisted.internet.error import TimeoutError as ConnectTimeout
from twisted.web.client import ResponseFailed

from twisted_gateway.errors import GatewayTimeout
from twisted_gateway.tls import describe_tls_failure

#: Errors of our own side of a connect: the gateway is short of something.
LOCAL_ERRNOS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EADDRNOTAVAIL, errno.EADDRINUSE}
)

#: Reasons that count against the upstream (the label of the failures metric).
COUNTED = (
    "connect_refused",
    "connect_timeout",
    "connect_failed",
    "tls",
    "reset_before_head",
    "malformed_answer",
    "no_head_timeout",
    "keepalive_timeout",
)


@dataclass(frozen=True)
class Fault:
    """What an attempt's outcome means for the upstream's health."""

    #: a short label: one of :data:`COUNTED`, or client_gone, cancelled,
    #: answered, body_cut, local, keepalive_closed
    reason: str
    #: whether passive health counts it against the instance
    counts: bool

    @property
    def words(self) -> str:
        """The reason as a log line says it (``connect refused``)."""
        return self.reason.replace("_", " ")


def _counted(reason: str) -> Fault:
    return Fault(reason, True)


CLIENT_GONE = Fault("client_gone", False)
CANCELLED = Fault("cancelled", False)
ANSWERED = Fault("answered", False)
BODY_CUT = Fault("body_cut", False)
LOCAL = Fault("local", False)
KEEPALIVE_CLOSED = Fault("keepalive_closed", False)

#: The attribute :func:`mark_reused` sets on the error of a request sent on a kept-alive connection.
_REUSED = "on_reused_connection"
#: The attribute :func:`mark_malformed` sets on the error of an answer that could not be read.
_MALFORMED = "malformed_answer"


def mark_reused(error: BaseException) -> None:
    """Say that ``error`` ended a request sent on a kept-alive (pooled) connection."""
    setattr(error, _REUSED, True)


def mark_malformed(error: BaseException) -> None:
    """Say that ``error`` ended a request whose answer's head could not be read as HTTP/1.1."""
    setattr(error, _MALFORMED, True)


def classify(
    reason: BaseException | None,
    *,
    client_gone: bool = False,
    answered: bool = False,
    silent: bool = False,
) -> Fault:
    """
    The :class:`Fault` of one attempt. ``client_gone``: the client left
    before the attempt ended (whatever the error says then, we caused it).
    ``answered``: the upstream sent a response head (any status; a failure
    after it is a body cut short). ``silent``: an open WebSocket leg stopped
    answering (no pong in time, or TCP keepalive gave up on it). ``reason``
    is the exception the attempt ended with, as the client library raised it
    (wrappers are looked into).
    """
    if client_gone:
        return CLIENT_GONE
    if silent:
        return _counted("keepalive_timeout")
    if answered:
        return BODY_CUT if reason is not None else ANSWERED
    if reason is None:
        return ANSWERED
    if _any(reason, lambda e: isinstance(e, (CancelledError, ConnectingCancelledError))):
        return CANCELLED
    if _any(reason, _is_local):
        return LOCAL
    if _any(reason, lambda e: getattr(e, _REUSED, False)):
        return KEEPALIVE_CLOSED
    if _any(reason, lambda e: getattr(e, _MALFORMED, False)):
        return _counted("malformed_answer")
    if _any(reason, lambda e: isinstance(e, (ConnectionRefusedError, builtins.ConnectionRefusedError))):
        return _counted("connect_refused")
    if _any(reason, lambda e: isinstance(e, ConnectTimeout)):
        return _counted("connect_timeout")
    if describe_tls_failure(reason) is not None:
        return _counted("tls")
    if _any(reason, lambda e: isinstance(e, (ConnectError, DNSLookupError))):
        return _counted("connect_failed")
    if _any(reason, lambda e: isinstance(e, (DeferredTimeout, GatewayTimeout, TimeoutError))):
        return _counted("no_head_timeout")
    return _counted("reset_before_head")


def _is_local(error: BaseException) -> bool:
    if isinstance(error, ConnectBindError):
        return True
    if isinstance(error, ConnectError):
        return getattr(error, "osError", None) in LOCAL_ERRNOS
    if isinstance(error, OSError) and not isinstance(
        error, (ConnectionError, TimeoutError, DNSLookupError)
    ):
        return True
    return False


def _any(error: BaseException, test: Callable[[BaseException], bool]) -> bool:
    """``test`` holds for ``error`` or for a reason it wraps (``Agent``'s ``ResponseFailed``)."""
    if test(error):
        return True
    for reason in getattr(error, "reasons", None) or ():
        value = getattr(reason, "value", reason)
        if isinstance(value, BaseException) and _any(value, test):
            return True
    return False


def describe(error: BaseException) -> str:
    """
    A failed attempt in a few words for a log line or a 502's detail: the
    error's message, else its type's name; for an ``Agent``'s
    ``ResponseFailed``, what its first reason says.
    """
    if isinstance(error, ResponseFailed) and error.reasons:
        error = error.reasons[0].value
    return str(error).strip() or type(error).__name__
