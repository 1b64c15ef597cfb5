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
import time
from pathlib import Path

import pytest

from tests.e2e.test_front_door_e2e import _gateway, _metric, _Process
from tests.e2e.test_operations_e2e import UPSTREAM_SCRIPT

pytestmark = pytest.mark.no_reactor_check

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


def _python(tmp_path: Path, name: str, text: str, *args: str, netns: str | None = None) -> _Process:
    path = tmp_path / name
    path.write_text(text)
    prefix = ["ip", "netns", "exec", netns] if netns else []
    return _Process([*prefix, sys.executable, str(path), *args], tmp_path)


def _config(listen: str, upstream: str, keepalive: str) -> str:
    return (
        f"[gateway]\nlisten = tcp:0:interface={listen}\nws_ping_interval = 0\n"
        f"tcp_keepalive = {keepalive}\n\n"
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


def test_both_legs_of_a_pair_show_a_tcp_keepalive_timer(tmp_path):
    """With pings off, the client's socket and the upstream's both carry the kernel's keepalive timer."""
    processes = []
    try:
        upstream = _python(tmp_path, "upstream.py", UPSTREAM_SCRIPT, "127.0.0.1")
        processes.append(upstream)
        up_port = int(upstream.wait_for(r"^PORT (\d+)").group(1))
        gateway = _gateway(tmp_path, _config("127.0.0.1", f"http://127.0.0.1:{up_port}", "30 5 3"))
        processes.append(gateway)
        port = int(gateway.wait_for(LISTENING).group(1))
        client = _python(tmp_path, "client.py", CLIENT_SCRIPT, f"ws://127.0.0.1:{port}/chat/ws")
        processes.append(client)
        client.wait_for(r"^OPEN")

        # (while a segment is unacknowledged ss shows the retransmit timer instead)
        for _ in range(100):
            lines = _gateway_sockets(gateway.process.pid)
            client_leg = [line for line in lines if f"127.0.0.1:{port} " in line]
            upstream_leg = [line for line in lines if f"127.0.0.1:{up_port} " in line]
            assert len(client_leg) == 1 and len(upstream_leg) == 1, lines
            if all("timer:(keepalive," in line for line in (*client_leg, *upstream_leg)):
                break
            time.sleep(0.1)
        for line in (*client_leg, *upstream_leg):
            assert "timer:(keepalive," in line, line
    finally:
        for process in processes:
            process.stop()


def test_a_client_whose_traffic_is_dropped_ends_its_pair_with_1011_to_the_upstream(tmp_path, namespace):
    """
    A client that vanishes without a FIN, pings off: TCP keepalive (2 1 3) finds
    it, the upstream gets 1011 "peer unresponsive" and the gateway holds nothing.
    """
    processes = []
    try:
        upstream = _python(tmp_path, "upstream.py", UPSTREAM_SCRIPT, "127.0.0.1")
        processes.append(upstream)
        up_port = int(upstream.wait_for(r"^PORT (\d+)").group(1))
        gateway = _gateway(tmp_path, _config(namespace.host, f"http://127.0.0.1:{up_port}", "2 1 3"))
        processes.append(gateway)
        port = int(gateway.wait_for(LISTENING).group(1))
        url = f"ws://{namespace.host}:{port}/chat/ws"
        client = _python(tmp_path, "client.py", CLIENT_SCRIPT, url, netns=namespace.name)
        processes.append(client)
        client.wait_for(r"^OPEN")
        namespace.cut()

        assert upstream.wait_for(r"^CLOSE ").string.split(None, 2)[1:] == ["1011", "peer unresponsive\n"]
        assert _websockets_eventually(namespace.host, port) == 0
    finally:
        for process in processes:
            process.stop()


def test_an_upstream_whose_traffic_is_dropped_closes_the_client_with_1011_and_counts_against_it(
    tmp_path, namespace
):
    """
    An upstream host that vanishes, pings off: TCP keepalive finds it, the
    client gets 1011 and passive health counts a keepalive_timeout failure.
    """
    processes = []
    try:
        upstream = _python(tmp_path, "upstream.py", UPSTREAM_SCRIPT, namespace.far, netns=namespace.name)
        processes.append(upstream)
        up_port = int(upstream.wait_for(r"^PORT (\d+)").group(1))
        config = _config("127.0.0.1", f"http://{namespace.far}:{up_port}", "2 1 3")
        gateway = _gateway(tmp_path, config)
        processes.append(gateway)
        port = int(gateway.wait_for(LISTENING).group(1))
        client = _python(tmp_path, "client.py", CLIENT_SCRIPT, f"ws://127.0.0.1:{port}/chat/ws")
        processes.append(client)
        client.wait_for(r"^OPEN")
        namespace.cut()

        assert client.wait_for(r"^CLOSE ").string.split(None, 2)[1:] == ["1011", "peer unresponsive\n"]
        assert _websockets_eventually("127.0.0.1", port) == 0
        sample = (
            'wsgateway_upstream_failures_total{reason="keepalive_timeout",route="chat",'
            f'upstream="http://{namespace.far}:{up_port}"}}'
        )
        assert _metric(port, sample) == 1
    finally:
        for process in processes:
            process.stop()


def _websockets_eventually(host: str, port: int) -> int:
    """The gateway's open WebSockets once the closes have settled (a guard, no speed limit)."""
    for _ in range(100):
        connection = http.client.HTTPConnection(host, port, timeout=30)
        try:
            connection.request("GET", "/healthz")
            count = json.loads(connection.getresponse().read())["websockets"]
        finally:
            connection.close()
        if count == 0:
            return 0
        time.sleep(0.1)
    return count
