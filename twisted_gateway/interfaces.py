"""
The gateway's replaceable parts, as zope interfaces: what the router and the
relay ask of the HTTP forwarder, the upstream connector and the authenticator.
A test or an application passes its own provider to ``build_gateway``; the
clock is Twisted's own ``IReactorTime``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Awaitable, ClassVar, Iterable, Mapping, Protocol, Sequence

from zope.interface import Interface

if TYPE_CHECKING:
    from autobahn.twisted.websocket import WebSocketClientFactory
    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import IProtocol
    from twisted.web.iweb import IRequest
    from twisted.web.server import Request

    from twisted_gateway.identity import Identity
    from twisted_gateway.schema import RouteSettings
    from twisted_gateway.upstreams import UpstreamPool


class IHTTPForwarder(Interface):
    """Carries a routed HTTP request to one of its route's upstreams and streams the answer back."""

    def forward(
        request: Request,
        upstream: UpstreamPool,
        path: bytes,
        query: bytes,
        *,
        key: str | None,
        extra_headers: Iterable[tuple[bytes, bytes]],
        route_name: str,
        underscores: bool,
        host_header: str,
        request_timeout: float | None,
    ) -> bytes | int:
        """
        Answer ``request`` (raw ``path`` and ``query`` below the gateway) from
        an instance of ``upstream`` chosen with ``key``; returns what
        ``Resource.render`` returns (usually ``NOT_DONE_YET``).
        """

    def close() -> Deferred[None]:
        """Close idle upstream connections; fires once they are closed."""


class IUpstreamConnector(Interface):
    """Opens the upstream leg of a WebSocket (the relay and the ``ws:`` health checks)."""

    def connect(factory: WebSocketClientFactory) -> Deferred[IProtocol]:
        """Connect ``factory`` to its ``host`` and ``port``; fires with the protocol it built."""


class IAuthenticator(Interface):
    """Says who a request's token proves the caller is, for the routes' ``auth`` modes."""

    def authenticate(
        mode: str, headers: Sequence[tuple[bytes, bytes]], query: bytes, route: RouteSettings | None = None
    ) -> Awaitable[Identity | None]:
        """
        The identity under ``mode`` (``required``, ``optional``, ``none``);
        raises ``GatewayError`` (401, 403, 503) for a refusal.
        """

    def upstream_query(query: bytes) -> bytes:
        """The query string sent upstream (without the token when configured so)."""

    def ready() -> bool:
        """Whether tokens can be verified now (``/readyz``): the keys are loaded."""

    def key_counts() -> tuple[int, Mapping[str, int]]:
        """The number of known keys and the failed key fetches by reason (metrics)."""

    def start() -> None:
        """Start fetching and refreshing keys, if any are fetched."""

    def stop() -> Deferred[None]:
        """Stop what :meth:`start` started; fires when nothing is left running."""


class LiveSession(Protocol):
    """
    What the owners of a live WebSocket other than the relay see of it (its
    ageing, revocations, the admin API): :class:`twisted_gateway.ws_pair.Pair`.
    """

    STATE_OPEN: ClassVar[int]
    session_id: str
    identity: Identity | None
    opened_at: float

    @property
    def done(self) -> Deferred[None]:
        """Fires once both legs are gone and everything is released."""

    @property
    def state(self) -> int: ...

    @property
    def route_name(self) -> str: ...

    @property
    def peer(self) -> str: ...

    def close_both(self, close: tuple[int, bytes], reason: str = "gateway") -> None: ...
