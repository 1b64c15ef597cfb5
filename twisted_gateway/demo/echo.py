"""
A small WebSocket echo service: the upstream for conformance runs and benchmarks.

Every message comes back as it came in: text stays text, binary stays binary, and
message boundaries are kept. It accepts ``permessage-deflate`` offers, so a
gateway that mirrors a client's compression offer upstream gets it accepted, and
it has no message size limit of its own, so the gateway's limit is the one that
is tested.

Run it on its own with::

    python -m twisted_gateway.demo.echo --listen tcp:9101:interface=127.0.0.1
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from autobahn.websocket.compress import (
    PerMessageCompressOffer,
    PerMessageDeflateOffer,
    PerMessageDeflateOfferAccept,
)
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IListeningPort, IReactorTCP
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_gateway._bases import WebSocketServerFactory, WebSocketServerProtocol

log = Logger()


def accept_deflate(offers: Sequence[PerMessageCompressOffer]) -> PerMessageDeflateOfferAccept | None:
    """Accept the first ``permessage-deflate`` offer as offered; decline anything else."""
    for offer in offers:
        if isinstance(offer, PerMessageDeflateOffer):
            return PerMessageDeflateOfferAccept(offer)
    return None


#: How long a server waits for the answer to a close it sent before it drops
#: the connection. Autobahn's timers round their deadline down to a whole
#: second (txaio's batched timer), so its default of 1 s fires anywhere from
#: at once to 1 s later; a drop before the next write leaves the server's own
#: close frame unsent, and the gateway then rightly reports an upstream that
#: vanished (1014) instead of relaying its close. 5 s waits at least 4.
CLOSE_HANDSHAKE_TIMEOUT = 5


class EchoServerProtocol(WebSocketServerProtocol):
    """Sends every message back with the type it arrived with."""

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.sendMessage(payload, isBinary)


def build_echo_factory(
    reactor: IReactorTCP,
    *,
    url: str | None = None,
    max_message_size: int = 0,
    server: str = "twisted_gateway-echo",
) -> WebSocketServerFactory:
    """
    Build the echo service's factory, to listen on any endpoint of ``reactor``.

    ``max_message_size`` is in bytes; 0 means no limit.
    """
    factory = WebSocketServerFactory(url, reactor=reactor, server=server)
    factory.protocol = EchoServerProtocol
    factory.noisy = False
    factory.setProtocolOptions(
        maxMessagePayloadSize=max_message_size,
        maxFramePayloadSize=max_message_size,
        # Answer a protocol violation with a close frame, as RFC 6455 asks,
        # instead of dropping the TCP connection.
        failByDrop=False,
        perMessageCompressionAccept=accept_deflate,
        allowNullOrigin=True,  # setProtocolOptions would reset it; the gateway decides
        closeHandshakeTimeout=CLOSE_HANDSHAKE_TIMEOUT,
    )
    return factory


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m twisted_gateway.demo.echo",
        description="A WebSocket echo service (accepts permessage-deflate).",
    )
    parser.add_argument(
        "--listen",
        default="tcp:9101:interface=127.0.0.1",
        help="a Twisted server endpoint description (default: %(default)s)",
    )
    parser.add_argument(
        "--max-message-size",
        type=int,
        default=0,
        help="largest message in bytes, 0 for no limit (default: %(default)s)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Listen on ``--listen`` with the real reactor until interrupted."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString
    from twisted.logger import globalLogBeginner, textFileLogObserver

    args = _parse_args(sys.argv[1:] if argv is None else argv)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
    factory = build_echo_factory(reactor, max_message_size=args.max_message_size)
    endpoint = serverFromString(reactor, args.listen)
    exit_code = [0]

    def listening(port: IListeningPort) -> None:
        address = port.getHost()
        assert isinstance(address, (IPv4Address, IPv6Address))
        log.info(
            "echo listening on {host}:{port}",
            host=address.host,
            port=address.port,
            event="listening",
        )

    def failed(failure: Failure) -> None:
        log.failure("echo could not listen on {listen}", failure, listen=args.listen)
        exit_code[0] = 1
        reactor.stop()

    endpoint.listen(factory).addCallbacks(listening, failed)
    reactor.run()
    return exit_code[0]


if __name__ == "__main__":
    raise SystemExit(main())
