"""
How much memory the WebSocket relay needs: large messages, slow readers, churn.

The relay promises to stream a large message frame by frame and to pause one
leg while the other cannot keep up (``ws_proxy.py``). This script checks both
promises against a real gateway: each measurement gets a fresh
``twistd -n wsgateway`` subprocess (``--quick``: one for all), so
``/proc/PID/status`` (``VmRSS``, and ``VmHWM`` reset through ``clear_refs``)
measures the gateway alone, while the upstream and the clients are asyncio
``websockets`` peers in this process, their socket buffers pinned small
(``--peer-sockbuf``) so that only the gateway can hold a stalled transfer.

Measurements (full sizes; ``--quick`` uses 4 MiB, 10 MiB and 100 cycles):

1. one 16 MiB message: client -> echo upstream -> client, upstream -> client,
   client -> upstream; peak RSS growth over a warmed-up baseline;
2. slow reader downstream: the client stops reading while the upstream sends
   100 MiB in 64 KiB messages; RSS growth, proof that the upstream stalled,
   then every byte checked once the client reads;
3. slow reader upstream: the same with the upstream not reading;
4. 1,000 open/close cycles mixing clean closes, client drops, upstream drops
   and refusals (403); ``/healthz`` and the upstream must count 0 afterwards
   (``--churn-rounds 3`` repeats them: a leak grows every round).

Prints a Markdown table, writes ``bench/results/ws_memory.json`` (``--out``)
and exits 1 if a correctness check fails (bytes lost or corrupted, a sender
not throttled, counts not back to 0, a gateway not exiting cleanly), 2 on an
error. Loopback only; every loop is bounded in count and time.

    .venv/bin/python bench/ws_memory.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ctypes
import itertools
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.client import connect as ws_connect
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import ConnectionClosed, InvalidStatus

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "ws_memory.json"
KiB = 1024
MiB = 1024 * KiB
#: Pause between churn rounds: longer than the relay's 5 s close-handshake timers.
ROUND_PAUSE_S = 6.0
LOOPBACK = "127.0.0.1"

#: The last line of a traceback in twistd's log ("\tbuiltins.KeyError: 'x'").
_EXCEPTION_LINE = re.compile(r"^\t[\w.]+(Error|Exception|Failure|Exit)\b.*")

#: The gateway's ready line: "wsgateway listening on ENDPOINT (port N)".
_LISTENING_LINE = re.compile(r"wsgateway listening on \S+ \(port (\d+)\)")

#: Every twistd started by this run, killed at exit whatever happens.
_CHILDREN: list[subprocess.Popen] = []


def _die_with_parent() -> None:
    """In the child: get SIGTERM if this script dies, even by SIGKILL (Linux)."""
    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


@dataclass(frozen=True)
class Sizes:
    message: int
    slow_total: int
    slow_chunk: int
    cycles: int
    stall_s: float  # no progress for this long means the sender is throttled
    hold_s: float  # longest wait for that stall
    scenario_timeout_s: float
    warmups: int  # rounds of every path before the baseline is taken
    fresh_gateways: bool  # one gateway per measurement, or one for all


FULL = Sizes(16 * MiB, 100 * MiB, 64 * KiB, 1000, 1.5, 30.0, 300.0, 3, True)
QUICK = Sizes(4 * MiB, 10 * MiB, 64 * KiB, 100, 0.5, 10.0, 60.0, 1, False)


# -- the gateway subprocess ---------------------------------------------------


class Gateway:
    """One ``twistd -n wsgateway`` child; its memory read from /proc."""

    CONFIG = """\
[gateway]
listen = tcp:0:interface=127.0.0.1
ws_max_message_size = {max_size}

[route:echo]
prefix = /
upstream = http://127.0.0.1:{upstream_port}
websocket = true
"""

    def __init__(self, upstream_port: int, max_size: int, workdir: Path) -> None:
        self.config = workdir / f"gateway-{upstream_port}-{len(_CHILDREN)}.cfg"
        self.config.write_text(self.CONFIG.format(max_size=max_size, upstream_port=upstream_port))
        self.workdir = workdir
        self.lines: collections.deque[str] = collections.deque(maxlen=200)
        #: the last line of each traceback the gateway logged, counted
        self.errors: collections.Counter[str] = collections.Counter()
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self._listening = threading.Event()

    def _command(self) -> list[str]:
        twistd = Path(sys.executable).parent / "twistd"
        head = [str(twistd)] if twistd.exists() else [
            sys.executable, "-c", "from twisted.scripts.twistd import run; run()"
        ]
        return head + ["-n", "--pidfile=", "wsgateway", "--config", str(self.config)]

    async def start(self, timeout: float = 30.0) -> None:
        # Spawned from the main thread: the child's parent-death signal is
        # tied to the thread that forked it.
        self.proc = subprocess.Popen(
            self._command(),
            cwd=self.workdir,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            preexec_fn=_die_with_parent,
        )
        _CHILDREN.append(self.proc)
        threading.Thread(target=self._drain_output, daemon=True).start()
        await asyncio.to_thread(self._listening.wait, timeout)
        if self.port is None:
            await asyncio.to_thread(self.stop)
            tail = "\n".join(self.lines)
            raise RuntimeError(f"the gateway did not report listening within {timeout}s:\n{tail}")

    def _drain_output(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())
            if _EXCEPTION_LINE.match(line):
                self.errors[line.strip()[:160]] += 1
            listening = _LISTENING_LINE.search(line)
            if self.port is None and listening:
                self.port = int(listening.group(1))
                self._listening.set()
        self._listening.set()  # exited: stop waiting

    def memory(self) -> dict[str, int]:
        """VmRSS and VmHWM in bytes."""
        assert self.proc is not None
        found = {}
        with open(f"/proc/{self.proc.pid}/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    found[key] = int(value.split()[0]) * KiB
        return found

    def rss(self) -> int:
        return self.memory()["VmRSS"]

    def reset_peak(self) -> bool:
        """Reset VmHWM to the current RSS (Linux >= 4.0); False when not allowed."""
        assert self.proc is not None
        try:
            with open(f"/proc/{self.proc.pid}/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def stop(self) -> int | None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return proc.returncode if proc else None
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(5)

    def url(self, path: str) -> str:
        return f"ws://{LOOPBACK}:{self.port}{path}"

    async def healthz(self) -> dict[str, Any]:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(LOOPBACK, self.port), 5)
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            raw = await asyncio.wait_for(reader.read(), 5)
        finally:
            writer.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"/healthz answered {head[:40]!r}")
        return json.loads(body)


class RssSampler:
    """Samples the gateway's VmRSS from a thread every ``interval`` seconds; keeps the max."""

    def __init__(self, gateway: Gateway, interval: float = 0.01) -> None:
        self.gateway, self.interval = gateway, interval
        self.max_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.max_rss = max(self.max_rss, self.gateway.rss())
            except (OSError, KeyError):
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self.max_rss = self.gateway.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.max_rss = max(self.max_rss, self.gateway.rss())


# -- the upstream -------------------------------------------------------------


def message(seq: int, size: int, pattern: bytes) -> bytes:
    """Message ``seq`` of a flow: its number, then a fixed pattern (checkable at the far end)."""
    return seq.to_bytes(8, "big") + pattern[8:size]


def check_message(data: bytes, seq: int, size: int, pattern: bytes) -> bool:
    return len(data) == size and data[:8] == seq.to_bytes(8, "big") and data[8:] == pattern[8:size]


@dataclass
class Flow:
    """One directed transfer: what was sent and received, and its checks."""

    total: int
    size: int
    hold: bool = False
    sent: int = 0
    received: int = 0
    intact: bool = True
    released: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)


class Upstream:
    """
    A websockets server whose behaviour is chosen by path:
    ``/echo``, ``/refuse`` (403), ``/drop`` (abort on the first message),
    ``/source?id=`` (send a flow), ``/sink?id=`` (receive a flow, maybe held).
    """

    def __init__(self, pattern: bytes, sockbuf: int) -> None:
        self.pattern, self.sockbuf = pattern, sockbuf
        self.flows: dict[str, Flow] = {}
        self.open = 0  # handlers running = open WebSocket connections
        #: (path, close code the upstream received or None) per finished connection
        self.closes: collections.Counter[tuple[str, int | None]] = collections.Counter()
        self.server: Any = None
        self.port = 0
        self._ids = itertools.count()

    def new_flow(self, total: int, size: int, hold: bool = False) -> tuple[str, Flow]:
        flow_id = str(next(self._ids))
        flow = self.flows[flow_id] = Flow(total, size, hold)
        if not hold:
            flow.released.set()
        return flow_id, flow

    async def start(self) -> None:
        self.server = await ws_serve(
            self._handle,
            sock=peer_socket(self.sockbuf, listening=True),
            process_request=self._refuse,
            max_size=None,
            compression=None,
            ping_interval=None,
            close_timeout=5,
        )
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await asyncio.wait_for(self.server.wait_closed(), 10)

    def connections(self) -> int:
        return len(self.server.connections)

    @staticmethod
    def _refuse(connection: Any, request: Any) -> Any:
        if urlsplit(request.path).path == "/refuse":
            return connection.respond(HTTPStatus.FORBIDDEN, "refused by the bench upstream\n")
        return None

    async def _handle(self, ws: Any) -> None:
        self.open += 1
        url = urlsplit(ws.request.path)
        try:
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            flow = self.flows.get(query.get("id", ""))
            if url.path == "/echo":
                async for data in ws:
                    await ws.send(data)
            elif url.path == "/drop":
                await ws.recv()
                ws.transport.abort()
            elif url.path == "/source" and flow is not None:
                await self._source(ws, flow)
            elif url.path == "/sink" and flow is not None:
                await self._sink(ws, flow)
            else:
                await ws.close(4404, "unknown bench path")
        except ConnectionClosed:
            pass
        finally:
            self.open -= 1
            received = ws.protocol.close_rcvd
            self.closes[(url.path, received.code if received else None)] += 1

    async def _source(self, ws: Any, flow: Flow) -> None:
        for seq in range(flow.total // flow.size):
            await ws.send(message(seq, flow.size, self.pattern))
            flow.sent += flow.size
        flow.finished.set()
        await ws.wait_closed()

    async def _sink(self, ws: Any, flow: Flow) -> None:
        await flow.released.wait()
        seq = 0
        while flow.received < flow.total:
            data = await ws.recv()
            flow.intact &= check_message(data, seq, flow.size, self.pattern)
            flow.received += len(data)
            seq += 1
        flow.finished.set()
        await ws.wait_closed()


# -- the measurements ---------------------------------------------------------


def peer_socket(sockbuf: int, listening: bool = False) -> socket.socket:
    """
    A peer's TCP socket, its kernel buffers pinned to ``sockbuf`` (0: autotuned).

    Pinned, the peers' own kernel buffers cannot absorb a stalled transfer, so
    a sender that stops is stopped by the gateway's backpressure (whose own
    socket buffers stay autotuned, as in production).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if sockbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sockbuf)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sockbuf)
    if listening:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((LOOPBACK, 0))
    sock.setblocking(False)
    return sock


@contextlib.asynccontextmanager
async def client(gateway: Gateway, path: str, sockbuf: int) -> Any:
    """A websockets client connected through the gateway (no compression, no pings)."""
    sock = peer_socket(sockbuf)
    try:
        await asyncio.wait_for(
            asyncio.get_running_loop().sock_connect(sock, (LOOPBACK, gateway.port)), 10
        )
    except BaseException:
        sock.close()
        raise
    async with ws_connect(
        gateway.url(path),
        sock=sock,
        max_size=None,
        compression=None,
        ping_interval=None,
        open_timeout=10,
        close_timeout=5,
    ) as ws:
        yield ws


class Bench:
    def __init__(
        self, sizes: Sizes, workdir: Path, concurrency: int, sockbuf: int, churn_rounds: int = 1
    ) -> None:
        self.sizes, self.workdir, self.concurrency = sizes, workdir, concurrency
        self.sockbuf, self.churn_rounds = sockbuf, max(1, churn_rounds)
        self.pattern = os.urandom(max(sizes.message, sizes.slow_chunk))
        self.upstream = Upstream(self.pattern, sockbuf)
        self.results: list[dict[str, Any]] = []
        #: gateways being stopped in the background, with their results
        self._stopping: list[tuple[dict[str, Any], Gateway, asyncio.Future]] = []

    def spawn_gateway(self) -> tuple[Gateway, asyncio.Future]:
        """A new gateway process and the task that waits for it to listen."""
        gateway = Gateway(self.upstream.port, max(self.sizes.message, 16 * MiB), self.workdir)
        return gateway, asyncio.ensure_future(gateway.start())

    async def warm_up(self, gateway: Gateway) -> None:
        """Use every path once (imports, buffers, resolver threads), then let it settle."""
        for _ in range(self.sizes.warmups):
            async with client(gateway, "/echo", self.sockbuf) as ws:
                for size in (10, 64 * KiB, MiB):
                    await ws.send(message(0, size, self.pattern))
                    await asyncio.wait_for(ws.recv(), 10)
            await self.cycle(gateway, "refused")
            await self.cycle(gateway, "upstream_drop")
            await self.cycle(gateway, "client_drop")
            await gateway.healthz()
        await self.wait_idle(gateway, 10)
        await asyncio.sleep(0.3)

    async def run_all(self, scenarios: list[tuple[str, Any]]) -> None:
        """
        Each measurement on a fresh gateway (``--quick``: one gateway for all).
        The next gateway starts while the current one is measured (start-up is
        a second or two of imports; its memory is its own), and each is
        stopped in the background afterwards.
        """
        if not self.sizes.fresh_gateways:
            gateway, starting = self.spawn_gateway()
            await starting
            await self.warm_up(gateway)
            results = []
            try:
                for name, scenario in scenarios:
                    results.append(await self.measure(name, scenario, gateway))
                    await self.wait_idle(gateway, 10)
            finally:
                stopping = asyncio.ensure_future(asyncio.to_thread(gateway.stop))
            self._stopping += [(result, gateway, stopping) for result in results]
            return
        spawned = self.spawn_gateway()
        for i, (name, scenario) in enumerate(scenarios):
            gateway, starting = spawned
            await starting
            if i + 1 < len(scenarios):
                spawned = self.spawn_gateway()
            try:
                await self.warm_up(gateway)
                result = await self.measure(name, scenario, gateway)
            finally:
                stopping = asyncio.ensure_future(asyncio.to_thread(gateway.stop))
            self._stopping.append((result, gateway, stopping))

    async def measure(self, name: str, scenario: Any, gateway: Gateway) -> dict[str, Any]:
        started = time.monotonic()
        try:
            result = await asyncio.wait_for(scenario(gateway), self.sizes.scenario_timeout_s)
        except (asyncio.TimeoutError, ConnectionClosed, OSError) as e:
            result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        verdict = "ok" if result["ok"] else "FAILED"
        took = time.monotonic() - started
        print(f"  {name}: {verdict} ({took:.1f} s)", file=sys.stderr, flush=True)
        return {"name": name, **result}

    async def finish(self) -> None:
        """Wait for every gateway to exit; a gateway that did not exit cleanly fails its row."""
        for result, gateway, stopping in self._stopping:
            code = await stopping
            result["gateway_exit"] = code
            result["gateway_tracebacks"] = dict(gateway.errors)
            # twistd ends with the signal that stopped it: -SIGTERM is a clean stop too.
            if code not in (0, -signal.SIGTERM):
                result["ok"] = False
                result["gateway_log_tail"] = list(gateway.lines)[-20:]
            self.results.append(result)
        self._stopping.clear()

    # 1. one large message

    async def big_echo(self, gateway: Gateway) -> dict[str, Any]:
        data = message(0, self.sizes.message, self.pattern)
        async with client(gateway, "/echo", self.sockbuf) as ws:
            async def send() -> bool:
                await ws.send(data)
                return await asyncio.wait_for(ws.recv(), 60) == data

            return await self.peak(gateway, send, "client -> upstream (echo) -> client")

    async def big_down(self, gateway: Gateway) -> dict[str, Any]:
        size = self.sizes.message
        flow_id, _ = self.upstream.new_flow(size, size)
        async with client(gateway, f"/source?id={flow_id}", self.sockbuf) as ws:
            async def receive() -> bool:
                return check_message(await asyncio.wait_for(ws.recv(), 60), 0, size, self.pattern)

            return await self.peak(gateway, receive, "upstream -> client")

    async def big_up(self, gateway: Gateway) -> dict[str, Any]:
        size = self.sizes.message
        flow_id, flow = self.upstream.new_flow(size, size)
        async with client(gateway, f"/sink?id={flow_id}", self.sockbuf) as ws:
            async def send() -> bool:
                await ws.send(message(0, size, self.pattern))
                await asyncio.wait_for(flow.finished.wait(), 60)
                return flow.intact and flow.received == size

            return await self.peak(gateway, send, "client -> upstream")

    async def peak(self, gateway: Gateway, transfer: Any, direction: str) -> dict[str, Any]:
        baseline = gateway.rss()
        hwm_reset = gateway.reset_peak()
        hwm_before = gateway.memory()["VmHWM"]
        started = time.monotonic()
        with RssSampler(gateway) as sampler:
            intact = await transfer()
        elapsed = time.monotonic() - started
        hwm_after = gateway.memory()["VmHWM"]
        peak = max(hwm_after, sampler.max_rss) if hwm_reset else sampler.max_rss
        return {
            "ok": bool(intact),
            "kind": "message",
            "direction": direction,
            "bytes": self.sizes.message,
            "baseline_rss": baseline,
            "hwm_before": hwm_before,
            "hwm_after": hwm_after,
            "hwm_reset": hwm_reset,
            "sampled_max_rss": sampler.max_rss,
            "peak_growth": peak - baseline,
            "seconds": round(elapsed, 3),
            "intact": bool(intact),
        }

    # 2 and 3. slow readers

    async def slow_down(self, gateway: Gateway) -> dict[str, Any]:
        sizes = self.sizes
        flow_id, flow = self.upstream.new_flow(sizes.slow_total, sizes.slow_chunk)
        baseline = gateway.rss()
        gateway.reset_peak()
        with RssSampler(gateway) as sampler:
            async with client(gateway, f"/source?id={flow_id}", self.sockbuf) as ws:
                # The client reads nothing: websockets stops reading its socket
                # once max_queue frames wait in its buffer.
                stalled = await self.wait_stall(lambda: flow.sent, flow)
                paused_max = sampler.max_rss
                got, seq, intact = 0, 0, True
                deadline = time.monotonic() + sizes.scenario_timeout_s / 2
                while got < sizes.slow_total and time.monotonic() < deadline:
                    data = await asyncio.wait_for(ws.recv(), 30)
                    intact &= check_message(data, seq, sizes.slow_chunk, self.pattern)
                    got += len(data)
                    seq += 1
        return self.slow_result(
            "upstream -> client", baseline, sampler, paused_max, stalled, got, intact
        )

    async def slow_up(self, gateway: Gateway) -> dict[str, Any]:
        sizes = self.sizes
        flow_id, flow = self.upstream.new_flow(sizes.slow_total, sizes.slow_chunk, hold=True)
        baseline = gateway.rss()
        gateway.reset_peak()
        with RssSampler(gateway) as sampler:
            async with client(gateway, f"/sink?id={flow_id}", self.sockbuf) as ws:
                sent = [0]

                async def send_all() -> None:
                    for seq in range(sizes.slow_total // sizes.slow_chunk):
                        await ws.send(message(seq, sizes.slow_chunk, self.pattern))
                        sent[0] += sizes.slow_chunk

                sender = asyncio.ensure_future(send_all())
                try:
                    stalled = await self.wait_stall(lambda: sent[0], sender)
                    paused_max = sampler.max_rss
                    flow.released.set()
                    await asyncio.wait_for(flow.finished.wait(), sizes.scenario_timeout_s / 2)
                    await sender
                finally:
                    sender.cancel()
        return self.slow_result(
            "client -> upstream", baseline, sampler, paused_max, stalled, flow.received, flow.intact
        )

    async def wait_stall(self, progress: Any, finished: Any) -> dict[str, Any]:
        """Wait until the sender makes no progress for ``stall_s`` (or finishes, or ``hold_s``)."""
        sizes = self.sizes
        started = last_change = time.monotonic()
        last, stalled = progress(), False
        while time.monotonic() - started < sizes.hold_s:
            await asyncio.sleep(0.05)
            now, value = time.monotonic(), progress()
            if isinstance(finished, Flow) and finished.finished.is_set():
                break
            if isinstance(finished, asyncio.Future) and finished.done():
                break
            if value != last:
                last, last_change = value, now
            elif now - last_change >= sizes.stall_s:
                stalled = True
                break
        sent = progress()
        return {
            "throttled": stalled and sent < sizes.slow_total,
            "sent_while_paused": sent,
            "seconds_to_stall": round(last_change - started, 3),
        }

    def slow_result(
        self,
        direction: str,
        baseline: int,
        sampler: RssSampler,
        paused_max: int,
        stalled: dict[str, Any],
        received: int,
        intact: bool,
    ) -> dict[str, Any]:
        total = self.sizes.slow_total
        complete = received == total and intact
        return {
            "ok": bool(stalled["throttled"] and complete),
            "kind": "slow_reader",
            "direction": direction,
            "bytes": total,
            "message_size": self.sizes.slow_chunk,
            "baseline_rss": baseline,
            "max_rss_paused": paused_max,
            "max_rss": sampler.max_rss,
            "growth_paused": paused_max - baseline,
            "peak_growth": sampler.max_rss - baseline,
            **stalled,
            "received": received,
            "intact": bool(intact),
        }

    # 4. churn

    KINDS = ("clean", "client_drop", "upstream_drop", "refused")

    async def cycle(self, gateway: Gateway, kind: str) -> bool:
        """One open/close cycle; True when the client saw what the kind promises."""
        if kind == "refused":
            try:
                async with client(gateway, "/refuse", self.sockbuf):
                    return False
            except InvalidStatus as e:
                return e.response.status_code == 403
        path = "/drop" if kind == "upstream_drop" else "/echo"
        async with client(gateway, path, self.sockbuf) as ws:
            await ws.send(b"ping")
            if kind == "upstream_drop":
                try:
                    await asyncio.wait_for(ws.recv(), 10)
                    return False
                except ConnectionClosed as e:
                    return e.rcvd is not None and e.rcvd.code == 1014
            echoed = await asyncio.wait_for(ws.recv(), 10) == b"ping"
            if kind == "client_drop":
                ws.transport.abort()
                return echoed
            await ws.close()
            return echoed and ws.close_code == 1000

    async def churn(self, gateway: Gateway) -> dict[str, Any]:
        cycles = self.sizes.cycles
        baseline = gateway.rss()
        closes_before = collections.Counter(self.upstream.closes)
        outcomes = {kind: collections.Counter() for kind in self.KINDS}
        checkpoints: list[tuple[int, int]] = [(0, baseline)]
        rounds: list[dict[str, Any]] = []
        for round_no in range(self.churn_rounds):
            if round_no:
                # Longer than the relay's 5 s close-handshake timers, so what
                # the previous round left pending has been released.
                await asyncio.sleep(ROUND_PAUSE_S)
            before = gateway.rss()
            started = time.monotonic()
            await self.churn_round(gateway, outcomes, checkpoints if round_no == 0 else [])
            elapsed = time.monotonic() - started
            idle = await self.wait_idle(gateway, 20)
            await asyncio.sleep(0.3)
            after = gateway.rss()
            rounds.append({"seconds": round(elapsed, 3), "before_rss": before, "after_rss": after, **idle})
        half = min(checkpoints, key=lambda c: abs(c[0] - cycles // 2))
        all_ok = all(set(c) <= {"ok"} for c in outcomes.values())
        closes = collections.Counter(self.upstream.closes)
        closes.subtract(closes_before)
        first = rounds[0]
        return {
            "ok": bool(all(r["idle"] for r in rounds) and all_ok),
            "kind": "churn",
            "cycles": cycles,
            "concurrency": self.concurrency,
            "seconds": first["seconds"],
            "baseline_rss": baseline,
            "half_rss": half[1],
            "after_rss": first["after_rss"],
            "peak_growth": first["after_rss"] - baseline,
            "checkpoints": checkpoints,
            "rounds": rounds,
            "outcomes": {k: dict(v) for k, v in outcomes.items()},
            "upstream_saw_close": {f"{path} {code}": n for (path, code), n in sorted(
                closes.items(), key=str) if n},
            **{k: v for k, v in rounds[-1].items() if k not in ("seconds", "before_rss", "after_rss")},
        }

    async def churn_round(
        self,
        gateway: Gateway,
        outcomes: dict[str, collections.Counter],
        checkpoints: list[tuple[int, int]],
    ) -> None:
        cycles = self.sizes.cycles
        counter = itertools.count()
        done = [0]

        async def worker() -> None:
            for i in iter(lambda: next(counter), None):
                if i >= cycles:
                    return
                kind = self.KINDS[i % len(self.KINDS)]
                try:
                    ok = await asyncio.wait_for(self.cycle(gateway, kind), 15)
                    outcomes[kind]["ok" if ok else "unexpected"] += 1
                except (asyncio.TimeoutError, ConnectionClosed, InvalidStatus, OSError) as e:
                    outcomes[kind][type(e).__name__] += 1
                done[0] += 1
                if done[0] % max(1, cycles // 10) == 0:
                    checkpoints.append((done[0], gateway.rss()))

        await asyncio.gather(*(worker() for _ in range(self.concurrency)))

    async def wait_idle(self, gateway: Gateway, timeout: float) -> dict[str, Any]:
        """Poll until the gateway and the upstream count no connection (or ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            health = await gateway.healthz()
            counts = {
                "healthz_websockets": health["websockets"],
                "healthz_handshakes": health["handshakes"],
                "upstream_open": self.upstream.open,
                "upstream_connections": self.upstream.connections(),
            }
            idle = not any(counts.values())
            if idle or time.monotonic() > deadline:
                return {"idle": idle, **counts}
            await asyncio.sleep(0.05)


# -- report ---------------------------------------------------------------------


def mib(n: int) -> str:
    return f"{n / MiB:.1f}"


def table(results: list[dict[str, Any]]) -> str:
    rows = [
        "| measurement | payload | gateway RSS before (MiB) | RSS growth (MiB) | checks |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r and "kind" not in r:
            rows.append(f"| {r['name']} | | | | FAILED: {r['error']} |")
            continue
        if r["kind"] == "message":
            what = f"one message, {r['direction']}"
            payload = f"{mib(r['bytes'])} MiB"
            growth = f"peak +{mib(r['peak_growth'])}"
            checks = f"{'intact' if r['intact'] else 'CORRUPT'}, {r['seconds']} s"
        elif r["kind"] == "slow_reader":
            what = f"slow reader, {r['direction']}"
            payload = f"{mib(r['bytes'])} MiB in {r['message_size'] // KiB} KiB msgs"
            growth = f"max +{mib(r['peak_growth'])} (paused +{mib(r['growth_paused'])})"
            throttle = (
                f"sender stalled at {mib(r['sent_while_paused'])} MiB"
                if r["throttled"]
                else "NOT throttled"
            )
            arrived = "all bytes arrived" if r["received"] == r["bytes"] and r["intact"] else (
                f"LOST: {mib(r['received'])} MiB arrived, intact={r['intact']}"
            )
            checks = f"{throttle}; {arrived}"
        else:
            what = f"{r['cycles']} open/close cycles ({r['concurrency']} at a time)"
            payload = "clean / client drop / upstream drop / 403"
            growth = f"+{mib(r['peak_growth'])} (at half: +{mib(r['half_rss'] - r['baseline_rss'])})"
            for i, rnd in enumerate(r["rounds"][1:], 2):
                growth += f"; round {i}: +{mib(rnd['after_rss'] - rnd['before_rss'])}"
            counts = (
                f"healthz {r['healthz_websockets']}/{r['healthz_handshakes']}, "
                f"upstream {r['upstream_open']}"
            )
            bad = {k: v for k, v in r["outcomes"].items() if set(v) - {"ok"}}
            saw = ", ".join(f"{k}: {v}" for k, v in r["upstream_saw_close"].items())
            checks = f"{counts}; {r['seconds']} s; upstream got close {saw}"
            checks += f"; UNEXPECTED {bad}" if bad else ""
        if not r["ok"]:
            checks = "FAILED: " + checks
        if r.get("gateway_tracebacks"):
            checks += f"; gateway logged {sum(r['gateway_tracebacks'].values())} tracebacks"
        rows.append(f"| {what} | {payload} | {mib(r['baseline_rss'])} | {growth} | {checks} |")
    return "\n".join(rows)


async def main(args: argparse.Namespace) -> int:
    sizes = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="ws_memory-") as tmp:
        bench = Bench(sizes, Path(tmp), args.concurrency, args.peer_sockbuf, args.churn_rounds)
        await bench.upstream.start()
        try:
            print(f"ws_memory ({'quick' if args.quick else 'full'}):", file=sys.stderr, flush=True)
            await bench.run_all(
                [
                    ("message_echo", bench.big_echo),
                    ("message_upstream_to_client", bench.big_down),
                    ("message_client_to_upstream", bench.big_up),
                    ("slow_reader_upstream_to_client", bench.slow_down),
                    ("slow_reader_client_to_upstream", bench.slow_up),
                    ("churn", bench.churn),
                ]
            )
        finally:
            await bench.finish()
            await bench.upstream.stop()
    report = {
        "mode": "quick" if args.quick else "full",
        "sizes": asdict(sizes),
        "concurrency": args.concurrency,
        "peer_sockbuf": args.peer_sockbuf,
        "churn_rounds": args.churn_rounds,
        "python": platform.python_version(),
        "versions": _versions(),
        "results": bench.results,
        "ok": all(r["ok"] for r in bench.results),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(bench.results))
    print(f"\nwritten to {out}")
    return 0 if report["ok"] else 1


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("twisted", "autobahn", "websockets")}


def _kill_children() -> None:
    for proc in _CHILDREN:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--out", default=str(RESULTS), help="where the JSON goes")
    parser.add_argument("--concurrency", type=int, default=8, help="churn cycles run at once")
    parser.add_argument(
        "--churn-rounds",
        type=int,
        default=1,
        help=f"repeat the churn after {ROUND_PAUSE_S:.0f} s pauses: a leak grows every round",
    )
    parser.add_argument(
        "--peer-sockbuf",
        type=int,
        default=64 * KiB,
        help="SO_SNDBUF/SO_RCVBUF of the peers' sockets, 0 for the kernel's autotuning",
    )
    # A SIGTERM (a test runner's timeout) still runs the finally below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        status = asyncio.run(main(parser.parse_args()))
    except Exception as e:
        print(f"ws_memory: error: {type(e).__name__}: {e}", file=sys.stderr)
        status = 2
    finally:
        _kill_children()
    sys.exit(status)
