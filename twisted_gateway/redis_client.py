"""
The two Redis connections of a cluster member, on txredisapi.

txredisapi is the Twisted-native client (no thread, no blocking call): one
connection carries commands, one the subscription (a subscribed connection
can carry nothing else). Both reconnect with backoff; :mod:`cluster` is told
when the subscription is ready again (to reload its state) and when it is lost.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Coroutine, TypeVar

import txredisapi
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IAddress, IProtocol, IProtocolFactory, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

if TYPE_CHECKING:
    from twisted_gateway.schema import RedisAddress
    from twisted_gateway.tls import UpstreamTLS

log = Logger()

#: Backoff between reconnects: from half a second up to five.
INITIAL_DELAY = 0.5
MAX_DELAY = 5.0


def _endpoint(address: RedisAddress, tls: UpstreamTLS) -> IStreamClientEndpoint:
    """TCP, or TLS (``rediss://``): the server's certificate and name checked as ``tls`` says."""
    endpoint: IStreamClientEndpoint = HostnameEndpoint(_reactor, address.host, address.port, timeout=5)
    if address.tls:
        endpoint = txredisapi._TLSEndpoint(endpoint, tls.creator_for(address.host))
    return endpoint


def _tune(factory: _F, address: RedisAddress, on_error: Callable[[str], None]) -> _F:
    factory.initialDelay, factory.maxDelay = INITIAL_DELAY, MAX_DELAY  # type: ignore[assignment]  # txredisapi: int
    factory.password, factory.username = address.password, address.username
    factory.dbid = address.db or None  # a new connection is on database 0: no SELECT
    factory.on_error = on_error
    return factory


class _KeepTrying:
    """
    txredisapi gives up reconnecting for good when AUTH or SELECT fails, even
    when only the connection was cut (a restarting Redis, a failed TLS
    handshake), and errbacks a Deferred nobody holds: keep trying with backoff
    (``disconnect`` still stops it) and tell why instead.
    """

    on_error: Callable[[str], None]

    def stopTrying(self) -> Deferred[None]:
        return succeed(None)

    def connectionError(self, why: str) -> None:
        self.on_error(why)


class _CommandsFactory(_KeepTrying, txredisapi.RedisFactory):
    pass


_F = TypeVar("_F", _CommandsFactory, "_SubscriberFactory")


class _Subscriber(txredisapi.SubscriberProtocol):
    """Subscribes on every (re)connect and hands messages to the cluster."""

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)  # type: ignore[no-untyped-call]  # txredisapi is unannotated
        self.factory.on_lost(reason.getErrorMessage())

    def messageReceived(self, pattern: bytes | str | None, channel: bytes | str, message: object) -> None:
        self.factory.on_message(_text(channel), _text(message))


def _text(value: object) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class _SubscriberFactory(_KeepTrying, txredisapi.SubscriberFactory):
    protocol = _Subscriber
    channels: list[str]
    on_ready: Callable[[], Coroutine[Deferred[object], object, None]]
    on_lost: Callable[[str], None]
    on_message: Callable[[str, str], None]

    # (txredisapi's connectionMade returns a Deferred: not a Protocol as Twisted types one)
    def buildProtocol(self, addr: IAddress | None) -> _Subscriber:  # type: ignore[override]
        protocol: _Subscriber = super().buildProtocol(addr)  # type: ignore[no-untyped-call]  # txredisapi
        protocol.whenConnected().addCallback(self._subscribe)  # type: ignore[no-untyped-call]  # txredisapi
        return protocol

    def _subscribe(self, protocol: _Subscriber) -> None:
        d = protocol.subscribe(self.channels)  # type: ignore[no-untyped-call]  # txredisapi

        def subscribed(_: object) -> Deferred[None]:
            return Deferred.fromCoroutine(self.on_ready())

        d.addCallback(subscribed)
        d.addErrback(self._failed, protocol)

    def _failed(self, failure: Failure, protocol: _Subscriber) -> None:
        log.warn("cluster: cannot resubscribe or reload from Redis: {error}", error=failure.getErrorMessage())
        if protocol.transport is not None:
            protocol.transport.loseConnection()  # and try again


class _Watched:
    """An endpoint whose failed connection attempts are told (why Redis is unreachable: refused, TLS)."""

    def __init__(self, endpoint: IStreamClientEndpoint, on_failed: Callable[[str], None]) -> None:
        self._endpoint, self._on_failed = endpoint, on_failed

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        d = self._endpoint.connect(factory)

        def failed(failure: Failure) -> Failure:
            self._on_failed(failure.getErrorMessage())
            return failure

        return d.addErrback(failed)


def connect(
    address: RedisAddress,
    tls: UpstreamTLS,
    channels: list[str],
    *,
    on_ready: Callable[[], Coroutine[Deferred[object], object, None]],
    on_lost: Callable[[str], None],
    on_error: Callable[[str], None],
    on_message: Callable[[str, str], None],
    clock: IReactorTime,
) -> tuple[txredisapi.ConnectionHandler, list[txredisapi.RedisFactory]]:
    """Start both connections; returns the command handler and the factories to disconnect."""
    # (txredisapi is unannotated)
    commands = _CommandsFactory(f"{address.host}:{address.port}", address.db, 1, isLazy=True)  # type: ignore[no-untyped-call]
    _tune(commands, address, on_error)
    commands.startConnecting(_Watched(_endpoint(address, tls), on_error))  # type: ignore[no-untyped-call]
    subscriber = _tune(_SubscriberFactory(isLazy=True), address, on_error)  # type: ignore[no-untyped-call]
    subscriber.channels = channels
    subscriber.on_ready, subscriber.on_lost, subscriber.on_message = on_ready, on_lost, on_message
    subscriber.startConnecting(_Watched(_endpoint(address, tls), on_error))  # type: ignore[no-untyped-call]
    return commands.handler, [subscriber, commands]
