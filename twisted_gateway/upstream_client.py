"""
The HTTP/1.1 client that carries forwarded requests to upstreams.

Twisted's ``Agent`` (its parser, pool and Deferreds) was about a fifth of a
forwarded request's CPU. This client does what a proxy needs and no more: one
:class:`UpstreamConnection` per connection, parsed by llhttp (``httptools``,
the parser aiohttp and uvicorn use), one request at a time on it (never
pipelined), a keep-alive pool per ``(scheme, host, port)`` reached through
:class:`connector.UpstreamConnector` (TLS included). Bodies stream both ways with
backpressure: a request body is an ``IBodyProducer`` written with its length,
or chunked when the length is unknown; a response body is delivered as it
arrives to the protocol given to ``deliverBody``, which may pause the
connection. It answers :class:`twisted.web.iweb.IAgent`'s ``request`` with an
``IResponse``, and fails the way ``Agent`` does (``ResponseNeverReceived``,
``ResponseFailed``, ``RequestTransmissionFailed``), so that
:func:`faults.classify` and the forwarder judge both alike.

A connection goes back to the pool only after a complete response with
nothing behind it, its request body sent, and keep-alive agreed on. A request
that meets a pooled connection the upstream had closed is sent again on a
fresh connection where :func:`may_replay` allows it.
"""

from __future__ import annotations

import re
from typing import Callable, Protocol as TypingProtocol, Sequence, Union

import httptools
from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IConsumer, IDelayedCall, IProtocol, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._newclient import RequestNotSent
from twisted.web.client import (
    URI,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IResponse
from zope.interface import implementer

from twisted_gateway._compat import write_now
from twisted_gateway.connector import UpstreamConnector
from twisted_gateway.errors import GatewayTimeout
from twisted_gateway.faults import mark_malformed, mark_reused
from twisted_gateway.sockets import TCPKeepalive, set_keepalive

_log = Logger()

#: Methods sent again on a fresh connection when a pooled one fails, body or not.
REPLAYABLE_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})

#: Seconds an idle connection waits in the pool (``HTTPConnectionPool``'s default).
IDLE_TIMEOUT = 240.0

#: What ``IResponse.length`` is: a byte count, or ``UNKNOWN_LENGTH`` (a str).
Length = Union[int, str]


class BodyProducer(TypingProtocol):
    """What a request body is (``IBodyProducer``): written to the upstream as it is produced."""

    length: Length

    def startProducing(self, consumer: IConsumer) -> Deferred[None]: ...

    def pauseProducing(self) -> None: ...

    def resumeProducing(self) -> None: ...

    def stopProducing(self) -> None: ...


class Transport(TypingProtocol):
    """What an upstream connection uses of its transport (TCP, or TLS over it)."""

    def write(self, data: bytes) -> None: ...

    def writeSequence(self, data: list[bytes]) -> None: ...

    def registerProducer(self, producer: object, streaming: bool) -> None: ...

    def unregisterProducer(self) -> None: ...

    def pauseProducing(self) -> None: ...

    def resumeProducing(self) -> None: ...

    def loseConnection(self) -> None: ...

    def abortConnection(self) -> None: ...

    def getPeer(self) -> object: ...


class WrongBodyLength(Exception):
    """A request body producer wrote more or fewer bytes than its ``length``."""


def may_replay(method: bytes, reason: BaseException) -> bool:
    """
    Whether a request that failed on a pooled keep-alive connection (one the
    upstream may have closed under it) is sent again on a fresh connection:
    GET, HEAD, OPTIONS, PUT, DELETE and TRACE whenever no response came (the
    body is buffered, so it is replayed whole); any method when not a byte of
    it was sent; never after a cancellation.
    """
    reasons = getattr(reason, "reasons", None) or ()
    if any(f.check(CancelledError) for f in reasons):
        return False
    if isinstance(reason, RequestNotSent):
        return True
    return method.upper() in REPLAYABLE_METHODS and isinstance(
        reason, (RequestTransmissionFailed, ResponseNeverReceived)
    )


def request_head(method: bytes, target: bytes, headers: Sequence[tuple[bytes, bytes]], framing: bytes) -> bytes:
    """
    The request line and ``headers`` in their order: ``framing`` is the body's
    ``Content-Length``/``Transfer-Encoding`` line (or nothing). A CR or LF in
    a header becomes a space (as ``Headers`` does): no header can add lines.
    Raises ``ValueError`` for a method or target that cannot go on a request line.
    """
    if not _TOKEN.match(method):
        raise ValueError(f"Invalid method {method!r}")
    if not _TARGET.match(target):
        raise ValueError(f"Invalid URI {target!r}")
    block = b""
    if headers:
        block = b"\r\n".join([name + b": " + value for name, value in headers])
        lines = len(headers) - 1
        if block.count(b"\n") != lines or block.count(b"\r") != lines:
            block = b"\r\n".join([_one_line(name) + b": " + _one_line(value) for name, value in headers])
        block += b"\r\n"
    return b"".join((method, b" ", target, b" HTTP/1.1\r\n", framing, block, b"\r\n"))


_TOKEN = re.compile(rb"\A[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_TARGET = re.compile(rb"\A[\x21-\x7e]+\Z")


def _one_line(text: bytes) -> bytes:
    return text.replace(b"\r\n", b" ").replace(b"\r", b" ").replace(b"\n", b" ")


def status_line_without_bare_cr(data: bytes) -> bytes:
    """
    ``data`` (a response's first bytes) with any bare CR in its status line
    turned into a space. llhttp refuses one, or with leniency ends the line
    there (so that the rest would be read as a header); ``Agent`` kept it in
    the reason phrase, which the forwarder cleans.
    """
    end = data.find(b"\r\n")
    if end > 0 and data.find(b"\r", 0, end) >= 0:
        return data[:end].replace(b"\r", b" ") + data[end:]
    return data


def _framing(method: bytes, body: BodyProducer | None) -> bytes:
    if body is None:
        # a method whose semantics anticipate a body says it has none (RFC 9110 8.6)
        return b"Content-Length: 0\r\n" if method in (b"POST", b"PUT") else b""
    if isinstance(body.length, int):
        return b"Content-Length: %d\r\n" % body.length
    return b"Transfer-Encoding: chunked\r\n"


class MalformedResponse(Exception):
    """
    The upstream's response head has framing a proxy must not guess at (as
    nginx refuses it): a ``Transfer-Encoding`` other than one ``chunked``
    (RFC 9112 6.1), or a version other than HTTP/1.0 and HTTP/1.1. llhttp
    itself refuses the rest: two ``Content-Length`` headers, one beside
    ``Transfer-Encoding``, malformed lengths and header lines.
    """


class _HeadResponseEnd(Exception):
    """Raised in the parser's callback: a response to HEAD ends with its head (llhttp cannot be told)."""


class _Stray(Exception):
    """Raised in the parser's callback: a message began after the response was complete."""


# -- one exchange: a request and its response -----------------------------------


class Answer:
    """
    Where a response head goes without a Deferred (:meth:`UpstreamClient.send_to`):
    ``on_head(response)``, or ``on_failure(reason)`` with the errors a
    :meth:`UpstreamClient.send` Deferred fails with; one of them, once.
    :meth:`cancel` is a Deferred's: the exchange is stopped, and ``on_failure``
    gets ``CancelledError`` unless it was answered meanwhile. The two must not
    raise (an error is logged; the connection is not told).
    """

    def __init__(
        self, on_head: Callable[[IResponse], object], on_failure: Callable[[Failure], object]
    ) -> None:
        self.called = False
        self._on_head = on_head
        self._on_failure = on_failure
        self._canceller: Callable[[Answer], None] | None = None

    def callback(self, response: IResponse) -> None:
        if self.called:
            return
        on_head = self._answered()
        try:
            on_head(response)
        except Exception:
            _log.failure("the response head's receiver failed")

    def errback(self, reason: Failure | BaseException) -> None:
        if self.called:
            return
        on_failure = self._on_failure
        self._answered()
        try:
            on_failure(reason if isinstance(reason, Failure) else Failure(reason))
        except Exception:
            _log.failure("the response head's receiver failed")

    def _answered(self) -> Callable[[IResponse], object]:
        """Called from now on; the receivers and the canceller let go (no cycle with the exchange)."""
        self.called = True
        on_head = self._on_head
        self._on_head = self._on_failure = _nothing
        self._canceller = None
        return on_head

    def cancel(self) -> None:
        if self.called:
            return
        if self._canceller is not None:
            self._canceller(self)
        self.errback(Failure(CancelledError()))


def _nothing(result: object) -> None:
    """An answered :class:`Answer`'s receivers."""


class _Exchange:
    """One request on its way: the head :attr:`answer` fires with, and the body's state."""

    def __init__(
        self, origin: _Origin, method: bytes, head: bytes, body: BodyProducer | None, answer: Answer | None = None
    ) -> None:
        self.origin = origin
        self.method = method
        self.head = head
        self.body = body
        if answer is None:
            self.answer: Deferred[IResponse] | Answer = Deferred(self._cancel)
        else:
            answer._canceller = self._cancel
            self.answer = answer
        #: the connection carrying it, once there is one
        self.connection: UpstreamConnection | None = None
        self.connecting: Deferred[IProtocol] | None = None
        self.reused = False
        self.body_sent = body is None
        #: response bytes arrived (a failure after them is no longer "never received")
        self.received = False
        self.response: UpstreamResponse | None = None
        self.complete = False
        self.keep_alive = True
        #: the body has no length: it ends when the connection closes
        self.until_close = False
        #: seconds the head may take (None: no limit), and when it is due
        self.timeout: float | None = None
        self.deadline = 0.0
        #: the head's own timer, while no kept-alive connection's timer serves
        self.timer: IDelayedCall | None = None

    def stop_timer(self) -> None:
        timer, self.timer = self.timer, None
        if timer is not None and timer.active():
            timer.cancel()

    @property
    def replayable(self) -> bool:
        return self.body is None or bool(getattr(self.body, "replayable", False))

    def _cancel(self, answer: Deferred[IResponse] | Answer) -> None:
        """Cancelled before the head (the client left, or no head in time): nothing is reused."""
        self.stop_timer()
        if self.connecting is not None:
            self.connecting.cancel()
        if self.connection is not None:
            self.connection.abort()


# -- the response, as IResponse --------------------------------------------------


@implementer(IResponse)
class UpstreamResponse:
    """The upstream's response head; its body goes to the protocol given to :meth:`deliverBody`."""

    request = None
    previousResponse = None

    def __init__(
        self,
        connection: UpstreamConnection,
        code: int,
        phrase: bytes,
        raw_headers: list[tuple[bytes, bytes]],
        length: Length,
    ) -> None:
        self.version = (b"HTTP", 1, 1)
        self.code = code
        self.phrase = phrase
        #: the headers as received, in order (a proxy copies them without ``Headers``' work)
        self.raw_headers = raw_headers
        self.length = length
        self._connection = connection
        self._protocol: IProtocol | None = None
        self._held: list[bytes] = []
        self._end: Failure | None = None

    @property
    def headers(self) -> Headers:
        """:attr:`raw_headers` as ``IResponse`` has them, built when asked for."""
        headers = Headers()
        for name, value in self.raw_headers:
            headers.addRawHeader(name, value)
        return headers

    def deliverBody(self, protocol: IProtocol) -> None:
        self._protocol = protocol
        # its transport is a push producer over the connection, as with Agent
        protocol.makeConnection(_BodyControl(self._connection, self))  # type: ignore[arg-type]
        held, self._held = self._held, []
        for data in held:
            protocol.dataReceived(data)
        if self._end is not None:
            self._protocol = None
            protocol.connectionLost(self._end)

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response

    # from the connection

    def _data(self, data: bytes) -> None:
        if self._protocol is None:
            self._held.append(data)
        else:
            self._protocol.dataReceived(data)

    def _ended(self, reason: Failure) -> None:
        if self._end is not None:
            return
        self._end = reason
        protocol, self._protocol = self._protocol, None  # (its transport refers to this response)
        if protocol is not None:
            protocol.connectionLost(reason)


class _BodyControl:
    """
    The transport a body protocol sees: pausing it pauses reading from the
    upstream, stopping it closes the connection. Inert once the body is
    complete (the connection may carry another request by then).
    """

    def __init__(self, connection: UpstreamConnection, response: UpstreamResponse) -> None:
        self._connection = connection
        self._response = response

    def _live(self) -> bool:
        return self._response._end is None

    def pauseProducing(self) -> None:
        if self._live():
            self._connection.pause_reading()

    def resumeProducing(self) -> None:
        if self._live():
            self._connection.resume_reading()

    def stopProducing(self) -> None:
        if self._live():
            self._connection.abort()


# -- one connection --------------------------------------------------------------


@implementer(IConsumer)
class _BodyWriter:
    """The consumer a request body is produced into: framed with its length, or chunked."""

    def __init__(self, connection: UpstreamConnection, length: Length) -> None:
        self._connection = connection
        self._chunked = not isinstance(length, int)
        self._left = length if isinstance(length, int) else 0
        self.wrong = False

    def write(self, data: bytes) -> None:
        transport = self._connection.transport
        if transport is None or not data:
            return
        if self._chunked:
            transport.writeSequence([b"%x\r\n" % len(data), data, b"\r\n"])
            return
        self._left -= len(data)
        if self._left < 0:
            self.wrong = True
            self._connection.abort()
            return
        transport.write(data)

    def finish(self) -> None:
        """The producer is done: end the chunked body, or check the length was kept."""
        if self._chunked:
            transport = self._connection.transport
            if transport is not None:
                transport.write(b"0\r\n\r\n")
        elif self._left != 0:
            self.wrong = True

    def registerProducer(self, producer: object, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass


#: the end of every complete response body: one Failure for all of them (making
#: one per response was about 1 % of a forwarded request's instructions);
#: body protocols only read it
RESPONSE_DONE = Failure(ResponseDone())


class UpstreamConnection(Protocol):
    """
    One connection to an upstream, carrying one request at a time. Fed to
    llhttp as bytes arrive; its callbacks (``on_*``) build the response.
    """

    transport: Transport | None  # type: ignore[assignment]

    def __init__(self, pool: UpstreamClient, key: tuple[bytes, bytes, int]) -> None:
        self._pool = pool
        self.key = key
        self._parser = httptools.HttpResponseParser(self)
        self._exchange: _Exchange | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._phrase = b""
        #: bytes of a HEAD request's response until its head ended (to find what follows it)
        self._head_bytes: bytes | None = None
        self._interim = 0
        self._paused = False
        self._stray_logged = False
        self.lost = False
        #: fires when the connection is closed (set by :meth:`UpstreamClient.close_idle`)
        self.closed: Deferred[None] | None = None
        #: the idle timer, left armed while the connection is in use (reset when it is idle again)
        self.timer: IDelayedCall | None = None
        #: the exchange handed over as the connector built the connection, sent once it is made
        self._first: _Exchange | None = None

    def connectionMade(self) -> None:
        set_keepalive(self.transport, self._pool.tcp_keepalive)
        exchange, self._first = self._first, None
        if exchange is not None:
            self.send(exchange)

    # -- sending

    def send(self, exchange: _Exchange) -> None:
        """Write ``exchange``'s request, then its body as it is produced."""
        if self.transport is None and not self.lost:
            # built, not yet connected (the connector fires as it builds): sent from connectionMade
            self._first = exchange
            return
        if self.lost or self.transport is None:
            self._pool._failed(exchange, RequestNotSent())
            return
        self._exchange = exchange
        exchange.connection = self
        self._headers, self._phrase, self._interim = [], b"", 0
        self._head_bytes = b"" if exchange.method == b"HEAD" else None
        write_now(self.transport, exchange.head)
        body = exchange.body
        if body is None:
            return
        writer = _BodyWriter(self, body.length)
        self.transport.registerProducer(body, True)
        producing = body.startProducing(writer)
        producing.addCallbacks(
            self._body_sent, self._body_failed, callbackArgs=(exchange, writer), errbackArgs=(exchange,)
        )

    def _body_sent(self, result: object, exchange: _Exchange, writer: _BodyWriter) -> None:
        if self._exchange is not exchange:
            return
        if self.transport is not None and not self.lost:
            self.transport.unregisterProducer()
        writer.finish()
        if writer.wrong:
            self._body_failed(Failure(WrongBodyLength("the request body's length was not kept")), exchange)
            return
        exchange.body_sent = True
        self._done_if_complete()

    def _body_failed(self, reason: Failure, exchange: _Exchange) -> None:
        if self._exchange is not exchange:
            return
        if not exchange.received:
            self._pool._failed(exchange, RequestTransmissionFailed([reason]))
        self.abort()

    # -- receiving

    def dataReceived(self, data: bytes) -> None:
        exchange = self._exchange
        if exchange is None or exchange.complete:
            # in the pool, or closing: no request waits for these bytes
            self._stray(data)
            self.abort()
            return
        if not exchange.received:
            exchange.received = True
            data = status_line_without_bare_cr(data)
        if self._head_bytes is not None:
            self._head_bytes += data
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            if isinstance(e.__context__, _HeadResponseEnd):
                self._head_response_ended()
            elif isinstance(e.__context__, _Stray):
                self._stray(data)
                exchange.keep_alive = False
            else:
                self._broken(Failure(e.__context__ or e))
                return
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as e:  # we never ask for an upgrade
            self._broken(Failure(e))
            return
        self._done_if_complete()

    def on_message_begin(self) -> None:
        if self._exchange is None or self._exchange.complete:
            raise _Stray()

    def on_status(self, phrase: bytes) -> None:
        self._phrase += phrase

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        exchange = self._exchange
        assert exchange is not None
        code = self._parser.get_status_code()
        pairs, phrase = self._headers, self._phrase
        self._headers, self._phrase = [], b""
        if self._parser.get_http_version() not in ("1.1", "1.0"):
            raise MalformedResponse(f"an HTTP/{self._parser.get_http_version()} response")
        if code < 200:
            # an interim answer: 100 lets a waiting body go, others are dropped as Agent does
            self._interim += 1
            if code == 100:
                continued = getattr(exchange.body, "continued", None)
                if continued is not None:
                    continued()
            return
        length: Length = UNKNOWN_LENGTH
        chunked = False
        for name, value in pairs:
            lower = name.lower()
            if lower == b"content-length":
                length = int(value)
            elif lower == b"transfer-encoding":
                if chunked or value.strip().lower() != b"chunked":
                    # the body's end would be a guess (gzip, chunked) or the close
                    # (chunked, gzip); its bytes would reach the client still coded
                    raise MalformedResponse("a Transfer-Encoding other than chunked")
                chunked = True
        head = exchange.method == b"HEAD"
        if head or code in (204, 304):
            length = 0
            if code == 204:  # it must not have one (RFC 9110 8.6): nginx drops it too
                pairs = [(name, value) for name, value in pairs if name.lower() != b"content-length"]
        elif not chunked and length is UNKNOWN_LENGTH:
            exchange.until_close = True
        response = exchange.response = UpstreamResponse(self, code, phrase, pairs, length)
        if exchange.timer is not None:
            exchange.stop_timer()
        if head:
            exchange.keep_alive = self._parser.should_keep_alive()
        exchange.answer.callback(response)
        if head:
            raise _HeadResponseEnd()

    def on_body(self, data: bytes) -> None:
        response = self._exchange.response if self._exchange is not None else None
        if response is not None:
            response._data(data)

    def on_message_complete(self) -> None:
        exchange = self._exchange
        if exchange is None or exchange.response is None:
            return  # the end of an interim response
        exchange.keep_alive = self._parser.should_keep_alive()
        exchange.complete = True

    def _head_response_ended(self) -> None:
        """A response to HEAD ended with its head: anything after it is stray."""
        exchange = self._exchange
        assert exchange is not None and self._head_bytes is not None
        end = -4
        for _ in range(self._interim + 1):
            end = self._head_bytes.find(b"\r\n\r\n", end + 4)
        rest = self._head_bytes[end + 4 :] if end >= 0 else b""
        self._head_bytes = None
        # llhttp was stopped inside the message: the next one needs a fresh parser
        self._parser = httptools.HttpResponseParser(self)
        exchange.complete = True
        if rest:
            self._stray(rest)
            exchange.keep_alive = False

    def _done_if_complete(self) -> None:
        """The response is complete: the connection is free (or closed), the body protocol told."""
        exchange = self._exchange
        if exchange is None or not exchange.complete:
            return
        assert exchange.response is not None
        if not exchange.body_sent:
            # answered before the whole request body was sent (an early 413, say): the
            # rest is not sent, and the connection is closed, not reused (as with Agent)
            exchange.body_sent = True
            exchange.keep_alive = False
            if self.transport is not None:
                self.transport.unregisterProducer()
            if exchange.body is not None:
                exchange.body.stopProducing()
        self._exchange = None
        if self._paused:
            self.resume_reading()
        if exchange.keep_alive and not self.lost:
            self._pool._put(self)
        else:
            self.close()
        exchange.response._ended(RESPONSE_DONE)

    def _broken(self, reason: Failure) -> None:
        """The upstream spoke something that is not HTTP/1.1 (or a callback failed): give up."""
        exchange = self._exchange
        if exchange is not None and exchange.response is None:
            error = ResponseFailed([reason])
            mark_malformed(error)
            self._pool._failed(exchange, error)
        elif exchange is not None and exchange.response is not None:
            exchange.response._ended(Failure(ResponseFailed([reason])))
        self.abort()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        timer, self.timer = self.timer, None
        if timer is not None and timer.active():
            timer.cancel()  # its idle timer, left armed while in use
        exchange, self._exchange = self._exchange, None
        if exchange is None:
            self._pool._forget(self)
            return
        body = exchange.body
        transmitting = body is not None and not exchange.body_sent
        if body is not None and transmitting:
            exchange.body_sent = True
            body.stopProducing()
        response = exchange.response
        if response is None:
            if exchange.received:
                error: Exception = ResponseFailed([reason])
            elif transmitting:
                error = RequestTransmissionFailed([reason])
            else:
                error = ResponseNeverReceived([reason])
            self._pool._failed(exchange, error)
        elif exchange.complete:
            response._ended(RESPONSE_DONE)
        elif exchange.until_close:
            response._ended(Failure(PotentialDataLoss()))
        else:
            response._ended(Failure(ResponseFailed([reason])))

    # -- control

    def pause_reading(self) -> None:
        self._paused = True
        if self.transport is not None:
            self.transport.pauseProducing()

    def resume_reading(self) -> None:
        self._paused = False
        if self.transport is not None:
            self.transport.resumeProducing()

    def close(self) -> None:
        """Close after what is queued is written."""
        if self.transport is not None:
            self.transport.loseConnection()

    def abort(self) -> None:
        """Close at once: the connection cannot carry another request."""
        if not self.lost and self.transport is not None:
            self.transport.abortConnection()

    def _stray(self, data: bytes) -> None:
        if self._stray_logged:
            return
        self._stray_logged = True
        peer = self.transport.getPeer() if self.transport is not None else None
        _log.warn(
            "upstream {upstream} sent {count} bytes after a complete response:"
            " closing the connection instead of reusing it",
            upstream=f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}",
            count=len(data),
            event="upstream_stray_bytes",
        )


class _ConnectionFactory(Factory):
    noisy = False

    def __init__(self, pool: UpstreamClient, key: tuple[bytes, bytes, int]) -> None:
        self._pool = pool
        self._key = key

    def buildProtocol(self, addr: object) -> UpstreamConnection:
        return UpstreamConnection(self._pool, self._key)


# -- the pool and the IAgent -------------------------------------------------------


class _Origin:
    """An upstream ``scheme://host:port``: its pool key and ``Host`` value."""

    def __init__(self, key: tuple[bytes, bytes, int], host: bytes) -> None:
        self.key = key
        self.host = host
        self.secure = key[0] == b"https"


@implementer(IAgent)
class UpstreamClient:
    """
    Sends requests to upstreams over kept-alive connections: at most
    :attr:`max_idle_per_host` idle ones per ``(scheme, host, port)``, each
    closed after ``idle_timeout`` seconds unused or as soon as the upstream
    closes it. ``connector`` connects to each origin (connect timeout,
    TLS). Like ``Agent`` with a plain pool: no cookies, no redirects, no
    decoding.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        connector: UpstreamConnector,
        *,
        max_idle_per_host: int = 2,
        idle_timeout: float = IDLE_TIMEOUT,
        tcp_keepalive: TCPKeepalive | None = None,
    ) -> None:
        self._reactor = reactor
        self._connector = connector
        self.max_idle_per_host = max_idle_per_host
        self.idle_timeout = idle_timeout
        self.tcp_keepalive = tcp_keepalive
        #: idle connections by origin, the most recently used last
        self._connections: dict[tuple[bytes, bytes, int], list[UpstreamConnection]] = {}
        #: each idle connection's timer
        self._timeouts: dict[UpstreamConnection, IDelayedCall] = {}
        self._origins: dict[bytes, _Origin] = {}

    @property
    def maxPersistentPerHost(self) -> int:
        """``HTTPConnectionPool``'s name for :attr:`max_idle_per_host`."""
        return self.max_idle_per_host

    @property
    def cachedConnectionTimeout(self) -> float:
        """``HTTPConnectionPool``'s name for :attr:`idle_timeout`."""
        return self.idle_timeout

    def idle_connections(self) -> dict[tuple[bytes, bytes, int], list[tuple[UpstreamConnection, IDelayedCall]]]:
        """
        The idle connections by ``(scheme, host, port)``, the most recently
        used last, each with the timer that closes it (a copy: for metrics
        and tests, not to be changed through).
        """
        timers = self._timeouts
        return {key: [(c, timers[c]) for c in idle] for key, idle in self._connections.items() if idle}

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: BodyProducer | None = None,
    ) -> Deferred[IResponse]:
        """
        Send ``method uri`` with ``headers`` (a ``Host`` is added from ``uri``
        when missing) and the body; fires with the response head. Raises
        ``ValueError`` at once for a method, URI or header that cannot be sent.
        """
        pairs = [] if headers is None else [(k, v) for k, vs in headers.getAllRawHeaders() for v in vs]
        return self.send(method, uri, pairs, bodyProducer)

    def send(
        self,
        method: bytes,
        uri: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        body: BodyProducer | None = None,
        timeout: float | None = None,
    ) -> Deferred[IResponse]:
        """
        :meth:`request` with the headers as ``(name, value)`` pairs, sent in
        their order. Without a response head within ``timeout`` seconds (connect
        and replays included), the connection is aborted and the answer fails
        with :class:`GatewayTimeout`. A kept-alive connection's own timer
        serves for it: no timer is made per request.
        """
        answer = self._exchange(method, uri, headers, body, timeout, None).answer
        assert isinstance(answer, Deferred)
        return answer

    def send_to(
        self,
        answer: Answer,
        method: bytes,
        uri: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        body: BodyProducer | None = None,
        timeout: float | None = None,
    ) -> None:
        """
        :meth:`send`, the head (or the failure) handed to ``answer``'s
        functions instead of a Deferred's callbacks (the forwarder's way: one
        Deferred less per request). They may run before this returns.
        """
        self._exchange(method, uri, headers, body, timeout, answer)

    def _exchange(
        self,
        method: bytes,
        uri: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        body: BodyProducer | None,
        timeout: float | None,
        answer: Answer | None,
    ) -> _Exchange:
        origin, target = self._origin(uri)
        # (the forwarder puts its Host first)
        if not (headers and headers[0][0] == b"Host") and not any(name.lower() == b"host" for name, _ in headers):
            headers = [(b"Host", origin.host), *headers]
        head = request_head(method, target, headers, _framing(method, body))
        exchange = _Exchange(origin, method, head, body, answer)
        if timeout is not None:
            exchange.timeout = timeout
            exchange.deadline = self._reactor.seconds() + timeout
        self._start(exchange)
        return exchange

    def close_idle(self) -> Deferred[None]:
        """Close every idle connection; fires when they are closed."""
        closing: list[Deferred[None]] = []
        for connections in self._connections.values():
            for connection in connections:
                connection.closed = Deferred()
                closing.append(connection.closed)
                connection.close()
        for timer in self._timeouts.values():
            timer.cancel()
        self._connections, self._timeouts = {}, {}
        return gatherResults(closing).addCallback(lambda _: None)

    # -- origins and connections

    def _origin(self, uri: bytes) -> tuple[_Origin, bytes]:
        scheme_end = uri.find(b"://")
        start = scheme_end + 3
        end = uri.find(b"/", start)
        query = uri.find(b"?", start, None if end < 0 else end)
        if query >= 0 or end < 0:
            end = len(uri) if query < 0 else query
        base, target = uri[:end], uri[end:]
        if not target.startswith(b"/"):
            target = b"/" + target
        origin = self._origins.get(base)
        if origin is None:
            if scheme_end < 0:
                raise ValueError(f"Invalid URI {uri!r}")
            parsed = URI.fromBytes(base)
            if parsed.scheme not in (b"http", b"https"):
                raise SchemeNotSupported(f"unsupported scheme: {parsed.scheme!r}")
            default = (parsed.scheme, parsed.port) in ((b"http", 80), (b"https", 443))
            host = parsed.host if default else b"%b:%d" % (parsed.host, parsed.port)
            origin = _Origin((parsed.scheme, parsed.host, parsed.port), host)
            self._origins[base] = origin
        return origin, target

    def _start(self, exchange: _Exchange, reuse: bool = True) -> None:
        origin = exchange.origin
        if reuse:
            idle = self._connections.get(origin.key)
            while idle:
                connection = idle.pop()
                # its timer stays armed, doing nothing while the connection is in use:
                # resetting it in _put costs less than a new one per request
                timer = connection.timer = self._timeouts.pop(connection)
                if not connection.lost:
                    exchange.reused = True
                    if exchange.timeout is not None and exchange.timer is None:
                        # the connection's timer times the head (it is due later)
                        timer.reset(exchange.deadline - self._reactor.seconds())
                    connection.send(exchange)
                    return
        exchange.reused = False
        if exchange.timeout is not None and exchange.timer is None:
            exchange.timer = self._reactor.callLater(
                max(0.0, exchange.deadline - self._reactor.seconds()), self._timed_out, exchange
            )
        _, host, port = origin.key
        connecting = self._connector.connect_to(origin.secure, host, port, _ConnectionFactory(self, origin.key))
        exchange.connecting = connecting
        connecting.addCallbacks(
            self._connected, self._connect_failed, callbackArgs=(exchange,), errbackArgs=(exchange,)
        )

    def _connected(self, connection: IProtocol, exchange: _Exchange) -> None:
        assert isinstance(connection, UpstreamConnection)  # what _ConnectionFactory builds
        exchange.connecting = None
        if exchange.answer.called:  # cancelled meanwhile
            connection.close()
            return
        connection.send(exchange)

    def _connect_failed(self, reason: Failure, exchange: _Exchange) -> None:
        exchange.connecting = None
        if exchange.answer.called or reason.check(ConnectingCancelledError, CancelledError):
            return
        exchange.stop_timer()
        exchange.answer.errback(reason)

    def _timed_out(self, exchange: _Exchange) -> None:
        """No response head within the exchange's timeout: abort, answer 504's error."""
        exchange.timer = None
        if exchange.answer.called or exchange.response is not None:
            return
        exchange.answer.errback(
            Failure(GatewayTimeout(f"no response from the upstream within {exchange.timeout:g} s"))
        )
        exchange._cancel(exchange.answer)

    def _failed(self, exchange: _Exchange, error: Exception) -> None:
        """No response head: send again on a fresh connection where allowed, else fail."""
        if exchange.answer.called:
            return
        if exchange.reused and exchange.replayable and may_replay(exchange.method, error):
            exchange.connection = None
            exchange.received = False
            exchange.body_sent = exchange.body is None
            self._start(exchange, reuse=False)
            return
        if exchange.reused and not exchange.received:
            # most likely the upstream's idle close crossing the request: not held against it
            # (an answer it began and broke off, or malformed, is its own)
            mark_reused(error)
        exchange.stop_timer()
        exchange.answer.errback(Failure(error))

    def _put(self, connection: UpstreamConnection) -> None:
        """A connection that finished its exchange: kept idle, or closed if enough are."""
        idle = self._connections.setdefault(connection.key, [])
        idle.append(connection)
        timer, connection.timer = connection.timer, None
        if timer is not None and timer.active():
            timer.reset(self.idle_timeout)
        else:
            timer = self._reactor.callLater(self.idle_timeout, self._expire, connection)
        self._timeouts[connection] = timer
        if len(idle) > self.max_idle_per_host:
            oldest = idle.pop(0)
            self._timeouts.pop(oldest).cancel()
            oldest.close()

    def _expire(self, connection: UpstreamConnection) -> None:
        if self._timeouts.pop(connection, None) is None:
            # in use (_put arms a new one): its exchange's head may be due
            connection.timer = None
            exchange = connection._exchange
            if exchange is not None and exchange.timeout is not None and exchange.timer is None:
                self._timed_out(exchange)
            return
        self._connections[connection.key].remove(connection)
        connection.close()

    def _forget(self, connection: UpstreamConnection) -> None:
        """An idle connection closed (by the upstream, or by us): it leaves the pool with its timer."""
        idle = self._connections.get(connection.key, [])
        if connection in idle:
            idle.remove(connection)
            self._timeouts.pop(connection).cancel()
        if connection.closed is not None:
            connection.closed.callback(None)
