"""
Instructions the gateway spends per forwarded HTTP request, counted by
callgrind: unlike CPU seconds, the count does not move with the neighbours
on a shared machine, so two builds can be compared step by step.

The gateway (``twistd -n wsgateway``) runs under ``valgrind --tool=callgrind
--instr-atstart=no`` in front of ``bench/backend.js`` (a 64-byte answer, or
64 KiB with ``--large``);
after a warm-up, instrumentation is switched on, N keep-alive GETs are sent
over 4 connections, and the total instruction count (Ir) over N is printed.

    .venv/bin/python bench/http_instructions.py [--requests N] [--path /auth/x]
        [--logger twisted_gateway.logs.json_observer] [--venv OTHER/.venv]
        [--set access_log=FILE ...] [--peer aiohttp] [--handshakes N] [--fresh-tokens]
        [--concurrency N] [--cache-sim] [--large] [--query-token]

``/auth/...`` goes through a route with ``auth = required``, every request
bringing the same token (``Authorization: Bearer``, or ``?token=`` with
``--query-token``, as a browser's WebSocket sends it); with ``--fresh-tokens``
each brings a token of its own (made before the count starts: the gateway has
never verified it). ``--set KEY=VALUE`` adds a key to ``[gateway]``
(``{workdir}`` in VALUE: the run's temporary directory). ``--peer aiohttp``
counts the seed's aiohttp design (``bench/aiohttp_gateway.py``) instead, the
same way, for a ratio no neighbour can move (it needs the ``bench`` extra).
``--handshakes N`` counts WebSocket handshakes instead (bench figure 3): N
open + close cycles one after the other, each a new connection that upgrades
``--path``, sends a close, reads the relayed close and waits for the end of
the connection; the count is per cycle. ``--concurrency N`` sends the
requests over N connections at once, each sending its next GET as soon as
its last answer is in (bench figure 6 saturated: many requests per reactor
turn, N upstream connections) instead of one at a time. ``--cache-sim``
also prints callgrind's simulated cache misses per request (first-level
instruction and data, last-level): CPU seconds count the misses,
instructions do not. ``--large`` asks for 64 KiB answers (``--path`` with
``/64k`` appended, which the backend answers so) and also prints the
instructions per byte of answer: the cost of streaming a body, next to a
request's own. Needs valgrind and Node.js
(``bench/node_modules``).
"""

from __future__ import annotations

import argparse
import base64
import glob
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import jwt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from targets import LOOPBACK, Gateway, gateway_lines  # noqa: E402  (the benchmark's own gateway config)

ROOT = Path(__file__).resolve().parent.parent
#: A path ending so gets a 64 KiB answer from bench/backend.js.
LARGE_SUFFIX, LARGE_SIZE = "/64k", 64 * 1024


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
    parser.add_argument("--handshakes", type=int, default=0, metavar="N",
                        help="count N WebSocket open + close cycles instead of HTTP requests")
    parser.add_argument("--fresh-tokens", action="store_true",
                        help="with --path /auth/...: a new token for each request or handshake")
    parser.add_argument("--query-token", action="store_true",
                        help="with --path /auth/...: the token in ?token= instead of an Authorization header")
    parser.add_argument("--concurrency", type=int, default=0, metavar="N",
                        help="N connections sending at once (default: 4 connections, one request at a time)")
    parser.add_argument("--cache-sim", action="store_true", help="also count simulated cache misses")
    parser.add_argument("--large", action="store_true", help="64 KiB answers (--path + /64k) instead of 64 bytes")
    args = parser.parse_args()
    if args.large:
        args.path = args.path.rstrip("/") + LARGE_SUFFIX
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
        except RuntimeError as e:  # a refused request or handshake
            sys.exit(str(e))
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
        f"--callgrind-out-file={work}/callgrind.out.%p", *(["--cache-sim=yes"] if args.cache_sim else []),
        str(bin_dir / "python"),
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
        counted = args.handshakes or args.requests
        tokens = _tokens(counted + 200 if args.fresh_tokens else 1)
        warm_up, measured = (tokens[:200], tokens[200:]) if args.fresh_tokens else (tokens, tokens)
        auth = ("query" if args.query_token else "header") if args.path.startswith("/auth") else None
        if args.handshakes:
            handshakes(port, args.path, auth, warm_up, 50)  # warm-up, not counted
            subprocess.run(["callgrind_control", "-i", "on", str(gateway.pid)], check=True, capture_output=True)
            handshakes(port, args.path, auth, measured, args.handshakes)
        else:
            connections = [http.client.HTTPConnection(LOOPBACK, port, timeout=120)
                           for _ in range(args.concurrency or 4)]
            send = _send_at_once if args.concurrency else send_requests
            send(connections, args.path, auth, warm_up, 200)  # warm-up, not counted
            subprocess.run(["callgrind_control", "-i", "on", str(gateway.pid)], check=True, capture_output=True)
            send(connections, args.path, auth, measured, args.requests)
        subprocess.run(["callgrind_control", "-d", str(gateway.pid)], check=True, capture_output=True)
    finally:
        gateway.send_signal(signal.SIGTERM)
        gateway.wait(60)
    counts: dict[str, int] = {}
    for name in glob.glob(f"{work}/callgrind.out*"):
        names: list[str] = []
        for line in open(name):
            if line.startswith("events:"):
                names = line.split()[1:]
            elif line.startswith(("totals:", "summary:")) and int(line.split()[1]) > counts.get("Ir", 0):
                counts = dict(zip(names, map(int, line.split()[1:])))
    total = counts.get("Ir", 0)
    logger = ", the aiohttp design" if args.peer == "aiohttp" else ""
    logger += f", --logger {args.logger}" if args.logger else ""
    logger += "".join(f", {item}" for item in args.set)
    logger += ", a fresh token each" if args.fresh_tokens else ""
    logger += ", the token in the query" if args.query_token else ""
    logger += f", {args.concurrency} connections at once" if args.concurrency else ""
    if args.handshakes:
        return (
            f"{total / args.handshakes / 1e6:.3f} M instructions per handshake"
            f" ({args.handshakes} open + close of {args.path}{logger})"
        )
    misses = ""
    if args.cache_sim:
        # first-level instruction and data misses (reads and writes), last-level misses of both
        level1 = counts.get("I1mr", 0), counts.get("D1mr", 0) + counts.get("D1mw", 0)
        last = sum(counts.get(key, 0) for key in ("ILmr", "DLmr", "DLmw"))
        misses = (
            f"; per request {level1[0] / args.requests:,.0f} I1 misses, {level1[1] / args.requests:,.0f} D1 misses,"
            f" {last / args.requests:,.0f} LL misses"
        )
    per_byte = f"; {total / args.requests / LARGE_SIZE:.2f} per byte of answer" if args.large else ""
    return (
        f"{total / args.requests / 1e6:.3f} M instructions per request"
        f" ({args.requests} GET {args.path}{logger}){per_byte}{misses}"
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


def _tokens(count: int) -> list[str]:
    """``count`` different tokens the benchmark's gateway accepts (the subject differs)."""
    exp = time.time() + 3600
    return [jwt.encode({"sub": f"bench-{i}", "exp": exp}, Gateway.SECRET, algorithm="HS256") for i in range(count)]


def _with_token(path: str, auth: str | None, token: str) -> tuple[str, str | None]:
    """The target and the ``Authorization`` value that carry ``token`` as ``auth`` says ("header", "query", None)."""
    if auth == "query":
        return f"{path}?token={token}", None
    return path, f"Bearer {token}" if auth == "header" else None


def send_requests(connections: list, path: str, auth: str | None, tokens: list[str], count: int) -> None:
    """``count`` GETs of ``path``, one at a time, over ``connections`` in turn."""
    for i in range(count):
        connection = connections[i % len(connections)]
        target, authorization = _with_token(path, auth, tokens[i % len(tokens)])
        connection.request("GET", target, headers={"Authorization": authorization} if authorization else {})
        response = connection.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"GET {path}: {response.status} {body[:200]!r}")


def _send_at_once(connections: list, path: str, auth: str | None, tokens: list[str], count: int) -> None:
    """:func:`send_requests`, each connection in a thread of its own: ``count`` requests in all."""
    failures: list[BaseException] = []

    def one(index: int) -> None:
        try:
            send_requests([connections[index]], path, auth, tokens, len(range(index, count, len(connections))))
        except BaseException as e:  # the main thread reports it
            failures.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(connections))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]


#: A masked close frame, code 1000 (mask key of zeros: the payload as is).
_CLOSE = b"\x88\x82\x00\x00\x00\x00\x03\xe8"


def handshakes(port: int, path: str, auth: str | None, tokens: list[str], count: int) -> None:
    """``count`` WebSocket open + close cycles, one connection each, one at a time."""
    for i in range(count):
        target, authorization = _with_token(path, auth, tokens[i % len(tokens)])
        extra = f"Authorization: {authorization}\r\n" if authorization else ""
        key = base64.b64encode(os.urandom(16)).decode()
        with socket.create_connection((LOOPBACK, port), timeout=120) as sock:
            sock.sendall(
                f"GET {target} HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                f"{extra}\r\n".encode()
            )
            answer = sock.makefile("rb")
            status = answer.readline()
            if not status.startswith(b"HTTP/1.1 101"):
                raise RuntimeError(f"upgrade of {path}: {status[:200]!r}")
            while answer.readline() not in (b"\r\n", b""):
                pass  # the 101's headers
            sock.sendall(_CLOSE)
            # frames until the close's answer: a keepalive ping may come first (control
            # frames, so at most 125 bytes of payload and no extended length)
            while (first := answer.read(1)) != b"\x88":
                if first != b"\x89":
                    raise RuntimeError(f"upgrade of {path}: {first!r} where a close or a ping frame was due")
                answer.read(answer.read(1)[0] & 0x7F)
            answer.read(answer.read(1)[0] & 0x7F)  # its payload (the code)
            while sock.recv(65536):  # the proxy ends the connection after the close
                pass


if __name__ == "__main__":
    main()
