"""
Upstream pools: which instance of a route serves the next request, and which
instances are healthy enough to be asked at all.

Each upstream base URL is one :class:`Instance`, kept by an
:class:`InstanceRegistry` so that routes naming the same URL share its health
and counters. A route's :class:`UpstreamPool` orders its instances for an
attempt (round robin, least connections, or a consistent-hash ring on a
request key) and learns from each outcome (passive health: ``max_fails``
failures within ``fail_timeout`` eject an instance for ``fail_timeout``, but
never the last healthy instance of a route; what counts as a failure is
:func:`twisted_gateway.faults.classify`'s rule). The
:class:`~twisted_gateway.health.HealthChecker` probes instances actively.

Choosing is plain code over counters and an injected clock; only the health
checker touches the network, through the HTTP client and WebSocket connector
it is given.
"""

from __future__ import annotations

import bisect
import ipaddress
import hashlib
import json
from collections import Counter
from typing import Callable, Iterable, Iterator, Mapping, Sequence

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from twisted_gateway.errors import BadGateway
from twisted_gateway.headers import client_address, cookie_value, get_all
from twisted_gateway.routing import query_value
from twisted_gateway.schema import RouteSettings, parse_balance

log = Logger()

#: Methods whose request may be sent to a second instance after a connect failure.
IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE"})
#: Points per instance on a hash ring.
VIRTUAL_NODES = 160
#: Consecutive active-check results that eject, and that restore, an instance.
CHECKS_TO_EJECT = 2
CHECKS_TO_RESTORE = 2
#: An active check gets min(health_interval, this) seconds.
MAX_CHECK_TIMEOUT = 5.0

UP, DOWN = "up", "down"


class NoHealthyUpstream(BadGateway):
    """Every instance of the route is ejected: answered at once, without trying any."""

    error = "no_healthy_upstream"


class PoolKeyError(ValueError):
    """Pool keys that contradict each other; ``key`` is the one to fix."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(reason)
        self.key = key


def check_pool_keys(balance: str | None, hash_key: str | None) -> None:
    """Raise :class:`PoolKeyError` unless ``balance = hash`` and ``hash_key`` come together."""
    if balance == "hash" and hash_key is None:
        raise PoolKeyError("hash_key", "balance = hash needs a hash_key")
    if hash_key is not None and balance != "hash":
        raise PoolKeyError("hash_key", "hash_key applies only with balance = hash")


def default_balance(websocket: bool) -> str:
    """Long-lived WebSockets are balanced by load, short HTTP requests in turn."""
    return "least_connections" if websocket else "round_robin"


def may_retry(method: bytes) -> bool:
    """Whether an HTTP request may go to another instance after a connect failure."""
    return method.upper() in IDEMPOTENT_METHODS


# -- the hash key of a request (pure) -----------------------------------------


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def hash_key_value(
    spec: str,
    *,
    query: bytes = b"",
    headers: Sequence[tuple[bytes, bytes]] = (),
    claims: Mapping[str, object] | None = None,
    client_ip: str | None = None,
) -> str | None:
    """
    The value a request carries for a ``hash_key`` spec, or None when it has
    none (or an empty one): the client's address, the first non-empty
    ``query`` field of that name (:func:`routing.query_value`), the first
    header, the first non-empty cookie (:func:`headers.cookie_value`) or the
    verified claim (non-strings as compact JSON).
    """
    if spec == "ip":
        return client_ip or None
    source, _, name = spec.partition(":")
    if source == "query":
        value = query_value(query, name)
        return _text(value) if value is not None else None
    if source == "header":
        wanted = name.lower().encode("latin-1")
        for key, value in headers:
            if key.lower() == wanted:
                return _text(value.strip()) or None
        return None
    if source == "cookie":
        value = cookie_value(headers, name)
        return _text(value) if value is not None else None
    if source == "claim":
        claim = (claims or {}).get(name)
        if claim is None or claim == "":
            return None
        if isinstance(claim, str):
            return claim
        return json.dumps(claim, sort_keys=True, separators=(",", ":"))
    raise ValueError(f"unknown hash key source in {spec!r}")


# -- consistent hashing ---------------------------------------------------------


def _point(text: str) -> int:
    digest = hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class HashRing:
    """
    Consistent hashing with virtual nodes: a key belongs to the first node
    after its point on the ring, so adding one node to N takes about 1/(N+1)
    of the keys and moves no key between the old nodes.
    """

    def __init__(self, nodes: Iterable[str], *, virtual_nodes: int = VIRTUAL_NODES) -> None:
        self.nodes = tuple(dict.fromkeys(nodes))
        if not self.nodes:
            raise ValueError("a hash ring needs at least one node")
        ring = sorted(
            (_point(f"{node}#{i}"), node) for node in self.nodes for i in range(virtual_nodes)
        )
        self._points = [point for point, _ in ring]
        self._owners = [node for _, node in ring]

    def owner(self, key: str) -> str:
        return next(self.walk(key))

    def walk(self, key: str) -> Iterator[str]:
        """Every node once, in ring order from ``key``'s point; the first owns the key."""
        start = bisect.bisect(self._points, _point(key))
        seen: set[str] = set()
        for i in range(len(self._owners)):
            node = self._owners[(start + i) % len(self._owners)]
            if node not in seen:
                seen.add(node)
                yield node
                if len(seen) == len(self.nodes):
                    return


# -- instances and their health ---------------------------------------------------


class Instance:
    """
    One upstream base URL: its health and counters, shared by every route
    that names it. Plain ints for metrics; ``state`` is ``"up"`` or ``"down"``.
    """

    def __init__(self, url: str, clock: IReactorTime) -> None:
        self.url = url
        self._clock = clock
        #: attempts sent here: HTTP requests and WebSocket handshakes (the pool counts them)
        self.requests = 0
        #: HTTP requests in flight plus WebSockets opening or open: what least_connections weighs
        self.active = 0
        #: WebSockets opening or open
        self.open_websockets = 0
        #: failed attempts, ever
        self.failures = 0
        #: passive health: (time, reason) of the current run of failures
        self.recent_failures: list[tuple[float, str]] = []
        #: the pools (routes) naming this instance: it is never their last one ejected
        self.pools: list[UpstreamPool] = []
        self.ejected_until = float("-inf")
        #: active health: consecutive check results, and whether checks hold it down
        self.check_successes = 0
        self.check_failures = 0
        self.check_failed = False
        self._announced = UP
        #: when the announced state last changed (the status page's "since")
        self.changed_at = clock.seconds()

    def __repr__(self) -> str:
        return f"<Instance {self.url} {self.state} active={self.active}>"

    @property
    def state(self) -> str:
        if self.check_failed or self._clock.seconds() < self.ejected_until:
            return DOWN
        return UP

    def available(self) -> bool:
        """Whether traffic may come here now (logs a return that time alone made)."""
        self._announce("fail_timeout is over")
        return self._announced == UP

    def acquire(self, *, websocket: bool = False) -> None:
        """An HTTP request starts here, or a WebSocket handshake (until its pair is done)."""
        self.active += 1
        if websocket:
            self.open_websockets += 1

    def release(self, *, websocket: bool = False) -> None:
        """What :meth:`acquire` counted is over; call once per acquire, on every path."""
        self.active = max(0, self.active - 1)
        if websocket:
            self.open_websockets = max(0, self.open_websockets - 1)

    def record_success(self) -> None:
        """An attempt got an answer: a later failure starts a new run."""
        self.recent_failures.clear()

    def record_failure(
        self, *, max_fails: int, fail_timeout: float, reason: str = "failed"
    ) -> bool:
        """
        One counted failure (``reason``, a label of :data:`faults.COUNTED`):
        ``max_fails`` of them within ``fail_timeout`` eject for
        ``fail_timeout``, unless this is the last healthy instance of a route
        naming it (with nothing to fail over to, a slow answer beats a 502).
        Returns whether this failure ejected the instance.
        """
        self.failures += 1
        if max_fails == 0:
            return False
        now = self._clock.seconds()
        self.recent_failures = [f for f in self.recent_failures if f[0] > now - fail_timeout]
        self.recent_failures.append((now, reason))
        if len(self.recent_failures) < max_fails or not self._has_spare():
            return False
        causes = Counter(r for _, r in self.recent_failures)
        summary = ", ".join(f"{r.replace('_', ' ')} x{n}" for r, n in causes.most_common())
        count = len(self.recent_failures)
        self.ejected_until = max(self.ejected_until, now + fail_timeout)
        self.recent_failures.clear()
        self._announce(
            f"{count} {'failure' if count == 1 else 'failures'} in {fail_timeout:g} s"
            f" ({summary}), out for {fail_timeout:g} s"
        )
        return True

    def _has_spare(self) -> bool:
        """Whether every route naming this instance keeps another healthy one without it."""
        return all(
            any(other is not self and other.state == UP for other in pool.instances)
            for pool in self.pools
        )

    def record_check(self, ok: bool, detail: str = "") -> None:
        """An active check's result: two failures in a row eject, two successes restore."""
        if ok:
            self.check_successes, self.check_failures = self.check_successes + 1, 0
            if self.check_successes >= CHECKS_TO_RESTORE:
                self.check_failed = False
            self._announce(f"{self.check_successes} health checks passed")
        else:
            self.check_successes, self.check_failures = 0, self.check_failures + 1
            if self.check_failures >= CHECKS_TO_EJECT:
                self.check_failed = True
            self._announce(f"{self.check_failures} health checks failed, last: {detail}")

    def _announce(self, reason: str) -> None:
        state = self.state
        if state == self._announced:
            return
        self._announced = state
        self.changed_at = self._clock.seconds()
        fields = dict(url=self.url, reason=reason, upstream_state=state)
        if state == DOWN:
            log.warn("upstream {url} is down: {reason}", **fields)
        else:
            log.info("upstream {url} is up: {reason}", **fields)


class InstanceRegistry:
    """One :class:`Instance` per URL, for all routes; iterate it for metrics."""

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._instances: dict[str, Instance] = {}

    def instance(self, url: str) -> Instance:
        if url not in self._instances:
            self._instances[url] = Instance(url, self.clock)
        return self._instances[url]

    def __iter__(self) -> Iterator[Instance]:
        return iter(list(self._instances.values()))

    def __len__(self) -> int:
        return len(self._instances)


# -- a route's pool ------------------------------------------------------------------


class UpstreamPool:
    """The instances of one route, the order to try them in, and what their failures mean."""

    def __init__(
        self,
        route_name: str,
        urls: Sequence[str],
        registry: InstanceRegistry,
        *,
        balance: str | None = None,
        websocket: bool = False,
        hash_key: str | None = None,
        max_fails: int = 1,
        fail_timeout: float = 10.0,
        health_check: str | None = None,
        health_interval: float = 5.0,
    ) -> None:
        unique = tuple(dict.fromkeys(urls))
        if not unique:
            raise ValueError(f"route {route_name!r} has no upstream")
        self.route_name = route_name
        self.fallback = default_balance(websocket)
        self.balance = parse_balance(balance) if balance is not None else self.fallback
        check_pool_keys(self.balance, hash_key)
        self.hash_key = hash_key
        self.max_fails, self.fail_timeout = max_fails, fail_timeout
        self.health_check, self.health_interval = health_check, health_interval
        self.instances = tuple(registry.instance(url) for url in unique)
        for instance in self.instances:
            instance.pools.append(self)
        #: counted failures per (instance URL, reason), for the failures metric
        self.failure_counts: Counter[tuple[str, str]] = Counter()
        self._ring = HashRing(unique) if self.balance == "hash" else None
        #: whether the walk from the cursor (a hash pool's fallback too) picks the least loaded
        self._least = (self.balance if self._ring is None else self.fallback) == "least_connections"
        self._by_url = {instance.url: instance for instance in self.instances}
        self._cursor = 0

    @classmethod
    def for_route(cls, route: RouteSettings, registry: InstanceRegistry) -> UpstreamPool:
        """The pool a ``RouteSettings`` describes (its balancing and health keys)."""
        return cls(
            route.name,
            route.upstream,
            registry,
            balance=route.balance,
            websocket=route.websocket,
            hash_key=route.hash_key,
            max_fails=route.max_fails,
            fail_timeout=route.fail_timeout,
            health_check=route.health_check,
            health_interval=route.health_interval,
        )

    def request_key(
        self,
        *,
        query: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        claims: Mapping[str, object] | None,
        peer: str = "",
        trusted_proxies: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] = (),
    ) -> str | None:
        """
        The ``hash_key`` value a request carries (None without hashing, or without
        a value); the client's address is worked out (from ``peer`` and a trusted
        ``X-Forwarded-For``) only for ``hash_key = ip``.
        """
        if self.hash_key is None:
            return None
        client_ip = None
        if self.hash_key == "ip":
            client_ip = client_address(get_all(headers, b"x-forwarded-for"), peer, trusted_proxies)
        return hash_key_value(
            self.hash_key, query=query, headers=headers, claims=claims, client_ip=client_ip
        )

    def choose(self, key: str | None = None) -> Instance:
        """The instance for one attempt; raises :class:`NoHealthyUpstream` when all are down."""
        return next(self.candidates(key, retry=False))

    def candidates(self, key: str | None = None, *, retry: bool) -> Iterator[Instance]:
        """
        Instances to try in order, each at most once: the chosen one first,
        then (with ``retry``) the next healthy one by the same policy, picked
        when asked for so that failures reported meanwhile count. The first
        is picked now: :class:`NoHealthyUpstream` is raised by this call.
        """
        tried: set[str] = set()
        first = self._pick(key, tried)
        if first is None:
            count = len(self.instances)
            raise NoHealthyUpstream(
                f"all {count} upstream instances of route {self.route_name!r} are down"
            )
        return self._hand_out(first, key, tried, retry)

    def _hand_out(
        self, instance: Instance | None, key: str | None, tried: set[str], retry: bool
    ) -> Iterator[Instance]:
        while instance is not None:
            tried.add(instance.url)
            instance.requests += 1
            yield instance
            if not retry:
                return
            instance = self._pick(key, tried)

    def _pick(self, key: str | None, tried: set[str]) -> Instance | None:
        if self._ring is not None and key is not None:
            for url in self._ring.walk(key):
                instance = self._by_url[url]
                if url not in tried and instance.available():
                    return instance
            return None
        count = len(self.instances)
        least = self._least
        chosen: Instance | None = None
        chosen_offset = 0
        for offset in range(count):  # from the cursor on, no list per request
            instance = self.instances[(self._cursor + offset) % count]
            if instance.url in tried or not instance.available():
                continue
            if not least:
                chosen, chosen_offset = instance, offset
                break
            if chosen is None or instance.active < chosen.active:
                chosen, chosen_offset = instance, offset
        if chosen is None:
            return None
        self._cursor = (self._cursor + chosen_offset + 1) % count
        return chosen

    def report_success(self, instance: Instance) -> None:
        """The attempt got an answer (any HTTP status, or a finished handshake)."""
        instance.record_success()

    def report_failure(self, instance: Instance, reason: str = "failed") -> None:
        """
        A failure that counts against the instance (``reason``: see
        :func:`twisted_gateway.faults.classify`; what does not count is never
        reported): passive health counts it.
        """
        self.failure_counts[instance.url, reason] += 1
        instance.record_failure(
            max_fails=self.max_fails, fail_timeout=self.fail_timeout, reason=reason
        )


def upstream_failures(pools: Iterable[UpstreamPool]) -> list[tuple[str, str, str, int]]:
    """``(route, url, reason, count)`` of the failures counted against each instance, for metrics."""
    return [
        (pool.route_name, url, reason, count)
        for pool in pools
        for (url, reason), count in sorted(pool.failure_counts.items())
    ]


def upstream_states(pools: Iterable[UpstreamPool]) -> list[tuple[str, str, bool, int]]:
    """``(route, url, up, active connections)`` per instance of each pool, for metrics."""
    return [
        (pool.route_name, instance.url, instance.state == UP, instance.active)
        for pool in pools
        for instance in pool.instances
    ]
