"""
An upstream process for ``bench/soak.py``: the demo chat-service, or an HTTP +
WebSocket echo that can misbehave on request.

Both close idle keep-alive connections after ``--idle`` seconds (as gunicorn
and Node do), so the gateway's pooled connections are closed under it all the
time, and a quiet gateway holds no pooled connection a few seconds later.

The echo's misbehaviours, chosen by the request (the soak's fault schedule):

- ``GET /v1/echo/bytes?n=N``: N bytes; ``POST /v1/echo/post``: the body's size and sha256;
- ``GET /v1/echo/slow?s=S``: the answer after S seconds (past ``request_timeout``);
- ``GET /v1/echo/reset``: a head, part of the body, then a TCP reset;
- ``/v1/echo/ws``: echo; ``?delay=S`` answers the handshake after S seconds,
  ``?pause=S`` stops reading for S seconds after opening; a text message
  ``whoami`` is answered with the instance name, ``close:CODE`` is answered
  with a close of that code.

    python bench/soak_upstream.py --kind echo --name echo1 --listen tcp:0:interface=127.0.0.1

Prints one JSON line ``{"event": "listening", "port": N}`` once listening.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from typing import Sequence

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerProtocol
from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from twisted_gateway.demo.chat import build_chat_site
from twisted_gateway.demo.echo import build_echo_factory

#: The body pattern of ``/v1/echo/bytes`` (the client checks what it got).
PATTERN = bytes(range(256))


def pattern(n: int) -> bytes:
    """The first ``n`` bytes of the repeated :data:`PATTERN`."""
    whole, rest = divmod(n, len(PATTERN))
    return PATTERN * whole + PATTERN[:rest]


class SoakEchoProtocol(WebSocketServerProtocol):
    """The demo echo, plus the soak's commands (see the module docstring)."""

    def onConnect(self, request):
        self._pause = float(request.params.get("pause", ["0"])[0])
        delay = float(request.params.get("delay", ["0"])[0])
        if delay <= 0:
            return None
        d: Deferred = Deferred()
        call = self.factory.reactor.callLater(delay, d.callback, None)
        d.addErrback(lambda _: call.cancel() if call.active() else None)
        self._delayed = d
        return d

    def onOpen(self) -> None:
        if self._pause > 0:
            self.transport.pauseProducing()
            self.factory.reactor.callLater(self._pause, self._resume)

    def _resume(self) -> None:
        if self.transport is not None and self.state == self.STATE_OPEN:
            self.transport.resumeProducing()

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if not isBinary and payload == b"whoami":
            self.sendMessage(self.factory.name.encode(), False)
        elif not isBinary and payload.startswith(b"close:"):
            # sendClose refuses 1001 and 1011: they are the server's to send, as here
            self.sendCloseFrame(code=int(payload[6:]), reasonUtf8=b"asked to")
        else:
            self.sendMessage(payload, isBinary)

    def connectionLost(self, reason) -> None:
        delayed = getattr(self, "_delayed", None)
        if delayed is not None and not delayed.called:
            delayed.cancel()
        super().connectionLost(reason)


class Bytes(Resource):
    isLeaf = True

    def render_GET(self, request) -> bytes:
        n = int(request.args.get(b"n", [b"64"])[0])
        request.setHeader(b"content-type", b"application/octet-stream")
        return pattern(n)


class Post(Resource):
    isLeaf = True

    def render_POST(self, request) -> bytes:
        body = request.content.read()
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"size": len(body), "sha256": hashlib.sha256(body).hexdigest()}).encode()

    render_PUT = render_POST


class Slow(Resource):
    """Answers after ``?s=`` seconds; forgets the answer if the client left."""

    isLeaf = True

    def __init__(self, reactor) -> None:
        super().__init__()
        self.reactor = reactor

    def render_GET(self, request) -> int:
        seconds = float(request.args.get(b"s", [b"1"])[0])
        call = self.reactor.callLater(seconds, self._answer, request)
        request.notifyFinish().addErrback(lambda _: call.cancel() if call.active() else None)
        return NOT_DONE_YET

    @staticmethod
    def _answer(request) -> None:
        request.write(b"late")
        request.finish()


class Reset(Resource):
    """
    A head promising 100,000 bytes, 10,000 of them, then a TCP reset half a
    second later: late enough that a busy reactor has written the head first.
    """

    isLeaf = True

    def __init__(self, reactor) -> None:
        super().__init__()
        self.reactor = reactor

    def render_GET(self, request) -> int:
        request.setHeader(b"content-length", b"100000")
        request.write(pattern(10000))
        transport = request.channel.transport
        self.reactor.callLater(0.5, transport.abortConnection)
        return NOT_DONE_YET


class Health(Resource):
    isLeaf = True

    def render_GET(self, request) -> bytes:
        return b"ok"


def build_soak_echo_factory(reactor, name: str):
    """The WebSocket echo of the soak's upstream called ``name``."""
    factory = build_echo_factory(reactor)
    factory.protocol = SoakEchoProtocol
    factory.name = name
    return factory


def build_echo_site(reactor, name: str) -> Site:
    echo = Resource()
    echo.putChild(b"ws", WebSocketResource(build_soak_echo_factory(reactor, name)))
    echo.putChild(b"bytes", Bytes())
    echo.putChild(b"post", Post())
    echo.putChild(b"slow", Slow(reactor))
    echo.putChild(b"reset", Reset(reactor))
    v1 = Resource()
    v1.putChild(b"echo", echo)
    root = Resource()
    root.putChild(b"v1", v1)
    root.putChild(b"health", Health())
    site = Site(root, reactor=reactor)
    site.log = lambda request: None  # the soak's load would fill the disk
    return site


def main(argv: Sequence[str] | None = None) -> int:
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString
    from twisted.logger import globalLogBeginner, textFileLogObserver

    parser = argparse.ArgumentParser(prog="bench/soak_upstream.py")
    parser.add_argument("--kind", choices=("chat", "echo"), required=True)
    parser.add_argument("--name", default="upstream")
    parser.add_argument("--listen", default="tcp:0:interface=127.0.0.1")
    parser.add_argument("--idle", type=float, default=2.0, help="keep-alive idle timeout, seconds")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    if args.kind == "chat":
        site = build_chat_site(reactor)
        site.log = lambda request: None
    else:
        site = build_echo_site(reactor, args.name)
    site.timeOut = args.idle

    def listening(port) -> None:
        print(json.dumps({"event": "listening", "port": port.getHost().port}), flush=True)

    def failed(failure) -> None:
        print(json.dumps({"event": "error", "error": str(failure.value)}), flush=True)
        reactor.stop()

    serverFromString(reactor, args.listen).listen(site).addCallbacks(listening, failed)
    reactor.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
