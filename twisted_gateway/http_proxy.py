"""
The plain-HTTP half of the gateway: forward one twisted.web request to an
upstream and stream the answer back, the way a reverse proxy users trust does.

Transparent: methods, paths, queries, encodings, cookies, redirects and status
lines pass through untouched (but for control characters in a reason phrase);
only hop-by-hop headers and client-set identity and address headers
(``headers.upstream_request_headers``) are dropped and ``X-Forwarded-*`` added.
A pooled upstream connection is reused only if nothing came after its response.
Streaming: a response body is written to the client as it arrives, and the
upstream is not read while the client is slow.
Bounded: request bodies over ``max_body_size`` are refused with 413 before the
upstream is contacted (and, with :class:`GatewayRequest`, before they are read).

The upstream is reached through the gateway's own HTTP/1.1 client
(:mod:`upstream_client`, a keep-alive pool per upstream), not through
``treq.HTTPClient.request``: that method always wraps ``ContentDecoderAgent``
(adds ``gzip`` to ``Accept-Encoding`` and decompresses), always wraps
``CookieAgent`` and upper-cases the method, and none of that can be switched
off.
"""

from __future__ import annotations

import io
import sys
import time
from urllib.parse import unquote_to_bytes
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence, cast

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectError, ConnectionRefusedError, DNSLookupError
from twisted.internet.error import TimeoutError as ConnectTimeout
from twisted.internet.interfaces import (
    IConsumer,
    IPushProducer,
    IReactorTCP,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import Cooperator, TaskFinished
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.components import Componentized
from twisted.web import resource, server
from twisted.web.client import ResponseDone
from twisted.web.http import NO_BODY_CODES, RESPONSES, HTTPChannel, PotentialDataLoss, datetimeToString, parse_qs
from twisted.web.http import Request as HTTPRequest
from twisted.web.http_headers import Headers
from twisted.web.iweb import (
    UNKNOWN_LENGTH,
    IAgent,
    IPolicyForHTTPS,
    IResponse,
)
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from twisted_gateway._bases import FileBodyProducer, Request
from twisted_gateway.access_log import ACCESS_FORMAT, EVENTS, OFF, AccessLogWriter, emit
from twisted_gateway.config import GatewaySettings
from twisted_gateway.errors import (
    BadGateway,
    BadRequest,
    GatewayError,
    GatewayTimeout,
    Overloaded,
    render_error,
)
from twisted_gateway.faults import KEEPALIVE_CLOSED, LOCAL, classify
from twisted_gateway.interfaces import IHTTPForwarder
from twisted_gateway.headers import (
    clean_reason_phrase,
    peer_host,
    rewrite_redirects,
    strip_hop_by_hop,
    tokens,
    upstream_host,
    upstream_origins,
    upstream_request_headers,
    valid_host,
)
from twisted_gateway.logs import redact_query
from twisted_gateway.routing import upstream_url
from twisted_gateway.streaming import ClientTransport, StreamingBody
from twisted_gateway.connector import UpstreamConnector
from twisted_gateway.tls import describe_tls_failure
from twisted_gateway.upstreams import Instance, InstanceRegistry, UpstreamPool, may_retry
from twisted_gateway.upstream_client import Answer, UpstreamClient, UpstreamResponse, may_replay  # noqa: F401 (may_replay: importable here)

#: Access-log events: one per request, structured fields, no raw URI.
access_log = Logger(namespace="twisted_gateway.access")
_log = Logger()

#: Request headers the gateway re-creates itself rather than forwarding: the
#: body is re-framed from what was received, and ``Expect`` was answered here.
_REFRAMED = frozenset({b"content-length", b"expect"})

#: nginx's code for "the client closed the connection before the response".
CLIENT_CLOSED = 499

#: Seconds a refused upload may keep sending (and being discarded) after its
#: 413, so that closing with unread data does not reset away the answer.
LINGER_SECONDS = 5.0


class BodyTooLarge(GatewayError):
    status = 413
    error = "body_too_large"


# -- protocol rules: plain data in, values out --------------------------------


def log_target(path: bytes, query: bytes, secrets: Iterable[str] = ()) -> str:
    """The request target as an access log shows it: normalised, redacted (:mod:`logs`' rule)."""
    redacted = redact_query(query, secrets)
    text = path.decode("latin-1")
    return text + "?" + redacted if redacted else text




def emit_access_event(fields: dict[str, str], status: int, sent: int, micros: int, outcome: str) -> None:
    """A forwarded request's access event (``[gateway] access_log = events``), to every log observer."""
    emit(access_log, fields, status, sent, micros, outcome, time.time())


def response_header_pairs(headers: Headers) -> list[tuple[bytes, bytes]]:
    """The upstream's response headers minus hop-by-hop ones, repeats kept."""
    pairs = [(name, value) for name, values in headers.getAllRawHeaders() for value in values]
    return strip_hop_by_hop(pairs)


#: The 502's detail when a request that cannot be sent twice met a kept-alive connection's close.
KEEPALIVE_CLOSED_DETAIL = (
    "the upstream closed its kept-alive connection as the request was sent;"
    " it may have arrived, so it was not sent again"
)


class ConnectFailed(BadGateway):
    """No connection to the upstream: safe to retry on another instance."""


def upstream_failure(reason: BaseException, settings: GatewaySettings) -> GatewayError:
    """The error a client gets when the upstream could not produce a response head."""
    if isinstance(reason, GatewayError):
        return reason
    if classify(reason) is LOCAL:
        return Overloaded(f"the gateway cannot open a connection now: {reason}")
    if isinstance(reason, ConnectTimeout):
        return ConnectFailed(
            f"could not connect to the upstream within {settings.connect_timeout:g} s",
            status=504,
            error="gateway_timeout",
        )
    if isinstance(reason, ConnectionRefusedError):
        return ConnectFailed("the upstream refused the connection")
    if isinstance(reason, (ConnectError, DNSLookupError)):
        return ConnectFailed("could not connect to the upstream")
    tls_failure = describe_tls_failure(reason)
    if tls_failure is not None:
        # No request reached the upstream: as safe to retry as a refused connection.
        return ConnectFailed(f"TLS with the upstream failed: {tls_failure}")
    if classify(reason) is KEEPALIVE_CLOSED:
        return BadGateway(KEEPALIVE_CLOSED_DETAIL)
    return BadGateway("the upstream closed the connection without a valid response")


def _body_too_large(limit: int) -> BodyTooLarge:
    return BodyTooLarge(f"the request body is larger than {limit} bytes")


def _body_size(request: server.Request) -> int:
    content = request.content
    if content is None:
        return 0
    content.seek(0, 2)
    size: int = content.tell()
    content.seek(0, 0)
    return size


# -- the request class: refuse large bodies before reading them ---------------


class GatewayRequest(Request):
    """
    A :class:`twisted.web.server.Request` for a proxy: a body over
    :attr:`max_body_size` is answered with 413 as soon as its ``Content-Length``
    is read (or, when chunked, as soon as it grows past the limit), without
    buffering it and without routing the request; form bodies are never parsed
    (a proxy forwards them as they are, even malformed).

    Install with ``site.requestFactory = GatewayRequest.for_settings(settings)``.
    """

    max_body_size: int = GatewaySettings.max_body_size
    _refused = False
    _received = 0
    #: the body as it arrives, when the route streams it (``request_buffering = off``)
    stream: StreamingBody | None = None
    #: the forwarding under way (:meth:`HTTPForwarder.forward`), told when the client leaves
    forwarding: _Forwarding | None = None
    #: called once when the request is finished or its client has left (``notifyFinish``'s
    #: moment, without a Deferred)
    when_done: Callable[[], None] | None = None
    #: request.args once read (None: not parsed yet)
    _args: dict[bytes, list[bytes]] | None = None

    @classmethod
    def for_settings(cls, settings: GatewaySettings) -> type[GatewayRequest]:
        """A request class enforcing ``settings.max_body_size``."""
        return type(cls.__name__, (cls,), {"max_body_size": settings.max_body_size})

    def __init__(self, channel: HTTPChannel, *args: object, **kwargs: object) -> None:
        if args or kwargs:
            kwargs["parsePOSTFormSubmission"] = False
            super().__init__(channel, *args, **kwargs)
            return
        # what server.Request.__init__ calls, without relaying *args and **kwargs
        # twice for each request (a channel that does not queue passes neither)
        HTTPRequest.__init__(self, channel, parsePOSTFormSubmission=False)
        Componentized.__init__(self)

    @property
    def args(self) -> dict[bytes, list[bytes]]:
        """
        The query's arguments, as twisted.web's ``request.args``: parsed when
        first read (a forwarded request passes its query on as it came, and a
        WebSocket's ``?token=`` is read by the authentication, never from here).
        """
        args = self._args
        if args is None:
            _, mark, query = self.uri.partition(b"?")
            args = self._args = parse_qs(query, 1) if mark else {}
        return args

    @args.setter
    def args(self, value: dict[bytes, list[bytes]]) -> None:
        self._args = value

    def _request_received(self, command: bytes, path: bytes, version: bytes) -> None:
        """
        ``http.Request.requestReceived`` for a request whose form body is never
        parsed (``parsePOSTFormSubmission=False``), but for the arguments, left
        to :attr:`args`.
        """
        if self.content is not None:
            self.content.seek(0, 0)
        self._args = None
        self.method, self.uri = command, path
        self.clientproto = version
        self.path = path.partition(b"?")[0]
        self.process()

    def process(self) -> None:
        """
        ``server.Request.process``, but for the ``Date`` header: formatted once
        a second (its resolution) rather than once a request, on the site's
        clock, as ``HTTPFactory`` does its log time.
        """
        self.site = site = self.channel.site  # type: ignore[attr-defined]  # a Site's channel
        headers = self.responseHeaders
        headers.setRawHeaders(b"Server", _SERVER)
        headers.setRawHeaders(b"Date", [http_date(site.reactor.seconds())])
        self.prepath = []
        self.postpath = [unquote_to_bytes(part) if b"%" in part else part for part in self.path[1:].split(b"/")]
        if self.path == b"*":
            self._handleStar()
            return
        try:
            found = site.getResourceFor(self)
            if resource._IEncodingResource.providedBy(found):
                encoder = found.getEncoder(self)
                if encoder is not None:
                    self._encoder = encoder
            self.render(found)
        except BaseException:
            self.processingFailed(Failure())

    def gotLength(self, length: int | None) -> None:
        channel: object = self.channel
        if not isinstance(channel, HTTPChannel):
            # HTTP/2 streams: HTTPForwarder.forward still refuses with 413.
            self.max_body_size = sys.maxsize
        elif channel.persistent and b"close" in tokens(
            self.requestHeaders.getRawHeaders(b"connection", [])
        ):
            # HTTPChannel.checkPersistence splits on spaces only and misses
            # "close" in "Connection: close, X-Foo".
            channel.persistent = False
            self.responseHeaders.setRawHeaders(b"connection", [b"close"])
        if length is not None and length > self.max_body_size:
            self._refuse_body()
            return
        if length != 0 and isinstance(channel, HTTPChannel) and self._streams(channel):
            self._start_streaming(channel, length)
            return
        super().gotLength(length)

    def _streams(self, channel: HTTPChannel) -> bool:
        """Whether this request's route streams bodies (the site's ``streams_body`` says)."""
        decide = getattr(getattr(channel, "site", None), "streams_body", None)
        return decide is not None and decide(channel._command, channel._path, self.requestHeaders)

    def _start_streaming(self, channel: HTTPChannel, length: int | None) -> None:
        """
        Process the request now, its body to follow: ``Expect: 100-continue``
        is left to the upstream (twisted.web would answer it here).
        """
        expect = self.requestHeaders.getRawHeaders(b"expect", [])
        self.requestHeaders.removeHeader(b"expect")
        self.stream = StreamingBody(
            length,
            cast("ClientTransport | None", channel.transport),  # TCP or TLS: a push producer too
            expect_continue=bool(expect) and expect[0].strip().lower() == b"100-continue",
        )
        self.content = io.BytesIO()
        self._request_received(channel._command, channel._path, channel._version)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self.max_body_size:
            self._refuse_body()
            return
        if self.stream is not None:
            self.stream.write(data)
            return
        super().handleContentChunk(data)

    def write(self, data: bytes) -> None:
        super().write(data)
        # a head the channel kept for the body's first bytes goes out now
        send_head = getattr(self.channel, "send_response_head", None)
        if send_head is not None:
            send_head()

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self.stream is not None:
            self.stream.finish()  # processed since its head: the body is complete now
        elif not self._refused:
            self._request_received(command, path, version)

    def finish(self) -> None:
        if self.stream is not None and not self.stream.complete and not self._refused:
            # answered before the body was all read: the rest is not for a next request
            self.channel.persistent = False
        super().finish()
        self._done()

    def _done(self) -> None:
        done, self.when_done = self.when_done, None
        if done is not None:
            done()

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        self._done()
        if self.forwarding is not None:
            self.forwarding.client_left()

    def _refuse_body(self) -> None:
        """
        Answer 413 now, then read and discard what the client still sends for
        up to :data:`LINGER_SECONDS` (closing a socket with unread input would
        reset the connection and could destroy the answer in flight).
        """
        self._refused = True
        # allHeadersReceived sends "100 Continue" after gotLength unless told otherwise.
        self.requestHeaders.removeHeader(b"expect")
        error = _body_too_large(self.max_body_size)
        channel = self.channel
        transport = channel.transport
        assert transport is not None  # the connection the body arrives on
        if self.forwarding is not None:
            self.forwarding.cancel()  # a streamed body: its upstream request ends here
        if self.stream is not None and self.startedWriting:
            cast(ITCPTransport, transport).abortConnection()  # the upstream's answer is on its way already (TCP or TLS)
            return
        transport.write(error.raw_response())
        channel.persistent = False
        channel.dataReceived = _discard  # type: ignore[method-assign]  # refused: what follows is dropped
        channel.setTimeout(LINGER_SECONDS)
        if ITCPTransport.providedBy(transport):
            transport.loseWriteConnection()
        else:
            channel.loseConnection()
        access_log.info(
            "refused a request body over {limit} bytes from {peer}: {status}",
            status=error.status,
            limit=self.max_body_size,
            peer=peer_host(self.getClientAddress()),
            outcome="refused",
        )


def _discard(data: bytes) -> None:
    """Drop bytes a refused client keeps sending."""


#: the ``Server`` header twisted.web sends
_SERVER = [server.version]
#: the second the ``Date`` header was last formatted for, and its value
_date_second = -1
_date_value = b""


def http_date(now: float) -> bytes:
    """``now`` as a ``Date`` header says it (``datetimeToString``'s), formatted once a second."""
    global _date_second, _date_value
    second = int(now)
    if second != _date_second:
        _date_second, _date_value = second, datetimeToString(second)
    return _date_value


# -- streaming the response body ----------------------------------------------


@implementer(IPushProducer)
class _BodyRelay(Protocol):
    """
    Receives an upstream response body (``IResponse.deliverBody``) and writes
    it to the client's request; registered as the request's push producer, so
    a slow client pauses the upstream connection. When the body ends it
    finishes the request itself (or cuts it, if the body failed) and calls
    ``ended(status, sent, outcome)``: no Deferred and no coroutine between the
    body's end and the request's. :meth:`cancel` (the client left) closes the
    upstream connection instead.
    """

    def __init__(
        self,
        request: server.Request,
        status: int,
        ended: Callable[[int, int, str], None],
        upload: _Upload | StreamingBody | None,
    ) -> None:
        self._request = request
        self._status = status
        self._ended = ended
        self._upload = upload
        self._paused = False
        self._stopped = False
        self._over = False
        self.sent = 0

    def dataReceived(self, data: bytes) -> None:
        self.sent += len(data)
        self._request.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._over:
            return
        self._over = True
        request = self._request
        try:
            request.unregisterProducer()
            if isinstance(reason.value, (ResponseDone, PotentialDataLoss)):  # Failure.check's, without its qual()
                upload = self._upload
                if isinstance(upload, _Upload) and upload.running:
                    # The upstream answered before reading the whole body (an early
                    # 413, say) and the agent still sends it (UpstreamClient stops
                    # it, another IAgent may not); twisted.web would close
                    # Request.content under it when the request finishes, so hand
                    # the file to the upload, which closes it when done.
                    request.content = None
                    upload.owns_file = True
                request.finish()
                outcome = "ok"
            else:
                # The head is already sent: end the connection so the client sees
                # a truncated body rather than a complete one.
                request.loseConnection()
                outcome = "upstream_body_failed"
        except Exception:
            _abandon(Failure(), request)
            outcome = "upstream_body_failed"
        self._ended(self._status, self.sent, outcome)

    def cancel(self) -> None:
        """The client left: stop the upstream, log it; the body's end no longer matters."""
        if self._over:
            return
        self._over = True
        self.stopProducing()
        self._ended(self._status, self.sent, "client_gone")

    def _upstream(self) -> IPushProducer | None:
        """The upstream connection's transport (TCP or TLS: a push producer)."""
        return cast("IPushProducer | None", self.transport)

    def pauseProducing(self) -> None:
        self._paused = True
        upstream = self._upstream()
        if upstream is not None:
            upstream.pauseProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        upstream = self._upstream()
        if upstream is not None:
            upstream.resumeProducing()

    def stopProducing(self) -> None:
        upstream = self._upstream()
        if not self._stopped and upstream is not None:
            self._stopped = True
            upstream.stopProducing()

    def reassert_pause(self) -> None:
        """``deliverBody`` resumes the upstream after connecting us: undo that if paused."""
        upstream = self._upstream()
        if self._paused and upstream is not None:
            upstream.pauseProducing()


class _Upload(FileBodyProducer):
    """
    A request body streamed from ``Request.content``; knows whether it is
    still going. Replayable: each start sends the whole body again (a retry on
    a fresh connection), so the file is left open for the request to close,
    unless :attr:`owns_file` was set when the request finished first.
    """

    running = False
    #: sent again whole when a pooled connection fails under it (:mod:`upstream_client`)
    replayable = True
    #: close the file when done (the request has finished and let go of it)
    owns_file = False

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        self._inputFile.seek(0)
        self.running = True
        return super().startProducing(consumer).addBoth(self._ended)

    def _writeloop(self, consumer: IConsumer) -> Iterator[None]:
        while True:
            data = self._inputFile.read(self._readSize)
            if not data:
                break
            consumer.write(data)
            yield None

    def stopProducing(self) -> None:
        """Stop sending (for good, or until a retry starts again); the file stays open."""
        task = getattr(self, "_task", None)
        if task is not None:
            try:
                task.stop()
            except TaskFinished:
                pass
        self._ended(None)

    def _ended(self, result: object) -> object:
        self.running = False
        if self.owns_file:
            self._inputFile.close()
        return result


class _Forwarding:
    """
    One request on its way through :meth:`HTTPForwarder.forward`, driven by
    callbacks: the sending to each upstream instance tried, the head's
    Deferred, then the body's relay, which finishes the request. It is the
    request's ``forwarding``: :meth:`cancel` (the client left, or its
    streamed body was refused) stops the wait for the head, or the relay.
    (A coroutine did the same with a Deferred and a resumption per step.)
    """

    def __init__(
        self,
        forwarder: HTTPForwarder,
        request: server.Request,
        pool: UpstreamPool,
        key: str | None,
        path: bytes,
        query: bytes,
        route_name: str,
        options: _Options,
    ) -> None:
        self._forwarder = forwarder
        self._request = request
        self._pool = pool
        self._key = key
        self._path = path
        self._query = query
        #: the client left (its connection was lost before the answer was finished)
        self.gone = False
        self._options = options
        self._started = forwarder._reactor.seconds()
        path_text, query_text = path.decode("latin-1"), redact_query(query, forwarder._secret_names)
        self._fields = dict(
            method=request.method.decode("latin-1"),
            path=path_text,
            query=query_text,
            target=path_text + "?" + query_text if query_text else path_text,  # log_target's
            route=route_name,
            upstream="",
            peer=peer_host(request.getClientAddress()),
        )
        # This event is the request's access-log line (the Site skips its own).
        request.gateway_logged = True  # type: ignore[attr-defined]
        self._stream: StreamingBody | None = getattr(request, "stream", None)
        self._size = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._candidates: Iterator[Instance] = iter(())
        self._instance: Instance | None = None
        self._upload: _Upload | StreamingBody | None = None
        #: the head to come (cancel() gives up on it), and which sending it answers
        self.head: Answer | Deferred[None] | None = None
        self._attempt = self._answered = 0
        self.relay: _BodyRelay | None = None

    def start(self, extra_headers: Sequence[tuple[bytes, bytes]], drop_headers: frozenset[bytes]) -> None:
        """Send the request to the first instance."""
        forwarder, request = self._forwarder, self._request
        try:
            try:
                size = self._size = _body_size(request)
                if size > forwarder._settings.max_body_size:
                    raise _body_too_large(forwarder._settings.max_body_size)
                self._headers = forwarder._upstream_headers(request, extra_headers, drop_headers, self._options)
                # A connect failure is retried on the next healthy instance (each at
                # most once) for idempotent methods; POST and PATCH are never retried;
                # a streamed body cannot be sent twice.
                retry = may_retry(request.method) and self._stream is None
                self._candidates = self._pool.candidates(self._key, retry=retry)
                self._send_next(None)
            except (CancelledError, GatewayError) as error:
                self._answer(error)
        except Exception:
            self._abandon()

    def _send_next(self, failure: GatewayError | None) -> None:
        """Send to the next instance, or raise ``failure`` (the last one's) when none is left."""
        instance = next(self._candidates, None)
        if instance is None:
            assert failure is not None  # candidates() gives one at least, or raises
            raise failure
        self._instance = instance
        self._fields["upstream"] = instance.url
        request = self._request
        # A request meeting a pooled connection the upstream closed is
        # sent again on a fresh one (upstream_client), body and all.
        if self._stream is not None:
            self._upload = self._stream
        elif self._size:
            content = request.content
            assert content is not None  # it has a size
            content.seek(0)
            self._upload = _Upload(content, cooperator=self._forwarder._cooperator)
        instance.acquire()
        forwarder = self._forwarder
        attempt = self._attempt = self._attempt + 1
        head = forwarder._send(
            request,
            upstream_url(instance.url, self._path, self._query).encode("ascii"),
            self._upload,
            self._headers,
            self._options.request_timeout or forwarder._settings.request_timeout,
            self._got_head,
            self._head_failed,
        )
        if self._answered < attempt == self._attempt:
            # not answered already (a Deferred may be "called" and still wait on another)
            self.head = head

    def _head_failed(self, reason: Failure) -> None:
        self.head, self._answered = None, self._attempt
        request, instance = self._request, self._instance
        try:
            try:
                error = reason.value
                assert error is not None  # (a Failure always holds its exception)
                if not isinstance(error, CancelledError):
                    # the cause stays attached: faults.classify judges it, not the answer
                    cause, error = error, upstream_failure(error, self._forwarder._settings)
                    error.__cause__ = cause
                if isinstance(error, (GatewayTimeout, BadGateway, Overloaded)) and instance is not None:
                    # passive health counts what faults.classify says is the
                    # upstream's; only connect failures go on to the next instance
                    # (a streamed body refused with 413 ended the attempt: the client's doing)
                    gone = self.gone or getattr(request, "_refused", False)
                    fault = classify(error.__cause__ or error, client_gone=gone)
                    if fault.counts:
                        self._pool.report_failure(instance, fault.reason)
                    if isinstance(error, ConnectFailed) and fault.counts:
                        self._release()
                        self._send_next(error)
                        return
                raise error
            except (CancelledError, GatewayError) as error:
                self._answer(error)
        except Exception:
            self._abandon()

    def _answer(self, error: CancelledError | GatewayError) -> None:
        """No response head: the client gets the error's answer (if still there), and the log its line."""
        request = self._request
        try:
            if getattr(request, "_refused", False):
                self._log(BodyTooLarge.status, 0, "refused")  # a streamed body grew too large
            elif isinstance(error, CancelledError) or self.gone:
                self._log(CLIENT_CLOSED, 0, "client_gone")
            else:
                body = render_error(request, error)
                request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
                request.write(body)
                request.finish()
                self._log(error.status, len(body), "error")
        finally:
            self._done()

    def _got_head(self, response: IResponse) -> None:
        self.head, self._answered = None, self._attempt
        request, instance = self._request, self._instance
        assert instance is not None
        try:
            self._pool.report_success(instance)
            self._forwarder._copy_head(request, response, upstream_origins(instance.url, self._options.host_header))
            # the relay finishes the request and the log line when the body ends
            relay = self.relay = _BodyRelay(request, response.code, self._ended, self._upload)
            request.registerProducer(relay, True)
            response.deliverBody(relay)
            relay.reassert_pause()
        except Exception:
            self._abandon()

    def _ended(self, status: int, sent: int, outcome: str) -> None:
        self._log(status, sent, outcome)
        self._done()

    def client_left(self) -> None:
        self.gone = True
        self.cancel()

    def cancel(self) -> None:
        if self.relay is not None:
            self.relay.cancel()
        elif self.head is not None:
            self.head.cancel()

    def _log(self, status: int, sent: int, outcome: str) -> None:
        forwarder = self._forwarder
        if forwarder._access is None and not forwarder._access_events:
            return
        now = forwarder._reactor.seconds()
        # in whole microseconds: the digits past them are the rounding of two time stamps,
        # and the lines write an int's digits from tables where a float's cost a fifth of the line
        micros = ((now - self._started) * 1e6).__round__()
        if forwarder._access is not None:
            forwarder._access.write(now, self._fields, status, sent, micros, outcome)
        else:
            emit(access_log, self._fields, status, sent, micros, outcome, now)

    def _release(self) -> None:
        instance, self._instance = self._instance, None
        if instance is not None:
            instance.release()

    def _abandon(self) -> None:
        """A bug, not an upstream failure: logged, the client not left hanging, the instance let go."""
        _abandon(Failure(), self._request)
        self._done()

    def _done(self) -> None:
        """
        The request is over: the instance let go, and the links between the
        request, this forwarding and its relay cut, so that they are freed as
        soon as they are dropped rather than by the cycle collector.
        """
        self._release()
        self.relay = self.head = None
        request = self._request
        if getattr(request, "forwarding", None) is self:
            request.forwarding = None  # type: ignore[attr-defined]


# -- the forwarder -------------------------------------------------------------


@dataclass(frozen=True)
class _Options:
    """A route's settings for one forwarded request."""

    underscores: bool = False
    host_header: str = "client"
    #: None: the gateway's ``request_timeout``
    request_timeout: float | None = None


@implementer(IHTTPForwarder)
class HTTPForwarder:
    """
    Forwards twisted.web requests to upstream base URLs over one persistent
    connection pool (``upstream_keepalive`` idle connections per host).

    ``agent`` is the :class:`IAgent` that carries requests upstream; by default
    this forwarder's :class:`~upstream_client.UpstreamClient` (:attr:`pool`)
    over an :class:`~connector.UpstreamConnector` (``connect_timeout``, TLS from ``tls_policy``). It must not decode content,
    follow redirects or keep cookies. ``secret_names`` are credential names
    (the ``[auth]`` query parameter and cookie) kept out of the access log.
    """

    def __init__(
        self,
        settings: GatewaySettings,
        reactor: IReactorTime,
        agent: IAgent | None = None,
        tls_policy: IPolicyForHTTPS | None = None,
        secret_names: Iterable[str] = (),
    ) -> None:
        self._settings = settings
        self._secret_names = tuple(secret_names)
        self._reactor = reactor
        self.pool = UpstreamClient(
            reactor,
            UpstreamConnector(cast(IReactorTCP, reactor), settings.connect_timeout, tls_policy),
            max_idle_per_host=settings.upstream_keepalive,
            tcp_keepalive=settings.tcp_keepalive,
        )
        self._agent: IAgent = self.pool if agent is None else agent
        self._cooperator = Cooperator(scheduler=lambda work: reactor.callLater(0, work))
        #: ``[gateway] access_log``: one event per request, none, or lines of the gateway's own
        self._access_events = settings.access_log == EVENTS
        self._access: AccessLogWriter | None = None
        if settings.access_log not in (EVENTS, OFF):
            self._access = AccessLogWriter.open(settings.access_log, settings.access_log_format, reactor)
        self._fixed_pools: dict[str, UpstreamPool] = {}
        self._options: dict[tuple[bool, str, float | None], _Options] = {}
        #: request headers no upstream gets, whatever the route
        self._never_forwarded = _REFRAMED | frozenset(
            name.encode("ascii") for name in settings.strip_request_headers
        )

    def close(self) -> Deferred[None]:
        """Close idle upstream connections, stop uploading, write the access lines left."""
        self._cooperator.stop()
        if self._access is not None:
            self._access.close()
        return self.pool.close_idle()

    def forward(
        self,
        request: server.Request,
        upstream: UpstreamPool | str,
        path: bytes,
        query: bytes,
        *,
        key: str | None = None,
        extra_headers: Iterable[tuple[bytes, bytes]] = (),
        drop_headers: frozenset[bytes] = frozenset(),
        route_name: str = "",
        underscores: bool = False,
        host_header: str = "client",
        request_timeout: float | None = None,
    ) -> int:
        """
        Send ``request`` to ``upstream_base + path (+ ?query)`` and stream the
        answer back; finishes the request itself and returns ``NOT_DONE_YET``.

        ``path`` is the normalised raw path and ``query`` the raw query, never
        ``request.postpath`` (percent-decoded). ``extra_headers`` are added for
        the upstream (identity headers); ``drop_headers`` are never forwarded,
        nor header names with ``_`` unless ``underscores``. ``host_header``
        is the route's (:func:`headers.upstream_host`); ``request_timeout``
        overrides the gateway's for this request.
        """
        # a GatewayRequest tells its forwarding when the client leaves; another
        # request is watched through a Deferred
        finished = None if isinstance(request, GatewayRequest) else request.notifyFinish()
        if isinstance(upstream, str):
            upstream = self._single_pool(upstream)
        settings = (underscores, host_header, request_timeout)
        options = self._options.get(settings)
        if options is None:
            options = self._options[settings] = _Options(*settings)  # a route's, made once
        forwarding = _Forwarding(self, request, upstream, key, path, query, route_name, options)
        if isinstance(request, GatewayRequest):
            request.forwarding = forwarding
        forwarding.start(
            tuple(extra_headers), frozenset(name.lower() for name in drop_headers) if drop_headers else drop_headers
        )
        if finished is not None:
            finished.addErrback(lambda _: forwarding.client_left())
        return NOT_DONE_YET

    def _single_pool(self, base: str) -> UpstreamPool:
        """A pool of one fixed base URL, for callers that route by themselves."""
        pool = self._fixed_pools.get(base)
        if pool is None:
            pool = UpstreamPool("", (base,), InstanceRegistry(self._reactor), max_fails=0)
            self._fixed_pools[base] = pool
        return pool

    def _upstream_headers(
        self,
        request: server.Request,
        extra_headers: Sequence[tuple[bytes, bytes]],
        drop_headers: frozenset[bytes],
        options: _Options,
    ) -> list[tuple[bytes, bytes]]:
        """The request's headers as every upstream attempt sends them."""
        incoming = [
            (name, value)
            for name, values in request.requestHeaders.getAllRawHeaders()
            for value in values
        ]
        hosts = request.requestHeaders.getRawHeaders(b"host", [])
        client_host = hosts[0] if len(hosts) == 1 and valid_host(hosts[0]) else None
        pairs = upstream_request_headers(
            incoming,
            peer=peer_host(request.getClientAddress()),
            scheme="https" if request.isSecure() else "http",
            # X-Forwarded-Host only ever from one valid Host
            host=client_host,
            trusted_proxies=self._settings.trusted_proxies,
            drop=drop_headers | self._never_forwarded if drop_headers else self._never_forwarded,
            underscores=options.underscores,
        )
        first = []
        stream = getattr(request, "stream", None)
        if stream is not None and stream.expect_continue:
            first.append((b"Expect", b"100-continue"))  # the upstream's to answer
        host = upstream_host(options.host_header, client_host)
        if host is not None:
            # without one, the client writes the upstream URL's host[:port]
            first.append((b"Host", host))
        return [*first, *pairs, *extra_headers]

    def _send(
        self,
        request: server.Request,
        url: bytes,
        upload: _Upload | StreamingBody | None,
        headers: list[tuple[bytes, bytes]],
        timeout: float,
        on_head: Callable[[IResponse], None],
        on_failure: Callable[[Failure], None],
    ) -> Answer | Deferred[None]:
        """
        Send the request: the head goes to ``on_head``, a failure to
        ``on_failure`` (either may run before this returns); the result's
        ``cancel`` gives up. :class:`BadRequest` for a request that cannot be sent.
        """
        agent = self._agent
        try:
            if isinstance(agent, UpstreamClient):
                # no Deferred; the head is timed on the kept-alive connection's timer
                answer = Answer(on_head, on_failure)
                agent.send_to(answer, request.method, url, headers, upload, timeout)
                return answer
            # an IAgent given to the forwarder
            pending = agent.request(request.method, url, _as_headers(headers), upload)
        except ValueError as e:
            raise BadRequest(f"the request cannot be forwarded: {e}") from None
        pending.addTimeout(timeout, self._reactor, self._head_timed_out)
        return pending.addCallbacks(on_head, on_failure)

    def _head_timed_out(self, result: object, timeout: float) -> None:
        raise GatewayTimeout(f"no response from the upstream within {timeout:g} s")

    def _copy_head(
        self, request: server.Request, response: IResponse, origins: Sequence[bytes] = ()
    ) -> None:
        """
        Status line and end-to-end headers as the upstream sent them, but for
        redirects naming one of the upstream's own ``origins`` (its address, or
        the fixed ``host_header``), which name the client's host instead.
        """
        phrase = clean_reason_phrase(response.phrase) if response.phrase else None
        request.setResponseCode(response.code, phrase or RESPONSES.get(response.code))
        request.defaultContentType = None
        if isinstance(response, UpstreamResponse):
            pairs = strip_hop_by_hop(response.raw_headers)  # no Headers built and read back
        else:
            pairs = response_header_pairs(response.headers)
        if origins:  # host_header = upstream or a name: redirects may name the upstream
            pairs = rewrite_redirects(pairs, origins, _client_origin(request))
        for name, values in _grouped(pairs):
            request.responseHeaders.setRawHeaders(name, values)
        if (
            response.length is not UNKNOWN_LENGTH
            and request.method != b"HEAD"
            and response.code not in NO_BODY_CODES
        ):
            request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % response.length])


def _as_headers(pairs: Iterable[tuple[bytes, bytes]]) -> Headers:
    headers = Headers()
    for name, value in pairs:
        headers.addRawHeader(name, value)
    return headers


def _client_origin(request: server.Request) -> bytes | None:
    """``scheme://host`` as the client addressed the gateway (None without one valid Host)."""
    hosts = request.requestHeaders.getRawHeaders(b"host", [])
    if len(hosts) != 1 or not valid_host(hosts[0]):
        return None
    return (b"https://" if request.isSecure() else b"http://") + hosts[0]


def _abandon(reason: Failure, request: server.Request) -> None:
    """A bug, not an upstream failure: log it and do not leave the client hanging."""
    if reason.check(CancelledError):
        return  # the client left, or its streamed body was refused: already answered
    _log.failure("forwarding {method} failed", reason, method=request.method)
    if request.producer is not None and request.channel is not None:
        request.unregisterProducer()
    if not request.finished and request.channel is not None:
        request.loseConnection()


def _grouped(pairs: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, list[bytes]]]:
    groups: dict[bytes, tuple[bytes, list[bytes]]] = {}
    for name, value in pairs:
        groups.setdefault(name.lower(), (name, []))[1].append(value)
    return list(groups.values())
