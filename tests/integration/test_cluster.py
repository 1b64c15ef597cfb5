"""
Two gateways sharing one real Redis, in this process: administrator actions
on one reach the sockets of the other, revocations outlive a restart, per-user
caps count across both. (tests/e2e/test_cluster_e2e.py runs the same with
separate twistd processes, and kills a gateway and Redis mid-test.)
"""

from __future__ import annotations

import json

import jwt
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests.redis_server import redis_server  # noqa: F401 (fixture)
from tests.support import Upstream, hs256_config, http_error, listen, raw_connect, settle, start_gateway, ws_connect
from twisted_gateway.admin_api import AdminAPI

SECRET = "cluster-secret-for-tests-0123456789abcdef"
ADMIN_TOKEN = "admin-token-0123456789"
UPGRADE = (
    "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
    "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    "Sec-WebSocket-Version: 13\r\n\r\n"
)


def _config(redis_url: str, node: str, upstream_port: int, route_extra: str = "") -> str:
    cluster = f"[gateway]\nws_open_timeout = 5\n[cluster]\nredis = {redis_url}\nnode_id = {node}"
    return hs256_config(SECRET, upstream_port, before=cluster, route=route_extra)


def _token(sub: str, **claims) -> str:
    now = reactor.seconds()
    return jwt.encode({"sub": sub, "iat": int(now) - 10, "exp": now + 3600, **claims}, SECRET, algorithm="HS256")


class Node:
    """A gateway with its admin API on its own loopback port."""

    def __init__(self, gw, admin_port) -> None:
        self.gw, self.admin_port = gw, admin_port
        self.cluster = gw.gateway.cluster

    def ws(self, token: str) -> str:
        return self.gw.url(f"/v1/chat/ws?token={token}")

    async def admin(self, method: str, path: str, body=None, token: str = ADMIN_TOKEN):
        url = f"http://127.0.0.1:{self.admin_port.getHost().port}{path}"
        headers = {"Authorization": [f"Bearer {token}"]}
        data = json.dumps(body).encode() if body is not None else None
        response = await treq.request(method, url, headers=headers, data=data, persistent=False)
        return response.code, json.loads(await response.content())

    async def close(self) -> None:
        await self.admin_port.stopListening()
        await self.gw.gateway.stopService()
        await self.gw.close()


async def _node(redis_url: str, name: str, upstream_port: int, route_extra: str = "", cluster_extra: str = "") -> Node:
    config = _config(redis_url, name, upstream_port, route_extra)
    gw = await start_gateway(config.replace("[cluster]", cluster_extra) if cluster_extra else config)
    gw.gateway.startService()
    root = Resource()
    root.putChild(b"admin", AdminAPI(gw.gateway.cluster, ADMIN_TOKEN.encode()))
    site = Site(root)
    site.noisy = False
    node = Node(gw, await listen(site))
    await settle(lambda: node.cluster.up, f"node {name} connected to Redis")
    return node


async def _cluster(redis_url: str, route_extra: str = ""):
    upstream = Upstream()
    up_port = await listen(upstream)
    port = up_port.getHost().port
    a = await _node(redis_url, "gw-a", port, route_extra)
    b = await _node(redis_url, "gw-b", port, route_extra)
    return upstream, up_port, a, b


async def _stop(up_port, *nodes, clients=()) -> None:
    for client in clients:
        if client.state != client.STATE_CLOSED:
            client.dropConnection(abort=True)
    for node in nodes:
        await settle(lambda: not node.gw.registry.pairs, "no pair left")
        await node.close()
    await up_port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_disconnect_on_one_gateway_closes_the_users_sockets_on_both(redis_server):
    """Every socket of alice, on either gateway, gets 1008 "disconnected by administrator"; bob's stay."""
    upstream, up_port, a, b = await _cluster(redis_server.url)
    alice_a = await ws_connect(a.ws(_token("alice")))
    alice_b = await ws_connect(b.ws(_token("alice")))
    bob_b = await ws_connect(b.ws(_token("bob")))
    status, body = await a.admin("GET", "/admin/sessions?sub=alice")
    assert status == 200
    assert sorted(s["node"] for s in body["sessions"]) == ["gw-a", "gw-b"]
    assert {s["sub"] for s in body["sessions"]} == {"alice"}
    assert set(body["sessions"][0]) == {"id", "sub", "route", "node", "peer", "opened_at"}
    assert await a.admin("POST", "/admin/disconnect", {"sub": "alice"}) == (200, {"closed": 2})
    assert await alice_a.closed == (1008, "disconnected by administrator")
    assert await alice_b.closed == (1008, "disconnected by administrator")
    bob_b.sendMessage(b"still here")
    assert await bob_b.next_message() == (b"still here", False)
    status, body = await b.admin("GET", "/admin/sessions")
    [bob] = body["sessions"]
    assert await b.admin("POST", "/admin/disconnect", {"session": bob["id"]}) == (200, {"closed": 1})
    assert await bob_b.closed == (1008, "disconnected by administrator")
    assert a.cluster.admin_actions == {"sessions": 1, "disconnect": 1}
    await _stop(up_port, a, b)


@pytest_twisted.ensureDeferred
async def test_a_revoked_token_is_refused_everywhere_and_its_sockets_closed_even_on_a_later_gateway(
    redis_server,
):
    """
    A jti revoked on one gateway: its socket on the other closes with 1008
    "token revoked", a new handshake or request gets 401, and a gateway that
    starts afterwards enforces it too; alice's other token is untouched.
    """
    upstream, up_port, a, b = await _cluster(redis_server.url)
    stolen = _token("alice", jti="stolen-1")
    other = _token("alice", jti="fine-1")
    victim = await ws_connect(b.ws(stolen))
    fine = await ws_connect(b.ws(other))
    exp = reactor.seconds() + 3600
    assert await a.admin("POST", "/admin/revoke", {"jti": "stolen-1", "exp": exp}) == (200, {"revoked": True})
    assert await victim.closed == (1008, "token revoked")
    raw = await raw_connect(a.gw.number)
    raw.transport.write(UPGRADE.format(path=f"/v1/chat/ws?token={stolen}").encode())
    status, body = http_error(await raw.lost)
    assert (status, body) == (401, {"error": "invalid_token", "detail": "token revoked"})
    fine.sendMessage(b"ok")
    assert await fine.next_message() == (b"ok", False)
    c = await _node(redis_server.url, "gw-c", up_port.getHost().port)
    assert "stolen-1" in c.cluster.revocations.jtis
    response = await treq.get(c.gw.url(f"/v1/chat/x?token={stolen}", "http"), persistent=False)
    assert response.code == 401
    assert json.loads(await response.content()) == {"error": "invalid_token", "detail": "token revoked"}
    assert b.cluster.revoked == {"jti": 1}
    await _stop(up_port, a, b, c, clients=[fine])


@pytest_twisted.ensureDeferred
async def test_revoking_a_subject_before_a_time_closes_only_older_tokens(redis_server):
    upstream, up_port, a, b = await _cluster(redis_server.url)
    now = int(reactor.seconds())
    old = await ws_connect(a.ws(_token("alice", iat=now - 100)))
    new = await ws_connect(b.ws(_token("alice", iat=now - 5)))
    revoke = {"sub": "alice", "before": now - 50}
    assert await b.admin("POST", "/admin/revoke", revoke) == (200, {"revoked": True})
    assert await old.closed == (1008, "token revoked")
    new.sendMessage(b"newer token")
    assert await new.next_message() == (b"newer token", False)
    await _stop(up_port, a, b, clients=[new])


@pytest_twisted.ensureDeferred
async def test_a_per_user_cap_holds_across_both_gateways_and_frees_a_slot_when_a_socket_closes(redis_server):
    upstream, up_port, a, b = await _cluster(redis_server.url, route_extra="max_websockets_per_user = 2")
    first = await ws_connect(a.ws(_token("alice")))
    second = await ws_connect(b.ws(_token("alice")))
    raw = await raw_connect(a.gw.number)
    raw.transport.write(UPGRADE.format(path=f"/v1/chat/ws?token={_token('alice')}").encode())
    data = await raw.lost
    assert http_error(data) == (429, {"error": "too_many_connections",
                                      "detail": "at most 2 WebSockets per user on this route"})
    assert b"\r\nRetry-After: 5\r\n" in data
    bob = await ws_connect(b.ws(_token("bob")))  # another user is not counted with alice
    first.sendClose(1000)
    await first.closed
    await settle(lambda: not a.cluster.counts, "alice's slot freed")
    third = await ws_connect(a.ws(_token("alice")))
    assert a.gw.gateway.metrics.route("chat").limit_rejections == {"max_websockets_per_user": 1}
    await _stop(up_port, a, b, clients=[second, third, bob])


@pytest_twisted.ensureDeferred
async def test_the_admin_api_wants_its_token_and_well_formed_json(redis_server):
    upstream, up_port, a, b = await _cluster(redis_server.url)
    status, body = await a.admin("GET", "/admin/sessions", token="wrong-token-0123456789")
    assert (status, body["error"]) == (401, "unauthorized")
    for payload in ({}, {"sub": "a", "session": "b"}, {"sub": ""}, {"sub": 3}):
        status, body = await a.admin("POST", "/admin/disconnect", payload)
        assert (status, body["error"]) == (400, "bad_request"), payload
    for payload in ({"jti": "x"}, {"jti": "x", "exp": "soon"}, {"sub": "a"}, {"what": 1}):
        status, body = await a.admin("POST", "/admin/revoke", payload)
        assert (status, body["error"]) == (400, "bad_request"), payload
    status, body = await a.admin("GET", "/admin/cluster")
    assert status == 200
    assert [n["node"] for n in body["nodes"]] == ["gw-a", "gw-b"]
    assert all(n["websockets"] == 0 and n["heartbeat"] > 0 for n in body["nodes"])
    assert [len(n["workers"]) for n in body["nodes"]] == [1, 1]  # both in this process: one pid
    await _stop(up_port, a, b)


def _metrics_text(node: Node) -> str:
    from prometheus_client import generate_latest

    return generate_latest(node.gw.gateway.metrics.registry).decode()


async def _get(node: Node, path: str):
    response = await treq.get(node.gw.url(path, "http"), persistent=False)
    return response.code, json.loads(await response.content())


@pytest_twisted.ensureDeferred
async def test_with_redis_down_and_policy_open_revocations_hold_from_memory_and_state_returns_with_redis(
    redis_server,
):
    """
    on_redis_down = open (the default): Redis killed, the gateways keep serving,
    refuse what was revoked before, say wsgateway_cluster_up 0; once Redis is
    back they resubscribe, write their counts again (the cap holds) and take
    new revocations.
    """
    upstream, up_port, a, b = await _cluster(redis_server.url, route_extra="max_websockets_per_user = 1")
    exp = reactor.seconds() + 3600
    await a.admin("POST", "/admin/revoke", {"jti": "gone", "exp": exp})
    held = await ws_connect(a.ws(_token("carol")))
    redis_server.kill()
    await settle(lambda: not a.cluster.up and not b.cluster.up, "both nodes see Redis down")
    assert "wsgateway_cluster_up 0.0" in _metrics_text(b)
    status, body = await _get(b, f"/v1/chat/x?token={_token('dave', jti='gone')}")
    assert (status, body["detail"]) == (401, "token revoked")
    assert (await _get(b, "/readyz"))[0] == 200
    status, body = await a.admin("POST", "/admin/disconnect", {"sub": "carol"})
    assert (status, body["error"]) == (503, "cluster_unavailable")
    held.sendMessage(b"still relayed")
    assert await held.next_message() == (b"still relayed", False)
    redis_server.start()
    await settle(lambda: a.cluster.up and b.cluster.up, "both nodes back on Redis", seconds=30)
    assert "wsgateway_cluster_up 1.0" in _metrics_text(b)
    # carol's socket on a was written again: the cap of 1 holds on b
    raw = await raw_connect(b.gw.number)
    raw.transport.write(UPGRADE.format(path=f"/v1/chat/ws?token={_token('carol')}").encode())
    assert http_error(await raw.lost)[0] == 429
    assert await b.admin("POST", "/admin/revoke", {"sub": "carol", "before": reactor.seconds()}) == (
        200, {"revoked": True})
    assert await held.closed == (1008, "token revoked")
    await _stop(up_port, a, b)


@pytest_twisted.ensureDeferred
async def test_with_redis_down_and_policy_closed_new_work_gets_503_and_open_sockets_stay(redis_server):
    upstream = Upstream()
    up_port = await listen(upstream)
    a = await _node(redis_server.url, "gw-a", up_port.getHost().port, route_extra="")
    a.cluster.settings = type(a.cluster.settings)(redis_server.url, "gw-a", "closed")
    held = await ws_connect(a.ws(_token("carol")))
    redis_server.kill()
    await settle(lambda: not a.cluster.up, "Redis down seen")
    status, body = await _get(a, f"/v1/chat/x?token={_token('dave')}")
    assert (status, body["error"]) == (503, "cluster_unavailable")
    raw = await raw_connect(a.gw.number)
    raw.transport.write(UPGRADE.format(path=f"/v1/chat/ws?token={_token('dave')}").encode())
    assert http_error(await raw.wait_for(b"}")) == (503, {"error": "cluster_unavailable",
                                                         "detail": "the cluster's Redis is unreachable"})
    raw.transport.loseConnection()
    held.sendMessage(b"kept")
    assert await held.next_message() == (b"kept", False)
    redis_server.start()
    await settle(lambda: a.cluster.up, "back on Redis", seconds=30)
    response = await treq.get(a.gw.url("/healthz", "http"), persistent=False)
    assert response.code == 200
    await response.content()
    await _stop(up_port, a, clients=[held])


@pytest_twisted.ensureDeferred
async def test_a_gateway_that_never_reached_redis_is_not_ready_unless_policy_open(redis_server):
    """/readyz is 503 until the revocations are loaded (on_redis_down = closed), 200 with open."""
    from tests.processes import free_port

    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    upstream = Upstream()
    up_port = await listen(upstream)
    port = up_port.getHost().port
    closed = await start_gateway(_config(nowhere, "gw-x", port).replace("[cluster]", "[cluster]\non_redis_down = closed"))
    opened = await start_gateway(_config(nowhere, "gw-y", port))
    for gw in (closed, opened):
        gw.gateway.startService()
    response = await treq.get(closed.url("/readyz", "http"), persistent=False)
    assert (response.code, (await response.json())["status"]) == (503, "not_ready")
    response = await treq.get(opened.url("/readyz", "http"), persistent=False)
    assert response.code == 200
    await response.content()
    for gw in (closed, opened):
        await gw.gateway.stopService()
        await gw.close()
    await up_port.stopListening()


@pytest_twisted.ensureDeferred
async def test_rediss_reaches_a_tls_redis_trusting_its_ca_file_and_refuses_another_ca(tmp_path):
    """
    A real redis-server speaking TLS only, its certificate from a throwaway CA:
    gateways naming that CA in [cluster] ca_file join and act together; one
    trusting another CA never connects and says why.
    """
    from tests.certs import Authority
    from tests.redis_server import RedisServer

    ca = Authority("redis-ca")
    cert, key = ca.issue("redis", ips=("127.0.0.1",)).write(tmp_path)
    ca_file = ca.write(tmp_path)
    other_ca = Authority("other-ca").write(tmp_path)
    server = RedisServer(str(tmp_path), tls=(str(cert), str(key), str(ca_file)))
    server.start()
    try:
        assert server.url.startswith("rediss://")
        trusting = f"[cluster]\nca_file = {ca_file}"
        upstream = Upstream()
        up_port = await listen(upstream)
        port = up_port.getHost().port
        a = await _node(server.url, "gw-a", port, cluster_extra=trusting)
        b = await _node(server.url, "gw-b", port, cluster_extra=trusting)
        held = await ws_connect(b.ws(_token("erin")))
        assert await a.admin("POST", "/admin/revoke", {"sub": "erin", "before": reactor.seconds()}) == (
            200, {"revoked": True})
        assert await held.closed == (1008, "token revoked")
        assert "certificate verify failed" in await _refused_by_redis(server.url, port, f"ca_file = {other_ca}")
        await _stop(up_port, a, b)
    finally:
        server.kill()


@pytest_twisted.ensureDeferred
async def test_rediss_shows_the_client_certificate_a_redis_asks_for(tmp_path):
    """tls-auth-clients yes: [cluster] client_cert and client_key get in; without them the handshake fails."""
    from tests.certs import Authority
    from tests.redis_server import RedisServer

    ca = Authority("redis-ca")
    cert, key = ca.issue("redis", ips=("127.0.0.1",)).write(tmp_path)
    client_cert, client_key = ca.issue("gateway", client=True).write(tmp_path)
    ca_file = ca.write(tmp_path)
    server = RedisServer(str(tmp_path), tls=(str(cert), str(key), str(ca_file)),
                         client=(str(client_cert), str(client_key)))
    server.start()
    try:
        upstream = Upstream()
        up_port = await listen(upstream)
        port = up_port.getHost().port
        a = await _node(server.url, "gw-a", port, cluster_extra=(
            f"[cluster]\nca_file = {ca_file}\nclient_cert = {client_cert}\nclient_key = {client_key}"))
        assert a.cluster.up
        assert "certificate required" in await _refused_by_redis(server.url, port, f"ca_file = {ca_file}")
        await _stop(up_port, a)
    finally:
        server.kill()


async def _refused_by_redis(redis_url: str, upstream_port: int, cluster_keys: str) -> str:
    """Why a gateway with these [cluster] keys cannot join (it never gets up, it keeps trying)."""
    gw = await start_gateway(_config(redis_url, "gw-x", upstream_port).replace("[cluster]", f"[cluster]\n{cluster_keys}"))
    gw.gateway.startService()
    cluster = gw.gateway.cluster
    await settle(lambda: cluster.last_error is not None, "a failed TLS handshake")
    assert not cluster.up
    await gw.gateway.stopService()
    await gw.close()
    return cluster.last_error
