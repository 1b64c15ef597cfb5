"""
A misbehaving upstream on loopback: bytes after a complete response never
become the next client's answer, because the pooled connection that carried
them is closed instead of reused (one warning names the upstream); a
well-behaved upstream's connection is still reused.
"""

from __future__ import annotations

import pytest_twisted
from twisted.logger import capturedLogs

from tests.integration.test_http import gateway, get, parse_response, raw_request  # noqa: F401
from tests.integration.test_upstream_client import scripted
from tests.test_http_smuggling import by_path, closed_by_gateway

HIJACK = b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nhijack!"
FIVE = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"


def _upstream():
    """Answers ``/head-body`` with a body (stray after HEAD's head), ``/second`` with a stray response too."""
    return scripted(by_path({b"/head-body": FIVE + b"hello", b"/second": FIVE + b"first" + HIJACK}))


def _stray_warnings(events) -> list[dict]:
    return [e for e in events if e.get("event") == "upstream_stray_bytes"]


@pytest_twisted.ensureDeferred
async def test_a_well_behaved_upstreams_connection_is_reused(gateway):
    async with _upstream() as (factory, base):
        gw = await gateway(base.decode())
        for _ in range(2):
            status, _, _, body, _ = parse_response(await raw_request(gw.port, get("/")))
            assert (status, body) == (200, b"fresh")
        assert len(factory.connections) == 1


@pytest_twisted.ensureDeferred
async def test_bytes_in_the_same_read_as_the_response_close_the_connection(gateway):
    """A body on a HEAD and a second response: the next client gets a fresh answer on a new connection."""
    async with _upstream() as (factory, base):
        gw = await gateway(base.decode())
        with capturedLogs() as events:
            raw = await raw_request(gw.port, get("/head-body", method=b"HEAD"))
            assert parse_response(raw)[0] == 200
            await closed_by_gateway(factory.connections[0])
            raw = await raw_request(gw.port, get("/second"))
            assert parse_response(raw)[3] == b"first"
            await closed_by_gateway(factory.connections[1])
            status, _, headers, body, _ = parse_response(await raw_request(gw.port, get("/")))
        assert (status, body) == (200, b"fresh")
        assert len(factory.connections) == 3
        warnings = _stray_warnings(events)
        assert len(warnings) == 2
        assert all(w["upstream"] == f"127.0.0.1:{factory.port}" for w in warnings)


@pytest_twisted.ensureDeferred
async def test_a_late_response_on_an_idle_pooled_connection_closes_it(gateway):
    """Stray bytes while the connection waits in the pool: closed, logged once, never read as an answer."""
    async with _upstream() as (factory, base):
        gw = await gateway(base.decode())
        with capturedLogs() as events:
            assert parse_response(await raw_request(gw.port, get("/")))[3] == b"fresh"
            idle = factory.connections[0]
            idle.transport.write(HIJACK)
            idle.transport.write(HIJACK)
            await closed_by_gateway(idle)
            status, _, _, body, _ = parse_response(await raw_request(gw.port, get("/")))
        assert (status, body) == (200, b"fresh")
        assert len(factory.connections) == 2
        assert len(_stray_warnings(events)) == 1
