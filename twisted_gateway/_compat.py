"""
Every private attribute or method of Autobahn and Twisted that the WebSocket
relay relies on, in one place, each with what it relies on.

Each item is one library release away from a silent break, so each has a test
in ``tests/test_compat.py`` that fails naming the item when the installed
library no longer has it; ``pyproject.toml`` pins the ranges. Checked against
Twisted 26.10 and Autobahn 26.11 (the versions ``make test`` installs), and
tests/test_compat.py with the relay's tests against the lower bounds, Twisted
25.5 and Autobahn 24.4.2 (Twisted 24.3 to 24.11 lack ``Request``'s
``parsePOSTFormSubmission``, which http_proxy.py passes).
Twisted's HTTP server internals that the HTTP forwarder subclasses are
listed in the same test file (they stay in ``http_proxy.py`` and ``site.py``).
"""

from __future__ import annotations

import base64
import errno
from collections import deque
import functools
import hashlib
import os
import socket
import weakref
from pprint import pformat as _real_pformat
from types import FunctionType, MethodType
from typing import TYPE_CHECKING, Any, Callable, TypeVar, cast

from autobahn.twisted.util import create_transport_details, peer2str
from autobahn.twisted.websocket import WebSocketAdapterProtocol
from autobahn.util import _is_tls_error, _maybe_tls_reason
from autobahn.wamp.types import TransportDetails
from autobahn.websocket import protocol as websocket_protocol
from autobahn.websocket.protocol import (
    TrafficStats,
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketFactory,
    WebSocketProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.websocket.types import ConnectionResponse
from autobahn.websocket.utf8validator import Utf8Validator
from autobahn.websocket.xormasker import create_xor_masker  # type: ignore[attr-defined]  # (chosen at import: native or not)
from twisted.internet import abstract, tcp, unix
from twisted.web import http
from twisted.internet.epollreactor import EPOLLIN as _EPOLLIN
from twisted.internet.error import getConnectError
from twisted.internet.address import IPv4Address
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import connectionDone
from twisted.internet.interfaces import (
    IConnector,
    IDelayedCall,
    IPushProducer,
    IReactorTime,
    ISSLTransport,
    ITCPTransport,
)
from twisted.logger import FileLogObserver, ILogObserver, LogPublisher
from twisted.python import log as legacy_log
from twisted.python.systemd import ListenFDs
from twisted.python.failure import Failure
from txaio._common import _BatchedTimer

if TYPE_CHECKING:
    from txaio.interfaces import ILogger

_P = TypeVar("_P", bound="WebSocketServerProtocol | WebSocketClientProtocol")

# -- Twisted -------------------------------------------------------------------

def systemd_listen_fds() -> ListenFDs:
    """
    The sockets systemd handed over, as Twisted's ``systemd:`` endpoint parser
    read them: it reads them once, when ``twisted.internet.endpoints`` is
    imported, and removes ``LISTEN_FDS`` and ``LISTEN_PID`` from the
    environment, so a later ``ListenFDs.fromEnvironment()`` finds none.

    Relies on ``endpoints._SystemdParser._sddaemon``.
    """
    from twisted.internet.endpoints import _SystemdParser

    fds: ListenFDs = _SystemdParser._sddaemon
    return fds


def log_observers(publisher: LogPublisher) -> list[ILogObserver]:
    """
    The observers ``publisher`` sends each event to, in order (twistd's own
    log among them once it has started logging).

    Relies on ``twisted.logger.LogPublisher._observers`` (a list).
    """
    return list(publisher._observers)


def observer_list(publisher: LogPublisher) -> list[ILogObserver]:
    """
    :func:`log_observers` without the copy: the publisher's own list, which
    changes as observers come and go. Read it, never change it.

    Relies on ``twisted.logger.LogPublisher._observers`` (a list).
    """
    observers: list[ILogObserver] = publisher._observers
    return observers


def file_observer_writer(observer: FileLogObserver) -> Callable[[str], None]:
    """
    What ``observer`` does with the text its ``formatEvent`` made: written to
    its file (UTF-8 encoded if the file takes bytes), then flushed.

    Relies on ``twisted.logger.FileLogObserver._outFile`` and ``_encoding``.
    """
    out, encoding = observer._outFile, observer._encoding
    if encoding is None:

        def write(text: str) -> None:
            out.write(text)
            out.flush()

    else:

        def write(text: str) -> None:
            out.write(text.encode(encoding))
            out.flush()

    return write


def peer_of(transport: object) -> str:
    """
    Autobahn's ``peer2str(transport)`` (``tcp4:host:port``, ``tcp6:host:port``)
    for a TCP connection, from the address it holds: ``peer2str`` asks the
    transport for two interfaces and a new address object, some 17 k
    instructions per leg. Other transports go through ``peer2str``.

    Relies on ``tcp.Server.client`` and ``tcp.Client.realAddress`` (the
    ``(host, port, ...)`` that ``getPeer`` makes its address from) and
    ``_addressType`` (``IPv4Address`` or ``IPv6Address``).
    """
    kind = type(transport)
    if kind is tcp.Server:
        address = transport.client  # type: ignore[attr-defined]
    elif kind is tcp.Client or kind is _ClientConnectingNow:
        address = transport.realAddress  # type: ignore[attr-defined]
    else:
        return peer2str(transport)  # type: ignore[arg-type]
    family = "tcp4" if transport._addressType is IPv4Address else "tcp6"  # type: ignore[attr-defined]
    return f"{family}:{address[0]}:{address[1]}"


def dispatch_plainly(reactor: object) -> bool:
    """
    Have ``reactor``, when it is Twisted's epoll reactor, call each ready
    descriptor's ``doRead``/``doWrite`` directly, not through
    ``log.callWithLogger``.

    That wrapper asks the selectable for its ``logPrefix`` and pushes a legacy
    log context (``{"system": ...}``) around every event, for the ``[system]``
    of a ``twisted.python.log.msg`` made while handling it; the gateway logs
    through ``twisted.logger`` namespaces and never reads it. It is about a
    tenth of the gateway's CPU on a saturated HTTP load (every event is one
    read) and 4 to 5 % of the instructions of a forwarded GET or a WebSocket
    handshake (docs/performance.md, "Private items against public APIs").
    ``_doReadOrWrite`` still reports what ``doRead``/``doWrite`` raise and drops
    that connection, as before; what escapes it is logged with the selectable's
    prefix, as ``callWithLogger`` did.

    Relies on ``EPollReactor.doPoll`` (``doIteration``) as Twisted writes it:
    ``_poller``, ``_selectables`` and ``_doReadOrWrite``. Other reactors are
    left as they are (returns False).
    """
    if type(reactor) is not EPollReactor:
        return False
    poll = MethodType(_do_poll, reactor)
    reactor.doPoll = reactor.doIteration = poll  # type: ignore[method-assign]
    return True


class PollTurn:
    """
    A reactor dispatching plainly handling the descriptors one poll found
    ready, when it found more than one: :attr:`handling` is true meanwhile,
    and each of :attr:`after` is called (then forgotten) once they are
    handled, before the next poll. Work that can wait that long (the access
    lines of the requests the turn answered, written in one ``write``) is
    held until then; a turn of one descriptor (one request at a time) has
    nothing to gather, and holding its work cost more than the work.
    """

    def __init__(self) -> None:
        self.handling = False
        #: true while the descriptors of a poll of any size are handled (:func:`lose_connection_soon`)
        self.dispatching = False
        self.after: list[Callable[[], None]] = []


#: The poll the running reactor is handling (see :class:`PollTurn`).
poll_turn = PollTurn()


def _do_poll(self: EPollReactor, timeout: float | None) -> None:
    """``EPollReactor.doPoll`` less ``log.callWithLogger``, then :data:`poll_turn`'s ``after``."""
    try:
        events = self._poller.poll(-1 if timeout is None else timeout, len(self._selectables))
    except OSError as err:
        if err.errno == errno.EINTR:
            return
        raise
    handle, selectables, turn = self._doReadOrWrite, self._selectables, poll_turn
    turn.handling = len(events) > 1
    turn.dispatching = True
    try:
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is not None:
                try:
                    handle(selectable, fd, event)  # type: ignore[no-untyped-call]  # (Twisted's, unannotated)
                except KeyboardInterrupt:
                    raise
                except BaseException:
                    legacy_log.err(system=selectable.logPrefix())
    finally:
        turn.handling = turn.dispatching = False
        if turn.after:
            after, turn.after = turn.after, []
            for call in after:
                try:
                    call()
                except Exception:
                    legacy_log.err(None, "a call at the end of a reactor turn failed")


def keep_listening_socket(port: tcp.Port) -> None:
    """
    Let ``port`` stop listening without ending its socket for another process
    sharing it (a single gateway handing over on SIGHUP, a worker's ``unix:``
    socket): the descriptor is closed, but the socket is not shut down (that
    stops it listening in every process) and a ``unix:`` socket's file stays
    (it is how clients reach the other process).

    Relies on ``tcp.Port._shouldShutdown`` (what ``_closeSocket`` checks; it
    is False already for an adopted socket) and on the name ``connectionLost``
    unlinks unless it is an abstract-namespace one: ``unix.Port._bindPath``
    since Twisted 26.10, the path it was given (``port``) before.
    """
    port._shouldShutdown = False
    if isinstance(port, unix.Port):
        if hasattr(port, "_bindPath"):
            port._bindPath = b"\0"
        else:
            port.port = b"\0"


def forget_transport(connector: IConnector) -> None:
    """
    Let a client connector whose connection ended drop its transport: the
    transport's ``connector`` holds the connector back, so the two (and the
    factory and protocol they hold) would be freed only by the cycle
    collector. Relies on ``BaseConnector.transport`` (not in ``IConnector``),
    which Twisted sets to None itself when a connect fails and makes anew
    on the next ``connect()``.
    """
    cast(Any, connector).transport = None



#: The listening TCP ports whose socket has TCP_NODELAY and these keepalive
#: settings (None: keepalive off), which every socket they accept inherits
#: (``sockets.preset_listener`` adds them).
listener_presets: weakref.WeakKeyDictionary[object, object] = weakref.WeakKeyDictionary()
#: What :func:`accepted_preset` answers for a connection whose listener set nothing.
NOT_PRESET = object()


def accepted_preset(transport: object) -> object:
    """
    The keepalive settings a TCP connection (or TLS over one) inherited from
    the listener that accepted it (:data:`listener_presets`), or
    :data:`NOT_PRESET`. Relies on ``tcp.Server.server`` (the port that
    accepted it).
    """
    for _ in range(2):
        if type(transport) is tcp.Server:
            return listener_presets.get(transport.server, NOT_PRESET)
        transport = getattr(transport, "transport", None)
    return NOT_PRESET


def http_channel_made(channel: Any) -> None:
    """
    ``HTTPChannel.connectionMade`` but for its ``setTcpNoDelay(True)``, for
    a client connection whose socket has TCP_NODELAY from its listener
    (:func:`accepted_preset`): one ``setsockopt`` call per connection fewer.
    The rest as it does: the channel's idle timeout set, and the channel
    registered as the transport's streaming producer, the transport kept as
    ``HTTPChannel._networkProducer`` (what its pipelining pauses and resumes),
    ``http._NoPushProducer`` standing in for a transport that is none.
    """
    channel.setTimeout(channel.timeOut)
    producer: Any = IPushProducer(channel.transport, http._NoPushProducer())  # (a transport: a consumer too)
    channel._networkProducer = producer
    producer.registerProducer(channel, True)


#: what a non-blocking connect answers while the connection is being made
_CONNECTING = (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY)


class _ClientConnectingNow(tcp.Client):
    """
    A TCP client transport to an IPv4 literal that starts its connect as it is
    made. Twisted's ``Client._finishInit`` leaves it to the next reactor turn
    (``callLater(0, resolveAddress)``, which for a literal wraps the address in
    a fired Deferred and calls ``_setRealAddress``, which calls ``doConnect``):
    a turn of the reactor, a timer and a Deferred per upstream connect (about
    30 k instructions of a relayed handshake). Here the socket's connect is
    made at once when the kernel answers "in progress" (what a non-blocking
    TCP connect answers on Linux, refused or not). Any other answer (and a
    name, an IPv6 address, a socket that could not be made) goes Twisted's
    way, a turn later (``doConnect`` asks the socket again): nothing of the
    connection runs inside the caller's ``connect``.

    The wait for the answer asks the kernel less than ``doConnect``'s: the
    socket is made non-blocking (no ``ioctl``, twice), the reactor watches it
    for writing only (an error or a hang-up is reported unasked: it comes as
    ``connectionLost``, and fails the connect with the socket's error as
    ``doConnect`` would), a writable socket without an error is connected
    (``doConnect`` connects again to be told so), and it is then watched for
    reading instead (:func:`_read_instead_of_write`). Three system calls
    where ``doConnect`` makes nine.

    Relies on ``BaseClient._finishInit(whenDone, skt, error, reactor)`` (made
    by ``Client.__init__``, after ``createInternetSocket``),
    ``tcp.Connection.__init__`` (repeated less its ``setblocking``),
    ``_requiresResolution``, ``addr``, ``realAddress``, ``doConnect`` (the
    transport's ``doRead`` and ``doWrite`` until connected, then deleted),
    ``failIfNotConnected``, ``_connectDone`` and ``connector``.
    """

    #: the connect was made and its answer is awaited (``doRead``/``doWrite`` are :meth:`_connect_answered`)
    _answer_awaited = False

    def createInternetSocket(self) -> socket.socket:
        return socket.socket(self.addressFamily, self.socketType | _NONBLOCK)

    def _finishInit(self, whenDone: Any, skt: Any, error: Any, reactor: Any) -> None:
        if not whenDone or self._requiresResolution or len(self.addr) != 2:
            super()._finishInit(whenDone, skt, error, reactor)  # type: ignore[no-untyped-call]
            return
        # tcp.Connection.__init__(self, skt, None, reactor) less its setblocking (the socket is made non-blocking)
        abstract.FileDescriptor.__init__(self, reactor=reactor)
        self.socket = skt
        self.fileno = skt.fileno
        self.protocol = None  # type: ignore[assignment]  # (as Twisted's: the protocol comes once connected)
        self.realAddress = self.addr
        if skt.connect_ex(self.addr) in _CONNECTING:
            self._answer_awaited = True
            self.doRead = self.doWrite = self._connect_answered  # type: ignore[method-assign]
            self.startWriting()  # type: ignore[no-untyped-call]
        else:
            self.doRead = self.doWrite = self.doConnect  # type: ignore[method-assign]
            reactor.callLater(0, self.doConnect)

    def _connect_answered(self) -> None:
        """``doConnect`` for a connect made and answered: connected when the socket has no error."""
        if not hasattr(self, "connector") or self._failed_as_the_socket_says():
            return  # failed or cancelled meanwhile, or now
        del self.doWrite, self.doRead
        _read_instead_of_write(self)
        self._connectDone()  # type: ignore[no-untyped-call]

    def _failed_as_the_socket_says(self) -> bool:
        """Fail the connect with the socket's error, as ``doConnect`` does, when it has one."""
        self._answer_awaited = False
        err = self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.failIfNotConnected(getConnectError((err, os.strerror(err))))  # type: ignore[no-untyped-call]
        return bool(err)

    def connectionLost(self, reason: Failure) -> None:
        # an error or hang-up while connecting, reported as such (not as a read or a write)
        if self._answer_awaited and hasattr(self, "connector") and self._failed_as_the_socket_says():
            return
        super().connectionLost(reason)  # type: ignore[no-untyped-call]


_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0)


def _read_instead_of_write(transport: Any) -> None:
    """
    ``transport.stopWriting(); transport.startReading()`` in one
    ``epoll_ctl`` (Twisted's epoll reactor makes two: it forgets the
    descriptor, then adds it again). Relies on ``EPollReactor``'s
    ``_poller``, ``_reads`` and ``_writes`` (the descriptors watched, beside
    ``_selectables``), as ``_add`` and ``_remove`` keep them.
    """
    reactor = transport.reactor
    fd = transport.fileno()
    if type(reactor) is EPollReactor and fd in reactor._writes and fd not in reactor._reads:
        reactor._poller.modify(fd, _EPOLLIN)
        reactor._writes.remove(fd)
        reactor._reads.add(fd)
    else:
        transport.stopWriting()
        transport.startReading()


class _ConnectorNow(tcp.Connector):
    """``reactor.connectTCP``'s connector, with :class:`_ClientConnectingNow` transports (``_makeTransport``)."""

    def _makeTransport(self) -> tcp.Client:
        return _ClientConnectingNow(self.host, self.port, self.bindAddress, self, self.reactor)  # type: ignore[no-untyped-call]


#: the TCP transports whose private fields :func:`write_now` reads (the upstream legs' own client too)
_TCP = (tcp.Server, tcp.Client, _ClientConnectingNow)


def connect_tcp_now(reactor: Any, host: str, port: int, factory: Any, timeout: float | None) -> IConnector:
    """
    ``reactor.connectTCP(host, port, factory, timeout)`` whose connect to an
    IPv4 literal starts at once (:class:`_ClientConnectingNow`), on Twisted's
    own reactors (``connectTCP`` there is this connector's ``connect``); any
    other reactor (a test's memory reactor) connects as it connects.
    """
    if not isinstance(reactor, PosixReactorBase):
        connector: IConnector = reactor.connectTCP(host, port, factory, timeout=timeout)
        return connector
    connector = _ConnectorNow(host, port, factory, timeout, None, reactor)  # type: ignore[arg-type]  # (None: no timer)
    connector.connect()
    return connector


# (any ITransport: a TCP one's private fields are read once ``type(transport) in _TCP``,
# a test the type checker does not follow; so for write_pieces and _sends_now)
def write_now(transport: Any, data: bytes) -> None:
    """
    Write ``data``, sending it at once when the transport has nothing queued.

    Twisted's ``write`` only queues and sends on the next reactor turn (two
    epoll_ctl calls and one more wake-up per message); asyncio sends at once
    the same way. TLS and other transports, or a queue already waiting, keep
    Twisted's path, which also reports any socket error.

    Relies on ``FileDescriptor.dataBuffer``, ``_tempDataLen`` and
    ``_writeDisconnecting`` (what ``write`` queues, and a pending
    ``loseWriteConnection``) and ``tcp.Connection.socket``.

    It pays (docs/performance.md, "Private items against public APIs"): with
    the relay writing through ``transport.write`` (and ``writeSequence`` for
    :func:`write_pieces`) instead, a 64-byte message echoed through the gateway
    costs 192 k instructions instead of 99 k, a 64 KiB one 240 k instead of
    143 k, 64 bytes 8 in flight 33.2 k instead of 21.3 k
    (``bench/ws_instructions.py``); in ``bench/run.py --quick --only 1,2`` the
    gateway's CPU per 10k messages went 0.77 -> 1.01 s (figure 1), 0.58 -> 1.23 s
    (8 in flight: above aiohttp's 0.97) and 0.53 -> 0.72 s (figure 2: above
    1.6x nginx).
    """
    if _sends_now(transport):
        try:
            sent = transport.socket.send(data)
        except OSError:
            sent = 0  # EAGAIN, or an error Twisted's doWrite reports
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


def write_pieces(transport: Any, pieces: list[bytes | memoryview]) -> None:  # (see write_now)
    """
    Write ``pieces`` in order as :func:`write_now` does, in one ``sendmsg``
    when the transport has nothing queued: the pieces of a read (views of it,
    and frame headers) are never joined into a copy. What the socket does not
    take is queued through Twisted's ``write``.

    Relies on what :func:`write_now` relies on (and pays as it does; the
    public ``writeSequence`` joins the pieces on the next reactor turn).
    """
    if len(pieces) == 1:
        write_now(transport, _as_bytes(pieces[0]))
        return
    if _sends_now(transport):
        try:
            sent = transport.socket.sendmsg(pieces)
        except OSError:
            sent = 0  # EAGAIN, or an error Twisted's doWrite reports
        for piece in pieces:
            n = len(piece)
            if sent >= n:
                sent -= n
                continue
            transport.write(_as_bytes(piece[sent:] if sent else piece))
            sent = 0
        return
    for piece in pieces:
        transport.write(_as_bytes(piece))


def _sends_now(transport: Any) -> bool:  # (see write_now)
    """Whether ``transport`` is a TCP socket with nothing queued (see :func:`write_now`)."""
    return (
        type(transport) in _TCP
        and transport.connected
        and not transport.disconnecting
        and not transport.dataBuffer
        and not transport._tempDataLen
        and not transport._writeDisconnecting
    )


def lose_connection_soon(transport: Any) -> None:  # (see write_now)
    """
    ``transport.loseConnection()``, and a plain TCP connection with nothing
    queued ends at the end of the reactor's current turn instead of a turn
    later.

    Twisted's ``loseConnection`` stops reading and waits to be told the socket
    is writable (two ``epoll_ctl``, a reactor turn, an empty ``send``, one more
    ``epoll_ctl``) to find its buffer empty, then closes; the relay's legs
    have sent their last bytes at once (:func:`write_now`), so it is empty
    already (a client leg's close: about 20 k instructions and four system
    calls of a relayed handshake). Here reading stops now and the transport
    is marked disconnecting as ``loseConnection`` marks it, so a write made in
    the meantime is queued and ends the connection Twisted's way once sent;
    the close itself waits for the end of the turn (:data:`poll_turn`), never
    inside the protocol code that asked for it (the other leg's frame
    processing, for a relay leg). Anything else (TLS, a queue, a producer that
    Twisted would resume first, a reactor not dispatching plainly, a call
    from a timer) is ``loseConnection``'s.

    Relies on what :func:`write_now` relies on, on
    ``FileDescriptor.disconnecting``, ``_writeDisconnected``, ``producer``,
    ``streamingProducer`` and ``producerPaused`` (what ``doWrite`` checks
    before it closes), ``tcp.Connection._aborting`` and ``connectionLost``.
    """
    if (
        poll_turn.dispatching
        and _sends_now(transport)
        and not transport._writeDisconnected
        and _producer_lets_close(transport)
    ):
        transport.stopReading()
        transport.disconnecting = True
        poll_turn.after.append(functools.partial(_lose_if_flushed, transport))
    else:
        transport.loseConnection()


def _producer_lets_close(transport: Any) -> bool:  # (see lose_connection_soon)
    """Whether Twisted's ``doWrite`` would close ``transport`` rather than resume its producer."""
    return transport.producer is None or (transport.streamingProducer and not transport.producerPaused)


def _lose_if_flushed(transport: Any) -> None:  # (see lose_connection_soon)
    """
    The end of :func:`lose_connection_soon`: the connection closed as
    ``doWrite`` closes a disconnecting one, unless it is gone already, or
    waits for a write (``doWrite`` closes it), or was aborted since.
    """
    if not transport.connected or transport._aborting or transport.dataBuffer or transport._tempDataLen:
        return
    if not _producer_lets_close(transport):
        transport.startWriting()  # where loseConnection would be: doWrite resumes the producer
        return
    transport.stopWriting()
    transport.connectionLost(connectionDone)  # (the Failure Twisted passes for a clean close)


def _as_bytes(piece: bytes | memoryview) -> bytes:
    """``piece`` as bytes: the read itself when it is a view of all of it, else a copy."""
    if type(piece) is bytes:
        return piece
    assert isinstance(piece, memoryview)
    whole = piece.obj
    if type(whole) is bytes and piece.nbytes == len(whole):
        return whole
    return piece.tobytes()


# -- Autobahn: the frame parser and the sender ---------------------------------

#: Autobahn's frame parser fed with bytes already read (``dataReceived`` also
#: builds debug-log arguments on every call). Relies on
#: ``WebSocketProtocol._dataReceived(data)``.
feed = WebSocketProtocol._dataReceived

_SEND_GROUND = WebSocketProtocol.SEND_STATE_GROUND


def parser_idle(leg: WebSocketProtocol) -> bool:
    """
    Whether Autobahn's parser holds nothing: no buffered bytes, no frame and no
    message under way, so the next byte starts a new message (the fast path may
    take it). Relies on ``data``, ``current_frame`` and ``inside_message``.
    """
    # (Autobahn annotates current_frame without its None)
    return not leg.data and leg.current_frame is None and not leg.inside_message  # type: ignore[unreachable]


def sender_idle(leg: WebSocketProtocol) -> bool:
    """
    Whether Autobahn is not between frames of a message it sends and has no
    chopped data queued, so whole frames may be written past it. Relies on
    ``send_state`` (``SEND_STATE_GROUND``) and ``send_queue``.
    """
    return leg.send_state == _SEND_GROUND and not leg.send_queue


def failed_by_me(leg: WebSocketProtocol) -> bool:
    """Whether Autobahn failed this connection itself (a bad frame, too big). Relies on ``failedByMe``."""
    return leg.failedByMe


def queued_sends(leg: WebSocketProtocol) -> bool:
    """Whether Autobahn holds chopped or synchronous sends back. Relies on ``send_queue``."""
    return bool(leg.send_queue)


def server_drop_wait(leg: WebSocketProtocol) -> IDelayedCall | None:
    """
    An Autobahn client's wait for its server to drop the connection after the
    close handshake (an ``IDelayedCall``), or None: the relay's legs have their
    own (``ws_relay._RelayLeg.sendCloseFrame``), a test's or a benchmark's
    peer Autobahn's. Relies on ``serverConnectionDropTimeoutCall``.
    """
    return getattr(leg, "serverConnectionDropTimeoutCall", None)


def timers_on(factory: WebSocketFactory, clock: IReactorTime) -> None:
    """
    Autobahn's timers of ``factory``'s connections (the open and close
    handshakes' timeouts, auto-ping) on ``clock`` instead of txaio's global
    reactor: 200 ms buckets, as Autobahn's factories make them. Relies on the
    factory's ``_batched_timer`` and txaio's ``_BatchedTimer``.
    """
    factory._batched_timer = _BatchedTimer(  # type: ignore[attr-defined]
        200.0, 1000, seconds_provider=clock.seconds, delayed_call_creator=clock.callLater
    )


# The hooks are always combined with an Autobahn protocol; they add nothing to the MRO at run time.
if TYPE_CHECKING:
    _Leg = WebSocketProtocol
    _ClientLeg = WebSocketClientProtocol
else:
    _Leg = _ClientLeg = object


class _Unwatched:
    """
    The legs' ``is_open`` and ``is_closed``: nothing in the gateway waits on
    them, so Autobahn's ``txaio.resolve`` (``future.callback(result)``) of
    them does nothing.
    """

    def callback(self, result: object) -> None:
        pass


UNWATCHED = _Unwatched()


class LegHooks(_Leg):
    """
    Overrides of Autobahn's connection hooks shared by both legs.

    ``__init__``: ``WebSocketProtocol.__init__`` without the two futures
    (``is_open``, ``is_closed``: Deferreds nobody waits on, made and fired per
    leg) and without the placeholder ``TransportDetails`` (see below): four
    Deferreds and two objects less per handshake. Relies on that ``__init__``
    setting only those and the valid events (``tests/test_compat.py``
    compares the attributes both set).

    Autobahn renders the arguments of its debug lines (``hltype``, ``hlval``:
    qualified names styled through ``click``, whether or not debug logging is
    on) in ``connectionMade``, ``connectionLost`` and ``_connectionMade``:
    about a twentieth of a relayed handshake's instructions. These do what
    Autobahn's do without the rendering:

    ``connectionMade``: the Twisted adapter's (``peer``, ``tcpNoDelay``: not
    set again on a socket whose listener gave it, :func:`accepted_preset`), then
    ``_connectionMade``; ``_transport_details`` (``create_transport_details``)
    is made when first read, which a plain TCP leg's ``_onOpen`` no longer does
    (a TLS leg's still does, for its channel id and peer certificate): with
    :func:`peer_of`, 37 k instructions less per handshake (2.321 -> 2.284 M).
    ``connectionLost``: the adapter's (its one non-debug line, a TLS error), then
    ``_connectionLost``, which Autobahn's client and server versions begin by
    rendering the reason, with its traceback, for a debug line: this calls the
    shared part (without the two ``_connectionLost`` overrides, an open + message
    + close cycle through the gateway costs 3.07 M instructions instead of
    2.96 M: ``bench/ws_instructions.py --cycles 300``, two runs each).
    ``_closeConnection``: the Twisted adapter's (``abortConnection`` or
    ``loseConnection``), but an orderly drop ends the connection at the end of
    the reactor's turn (:func:`lose_connection_soon`): a leg has sent its
    last bytes at once.
    ``_fail_connection``: Autobahn calls it for every frame it refuses; after it
    ran, :meth:`failed` tells the relay (the other leg must close at once). The
    public hook, ``onClose``, would come only when the failed leg's close
    handshake ends (``failByDrop = False``: its peer's answer, or 5 s of
    ``closeHandshakeTimeout``), and the other leg would wait that long; the
    override runs once per refused frame, never on the data path.
    """

    if TYPE_CHECKING:  # the Twisted adapter's, which every leg also is
        transport: ITCPTransport | None
        is_server: bool
        tcpNoDelay: bool
        log: ILogger

    is_open = is_closed = UNWATCHED

    def __init__(self) -> None:
        self.set_valid_events(["message"])  # type: ignore[no-untyped-call]

    def connectionMade(self) -> None:
        self.peer = peer_of(self.transport)
        try:
            assert self.transport is not None  # makeConnection set it
            if not (self.tcpNoDelay and accepted_preset(self.transport) is not NOT_PRESET):  # (else its listener's)
                self.transport.setTcpNoDelay(self.tcpNoDelay)
        except Exception:
            pass  # not TCP (a UNIX socket refuses TCP_NODELAY)
        self._connectionMade()

    @functools.cached_property
    def _transport_details(self) -> TransportDetails:  # type: ignore[override]  # (a cached_property stores it)
        assert self.transport is not None  # read once connected
        details = create_transport_details(self.transport, self.is_server)
        details.channel_framing = TransportDetails.CHANNEL_FRAMING_WEBSOCKET
        return details

    @functools.cached_property
    def utf8validator(self) -> Utf8Validator:  # type: ignore[override]  # (a cached_property stores it)
        """Autobahn's validator of the text messages it parses itself, made when first read (:func:`connection_made`)."""
        return Utf8Validator()

    def _onOpen(self) -> None:
        if ISSLTransport.providedBy(self.transport):
            WebSocketAdapterProtocol._onOpen(self)  # type: ignore[arg-type]  # the TLS channel id and peer certificate, now known
        else:
            self.onOpen()

    # (Autobahn annotates the reason as str; it is Twisted's Failure)
    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if _is_tls_error(reason.value):
            self.log.error(_maybe_tls_reason(reason.value))
        self._connectionLost(reason)

    def _connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        WebSocketProtocol._connectionLost(self, reason)  # type: ignore[arg-type]

    def _closeConnection(self, abort: bool = False) -> None:
        if abort:
            WebSocketAdapterProtocol._closeConnection(self, abort)  # type: ignore[arg-type]
        else:
            lose_connection_soon(self.transport)

    def _fail_connection(self, code: int = 1001, reason: str = "going away") -> None:
        WebSocketProtocol._fail_connection(self, code, reason)
        if self.failedByMe:
            self.failed(code)

    def failed(self, code: int) -> None:
        """Autobahn failed this leg with ``code``."""


#: What ``WebSocketProtocol._connectionMade`` sets alike on every connection
#: (a client's ``serverConnectionDropTimeoutCall`` apart).
_FRESH: dict[str, object] = dict(
    _perMessageCompress=None,
    trackedTimings=None,
    send_state=WebSocketProtocol.SEND_STATE_GROUND,
    data=b"",
    triggered=False,
    wasMaxFramePayloadSizeExceeded=False,
    wasMaxMessagePayloadSizeExceeded=False,
    closedByMe=False,
    failedByMe=False,
    droppedByMe=False,
    wasClean=False,
    wasNotCleanReason=None,
    wasServerConnectionDropTimeout=False,
    wasOpenHandshakeTimeout=False,
    wasCloseHandshakeTimeout=False,
    wasServingFlashSocketPolicyFile=False,
    localCloseCode=None,
    localCloseReason=None,
    remoteCloseCode=None,
    remoteCloseReason=None,
    openHandshakeTimeoutCall=None,
    closeHandshakeTimeoutCall=None,
    autoPingTimeoutCall=None,
    autoPingPending=None,
    autoPingPendingCall=None,
    autoPingPendingSeq=0,
    autoPingPendingSent=None,
)


def connection_made(leg: Any) -> None:  # (either leg: its factory and options are the Twisted adapter's)
    """
    ``WebSocketProtocol._connectionMade`` for a leg: the same state, set at
    once, without its debug line (which lists the options it copies from the
    factory: none, after ``with_options``) or the leg's UTF-8 validator,
    which only a text message Autobahn parses itself uses (the fast path and
    close reasons have their own): :attr:`LegHooks.utf8validator` makes it when
    first read. (``setTrackTimings(self.trackTimings)`` there changes nothing:
    ``trackedTimings`` stays None.) Relies on the attributes that
    ``_connectionMade`` sets (``tests/test_compat.py`` compares them).
    """
    factory = leg.factory
    for name in leg.CONFIG_ATTRS:  # (none with with_options)
        if not hasattr(leg, name):
            setattr(leg, name, getattr(factory, name))
    fresh = vars(leg)
    fresh.update(_FRESH)
    fresh["trafficStats"] = TrafficStats()
    fresh["send_queue"] = deque()
    if factory.isServer:
        fresh["state"] = WebSocketProtocol.STATE_CONNECTING
    else:
        fresh["serverConnectionDropTimeoutCall"] = None
        fresh["state"] = (
            WebSocketProtocol.STATE_CONNECTING if factory.proxy is None else WebSocketProtocol.STATE_PROXY_CONNECTING
        )
    if leg.openHandshakeTimeout > 0:
        leg.openHandshakeTimeoutCall = factory._batched_timer.call_later(
            leg.openHandshakeTimeout, leg.onOpenHandshakeTimeout
        )


class ServerLegHooks(_Leg):
    """
    The client-facing leg's ``_connectionMade`` and ``_connectionLost``: what
    Autobahn's server versions do (the factory's ``countConnections``, which
    ``maxConnections`` reads) without their debug rendering. Placed before
    :class:`LegHooks` in the bases.
    """

    factory: WebSocketServerFactory

    def _connectionMade(self) -> None:
        connection_made(self)
        self.factory.countConnections += 1

    def _connectionLost(self, reason: Failure) -> None:  # type: ignore[override]  # (as above)
        super()._connectionLost(reason)  # type: ignore[arg-type]
        self.factory.countConnections -= 1


class ClientLegHooks(_ClientLeg):
    """
    The upstream-facing leg's ``_connectionMade`` (Autobahn's client version:
    the shared part, then the proxy's CONNECT or the opening handshake) and
    ``_onConnect`` (the Twisted adapter's: ``onConnect``), without their debug
    rendering. Placed before :class:`LegHooks` in the bases.
    """

    factory: WebSocketClientFactory

    def _connectionMade(self) -> None:
        connection_made(self)
        if not self.factory.isServer and self.factory.proxy is not None:
            self.startProxyConnect()  # type: ignore[no-untyped-call]
        else:
            self.startHandshake()  # type: ignore[no-untyped-call]

    # (what onConnect returns, which Autobahn types as None and its adapter waits for)
    def _onConnect(self, response: ConnectionResponse) -> Any:
        return self.onConnect(response)


# -- Autobahn: handshakes ------------------------------------------------------


def with_options(protocol: type[_P], factory: object) -> type[_P]:
    """
    ``protocol`` with ``factory``'s current Autobahn options as class attributes.

    Autobahn copies some 30 options from the factory onto every new protocol
    and pretty-prints them all for a debug line, whether or not debug logging
    is on: about a third of a handshake's CPU, and a dict entry each per open
    connection. Relies on ``CONFIG_ATTRS`` (the names copied, read in
    ``_connectionMade``): emptied here, the copy is skipped.
    """
    options: dict[str, object] = {"CONFIG_ATTRS": ()}
    for name in protocol.CONFIG_ATTRS:
        value = getattr(factory, name)
        options[name] = staticmethod(value) if isinstance(value, FunctionType) else value
    return type(protocol.__name__, (protocol,), options)


class _Rendered:
    """A debug line's argument, rendered only when the line is formatted."""

    __slots__ = ("_render", "_args", "_kwargs")

    def __init__(self, render: Callable[..., str], args: tuple[object, ...], kwargs: dict[str, object]) -> None:
        self._render, self._args, self._kwargs = render, args, kwargs

    def __str__(self) -> str:
        return self._render(*self._args, **self._kwargs)

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)

    __repr__ = __str__


def _lazily(render: Callable[..., str]) -> Callable[..., _Rendered]:
    def lazy(*args: object, **kwargs: object) -> _Rendered:
        return _Rendered(render, args, kwargs)

    lazy.__wrapped__ = render  # type: ignore[attr-defined]
    return lazy


def _pformat(obj: object, *args: Any, **kwargs: Any) -> str:  # (pprint.pformat's own, passed on)
    """``pprint.pformat``, whose answer for an empty list is known."""
    if type(obj) is list and not obj and not args and not kwargs:
        return "[]"
    return _real_pformat(obj, *args, **kwargs)


def render_debug_lazily() -> None:
    """
    Autobahn's protocol module renders the arguments of its debug lines
    whether or not debug logging is on: ``hltype`` and ``hlval`` (a
    qualified name or a value styled through ``click``) in both legs'
    ``processHandshake``, and ``pformat`` of the options it copied (an empty
    list: :func:`with_options`) in ``_connectionMade``. Here ``hltype`` and
    ``hlval`` render only when a line is formatted, and ``pformat`` answers
    ``"[]"`` for an empty list without building a printer; every line reads
    as before. Idempotent.

    Relies on ``autobahn.websocket.protocol`` calling these three through its
    module globals (``from autobahn.util import hltype, hlval``, ``from pprint
    import pformat``), only to render debug lines (and ``Timings.__str__``,
    which gets the same string from :func:`_pformat`).
    """
    names = vars(websocket_protocol)
    for name in ("hltype", "hlval"):
        if not isinstance(names[name], FunctionType) or names[name].__name__ != "lazy":
            names[name] = _lazily(names[name])
    names["pformat"] = _pformat


#: Payloads up to this size are masked by :class:`_ShortMasker`, larger ones by Autobahn's own.
SHORT_MASKED = 1024
_native_masker: Callable[..., Any] = create_xor_masker


class _ShortMasker:
    """
    Autobahn's masker (``pointer``, ``reset``, ``process``, fed a payload in
    pieces) for a short payload: one big-integer XOR per piece. Autobahn's
    native one costs a CFFI buffer and native state per frame (in a relayed
    handshake, both close frames).
    """

    __slots__ = ("_key", "_ptr")

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._ptr = 0

    def pointer(self) -> int:
        return self._ptr

    def reset(self) -> None:
        self._ptr = 0

    def process(self, data: bytes) -> bytes:
        n = len(data)
        shift = self._ptr & 3
        self._ptr += n
        key = self._key[shift:] + self._key[:shift] if shift else self._key
        keys = (key * ((n >> 2) + 1))[:n]
        return (int.from_bytes(data, "little") ^ int.from_bytes(keys, "little")).to_bytes(n, "little")


def _masker(mask: bytes, length: int | None = None) -> Any:
    """``create_xor_masker``: a short payload's masker is :class:`_ShortMasker`."""
    if length is not None and length <= SHORT_MASKED:
        return _ShortMasker(mask)
    return _native_masker(mask, length)


def mask_short_payloads() -> None:
    """
    Autobahn's protocol module masks and unmasks a frame's payload with a
    masker that ``create_xor_masker(mask, length)`` makes (a native one:
    CFFI, per frame): a payload of up to :data:`SHORT_MASKED` bytes gets a
    :class:`_ShortMasker` instead, the same bytes. Relies on
    ``autobahn.websocket.protocol`` calling ``create_xor_masker`` through
    its module globals with the payload's length. Idempotent.
    """
    vars(websocket_protocol)["create_xor_masker"] = _masker


#: What Autobahn's ``parseHttpHeader`` accepts of a request line, a header's
#: name and its value (``_HTTP_START_LINE_INVALID``, ``_HTTP_FIELD_NAME``,
#: ``_HTTP_FIELD_VALUE_INVALID``): :func:`ws_proxy.upgrade_answered` takes a
#: request twisted.web parsed only when Autobahn's parser would have taken it.
START_LINE_INVALID = websocket_protocol._HTTP_START_LINE_INVALID
FIELD_NAME = websocket_protocol._HTTP_FIELD_NAME
FIELD_VALUE_INVALID = websocket_protocol._HTTP_FIELD_VALUE_INVALID


def origin_allowed(leg: WebSocketServerProtocol, origin: str) -> bool:
    """
    Whether Autobahn's server handshake lets ``origin`` (an ``Origin``
    header's value) through, as ``processHandshake`` decides it: ``null``
    when the factory allows it, else the scheme, host and port against
    ``allowedOriginsPatterns``; False for an origin it cannot parse.
    Relies on ``autobahn.websocket.protocol._url_to_origin`` and ``_is_same_origin``.
    """
    try:
        parsed = websocket_protocol._url_to_origin(origin)
    except ValueError:
        return False
    factory: WebSocketServerFactory = leg.factory  # type: ignore[attr-defined]  # (the Twisted adapter's)
    if parsed == "null" and factory.allowNullOrigin:
        return True
    allowed: bool = websocket_protocol._is_same_origin(
        parsed, "https" if factory.isSecure else "http", factory.externalPort or factory.port,
        leg.allowedOriginsPatterns,  # type: ignore[attr-defined]
    )
    return allowed


def parse_extensions(protocol: WebSocketProtocol, header: str) -> list[tuple[str, dict[str, list[str | bool]]]]:
    """
    A ``Sec-WebSocket-Extensions`` value as (name, parameters) pairs, as
    Autobahn parses it. Relies on ``WebSocketProtocol._parseExtensionsHeader``.
    """
    parsed: list[tuple[str, dict[str, list[str | bool]]]] = protocol._parseExtensionsHeader(header)
    return parsed


#: RFC 6455's GUID, hashed after a client's key for the server's ``Sec-WebSocket-Accept``.
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def open_on_plain_101(leg: Any, end: int) -> bool:  # (the upstream leg: its factory and options are the Twisted adapter's)
    """
    Autobahn's client ``processHandshake`` for an upstream's 101 without
    ``Sec-WebSocket-Extensions`` (the head is ``leg.data[:end + 4]``): the
    same parser (``parseHttpHeader``), the same checks of the status line,
    ``Upgrade``, ``Connection``, ``Sec-WebSocket-Accept`` (once) and
    ``Sec-WebSocket-Protocol`` (once, one the leg offered), the same
    attributes set, then the leg opened and the bytes after the head parsed,
    as Autobahn's ``on_connect_success`` does. Left out: its debug lines and
    the ``Deferred`` (``txaio.as_future``) with two closures around an
    ``onConnect`` that answers None (the legs' is Autobahn's). False, having
    changed nothing, for any other answer (a compression answer, anything
    Autobahn would refuse): Autobahn's then checks it, and opens or fails the
    leg as ever. About 45 k instructions of a relayed handshake.

    Relies on ``parseHttpHeader`` (marked for Autobahn's internal use) and on
    what ``processHandshake`` sets (``tests/test_client_101.py`` compares the
    two ways): ``http_response_data``, ``http_status_line``, ``http_headers``,
    ``websocket_extensions_in_use``, ``websocket_protocol_in_use``, ``data``,
    ``state``, ``inside_message``, ``current_frame``, ``websocket_version``
    (from ``version``), then ``_onOpen`` and ``consumeData``; on the leg's
    ``websocket_key``, and no auto-ping, open handshake timer or timings
    (checked: Autobahn's path then).
    """
    head = leg.data[: end + 4]
    try:
        line, headers, counts = websocket_protocol.parseHttpHeader(head)
    except Exception:
        return False
    parts = line.split()
    if (
        len(parts) < 2
        or parts[0] != "HTTP/1.1"
        or parts[1] != "101"
        or "sec-websocket-extensions" in headers
        or leg.autoPingInterval
        or leg.openHandshakeTimeoutCall is not None
        or leg.trackedTimings
        or type(leg).onConnect is not WebSocketClientProtocol.onConnect
    ):
        return False
    if headers.get("upgrade", "").strip().lower() != "websocket":
        return False
    if "upgrade" not in [token.strip().lower() for token in headers.get("connection", "").split(",")]:
        return False
    accept = base64.b64encode(hashlib.sha1(leg.websocket_key + _WS_GUID).digest()).decode()
    if counts.get("sec-websocket-accept") != 1 or headers["sec-websocket-accept"].strip() != accept:
        return False
    protocol = None
    if "sec-websocket-protocol" in headers:
        chosen = headers["sec-websocket-protocol"].strip()
        if counts["sec-websocket-protocol"] > 1 or (chosen and chosen not in leg.factory.protocols):
            return False
        protocol = chosen or None
    leg.http_response_data, leg.http_status_line, leg.http_headers = head, line, headers
    leg.websocket_extensions_in_use = []
    leg.websocket_protocol_in_use = protocol
    leg.data = leg.data[end + 4 :]
    leg.state = WebSocketProtocol.STATE_OPEN
    leg.inside_message = False
    leg.current_frame = None
    leg.websocket_version = leg.version
    leg._onOpen()
    if leg.data:
        leg.consumeData()
    return True


#: What the upstream leg's own ``startHandshake`` and ``processHandshake``
#: share with Autobahn's client: the key it sent (``websocket_key``, checked
#: against ``Sec-WebSocket-Accept``), the request it wrote
#: (``http_request_data``), the status line of the answer
#: (``http_status_line``) and the bytes read so far (``data``).
CLIENT_HANDSHAKE_ATTRS = ("websocket_key", "http_request_data", "http_status_line", "data")
