"""
The front door of a real ``twistd wsgateway`` under exhaustion: the open-files
limit a service manager gives it, a hard limit too small for its clients,
trickling clients, and the listen backlog.

The upstream and the WebSocket clients are ``websockets`` scripts in
subprocesses; a gateway's limits are set with ``setrlimit`` in its
``preexec_fn``, as systemd's ``LimitNOFILE=`` or ``ulimit`` would. Every
process is killed in a ``finally``; timeouts only stop a hung process from
hanging the run.
"""

from __future__ import annotations

import http.client
import json
import re
import select
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from tests.processes import GUARD, TWISTD, child_env, python_script, twistd_gateway

LISTENING = re.compile(r"\bwsgateway listening on (\S+) \(port (\d+)\), backlog (\d+)")
ROLE_LISTENING = re.compile(r"\b(wsgateway|admin) listening on \S+ \(port (\d+)\)")

#: An echo upstream that prints its port (and raises its own open-files limit).
UPSTREAM_SCRIPT = """
import asyncio, resource
from websockets.asyncio.server import serve

soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

async def echo(ws):
    async for message in ws:
        await ws.send(message)

async def main():
    async with serve(echo, "127.0.0.1", 0, ping_interval=None, backlog=4096) as server:
        print("PORT", server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Future()

asyncio.run(main())
"""

#: WebSocket clients driven by commands on stdin; one JSON line per command.
#: ``open N BATCH``: N handshakes, BATCH at a time, each proven by one echo;
#: ``echo``: every held WebSocket echoes once more; ``close N``: close N held.
CLIENTS_SCRIPT = """
import asyncio, collections, json, resource, sys
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
url = sys.argv[1]
held = []

async def one(i):
    try:
        ws = await connect(url, ping_interval=None, open_timeout=60, close_timeout=5)
    except InvalidStatus as e:
        try:
            error = json.loads(e.response.body).get("error")
        except Exception:
            error = None
        return f"{e.response.status_code} {error}"
    except Exception as e:
        return type(e).__name__
    await ws.send(f"hello {i}")
    if await ws.recv() != f"hello {i}":
        return "wrong echo"
    held.append(ws)
    return "open"

async def echo_all():
    async def once(ws):
        await ws.send("again")
        return await ws.recv() == "again"
    return sum(await asyncio.gather(*(once(ws) for ws in held)))

async def main():
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        command, *args = line.decode().split()
        if command == "open":
            count, batch = int(args[0]), int(args[1])
            outcomes = collections.Counter()
            for start in range(0, count, batch):
                outcomes.update(await asyncio.gather(*(one(start + i) for i in range(min(batch, count - start)))))
            print(json.dumps({"outcomes": outcomes, "held": len(held)}), flush=True)
        elif command == "echo":
            print(json.dumps({"echoed": await echo_all(), "held": len(held)}), flush=True)
        elif command == "close":
            closing, held[:] = held[: int(args[0])], held[int(args[0]) :]
            await asyncio.gather(*(ws.close() for ws in closing))
            print(json.dumps({"held": len(held)}), flush=True)

asyncio.run(main())
"""


def _config(upstream_port: int, gateway: str = "", admin: bool = False) -> str:
    text = f"[gateway]\nlisten = tcp:0:interface=127.0.0.1\n{gateway}\n"
    if admin:
        text += "[admin]\nlisten = tcp:0:interface=127.0.0.1\n\n"
    return text + f"[route:chat]\nprefix = /chat\nupstream = http://127.0.0.1:{upstream_port}\n"


def _get(port: int, path: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=GUARD)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _metric(admin_port: int, sample: str) -> float:
    status, body = _get(admin_port, "/metrics")
    assert status == 200
    for line in body.decode().splitlines():
        if line.startswith(sample):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {sample} in /metrics")


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """One echo upstream for the file's gateways: it keeps nothing from one test to the next."""
    process = python_script(tmp_path_factory.mktemp("upstream"), "upstream.py", UPSTREAM_SCRIPT)
    try:
        process.port = int(process.wait_for(r"^PORT (\d+)").group(1))
        yield process
    finally:
        process.stop()


def test_a_gateway_started_with_soft_limit_1024_raises_it_and_holds_1500_websockets(tmp_path, upstream):
    """systemd's default (soft 1024, hard 20000) no longer stops the gateway at about 450 chats."""
    gateway = twistd_gateway(tmp_path, _config(upstream.port), open_files=(1024, 20000))
    clients = None
    try:
        limits = gateway.wait_for(r"open files limit (\d+): room for about (\d+) WebSockets")
        assert int(limits.group(1)) == 20000
        assert int(limits.group(2)) > 1500
        port = int(gateway.wait_for(LISTENING).group(2))
        clients = python_script(tmp_path, "clients.py", CLIENTS_SCRIPT, f"ws://127.0.0.1:{port}/chat/ws")
        opened = clients.command("open 1500 250")
        assert opened == {"outcomes": {"open": 1500}, "held": 1500}
        assert clients.command("echo") == {"echoed": 1500, "held": 1500}
        assert "too many open files" not in gateway.text().lower()
    finally:
        if clients is not None:
            clients.stop()
        gateway.stop()


def test_max_open_files_sets_the_limit_the_gateway_raises_to(tmp_path, upstream):
    """``[gateway] max_open_files`` below the hard limit is what the gateway takes."""
    gateway = twistd_gateway(tmp_path, _config(upstream.port, "max_open_files = 5000\n"), open_files=(1024, 20000))
    try:
        limits = gateway.wait_for(r"open files limit (\d+): room for about (\d+) WebSockets")
        assert int(limits.group(1)) == 5000
        gateway.wait_for(LISTENING)
        assert "is below 4096" not in gateway.text()
    finally:
        gateway.stop()


def test_past_its_cap_a_gateway_answers_503_keeps_its_clients_and_upstream_and_recovers(tmp_path, upstream):
    """
    With a hard limit of 300 descriptors, the clients over the automatic cap
    get 503 ``overloaded`` at once, the open ones keep working, the upstream
    stays in service, and new clients are served again once sockets close.
    """
    gateway = twistd_gateway(tmp_path, _config(upstream.port, admin=True), open_files=(300, 300))
    clients = None
    try:
        cap = int(gateway.wait_for(r"max_client_connections (\d+)").group(1))
        assert 0 < cap < 150
        ports = {}
        while len(ports) < 2:
            role, number = gateway.wait_for(ROLE_LISTENING).groups()
            ports[role] = int(number)
        port, admin = ports["wsgateway"], ports["admin"]
        clients = python_script(tmp_path, "clients.py", CLIENTS_SCRIPT, f"ws://127.0.0.1:{port}/chat/ws")
        assert clients.command(f"open {cap} 50") == {"outcomes": {"open": cap}, "held": cap}
        # One at a time: each refusal is answered and gone before the next.
        over = clients.command("open 40 1")
        assert over == {"outcomes": {"503 overloaded": 40}, "held": cap}
        assert clients.command("echo") == {"echoed": cap, "held": cap}
        assert _metric(admin, "wsgateway_connections_refused_total") == 40
        # A storm of 300 at once: some answered 503, the rest closed on accept; none served.
        storm = clients.command("open 300 300")
        assert storm["held"] == cap and "open" not in storm["outcomes"]
        assert storm["outcomes"].get("503 overloaded", 0) > 0
        assert clients.command("echo") == {"echoed": cap, "held": cap}
        assert _metric(admin, "wsgateway_connections_refused_total") == 340
        assert _metric(admin, 'wsgateway_upstream_up{route="chat"') == 1
        assert clients.command("close 10") == {"held": cap - 10}
        assert clients.command("open 10 10") == {"outcomes": {"open": 10}, "held": cap}
        assert clients.command("echo") == {"echoed": cap, "held": cap}
        log = gateway.text()
        assert "too many open files" not in log.lower() and "EMFILE" not in log
        assert "is down" not in log
        assert log.count("refusing client connections") < 40  # at most once a second, with a count
    finally:
        if clients is not None:
            clients.stop()
        gateway.stop()


def _trickle(port: int, outcomes: list, index: int, start: threading.Event) -> None:
    """Send a request head one byte at a time until the gateway answers or closes."""
    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"s" * 200 + b"\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=GUARD) as sock:
        start.wait(GUARD)
        received = b""
        for byte in head:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            readable, _, _ = select.select([sock], [], [], 0.3)
            if readable:
                break
        while True:
            try:
                chunk = sock.recv(4096)
            except OSError:
                break
            if not chunk:
                break
            received += chunk
        outcomes[index] = received


def test_fifty_trickling_clients_are_cut_off_at_client_header_timeout_while_others_are_served(tmp_path, upstream):
    """A head sent one byte every 0.3 s (70 s in all) ends with 408; normal requests go on meanwhile."""
    config = _config(upstream.port, "client_header_timeout = 2\n")
    gateway = twistd_gateway(tmp_path, config)
    try:
        port = int(gateway.wait_for(LISTENING).group(2))
        outcomes: list = [None] * 50
        start = threading.Event()
        threads = [threading.Thread(target=_trickle, args=(port, outcomes, i, start)) for i in range(50)]
        for thread in threads:
            thread.start()
        start.set()
        served = 0
        while any(thread.is_alive() for thread in threads):
            status, _ = _get(port, "/healthz")
            assert status == 200
            served += 1
        for thread in threads:
            thread.join(GUARD)
        assert served > 0
        for received in outcomes:
            assert received.startswith(b"HTTP/1.1 408 ")
            assert json.loads(received.partition(b"\r\n\r\n")[2])["error"] == "header_timeout"
    finally:
        gateway.stop()


def test_a_stalled_body_gets_408_and_an_idle_keep_alive_connection_is_closed(tmp_path, upstream):
    """client_body_timeout and keepalive_timeout, with short values, on a real gateway."""
    config = _config(upstream.port, "client_body_timeout = 1\nkeepalive_timeout = 1\n")
    gateway = twistd_gateway(tmp_path, config)
    try:
        port = int(gateway.wait_for(LISTENING).group(2))
        with socket.create_connection(("127.0.0.1", port), timeout=GUARD) as sock:
            sock.sendall(b"POST /chat/up HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\nonly ten!!")
            answer = _read_until_closed(sock)
        assert answer.startswith(b"HTTP/1.1 408 ")
        assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"] == "body_timeout"
        with socket.create_connection(("127.0.0.1", port), timeout=GUARD) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            answer = _read_until_closed(sock)
        assert answer.startswith(b"HTTP/1.1 200 ")
        assert answer.count(b"HTTP/1.1 ") == 1  # closed quietly, no 408 after the answer
        status, _ = _get(port, "/healthz")
        assert status == 200
        assert "is down" not in gateway.text()
    finally:
        gateway.stop()


def _read_until_closed(sock: socket.socket) -> bytes:
    received = b""
    while chunk := sock.recv(4096):
        received += chunk
    return received


def _listen_backlogs() -> dict[int, int]:
    """Listening TCP ports and their backlog (``ss -ltn``: Send-Q is a listener's backlog)."""
    out = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True, check=True).stdout
    backlogs = {}
    for line in out.splitlines():
        fields = line.split()
        backlogs[int(fields[3].rsplit(":", 1)[1])] = int(fields[2])
    return backlogs


def test_a_listener_gets_the_systems_maximum_backlog_unless_it_sets_its_own(tmp_path, upstream):
    """Not Twisted's 50: a reconnect storm is not dropped at the SYN queue."""
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    config = _config(upstream.port).replace(
        "listen = tcp:0:interface=127.0.0.1\n",
        "listen = tcp:0:interface=127.0.0.1 tcp:0:interface=127.0.0.1:backlog=77\n",
    )
    gateway = twistd_gateway(tmp_path, config)
    try:
        first = gateway.wait_for(LISTENING)
        second = gateway.wait_for(LISTENING)
        assert int(first.group(3)) == somaxconn and int(second.group(3)) == 77
        backlogs = _listen_backlogs()
        assert backlogs[int(first.group(2))] == somaxconn
        assert backlogs[int(second.group(2))] == 77
    finally:
        gateway.stop()
    check = subprocess.run(
        [str(TWISTD), "wsgateway", "--config", str(tmp_path / "gateway.cfg"), "--check"],
        capture_output=True,
        text=True,
        env=child_env(),
        cwd=tmp_path,
        timeout=GUARD,
    )
    assert check.returncode == 0
    assert f"; tcp:0:interface=127.0.0.1: listen backlog {somaxconn}\n" in check.stdout
    assert "; tcp:0:interface=127.0.0.1:backlog=77: listen backlog 77\n" in check.stdout
