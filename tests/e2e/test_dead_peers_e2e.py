"""
Peers that vanish without a word, with WebSocket pings off: a real ``twistd
wsgateway``, ``websockets`` peers in subprocesses, and for a peer whose traffic
is dropped, a network namespace of the test's own joined to the host by a veth
pair whose far end is taken down (a phone out of coverage: no FIN, no RST).

Every process and the namespace are removed in a ``finally``; timeouts only
stop a hung process from hanging the run.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.test_front_door_e2e import _metric
from tests.e2e.test_operations_e2e import UPSTREAM_SCRIPT
from tests.processes import Process, twistd_gateway
from tests.support import settle_blocking


LISTENING = re.compile(r"\bwsgateway listening on \S+ \(port (\d+)\)")

#: One WebSocket to argv[1], proven by an echo; then the close it got.
CLIENT_SCRIPT = """
import asyncio, sys
from websockets.asyncio.client import connect

async def main(url):
    ws = await connect(url, ping_interval=None, open_timeout=30, close_timeout=5)
    await ws.send("hello")
    assert await ws.recv() == "hello"
    print("OPEN", flush=True)
    await ws.wait_closed()
    print("CLOSE", ws.close_code, ws.close_reason or "-", flush=True)

asyncio.run(main(sys.argv[1]))
"""


#: An upstream on argv[1] that sends 64 KiB messages as fast as it may; then the close it got.
FLOOD_SCRIPT = """
import asyncio, sys
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

async def flood(ws):
    try:
        while True:
            await ws.send(bytes(65536))
            await asyncio.sleep(0)  # let the close the gateway sends be read
    except ConnectionClosed:
        pass
    print("CLOSE", ws.close_code, ws.close_reason or "-", flush=True)

async def main():
    async with serve(flood, sys.argv[1], 0, ping_interval=None) as server:
        print("PORT", server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Future()

asyncio.run(main())
"""

#: A client that opens a WebSocket and then reads nothing (an app frozen in the background).
STALLED_CLIENT_SCRIPT = """
import asyncio, sys
from websockets.asyncio.client import connect

async def main(url):
    ws = await connect(url, ping_interval=None, open_timeout=30, max_queue=1, compression=None)
    print("OPEN", flush=True)
    await asyncio.Future()

asyncio.run(main(sys.argv[1]))
"""


def _python(tmp_path: Path, name: str, text: str, *args: str, netns: str | None = None) -> Process:
    path = tmp_path / name
    path.write_text(text)
    prefix = ["ip", "netns", "exec", netns] if netns else []
    return Process([*prefix, sys.executable, str(path), *args], tmp_path)


def _config(listen: str, upstream: str, keepalive: str, extra: str = "") -> str:
    return (
        f"[gateway]\nlisten = tcp:0:interface={listen}\nws_ping_interval = 0\n"
        f"tcp_keepalive = {keepalive}\n{extra}\n"
        f"[route:chat]\nprefix = /chat\nupstream = {upstream}\n"
    )


def _gateway_sockets(pid: int) -> list[str]:
    """``ss -o`` lines of the established TCP sockets of process ``pid``."""
    out = subprocess.run(
        ["ss", "-tnoHp", "state", "established"], capture_output=True, text=True, check=True
    ).stdout
    return [line for line in out.splitlines() if f"pid={pid}," in line]


class _Namespace:
    """A network namespace joined to the host by a veth pair: host end .1, far end .2."""

    def __init__(self) -> None:
        n = os.getpid() % 250 + 1
        self.name = f"wsg{os.getpid()}"
        self.host_if, self.far_if = f"{self.name}h", f"{self.name}n"
        self.host, self.far = f"10.213.{n}.1", f"10.213.{n}.2"

    def run(self, *command: str) -> None:
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise AssertionError(f"{' '.join(command)}: {done.stderr.strip()} (needs root and iproute2)")

    def create(self) -> None:
        self.run("ip", "netns", "add", self.name)
        self.run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.far_if)
        self.run("ip", "link", "set", self.far_if, "netns", self.name)
        self.run("ip", "addr", "add", f"{self.host}/30", "dev", self.host_if)
        self.run("ip", "link", "set", self.host_if, "up")
        self.run("ip", "netns", "exec", self.name, "ip", "addr", "add", f"{self.far}/30", "dev", self.far_if)
        self.run("ip", "netns", "exec", self.name, "ip", "link", "set", self.far_if, "up")
        self.run("ip", "netns", "exec", self.name, "ip", "link", "set", "lo", "up")

    def cut(self) -> None:
        """Drop everything to and from the namespace, silently."""
        self.run("ip", "netns", "exec", self.name, "ip", "link", "set", self.far_if, "down")

    def remove(self) -> None:
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


@pytest.fixture
def namespace():
    ns = _Namespace()
    try:
        ns.create()
        yield ns
    finally:
        ns.remove()


@dataclass
class _Run:
    """An upstream, a gateway in front of it and one client, each a process."""

    upstream: Process
    up_port: int
    gateway: Process
    port: int
    client: Process


@contextmanager
def _running(
    tmp_path: Path,
    *,
    upstream_host: str = "127.0.0.1",
    listen: str = "127.0.0.1",
    upstream_script: str = UPSTREAM_SCRIPT,
    client_script: str = CLIENT_SCRIPT,
    keepalive: str = "2 1 3",
    extra: str = "",
    upstream_netns: str | None = None,
    client_netns: str | None = None,
):
    """Start the three processes, the client once its WebSocket is open; stop them all after."""
    processes: list[Process] = []
    try:
        upstream = _python(tmp_path, "upstream.py", upstream_script, upstream_host, netns=upstream_netns)
        processes.append(upstream)
        up_port = int(upstream.wait_for(r"^PORT (\d+)").group(1))
        config = _config(listen, f"http://{upstream_host}:{up_port}", keepalive, extra)
        gateway = twistd_gateway(tmp_path, config)
        processes.append(gateway)
        port = int(gateway.wait_for(LISTENING).group(1))
        url = f"ws://{listen}:{port}/chat/ws"
        client = _python(tmp_path, "client.py", client_script, url, netns=client_netns)
        processes.append(client)
        client.wait_for(r"^OPEN")
        yield _Run(upstream, up_port, gateway, port, client)
    finally:
        for process in processes:
            process.stop()


def _close(process: Process) -> list[str]:
    """The code and reason of the close a peer script reports."""
    return process.wait_for(r"^CLOSE ").string.rstrip("\n").split(None, 2)[1:]


def _websockets(host: str, port: int) -> int:
    """The gateway's open WebSockets, as its ``/healthz`` says."""
    connection = http.client.HTTPConnection(host, port, timeout=30)
    try:
        connection.request("GET", "/healthz")
        return json.loads(connection.getresponse().read())["websockets"]
    finally:
        connection.close()


def test_both_legs_of_a_pair_show_a_tcp_keepalive_timer(tmp_path):
    """With pings off, the client's socket and the upstream's both carry the kernel's keepalive timer."""
    with _running(tmp_path, keepalive="30 5 3") as run:
        # (while a segment is unacknowledged ss shows the retransmit timer instead)

        def legs() -> list[str]:
            lines = _gateway_sockets(run.gateway.process.pid)
            client_leg = [line for line in lines if f"127.0.0.1:{run.port} " in line]
            upstream_leg = [line for line in lines if f"127.0.0.1:{run.up_port} " in line]
            assert len(client_leg) == 1 and len(upstream_leg) == 1, lines
            return [*client_leg, *upstream_leg]

        settle_blocking(lambda: all("timer:(keepalive," in line for line in legs()), "a keepalive timer on both legs")


def test_a_client_whose_traffic_is_dropped_ends_its_pair_with_1011_to_the_upstream(tmp_path, namespace):
    """
    A client that vanishes without a FIN, pings off: TCP keepalive (2 1 3) finds
    it, the upstream gets 1011 "peer unresponsive" and the gateway holds nothing.
    """
    with _running(tmp_path, listen=namespace.host, client_netns=namespace.name) as run:
        namespace.cut()
        assert _close(run.upstream) == ["1011", "peer unresponsive"]
        settle_blocking(lambda: _websockets(namespace.host, run.port) == 0, "no WebSocket left open")


def test_an_upstream_whose_traffic_is_dropped_closes_the_client_with_1011_and_counts_against_it(
    tmp_path, namespace
):
    """
    An upstream host that vanishes, pings off: TCP keepalive finds it, the
    client gets 1011 and passive health counts a keepalive_timeout failure.
    """
    with _running(tmp_path, upstream_host=namespace.far, upstream_netns=namespace.name) as run:
        namespace.cut()
        assert _close(run.client) == ["1011", "peer unresponsive"]
        settle_blocking(lambda: _websockets("127.0.0.1", run.port) == 0, "no WebSocket left open")
        sample = (
            'wsgateway_upstream_failures_total{reason="keepalive_timeout",route="chat",'
            f'upstream="http://{namespace.far}:{run.up_port}"}}'
        )
        assert _metric(run.port, sample) == 1


def test_with_pings_off_a_client_that_stops_reading_is_let_go_after_ws_send_timeout(tmp_path):
    """
    An upstream floods a client that reads nothing, pings off: once nothing
    moved for ws_send_timeout, the upstream gets 1001 "client stopped reading",
    the close is counted as send_timeout and the gateway holds nothing.
    """
    with _running(
        tmp_path,
        upstream_script=FLOOD_SCRIPT,
        client_script=STALLED_CLIENT_SCRIPT,
        keepalive="off",
        extra="ws_send_timeout = 1\n",
    ) as run:
        assert _close(run.upstream) == ["1001", "client stopped reading"]
        # pings off and tcp_keepalive = off: started, with a warning
        assert "ws_ping_interval: 0 with tcp_keepalive = off" in run.gateway.text()
        settle_blocking(lambda: _websockets("127.0.0.1", run.port) == 0, "no WebSocket left open")
        sample = 'wsgateway_ws_closes_total{code="1008",reason="send_timeout",route="chat",side="gateway"}'
        assert _metric(run.port, sample) == 1
