"""
The gateway's parts and their lifetime, as one Twisted service.

A :class:`Gateway` is built from explicit parts (the HTTP forwarder, the
upstream connector, the authenticator, the clock: the seams of
:mod:`twisted_gateway.interfaces`) and holds what they share (pools,
metrics, the relay registry, the cluster). Starting it starts the background
work (keepalive pings, send timeouts, health checks, JWKS refresh, the
cluster); stopping it is one Deferred that stops all of it and closes the
forwarder. ``resource.GatewayResource`` routes requests over the parts.

:func:`build_gateway` picks the real parts for whatever is not given; it is
what ``twistd wsgateway`` and ``build_gateway_resource`` use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from twisted_gateway._bases import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.web.iweb import IAgent, IPolicyForHTTPS

from twisted_gateway.cluster import Cluster, RevocationGuard
from twisted_gateway.config import Settings
from twisted_gateway.connector import UpstreamConnector, relay_connect
from twisted_gateway.interfaces import IAuthenticator, IHTTPForwarder, IUpstreamConnector
from twisted_gateway.logs import secret_names
from twisted_gateway.metrics import Load, Metrics
from twisted_gateway.send_timeout import SendTimeout
from twisted_gateway.status import Status
from twisted_gateway.tls import UpstreamTLSPolicy, warn_unverified
from twisted_gateway.upstreams import InstanceRegistry, UpstreamPool, upstream_failures, upstream_states
from twisted_gateway.ws_proxy import RelayServerFactory
from twisted_gateway.ws_relay import KeepAlive, RelayRegistry

if TYPE_CHECKING:
    from twisted_gateway.schema import AuthSettings
    from twisted_gateway.health import HealthChecker
    from twisted_gateway.worker_stats import WorkerStats


class Gateway(MultiService):
    """One gateway's parts, started and stopped together; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: IReactorTime,
        forwarder: IHTTPForwarder,
        connector: IUpstreamConnector,
        authenticator: IAuthenticator | None,
        health_agent: IAgent | None = None,
    ) -> None:
        """
        ``health_agent`` carries the HTTP health checks of the routes that
        ask for them (``health_check``); it is required then.
        """
        super().__init__()
        self.settings = settings
        self.clock = clock
        self.forwarder = forwarder
        self.connector = connector
        self.registry = RelayRegistry()
        #: set when the gateway stops: /readyz says 503 (everything else is still served)
        self.draining = False
        #: HTTP requests answered or being answered now (the drain waits for them)
        self.http_in_flight = 0
        #: a worker's view of all workers; None for a single process (tap.py sets it)
        self.worker_stats: WorkerStats | None = None
        #: health and counters per upstream URL, shared by the routes naming it
        self.upstreams = InstanceRegistry(clock)
        self.pools = {r.name: UpstreamPool.for_route(r, self.upstreams) for r in settings.routes}
        self.metrics = Metrics(
            routes=[r.name for r in settings.routes],
            upstreams=lambda: upstream_states(self.pools.values()),
            upstream_failures=lambda: upstream_failures(self.pools.values()),
            load=self._load,
            jwks=authenticator.key_counts if authenticator is not None else None,
        )
        #: revocations, admin actions and per-user caps: the cluster's, or this gateway's alone
        self.cluster = Cluster(
            settings.cluster,
            registry=self.registry,
            clock=clock,
            metrics=self.metrics,
            leeway=settings.auth.leeway if settings.auth is not None else 0.0,
            gateway_cap=settings.gateway.max_websockets_per_user,
        )
        self.authenticator: IAuthenticator | None = None
        if authenticator is not None:
            self.authenticator = RevocationGuard(authenticator, self.cluster)
        self.status = Status(self.metrics, self.pools, {r.name: r.prefix for r in settings.routes}, clock)
        self.keepalive = KeepAlive(
            self.registry, clock, settings.gateway.ws_ping_interval, settings.gateway.ws_ping_timeout
        )
        self.send_timeout = SendTimeout(self.registry, clock, settings.gateway.ws_send_timeout)
        self.health_checker: HealthChecker | None = None
        if any(route.health_check for route in settings.routes):
            from twisted_gateway.health import HealthChecker

            if health_agent is None:
                raise ValueError("a Gateway with health checks needs a health_agent")
            pools = list(self.pools.values())
            self.health_checker = HealthChecker(pools, clock, health_agent, ws_connect=connector.connect)
        self.ws_factories = {
            route.name: RelayServerFactory(
                route,
                settings.gateway,
                clock=clock,
                registry=self.registry,
                connect=relay_connect(connector),
                authenticator=self.authenticator,
                metrics=self.metrics,
                cluster=self.cluster,
            )
            for route in settings.routes
            if route.websocket
        }

    def _load(self) -> Load:
        """What the gateway holds now (the load gauges of /metrics)."""
        delayed = getattr(self.clock, "getDelayedCalls", None)
        return Load(
            delayed_calls=len(delayed()) if delayed is not None else 0,
            http_in_flight=self.http_in_flight,
            handshakes_in_progress=len(self.registry.handshakes),
        )

    def startService(self) -> None:
        """Start the background work: keepalive pings, the send timeout, health checks, JWKS refresh."""
        super().startService()
        self.keepalive.start()
        self.send_timeout.start()
        self.cluster.start()
        self.status.start()
        if self.health_checker is not None:
            self.health_checker.start()
        if self.authenticator is not None:
            self.authenticator.start()

    def stopService(self) -> Deferred[None]:
        """Stop what :meth:`startService` started and close the forwarder; fires when all is done."""
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        await super().stopService()
        self.keepalive.stop()
        self.send_timeout.stop()
        await self.cluster.stop()
        self.status.stop()
        if self.health_checker is not None:
            await self.health_checker.stop()
        if self.authenticator is not None:
            await self.authenticator.stop()
        await self.forwarder.close()


def build_gateway(
    settings: Settings,
    reactor: IReactorTime,
    *,
    clock: IReactorTime | None = None,
    forwarder: IHTTPForwarder | None = None,
    connector: IUpstreamConnector | None = None,
    authenticator: IAuthenticator | None = None,
) -> Gateway:
    """
    A :class:`Gateway` for ``settings``: the parts not given are the real ones,
    connecting through ``reactor`` (which provides ``IReactorTCP`` too);
    timers run on ``clock`` (by default the reactor). An authenticator is
    built only when ``[auth]`` is configured.
    """
    from twisted_gateway.http_proxy import HTTPForwarder

    the_clock = clock if clock is not None else reactor
    timeout = settings.gateway.connect_timeout
    tls_policy = UpstreamTLSPolicy.for_routes(settings.routes)
    warn_unverified(settings.routes)
    if connector is None:
        connector = UpstreamConnector(IReactorTCP(reactor), timeout, tls_policy)
    if forwarder is None:
        forwarder = HTTPForwarder(
            settings.gateway, reactor, tls_policy=tls_policy, secret_names=secret_names(settings.auth)
        )
    if authenticator is None and settings.auth is not None:
        authenticator = _authenticator(settings.auth, reactor, the_clock, timeout)
    health_agent = None
    if any(route.health_check for route in settings.routes):
        health_agent = _health_agent(reactor, timeout, tls_policy)
    return Gateway(
        settings,
        clock=the_clock,
        forwarder=forwarder,
        connector=connector,
        authenticator=authenticator,
        health_agent=health_agent,
    )


def _health_agent(reactor: IReactorTime, connect_timeout: float, tls_policy: IPolicyForHTTPS) -> IAgent:
    """
    The health checks' agent, on the connector's endpoints: an IP literal is
    connected directly, not resolved in a thread, so a gateway short of
    threads or CPU does not fail every check at once and blame its upstreams.
    """
    from twisted.web.client import Agent, HTTPConnectionPool

    agent: IAgent = Agent.usingEndpointFactory(
        reactor,
        UpstreamConnector(cast(IReactorTCP, reactor), connect_timeout, tls_policy),
        pool=HTTPConnectionPool(reactor, persistent=False),
    )
    return agent


def _authenticator(
    auth: AuthSettings, reactor: IReactorTime, clock: IReactorTime, connect_timeout: float
) -> IAuthenticator:
    """A request waits for a JWKS fetch no longer than it would for an upstream's connect."""
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    from twisted_gateway.auth import Authenticator

    client = None
    if auth.jwks_url or auth.oidc_issuer:
        from twisted_gateway.tls import UpstreamTLS

        agent = Agent(
            reactor,
            # [auth] ca_file: a provider behind an internal CA; else the system's trust store
            contextFactory=UpstreamTLSPolicy({}, UpstreamTLS.for_ca_file(auth.ca_file)),
            connectTimeout=connect_timeout,
            pool=HTTPConnectionPool(reactor, persistent=False),
        )
        client = HTTPClient(agent)
    return Authenticator(auth, clock, client, wait_limit=connect_timeout)
