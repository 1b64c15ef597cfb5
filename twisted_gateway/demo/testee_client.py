"""
The echo client that Autobahn|Testsuite's fuzzing server tests.

``wstest -m fuzzingserver`` does not connect anywhere: it waits for a testee
client, tells it how many cases there are (``/getCaseCount``), plays each case
against it (``/runCase?case=N&agent=A``) and writes its reports when asked
(``/updateReports?agent=A``). This client does exactly that, one connection at a
time, echoing every message it receives with its type. Pointed at the gateway
with the fuzzing server as the route's upstream, it puts the gateway's
upstream-facing client protocol in front of a hostile server.

It offers ``permessage-deflate``, so the compression cases run too::

    python -m twisted_gateway.demo.testee_client --url ws://127.0.0.1:9100 \\
        --agent twisted_gateway
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from urllib.parse import quote, urlsplit

from autobahn.websocket.compress import (
    PerMessageCompressResponse,
    PerMessageDeflateOffer,
    PerMessageDeflateResponse,
    PerMessageDeflateResponseAccept,
)
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IReactorTCP, IReactorTime, IStreamClientEndpoint, ITCPTransport
from twisted.internet.protocol import connectionDone
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_gateway._bases import WebSocketClientFactory, WebSocketClientProtocol

log = Logger()

#: Longest one step (one case, the count or the report update) may take. The
#: slowest cases (9.*: up to 16 MiB messages, many thousand frames) stay far below.
STEP_TIMEOUT = 300.0


def accept_deflate_response(response: PerMessageCompressResponse) -> PerMessageDeflateResponseAccept | None:
    """Accept the server's ``permessage-deflate`` answer to our offer; refuse others."""
    if isinstance(response, PerMessageDeflateResponse):
        return PerMessageDeflateResponseAccept(response)
    return None


def step_resource(step: str | int, agent: str) -> str:
    """
    The resource (path and query) of one step of a fuzzing-server session.

    ``step`` is ``"count"``, ``"report"``, a case number (1-based position in
    the server's selection) or a case id such as ``"6.4.3"``.
    """
    quoted_agent = quote(agent, safe="")
    if step == "count":
        return "/getCaseCount"
    if step == "report":
        return f"/updateReports?agent={quoted_agent}"
    if isinstance(step, int):
        return f"/runCase?case={step}&agent={quoted_agent}"
    return f"/runCase?casetuple={quote(step, safe='')}&agent={quoted_agent}"


def step_url(base_url: str, resource: str) -> str:
    """Join the fuzzing server's (or the gateway's) base URL and a step's resource."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"expected a ws:// or wss:// URL, got {base_url!r}")
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}{resource}"


class TesteeClientProtocol(WebSocketClientProtocol):
    """Echoes every message (or, for the case count, keeps it) and reports its end."""

    factory: TesteeClientFactory
    transport: ITCPTransport | None

    def __init__(self) -> None:
        super().__init__()
        self._lost_waiters: list[Deferred[None]] = []
        self._is_lost = False

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.factory.echo:
            self.sendMessage(payload, isBinary)
        else:
            self.factory.received.append(payload)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self._is_lost = True
        waiters, self._lost_waiters = self._lost_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def when_lost(self) -> Deferred[None]:
        """A new Deferred that fires once the TCP connection is gone."""
        if self._is_lost:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._lost_waiters.append(waiter)
        return waiter


class TesteeClientFactory(WebSocketClientFactory):
    """One step's connection: its URL, whether to echo, and what the server sent."""

    protocol = TesteeClientProtocol  # type: ignore[assignment]  # its factory is ours, not a Factory[Self]

    def __init__(self, url: str, *, reactor: IReactorTCP, agent: str, echo: bool) -> None:
        super().__init__(url, reactor=reactor, useragent=agent)
        self.noisy = False
        self.echo = echo
        self.received: list[bytes] = []
        self.setProtocolOptions(
            maxMessagePayloadSize=0,
            maxFramePayloadSize=0,
            failByDrop=False,
            perMessageCompressionOffers=[PerMessageDeflateOffer()],
            perMessageCompressionAccept=accept_deflate_response,
        )


def build_endpoint(reactor: IReactorTCP, url: str) -> IStreamClientEndpoint:
    """A client endpoint for a ws:// or wss:// URL; wss:// verifies the certificate."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme == "wss":
        tcp = HostnameEndpoint(reactor, host, parts.port or 443)
        return wrapClientTLS(optionsForClientTLS(host), tcp)
    return HostnameEndpoint(reactor, host, parts.port or 80)


async def run_step(
    reactor: IReactorTCP,
    clock: IReactorTime,
    url: str,
    agent: str,
    *,
    echo: bool,
    timeout: float = STEP_TIMEOUT,
) -> list[bytes]:
    """Open one connection, echo (or collect) until it is closed, return what was kept."""
    factory = TesteeClientFactory(url, reactor=reactor, agent=agent, echo=echo)
    connecting = build_endpoint(reactor, url).connect(factory)
    protocol = await connecting.addTimeout(timeout, clock)
    assert isinstance(protocol, TesteeClientProtocol)  # factory.protocol
    try:
        await protocol.when_lost().addTimeout(timeout, clock)
    except BaseException:
        if protocol.transport is not None:
            protocol.transport.abortConnection()
        await protocol.when_lost()
        raise
    return factory.received


async def run_testee(
    reactor: IReactorTCP,
    clock: IReactorTime,
    base_url: str,
    agent: str,
    cases: Sequence[str] = (),
    *,
    timeout: float = STEP_TIMEOUT,
) -> int:
    """
    Play a whole fuzzing-server session and return the number of steps that failed.

    Without ``cases`` every case the server offers is run, by number; with
    ``cases`` (case ids such as ``"1.1.1"``) only those are.
    """
    steps: list[str | int]
    if cases:
        steps = list(cases)
    else:
        counted = await run_step(
            reactor, clock, step_url(base_url, step_resource("count", agent)), agent, echo=False, timeout=timeout
        )
        if not counted:
            raise RuntimeError("the fuzzing server sent no case count")
        steps = list(range(1, int(counted[0]) + 1))
    log.info("running {count} cases as agent {agent}", count=len(steps), agent=agent)
    failed = 0
    for position, step in enumerate(steps, start=1):
        url = step_url(base_url, step_resource(step, agent))
        log.info("case {position}/{count}: {step}", position=position, count=len(steps), step=step)
        try:
            await run_step(reactor, clock, url, agent, echo=True, timeout=timeout)
        except Exception:
            failed += 1
            log.failure("case {step} did not complete", step=step)
    await run_step(reactor, clock, step_url(base_url, step_resource("report", agent)), agent, echo=False, timeout=timeout)
    log.info("reports updated for agent {agent}", agent=agent)
    return failed


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m twisted_gateway.demo.testee_client",
        description="Autobahn|Testsuite testee echo client (offers permessage-deflate).",
    )
    parser.add_argument("--url", default="ws://127.0.0.1:9001", help="the fuzzing server's (or gateway's) base URL")
    parser.add_argument("--agent", default="twisted_gateway", help="the name the reports use")
    parser.add_argument(
        "--cases",
        default="",
        help="comma-separated case ids to run (e.g. 1.1.1,12.2.3); default: all the server offers",
    )
    parser.add_argument("--timeout", type=float, default=STEP_TIMEOUT, help="seconds one case may take")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one session with the real reactor; exit non-zero if any step failed."""
    from twisted.internet import reactor
    from twisted.internet.task import react
    from twisted.logger import globalLogBeginner, textFileLogObserver

    args = _parse_args(sys.argv[1:] if argv is None else argv)
    cases = [case.strip() for case in args.cases.split(",") if case.strip()]
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)

    async def session() -> None:
        failed = await run_testee(reactor, reactor, args.url, args.agent, cases, timeout=args.timeout)
        if failed:
            raise SystemExit(1)

    # react() stops the reactor and exits with the session's outcome.
    react(lambda _reactor: Deferred.fromCoroutine(session()))


if __name__ == "__main__":
    raise SystemExit(main())
