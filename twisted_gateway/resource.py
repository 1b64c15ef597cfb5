"""
The resource tree: one leaf that normalises the path, routes it by prefix and
hands the request to the WebSocket relay or to the HTTP forwarder.

Usable without twistd: :func:`build_gateway_resource` takes settings and a
reactor, and the result can be mounted under any path of an existing ``Site``.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from twisted_gateway.admin import ADMIN_PAGES, is_admin
from twisted_gateway.cluster import Cluster, RevocationGuard
from twisted_gateway.config import RouteSettings, Settings
from twisted_gateway.errors import BadRequest, GatewayError, NotFound, render_error
from twisted_gateway.headers import (
    check_utf8_values,
    checked_host,
    is_websocket_upgrade,
    origin_allowed,
    peer_host,
    single_origin,
)
from twisted_gateway.http_proxy import HTTPForwarder
from twisted_gateway.logs import secret_names
from twisted_gateway.metrics import UNROUTED, Load, Metrics, MetricsResource
from twisted_gateway.routing import RouteTable, check_escaped_path, normalize_path, split_uri
from twisted_gateway.send_timeout import SendTimeout
from twisted_gateway.status import Status, StatusJSONResource, StatusPageResource
from twisted_gateway.tls import UpstreamTLSPolicy, warn_unverified
from twisted_gateway.upstreams import (
    UP,
    InstanceRegistry,
    UpstreamPool,
    upstream_failures,
    upstream_states,
)
from twisted_gateway.connector import endpoint_connector
from twisted_gateway.ws_proxy import (
    HandshakeContext,
    RelayServerFactory,
    hand_over,
)
from twisted_gateway.ws_relay import KeepAlive, RelayRegistry

log = Logger()


class GatewayResource(Resource):
    """Routes every request below it; see the module docstring."""

    isLeaf = True

    def __init__(
        self,
        settings: Settings,
        *,
        reactor: Any,
        registry: RelayRegistry | None = None,
        http_forwarder: Any = None,
        ws_connect: Any = None,
        authenticator: Any = None,
        upstreams: InstanceRegistry | None = None,
        metrics: Metrics | None = None,
        cluster: Cluster | None = None,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.clock = reactor
        self.registry = registry if registry is not None else RelayRegistry()
        if authenticator is None and settings.auth is not None:
            authenticator = _build_authenticator(settings.auth, reactor, settings.gateway.connect_timeout)
        self.authenticator = authenticator
        #: set when the gateway stops: /readyz says 503 (everything else is still served)
        self.draining = False
        #: a worker's view of all workers (``worker_stats.WorkerStats``); None for a single process
        self.worker_stats: Any = None
        #: HTTP requests answered or being answered now (the drain waits for them)
        self.http_in_flight = 0
        tls_policy = UpstreamTLSPolicy.for_routes(settings.routes)
        warn_unverified(settings.routes)
        connect = ws_connect or endpoint_connector(reactor, settings.gateway.connect_timeout, tls_policy)
        #: a forwarder built here is closed by :meth:`stop`; one passed in is the caller's
        self._owns_forwarder = http_forwarder is None
        self.http_forwarder = http_forwarder or HTTPForwarder(
            settings.gateway, reactor, tls_policy=tls_policy, secret_names=secret_names(settings.auth)
        )
        self._table: RouteTable[RouteSettings] = RouteTable((r.prefix, r) for r in settings.routes)
        #: health and counters per upstream URL, shared by the routes naming it
        self.upstreams = upstreams if upstreams is not None else InstanceRegistry(reactor)
        self.pools = {r.name: UpstreamPool.for_route(r, self.upstreams) for r in settings.routes}
        self.metrics = metrics or Metrics(
            routes=[r.name for r in settings.routes],
            upstreams=lambda: upstream_states(self.pools.values()),
            upstream_failures=lambda: upstream_failures(self.pools.values()),
            load=self._load,
            jwks=authenticator.key_counts if authenticator is not None else None,
        )
        #: revocations, admin actions and per-user caps: the cluster's, or this gateway's alone
        self.cluster = cluster or Cluster(
            settings.cluster,
            registry=self.registry,
            clock=reactor,
            metrics=self.metrics,
            leeway=settings.auth.leeway if settings.auth is not None else 0.0,
            gateway_cap=settings.gateway.max_websockets_per_user,
        )
        if authenticator is not None:
            self.authenticator = authenticator = RevocationGuard(authenticator, self.cluster)
        #: False when an [admin] listener serves the operator's pages instead
        self.serve_admin_pages = True
        #: the operator's pages (admin.py says who may read them where)
        self.status = Status(
            self.metrics, self.pools, {r.name: r.prefix for r in settings.routes}, reactor
        )
        self.admin_pages = {
            b"metrics": MetricsResource(self.metrics.registry),
            b"status": StatusPageResource(),
            b"status.json": StatusJSONResource(self.status),
        }
        self.keepalive = KeepAlive(
            self.registry, reactor, settings.gateway.ws_ping_interval, settings.gateway.ws_ping_timeout
        )
        self.send_timeout = SendTimeout(self.registry, reactor, settings.gateway.ws_send_timeout)
        self.health_checker = _build_health_checker(
            self.pools.values(), reactor, settings, connect, tls_policy
        )
        self._ws_factories = {
            route.name: RelayServerFactory(
                route,
                settings.gateway,
                clock=reactor,
                registry=self.registry,
                connect=connect,
                authenticator=authenticator,
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

    def start(self) -> None:
        """Start the background work: keepalive pings, the send timeout, health checks, JWKS refresh."""
        self.keepalive.start()
        self.send_timeout.start()
        self.cluster.start()
        self.status.start()
        if self.health_checker is not None:
            self.health_checker.start()
        if self.authenticator is not None:
            self.authenticator.start()

    async def stop(self) -> None:
        """Stop what :meth:`start` started (and close an own HTTP forwarder's idle connections)."""
        self.keepalive.stop()
        self.send_timeout.stop()
        await self.cluster.stop()
        self.status.stop()
        if self.health_checker is not None:
            await self.health_checker.stop()
        if self.authenticator is not None:
            stopping = self.authenticator.stop()
            if stopping is not None:
                await stopping
        if self._owns_forwarder:
            await self.http_forwarder.close()

    def render(self, request) -> bytes | int:
        try:
            return self._route(request)
        except GatewayError as e:
            if not getattr(request, "_gateway_counted", False):
                self._count_http(request, UNROUTED)
            return render_error(request, e)

    def _count_http(self, request, route_name: str) -> None:
        """Count the request in the metrics when it finishes (or the client leaves)."""
        request._gateway_counted = True
        started = self.clock.seconds()
        self.http_in_flight += 1

        def count(_):
            self.http_in_flight -= 1
            duration = self.clock.seconds() - started
            self.metrics.http_request(route_name, request.method, request.code, duration)

        request.notifyFinish().addBoth(count)

    def _route(self, request) -> bytes | int:
        raw_path, query = split_uri(request.uri)
        host = checked_host(request.requestHeaders.getRawHeaders(b"host", []), request.clientproto)
        path = normalize_path(_below_mount_point(raw_path, len(request.prepath)))
        if request.method in (b"GET", b"HEAD"):
            own = self._own_page(request, path)
            if own is not None:
                return own
        self.cluster.check_available()
        route = self._table.match(path)
        if route is None:
            raise NotFound(f"no route for {path.decode('ascii', 'replace')}")
        check_escaped_path(path, route, self._table, route.escaped_slashes)
        headers = list(request.requestHeaders.getAllRawHeaders())
        flat = [(name, value) for name, values in headers for value in values]
        pool = self.pools[route.name]
        if is_websocket_upgrade(request.method, flat):
            return self._upgrade(request, route, pool, path, query, flat, host)
        self._count_http(request, route.name)
        if self.authenticator is None or route.auth == "none":
            return self._forward(request, route, path, query, flat, None)
        d = Deferred.fromCoroutine(self._authenticate_and_forward(request, route, path, query, flat))
        request.notifyFinish().addErrback(lambda _: d.cancel())
        d.addErrback(lambda f: None if f.check(CancelledError) else log.failure("auth failed", f))
        return NOT_DONE_YET

    def streams_body(self, method: bytes, uri: bytes, headers) -> bool:
        """
        Whether a request whose head was just read goes upstream before its
        body (its route has ``request_buffering = off``); anything the route
        would refuse is left to :meth:`render`, after the body as usual.
        """
        try:
            path = normalize_path(split_uri(uri)[0])
        except GatewayError:
            return False
        route = self._table.match(path)
        if route is None or route.request_buffering:
            return False
        flat = [(name, value) for name, values in headers.getAllRawHeaders() for value in values]
        return not is_websocket_upgrade(method, flat)

    def _own_page(self, request, path: bytes) -> bytes | None:
        """The gateway's own pages: /healthz, /readyz and (unless on [admin]) the operator's."""
        if path == b"/healthz":
            status = {
                "status": "ok",
                "websockets": len(self.registry.pairs),
                "handshakes": len(self.registry.handshakes),
            }
            if self.worker_stats is not None:  # one of several workers: answer for all
                status.update(
                    workers=self.worker_stats.workers,
                    worker=self.worker_stats.worker,
                    websockets=self.worker_stats.websockets(),
                    worker_websockets=len(self.registry.pairs),
                )
            return _json(request, 200, status)
        if path == b"/readyz":
            if self.draining:
                return _json(request, 503, {"status": "draining"})
            stats = self.worker_stats
            if stats is not None and stats.ready_workers() < stats.workers:
                detail = f"{stats.ready_workers()} of {stats.workers} workers ready"
                return _json(request, 503, {"status": "not_ready", "detail": detail})
            if self.authenticator is not None and not self.authenticator.ready():
                detail = "the JWKS has not been fetched yet"
                return _json(request, 503, {"status": "not_ready", "detail": detail})
            if not self.cluster.ready:
                detail = "the revocations are not loaded from the cluster's Redis yet"
                return _json(request, 503, {"status": "not_ready", "detail": detail})
            for name, pool in self.pools.items():
                if not any(instance.state == UP for instance in pool.instances):
                    detail = f"route {name!r} has no healthy upstream instance"
                    return _json(request, 503, {"status": "not_ready", "detail": detail})
            return _json(request, 200, {"status": "ready"})
        if path in ADMIN_PAGES and self.serve_admin_pages:
            if not self._is_admin(request):
                raise NotFound(f"no route for {path.decode('ascii')}")
            return self.admin_pages[path[1:]].render(request)
        return None

    def _is_admin(self, request) -> bool:
        """Whether this client may read the operator's pages here (``admin_allow``)."""
        return is_admin(
            peer_host(request.getClientAddress()),
            request.requestHeaders.getRawHeaders(b"x-forwarded-for", []),
            self.settings.gateway.trusted_proxies,
            self.settings.admin.admin_allow,
        )

    def _upgrade(self, request, route, pool, path, query, headers, host) -> bytes | int:
        """Refuse what limits and the Origin policy forbid; hand the rest to the relay."""
        name = route.name
        if not route.websocket:
            raise BadRequest(f"route {name!r} does not accept WebSocket upgrades")
        gateway = self.settings.gateway
        limit = None
        if gateway.max_connections and self.registry.total_active() >= gateway.max_connections:
            limit = f"the gateway holds its maximum of {gateway.max_connections} WebSockets"
        elif route.max_websockets and self.registry.active.get(name, 0) >= route.max_websockets:
            limit = f"route {name!r} holds its maximum of {route.max_websockets} WebSockets"
        if limit is not None:
            self.metrics.ws_handshake(name, "limited")
            raise GatewayError(limit, status=503, error="limited")
        try:
            origin = single_origin(request.requestHeaders.getRawHeaders(b"origin", []))
        except GatewayError:
            self.metrics.ws_handshake(name, "forbidden")
            raise
        if not origin_allowed(origin, route.allowed_origins, route.allow_null_origin):
            self.metrics.ws_handshake(name, "forbidden")
            raise GatewayError(
                f"origin {origin.decode('latin-1')!r} is not allowed on route {name!r}",
                status=403,
                error="forbidden_origin",
            )
        check_utf8_values(headers)
        context = HandshakeContext(
            route=route,
            pool=pool,
            path=path,
            query=query,
            peer=peer_host(request.getClientAddress()),
            scheme="https" if request.isSecure() else "http",
            host=host,
            headers=headers,
        )
        return hand_over(request, self._ws_factories[name], context)

    async def _authenticate_and_forward(self, request, route, path, query, headers) -> None:
        """Check the token once, then forward with the identity; a refusal never goes upstream."""
        authenticator = self.authenticator
        try:
            identity = await authenticator.authenticate(route.auth, headers, query, route)
        except GatewayError as e:
            request.write(render_error(request, e))
            request.finish()
            return
        self._forward(request, route, path, authenticator.upstream_query(query), headers, identity)

    def _forward(self, request, route, path, query, headers, identity) -> bytes | int:
        pool = self.pools[route.name]
        claims = identity.claims if identity is not None else None
        key = pool.request_key(
            query=query,
            headers=headers,
            claims=claims,
            peer=peer_host(request.getClientAddress()),
            trusted_proxies=self.settings.gateway.trusted_proxies,
        )
        extra = identity.upstream_headers(route.claims_header) if identity is not None else ()
        return self.http_forwarder.forward(
            request,
            pool,
            path,
            query,
            key=key,
            extra_headers=extra,
            route_name=route.name,
            underscores=route.underscores_in_headers,
            host_header=route.host_header,
            request_timeout=route.request_timeout,
        )


def _below_mount_point(path: bytes, depth: int) -> bytes:
    """The part of a raw path below the resource's mount point (``depth`` segments)."""
    if depth == 0:
        return path
    segments = path.split(b"/")
    return b"/" + b"/".join(segments[depth + 1 :])


def _json(request, status: int, body: dict) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(body).encode() + b"\n"


def _build_health_checker(
    pools, reactor: Any, settings: Settings, connect: Any, tls_policy: Any
) -> Any:
    """Active checks for the routes that ask for them (``health_check``), else None."""
    if not any(route.health_check for route in settings.routes):
        return None
    from twisted.web.client import Agent, HTTPConnectionPool

    from twisted_gateway.health import HealthChecker
    from twisted_gateway.http_proxy import UpstreamEndpoints

    # The forwarder's endpoints: an IP literal is connected directly, not
    # resolved in a thread, so a gateway short of threads or CPU does not fail
    # every check at once and blame its upstreams.
    agent = Agent.usingEndpointFactory(
        reactor,
        UpstreamEndpoints(reactor, settings.gateway.connect_timeout, tls_policy),
        pool=HTTPConnectionPool(reactor, persistent=False),
    )
    return HealthChecker(list(pools), reactor, agent, ws_connect=connect)


def _build_authenticator(auth: Any, reactor: Any, connect_timeout: float) -> Any:
    """A request waits for a JWKS fetch no longer than it would for an upstream's connect."""
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    from twisted_gateway.auth import Authenticator

    client = None
    if auth.jwks_url or auth.oidc_issuer:
        from twisted_gateway.tls import UpstreamTLS, UpstreamTLSPolicy

        agent = Agent(
            reactor,
            # [auth] ca_file: a provider behind an internal CA; else the system's trust store
            contextFactory=UpstreamTLSPolicy({}, UpstreamTLS.for_ca_file(auth.ca_file)),
            connectTimeout=connect_timeout,
            pool=HTTPConnectionPool(reactor, persistent=False),
        )
        client = HTTPClient(agent)
    return Authenticator(auth, reactor, client, wait_limit=connect_timeout)


def build_gateway_resource(settings: Settings, reactor: Any, **kwargs: Any) -> GatewayResource:
    """The gateway's resource tree, ready to be a ``Site`` root or a child of one."""
    return GatewayResource(settings, reactor=reactor, **kwargs)
