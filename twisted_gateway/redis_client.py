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
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.logger import Logger

log = Logger()

#: Backoff between reconnects: from half a second up to five.
INITIAL_DELAY = 0.5
MAX_DELAY = 5.0


def _endpoint(address: Any) -> Any:
    endpoint = HostnameEndpoint(_reactor, address.host, address.port, timeout=5)
    if address.tls:
        from twisted.internet.ssl import optionsForClientTLS

        endpoint = txredisapi._TLSEndpoint(endpoint, optionsForClientTLS(address.host))
    return endpoint


def _tune(factory: Any, address: Any) -> Any:
    factory.initialDelay, factory.maxDelay = INITIAL_DELAY, MAX_DELAY
    factory.password, factory.username = address.password, address.username
    factory.dbid = address.db
    return factory


class _Subscriber(txredisapi.SubscriberProtocol):
    """Subscribes on every (re)connect and hands messages to the cluster."""

    def connectionLost(self, why: Any) -> None:
        super().connectionLost(why)
        self.factory.on_lost()

    def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
        self.factory.on_message(_text(channel), _text(message))


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class _SubscriberFactory(txredisapi.SubscriberFactory):
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


def connect(
    address: Any,
    channels: list[str],
    *,
    on_ready: Callable[[], Awaitable[None]],
    on_lost: Callable[[], None],
    on_message: Callable[[str, str], None],
    clock: Any,
) -> tuple[Any, list[Any]]:
    """Start both connections; returns the command handler and the factories to disconnect."""
    commands = _tune(
        txredisapi.RedisFactory(f"{address.host}:{address.port}", address.db, 1, isLazy=True), address
    )
    commands.startConnecting(_endpoint(address))
    subscriber = _tune(_SubscriberFactory(isLazy=True), address)
    subscriber.channels = channels
    subscriber.on_ready, subscriber.on_lost, subscriber.on_message = on_ready, on_lost, on_message
    subscriber.startConnecting(_endpoint(address))
    return commands.handler, [subscriber, commands]
