"""
The upstream HTTP/1.1 client against real loopback servers: a twisted.web
site for ordinary exchanges, and scripted servers writing raw bytes for what
``Agent``'s own tests cover (``100-continue`` and other 1xx, chunked both
ways, HEAD, a body ended by closing, a pooled connection closed as it is
reused, no pipelining).
"""

from __future__ import annotations

import io
import json
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable

import pytest
import pytest_twisted
from twisted.internet import reactor, tcp
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import FileBodyProducer, ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web.resource import Resource
from twisted.web.server import Site

from twisted_gateway.errors import GatewayTimeout
from twisted_gateway.faults import KEEPALIVE_CLOSED, classify
from twisted_gateway.connector import UpstreamConnector
from twisted_gateway.http_proxy import _Upload
from twisted_gateway.upstream_client import Answer, UpstreamClient, UpstreamConnection, may_replay

from tests.support import listen, settle


class Echo(Resource):
    """Answers with the method, the body it read and the request headers, as JSON."""

    isLeaf = True

    def render(self, request):
        body = request.content.read()
        request.setHeader(b"content-type", b"application/json")
        request.responseHeaders.addRawHeader(b"set-cookie", b"a=1")
        request.responseHeaders.addRawHeader(b"set-cookie", b"b=2")
        return json.dumps(
            {
                "method": request.method.decode(),
                "body": body.decode("latin-1"),
                "headers": [[k.decode(), v.decode()] for k, vs in request.requestHeaders.getAllRawHeaders() for v in vs],
                "port": request.getClientAddress().port,
            }
        ).encode()


class Collect(Protocol):
    """A response body protocol: the bytes, and how the body ended."""

    def __init__(self) -> None:
        self.data = b""
        #: fires with ``[reason]`` (a Failure alone would be an errback)
        self.ended: Deferred[list[Failure]] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure) -> None:
        self.ended.callback([reason])


async def body_of(response) -> tuple[bytes, Failure]:
    collect = Collect()
    response.deliverBody(collect)
    (reason,) = await collect.ended
    return collect.data, reason


def idle(client: UpstreamClient) -> list[tuple[UpstreamConnection, IDelayedCall]]:
    """Every idle connection in the client's pool, with its idle timer."""
    return [pair for pairs in client.idle_connections().values() for pair in pairs]


def reading_from(port: int) -> bool:
    """Whether the reactor reads a connection to the upstream on ``port`` (not while it is paused)."""
    return any(isinstance(r, tcp.Client) and r.getPeer().port == port for r in reactor.getReaders())


class Scripted(Protocol):
    """A raw upstream: each request head is answered by ``factory.answer(self, head)``."""

    def connectionMade(self) -> None:
        self.factory.connections.append(self)
        self.received = b""
        self.closed: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        while b"\r\n\r\n" in self.received[self.factory.consumed.get(self, 0) :]:
            start = self.factory.consumed.get(self, 0)
            end = self.received.index(b"\r\n\r\n", start) + 4
            self.factory.consumed[self] = end
            self.factory.answer(self, self.received[start:end])

    def connectionLost(self, reason: Failure) -> None:
        self.closed.callback(None)


@asynccontextmanager
async def scripted(answer: Callable[[Scripted, bytes], None]) -> AsyncIterator[tuple[Factory, bytes]]:
    """A listening raw upstream and its base URL, for the ``async with`` block."""
    factory = Factory.forProtocol(Scripted)
    factory.connections = []
    factory.consumed = {}
    factory.answer = answer
    port = await listen(factory)
    factory.port = port.getHost().port
    try:
        yield factory, f"http://127.0.0.1:{factory.port}".encode()
    finally:
        await port.stopListening()


@pytest_twisted.async_yield_fixture
async def client():
    upstream = UpstreamClient(reactor, UpstreamConnector(reactor, 5.0), max_idle_per_host=2)
    yield upstream
    await upstream.close_idle()


@pytest_twisted.async_yield_fixture
async def site():
    port = await listen(Site(Echo()))
    yield f"http://127.0.0.1:{port.getHost().port}".encode()
    await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_sequential_requests_share_one_kept_alive_connection(client, site):
    """Two GETs in a row: one upstream connection, Host from the URL, repeated headers kept."""
    ports = set()
    for _ in range(2):
        response = await client.request(b"GET", site + b"/a?x=1")
        data, reason = await body_of(response)
        assert reason.check(ResponseDone)
        assert response.code == 200 and response.phrase == b"OK"
        assert response.headers.getRawHeaders(b"set-cookie") == [b"a=1", b"b=2"]
        assert response.length == len(data)
        answer = json.loads(data)
        assert ["Host", site.decode().split("//")[1]] in answer["headers"]
        ports.add(answer["port"])
    assert len(ports) == 1
    assert len(idle(client)) == 1


@pytest_twisted.ensureDeferred
async def test_a_body_of_known_length_goes_with_its_content_length(client, site):
    """A POST body from a file is framed by Content-Length and arrives whole."""
    body = FileBodyProducer(io.BytesIO(b"x" * 100_000))
    response = await client.request(b"POST", site + b"/", None, body)
    data, _ = await body_of(response)
    answer = json.loads(data)
    assert answer["body"] == "x" * 100_000
    assert ["Content-Length", "100000"] in answer["headers"]


@pytest_twisted.ensureDeferred
async def test_a_bodyless_post_says_content_length_0(client, site):
    """POST and PUT without a body still say Content-Length: 0, as Agent does."""
    response = await client.request(b"PUT", site + b"/")
    answer = json.loads((await body_of(response))[0])
    assert ["Content-Length", "0"] in answer["headers"]


class Trickle:
    """A body of unknown length, produced in three writes on later reactor turns."""

    length = UNKNOWN_LENGTH
    replayable = False

    def __init__(self, parts: list[bytes]) -> None:
        self.parts = parts
        self.continued_calls = 0
        self.stopped = False

    def startProducing(self, consumer) -> Deferred[None]:
        done: Deferred[None] = Deferred()

        def step(parts: list[bytes]) -> None:
            if self.stopped:
                return
            if not parts:
                done.callback(None)
                return
            consumer.write(parts[0])
            reactor.callLater(0, step, parts[1:])

        reactor.callLater(0, step, self.parts)
        return done

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        self.stopped = True

    def continued(self) -> None:
        self.continued_calls += 1


@pytest_twisted.ensureDeferred
async def test_a_body_of_unknown_length_is_sent_chunked(client, site):
    """Without a length the body goes chunked, and twisted.web reads it whole."""
    response = await client.request(b"POST", site + b"/", None, Trickle([b"one ", b"two ", b"three"]))
    answer = json.loads((await body_of(response))[0])
    assert answer["body"] == "one two three"
    assert ["Transfer-Encoding", "chunked"] in answer["headers"]


@pytest_twisted.ensureDeferred
async def test_an_answer_before_the_whole_body_stops_it_and_closes_the_connection(client):
    """An early 413: the rest of the body is not sent, and the connection is not reused (as with Agent)."""

    def answer(server: Scripted, head: bytes) -> None:
        if head.startswith(b"POST"):
            server.transport.write(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")

    async with scripted(answer) as (factory, base):
        body = Trickle([b"x" * 1000] * 1000)
        response = await client.request(b"POST", base + b"/", None, body)
        assert (response.code, (await body_of(response))[0]) == (413, b"")
        assert body.stopped
        await factory.connections[0].closed
        assert idle(client) == []


@pytest_twisted.ensureDeferred
async def test_a_chunked_response_is_streamed_and_the_connection_reused(client):
    """A chunked answer arrives de-chunked, its length unknown, and the connection is reused."""

    def answer(server: Scripted, head: bytes) -> None:
        server.transport.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        reactor.callLater(0.01, server.transport.write, b"6\r\n world\r\n0\r\n\r\n")

    async with scripted(answer) as (factory, base):
        for _ in range(2):
            response = await client.request(b"GET", base + b"/")
            assert response.length is UNKNOWN_LENGTH
            data, reason = await body_of(response)
            assert (data, reason.type) == (b"hello world", ResponseDone)
        assert len(factory.connections) == 1


@pytest.mark.parametrize("interim", [b"", b"HTTP/1.1 100 Continue\r\n\r\n"], ids=["plain", "after-100"])
@pytest_twisted.ensureDeferred
async def test_head_ends_with_its_head_and_the_connection_is_reused(client, interim):
    """
    A HEAD's Content-Length announces a body that is not sent (after a 100 in
    the same write, too): the next request uses the same connection.
    """

    def answer(server: Scripted, head: bytes) -> None:
        body = b"" if head.startswith(b"HEAD") else b"hello"
        server.transport.write(interim + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n" + body)

    async with scripted(answer) as (factory, base):
        response = await client.request(b"HEAD", base + b"/")
        assert (response.code, (await body_of(response))[0]) == (200, b"")
        response = await client.request(b"GET", base + b"/")
        assert (await body_of(response))[0] == b"hello"
        assert len(factory.connections) == 1


@pytest_twisted.ensureDeferred
async def test_a_body_after_a_head_response_closes_the_connection(client):
    """Bytes behind a HEAD's head are not the next answer: the connection is closed."""

    def answer(server: Scripted, head: bytes) -> None:
        server.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")

    async with scripted(answer) as (factory, base):
        response = await client.request(b"HEAD", base + b"/")
        assert (await body_of(response))[0] == b""
        await factory.connections[0].closed
        response = await client.request(b"GET", base + b"/")
        assert (await body_of(response))[0] == b"hello"
        assert len(factory.connections) == 2


@pytest_twisted.ensureDeferred
async def test_interim_responses_are_passed_over_and_100_lets_the_body_go(client):
    """103 and 100 before the answer: the caller gets the 200; a 100 tells the body it may come."""

    def answer(server: Scripted, head: bytes) -> None:
        if not head.startswith(b"POST"):
            return  # the end of the chunked body
        server.transport.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n")
        reactor.callLater(0.01, server.transport.write, b"HTTP/1.1 100 Continue\r\n\r\n")
        reactor.callLater(0.02, server.transport.write, b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")

    async with scripted(answer) as (factory, base):
        body = Trickle([])
        headers = Headers({b"expect": [b"100-continue"]})
        response = await client.request(b"POST", base + b"/", headers, body)
        assert (response.code, (await body_of(response))[0]) == (201, b"ok")
        assert body.continued_calls == 1
        assert b"\r\nExpect: 100-continue\r\n" in factory.connections[0].received


@pytest_twisted.ensureDeferred
async def test_a_body_ended_by_closing_is_complete_and_not_reused(client):
    """No length and no chunking: the body ends with the connection (PotentialDataLoss, as Agent says)."""

    def answer(server: Scripted, head: bytes) -> None:
        server.transport.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
        reactor.callLater(0.01, server.transport.loseConnection)

    async with scripted(answer) as (factory, base):
        response = await client.request(b"GET", base + b"/")
        assert response.length is UNKNOWN_LENGTH
        data, reason = await body_of(response)
        assert (data, reason.type) == (b"all of it", PotentialDataLoss)
        assert (b"http", b"127.0.0.1", factory.port) not in client.idle_connections()


@pytest_twisted.ensureDeferred
async def test_a_bare_cr_in_the_status_line_stays_in_the_reason_phrase(client):
    """``200 OK\\rX-Injected: 1``: one reason phrase (the CR a space), never a header."""

    def answer(server: Scripted, head: bytes) -> None:
        server.transport.write(b"HTTP/1.1 200 OK\rX-Injected: 1\r\nContent-Length: 2\r\n\r\nok")

    async with scripted(answer) as (factory, base):
        response = await client.request(b"GET", base + b"/")
        assert (response.code, response.phrase) == (200, b"OK X-Injected: 1")
        assert not response.headers.hasHeader(b"x-injected")
        assert (await body_of(response))[0] == b"ok"


@pytest_twisted.ensureDeferred
async def test_a_body_cut_short_fails(client):
    """Fewer bytes than Content-Length before the close: the body fails, it is not passed off as whole."""

    def answer(server: Scripted, head: bytes) -> None:
        server.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234")
        server.transport.loseConnection()

    async with scripted(answer) as (factory, base):
        response = await client.request(b"GET", base + b"/")
        data, reason = await body_of(response)
        assert (data, reason.type) == (b"01234", ResponseFailed)


def _closes_kept_alive(answers: list[bytes]) -> Callable[[Scripted, bytes], None]:
    """Answers the first request on each connection; closes a connection when a second one arrives."""

    def answer(server: Scripted, head: bytes) -> None:
        if getattr(server, "answered", False):
            server.transport.loseConnection()
            return
        server.answered = True
        answers.append(head.split(b" ")[0])
        server.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    return answer


@pytest.mark.parametrize("method", [b"GET", b"PUT", b"DELETE"])
@pytest_twisted.ensureDeferred
async def test_a_replayable_request_meeting_a_closed_pooled_connection_is_sent_again(client, method):
    """The upstream closes its kept-alive connection as the request arrives: sent again on a fresh one."""
    answers: list[bytes] = []
    async with scripted(_closes_kept_alive(answers)) as (factory, base):
        for _ in range(2):
            body = _Upload(io.BytesIO(b"data")) if method == b"PUT" else None
            response = await client.request(method, base + b"/", None, body)
            assert (await body_of(response))[0] == b"ok"
        assert answers == [method, method]
        assert len(factory.connections) == 2


@pytest_twisted.ensureDeferred
async def test_a_post_meeting_a_closed_pooled_connection_fails_without_blaming_the_upstream(client):
    """A POST may have arrived: not sent again, and its failure is the idle close's, not the upstream's."""
    answers: list[bytes] = []
    async with scripted(_closes_kept_alive(answers)) as (factory, base):
        response = await client.request(b"POST", base + b"/", None, FileBodyProducer(io.BytesIO(b"1")))
        assert (await body_of(response))[0] == b"ok"
        with pytest.raises(ResponseNeverReceived) as failed:
            await client.request(b"POST", base + b"/", None, FileBodyProducer(io.BytesIO(b"2")))
        assert classify(failed.value) is KEEPALIVE_CLOSED
        assert not may_replay(b"POST", failed.value)
        assert answers == [b"POST"]


@pytest_twisted.ensureDeferred
async def test_requests_at_once_never_share_a_connection(client):
    """No pipelining: a second request while the first waits gets its own connection."""
    waiting: list[Scripted] = []

    def answer(server: Scripted, head: bytes) -> None:
        waiting.append(server)
        if len(waiting) == 2:
            for each in waiting:
                each.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx")

    async with scripted(answer) as (factory, base):
        first = client.request(b"GET", base + b"/")
        second = client.request(b"GET", base + b"/")
        for pending in (first, second):
            assert (await body_of(await pending))[0] == b"x"
        assert len(factory.connections) == 2
        assert all(c.received.count(b"GET") == 1 for c in factory.connections)


@pytest_twisted.ensureDeferred
async def test_cancelling_before_the_head_closes_the_connection(client):
    """The caller gives up (client gone, or a timeout): CancelledError, and the connection is closed."""
    async with scripted(lambda server, head: None) as (factory, base):
        pending = client.request(b"GET", base + b"/")
        await settle(lambda: factory.connections and factory.connections[0].received, "the request sent")
        pending.cancel()
        with pytest.raises(CancelledError):
            await pending
        await factory.connections[0].closed
        assert idle(client) == []


def _answer() -> tuple[Answer, Deferred]:
    """An Answer whose head or failure fires a Deferred (the test's only way to wait)."""
    got: Deferred = Deferred()
    return Answer(got.callback, got.errback), got


@pytest_twisted.ensureDeferred
async def test_send_to_hands_the_head_to_its_answer_and_reuses_the_connection(client, site):
    for _ in range(2):
        answer, got = _answer()
        client.send_to(answer, b"GET", site + b"/a", [(b"X-A", b"1")])
        response = await got
        data, reason = await body_of(response)
        assert response.code == 200 and reason.check(ResponseDone)
        assert ["X-A", "1"] in json.loads(data)["headers"] and answer.called
    assert len(idle(client)) == 1


@pytest_twisted.ensureDeferred
async def test_cancelling_an_answer_before_the_head_fails_it_and_closes_the_connection(client):
    async with scripted(lambda server, head: None) as (factory, base):
        answer, got = _answer()
        client.send_to(answer, b"GET", base + b"/", [])
        await settle(lambda: factory.connections and factory.connections[0].received, "the request sent")
        answer.cancel()
        answer.cancel()  # once is enough
        with pytest.raises(CancelledError):
            await got
        await factory.connections[0].closed
        assert idle(client) == []


@pytest_twisted.ensureDeferred
async def test_an_answer_gets_a_connect_failure_as_a_send_deferred_would(client):
    async with scripted(lambda server, head: None) as (factory, base):
        pass  # closed: nothing listens there now
    answer, got = _answer()
    client.send_to(answer, b"GET", base + b"/", [])
    with pytest.raises(ConnectionRefusedError):
        await got


@pytest_twisted.ensureDeferred
async def test_a_paused_body_stops_reading_the_upstream(client):
    """Backpressure: while the body's reader is paused the connection is not read; resumed, the rest comes."""

    def answer(server: Scripted, head: bytes) -> None:
        server.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nabc")

    async with scripted(answer) as (factory, base):
        response = await client.request(b"GET", base + b"/")
        collect = Collect()
        response.deliverBody(collect)
        await settle(lambda: collect.data == b"abc", "the first bytes")
        collect.transport.pauseProducing()
        assert not reading_from(factory.port)
        factory.connections[0].transport.write(b"def")
        collect.transport.resumeProducing()
        assert (await collect.ended)[0].check(ResponseDone)
        assert collect.data == b"abcdef"
        assert reading_from(factory.port)  # back in the pool, reading


@pytest_twisted.ensureDeferred
async def test_an_idle_connection_the_upstream_closes_leaves_the_pool_with_its_timer(client, site):
    """An idle close by the upstream takes the connection and its timer out of the pool at once."""
    response = await client.request(b"GET", site + b"/")
    await body_of(response)
    ((connection, timer),) = idle(client)
    connection.transport.loseConnection()
    await settle(lambda: not idle(client), "the closed connection gone")
    assert not timer.active()


OK_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@asynccontextmanager
async def on_a_clock(idle_timeout: float) -> AsyncIterator[tuple[Clock, UpstreamClient, list[Scripted], Factory, bytes]]:
    """A client whose timers run on a ``Clock``; its upstream answers "ok" but holds ``/hold`` (listed)."""
    clock = Clock()
    client = UpstreamClient(clock, UpstreamConnector(reactor, 5.0), idle_timeout=idle_timeout)
    held: list[Scripted] = []

    def answer(server: Scripted, head: bytes) -> None:
        if b"/hold" in head:
            held.append(server)
        else:
            server.transport.write(OK_ANSWER)

    async with scripted(answer) as (factory, base):
        try:
            yield clock, client, held, factory, base
        finally:
            await client.close_idle()


@pytest_twisted.ensureDeferred
async def test_a_reused_connection_keeps_one_idle_timer_that_never_closes_it_in_use():
    """The idle timer is reset when the connection is idle again, and does nothing while in use."""
    async with on_a_clock(idle_timeout=10.0) as (clock, client, held, factory, base):
        await body_of(await client.request(b"GET", base + b"/"))
        (timer,) = clock.getDelayedCalls()
        clock.advance(9)
        await body_of(await client.request(b"GET", base + b"/"))
        assert clock.getDelayedCalls() == [timer] and timer.getTime() == 19  # reset, not made again
        pending = client.request(b"GET", base + b"/hold")
        await settle(lambda: held, "the held request at the upstream")
        clock.advance(30)  # past the idle deadline while in use: nothing happens
        held[0].transport.write(OK_ANSWER)
        data, reason = await body_of(await pending)
        assert (data, reason.type) == (b"ok", ResponseDone)
        assert len(factory.connections) == 1 and len(idle(client)) == 1
        clock.advance(9.9)
        assert len(idle(client)) == 1
        clock.advance(0.1)  # idle for idle_timeout: closed
        assert idle(client) == [] and clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_a_head_not_in_time_fails_with_gateway_timeout_on_a_fresh_or_a_reused_connection():
    """
    ``send(..., timeout)``: a fresh connection's head has its own timer, gone
    once the head is in; on a reused connection the connection's timer serves
    (no timer per request). Past the timeout, the connection is aborted.
    """
    async with on_a_clock(idle_timeout=100.0) as (clock, client, held, factory, base):
        pending = client.send(b"GET", base + b"/", [], None, 5.0)
        (head_timer,) = clock.getDelayedCalls()  # a fresh connection: the head's own
        await body_of(await pending)
        (idle_timer,) = clock.getDelayedCalls()
        assert not head_timer.active() and idle_timer is not head_timer
        pending = client.send(b"GET", base + b"/hold", [], None, 5.0)
        assert clock.getDelayedCalls() == [idle_timer] and idle_timer.getTime() == 5
        await settle(lambda: held, "the held request at the upstream")
        clock.advance(4.9)
        assert not pending.called
        clock.advance(0.1)
        with pytest.raises(GatewayTimeout, match="no response from the upstream within 5 s"):
            await pending
        await held[0].closed  # aborted
        assert idle(client) == [] and clock.getDelayedCalls() == []
        pending = client.send(b"GET", base + b"/hold", [], None, 2.0)  # a fresh one again
        await settle(lambda: len(held) == 2, "the second held request")
        clock.advance(2)
        with pytest.raises(GatewayTimeout, match="within 2 s"):
            await pending
        await held[1].closed
        assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_a_connect_failure_is_the_endpoints_own_error(client):
    """Nothing listening: the connect error itself, as Agent gives it (a refused connection)."""
    from twisted.internet.error import ConnectionRefusedError

    port = await listen(Factory.forProtocol(Protocol))
    base = f"http://127.0.0.1:{port.getHost().port}".encode()
    await port.stopListening()
    with pytest.raises(ConnectionRefusedError):
        await client.request(b"GET", base + b"/")
