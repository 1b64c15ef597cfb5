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

from twisted_gateway.auth import strip_query_param

from twisted_gateway.config import RouteSettings, Settings
from twisted_gateway.errors import BadRequest, GatewayError, NotFound, render_error
from twisted_gateway.headers import is_websocket_upgrade
from twisted_gateway.routing import RouteTable, normalize_path, split_uri
from twisted_gateway.upstreams import InstanceRegistry, UpstreamPool, hash_key_value
from twisted_gateway.ws_proxy import (
    HandshakeContext,
    RelayRegistry,
    RelayServerFactory,
    endpoint_connector,
    hand_over,
)

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
    ) -> None:
        super().__init__()
        self.settings = settings
        self.registry = registry if registry is not None else RelayRegistry()
        self.http_forwarder = http_forwarder
        if authenticator is None and settings.auth is not None:
            authenticator = _build_authenticator(settings.auth, reactor)
        self.authenticator = authenticator
        #: set when the gateway stops: new work is refused with 503, /readyz says so
        self.draining = False
        connect = ws_connect or endpoint_connector(reactor, settings.gateway.connect_timeout)
        self._table: RouteTable[RouteSettings] = RouteTable((r.prefix, r) for r in settings.routes)
        #: health and counters per upstream URL, shared by the routes naming it
        self.upstreams = upstreams if upstreams is not None else InstanceRegistry(reactor)
        self.pools = {r.name: UpstreamPool.for_route(r, self.upstreams) for r in settings.routes}
        self._ws_factories = {
            route.name: RelayServerFactory(
                route,
                settings.gateway,
                clock=reactor,
                registry=self.registry,
                connect=connect,
                authenticator=authenticator,
            )
            for route in settings.routes
            if route.websocket
        }

    def render(self, request) -> bytes | int:
        try:
            return self._route(request)
        except GatewayError as e:
            return render_error(request, e)

    def _route(self, request) -> bytes | int:
        raw_path, query = split_uri(request.uri)
        path = normalize_path(_below_mount_point(raw_path, len(request.prepath)))
        if path == b"/healthz" and request.method in (b"GET", b"HEAD"):
            request.setHeader(b"content-type", b"application/json")
            status = {
                "status": "ok",
                "websockets": len(self.registry.pairs),
                "handshakes": len(self.registry.handshakes),
            }
            return json.dumps(status).encode() + b"\n"
        if path == b"/readyz" and request.method in (b"GET", b"HEAD"):
            request.setHeader(b"content-type", b"application/json")
            if self.draining:
                request.setResponseCode(503)
                return b'{"status": "draining"}\n'
            return b'{"status": "ready"}\n'
        if self.draining:
            raise GatewayError(
                "the gateway is shutting down", status=503, error="service_unavailable"
            )
        route = self._table.match(path)
        if route is None:
            raise NotFound(f"no route for {path.decode('ascii', 'replace')}")
        headers = list(request.requestHeaders.getAllRawHeaders())
        flat = [(name, value) for name, values in headers for value in values]
        pool = self.pools[route.name]
        if is_websocket_upgrade(request.method, flat):
            if not route.websocket:
                raise BadRequest(f"route {route.name!r} does not accept WebSocket upgrades")
            context = HandshakeContext(
                route=route,
                pool=pool,
                path=path,
                query=query,
                peer=_peer_host(request),
                scheme="https" if request.isSecure() else "http",
                host=request.getHeader(b"host"),
                headers=flat,
            )
            return hand_over(request, self._ws_factories[route.name], context)
        if self.http_forwarder is None:
            raise GatewayError("this gateway has no HTTP forwarder", status=501, error="not_implemented")
        if self.authenticator is None or route.auth == "none":
            return self._forward(request, route, path, query, flat, None)
        d = Deferred.fromCoroutine(self._authenticate_and_forward(request, route, path, query, flat))
        request.notifyFinish().addErrback(lambda _: d.cancel())
        d.addErrback(lambda f: None if f.check(CancelledError) else log.failure("auth failed", f))
        return NOT_DONE_YET

    async def _authenticate_and_forward(self, request, route, path, query, headers) -> None:
        """Check the token once, then forward with the identity; a refusal never goes upstream."""
        authenticator = self.authenticator
        try:
            identity = await authenticator.authenticate(route.auth, headers, query)
        except GatewayError as e:
            request.write(render_error(request, e))
            request.finish()
            return
        if authenticator.settings.strip_token:
            query = strip_query_param(query, authenticator.settings.query_param)
        self._forward(request, route, path, query, headers, identity)

    def _forward(self, request, route, path, query, headers, identity) -> bytes | int:
        pool = self.pools[route.name]
        key = None
        if pool.hash_key is not None:
            claims = identity.claims if identity is not None else None
            key = hash_key_value(pool.hash_key, query=query, headers=headers, claims=claims)
        extra = identity.upstream_headers() if identity is not None else ()
        return self.http_forwarder.forward(
            request, pool, path, query, key=key, extra_headers=extra, route_name=route.name
        )


def _below_mount_point(path: bytes, depth: int) -> bytes:
    """The part of a raw path below the resource's mount point (``depth`` segments)."""
    if depth == 0:
        return path
    segments = path.split(b"/")
    return b"/" + b"/".join(segments[depth + 1 :])


def _peer_host(request) -> str:
    peer = request.getClientAddress()
    return getattr(peer, "host", None) or "unix"


def _build_authenticator(auth: Any, reactor: Any) -> Any:
    from treq.client import HTTPClient
    from twisted.web.client import Agent

    from twisted_gateway.auth import Authenticator

    client = HTTPClient(Agent(reactor)) if auth.jwks_url else None
    return Authenticator(auth, reactor, client)


def build_gateway_resource(settings: Settings, reactor: Any, **kwargs: Any) -> GatewayResource:
    """The gateway's resource tree, ready to be a ``Site`` root or a child of one."""
    return GatewayResource(settings, reactor=reactor, **kwargs)
