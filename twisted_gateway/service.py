"""
A gateway served by this process: its listeners, the demo chat-service and
the stop sequence (the drain), around a :class:`~twisted_gateway.gateway.Gateway`.

``tap.makeService`` builds one of these for twistd; an application that runs
its own reactor can build one too.
"""

from __future__ import annotations

import functools
import sys
from typing import TYPE_CHECKING, Callable

from twisted.internet import tcp
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IReactorSocket,
    IReactorTCP,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_gateway._compat import dispatch_plainly
from twisted_gateway._bases import MultiService, Service
from twisted_gateway.admin import build_admin_site, where_served
from twisted_gateway.gateway import Gateway
from twisted_gateway.limits import UNLIMITED_CEILING, client_limits, reserved_files
from twisted_gateway.resource import GatewayResource
from twisted_gateway.site import FrontDoor, build_site
from twisted_gateway.sockets import preset_listener
from twisted_gateway.tls import listen_backlog, server_endpoint, system_listen_backlog
from twisted_gateway.workers import AdoptedEndpoint
from twisted_gateway.ws_relay import GOING_AWAY, RelayPair

if TYPE_CHECKING:
    class ServingReactor(IReactorTime, IReactorSocket, IReactorTCP):
        """
        What serving asks of its reactor: timers, listening sockets, and the
        sockets a worker inherits from its supervisor. Every reactor ``twistd``
        installs provides all three; a test's ``MemoryReactorClock`` too.
        """

log = Logger()


class ListeningService(Service):
    """
    Listens on one endpoint: a listener that cannot bind fails start-up with
    one line; the bound address is logged; :meth:`when_listening` gives the port.
    """

    def __init__(
        self,
        reactor: ServingReactor,
        description: str,
        factory: IProtocolFactory,
        role: str,
        backlog: int | None = None,
        wrap: Callable[[IProtocolFactory], IProtocolFactory] | None = None,
        inherited_fd: int | None = None,
        prepare: Callable[[IListeningPort], None] | None = None,
    ) -> None:
        """``prepare`` is given the port once bound, before it accepts anything (:func:`sockets.preset_listener`)."""
        # ssl: listeners are built by tls.server_endpoint: ALPN answers http/1.1 only.
        # A listener without backlog= gets the system's maximum, not Twisted's 50.
        if backlog is None:
            backlog = system_listen_backlog()
        self.endpoint: IStreamServerEndpoint
        if inherited_fd is not None:  # a worker: the supervisor bound the socket
            self.endpoint = AdoptedEndpoint(reactor, description, inherited_fd, wrap)
        else:
            self.endpoint = server_endpoint(reactor, description, backlog, wrap)
        self.factory = factory
        self.description, self.role = description, role
        self.backlog = listen_backlog(description, backlog) if inherited_fd is None else None
        self.prepare = prepare
        self._listening: Deferred[IListeningPort] | None = None
        self._port: IListeningPort | None = None
        self._waiting: list[Deferred[IListeningPort]] = []

    def privilegedStartService(self) -> None:
        """Listen now (before twistd drops privileges); a failure to bind exits with one line."""
        super().privilegedStartService()
        failed: list[Failure] = []
        self._listening = self.endpoint.listen(self.factory)
        self._listening.addCallbacks(self._bound, failed.append)
        if failed:
            failed[0].trap(CannotListenError)
            error = failed[0].value
            assert isinstance(error, CannotListenError)
            # One line and a non-zero exit, as for a bad config; never a traceback.
            sys.stderr.write(f"wsgateway: {self.role} cannot listen on {self.description}: {error.socketError}\n")
            raise SystemExit(1)

    def startService(self) -> None:
        if self._listening is None:  # not started by twistd: listen now
            self.privilegedStartService()
        super().startService()

    def _bound(self, port: IListeningPort) -> IListeningPort | None:
        self._port = port
        if self.prepare is not None:
            self.prepare(port)
        address = port.getHost()
        log.info(
            "{role} listening on {endpoint} (port {port}), backlog {backlog}",
            role=self.role,
            endpoint=self.description,
            port=getattr(address, "port", None),
            host=getattr(address, "host", None),
            backlog=self.backlog if self.backlog is not None else "of the inherited socket",
            event="listening",
        )
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(port)
        return None

    def when_listening(self) -> Deferred[IListeningPort]:
        """A Deferred that fires with the listening port once it is bound."""
        if self._port is not None:
            return succeed(self._port)
        d: Deferred[IListeningPort] = Deferred()
        self._waiting.append(d)
        return d

    def stopService(self) -> Deferred[None]:
        """Stop listening, after accepting the connections the kernel has already queued."""
        super().stopService()
        port, self._port = self._port, None
        if port is None:
            if self._listening is not None and not self._listening.called:
                self._listening.cancel()
            self._listening = None
            return succeed(None)
        self._listening = None
        _accept_queued(port)
        stopping = port.stopListening()
        return stopping if stopping is not None else succeed(None)


def _accept_queued(port: IListeningPort) -> None:
    """
    Accept every connection waiting in a listening port's queue: closing the
    socket would reset them, and a client whose request is already on its way
    would get no answer at all (served, they get ``Connection: close``).
    """
    if not isinstance(port, tcp.Port) or not port.connected:
        return
    for _ in range(MAX_QUEUED_ACCEPTS):
        accepted = port.sessionno
        port.doRead()
        if port.sessionno == accepted:
            break


class GatewayService(MultiService):
    """Every listener of a gateway, and the drain that stopping it needs."""

    def __init__(
        self,
        gateway: Gateway,
        reactor: ServingReactor,
        *,
        open_files: int | None = None,
        inherited_fds: tuple[int, ...] | None = None,
    ) -> None:
        """
        ``gateway`` becomes a child: its parts start before the listeners
        serve and stop after the drain. ``inherited_fds``: a worker's
        listening sockets, bound by its supervisor (``[gateway] listen`` then
        ``[admin] listen``, in order); the supervisor runs the demo
        chat-service then.
        """
        super().__init__()
        fds = list(inherited_fds) if inherited_fds is not None else None
        #: what the drain sends WebSockets: 1001, or 1012 when a rolling restart replaces this worker
        self.close_code = GOING_AWAY
        self.gateway = gateway
        settings = self.settings = gateway.settings
        self.reactor = reactor
        gateway.setServiceParent(self)
        #: the router over the gateway's parts, the root of the site
        self.resource = GatewayResource(gateway)
        self.site = build_site(self.resource, settings, reactor)
        self.front_door = self._front_door(open_files)
        if settings.demo.chat_service and fds is None:
            from twisted_gateway.demo.chat import build_chat_site

            ListeningService(
                reactor, settings.demo.chat_service, build_chat_site(reactor), "demo chat-service"
            ).setServiceParent(self)
        self.listeners = [
            ListeningService(
                reactor,
                description,
                self.site,
                "wsgateway",
                wrap=self.front_door.wrap,
                inherited_fd=fds.pop(0) if fds else None,
                prepare=functools.partial(preset_listener, keepalive=settings.gateway.tcp_keepalive),
            )
            for description in settings.gateway.listen
        ]
        if settings.admin.listen:
            # The operator's pages move to the admin endpoints only.
            self.resource.serve_admin_pages = False
            pages = dict(self.resource.admin_pages)
            if settings.admin.token:
                from twisted_gateway.admin_api import AdminAPI

                pages[b"admin"] = AdminAPI(gateway.cluster, settings.admin.token)
            admin_site = build_admin_site(pages)
            for description in settings.admin.listen:
                ListeningService(
                    reactor, description, admin_site, "admin", inherited_fd=fds.pop(0) if fds else None
                ).setServiceParent(self)
        for listener in self.listeners:
            listener.setServiceParent(self)

    def _front_door(self, open_files: int | None) -> FrontDoor:
        """The site behind the cap on client connections (``max_client_connections``)."""
        if open_files is None:  # not started by twistd (tap.py raises and passes the limit)
            import resource

            open_files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            if open_files == resource.RLIM_INFINITY:
                open_files = UNLIMITED_CEILING
        instances = {url for route in self.settings.routes for url in route.upstream}
        self.reserved_files = reserved_files(self.settings.gateway.upstream_keepalive, len(instances))
        limits = client_limits(self.settings.gateway.max_client_connections, open_files, self.reserved_files)
        return FrontDoor(limits, self.reactor, self.gateway.metrics)

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if self.settings.demo.chat_service and self.settings.auth is not None:
            self.listeners[0].when_listening().addCallback(self._announce_demo_token)

    def _announce_demo_token(self, port: IListeningPort) -> IListeningPort:
        """With the demo on, print a ready-to-paste wscat command and warn about the secret."""
        from twisted_gateway.token import mint

        auth = self.settings.auth
        if auth is None or auth.secret is None:
            return port
        token = mint(auth, "demo", DEMO_TOKEN_TTL, self.reactor.seconds(), self.settings.source)
        number = getattr(port.getHost(), "port", 8080)
        log.warn(
            "DEMO MODE: the [auth] secret in {source} is the published demo secret; "
            "never use it in production",
            source=self.settings.source,
        )
        log.info(
            "demo token for 'demo', valid {ttl} s: "
            'wscat -c "ws://localhost:{port}/v1/chat/ws?room=lobby&{param}={token}"',
            ttl=DEMO_TOKEN_TTL,
            port=number,
            param=auth.query_param,
            token=token,
            event="demo_token",
        )
        return port

    def startService(self) -> None:
        dispatch_plainly(self.reactor)
        super().startService()
        log.info("{where}", where=where_served(self.settings), event="admin_pages")
        gateway = self.settings.gateway
        log.info(
            "on SIGTERM: /readyz 503, serve {drain_delay} s more with Connection: close"
            " (drain_delay), close the listeners, then wait up to {drain_timeout} s"
            " (drain_timeout) for requests and WebSockets",
            drain_delay=gateway.drain_delay,
            drain_timeout=gateway.drain_timeout,
            drain_spread=gateway.drain_spread,
            event="drain_settings",
        )

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._drain_and_stop())

    async def _drain_and_stop(self) -> None:
        """
        Stop without turning a client away (README, Operating): ``/readyz``
        answers 503 at once; for ``drain_delay`` s everything is served as
        before, but every response says ``Connection: close``; then the
        listeners close (a balancer's connect is refused and retried
        elsewhere) and so do idle client connections; requests in flight
        finish, WebSockets get 1001 on both legs (spread over
        ``drain_spread``), and the service stops once nothing is left or
        ``drain_timeout`` after the delay.
        """
        gateway = self.settings.gateway
        self.gateway.draining = True
        self.site.start_closing()
        log.info(
            "stopping: /readyz answers 503; serving {delay} s more with Connection: close",
            delay=gateway.drain_delay,
            event="drain_delay",
        )
        if gateway.drain_delay:
            await deferLater(self.reactor, gateway.drain_delay, lambda: None)
        await DeferredList([maybeDeferred(listener.stopService) for listener in self.listeners])
        self.site.close_idle(new_ones=False)
        # A connection accepted just before the listeners closed may not have
        # sent its request yet: give it a moment before closing it as idle.
        timers = [self.reactor.callLater(NEW_CONNECTION_GRACE, self.site.close_idle, new_ones=True)]
        pairs = list(self.gateway.registry.pairs)
        log.info(
            "listeners closed; draining {count} WebSockets and {connections} HTTP connections",
            count=len(pairs),
            connections=len(self.site.open_connections()),
            event="drain",
        )
        for i, pair in enumerate(pairs):
            delay = gateway.drain_spread * i / len(pairs) if gateway.drain_spread else 0
            timers.append(self.reactor.callLater(delay, pair.close_both, self.close_code, "drain"))
        if not await self._quiet(set(pairs), self.reactor.seconds() + gateway.drain_timeout):
            log.warn(
                "drain timeout: {count} WebSockets, {requests} HTTP requests and"
                " {connections} HTTP connections left",
                count=len(self.gateway.registry.pairs),
                requests=self.gateway.http_in_flight,
                connections=self.site.close_all(),
            )
        for timer in timers:
            if timer.active():
                timer.cancel()
        await super().stopService()

    async def _quiet(self, draining: set[RelayPair], deadline: float) -> bool:
        """
        Whether every pair went and no HTTP request or connection is left
        before ``deadline``; a pair whose handshake was still going when the
        listeners closed gets its close once open. It polls rather than
        waiting on the pairs' own ``done``: a timeout cancelling those would
        fail the pairs' bookkeeping, and the cancelled wait would not stop.
        """
        registry = self.gateway.registry
        while registry.pairs or registry.handshakes or self.gateway.http_in_flight or self.site.open_connections():
            if self.reactor.seconds() >= deadline:
                return False
            for pair in registry.pairs - draining:
                draining.add(pair)
                pair.close_both(self.close_code, "drain")
            await deferLater(self.reactor, 0.05, lambda: None)
        return True


#: A worker replaced by a rolling restart (SIGHUP to the supervisor): the client may reconnect at once.
SERVICE_RESTART = (1012, b"service restart")
#: Seconds a connection accepted just before the listeners closed has to send
#: its request before the drain closes it as idle.
NEW_CONNECTION_GRACE = 1.0
#: Rounds of accepts before a listener closes (each accepts what is queued, or more).
MAX_QUEUED_ACCEPTS = 100
#: Seconds the demo token printed at start-up stays valid.
DEMO_TOKEN_TTL = 900
