"""
Does a WebSocket client that stops reading slow its upstream down?

An upstream sends 64 KiB messages as fast as it may to a client that reads
nothing (an app frozen in the background), through a real ``twistd
wsgateway`` with pings off and ``ws_send_timeout = 0`` (the pair is kept, so
that the pause itself is measured). Sampled every second for ``--seconds``:

- the upstream's bytes sent and the time its sends were blocked (``await
  ws.send()`` calls that waited more than 1 ms);
- the gateway's upstream-facing socket: Recv-Q (bytes the kernel accepted
  from the upstream that the gateway does not read) and its receive buffer
  (``ss -m``: ``rb``), and the client-facing socket's Send-Q.

``--link-rate 1mbit`` puts the upstream in a network namespace of its own
behind a veth pair shaped to that rate on both ends (``tc tbf``; root and
iproute2 needed), as a slow link between the gateway and its upstream.

``--gateway-tree DIR`` runs the gateway from another checkout (e.g. one
without the receive-buffer cap, for a before/after figure); its config then
names only the keys every version knows. Usage::

    .venv/bin/python bench/ws_backpressure.py --seconds 60
    git archive a57aa08 | tar -x -C /tmp/before
    .venv/bin/python bench/ws_backpressure.py --seconds 60 --gateway-tree /tmp/before
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TWISTD = Path(sys.executable).with_name("twistd")

UPSTREAM = """
import asyncio, json, sys, time
from websockets.asyncio.server import serve

stats = {"sent": 0, "blocked": 0.0}
sending_since = None

async def flood(ws):
    global sending_since
    data = bytes(65536)
    try:
        while True:
            sending_since = start = time.monotonic()
            await ws.send(data)
            sending_since = None
            waited = time.monotonic() - start
            if waited > 0.001:
                stats["blocked"] += waited
            stats["sent"] += len(data)
    except Exception:
        pass

async def report():
    while True:
        await asyncio.sleep(1)
        ongoing = time.monotonic() - sending_since if sending_since is not None else 0.0
        blocked = stats["blocked"] + (ongoing if ongoing > 0.001 else 0.0)
        print(json.dumps({"sent": stats["sent"], "blocked": blocked}), flush=True)

async def main():
    async with serve(flood, sys.argv[1], 0, ping_interval=None, compression=None) as server:
        print("PORT", server.sockets[0].getsockname()[1], flush=True)
        await report()

asyncio.run(main())
"""

CLIENT = """
import asyncio, sys
from websockets.asyncio.client import connect

async def main(url):
    ws = await connect(url, ping_interval=None, max_queue=1, compression=None)
    print("OPEN", flush=True)
    await asyncio.Future()

asyncio.run(main(sys.argv[1]))
"""


def _start(args: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _wait_line(process: subprocess.Popen, pattern: str) -> re.Match:
    for line in process.stdout:
        match = re.search(pattern, line)
        if match:
            return match
    raise SystemExit(f"no {pattern!r} from {process.args}")


def _socket(pid: int, port: int, local: bool) -> dict:
    """Recv-Q, Send-Q and the receive buffer of the gateway's socket on ``port``."""
    side = "sport" if local else "dport"
    out = subprocess.run(
        ["ss", "-tnmpH", "state", "established", f"( {side} = :{port} )"],
        capture_output=True,
        text=True,
    ).stdout
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if f"pid={pid}," in line:
            recv_q, send_q = (int(v) for v in line.split()[:2])
            memory = " ".join(lines[i : i + 2])
            rb = re.search(r"rb(\d+)", memory)
            return {"recv_q": recv_q, "send_q": send_q, "rcvbuf": int(rb.group(1)) if rb else None}
    return {}


class _Link:
    """A namespace behind a veth pair shaped to ``rate`` on both ends: host .1, far end .2."""

    def __init__(self, rate: str) -> None:
        self.name = f"wsbp{os.getpid()}"
        self.shape = ["tbf", "rate", rate, "burst", "32kbit", "latency", "400ms"]
        self.host, self.far = "10.214.0.1", "10.214.0.2"

    def __enter__(self) -> "_Link":
        host_if, far_if, ns = f"{self.name}h", f"{self.name}n", self.name
        for command in (
            ["ip", "netns", "add", ns],
            ["ip", "link", "add", host_if, "type", "veth", "peer", "name", far_if],
            ["ip", "link", "set", far_if, "netns", ns],
            ["ip", "addr", "add", f"{self.host}/30", "dev", host_if],
            ["ip", "link", "set", host_if, "up"],
            ["tc", "qdisc", "add", "dev", host_if, "root", *self.shape],
            ["ip", "netns", "exec", ns, "ip", "addr", "add", f"{self.far}/30", "dev", far_if],
            ["ip", "netns", "exec", ns, "ip", "link", "set", far_if, "up"],
            ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", far_if, "root", *self.shape],
        ):
            subprocess.run(command, check=True)
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["ip", "link", "del", f"{self.name}h"], capture_output=True)  # and its qdisc
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--gateway-tree", help="run the gateway from this checkout")
    parser.add_argument("--link-rate", help="a link of this rate between gateway and upstream, e.g. 1mbit")
    options = parser.parse_args()
    if options.link_rate:
        with _Link(options.link_rate) as link:
            run(options, link)
    else:
        run(options, None)


def run(options: argparse.Namespace, link: _Link | None) -> None:
    """One measurement; the upstream behind ``link`` when there is one."""

    work = Path(tempfile.mkdtemp(prefix="ws-backpressure-"))
    (work / "upstream.py").write_text(UPSTREAM)
    (work / "client.py").write_text(CLIENT)
    processes = []
    try:
        up_host = link.far if link else "127.0.0.1"
        prefix = ["ip", "netns", "exec", link.name] if link else []
        upstream = _start([*prefix, sys.executable, str(work / "upstream.py"), up_host])
        processes.append(upstream)
        up_port = int(_wait_line(upstream, r"PORT (\d+)").group(1))
        new_keys = "" if options.gateway_tree else "ws_send_timeout = 0\n"
        (work / "gateway.cfg").write_text(
            "[gateway]\nlisten = tcp:0:interface=127.0.0.1\nws_ping_interval = 0\n"
            f"{new_keys}\n[route:chat]\nprefix = /chat\nupstream = http://{up_host}:{up_port}\n"
        )
        env = dict(os.environ)
        if options.gateway_tree:
            env["PYTHONPATH"] = options.gateway_tree
        gateway = _start(
            [str(TWISTD), "-n", "--pidfile=", "wsgateway", "--config", str(work / "gateway.cfg")], env
        )
        processes.append(gateway)
        port = int(_wait_line(gateway, r"wsgateway listening on \S+ \(port (\d+)\)").group(1))
        client = _start([sys.executable, str(work / "client.py"), f"ws://127.0.0.1:{port}/chat/ws"])
        processes.append(client)
        _wait_line(client, r"OPEN")

        samples = []
        for second in range(1, options.seconds + 1):
            stats = json.loads(_wait_line(upstream, r"^\{.*\}$").group(0))
            samples.append(
                {
                    "t": second,
                    "upstream_sent": stats["sent"],
                    "upstream_blocked_s": round(stats["blocked"], 2),
                    "gateway_upstream_leg": _socket(gateway.pid, up_port, local=False),
                    "gateway_client_leg": _socket(gateway.pid, port, local=True),
                }
            )
            print(json.dumps(samples[-1]), flush=True)
        recv = [s["gateway_upstream_leg"].get("recv_q", 0) for s in samples]
        last = samples[-1]
        summary = {
            "gateway": options.gateway_tree or "this tree",
            "link": options.link_rate or "loopback",
            "seconds": options.seconds,
            "upstream_sent_mib": round(last["upstream_sent"] / 2**20, 2),
            "upstream_blocked_s": last["upstream_blocked_s"],
            "gateway_recv_q_max_mib": round(max(recv) / 2**20, 2),
            "gateway_recv_q_last_mib": round(recv[-1] / 2**20, 2),
            "gateway_rcvbuf_last_mib": round((last["gateway_upstream_leg"].get("rcvbuf") or 0) / 2**20, 2),
            "client_leg_send_q_last_mib": round(last["gateway_client_leg"].get("send_q", 0) / 2**20, 2),
        }
        print("SUMMARY", json.dumps(summary), flush=True)
    finally:
        for process in reversed(processes):
            process.send_signal(signal.SIGKILL)
            process.wait()


if __name__ == "__main__":
    main()
