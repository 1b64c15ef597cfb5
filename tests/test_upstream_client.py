"""
The upstream client's rules without sockets: the request head it writes, and
what it refuses before connecting (tests/integration/test_upstream_client.py
has the exchanges with real servers).
"""

from __future__ import annotations

import pytest
from twisted.internet.testing import MemoryReactorClock, StringTransport

from twisted_gateway.connector import UpstreamConnector
from twisted_gateway.upstream_client import UpstreamClient, request_head


@pytest.mark.parametrize(
    "headers, expected",
    [
        ([], b""),
        ([(b"Host", b"u"), (b"X-B", b"1"), (b"X-A", b"2"), (b"X-B", b"3")], b"Host: u\r\nX-B: 1\r\nX-A: 2\r\nX-B: 3\r\n"),
        ([(b"X-Sub", b"a\r\nX-Admin: yes")], b"X-Sub: a X-Admin: yes\r\n"),
        ([(b"X-Sub", b"a\nb\rc")], b"X-Sub: a b c\r\n"),
    ],
    ids=["none", "order-kept", "crlf", "bare-cr-lf"],
)
def test_request_heads_keep_header_order_and_never_gain_a_line(headers, expected):
    """Headers go in the order given, repeats apart; a CR or LF in one becomes a space."""
    head = request_head(b"GET", b"/x", headers, b"")
    assert head == b"GET /x HTTP/1.1\r\n" + expected + b"\r\n"


@pytest.mark.parametrize("method, url", [(b"GE T", b"http://127.0.0.1:1/"), (b"GET", b"http://127.0.0.1:1/a b")])
def test_what_cannot_go_on_a_request_line_is_refused_at_once(method, url):
    """A method that is not a token, a target with a space: ValueError before any connection."""
    client = UpstreamClient(MemoryReactorClock(), UpstreamConnector(MemoryReactorClock(), 5.0))
    with pytest.raises(ValueError):
        client.request(method, url)


@pytest.mark.parametrize(
    "url, target, host",
    [
        (b"http://127.0.0.1:1", b"/", b"127.0.0.1:1"),
        (b"http://127.0.0.1:1?q=a/b", b"/?q=a/b", b"127.0.0.1:1"),
        (b"http://127.0.0.1:1/a?q=b/c?d", b"/a?q=b/c?d", b"127.0.0.1:1"),
        (b"http://127.0.0.1:80/a/b", b"/a/b", b"127.0.0.1"),
    ],
    ids=["no-path", "query-only", "path-and-query", "default-port"],
)
def test_the_request_line_and_host_come_from_the_url(url, target, host):
    """The target starts at the first ``/`` or ``?`` after the authority; the default port is left out of Host."""
    reactor = MemoryReactorClock()
    client = UpstreamClient(reactor, UpstreamConnector(reactor, 5.0))
    client.send(b"GET", url, [(b"X-A", b"1")])
    [(address, port, factory, _, _)] = reactor.tcpClients
    connection = factory.buildProtocol(None)
    transport = StringTransport()
    connection.makeConnection(transport)
    assert transport.value() == b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\nX-A: 1\r\n\r\n"
