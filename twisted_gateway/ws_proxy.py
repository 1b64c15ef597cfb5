"""
The WebSocket relay's handshake: a pair of Autobahn protocols joined back to back.

The client-facing :class:`RelayServerProtocol` answers a handshake only after
its upstream :class:`RelayClientProtocol` has finished its own, so the client
sees the upstream's subprotocol, compression and refusals. This module is the
opening of a pair (auth, choice of instance, retries, refusals as JSON);
:mod:`ws_pair` owns the pair and how it ends, :mod:`ws_relay` is the data path,
:mod:`connector` reaches the upstream.
"""

from __future__ import annotations

import base64
import functools
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable, Iterator, NamedTuple, NoReturn, Sequence, TypeVar
from urllib.parse import parse_qs, urlparse

from autobahn.websocket.compress import (
    PerMessageCompressOffer,
    PerMessageDeflateOffer,
    PerMessageDeflateOfferAccept,
    PerMessageDeflateResponse,
    PerMessageDeflateResponseAccept,
)
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from autobahn.websocket.util import parse_url
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.error import (
    ConnectError,
    ConnectingCancelledError,
    ConnectionDone,
    DNSLookupError,
)
from twisted.internet.error import TimeoutError as ConnectTimeout
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITCPTransport
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.server import NOT_DONE_YET

from twisted_gateway._bases import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from twisted_gateway._compat import (
    FIELD_NAME,
    FIELD_VALUE_INVALID,
    START_LINE_INVALID,
    ClientLegHooks,
    ServerLegHooks,
    mask_short_payloads,
    open_on_plain_101,
    origin_allowed,
    parse_extensions,
    render_debug_lazily,
    timers_on,
    with_options,
)
from twisted_gateway.ageing import Ageing
from twisted_gateway.deferreds import start
from twisted_gateway.schema import GatewaySettings, RouteSettings
from twisted_gateway.errors import (
    BadGateway,
    GatewayError,
    GatewayTimeout,
    Overloaded,
    UpstreamRefused,
)
from twisted_gateway.faults import ANSWERED, CANCELLED, CLIENT_GONE, LOCAL, Fault, classify, describe
from twisted_gateway.sockets import TCPKeepalive, set_keepalive
from twisted_gateway.llhttp_channel import LlhttpChannel
from twisted_gateway.headers import (
    WEBSOCKET_HANDSHAKE,
    rewrite_redirects,
    upstream_host,
    upstream_origins,
    upstream_request_headers,
)
from twisted_gateway.rate_limit import burst_for
from twisted_gateway.refusals import Refusal, parse_head, refusal_body, switching
from twisted_gateway.metrics import Metrics
from twisted_gateway.routing import upstream_url
from twisted_gateway.tls import describe_tls_failure
from twisted_gateway.upstreams import Instance
from twisted_gateway.ws_pair import HandshakeContext, Pair, random_bytes
from twisted_gateway.ws_relay import (
    CLIENT_LOST,
    CLOSED,
    RelayRegistry,
    _RelayLeg,
)

if TYPE_CHECKING:
    from twisted_gateway.auth import Authenticator
    from twisted_gateway.identity import Identity
    from twisted_gateway.cluster import Cluster, RevocationGuard
    from twisted_gateway.connector import RelayConnect

log = Logger()
access_log = Logger(namespace="twisted_gateway.access")

_T = TypeVar("_T")
#: What ``onConnect`` answers the client with: the subprotocol and extra headers.
_Accept = tuple["str | None", "dict[str, str]"]

class UpstreamHandshakeFailed(Exception):
    """The upstream did not complete its opening handshake."""

    def __init__(
        self,
        reason: str,
        status: int | None = None,
        phrase: str = "",
        cause: BaseException | None = None,
        refusal: Refusal | None = None,
    ) -> None:
        super().__init__(reason)
        self.status, self.phrase = status, phrase
        #: why the connection ended, when no status line came (passive health asks)
        self.cause = cause
        #: the upstream's whole answer, when it refused with a status
        self.refusal = refusal


class RelayClientProtocol(ClientLegHooks, _RelayLeg, WebSocketClientProtocol):  # type: ignore[misc, override]  # Autobahn's bases disagree on peer and _transport_details
    """The upstream-facing leg."""

    factory: _UpstreamFactory
    transport: ITCPTransport | None

    side = "upstream"
    #: why TLS with the upstream failed, when it did (named in the 502)
    tls_failure: str | None = None
    tcp_keepalive: TCPKeepalive | None = None

    #: a refusal's status, phrase and headers, while its body is read
    _refusal_head: tuple[int, bytes, list[tuple[bytes, bytes]]] | None = None
    #: the upstream's complete answer other than 101
    refusal: Refusal | None = None

    #: the client-facing leg waiting for this leg's handshake (told when it ends)
    opening: RelayServerProtocol | None = None
    #: this leg's handshake ended: opened, or failed with :attr:`handshake_error`
    handshake_ended = False
    handshake_error: UpstreamHandshakeFailed | None = None

    def connectionMade(self) -> None:
        set_keepalive(self.transport, self.tcp_keepalive)
        super().connectionMade()

    def processHandshake(self) -> None:
        """
        A 101 is Autobahn's to check; any other answer is read whole (its body
        up to :data:`refusals.MAX_REFUSAL_BODY`) for the client, then dropped.
        """
        if self._refusal_head is None:
            end = self.data.find(b"\r\n\r\n")
            if end < 0:
                return
            if switching(self.data):
                if not open_on_plain_101(self, end):
                    super().processHandshake()  # a compression answer, or one Autobahn refuses
                return
            head = parse_head(self.data[: end + 4])
            if head is None or head[0] == 101:
                super().processHandshake()
                return
            self._refusal_head = head
            self.http_status_line = self.data.split(b"\r\n", 1)[0].decode("latin-1")
            self.data = self.data[end + 4 :]
        self._read_refusal(closed=False)

    def _read_refusal(self, closed: bool) -> None:
        assert self._refusal_head is not None  # a refusal's head was read
        status, phrase, headers = self._refusal_head
        body = refusal_body(headers, self.data, closed)
        if body is None or self.refusal is not None:
            return
        self.refusal = Refusal(status, phrase, tuple(headers), body)
        self.wasNotCleanReason = f"the upstream refused with {status}"
        if not closed:
            _drop_quietly(self, abort=True)

    def failHandshake(self, reason: str) -> None:
        """Drop the connection; the refusal is logged once, by the client-facing leg."""
        self.wasNotCleanReason = reason
        _drop_quietly(self, abort=True)

    def startHandshake(self) -> None:
        """
        Send the upgrade request. Autobahn's own writes ``Host`` from the URL,
        adds ``Pragma`` and ``Cache-Control`` and re-builds the compression
        offer from its parsed form (which offers no context takeover): here
        the ``Host`` is the route's (:func:`headers.upstream_host`), nothing is
        added, and the client's ``permessage-deflate`` offer goes as written.
        The request is the factory's (:meth:`RelayServerFactory.client_factory_for`)
        around this connection's key.
        """
        f = self.factory
        self.websocket_key = key = base64.b64encode(random_bytes(16))
        self.http_request_data = f.request_head + key + f.request_tail
        self.sendData(self.http_request_data)

    #: the exception the connection ended with
    lost_reason: BaseException | None = None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost_reason = error = reason.value
        self.tls_failure = describe_tls_failure(error) if error is not None else None
        if self._refusal_head is not None and self.refusal is None:
            self._read_refusal(closed=True)  # a body delimited by the close
        super().connectionLost(reason)

    def onOpen(self) -> None:
        if not self.handshake_ended:
            self._end_handshake(None)

    def _end_handshake(self, error: UpstreamHandshakeFailed | None) -> None:
        """This leg's handshake ended: the client-facing leg waiting for it is told (:meth:`RelayServerProtocol.upstream_ended`)."""
        self.handshake_ended, self.handshake_error = True, error
        opening = self.opening
        if opening is not None:
            self.opening = None
            opening.upstream_ended(self)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.end_close_wait()
        if not self.handshake_ended:
            status = None
            phrase = ""
            line = getattr(self, "http_status_line", None)
            if line:
                parts = line.split(None, 2)
                if len(parts) >= 2 and parts[1].isdigit():
                    status = int(parts[1])
                    phrase = parts[2] if len(parts) > 2 else ""
            reason_text = getattr(self, "wasNotCleanReason", None) or "connection closed"
            if self.tls_failure is not None:
                reason_text = f"TLS: {self.tls_failure}"
            self._end_handshake(
                UpstreamHandshakeFailed(reason_text, status, phrase, cause=self.lost_reason, refusal=self.refusal)
            )
            return
        if self.pair is not None:
            self.pair.leg_closed(self)


class RelayServerProtocol(ServerLegHooks, _RelayLeg, WebSocketServerProtocol):  # type: ignore[misc, override]  # Autobahn's bases disagree on peer and _transport_details
    """The client-facing leg; its ``onConnect`` opens the upstream leg first."""

    context: HandshakeContext
    factory: RelayServerFactory
    side = "client"

    #: the ws_pair.Pair this leg belongs to, made at the hand-over (None once it ended)
    pair: Pair
    #: while the upstream leg is opened (:meth:`_open_upstream`): its context, the client's
    #: request and the instances left to try; the result; the instance tried, its connect
    #: under way or its leg's handshake; why the last instance could not be connected
    _opening: tuple[HandshakeContext, ConnectionRequest, Iterator[Instance]] | None = None
    #: how the client is answered, until it is (:meth:`open_upstream`); the authentication under way
    _answer: tuple[Callable[[_Accept], object], Callable[[Failure], object]] | None = None
    _authenticating: Deferred[tuple[HandshakeContext, Identity | None]] | None = None
    _instance: Instance | None = None
    _dialing: Callable[[], None] | None = None
    _waiting: RelayClientProtocol | None = None
    _last_error: str | None = None
    # Autobahn's options that answer_upgrade reads (class attributes: with_options)
    versions: Sequence[int]
    trustXForwardedFor: int
    maxConnections: int

    def __init__(self) -> None:
        super().__init__()
        self._deny: GatewayError | None = None
        self._open_deadline = float("inf")
        #: the handshake's one timer (:meth:`_time`): an upstream connect's deadline, or ws_open_timeout's
        self._timer: IDelayedCall | None = None
        #: the timer is the upstream connect's deadline (cancelled through :attr:`_dialing` when due)
        self._timing_connect = False
        #: the timer fired: a connect's deadline (the connect fails), or ws_open_timeout's (the handshake)
        self._connect_overdue = self._timed_out = False

    # -- opening handshake ------------------------------------------------

    # (Autobahn's Twisted adapter waits for a Deferred; the core's type names plain answers only)
    def onConnect(self, request: ConnectionRequest) -> Deferred[_Accept]:  # type: ignore[override]
        """Autobahn's hook, for a request its own parser read (:func:`hand_over`'s way for the rest): :meth:`open_upstream`'s answer as a Deferred."""
        answered: Deferred[_Accept] = Deferred()
        self.open_upstream(request, answered.callback, answered.errback)
        return answered

    def open_upstream(
        self, request: ConnectionRequest, accept: Callable[[_Accept], object], refuse: Callable[[Failure], object]
    ) -> None:
        """
        What ``onConnect`` does: authenticate the request if its route says
        so, open the upstream leg, then call ``accept`` with the client's
        answer (subprotocol, headers) or ``refuse`` with a ``ConnectionDeny``
        (as Autobahn's ``processHandshake`` takes ``onConnect``'s outcome),
        without a Deferred for :meth:`answer_upgrade`.
        """
        factory = self.factory
        factory.registry.handshakes.add(self.pair)
        #: ws_open_timeout's deadline, on the handshake's one timer (:meth:`_time`)
        self._open_deadline = factory.clock.seconds() + factory.gateway.ws_open_timeout
        self._answer = (accept, refuse)
        if factory.authenticator is None or self.context.route.auth == "none":
            self._open_upstream(request, self.context, None)
        else:
            # a cached token is checked without Twisted's coroutine driver (deferreds.start)
            self._authenticating = authenticating = start(self._authenticate())
            authenticating.addCallbacks(self._authenticated, self._authentication_failed, callbackArgs=(request,))
        if self._answer is not None and self._timer is None:
            self._time(self._open_deadline)  # (waiting for the authenticator or the cluster, not a connect)

    def _authenticated(self, authenticated: tuple[HandshakeContext, Identity | None], request: ConnectionRequest) -> None:
        self._authenticating = None
        self._open_upstream(request, *authenticated)

    def _authentication_failed(self, failure: Failure) -> None:
        self._authenticating = None
        self._end_opening(failure)

    def _cancel_handshake(self) -> None:
        """ws_open_timeout, or the client left: the work under way is cancelled (its failure answers the client)."""
        if self._answer is None:
            return
        if self._authenticating is not None:
            self._authenticating.cancel()
        else:
            self._cancel_opening()

    def _time(self, deadline: float, connecting: bool = False) -> None:
        """
        Arm the handshake's one timer for ``deadline``: the upstream connect's
        when ``connecting`` (the connect fails with a connect timeout when it is due), or
        ws_open_timeout's (the whole handshake is cancelled and answered 504).
        One ``DelayedCall`` serves every deadline of a handshake: re-armed
        later (``reset``), it only takes a new time; a deadline sooner than
        the one armed (a connect inside an authentication's wait) gets a new one.
        """
        clock = self.factory.clock
        self._timing_connect = connecting
        timer = self._timer
        if timer is not None and deadline >= timer.getTime():
            if deadline > timer.getTime():
                timer.reset(deadline - clock.seconds())
            return
        if timer is not None:
            timer.cancel()
        self._timer = clock.callLater(max(0.0, deadline - clock.seconds()), self._overdue)

    def _overdue(self) -> None:
        self._timer = None
        dialing = self._dialing if self._timing_connect else None
        self._timing_connect = False
        if dialing is not None:
            self._connect_overdue = True
            dialing()
        elif self._answer is not None:
            self._timed_out = True
            self._cancel_handshake()

    def _opened_or_refused(self, result: _Accept | Failure) -> _Accept:
        """The end of ``onConnect``'s work: the answer, or the refusal as a ``ConnectionDeny``."""
        self._timing_connect = False
        timer = self._timer
        if timer is not None:
            self._timer = None
            timer.cancel()
        self.factory.registry.handshakes.discard(self.pair)
        if isinstance(result, Failure):
            if self._timed_out and result.check(CancelledError):
                result = Failure(TimeoutError(self.factory.gateway.ws_open_timeout, "Deferred"))
            self._refuse(result)
        self.factory.metrics.ws_handshake(self.factory.route.name, "accepted")
        return result

    def answer_upgrade(self, head: UpgradeHead, body: bytes) -> bool:
        """
        Answer the upgrade from the request head already parsed: what
        Autobahn's ``processHandshake`` does with the same request written out
        to it (the same checks, the same attributes, then ``onConnect``),
        without writing it out and parsing it again. False, having changed
        nothing, for a request Autobahn would refuse or that needs more than
        its checks (:func:`hand_over` then writes it out to Autobahn, which
        answers as it always has).
        """
        status_line = (head.method + b" " + head.uri + b" HTTP/1.1").decode("latin-1")
        checked = head.checked
        if not checked and START_LINE_INVALID.search(status_line):
            return False
        line = status_line.strip(" ").split()
        if len(line) != 3 or line[0] != "GET":
            return False
        headers: dict[str, str] = {}
        for raw_name, values in head.headers:
            name = raw_name.decode("latin-1")
            value = b", ".join(values).decode("latin-1").strip(" \t")
            lower = name.lower()
            if lower in headers or not checked and (not FIELD_NAME.fullmatch(name) or FIELD_VALUE_INVALID.search(value)):
                return False
            headers[lower] = value
        target = line[1]
        try:
            if target[:1] == "/" and target[:2] != "//" and ";" not in target and "#" not in target:
                # an origin-form target without parameters: what urlparse makes of it
                path, _, query = target.partition("?")
                fragment = ""
            else:
                _, _, path, _, query, fragment = urlparse(target)
            params = parse_qs(query) if query else {}
        except Exception:
            return False
        host = headers.get("host")
        version = headers.get("sec-websocket-version", "")
        if fragment or host is None or not version.strip().isdigit():
            return False
        host = host.strip()
        if ":" in host and not host.endswith("]"):
            host, port = host.rsplit(":", 1)
            try:
                number = int(port.strip())
            except ValueError:
                return False
            if self.factory.externalPort and number != self.factory.externalPort:
                return False
        if not (
            "websocket" in (token.strip().lower() for token in headers.get("upgrade", "").split(","))
            and "upgrade" in (token.strip().lower() for token in headers.get("connection", "").split(","))
            and int(version) in self.versions
        ):
            return False
        protocols = [p.strip() for p in headers["sec-websocket-protocol"].split(",")] if "sec-websocket-protocol" in headers else []
        if len(set(protocols)) != len(protocols):
            return False
        origin = headers.get("origin" if int(version) >= 13 else "sec-websocket-origin")
        if origin is not None and not origin_allowed(self, origin.strip()):
            return False
        key = headers.get("sec-websocket-key", "").strip()
        if len(key) != 24 or key[-2:] != "==" or not _BASE64.issuperset(key[:-2]):
            return False
        offered = headers.get("sec-websocket-extensions")
        extensions = parse_extensions(self, offered) if offered is not None else []
        # what processHandshake leaves on the protocol
        forwarded = headers.get("x-forwarded-for")
        if forwarded is not None and self.trustXForwardedFor:
            self.peer = [a.strip() for a in forwarded.split(",")][-self.trustXForwardedFor :][0]
        self.http_status_line, self.http_headers, self.http_request_uri = status_line.strip(" "), headers, line[1]
        self.http_request_path, self.http_request_params, self.http_request_host = path, params, host
        self.websocket_version, self.websocket_protocols = int(version), protocols
        self.websocket_origin = origin.strip() if origin is not None else ""
        self.websocket_extensions, self._wskey, self.data = extensions, key, body
        if self.maxConnections > 0 and self.factory.countConnections > self.maxConnections:
            self.failHandshake("maximum number of connections reached", code=503)
            return True
        connection = ConnectionRequest(
            self.peer, headers, host, path, params, self.websocket_version, self.websocket_origin, protocols, extensions
        )
        self.open_upstream(connection, self.succeedHandshake, self._connect_failed)
        return True

    def _connect_failed(self, failure: Failure) -> None:
        """What Autobahn's ``processHandshake`` does when ``onConnect`` fails."""
        if isinstance(failure.value, ConnectionDeny):
            self.failHandshake(failure.value.reason or "", failure.value.code)
            return
        log.failure("unexpected error in onConnect", failure)
        self.failHandshake(f"Internal server error: {failure.value}", ConnectionDeny.INTERNAL_SERVER_ERROR)

    def onOpen(self) -> None:
        self.pair.opened()

    async def _authenticate(self) -> tuple[HandshakeContext, Identity | None]:
        """The context the upstream gets once the request is authenticated, and the identity (its per-user cap acquired)."""
        ctx = self.context
        factory = self.factory
        pair = self.pair
        authenticator = factory.authenticator
        assert authenticator is not None  # (onConnect's check)
        identity = await authenticator.authenticate(ctx.route.auth, ctx.headers, ctx.query, ctx.route)
        extra = identity.upstream_headers(ctx.route.claims_header) if identity is not None else []
        ctx = ctx.authenticated(authenticator.upstream_query(ctx.query), [*ctx.extra_headers, *extra])
        pair.identity = identity
        if identity is not None and identity.subject is not None and factory.cluster is not None:
            pair.capped = capped = await factory.cluster.acquire(identity.subject, ctx.route)
            if self.state == CLOSED and capped is not None:  # the client left while the cap was checked
                factory.cluster.release(capped)
                pair.capped = None
                raise CancelledError()
        return ctx, identity

    # -- the upstream leg: each instance tried in turn ----------------------------
    # Plain callbacks from one step to the next (the connect, the upstream's
    # handshake, the next instance): a coroutine's Deferred, its resumes and a
    # Deferred per upstream handshake cost more than the steps themselves.

    def _open_upstream(self, request: ConnectionRequest, ctx: HandshakeContext, identity: Identity | None) -> None:
        """
        Open the upstream leg: a connect failure is retried on the next
        healthy instance, each at most once (ws_open_timeout, around the whole
        of onConnect, bounds the retries). The client is answered once the
        legs are joined, or with why no upstream opened (:meth:`_end_opening`);
        cancelled, the step under way is (:meth:`_cancel_opening`).
        """
        pool = ctx.pool
        try:
            key = pool.request_key(
                query=ctx.query,
                headers=ctx.headers,
                claims=identity.claims if identity is not None else None,
                peer=ctx.peer,
                trusted_proxies=self.factory.gateway.trusted_proxies,
            )
            self._opening = (ctx, request, iter(pool.candidates(key, retry=True)))
        except BaseException:  # (no healthy instance, for one)
            self._end_opening(Failure())
            return
        self._try_next()

    def _try_next(self) -> None:
        """Connect the next instance, or fail with why the last one could not be."""
        assert self._opening is not None  # (while opening)
        ctx, request, candidates = self._opening
        try:
            instance = next(candidates, None)
        except BaseException:
            self._end_opening(Failure())
            return
        if instance is None:
            self._end_opening(Failure(BadGateway(f"cannot connect to the upstream: {self._last_error}")))
            return
        instance.acquire(websocket=True)
        self._instance = instance
        factory = self.factory
        try:
            cancel = factory.connect(factory.client_factory_for(ctx, request, instance.url), self._dialed, self._dial_failed)
        except BaseException:
            self._attempt_failed(Failure())
            return
        if self._instance is instance and self._waiting is None:  # (still connecting: each instance is tried once)
            self._dialing = cancel
            # connect_timeout, on the handshake's timer (the connector's own is off: connector.untimed)
            connect_deadline = factory.clock.seconds() + factory.gateway.connect_timeout
            if connect_deadline < self._open_deadline:
                self._time(connect_deadline, connecting=True)
            else:
                self._time(self._open_deadline)

    def _dialed(self, upstream: object) -> None:
        """The connect succeeded: the upstream leg's handshake is waited for (:meth:`upstream_ended`)."""
        self._dialing = None
        self._time(self._open_deadline)
        assert isinstance(upstream, RelayClientProtocol)  # the factory's protocol
        self._waiting = upstream
        if upstream.handshake_ended:
            self.upstream_ended(upstream)
        else:
            upstream.opening = self

    def _dial_failed(self, failure: Failure) -> None:
        self._dialing = None
        if failure.check(CancelledError, ConnectingCancelledError):
            if self._connect_overdue:
                self._connect_overdue = False
                failure = Failure(ConnectTimeout())  # what the connector's own timer fails a connect with
            elif self._timed_out:
                # ws_open_timeout came during the connect: a 504 like any handshake past it
                # (the connector's ConnectingCancelledError would have read as the client leaving)
                failure = Failure(CancelledError())
        self._attempt_failed(failure)

    def upstream_ended(self, upstream: RelayClientProtocol) -> None:
        """
        The upstream leg's handshake ended (:meth:`RelayClientProtocol._end_handshake`):
        the legs are joined, or the refusal is the client's answer.
        """
        if upstream is not self._waiting:
            return
        self._waiting = None
        assert self._opening is not None and self._instance is not None  # (while opening)
        ctx = self._opening[0]
        error = upstream.handshake_error
        if error is not None:
            try:
                failure = Failure(_handshake_failure(error, ctx, self._instance.url))
            except BaseException:
                failure = Failure()
            self._attempt_failed(failure)
            return
        instance, self._instance = self._instance, None
        ctx.pool.report_success(instance)
        pair = self.pair
        pair.instance = instance
        if self.state == CLOSED:
            # The client left in the very turn the upstream answered.
            instance.release(websocket=True)
            pair.instance = None
            upstream.close_with(CLIENT_LOST)
            self._end_opening(Failure(CancelledError()))
            return
        try:
            # The client is granted exactly the compression the upstream granted us.
            self.perMessageCompressionAccept = self._mirror_compression(upstream)
            pair.join(upstream)
        except BaseException:
            self._end_opening(Failure())
            return
        self._end_opening((upstream.websocket_protocol_in_use, {}))

    def _attempt_failed(self, failure: Failure) -> None:
        """One instance could not be opened: what it means for its health, then the next one or the end."""
        instance, self._instance = self._instance, None
        error = failure.value
        assert error is not None  # (a failure's)
        fault = self._fault(error)
        if instance is not None:
            instance.release(websocket=True)
            assert self._opening is not None  # (an instance is tried only while opening)
            pool = self._opening[0].pool
            if fault.counts:
                pool.report_failure(instance, fault.reason)
            elif fault is ANSWERED:
                pool.report_success(instance)  # it answered, if not with a 101
        if fault in (CANCELLED, CLIENT_GONE):
            self._end_opening(Failure(CancelledError()))
        elif fault is LOCAL:
            self._end_opening(Failure(Overloaded(f"cannot connect to the upstream: {describe(error)}")))
        elif isinstance(error, (ConnectError, DNSLookupError, OSError)):
            # (its description: the exception itself, held here, would hold this frame through its traceback)
            self._last_error = describe(error)
            self._try_next()
        else:
            self._end_opening(failure)

    def _cancel_opening(self) -> None:
        """The handshake is cancelled (ws_open_timeout, or the client left): so is the step under way."""
        dialing, upstream = self._dialing, self._waiting
        if dialing is not None:
            dialing()  # (its failure ends the opening: _dial_failed)
            return
        if upstream is not None:
            self._waiting = upstream.opening = None
            if upstream.transport is not None:
                upstream.transport.abortConnection()
        self._attempt_failed(Failure(CancelledError()))

    def _end_opening(self, outcome: _Accept | Failure) -> None:
        """The upstream leg is open and joined, or none will be: the client is answered (:meth:`open_upstream`)."""
        answer, self._answer = self._answer, None
        self._opening = None
        if answer is None:
            return
        accept, refuse = answer
        try:
            try:
                accepted = self._opened_or_refused(outcome)
            except BaseException:
                refuse(Failure())
            else:
                accept(accepted)
        except Exception:
            log.failure("answering the client's WebSocket handshake failed")

    def _fault(self, error: BaseException) -> Fault:
        """What one failed attempt means for the instance's health (:mod:`faults`)."""
        if self.state == CLOSED:
            return CLIENT_GONE
        if isinstance(error, (CancelledError, ConnectingCancelledError)):
            if self._timed_out:
                return classify(TimeoutError())  # ws_open_timeout: no answer in time
            return CANCELLED
        cause = error.__cause__ if isinstance(error, GatewayError) else error
        if isinstance(cause, UpstreamHandshakeFailed):
            if cause.status is not None:
                return ANSWERED  # any status line, even a 200 to an upgrade
            return classify(cause.cause or ConnectionDone())
        return classify(error)

    def _refuse(self, failure: Failure) -> NoReturn:
        deny: GatewayError
        if failure.check(TimeoutError):
            deny = GatewayTimeout("the upstream did not complete the WebSocket handshake in time")
        elif isinstance(failure.value, GatewayError):
            deny = failure.value
        elif failure.check(CancelledError, ConnectingCancelledError):
            deny = GatewayError("the client went away", status=499, error="client_closed")
        else:
            log.failure("unexpected error opening the upstream", failure)
            deny = GatewayError("unexpected error opening the upstream")
        self._deny = deny
        self._count_refusal(deny)
        if deny.status != 499:
            ctx = self.context
            access_log.info(
                "websocket {route} {path} {peer} refused: {status} {detail}",
                route=ctx.route.name,
                path=ctx.path.decode("latin-1"),
                peer=ctx.peer,
                status=deny.status,
                detail=deny.detail,
                event="ws_refused",
            )
        raise ConnectionDeny(deny.status, deny.detail)

    def _count_refusal(self, error: GatewayError) -> None:
        metrics, route = self.factory.metrics, self.factory.route.name
        outcome = _REFUSAL_OUTCOMES.get(error.status)
        if isinstance(error, UpstreamRefused):
            outcome = "refused_by_upstream"
        if error.error == "auth_unavailable":
            outcome = "auth_unavailable"
        if error.status == 401 or error.error == "insufficient_scope":
            metrics.auth_failure(route, error.error)
        if outcome is not None:
            metrics.ws_handshake(route, outcome)

    def _mirror_compression(
        self, upstream: RelayClientProtocol
    ) -> Callable[[Sequence[PerMessageCompressOffer]], PerMessageDeflateOfferAccept | None]:
        """
        The client is answered with the parameters the upstream answered the
        same offer with, so that both legs compress alike (context takeover
        and all): the bytes on the wire are those of a direct connection.
        """
        granted = upstream_deflate_response(upstream)

        def accept(offers: Sequence[PerMessageCompressOffer]) -> PerMessageDeflateOfferAccept | None:
            if granted is None:
                return None
            for offer in offers:
                if isinstance(offer, PerMessageDeflateOffer):
                    try:
                        return mirrored_accept(offer, granted)
                    except Exception:
                        continue
            return None

        return accept

    def failHandshake(
        self, reason: str, code: int = 400, responseHeaders: Sequence[tuple[str, str]] | None = None
    ) -> None:
        """Answer a refused handshake with a JSON body (Autobahn's sends none)."""
        if self.state == CLOSED or self.transport is None:
            return
        error = self._deny or GatewayError(reason, status=code, error="bad_handshake")
        self._deny = None
        self.wasNotCleanReason = error.detail
        refusal = getattr(error, "refusal", None)
        if refusal is not None:
            self.sendData(refusal.raw_response())  # the upstream's own answer
        else:
            extra = [(str(k).encode("latin-1"), str(v).encode("latin-1")) for k, v in responseHeaders or ()]
            self.sendData(error.raw_response(extra))
        _drop_quietly(self, abort=False)

    # -- closing ------------------------------------------------------------

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.end_close_wait()
        self._cancel_handshake()
        # (None when the upstream leg's close ended the pair first: Pair.finish)
        pair: Pair | None = self.pair
        if pair is not None:
            pair.leg_closed(self)



#: The characters of a Sec-WebSocket-Key before its "==" (as Autobahn checks them)
_BASE64 = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+/")

_REFUSAL_OUTCOMES = {
    401: "unauthorized",
    403: "forbidden",
    429: "limited",
    503: "limited",
    502: "bad_gateway",
    504: "gateway_timeout",
}


def _handshake_failure(error: UpstreamHandshakeFailed, ctx: HandshakeContext, instance_url: str) -> GatewayError:
    """What the client is answered when the upstream's handshake failed: its refusal (redirects rewritten), or a 502."""
    failure: GatewayError
    if error.refusal is not None and error.status is not None and error.status >= 300:
        refusal = error.refusal
        client = f"{ctx.scheme}://".encode() + ctx.host if ctx.host else None
        origins = upstream_origins(instance_url, ctx.route.host_header)
        headers = tuple(rewrite_redirects(refusal.headers, origins, client))
        failure = UpstreamRefused(
            f"the upstream refused the WebSocket handshake: {error.status} {error.phrase}".strip(),
            status=error.status,
            refusal=replace(refusal, headers=headers),
        )
    elif error.status is not None and error.status >= 400:
        failure = UpstreamRefused(
            f"the upstream refused the WebSocket handshake: {error.status} {error.phrase}".strip(),
            status=error.status,
        )
    else:
        failure = BadGateway(f"the upstream's WebSocket handshake failed: {error}")
    failure.__cause__ = error
    return failure


def _drop_quietly(protocol: RelayClientProtocol | RelayServerProtocol, abort: bool) -> None:
    """
    End a handshake's connection without Autobahn's warning line: a refused
    handshake is logged once, as ``ws_refused``, with what the client got.
    """
    protocol.wasClean = True
    protocol.dropConnection(abort=abort)


# -- factories ---------------------------------------------------------------

#: Client headers that belong to the client's handshake (the upstream's own are written
#: for it; the hybi-08 ``Sec-WebSocket-Origin`` is never passed on as an origin).
_NOT_FORWARDED = WEBSOCKET_HANDSHAKE | {b"origin", b"sec-websocket-origin"}


class _UpstreamFactory(WebSocketClientFactory):
    """The upstream leg's factory: what its handshake sends besides Autobahn's own."""

    #: this handshake's request up to the Sec-WebSocket-Key's value, and after it
    request_head = request_tail = b""
    #: the gateway's clock, which Autobahn's timers of the leg run on too
    clock: IReactorTime


class RelayServerFactory(WebSocketServerFactory):
    """The client-facing factory of one route."""

    protocol = RelayServerProtocol  # type: ignore[assignment]  # its factory is ours, not a Factory[Self]
    noisy = False

    def __init__(
        self,
        route: RouteSettings,
        gateway: GatewaySettings,
        *,
        clock: IReactorTime,
        registry: RelayRegistry,
        connect: RelayConnect,
        authenticator: Authenticator | RevocationGuard | None = None,
        metrics: Metrics | None = None,
        cluster: Cluster | None = None,
    ) -> None:
        super().__init__()
        self.route, self.gateway, self.clock = route, gateway, clock
        #: cluster.Cluster: per-user caps (None: none counted)
        self.cluster = cluster
        self.registry = registry
        self.authenticator = authenticator
        self.metrics = metrics if metrics is not None else Metrics(routes=[route.name])
        #: connects a per-handshake upstream factory; returns its protocol
        self.connect = connect
        self.compression = route.ws_compression if route.ws_compression is not None else gateway.ws_compression
        #: messages a second a client may send (0: no limit), and the burst it may save up
        self.rate_limit = route.ws_rate_limit if route.ws_rate_limit is not None else gateway.ws_rate_limit
        burst = route.ws_rate_burst if route.ws_rate_burst is not None else gateway.ws_rate_burst
        self.rate_burst = burst_for(self.rate_limit, burst)
        max_age = route.ws_max_age if route.ws_max_age is not None else gateway.ws_max_age
        #: ws_max_age: closes each pair at its (jittered) age limit
        self.ageing = Ageing(clock, max_age)
        options = dict(
            maxMessagePayloadSize=gateway.ws_max_message_size,
            # (the close's timer is the leg's own: _RelayLeg.sendCloseFrame)
            openHandshakeTimeout=0,
            closeHandshakeTimeout=0,
            failByDrop=False,
            echoCloseCodeReason=True,
            webStatus=False,
            # the route's Origin policy (resource.py) is the only one applied
            allowNullOrigin=True,
        )
        self.setProtocolOptions(**options)
        timers_on(self, clock)
        render_debug_lazily()
        mask_short_payloads()
        self.protocol = with_options(RelayServerProtocol, self)
        self._client_template = _UpstreamFactory(url="ws://upstream/", useragent=None)
        self._client_template.noisy = False
        self._client_template.clock = clock
        timers_on(self._client_template, clock)
        self._client_template.setProtocolOptions(
            maxMessagePayloadSize=gateway.ws_max_message_size_upstream
            or gateway.ws_max_message_size,
            openHandshakeTimeout=0,
            closeHandshakeTimeout=0,
            serverConnectionDropTimeout=0,
            failByDrop=False,
            echoCloseCodeReason=True,
            perMessageCompressionAccept=lambda response: PerMessageDeflateResponseAccept(response)
            if isinstance(response, PerMessageDeflateResponse)
            else None,
        )
        #: client headers no upstream leg gets (the handshake's own and strip_request_headers)
        self._not_forwarded = _NOT_FORWARDED | frozenset(name.encode("ascii") for name in gateway.strip_request_headers)
        upstream_leg = with_options(RelayClientProtocol, self._client_template)
        upstream_leg.tcp_keepalive = gateway.tcp_keepalive
        self._client_template.protocol = upstream_leg
        #: each handshake's factory: the template's attributes as class attributes, shared
        #: (none is changed per handshake), instead of a copy of them per handshake
        self._client_factory_type: type[_UpstreamFactory] = type(
            "RouteUpstreamFactory", (_UpstreamFactory,), dict(vars(self._client_template))
        )

    def client_factory_for(
        self, ctx: HandshakeContext, request: ConnectionRequest, base_url: str
    ) -> _UpstreamFactory:
        """
        The upstream factory of one handshake: the route's options (class
        attributes of :attr:`_client_factory_type`) and this handshake's
        address, offer and request, written here once, bytes around the key
        each connection draws (:meth:`RelayClientProtocol.startHandshake`).
        """
        factory_type = self._client_factory_type
        factory = factory_type.__new__(factory_type)
        url = upstream_url(base_url, ctx.path, ctx.query, websocket=True)
        # Headers by name as sent (the last of extra_headers wins, in the first's place;
        # a repeated client header joined).
        headers: dict[bytes, bytes] = {}
        for name, value in upstream_request_headers(
            ctx.headers,
            peer=ctx.peer,
            scheme=ctx.scheme,
            host=ctx.host,
            trusted_proxies=self.gateway.trusted_proxies,
            drop=self._not_forwarded,
            underscores=ctx.route.underscores_in_headers,
        ):
            if name in headers:
                sep = b"; " if name.lower() == b"cookie" else b", "
                headers[name] = headers[name] + sep + value
            else:
                headers[name] = value
        for name, value in ctx.extra_headers:
            headers[name] = value
        # the one Origin the route's policy checked (resource.py), never Sec-WebSocket-Origin
        origins = [value for name, value in ctx.headers if name.lower() == b"origin"]
        origin = origins[0].decode("utf-8") if origins and origins[0] else None
        slash = url.find("/", url.index("//") + 2)
        if slash < 0 or "#" in url:
            factory.setSessionParameters(url=url, origin=origin, protocols=list(request.protocols), useragent=None)
        else:
            # What setSessionParameters sets, without parsing the URL again: the
            # instance's scheme, host and port are parsed once; the request
            # target goes as written (Autobahn's urlparse dropped a last
            # segment's ";parameters").
            factory.url = url
            factory.isSecure, factory.host, factory.port = _instance_address(base_url)
            factory.resource = url[slash:]
            factory.origin = origin
            factory.protocols = list(request.protocols)
        host = upstream_host(ctx.route.host_header, ctx.host)
        if host:
            host.decode("ascii")  # (a Host that is not ASCII fails the handshake here)
        else:
            host = f"{factory.host}:{factory.port}".encode("utf-8")
        head = [
            f"GET {factory.resource} HTTP/1.1\r\nHost: ".encode("utf-8"),
            host,
            b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n",
        ]
        # every value is UTF-8 (the client's: headers.check_utf8_values refused the upgrade
        # otherwise; the gateway's are made so), so the request reaches the upstream byte for byte
        for name, value in headers.items():
            head += (name if name.isascii() else name.decode("latin-1").encode("utf-8"), b": ", value, b"\r\n")
        head.append(b"Sec-WebSocket-Key: ")
        factory.request_head = b"".join(head)
        tail = ["\r\n"]
        if origin:
            tail.append(f"Origin: {origin}\r\n")
        if factory.protocols:
            tail.append(f"Sec-WebSocket-Protocol: {','.join(factory.protocols)}\r\n")
        if self.compression:
            offers = [value for name, value in ctx.headers if name.lower() == b"sec-websocket-extensions"]
            offer = deflate_offer(offers)
            if offer:
                tail.append(f"Sec-WebSocket-Extensions: {offer}\r\n")
        tail.append("Sec-WebSocket-Version: 13\r\n\r\n")
        factory.request_tail = "".join(tail).encode("utf-8")
        return factory


@functools.lru_cache(maxsize=1024)
def _instance_address(base_url: str) -> tuple[bool, str, int]:
    """Whether an instance's URL is wss, its host and its port, as Autobahn parses them."""
    secure, host, port, *_ = parse_url(upstream_url(base_url, b"/", b"", websocket=True))
    return secure, host, port


def deflate_offer(values: Sequence[bytes]) -> str:
    """
    The ``permessage-deflate`` elements of a client's ``Sec-WebSocket-Extensions``,
    as written (parameters, order, spacing), for the upstream's handshake;
    other extensions are left out (the relay implements only this one).
    """
    elements = []
    for value in values:
        for element in value.decode("utf-8", "replace").split(","):
            if element.split(";", 1)[0].strip().lower() == "permessage-deflate":
                elements.append(element.strip())
    return ", ".join(elements)


def upstream_deflate_response(upstream: RelayClientProtocol) -> PerMessageDeflateResponse | None:
    """The upstream's ``permessage-deflate`` answer, as it wrote it (None without one)."""
    if not any(e.EXTENSION_NAME == "permessage-deflate" for e in upstream.websocket_extensions_in_use):
        return None
    text = upstream.http_headers.get("sec-websocket-extensions", "")
    for extension, params in parse_extensions(upstream, text):
        if extension == "permessage-deflate":
            response: PerMessageDeflateResponse = PerMessageDeflateResponse.parse(params)
            return response
    return None


def mirrored_accept(
    offer: PerMessageDeflateOffer, response: PerMessageDeflateResponse
) -> PerMessageDeflateOfferAccept:
    """Accept the client's ``offer`` with what the upstream answered it with."""
    return PerMessageDeflateOfferAccept(
        offer,
        request_no_context_takeover=bool(response.client_no_context_takeover),
        request_max_window_bits=response.client_max_window_bits or 0,
        no_context_takeover=True if response.server_no_context_takeover else None,
        window_bits=response.server_max_window_bits or None,
    )


# -- handing a twisted.web request over to the relay ------------------------


class UpgradeHead(NamedTuple):
    """
    An upgrade request's head as :func:`hand_over` replays it: its method, its
    target as sent, and its headers as twisted.web's ``Headers`` hold them
    (each name once, in Header-Case, with its values in order).
    """

    method: bytes
    uri: bytes
    headers: Sequence[tuple[bytes, Sequence[bytes]]]
    #: parsed by llhttp, whose rules for the target, the names and the values
    #: take nothing that Autobahn's parser refuses (``tests/test_upgrade_answer.py``
    #: checks every byte): :meth:`RelayServerProtocol.answer_upgrade` need not
    #: check them again
    checked: bool = False


def hand_over(
    channel: HTTPChannel, factory: RelayServerFactory, context: HandshakeContext, head: UpgradeHead, body: bytes
) -> int:
    """
    Move the HTTP channel's transport to a new :class:`RelayServerProtocol`
    and replay the upgrade request to it (as Autobahn's ``WebSocketResource``
    does, plus the context and the producer bookkeeping a relay needs).
    """
    # the connection under the channel (TCP, TLS or a wrapper): its protocol is swapped below
    transport: Any = channel.transport
    protocol: object = factory.buildProtocol(transport.getPeer())
    assert isinstance(protocol, RelayServerProtocol)  # factory.protocol
    protocol.context = context
    protocol.pair = Pair(protocol, context, factory)
    registry = factory.registry
    registry.active[context.route.name] = registry.active.get(context.route.name, 0) + 1
    channel.setTimeout(None)
    channel.transport = None
    if getattr(transport, "producer", None) is not None:
        transport.unregisterProducer()
    if isinstance(transport, ProtocolWrapper):
        transport.wrappedProtocol = protocol
    elif isinstance(getattr(transport, "protocol", None), ProtocolWrapper):
        transport.protocol.wrappedProtocol = protocol
    else:
        transport.protocol = protocol
    if isinstance(channel, LlhttpChannel):
        channel.handed_over()
    protocol.makeConnection(transport)
    transport.resumeProducing()
    if not protocol.answer_upgrade(head, body):
        # Autobahn's parser and checks refuse it (or answer it) as they would any request
        data = [head.method + b" " + head.uri + b" HTTP/1.1"]
        for name, values in head.headers:
            data.append(name + b": " + b", ".join(values))
        protocol.dataReceived(b"\r\n".join(data) + b"\r\n\r\n" + body)
    return NOT_DONE_YET
