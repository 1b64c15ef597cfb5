"""
What the relay asks of the kernel's TCP sockets, on every leg.

A phone that vanishes without a FIN leaves an idle connection that nothing
ever ends when WebSocket pings are off: TCP keepalive (``[gateway]
tcp_keepalive``) finds it. A peer that stops reading is seen in the kernel's
counters (bytes acknowledged, bytes waiting). A leg the relay stops reading
gets a fixed receive buffer, so that the kernel does not autotune it to
megabytes and the upstream's own sends block (backpressure reaches it).
Every function takes a transport (plain TCP, or TLS over TCP) and does
nothing for anything else (in-memory test transports).
"""

from __future__ import annotations

import _socket
import socket
import struct
from dataclasses import dataclass

from twisted.python.runtime import platform

from twisted_gateway._compat import accepted_preset, listener_presets

from twisted_gateway.schema import TCPKeepalive as TCPKeepalive


#: a socket's type as the kernel's number (``socket.type`` makes a ``SocketKind`` of it each time)
_kind = _socket.socket.__dict__["type"].__get__
_LINUX = platform.isLinux()


def _tcp_owner(transport: object) -> tuple[object, socket.socket] | None:
    """The transport that owns the TCP socket under ``transport`` (through TLS), and that socket."""
    for _ in range(4):
        if transport is None:
            return None
        sock = getattr(transport, "socket", None)
        if isinstance(sock, socket.socket) and _kind(sock) == socket.SOCK_STREAM:
            return transport, sock
        transport = getattr(transport, "transport", None)
    return None


def tcp_transport(transport: object) -> object | None:
    """The transport that owns the TCP socket under ``transport`` (through TLS), or None."""
    owner = _tcp_owner(transport)
    return owner[0] if owner is not None else None


def tcp_socket(transport: object) -> socket.socket | None:
    """The TCP socket under ``transport`` (through TLS), or None."""
    owner = _tcp_owner(transport)
    return owner[1] if owner is not None else None


def set_keepalive(transport: object, keepalive: TCPKeepalive | None) -> None:
    """
    Turn on TCP keepalive with these timers. ``TCP_USER_TIMEOUT`` gets the
    same bound, so that data left unacknowledged by a vanished peer is given
    up after as long (not the kernel's 15 minutes of retransmissions).
    A connection accepted by a listener that has them already
    (:func:`preset_listener`) is left alone.
    """
    owner = _tcp_owner(transport)
    if keepalive is None or owner is None or accepted_preset(owner[0]) == keepalive:
        return
    try:
        _keepalive_on(owner[1], keepalive)
    except OSError:
        pass  # the connection is already gone: its loss is reported as usual


def _keepalive_on(sock: socket.socket, keepalive: TCPKeepalive) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if _LINUX:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, keepalive.idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, keepalive.interval)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, keepalive.count)
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_USER_TIMEOUT, keepalive.bound * 1000)


def preset_listener(port: object, keepalive: TCPKeepalive | None) -> None:
    """
    Set TCP_NODELAY and ``keepalive`` (:func:`set_keepalive`) on a listening
    TCP port's socket once, on Linux, where every socket it accepts inherits
    them (a copy of the listener's): its connections then need no
    ``setsockopt`` of their own (six a WebSocket's client leg made).
    Anything else (a ``unix:`` listener, another system) is left as it is,
    and its connections set their own.
    """
    sock = getattr(port, "socket", None)
    if (
        not _LINUX
        or not isinstance(sock, socket.socket)
        or sock.family not in (socket.AF_INET, socket.AF_INET6)
        or _kind(sock) != socket.SOCK_STREAM
    ):
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if keepalive is not None:
            _keepalive_on(sock, keepalive)
    except OSError:
        return
    listener_presets[port] = keepalive


def cap_receive_buffer(transport: object, size: int) -> None:
    """
    Fix the socket's receive buffer at ``size`` (the kernel doubles it for
    its bookkeeping) and stop the kernel from growing it: called when the
    relay stops reading a leg, so the sender's window closes.
    """
    sock = tcp_socket(transport)
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    except OSError:
        pass


@dataclass(frozen=True)
class SendState:
    """What the kernel says of a connection's sending side."""

    #: bytes the peer acknowledged, ever (it only grows)
    acked: int
    #: bytes written but not yet acknowledged by the peer
    waiting: int
    #: the kernel's own timers ended it: keepalive probes or retransmissions unanswered
    timed_out: bool


_TCP_INFO = getattr(socket, "TCP_INFO", 11)
_TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", 18)
_TCP_CLOSE = 7
#: struct tcp_info up to tcpi_notsent_bytes (Linux >= 4.6)
_INFO_SIZE = 148


def _tcp_info(transport: object) -> bytes | None:
    """The kernel's ``struct tcp_info`` of a TCP transport (Linux >= 4.6), or None."""
    sock = tcp_socket(transport)
    if sock is None or not _LINUX:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _INFO_SIZE)
    except OSError:
        return None
    return info if len(info) >= _INFO_SIZE else None


def _ended_unanswered(info: bytes) -> bool:
    """tcpi_state closed, with tcpi_retransmits or tcpi_probes counted."""
    return info[0] == _TCP_CLOSE and (info[3] > 0 or info[2] > 0)


def send_state(transport: object) -> SendState | None:
    """The kernel's view of a TCP transport's sending side (Linux), or None."""
    info = _tcp_info(transport)
    if info is None:
        return None
    unacked = struct.unpack_from("I", info, 24)[0]
    snd_mss = struct.unpack_from("I", info, 16)[0]
    acked = struct.unpack_from("Q", info, 120)[0]
    notsent = struct.unpack_from("I", info, 144)[0]
    return SendState(acked=acked, waiting=notsent + unacked * snd_mss, timed_out=_ended_unanswered(info))


def timed_out(transport: object) -> bool:
    """Whether the kernel ended this connection because the peer stopped answering."""
    info = _tcp_info(transport)
    return info is not None and _ended_unanswered(info)
