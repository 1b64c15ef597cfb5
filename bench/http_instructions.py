"""
Instructions the gateway spends per forwarded HTTP request, counted by
callgrind: unlike CPU seconds, the count does not move with the neighbours
on a shared machine, so two builds can be compared step by step.

The gateway (``twistd -n wsgateway``) runs under ``valgrind --tool=callgrind
--instr-atstart=no`` in front of ``bench/backend.js`` (a 64-byte answer);
after a warm-up, instrumentation is switched on, N keep-alive GETs are sent
over 4 connections, and the total instruction count (Ir) over N is printed.

    .venv/bin/python bench/http_instructions.py [--requests N] [--path /auth/x]
        [--logger twisted_gateway.logs.json_observer] [--venv OTHER/.venv]
        [--set access_log=FILE ...] [--peer aiohttp]

``/auth/...`` goes through a route with ``auth = required``, every request
bringing the same token. ``--set KEY=VALUE`` adds a key to ``[gateway]``
(``{workdir}`` in VALUE: the run's temporary directory). ``--peer aiohttp``
counts the seed's aiohttp design (``bench/aiohttp_gateway.py``) instead, the
same way, for a ratio no neighbour can move (it needs the ``bench`` extra). Needs valgrind and Node.js (``bench/node_modules``).
"""

from __future__ import annotations

import argparse
import glob
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jwt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from targets import LOOPBACK, Gateway, gateway_lines  # noqa: E402  (the benchmark's own gateway config)

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--path", default="/x")
    parser.add_argument("--logger", default="")
    parser.add_argument("--venv", default=str(ROOT / ".venv"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a [gateway] key, e.g. access_log=/tmp/access.log")
    parser.add_argument("--peer", choices=("gateway", "aiohttp"), default="gateway",
                        help="what to count: the gateway, or the seed's aiohttp design")
    args = parser.parse_args()
    bin_dir = Path(args.venv) / "bin"
    with tempfile.TemporaryDirectory(prefix="http-instructions-") as work:
        backend = subprocess.Popen(
            ["node", str(ROOT / "bench" / "backend.js")],
            stdin=subprocess.PIPE,  # the backend ends when its stdin does
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            port = json.loads(backend.stdout.readline())["port"]
            print(measure(work, bin_dir, port, args))
        finally:
            backend.kill()
            backend.wait()


def measure(work: str, bin_dir: Path, backend_port: int, args: argparse.Namespace) -> str:
    config = Path(work, "gateway.cfg")
    config.write_text(
        Gateway.CONFIG.format(
            gateway_keys=gateway_lines(args.set, Path(work)),
            listen_arguments="",
            loopback=LOOPBACK,
            max_size=32 * 1024 * 1024,
            secret=Gateway.SECRET,
            backend_port=backend_port,
            cluster="",
        )
    )
    log_path = Path(work, "gateway.log")
    command = [
        "valgrind", "--tool=callgrind", "--instr-atstart=no",
        f"--callgrind-out-file={work}/callgrind.out.%p", str(bin_dir / "python"),
    ]
    if args.peer == "aiohttp":
        command += [str(ROOT / "bench" / "aiohttp_gateway.py"), "--upstream", f"http://{LOOPBACK}:{backend_port}"]
    else:
        command += [str(bin_dir / "twistd"), "-n", "--pidfile="]
        if args.logger:
            command += ["--logger", args.logger]
        command += ["wsgateway", "--config", str(config)]
    with open(log_path, "w") as log:
        gateway = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=work)
    try:
        port = _wait_for_port(log_path, gateway)
        token = jwt.encode(
            {"sub": "bench", "exp": time.time() + 3600}, Gateway.SECRET, algorithm="HS256"
        )
        headers = {"Authorization": "Bearer " + token} if args.path.startswith("/auth") else {}
        connections = [http.client.HTTPConnection(LOOPBACK, port, timeout=120) for _ in range(4)]
        _send(connections, args.path, headers, 200)  # warm-up, not counted
        subprocess.run(["callgrind_control", "-i", "on", str(gateway.pid)], check=True, capture_output=True)
        _send(connections, args.path, headers, args.requests)
        subprocess.run(["callgrind_control", "-d", str(gateway.pid)], check=True, capture_output=True)
    finally:
        gateway.send_signal(signal.SIGTERM)
        gateway.wait(60)
    total = 0
    for name in glob.glob(f"{work}/callgrind.out*"):
        for line in open(name):
            if line.startswith(("totals:", "summary:")):
                total = max(total, int(line.split()[1]))
    logger = ", the aiohttp design" if args.peer == "aiohttp" else ""
    logger += f", --logger {args.logger}" if args.logger else ""
    logger += "".join(f", {item}" for item in args.set)
    return (
        f"{total / args.requests / 1e6:.3f} M instructions per request"
        f" ({args.requests} GET {args.path}{logger})"
    )


def _wait_for_port(log_path: Path, gateway: subprocess.Popen) -> int:
    for _ in range(600):
        match = re.search(r"listening on .*\(port (\d+)\)", log_path.read_text())
        if match:
            return int(match.group(1))
        if gateway.poll() is not None:
            break
        time.sleep(0.5)
    sys.exit(f"the gateway did not start:\n{log_path.read_text()[-2000:]}")


def _send(connections: list, path: str, headers: dict, count: int) -> None:
    for i in range(count):
        connection = connections[i % len(connections)]
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        body = response.read()
        if response.status != 200:
            sys.exit(f"GET {path}: {response.status} {body[:200]!r}")


if __name__ == "__main__":
    main()
