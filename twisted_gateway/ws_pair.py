"""
One WebSocket through the gateway: the client leg, the upstream leg once its
handshake is done, and what belongs to the two together (route and context,
the upstream instance, the token's expiry, the per-user cap, the session log).

The :class:`Pair` is the one place that decides how a pair ends: who closed,
with which code, what the other leg gets. The legs (:mod:`ws_relay`) report to
it; the registry holds pairs; the admin API, the drain, revocations and the
send timeout act on pairs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from twisted_gateway.access_log import emit_session
from twisted_gateway.faults import classify
from twisted_gateway.metrics import MessageFlow
from twisted_gateway.rate_limit import TokenBucket
from twisted_gateway.ws_relay import (
    CLIENT_LOST,
    CLIENT_STALLED,
    LEG_READ_SIZE,
    OPEN,
    RATE_LIMITED,
    SLOW_CONSUMER,
    TOKEN_EXPIRED,
    UNRESPONSIVE,
    UPSTREAM_LOST,
    UPSTREAM_STALLED,
    _RelayLeg,
    _Throttle,
)

if TYPE_CHECKING:
    from twisted_gateway.identity import Identity
    from twisted_gateway.upstreams import Instance
    from twisted_gateway.ageing import Ageing
    from twisted_gateway.cluster import Cluster
    from twisted_gateway.metrics import Metrics
    from twisted_gateway.schema import RouteSettings
    from twisted_gateway.upstreams import UpstreamPool
    from twisted_gateway.ws_relay import RelayRegistry

access_log = Logger(namespace="twisted_gateway.access")


@dataclass(frozen=True)
class HandshakeContext:
    """What the resource tree learnt about an upgrade request before handing it over."""

    route: RouteSettings
    pool: UpstreamPool
    path: bytes
    query: bytes
    peer: str
    scheme: str
    host: bytes | None
    headers: Sequence[tuple[bytes, bytes]]
    extra_headers: Sequence[tuple[bytes, bytes]] = ()

    def authenticated(self, query: bytes, extra_headers: Sequence[tuple[bytes, bytes]]) -> HandshakeContext:
        """
        This context as the upstream gets it once the request is authenticated:
        ``query`` (what the authenticator leaves of the client's) and
        ``extra_headers`` (the identity's) in place of its own, every other
        field kept. (A copy of the fields, as ``dataclasses.replace`` makes it
        without going through ``__init__``, which sets each field of a frozen
        dataclass through ``object.__setattr__``: ``replace`` was a third of
        what a cached token added to a handshake.)
        """
        copy = object.__new__(type(self))
        fields = copy.__dict__
        fields.update(self.__dict__)
        fields["query"], fields["extra_headers"] = query, extra_headers
        return copy


def random_bytes(size: int) -> bytes:
    """
    ``size`` bytes from ``os.urandom``, drawn :data:`RANDOM_AT_ONCE` at a time
    (one ``getrandom`` system call per many WebSockets' ids and upstream
    handshake keys, instead of one each).
    """
    global _random, _random_at
    start = _random_at
    if start + size > len(_random):
        _random, start = os.urandom(max(RANDOM_AT_ONCE, size)), 0
    _random_at = start + size
    return _random[start : start + size]


def new_session_id() -> str:
    """A new WebSocket's id: 16 random hex digits, as ``os.urandom(8).hex()`` makes one."""
    return random_bytes(8).hex()


RANDOM_AT_ONCE = 1024
#: Bytes drawn, given from ``_random_at`` on (none in a forked child: its own are drawn again).
_random = b""
_random_at = 0


def _forget_random() -> None:
    global _random, _random_at
    _random, _random_at = b"", 0


os.register_at_fork(after_in_child=_forget_random)


class PairServices(Protocol):
    """What a pair uses of its route's ``RelayServerFactory``."""

    route: RouteSettings
    clock: IReactorTime
    metrics: Metrics
    registry: RelayRegistry
    ageing: Ageing
    cluster: Cluster | None
    rate_limit: float
    rate_burst: float


class Direction:
    """What one way of a pair carried (and, client to upstream, its rate bucket): the pair's, counted by the leg that receives it."""

    __slots__ = ("messages", "payload_bytes", "flow", "bucket")

    def __init__(self, flow: MessageFlow, bucket: TokenBucket | None = None) -> None:
        self.messages = 0
        self.payload_bytes = 0
        #: the route's metrics for this way
        self.flow = flow
        #: ws_rate_limit's bucket (client to upstream only)
        self.bucket = bucket


class Pair:
    """The two legs of one WebSocket, from the hand-over of the client's request until both are gone."""

    STATE_OPEN: ClassVar[int] = OPEN

    def __init__(self, client: _RelayLeg, context: HandshakeContext, factory: PairServices) -> None:
        self.client = client
        self.upstream: _RelayLeg | None = None
        self.factory = factory
        self.context = context
        #: the id the admin API names this WebSocket by
        self.session_id = new_session_id()
        #: auth.Identity of the token it was opened with (revocations, caps, sessions)
        self.identity: Identity | None = None
        #: the per-user caps this WebSocket counts in (cluster.Cluster.acquire)
        self.capped: list[tuple[str, str]] | None = None
        #: the upstream instance the upstream leg is connected to
        self.instance: Instance | None = None
        self.expiry: IDelayedCall | None = None
        self.opened_at = 0.0
        #: (side, code, reason) of whatever ended the pair first
        self.ending: tuple[str, int | None, str] | None = None
        #: what each way carried, from join on
        self.inbound: Direction | None = None
        self.outbound: Direction | None = None

    #: both legs are gone and everything is released (:meth:`finish`)
    finished = False
    #: :attr:`done`, once asked for
    _done: Deferred[None] | None = None

    @property
    def done(self) -> Deferred[None]:
        """
        Fires once both legs are gone and everything is released. Made when
        first asked for (``ws_max_age``, the drain): no pair waits for most.
        """
        done = self._done
        if done is None:
            self._done = done = Deferred()
            if self.finished:
                done.callback(None)
        return done

    @property
    def state(self) -> int:
        """The client leg's WebSocket state (the pair is open while it is)."""
        state: int = self.client.state
        return state

    @property
    def route_name(self) -> str:
        return self.factory.route.name

    @property
    def peer(self) -> str:
        return self.context.peer

    def legs(self) -> tuple[_RelayLeg, ...]:
        return (self.client,) if self.upstream is None else (self.client, self.upstream)

    # -- opening --------------------------------------------------------------

    def join(self, upstream: _RelayLeg) -> None:
        """The upstream's handshake is done: the legs forward to each other from now on."""
        client, factory = self.client, self.factory
        self.upstream = upstream
        client.partner, upstream.partner = upstream, client
        upstream.pair = self
        metrics, route = factory.metrics, factory.route.name
        metrics.ws_opened(route)
        self.opened_at = factory.clock.seconds()
        bucket = None
        if factory.rate_limit:
            bucket = TokenBucket.full(factory.rate_limit, factory.rate_burst, self.opened_at)
        client.direction = self.inbound = Direction(metrics.flow(route, "client_to_upstream"), bucket)
        upstream.direction = self.outbound = Direction(metrics.flow(route, "upstream_to_client"))
        # Each transport pauses the other when its write buffer is full.
        # (TCP or TLS transports: Twisted's interfaces split what they are between
        # ITransport, IConsumer, IPushProducer, and bufferSize is in none of them.)
        client_transport: Any = client.transport
        upstream_transport: Any = upstream.transport
        client_transport.bufferSize = upstream_transport.bufferSize = LEG_READ_SIZE
        client_transport.registerProducer(_Throttle(upstream_transport, client), True)
        upstream_transport.registerProducer(_Throttle(client_transport, upstream), True)
        factory.registry.pairs.add(self)
        factory.ageing.watch(self)
        identity = self.identity
        if identity is not None and identity.expires_at is not None:
            delay = max(0.0, identity.expires_at - factory.clock.seconds())
            self.expiry = factory.clock.callLater(delay, self._token_expired)

    def opened(self) -> None:
        """Both legs open: whole frames pass as bytes unless an extension (compression) is in use."""
        client, upstream = self.client, self.upstream
        if upstream is not None:
            plain = not client.websocket_extensions_in_use and not upstream.websocket_extensions_in_use
            client.passthrough = upstream.passthrough = plain

    # -- how the pair ends ------------------------------------------------------

    def _token_expired(self) -> None:
        """No WebSocket outlives its token: close both legs with 1008."""
        self.expiry = None
        self.close_both(TOKEN_EXPIRED, "token_expired")

    def rate_exceeded(self) -> None:
        """The client sent faster than ``ws_rate_limit`` allows: 1008 on both legs."""
        if self.client.state == OPEN:
            self.factory.metrics.limit_rejection(self.factory.route.name, "ws_rate_limit")
        self.close_both(RATE_LIMITED, "rate_limit")

    def close_both(self, close: tuple[int, bytes], reason: str = "gateway") -> None:
        """The gateway ends the pair: the same close on both legs (expiry, drain, revocation)."""
        for leg in self.legs():
            leg.close_with(close, reason)

    def leg_closed(self, leg: _RelayLeg) -> None:
        """One leg is gone: close the other as the rules say; finish when both are."""
        if self.finished:
            return
        client, upstream = self.client, self.upstream
        if upstream is None:
            self.finish()
            return
        other = upstream if leg is client else client
        # (a leg the gateway failed has closed the other already: _RelayLeg.failed)
        if other.state == OPEN and leg.ended_without_close:
            if leg.timed_out:  # a silent vanish, found by TCP keepalive
                self.leg_unresponsive(leg, "keepalive")
            else:
                self.record_end(leg.side, 1006)
                other.close_with(UPSTREAM_LOST if leg is upstream else CLIENT_LOST)
        if client.state == client.STATE_CLOSED and upstream.state == upstream.STATE_CLOSED:
            self.finish()

    def leg_unresponsive(self, leg: _RelayLeg, reason: str) -> None:
        """
        A leg stopped answering (``ping_timeout``, or TCP ``keepalive``): the
        other gets 1011; an upstream's silence counts against its instance.
        """
        self.record_end("gateway", 1011, reason)
        client = self.client
        if leg is not client and self.instance is not None:
            fault = classify(None, client_gone=client.state == client.STATE_CLOSED, silent=True)
            if fault.counts:
                self.context.pool.report_failure(self.instance, fault.reason)
        other = self.upstream if leg is client else client
        if other is not None:
            other.close_with(UNRESPONSIVE)

    def slow_consumer(self, leg: _RelayLeg) -> None:
        """
        ``ws_send_timeout``: ``leg``'s peer accepted nothing of what waits for
        it. It gets 1008 "slow consumer" (queued behind what it does not read:
        the close handshake timeout aborts it if the frame cannot get through)
        and the other leg 1001 (upstream) or 1014 (client), read again so that
        its close handshake can finish.
        """
        client = self.client
        other = self.upstream if leg is client else client
        leg.close_with(SLOW_CONSUMER, "send_timeout")
        if other is not None and other.state == OPEN:
            other.close_with(CLIENT_STALLED if leg is client else UPSTREAM_STALLED)
            transport: Any = other.transport  # (a producer too: see join)
            if transport is not None:
                transport.resumeProducing()

    def record_end(self, side: str, code: int | None, reason: str = "") -> None:
        """Remember what ended the pair first, and why (for metrics and the session log)."""
        if self.ending is None:
            self.ending = (side, code, reason)

    def finish(self) -> None:
        """Both legs are gone (or the handshake failed): release everything, once."""
        if self.finished:
            return
        self.finished = True
        factory = self.factory
        registry = factory.registry
        registry.active[factory.route.name] -= 1
        registry.handshakes.discard(self)
        if self in registry.pairs:
            registry.pairs.discard(self)
            self._log_session()
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None
        if self.instance is not None:
            self.instance.release(websocket=True)
            self.instance = None
        if self.capped is not None and factory.cluster is not None:
            factory.cluster.release(self.capped)
            self.capped = None
        # The legs and the pair let go of each other, so that all of them are
        # freed as soon as the connections are, not by the cycle collector.
        for leg in self.legs():
            leg.partner = leg.pair = None
        if self._done is not None:
            self._done.callback(None)

    def _log_session(self) -> None:
        factory, inbound, outbound = self.factory, self.inbound, self.outbound
        side, code, reason = self.ending or ("gateway", None, "")
        factory.metrics.ws_closed(factory.route.name, side, code, reason)
        emit_session(
            access_log,
            (
                factory.route.name,
                self.context.path.decode("latin-1"),
                self.context.peer,
                self.instance.url if self.instance is not None else None,
                factory.clock.seconds() - self.opened_at,
                side,
                code,
                reason or None,
                inbound.messages if inbound is not None else 0,
                inbound.payload_bytes if inbound is not None else 0,
                outbound.messages if outbound is not None else 0,
                outbound.payload_bytes if outbound is not None else 0,
            ),
        )
