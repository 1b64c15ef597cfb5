"""
The two Redis connections of a cluster member, on txredisapi.

txredisapi is the Twisted-native client (no thread, no blocking call): one
connection carries commands, one the subscription (a subscribed connection
can carry nothing else). Both reconnect with backoff; :mod:`cluster` is told
when the subscription is ready again (to reload its state) and when it is lost.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

import txredisapi
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint
from twisted.logger import Logger

log = Logger()

#: Backoff between reconnects: from half a second up to five.
INITIAL_DELAY = 0.5
MAX_DELAY = 5.0


def _endpoint(address: Any, tls: Any) -> Any:
    """TCP, or TLS (``rediss://``): the server's certificate and name checked as ``tls`` says."""
    endpoint = HostnameEndpoint(_reactor, address.host, address.port, timeout=5)
    if address.tls:
        endpoint = txredisapi._TLSEndpoint(endpoint, tls.creator_for(address.host))
    return endpoint


def _tune(factory: Any, address: Any, on_error: Callable[[str], None]) -> Any:
    factory.initialDelay, factory.maxDelay = INITIAL_DELAY, MAX_DELAY
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

    def stopTrying(self) -> Deferred:
        return succeed(None)

    def connectionError(self, why: str) -> None:
        self.on_error(why)


class _CommandsFactory(_KeepTrying, txredisapi.RedisFactory):
    pass


class _Subscriber(txredisapi.SubscriberProtocol):
    """Subscribes on every (re)connect and hands messages to the cluster."""

    def connectionLost(self, why: Any) -> None:
        super().connectionLost(why)
        self.factory.on_lost(why.getErrorMessage())

    def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
        self.factory.on_message(_text(channel), _text(message))


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class _SubscriberFactory(_KeepTrying, txredisapi.SubscriberFactory):
    protocol = _Subscriber

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        protocol.whenConnected().addCallback(self._subscribe)
        return protocol

    def _subscribe(self, protocol: Any) -> None:
        d = protocol.subscribe(self.channels)

        def subscribed(_: Any) -> Any:
            return Deferred.fromCoroutine(self.on_ready())

        d.addCallback(subscribed)
        d.addErrback(self._failed, protocol)

    def _failed(self, failure: Any, protocol: Any) -> None:
        log.warn("cluster: cannot resubscribe or reload from Redis: {error}", error=failure.getErrorMessage())
        if protocol.transport is not None:
            protocol.transport.loseConnection()  # and try again


class _Watched:
    """An endpoint whose failed connection attempts are told (why Redis is unreachable: refused, TLS)."""

    def __init__(self, endpoint: Any, on_failed: Callable[[str], None]) -> None:
        self._endpoint, self._on_failed = endpoint, on_failed

    def connect(self, factory: Any) -> Deferred:
        d = self._endpoint.connect(factory)

        def failed(failure: Any) -> Any:
            self._on_failed(failure.getErrorMessage())
            return failure

        return d.addErrback(failed)


def connect(
    address: Any,
    tls: Any,
    channels: list[str],
    *,
    on_ready: Callable[[], Awaitable[None]],
    on_lost: Callable[[str], None],
    on_error: Callable[[str], None],
    on_message: Callable[[str, str], None],
    clock: Any,
) -> tuple[Any, list[Any]]:
    """Start both connections; returns the command handler and the factories to disconnect."""
    commands = _tune(_CommandsFactory(f"{address.host}:{address.port}", address.db, 1, isLazy=True), address, on_error)
    commands.startConnecting(_Watched(_endpoint(address, tls), on_error))
    subscriber = _tune(_SubscriberFactory(isLazy=True), address, on_error)
    subscriber.channels = channels
    subscriber.on_ready, subscriber.on_lost, subscriber.on_message = on_ready, on_lost, on_message
    subscriber.startConnecting(_Watched(_endpoint(address, tls), on_error))
    return commands.handler, [subscriber, commands]
