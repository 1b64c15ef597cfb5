"""
Active health checks: probe each upstream instance every ``health_interval``
seconds (an HTTP GET, or a real WebSocket upgrade then a close for ``ws:/path``);
two failures eject an instance, two successes restore it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Iterable

import treq
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet.defer import CancelledError, Deferred, DeferredList, TimeoutError, succeed
from twisted.internet.interfaces import IReactorTime, ITCPTransport
from twisted.logger import Logger
from twisted.web.client import ResponseFailed
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent

from twisted_gateway.connector import Connector
from twisted_gateway.deferreds import when_done
from twisted_gateway.faults import describe
from twisted_gateway.periodic import Periodic
from twisted_gateway.upstreams import MAX_CHECK_TIMEOUT, Instance, UpstreamPool

if TYPE_CHECKING:
    from twisted.internet.task import LoopingCall

log = Logger()


_CHECK_HEADERS = Headers({b"User-Agent": [b"wsgateway-health-check"]})


class CheckFailed(Exception):
    """A health check got an answer that is not healthy."""


@dataclass(frozen=True)
class _Target:
    instance: Instance
    check: str
    interval: float

    @property
    def url(self) -> str:
        if self.check.startswith("ws:"):
            scheme, _, rest = self.instance.url.partition("://")
            return ("wss" if scheme == "https" else "ws") + "://" + rest + self.check[3:]
        return self.instance.url + self.check


class _WebSocketProbe(WebSocketClientProtocol):
    """Closes as soon as it opens; ``finished`` fires once the connection is gone."""

    transport: ITCPTransport | None

    def __init__(self) -> None:
        super().__init__()
        self.was_open = False
        self.finished: Deferred[None] = Deferred(self._abort)

    def _abort(self, d: Deferred[None]) -> None:
        if self.transport is not None:
            self.transport.abortConnection()

    def onOpen(self) -> None:
        self.was_open = True
        self.sendClose(1000)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self.finished.called:
            return
        if self.was_open:
            self.finished.callback(None)
        else:
            answer = getattr(self, "http_status_line", None)
            why = self.wasNotCleanReason or "connection closed"
            if answer:
                why = f"answered {answer}"
            self.finished.errback(CheckFailed(f"WebSocket upgrade failed: {why}"))


class HealthChecker:
    """
    Active checks for every instance of the pools that set ``health_check``:
    one probe per instance URL every ``health_interval`` s (the first route
    naming it decides path and interval), never two at once, each given
    min(``health_interval``, 5) s. HTTP checks GET the path (2xx and 3xx pass);
    ``ws:/path`` checks open a real WebSocket and close it.
    """

    def __init__(
        self,
        pools: Iterable[UpstreamPool],
        clock: IReactorTime,
        agent: IAgent,
        *,
        ws_connect: Connector | None = None,
    ) -> None:
        self._clock, self._agent, self._ws_connect = clock, agent, ws_connect
        self.targets: dict[str, _Target] = {}
        for pool in pools:
            check, interval = pool.health_check, pool.health_interval
            if check is None:
                continue
            for instance in pool.instances:
                self._add_target(pool, _Target(instance, check, interval))
        if ws_connect is None and any(t.check.startswith("ws:") for t in self.targets.values()):
            raise ValueError("ws: health checks need a ws_connect")
        #: each target's repeated check, and what fires once it stopped with no check in flight
        self._loops: list[tuple[Periodic, Deferred[LoopingCall] | None]] = []
        self._in_flight: dict[str, Deferred[None]] = {}

    def _add_target(self, pool: UpstreamPool, target: _Target) -> None:
        known = self.targets.setdefault(target.instance.url, target)
        if (known.check, known.interval) != (target.check, target.interval):
            log.warn(
                "upstream {url}: route {route} asks for health check {check} every"
                " {interval} s; keeping {kept} every {kept_interval} s",
                url=target.instance.url,
                route=pool.route_name,
                check=target.check,
                interval=target.interval,
                kept=known.check,
                kept_interval=known.interval,
            )

    def start(self) -> None:
        """Check every target now, then every ``health_interval`` s."""
        if self._loops:
            return
        for target in self.targets.values():
            loop = Periodic(self._clock, target.interval, partial(self._check_once, target), now=True)
            self._loops.append((loop, loop.start()))

    def stop(self) -> Deferred[None]:
        """Stop checking and cancel the checks in flight; fires when all are over."""
        loops, self._loops = self._loops, []
        # (the checks' waits and the loops' ends: DeferredList takes Deferreds of one result type)
        waits: list[Deferred[Any]] = [when_done(d) for d in self._in_flight.values()]
        for d in list(self._in_flight.values()):
            d.cancel()
        for loop, done in loops:
            loop.stop()
            if done is not None:
                waits.append(done)
        if not waits:
            return succeed(None)
        return DeferredList(waits, consumeErrors=True).addCallback(lambda _: None)

    def check_now(self) -> Deferred[None]:
        """Check every target once now (joining checks in flight); fires when all are done."""
        waits = [self._check_once(target) for target in self.targets.values()]
        return DeferredList(waits, consumeErrors=True).addCallback(lambda _: None)

    def _check_once(self, target: _Target) -> Deferred[None]:
        """A Deferred for this target's check in flight, starting one if there is none."""
        url = target.instance.url
        check = self._in_flight.get(url)
        if check is None:
            check = Deferred.fromCoroutine(self._check(target))
            if not check.called:
                self._in_flight[url] = check
                check.addBoth(self._forget, url)
        return when_done(check)

    def _forget(self, result: object, url: str) -> object:
        del self._in_flight[url]
        return result

    async def _check(self, target: _Target) -> None:
        """Probe once and record the verdict; never fails; a cancelled check has none."""
        timeout = min(target.interval, MAX_CHECK_TIMEOUT)
        probe = Deferred.fromCoroutine(self._probe(target))
        try:
            await probe.addTimeout(timeout, self._clock)
        except CancelledError:
            return
        except TimeoutError:
            target.instance.record_check(False, f"no answer within {timeout:g} s")
        except Exception as e:
            target.instance.record_check(False, describe(e))
        else:
            target.instance.record_check(True)

    async def _probe(self, target: _Target) -> None:
        if target.check.startswith("ws:"):
            assert self._ws_connect is not None
            factory = WebSocketClientFactory(target.url, useragent=None)
            factory.protocol = _WebSocketProbe
            factory.noisy = False
            # The check's own timeout covers the whole exchange: no Autobahn timers.
            factory.setProtocolOptions(
                openHandshakeTimeout=0, closeHandshakeTimeout=0, serverConnectionDropTimeout=0
            )
            probe = await self._ws_connect(factory)
            assert isinstance(probe, _WebSocketProbe)  # factory.protocol
            await probe.finished
            return
        try:
            # The Agent itself, not treq: treq IDNA-encodes the host, which
            # fails for an IPv6 literal such as http://[::1]:9001.
            response = await self._agent.request(
                b"GET", target.url.encode("ascii"), _CHECK_HEADERS
            )
            await treq.content(response)
        except ResponseFailed as e:
            # An Agent reports a cancelled request so, not as a CancelledError.
            if any(reason.check(CancelledError) for reason in e.reasons):
                raise CancelledError() from None
            raise
        if not 200 <= response.code < 400:
            raise CheckFailed(f"HTTP status {response.code}")
