"""
``[gateway] workers = 2`` as an operator runs it: a real ``twistd`` supervisor
and its worker processes, the demo chat-service behind them, raw sockets as
clients, and ``ss`` to see which worker holds which connection.
"""

from __future__ import annotations

import collections
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_operations_e2e import _gateway, _get
from tests.processes import GUARD, TWISTD, Process, free_port
from tests.support import process_alive, settle_blocking


SINGLE = re.compile(r"\bwsgateway listening on \S+ \(port (\d+)\), backlog")
SHARED = re.compile(r"\bwsgateway listening on \S+ \(port (\d+)\), shared by (\d+) workers")
STARTED = re.compile(r"\bworker (\d+) started \(pid (\d+)\)")
READY = re.compile(r"\bworker (\d+) ready \(pid (\d+)\)")


def _config(chat_port: int, workers: int, listen: str) -> str:
    """A gateway with ``workers`` on ``listen``, in front of the demo chat-service it runs."""
    return f"""
[gateway]
listen = {listen}
workers = {workers}
drain_timeout = 3

[route:chat]
prefix = /v1/chat
upstream = http://127.0.0.1:{chat_port}

[demo]
chat_service = tcp:{chat_port}:interface=127.0.0.1
"""


class _Supervised:
    """A twistd wsgateway with ``workers``, serving the demo chat-service on loopback."""

    def __init__(self, tmp_path: Path, workers: int = 2, also_listen: str = "") -> None:
        self.chat_port = free_port()
        self.config = tmp_path / "gateway.cfg"
        self.gateway = _gateway(tmp_path, _config(self.chat_port, workers, f"tcp:0:interface=127.0.0.1 {also_listen}"))
        self.process, self.log = self.gateway.process, self.gateway.out
        self.pids: dict[int, int] = {}
        if workers == 1:  # one process, until a SIGHUP makes it a supervisor
            self.port = int(self.log.wait_for(SINGLE).group(1))
            return
        port, count = self.log.wait_for(SHARED).groups()
        self.port = int(port)
        assert int(count) == workers
        while len(self.pids) < workers:
            number, pid = self.log.wait_for(READY).groups()
            self.pids[int(number)] = int(pid)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(GUARD)
            except subprocess.TimeoutExpired:
                pass
        for pid in self.pids.values():
            try:
                os.kill(pid, signal.SIGKILL)  # only if the supervisor left one behind
            except ProcessLookupError:
                pass
        self.gateway.stop()


@pytest.fixture(scope="module")
def supervised(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Supervised]:
    """
    One gateway of two workers for the tests that leave it as they found it
    (no worker killed or replaced, no config changed for good): each start is
    three processes importing the package. Those tests stand together at the
    top of the file, so that the test process that runs one (``--dist
    worksteal`` hands out runs of neighbours) most often runs them all.
    """
    gateway = _Supervised(tmp_path_factory.mktemp("supervised"))
    yield gateway
    gateway.stop()


def _open_websocket(port: int, room: str = "spread") -> socket.socket:
    """A WebSocket through the gateway to the demo chat, open (its 101 read)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=GUARD)
    sock.sendall(
        (
            f"GET /v1/chat/ws?room={room} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, f"closed before the handshake's answer: {head!r}"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def _open_websockets(port: int, count: int) -> list[socket.socket]:
    return [_open_websocket(port) for _ in range(count)]


def _holders(port: int) -> collections.Counter:
    """How many established connections on the gateway's port each process holds (``ss -p``)."""
    out = subprocess.run(
        ["ss", "-tnpH", "state", "established", f"( sport = :{port} )"],
        capture_output=True, text=True, check=True, timeout=GUARD,
    ).stdout
    return collections.Counter(int(pid) for pid in re.findall(r"pid=(\d+)", out))


def test_two_workers_share_the_port_and_the_kernel_spreads_400_websockets(supervised):
    """400 WebSockets from one client host land 35-65 % on each worker, none on the supervisor."""
    gateway = supervised
    sockets: list[socket.socket] = []
    try:
        sockets += _open_websockets(gateway.port, 400)
        held = _holders(gateway.port)
        assert gateway.process.pid not in held
        counts = [held[pid] for pid in gateway.pids.values()]
        assert sum(counts) == 400, held
        assert all(140 <= n <= 260 for n in counts), counts
    finally:
        for sock in sockets:
            sock.close()


def _scrape(port: int, connection: http.client.HTTPConnection | None = None) -> dict:
    """
    ``/metrics`` on ``connection`` (kept open), else on one of its own (the
    kernel picks the worker): counter totals by family.
    """
    from prometheus_client.parser import text_string_to_metric_families

    own = connection is None
    connection = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=GUARD)
    try:
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
    finally:
        if own:
            connection.close()
    return {
        family.name: sum(s.value for s in family.samples if not s.name.endswith("_created"))
        for family in text_string_to_metric_families(text)
        if family.type in ("counter", "histogram") or family.name in ("wsgateway_ws_open", "wsgateway_workers")
    }


def _connection_to_each(port: int, pids: set[int]) -> dict[int, http.client.HTTPConnection]:
    """
    A kept-alive connection accepted by each worker (``ss -p`` names the
    process holding it; the kernel picks), the others closed.
    """
    held: dict[int, http.client.HTTPConnection] = {}
    while set(held) != pids:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=GUARD)
        connection.connect()
        client_port = connection.sock.getsockname()[1]

        def holder() -> int | None:
            out = subprocess.run(
                ["ss", "-tnpH", "state", "established", f"( sport = :{port} and dport = :{client_port} )"],
                capture_output=True, text=True, check=True, timeout=GUARD,
            ).stdout
            found = re.search(r"pid=(\d+)", out)
            return int(found.group(1)) if found else None

        pid = settle_blocking(holder, f"a worker accepts the connection from port {client_port}")
        assert pid in pids, f"connection held by {pid}, not a worker {pids}"
        if pid in held:
            connection.close()
        else:
            held[pid] = connection
    return held


def test_metrics_healthz_and_readyz_answer_for_every_worker(supervised):
    """
    After traffic spread over two workers, every scrape (whichever worker
    answers) gives the same totals: requests and WebSockets summed.
    """
    gateway = supervised
    sockets: list[socket.socket] = []
    connections: dict[int, http.client.HTTPConnection] = {}
    try:
        for _ in range(30):
            assert _get(gateway.port, "/v1/chat/rooms")[0] == 200
        sockets += _open_websockets(gateway.port, 10)
        while not all(_holders(gateway.port)[pid] for pid in gateway.pids.values()):
            assert len(sockets) < 100, f"the kernel gave every WebSocket to one worker: {_holders(gateway.port)}"
            sockets.append(_open_websocket(gateway.port))  # ten on one worker happens about once in 500 runs
        opened = len(sockets)
        connections = _connection_to_each(gateway.port, set(gateway.pids.values()))

        def published() -> list[dict] | None:
            """
            Every worker has published what it served (each every 0.5 s, later on a
            loaded machine): a scrape answered by each worker, and they agree.
            """
            scrapes = [_scrape(gateway.port, connection) for connection in connections.values()]
            done = all(s == scrapes[0] for s in scrapes) and scrapes[0]["wsgateway_http_requests"] >= 30
            return scrapes if done and scrapes[0]["wsgateway_ws_open"] == opened else None

        scrapes = settle_blocking(published, "every worker's figures published")
        assert [_scrape(gateway.port, connection) for connection in connections.values()] == scrapes
        assert scrapes[0]["wsgateway_ws_open"] == opened
        assert scrapes[0]["wsgateway_workers"] == 2
        for connection in connections.values():
            connection.request("GET", "/healthz")
            response = connection.getresponse()
            health = json.loads(response.read())
            assert response.status == 200 and health["workers"] == 2 and health["websockets"] == opened
        assert _get(gateway.port, "/readyz") == (200, {"status": "ready"})
        http_total = scrapes[0]["wsgateway_http_requests"]
        assert http_total >= 30
    finally:
        for connection in connections.values():
            connection.close()
        for sock in sockets:
            sock.close()


@pytest.mark.parametrize("workers", [2, 1])
def test_a_bad_config_on_sighup_is_refused_with_one_line_and_the_workers_keep_serving(request, tmp_path, workers):
    gateway = request.getfixturevalue("supervised") if workers == 2 else _Supervised(tmp_path, workers)
    good = gateway.config.read_text()
    try:
        gateway.config.write_text(good.replace(f"workers = {workers}", f"workers = {workers}\nconnect_timeout = soon"))
        gateway.process.send_signal(signal.SIGHUP)
        line = gateway.log.wait_for(re.compile(r"SIGHUP refused: .*\[gateway\] connect_timeout"))
        assert "keep serving" in line.string
        assert _holders(gateway.port) is not None
        assert _get(gateway.port, "/readyz")[0] == 200
        assert STARTED.search(gateway.log.text().split(line.group(0))[1]) is None
    finally:
        gateway.config.write_text(good)
        if workers == 1:
            gateway.stop()


def test_every_text_log_line_names_the_worker_or_the_supervisor_that_wrote_it(supervised):
    """twistd's text lines (the default log) of a gateway of two workers: each says who wrote it."""
    gateway = supervised
    assert _get(gateway.port, "/v1/chat/rooms")[0] == 200
    gateway.log.wait_for(re.compile(r"GET /v1/chat/rooms 200"))
    lines = [line for line in gateway.log.text().splitlines() if re.match(r"\d{4}-\d\d-\d\dT\S+ \[", line)]
    writers = collections.Counter(
        (found.group(1) if found else line) for line in lines
        for found in [re.search(r"^\S+ \[[^\]]* (worker \d|supervisor)\] ", line)]
    )
    assert set(writers) == {"supervisor", "worker 0", "worker 1"}, writers


def test_a_killed_worker_is_replaced_and_only_its_own_clients_notice(tmp_path):
    """
    SIGKILL one worker: the supervisor logs why it died and starts another in
    its slot; the other worker's WebSockets stay open, new connections are served.
    """
    gateway = _Supervised(tmp_path)
    sockets: list[socket.socket] = []
    try:
        sockets += _open_websockets(gateway.port, 20)
        before = _holders(gateway.port)
        victim, survivor = gateway.pids[0], gateway.pids[1]
        assert before[victim] and before[survivor], before
        os.kill(victim, signal.SIGKILL)
        died = gateway.log.wait_for(re.compile(rf"worker 0 \(pid {victim}\) died after .*killed by SIGKILL"))
        assert "starting a new one" in died.string
        number, pid = gateway.log.wait_for(READY).groups()
        assert int(number) == 0 and int(pid) != victim
        gateway.pids[0] = int(pid)
        assert _holders(gateway.port)[survivor] == before[survivor]
        sockets += _open_websockets(gateway.port, 20)
        assert sum(_holders(gateway.port).values()) == before[survivor] + 20
        assert _scrape(gateway.port)["wsgateway_worker_restarts"] == 1
    finally:
        for sock in sockets:
            sock.close()
        gateway.stop()


def test_a_worker_crash_loop_stops_the_gateway_with_one_line(tmp_path):
    """A worker that cannot start (its config broke after start-up) five times in a row stops everything."""
    gateway = _Supervised(tmp_path)
    try:
        gateway.config.write_text("[gateway]\nworkers = 2\n")  # no route: every new worker exits at once
        os.kill(gateway.pids[0], signal.SIGKILL)
        line = gateway.gateway.err.wait_for(
            re.compile(r"wsgateway: worker 0 died before it was ready or within 5 s of starting 5 times in a row")
        )
        assert "stopping the gateway" in line.string
        assert gateway.process.wait(GUARD) != 0
        assert "Traceback" not in gateway.gateway.err.rest()
    finally:
        gateway.stop()


def test_sigterm_stops_the_supervisor_and_every_worker_cleanly(tmp_path):
    """SIGTERM to the supervisor: each worker drains and exits, then the supervisor exits 0."""
    gateway = _Supervised(tmp_path)
    try:
        assert gateway.gateway.terminate() == 0
        for pid in gateway.pids.values():
            settle_blocking(lambda: not process_alive(pid), f"worker {pid} gone with its supervisor")
        assert "Traceback" not in gateway.log.rest() + gateway.gateway.err.rest()
    finally:
        gateway.stop()


def _close_code(sock: socket.socket) -> int:
    """Read frames (after the 101) until the server's close frame; its code."""
    data = b""
    while True:
        while len(data) < 2 or len(data) < 2 + (data[1] & 0x7F):
            chunk = sock.recv(4096)
            assert chunk, f"closed without a close frame: {data!r}"
            data += chunk
        length = data[1] & 0x7F
        assert length < 126, "the demo chat sends small frames"
        opcode, payload, data = data[0] & 0x0F, data[2 : 2 + length], data[2 + length :]
        if opcode == 8:
            return int.from_bytes(payload[:2], "big")


def _wait_while_output_flows(log, text: str) -> None:
    """``log.wait_for`` with a guard that a steady load's access lines cannot keep extending."""
    deadline = time.monotonic() + GUARD
    while True:
        line = log.next()
        assert line is not None, f"output ended before {text!r}:\n{log.text()[-20000:]}"
        if text in line:
            return
        assert time.monotonic() < deadline, f"no {text!r} within {GUARD} s:\n{log.text()[-20000:]}"


#: Seconds between one handshake-and-request of :class:`_Load` and the next: a steady ~50 of each a second,
#: one connection in flight at a time. Without a pause the load ran as fast as the machine let it, took most
#: of the test's CPU and slowed down the start of the new workers the restart waits for.
LOAD_PAUSE = 0.01


class _Load(threading.Thread):
    """New WebSocket handshakes and HTTP requests in turn, a pause between rounds, until stopped; outcomes counted."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.outcomes: collections.Counter = collections.Counter()
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(LOAD_PAUSE):
            try:
                _open_websocket(self.port, "load").close()
                self.outcomes["handshake ok"] += 1
            except (OSError, AssertionError) as e:
                self.outcomes[f"handshake {type(e).__name__}"] += 1
            try:
                status = _get(self.port, "/v1/chat/rooms")[0]
                self.outcomes["http ok" if status < 500 else f"http {status}"] += 1
            except (OSError, ValueError) as e:
                self.outcomes[f"http {type(e).__name__}"] += 1

    def wait_for_more(self, count: int, what: str) -> None:
        """Until ``count`` more handshakes and HTTP requests have succeeded."""
        start = self.outcomes.copy()
        settle_blocking(
            lambda: all(self.outcomes[k] >= start[k] + count for k in ("handshake ok", "http ok")), what
        )

    def stop(self) -> collections.Counter:
        self.stopping.set()
        self.join(GUARD)
        return self.outcomes


@pytest.mark.parametrize("workers", [2, 1])
def test_sighup_replaces_every_worker_under_load_without_a_failure_and_1012_on_old_websockets(tmp_path, workers):
    """
    SIGHUP under a steady load of new handshakes and HTTP requests: new
    workers come up before the old ones drain; no connection is refused or
    reset, no 5xx; WebSockets on the old workers get 1012 "service restart".
    With workers = 1 the single process starts the new one on its sockets and
    drains itself; it keeps its pid (now a supervisor) and holds no connection.
    """
    gateway = _Supervised(tmp_path, workers)
    sockets: list[socket.socket] = []
    load = _Load(gateway.port)
    try:
        sockets += _open_websockets(gateway.port, 20)
        load.start()
        load.wait_for_more(6, "the load flowing")
        old = set(gateway.pids.values()) or {gateway.process.pid}
        gateway.process.send_signal(signal.SIGHUP)
        _wait_while_output_flows(gateway.log, f"rolling restart done: {workers} new workers")
        load.wait_for_more(6, "the load served by the new workers")
        outcomes = load.stop()
        assert set(outcomes) == {"handshake ok", "http ok"}, outcomes
        assert outcomes["handshake ok"] > 10 and outcomes["http ok"] > 10, outcomes
        assert [_close_code(sock) for sock in sockets] == [1012] * 20
        sockets.append(_open_websocket(gateway.port))
        held = _holders(gateway.port)
        assert held and not old & set(held), (old, held)
        assert gateway.process.poll() is None
        assert _get(gateway.port, "/readyz")[0] == 200
        assert _get(gateway.port, "/healthz")[1]["workers"] == workers
    finally:
        load.stop()
        for sock in sockets:
            sock.close()
        gateway.stop()


def _unix_get(path: Path, target: str = "/v1/chat/rooms") -> int:
    """One GET over the gateway's unix: listener; the answer's status."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(GUARD)
        sock.connect(str(path))
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return int(answer.split(b" ", 2)[1])


@pytest.mark.parametrize("workers", [2, 1])
def test_a_unix_listener_keeps_its_file_across_a_sighup_and_loses_it_at_the_stop(tmp_path, workers):
    """
    A rolling restart (``workers = 2``) or a handover (``workers = 1``) keeps a
    ``unix:`` listener's socket file: the processes it replaced drained
    without removing it, and the new ones answer on it. SIGTERM removes it.
    """
    path = tmp_path / "gateway.sock"
    gateway = _Supervised(tmp_path, workers, also_listen=f"unix:{path}")
    try:
        settle_blocking(path.exists, "the unix: listener bound")
        assert _unix_get(path) == 200
        gateway.process.send_signal(signal.SIGHUP)
        gateway.log.wait_for(re.compile(f"rolling restart done: {workers} new workers"))
        assert path.exists()
        assert _unix_get(path) == 200
        gateway.process.send_signal(signal.SIGTERM)
        assert gateway.process.wait(GUARD) == 0
        assert not path.exists()
    finally:
        gateway.stop()


def test_a_new_process_that_dies_before_it_is_ready_leaves_the_single_gateway_serving(tmp_path):
    """
    ``workers = 1``: the process a SIGHUP starts cannot listen (the new config
    adds a port already taken) and dies; the old one never drained, keeps
    serving and keeps its WebSockets, and the next SIGHUP, with the config
    mended, hands over as usual.
    """
    gateway = _Supervised(tmp_path, 1)
    sockets: list[socket.socket] = []
    try:
        sockets += _open_websockets(gateway.port, 3)
        good = gateway.config.read_text()
        taken = f"tcp:{gateway.chat_port}:interface=127.0.0.1"
        gateway.config.write_text(good.replace("listen = tcp:0:interface=127.0.0.1 ", f"listen = tcp:0:interface=127.0.0.1 {taken}"))
        gateway.process.send_signal(signal.SIGHUP)
        gateway.log.wait_for(re.compile(r"new worker 0 \(pid \d+\) exited with status 1 before it was ready"))
        gateway.log.wait_for(re.compile(r"rolling restart stopped: the new worker 0 did not become ready"))
        assert _get(gateway.port, "/v1/chat/rooms")[0] == 200
        assert _holders(gateway.port)[gateway.process.pid] == 3
        gateway.config.write_text(good)
        gateway.process.send_signal(signal.SIGHUP)
        _wait_while_output_flows(gateway.log, "rolling restart done: 1 new workers")
        assert [_close_code(sock) for sock in sockets] == [1012] * 3
    finally:
        for sock in sockets:
            sock.close()
        gateway.stop()


@pytest.mark.parametrize("workers", [2, 1])
def test_socket_activation_serves_with_workers_and_after_a_sighup(tmp_path, workers):
    """
    ``listen = systemd:`` as deploy/ runs it (the socket on fd 3, ``LISTEN_FDS``,
    ``LISTEN_PID``, as systemd hands it over): with ``workers = 2`` the
    supervisor shares it with its workers (it used to find no socket, Twisted
    having read and removed ``LISTEN_FDS`` at import), with ``workers = 1`` the
    process serves it; after a SIGHUP the new processes serve it.
    """
    from tests.test_deploy_files import ACTIVATE

    config = tmp_path / "gateway.cfg"
    config.write_text(_config(free_port(), workers, "systemd:domain=INET:index=0"))
    gateway = Process(
        [sys.executable, "-c", ACTIVATE, str(TWISTD), "-n", "--pidfile=", "wsgateway", "--config", str(config)],
        tmp_path,
    )
    try:
        port = int(gateway.wait_for(SHARED if workers > 1 else SINGLE).group(1))
        for _ in range(workers if workers > 1 else 0):
            gateway.wait_for(READY)
        assert _get(port, "/v1/chat/rooms")[0] == 200
        gateway.process.send_signal(signal.SIGHUP)
        gateway.wait_for(f"rolling restart done: {workers} new workers")
        assert _get(port, "/v1/chat/rooms")[0] == 200
        gateway.process.send_signal(signal.SIGTERM)
        assert gateway.process.wait(GUARD) == 0
        assert "Traceback" not in gateway.text()
    finally:
        gateway.stop()
