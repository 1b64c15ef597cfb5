"""
Whose fault it was, on real sockets: a client that gives up (during an HTTP
request, or at any stage of a WebSocket handshake) and an upstream that
answers an upgrade with an ordinary page leave every upstream in service and
log no traceback; a request that meets a pooled keep-alive connection the
upstream closed is sent again on a fresh one.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import struct
from contextlib import contextmanager
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.logger import LogLevel, capturedLogs
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from twisted_gateway.http_proxy import KEEPALIVE_CLOSED_DETAIL

from tests.support import UPGRADE, Upstream, listen, settle, start_gateway, ws_connect

# -- peers -------------------------------------------------------------------------


class RawClient(Protocol):
    """A socket-level client: bytes out, everything received kept."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason) -> None:
        self.closed.callback(bytes(self.data))


async def raw_connect(port: int) -> RawClient:
    return await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), RawClient())


async def raw_exchange(port: int, data: bytes) -> tuple[int, bytes]:
    """Send ``data`` (a request with ``Connection: close``); the status and body received."""
    client = await raw_connect(port)
    client.transport.write(data)
    raw = await client.closed
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def reset(client: Protocol) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a client on a bad network does."""
    client.transport.getHandle().setsockopt(
        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
    )
    client.transport.abortConnection()


def upgrade(path: str) -> bytes:
    return UPGRADE.format(path=path).encode()


class Pages(Resource):
    """A twisted.web upstream: ``/slow`` answers when released, ``/big`` streams, else a page."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.arrived: list = []
        self.lost: list = []
        self.pending: list = []

    def render(self, request):
        self.arrived.append(request)
        request.notifyFinish().addErrback(self.lost.append)
        if request.path == b"/v1/chat/slow":
            self.pending.append(request)
            return NOT_DONE_YET
        if request.path == b"/v1/chat/big":
            request.setHeader(b"content-length", b"%d" % (64 * 1024 * 1024))
            request.write(b"x" * 65536)
            self.pending.append(request)
            return NOT_DONE_YET
        if request.path == b"/v1/chat/truncate":
            request.setHeader(b"content-length", b"100")
            request.write(b"0123456789")
            request.loseConnection()
            return NOT_DONE_YET
        request.setHeader(b"content-type", b"text/html")
        return b"<html>an ordinary page</html>"


class Silent(Protocol):
    """An upstream that accepts the connection, reads, and never answers."""

    def dataReceived(self, data: bytes) -> None:
        self.factory.received.append(data)

    def connectionLost(self, reason) -> None:
        self.factory.lost.append(reason)


class SilentFactory(Factory):
    protocol = Silent

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.lost: list = []


class Unaccepting:
    """
    A listening socket whose accept queue is full: the kernel drops further
    SYNs, so a connect to it stays in progress (until the connect timeout).
    """

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(0)
        self.port = self.listener.getsockname()[1]
        self.fillers = []
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", self.port))
            self.fillers.append(filler)

    def close(self) -> None:
        for s in [*self.fillers, self.listener]:
            s.close()


def config(*ports: int, extra: str = "") -> str:
    """One route over the given instances; one failure would eject an instance."""
    return f"""
[gateway]
ws_open_timeout = 10
connect_timeout = 10
request_timeout = 10
[route:chat]
prefix = /v1/chat
upstream = {" ".join(f"http://127.0.0.1:{p}" for p in ports)}
max_fails = 1
fail_timeout = 60
{extra}
"""


def problems(events: list[dict]) -> list[dict]:
    """Logged tracebacks, errors and criticals, and any upstream taken out."""
    return [
        e
        for e in events
        if e.get("log_failure") is not None
        or e.get("log_level") in (LogLevel.error, LogLevel.critical)
        or e.get("upstream_state") == "down"
    ]


async def all_in_service(gw) -> None:
    """Every instance up (as /readyz and the metrics see it), and /readyz 200."""
    assert [i.state for i in gw.gateway.pools["chat"].instances] == ["up"] * len(
        gw.gateway.pools["chat"].instances
    )
    assert not any(gw.gateway.pools["chat"].failure_counts.values())
    status, body = await raw_exchange(gw.number, b"GET /readyz HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
    assert status == 200, body


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n".encode()


async def close_gateway(gw, *ports) -> None:
    await gw.gateway.stopService()
    await gw.close()
    for port in ports:
        await port.stopListening()


# -- HTTP: the client leaves ------------------------------------------------------------


@pytest.mark.parametrize("stage", ["before_head", "during_body"])
@pytest_twisted.ensureDeferred
async def test_a_client_leaving_an_http_request_leaves_the_upstream_in_service(stage):
    """
    A client that closes its socket while the upstream has not answered yet,
    or while the body streams, is logged as 499 and nothing else: both
    instances stay in service, the next GET is 200 and /readyz is 200.
    """
    pages = [Pages(), Pages()]
    ports = [await listen(Site(p)) for p in pages]
    gw = await start_gateway(config(*(p.getHost().port for p in ports)))
    path = "/v1/chat/slow" if stage == "before_head" else "/v1/chat/big"
    with capturedLogs() as events:
        for _ in range(2):  # once on each instance (round robin)
            client = await raw_connect(gw.number)
            client.transport.write(get(path))
            await settle(lambda: any(p.pending for p in pages), "the request upstream")
            if stage == "during_body":
                await settle(lambda: len(client.data) > 1024, "the body streaming")
            client.transport.abortConnection()
            await client.closed
            await settle(lambda: any(p.lost for p in pages), "the upstream request cancelled")
            for p in pages:
                p.pending.clear()
                p.lost.clear()
        for _ in range(2):
            status, body = await raw_exchange(gw.number, get("/v1/chat/page"))
            assert status == 200 and b"ordinary page" in body
        await all_in_service(gw)
    assert problems(events) == []
    outcomes = [e.get("outcome") for e in events if e.get("log_namespace") == "twisted_gateway.access"]
    assert outcomes[:2] == ["client_gone", "client_gone"]
    await close_gateway(gw, *ports)


@pytest_twisted.ensureDeferred
async def test_a_body_the_upstream_cuts_short_is_logged_but_not_counted_against_it():
    """
    The upstream sends its head and part of the body, then closes: the client
    sees a cut connection, the access event says so, and the instance (which
    answered) stays in service.
    """
    pages = [Pages(), Pages()]
    ports = [await listen(Site(p)) for p in pages]
    gw = await start_gateway(config(*(p.getHost().port for p in ports)))
    with capturedLogs() as events:
        for _ in range(2):
            client = await raw_connect(gw.number)
            client.transport.write(get("/v1/chat/truncate"))
            raw = await client.closed
            head, _, body = raw.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200") and body == b"0123456789"
        await all_in_service(gw)
    assert problems(events) == []
    outcomes = [e.get("outcome") for e in events if e.get("log_namespace") == "twisted_gateway.access"]
    assert outcomes.count("upstream_body_failed") == 2
    await close_gateway(gw, *ports)


@pytest_twisted.ensureDeferred
async def test_an_upstream_without_a_response_head_in_time_is_counted_and_taken_out():
    """The counterpart of the client leaving: no head within request_timeout is a 504 and counts."""
    pages = [Pages(), Pages()]
    ports = [await listen(Site(p)) for p in pages]
    gw = await start_gateway(
        config(*(p.getHost().port for p in ports)).replace("request_timeout = 10", "request_timeout = 0.5")
    )
    status, body = await raw_exchange(gw.number, get("/v1/chat/slow"))
    assert status == 504, body
    slow, other = gw.gateway.pools["chat"].instances
    assert (slow.state, other.state) == ("down", "up")
    assert dict(gw.gateway.pools["chat"].failure_counts) == {(slow.url, "no_head_timeout"): 1}
    await settle(lambda: pages[0].lost, "the upstream request dropped")
    await close_gateway(gw, *ports)


# -- WebSocket handshakes: the client leaves at every stage -------------------------------


@pytest_twisted.ensureDeferred
async def test_a_client_leaving_while_the_upstream_connect_is_in_progress_is_no_upstream_failure():
    """
    The client resets while the gateway's connect to the upstream is still in
    progress: the connect is cancelled (Twisted's ConnectingCancelledError),
    no traceback is logged, and the instance stays in service.
    """
    stuck = Unaccepting()
    echo = Upstream()
    echo_port = await listen(echo)
    gw = await start_gateway(config(stuck.port, echo_port.getHost().port))
    try:
        with capturedLogs() as events:
            client = await raw_connect(gw.number)
            client.transport.write(upgrade("/v1/chat/ws"))
            await settle(lambda: gw.registry.handshakes, "the handshake under way")
            reset(client)
            await client.closed
            await settle(lambda: not gw.registry.handshakes, "the handshake given up")
            await all_in_service(gw)
        assert problems(events) == []
    finally:
        stuck.close()
    await close_gateway(gw, echo_port)


@pytest.mark.parametrize("delay", [0.0, 0.001, 0.002])
@pytest_twisted.ensureDeferred
async def test_a_client_resetting_early_in_a_handshake_is_no_upstream_failure(delay):
    """A client that resets 0-2 ms into an upgrade leaves both instances in service."""
    upstreams = [Upstream(), Upstream()]
    ports = [await listen(u) for u in upstreams]
    gw = await start_gateway(config(*(p.getHost().port for p in ports)))
    with capturedLogs() as events:
        for _ in range(4):
            client = await raw_connect(gw.number)
            client.transport.write(upgrade("/v1/chat/ws"))
            if delay:
                await deferLater(reactor, delay, lambda: None)
            reset(client)
            await client.closed
        await settle(lambda: not gw.registry.handshakes and not gw.registry.total_active(), "all gone")
        await all_in_service(gw)
        opened = [await ws_connect(gw.url("/v1/chat/ws")) for _ in range(2)]
        for ws in opened:
            ws.sendMessage(b"hello")
            assert await ws.next_message() == (b"hello", False)
            ws.sendClose(1000)
            await ws.closed
    assert problems(events) == []
    await settle(lambda: not gw.registry.total_active(), "the pairs closed")
    await close_gateway(gw, *ports)


@pytest_twisted.ensureDeferred
async def test_a_client_leaving_during_the_upstream_handshake_is_no_upstream_failure():
    """
    The upstream has the upgrade request and has not answered when the
    client leaves: the upstream connection is closed, nothing is counted
    against the instance and nothing is logged as an error.
    """
    silent = SilentFactory()
    silent_port = await listen(silent)
    echo_port = await listen(Upstream())
    gw = await start_gateway(config(silent_port.getHost().port, echo_port.getHost().port))
    with capturedLogs() as events:
        client = await raw_connect(gw.number)
        client.transport.write(upgrade("/v1/chat/ws"))
        await settle(lambda: b"\r\n\r\n" in b"".join(silent.received), "the upgrade upstream")
        client.transport.abortConnection()
        await client.closed
        await settle(lambda: silent.lost, "the upstream connection closed")
        await settle(lambda: not gw.registry.handshakes, "the handshake given up")
        await all_in_service(gw)
    assert problems(events) == []
    await close_gateway(gw, silent_port, echo_port)


@pytest_twisted.ensureDeferred
async def test_an_upstream_that_never_answers_a_handshake_in_time_is_counted_and_taken_out():
    """
    The counterpart of the client leaving: when the upstream holds the
    upgrade unanswered past ``ws_open_timeout``, the client gets 504 and the
    instance is taken out (``no head timeout``); the other one serves.
    """
    silent = SilentFactory()
    silent_port = await listen(silent)
    echo_port = await listen(Upstream())
    gw = await start_gateway(
        config(silent_port.getHost().port, echo_port.getHost().port).replace(
            "ws_open_timeout = 10", "ws_open_timeout = 0.5"
        )
    )
    with capturedLogs() as events:
        status, body = await raw_exchange(gw.number, upgrade("/v1/chat/ws"))
    assert status == 504, body
    silent_instance, echo_instance = gw.gateway.pools["chat"].instances
    assert (silent_instance.state, echo_instance.state) == ("down", "up")
    assert dict(gw.gateway.pools["chat"].failure_counts) == {
        (silent_instance.url, "no_head_timeout"): 1
    }
    [down] = [e for e in events if e.get("upstream_state") == "down"]
    assert "(no head timeout x1)" in down["reason"]
    ws = await ws_connect(gw.url("/v1/chat/ws"))
    ws.sendClose(1000)
    await ws.closed
    await settle(lambda: silent.lost, "the silent upstream's connection closed")
    await settle(lambda: not gw.registry.total_active(), "the pair closed")
    await close_gateway(gw, silent_port, echo_port)


@pytest_twisted.ensureDeferred
async def test_an_upgrade_answered_with_an_ordinary_page_is_a_502_and_no_upstream_failure():
    """
    An upgrade request to a path the upstream answers with a plain 200 page
    gets 502, but the upstream answered: it stays in service (even as the
    route's only instance's neighbour), the next GET is 200, /readyz is 200.
    """
    pages = [Pages(), Pages()]
    ports = [await listen(Site(p)) for p in pages]
    gw = await start_gateway(config(*(p.getHost().port for p in ports)))
    with capturedLogs() as events:
        for _ in range(3):
            status, body = await raw_exchange(gw.number, upgrade("/v1/chat/page"))
            assert status == 502, body
            assert json.loads(body)["error"] == "bad_gateway"
        status, body = await raw_exchange(gw.number, get("/v1/chat/page"))
        assert status == 200 and b"ordinary page" in body
        await all_in_service(gw)
    assert problems(events) == []
    await close_gateway(gw, *ports)


# -- pooled connections the upstream closed ---------------------------------------------


class KeepAliveServer(Protocol):
    """
    An HTTP/1.1 upstream on raw sockets that keeps connections alive and
    answers each request with its method, body length and connection number.
    ``idle`` closes a connection idle that long; ``one_request`` closes it
    when a second request arrives, unanswered (a keep-alive timeout that
    races the request, every time).
    """

    def __init__(self, factory: KeepAliveUpstream) -> None:
        self.upstream = factory
        self.buffer = b""
        self.answered = 0
        self.timer: Any = None

    def connectionMade(self) -> None:
        self.upstream.connections += 1
        self.number = self.upstream.connections
        self._arm()

    def _arm(self) -> None:
        if self.upstream.idle is not None:
            self.timer = reactor.callLater(self.upstream.idle, self.transport.loseConnection)

    def dataReceived(self, data: bytes) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, rest = self.buffer.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(rest) < length:
                return
            if self.upstream.one_request and self.answered:
                self.upstream.dropped += 1
                self.transport.loseConnection()
                return
            self.buffer = rest[length:]
            method = lines[0].split(b" ")[0]
            body = json.dumps(
                {"method": method.decode(), "length": length, "connection": self.number}
            ).encode()
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body) + (b"" if method == b"HEAD" else body)
            )
            self.answered += 1
            self.upstream.answered.append(method)
        self._arm()

    def connectionLost(self, reason) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()


class KeepAliveUpstream(Factory):
    def __init__(self, *, idle: float | None = None, one_request: bool = False) -> None:
        self.idle, self.one_request = idle, one_request
        self.connections = 0
        self.dropped = 0
        self.answered: list[bytes] = []

    def buildProtocol(self, addr):
        return KeepAliveServer(self)


def request(method: str, path: str, body: bytes = b"") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
    if body or method in ("POST", "PUT", "PATCH"):
        head += f"Content-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


@pytest.mark.parametrize(
    "method, body",
    [
        ("GET", b""),
        ("GET", b"a body on a GET"),
        ("HEAD", b""),
        ("OPTIONS", b""),
        ("PUT", b"x" * 200_000),
        ("DELETE", b"gone"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_request_meeting_a_pooled_connection_the_upstream_closed_is_sent_again(method, body):
    """
    The upstream closes every kept-alive connection when the next request
    arrives on it: each GET/HEAD/OPTIONS/PUT/DELETE (with or without a body)
    is sent again, whole, on a fresh connection and answered 200.
    """
    upstream = KeepAliveUpstream(one_request=True)
    port = await listen(upstream)
    gw = await start_gateway(config(port.getHost().port))
    with capturedLogs() as events:
        for n in range(4):
            status, answer = await raw_exchange(gw.number, request(method, "/v1/chat/x", body))
            assert status == 200, answer
            if method != "HEAD":
                assert json.loads(answer) == {
                    "method": method,
                    "length": len(body),
                    "connection": n + 1,
                }
    assert upstream.dropped == 3  # each later request met a closed connection first
    assert problems(events) == []
    await close_gateway(gw, port)


@pytest.mark.parametrize("method", ["POST", "PATCH"])
@pytest_twisted.ensureDeferred
async def test_a_post_that_may_have_reached_the_upstream_is_not_sent_twice(method):
    """
    A POST/PATCH written whole to a pooled connection that then closed is a
    502, not a retry; the upstream's idle close is not held against it: with
    two instances, both stay in service.
    """
    upstreams = [KeepAliveUpstream(one_request=True) for _ in range(2)]
    ports = [await listen(upstream) for upstream in upstreams]
    gw = await start_gateway(config(*(port.getHost().port for port in ports)))
    with capturedLogs() as events:
        for _ in range(2):  # round robin: once on each instance
            status, _ = await raw_exchange(gw.number, request(method, "/v1/chat/x", b"order #1"))
            assert status == 200
        for _ in range(2):
            status, answer = await raw_exchange(gw.number, request(method, "/v1/chat/x", b"order #2"))
            assert status == 502, answer
            assert json.loads(answer)["detail"] == KEEPALIVE_CLOSED_DETAIL
    assert [upstream.answered for upstream in upstreams] == [[method.encode()]] * 2
    assert [upstream.dropped for upstream in upstreams] == [1, 1]
    assert problems(events) == []
    await all_in_service(gw)
    await close_gateway(gw, *ports)


@pytest_twisted.ensureDeferred
async def test_requests_spaced_around_the_upstreams_keepalive_timeout_all_succeed():
    """
    An upstream closing connections idle for 0.2 s (gunicorn does at 2 s):
    GETs and PUTs with bodies spaced before, at and after that moment are all
    answered 200.
    """
    upstream = KeepAliveUpstream(idle=0.2)
    port = await listen(upstream)
    gw = await start_gateway(config(port.getHost().port))
    with capturedLogs() as events:
        for gap in (0.05, 0.15, 0.19, 0.2, 0.21, 0.25, 0.3, 0.1, 0.2, 0.2, 0.2):
            await deferLater(reactor, gap, lambda: None)
            for method, body in (("GET", b""), ("PUT", b"y" * 5000), ("GET", b"q")):
                status, answer = await raw_exchange(gw.number, request(method, "/v1/chat/x", body))
                assert status == 200, (gap, method, answer)
                assert json.loads(answer)["length"] == len(body)
    assert problems(events) == []
    await close_gateway(gw, port)


# -- our own side short of file descriptors ------------------------------------------------


def _lowest_free_fd() -> int:
    """The number the next file descriptor would get (the kernel hands out the lowest)."""
    fd = os.open(os.devnull, os.O_RDONLY)
    os.close(fd)
    return fd


@contextmanager
def no_free_file_descriptors():
    """The process may open no new file descriptor: the next socket() fails with EMFILE."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (_lowest_free_fd(), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("kind", ["http", "websocket"])
@pytest_twisted.ensureDeferred
async def test_running_out_of_file_descriptors_is_a_503_and_no_upstream_failure(kind):
    """
    When the gateway cannot open a socket to the upstream (EMFILE), the
    client gets 503 ``overloaded``, and the upstream is not counted as
    failed: it stays in service and the next request reaches it.
    """
    upstreams = [Upstream(), Upstream()]
    ports = [await listen(Site(Pages())) if kind == "http" else await listen(u) for u in upstreams]
    gw = await start_gateway(config(*(p.getHost().port for p in ports)))
    client = await raw_connect(gw.number)
    client.transport.write(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
    await settle(lambda: b'"ok"' in client.data, "the gateway's answer on a kept connection")
    client.data.clear()
    final = upgrade("/v1/chat/ws") if kind == "websocket" else get("/v1/chat/page")
    with capturedLogs() as events:
        with no_free_file_descriptors():
            client.transport.write(final)
            await client.closed
        head, _, body = bytes(client.data).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503"), client.data
        assert json.loads(body)["error"] == "overloaded"
        await all_in_service(gw)
        if kind == "http":
            status, body = await raw_exchange(gw.number, get("/v1/chat/page"))
            assert status == 200
        else:
            ws = await ws_connect(gw.url("/v1/chat/ws"))
            ws.sendClose(1000)
            await ws.closed
    assert problems(events) == []
    await settle(lambda: not gw.registry.total_active(), "the pairs closed")
    await close_gateway(gw, *ports)
