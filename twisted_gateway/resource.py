"""
The resource tree: one leaf that normalises the path, routes it by prefix and
hands the request to the WebSocket relay or to the HTTP forwarder: a thin
router over the parts of a :class:`~twisted_gateway.gateway.Gateway`, which
owns them and their background work.

Usable without twistd: :func:`build_gateway_resource` takes settings and a
reactor, and the result can be mounted under any path of an existing ``Site``.
"""

from __future__ import annotations

from typing import Sequence

from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.resource import IResource
from twisted.web.server import NOT_DONE_YET, Request

from twisted_gateway._bases import HTTPChannel, Resource
from twisted_gateway.admin import ADMIN_PAGES, is_admin
from twisted_gateway.config import RouteSettings, Settings
from twisted_gateway.deferreds import start
from twisted_gateway.errors import BadRequest, GatewayError, NotFound, render_error, render_json
from twisted_gateway.gateway import Gateway, build_gateway
from twisted_gateway.headers import (
    check_utf8_values,
    checked_host,
    is_websocket_upgrade,
    origin_allowed,
    peer_host,
    single_origin,
)
from twisted_gateway.http_proxy import GatewayRequest
from twisted_gateway.identity import Identity
from twisted_gateway.interfaces import IAuthenticator, IHTTPForwarder, IUpstreamConnector
from twisted_gateway.metrics import UNROUTED, MetricsResource
from twisted_gateway.routing import RouteTable, check_escaped_path, normalize_path, split_uri
from twisted_gateway.status import StatusJSONResource, StatusPageResource
from twisted_gateway.upstreams import UP, UpstreamPool
from twisted_gateway.ws_pair import HandshakeContext
from twisted_gateway.ws_proxy import UpgradeHead, hand_over

#: a request's headers, one (name, value) pair per value
HeaderPairs = list[tuple[bytes, bytes]]

#: the paths :meth:`GatewayResource._own_page` may answer
_OWN_PAGES = frozenset((b"/healthz", b"/readyz", *ADMIN_PAGES))

log = Logger()


class GatewayResource(Resource):
    """Routes every request below it over its gateway's parts; see the module docstring."""

    isLeaf = True

    def __init__(self, gateway: Gateway) -> None:
        super().__init__()
        #: the parts this routes over, and the service that runs them
        self.gateway = gateway
        self.settings = gateway.settings
        self._table: RouteTable[RouteSettings] = RouteTable((r.prefix, r) for r in self.settings.routes)
        #: False when an [admin] listener serves the operator's pages instead
        self.serve_admin_pages = True
        #: /metrics: a worker points it at every worker's families (``worker_stats.py``)
        self.metrics_page = MetricsResource(gateway.metrics.registry)
        #: the operator's pages (admin.py says who may read them where)
        self.admin_pages: dict[bytes, IResource] = {
            b"metrics": self.metrics_page,
            b"status": StatusPageResource(),
            b"status.json": StatusJSONResource(gateway.status),
        }

    def render(self, request: Request) -> bytes | int:
        try:
            return self._route(request)
        except GatewayError as e:
            if not getattr(request, "_gateway_counted", False):
                self._count_http(request, UNROUTED)
            return render_error(request, e)

    def _count_http(self, request: Request, route_name: str) -> None:
        """Count the request in the metrics when it finishes (or the client leaves)."""
        request._gateway_counted = True  # type: ignore[attr-defined]
        gateway = self.gateway
        started = gateway.clock.seconds()
        gateway.http_in_flight += 1

        def count(result: object = None) -> None:
            gateway.http_in_flight -= 1
            duration = gateway.clock.seconds() - started
            gateway.metrics.http_request(route_name, request.method, request.code, duration)

        if isinstance(request, GatewayRequest):
            request.when_done = count  # no Deferred per request
        else:
            request.notifyFinish().addBoth(count)

    def _route(self, request: Request) -> bytes | int:
        raw_path, query = split_uri(request.uri)
        host = checked_host(request.requestHeaders.getRawHeaders(b"host", []), request.clientproto)
        path = normalize_path(_below_mount_point(raw_path, len(request.prepath or ())))
        if request.method in (b"GET", b"HEAD"):
            own = self._own_page(request, path)
            if own is not None:
                return own
        route = self._routed(path)
        flat = [(name, value) for name, values in request.requestHeaders.getAllRawHeaders() for value in values]
        if is_websocket_upgrade(request.method, flat):
            return self._upgrade(request, route, path, query, flat, host)
        self._count_http(request, route.name)
        if self.gateway.authenticator is None or route.auth == "none":
            return self._forward(request, route, path, query, flat, None)
        # a cached token is checked without waiting: no Deferred to watch then
        d = start(self._authenticate_and_forward(request, route, path, query, flat))
        if not d.called:
            request.notifyFinish().addErrback(lambda _: d.cancel())
        if not d.called or isinstance(d.result, Failure):  # (a success fired already needs no errback)
            d.addErrback(_log_unless_cancelled)
        return NOT_DONE_YET

    def _routed(self, path: bytes) -> RouteSettings:
        """The route serving a normalised ``path``, or why none does (503 without the cluster, 404, 400)."""
        self.gateway.cluster.check_available()
        route = self._table.match(path)
        if route is None:
            raise NotFound(f"no route for {path.decode('ascii', 'replace')}")
        check_escaped_path(path, route, self._table, route.escaped_slashes)
        return route

    def take_upgrade(
        self, channel: HTTPChannel, method: bytes, uri: bytes, version: bytes, headers: dict[bytes, list[bytes]]
    ) -> bool:
        """
        Hand an upgrade request (without a body) to the relay from its head
        alone, as soon as it is read, when :meth:`render` would hand it over:
        no twisted.web ``Request`` is made of it, nor routed. Anything else
        (any refusal, the gateway's own pages) is left alone, False: the
        ``Request`` made of it then goes through :meth:`render` as every
        request does, refused and logged there. The channel's upgrade taker
        (``site.build_site``) when this resource is the site's root.
        """
        if method != b"GET":
            return False
        try:
            raw_path, query = split_uri(uri)
            host = checked_host(headers.get(b"Host", ()), version)
            path = normalize_path(raw_path)
            if path in _OWN_PAGES:
                return False
            route = self._routed(path)
        except GatewayError:
            return False
        flat = [(name, value) for name, values in headers.items() for value in values]
        if not is_websocket_upgrade(method, flat) or self._upgrade_refusal(route, headers.get(b"Origin", ()), flat):
            return False
        context = self._context(route, path, query, flat, host, channel.getPeer(), channel.isSecure())
        head = UpgradeHead(method, uri, list(headers.items()), checked=True)  # llhttp parsed it
        hand_over(channel, self.gateway.ws_factories[route.name], context, head, b"")
        return True

    def streams_body(self, method: bytes, uri: bytes, headers: Headers) -> bool:
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

    def _own_page(self, request: Request, path: bytes) -> bytes | int | None:
        """The gateway's own pages: /healthz, /readyz and (unless on [admin]) the operator's."""
        if path == b"/healthz":
            status: dict[str, object] = {
                "status": "ok",
                "websockets": len(self.gateway.registry.pairs),
                "handshakes": len(self.gateway.registry.handshakes),
            }
            if self.gateway.worker_stats is not None:  # one of several workers: answer for all
                status.update(
                    workers=self.gateway.worker_stats.workers,
                    worker=self.gateway.worker_stats.worker,
                    websockets=self.gateway.worker_stats.websockets(),
                    worker_websockets=len(self.gateway.registry.pairs),
                )
            return render_json(request, 200, status)
        if path == b"/readyz":
            if self.gateway.draining:
                return render_json(request, 503, {"status": "draining"})
            stats = self.gateway.worker_stats
            if stats is not None and stats.ready_workers() < stats.workers:
                detail = f"{stats.ready_workers()} of {stats.workers} workers ready"
                return render_json(request, 503, {"status": "not_ready", "detail": detail})
            if self.gateway.authenticator is not None and not self.gateway.authenticator.ready():
                detail = "the JWKS has not been fetched yet"
                return render_json(request, 503, {"status": "not_ready", "detail": detail})
            if not self.gateway.cluster.ready:
                detail = "the revocations are not loaded from the cluster's Redis yet"
                return render_json(request, 503, {"status": "not_ready", "detail": detail})
            for name, pool in self.gateway.pools.items():
                if not any(instance.state == UP for instance in pool.instances):
                    detail = f"route {name!r} has no healthy upstream instance"
                    return render_json(request, 503, {"status": "not_ready", "detail": detail})
            return render_json(request, 200, {"status": "ready"})
        if path in ADMIN_PAGES and self.serve_admin_pages:
            if not self._is_admin(request):
                raise NotFound(f"no route for {path.decode('ascii')}")
            page: bytes | int = self.admin_pages[path[1:]].render(request)
            return page
        return None

    def _is_admin(self, request: Request) -> bool:
        """Whether this client may read the operator's pages here (``admin_allow``)."""
        return is_admin(
            peer_host(request.getClientAddress()),
            request.requestHeaders.getRawHeaders(b"x-forwarded-for", []),
            self.settings.gateway.trusted_proxies,
            self.settings.admin.admin_allow,
        )

    def _upgrade(
        self, request: Request, route: RouteSettings, path: bytes, query: bytes, headers: HeaderPairs, host: bytes | None
    ) -> bytes | int:
        """Refuse what limits and the Origin policy forbid; hand the rest to the relay."""
        refusal = self._upgrade_refusal(route, request.requestHeaders.getRawHeaders(b"origin", []), headers)
        if refusal is not None:
            error, outcome = refusal
            if outcome is not None:
                self.gateway.metrics.ws_handshake(route.name, outcome)
            raise error
        head = UpgradeHead(request.method, request.uri, list(request.requestHeaders.getAllRawHeaders()))
        assert request.content is not None  # the body, stored before render
        context = self._context(route, path, query, headers, host, request.getClientAddress(), request.isSecure())
        factory = self.gateway.ws_factories[route.name]
        return hand_over(request.channel, factory, context, head, request.content.read())

    def _upgrade_refusal(
        self, route: RouteSettings, origins: Sequence[bytes], headers: HeaderPairs
    ) -> tuple[GatewayError, str | None] | None:
        """
        Why an upgrade on ``route`` is refused (the route, the limits, the
        Origin policy, a header value that is not UTF-8), with the outcome the
        metrics count it as (None: not counted); None when it may go ahead.
        """
        name = route.name
        if not route.websocket:
            return BadRequest(f"route {name!r} does not accept WebSocket upgrades"), None
        limits = self.settings.gateway
        limit = None
        if limits.max_connections and self.gateway.registry.total_active() >= limits.max_connections:
            limit = f"the gateway holds its maximum of {limits.max_connections} WebSockets"
        elif route.max_websockets and self.gateway.registry.active.get(name, 0) >= route.max_websockets:
            limit = f"route {name!r} holds its maximum of {route.max_websockets} WebSockets"
        if limit is not None:
            return GatewayError(limit, status=503, error="limited"), "limited"
        try:
            origin = single_origin(origins)
        except GatewayError as e:
            return e, "forbidden"
        if origin is not None and not origin_allowed(origin, route.allowed_origins, route.allow_null_origin):
            error = GatewayError(
                f"origin {origin.decode('latin-1')!r} is not allowed on route {name!r}",
                status=403,
                error="forbidden_origin",
            )
            return error, "forbidden"
        try:
            check_utf8_values(headers)
        except GatewayError as e:
            return e, None
        return None

    def _context(
        self,
        route: RouteSettings,
        path: bytes,
        query: bytes,
        headers: HeaderPairs,
        host: bytes | None,
        client: IAddress | None,
        secure: bool,
    ) -> HandshakeContext:
        """What the relay is told of an upgrade request it is handed."""
        return HandshakeContext(
            route=route,
            pool=self.gateway.pools[route.name],
            path=path,
            query=query,
            peer=peer_host(client),
            scheme="https" if secure else "http",
            host=host,
            headers=headers,
        )

    async def _authenticate_and_forward(
        self, request: Request, route: RouteSettings, path: bytes, query: bytes, headers: HeaderPairs
    ) -> None:
        """Check the token once, then forward with the identity; a refusal never goes upstream."""
        authenticator = self.gateway.authenticator
        assert authenticator is not None
        try:
            identity = await authenticator.authenticate(route.auth, headers, query, route)
        except GatewayError as e:
            request.write(render_error(request, e))
            request.finish()
            return
        self._forward(request, route, path, authenticator.upstream_query(query), headers, identity)

    def _forward(
        self,
        request: Request,
        route: RouteSettings,
        path: bytes,
        query: bytes,
        headers: HeaderPairs,
        identity: Identity | None,
    ) -> bytes | int:
        pool = self.gateway.pools[route.name]
        claims = identity.claims if identity is not None else None
        key = pool.request_key(
            query=query,
            headers=headers,
            claims=claims,
            peer=peer_host(request.getClientAddress()),
            trusted_proxies=self.settings.gateway.trusted_proxies,
        )
        extra = identity.upstream_headers(route.claims_header) if identity is not None else ()
        return self.gateway.forwarder.forward(
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


def _log_unless_cancelled(failure: Failure) -> None:
    """An authentication that failed otherwise than by the client leaving is logged."""
    if not failure.check(CancelledError):
        log.failure("auth failed", failure)


def build_gateway_resource(
    settings: Settings,
    reactor: IReactorTime,
    *,
    clock: IReactorTime | None = None,
    forwarder: IHTTPForwarder | None = None,
    connector: IUpstreamConnector | None = None,
    authenticator: IAuthenticator | None = None,
) -> GatewayResource:
    """
    The gateway's resource tree, ready to be a ``Site`` root or a child of one.
    Its ``gateway`` is the service running the background work (keepalive
    pings, health checks, JWKS refresh): start it with the application.
    The keywords replace real parts, as ``build_gateway``'s do.
    """
    gateway = build_gateway(
        settings, reactor, clock=clock, forwarder=forwarder, connector=connector, authenticator=authenticator
    )
    return GatewayResource(gateway)
