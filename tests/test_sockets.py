"""The socket options every leg gets, on real loopback sockets (no reactor)."""

from __future__ import annotations

import socket

import pytest

from tests.support import settle_blocking
from twisted_gateway.sockets import (
    TCPKeepalive,
    cap_receive_buffer,
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
