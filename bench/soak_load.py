"""
The soak's load generator and its misbehaving clients, run in the harness's reactor.

Steady load: chat WebSockets (one room each, a text message every 0.5-2.5 s,
answered by the room's broadcast, kept alive by the gateway's pings), echo
WebSockets (binary messages of 10 B to 1 MiB, compared byte for byte),
handshake churn (open, one message, close) and HTTP GET/POST with bodies
(compared too). Faults are the kinds of :mod:`soak_faults`, each with the
outcome the gateway's rules promise. Everything the clients saw goes to a
:class:`Tally`, which :mod:`soak_checks` compares with the gateway's own
account.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import struct
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import jwt
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import reactor
from twisted.internet.defer import Deferred, TimeoutError as DeferredTimeout
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall, deferLater
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http_headers import Headers

from soak_upstream import pattern
from targets import ROOT

sys.path.insert(0, str(ROOT))
from tests.support import client_frame  # noqa: E402
from twisted_gateway.ws_relay import _accept_close_frame

HOST = "127.0.0.1"
KiB, MiB = 1024, 1024 * 1024


@dataclass
class Profile:
    """How hard a run pushes: the full run's and the quick run's numbers differ."""

    chat_sessions: int = 200
    echo_sessions: int = 20
    churn_per_s: float = 36.0
    http_per_s: float = 100.0
    session_life: tuple[float, float] = (20.0, 90.0)
    max_message: int = MiB


@dataclass
class Limits:
    """The gateway's settings the expectations depend on (the soak writes both)."""

    max_message: int
    ping_interval: float
    ping_timeout: float
    request_timeout: float


@dataclass
class WsOutcome:
    """How one WebSocket (or upgrade attempt) ended, and what the rules say it should."""

    kind: str
    route: str
    started: float
    expected: list[Any]
    ended: float | None = None
    got: Any = None
    #: the longest it may take, from ``started``, before it counts as hung
    within: float | None = None
    detail: str = ""


@dataclass
class HttpOutcome:
    kind: str
    route: str
    started: float
    ended: float
    status: int | None
    ok: bool
    detail: str = ""


@dataclass
class Tally:
    """What the clients saw."""

    ws: list[WsOutcome] = field(default_factory=list)
    http: list[HttpOutcome] = field(default_factory=list)
    #: 101 answers seen by any client
    upgrades_accepted: int = 0
    #: whole upgrade requests the client left before seeing the answer
    upgrades_abandoned: int = 0
    #: HTTP requests sent whole and left before the end of the answer (the gateway counts them)
    http_abandoned: int = 0
    #: HTTP requests left in the middle of their body (the gateway never sees a request)
    http_cut_bodies: int = 0
    messages_sent: int = 0
    messages_received: int = 0
    bytes_sent: int = 0
    faults: Counter = field(default_factory=Counter)
    #: open WebSockets, sampled by the harness
    open_now: int = 0

    def http_by_status(self) -> Counter:
        """(route, status) -> count of answers whose head the client read."""
        return Counter((h.route, h.status) for h in self.http if h.status is not None)

    def summary(self) -> dict[str, Any]:
        return {
            "websockets": len(self.ws),
            "http": len(self.http),
            "upgrades_accepted": self.upgrades_accepted,
            "upgrades_abandoned": self.upgrades_abandoned,
            "http_abandoned": self.http_abandoned,
            "http_cut_bodies": self.http_cut_bodies,
            "messages_sent": self.messages_sent,
            "messages_received": self.messages_received,
            "bytes_sent": self.bytes_sent,
            "faults": dict(sorted(self.faults.items())),
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.summary(),
            "ws_outcomes": [asdict(o) for o in self.ws],
            "http_outcomes": [asdict(o) for o in self.http],
        }


class Refused(Exception):
    """The upgrade was answered without a 101 (``status``), or the connection went first."""

    def __init__(self, status: int | None, reason: str = "") -> None:
        super().__init__(f"{status}: {reason}")
        self.status = status


def sleep(seconds: float) -> Deferred:
    return deferLater(reactor, seconds, lambda: None)


def within(d: Deferred, seconds: float) -> Deferred:
    """``d`` with a timeout (``DeferredTimeout``): no wait of the load generator is open-ended."""
    return d.addTimeout(seconds, reactor)


# -- an Autobahn client ------------------------------------------------------------


class SoakClient(WebSocketClientProtocol):
    """A client WebSocket whose messages and close are awaitable."""

    def __init__(self) -> None:
        super().__init__()
        self.opened: Deferred = Deferred()
        self.closed: Deferred = Deferred()
        self.inbox: list[bytes] = []
        self._waiting: Deferred | None = None

    def onOpen(self) -> None:
        self.factory.tally.upgrades_accepted += 1
        self.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.tally.messages_received += 1
        if self._waiting is not None:
            d, self._waiting = self._waiting, None
            d.callback(payload)
        else:
            self.inbox.append(payload)

    def next_message(self, timeout: float) -> Deferred:
        if self.inbox:
            d: Deferred = Deferred()
            d.callback(self.inbox.pop(0))
            return d
        if self.closed.called:
            d = Deferred()
            d.errback(ConnectionError("closed"))
            return d
        self._waiting = Deferred()
        return within(self._waiting, timeout)

    def send(self, payload: bytes, binary: bool) -> None:
        self.factory.tally.messages_sent += 1
        self.factory.tally.bytes_sent += len(payload)
        self.sendMessage(payload, binary)

    def onCloseFrame(self, code, reasonRaw):
        return _accept_close_frame(self, code, reasonRaw)

    def onClose(self, wasClean: bool, code, reason) -> None:
        if not self.opened.called:
            match = re.search(r"\((\d{3})", reason or "")
            self.opened.errback(Refused(int(match.group(1)) if match else None, reason or ""))
        if self._waiting is not None:
            d, self._waiting = self._waiting, None
            d.errback(ConnectionError(f"closed with {code}"))
        self.closed.callback(code if self.remoteCloseCode is None else self.remoteCloseCode)


# -- a raw TCP client ----------------------------------------------------------------


class RawPeer(Protocol):
    """
    A client that writes exactly what it is told: half a request, an unmasked
    frame, a reset. Reads the answer's head, then the server's frames (a ping
    is answered only when ``answer_pings``).
    """

    answer_pings = True

    def __init__(self) -> None:
        self.buffer = b""
        self.status: int | None = None
        self.head: Deferred = Deferred()
        self.lost: Deferred = Deferred()
        self.close_code: Any = None
        self.got_close: Deferred = Deferred()
        self.received = 0
        self._enough: tuple[int, Deferred] | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        if self._enough is not None and self.received >= self._enough[0]:
            d, self._enough = self._enough[1], None
            d.callback(None)
        if self.status is not None and self.status != 101:
            return
        self.buffer += data
        if self.status is None:
            head, sep, rest = self.buffer.partition(b"\r\n\r\n")
            if not sep:
                return
            self.status = int(head.split(b" ", 2)[1])
            self.buffer = rest
            self.head.callback(self.status)
        if self.status == 101:
            self._frames()

    def _frames(self) -> None:
        while len(self.buffer) >= 2:
            n, start = self.buffer[1] & 0x7F, 2
            if n == 126:
                if len(self.buffer) < 4:
                    return
                n, start = struct.unpack("!H", self.buffer[2:4])[0], 4
            elif n == 127:
                if len(self.buffer) < 10:
                    return
                n, start = struct.unpack("!Q", self.buffer[2:10])[0], 10
            if len(self.buffer) < start + n:
                return
            opcode, payload = self.buffer[0] & 0x0F, self.buffer[start : start + n]
            self.buffer = self.buffer[start + n :]
            if opcode == 9 and self.answer_pings:
                self.transport.write(frame(0xA, payload))
            elif opcode == 8 and not self.got_close.called:
                self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                self.transport.write(frame(0x8, payload[:2]))
                self.got_close.callback(self.close_code)

    def until_received(self, count: int) -> Deferred:
        d: Deferred = Deferred()
        if self.received >= count:
            d.callback(None)
        else:
            self._enough = (count, d)
        return d

    def connectionLost(self, reason) -> None:
        if not self.head.called:
            self.head.callback(None)  # no answer: a status of None
        if self._enough is not None:
            self._enough[1].errback(ConnectionError("lost"))
        if not self.got_close.called:
            self.got_close.callback("dropped")
        self.lost.callback(None)


class DeafPeer(RawPeer):
    """A WebSocket client that never answers a ping."""

    answer_pings = False


def frame(opcode: int, payload: bytes, *, masked: bool = True) -> bytes:
    """One client frame, masked with a fresh key unless ``masked=False``."""
    return client_frame(opcode, payload, mask=os.urandom(4) if masked else None)


def upgrade_request(path: str, token: str | None) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (
        f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{auth}\r\n"
    ).encode()


# -- the load --------------------------------------------------------------------------


class Load:
    """
    Runs the steady load and the client faults against a gateway on ``port``
    until :meth:`stop`; ``kill_windows`` may be read later by the checks.
    """

    def __init__(self, port: int, secret: str, profile: Profile, limits: Limits, seed: int) -> None:
        self.port, self.secret, self.profile, self.limits = port, secret, profile, limits
        self.rng = random.Random(seed)
        self.tally = Tally()
        self.stopping = False
        self._running: set[Deferred] = set()
        self._loops: list[LoopingCall] = []
        self._serial = 0
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = 16
        self._pool.retryAutomatically = False
        self._agent = Agent(reactor, pool=self._pool)
        self._token = self.token(3600)
        self._http_running = 0
        self._churn_running = 0
        #: how long a slow reader stops reading: it cannot answer pings meanwhile
        self.pause = min(3.0, limits.ping_timeout / 2)

    # -- plumbing

    def token(self, ttl: float, sub: str = "soak") -> str:
        """A token valid for at least ``ttl`` seconds (``exp`` is a whole second: rounded up)."""
        return jwt.encode({"sub": sub, "exp": math.ceil(time.time() + ttl)}, self.secret, algorithm="HS256")

    def url(self, path: str, scheme: str = "ws") -> str:
        return f"{scheme}://{HOST}:{self.port}{path}"

    def spawn(self, coroutine) -> Deferred:
        """Run a task the stop waits for; an exception in it is a harness bug, kept as a hang."""
        d = Deferred.fromCoroutine(coroutine)
        self._running.add(d)

        def done(result):
            self._running.discard(d)
            if hasattr(result, "getTraceback"):
                self.tally.ws.append(
                    WsOutcome("harness_error", "", time.time(), ["ok"], time.time(), "error",
                              detail=result.getTraceback()[-1500:])
                )
            return None

        return d.addBoth(done)

    def _next(self) -> int:
        self._serial += 1
        return self._serial

    async def open_ws(self, path: str, token: str | None, timeout: float = 15.0) -> SoakClient:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        factory = WebSocketClientFactory(self.url(path), headers=headers, useragent=None)
        factory.protocol = SoakClient
        factory.noisy = False
        factory.tally = self.tally
        factory.setProtocolOptions(
            maxMessagePayloadSize=0,
            maxFramePayloadSize=0,
            openHandshakeTimeout=timeout,
            closeHandshakeTimeout=10,
        )
        proto = await within(TCP4ClientEndpoint(reactor, HOST, self.port).connect(factory), timeout)
        await proto.opened
        return proto

    async def opened(self, outcome: WsOutcome, path: str, token: str | None, timeout: float = 15.0):
        """An open client, or None with ``outcome`` ended as refused or hung."""
        try:
            return await self.open_ws(path, token, timeout)
        except Refused as e:
            self.end(outcome, f"refused:{e.status}")
        except DeferredTimeout:
            self.end(outcome, "hung:handshake")
        return None

    async def echoed(self, client: SoakClient, outcome: WsOutcome, payload: bytes, timeout: float) -> str:
        """Wait for ``payload`` to come back: ``ok``, ``closed`` or ``hung`` (then ``outcome`` is ended)."""
        try:
            if await client.next_message(timeout) != payload:
                outcome.detail = "a message came back changed"
            return "ok"
        except DeferredTimeout:
            client.dropConnection(abort=True)
            self.end(outcome, "hung:message")
            return "hung"
        except ConnectionError:
            return "closed"

    async def raw(self, kind: type[RawPeer] = RawPeer) -> RawPeer:
        return await within(TCP4ClientEndpoint(reactor, HOST, self.port).connect(Factory.forProtocol(kind)), 15)

    def begin(self, kind: str, route: str, expected: list[Any], within_s: float | None = None) -> WsOutcome:
        outcome = WsOutcome(kind, route, time.time(), expected, within=within_s)
        self.tally.ws.append(outcome)
        return outcome

    @staticmethod
    def end(outcome: WsOutcome, got: Any, detail: str = "") -> None:
        outcome.ended, outcome.got = time.time(), got
        if detail:
            outcome.detail = detail

    async def close_and_wait(self, client: SoakClient, outcome: WsOutcome, *, close: bool = True,
                             timeout: float = 20) -> None:
        """End ``outcome`` with the close the client gets (after its own 1000 if ``close``)."""
        if close and client.state == client.STATE_OPEN:
            client.sendClose(1000)
        try:
            got = await within(client.closed, timeout)
        except DeferredTimeout:
            client.dropConnection(abort=True)
            got = "hung:close"
        self.end(outcome, got)

    def size(self, low: int, high: int) -> int:
        """Log-uniform, so that small messages dominate as they do in chat."""
        return int(math.exp(self.rng.uniform(math.log(low), math.log(high))))

    # -- start and stop

    def start(self, ramp: float) -> None:
        """Open the sessions over ``ramp`` seconds; churn and HTTP start at once."""
        p = self.profile
        for i in range(p.chat_sessions):
            reactor.callLater(ramp * i / max(1, p.chat_sessions), self._keep, self.chat_session)
        for i in range(p.echo_sessions):
            reactor.callLater(ramp * i / max(1, p.echo_sessions), self._keep, self.echo_session)
        self._every(p.churn_per_s, self._churn)
        self._every(p.http_per_s, self._http)

    def _every(self, per_s: float, start_one) -> None:
        """Start ``per_s`` tasks a second, in ticks of 0.1 s (an open loop)."""
        carry = [0.0]

        def tick() -> None:
            carry[0] += per_s / 10
            while carry[0] >= 1:
                carry[0] -= 1
                start_one()

        loop = LoopingCall(tick)
        loop.clock = reactor
        loop.start(0.1, now=False)
        self._loops.append(loop)

    def _keep(self, session) -> None:
        """Run ``session`` and, when it ends, another like it."""
        if self.stopping:
            return

        def again(_):
            if not self.stopping:
                reactor.callLater(self.rng.uniform(0, 1), self._keep, session)

        self.spawn(session()).addCallback(again)

    async def stop(self, timeout: float = 60.0) -> int:
        """Stop everything and wait for it; returns how many tasks were still running."""
        self.stopping = True
        for loop in self._loops:
            if loop.running:
                loop.stop()
        deadline = time.time() + timeout
        while self._running and time.time() < deadline:
            await sleep(0.2)
        left = len(self._running)
        for d in list(self._running):
            d.cancel()
        await self._pool.closeCachedConnections()
        return left

    def inject(self, kind: str) -> None:
        """Start one client fault of ``kind`` (a name of soak_faults.CLIENT_FAULTS)."""
        if self.stopping:
            return
        self.tally.faults[kind] += 1
        self.spawn(getattr(self, kind)())

    # -- steady load

    async def chat_session(self) -> None:
        n = self._next()
        outcome = self.begin("chat", "chat", [1000])
        room = n % max(1, self.profile.chat_sessions // 4)  # about four members a room
        client = await self.opened(outcome, f"/v1/chat/ws?room=room{room}", self.token(3600, f"user{n}"))
        if client is None:
            return
        life = self.rng.uniform(*self.profile.session_life)
        until = time.time() + life
        while not self.stopping and time.time() < until and client.state == client.STATE_OPEN:
            text = "".join(self.rng.choices("abcdefghij klmnopqrstuvwxyz", k=self.size(10, 16 * KiB)))
            client.send(text.encode(), False)
            try:
                await within(Deferred.fromCoroutine(self._own_message(client, f"user{n}", text)), 20)
            except DeferredTimeout:
                client.dropConnection(abort=True)
                return self.end(outcome, "hung:message")
            except ConnectionError:
                break
            await sleep(self.rng.uniform(0.5, 2.5))
        await self.close_and_wait(client, outcome)

    @staticmethod
    async def _own_message(client: SoakClient, sender: str, text: str) -> None:
        """Read the room's messages until this client's own comes back."""
        while True:
            answer = json.loads(await client.next_message(30))
            if answer.get("from") == sender and answer.get("text") == text:
                return

    async def echo_session(self) -> None:
        outcome = self.begin("echo", "echo", [1000])
        client = await self.opened(outcome, "/v1/echo/ws", self._token)
        if client is None:
            return
        until = time.time() + self.rng.uniform(*self.profile.session_life)
        while not self.stopping and time.time() < until and client.state == client.STATE_OPEN:
            payload = os.urandom(self.size(10, self.profile.max_message))
            client.send(payload, True)
            got = await self.echoed(client, outcome, payload, 30)
            if got == "hung":
                return
            if got == "closed":
                break
            await sleep(self.rng.uniform(1.0, 3.0))
        await self.close_and_wait(client, outcome)

    def _churn(self) -> None:
        if self._churn_running < 64:
            self.spawn(self.churn())

    async def churn(self) -> None:
        self._churn_running += 1
        try:
            outcome = self.begin("churn", "echo", [1000])
            client = await self.opened(outcome, "/v1/echo/ws", self._token)
            if client is None:
                return
            text = os.urandom(self.size(10, 200)).hex().encode()
            client.send(text, False)
            if await self.echoed(client, outcome, text, 20) != "hung":
                await self.close_and_wait(client, outcome)
        finally:
            self._churn_running -= 1

    def _http(self) -> None:
        if self._http_running < 64:
            self.spawn(self.http_one())

    async def http_one(self) -> None:
        self._http_running += 1
        try:
            choice = self.rng.random()
            if choice < 0.45:
                n = self.size(10, 256 * KiB)
                await self.http("get", "echo", b"GET", f"/v1/echo/bytes?n={n}", expect=pattern(n))
            elif choice < 0.85:
                body = os.urandom(self.size(1, 256 * KiB))
                digest = hashlib.sha256(body).hexdigest()
                await self.http("post", "echo", b"POST", "/v1/echo/post", body=body, expect_sha=digest)
            else:
                await self.http("rooms", "chat", b"GET", "/v1/chat/rooms")
        finally:
            self._http_running -= 1

    async def http(
        self,
        kind: str,
        route: str,
        method: bytes,
        path: str,
        *,
        body: bytes | None = None,
        expect: bytes | None = None,
        expect_sha: str | None = None,
        expected_status: int = 200,
        agent: Any = None,
    ) -> HttpOutcome:
        from twisted.web.client import FileBodyProducer
        from io import BytesIO

        started = time.time()
        headers = Headers({b"authorization": [f"Bearer {self._token}".encode()]})
        producer = FileBodyProducer(BytesIO(body), cooperator=_COOPERATOR) if body is not None else None
        status, ok, detail = None, False, ""
        try:
            response = await within(
                (agent or self._agent).request(method, self.url(path, "http").encode(), headers, producer), 30
            )
            status = response.code
            data = await within(read_body(response), 30)
            ok = status == expected_status
            if status >= 400 and status != expected_status:
                detail = _error_detail(data)
            if ok and expect is not None and data != expect:
                ok, detail = False, "the body came back changed"
            if ok and expect_sha is not None and json.loads(data).get("sha256") != expect_sha:
                ok, detail = False, "the upload arrived changed"
        except DeferredTimeout:
            detail = "hung"
        except Exception as e:  # a body cut short, a reset: the outcome, not a harness error
            detail = f"{type(e).__name__}"
        outcome = HttpOutcome(kind, route, started, time.time(), status, ok, detail)
        self.tally.http.append(outcome)
        return outcome

    # -- client faults (names from soak_faults.CLIENT_FAULTS)

    async def abort_handshake_head(self) -> None:
        peer = await self.raw()
        request = upgrade_request("/v1/echo/ws", self._token)
        peer.transport.write(request[: self.rng.randint(10, len(request) - 10)])
        await sleep(self.rng.uniform(0, 0.005))
        peer.transport.abortConnection()

    async def abort_handshake_connect(self) -> None:
        peer = await self.raw()
        peer.transport.write(upgrade_request("/v1/echo/ws", self._token))
        self.tally.upgrades_abandoned += 1
        await sleep(self.rng.uniform(0, 0.002))
        peer.transport.abortConnection()

    async def abort_handshake_waiting(self) -> None:
        peer = await self.raw()
        peer.transport.write(upgrade_request("/v1/echo/ws?delay=1.5", self._token))
        self.tally.upgrades_abandoned += 1
        await sleep(0.3)
        peer.transport.abortConnection()

    async def abort_mid_message(self) -> None:
        try:
            client = await self.open_ws("/v1/echo/ws", self._token)
        except (Refused, DeferredTimeout):
            return
        payload = os.urandom(100 * KiB)
        client.transport.write(frame(0x2, payload)[: 50 * KiB])
        await sleep(0.05)
        client.transport.abortConnection()

    def _http_head(self, method: str, path: str, extra: str = "") -> bytes:
        return (
            f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {self._token}\r\n{extra}\r\n"
        ).encode()

    async def abort_mid_request_body(self) -> None:
        peer = await self.raw()
        peer.transport.write(self._http_head("POST", "/v1/echo/post", "Content-Length: 200000\r\n"))
        peer.transport.write(os.urandom(50000))
        self.tally.http_cut_bodies += 1
        await sleep(0.05)
        peer.transport.abortConnection()

    async def abort_mid_response(self) -> None:
        peer = await self.raw()
        peer.transport.write(self._http_head("GET", f"/v1/echo/bytes?n={4 * MiB}"))
        self.tally.http_abandoned += 1
        try:
            await within(peer.until_received(64 * KiB), 15)
        except (DeferredTimeout, ConnectionError):
            pass
        peer.transport.abortConnection()

    async def abort_before_answer(self) -> None:
        peer = await self.raw()
        peer.transport.write(self._http_head("GET", "/v1/echo/slow?s=1.5"))
        self.tally.http_abandoned += 1
        await sleep(0.3)
        peer.transport.loseConnection()

    async def _slow_reader(self, kind: str, path: str, pause_client: bool) -> None:
        outcome = self.begin(kind, "echo", [1000])
        client = await self.opened(outcome, path, self._token)
        if client is None:
            return
        if pause_client:
            client.transport.pauseProducing()
        payloads = [os.urandom(min(256 * KiB, self.limits.max_message)) for _ in range(8)]
        for payload in payloads:
            client.send(payload, True)
        await sleep(self.pause)
        if pause_client:
            client.transport.resumeProducing()
        for payload in payloads:
            got = await self.echoed(client, outcome, payload, 30)
            if got == "hung":
                return
            if got == "closed":
                break
        await self.close_and_wait(client, outcome)

    def slow_reader_client(self):
        return self._slow_reader("slow_reader_client", "/v1/echo/ws", True)

    def slow_reader_upstream(self):
        return self._slow_reader("slow_reader_upstream", f"/v1/echo/ws?pause={self.pause:g}", False)

    async def _bad_frame(self, kind: str, data: bytes, expected: int, peer_kind: type[RawPeer] = RawPeer,
                         within_s: float = 20.0) -> None:
        outcome = self.begin(kind, "echo", [expected], within_s)
        peer = await self.raw(peer_kind)
        peer.transport.write(upgrade_request("/v1/echo/ws", self._token))
        try:
            status = await within(peer.head, 15)
        except DeferredTimeout:
            peer.transport.abortConnection()
            return self.end(outcome, "hung:handshake")
        if status != 101:
            peer.transport.abortConnection()
            return self.end(outcome, f"refused:{status}")
        self.tally.upgrades_accepted += 1
        if data:
            peer.transport.write(data)
        try:
            got = await within(peer.got_close, within_s)
            await within(peer.lost, 15)
        except DeferredTimeout:
            peer.transport.abortConnection()
            got = "hung:close"
        self.end(outcome, got)

    def unmasked_frame(self):
        return self._bad_frame("unmasked_frame", frame(0x1, b"hello", masked=False), 1002)

    def bad_utf8(self):
        return self._bad_frame("bad_utf8", frame(0x1, b"caf\xc3\x28 \xff\xfe"), 1007)

    def reserved_opcode(self):
        return self._bad_frame("reserved_opcode", frame(0x3, b"x"), 1002)

    def oversized(self):
        return self._bad_frame("oversized", frame(0x2, os.urandom(self.limits.max_message + 1)), 1009)

    def no_pong(self):
        limit = self.limits.ping_interval + self.limits.ping_timeout + 5
        return self._bad_frame("no_pong", b"", "dropped", DeafPeer, limit)

    async def token_expiry(self) -> None:
        ttl = self.rng.uniform(3, 5)
        outcome = self.begin("token_expiry", "chat", [1008], ttl + 5)
        n = self._next()
        token = self.token(ttl, f"user{n}")
        client = await self.opened(outcome, f"/v1/chat/ws?room=expiring{n}", token, timeout=min(ttl, 15))
        if client is None:
            return
        while client.state == client.STATE_OPEN and time.time() < outcome.started + ttl + 5:
            client.send(b"still here", False)
            await sleep(0.5)
        await self.close_and_wait(client, outcome, close=False, timeout=10)

    async def upgrade_answered_200(self) -> None:
        outcome = self.begin("upgrade_answered_200", "echo", ["refused:502"])
        peer = await self.raw()
        peer.transport.write(upgrade_request("/v1/echo/bytes?n=10", self._token))
        try:
            status = await within(peer.head, 15)
        except DeferredTimeout:
            status = "hung"
        peer.transport.abortConnection()
        self.end(outcome, f"refused:{status}")

    async def upstream_close_code(self) -> None:
        code = self.rng.choice([1000, 1001, 1011, 4000])
        outcome = self.begin("upstream_close_code", "echo", [code])
        client = await self.opened(outcome, "/v1/echo/ws", self._token)
        if client is None:
            return
        client.send(f"close:{code}".encode(), False)
        await self.close_and_wait(client, outcome, close=False)

    async def upstream_reset(self) -> None:
        await self.http("upstream_reset", "echo", b"GET", "/v1/echo/reset", expected_status=200)

    async def slow_answer(self) -> None:
        """An upstream fault driven by a request: answered after request_timeout, so 504."""
        self.tally.faults["slow_answer"] += 1
        seconds = self.limits.request_timeout + 1
        await self.http("slow_answer", "echo", b"GET", f"/v1/echo/slow?s={seconds:g}", expected_status=504)


class _Body(Protocol):
    """Collects a response body; anything but a clean end fails (a cut body is an outcome)."""

    def __init__(self, done: Deferred) -> None:
        self.parts: list[bytes] = []
        self.done = done

    def dataReceived(self, data: bytes) -> None:
        self.parts.append(data)

    def connectionLost(self, reason) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)


def _error_detail(body: bytes) -> str:
    """The ``detail`` of the gateway's JSON error body, or the body's start."""
    try:
        return str(json.loads(body)["detail"])
    except (ValueError, KeyError, TypeError):
        return body[:200].decode("utf-8", "replace")


def read_body(response) -> Deferred:
    """The body of ``response``; cancelling it (a timeout) drops the connection."""
    body: list[_Body] = []
    done: Deferred = Deferred(lambda _: body[0].transport.stopProducing() if body else None)
    body.append(_Body(done))
    response.deliverBody(body[0])
    return done


def _cooperator():
    from twisted.internet.task import Cooperator

    return Cooperator(scheduler=lambda work: reactor.callLater(0, work))


_COOPERATOR = _cooperator()
