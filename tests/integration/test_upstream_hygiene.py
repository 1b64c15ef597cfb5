"""
A misbehaving upstream on loopback: bytes after a complete response never
become the next client's answer, because the pooled connection that carried
them is closed instead of reused (one warning names the upstream); a
well-behaved upstream's connection is still reused.
"""

from __future__ import annotations

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import capturedLogs

from tests.integration.test_http import gateway, get, listen, parse_response, raw_request  # noqa: F401

HIJACK = b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nhijack!"
#: Only against a connection the gateway never closes; not a speed expectation.
GUARD = 10.0


class ScriptedUpstream(Protocol):
    """Answers each request head by its path; ``/late`` sends a stray response when told."""

    def connectionMade(self) -> None:
        self.factory.connections.append(self)
        self.buffer = b""
        self.closed: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            path = head.split(b" ", 2)[1]
            number = b"%d" % len(self.factory.connections)
            answer = b"HTTP/1.1 200 OK\r\nX-Conn: " + number + b"\r\nContent-Length: 5\r\n\r\n"
            if path == b"/head-body":
                self.transport.write(answer + b"hello")
            elif path == b"/second":
                self.transport.write(answer + b"first" + HIJACK)
            else:
                self.transport.write(answer + b"fresh")

    def connectionLost(self, reason) -> None:
        self.closed.callback(None)

    def closed_by_gateway(self) -> Deferred[None]:
        return self.closed.addTimeout(GUARD, reactor)


async def _upstream():
    factory = Factory.forProtocol(ScriptedUpstream)
    factory.connections = []
    port = await listen(factory)
    return port, factory, f"http://127.0.0.1:{port.getHost().port}"


def _stray_warnings(events) -> list[dict]:
    return [e for e in events if e.get("event") == "upstream_stray_bytes"]


@pytest_twisted.ensureDeferred
async def test_a_well_behaved_upstreams_connection_is_reused(gateway):
    port, factory, base = await _upstream()
    try:
        gw = await gateway(base)
        for _ in range(2):
            status, _, _, body, _ = parse_response(await raw_request(gw.port, get("/")))
            assert (status, body) == (200, b"fresh")
        assert len(factory.connections) == 1
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_bytes_in_the_same_read_as_the_response_close_the_connection(gateway):
    """A body on a HEAD and a second response: the next client gets a fresh answer on a new connection."""
    port, factory, base = await _upstream()
    try:
        gw = await gateway(base)
        with capturedLogs() as events:
            raw = await raw_request(gw.port, get("/head-body", method=b"HEAD"))
            assert parse_response(raw)[0] == 200
            await factory.connections[0].closed_by_gateway()
            raw = await raw_request(gw.port, get("/second"))
            assert parse_response(raw)[3] == b"first"
            await factory.connections[1].closed_by_gateway()
            status, _, headers, body, _ = parse_response(await raw_request(gw.port, get("/")))
        assert (status, body) == (200, b"fresh")
        assert len(factory.connections) == 3
        warnings = _stray_warnings(events)
        assert len(warnings) == 2
        assert all(w["upstream"] == f"127.0.0.1:{port.getHost().port}" for w in warnings)
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_late_response_on_an_idle_pooled_connection_closes_it(gateway):
    """Stray bytes while the connection waits in the pool: closed, logged once, never read as an answer."""
    port, factory, base = await _upstream()
    try:
        gw = await gateway(base)
        with capturedLogs() as events:
            assert parse_response(await raw_request(gw.port, get("/")))[3] == b"fresh"
            idle = factory.connections[0]
            idle.transport.write(HIJACK)
            idle.transport.write(HIJACK)
            await idle.closed_by_gateway()
            status, _, _, body, _ = parse_response(await raw_request(gw.port, get("/")))
        assert (status, body) == (200, b"fresh")
        assert len(factory.connections) == 2
        assert len(_stray_warnings(events)) == 1
    finally:
        await port.stopListening()
