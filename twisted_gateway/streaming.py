"""
Request bodies streamed to the upstream as they arrive (``request_buffering = off``).

By default a body is stored whole before the upstream sees the request, which
keeps retries possible but makes a large upload reach its handler late, and
lets an upstream that would refuse (401, 404, 413) say so only after the whole
body was sent. With streaming the request goes upstream as soon as its head
is read, the body follows chunk by chunk with backpressure both ways (a slow
upstream stops the gateway reading from the client), and ``Expect:
100-continue`` is the upstream's to answer: its ``100 Continue`` is relayed,
or its final answer goes out before the client sent its body.
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

#: Bytes held while the upstream connection is not ready; beyond, the client is paused.
HELD_BYTES = 64 * 1024


class ClientTransport(Protocol):
    """What the body needs of the client connection's transport."""

    def write(self, data: bytes) -> None: ...

    def pauseProducing(self) -> None: ...

    def resumeProducing(self) -> None: ...


@implementer(IBodyProducer, IPushProducer)
class StreamingBody:
    """
    The body of one client request, produced for the upstream's ``Agent`` as
    the client's bytes arrive. ``client`` is the client connection's transport
    (paused and resumed as the upstream's transport pauses and resumes this).
    """

    def __init__(self, length: int | None, client: ClientTransport | None, expect_continue: bool = False) -> None:
        self.length = UNKNOWN_LENGTH if length is None else length
        self.expect_continue = expect_continue
        #: the whole body arrived from the client
        self.complete = False
        self._client = client
        self._held: list[bytes] = []
        self._held_size = 0
        self._consumer: IConsumer | None = None
        self._done: Deferred[None] | None = None
        self._paused = False
        self._client_paused = False
        self._continued = False
        self._stopped = False

    # -- from the client ---------------------------------------------------------

    def write(self, data: bytes) -> None:
        """A chunk of the body from the client."""
        if self._stopped:
            return
        if self._consumer is None:
            self._held.append(data)
            self._held_size += len(data)
            if self._held_size > HELD_BYTES:
                self._pause_client()
            return
        self._consumer.write(data)

    def finish(self) -> None:
        """The client's body is complete."""
        self.complete = True
        if self._consumer is not None and self._done is not None and not self._done.called:
            self._done.callback(None)

    # -- for the upstream (IBodyProducer) ---------------------------------------------

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        self._consumer = consumer
        self._done = Deferred()
        held, self._held, self._held_size = self._held, [], 0
        for data in held:
            consumer.write(data)
        if self.complete:
            self._done.callback(None)
        elif not self._paused:
            self._resume_client()
        return self._done

    def pauseProducing(self) -> None:
        """The upstream's transport is full: stop reading from the client."""
        self._paused = True
        self._pause_client()

    def resumeProducing(self) -> None:
        self._paused = False
        self._resume_client()

    def stopProducing(self) -> None:
        """The upstream request ended (answered, failed or cancelled): the rest is not sent."""
        self._stopped = True
        self._held = []
        self._resume_client()

    def continued(self) -> None:
        """The upstream said ``100 Continue``: the client may send its body."""
        if self.expect_continue and not self._continued:
            self._continued = True
            if self._client is not None:
                self._client.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _pause_client(self) -> None:
        if not self._client_paused and not self.complete and self._client is not None:
            self._client_paused = True
            self._client.pauseProducing()

    def _resume_client(self) -> None:
        if self._client_paused and self._client is not None:
            self._client_paused = False
            self._client.resumeProducing()

