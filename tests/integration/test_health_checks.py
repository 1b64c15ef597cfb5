"""
Active health checks against real loopback upstreams: twisted.web sites for
HTTP checks, an Autobahn server for ``ws:/path`` checks. The checks run on a
``task.Clock`` (each ``advance`` is one check round); the network is real.
"""

from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.endpoints import serverFromString
from twisted.logger import capturedLogs
from twisted.protocols.policies import WrappingFactory
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from tests.support import Upstream, listen, settle
from twisted_gateway.health import HealthChecker
from twisted_gateway.upstreams import InstanceRegistry, UpstreamPool
from twisted_gateway.connector import UpstreamConnector

INTERVAL = 5


class HealthPage(Resource):
    """Answers every GET with ``code``, or never when ``hang`` is set."""

    isLeaf = True

    def __init__(self, code: int = 200, hang: bool = False) -> None:
        super().__init__()
        self.code, self.hang = code, hang
        self.paths: list[bytes] = []

    def render_GET(self, request) -> bytes | int:
        self.paths.append(request.path)
        if self.hang:
            return NOT_DONE_YET
        request.setResponseCode(self.code)
        request.setHeader(b"content-type", b"application/json")
        return b'{"status": "ok"}' if self.code < 400 else b'{"status": "failing"}'


class HTTPUpstream:
    """A twisted.web upstream on loopback that can go away and come back on its port."""

    def __init__(self, page: HealthPage, host: str = "127.0.0.1") -> None:
        self.page, self.host = page, host
        site = Site(page)
        site.noisy = False
        self.factory = WrappingFactory(site)
        self.port: Any = None
        self.number = 0

    @property
    def url(self) -> str:
        return f"http://[{self.host}]:{self.number}" if ":" in self.host else f"http://{self.host}:{self.number}"

    async def start(self) -> HTTPUpstream:
        kind = "tcp6" if ":" in self.host else "tcp"
        description = f"{kind}:{self.number}:interface=" + self.host.replace(":", "\\:")
        self.port = await serverFromString(reactor, description).listen(self.factory)
        self.number = self.port.getHost().port
        return self

    async def go_away(self) -> None:
        """Stop listening and cut every open connection, as a crashed process would."""
        await self.port.stopListening()
        self.port = None
        for connection in list(self.factory.protocols):
            connection.transport.abortConnection()
        await settle(lambda: not self.factory.protocols)


class Harness:
    """One pool over the given upstreams, and its checker on a fake clock."""

    def __init__(self, urls: list[str], health_check: str, interval: float = INTERVAL) -> None:
        self.clock = task.Clock()
        self.connections = HTTPConnectionPool(reactor, persistent=True)
        self.pool = UpstreamPool(
            "api",
            urls,
            InstanceRegistry(self.clock),
            health_check=health_check,
            health_interval=interval,
        )
        self.checker = HealthChecker(
            [self.pool],
            self.clock,
            Agent(reactor, pool=self.connections),
            ws_connect=UpstreamConnector(reactor, 5).connect,
        )
        self.interval = interval

    def instance(self, url: str):
        return next(i for i in self.pool.instances if i.url == url)

    async def next_round(self) -> None:
        """Let the clock reach the next check, and wait for its checks to finish."""
        self.clock.advance(self.interval)
        await self.checker.check_now()

    async def close(self, *upstreams: Any) -> None:
        await self.checker.stop()
        await self.connections.closeCachedConnections()
        for upstream in upstreams:
            if upstream.port is not None:
                await upstream.port.stopListening()


@pytest_twisted.ensureDeferred
async def test_an_upstream_answering_500_is_ejected_after_two_checks_and_the_healthy_one_serves():
    healthy = await HTTPUpstream(HealthPage(200)).start()
    sick = await HTTPUpstream(HealthPage(500)).start()
    h = Harness([healthy.url, sick.url], "/health")
    h.checker.start()
    await h.checker.check_now()
    assert (h.instance(sick.url).state, h.instance(sick.url).check_failures) == ("up", 1)
    await h.next_round()
    assert h.instance(sick.url).state == "down"
    assert h.instance(healthy.url).state == "up"
    assert {h.pool.choose().url for _ in range(6)} == {healthy.url}
    assert healthy.page.paths == [b"/health", b"/health"]
    await h.close(healthy, sick)


@pytest_twisted.ensureDeferred
async def test_an_upstream_on_an_ipv6_literal_passes_its_checks():
    """``http://[::1]:port`` was failed by every check: the host was IDNA-encoded."""
    upstream = await HTTPUpstream(HealthPage(200), host="::1").start()
    h = Harness([upstream.url], "/health")
    h.checker.start()
    await h.checker.check_now()
    await h.next_round()
    assert (h.instance(upstream.url).check_failures, h.instance(upstream.url).state) == (0, "up")
    assert upstream.page.paths == [b"/health", b"/health"]
    await h.close(upstream)


@pytest_twisted.ensureDeferred
async def test_an_upstream_that_goes_away_is_ejected_and_restored_after_two_good_checks():
    """Down after two failed checks, up after two good ones; each change logged once."""
    upstream = await HTTPUpstream(HealthPage(200)).start()
    h = Harness([upstream.url], "/health")
    instance = h.instance(upstream.url)
    with capturedLogs() as events:
        h.checker.start()
        await h.checker.check_now()
        await h.next_round()
        assert (instance.state, instance.check_successes) == ("up", 2)

        await upstream.go_away()
        await h.next_round()
        assert (instance.state, instance.check_failures) == ("up", 1)
        await h.next_round()
        assert instance.state == "down"
        await h.next_round()

        await upstream.start()  # back on the same port
        await h.next_round()
        assert (instance.state, instance.check_successes) == ("down", 1)
        await h.next_round()
        assert instance.state == "up"
    changes = [e["upstream_state"] for e in events if "upstream_state" in e]
    assert changes == ["down", "up"]
    await h.close(upstream)


@pytest_twisted.ensureDeferred
async def test_a_check_left_unanswered_fails_after_its_timeout():
    """With health_interval = 10 a check gets min(10, 5) = 5 s."""
    upstream = await HTTPUpstream(HealthPage(hang=True)).start()
    h = Harness([upstream.url], "/health", interval=10)
    instance = h.instance(upstream.url)
    h.checker.start()
    await settle(lambda: upstream.page.paths)
    h.clock.advance(4.9)
    assert instance.check_failures == 0
    h.clock.advance(0.1)
    await settle(lambda: instance.check_failures == 1)
    await settle(lambda: not upstream.factory.protocols)  # the check's connection is closed
    await h.close(upstream)


@pytest_twisted.ensureDeferred
async def test_stopping_the_checker_cancels_a_check_in_flight_without_a_verdict():
    upstream = await HTTPUpstream(HealthPage(hang=True)).start()
    h = Harness([upstream.url], "/health")
    h.checker.start()
    await settle(lambda: upstream.page.paths)
    await h.checker.stop()
    instance = h.instance(upstream.url)
    assert (instance.check_failures, instance.check_successes, instance.state) == (0, 0, "up")
    assert h.clock.getDelayedCalls() == []
    await settle(lambda: not upstream.factory.protocols)
    await h.close(upstream)


@pytest_twisted.ensureDeferred
async def test_a_ws_check_opens_a_real_websocket_upgrade_and_closes_it_cleanly():
    upstream = Upstream()
    port = await listen(upstream)
    url = f"http://127.0.0.1:{port.getHost().port}"
    h = Harness([url], "ws:/ws/health")
    h.checker.start()
    await h.checker.check_now()
    await h.next_round()
    instance = h.instance(url)
    assert (instance.state, instance.check_successes) == ("up", 2)
    assert [request.path for request in upstream.handshakes] == ["/ws/health", "/ws/health"]
    assert all(p.closed.called for p in upstream.connected)
    assert [p.closed.result[0] for p in upstream.connected] == [1000, 1000]
    await settle(lambda: not upstream.open_protocols)
    await h.close()
    await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_ws_check_fails_against_an_upstream_that_refuses_the_upgrade():
    plain = await HTTPUpstream(HealthPage(404)).start()
    h = Harness([plain.url], "ws:/chat")
    h.checker.start()
    await h.checker.check_now()
    await h.next_round()
    assert h.instance(plain.url).state == "down"
    await settle(lambda: not plain.factory.protocols)
    await h.close(plain)
