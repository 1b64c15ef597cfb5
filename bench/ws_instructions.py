"""
Instructions the gateway spends per relayed WebSocket message, counted by
callgrind (stable under load, unlike CPU seconds; see http_instructions.py).

The gateway (``twistd -n wsgateway``) runs under callgrind in front of
``bench/backend.js`` (a WebSocket echo); after a warm-up, instrumentation is
switched on and N binary messages of ``--size`` bytes go over ``--conns``
connections, ``--inflight`` at a time on each, each echoed back: a message is
relayed twice (client to backend, backend to client). ``--cycles N`` counts N
open + one message + close cycles instead, each on a new connection.

    .venv/bin/python bench/ws_instructions.py [--messages N] [--size B]
        [--conns C] [--inflight K] [--cycles N] [--venv OTHER/.venv]

To count a changed build without installing it, put a modified copy of the
package first on the path: ``PYTHONPATH=DIR`` (DIR holding ``twisted_gateway``).
Needs valgrind, Node.js (``bench/node_modules``) and ``websockets``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from websockets.sync.client import ClientConnection, connect

sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_instructions import _wait_for_port  # noqa: E402
from targets import LOOPBACK, Gateway, gateway_lines  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--conns", type=int, default=4)
    parser.add_argument("--inflight", type=int, default=1)
    parser.add_argument("--cycles", type=int, default=0)
    parser.add_argument("--venv", default=str(ROOT / ".venv"))
    args = parser.parse_args()
    bin_dir = Path(args.venv) / "bin"
    with tempfile.TemporaryDirectory(prefix="ws-instructions-") as work:
        backend = subprocess.Popen(
            ["node", str(ROOT / "bench" / "backend.js")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        try:
            total = measure(work, bin_dir, json.loads(backend.stdout.readline())["port"], args)
        finally:
            backend.kill()
            backend.wait()
    if args.cycles:
        print(f"{total / args.cycles / 1e3:.1f} k instructions per open + message + close ({args.cycles} cycles)")
    else:
        print(
            f"{total / args.messages / 1e3:.1f} k instructions per message echoed"
            f" ({args.messages} x {args.size} B, {args.conns} connections, {args.inflight} in flight)"
        )


def measure(work: str, bin_dir: Path, backend_port: int, args: argparse.Namespace) -> int:
    config = Path(work, "gateway.cfg")
    config.write_text(
        Gateway.CONFIG.format(
            gateway_keys=gateway_lines([], Path(work)), listen_arguments="", loopback=LOOPBACK,
            max_size=32 * 1024 * 1024, secret=Gateway.SECRET, backend_port=backend_port, cluster="",
        )
    )
    log_path = Path(work, "gateway.log")
    command = [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={work}/callgrind.out.%p",
        str(bin_dir / "python"), str(bin_dir / "twistd"), "-n", "--pidfile=", "wsgateway", "--config", str(config),
    ]
    with open(log_path, "w") as log:
        gateway = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=work)
    try:
        url = f"ws://{LOOPBACK}:{_wait_for_port(log_path, gateway)}/ws"
        payload = os.urandom(args.size)
        if args.cycles:
            _cycles(url, payload, 50)  # warm-up, not counted
            _count(gateway, lambda: _cycles(url, payload, args.cycles))
        else:
            connections = [connect(url, max_size=None, open_timeout=120, compression=None) for _ in range(args.conns)]
            _echo(connections, payload, args.inflight, 200)
            _count(gateway, lambda: _echo(connections, payload, args.inflight, args.messages))
            for connection in connections:
                connection.close()
    finally:
        gateway.send_signal(signal.SIGTERM)
        gateway.wait(60)
    total = 0
    for name in glob.glob(f"{work}/callgrind.out*"):
        for line in open(name):
            if line.startswith(("totals:", "summary:")):
                total = max(total, int(line.split()[1]))
    return total


def _count(gateway: subprocess.Popen, work) -> None:
    subprocess.run(["callgrind_control", "-i", "on", str(gateway.pid)], check=True, capture_output=True)
    work()
    time.sleep(1)  # the last close's end
    subprocess.run(["callgrind_control", "-d", str(gateway.pid)], check=True, capture_output=True)


def _echo(connections: list[ClientConnection], payload: bytes, inflight: int, count: int) -> None:
    for _ in range(0, count, inflight * len(connections)):
        for connection in connections:
            for _ in range(inflight):
                connection.send(payload)
        for connection in connections:
            for _ in range(inflight):
                if connection.recv(timeout=120) != payload:
                    sys.exit("a message came back changed")


def _cycles(url: str, payload: bytes, count: int) -> None:
    for _ in range(count):
        with connect(url, open_timeout=120, compression=None) as connection:
            connection.send(payload)
            if connection.recv(timeout=120) != payload:
                sys.exit("a message came back changed")


if __name__ == "__main__":
    main()
