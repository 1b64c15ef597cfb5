"""
Two gateways (separate ``twistd`` processes, configs and ports, standing for
two hosts) and one real Redis: an administrator's disconnect and revocation
issued on one close the right sockets on the other, a per-user cap holds
across both and stops counting a killed gateway's sockets, and Redis killed and restarted mid-test under both
``on_redis_down`` policies, with the state back once it returns.

The clients are ``websockets`` clients in this process; the upstream is the
echo script of the front-door tests. Every process is stopped in a
``finally``; timeouts only stop a hung process from hanging the run.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import time

import jwt
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from tests.e2e.test_front_door_e2e import ROLE_LISTENING, UPSTREAM_SCRIPT
from tests.processes import GUARD, TWISTD, Process, python_script
from tests.redis_server import redis_server  # noqa: F401 (fixture)
from tests.support import settle_blocking
from twisted_gateway.cluster import NODE_TTL, PREFIX


SECRET = "cluster-e2e-secret-0123456789abcdef"
ADMIN_TOKEN = "cluster-e2e-admin-token-0123"


def _token(sub: str, **claims) -> str:
    now = time.time()
    return jwt.encode({"sub": sub, "iat": int(now) - 10, "exp": now + 3600, **claims}, SECRET, algorithm="HS256")


def gateway_config(redis_url: str | None, upstream_port: int, *, gateway: str = "", cluster: str = "",
                   route: str = "max_websockets_per_user = 2") -> str:
    """A gateway with an admin listener, HS256 auth and the route /chat; [cluster] unless ``redis_url`` is None."""
    section = f"[cluster]\nredis = {redis_url}\n{cluster}" if redis_url is not None else ""
    return f"""
[gateway]
listen = tcp:0:interface=127.0.0.1
ws_ping_interval = 0
{gateway}
[admin]
listen = tcp:0:interface=127.0.0.1
token = file:admin-token
{section}
[auth]
algorithms = HS256
secret = {SECRET}
leeway = 0
[route:chat]
prefix = /chat
upstream = http://127.0.0.1:{upstream_port}
{route}
"""


class Gateway:
    """One twistd wsgateway of the cluster: its public and admin ports."""

    def __init__(self, tmp_path, name: str, redis_url: str, upstream_port: int, policy: str) -> None:
        directory = tmp_path / name
        directory.mkdir()
        (directory / "admin-token").write_text(ADMIN_TOKEN + "\n")
        (directory / "gateway.cfg").write_text(
            gateway_config(redis_url, upstream_port, cluster=f"node_id = {name}\non_redis_down = {policy}")
        )
        self.name = name
        #: the test's clients of this gateway, closed when it stops
        self.clients = contextlib.ExitStack()
        self.process = Process(
            [str(TWISTD), "-n", "--pidfile=", "wsgateway", "--config", str(directory / "gateway.cfg")], directory
        )
        ports = {}
        while len(ports) < 2:
            match = self.process.wait_for(ROLE_LISTENING)
            ports[match.group(1)] = int(match.group(2))
        self.port, self.admin_port = ports["wsgateway"], ports["admin"]
        self.process.wait_for("connected to Redis")

    def connect(self, token: str):
        return connect(f"ws://127.0.0.1:{self.port}/chat/ws?token={token}", open_timeout=GUARD)

    def ws(self, token: str):
        """A WebSocket held until the test ends."""
        return self.clients.enter_context(self.connect(token))

    def admin(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        connection = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=GUARD)
        try:
            data = json.dumps(body).encode() if body is not None else None
            connection.request(method, path, body=data, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
            response = connection.getresponse()
            return response.status, json.loads(response.read())
        finally:
            connection.close()

    def metric(self, name: str) -> float | None:
        connection = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=GUARD)
        try:
            connection.request("GET", "/metrics")
            for line in connection.getresponse().read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.rsplit(" ", 1)[1])
            return None
        finally:
            connection.close()

    def stop(self) -> None:
        self.clients.close()
        self.process.stop()


def _closed(ws) -> tuple[int, str, float]:
    """The close code and reason a client receives next, and how long it waited."""
    started = time.monotonic()
    try:
        while True:
            ws.recv(timeout=GUARD)
    except ConnectionClosed as e:
        return e.rcvd.code, e.rcvd.reason, time.monotonic() - started


def _echoes(ws, text: str) -> bool:
    ws.send(text)
    return ws.recv(timeout=GUARD) == text


def _refusal(gateway: Gateway, token: str) -> int:
    with pytest.raises(InvalidStatus) as refused:
        with gateway.connect(token):
            pass
    return refused.value.response.status_code


@pytest.fixture
def cluster(tmp_path, redis_server, request):
    policy = getattr(request, "param", "open")
    upstream = python_script(tmp_path, "upstream.py", UPSTREAM_SCRIPT)
    gateways: list[Gateway] = []
    try:
        port = int(upstream.wait_for(r"^PORT (\d+)").group(1))
        for name in ("gw-a", "gw-b"):
            gateways.append(Gateway(tmp_path, name, redis_server.url, port, policy))
        yield redis_server, gateways[0], gateways[1]
    finally:
        for gateway in gateways:
            gateway.stop()
        upstream.stop()


def test_a_disconnect_and_a_revocation_on_one_gateway_close_the_right_sockets_on_the_other(cluster):
    redis, a, b = cluster
    alice_a, alice_b, bob_b = a.ws(_token("alice")), b.ws(_token("alice")), b.ws(_token("bob"))
    status, body = a.admin("GET", "/admin/sessions?sub=alice")
    assert sorted(s["node"] for s in body["sessions"]) == ["gw-a", "gw-b"]
    assert a.admin("POST", "/admin/disconnect", {"sub": "alice"}) == (200, {"closed": 2})
    code_a, reason_a, _ = _closed(alice_a)
    code_b, reason_b, waited = _closed(alice_b)
    assert (code_a, reason_a) == (code_b, reason_b) == (1008, "disconnected by administrator")
    print(f"disconnect on gw-a reached gw-b's socket after {waited:.3f} s")
    assert _echoes(bob_b, "bob is untouched")

    stolen = _token("alice", jti="stolen-e2e")
    victim, fine = b.ws(stolen), b.ws(_token("alice", jti="fine-e2e"))
    assert a.admin("POST", "/admin/revoke", {"jti": "stolen-e2e", "exp": time.time() + 3600}) == (
        200, {"revoked": True})
    code, reason, waited = _closed(victim)
    assert (code, reason) == (1008, "token revoked")
    print(f"revocation on gw-a closed gw-b's socket after {waited:.3f} s")
    assert _refusal(b, stolen) == 401 and _refusal(a, stolen) == 401
    assert _echoes(fine, "another token of alice is fine") and _echoes(bob_b, "bob still")
    assert a.metric("wsgateway_admin_actions_total{action=\"revoke\"}") == 1.0
    assert b.metric("wsgateway_revoked_total{reason=\"jti\"}") >= 2.0  # the socket, the handshake

    # the cap of 2 per user counts carol's sockets on both gateways
    carol = [a.ws(_token("carol")), b.ws(_token("carol"))]
    assert _refusal(b, _token("carol")) == 429 and _refusal(a, _token("carol")) == 429
    carol.pop().close()
    settle_blocking(lambda: _accepts(a, _token("carol")), "carol's freed slot")


def test_a_killed_gateways_sockets_stop_counting_once_its_heartbeat_key_expires(cluster):
    """
    gw-a killed with SIGKILL (no goodbye to Redis, nothing cleaned up): its
    heartbeat key lives at most NODE_TTL s (under a minute) and nothing renews
    it; once it is gone, the sockets gw-a counted no longer hold carol's cap
    of 2 on gw-b.
    """
    redis, a, b = cluster
    a.ws(_token("carol"))
    a.ws(_token("carol"))
    assert _refusal(b, _token("carol")) == 429
    heartbeat = f"{PREFIX}node:gw-a/{a.process.process.pid}"
    assert 0 < int(redis.command("TTL", heartbeat)[1:]) <= NODE_TTL <= 60
    a.process.stop()  # SIGKILL
    assert redis.command("DEL", heartbeat) == b":1\r\n"  # what NODE_TTL s without a heartbeat do
    assert _accepts(b, _token("carol"))


def _accepts(gateway: Gateway, token: str) -> bool:
    try:
        with gateway.connect(token):
            return True
    except InvalidStatus:
        return False


@pytest.mark.parametrize("cluster", ["open", "closed"], indirect=True)
def test_redis_killed_and_restarted_mid_test(cluster, request):
    """
    open: the gateways keep serving (revocations from memory, caps per
    gateway) and say wsgateway_cluster_up 0; closed: new handshakes get 503
    cluster_unavailable. Open sockets stay either way; once Redis is back both
    resubscribe and write their counts again.
    """
    redis, a, b = cluster
    policy = request.node.callspec.params["cluster"]
    b.admin("POST", "/admin/revoke", {"jti": "old-e2e", "exp": time.time() + 3600})
    held = a.ws(_token("carol"))
    held_b = b.ws(_token("carol"))
    redis.kill()
    settle_blocking(lambda: a.metric("wsgateway_cluster_up") == 0 and b.metric("wsgateway_cluster_up") == 0, "cluster down")
    assert _echoes(held, "kept while Redis is down")
    if policy == "open":
        assert _refusal(b, _token("dave", jti="old-e2e")) == 401  # from memory
        with b.connect(_token("dave")):
            pass
        assert b.admin("GET", "/admin/cluster")[0] == 503
    else:
        assert _refusal(b, _token("dave")) == 503
    redis.start()
    settle_blocking(lambda: a.metric("wsgateway_cluster_up") == 1 and b.metric("wsgateway_cluster_up") == 1, "cluster up")
    # carol's two sockets were counted again: the cap holds; a disconnect reaches both
    assert _refusal(b, _token("carol")) == 429
    assert b.admin("POST", "/admin/disconnect", {"sub": "carol"}) == (200, {"closed": 2})
    assert _closed(held)[:2] == (1008, "disconnected by administrator")
    assert _closed(held_b)[:2] == (1008, "disconnected by administrator")
    status, body = a.admin("GET", "/admin/cluster")
    assert [n["node"] for n in body["nodes"]] == ["gw-a", "gw-b"]
    assert [[w["pid"] for w in n["workers"]] for n in body["nodes"]] == [
        [a.process.process.pid], [b.process.process.pid]]
