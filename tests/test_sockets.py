"""The socket options every leg gets, on real loopback sockets (no reactor but for a listener's)."""

from __future__ import annotations

import functools
import socket

import pytest
import pytest_twisted
from twisted.internet.protocol import Factory, Protocol

from tests.support import settle, settle_blocking
from twisted_gateway import _compat
from twisted_gateway.sockets import (
    TCPKeepalive,
    cap_receive_buffer,
    preset_listener,
    send_state,
    set_keepalive,
    tcp_socket,
)


class _Transport:
    """The shape of a Twisted TCP transport: the socket is its ``socket``."""

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock


class _TLS:
    """The shape of TLS over TCP: the TCP transport is its ``transport``."""

    def __init__(self, transport: _Transport) -> None:
        self.transport = transport


@pytest.fixture
def connection():
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
    with client, accepted:
        yield client, accepted


def test_keepalive_sets_the_kernels_timers_and_the_same_user_timeout(connection):
    sock, _ = connection
    set_keepalive(_TLS(_Transport(sock)), TCPKeepalive(60, 10, 6))
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 60
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 10
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 6
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 120_000


def test_keepalive_off_leaves_the_socket_alone(connection):
    sock, _ = connection
    set_keepalive(_Transport(sock), None)
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0


def test_transports_without_a_socket_are_left_alone():
    assert tcp_socket(object()) is None
    set_keepalive(object(), TCPKeepalive(1, 1, 1))
    cap_receive_buffer(object(), 1024)
    assert send_state(object()) is None


def test_a_capped_receive_buffer_stays_at_its_size(connection):
    _, sock = connection
    cap_receive_buffer(_Transport(sock), 256 * 1024)
    # the kernel doubles the value for its own bookkeeping
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 512 * 1024


def test_send_state_counts_what_the_peer_acknowledged(connection):
    sock, peer = connection
    before = send_state(_Transport(sock))
    sock.sendall(b"x" * 1000)
    assert peer.recv(1000, socket.MSG_WAITALL) == b"x" * 1000
    # the acknowledgement may trail the bytes read
    settle_blocking(lambda: send_state(_Transport(sock)).acked - before.acked == 1000, "the peer's acknowledgement")
    after = send_state(_Transport(sock))
    assert after.waiting == 0 and not after.timed_out


_OPTIONS = {
    "TCP_NODELAY": (socket.IPPROTO_TCP, socket.TCP_NODELAY),
    "SO_KEEPALIVE": (socket.SOL_SOCKET, socket.SO_KEEPALIVE),
    "TCP_KEEPIDLE": (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
    "TCP_KEEPINTVL": (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
    "TCP_KEEPCNT": (socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
    "TCP_USER_TIMEOUT": (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
}


def _options(sock: socket.socket) -> dict[str, int]:
    return {name: sock.getsockopt(level, option) for name, (level, option) in _OPTIONS.items()}


@pytest_twisted.ensureDeferred
async def test_a_preset_listeners_connections_inherit_its_options_and_set_none_of_their_own():
    """
    A listener given TCP_NODELAY and keepalive once (``preset_listener``, as
    the gateway's listeners are): every socket it accepts has them (Linux
    copies the listener's), and ``set_keepalive`` and a leg's TCP_NODELAY
    leave such a connection alone; other settings are still set.
    """
    from twisted.internet import reactor

    from twisted_gateway.service import ListeningService

    keepalive = TCPKeepalive(61, 11, 7)
    accepted: list = []

    class Accepted(Protocol):
        def connectionMade(self) -> None:
            accepted.append(self.transport)

    listener = ListeningService(
        reactor, "tcp:0:interface=127.0.0.1", Factory.forProtocol(Accepted), "test",
        prepare=functools.partial(preset_listener, keepalive=keepalive),
    )
    listener.startService()
    port = await listener.when_listening()
    client = socket.create_connection(("127.0.0.1", port.getHost().port))
    try:
        (transport,) = await settle(lambda: accepted, "the connection accepted")
        expected = {"TCP_NODELAY": 1, "SO_KEEPALIVE": 1, "TCP_KEEPIDLE": 61, "TCP_KEEPINTVL": 11,
                    "TCP_KEEPCNT": 7, "TCP_USER_TIMEOUT": 138_000}
        assert _options(transport.socket) == expected
        assert _compat.accepted_preset(transport) == keepalive  # set_keepalive's and connectionMade's test
        set_keepalive(transport, TCPKeepalive(62, 12, 8))  # another setting: set
        assert _options(transport.socket)["TCP_KEEPIDLE"] == 62
    finally:
        client.close()
        for transport in accepted:
            transport.loseConnection()
        await listener.stopService()


def test_a_unix_listener_is_left_as_it_is(tmp_path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(tmp_path / "s"))
        sock.listen()
        port = _Transport(sock)
        preset_listener(port, TCPKeepalive(60, 10, 6))
        assert port not in _compat.listener_presets
