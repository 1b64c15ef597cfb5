"""The [cluster] section's pure parts: the Redis URL, counts, revocations without Redis."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from twisted_gateway.auth import AuthError
from twisted_gateway.cluster import Cluster, RevocationGuard, count_key
from twisted_gateway.identity import Identity
from twisted_gateway.metrics import Metrics
from twisted_gateway.ws_relay import RelayRegistry
from twisted_gateway.schema import RedisAddress, parse_redis_url


@pytest.mark.parametrize(
    "url, address",
    [
        ("redis://127.0.0.1:6379/0", RedisAddress("127.0.0.1", 6379, 0, None, None, False)),
        ("redis://redis.internal", RedisAddress("redis.internal", 6379, 0, None, None, False)),
        ("rediss://:p%40ss@r.example:6380/3", RedisAddress("r.example", 6380, 3, None, "p@ss", True)),
        ("redis://gw:secret@[::1]:7000/", RedisAddress("::1", 7000, 0, "gw", "secret", False)),
    ],
)
def test_redis_urls(url, address):
    assert parse_redis_url(url) == address


@pytest.mark.parametrize(
    "url, reason",
    [
        ("http://h", "redis:// or rediss://"),
        ("redis://", "no host"),
        ("redis://h:99999", "bad port"),
        ("redis://h/zero", "must be a number"),
    ],
)
def test_bad_redis_urls_are_refused_without_quoting_them(url, reason):
    with pytest.raises(ValueError, match=reason) as caught:
        parse_redis_url(url)
    assert url not in str(caught.value)


def test_count_keys_keep_route_and_subject_apart():
    assert count_key("chat", "a:b") != count_key("chat:a", "b")


def test_workers_are_grouped_by_node_with_their_sockets_and_latest_heartbeat():
    from twisted_gateway.cluster import group_workers

    workers = [
        {"node": "gw-b", "host": "h2", "pid": 7, "websockets": 1, "heartbeat": 100.5},
        {"node": "gw-a", "host": "h1", "pid": 12, "websockets": 3, "heartbeat": 101.0},
        {"node": "gw-a", "host": "h1", "pid": 11, "websockets": 2, "heartbeat": 99.0},
    ]
    assert group_workers(workers) == [
        {"node": "gw-a", "websockets": 5, "heartbeat": 101.0, "workers": [
            {"host": "h1", "pid": 11, "websockets": 2, "heartbeat": 99.0},
            {"host": "h1", "pid": 12, "websockets": 3, "heartbeat": 101.0},
        ]},
        {"node": "gw-b", "websockets": 1, "heartbeat": 100.5, "workers": [
            {"host": "h2", "pid": 7, "websockets": 1, "heartbeat": 100.5},
        ]},
    ]


def test_the_default_node_id_of_a_worker_names_its_supervisor(monkeypatch):
    """Without node_id, the workers of one gateway are one node: hostname and the supervisor's pid."""
    import os
    import socket

    from twisted_gateway.cluster import default_node_id
    from twisted_gateway.workers import WORKER_ENV

    monkeypatch.delenv(WORKER_ENV, raising=False)
    assert default_node_id() == f"{socket.gethostname()}-{os.getpid()}"
    monkeypatch.setenv(WORKER_ENV, "1")
    assert default_node_id() == f"{socket.gethostname()}-{os.getppid()}"


class _Verifier:
    """An authenticator's ``verify``: every token is the identity it names."""

    async def verify(self, token: str) -> Identity:
        return Identity(token, {"sub": token, "jti": f"jti-{token}"})


@pytest_twisted.ensureDeferred
async def test_the_revocation_guard_refuses_a_revoked_token_verify_accepted():
    """What a library user calls on the gateway's authenticator checks revocations too."""
    cluster = Cluster(None, registry=RelayRegistry(), clock=Clock(), metrics=Metrics())
    guard = RevocationGuard(_Verifier(), cluster)
    assert (await guard.verify("alice")).subject == "alice"
    cluster.revocations.add_jti("jti-alice", until=1e12)
    with pytest.raises(AuthError, match="revoked"):
        await guard.verify("alice")
    assert (await guard.verify("bob")).subject == "bob"
