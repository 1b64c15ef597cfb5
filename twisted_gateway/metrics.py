"""
Prometheus metrics for the gateway, counted with plain integers.

The relay counts every message, so counting must cost next to nothing: each
method of :class:`Metrics` is a dict lookup and a few integer additions on
``__slots__`` objects, and nothing touches ``prometheus_client`` until a
scrape, when :class:`GatewayCollector` turns the integers into metric
families. Not ``prometheus_client.Histogram``: its ``observe`` (a lock per
bucket and per sum, a linear bucket scan) costs about 8,800 instructions
against 1,650 for :meth:`MessageFlow.count`, and 64-byte messages took about
a third more gateway CPU with it. Every label value comes from a bounded set: routes are configured
route names, and methods, statuses, outcomes, sides, directions, close codes
and auth reasons are normalised here. Each :class:`Metrics` has its own
``CollectorRegistry``, so two gateways in one process never share a series.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping, TypeVar
from urllib.parse import urlsplit, urlunsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from twisted.logger import Logger
from twisted.web.server import Request

from twisted_gateway._bases import Resource

log = Logger()

_Row = TypeVar("_Row")

#: The label value for anything outside a fixed set.
OTHER = "other"
#: The ``route`` label of a request that matched no route.
UNROUTED = "unrouted"

DIRECTIONS = ("client_to_upstream", "upstream_to_client")
HANDSHAKE_OUTCOMES = frozenset(
    {
        "accepted",
        "unauthorized",
        "forbidden",
        "bad_gateway",
        "gateway_timeout",
        "refused_by_upstream",
        "limited",
        "auth_unavailable",
    }
)
CLOSE_SIDES = frozenset({"client", "upstream", "gateway"})
#: Why a pair ended: a close frame or a lost connection (client, upstream), or
#: the gateway's decision; anything else counts as ``other``.
CLOSE_REASONS = frozenset(
    {
        "close_frame",
        "lost",
        "ping_timeout",
        "keepalive",
        "send_timeout",
        "protocol_error",
        "token_expired",
        "rate_limit",
        "max_age",
        "admin",
        "revoked",
        "drain",
        "gateway",
    }
)
#: RFC 6750 error codes and the gateway's own; anything else counts as ``other``.
AUTH_FAILURE_REASONS = frozenset(
    {"missing_token", "invalid_token", "expired_token", "insufficient_scope", "forbidden"}
)
_METHODS: dict[bytes | str, str] = {
    m: m.decode("ascii")
    for m in (b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS")
}
_METHODS.update({name: name for name in list(_METHODS.values())})

#: Upper bounds (bytes) of the message size histogram; +Inf is implied.
MESSAGE_SIZE_BUCKETS = (64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216)
#: Upper bounds (seconds) of the HTTP duration histogram; +Inf is implied.
HTTP_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

#: What the upstream pool reports at scrape time: (route, url, up, open connections).
UpstreamStates = Callable[[], Iterable[tuple[str, str, bool, int]]]
UpstreamFailures = Callable[[], Iterable[tuple[str, str, str, int]]]


@dataclass(frozen=True)
class Load:
    """
    What the gateway holds right now, read at scrape time: a soak run reads
    these to prove that everything it opened was given back.
    """

    #: timers pending on the reactor (per-connection timers come and go with their owners)
    delayed_calls: int = 0
    #: HTTP requests answered or being answered now
    http_in_flight: int = 0
    #: WebSocket opening handshakes in progress
    handshakes_in_progress: int = 0


GatewayLoad = Callable[[], Load]


# -- label normalisation (pure) ----------------------------------------------


def normalize_method(method: bytes | str) -> str:
    """The method if it is a standard one (case-sensitive, as HTTP is), else ``other``."""
    return _METHODS.get(method, OTHER)


def normalize_status(status: int) -> str:
    """A status code 100-599 as its number, else ``other``."""
    return str(status) if isinstance(status, int) and 100 <= status <= 599 else OTHER


def normalize_close_code(code: int | None) -> str:
    """A close code 1000-4999 as its number, ``none`` when the close carried none."""
    if code is None:
        return "none"
    return str(code) if isinstance(code, int) and 1000 <= code <= 4999 else OTHER


def normalize_auth_reason(reason: str) -> str:
    return reason if reason in AUTH_FAILURE_REASONS else OTHER


def upstream_label(url: str) -> str:
    """An upstream URL without credentials, query or fragment (it becomes a label)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = host if parts.port is None else f"{host}:{parts.port}"
    except ValueError:
        return OTHER
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


# -- the counters -------------------------------------------------------------


class MessageFlow:
    """Messages relayed one way on one route: bytes and a size histogram."""

    __slots__ = ("bytes", "sizes")

    def __init__(self) -> None:
        self.bytes = 0
        #: non-cumulative count per bucket of MESSAGE_SIZE_BUCKETS, then +Inf
        self.sizes = [0] * (len(MESSAGE_SIZE_BUCKETS) + 1)

    def count(self, size: int) -> None:
        """Count one message of ``size`` payload bytes."""
        self.bytes += size
        self.sizes[bisect_left(MESSAGE_SIZE_BUCKETS, size)] += 1

    @property
    def messages(self) -> int:
        return sum(self.sizes)


class RouteCounters:
    """Everything counted for one route, as plain integers."""

    __slots__ = (
        "name",
        "http_requests",
        "http_durations",
        "http_duration_sum",
        "handshakes",
        "open",
        "closes",
        "auth_failures",
        "limit_rejections",
        "flows",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.http_requests: dict[tuple[str, str], int] = {}
        self.http_durations = [0] * (len(HTTP_DURATION_BUCKETS) + 1)
        self.http_duration_sum = 0.0
        self.handshakes: dict[str, int] = {}
        self.open = 0
        self.closes: dict[tuple[str, str, str], int] = {}
        self.auth_failures: dict[str, int] = {}
        #: handshakes refused and WebSockets closed by a limit, by limit
        self.limit_rejections: dict[str, int] = {}
        self.flows = {direction: MessageFlow() for direction in DIRECTIONS}


class Metrics:
    """
    The counters of one gateway and the registry that exports them.

    Call the verbs from the data path; serve :attr:`registry` with
    :class:`MetricsResource`. ``upstreams`` is asked for the upstream gauges
    at each scrape. Everything runs in the reactor thread.
    """

    def __init__(
        self,
        *,
        routes: Iterable[str] = (),
        upstreams: UpstreamStates | None = None,
        upstream_failures: UpstreamFailures | None = None,
        load: GatewayLoad | None = None,
        jwks: Callable[[], tuple[int, Mapping[str, int]]] | None = None,
    ) -> None:
        self._routes: dict[str, RouteCounters] = {}
        self._flows: dict[tuple[str, str], MessageFlow] = {}
        self.upstreams: UpstreamStates = upstreams if upstreams is not None else _no_upstreams
        #: ``(route, url, reason, count)`` of failures counted against instances, at each scrape
        self.upstream_failures: UpstreamFailures = (
            upstream_failures if upstream_failures is not None else _no_upstreams
        )
        #: the load gauges, read at each scrape
        self.load: GatewayLoad = load if load is not None else Load
        #: the number of known JWKS keys and the failed fetches by reason, read at each scrape
        self.jwks = jwks
        for name in routes:
            self.route(name)
        self.connections_refused = 0
        self.registry = CollectorRegistry()
        self.registry.register(GatewayCollector(self))

    def route(self, name: str) -> RouteCounters:
        """The counters of a route, created at first use."""
        counters = self._routes.get(name)
        if counters is None:
            counters = self._routes[name] = RouteCounters(name)
            for direction, flow in counters.flows.items():
                self._flows[name, direction] = flow
        return counters

    @property
    def routes(self) -> list[RouteCounters]:
        return [self._routes[name] for name in sorted(self._routes)]

    def flow(self, route: str, direction: str) -> MessageFlow:
        """The message counters of one direction of a route (a relay leg may keep it)."""
        if direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {direction!r}")
        return self.route(route).flows[direction]

    # -- the verbs the data path calls ----------------------------------------

    def ws_message(self, route: str, direction: str, size: int) -> None:
        """One relayed WebSocket message of ``size`` payload bytes."""
        try:
            flow = self._flows[route, direction]
        except KeyError:
            flow = self.flow(route, direction)
        flow.bytes += size
        flow.sizes[bisect_left(MESSAGE_SIZE_BUCKETS, size)] += 1

    def http_request(self, route: str, method: bytes | str, status: int, duration: float) -> None:
        """One finished HTTP request, ``duration`` in seconds."""
        counters = self._routes.get(route) or self.route(route)
        key = (normalize_method(method), normalize_status(status))
        counters.http_requests[key] = counters.http_requests.get(key, 0) + 1
        counters.http_durations[bisect_left(HTTP_DURATION_BUCKETS, duration)] += 1
        counters.http_duration_sum += duration

    def ws_handshake(self, route: str, outcome: str) -> None:
        """One finished WebSocket handshake; ``outcome`` is one of HANDSHAKE_OUTCOMES."""
        if outcome not in HANDSHAKE_OUTCOMES:
            raise ValueError(f"unknown handshake outcome {outcome!r}")
        counters = self._routes.get(route) or self.route(route)
        counters.handshakes[outcome] = counters.handshakes.get(outcome, 0) + 1

    def ws_opened(self, route: str) -> None:
        """A relay pair is open; pair every call with one :meth:`ws_closed`."""
        (self._routes.get(route) or self.route(route)).open += 1

    def ws_closed(self, route: str, side: str, code: int | None, reason: str = "") -> None:
        """
        A relay pair is gone; ``side`` closed first, with ``code``, for
        ``reason`` (one of CLOSE_REASONS; by default a close frame, or
        ``lost`` for 1006 or no code).
        """
        if side not in CLOSE_SIDES:
            raise ValueError(f"unknown close side {side!r}")
        counters = self._routes.get(route) or self.route(route)
        counters.open -= 1
        if not reason:
            reason = "lost" if code in (None, 1006) else "close_frame"
        key = (side, normalize_close_code(code), reason if reason in CLOSE_REASONS else "other")
        counters.closes[key] = counters.closes.get(key, 0) + 1

    def connection_refused(self) -> None:
        """One client connection refused at the door (``max_client_connections``)."""
        self.connections_refused += 1

    def auth_failure(self, route: str, reason: str) -> None:
        """One refused token; ``reason`` is the error code (e.g. ``invalid_token``)."""
        counters = self._routes.get(route) or self.route(route)
        key = normalize_auth_reason(reason)
        counters.auth_failures[key] = counters.auth_failures.get(key, 0) + 1

    def limit_rejection(self, route: str, limit: str) -> None:
        """A handshake refused or a WebSocket closed by ``limit`` (e.g. ``ws_rate_limit``)."""
        counters = self._routes.get(route) or self.route(route)
        counters.limit_rejections[limit] = counters.limit_rejections.get(limit, 0) + 1


def _no_upstreams() -> tuple[()]:
    return ()


# -- export at scrape time ----------------------------------------------------


class GatewayCollector(Collector):
    """Builds the metric families from a :class:`Metrics`' integers at each scrape."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterator[Metric]:
        """The families without samples, so a registry can detect clashing names."""
        return iter(_families())

    def collect(self) -> Iterator[Metric]:
        (
            refused,
            requests,
            durations,
            handshakes,
            open_,
            messages,
            bytes_,
            sizes,
            closes,
            up,
            connections,
            auth,
            failures,
            delayed_calls,
            in_flight,
            handshaking,
            jwks_keys,
            jwks_failures,
            limits,
        ) = families = _families()
        refused.add_metric([], self.metrics.connections_refused)
        load = self.metrics.load()
        delayed_calls.add_metric([], load.delayed_calls)
        in_flight.add_metric([], load.http_in_flight)
        handshaking.add_metric([], load.handshakes_in_progress)
        for r in self.metrics.routes:
            for (method, status), n in sorted(r.http_requests.items()):
                requests.add_metric([r.name, method, status], n)
            if r.http_requests:
                durations.add_metric(
                    [r.name], _buckets(HTTP_DURATION_BUCKETS, r.http_durations), r.http_duration_sum
                )
            for outcome, n in sorted(r.handshakes.items()):
                handshakes.add_metric([r.name, outcome], n)
            open_.add_metric([r.name], r.open)
            for direction, flow in r.flows.items():
                labels = [r.name, direction]
                messages.add_metric(labels, flow.messages)
                bytes_.add_metric(labels, flow.bytes)
                sizes.add_metric(labels, _buckets(MESSAGE_SIZE_BUCKETS, flow.sizes), flow.bytes)
            for (side, code, reason), n in sorted(r.closes.items()):
                closes.add_metric([r.name, side, code, reason], n)
            for reason, n in sorted(r.auth_failures.items()):
                auth.add_metric([r.name, reason], n)
            for limit, n in sorted(r.limit_rejections.items()):
                limits.add_metric([r.name, limit], n)
        for route, url, is_up, open_connections in _read(self.metrics.upstreams, "upstream states"):
            labels = [route, upstream_label(url)]
            up.add_metric(labels, 1 if is_up else 0)
            connections.add_metric(labels, open_connections)
        for route, url, reason, n in _read(self.metrics.upstream_failures, "upstream failures"):
            failures.add_metric([route, upstream_label(url), reason], n)
        if self.metrics.jwks is None:
            return iter(f for f in families if f is not jwks_keys and f is not jwks_failures)
        keys, fetch_failures = self.metrics.jwks()
        jwks_keys.add_metric([], keys)
        for reason, n in sorted(fetch_failures.items()):
            jwks_failures.add_metric([reason], n)
        return iter(families)


def _read(source: Callable[[], Iterable[_Row]], what: str) -> list[_Row]:
    """What a scrape-time source reports; one that fails is logged and reads as nothing."""
    try:
        return list(source())
    except Exception:
        log.failure("cannot read the {what} for metrics", what=what)
        return []


_Families = tuple[
    CounterMetricFamily,  # connections refused
    CounterMetricFamily,  # HTTP requests
    HistogramMetricFamily,  # their durations
    CounterMetricFamily,  # handshakes
    GaugeMetricFamily,  # open WebSockets
    CounterMetricFamily,  # messages
    CounterMetricFamily,  # bytes
    HistogramMetricFamily,  # message sizes
    CounterMetricFamily,  # closes
    GaugeMetricFamily,  # upstream up
    GaugeMetricFamily,  # upstream open connections
    CounterMetricFamily,  # auth failures
    CounterMetricFamily,  # upstream failures
    GaugeMetricFamily,  # delayed calls
    GaugeMetricFamily,  # HTTP in flight
    GaugeMetricFamily,  # handshakes in progress
    GaugeMetricFamily,  # JWKS keys
    CounterMetricFamily,  # JWKS fetch failures
    CounterMetricFamily,  # limit rejections
]


def _families() -> _Families:
    route, rd = ["route"], ["route", "direction"]
    return (
        CounterMetricFamily(
            "wsgateway_connections_refused",
            "Client connections refused because the gateway held max_client_connections.",
        ),
        CounterMetricFamily(
            "wsgateway_http_requests", "HTTP requests answered.", labels=["route", "method", "status"]
        ),
        HistogramMetricFamily(
            "wsgateway_http_request_duration_seconds",
            "Time from request to the end of the response.",
            labels=route,
        ),
        CounterMetricFamily(
            "wsgateway_ws_handshakes", "WebSocket opening handshakes.", labels=["route", "outcome"]
        ),
        GaugeMetricFamily("wsgateway_ws_open", "Open WebSocket relay pairs.", labels=route),
        CounterMetricFamily("wsgateway_ws_messages", "WebSocket messages relayed.", labels=rd),
        CounterMetricFamily("wsgateway_ws_bytes", "WebSocket payload bytes relayed.", labels=rd),
        HistogramMetricFamily(
            "wsgateway_ws_message_size_bytes", "Payload size of relayed WebSocket messages.", labels=rd
        ),
        CounterMetricFamily(
            "wsgateway_ws_closes",
            "WebSocket relay pairs closed, by the side that closed first, its close code and why.",
            labels=["route", "side", "code", "reason"],
        ),
        GaugeMetricFamily(
            "wsgateway_upstream_up", "1 if the upstream is considered up.", labels=["route", "upstream"]
        ),
        GaugeMetricFamily(
            "wsgateway_upstream_open_connections",
            "Open connections to the upstream.",
            labels=["route", "upstream"],
        ),
        CounterMetricFamily(
            "wsgateway_auth_failures", "Refused tokens.", labels=["route", "reason"]
        ),
        CounterMetricFamily(
            "wsgateway_upstream_failures",
            "Failed attempts counted against an upstream by passive health, by reason.",
            labels=["route", "upstream", "reason"],
        ),
        GaugeMetricFamily("wsgateway_reactor_delayed_calls", "Timers pending on the reactor."),
        GaugeMetricFamily("wsgateway_http_in_flight", "HTTP requests being answered."),
        GaugeMetricFamily(
            "wsgateway_ws_handshakes_in_progress", "WebSocket opening handshakes in progress."
        ),
        GaugeMetricFamily("wsgateway_jwks_keys", "Signing keys known from the [auth] JWKS."),
        CounterMetricFamily(
            "wsgateway_jwks_fetch_failures",
            "Failed fetches of the [auth] jwks_url, by reason.",
            labels=["reason"],
        ),
        CounterMetricFamily(
            "wsgateway_limit_rejections",
            "Handshakes refused and WebSockets closed by a per-user or per-socket limit.",
            labels=["route", "limit"],
        ),
    )


def _buckets(bounds: tuple[float, ...], counts: list[int]) -> list[tuple[str, float]]:
    """Cumulative ``(le, count)`` pairs from per-bucket counts (the last is +Inf)."""
    out: list[tuple[str, float]] = []
    total = 0
    for bound, n in zip(bounds, counts):
        total += n
        out.append((floatToGoString(bound), total))
    out.append(("+Inf", total + counts[-1]))
    return out


# -- serving it ---------------------------------------------------------------


class MetricsResource(Resource):
    """``GET /metrics``: the registry in the Prometheus (or OpenMetrics) text format."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        accept = request.getHeader(b"accept")
        encoder, content_type = choose_encoder(accept.decode("latin-1") if accept else "")
        body = encoder(self.registry)
        request.setHeader(b"content-type", content_type.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return body
