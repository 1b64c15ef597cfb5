"""
socket.io 4 (Node) behind the gateway, with its own client and its defaults:
long polling first, then the upgrade. Two instances under ``hash_key = ip``
(engine.io needs every request of a session on one instance), a long poll
under a route's ``request_timeout``, and a burst of upgrades engine.io drops
that must not empty the route. docs/socketio.md shows the same config.
"""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue

from tests.stacks import HERE, node_env, socketio_server, stop
from tests.support import raw_connect, settle, start_gateway

#: A guard against a hang: the clients give up on their own well before.
GUARD = 90


def config(ports: list[int], route_extra: str = "", gateway_extra: str = "") -> str:
    """The docs/socketio.md route, on loopback (the test's clients come "through" 127.0.0.1)."""
    upstreams = " ".join(f"http://127.0.0.1:{port}" for port in ports)
    return f"""
[gateway]
trusted_proxies = 127.0.0.0/8
{gateway_extra}
[route:socketio]
prefix = /socket.io
upstream = {upstreams}
balance = hash
hash_key = ip
{route_extra}
"""


@pytest.fixture(scope="module")
def two_instances():
    servers = [socketio_server(name) for name in ("a", "b")]
    yield [port for _, port in servers]
    for process, _ in servers:
        stop(process)


async def run_clients(gateway_port: int, count: int, hold_ms: int = 0, polling_only: bool = False) -> list[dict]:
    args = ["socketio_clients.js", f"http://127.0.0.1:{gateway_port}", str(count), str(hold_ms)]
    if polling_only:
        args.append("polling")
    d = getProcessOutputAndValue("node", args, env=node_env(), path=str(HERE))
    d.addTimeout(GUARD, reactor)
    out, err, code = await d
    assert code == 0, err.decode()
    return json.loads(out.decode().strip().splitlines()[-1])


async def stop_gateway(gw) -> None:
    await settle(lambda: not gw.registry.pairs and not gw.registry.handshakes, "the pairs closed")
    await gw.gateway.stopService()
    await gw.close()


@pytest_twisted.ensureDeferred
async def test_ten_default_clients_across_two_instances_connect_upgrade_and_chat(two_instances):
    """Polling, then the upgrade, then a chat message with a binary ack, for all ten."""
    gw = await start_gateway(config(two_instances))
    try:
        results = await run_clients(gw.number, 10)
        # where the ring puts each client's address (the instances' ports are new each run,
        # so which of the two owns an address is too: about 1 run in 500 puts all ten on one)
        names = dict(zip((f"http://127.0.0.1:{port}" for port in two_instances), "ab"))
        pool = gw.gateway.pools["socketio"]
        owners = {i: names[pool.choose(f"198.51.100.{i + 1}").url] for i in range(10)}
    finally:
        await stop_gateway(gw)
    for result in results:
        assert result["errors"] == [], result
        assert result["transports"] == ["polling", "websocket"], result
        assert result["ack_ok"] and result["transport"] == "websocket", result
    # each session (its polls and its upgrade) kept on the instance its address hashes to
    assert {result["client"]: result["instance"] for result in results} == owners


@pytest_twisted.ensureDeferred
async def test_a_long_poll_is_held_for_the_routes_request_timeout():
    """
    A poll is held up to the server's pingInterval: under a route's
    request_timeout longer than that it is never cut, though the gateway's
    own request_timeout is shorter (scaled down: 2 s polls, 1 s gateway-wide).
    """
    process, port = socketio_server("slow", ping_interval_ms=2000)
    gw = await start_gateway(config([port], "request_timeout = 5", "request_timeout = 1"))
    try:
        results = await run_clients(gw.number, 2, hold_ms=5000, polling_only=True)
    finally:
        await stop_gateway(gw)
        stop(process)
    for result in results:
        assert result["errors"] == [] and result["disconnects"] == [], result
        assert result["ack_ok"] and result["transport"] == "polling", result


@pytest_twisted.ensureDeferred
async def test_upgrades_engineio_drops_leave_the_route_serving(two_instances):
    """
    engine.io drops an upgrade to ``/socket.io?EIO=4&transport=websocket``
    (no trailing slash): any client can send six, and the route still serves
    everyone after (passive health never ejects the route's last healthy instance).
    """
    gw = await start_gateway(config(two_instances))
    try:
        for n in range(6):
            client = await raw_connect(gw.number)
            client.transport.write(
                b"GET /socket.io?EIO=4&transport=websocket HTTP/1.1\r\nHost: chat.example.com\r\n"
                b"Upgrade: websocket\r\nConnection: Upgrade\r\nX-Forwarded-For: 203.0.113.%d\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n" % n
            )
            answer = await client.lost
            assert not answer.startswith(b"HTTP/1.1 101"), answer
        pool = gw.gateway.pools["socketio"]
        # the drops were held against the instances, yet one stays in service
        assert sum(instance.failures for instance in pool.instances) == 6
        assert any(instance.state == "up" for instance in pool.instances)
        results = await run_clients(gw.number, 4)
    finally:
        await stop_gateway(gw)
    for result in results:
        assert result["errors"] == [] and result["ack_ok"], result
