"""
``workers = 2``: one ``twistd`` supervisor and two worker processes, with
``[cluster]`` (a real Redis) and without it (the workers linked through their
supervisor). Either way, whichever worker the admin call lands on, a
disconnect and a revocation close the right sockets on both workers, and a
per-user cap counts the sockets of both. ``ss`` tells which worker holds
which client connection.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.e2e.test_cluster_e2e import ADMIN_TOKEN, Gateway, gateway_config, _closed, _echoes, _token
from tests.e2e.test_front_door_e2e import UPSTREAM_SCRIPT
from tests.e2e.test_workers_e2e import READY, SHARED
from tests.processes import GUARD, TWISTD, Process, python_script
from tests.redis_server import redis_server  # noqa: F401 (fixture)
from tests.support import settle_blocking


JOINED = re.compile(r"cluster: connected to Redis")


class Workers(Gateway):
    """A twistd wsgateway with ``workers = 2``: the supervisor, its workers' pids, the shared ports."""

    def __init__(self, tmp_path, redis_url: str | None, upstream_port: int) -> None:
        directory = tmp_path / "gw"
        directory.mkdir()
        (directory / "admin-token").write_text(ADMIN_TOKEN + "\n")
        capped = f"[route:capped]\nprefix = /capped\nupstream = http://127.0.0.1:{upstream_port}\nmax_websockets_per_user = 2"
        (directory / "gateway.cfg").write_text(
            gateway_config(redis_url, upstream_port, gateway="workers = 2\ndrain_timeout = 3", route="") + capped
        )
        self.clients = contextlib.ExitStack()
        self.process = Process(
            [str(TWISTD), "-n", "--pidfile=", "wsgateway", "--config", str(directory / "gateway.cfg")], directory
        )
        # the supervisor binds [gateway] listen, then [admin] listen
        self.port = int(self.process.wait_for(SHARED).group(1))
        self.admin_port = int(self.process.wait_for(SHARED).group(1))
        self.pids: set[int] = set()
        joined = 0 if redis_url is not None else 2  # without [cluster], nothing to join
        either = re.compile(f"{READY.pattern}|{JOINED.pattern}")
        while len(self.pids) < 2 or joined < 2:
            match = self.process.wait_for(either)
            if match.group(2):
                self.pids.add(int(match.group(2)))
            else:
                joined += 1

    def connect(self, token: str, route: str = "chat"):
        from websockets.sync.client import connect

        return connect(f"ws://127.0.0.1:{self.port}/{route}/ws?token={token}", open_timeout=GUARD)

    def ws(self, token: str, route: str = "chat"):
        """A WebSocket held until the test ends."""
        return self.clients.enter_context(self.connect(token, route))

    def worker_of(self, ws) -> int:
        """The pid of the worker holding this client's connection."""
        local = ws.socket.getsockname()[1]
        out = subprocess.run(
            ["ss", "-tnpH", "state", "established", f"( sport = :{self.port} and dport = :{local} )"],
            capture_output=True, text=True, check=True, timeout=GUARD,
        ).stdout
        [pid] = {int(p) for p in re.findall(r"pid=(\d+)", out)}
        return pid

    def on_both_workers(self, token: str) -> list:
        """Sockets of one token, opened until each worker holds at least one (the kernel picks)."""
        held: dict[int, list] = {}
        for _ in range(64):
            ws = self.ws(token)
            held.setdefault(self.worker_of(ws), []).append(ws)
            if len(held) == 2:
                assert set(held) == self.pids
                print(f"sockets per worker: { {pid: len(s) for pid, s in held.items()} }")
                return [ws for sockets in held.values() for ws in sockets]
        raise AssertionError("64 connections all reached one worker")

    def one_on_each(self, token: str, route: str) -> list:
        """Two sockets of one token, one on each worker, under a cap of 2 (extras closed)."""
        first = self.ws(token, route)
        while True:
            try:
                ws = self.ws(token, route)
            except InvalidStatus as e:
                assert e.response.status_code == 429  # the extra closed below is not released yet
                time.sleep(0.1)
                continue
            if self.worker_of(ws) != self.worker_of(first):
                return [first, ws]
            ws.close()

    def stop(self) -> None:
        self.clients.close()
        if self.process.process.poll() is None:
            self.process.process.send_signal(signal.SIGTERM)
            try:
                self.process.process.wait(GUARD)
            except subprocess.TimeoutExpired:
                pass
        self.process.stop()


@pytest.fixture(params=["cluster", "alone"])
def workers(tmp_path, request):
    """The gateway with [cluster] and a real Redis, or alone (its workers linked by the supervisor)."""
    redis_url = request.getfixturevalue("redis_server").url if request.param == "cluster" else None
    upstream = python_script(tmp_path, "upstream.py", UPSTREAM_SCRIPT)
    gateway = None
    try:
        port = int(upstream.wait_for(r"^PORT (\d+)").group(1))
        gateway = Workers(tmp_path, redis_url, port)
        yield gateway
    finally:
        if gateway is not None:
            gateway.stop()
        upstream.stop()


def test_a_disconnect_a_revocation_and_a_cap_reach_the_sockets_of_both_workers(workers):
    gw = workers
    status, body = gw.admin("GET", "/admin/cluster")
    [node] = body["nodes"]
    assert sorted(w["pid"] for w in node["workers"]) == sorted(gw.pids)
    # without node_id, both workers name their node after the host and the supervisor
    assert node["node"].endswith(f"-{gw.process.process.pid}")

    alice = gw.on_both_workers(_token("alice"))
    bob = gw.ws(_token("bob"))
    status, body = gw.admin("GET", "/admin/sessions?sub=alice")
    assert len(body["sessions"]) == len(alice) and {s["node"] for s in body["sessions"]} == {node["node"]}
    assert gw.admin("POST", "/admin/disconnect", {"sub": "alice"}) == (200, {"closed": len(alice)})
    for ws in alice:
        assert _closed(ws)[:2] == (1008, "disconnected by administrator")
    assert _echoes(bob, "bob is untouched")

    stolen = _token("alice", jti="stolen-workers")
    victims = gw.on_both_workers(stolen)
    fine = gw.ws(_token("alice", jti="fine-workers"))
    assert gw.admin("POST", "/admin/revoke", {"jti": "stolen-workers", "exp": time.time() + 3600}) == (
        200, {"revoked": True})
    for ws in victims:
        assert _closed(ws)[:2] == (1008, "token revoked")
    for _ in range(4):
        assert _refusal(gw, stolen) == 401
    assert _echoes(fine, "another token of alice is fine") and _echoes(bob, "bob still")

    # carol's cap of 2 on /capped: one socket on each worker, then every new one is refused
    carol = _token("carol")
    first, second = gw.one_on_each(carol, "capped")
    for _ in range(4):
        assert _refusal(gw, carol, "capped") == 429
    first.close()
    settle_blocking(lambda: _accepts(gw, carol, "capped"), "carol's freed slot")


def _refusal(gw: Workers, token: str, route: str = "chat") -> int:
    with pytest.raises(InvalidStatus) as refused:
        with gw.connect(token, route):
            pass
    return refused.value.response.status_code


def _accepts(gw: Workers, token: str, route: str) -> bool:
    try:
        with gw.connect(token, route):
            return True
    except InvalidStatus:
        return False


@pytest.mark.parametrize("workers", ["alone"], indirect=True)
def test_without_cluster_a_killed_workers_sockets_stop_counting_at_once(workers):
    """The supervisor drops a dead worker's counts when its link closes: no phantom sockets to wait out."""
    gw = workers
    carol = _token("carol")
    victim, survivor = gw.one_on_each(carol, "capped")
    assert _refusal(gw, carol, "capped") == 429
    pid = gw.worker_of(victim)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(ConnectionClosed):
        victim.recv(timeout=GUARD)
    gw.pids.discard(pid)
    third = []

    def opened() -> bool:
        try:
            third.append(gw.ws(carol, "capped"))
            return True
        except InvalidStatus:
            return False

    settle_blocking(opened, "the dead worker's socket no longer counted")
    # the survivor's socket still counts: one more, no more
    assert _refusal(gw, carol, "capped") == 429
    assert _echoes(survivor, "carol's other socket stays") and _echoes(third[0], "and the new one")
