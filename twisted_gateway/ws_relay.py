"""
The relay's data path: what each leg of a pair does with frames, closes and
pings once both legs are open, and the registry that owns the live pairs.

Each leg forwards what it receives to its ``partner`` frame by frame (a large
message is never held whole); each transport is the other's push producer (a
slow reader pauses the sender, whose receive buffer is then capped so that the
pause reaches the peer behind it); a close on one leg reaches the other with its
code and reason, at the close-frame level (Autobahn's ``sendClose`` accepts
only 1000 and 3000-4999).
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Protocol

from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime, ITCPTransport
from twisted_gateway.periodic import Periodic
from zope.interface import implementer

from twisted_gateway._compat import (
    LegHooks,
    failed_by_me,
    feed,
    parser_idle,
    queued_sends,
    server_drop_wait,
    write_now,
)
from twisted_gateway.sockets import cap_receive_buffer, timed_out
from twisted_gateway.interfaces import LiveSession
from twisted_gateway.ws_passthrough import Clocked, Counts, Passthrough, RatedPair

if TYPE_CHECKING:
    from twisted_gateway._bases import SendMessage

OPEN = WebSocketProtocol.STATE_OPEN
CLOSING = WebSocketProtocol.STATE_CLOSING
CLOSED = WebSocketProtocol.STATE_CLOSED

#: How long a leg that sent a close waits for its peer's (Autobahn's ``closeHandshakeTimeout``),
#: and then an upstream leg for the upstream to drop the connection (``serverConnectionDropTimeout``).
CLOSE_TIMEOUT = 5.0
SERVER_DROP_TIMEOUT = 5.0

#: Messages up to this size are relayed whole (one frame); larger ones stream.
STREAM_THRESHOLD = 64 * 1024
#: Write buffer of each leg before it pauses the other: one large message fits.
LEG_BUFFER_SIZE = 256 * 1024
#: What each leg's transport reads at once and queues before it pauses the
#: other leg (Twisted's ``bufferSize`` is both): one large message fits, and a
#: read stays below malloc's mmap threshold (allocator.MMAP_THRESHOLD), so that
#: it is not a fresh mapping, faulted in page by page, every time.
LEG_READ_SIZE = 128 * 1024 - 256

#: Close sent to the client when the upstream vanished without a close frame.
UPSTREAM_LOST = (1014, b"upstream connection lost")
#: Close sent to the upstream when the client vanished without a close frame.
CLIENT_LOST = (1001, b"client went away")
#: Close sent to one leg when the gateway failed the other (bad frame, too big),
#: and to both legs when the gateway stops (service.py's drain).
GOING_AWAY = (1001, b"going away")
#: Close sent to both legs when the client's token expires.
TOKEN_EXPIRED = (1008, b"token expired")
#: Close sent to both legs when the client sends faster than ws_rate_limit.
RATE_LIMITED = (1008, b"rate limit exceeded")
#: Close sent to a leg whose peer accepted nothing of what waited for it (ws_send_timeout).
SLOW_CONSUMER = (1008, b"slow consumer")
#: Close sent to the upstream when the client stopped reading.
CLIENT_STALLED = (1001, b"client stopped reading")
#: Close sent to the client when the upstream stopped reading.
UPSTREAM_STALLED = (1014, b"upstream stopped reading")
#: Close sent to one leg when the other did not answer a keepalive ping,
#: or TCP keepalive found it gone.
UNRESPONSIVE = (1011, b"peer unresponsive")


class RelayRegistry:
    """
    The live relays of one gateway: handshakes in progress and open pairs.

    Metrics read the counts; the drain closes what is left; tests assert that
    both return to zero.
    """

    def __init__(self) -> None:
        #: ws_pair.Pair instances whose upstream is being opened, and open ones
        self.handshakes: set[RelayPair] = set()
        self.pairs: set[RelayPair] = set()
        #: client connections per route, from hand-over until both legs are gone
        self.active: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.pairs)

    def total_active(self) -> int:
        return sum(self.active.values())


# -- the relay legs -----------------------------------------------------------


class Extension(Protocol):
    """An extension in use on a leg (one of Autobahn's ``PerMessageCompress`` classes)."""

    EXTENSION_NAME: str


class RelayPair(LiveSession, RatedPair, Protocol):
    """
    What the legs, the keepalive, the send timeout and the drain ask of a
    pair: :class:`twisted_gateway.ws_pair.Pair`.
    """

    def legs(self) -> tuple[_RelayLeg, ...]: ...

    def opened(self) -> None: ...

    def leg_closed(self, leg: _RelayLeg) -> None: ...

    def leg_unresponsive(self, leg: _RelayLeg, reason: str) -> None: ...

    def slow_consumer(self, leg: _RelayLeg) -> None: ...

    def record_end(self, side: str, code: int | None, reason: str = "") -> None: ...


class _RelayLeg(Passthrough, LegHooks):
    """Forwarding shared by both legs; ``partner`` is the other leg once both are open
    (Autobahn already uses ``peer`` for the remote address)."""

    partner: _RelayLeg | None = None
    #: the ws_pair.Pair both legs report to
    pair: RelayPair | None = None
    #: "client" or "upstream": who is at the other end of this leg
    side: str = ""
    #: set when this leg's close was caused by the other leg (already relayed)
    close_relayed: bool = False
    #: ws_pair.Direction: the pair's counters (and a client's rate bucket) of what this leg receives
    direction: Counts
    #: False between a keepalive ping and its pong
    pong_seen = True
    #: the KeepAlive round of this leg's last ping
    ping_round = 0
    #: the kernel ended this leg's connection: TCP keepalive (or retransmissions) unanswered
    #: (asked only of a leg that :attr:`ended_without_close`)
    timed_out = False

    @property
    def ended_without_close(self) -> bool:
        """Whether no close came from the peer or the gateway (the other leg then learns of a loss, 1006)."""
        return not self.close_relayed and self.remoteCloseCode is None and not self.wasClean
    #: (since when, bytes acknowledged then) while data waits for this leg's peer (send_timeout)
    stalled: tuple[float, int] | None = None
    #: the close's one timer (see :meth:`sendCloseFrame`), and whether it now waits for the server's drop
    closing_timer: IDelayedCall | None = None
    awaiting_drop = False

    #: (the Twisted protocol's, which every leg also is)
    transport: ITCPTransport | None
    #: the route's RelayServerFactory or the upstream leg's factory, both on the gateway's clock
    factory: Clocked
    #: (Autobahn's) the extensions agreed in the opening handshake
    websocket_extensions_in_use: list[Extension]
    #: (Autobahn's, unannotated)
    sendMessage: SendMessage

    # Autobahn's versions of these two build debug-log arguments on every call.

    def dataReceived(self, data: bytes) -> None:
        if self.passthrough and parser_idle(self):
            data = self._pass_frames(data)
            if not data:
                return
        feed(self, data)

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        if sync or chopsize or queued_sends(self):
            WebSocketProtocol.sendData(self, data, sync, chopsize)
        else:
            write_now(self.transport, data)

    def onMessageBegin(self, isBinary: bool) -> None:
        WebSocketProtocol.onMessageBegin(self, isBinary)
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._streaming = False
        # Over the rate: both legs close, and the message goes nowhere (its peer is not open).
        if self._prepaid:
            self._prepaid = False  # the fast path took its token, then handed the frame over
        elif (bucket := self.direction.bucket) is not None:
            pair = self.pair
            assert pair is not None  # a leg has a bucket once its pair joined it
            if not bucket.take(pair.factory.clock.seconds()):
                pair.rate_exceeded()

    # onMessageFrameBegin is Autobahn's own: it enforces maxMessagePayloadSize.

    def onMessageFrameData(self, payload: bytes) -> None:
        if failed_by_me(self):
            return
        peer = self.partner
        assert peer is not None  # the partner is set from the join until both legs are gone
        self._buffered += len(payload)
        if self._streaming:
            peer.sendMessageFrame(payload)
            return
        self._chunks.append(payload)
        if self._buffered > STREAM_THRESHOLD and peer.state == OPEN:
            self._streaming = True
            peer.beginMessage(isBinary=self.message_is_binary)
            peer.sendMessageFrame(b"".join(self._chunks))
            self._chunks = []

    def onMessageFrameEnd(self) -> None:
        pass  # Autobahn's would append the frame to a whole message

    def onMessageEnd(self) -> None:
        if failed_by_me(self):
            return
        peer = self.partner
        assert peer is not None  # (as in onMessageFrameData)
        if self._streaming:
            peer.endMessage()
        elif peer.state == OPEN:
            peer.sendMessage(b"".join(self._chunks), isBinary=self.message_is_binary)
        self._chunks = []
        size = self._buffered
        direction = self.direction
        direction.messages += 1
        direction.payload_bytes += size
        direction.flow.count(size)

    def onPong(self, payload: bytes) -> None:
        self.pong_seen = True

    def unresponsive(self) -> None:
        """No pong to the gateway's keepalive ping: drop this leg, 1011 to the other."""
        assert self.pair is not None  # the keepalive pings the legs of joined pairs only
        self.pair.leg_unresponsive(self, "ping_timeout")
        self.wasNotCleanReason = "peer unresponsive"
        self.dropConnection(abort=True)

    def sendCloseFrame(self, code: int | None = None, reasonUtf8: bytes | None = None, isReply: bool = False) -> None:
        """
        Autobahn's, with its close timers replaced by one on the gateway's clock
        (the legs' ``closeHandshakeTimeout`` and ``serverConnectionDropTimeout``
        are 0): a leg that sends the first close waits :data:`CLOSE_TIMEOUT`
        for the peer's, then :meth:`onCloseFrame` re-arms the same timer for
        an upstream leg's wait for the upstream's drop. Autobahn made one timer
        for each wait (the first through its batched timer).
        """
        was_open = self.state == OPEN
        WebSocketProtocol.sendCloseFrame(self, code, reasonUtf8, isReply)
        if was_open and self.closedByMe and self.state == CLOSING:
            self.closing_timer = self.factory.clock.callLater(CLOSE_TIMEOUT, self._close_overdue)

    def _close_overdue(self) -> None:
        """What Autobahn's close timers do when they fire: the peer did not answer the close, or did not drop."""
        self.closing_timer = None
        if self.awaiting_drop:
            self.onServerConnectionDropTimeout()
        else:
            self.onCloseHandshakeTimeout()

    def end_close_wait(self) -> None:
        """The leg is gone: its close timer with it."""
        timer = self.closing_timer
        if timer is not None:
            self.closing_timer = None
            timer.cancel()

    def onCloseFrame(self, code: int | None, reasonRaw: bytes | None) -> bool | None:
        # A reply to a close the gateway sent (because the other leg closed)
        # is not relayed again.
        relay = not self.closedByMe
        was_closing = self.state == CLOSING
        failed = _accept_close_frame(self, code, reasonRaw)
        if was_closing and not failed:
            # the peer answered this leg's close: Autobahn's close timer ends, and an upstream
            # leg waits for the upstream to drop the connection (a server leg has dropped it)
            timer = self.closing_timer
            if self.is_server or self.state == CLOSED:
                self.end_close_wait()
            elif timer is not None:
                self.awaiting_drop = True
                timer.reset(SERVER_DROP_TIMEOUT)
            else:
                self.awaiting_drop = True
                self.closing_timer = self.factory.clock.callLater(SERVER_DROP_TIMEOUT, self._close_overdue)
        peer = self.partner
        if relay and not failed and not failed_by_me(self) and peer is not None and peer.state == OPEN:
            assert self.pair is not None  # a leg with a partner has its pair
            self.pair.record_end(self.side, self.remoteCloseCode)
            peer.close_relayed = True
            peer.sendCloseFrame(code, reasonRaw)
        return failed

    def failed(self, code: int) -> None:
        """Failing this leg (a bad frame, a message too big) closes the other at once with 1001."""
        peer = self.partner
        if peer is not None and peer.state == OPEN:
            assert self.pair is not None  # (as in onCloseFrame)
            self.pair.record_end("gateway", code, "protocol_error")
            peer.close_with(GOING_AWAY)

    def close_with(self, close: tuple[int, bytes], reason: str = "gateway") -> None:
        """
        Close this leg with any legal code (``sendClose`` allows only a few);
        ``reason`` is why the gateway ends the pair, when it is the first to.
        """
        if self.state == OPEN:
            if self.pair is not None:
                self.pair.record_end("gateway", close[0], reason)
            self.close_relayed = True
            self.sendCloseFrame(close[0], close[1])


@implementer(IPushProducer)
class _Throttle:
    """
    The other leg's transport as a push producer, registered on ``leg``'s
    transport, that only pauses and resumes: a lost leg must not stop the
    other directly (Twisted calls ``stopProducing`` then), since the relay
    closes it with a close frame (1001/1014/1011). ``stopProducing`` comes
    while ``leg``'s socket is still open: the moment to ask the kernel
    whether the peer vanished silently (:attr:`_RelayLeg.timed_out`).
    """

    __slots__ = ("transport", "leg", "capped")

    def __init__(self, transport: IPushProducer, leg: _RelayLeg) -> None:
        self.transport = transport
        self.leg = leg
        self.capped = False

    def pauseProducing(self) -> None:
        """
        Stop reading the other leg, and cap its socket's receive buffer (once):
        the kernel would otherwise grow it to megabytes while the sender keeps
        sending, and the sender would never feel the pause.
        """
        self.transport.pauseProducing()
        if not self.capped:
            self.capped = True
            cap_receive_buffer(self.transport, LEG_BUFFER_SIZE)

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        leg = self.leg
        if leg.ended_without_close:  # (Pair.leg_closed reads timed_out only then)
            leg.timed_out = timed_out(leg.transport)


def _accept_close_frame(proto: WebSocketProtocol, code: int | None, reasonRaw: bytes | None) -> bool | None:
    """
    Autobahn's close-frame handling, also accepting 1014 (Bad Gateway, in the
    IANA registry of RFC 6455 close codes, unknown to Autobahn's list).
    Autobahn starts its wait for the server's drop on every close frame a
    client (a test's or a benchmark's peer; the legs' own close timer is
    theirs, :meth:`_RelayLeg.sendCloseFrame`) takes while closing: a second one
    (a peer answering the close that failed its first) replaces the first
    wait, which nothing would cancel.
    """
    # (Autobahn annotates code and reason without None, which a close frame may carry)
    waiting = server_drop_wait(proto)
    if code != 1014:
        failed = WebSocketProtocol.onCloseFrame(proto, code, reasonRaw)  # type: ignore[arg-type]
    else:
        failed = WebSocketProtocol.onCloseFrame(proto, 1000, reasonRaw)  # type: ignore[arg-type]
        if not failed:
            proto.remoteCloseCode = 1014
    started = server_drop_wait(proto)
    if started is not waiting and waiting is not None and waiting.active():
        waiting.cancel()
    return failed


class KeepAlive:
    """
    Keepalive pings on both legs of every pair, driven by one timer for the
    whole gateway (on the injected clock): every ``interval`` seconds each open
    leg that answered its last ping (or was never pinged) is pinged again,
    whatever ``timeout`` is; a leg without a pong ``timeout`` seconds after a
    ping is dropped and the other leg closed with 1011 "peer unresponsive".
    Each round of pings has its own deadline, checked by one timer at a time.
    """

    def __init__(self, registry: RelayRegistry, clock: IReactorTime, interval: float, timeout: float) -> None:
        self.registry, self.clock = registry, clock
        self.interval, self.timeout = interval, timeout
        self._loop = Periodic(clock, interval, self._ping_all)
        self._check: IDelayedCall | None = None
        #: (deadline, round number, legs pinged in that round), oldest first
        self._rounds: deque[tuple[float, int, list[_RelayLeg]]] = deque()
        self._round = 0

    def start(self) -> None:
        if self.interval > 0:
            self._loop.start()

    def stop(self) -> None:
        self._loop.stop()
        if self._check is not None and self._check.active():
            self._check.cancel()
        self._check = None
        self._rounds.clear()

    def _ping_all(self) -> None:
        self._round += 1
        pinged = []
        for pair in list(self.registry.pairs):
            for leg in pair.legs():
                # a leg still owing a pong waits for its deadline, not for a new ping
                if leg.state == OPEN and leg.pong_seen:
                    leg.pong_seen = False
                    leg.ping_round = self._round
                    leg.sendPing(b"wsgateway")
                    pinged.append(leg)
        if pinged:
            self._rounds.append((self.clock.seconds() + self.timeout, self._round, pinged))
            if self._check is None:
                self._check = self.clock.callLater(self.timeout, self._check_pongs)

    def _check_pongs(self) -> None:
        """Drop the legs of every round past its deadline that did not answer."""
        self._check = None
        now = self.clock.seconds()
        while self._rounds and self._rounds[0][0] <= now:
            _, number, legs = self._rounds.popleft()
            for leg in legs:
                if leg.ping_round == number and not leg.pong_seen and leg.state == OPEN:
                    leg.unresponsive()
        if self._rounds:
            self._check = self.clock.callLater(self._rounds[0][0] - now, self._check_pongs)
