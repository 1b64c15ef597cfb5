"""
The gateway as a Twisted service: listeners, the demo chat-service, shutdown.

``tap.makeService`` builds one of these for twistd; an application that runs
its own reactor can build one too.
"""

from __future__ import annotations

from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.web.server import Site

from twisted_gateway.config import Settings
from twisted_gateway.resource import GatewayResource
from twisted_gateway.ws_proxy import RelayRegistry

log = Logger()


class ListeningService(StreamServerEndpointService):
    """Listens on one endpoint; fails start-up synchronously; logs the bound address."""

    def __init__(self, reactor: Any, description: str, factory: Any, role: str) -> None:
        super().__init__(serverFromString(reactor, description), factory)
        self._raiseSynchronously = True
        self.description, self.role = description, role

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._waitingForPort.addCallback(self._listening)

    def _listening(self, port: Any) -> Any:
        address = port.getHost()
        log.info(
            "{role} listening on {endpoint} (port {port})",
            role=self.role,
            endpoint=self.description,
            port=getattr(address, "port", None),
            host=getattr(address, "host", None),
            event="listening",
        )
        return port


class GatewayService(MultiService):
    """Every listener of the gateway, and the cleanup that stopping it needs."""

    def __init__(self, settings: Settings, reactor: Any) -> None:
        super().__init__()
        self.settings = settings
        self.reactor = reactor
        self.registry = RelayRegistry()
        self.http_forwarder = _build_http_forwarder(settings, reactor)
        self.resource = GatewayResource(
            settings, reactor=reactor, registry=self.registry, http_forwarder=self.http_forwarder
        )
        self.site = Site(self.resource)
        self.site.noisy = False
        if settings.demo.chat_service:
            from twisted_gateway.demo.chat import build_chat_site

            ListeningService(
                reactor, settings.demo.chat_service, build_chat_site(reactor), "demo chat-service"
            ).setServiceParent(self)
        for description in settings.gateway.listen:
            ListeningService(reactor, description, self.site, "wsgateway").setServiceParent(self)

    def stopService(self) -> Deferred:
        d = super().stopService()
        waits = [d]
        for pair in list(self.registry.pairs):
            pair.close_with((1001, b"gateway shutting down"))
            waits.append(pair.done)
        if self.http_forwarder is not None:
            waits.append(self.http_forwarder.close())
        return DeferredList(waits, consumeErrors=True)


def _build_http_forwarder(settings: Settings, reactor: Any) -> Any:
    from twisted_gateway.http_proxy import HTTPForwarder

    return HTTPForwarder(settings.gateway, reactor)
