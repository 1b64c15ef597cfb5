"""
Upstream pools against real upstream processes: round robin, least connections
with long-lived WebSockets, hash stickiness by room (and how few rooms move when
an instance is added), an instance killed mid-test, active health checks.

Each upstream instance is served by a small aiohttp program run with
``sys.executable`` on its own loopback port (it binds port 0 and prints the
port it got); one process serves one instance where a test kills it, and
several otherwise. An instance names itself: any HTTP GET answers its name, a
WebSocket sends its name as the first message then echoes ``NAME:text``.
``/health`` answers 200, or 500 (to HTTP and to WebSocket upgrades alike) while
the instance's ``failing`` flag file exists; while its ``dropping`` flag exists
it closes other requests unanswered. The tests that change no instance share
four, started once. The gateway runs in this process with an
:class:`HTTPForwarder`; clients are treq and Autobahn. Every process is killed
in fixture teardown.
"""

from __future__ import annotations

import json
import selectors
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from autobahn.websocket.protocol import WebSocketProtocol
from prometheus_client.parser import text_string_to_metric_families
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.logger import capturedLogs
from twisted.web.client import Agent, HTTPConnectionPool

from tests.support import Gateway, http_error, raw_connect, settle, start_gateway, ws_connect
from twisted_gateway.config import parse_config

#: Only against a hung process or a condition never reached; not a speed expectation.
GUARD = 15.0

UPSTREAM_PROGRAM = r'''
"""
Upstream instances for the pool tests: every answer carries the instance's name.
Usage: upstream.py STATE_DIR NAME:PORT... (PORT 0: any): one instance on its
own port per NAME, the ports printed once all listen. STATE_DIR/NAME.failing
makes NAME's /health answer 500, STATE_DIR/NAME.dropping makes it close every
request but /health unanswered.
"""
import asyncio
import functools
import os
import sys

from aiohttp import WSMsgType, web

STATE = sys.argv[1]


async def handle(name, request):
    if request.path == "/health" and os.path.exists(os.path.join(STATE, name + ".failing")):
        return web.Response(status=500, text="failing")
    if request.path != "/health" and os.path.exists(os.path.join(STATE, name + ".dropping")):
        request.transport.abort()
        return web.Response()
    if request.headers.get("Upgrade", "").lower() == "websocket":
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str(name)
        async for message in ws:
            if message.type == WSMsgType.TEXT:
                await ws.send_str(name + ":" + message.data)
        return ws
    if request.path == "/health":
        return web.Response(text="ok")
    return web.Response(text=name)


async def main():
    ports = []
    for instance in sys.argv[2:]:
        name, port = instance.split(":")
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", functools.partial(handle, name))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", int(port)).start()
        ports.append(str(runner.addresses[0][1]))
    print("listening", *ports, flush=True)
    await asyncio.Event().wait()


asyncio.run(main())
'''


# -- upstream processes ---------------------------------------------------------------


class Upstream:
    """One named instance, on its own port, of an :class:`UpstreamProcess`."""

    def __init__(self, name: str, process: UpstreamProcess) -> None:
        self.name = name
        self.process = process
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _set_flag(self, flag: str, on: bool) -> None:
        path = self.process.workdir / f"{self.name}.{flag}"
        if on:
            path.touch()
        else:
            path.unlink()

    def fail_health_checks(self, failing: bool) -> None:
        self._set_flag("failing", failing)

    def drop_requests(self, dropping: bool) -> None:
        """Close every request (but ``/health``) unanswered, as a wedged application does."""
        self._set_flag("dropping", dropping)

    def kill(self) -> None:
        """SIGKILL its process, as a crash (the instance must be the process's only one)."""
        assert self.process.instances == [self], "killing one instance would kill its neighbours"
        self.process.kill()

    def restart(self) -> None:
        """A killed instance comes back on the same port."""
        self.process.kill()
        self.process.start()


class UpstreamProcess:
    """The upstream program running as a child process, serving one :class:`Upstream` per name."""

    def __init__(self, names: list[str], program: Path, workdir: Path) -> None:
        self.name = " ".join(names)
        self.instances = [Upstream(name, self) for name in names]
        self.workdir = workdir
        self._program = program
        self._stderr = open(workdir / f"{names[0]}.stderr", "ab")
        self.process = self._launch()

    def _launch(self) -> subprocess.Popen:
        return subprocess.Popen(
            [
                sys.executable,
                str(self._program),
                str(self.workdir),
                *(f"{u.name}:{u.port}" for u in self.instances),
            ],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )

    def wait_listening(self) -> None:
        """Block until the child prints its instances' ports (the reactor is not needed meanwhile)."""
        assert self.process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            if not selector.select(GUARD):
                raise AssertionError(f"upstream {self.name} did not start: {self.errors()}")
        line = self.process.stdout.readline()
        if not line.startswith("listening "):
            raise AssertionError(f"upstream {self.name} failed: {line!r} {self.errors()}")
        for upstream, port in zip(self.instances, line.split()[1:], strict=True):
            upstream.port = int(port)

    def start(self) -> None:
        self.process = self._launch()
        self.wait_listening()

    def errors(self) -> str:
        self._stderr.flush()
        return Path(self._stderr.name).read_text(errors="replace")[-2000:]

    def kill(self) -> None:
        """SIGKILL, as a crash: no close frames, no FIN-then-drain, the ports are gone."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(GUARD)
        if self.process.stdout is not None:
            self.process.stdout.close()

    def close(self) -> None:
        self.kill()
        self._stderr.close()


class Upstreams:
    """Starts upstream processes in ``workdir``, named in turn from ``upstream-a``; closes them all."""

    def __init__(self, workdir: Path) -> None:
        self._program = workdir / "upstream.py"
        self._program.write_text(UPSTREAM_PROGRAM)
        self._workdir = workdir
        self._running: list[UpstreamProcess] = []
        self._named = 0

    def start(self, count: int, one_process: bool = False) -> list[Upstream]:
        """``count`` instances, in one process or (to kill one) one process each, started in parallel."""
        names = [f"upstream-{chr(ord('a') + self._named + i)}" for i in range(count)]
        self._named += count
        groups = [names] if one_process else [[name] for name in names]
        started = [UpstreamProcess(group, self._program, self._workdir) for group in groups]
        self._running.extend(started)
        for process in started:
            process.wait_listening()
        return [upstream for process in started for upstream in process.instances]

    def close(self) -> None:
        for process in self._running:
            process.close()


@pytest.fixture
def spawn(tmp_path: Path):
    """
    ``spawn(n)`` starts n named instances, each in its own process (so that one
    can be killed), ``spawn(n, one_process=True)`` in one; all die at teardown.
    """
    upstreams = Upstreams(tmp_path)
    try:
        yield upstreams.start
    finally:
        upstreams.close()


@pytest.fixture(scope="module")
def four(tmp_path_factory: pytest.TempPathFactory):
    """
    Four instances in one process, shared by the tests that leave them as they
    found them (no flag set, nothing killed); their pools are the first three.
    """
    upstreams = Upstreams(tmp_path_factory.mktemp("four"))
    try:
        yield upstreams.start(4, one_process=True)
    finally:
        upstreams.close()


# -- the gateway and its clients ------------------------------------------------------


def pool_config(upstreams: list[Upstream], **route_keys: Any) -> str:
    """A gateway with one route, ``/v1/chat``, over the given instances."""
    keys = "\n".join(f"{key} = {value}" for key, value in route_keys.items())
    return f"""
[gateway]
ws_open_timeout = 5
connect_timeout = 2

[route:chat]
prefix = /v1/chat
upstream = {" ".join(u.url for u in upstreams)}
{keys}
"""


class Harness:
    """Gateways with HTTP forwarders, a treq client and the WebSocket clients opened."""

    def __init__(self) -> None:
        self._pool = HTTPConnectionPool(reactor, persistent=False)
        self.http = HTTPClient(Agent(reactor, pool=self._pool))
        self._gateways: list[Gateway] = []
        self._clients: list[Any] = []

    async def gateway(self, config: str) -> Gateway:
        gw = await start_gateway(config)
        self._gateways.append(gw)
        return gw

    async def request(
        self, gw: Gateway, path: str, method: str = "GET", data: bytes | None = None
    ) -> tuple[int, str]:
        """Status and body text of one request through the gateway."""
        response = await self.http.request(method, gw.url(path, "http"), data=data)
        return response.code, (await response.text()).strip()

    async def who(self, gw: Gateway, path: str = "/v1/chat/who") -> str:
        """The name of the instance that served a GET; fails on any error status."""
        code, body = await self.request(gw, path)
        assert code == 200, (code, body)
        return body

    async def upstream_up(self, gw: Gateway) -> dict[str, bool]:
        """Whether ``/metrics`` reports each instance of the route up."""
        code, body = await self.request(gw, "/metrics")
        assert code == 200, (code, body)
        return {
            sample.labels["upstream"]: sample.value == 1
            for family in text_string_to_metric_families(body + "\n")
            for sample in family.samples
            if sample.name == "wsgateway_upstream_up"
        }

    async def websocket(self, gw: Gateway, path: str = "/v1/chat/ws") -> tuple[Any, str]:
        """An open WebSocket through the gateway and the name of its instance."""
        client = await ws_connect(gw.url(path))
        self._clients.append(client)
        payload, _ = await client.next_message()
        return client, payload.decode()

    async def attempt(self, gw: Gateway, kind: str) -> str | None:
        """One WebSocket handshake (closed at once) or GET: the instance's name, None on an error."""
        if kind == "websocket":
            try:
                client, name = await self.websocket(gw)
            except ConnectionError:
                return None
            await self.close_websocket(client)
            return name
        code, body = await self.request(gw, "/v1/chat/who")
        return body if code == 200 else None

    async def close_websocket(self, client: Any) -> None:
        client.sendClose(1000)
        await client.closed

    async def close(self) -> None:
        for client in self._clients:
            if client.state != WebSocketProtocol.STATE_CLOSED:
                client.dropConnection(abort=True)
        for gw in self._gateways:
            registry = gw.registry
            await settle(lambda: len(registry) == 0 and not registry.handshakes)
        for gw in self._gateways:
            await gw.gateway.stopService()  # closes its forwarder too
            await gw.close()
        await self._pool.closeCachedConnections()


@pytest_twisted.async_yield_fixture
async def harness():
    h = Harness()
    try:
        yield h
    finally:
        await h.close()


def names(upstreams: list[Upstream]) -> set[str]:
    return {u.name for u in upstreams}


# -- round robin ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_http_requests_are_spread_evenly_over_three_instances(four, harness):
    """An HTTP route balances round robin by default: 30 GETs are 10 per instance."""
    upstreams = four[:3]
    gw = await harness.gateway(pool_config(upstreams, websocket="false"))

    served = Counter([await harness.who(gw) for _ in range(30)])

    assert served == {u.name: 10 for u in upstreams}


@pytest_twisted.ensureDeferred
async def test_round_robin_takes_the_instances_in_turn(four, harness):
    """Each instance gets its next request only after the other two got theirs."""
    upstreams = four[:3]
    gw = await harness.gateway(pool_config(upstreams, balance="round_robin"))

    served = [await harness.who(gw) for _ in range(9)]

    assert set(served[:3]) == names(upstreams)
    assert served == served[:3] * 3


# -- least connections ------------------------------------------------------------------


async def _one_instance_emptied(
    harness: Harness, gw: Gateway, upstreams: list[Upstream]
) -> tuple[list[tuple[Any, str]], str]:
    """Six WebSockets, two per instance, then one instance's two closed: the six and that instance."""
    opened = [await harness.websocket(gw) for _ in range(6)]
    assert Counter(name for _, name in opened) == {u.name: 2 for u in upstreams}
    emptied = opened[0][1]
    for client, name in opened:
        if name == emptied:
            await harness.close_websocket(client)
    await settle(lambda: len(gw.registry) == 4)
    return opened, emptied


@pytest_twisted.ensureDeferred
async def test_long_lived_websockets_go_to_the_least_loaded_instance(four, harness):
    """
    A WebSocket route balances by open connections by default: six WebSockets
    are two per instance; when one instance's two close, the next two go there.
    """
    upstreams = four[:3]
    gw = await harness.gateway(pool_config(upstreams))
    opened, emptied = await _one_instance_emptied(harness, gw, upstreams)

    more = [await harness.websocket(gw) for _ in range(2)]
    assert [name for _, name in more] == [emptied, emptied]

    for client, name in opened + more:
        if client.state != WebSocketProtocol.STATE_CLOSED:
            await harness.close_websocket(client)


@pytest_twisted.ensureDeferred
async def test_http_requests_go_to_the_instance_with_fewest_websockets_and_leave_no_load(
    four, harness
):
    """
    On a least-connections route, GETs go to the instance holding the fewest
    WebSockets, and once answered they weigh nothing: after twelve of them the
    next two WebSockets still go to that instance.
    """
    upstreams = four[:3]
    gw = await harness.gateway(pool_config(upstreams))
    opened, idle = await _one_instance_emptied(harness, gw, upstreams)

    served = [await harness.who(gw) for _ in range(12)]
    more = [await harness.websocket(gw) for _ in range(2)]

    assert served == [idle] * 12
    assert [name for _, name in more] == [idle, idle]
    for client, _ in opened + more:
        if client.state != WebSocketProtocol.STATE_CLOSED:
            await harness.close_websocket(client)


# -- hash ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_room_sticks_to_one_instance_for_websockets_and_http(four, harness):
    """
    With ``balance = hash`` on ``query:room``, every WebSocket of a room lands
    on one instance, and a REST call for that room lands where its WebSockets are.
    """
    upstreams = four[:3]
    gw = await harness.gateway(pool_config(upstreams, balance="hash", hash_key="query:room"))
    rooms = [f"room-{i}" for i in range(12)]

    placed: dict[str, list[str]] = {room: [] for room in rooms}
    clients = []
    # Interleaved, so that no rotation or load order could fake stickiness.
    for _ in range(3):
        for room in rooms:
            client, name = await harness.websocket(gw, f"/v1/chat/ws?room={room}")
            clients.append(client)
            placed[room].append(name)
    rest = {room: await harness.who(gw, f"/v1/chat/messages?room={room}") for room in rooms}

    for room in rooms:
        assert len(set(placed[room])) == 1, (room, placed[room])
        assert rest[room] == placed[room][0], room
    assert len(set(rest.values())) > 1, "twelve rooms all hashed to one instance"
    for client in clients:
        await harness.close_websocket(client)


@pytest_twisted.ensureDeferred
async def test_adding_a_fourth_instance_moves_about_a_quarter_of_rooms_all_to_it(four, harness):
    """
    Growing a hashed pool from three instances to four moves about 1/4 of the
    rooms (200 compared), and every room that moves goes to the new instance.
    """
    *first_three, fourth = four
    keys = dict(balance="hash", hash_key="query:room")
    before = await harness.gateway(pool_config(first_three, **keys))
    after = await harness.gateway(pool_config([*first_three, fourth], **keys))
    rooms = [f"room-{i}" for i in range(200)]

    old = {room: await harness.who(before, f"/v1/chat/who?room={room}") for room in rooms}
    new = {room: await harness.who(after, f"/v1/chat/who?room={room}") for room in rooms}

    moved = [room for room in rooms if old[room] != new[room]]
    assert 0.15 <= len(moved) / len(rooms) <= 0.35, len(moved)
    assert {new[room] for room in moved} == {fourth.name}
    assert set(old.values()) == names(first_three)


@pytest_twisted.ensureDeferred
async def test_when_a_hashed_instance_dies_only_its_rooms_move(spawn, harness):
    """
    Killing one instance of a hashed pool moves its rooms to the others without
    an error, each room still on one instance for WebSockets and HTTP alike;
    rooms on the surviving instances stay where they were.
    """
    upstreams = spawn(3)
    by_name = {u.name: u for u in upstreams}
    gw = await harness.gateway(pool_config(upstreams, balance="hash", hash_key="query:room"))
    rooms = [f"room-{i}" for i in range(30)]
    before = {room: await harness.who(gw, f"/v1/chat/who?room={room}") for room in rooms}
    doomed = before[rooms[0]]

    by_name[doomed].kill()

    after: dict[str, str] = {}
    for room in rooms:
        client, name = await harness.websocket(gw, f"/v1/chat/ws?room={room}")
        await harness.close_websocket(client)
        assert await harness.who(gw, f"/v1/chat/who?room={room}") == name, room
        after[room] = name
    for room in rooms:
        if before[room] == doomed:
            assert after[room] != doomed, room
        else:
            assert after[room] == before[room], room


# -- an instance dies ------------------------------------------------------------------


@pytest.mark.parametrize("first_request", ["websocket", "get", "post"])
@pytest_twisted.ensureDeferred
async def test_killed_instance_new_connections_go_to_the_others_without_errors(
    spawn, harness, first_request
):
    """
    One of three instances is SIGKILLed with a WebSocket open on each: its
    client gets 1014, the others keep relaying. The next request, which round
    robin sends to the dead one, is a WebSocket or a GET that succeeds on
    another instance, or a POST that gets a 502 JSON (not retried: it may have
    had effects). Later handshakes and GETs all succeed on the two survivors.
    """
    upstreams = spawn(3)
    by_name = {u.name: u for u in upstreams}
    gw = await harness.gateway(pool_config(upstreams, balance="round_robin"))
    # Round robin: the three land in turn, and the next request goes where the first did.
    opened = [await harness.websocket(gw, "/v1/chat/ws") for _ in range(3)]
    assert {name for _, name in opened} == names(upstreams)
    (doomed_client, doomed), *survivors = opened

    by_name[doomed].kill()

    code, _ = await doomed_client.closed
    assert code == 1014
    if first_request == "websocket":
        client, name = await harness.websocket(gw)
        assert name != doomed
        await harness.close_websocket(client)
    elif first_request == "get":
        assert await harness.who(gw) != doomed
    else:
        status, body = await harness.request(gw, "/v1/chat/messages", "POST", b'{"text": "hi"}')
        assert status == 502
        assert json.loads(body)["error"] == "bad_gateway"
    # The failed attempt took the dead instance out (passive health), and operators see it.
    assert await harness.upstream_up(gw) == {u.url: u.name != doomed for u in upstreams}

    served = []
    for _ in range(4):
        client, name = await harness.websocket(gw)
        served.append(name)
        await harness.close_websocket(client)
        served.append(await harness.who(gw))
    assert set(served) == names(upstreams) - {doomed}

    for client, name in survivors:
        client.sendMessage(b"still there?")
        payload, _ = await client.next_message()
        assert payload.decode() == f"{name}:still there?"
        await harness.close_websocket(client)


@pytest_twisted.ensureDeferred
async def test_a_crashed_instance_that_comes_back_gets_traffic_again_after_fail_timeout(
    spawn, harness
):
    """
    A killed instance is out of the rotation (every GET still succeeds); once
    it is back on its port and ``fail_timeout`` is over, it gets its share again.
    """
    upstreams = spawn(3)
    crashed = upstreams[0]
    gw = await harness.gateway(
        pool_config(upstreams, websocket="false", max_fails=1, fail_timeout=1)
    )

    crashed.kill()
    served = Counter([await harness.who(gw) for _ in range(12)])
    assert set(served) == names(upstreams) - {crashed.name}
    assert (await harness.upstream_up(gw))[crashed.url] is False

    crashed.restart()
    await settle(lambda: _reported_up(harness, gw, crashed))
    served = Counter([await harness.who(gw) for _ in range(30)])
    assert served == {u.name: 10 for u in upstreams}


async def _reported_up(harness: Harness, gw: Gateway, upstream: Upstream) -> bool:
    return (await harness.upstream_up(gw))[upstream.url]


UPGRADE = (
    "GET /v1/chat/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
    "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    "Sec-WebSocket-Version: 13\r\n\r\n"
)


@pytest_twisted.ensureDeferred
async def test_with_every_instance_dead_clients_get_502_and_readyz_is_503(spawn, harness):
    """
    With all three instances killed, a GET (tried on each) gets 502; passive
    health takes out two of them but keeps the last one (nothing to fail
    over to), so the next GET is tried there and gets 502 ``bad_gateway``.
    Once the health checks fail too, every instance is out: GETs and
    handshakes get 502 ``no_healthy_upstream`` at once, and ``/readyz``
    answers 503.
    """
    upstreams = spawn(3)
    gw = await harness.gateway(
        pool_config(upstreams, balance="round_robin", health_check="/health", health_interval="0.5")
    )
    for upstream in upstreams:
        upstream.kill()

    code, body = await harness.request(gw, "/v1/chat/who")
    assert (code, json.loads(body)["error"]) == (502, "bad_gateway")
    assert sorted((await harness.upstream_up(gw)).values()) == [False, False, True]
    code, body = await harness.request(gw, "/v1/chat/who")
    assert (code, json.loads(body)["error"]) == (502, "bad_gateway")
    code, body = await harness.request(gw, "/readyz")
    assert (code, json.loads(body)["status"]) == (200, "ready")

    gw.gateway.startService()

    async def all_down() -> bool:
        return not any((await harness.upstream_up(gw)).values())

    await settle(all_down)
    code, body = await harness.request(gw, "/v1/chat/who")
    assert (code, json.loads(body)["error"]) == (502, "no_healthy_upstream")
    raw = await raw_connect(gw.number)
    raw.transport.write(UPGRADE.encode())
    status, error = http_error(await raw.lost)
    assert (status, error["error"]) == (502, "no_healthy_upstream")
    code, body = await harness.request(gw, "/readyz")
    assert (code, json.loads(body)["status"]) == (503, "not_ready")


@pytest.mark.parametrize("kind", ["websocket", "get"])
@pytest_twisted.ensureDeferred
async def test_an_instance_closing_requests_unanswered_is_taken_out_of_the_rotation(
    spawn, harness, kind
):
    """
    An instance that accepts connections but closes them without an answer
    (a wedged application) costs one client a 502; with ``max_fails = 1`` it
    is then out for ``fail_timeout``, as a refused connection would put it,
    and the next requests all succeed on the other two.
    """
    upstreams = spawn(3, one_process=True)
    wedged = upstreams[1]
    gw = await harness.gateway(
        pool_config(upstreams, balance="round_robin", max_fails=1, fail_timeout=30)
    )
    wedged.drop_requests(True)

    first_round = [await harness.attempt(gw, kind) for _ in range(3)]
    assert sorted(first_round, key=str) == sorted(
        [None, *names(upstreams) - {wedged.name}], key=str
    )
    later = [await harness.attempt(gw, kind) for _ in range(12)]
    assert Counter(later) == {name: 6 for name in names(upstreams) - {wedged.name}}
    assert (await harness.upstream_up(gw))[wedged.url] is False


# -- active health checks ----------------------------------------------------------------


def state_changes(events: list[dict]) -> list[tuple[str, str, str]]:
    """``(url, "up" | "down", reason)`` for each upstream state change logged."""
    return [(e["url"], e["upstream_state"], e["reason"]) for e in events if "upstream_state" in e]


@pytest.mark.parametrize("check", ["/health", "ws:/health"])
@pytest_twisted.ensureDeferred
async def test_failing_health_checks_eject_an_instance_and_passing_ones_restore_it(
    spawn, harness, check
):
    """
    With active checks every 0.5 s, an instance whose health check starts
    failing is out after two failures: no more traffic reaches it while
    ``/readyz`` stays 200; two passing checks bring it back into the rotation.
    """
    upstreams = spawn(3, one_process=True)
    sick = upstreams[1]
    healthy = names(upstreams) - {sick.name}
    gw = await harness.gateway(
        pool_config(upstreams, websocket="false", health_check=check, health_interval="0.5")
    )

    with capturedLogs() as events:
        gw.gateway.startService()
        sick.fail_health_checks(True)
        await settle(lambda: (sick.url, "down") in [c[:2] for c in state_changes(events)])

        served = Counter([await harness.who(gw) for _ in range(30)])
        assert served == {name: 15 for name in healthy}
        code, body = await harness.request(gw, "/readyz")
        assert (code, json.loads(body)["status"]) == (200, "ready")
        assert await harness.upstream_up(gw) == {u.url: u is not sick for u in upstreams}

        sick.fail_health_checks(False)
        await settle(lambda: (sick.url, "up") in [c[:2] for c in state_changes(events)])
        served = Counter([await harness.who(gw) for _ in range(30)])
        assert served == {u.name: 10 for u in upstreams}

    changes = state_changes(events)
    assert [(url, state) for url, state, _ in changes] == [(sick.url, "down"), (sick.url, "up")]
    assert changes[0][2].startswith("2 health checks failed")
    assert changes[1][2] == "2 health checks passed"


@pytest_twisted.ensureDeferred
async def test_websockets_avoid_an_instance_ejected_by_health_checks(spawn, harness):
    """An instance failing its health checks gets no new WebSockets until it passes again."""
    upstreams = spawn(3, one_process=True)
    sick = upstreams[0]
    gw = await harness.gateway(
        pool_config(upstreams, health_check="/health", health_interval="0.5")
    )

    with capturedLogs() as events:
        gw.gateway.startService()
        sick.fail_health_checks(True)
        await settle(lambda: (sick.url, "down") in [c[:2] for c in state_changes(events)])
        opened = [await harness.websocket(gw) for _ in range(4)]
        assert Counter(name for _, name in opened) == {
            name: 2 for name in names(upstreams) - {sick.name}
        }

        sick.fail_health_checks(False)
        await settle(lambda: (sick.url, "up") in [c[:2] for c in state_changes(events)])
        # Least connections: the restored instance is the emptiest.
        client, name = await harness.websocket(gw)
        assert name == sick.name

    for c, _ in [*opened, (client, name)]:
        await harness.close_websocket(c)
