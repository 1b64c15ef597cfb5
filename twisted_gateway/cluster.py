"""
One control plane for every gateway that names the same Redis (``[cluster]``).

What must reach every worker of every host lives here: revocations (kept in
Redis until the token expires, mirrored in each worker's memory so that no
request and no message waits for Redis), administrator actions (published on
one channel; every worker acts on its own sockets and answers on the asker's
reply channel), and per-user caps (counts per user and worker in Redis, one
script call per capped handshake, a dead worker's counts ignored once its
heartbeat key expires). Without ``[cluster]`` the same object acts on this
gateway alone: on its workers together through the supervisor
(:mod:`worker_hub`) when ``workers > 1``.

The Redis client is txredisapi: Twisted-native, it reconnects with backoff;
after every reconnect this module resubscribes, reloads the revocations and
writes its own counts again.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.internet.defer import Deferred, TimeoutError as DeferredTimeout
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from twisted_gateway.errors import GatewayError
from twisted_gateway.interfaces import IAuthenticator
from twisted_gateway.periodic import Periodic
from twisted_gateway.revocations import Revocations, matches
from twisted_gateway.schema import ClusterSettings, ConfigError, parse_redis_url, read_section

if TYPE_CHECKING:
    import txredisapi

    from twisted_gateway.identity import Identity
    from twisted_gateway.jwks import KeySet
    from twisted_gateway.metrics import Metrics
    from twisted_gateway.schema import RouteSettings
    from twisted_gateway.tls import UpstreamTLS
    from twisted_gateway.worker_hub import Link
    from twisted_gateway.interfaces import LiveSession
    from twisted_gateway.ws_relay import RelayRegistry

log = Logger()

PREFIX = "wsgateway:"
CONTROL = PREFIX + "control"
#: Seconds between heartbeats; a worker's entries go 30 s after its last one.
HEARTBEAT = 5.0
NODE_TTL = 30
#: Seconds to wait for Redis on a handshake's cap check, or for every worker's answer.
CALL_TIMEOUT = 2.0
REPLY_TIMEOUT = 2.0
#: How long a revocation by subject is kept when the administrator gives no ``exp``.
SUBJECT_REVOCATION_TTL = 86400
#: Seconds a client over its cap is told to wait.
RETRY_AFTER = 5

#: A JSON object: what the admin API, the workers and Redis exchange (its values
#: are JSON as read from a body, a socket or Redis, before anything checks them).
JSONObject = dict[str, Any]
#: What one worker answers to an administrator action (:meth:`Cluster._apply`).
ActionResult = list[JSONObject] | JSONObject | int | None

DISCONNECTED = (1008, b"disconnected by administrator")
REVOKED = (1008, b"token revoked")

def default_node_id() -> str:
    """``hostname-pid``; a worker names its supervisor's pid: one gateway's workers are one node."""
    from twisted_gateway.workers import is_worker

    return f"{socket.gethostname()}-{os.getppid() if is_worker() else os.getpid()}"


def parse_cluster_section(source: str, values: Mapping[str, str]) -> ClusterSettings:
    """The ``[cluster]`` section (pure: the URL behind ``redis`` waits for :func:`with_redis_url`)."""
    settings = ClusterSettings(**read_section(source, "cluster", values, ClusterSettings))
    if settings.client_key is not None and settings.client_cert is None:
        raise ConfigError(source, "cluster", "client_key", "needs client_cert")
    return settings


def with_redis_url(source: str, settings: ClusterSettings, url: str) -> ClusterSettings:
    """The settings with the Redis URL its ``redis`` key named, checked against the TLS keys."""
    try:
        address = parse_redis_url(url)
    except ValueError as e:
        raise ConfigError(source, "cluster", "redis", str(e)) from None
    for key in ("ca_file", "client_cert", "client_key"):
        if getattr(settings, key) is not None and not address.tls:
            raise ConfigError(source, "cluster", key, "only used with a rediss:// URL")
    return replace(settings, redis=url)


def redis_tls(settings: ClusterSettings) -> UpstreamTLS:
    """Whom ``rediss://`` trusts and the certificate it shows: read as a route's https upstream keys are."""
    from twisted_gateway.tls import UpstreamTLS

    return UpstreamTLS.for_route(settings)


# Checks every cap of a handshake and, when none is reached, counts the socket
# in each: KEYS are the per-user count hashes, ARGV[1] this worker's field
# (node|epoch), ARGV[2..] the caps. A field whose worker's heartbeat key is
# gone or carries another epoch is a dead worker's: dropped.
_ACQUIRE = """
for i, key in ipairs(KEYS) do
  local total = 0
  local fields = redis.call('HGETALL', key)
  for j = 1, #fields, 2 do
    local node, epoch = string.match(fields[j], '^(.*)|([^|]*)$')
    if node and redis.call('HGET', 'wsgateway:node:' .. node, 'epoch') == epoch then
      total = total + tonumber(fields[j + 1])
    else
      redis.call('HDEL', key, fields[j])
    end
  end
  if total >= tonumber(ARGV[i + 1]) then return i end
end
for i, key in ipairs(KEYS) do
  redis.call('HINCRBY', key, ARGV[1], 1)
  redis.call('EXPIRE', key, 86400)
end
return 0
"""

_REVOKE_SUBJECT = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > current then redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2]) end
return 1
"""


def count_key(scope: str, sub: str) -> str:
    return PREFIX + "ws:" + json.dumps([scope, sub], separators=(",", ":"))


class Cluster:
    """
    This worker's member of the cluster (or, without ``settings``, the gateway
    alone): the verbs the admin API calls, the checks the data path makes.
    """

    def __init__(
        self,
        settings: ClusterSettings | None,
        *,
        registry: RelayRegistry,
        clock: IReactorTime,
        metrics: Metrics,
        leeway: float = 0.0,
        gateway_cap: int = 0,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.clock = clock
        self.metrics = metrics
        self.leeway = leeway
        self.gateway_cap = gateway_cap
        self.node_id = settings.node_id if settings is not None and settings.node_id else default_node_id()
        #: this process among the node's workers: heartbeat key, reply channel, count field
        self.worker_id = f"{self.node_id}/{os.getpid()}"
        self.revocations = Revocations()
        #: (scope, sub) -> this worker's open sockets (scope: a route name, or "*")
        self.counts: dict[tuple[str, str], int] = {}
        #: True while the subscription is alive (always True without [cluster])
        self.up = settings is None
        #: the revocations were loaded at least once (readiness)
        self.loaded = settings is None
        self.admin_actions: dict[str, int] = {}
        self.revoked: dict[str, int] = {}
        self._epoch = ""
        self._outage_warned = False
        #: why the last connection to Redis failed or ended (for the outage warning)
        self.last_error: str | None = None
        self._commands: txredisapi.ConnectionHandler | None = None
        self._factories: list[txredisapi.RedisFactory] = []
        #: without [cluster], with workers > 1: this worker's link to the supervisor's hub
        self.link: Link | None = None
        self._loop = Periodic(self.clock, HEARTBEAT, self._heartbeat)
        self._start_check: IDelayedCall | None = None
        #: request id -> (answers expected, answers, Deferred)
        self._waiting: dict[str, tuple[int, list[JSONObject], Deferred[list[JSONObject]]]] = {}
        self._sequence = 0
        metrics.registry.register(ClusterCollector(self))

    # -- life cycle ------------------------------------------------------------

    def join_workers(self, fd: int) -> None:
        """Without ``[cluster]``: act with the other workers of this gateway through the supervisor."""
        from twisted_gateway.worker_hub import Link

        if self.settings is not None:  # [cluster] added since the supervisor started: Redis decides
            os.close(fd)
            return

        def load(revocations: Revocations) -> None:
            self.revocations.replace(revocations)
            self._close_revoked()

        def lost() -> None:
            log.warn("workers: the supervisor's link is gone; caps and admin actions for this worker only")

        self.link = Link(self.clock, fd, apply=self._apply, load=load, on_lost=lost)

    def start(self) -> None:
        if self.settings is None:
            return
        from twisted_gateway.redis_client import connect

        self._commands, self._factories = connect(
            parse_redis_url(self.settings.redis),
            redis_tls(self.settings),
            [CONTROL, PREFIX + "reply:" + self.worker_id],
            on_ready=self._connected,
            on_lost=self._lost,
            on_error=self._error,
            on_message=self._message,
            clock=self.clock,
        )
        self._loop.start()
        self._start_check = self.clock.callLater(CALL_TIMEOUT, self._not_yet_connected)
        log.info(
            "cluster: node {node} joining through Redis {host}:{port} (on_redis_down = {policy})",
            node=self.node_id,
            host=parse_redis_url(self.settings.redis).host,
            port=parse_redis_url(self.settings.redis).port,
            policy=self.settings.on_redis_down,
            event="cluster_start",
        )

    async def stop(self) -> None:
        """Leave: stop the heartbeat, take this worker's counts and heartbeat out, disconnect."""
        self._loop.stop()
        if self._start_check is not None and self._start_check.active():
            self._start_check.cancel()
        self._start_check = None
        for _, _, d in list(self._waiting.values()):
            d.cancel()
        if self.link is not None:
            self.link.close()
        if self.settings is None:
            return
        if self.up:
            try:
                await self._call("DEL", PREFIX + "node:" + self.worker_id)
            except Exception:
                pass  # its key expires anyway
        for factory in self._factories:
            await factory.disconnect()

    @property
    def ready(self) -> bool:
        """For ``/readyz``: the revocations are loaded, or an unreachable Redis is tolerated."""
        return self.loaded or (self.settings is not None and self.settings.on_redis_down == "open")

    def check_available(self) -> None:
        """``on_redis_down = closed``: without Redis, new requests and handshakes get 503."""
        if not self.up and self.settings is not None and self.settings.on_redis_down == "closed":
            raise GatewayError(
                "the cluster's Redis is unreachable", status=503, error="cluster_unavailable"
            )

    # -- Redis events ----------------------------------------------------------

    def _not_yet_connected(self) -> None:
        self._start_check = None
        if not self.up:
            self._warn_outage()

    def _warn_outage(self) -> None:
        if not self._outage_warned:
            self._outage_warned = True
            log.warn(
                "cluster: Redis unreachable ({error}); {what} until it is back",
                error=self.last_error or "no answer yet",
                what="serving with the last revocations loaded, caps per worker only"
                if self.settings is not None and self.settings.on_redis_down == "open"
                else "new requests and handshakes get 503 cluster_unavailable",
                event="cluster_down",
            )

    def _error(self, error: str) -> None:
        self.last_error = error

    def _lost(self, error: str) -> None:
        self.last_error = error
        if self.up:
            self.up = False
            self._warn_outage()

    async def _connected(self) -> None:
        """Subscribed again: a new epoch, the heartbeat and our counts written, the revocations reloaded."""
        self._epoch = os.urandom(4).hex()
        await self._heartbeat_now()
        field = self._field()
        for (scope, sub), n in self.counts.items():
            if n > 0:
                await self._call("HSET", count_key(scope, sub), field, n)
        loaded = await self._load_revocations()
        self.revocations.replace(loaded)
        was_down = self._outage_warned
        self.up = self.loaded = True
        self._outage_warned = False
        log.info(
            "cluster: connected to Redis{again}; {jtis} revoked tokens and {subjects} revoked subjects loaded",
            again=" again" if was_down else "",
            jtis=len(self.revocations.jtis),
            subjects=len(self.revocations.subjects),
            event="cluster_up",
        )
        # sockets opened with a token revoked while this worker was cut off
        self._close_revoked()

    async def _load_revocations(self) -> Revocations:
        loaded = Revocations()
        cursor: int | str = 0
        while True:
            cursor, keys = await self._call("SCAN", cursor, "MATCH", PREFIX + "revoked:*", "COUNT", 500)
            if keys:
                values = await self._call("MGET", *keys)
                for key, value in zip(keys, values):
                    if value is None:
                        continue
                    kind, _, name = key[len(PREFIX + "revoked:") :].partition(":")
                    if kind == "jti":
                        loaded.add_jti(name, float(value))
                    elif kind == "sub":
                        loaded.add_subject(name, float(value))
            if str(cursor) == "0":
                return loaded

    def _heartbeat(self) -> None:
        self.revocations.prune(self.clock.seconds() - self.leeway)
        if self.up:
            d = Deferred.fromCoroutine(self._heartbeat_now())
            d.addErrback(lambda f: log.debug("cluster: heartbeat failed: {f}", f=f))

    async def _heartbeat_now(self) -> None:
        key = PREFIX + "node:" + self.worker_id
        await self._call(
            "HSET",
            key,
            "node",
            self.node_id,
            "epoch",
            self._epoch,
            "host",
            socket.gethostname(),
            "pid",
            os.getpid(),
            "websockets",
            len(self.registry.pairs),
            "heartbeat",
            round(self.clock.seconds(), 3),
        )
        await self._call("EXPIRE", key, NODE_TTL)

    def _field(self) -> str:
        return f"{self.worker_id}|{self._epoch}"

    # (the reply as txredisapi decodes it: a str, an int, None or a list, by command)
    async def _call(self, *command: str | bytes | int | float) -> Any:
        """One Redis command, bounded by :data:`CALL_TIMEOUT`."""
        assert self._commands is not None  # start() connected it: only a [cluster] member calls Redis
        d = self._commands.execute_command(*command)
        d.addTimeout(CALL_TIMEOUT, self.clock)
        return await d

    def _message(self, channel: str, text: str) -> None:
        try:
            message = json.loads(text)
        except ValueError:
            log.warn("cluster: a message that is not JSON on {channel}", channel=channel)
            return
        if channel == CONTROL:
            result = self._apply(message.get("action"), message.get("args") or {})
            reply = json.dumps({"id": message.get("id"), "worker": self.worker_id, "result": result})
            sending = self._call("PUBLISH", PREFIX + "reply:" + str(message.get("from")), reply)
            Deferred.fromCoroutine(sending).addErrback(lambda f: log.debug("cluster: no reply sent: {f}", f=f))
            return
        waiting = self._waiting.get(message.get("id"))
        if waiting is not None:
            expected, answers, d = waiting
            answers.append(message)
            if len(answers) >= expected and not d.called:
                d.callback(answers)

    # -- what every worker does --------------------------------------------------

    def _apply(self, action: str | None, args: JSONObject) -> ActionResult:
        """One administrator action on this worker's own sockets and state."""
        if action == "sessions":
            return [s for s in self.local_sessions() if args.get("sub") in (None, s["sub"])]
        if action == "disconnect":
            return self._close(
                lambda pair: pair.session_id == args["session"]
                if args.get("session")
                else matches(_claims(pair), sub=args.get("sub")),
                DISCONNECTED,
                "admin",
            )
        if action == "worker":
            return self._own_worker()
        if action == "revoke":
            if args.get("jti") is not None:
                self.revocations.add_jti(args["jti"], float(args["until"]))
            else:
                self.revocations.add_subject(args["sub"], float(args["before"]))
            return self._close_revoked()
        return None

    def _close_revoked(self) -> int:
        closed = 0
        for pair in list(self.registry.pairs):
            kind = self.revocations.revoked(_claims(pair))
            if kind is not None and pair.state == pair.STATE_OPEN:
                self.revoked[kind] = self.revoked.get(kind, 0) + 1
                pair.close_both(REVOKED, "revoked")
                closed += 1
        return closed

    def _close(self, which: Callable[[LiveSession], bool], close: tuple[int, bytes], reason: str) -> int:
        closed = 0
        for pair in list(self.registry.pairs):
            if pair.state == pair.STATE_OPEN and which(pair):
                pair.close_both(close, reason)
                closed += 1
        return closed

    def local_sessions(self) -> list[JSONObject]:
        sessions = []
        for pair in self.registry.pairs:
            identity = getattr(pair, "identity", None)
            sessions.append(
                {
                    "id": pair.session_id,
                    "sub": identity.subject if identity is not None else None,
                    "route": pair.route_name,
                    "node": self.node_id,
                    "peer": pair.peer,
                    "opened_at": round(pair.opened_at, 3),
                }
            )
        return sorted(sessions, key=lambda s: s["opened_at"])

    # -- the verbs of the admin API ------------------------------------------------

    # (each worker's ActionResult, most of them read back as JSON: their shape is the action's)
    async def broadcast(self, action: str, args: JSONObject) -> list[Any]:
        """Every worker's result of ``action``, once each has answered."""
        self.admin_actions[action] = self.admin_actions.get(action, 0) + 1
        return await self._gather(action, args)

    async def _gather(self, action: str, args: JSONObject) -> list[Any]:  # (as broadcast's)
        if self.settings is None:
            if self.link is not None and self.link.up:
                try:
                    answer: JSONObject = await self.link.request({"op": "broadcast", "action": action, "args": args})
                    return list(answer["results"])
                except Exception as e:
                    log.warn("workers: {action} for this worker only: {error}", action=action,
                             error=str(e) or type(e).__name__)
            return [self._apply(action, args)]
        if not self.up:
            raise GatewayError("the cluster's Redis is unreachable", status=503, error="cluster_unavailable")
        self._sequence += 1
        request_id = f"{self.worker_id}/{self._sequence}"
        d: Deferred[list[JSONObject]] = Deferred()
        answers: list[JSONObject] = []
        self._waiting[request_id] = (1 << 30, answers, d)
        try:
            message = json.dumps({"id": request_id, "from": self.worker_id, "action": action, "args": args})
            receivers = await self._call("PUBLISH", CONTROL, message)
            if len(answers) >= receivers:
                return [a["result"] for a in answers]
            self._waiting[request_id] = (receivers, answers, d)
            d.addTimeout(REPLY_TIMEOUT, self.clock)
            try:
                await d
            except DeferredTimeout:
                log.warn(
                    "cluster: {action}: {n} of {expected} workers answered in time",
                    action=action,
                    n=len(answers),
                    expected=receivers,
                )
            return [a["result"] for a in answers]
        finally:
            self._waiting.pop(request_id, None)

    async def revoke(self, *, jti: str | None = None, exp: float | None = None,
                     sub: str | None = None, before: float | None = None) -> int:
        """Keep the revocation in Redis until the tokens it covers expire; every worker applies it."""
        now = self.clock.seconds()
        if jti is not None:
            assert exp is not None  # a revocation by token names its expiry
            until = float(exp) + self.leeway
            args = {"jti": jti, "until": until}
            key, value, keep = PREFIX + "revoked:jti:" + jti, until, until - now
        else:
            assert sub is not None and before is not None  # or by subject, issued before
            args = {"sub": sub, "before": float(before)}
            key, value = PREFIX + "revoked:sub:" + sub, float(before)
            keep = float(before) - now + SUBJECT_REVOCATION_TTL + self.leeway
        if self.settings is not None and self.up and keep > 0:
            if jti is not None:
                await self._call("SET", key, value, "EX", max(1, int(keep) + 1))
            else:
                await self._call("EVAL", _REVOKE_SUBJECT, 1, key, value, max(1, int(keep) + 1))
        return sum(await self.broadcast("revoke", args))

    async def nodes(self) -> list[JSONObject]:
        """The nodes whose workers' heartbeats are alive: the workers, WebSockets, last heartbeat."""
        if self.settings is None:
            return group_workers(await self._gather("worker", {}))
        if not self.up:
            raise GatewayError("the cluster's Redis is unreachable", status=503, error="cluster_unavailable")
        workers = []
        cursor: int | str = 0
        while True:
            cursor, keys = await self._call("SCAN", cursor, "MATCH", PREFIX + "node:*", "COUNT", 500)
            for key in keys:
                values = await self._call("HGETALL", key)
                if values:
                    workers.append(_worker(values))
            if str(cursor) == "0":
                return group_workers(workers)

    def _own_worker(self) -> JSONObject:
        return {
            "node": self.node_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "websockets": len(self.registry.pairs),
            "heartbeat": round(self.clock.seconds(), 3),
        }

    # -- the data path's checks -------------------------------------------------

    def check_token(self, claims: Mapping[str, object]) -> None:
        """Refuse a revoked token (memory only: no Redis on the request path)."""
        kind = self.revocations.revoked(claims)
        if kind is not None:
            from twisted_gateway.auth import AuthError  # (imported only for a refusal)

            self.revoked[kind] = self.revoked.get(kind, 0) + 1
            raise AuthError("token revoked")

    def caps_for(self, route: RouteSettings) -> list[tuple[str, int]]:
        caps = []
        if route.max_websockets_per_user:
            caps.append((route.name, route.max_websockets_per_user))
        if self.gateway_cap:
            caps.append(("*", self.gateway_cap))
        return caps

    async def acquire(self, sub: str, route: RouteSettings) -> list[tuple[str, str]] | None:
        """
        Count a new WebSocket of ``sub`` against its caps, or refuse it with
        429: one script call when Redis is up, this worker's own counts when
        it is not (or answers too late); nothing for a route without a cap.
        """
        caps = self.caps_for(route)
        if not caps:
            return None
        keys = [(scope, sub) for scope, _ in caps]
        over = None
        if self.link is not None and self.link.up:
            try:
                over = (await self.link.request(
                    {"op": "acquire", "keys": keys, "caps": [cap for _, cap in caps]}))["over"]
            except Exception as e:
                log.warn("workers: cap check without the supervisor ({error}): this worker's counts only",
                         error=str(e) or type(e).__name__)
        elif self.settings is not None and self.up:
            try:
                over = await self._call(
                    "EVAL", _ACQUIRE, len(keys), *[count_key(*k) for k in keys],
                    self._field(), *[cap for _, cap in caps],
                )
            except Exception as e:
                log.warn("cluster: cap check without Redis ({error}): this worker's counts only",
                         error=str(e) or type(e).__name__)
        if over is None:
            over = next((i + 1 for i, (key, (_, cap)) in enumerate(zip(keys, caps))
                         if self.counts.get(key, 0) >= cap), 0)
        if over:
            scope, cap = caps[int(over) - 1]
            self.metrics.limit_rejection(route.name, "max_websockets_per_user")
            where = "on this route" if scope != "*" else "on this gateway"
            raise GatewayError(
                f"at most {cap} WebSockets per user {where}",
                status=429,
                error="too_many_connections",
                headers=[(b"Retry-After", str(RETRY_AFTER).encode())],
            )
        for key in keys:
            self.counts[key] = self.counts.get(key, 0) + 1
        return keys

    def release(self, keys: Iterable[tuple[str, str]]) -> None:
        """A counted WebSocket is gone."""
        keys = list(keys)
        if self.link is not None:
            self.link.send({"op": "release", "keys": keys})
        for key in keys:
            n = self.counts.get(key, 0) - 1
            if n > 0:
                self.counts[key] = n
            else:
                self.counts.pop(key, None)
            if self.settings is not None and self.up:
                d = Deferred.fromCoroutine(self._call("HINCRBY", count_key(*key), self._field(), -1))
                d.addErrback(lambda f: None)  # rewritten from self.counts at the next reconnect


def _claims(pair: LiveSession) -> Mapping[str, object]:
    identity = getattr(pair, "identity", None)
    return identity.claims if identity is not None else {}


def _worker(values: dict[str, str] | list[str]) -> JSONObject:
    if isinstance(values, list):
        values = dict(zip(values[::2], values[1::2]))
    return {
        "node": values.get("node"),
        "host": values.get("host"),
        "pid": _number(values.get("pid")),
        "websockets": _number(values.get("websockets")),
        "heartbeat": _number(values.get("heartbeat")),
    }


def group_workers(workers: list[JSONObject]) -> list[JSONObject]:
    """Workers by node: each node's WebSockets and latest heartbeat, and its workers."""
    nodes: dict[str, JSONObject] = {}
    for worker in sorted(workers, key=lambda w: (str(w["node"]), str(w["pid"]))):
        node = nodes.setdefault(
            str(worker["node"]), {"node": worker["node"], "websockets": 0, "heartbeat": 0, "workers": []}
        )
        node["websockets"] += worker["websockets"] or 0
        node["heartbeat"] = max(node["heartbeat"], worker["heartbeat"] or 0)
        node["workers"].append({k: worker[k] for k in ("host", "pid", "websockets", "heartbeat")})
    return list(nodes.values())


def _number(value: str | None) -> int | float | str | None:
    if value is None:
        return None
    try:
        return float(value) if "." in str(value) else int(value)
    except (TypeError, ValueError):
        return value


class ClusterCollector(Collector):
    """``wsgateway_cluster_up``, ``wsgateway_admin_actions_total``, ``wsgateway_revoked_total``."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def _families(self) -> tuple[GaugeMetricFamily, CounterMetricFamily, CounterMetricFamily]:
        return (
            GaugeMetricFamily("wsgateway_cluster_up", "1 while this worker is connected to the cluster's Redis."),
            CounterMetricFamily(
                "wsgateway_admin_actions", "Administrator actions asked of this worker.", labels=["action"]
            ),
            CounterMetricFamily(
                "wsgateway_revoked",
                "Revoked tokens refused and WebSockets closed for a revocation, by what matched.",
                labels=["reason"],
            ),
        )

    def collect(self) -> Iterator[Metric]:
        up, actions, revoked = families = self._families()
        cluster = self.cluster
        if cluster.settings is not None:
            up.add_metric([], 1 if cluster.up else 0)
        for action, n in sorted(cluster.admin_actions.items()):
            actions.add_metric([action], n)
        for reason, n in sorted(cluster.revoked.items()):
            revoked.add_metric([reason], n)
        return iter(families if cluster.settings is not None else families[1:])


@implementer(IAuthenticator)
class RevocationGuard:
    """An authenticator whose verified tokens are also checked against the revocations."""

    def __init__(self, authenticator: IAuthenticator, cluster: Cluster) -> None:
        self._authenticator = authenticator
        self._cluster = cluster

    @property
    def keyset(self) -> KeySet | None:
        """The wrapped authenticator's JWKS keys (None when it has none)."""
        keyset: KeySet | None = getattr(self._authenticator, "keyset", None)
        return keyset

    async def verify(self, token: str) -> Identity:
        """The wrapped authenticator's verdict on ``token``, refused as well when it is revoked."""
        verify: Callable[[str], Awaitable[Identity]] = getattr(self._authenticator, "verify")
        identity = await verify(token)
        self._cluster.check_token(identity.claims)
        return identity

    async def authenticate(
        self, mode: str, headers: Sequence[tuple[bytes, bytes]], query: bytes, route: RouteSettings | None = None
    ) -> Identity | None:
        identity = await self._authenticator.authenticate(mode, headers, query, route)
        if identity is not None:
            self._cluster.check_token(identity.claims)
        return identity

    def upstream_query(self, query: bytes) -> bytes:
        return self._authenticator.upstream_query(query)

    def ready(self) -> bool:
        return self._authenticator.ready()

    def key_counts(self) -> tuple[int, Mapping[str, int]]:
        return self._authenticator.key_counts()

    def start(self) -> None:
        self._authenticator.start()

    def stop(self) -> Deferred[None]:
        return self._authenticator.stop()
