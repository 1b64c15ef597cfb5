"""
The front door without sockets: a gateway ``Site`` over ``StringTransport``
on an injected clock (the slow-client timers), and the connection cap.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.http import datetimeToString, parse_qs
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from twisted_gateway.config import GatewaySettings, Settings
from twisted_gateway.limits import ClientLimits
from twisted_gateway.metrics import Metrics
from twisted_gateway.site import FrontDoor, build_site

PEER = IPv4Address("TCP", "203.0.113.7", 40000)


class Answer(Resource):
    """Answers every request with the size of its body; ``/hold`` answers when told."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.held: list = []

    def render(self, request):
        if request.path == b"/hold":
            self.held.append(request)
            return NOT_DONE_YET
        return b"%d" % len(request.content.read())


def gateway_settings(**gateway) -> Settings:
    return Settings(gateway=replace(GatewaySettings(), **gateway))


class Door:
    """A gateway site on a clock; :meth:`connect` opens one client connection."""

    def __init__(self, **gateway) -> None:
        self.clock = Clock()
        self.resource = Answer()
        self.site = build_site(self.resource, gateway_settings(**gateway), self.clock)

    def connect(self) -> tuple[object, StringTransport]:
        channel = self.site.buildProtocol(PEER)
        transport = StringTransport(peerAddress=PEER)
        channel.makeConnection(transport)
        return channel, transport


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


def error_of(raw: bytes) -> dict:
    return json.loads(raw.partition(b"\r\n\r\n")[2])


def close(channel) -> None:
    channel.connectionLost(Failure(ConnectionDone()))


# -- client_header_timeout ----------------------------------------------------------


def test_a_head_trickled_one_byte_every_few_seconds_is_cut_off_with_408_at_client_header_timeout():
    door = Door(client_header_timeout=60.0)
    channel, transport = door.connect()
    head = b"GET /slow HTTP/1.1\r\nHost: gw\r\nX-Pad: " + b"a" * 40
    for byte in head[:17]:  # 17 bytes, 3.5 s apart: 59.5 s
        door.clock.advance(3.5)
        channel.dataReceived(bytes([byte]))
    assert not transport.disconnecting
    door.clock.advance(0.5)
    assert status_of(transport.value()) == 408
    assert error_of(transport.value())["error"] == "header_timeout"
    assert transport.disconnecting
    channel.dataReceived(b"more")  # read and dropped while the answer leaves
    close(channel)
    assert not door.clock.getDelayedCalls()


def test_a_connection_that_sends_nothing_is_closed_at_client_header_timeout_without_an_answer():
    door = Door(client_header_timeout=20.0)
    channel, transport = door.connect()
    door.clock.advance(19.9)
    assert not transport.disconnecting
    door.clock.advance(0.1)
    assert transport.disconnecting and transport.value() == b""
    close(channel)


def test_a_head_that_arrives_in_time_is_answered_and_the_header_timer_stops():
    door = Door(client_header_timeout=10.0)
    channel, transport = door.connect()
    door.clock.advance(9)
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert status_of(transport.value()) == 200
    door.clock.advance(5)  # past the head's deadline: the connection stays, now idle
    assert not transport.disconnecting
    close(channel)


# -- client_body_timeout --------------------------------------------------------------


def test_a_body_that_keeps_coming_is_never_cut_off_however_long_it_takes():
    door = Door(client_body_timeout=10.0, client_header_timeout=10.0)
    channel, transport = door.connect()
    channel.dataReceived(b"POST /up HTTP/1.1\r\nHost: gw\r\nContent-Length: 30\r\n\r\n")
    for _ in range(30):  # 30 bytes, 9 s apart: 270 s in all
        door.clock.advance(9)
        channel.dataReceived(b"x")
    assert status_of(transport.value()) == 200
    assert transport.value().endswith(b"\r\n\r\n30")
    close(channel)


@pytest.mark.parametrize(
    "timeout, head",
    [
        pytest.param(10.0, b"Content-Length: 30\r\n\r\nhalf", id="content-length"),
        pytest.param(5.0, b"Transfer-Encoding: chunked\r\n\r\n4\r\nab", id="chunked"),
    ],
)
def test_a_body_that_pauses_longer_than_client_body_timeout_is_cut_off_with_408(timeout, head):
    door = Door(client_body_timeout=timeout)
    channel, transport = door.connect()
    channel.dataReceived(b"POST /up HTTP/1.1\r\nHost: gw\r\n" + head)
    door.clock.advance(timeout - 0.1)
    assert transport.value() == b""
    door.clock.advance(0.1)
    assert status_of(transport.value()) == 408
    assert error_of(transport.value())["error"] == "body_timeout"
    assert transport.disconnecting
    assert door.resource.held == []  # the request never reached the resource tree
    close(channel)


# -- keepalive_timeout ----------------------------------------------------------------


def test_an_idle_keep_alive_connection_is_closed_after_keepalive_timeout_without_a_408():
    door = Door(keepalive_timeout=75.0, client_header_timeout=5.0)
    channel, transport = door.connect()
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n")
    answered = transport.value()
    door.clock.advance(74.9)
    assert not transport.disconnecting
    door.clock.advance(0.1)
    assert transport.disconnecting
    assert transport.value() == answered
    close(channel)


def test_the_next_request_on_a_keep_alive_connection_gets_a_fresh_header_timeout():
    door = Door(keepalive_timeout=75.0, client_header_timeout=5.0)
    channel, transport = door.connect()
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n")
    door.clock.advance(70)
    channel.dataReceived(b"GET / HTTP/1.1\r\n")
    door.clock.advance(4.9)  # past the keep-alive deadline, within the new head's
    assert not transport.disconnecting
    door.clock.advance(0.1)
    assert transport.disconnecting
    first, second = transport.value().split(b"HTTP/1.1 ")[1:]
    assert first.startswith(b"200 ") and second.startswith(b"408 ")
    close(channel)


def test_no_timer_cuts_off_a_request_while_it_is_being_answered():
    door = Door(keepalive_timeout=5.0, client_header_timeout=5.0, client_body_timeout=5.0)
    channel, transport = door.connect()
    channel.dataReceived(b"GET /hold HTTP/1.1\r\nHost: gw\r\n\r\n")
    door.clock.advance(600)
    assert not transport.disconnecting
    (request,) = door.resource.held
    request.write(b"late")
    request.finish()
    assert status_of(transport.value()) == 200
    door.clock.advance(5)  # then the keep-alive timer runs again
    assert transport.disconnecting
    close(channel)


def test_a_kept_alive_connection_keeps_one_timer_across_its_requests():
    door = Door(keepalive_timeout=75.0, client_header_timeout=5.0)
    channel, transport = door.connect()
    (timer,) = door.clock.getDelayedCalls()
    for _ in range(3):
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert door.clock.getDelayedCalls() == [timer]  # reset, not made again
    assert transport.value().count(b"HTTP/1.1 200 ") == 3
    door.clock.advance(75)
    assert transport.disconnecting
    close(channel)


@pytest.mark.parametrize("method, of_request", [("getHost", "getHost"), ("getPeer", "getClientAddress")])
def test_the_addresses_are_asked_of_the_transport_once_per_connection(method, of_request):
    door = Door()
    channel, transport = door.connect()
    asked = []
    address = getattr(transport, method)()
    setattr(transport, method, lambda: asked.append(1) or address)
    for _ in range(3):
        channel.dataReceived(b"GET /hold HTTP/1.1\r\nHost: gw\r\n\r\n")
        (request,) = door.resource.held
        door.resource.held.clear()
        assert getattr(request, of_request)() is address
        request.finish()
    assert asked == [1]
    close(channel)


def test_responses_say_server_and_date_as_twisted_web_does_the_date_formatted_once_a_second():
    door = Door()
    door.clock.advance(1_700_000_000.25)
    channel, transport = door.connect()
    for second in (1_700_000_000, 1_700_000_000, 1_700_000_001):
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n")
        head = transport.value().partition(b"\r\n\r\n")[0].split(b"\r\n")
        transport.clear()
        assert b"Date: " + datetimeToString(second) in head
        assert b"Server: " + server.version in head
        door.clock.advance(0.5)
    close(channel)


@pytest.mark.parametrize(
    ("target", "path", "args"),
    [
        (b"/hold?a=1&b=x+y&a=%32&c=&d", b"/hold", {b"a": [b"1", b"2"], b"b": [b"x y"], b"c": [b""]}),
        (b"/hold?", b"/hold", {}),
        (b"/hold", b"/hold", {}),
    ],
)
def test_a_requests_arguments_are_its_querys_as_twisted_web_parses_them_read_only_when_asked_for(target, path, args):
    """``request.args`` is twisted.web's (``parse_qs``); a request that never reads it (a forwarded one) never parses it."""
    door = Door()
    channel, _ = door.connect()
    channel.dataReceived(b"GET " + target + b" HTTP/1.1\r\nHost: gw\r\n\r\n")
    (request,) = door.resource.held
    door.resource.held.clear()
    assert (request.uri, request.path) == (target, path)
    assert request._args is None  # not parsed yet
    assert request.args == args == (parse_qs(target.partition(b"?")[2], 1) if b"?" in target else {})
    assert request.args is request.args  # parsed once
    request.finish()
    close(channel)


def test_a_closed_connection_leaves_no_timer():
    door = Door()
    for data in (b"", b"GET / HT", b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nab", b"GET / HTTP/1.1\r\n\r\n"):
        channel, _ = door.connect()
        channel.dataReceived(data)
        close(channel)
    assert door.clock.getDelayedCalls() == []


# -- max_client_connections -----------------------------------------------------------


class Connections:
    """A FrontDoor over a gateway site; :meth:`open` accepts one client connection."""

    def __init__(self, cap: int, refusals: int) -> None:
        self.clock = Clock()
        self.metrics = Metrics()
        site = build_site(Answer(), gateway_settings(), self.clock)
        self.door = FrontDoor(ClientLimits(cap, refusals), self.clock, self.metrics)
        self.factory = self.door.wrap(site)

    def open(self) -> tuple[object, StringTransport]:
        protocol = self.factory.buildProtocol(PEER)
        transport = StringTransport(peerAddress=PEER)
        protocol.makeConnection(transport)
        return protocol, transport


def test_past_max_client_connections_a_new_client_gets_503_overloaded_and_the_others_keep_working():
    connections = Connections(cap=2, refusals=4)
    served = [connections.open() for _ in range(2)]
    protocol, refused = connections.open()
    assert status_of(refused.value()) == 503
    assert error_of(refused.value())["error"] == "overloaded"
    assert refused.disconnecting
    for slot, transport in served:
        slot.dataReceived(b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert status_of(transport.value()) == 200
    assert connections.door.open == 2
    assert connections.metrics.connections_refused == 1
    close(protocol)
    for slot, _ in served:
        close(slot)


def test_past_the_refusals_too_a_connection_is_closed_as_soon_as_it_is_accepted():
    connections = Connections(cap=1, refusals=2)
    first = connections.open()
    refusals = [connections.open() for _ in range(2)]
    dropped, transport = connections.open()
    assert transport.value() == b"" and transport.disconnected
    assert connections.metrics.connections_refused == 3
    for protocol, _ in (first, *refusals):
        close(protocol)


def test_the_door_opens_again_as_soon_as_a_connection_closes():
    connections = Connections(cap=1, refusals=1)
    slot, _ = connections.open()
    refusal, refused = connections.open()
    assert status_of(refused.value()) == 503
    close(refusal)
    close(slot)
    again, transport = connections.open()
    again.dataReceived(b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert status_of(transport.value()) == 200
    close(again)


@implementer(ITCPTransport)
class TCPTransport(StringTransport):
    """A StringTransport that half-closes like a TCP socket."""

    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True


def test_a_refused_client_that_never_closes_is_aborted_after_a_moment():
    connections = Connections(cap=0, refusals=1)
    refusal = connections.factory.buildProtocol(PEER)
    transport = TCPTransport(peerAddress=PEER)
    refusal.makeConnection(transport)
    assert status_of(transport.value()) == 503
    assert transport.write_closed and not transport.disconnected
    refusal.dataReceived(b"GET / HTTP/1.1\r\n\r\n")  # read and dropped
    connections.clock.advance(1.0)
    assert transport.disconnected
    close(refusal)
    assert connections.clock.getDelayedCalls() == []


def test_refusals_are_logged_at_most_once_a_second_with_a_count():
    connections = Connections(cap=1, refusals=1000)
    opened = [connections.open()]
    with capturedLogs() as events:
        for _ in range(50):
            opened.append(connections.open())
            connections.clock.advance(0.01)  # 50 refusals in 0.5 s
        connections.clock.advance(0.5)
        for _ in range(10):
            opened.append(connections.open())
        close(opened[0][0])  # back under the cap: the rest of the count is reported
    refused = [e for e in events if e.get("event") == "connections_refused"]
    assert [e["count"] for e in refused] == [1, 50, 9]
    for protocol, _ in opened[1:]:
        close(protocol)


# -- writing -----------------------------------------------------------------------


def test_a_response_head_written_before_its_body_reaches_the_client_at_once():
    """A streamed response's head is not held back waiting for body bytes (a long poll, SSE)."""
    door = Door()
    channel, transport = door.connect()
    channel.dataReceived(b"GET /hold HTTP/1.1\r\nHost: gw\r\n\r\n")
    [request] = door.resource.held
    request.setHeader(b"content-type", b"text/event-stream")
    request.write(b"")
    assert status_of(transport.value()) == 200
    assert transport.value().endswith(b"\r\n\r\n")
    request.write(b"data: 1\n\n")
    assert b"data: 1\n\n" in transport.value()
    request.finish()
    close(channel)
