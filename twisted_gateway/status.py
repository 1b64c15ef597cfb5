"""
The operator's status page: ``/status`` (one self-contained HTML page) and
its JSON twin ``/status.json``.

Nothing here counts traffic: the figures are read from the same integers as
``/metrics`` (:class:`metrics.Metrics`). Rates and "the last minute" come from
a few snapshots of those totals taken every :data:`SAMPLE_INTERVAL` seconds on
the injected clock; the sampler is started and stopped with the gateway.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, field
from importlib.resources import files
from typing import TYPE_CHECKING, Callable, Iterable

from twisted.internet.interfaces import IReactorTime
from twisted_gateway.periodic import Periodic
from twisted.web.server import Request

from twisted_gateway import __version__
from twisted_gateway._bases import Resource
from twisted_gateway.errors import render_json
from twisted_gateway.metrics import Metrics, RouteCounters, upstream_label

if TYPE_CHECKING:
    from twisted_gateway.upstreams import Instance, UpstreamPool

#: Seconds between two snapshots of the counters.
SAMPLE_INTERVAL = 5.0
#: Rates are measured over (about) this many seconds.
RATE_WINDOW = 10.0
#: The close codes shown are those of this many seconds.
CLOSES_WINDOW = 60.0

#: WebSocket handshake outcomes that are answered with a 5xx (upstream trouble).
HANDSHAKE_5XX = frozenset({"bad_gateway", "gateway_timeout"})
#: Handshake outcomes that are refusals of the client (token, origin, limits, the upstream's no).
HANDSHAKE_REFUSALS = frozenset({"unauthorized", "forbidden", "limited", "refused_by_upstream"})
#: HTTP statuses counted as refusals (token missing or refused).
HTTP_REFUSALS = frozenset({"401", "403"})


@dataclass(frozen=True)
class Totals:
    """One route's counters since start, at one instant."""

    handshakes: int = 0
    http_requests: int = 0
    errors_5xx: int = 0
    refusals: int = 0
    closes: dict[str, int] = field(default_factory=dict)


def route_totals(counters: RouteCounters) -> Totals:
    """The totals of one route's counters (pure)."""
    http_5xx = http_refused = 0
    for (_method, status), n in counters.http_requests.items():
        if status.startswith("5"):
            http_5xx += n
        elif status in HTTP_REFUSALS:
            http_refused += n
    closes: dict[str, int] = {}
    for (_side, code, _reason), n in counters.closes.items():
        closes[code] = closes.get(code, 0) + n
    hs = counters.handshakes
    return Totals(
        handshakes=sum(hs.values()),
        http_requests=sum(counters.http_requests.values()),
        errors_5xx=http_5xx + sum(n for o, n in hs.items() if o in HANDSHAKE_5XX),
        refusals=http_refused + sum(n for o, n in hs.items() if o in HANDSHAKE_REFUSALS),
        closes=closes,
    )


def rates(old: Totals, new: Totals, seconds: float) -> dict[str, float]:
    """Per-second rates between two totals (zero over no time)."""
    if seconds <= 0:
        return {"handshakes": 0.0, "http_requests": 0.0, "errors_5xx": 0.0, "refusals": 0.0}
    return {
        name: round((getattr(new, name) - getattr(old, name)) / seconds, 2)
        for name in ("handshakes", "http_requests", "errors_5xx", "refusals")
    }


def closes_since(old: Totals, new: Totals) -> dict[str, int]:
    """The close codes counted between two totals, by code, without zeros."""
    out = {code: n - old.closes.get(code, 0) for code, n in new.closes.items()}
    return {code: n for code, n in sorted(out.items()) if n > 0}


def worker_role(environ: dict[str, str] | None = None) -> dict[str, int | None]:
    """How many workers serve the port and which one this is (None: a single process)."""
    from twisted_gateway.workers import worker_environment

    env = worker_environment(environ)
    if env is None:
        return {"workers": 1, "worker": None}
    return {"workers": env.workers, "worker": env.number}


def open_files() -> tuple[int | None, int | None]:
    """Open file descriptors of this process and its soft limit (None where unknown)."""
    import resource

    try:
        count: int | None = len(os.listdir("/proc/self/fd")) - 1  # minus listdir's own
    except OSError:
        count = None
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return count, (None if soft == resource.RLIM_INFINITY else soft)


@dataclass(frozen=True)
class _Sample:
    at: float
    routes: dict[str, Totals]


class Status:
    """
    The status model of one gateway: snapshots of its counters, and the
    ``/status.json`` document built from them and the upstream pools.
    """

    def __init__(
        self,
        metrics: Metrics,
        pools: dict[str, UpstreamPool],
        prefixes: dict[str, str],
        clock: IReactorTime,
        *,
        files: Callable[[], tuple[int | None, int | None]] = open_files,
        role: Callable[[], dict[str, int | None]] = worker_role,
    ) -> None:
        self.metrics, self.pools, self.prefixes, self.clock = metrics, pools, prefixes, clock
        self._files = files
        self._role = role
        self.started = clock.seconds()
        self._samples: deque[_Sample] = deque()
        self._sampler = Periodic(clock, SAMPLE_INTERVAL, self.sample, now=True)

    def start(self) -> None:
        self._sampler.start()

    def stop(self) -> None:
        self._sampler.stop()

    def _totals(self) -> dict[str, Totals]:
        return {r.name: route_totals(r) for r in self.metrics.routes}

    def sample(self) -> None:
        """Keep a snapshot of the totals; forget those older than the longest window."""
        now = self.clock.seconds()
        self._samples.append(_Sample(now, self._totals()))
        while len(self._samples) > 1 and self._samples[1].at <= now - CLOSES_WINDOW:
            self._samples.popleft()

    def _sample_before(self, now: float, window: float) -> _Sample:
        """The newest snapshot at least ``window`` old, else the oldest one (or start)."""
        chosen = None
        for sample in self._samples:
            if sample.at <= now - window:
                chosen = sample
        if chosen is None:
            chosen = self._samples[0] if self._samples else _Sample(self.started, {})
        return chosen

    def document(self) -> dict[str, object]:
        """What ``/status.json`` answers."""
        now = self.clock.seconds()
        current = self._totals()
        rate_base = self._sample_before(now, RATE_WINDOW)
        close_base = self._sample_before(now, CLOSES_WINDOW)
        fds, limit = self._files()
        routes = []
        for r in self.metrics.routes:
            if r.name not in self.pools:
                continue  # "unrouted": no upstreams to show
            new = current[r.name]
            routes.append(
                {
                    "name": r.name,
                    "prefix": self.prefixes.get(r.name, ""),
                    "websockets_open": r.open,
                    "rates": rates(rate_base.routes.get(r.name, Totals()), new, now - rate_base.at),
                    "closes_last_minute": closes_since(close_base.routes.get(r.name, Totals()), new),
                    "upstreams": list(_instances(self.pools[r.name].instances)),
                }
            )
        return {
            "version": __version__,
            "now": now,
            "started": self.started,
            "uptime_seconds": round(now - self.started, 1),
            "pid": os.getpid(),
            **self._role(),
            "open_files": {"open": fds, "limit": limit},
            "connections_refused": self.metrics.connections_refused,
            "rate_window_seconds": round(now - rate_base.at, 1),
            "routes": routes,
        }


def _instances(instances: Iterable[Instance]) -> Iterable[dict[str, object]]:
    for instance in instances:
        instance.available()  # a return that time alone made is announced (and dated) now
        yield {
            "url": upstream_label(instance.url),
            "state": instance.state,
            "since": instance.changed_at,
            "websockets_open": instance.open_websockets,
            "active": instance.active,
        }


class StatusJSONResource(Resource):
    """``GET /status.json``."""

    isLeaf = True

    def __init__(self, status: Status) -> None:
        super().__init__()
        self.status = status

    def render_GET(self, request: Request) -> bytes:
        body = render_json(request, 200, self.status.document())
        request.setHeader(b"cache-control", b"no-store")
        return body


class StatusPageResource(Resource):
    """``GET /status``: the page, which polls ``status.json`` next to it."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.html = files("twisted_gateway").joinpath("status.html").read_bytes()

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-security-policy", b"default-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'")
        return self.html
