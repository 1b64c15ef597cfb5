"""
Operating ``twistd wsgateway`` as a real process: a SIGTERM drain with 50
WebSockets open, JSON log lines from ``--logger``, and ``--check``.

Peers are subprocesses too: a ``websockets`` upstream that prints the close
code of every connection it had, and a ``websockets`` client script holding
many connections. Every process is killed in a ``finally``; timeouts only stop
a hung process from hanging the run.
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import subprocess
import time
from pathlib import Path

import jwt
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from tests.e2e.test_twistd import refusal_line
from tests.processes import GUARD, TWISTD, Process, aiohttp_upstream, child_env, python_script, twistd_gateway

#: The drain's own bound, far above what 50 closes need.
DRAIN_TIMEOUT = 20
CONNECTIONS = 50
SECRET = "e2e-operations-secret-0123456789abcdef"
LISTENING = re.compile(r"\bwsgateway listening on \S+ \(port (\d+)\)")

#: An echo upstream (on argv[1], 127.0.0.1 by default) that prints its port,
#: then one line per connection that ended.
UPSTREAM_SCRIPT = """
import asyncio, sys
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

async def echo(ws):
    try:
        async for message in ws:
            await ws.send(message)
    except ConnectionClosed:
        pass
    await ws.wait_closed()
    print("CLOSE", ws.close_code, ws.close_reason or "-", flush=True)

async def main():
    host = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1"
    async with serve(echo, host, 0, ping_interval=None) as server:
        print("PORT", server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Future()

asyncio.run(main())
"""

#: Opens N WebSockets (each proven end to end by one echo), then reports every close.
CLIENTS_SCRIPT = """
import asyncio, sys
from websockets.asyncio.client import connect

async def one(url, i):
    ws = await connect(url, ping_interval=None, open_timeout=30)
    await ws.send(f"hello {i}")
    assert await ws.recv() == f"hello {i}"
    return ws

async def main(url, count):
    connections = await asyncio.gather(*(one(url, i) for i in range(count)))
    print("OPEN", count, flush=True)

    async def closed(i, ws):
        await ws.wait_closed()
        print("CLOSE", i, ws.close_code, ws.close_reason or "-", flush=True)

    await asyncio.gather(*(closed(i, ws) for i, ws in enumerate(connections)))
    print("DONE", flush=True)

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def _script(tmp_path: Path, name: str, text: str, *args: str) -> Process:
    return python_script(tmp_path, name, text, *args, stderr_apart=True)


def _gateway(tmp_path: Path, config: str, *twistd_args: str) -> Process:
    return twistd_gateway(tmp_path, config, *twistd_args, stderr_apart=True)


def _get(port: int, path: str) -> tuple[int, dict]:
    """A GET on a connection of its own (http.client never uses an environment proxy)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=GUARD)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def _config(upstream_port: int, extra_gateway: str = "", auth: bool = False) -> str:
    auth_section = f"[auth]\nalgorithms = HS256\nsecret = {SECRET}\n" if auth else ""
    return f"""
[gateway]
listen = tcp:0:interface=127.0.0.1
{extra_gateway}

{auth_section}
[route:chat]
prefix = /v1/chat
upstream = http://127.0.0.1:{upstream_port}
"""


# -- SIGTERM drains ---------------------------------------------------------------------


def test_sigterm_with_50_open_websockets_closes_every_leg_with_1001_and_exits_0(tmp_path):
    """
    SIGTERM drains (``drain_delay`` 0): the listener closes at once, so a
    new connection is refused (a balancer retries it elsewhere) and nothing
    is answered 503 "shutting down"; all 50 clients and all 50 upstream
    connections get a 1001 close, and the process exits with status 0 well
    before the drain timeout would have cut the drain short.
    """
    processes: list[Process] = []
    try:
        upstream = _script(tmp_path, "upstream.py", UPSTREAM_SCRIPT)
        processes.append(upstream)
        upstream_port = int(upstream.out.wait_for(r"^PORT (\d+)").group(1))

        extra = f"drain_spread = 2\ndrain_timeout = {DRAIN_TIMEOUT}"
        gateway = _gateway(tmp_path, _config(upstream_port, extra))
        processes.append(gateway)
        port = int(gateway.out.wait_for(LISTENING).group(1))
        assert _get(port, "/readyz") == (200, {"status": "ready"})

        url = f"ws://127.0.0.1:{port}/v1/chat/ws"
        clients = _script(tmp_path, "clients.py", CLIENTS_SCRIPT, url, str(CONNECTIONS))
        processes.append(clients)
        clients.out.wait_for(rf"^OPEN {CONNECTIONS}$")
        assert _get(port, "/healthz")[1]["websockets"] == CONNECTIONS

        gateway.process.send_signal(signal.SIGTERM)
        answers = []
        refused = False
        # Probe until the listener is gone (a guard, not a deadline).
        for _ in range(GUARD * 100):
            try:
                answers.append(_get(port, "/readyz"))
            except (ConnectionRefusedError, ConnectionResetError):
                # refused, or reset by the kernel while still in the closed
                # listener's backlog: no HTTP answer either way, so retryable
                refused = True
                break
            time.sleep(0.01)
        assert refused, answers
        assert set(map(str, answers)) <= {
            str((200, {"status": "ready"})),
            str((503, {"status": "draining"})),
        }, answers

        status = gateway.process.wait(DRAIN_TIMEOUT + GUARD)
        log = gateway.out.rest() + gateway.err.rest()
        assert status == 0, f"exit status {status}\n{log}"
        assert "drain timeout" not in log, log
        assert "Traceback" not in log, log

        clients.out.wait_for(r"^DONE$")
        client_closes = re.findall(r"^CLOSE \d+ (\d+) ", clients.out.text(), re.M)
        assert len(client_closes) == CONNECTIONS, clients.out.text()
        assert set(client_closes) == {"1001"}, clients.out.text()

        for _ in range(CONNECTIONS):
            upstream.out.wait_for(r"^CLOSE ")
        upstream_closes = re.findall(r"^CLOSE (\d+) ", upstream.out.text(), re.M)
        assert upstream_closes == ["1001"] * CONNECTIONS, upstream.out.text()
    finally:
        for process in reversed(processes):
            process.stop()


#: Seconds a stopping gateway keeps serving in the drain_delay test: room for the probes.
DRAIN_DELAY = 4


def _http_config(upstream_port: int, extra_gateway: str) -> str:
    return f"""
[gateway]
listen = tcp:0:interface=127.0.0.1
{extra_gateway}

[route:api]
prefix = /v1/api
upstream = http://127.0.0.1:{upstream_port}
websocket = false

[route:chat]
prefix = /v1/chat
upstream = http://127.0.0.1:{upstream_port}
"""


def _ask(connection: http.client.HTTPConnection, path: str) -> tuple[int, str | None, dict]:
    """Status, ``Connection`` header and JSON body of a GET on ``connection``."""
    connection.request("GET", path)
    response = connection.getresponse()
    return response.status, response.getheader("Connection"), json.loads(response.read())


def test_during_drain_delay_every_client_is_served_with_connection_close_then_the_gateway_exits(
    tmp_path,
):
    """
    With ``drain_delay = 4`` (shown at start-up), after SIGTERM: ``/readyz`` answers 503 while
    ``/healthz`` stays 200; a request on a connection kept alive from before
    the signal and one on a new connection are both served (200) with
    ``Connection: close``, and a held WebSocket still echoes. Once the delay
    is over the listener is closed, the idle kept-alive connection is closed
    by the gateway, the WebSocket gets 1001, and the process exits 0.
    """
    processes: list[Process] = []
    kept = idle = None
    try:
        upstream, upstream_port = aiohttp_upstream(tmp_path)
        processes.append(upstream)
        extra = f"drain_delay = {DRAIN_DELAY}\ndrain_timeout = {DRAIN_TIMEOUT}"
        gateway = _gateway(tmp_path, _http_config(upstream_port, extra))
        processes.append(gateway)
        port = int(gateway.out.wait_for(LISTENING).group(1))
        gateway.out.wait_for(rf"on SIGTERM: /readyz 503, serve {DRAIN_DELAY}\.0 s more")

        kept = http.client.HTTPConnection("127.0.0.1", port, timeout=GUARD)
        idle = http.client.HTTPConnection("127.0.0.1", port, timeout=GUARD)
        for connection in (kept, idle):
            assert _ask(connection, "/v1/api/before") == (200, None, {"pong": "/v1/api/before"})
        with ws_connect(f"ws://127.0.0.1:{port}/v1/chat/ws", open_timeout=GUARD) as ws:
            ws.send("before")
            assert ws.recv(timeout=GUARD) == "before"

            gateway.process.send_signal(signal.SIGTERM)
            gateway.out.wait_for(r"stopping: /readyz answers 503")
            fresh = http.client.HTTPConnection("127.0.0.1", port, timeout=GUARD)
            try:
                assert _ask(fresh, "/readyz") == (503, "close", {"status": "draining"})
            finally:
                fresh.close()
            assert _get(port, "/healthz")[0] == 200
            assert _ask(kept, "/v1/api/kept") == (200, "close", {"pong": "/v1/api/kept"})
            fresh = http.client.HTTPConnection("127.0.0.1", port, timeout=GUARD)
            try:
                assert _ask(fresh, "/v1/api/new") == (200, "close", {"pong": "/v1/api/new"})
            finally:
                fresh.close()
            ws.send("during")
            assert ws.recv(timeout=GUARD) == "during"

            gateway.out.wait_for(r"listeners closed")
            assert idle.sock.recv(1) == b"", "the idle kept-alive connection was left open"
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=GUARD)
            assert ws.close_code == 1001
        status = gateway.process.wait(DRAIN_TIMEOUT + GUARD)
        log = gateway.out.rest() + gateway.err.rest()
        assert status == 0, f"exit status {status}\n{log}"
        assert "drain timeout" not in log, log
        assert "Traceback" not in log, log
        with pytest.raises(ConnectionRefusedError):
            _get(port, "/healthz")
    finally:
        for connection in (kept, idle):
            if connection is not None:
                connection.close()
        for process in reversed(processes):
            process.stop()


def test_a_second_sigterm_during_a_long_drain_delay_exits_at_once_with_status_0(tmp_path):
    """An operator who does not want to wait out ``drain_delay`` (an hour here) sends SIGTERM again."""
    gateway = _gateway(tmp_path, _http_config(9, "drain_delay = 3600"))
    try:
        port = int(gateway.out.wait_for(LISTENING).group(1))
        # An answer means the reactor runs, so the gateway's SIGTERM handler is in place.
        assert _get(port, "/healthz")[0] == 200
        gateway.process.send_signal(signal.SIGTERM)
        gateway.out.wait_for(r"stopping: /readyz answers 503")
        assert _get(port, "/readyz") == (503, {"status": "draining"})
        assert gateway.terminate() == 0
    finally:
        gateway.stop()


# -- JSON logs ----------------------------------------------------------------------------


def test_json_logger_writes_one_object_per_line_with_port_and_session_fields_and_no_token(tmp_path):
    """
    ``--logger twisted_gateway.logs.json_observer``: every stdout line is one
    JSON object; the listening event carries the bound port; a WebSocket
    session ends in one access event with route, path, peer, upstream,
    duration, side, code and message and byte counts; neither the token used
    in a query nor the signing secret appears anywhere.
    """
    token = jwt.encode({"sub": "alice", "exp": int(time.time()) + 3600}, SECRET, algorithm="HS256")
    processes: list[Process] = []
    try:
        upstream = _script(tmp_path, "upstream.py", UPSTREAM_SCRIPT)
        processes.append(upstream)
        upstream_port = int(upstream.out.wait_for(r"^PORT (\d+)").group(1))

        gateway = _gateway(
            tmp_path,
            _config(upstream_port, auth=True),
            "--logger",
            "twisted_gateway.logs.json_observer",
        )
        processes.append(gateway)
        listening = gateway.out.wait_for_json(
            lambda e: e.get("event") == "listening" and e.get("role") == "wsgateway"
        )
        port = listening["port"]
        assert isinstance(port, int) and port > 0

        sent = ["hello", "w\u00f6rld"]
        with ws_connect(f"ws://127.0.0.1:{port}/v1/chat/ws?token={token}", open_timeout=GUARD) as ws:
            for text in sent:
                ws.send(text)
                assert ws.recv(timeout=GUARD) == text
        status, _ = _get(port, f"/healthz?token={token}")
        assert status == 200

        session = gateway.out.wait_for_json(lambda e: e.get("event") == "ws_session")
        assert session["namespace"] == "twisted_gateway.access"
        size = sum(len(text.encode()) for text in sent)
        expected = {
            "route": "chat",
            "path": "/v1/chat/ws",
            "peer": "127.0.0.1",
            "upstream": f"http://127.0.0.1:{upstream_port}",
            "side": "client",
            "code": 1000,
            "messages_in": 2,
            "messages_out": 2,
            "bytes_in": size,
            "bytes_out": size,
        }
        assert {key: session.get(key) for key in expected} == expected, session
        assert isinstance(session["duration"], (int, float)) and session["duration"] >= 0

        assert gateway.terminate() == 0
        out, err = gateway.out.rest(), gateway.err.rest()
    finally:
        for process in reversed(processes):
            process.stop()

    lines = out.splitlines()
    for line in lines:
        event = json.loads(line)  # every line, not only the ones awaited above
        assert isinstance(event, dict), line
        assert {"time", "level", "namespace", "message"} <= set(event), line
    assert any("/healthz" in line for line in lines), out  # the access log line is there...
    signature = token.rsplit(".", 1)[1]
    for text in (out, err):
        assert token not in text and signature not in text, text  # ...without the token
        assert SECRET not in text, text


# -- --check ------------------------------------------------------------------------------


def _check(tmp_path: Path, config: str) -> subprocess.CompletedProcess:
    path = tmp_path / "gateway.cfg"
    path.write_text(config)
    return subprocess.run(
        [str(TWISTD), "-n", "--pidfile=", "wsgateway", "--config", str(path), "--check"],
        capture_output=True,
        text=True,
        timeout=GUARD,
        env=child_env(),
        cwd=tmp_path,
    )


def test_check_prints_the_effective_config_with_the_secret_masked_and_exits_0(tmp_path):
    """``--check`` on a good file: the effective settings, ``secret = (set)``, "OK", status 0, nothing started."""
    result = _check(tmp_path, _config(9, "max_connections = 7", auth=True))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "max_connections = 7" in result.stdout
    assert "connect_timeout = 5.0" in result.stdout  # a default, shown as in effect
    assert "drain_delay = 0.0" in result.stdout
    assert "[route:chat]" in result.stdout and "prefix = /v1/chat" in result.stdout
    assert "secret = (set)" in result.stdout
    assert "configuration OK" in result.stdout
    assert SECRET not in output
    assert "listening" not in output


def test_check_warns_about_risky_pings_and_still_exits_0(tmp_path):
    """A ping timeout too short for slow links, and pings off without TCP keepalive: warned, accepted."""
    short = _check(tmp_path, _config(9, "ws_ping_interval = 3\nws_ping_timeout = 1"))
    assert short.returncode == 0, short.stdout + short.stderr
    assert "wsgateway: warning: " in short.stdout and "ws_ping_timeout: 1 s is under 5 s" in short.stdout
    off = _check(tmp_path, _config(9, "ws_ping_interval = 0\ntcp_keepalive = off"))
    assert off.returncode == 0, off.stdout + off.stderr
    assert "ws_ping_interval: 0 with tcp_keepalive = off" in off.stdout
    assert "configuration OK" in off.stdout


@pytest.mark.parametrize(
    "config, where",
    [
        (_config(9, "connect_timeout = soon", auth=True), "[gateway] connect_timeout:"),
        (
            _config(9).replace("[route:chat]", "[auth]\nalgorithms = HS256\nsecret = too-short-secret\n[route:chat]"),
            "[auth] secret:",
        ),
    ],
    ids=["a bad key next to a good secret", "a secret too short"],
)
def test_check_reports_a_bad_config_in_one_line_and_exits_1(tmp_path, config, where):
    """``--check`` on a bad file: one line naming where, status 1, and no secret shown."""
    result = _check(tmp_path, config)
    output = result.stdout + result.stderr
    assert where in refusal_line(result), output
    assert "configuration OK" not in output
    assert SECRET not in output and "too-short-secret" not in output
