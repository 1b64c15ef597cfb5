"""
Each private attribute or method of Autobahn and Twisted the gateway relies on
(twisted_gateway/_compat.py, and the HTTP forwarder's subclasses of Twisted's
HTTP client and server) is still what the gateway takes it to be. A failure
names the item and the library to read before upgrading.
"""

from __future__ import annotations

import inspect

import pytest
from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.websocket.protocol import WebSocketProtocol
from typing import Callable

from autobahn.wamp.types import TransportDetails
from twisted.internet import abstract, tcp
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.base import ReactorBase
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.python import log as legacy_log
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from twisted_gateway import _compat


def _sets(cls: type, name: str) -> bool:
    """Whether ``cls``'s own source (or a base's) assigns or reads ``self.<name>``."""
    for klass in inspect.getmro(cls):
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        if f"self.{name}" in source:
            return True
    return False


def _require(condition: bool, item: str, library: str) -> None:
    if not condition:
        pytest.fail(f"{library} changed {item}: twisted_gateway/_compat.py relies on it; read its docstring")


def _server_factory() -> WebSocketServerFactory:
    """
    A factory whose protocols set no handshake timer: Autobahn's timers run on
    the global reactor, where one would outlive the test.
    """
    factory = WebSocketServerFactory("ws://localhost:9")
    factory.setProtocolOptions(openHandshakeTimeout=0, closeHandshakeTimeout=0)
    return factory


def _open_server_leg() -> WebSocketServerProtocol:
    factory = _server_factory()
    factory.protocol = WebSocketServerProtocol
    proto = factory.buildProtocol(None)
    proto.makeConnection(StringTransport())
    return proto


# -- Twisted ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dataBuffer", "_tempDataLen", "_writeDisconnecting"])
def test_filedescriptor_write_queue(name):
    fd = abstract.FileDescriptor()
    _require(hasattr(fd, name), f"FileDescriptor.{name}", "Twisted")


def test_tcp_connection_socket():
    _require(_sets(tcp.Connection, "socket") and tcp.Server in _compat._TCP, "tcp.Connection.socket", "Twisted")


def test_write_now_queues_what_it_cannot_send():
    """A queued write means write_now must not jump the queue: what it reads must be what write fills."""
    fd = abstract.FileDescriptor()
    fd.connected = True
    fd.startWriting = lambda: None
    fd.write(b"queued")
    _require(fd._tempDataLen == 6 or bool(fd.dataBuffer), "FileDescriptor.write's queue (_tempDataLen)", "Twisted")


def test_epoll_reactor_dispatch():
    """What ``dispatch_plainly``'s copy of ``doPoll`` does, less the log context."""
    source = inspect.getsource(EPollReactor.doPoll)
    _require(
        EPollReactor.doIteration is EPollReactor.doPoll
        and "self._poller.poll(timeout, len(self._selectables))" in source
        and "_drdw = self._doReadOrWrite" in source
        and "log.callWithLogger(selectable, _drdw, selectable, fd, event)" in source
        and "self.doIteration(" in inspect.getsource(ReactorBase.mainLoop),
        "EPollReactor.doPoll",
        "Twisted",
    )


def test_dispatch_plainly_leaves_other_reactors_alone():
    clock = Clock()
    assert not _compat.dispatch_plainly(clock)
    assert "doIteration" not in vars(clock)


class _Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        if data == b"boom":
            raise ValueError("a bug in a protocol")
        self.transport.write(data)


class _Client(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: object = None) -> None:
        self.lost = True


def test_dispatch_plainly_serves_and_still_reports_a_protocols_error():
    """
    An epoll reactor dispatching plainly still serves a loopback connection,
    and a protocol's exception is still logged (with its traceback) and
    drops only that connection, as Twisted's own dispatch does.
    """
    reactor = EPollReactor()
    errors: list[dict] = []

    def observe(event: dict) -> None:
        if event.get("isError"):
            errors.append(event)

    legacy_log.addObserver(observe)
    try:
        assert _compat.dispatch_plainly(reactor)
        port = reactor.listenTCP(0, Factory.forProtocol(_Echo), interface="127.0.0.1")
        clients = [_Client(), _Client()]
        for client in clients:
            reactor.connectTCP("127.0.0.1", port.getHost().port, _OneFactory(client))

        def spin(until: Callable[[], bool]) -> None:
            for _ in range(1000):
                if until():
                    return
                reactor.iterate(0.01)
            raise AssertionError("the reactor did not get there")

        spin(lambda: all(c.transport is not None and c.connected for c in clients))
        clients[0].transport.write(b"hello")
        clients[1].transport.write(b"boom")
        spin(lambda: clients[0].received == b"hello" and clients[1].lost)
        assert not clients[0].lost
        assert [str(e["failure"].value) for e in errors] == ["a bug in a protocol"]
        clients[0].transport.loseConnection()
        port.stopListening()
        spin(lambda: clients[0].lost)
    finally:
        legacy_log.removeObserver(observe)
        reactor.removeAll()
        reactor._poller.close()
        reactor.waker.connectionLost(None)


class _OneFactory(ClientFactory):
    def __init__(self, protocol: Protocol) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr: object) -> Protocol:
        return self.protocol_instance


def test_what_client_connecting_now_waits_for_its_connect_with() -> None:
    """_compat._ClientConnectingNow's wait for its connect's answer: Twisted's client parts it repeats or calls."""
    init = inspect.getsource(tcp.Connection.__init__)
    _require(
        [line.strip() for line in init.split("):", 1)[1].strip().splitlines() if line.strip()] == [
            "abstract.FileDescriptor.__init__(self, reactor=reactor)",
            "self.socket: socket.socket = skt",
            "self.socket.setblocking(False)",
            "self.fileno: Callable[[], int] = skt.fileno",
            "self.protocol: IProtocol = protocol",
        ],
        "tcp.Connection.__init__", "Twisted",
    )
    made = inspect.getsource(tcp.BaseClient.createInternetSocket)
    _require(
        "socket.socket(self.addressFamily, self.socketType)" in made and "s.setblocking(0)" in made
        and "skt = self.createInternetSocket()" in inspect.getsource(tcp.Client.__init__),
        "BaseClient.createInternetSocket", "Twisted",
    )
    connect = inspect.getsource(tcp.BaseClient.doConnect)
    _require(
        "err = self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)" in connect
        and "self.failIfNotConnected(error.getConnectError((err, strerror(err))))" in connect
        and "del self.doWrite" in connect and "del self.doRead" in connect and "self._connectDone()" in connect,
        "BaseClient.doConnect", "Twisted",
    )
    _require("self.startReading()" in inspect.getsource(tcp.BaseClient._connectDone), "BaseClient._connectDone", "Twisted")
    _require(
        "self.failIfNotConnected(error.ConnectError(string=reason))" in inspect.getsource(tcp.BaseClient.connectionLost)
        and "del self.connector" in inspect.getsource(tcp.BaseClient.failIfNotConnected),
        "BaseClient.connectionLost and failIfNotConnected", "Twisted",
    )
    add, remove = inspect.getsource(EPollReactor._add), inspect.getsource(EPollReactor._remove)
    _require(
        "self._poller.modify(fd, flags)" in add and "primary.add(fd)" in add and "selectables[fd] = xer" in add
        and "primary.remove(fd)" in remove and "self._reads, self._writes" in inspect.getsource(EPollReactor.addReader),
        "EPollReactor._add and _remove (_reads, _writes, _poller)", "Twisted",
    )


def test_an_accepted_connection_knows_its_listening_port():
    """_compat.accepted_preset: ``tcp.Server.server`` is the port that accepted the connection."""
    _require("self.server = server" in inspect.getsource(tcp.Server.__init__), "tcp.Server.server", "Twisted")


def test_an_http_channel_is_made_as_http_channel_made_makes_it():
    """
    _compat.http_channel_made: ``HTTPChannel.connectionMade`` sets TCP_NODELAY,
    its idle timeout, and registers itself with its transport kept as
    ``_networkProducer`` (``_NoPushProducer`` when the transport is no push
    producer), and nothing else.
    """
    from twisted.web import http

    lines = [line.strip() for line in inspect.getsource(http.HTTPChannel.connectionMade).splitlines()[1:]]
    _require(
        lines == [
            "if ITCPTransport.providedBy(self.transport):",
            "self.transport.setTcpNoDelay(True)",
            "self.setTimeout(self.timeOut)",
            "self._networkProducer = interfaces.IPushProducer(",
            "self.transport, _NoPushProducer()",
            ")",
            "self._networkProducer.registerProducer(self, True)",
        ]
        and isinstance(http._NoPushProducer(), http._NoPushProducer),
        "HTTPChannel.connectionMade", "Twisted",
    )


def test_lose_connection_is_what_lose_connection_soon_ends_sooner():
    """_compat.lose_connection_soon: Twisted's loseConnection waits for doWrite to find the buffer empty, then closes."""
    lose = inspect.getsource(abstract.FileDescriptor.loseConnection)
    _require(
        "if self._writeDisconnected:" in lose and "self.stopReading()" in lose
        and "self.startWriting()" in lose and "self.disconnecting = 1" in lose,
        "FileDescriptor.loseConnection", "Twisted",
    )
    write = inspect.getsource(abstract.FileDescriptor.doWrite)
    _require(
        "if self.producer is not None and (\n                (not self.streamingProducer) or self.producerPaused" in write
        and "elif self.disconnecting:" in write and "return self._postLoseConnection()" in write,
        "FileDescriptor.doWrite", "Twisted",
    )
    fd = abstract.FileDescriptor()
    _require(
        all(hasattr(fd, name) for name in ("_writeDisconnected", "producer", "streamingProducer", "producerPaused")),
        "FileDescriptor's producer and write-side state", "Twisted",
    )
    _require(_sets(tcp.Connection, "_aborting"), "tcp.Connection._aborting", "Twisted")


class _Closing(Protocol):
    """Answers b"bye" with b"ok", written at once, then ``lose`` (and ``then``)."""

    def __init__(self, lose: Callable[[object], None], then: Callable[[object], None] = lambda t: None) -> None:
        self.lose, self.then = lose, then
        self.lost_inside = self.waits_for_writable = False
        self.reason: object = None

    def dataReceived(self, data: bytes) -> None:
        _compat.write_now(self.transport, b"ok")
        self.lose(self.transport)
        self.waits_for_writable = self.transport in self.transport.reactor.getWriters()
        self.then(self.transport)
        self.lost_inside = self.reason is not None

    def connectionLost(self, reason: object = None) -> None:
        self.reason = reason


def _close_over_loopback(server: _Closing) -> _Client:
    """A loopback client sends b"bye" to ``server`` on a reactor dispatching plainly, until both ends are lost."""
    reactor = EPollReactor()
    assert _compat.dispatch_plainly(reactor)
    port = reactor.listenTCP(0, _OneFactory(server), interface="127.0.0.1")
    client = _Client()
    try:
        reactor.connectTCP("127.0.0.1", port.getHost().port, _OneFactory(client))
        for _ in range(1000):
            if client.transport is not None and client.connected:
                break
            reactor.iterate(0.01)
        client.transport.write(b"bye")
        for _ in range(1000):
            if server.reason is not None and client.lost:
                break
            reactor.iterate(0.01)
        else:
            raise AssertionError("the connection did not end")
    finally:
        port.stopListening()
        reactor.removeAll()
        reactor._poller.close()
        reactor.waker.connectionLost(None)
    return client


def test_lose_connection_soon_closes_at_the_end_of_the_turn():
    """Nothing queued: the connection ends as the turn that asked ends, not inside the call (Twisted's waits for a writable turn)."""
    from twisted.internet.error import ConnectionDone

    server = _Closing(_compat.lose_connection_soon)
    client = _close_over_loopback(server)
    assert not server.lost_inside and not server.waits_for_writable
    assert server.reason.check(ConnectionDone)
    assert client.received == b"ok"


@pytest.mark.parametrize(
    "then, received, reason",
    [
        (lambda t: t.write(b" and more"), b"ok and more", "ConnectionDone"),  # queued since: sent, then closed
        (lambda t: t.abortConnection(), b"ok", "ConnectionAborted"),  # aborted since: the abort stands
    ],
)
def test_lose_connection_soon_leaves_what_came_since_to_twisted(then, received, reason):
    server = _Closing(_compat.lose_connection_soon, then)
    client = _close_over_loopback(server)
    assert not server.lost_inside
    assert type(server.reason.value).__name__ == reason
    assert client.received == received


class _Pulled:
    """A pull producer: Twisted resumes it when the transport's buffer empties, and closes only once it is unregistered."""

    def __init__(self) -> None:
        self.stopped = False

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        self.stopped = True  # the connection was lost with it registered


@pytest.mark.parametrize("when", ["before", "after"])
def test_lose_connection_soon_leaves_a_pull_producer_to_twisted(when):
    """A producer Twisted would resume before closing, registered before the call or after it: Twisted's close, once it is unregistered."""
    producer = _Pulled()
    registered: list[bool] = []

    def register(transport) -> None:
        if not registered:
            registered.append(True)
            transport.registerProducer(producer, False)
            transport.reactor.callLater(0.05, transport.unregisterProducer)

    server = _Closing(_compat.lose_connection_soon, register) if when == "after" else _Closing(
        lambda t: (register(t), _compat.lose_connection_soon(t))
    )
    client = _close_over_loopback(server)
    assert not server.lost_inside and not producer.stopped  # closed once unregistered, not under it
    assert type(server.reason.value).__name__ == "ConnectionDone" and client.received == b"ok"


def test_lose_connection_soon_outside_a_turn_is_lose_connection():
    """From a timer (no poll being handled) or on another transport: Twisted's own loseConnection."""
    transport = StringTransport()
    _compat.lose_connection_soon(transport)
    assert transport.disconnecting


# -- Autobahn: parser and sender -----------------------------------------------------


def test_feed_is_the_frame_parser():
    _require(_compat.feed is WebSocketProtocol.__dict__.get("_dataReceived"), "WebSocketProtocol._dataReceived", "Autobahn")


@pytest.mark.parametrize("name", ["data", "current_frame", "inside_message"])
def test_parser_state(name):
    _require(_sets(WebSocketProtocol, name), f"WebSocketProtocol.{name}", "Autobahn")


def test_parser_idle_after_open():
    proto = _open_server_leg()
    proto.state = WebSocketProtocol.STATE_OPEN
    proto.data = b""
    proto.current_frame = None
    proto.inside_message = False
    _require(_compat.parser_idle(proto), "the parser's idle state", "Autobahn")


@pytest.mark.parametrize("name", ["send_state", "send_queue"])
def test_sender_state(name):
    _require(_sets(WebSocketProtocol, name), f"WebSocketProtocol.{name}", "Autobahn")
    _require(hasattr(WebSocketProtocol, "SEND_STATE_GROUND"), "WebSocketProtocol.SEND_STATE_GROUND", "Autobahn")


def test_sender_idle_on_a_fresh_leg():
    proto = _open_server_leg()
    _require(_compat.sender_idle(proto) and not _compat.queued_sends(proto), "send_state/send_queue", "Autobahn")


def test_failed_by_me():
    proto = _open_server_leg()
    _require(proto.failedByMe is False, "WebSocketProtocol.failedByMe", "Autobahn")


def test_fail_connection_sets_failed_by_me():
    """LegHooks._fail_connection reads failedByMe after Autobahn's own ran."""
    calls = []

    class Leg(_compat.LegHooks, WebSocketServerProtocol):
        def failed(self, code):
            calls.append(code)

    factory = _server_factory()
    factory.protocol = Leg
    proto = factory.buildProtocol(None)
    proto.makeConnection(StringTransport())
    proto.state = WebSocketProtocol.STATE_OPEN
    proto.failByDrop = False  # a close frame, not a drop of the in-memory transport
    proto._fail_connection(1002, "bad frame")
    _require(calls == [1002], "WebSocketProtocol._fail_connection / failedByMe", "Autobahn")


def test_open_on_plain_101():
    """What open_on_plain_101 relies on besides the state tests/test_client_101.py compares both ways."""
    from autobahn.websocket import protocol

    _require(callable(getattr(protocol, "parseHttpHeader", None)), "autobahn.websocket.protocol.parseHttpHeader", "Autobahn")
    source = inspect.getsource(protocol.WebSocketClientProtocol.processHandshake)
    _require(
        "txaio.as_future(self._onConnect, response)" in source and "self._onOpen()" in source
        and "self.consumeData()" in source,
        "WebSocketClientProtocol.processHandshake (onConnect, then _onOpen and consumeData)",
        "Autobahn",
    )


def test_server_drop_wait():
    _require(_sets(WebSocketProtocol, "serverConnectionDropTimeoutCall"), "WebSocketProtocol.serverConnectionDropTimeoutCall", "Autobahn")


@pytest.mark.parametrize("cls", [WebSocketServerFactory, WebSocketClientFactory])
def test_factory_timers_on_a_clock(cls):
    """The factory's protocols take their timers from ``_batched_timer``, which timers_on replaces."""
    _require(_sets(cls, "_batched_timer"), f"{cls.__name__}._batched_timer", "Autobahn")
    _require(_sets(WebSocketProtocol, "factory._batched_timer.call_later"), "factory._batched_timer", "Autobahn")
    factory, clock, calls = cls(), Clock(), []
    _compat.timers_on(factory, clock)
    factory._batched_timer.call_later(1.0, calls.append, "due")
    clock.advance(1.3)
    _require(calls == ["due"], "txaio._common._BatchedTimer", "txaio")


@pytest.mark.parametrize("cls", [WebSocketServerProtocol, WebSocketClientProtocol])
def test_connection_lost_hook(cls):
    _require("_connectionLost" in vars(WebSocketProtocol), "WebSocketProtocol._connectionLost", "Autobahn")
    own = [k for k in cls.__mro__ if "_connectionLost" in vars(k) and k is not WebSocketProtocol]
    _require(bool(own), f"{cls.__name__}._connectionLost", "Autobahn")


def test_server_counts_connections():
    factory = _server_factory()
    factory.protocol = WebSocketServerProtocol
    proto = factory.buildProtocol(None)
    proto.makeConnection(StringTransport())
    _require(factory.countConnections == 1, "WebSocketServerFactory.countConnections", "Autobahn")
    _require(
        "countConnections -= 1" in inspect.getsource(WebSocketServerProtocol._connectionLost),
        "WebSocketServerProtocol._connectionLost's countConnections",
        "Autobahn",
    )


# -- Autobahn: handshakes ------------------------------------------------------------


def test_adapter_connection_made():
    """LegHooks.connectionMade does what the Twisted adapter's does, less its debug line."""
    from autobahn.twisted.websocket import WebSocketAdapterProtocol

    source = inspect.getsource(WebSocketAdapterProtocol.connectionMade)
    for part in ("create_transport_details(", "self.peer =", "setTcpNoDelay(", "self._connectionMade()"):
        _require(part in source, f"WebSocketAdapterProtocol.connectionMade ({part})", "Autobahn")

    class Leg(_compat.ServerLegHooks, _compat.LegHooks, WebSocketServerProtocol):
        pass

    factory = _server_factory()
    factory.protocol = Leg
    leg = factory.buildProtocol(None)
    leg.makeConnection(StringTransport())
    _require(
        leg.peer == "tcp4:192.168.1.1:54321" and leg._transport_details.peer == leg.peer,
        "WebSocketAdapterProtocol._transport_details",
        "Autobahn",
    )
    _require(factory.countConnections == 1 and leg.state == WebSocketProtocol.STATE_CONNECTING,
             "WebSocketServerProtocol._connectionMade", "Autobahn")


def test_adapter_connection_lost():
    """Beside debug lines, the adapter's connectionLost logs a TLS error and calls _connectionLost."""
    from autobahn.twisted.websocket import WebSocketAdapterProtocol

    source = inspect.getsource(WebSocketAdapterProtocol.connectionLost)
    logged = [line.strip() for line in source.splitlines() if "self.log." in line and "self.log.debug(" not in line]
    _require(
        logged == ["self.log.error(_maybe_tls_reason(reason.value))"] and "self._connectionLost(reason)" in source,
        "WebSocketAdapterProtocol.connectionLost",
        "Autobahn",
    )


def test_adapter_close_connection():
    """LegHooks._closeConnection stands for the adapter's: an abort aborts, an orderly drop loses the connection."""
    from autobahn.twisted.websocket import WebSocketAdapterProtocol

    source = inspect.getsource(WebSocketAdapterProtocol._closeConnection)
    for part in ("def _closeConnection(self, abort", "self.transport.abortConnection()", "self.transport.loseConnection()"):
        _require(part in source, f"WebSocketAdapterProtocol._closeConnection ({part})", "Autobahn")
    _require(
        "self._closeConnection(" in inspect.getsource(WebSocketProtocol.dropConnection),
        "WebSocketProtocol.dropConnection's _closeConnection",
        "Autobahn",
    )


def test_side_connection_made():
    """What the server and client versions of _connectionMade add to the shared part."""
    server = inspect.getsource(WebSocketServerProtocol._connectionMade)
    _require(
        "WebSocketProtocol._connectionMade(self)" in server and "countConnections += 1" in server,
        "WebSocketServerProtocol._connectionMade",
        "Autobahn",
    )
    client = inspect.getsource(WebSocketClientProtocol._connectionMade)
    _require(
        "WebSocketProtocol._connectionMade(self)" in client
        and "self.startProxyConnect()" in client
        and "self.startHandshake()" in client,
        "WebSocketClientProtocol._connectionMade",
        "Autobahn",
    )
    on_connect = inspect.getsource(WebSocketClientProtocol._onConnect)
    _require("return self.onConnect(response)" in on_connect, "WebSocketClientProtocol._onConnect", "Autobahn")




@pytest.mark.parametrize("side", ["server", "client", "client through a proxy"])
def test_connection_made_sets_what_autobahns_does_but_the_validator(side):
    """
    ``connection_made``: the state ``WebSocketProtocol._connectionMade`` sets,
    with its options on the class (``with_options``), less the UTF-8 validator,
    which the leg makes when first read.
    """
    from autobahn.websocket.protocol import TrafficStats
    from autobahn.websocket.utf8validator import Utf8Validator

    if side == "server":
        factory: WebSocketServerFactory | WebSocketClientFactory = _server_factory()
        base: type = WebSocketServerProtocol
    else:
        factory = WebSocketClientFactory("ws://localhost:9", proxy={"host": "proxy", "port": 8} if "proxy" in side else None)
        factory.setProtocolOptions(openHandshakeTimeout=0)
        base = WebSocketClientProtocol
    leg_class = _compat.with_options(type("Leg", (_compat.LegHooks, base), {}), factory)
    autobahns, ours = leg_class(), leg_class()
    for leg in (autobahns, ours):
        leg.factory = leg.transport = None  # type: ignore[assignment]
        leg.factory = factory
    WebSocketProtocol._connectionMade(autobahns)
    _compat.connection_made(ours)
    theirs = dict(vars(autobahns))
    _require(isinstance(theirs.pop("utf8validator", None), Utf8Validator), "WebSocketProtocol._connectionMade (utf8validator)", "Autobahn")
    mine = dict(vars(ours))
    for name in ("trafficStats", "send_queue"):  # fresh objects of the same kind and content
        _require(type(theirs.pop(name)) is type(mine.pop(name)), f"WebSocketProtocol._connectionMade ({name})", "Autobahn")
    _require(theirs == mine, "WebSocketProtocol._connectionMade", "Autobahn")
    assert isinstance(ours.trafficStats, TrafficStats) and isinstance(ours.utf8validator, Utf8Validator)
    assert ours.utf8validator is ours.utf8validator


def test_short_payloads_are_masked_as_autobahns_masker_masks_them():
    """
    ``mask_short_payloads``: Autobahn's protocol module makes its maskers by
    ``create_xor_masker(mask, length)`` (its module global), and a short
    payload's masker gives the bytes Autobahn's does, fed whole or in pieces.
    """
    import random

    from autobahn.websocket import protocol
    from autobahn.websocket.xormasker import create_xor_masker

    source = inspect.getsource(protocol)
    _require(
        protocol.create_xor_masker is create_xor_masker or protocol.create_xor_masker is _compat._masker,
        "autobahn.websocket.protocol.create_xor_masker",
        "Autobahn",
    )
    calls = [line.strip() for line in source.splitlines() if "create_xor_masker(" in line and "import" not in line]
    _require(len(calls) >= 3 and all("create_xor_masker(" in c for c in calls), "create_xor_masker's callers", "Autobahn")
    rng = random.Random(7)
    for length in (*range(0, 40), 125, 126, 1000, _compat.SHORT_MASKED):
        mask = rng.randbytes(4)
        payload = rng.randbytes(length)
        cuts = sorted(rng.sample(range(length + 1), min(3, length + 1)))
        pieces = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, length])]
        native, short = create_xor_masker(mask, length), _compat._masker(mask, length)
        assert isinstance(short, _compat._ShortMasker)
        assert [bytes(native.process(p)) for p in pieces] == [short.process(p) for p in pieces], length
        assert short.pointer() == native.pointer() == length
        short.reset()
        assert short.pointer() == 0
    assert not isinstance(_compat._masker(b"abcd", _compat.SHORT_MASKED + 1), _compat._ShortMasker)
    assert not isinstance(_compat._masker(b"abcd"), _compat._ShortMasker)


@pytest.mark.parametrize("cls", [WebSocketServerProtocol, WebSocketClientProtocol])
def test_config_attrs(cls):
    names = getattr(cls, "CONFIG_ATTRS", None)
    _require(isinstance(names, (tuple, list)) and "maxMessagePayloadSize" in names, f"{cls.__name__}.CONFIG_ATTRS", "Autobahn")
    _require(
        "CONFIG_ATTRS" in inspect.getsource(WebSocketProtocol._connectionMade),
        "WebSocketProtocol._connectionMade's copy of CONFIG_ATTRS",
        "Autobahn",
    )


def test_with_options_skips_the_copy():
    factory = _server_factory()
    factory.setProtocolOptions(maxMessagePayloadSize=123)
    factory.protocol = _compat.with_options(WebSocketServerProtocol, factory)
    proto = factory.buildProtocol(None)
    proto.makeConnection(StringTransport())
    _require(proto.maxMessagePayloadSize == 123 and "maxMessagePayloadSize" not in vars(proto), "CONFIG_ATTRS", "Autobahn")


def test_parse_extensions():
    proto = _open_server_leg()
    parsed = _compat.parse_extensions(proto, "permessage-deflate; client_max_window_bits=10, x-other")
    _require(
        [name for name, _ in parsed] == ["permessage-deflate", "x-other"]
        and parsed[0][1].get("client_max_window_bits") == ["10"],
        "WebSocketProtocol._parseExtensionsHeader",
        "Autobahn",
    )


@pytest.mark.parametrize("name", _compat.CLIENT_HANDSHAKE_ATTRS)
def test_client_handshake_state(name):
    _require(
        f"self.{name}" in inspect.getsource(WebSocketClientProtocol.processHandshake)
        or _sets(WebSocketClientProtocol, name),
        f"WebSocketClientProtocol.{name}",
        "Autobahn",
    )


def test_client_factory_keeps_its_url_parts():
    factory = WebSocketClientFactory("ws://127.0.0.1:9/x")
    _require((factory.host, factory.port, factory.resource) == ("127.0.0.1", 9, "/x"), "WebSocketClientFactory url parts", "Autobahn")


# -- Twisted's HTTP internals the HTTP forwarder subclasses (http_proxy.py, site.py) --


@pytest.mark.parametrize(
    "module, cls, name",
    [
        ("twisted.web.http", "HTTPChannel", "_respondToBadRequestAndDisconnect"),
        ("twisted.web.http", "HTTPChannel", "_command"),
        ("twisted.web.http", "HTTPChannel", "_path"),
        ("twisted.web.http", "HTTPChannel", "_version"),
        ("twisted.web.http", "HTTPChannel", "_receivedHeaderSize"),
        ("twisted.web.http", "Request", "_disconnected"),
    ],
)
def test_twisted_http_internals(module, cls, name):
    klass = getattr(__import__(module, fromlist=[cls]), cls, None)
    _require(
        klass is not None and (hasattr(klass, name) or _sets(klass, name)),
        f"{module}.{cls}.{name}",
        "Twisted",
    )


def test_gateway_requests_are_made_and_processed_as_twisted_webs_are_but_for_the_date():
    """
    ``GatewayRequest.__init__`` and ``process`` (http_proxy.py) do what
    ``server.Request``'s do (the ``Date`` header apart, formatted once a
    second): relies on ``__init__`` calling only ``http.Request.__init__`` and
    ``Componentized.__init__``, and on ``process`` calling ``_handleStar`` for
    ``*``, setting ``_encoder`` from an ``_IEncodingResource``, rendering what
    ``getResourceFor`` found and failing through ``processingFailed``.
    """
    import ast
    import textwrap

    from twisted.web import resource, server

    init = inspect.getsource(server.Request.__init__)
    _require(init.count(".__init__(") == 2 and "_HTTPRequest.__init__(" in init and "Componentized.__init__(self)" in init,
             "twisted.web.server.Request.__init__", "Twisted")
    process = inspect.getsource(server.Request.process)
    for piece in ("self.site = self.channel.site", 'self.setHeader(b"Server", version)', 'self.setHeader(b"Date", datetimeToString())',
                  "self.prepath = []", "self._handleStar()", "self.site.getResourceFor(self)",
                  "resource._IEncodingResource.providedBy", "self._encoder = encoder", "self.render(resrc)",
                  "self.processingFailed("):
        _require(piece in process, f"twisted.web.server.Request.process ({piece})", "Twisted")
    _require(hasattr(server.Request, "_handleStar") and hasattr(resource, "_IEncodingResource"),
             "twisted.web.server.Request._handleStar, twisted.web.resource._IEncodingResource", "Twisted")
    statements = sum(isinstance(node, ast.stmt) for node in ast.walk(ast.parse(textwrap.dedent(process))))
    _require(statements == 18, "twisted.web.server.Request.process (a statement our copy lacks)", "Twisted")


def test_gateway_requests_are_received_as_twisted_webs_are_but_for_the_arguments():
    """
    ``GatewayRequest._request_received`` (http_proxy.py) does what
    ``http.Request.requestReceived`` does for a request whose form body is not
    parsed, ``args`` apart (parsed from the query when first read): relies on
    the rest being the content rewound, the method, URI, version and path set,
    the query parsed with ``parse_qs(argstring, 1)``, a form parse only under
    ``_parsePOSTFormSubmission``, and ``process()``.
    """
    import ast
    import textwrap

    from twisted.web.http import Request as HTTPRequest

    source = inspect.getsource(HTTPRequest.requestReceived)
    for piece in ("self.content.seek(0, 0)", "self.args = {}", "self.method, self.uri = command, path",
                  "self.clientproto = version", 'x = self.uri.split(b"?", 1)', "self.path = self.uri",
                  "self.path, argstring = x", "self.args = parse_qs(argstring, 1)",
                  "and self._parsePOSTFormSubmission", "self.process()"):
        _require(piece in source, f"twisted.web.http.Request.requestReceived ({piece})", "Twisted")
    statements = sum(isinstance(node, ast.stmt) for node in ast.walk(ast.parse(textwrap.dedent(source))))
    _require(statements == 30, "twisted.web.http.Request.requestReceived (a statement the copy lacks)", "Twisted")


def test_a_head_without_cookie_or_expect_is_received_as_twisted_webs_channel_receives_it():
    """
    ``LlhttpChannel.allHeadersReceived`` (llhttp_channel.py) runs
    ``HTTPChannel.allHeadersReceived`` for a head with a ``Cookie`` or an
    ``Expect`` and, for any other, only its persistence and length steps:
    relies on the rest being the cookie parse and the ``100 Continue``.
    """
    import ast
    import textwrap

    from twisted.web.http import HTTPChannel

    source = inspect.getsource(HTTPChannel.allHeadersReceived)
    for piece in ("req = self.requests[-1]", "req.parseCookies()", "self.persistent = self.checkPersistence(req, self._version)",
                  "req.gotLength(self.length)", 'req.requestHeaders.getRawHeaders(b"Expect")', "self._send100Continue()"):
        _require(piece in source, f"twisted.web.http.HTTPChannel.allHeadersReceived ({piece})", "Twisted")
    statements = sum(isinstance(node, ast.stmt) for node in ast.walk(ast.parse(textwrap.dedent(source))))
    _require(statements == 8, "twisted.web.http.HTTPChannel.allHeadersReceived (a statement the copy lacks)", "Twisted")


@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_keep_listening_socket_leaves_the_socket_listening_for_another_holder(tmp_path, kind):
    """
    A port closed after ``keep_listening_socket`` leaves its socket listening
    for whoever holds a duplicate (no shutdown), and a unix socket's file in
    place: relies on ``tcp.Port._shouldShutdown`` and ``unix.Port._bindPath`` (``port`` before Twisted 26.10).
    """
    import os
    import socket

    from twisted.internet import unix
    from twisted.internet.protocol import Factory
    from twisted.internet.testing import MemoryReactor

    reactor = MemoryReactor()
    path = str(tmp_path / "gateway.sock")
    port = tcp.Port(0, Factory(), interface="127.0.0.1", reactor=reactor) if kind == "tcp" else unix.Port(path, Factory(), reactor=reactor)
    port.startListening()
    other = socket.socket(fileno=os.dup(port.fileno()))
    _compat.keep_listening_socket(port)
    port.connectionLost(None)
    client = socket.socket(other.family, socket.SOCK_STREAM)
    client.connect(other.getsockname() if kind == "tcp" else path)
    accepted, _ = other.accept()
    for sock in (accepted, client, other):
        sock.close()


def test_forget_transport_cuts_the_connector_and_its_transport_apart():
    """
    A TCP connector and its transport hold each other (``Connector.transport``,
    ``Client.connector``) after the connection ends: relies on
    ``BaseConnector.transport``, dropped by Twisted itself when a connect fails
    and not read once the connection is lost.
    """
    from twisted.internet.base import BaseConnector

    connector = tcp.Connector("127.0.0.1", 9, ClientFactory(), 30, None, Clock())
    connector.connect()
    client = connector.transport
    try:
        _require(isinstance(client, tcp.Client) and client.connector is connector, "BaseConnector.transport", "Twisted")
        _require("self.transport = None" in inspect.getsource(BaseConnector.connectionFailed), "BaseConnector.connectionFailed", "Twisted")
        _require("transport" not in inspect.getsource(BaseConnector.connectionLost), "BaseConnector.connectionLost", "Twisted")
        _compat.forget_transport(connector)
        assert connector.transport is None
    finally:
        client.socket.close()


def test_systemd_listen_fds_are_what_twisteds_systemd_parser_read():
    """Relies on ``endpoints._SystemdParser._sddaemon`` (the sockets systemd handed over, read at import)."""
    from twisted.internet.endpoints import _SystemdParser
    from twisted.python.systemd import ListenFDs

    assert isinstance(_compat.systemd_listen_fds(), ListenFDs)
    assert _compat.systemd_listen_fds() is _SystemdParser._sddaemon


def test_log_observers_are_a_publishers_observers_in_order() -> None:
    from twisted.logger import LogPublisher

    first, second = [].append, [].append
    publisher = LogPublisher(first, second)
    _require(_compat.log_observers(publisher) == [first, second], "LogPublisher._observers", "Twisted")
    live = _compat.observer_list(publisher)
    publisher.removeObserver(first)
    _require(live == [second], "LogPublisher._observers", "Twisted")


@pytest.mark.parametrize("kind", ["text", "bytes"])
def test_a_file_observers_writer_writes_what_the_observer_writes(kind: str) -> None:
    import io

    from twisted.logger import FileLogObserver

    files = [io.StringIO() if kind == "text" else io.BytesIO() for _ in range(2)]
    flushed: list[int] = []
    for file in files:
        file.flush = lambda file=file: flushed.append(id(file))  # type: ignore[method-assign]
    FileLogObserver(files[0], lambda event: "é line\n")({})
    _compat.file_observer_writer(FileLogObserver(files[1], lambda event: None))("é line\n")
    _require(
        files[0].getvalue() == files[1].getvalue() and flushed == [id(files[0]), id(files[1])],
        "FileLogObserver._outFile and _encoding",
        "Twisted",
    )


def test_debug_rendering_is_through_the_protocol_modules_names():
    from autobahn.websocket import protocol

    for name in ("hltype", "hlval", "pformat"):
        _require(callable(getattr(protocol, name, None)), f"autobahn.websocket.protocol.{name}", "Autobahn")
    source = inspect.getsource(protocol.WebSocketServerProtocol.processHandshake)
    _require("hltype(self.processHandshake)" in source, "WebSocketServerProtocol.processHandshake's debug line", "Autobahn")
    _require(
        "pformat(configAttrLog)" in inspect.getsource(WebSocketProtocol._connectionMade),
        "WebSocketProtocol._connectionMade's debug line",
        "Autobahn",
    )


def test_debug_arguments_render_as_before_when_formatted():
    """A debug line that is written reads as Autobahn's own rendering."""
    from pprint import pformat

    from autobahn import util
    from autobahn.websocket import protocol

    _compat.render_debug_lazily()
    _compat.render_debug_lazily()  # idempotent: still one layer
    assert f"{protocol.hltype(_open_server_leg)}" == util.hltype(_open_server_leg)
    assert "{x}".format(x=protocol.hlval(42, color="blue")) == util.hlval(42, color="blue")
    assert str(protocol.hltype(WebSocketProtocol)) == util.hltype(WebSocketProtocol)
    for value in ([], [("a", 1, "F")], {"b": 2}):
        assert protocol.pformat(value) == pformat(value)


def test_handshake_request_rules():
    """What answer_upgrade takes from Autobahn's request parser and origin check."""
    from autobahn.websocket import protocol

    for name in ("_HTTP_START_LINE_INVALID", "_HTTP_FIELD_NAME", "_HTTP_FIELD_VALUE_INVALID", "_url_to_origin", "_is_same_origin"):
        _require(hasattr(protocol, name), f"autobahn.websocket.protocol.{name}", "Autobahn")
    _require(_compat.FIELD_NAME.fullmatch("Sec-WebSocket-Key") is not None, "_HTTP_FIELD_NAME", "Autobahn")
    _require(_compat.FIELD_VALUE_INVALID.search("a\nb") is not None, "_HTTP_FIELD_VALUE_INVALID", "Autobahn")
    leg = _open_server_leg()
    assert _compat.origin_allowed(leg, "https://app.example")
    assert not _compat.origin_allowed(leg, "https://")
    assert not _compat.origin_allowed(leg, "null")  # (the factory's allowNullOrigin is off)
    leg.factory.setProtocolOptions(allowNullOrigin=True)
    assert _compat.origin_allowed(leg, "null")


@pytest.mark.parametrize(("cls", "held"), [(tcp.Server, "client"), (tcp.Client, "realAddress")])
@pytest.mark.parametrize(("kind", "address"), [(IPv4Address, ("192.0.2.7", 5)), (IPv6Address, ("::1", 6, 0, 0))])
def test_peer_of_a_tcp_connection_is_autobahns_peer2str(cls, held, kind, address):
    from autobahn.twisted.util import peer2str

    transport = object.__new__(cls)
    setattr(transport, held, address)
    transport._addressType = kind
    _require(_compat.peer_of(transport) == peer2str(transport), f"{cls.__name__}.getPeer", "Twisted")
    assert _compat.peer_of(StringTransport()) == peer2str(StringTransport())


def test_transport_details_are_made_when_first_read():
    """The legs' TransportDetails are Autobahn's own, made when read; a plain TCP leg opens without them."""
    from autobahn.twisted.websocket import WebSocketAdapterProtocol

    source = inspect.getsource(WebSocketAdapterProtocol._onOpen)
    _require("self._transport_details.is_secure" in source and "self.onOpen()" in source,
             "WebSocketAdapterProtocol._onOpen", "Autobahn")

    class Leg(_compat.ServerLegHooks, _compat.LegHooks, WebSocketServerProtocol):
        opened = False

        def onOpen(self):
            self.opened = True

    factory = _server_factory()
    factory.protocol = Leg
    leg = factory.buildProtocol(None)
    leg.makeConnection(StringTransport())
    assert "_transport_details" not in vars(leg)
    leg._onOpen()
    assert leg.opened and "_transport_details" not in vars(leg)
    details = leg._transport_details
    assert (details.peer, details.is_server, details.is_secure) == (leg.peer, True, False)
    assert details.channel_framing == TransportDetails.CHANNEL_FRAMING_WEBSOCKET


def test_a_legs_init_sets_what_autobahns_does_but_the_futures_and_the_placeholder():
    """``LegHooks.__init__``: ``WebSocketProtocol.__init__`` less ``is_open``, ``is_closed``, ``_transport_details``."""
    from autobahn.websocket.protocol import WebSocketProtocol

    class Leg(_compat.ServerLegHooks, _compat.LegHooks, WebSocketServerProtocol):
        pass

    autobahns = WebSocketServerProtocol()
    WebSocketProtocol.__init__(autobahns)
    ours = Leg()
    skipped = {"is_open", "is_closed", "_transport_details"}
    _require(set(vars(autobahns)) - skipped == set(vars(ours)) and vars(ours) == {
        k: v for k, v in vars(autobahns).items() if k not in skipped
    }, "WebSocketProtocol.__init__", "Autobahn")
    import re

    import autobahn.twisted.websocket
    import autobahn.websocket.protocol

    # besides __init__'s, every use of the futures on a protocol is a resolve
    uses = [
        line.strip()
        for module in (autobahn.websocket.protocol, autobahn.twisted.websocket)
        for line in inspect.getsource(module).splitlines()
        if re.search(r"self\.is_(open|closed)\b", line)
    ]
    _require(uses and all(use.startswith(("txaio.resolve(self.is_", "self.is_closed = txaio.create_future()",
                                          "self.is_open = txaio.create_future()")) for use in uses),
             "WebSocketProtocol's use of is_open and is_closed", "Autobahn")
    ours.is_open.callback(None)  # what txaio.resolve does: nothing, nothing waits
    assert ours.is_closed is _compat.UNWATCHED


def test_a_tcp_clients_connect_is_what_client_connecting_now_starts_sooner() -> None:
    """_compat._ClientConnectingNow: Twisted's client connects a literal a turn later, through doConnect."""
    finish = inspect.getsource(tcp.BaseClient._finishInit)
    _require(
        "self._commonConnection.__init__(self, skt, None, reactor)" in finish
        and "reactor.callLater(0, whenDone)" in finish,
        "BaseClient._finishInit", "Twisted",
    )
    client = inspect.getsource(tcp.Client.__init__)
    _require(
        "whenDone = self.resolveAddress" in client and "self._finishInit(whenDone, skt, err, reactor)" in client,
        "Client.__init__", "Twisted",
    )
    resolve = inspect.getsource(tcp.Client.resolveAddress)
    _require(
        "if self._requiresResolution:" in resolve and "defer.succeed(self.addr)" in resolve
        and "d.addCallback(self._setRealAddress)" in resolve,
        "Client.resolveAddress", "Twisted",
    )
    real = inspect.getsource(tcp.Client._setRealAddress)
    _require("self.realAddress = address" in real and "self.doConnect()" in real, "Client._setRealAddress", "Twisted")
    connect = inspect.getsource(tcp.Client.doConnect)
    _require(
        "self.doWrite = self.doConnect" in connect and "self.doRead = self.doConnect" in connect
        and "self.socket.connect_ex(self.realAddress)" in connect
        and "EINPROGRESS" in connect and "self.startReading()" in connect and "self.startWriting()" in connect,
        "Client.doConnect", "Twisted",
    )
    _require(
        "return Client(self.host, self.port, self.bindAddress, self, self.reactor)"
        in inspect.getsource(tcp.Connector._makeTransport),
        "Connector._makeTransport", "Twisted",
    )
    _require(
        "tcp.Connector(host, port, factory, timeout, bindAddress, self)" in inspect.getsource(PosixReactorBase.connectTCP),
        "PosixReactorBase.connectTCP", "Twisted",
    )
