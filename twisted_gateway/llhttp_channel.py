"""
The client-facing HTTP/1.1 parser: twisted.web's ``HTTPChannel`` with its
request parsing done by llhttp (through ``httptools``, which the upstream
client uses too) instead of ``LineReceiver`` line by line in Python.

Everything past parsing is ``HTTPChannel``'s own: the same ``Request``
objects (made by the site's ``requestFactory``), the same resource tree, the
same writing, producers and transport (a WebSocket hand-over takes it as
before). llhttp is strict where twisted.web was: ``Transfer-Encoding`` with
``Content-Length``, a repeated ``Content-Length``, obs-fold, bare CR or LF
and control characters in a value are refused with 400.

llhttp cannot stop in the middle of what it was given, so requests that a
client pipelines in one read are parsed ahead of their turn: each waits as a
:class:`_Message` (its head and the body read so far) and becomes a
``Request`` when the ones before it are answered, in order, as
``HTTPChannel`` answers them. What arrives while a request is being answered
is kept unparsed until it is, as ``HTTPChannel`` keeps it.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser
from twisted.web.http import (
    _ChunkedTransferDecoder,
    _IdentityTransferDecoder,
    _MalformedChunkedDataError,
)
from twisted.web.http import Request
from twisted.web.http_headers import Headers
from twisted.web.iweb import INonQueuedRequestFactory, IRequest

from twisted_gateway._bases import HTTPChannel


class _Stop(Exception):
    """Raised in a parser callback to stop parsing (what follows is not read)."""


class _Message:
    """One request as llhttp reads it: its head, then its body until it is complete."""

    __slots__ = (
        "method", "path", "version", "headers", "length", "body", "complete", "request", "upgrade", "asks", "held"
    )

    def __init__(self, method: bytes, path: bytes, version: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        self.method = method
        self.path = path
        self.version = version
        self.headers = headers
        #: the body's length from the head: ``None`` when chunked
        self.length: int | None = 0
        #: body bytes read before the request's turn (when it waits behind others)
        self.body: list[bytes] = []
        self.complete = False
        #: made when its turn comes
        self.request: Request | None = None
        self.upgrade = False
        #: whether the head has a ``Cookie`` or an ``Expect`` (twisted.web reads them)
        self.asks = False
        #: an upgrade without a body, offered to :attr:`LlhttpChannel.upgrade_taker` when complete
        self.held = False


class LlhttpChannel(HTTPChannel):
    """
    ``HTTPChannel`` parsing with llhttp. The head's size (its lines as sent,
    without line ends, as ``HTTPChannel`` counts it) is held to
    ``totalHeadersSize``; a head or request llhttp refuses is answered by
    ``_respondToBadRequestAndDisconnect``, once the requests before it are.
    """

    #: what the parser reads: ``None`` between messages
    _message: _Message | None = None
    #: bytes of the head read so far (a head that never ends is cut off)
    _head_bytes = 0
    #: set while llhttp is running (its callbacks must not feed it again)
    _feeding = False
    _resuming = False
    #: a request llhttp refused, answered when the requests before it are
    _refused_head = False
    #: an upgrade request's body, read after llhttp stopped at its head
    _upgrade_body: _IdentityTransferDecoder | _ChunkedTransferDecoder | None = None
    #: takes an upgrade request without a body from its head alone, before a
    #: ``Request`` is made of it: ``(channel, method, target, version, headers)``
    #: with the headers as ``Headers`` holds them; True when it took the
    #: connection, False (having changed nothing) to leave it a ``Request``
    upgrade_taker: Callable[[LlhttpChannel, bytes, bytes, bytes, dict[bytes, list[bytes]]], bool] | None = None

    def __init__(self) -> None:
        super().__init__()
        self._parser = HttpRequestParser(self)
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        #: messages parsed ahead, waiting for the requests before them to be answered
        self._waiting: deque[_Message] = deque()

    # -- bytes in ----------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()
        if self._handlingRequest or self._feeding:
            # kept until the request being answered is (HTTPChannel.rawDataReceived)
            self._dataBuffer.append(data)
            if sum(map(len, self._dataBuffer)) > self._optimisticEagerReadSize and not self._waitingForTransport:
                self._networkProducer.pauseProducing()
            return
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        if self._upgrade_body is not None:
            self._read_upgrade_body(data)
            return
        self._feeding = True
        try:
            self._parser.feed_data(data)
        except HttpParserUpgrade as upgrade:
            self._feeding = False
            self._upgraded(data[upgrade.args[0] :])
            return
        except HttpParserError as error:
            self._feeding = False
            if not isinstance(error.__context__, _Stop):
                cause = error.__context__
                if cause is not None and not isinstance(cause, HttpParserError):
                    raise cause  # a fault of ours in a callback, not the client's
                self._refuse_head()
            return
        finally:
            self._feeding = False
        if not self._headers_done:
            # a head still arriving: held to the limit as it comes
            self._head_bytes += len(data)
            if self._head_bytes > self.totalHeadersSize:
                self._receivedHeaderSize = self._head_bytes
                self._refuse_head()
                return
        self._resume()

    _headers_done = True
    #: whether the site's ``requestFactory`` takes the channel only (asked once)
    _non_queued: bool | None = None

    def receiving(self) -> bool:
        """Whether a request has begun to arrive and is not yet a ``Request`` (or waits its turn)."""
        return not self._headers_done or bool(self._waiting) or self._message is not None

    # -- llhttp's callbacks -----------------------------------------------------

    def on_message_begin(self) -> None:
        if not self.persistent:
            # after a request that ends its connection, nothing more is read
            self.dataReceived = _discard  # type: ignore[method-assign]
            raise _Stop()
        self._url = b""
        self._headers = []
        self._headers_done = False
        self._head_bytes = 0
        self._message = None

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._headers_done:
            self._headers.append((name, value.rstrip(b" \t")))
        # else: a chunked body's trailer, dropped as HTTPChannel drops it

    def on_headers_complete(self) -> None:
        self._headers_done = True
        parser = self._parser
        version = parser.get_http_version()
        if version == "0.9":
            raise HttpParserError("HTTP/0.9")
        url = self._url
        method: bytes = parser.get_method()
        headers = self._headers
        size = len(method) + len(url) + 10  # the request line: "METHOD URL HTTP/1.1"
        length: int | None = 0
        asks = False
        for name, value in headers:
            size += len(name) + len(value) + 2
            lower = name.lower()
            if lower == b"content-length":
                length = int(value)
            elif lower == b"transfer-encoding":
                length = None  # llhttp has checked it ends with "chunked"
            elif lower == b"cookie" or lower == b"expect":
                asks = True
        said = _VERSIONS.get(version)
        if said is None:
            said = b"HTTP/" + version.encode("ascii")
        message = _Message(method, url, said, headers)
        message.length = length
        message.asks = asks
        message.upgrade = parser.should_upgrade()
        self._message = message
        if size > self.totalHeadersSize or len(headers) > self.maxHeaders:
            self._receivedHeaderSize = size
            raise HttpParserError("head too large")
        if self._handlingRequest or self._waiting:
            self._waiting.append(message)
            return
        if message.upgrade and length == 0 and self.upgrade_taker is not None:
            message.held = True  # complete already: on_message_complete offers it first
            return
        self._begin(message)

    def on_body(self, chunk: bytes) -> None:
        message = self._message
        assert message is not None  # a body follows a head
        request = message.request
        if request is None:
            message.body.append(chunk)
        else:
            request.handleContentChunk(chunk)

    def on_message_complete(self) -> None:
        message = self._message
        assert message is not None  # the end follows a head
        self._message = None
        if message.upgrade and message.length != 0:
            # llhttp stops at an upgrade request's head: its body is read by hand
            self._message = message
            return
        message.complete = True
        if message.request is not None:
            self.allContentReceived()
        elif message.held and not self._taken(message):
            self._begin(message)

    def _taken(self, message: _Message) -> bool:
        """Whether :attr:`upgrade_taker` took ``message`` (an upgrade without a body)."""
        taker = self.upgrade_taker
        assert taker is not None  # a held message was held for it
        if message.asks and any(name.lower() == b"expect" for name, _ in message.headers):
            return False  # HTTPChannel answers an Expect before the request is served
        headers: dict[bytes, list[bytes]] = {}
        for name, value in message.headers:
            spelt = _spelt.get(name) or _spell(name)
            values = headers.get(spelt)
            if values is None:
                headers[spelt] = [value]
            else:
                values.append(value)
        return taker(self, message.method, message.path, message.version, headers)

    # -- requests, in order ---------------------------------------------------------

    def _begin(self, message: _Message) -> None:
        """Make ``message``'s ``Request`` and give it what was read of it."""
        factory = self.requestFactory
        non_queued = self._non_queued
        if non_queued is None:
            non_queued = self._non_queued = INonQueuedRequestFactory.providedBy(factory)
        request = factory(self) if non_queued else factory(self, len(self.requests))
        self.requests.append(request)
        message.request = request
        add = request.requestHeaders.addRawHeader
        for name, value in message.headers:
            add(name, value)
        self._command = message.method
        self._path = message.path
        self._version = message.version
        self.length = message.length
        self._asks = message.asks
        if message.upgrade:
            # a connection that asked to change protocols and did not is not reused
            self.persistent = False
        self.allHeadersReceived()
        if message.upgrade and not self.persistent:
            request.responseHeaders.setRawHeaders(b"connection", [b"close"])
        for chunk in message.body:
            request.handleContentChunk(chunk)
        message.body = []
        if message.complete:
            self.allContentReceived()

    #: whether the request being begun has a ``Cookie`` or an ``Expect``
    _asks = True

    def allHeadersReceived(self) -> None:
        if self._asks:
            super().allHeadersReceived()
            return
        # HTTPChannel's, less what it asks of a head with no Cookie and no Expect
        # (parseCookies finds none; no Expect, no 100 Continue)
        request = self.requests[-1]
        self.persistent = self.checkPersistence(request, self._version)
        request.gotLength(self.length)

    def checkPersistence(self, request: IRequest, version: bytes) -> bool:
        return super().checkPersistence(request, version) and bool(self.persistent)

    def allContentReceived(self) -> None:
        # HTTPChannel's, without its line parser's state
        command, path, version = self._command, self._path, self._version
        self.length = 0
        if self.timeOut:
            self._savedTimeOut = self.setTimeout(None)
        self._handlingRequest = True
        self.requests[-1].requestReceived(command, path, version)

    def requestDone(self, request: IRequest) -> None:
        if request is not self.requests[0]:
            raise TypeError
        del self.requests[0]
        if not self._waitingForTransport:
            self._networkProducer.resumeProducing()
        if not self.persistent:
            self.loseConnection()
            return
        self._handlingRequest = False
        if self._savedTimeOut:
            self.setTimeout(self._savedTimeOut)
        if not self._feeding:
            self._resume()

    def _resume(self) -> None:
        """Start the requests parsed ahead, then parse what was kept meanwhile."""
        if self._resuming:
            return  # a request answered at once while an earlier one started
        self._resuming = True
        try:
            while not self._handlingRequest and self.transport is not None and self.persistent:
                if self._waiting:
                    self._begin(self._waiting.popleft())
                elif self._refused_head and not self.requests:
                    self._refused_head = False
                    self._respondToBadRequestAndDisconnect()
                elif self._dataBuffer and not self._refused_head:
                    data = b"".join(self._dataBuffer)
                    self._dataBuffer = []
                    self._feed(data)
                else:
                    break
        finally:
            self._resuming = False

    def _refuse_head(self) -> None:
        """
        Answer 400 (431 for a head too large) now if the request refused is
        the one being read, else once the requests before it are answered.
        """
        self.dataReceived = _discard  # type: ignore[method-assign]
        if not self.persistent:
            return  # bytes after a request that ends the connection: not read
        message = self._message
        if message is not None and message.request is None and self._waiting and self._waiting[-1] is message:
            self._waiting.pop()  # parsed ahead and broken: never made a Request
        if (message is None or message.request is None) and (self.requests or self._waiting):
            self._refused_head = True
            return
        self._respondToBadRequestAndDisconnect()

    def handed_over(self) -> None:
        """
        Another protocol took the connection (a WebSocket hand-over): this
        channel hears of it no more. Its parser (which holds the channel's
        callbacks) and its requests let go, so that it is freed at once, not
        by the cycle collector.
        """
        del self._parser
        self.requests = []
        self._waiting.clear()
        self._message = None

    # -- an upgrade request that was not handed over --------------------------------

    def _upgraded(self, rest: bytes) -> None:
        """
        llhttp stopped after an upgrade request's head; what follows is its
        body, if it has one, or the new protocol's (read by whoever took the
        connection: its ``Request`` replays only the head and body).
        """
        message = self._message
        if message is not None and message.length != 0:
            self._upgrade_body = (
                _IdentityTransferDecoder(message.length, self.on_body, self._upgrade_body_read)
                if message.length is not None
                else _ChunkedTransferDecoder(self.on_body, self._upgrade_body_read)
            )
            if rest:
                self._read_upgrade_body(rest)
            return
        self._resume()

    def _read_upgrade_body(self, data: bytes) -> None:
        decoder = self._upgrade_body
        assert decoder is not None  # set by _upgraded
        try:
            decoder.dataReceived(data)
        except _MalformedChunkedDataError:
            self._upgrade_body = None
            self._refuse_head()

    def _upgrade_body_read(self, rest: bytes) -> None:
        """The upgrade request's body is complete (what follows it is not read)."""
        self._upgrade_body = None
        message = self._message
        assert message is not None  # the upgrade request, kept by on_message_complete
        self._message = None
        message.complete = True
        if message.request is not None:
            self.allContentReceived()
        else:
            self._resume()


#: llhttp's version as a request line says it
_VERSIONS = {"1.1": b"HTTP/1.1", "1.0": b"HTTP/1.0"}

#: header names as a client sent them, and as ``Headers`` spells them
_spelt: dict[bytes, bytes] = {}


def _spell(name: bytes) -> bytes:
    """
    ``name`` as twisted.web's ``Headers`` spells it (Header-Case, but for its
    exceptions), asked of a ``Headers`` once per name: at most 10,000 kept,
    as ``Headers`` keeps its own (a client may send any number of names).
    """
    probe = Headers()
    probe.addRawHeader(name, b"")
    for spelt, _ in probe.getAllRawHeaders():
        if len(_spelt) < 10_000:
            _spelt[name] = spelt
        return spelt
    raise AssertionError("a Headers with one header holds it")


def _discard(data: bytes) -> None:
    """Drop what a client sends after what ends its connection."""

