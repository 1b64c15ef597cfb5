"""Stopping the gateway lets in-flight HTTP requests finish (the drain), in process."""

from __future__ import annotations

import pytest_twisted
import treq
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from tests.support import listen
from twisted_gateway.config import parse_config
from twisted_gateway.service import GatewayService


class SlowPage(Resource):
    """Answers each request only when the test says so."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list = []
        self.arrived: Deferred = Deferred()

    def render_GET(self, request):
        self.waiting.append(request)
        if not self.arrived.called:
            self.arrived.callback(None)
        return NOT_DONE_YET


@pytest_twisted.ensureDeferred
async def test_an_http_request_in_flight_finishes_during_the_drain():
    """A request still waiting on its upstream when the gateway stops gets its full answer."""
    page = SlowPage()
    up_port = await listen(Site(page))
    settings = parse_config(
        f"""
[gateway]
listen = tcp:0:interface=127.0.0.1
drain_timeout = 5
[route:api]
prefix = /api
upstream = http://127.0.0.1:{up_port.getHost().port}
websocket = false
"""
    )
    service = GatewayService(settings, reactor)
    service.privilegedStartService()
    service.startService()
    port = await service.listeners[0]._waitingForPort
    pool = HTTPConnectionPool(reactor, persistent=False)
    client = treq.client.HTTPClient(Agent(reactor, pool=pool))
    answer = client.get(f"http://127.0.0.1:{port.getHost().port}/api/slow")
    await page.arrived
    stopping = service.stopService()
    await task.deferLater(reactor, 0.2, lambda: None)
    assert not stopping.called, "the gateway stopped with a request in flight"
    request = page.waiting[0]
    request.write(b"finally")
    request.finish()
    response = await answer
    assert response.code == 200
    assert await response.content() == b"finally"
    await stopping
    await pool.closeCachedConnections()
    await up_port.stopListening()
