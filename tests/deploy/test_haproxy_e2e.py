"""
A rolling deploy behind HAProxy: two ``twistd wsgateway`` processes behind
Debian's ``haproxy`` configured the usual way (``balance leastconn``,
``option httpchk GET /readyz``, ``inter 500ms fall 1``, ``option redispatch``,
``retries 3``, ``retry-on conn-failure empty-response response-timeout``),
steady HTTP and handshake load, and one gateway stopped with SIGTERM and
started again on the same port. No client may see a failed request or
handshake; the WebSockets held through the stopped gateway get 1001 and
reconnect through the other one at once.

Every process (the upstream, both gateways, HAProxy, the load) is a real
subprocess on free loopback ports, stopped by its PID in a ``finally``.
"""

from __future__ import annotations

import http.client
import json
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.test_operations_e2e import LISTENING
from tests.processes import GUARD, TWISTD, Process, aiohttp_upstream, free_port


HERE = Path(__file__).parent
#: Seconds of load before the stop and after the restart: a load duration, not a deadline.
STEADY = 1.0
HELD = 10

#: The repository's deploy/haproxy.cfg, its front bound to a free loopback port, its server
#: lines replaced by the two gateways, and a stats page to read HAProxy's view from.
DEPLOYED_HAPROXY = HERE.parents[1] / "deploy" / "haproxy.cfg"
STATS = """
listen stats
    bind 127.0.0.1:{stats}
    stats enable
    stats uri /stats
"""


def _haproxy_config(ports: dict[str, int]) -> str:
    lines = []
    for line in DEPLOYED_HAPROXY.read_text().splitlines():
        word = line.split()[:1]
        if word == ["server"]:
            continue
        if word == ["bind"]:
            line = f"    bind 127.0.0.1:{ports['front']}"
        lines.append(line)
        if word == ["default-server"]:
            lines += [f"    server {name} 127.0.0.1:{ports[name]}" for name in ("g1", "g2")]
    text = "\n".join(lines) + "\n" + STATS.format(**ports)
    assert "server g1" in text and "balance leastconn" in text and "timeout tunnel" in text
    return text

GATEWAY_CONFIG = """
[gateway]
listen = tcp:{port}:interface=127.0.0.1
drain_timeout = 10
drain_spread = 1
{drain_delay}

[route:api]
prefix = /v1/api
upstream = http://127.0.0.1:{upstream}
websocket = false

[route:chat]
prefix = /v1/chat
upstream = http://127.0.0.1:{upstream}
"""


def _haproxy() -> str:
    path = shutil.which("haproxy") or "/usr/sbin/haproxy"
    assert Path(path).exists(), "haproxy is not installed: apt-get install -y haproxy (.ci/run does)"
    return path


def _start_gateway(tmp_path: Path, name: str, config: str) -> Process:
    path = tmp_path / f"{name}.cfg"
    path.write_text(config)
    gateway = Process([str(TWISTD), "-n", "--pidfile=", "wsgateway", "--config", str(path)], tmp_path, stderr_apart=True)
    gateway.out.wait_for(LISTENING)
    return gateway


def _server_states(stats_port: int) -> dict[str, str]:
    """HAProxy's view of each gateway (``UP``, ``DOWN``, ...), from its CSV stats page."""
    connection = http.client.HTTPConnection("127.0.0.1", stats_port, timeout=GUARD)
    try:
        connection.request("GET", "/stats;csv")
        rows = connection.getresponse().read().decode().splitlines()
    except ConnectionRefusedError:
        return {}  # HAProxy is not listening yet
    finally:
        connection.close()
    header = rows[0].lstrip("# ").split(",")
    states = {}
    for row in rows[1:]:
        fields = dict(zip(header, row.split(",")))
        if fields.get("pxname") == "gateways" and fields.get("svname") in ("g1", "g2"):
            states[fields["svname"]] = fields["status"].split(" ")[0]
    return states


def _wait_for_states(stats_port: int, wanted: dict[str, str]) -> None:
    """Until HAProxy's health checks see ``wanted``; the loop count only guards against a hang."""
    states: dict[str, str] = {}
    for _ in range(GUARD * 20):
        states = _server_states(stats_port)
        if states == wanted:
            return
        time.sleep(0.05)
    raise AssertionError(f"HAProxy never saw {wanted}: {states}")


@pytest.mark.parametrize("drain_delay", [None, 2], ids=["default drain_delay", "drain_delay = 2"])
def test_a_gateway_restarted_behind_haproxy_fails_no_request_and_no_handshake(tmp_path, drain_delay):
    """
    Under steady load, SIGTERM to one gateway and a start on the same port:
    every GET and every handshake through HAProxy succeeds (a WebSocket just
    opened on the stopping gateway may get its 1001 before its first echo:
    counted apart, not as a failure), the stopped gateway exits 0, and each
    WebSocket held through it is closed with 1001 and reconnects (through
    HAProxy) at its first attempt.
    """
    processes: list[Process] = []
    try:
        upstream, upstream_port = aiohttp_upstream(tmp_path)
        processes.append(upstream)

        ports = {name: free_port() for name in ("g1", "g2", "front", "stats")}
        delay_line = f"drain_delay = {drain_delay}" if drain_delay is not None else ""

        def config(name: str) -> str:
            return GATEWAY_CONFIG.format(port=ports[name], drain_delay=delay_line, upstream=upstream_port)

        gateways = {name: _start_gateway(tmp_path, name, config(name)) for name in ("g1", "g2")}
        processes += gateways.values()
        haproxy_cfg = tmp_path / "haproxy.cfg"
        haproxy_cfg.write_text(_haproxy_config(ports))
        processes.append(Process([_haproxy(), "-db", "-f", str(haproxy_cfg)], tmp_path, stderr_apart=True))
        _wait_for_states(ports["stats"], {"g1": "UP", "g2": "UP"})

        front = f"http://127.0.0.1:{ports['front']}"
        load = Process([sys.executable, str(HERE / "load.py"), front, "--held", str(HELD)], tmp_path, stderr_apart=True)
        processes.append(load)
        load.out.wait_for(r"^READY$")
        time.sleep(STEADY)

        stopped = gateways["g1"]
        stopped.process.send_signal(signal.SIGTERM)
        status = stopped.process.wait(GUARD)
        stopped_log = stopped.out.rest() + stopped.err.rest()
        assert status == 0, f"exit status {status}\n{stopped_log}"
        assert f"serving {float(drain_delay or 0)} s more" in stopped_log, stopped_log
        restarted = _start_gateway(tmp_path, "g1", config("g1"))
        processes.append(restarted)
        _wait_for_states(ports["stats"], {"g1": "UP", "g2": "UP"})
        time.sleep(STEADY)

        load.process.send_signal(signal.SIGTERM)
        summary = json.loads(load.out.wait_for(r"^\{.*\}$").group(0))
        print(json.dumps(summary, indent=1))
    finally:
        for process in reversed(processes):
            process.stop()

    done = {key: value for key, value in summary.items() if key.startswith(("http_", "handshakes_"))}
    assert summary["http_failed"] == 0 and summary["handshakes_failed"] == 0, (done, summary["failures"])
    assert summary["http_ok"] > 0 and summary["handshakes_ok"] > 0, done
    closes = summary["held_closes"]
    assert closes, "no held WebSocket went through the stopped gateway"
    assert {close["code"] for close in closes} == {1001}, closes
    assert all(close["reconnected"] for close in closes), closes
