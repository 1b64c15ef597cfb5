"""
The HTTP forwarder without sockets: its pure rules as tables, then a gateway
``Site`` over ``StringTransport`` forwarding to an in-memory upstream
(``treq.testing.RequestTraversalAgent``) on a ``MemoryReactorClock``.
"""

from __future__ import annotations

import ipaddress
import json

import pytest
from treq.testing import RequestTraversalAgent
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError
from twisted.internet.error import (
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
    DNSLookupError,
)
from twisted.internet.error import TimeoutError as ConnectTimeout
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.web.client import (
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from twisted_gateway.config import GatewaySettings
from twisted_gateway.http_proxy import (
    may_replay,
    GatewayRequest,
    HTTPForwarder,
    log_target,
    response_header_pairs,
    upstream_failure,
)
from twisted_gateway.routing import normalize_path, split_uri

from tests.support import echo_answer
from tests.support import parse_response as http_response

UPSTREAM = "http://upstream.test:8000"


# -- pure rules -----------------------------------------------------------------


@pytest.mark.parametrize(
    "query, secrets, expected",
    [
        (b"", (), ""),
        (b"a=1", (), "a=1"),
        (b"token=abc", (), "token=REDACTED"),
        (b"a=1&token=abc&b=2", (), "a=1&token=REDACTED&b=2"),
        (b"token=abc&token=def", (), "token=REDACTED&token=REDACTED"),
        (b"TOKEN=abc", (), "TOKEN=REDACTED"),
        (b"%74oken=abc", (), "%74oken=REDACTED"),
        (b"a=1;token=abc", (), "a=1;token=REDACTED"),
        (b"access_token=abc&x=1", (), "access_token=REDACTED&x=1"),
        (b"a=1;jwt=opaque-value&b=2", ("jwt",), "a=1;jwt=REDACTED&b=2"),
        (b"j%77t=opaque-value", ("jwt",), "j%77t=REDACTED"),
        (b"tokens=1&room=2", (), "tokens=1&room=2"),
    ],
)
def test_log_target_redacts_every_token_parameter_whatever_the_separator(query, secrets, expected):
    """The access event's target never shows a token: ``*token`` and the configured names."""
    assert log_target(b"/a/b", query, secrets) == "/a/b" + ("?" + expected if expected else "")


def test_log_target_is_the_normalised_path_and_redacted_query():
    """A log line shows ``/path?query`` with the token redacted, and no ``?`` when empty."""
    assert log_target(b"/a/b", b"token=x&y=1") == "/a/b?token=REDACTED&y=1"
    assert log_target(b"/a/b", b"") == "/a/b"


def test_response_headers_drop_hop_by_hop_and_keep_repeats():
    """Set-Cookie headers stay separate and in order; hop-by-hop headers go."""
    headers = Headers()
    for name, value in [
        (b"Set-Cookie", b"a=1"),
        (b"Content-Type", b"text/plain"),
        (b"Set-Cookie", b"b=2; Path=/"),
        (b"Proxy-Authenticate", b"Basic"),
        (b"Trailer", b"X-Sum"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Connection", b"X-Hop"),
        (b"X-Hop", b"1"),
        (b"Location", b"/elsewhere"),
    ]:
        headers.addRawHeader(name, value)
    pairs = [(k.lower(), v) for k, v in response_header_pairs(headers)]
    assert pairs == [
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2; Path=/"),
        (b"content-type", b"text/plain"),
        (b"location", b"/elsewhere"),
    ]


@pytest.mark.parametrize(
    "reason, status",
    [
        (ConnectionRefusedError(), 502),
        (DNSLookupError("nowhere"), 502),
        (ConnectTimeout(), 504),
        (ResponseNeverReceived([Failure(ConnectionDone())]), 502),
        (ValueError("odd"), 502),
    ],
)
def test_upstream_failures_map_to_gateway_statuses(reason, status):
    """Refused or broken upstream connections are 502; a connect timeout is 504."""
    assert upstream_failure(reason, GatewaySettings()).status == status


# -- a gateway over StringTransport ---------------------------------------------


def parse_response(raw: bytes) -> tuple[int, bytes, list[tuple[bytes, bytes]], bytes]:
    """Status, reason, headers and (de-chunked) body of one complete HTTP/1.1 response."""
    status, reason, headers, body, complete = http_response(raw)
    assert complete, raw
    return status, reason, headers, body


def header_values(headers, name: bytes) -> list[bytes]:
    return [value for key, value in headers if key.lower() == name]


class Echo(Resource):
    """An upstream that answers with what it received, as JSON."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list = []

    def render(self, request):
        body = request.content.read()
        self.seen.append(request)
        return echo_answer(request, body=body.decode("latin-1"))


class Canned(Resource):
    """An upstream with a fixed status, reason and headers, and no content type."""

    isLeaf = True

    def __init__(self, code: int, reason: bytes, headers, body: bytes = b"") -> None:
        super().__init__()
        self.code, self.reason, self.headers, self.body = code, reason, headers, body

    def render(self, request):
        request.setResponseCode(self.code, self.reason)
        request.defaultContentType = None
        for name, value in self.headers:
            request.responseHeaders.addRawHeader(name, value)
        return self.body


class Silent(Resource):
    """Never answers (the test may); remembers its requests and whether their clients went away."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.lost: list[Failure] = []
        self.held: list[Request] = []

    def render(self, request):
        self.held.append(request)
        request.notifyFinish().addErrback(self.lost.append)
        return NOT_DONE_YET


class ForwardAll(Resource):
    """The gateway under test: every request goes to one upstream."""

    isLeaf = True

    def __init__(self, forwarder: HTTPForwarder, **options) -> None:
        super().__init__()
        self.forwarder, self.options = forwarder, options

    def render(self, request):
        path, query = split_uri(request.uri)
        return self.forwarder.forward(
            request, UPSTREAM, normalize_path(path), query, **self.options
        )


@implementer(IAgent)
class RecordingAgent:
    """An in-memory upstream agent that remembers what the forwarder asked of it."""

    def __init__(self, upstream: Resource) -> None:
        self._agent = RequestTraversalAgent(upstream)
        self.requests: list[tuple[bytes, bytes, Headers]] = []

    def request(self, method, uri, headers=None, bodyProducer=None):
        self.requests.append((method, uri, headers))
        return self._agent.request(method, uri, headers, bodyProducer)

    def flush(self) -> None:
        self._agent.flush()

    def sent_headers(self) -> list[tuple[str, str]]:
        """The last request's headers as the forwarder passed them, lower-cased names."""
        headers = self.requests[-1][2]
        return [
            (k.decode().lower(), v.decode())
            for k, vs in headers.getAllRawHeaders()
            for v in vs
        ]


class Gateway:
    """A gateway Site over StringTransport, its in-memory upstream and clock."""

    def __init__(
        self,
        upstream: Resource,
        settings: GatewaySettings = GatewaySettings(),
        *,
        peer: str = "203.0.113.7",
        **forward_options,
    ) -> None:
        self.settings = settings
        self.clock = MemoryReactorClock()
        self.agent = RecordingAgent(upstream)
        self.forwarder = HTTPForwarder(self.settings, self.clock, agent=self.agent)
        self.site = Site(ForwardAll(self.forwarder, **forward_options), reactor=self.clock)
        self.peer = peer

    def request(self, raw: bytes) -> StringTransport:
        self.protocol = self.site.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", self.peer, 40000))
        self.protocol.makeConnection(transport)
        self.protocol.dataReceived(raw)
        self.pump()
        return transport

    def pump(self) -> None:
        for _ in range(50):
            self.agent.flush()
            self.clock.advance(0)

    def close(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone()))
        self.forwarder.close()


@pytest.fixture
def echo():
    return Echo()


def test_request_headers_are_rewritten_for_the_upstream(echo):
    """Hop-by-hop and Connection-named headers go, repeats stay, X-Forwarded-* are added, Host kept."""
    gateway = Gateway(echo)
    transport = gateway.request(
        b"GET /a/./b/../c%2Fd?x=1&x=2 HTTP/1.1\r\n"
        b"Host: gw.example\r\n"
        b"Connection: keep-alive, X-Foo\r\n"
        b"X-Foo: secret\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"Proxy-Authorization: Basic eA==\r\n"
        b"TE: trailers\r\n"
        b"Trailer: X-Sum\r\n"
        b"Upgrade: h2c\r\n"
        b"X-Multi: one\r\n"
        b"X-Multi: two\r\n"
        b"X-Forwarded-For: 198.51.100.1\r\n"
        b"X-Auth-Subject: forged\r\n"
        b"\r\n"
    )
    status, _, _, body = parse_response(transport.value())
    assert status == 200
    assert json.loads(body)["uri"] == "/a/c%2Fd?x=1&x=2"
    headers = gateway.agent.sent_headers()
    names = [name for name, _ in headers]
    for hop in ("connection", "x-foo", "keep-alive", "proxy-connection",
                "proxy-authorization", "te", "trailer", "upgrade", "x-auth-subject"):
        assert hop not in names
    assert [v for k, v in headers if k == "x-multi"] == ["one", "two"]
    # host_header = client (the default): the upstream is addressed as the client addressed us
    assert [v for k, v in json.loads(body)["headers"] if k == "host"] == ["gw.example"]
    assert [v for k, v in headers if k == "x-forwarded-for"] == ["203.0.113.7"]
    assert [v for k, v in headers if k == "x-forwarded-proto"] == ["http"]
    assert [v for k, v in headers if k == "x-forwarded-host"] == ["gw.example"]
    gateway.close()


def test_forwarded_for_chain_is_kept_only_from_trusted_proxies(echo):
    """A trusted proxy's X-Forwarded-For is extended; anyone else's is replaced."""
    trusted = (ipaddress.ip_network("203.0.113.0/24"),)
    gateway = Gateway(echo, GatewaySettings(trusted_proxies=trusted))
    transport = gateway.request(
        b"GET / HTTP/1.1\r\nHost: gw\r\nX-Forwarded-For: 198.51.100.1\r\n\r\n"
    )
    assert parse_response(transport.value())[0] == 200
    headers = gateway.agent.sent_headers()
    assert [v for k, v in headers if k == "x-forwarded-for"] == ["198.51.100.1, 203.0.113.7"]
    gateway.close()


def test_caller_identity_headers_are_added_and_dropped_headers_removed(echo):
    """The caller adds verified identity headers and can withhold e.g. Authorization."""
    gateway = Gateway(
        echo,
        extra_headers=[(b"X-Auth-Subject", b"alice")],
        drop_headers=frozenset({b"Authorization"}),
    )
    transport = gateway.request(
        b"GET / HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer t\r\n"
        b"X-Auth-Subject: mallory\r\n\r\n"
    )
    assert parse_response(transport.value())[0] == 200
    headers = gateway.agent.sent_headers()
    assert [v for k, v in headers if k == "x-auth-subject"] == ["alice"]
    assert "authorization" not in [k for k, _ in headers]
    gateway.close()


@pytest.mark.parametrize("method", [b"GET", b"DELETE", b"OPTIONS", b"PURGE", b"purge", b"MKCOL"])
def test_any_token_method_is_passed_as_is(echo, method):
    """Methods reach the upstream unchanged, including unknown and lower-case ones."""
    gateway = Gateway(echo)
    transport = gateway.request(method + b" /m HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert json.loads(parse_response(transport.value())[3])["method"] == method.decode()
    gateway.close()


@pytest.mark.parametrize("method", [b"POST", b"PUT", b"PATCH"])
def test_request_bodies_are_forwarded(echo, method):
    """A body with Content-Length or chunked framing reaches the upstream intact."""
    gateway = Gateway(echo)
    transport = gateway.request(
        method + b" /b HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )
    seen = json.loads(parse_response(transport.value())[3])
    assert seen["body"] == "hello world"
    assert [v for k, v in seen["headers"] if k == "content-length"] == ["11"]
    assert "transfer-encoding" not in [k for k, _ in seen["headers"]]
    gateway.close()


def test_status_reason_and_headers_come_back_as_the_upstream_sent_them():
    """Odd status codes and reasons, every Set-Cookie, no invented Content-Type."""
    upstream = Canned(
        299,
        b"Fine Thanks",
        [(b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2"), (b"X-Custom", b"v")],
        b"payload",
    )
    gateway = Gateway(upstream)
    transport = gateway.request(b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n")
    status, reason, headers, body = parse_response(transport.value())
    assert (status, reason, body) == (299, b"Fine Thanks", b"payload")
    assert header_values(headers, b"set-cookie") == [b"a=1", b"b=2"]
    assert header_values(headers, b"x-custom") == [b"v"]
    assert header_values(headers, b"content-type") == []
    assert header_values(headers, b"content-length") == [b"7"]
    gateway.close()


def test_redirects_are_passed_through_not_followed():
    """A 302 reaches the client with its Location; the gateway does not follow it."""
    upstream = Canned(302, b"Found", [(b"Location", b"http://elsewhere.test/x")])
    gateway = Gateway(upstream)
    transport = gateway.request(b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n")
    status, _, headers, _ = parse_response(transport.value())
    assert status == 302
    assert header_values(headers, b"location") == [b"http://elsewhere.test/x"]
    gateway.close()


def test_no_response_head_within_request_timeout_is_504():
    """An upstream that never answers gets the client a JSON 504 after request_timeout."""
    upstream = Silent()
    gateway = Gateway(upstream, GatewaySettings(request_timeout=2.0))
    transport = gateway.request(b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert transport.value() == b""
    gateway.clock.advance(2.0)
    gateway.pump()
    status, _, headers, body = parse_response(transport.value())
    assert status == 504
    assert header_values(headers, b"content-type") == [b"application/json"]
    assert json.loads(body)["error"] == "gateway_timeout"
    assert len(upstream.lost) == 1
    gateway.close()
    assert gateway.clock.getDelayedCalls() == []


@pytest.mark.parametrize("gateway_request", [False, True])
def test_a_client_leaving_before_the_head_cancels_the_upstream_request_and_is_logged(gateway_request):
    """A GatewayRequest tells the forwarding itself; a plain Request is watched through notifyFinish."""
    upstream = Silent()
    gateway = Gateway(upstream)
    if gateway_request:
        gateway.site.requestFactory = GatewayRequest.for_settings(gateway.settings)
    with capturedLogs() as events:
        gateway.request(b"GET /a HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert upstream.lost == []
        gateway.protocol.connectionLost(Failure(ConnectionDone()))
        gateway.pump()
    assert len(upstream.lost) == 1  # the upstream request was cancelled
    [access] = [e for e in events if e.get("log_namespace") == "twisted_gateway.access"]
    assert (access["status"], access["outcome"]) == (499, "client_gone")
    gateway.forwarder.close()
    assert gateway.clock.getDelayedCalls() == []


def test_forward_refuses_large_bodies_even_without_gateway_request(echo):
    """Mounted in a plain Site, bodies over max_body_size still get 413, upstream untouched."""
    gateway = Gateway(echo, GatewaySettings(max_body_size=10))
    transport = gateway.request(
        b"POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 11\r\n\r\nhello world"
    )
    status, _, _, body = parse_response(transport.value())
    assert status == 413
    assert json.loads(body)["error"] == "body_too_large"
    assert echo.seen == []
    gateway.close()


def test_access_log_has_one_structured_line_with_the_token_redacted(echo):
    """Each request logs method, path, status, bytes, duration, upstream; never the token."""
    gateway = Gateway(echo, route_name="api")
    with capturedLogs() as events:
        transport = gateway.request(b"GET /a/../b?token=s3cret&x=1 HTTP/1.1\r\nHost: gw\r\n\r\n")
    status, _, _, body = parse_response(transport.value())
    access = [e for e in events if e.get("log_namespace") == "twisted_gateway.access"]
    assert len(access) == 1
    event = access[0]
    assert (event["method"], event["path"], event["status"]) == ("GET", "/b", status)
    assert event["query"] == "token=REDACTED&x=1"
    assert event["bytes"] == len(body)
    assert event["duration"] >= 0
    assert (event["upstream"], event["route"], event["peer"]) == (UPSTREAM, "api", "203.0.113.7")
    assert "s3cret" not in formatEvent(event)
    gateway.close()


def test_the_access_event_gives_the_duration_in_whole_microseconds():
    """A request's duration is logged to the microsecond, not with the digits two time stamps leave."""
    upstream = Silent()
    gateway = Gateway(upstream)
    gateway.clock.advance(1_700_000_000.1)
    with capturedLogs() as events:
        gateway.request(b"GET /x HTTP/1.1\r\nHost: gw\r\n\r\n")
        gateway.clock.advance(0.0012345678)
        upstream.held[0].write(b"ok")
        upstream.held[0].finish()
        gateway.pump()
    [event] = [e for e in events if e.get("log_namespace") == "twisted_gateway.access"]
    assert repr(event["duration"]) == "0.001235"
    gateway.close()


def test_the_access_line_reads_the_same_from_its_fields_and_from_its_preformatted_ones(echo):
    """The line formatted ahead of time (``log_flattened``) is the line the fields give."""
    gateway = Gateway(echo, route_name="api")
    with capturedLogs() as events:
        gateway.request(b"GET /a?x=1 HTTP/1.1\r\nHost: gw\r\n\r\n")
    [event] = [e for e in events if e.get("log_namespace") == "twisted_gateway.access"]
    plain = {k: v for k, v in event.items() if k != "log_flattened"}
    assert formatEvent(event) == formatEvent(plain)
    assert formatEvent(event).startswith("GET /a?x=1 200 ")
    gateway.close()


# -- GatewayRequest: refusing bodies before reading them ------------------------


class Recorder(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[bytes] = []

    def render(self, request):
        self.bodies.append(request.content.read())
        return b"ok"


def limited_site(resource: Resource, limit: int) -> tuple[Site, StringTransport]:
    clock = MemoryReactorClock()
    site = Site(resource, reactor=clock)
    site.requestFactory = GatewayRequest.for_settings(GatewaySettings(max_body_size=limit))
    protocol = site.buildProtocol(None)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 1))
    protocol.makeConnection(transport)
    site.test_protocol = protocol
    return site, transport


def test_content_length_over_the_limit_is_refused_before_the_body_arrives():
    """The client gets 413 JSON as soon as it announces too large a body."""
    recorder = Recorder()
    site, transport = limited_site(recorder, 100)
    site.test_protocol.dataReceived(
        b"POST /up HTTP/1.1\r\nHost: gw\r\nContent-Length: 101\r\n\r\n"
    )
    status, _, headers, body = parse_response(transport.value())
    assert status == 413
    assert json.loads(body) == {
        "error": "body_too_large",
        "detail": "the request body is larger than 100 bytes",
    }
    assert header_values(headers, b"connection") == [b"close"]
    site.test_protocol.dataReceived(b"x" * 101 + b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert transport.value().count(b"HTTP/1.1") == 1
    assert recorder.bodies == []
    site.test_protocol.connectionLost(Failure(ConnectionDone()))


def test_chunked_body_growing_past_the_limit_is_refused():
    """A chunked upload is counted as it arrives and refused once over the limit."""
    recorder = Recorder()
    site, transport = limited_site(recorder, 10)
    site.test_protocol.dataReceived(
        b"PUT /up HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nabcdef\r\n"
    )
    assert transport.value() == b""
    site.test_protocol.dataReceived(b"6\r\nghijkl\r\n0\r\n\r\n")
    assert parse_response(transport.value())[0] == 413
    assert recorder.bodies == []
    site.test_protocol.connectionLost(Failure(ConnectionDone()))


def test_refused_upload_gets_no_100_continue():
    """A client waiting for 100-continue gets the 413 instead, and nothing after it."""
    site, transport = limited_site(Recorder(), 10)
    site.test_protocol.dataReceived(
        b"POST / HTTP/1.1\r\nHost: gw\r\nExpect: 100-continue\r\nContent-Length: 11\r\n\r\n"
    )
    assert transport.value().startswith(b"HTTP/1.1 413 ")
    assert b"100 Continue" not in transport.value()
    site.test_protocol.connectionLost(Failure(ConnectionDone()))


def test_bodies_within_the_limit_and_malformed_forms_pass_untouched():
    """Up to the limit the body is delivered as sent; form bodies are not parsed (no 400)."""
    recorder = Recorder()
    site, transport = limited_site(recorder, 64)
    body = b"--zz\r\nnot really multipart"
    site.test_protocol.dataReceived(
        b"POST / HTTP/1.1\r\nHost: gw\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    assert parse_response(transport.value())[0] == 200
    assert recorder.bodies == [body]
    site.test_protocol.connectionLost(Failure(ConnectionDone()))


def test_connection_close_among_other_tokens_closes_the_connection():
    """``Connection: close, X-Foo`` is honoured: the answer says close and the socket closes."""
    site, transport = limited_site(Recorder(), 64)
    site.test_protocol.dataReceived(
        b"GET / HTTP/1.1\r\nHost: gw\r\nConnection: close, X-Foo\r\n\r\n"
    )
    status, _, headers, _ = parse_response(transport.value())
    assert status == 200
    assert header_values(headers, b"connection") == [b"close"]
    assert transport.disconnecting
    site.test_protocol.connectionLost(Failure(ConnectionDone()))


# -- a pooled connection the upstream closed ---------------------------------------------


def _lost(*reasons: BaseException) -> list[Failure]:
    return [Failure(reason) for reason in reasons]


@pytest.mark.parametrize(
    "method, reason, replayed",
    [
        (b"GET", ResponseNeverReceived(_lost(ConnectionDone())), True),
        (b"HEAD", ResponseNeverReceived(_lost(ConnectionLost())), True),
        (b"OPTIONS", RequestTransmissionFailed(_lost(ConnectionLost())), True),
        (b"PUT", ResponseNeverReceived(_lost(ConnectionDone())), True),
        (b"delete", RequestTransmissionFailed(_lost(ConnectionDone())), True),
        (b"POST", RequestNotSent(), True),
        (b"PATCH", RequestNotSent(), True),
        (b"POST", ResponseNeverReceived(_lost(ConnectionDone())), False),
        (b"PATCH", RequestTransmissionFailed(_lost(ConnectionLost())), False),
        (b"GET", ResponseNeverReceived(_lost(CancelledError())), False),
        (b"GET", ResponseFailed(_lost(ConnectionLost())), False),
        (b"GET", ConnectionRefusedError(), False),
    ],
)
def test_which_requests_are_sent_again_after_a_pooled_connection_closed(method, reason, replayed):
    """Idempotent methods whenever no answer came; POST/PATCH only when nothing was sent."""
    assert may_replay(method, reason) is replayed


@pytest.mark.parametrize("ending", ["answered", "client_left"])
def test_a_gateway_request_tells_when_done_once_when_answered_or_left(ending):
    """What counts a request (the metrics, the in-flight gauge) is told once, whichever way it ends."""
    resource = Silent()
    site = Site(resource, reactor=MemoryReactorClock())
    site.requestFactory = GatewayRequest.for_settings(GatewaySettings())
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    channel.makeConnection(StringTransport())
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n")
    [request] = resource.held
    told: list[str] = []
    request.when_done = lambda: told.append(ending)
    if ending == "answered":
        request.finish()
        assert told == ["answered"]
    channel.connectionLost(Failure(ConnectionDone()))
    assert told == [ending]
