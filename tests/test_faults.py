"""What counts against an upstream instance (passive health), as one table."""

from __future__ import annotations

import builtins
import errno

import pytest
from OpenSSL import SSL
from twisted.internet import error
from twisted.internet.defer import CancelledError
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.python.failure import Failure
from twisted.web.client import (
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)

from twisted_gateway.errors import GatewayTimeout
from twisted_gateway.faults import classify, describe, mark_malformed, mark_reused


def _never(reason: BaseException) -> ResponseNeverReceived:
    return ResponseNeverReceived([Failure(reason)])


def _on_kept_alive(error: BaseException) -> BaseException:
    mark_reused(error)
    return error


def _malformed(error: BaseException) -> BaseException:
    mark_malformed(error)
    return error


@pytest.mark.parametrize(
    "reason, facts, expected",
    [
        # counted: the upstream could not be reached, or said nothing
        (error.ConnectionRefusedError(), {}, ("connect_refused", True)),
        (builtins.ConnectionRefusedError(errno.ECONNREFUSED, "refused"), {}, ("connect_refused", True)),
        (error.TimeoutError(), {}, ("connect_timeout", True)),
        (error.DNSLookupError("no such host"), {}, ("connect_failed", True)),
        (error.NoRouteError(), {}, ("connect_failed", True)),
        (_never(SSL.Error([("SSL", "", "certificate verify failed")])), {}, ("tls", True)),
        (SSL.Error([("SSL", "", "wrong version number")]), {}, ("tls", True)),
        (_never(error.ConnectionDone()), {}, ("reset_before_head", True)),
        (_never(error.ConnectionLost()), {}, ("reset_before_head", True)),
        (RequestTransmissionFailed([Failure(error.ConnectionLost())]), {}, ("reset_before_head", True)),
        (builtins.ConnectionResetError(errno.ECONNRESET, "reset"), {}, ("reset_before_head", True)),
        (_malformed(ResponseFailed([Failure(ValueError("bad framing"))])), {}, ("malformed_answer", True)),
        (GatewayTimeout("no head in time"), {}, ("no_head_timeout", True)),
        (DeferredTimeout(), {}, ("no_head_timeout", True)),
        # an open WebSocket leg that stopped answering pings or TCP keepalive probes
        (None, {"silent": True}, ("keepalive_timeout", True)),
        (error.ConnectionLost(), {"silent": True}, ("keepalive_timeout", True)),
        # the client went away, at any stage: whatever the error, we caused it
        (_never(error.ConnectionAborted()), {"client_gone": True}, ("client_gone", False)),
        (error.ConnectionRefusedError(), {"client_gone": True}, ("client_gone", False)),
        (DeferredTimeout(), {"client_gone": True}, ("client_gone", False)),
        (None, {"client_gone": True, "silent": True}, ("client_gone", False)),
        (None, {"client_gone": True, "answered": True}, ("client_gone", False)),
        # any cancellation, including Twisted's for a cancelled connect
        (CancelledError(), {}, ("cancelled", False)),
        (error.ConnectingCancelledError(None), {}, ("cancelled", False)),
        (_never(CancelledError()), {}, ("cancelled", False)),
        (ResponseFailed([Failure(CancelledError())]), {}, ("cancelled", False)),
        # any answer: a status is an answer, a body cut short after the head too
        (None, {"answered": True}, ("answered", False)),
        (None, {}, ("answered", False)),
        (ResponseFailed([Failure(error.ConnectionLost())]), {"answered": True}, ("body_cut", False)),
        (_malformed(ResponseFailed([Failure(ValueError("bad chunk"))])), {"answered": True}, ("body_cut", False)),
        # our own side of the connect is short of something
        (error.ConnectError(osError=errno.EMFILE, string="too many open files"), {}, ("local", False)),
        (error.ConnectError(osError=errno.ENFILE), {}, ("local", False)),
        (error.ConnectError(osError=errno.ENOBUFS), {}, ("local", False)),
        (error.ConnectError(osError=errno.EADDRNOTAVAIL), {}, ("local", False)),
        (error.ConnectBindError(errno.EMFILE, "too many open files"), {}, ("local", False)),
        (OSError(errno.EMFILE, "too many open files"), {}, ("local", False)),
        (RequestNotSent(), {}, ("reset_before_head", True)),
        # a kept-alive connection closed as a request that cannot be sent again went out
        (_on_kept_alive(_never(error.ConnectionDone())), {}, ("keepalive_closed", False)),
        (_on_kept_alive(_never(error.ConnectionLost())), {}, ("keepalive_closed", False)),
        (_on_kept_alive(_never(CancelledError())), {}, ("cancelled", False)),
        (_on_kept_alive(_never(error.ConnectionLost())), {"client_gone": True}, ("client_gone", False)),
        (_on_kept_alive(_never(error.ConnectionLost())), {"answered": True}, ("body_cut", False)),
    ],
)
def test_what_counts_against_an_upstream(reason, facts, expected):
    fault = classify(reason, **facts)
    assert (fault.reason, fault.counts) == expected


def test_a_reason_reads_as_words_in_a_log_line():
    assert classify(error.ConnectionRefusedError()).words == "connect refused"


@pytest.mark.parametrize(
    "error, expected",
    [
        (error.ConnectionRefusedError(), "Connection was refused by other side."),
        (ValueError(" spaced "), "spaced"),
        (CancelledError(), "CancelledError"),
        (ResponseFailed([Failure(error.ConnectionLost("gone"))]), "Connection to the other side was lost in a non-clean fashion: gone."),
    ],
    ids=["message", "stripped", "type when silent", "first reason of an Agent's failure"],
)
def test_describe_says_what_failed_in_a_few_words(error, expected):
    """Health checks and WebSocket connects name a failure the same way."""
    assert describe(error) == expected
