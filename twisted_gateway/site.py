"""
The gateway's HTTP front door: a ``Site`` speaking HTTP/1.1 only, with the
gateway's limits on the request head and body, its timers for slow clients,
a cap on client connections, JSON for what it refuses, and an access log
that never shows a token.

The site also knows its open client connections, so that a stopping gateway
can tell them to go (``Connection: close`` on every response) and close the
idle ones once its listeners are closed, instead of turning anyone away.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence
from weakref import WeakSet

from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    ITCPTransport,
    ITransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
from twisted.web.http import Request
from twisted.web.http_headers import Headers
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, getChildForRequest
from twisted.web.server import Request as WebRequest

from twisted_gateway._bases import Site, WrappingFactory
from twisted_gateway.config import Settings
from twisted_gateway.errors import GatewayError, Overloaded
from twisted_gateway.headers import peer_host
from twisted_gateway.http_proxy import LINGER_SECONDS, GatewayRequest
from twisted_gateway.limits import ClientLimits
from twisted_gateway.llhttp_channel import LlhttpChannel
from twisted_gateway.metrics import Metrics
from twisted_gateway.logs import access_log_formatter, secret_names
from twisted_gateway._compat import NOT_PRESET, accepted_preset, http_channel_made, write_now
from twisted_gateway.sockets import TCPKeepalive, set_keepalive

log = Logger()

#: Seconds a refused connection may linger after its 503 (the client reads it and closes).
REFUSAL_LINGER_SECONDS = 1.0


class GatewayChannel(LlhttpChannel):
    """
    HTTP/1.1 with a configurable head size; refusals carry a JSON body.

    Three timers replace ``HTTPChannel``'s single idle timeout (which every
    byte resets, so a head trickled one byte at a time was never cut off):
    the whole head must arrive within :attr:`header_timeout` of its first
    byte (of the connection, for the first request), a body may pause at
    most :attr:`body_timeout` between reads, and an idle keep-alive
    connection is closed after :attr:`keepalive_timeout`. A head or body cut
    off gets 408 JSON. No timer runs while a request is being answered.
    """

    header_timeout: float = 60.0
    body_timeout: float = 60.0
    keepalive_timeout: float = 75.0
    #: TCP keepalive of the client's socket (it stays on after a WebSocket hand-over)
    tcp_keepalive: TCPKeepalive | None = None
    _phase = "head"  # head | body | busy | idle
    _head_started = False
    _timer: IDelayedCall | None = None
    #: a response head waiting to go out with the first bytes of its body
    _response_head: list[bytes] | None = None
    #: set by the site that builds it
    site: GatewaySite

    def connectionMade(self) -> None:
        if accepted_preset(self.transport) is NOT_PRESET:
            super().connectionMade()
        else:
            http_channel_made(self)  # (TCP_NODELAY is its listener's)
        self.site.client_connections.add(self)
        set_keepalive(self.transport, self.tcp_keepalive)
        self._arm("head", self.header_timeout)

    def dataReceived(self, data: bytes) -> None:
        phase = self._phase
        if phase == "idle":
            self._arm("head", self.header_timeout)
        elif phase == "body":
            self._arm("body", self.body_timeout)
        if data:
            self._head_started = True
        super().dataReceived(data)

    #: the socket's two addresses (local, peer), each asked of it once, when first
    #: wanted (each ``Request`` asks for both; a WebSocket taken from its head, for the peer only)
    _addresses: list[IAddress | None] | None = None

    def _address(self, which: int) -> IAddress:
        addresses = self._addresses
        if addresses is None:
            addresses = self._addresses = [None, None]
        address = addresses[which]
        if address is None:
            transport = self.transport
            assert transport is not None  # requests are made while it is connected
            address = addresses[which] = transport.getPeer() if which else transport.getHost()
        return address

    def getHost(self) -> IAddress:
        """The local address (the socket's, asked once: a ``getsockname`` call)."""
        return self._address(0)

    def getPeer(self) -> IAddress:
        """The client's address (the socket's, asked once)."""
        return self._address(1)

    #: whether the transport is TLS, asked of it once (requests ask per request)
    _secure: bool | None = None

    def isSecure(self) -> bool:
        secure = self._secure
        if secure is None:
            secure = self._secure = super().isSecure()
        return secure

    # -- writing: a response's head and first body bytes in one send, now ------

    def writeHeaders(
        self, version: bytes, code: bytes, reason: bytes, headers: Headers | Sequence[tuple[bytes, bytes]]
    ) -> None:
        """
        Keep the head until :meth:`write` brings the body's first bytes (in the
        same ``Request.write``) or :meth:`send_response_head` ends that call:
        one send instead of two, and none left for the next reactor turn.
        While the gateway stops, every response says ``Connection: close`` and
        ends its connection.
        """
        if self.site.closing:
            assert isinstance(headers, Headers)  # as Request.write gives them
            headers.setRawHeaders(b"connection", [b"close"])
            self.persistent = False
        if not isinstance(headers, Headers):
            super().writeHeaders(version, code, reason, headers)
            return
        # HTTPChannel.writeHeaders' lines (Headers has already checked names and values)
        head = [version, b" ", code, b" ", reason, b"\r\n"]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                head += (name, b": ", value, b"\r\n")
        head.append(b"\r\n")
        self._response_head = head

    def write(self, data: bytes) -> None:
        head = self._response_head
        if head is not None:
            self._response_head = None
            head.append(data)
            data = b"".join(head)
        write_now(self.transport, data)

    def writeSequence(self, iovec: Iterable[bytes]) -> None:
        self.write(b"".join(iovec))

    def send_response_head(self) -> None:
        """Send a head that no body bytes followed (HEAD, 204, 304, an empty write)."""
        if self._response_head is not None:
            self.write(b"")

    def allHeadersReceived(self) -> None:
        if self.length != 0:
            self._arm("body", self.body_timeout)
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        # The timer stays armed (and does nothing if it fires while busy):
        # requestDone resets it rather than making a new one per request.
        self._phase = "busy"
        super().allContentReceived()

    def requestDone(self, request: IRequest) -> None:
        self.send_response_head()
        # Before the base class replays pipelined bytes (which start the next head).
        self._head_started = False
        self.answered += 1
        self._arm("idle", self.keepalive_timeout)
        super().requestDone(request)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._disarm("busy")
        self.site.client_connections.discard(self)
        super().connectionLost(reason)

    def setTimeout(self, period: float | None) -> float | None:
        """
        ``setTimeout(None)`` also stops this channel's own timer: a WebSocket
        hand-over says so when it takes the connection (the channel never
        hears of it again, and its timer, left armed while busy, must go).
        """
        if period is None:
            self._disarm("busy")
        previous: float | None = super().setTimeout(period)
        return previous

    def _arm(self, phase: str, seconds: float) -> None:
        self._phase = phase
        timer = self._timer
        if timer is not None and timer.active():
            timer.reset(seconds)
        else:
            self._timer = self.callLater(seconds, self._expired)

    def _disarm(self, phase: str) -> None:
        self._phase = phase
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _expired(self) -> None:
        self._timer = None
        phase, self._phase = self._phase, "busy"
        if phase == "busy":
            return  # a request is being answered: requestDone arms the next timer
        request = self.requests[-1] if self.requests else None
        if getattr(request, "_refused", False):
            return  # answered 413 already and lingering on its own timer
        if phase == "idle":
            self.loseConnection()
            return
        error = None
        if phase == "body":
            error = GatewayError(
                f"the request body paused for more than {self.body_timeout:g} s",
                status=408,
                error="body_timeout",
            )
        elif self._head_started:
            error = GatewayError(
                f"the request head did not arrive within {self.header_timeout:g} s",
                status=408,
                error="header_timeout",
            )
        if error is not None:
            assert self.transport is not None  # its timers run while it is connected
            log.info(
                "closed a slow client {peer}: {status} {error}",
                peer=peer_host(self.transport.getPeer()),
                status=error.status,
                error=error.error,
                outcome="timeout",
            )
        self._answer_and_close(error)

    def _answer_and_close(self, error: GatewayError | None) -> None:
        """
        Write ``error`` (if any) and close; what the client still sends is
        read and dropped for a moment, since closing a socket with unread
        input resets it and can destroy the answer in flight.
        """
        transport = self.transport
        self.persistent = False
        if error is None:
            self.loseConnection()
            return
        assert transport is not None  # its timers and parser run while it is connected
        transport.write(error.raw_response())
        self.dataReceived = _discard  # type: ignore[method-assign]  # from now on, reads are dropped
        self.setTimeout(LINGER_SECONDS)
        if ITCPTransport.providedBy(transport):
            transport.loseWriteConnection()
        else:
            self.loseConnection()

    def _respondToBadRequestAndDisconnect(self) -> None:
        if self._receivedHeaderSize > self.totalHeadersSize:
            error = GatewayError(
                f"the request head is larger than {self.totalHeadersSize} bytes",
                status=431,
                error="header_too_large",
            )
        else:
            error = GatewayError("malformed HTTP request", status=400, error="bad_request")
        assert self.transport is not None  # the parser runs while it is connected
        self.transport.write(error.raw_response())
        self.loseConnection()

    # -- a stopping gateway (GatewaySite.start_closing) -----------------------

    #: requests this connection has answered: 0 for a new one, more for a kept-alive one
    answered = 0

    # (connectionMade, connectionLost and requestDone above keep
    # ``site.client_connections`` and ``answered``; writeHeaders adds
    # ``Connection: close`` while it stops)

    def is_open(self) -> bool:
        """Still an HTTP connection (not lost, not handed over to a WebSocket)."""
        return self.transport is not None

    def is_idle(self) -> bool:
        """Open, and waiting for its next request (none received or in progress)."""
        return self.is_open() and not self.requests and not self.receiving()


class GatewaySite(Site):
    """One access-log line per request: the forwarder's own event where it has one."""

    #: whether a request's route takes it before its body (``GatewayRequest`` asks)
    streams_body: Callable[[bytes, bytes, Headers], bool] | None = None

    def __init__(self, resource: IResource, *args: object, **kwargs: object) -> None:
        super().__init__(resource, *args, **kwargs)
        #: HTTP client connections; weak, because a WebSocket hand-over never
        #: tells the channel it is done (its transport becomes None)
        self.client_connections: WeakSet[GatewayChannel] = WeakSet()
        #: set when the gateway stops: responses say ``Connection: close``
        self.closing = False

    def log(self, request: Request) -> None:
        if not getattr(request, "gateway_logged", False):
            super().log(request)

    def getResourceFor(self, request: WebRequest) -> IResource:
        """``Site.getResourceFor``, its ``sitepath`` copied without the ``copy`` module."""
        request.site = self
        request.sitepath = list(request.prepath or ())  # type: ignore[attr-defined]  # Site.getResourceFor's
        found: IResource = getChildForRequest(self.resource, request)
        return found

    # -- a stopping gateway ---------------------------------------------------

    def start_closing(self) -> None:
        """
        From now on every response says ``Connection: close`` and its
        connection ends after it, including responses in progress; a
        connection idle now stays open and its next request is served.
        """
        self.closing = True
        for channel in self.open_connections():
            if channel.requests:
                channel.persistent = False

    def close_idle(self, *, new_ones: bool) -> int:
        """
        Close the connections waiting for a request: the kept-alive ones, and
        with ``new_ones`` also those that never sent one. Returns how many.
        """
        idle = [
            channel
            for channel in self.open_connections()
            if channel.is_idle() and (new_ones or channel.answered)
        ]
        for channel in idle:
            channel.loseConnection()
        return len(idle)

    def close_all(self) -> int:
        """Abort every client HTTP connection, busy or not (the drain timed out)."""
        channels = self.open_connections()
        for channel in channels:
            # a listener's transport (TCP, TLS, UNIX) aborts; open ones are not None
            channel.transport.abortConnection()  # type: ignore[union-attr]
        return len(channels)

    def open_connections(self) -> list[GatewayChannel]:
        return [channel for channel in self.client_connections if channel.is_open()]


def _discard(data: bytes) -> None:
    """Drop bytes a client keeps sending after its answer."""


def build_site(resource: IResource, settings: Settings, reactor: IReactorTime | None = None) -> GatewaySite:
    """A ``Site`` for the gateway's resource tree with the gateway's HTTP rules."""
    site = GatewaySite(resource, logFormatter=access_log_formatter(secret_names(settings.auth)))
    site.requestFactory = GatewayRequest.for_settings(settings.gateway)
    # the routes with request_buffering = off take a request before its body
    # (without such a route, no request asks)
    if any(not route.request_buffering for route in settings.routes):
        site.streams_body = getattr(resource, "streams_body", None)
    if reactor is not None:
        site.reactor = reactor  # the channels' timers run on it
    gateway = settings.gateway
    header_limit = gateway.max_header_size
    # a gateway's root hands a WebSocket upgrade over from its head alone
    upgrade_taker = getattr(resource, "take_upgrade", None)

    def channel() -> GatewayChannel:
        made = GatewayChannel()
        made.totalHeadersSize = header_limit
        made.header_timeout = gateway.client_header_timeout
        made.body_timeout = gateway.client_body_timeout
        made.keepalive_timeout = gateway.keepalive_timeout
        made.tcp_keepalive = gateway.tcp_keepalive
        made.upgrade_taker = upgrade_taker
        return made

    site.protocol = channel  # type: ignore[method-assign, assignment]  # a factory, typed as Site's own
    # GatewayChannel's own timers replace the idle timeout that every byte resets.
    site.timeOut = None
    site.noisy = False
    return site


# -- the cap on client connections ----------------------------------------------


class _Slot(ProtocolWrapper):
    """
    One counted client connection, right above the socket. It stays out of
    the write path: what it wraps (the HTTP channel, or TLS) gets the socket
    as its transport, so writes go straight to it, and a WebSocket hand-over
    replaces the protocol this slot wraps. It sees the bytes read and the
    loss, which frees the slot.
    """

    def makeConnection(self, transport: ITransport) -> None:
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        self.wrappedProtocol.makeConnection(transport)


class _Refusal(Protocol):
    """A connection past the cap: 503 at once, then closed."""

    def __init__(self, door: FrontDoor) -> None:
        self.door = door
        self._linger: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self.door.refusing += 1
        transport = self.transport
        assert transport is not None  # connectionMade
        transport.write(self.door.overloaded.raw_response())
        if ITCPTransport.providedBy(transport) and not isinstance(transport, ProtocolWrapper):
            # Read what the client sends meanwhile; close when it does, or soon.
            transport.loseWriteConnection()
            self._linger = self.door.reactor.callLater(REFUSAL_LINGER_SECONDS, transport.abortConnection)
        else:
            transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.door.refusing -= 1
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self._linger = None


class _Dropped(Protocol):
    """A connection past even the refusals: closed as soon as accepted."""

    def connectionMade(self) -> None:
        self.transport.abortConnection()  # type: ignore[union-attr]  # a listener's transport aborts


class _DoorFactory(WrappingFactory):
    """One listener's side of the :class:`FrontDoor` (the count is the door's)."""

    protocol = _Slot
    noisy = False

    def __init__(self, wrapped: IProtocolFactory, door: FrontDoor) -> None:
        super().__init__(wrapped)
        self.door = door

    # (past the cap, a plain protocol answers instead of a wrapper)
    def buildProtocol(self, addr: IAddress | None) -> IProtocol | None:  # type: ignore[override]
        door = self.door
        if door.open < door.limits.cap:
            return super().buildProtocol(addr)
        refusal = door.refuse()
        wrapped = self.wrappedFactory
        if isinstance(refusal, _Refusal) and isinstance(wrapped, WrappingFactory):
            # A TLS listener: the 503 goes out over TLS, as the client expects.
            tls: IProtocol = wrapped.protocol(wrapped, refusal)
            return tls
        return refusal

    def registerProtocol(self, p: IProtocol) -> None:
        self.door.open += 1

    def unregisterProtocol(self, p: IProtocol) -> None:
        self.door.closed()


class FrontDoor:
    """
    Counts the client connections of every gateway listener (each listener's
    factory is wrapped with :meth:`wrap`, below TLS) and holds them under
    ``limits.cap``: past it, a connection is answered 503 ``overloaded`` and
    closed at once; past ``limits.refusals`` more, it is closed as soon as it
    is accepted. The clients alone never exhaust the descriptors, the
    connections already open keep working, and the door opens again as they
    close. Refusals are logged at most once a second, with a count.
    """

    def __init__(self, limits: ClientLimits, reactor: IReactorTime, metrics: Metrics) -> None:
        self.limits = limits
        self.reactor = reactor
        self.metrics = metrics
        #: Client connections being served (refusals not included).
        self.open = 0
        self.refusing = 0
        self.overloaded = Overloaded(
            f"the gateway holds its maximum of {limits.cap} client connections",
            headers=[(b"Retry-After", b"1")],
        )
        self._unreported = 0
        self._last_report: float | None = None

    def wrap(self, factory: IProtocolFactory) -> _DoorFactory:
        """``factory`` behind this door (a listener's factory, TLS included)."""
        return _DoorFactory(factory, self)

    def refuse(self) -> Protocol:
        """The protocol for a connection past the cap; counted and (rate-limited) logged."""
        self.metrics.connection_refused()
        self._unreported += 1
        last = self._last_report
        if last is None or self.reactor.seconds() - last >= 1.0:
            self._report("refusing client connections")
        if self.refusing < self.limits.refusals:
            return _Refusal(self)
        return _Dropped()

    def closed(self) -> None:
        self.open -= 1
        if self._unreported and self.open < self.limits.cap:
            self._report("accepting client connections again")

    def _report(self, what: str) -> None:
        log.warn(
            "{what}: {count} refused since the last report, the gateway holds "
            "its maximum of {cap} client connections (max_client_connections)",
            what=what,
            count=self._unreported,
            cap=self.limits.cap,
            event="connections_refused",
        )
        self._unreported = 0
        self._last_report = self.reactor.seconds()
