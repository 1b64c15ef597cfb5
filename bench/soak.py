"""
The gateway under a seeded storm of faults: does it keep serving, and give everything back?

A real ``twistd wsgateway`` in front of four upstream processes (two demo
chat-services, two HTTP + WebSocket echoes, ``soak_upstream.py``), a load
generator in this process (``soak_load.py``) and a seeded fault schedule
(``soak_faults.py``): clients that abort at every stage, slow readers, clients
that never answer pings, bad frames, oversized messages, expiring tokens,
upstreams killed with SIGKILL and restarted, answers reset after their head
or later than ``request_timeout``. Afterwards the gateway must be back where it
started (``soak_checks.py`` says what is checked); the report is written to
``bench/results/soak-<time>.{md,json}`` (and ``soak-latest.*``) and printed.

    .venv/bin/python bench/soak.py [--quick] [--seed N] [--storm SECONDS]

``make soak`` runs about 10 minutes, ``make soak-quick`` about 90 seconds.
Exit status: 0 when every check held, 1 otherwise, 2 on a crash.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from twisted.internet import reactor  # noqa: E402
from twisted.internet.defer import Deferred  # noqa: E402
from twisted.internet.threads import deferToThread  # noqa: E402
from twisted.web.client import Agent  # noqa: E402

import soak_checks  # noqa: E402
from soak_faults import schedule  # noqa: E402
from soak_load import Limits, Load, Profile, read_body, sleep, within  # noqa: E402
from targets import BENCH, Gateway, Lines, memory, spawn, stop_all, stop_process, wait_for_log  # noqa: E402

SECRET = "soak-secret-0123456789-0123456789-abcdef"
RESULTS = BENCH / "results"

#: The gateway's settings under test (the expectations read them from here).
CONFIG = """\
[gateway]
listen = tcp:0:interface=127.0.0.1
connect_timeout = 2
ws_open_timeout = 3
request_timeout = {request_timeout}
ws_max_message_size = {max_message}
ws_ping_interval = {ping_interval}
ws_ping_timeout = {ping_timeout}
client_body_timeout = 10
drain_timeout = 2

[auth]
algorithms = HS256
secret = {secret}
leeway = 0

[route:chat]
prefix = /v1/chat
upstream = {chat}
auth = required
fail_timeout = {fail_timeout}
health_check = /v1/chat/rooms
health_interval = {health_interval}

[route:echo]
prefix = /v1/echo
upstream = {echo}
auth = required
fail_timeout = {fail_timeout}
health_check = /health
health_interval = {health_interval}
"""
SETTINGS = {
    "request_timeout": 3.0,
    "max_message": 1024 * 1024,
    "ping_interval": 2.0,
    "ping_timeout": 5.0,
    "fail_timeout": 5.0,
    "health_interval": 1.0,
}

FULL = Profile()
QUICK = Profile(chat_sessions=60, echo_sessions=8, churn_per_s=12, http_per_s=30, session_life=(10, 40))
#: What a run must reach: the issue's bar for the full run, a tenth-ish for the quick one.
MINIMUMS = {
    "full": {"open_websockets_median": 200, "messages": 100_000, "handshakes": 20_000, "http_requests": 50_000},
    "quick": {"open_websockets_median": 50, "messages": 5_000, "handshakes": 500, "http_requests": 1_500},
}


class Upstream:
    """One upstream process; it can be killed and started again on the same port."""

    def __init__(self, kind: str, name: str, workdir: Path) -> None:
        self.kind, self.name, self.route, self.workdir = kind, name, kind, workdir
        self.port = 0
        self.proc: Any = None

    def _command(self) -> list[str]:
        listen = f"tcp:{self.port}:interface=127.0.0.1"
        return [sys.executable, str(BENCH / "soak_upstream.py"), "--kind", self.kind, "--name", self.name, "--listen", listen]

    def start(self) -> None:
        """Start and wait until listening (blocking: before the reactor, or in a thread)."""
        self.proc = spawn(self._command(), self.workdir)
        lines = Lines(self.proc)
        event = lines.wait_for(lambda line: line.startswith("{") and json.loads(line), 30)
        if event.get("event") != "listening":
            raise RuntimeError(f"{self.name} did not start: {event}")
        self.port = event["port"]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


class Harness:
    def __init__(
        self, mode: str, seed: int, storm: float, workdir: Path, trace_memory: bool = False,
        probe_memory: bool = False,
    ) -> None:
        self.mode, self.seed, self.storm_s, self.workdir = mode, seed, storm, workdir
        self.trace_memory, self.probe_memory = trace_memory, probe_memory
        self.upstreams = [Upstream(k, f"{k}{i}", workdir) for k in ("chat", "echo") for i in (1, 2)]
        self.by_url: dict[str, Upstream] = {}
        self.gateway: Any = None
        self.port = 0
        self.agent = Agent(reactor)  # not persistent: the harness holds no connection between scrapes
        self.record: dict[str, Any] = {
            "mode": mode,
            "seed": seed,
            "config": dict(SETTINGS),
            "kills": [],
            "slow_answers": [],
            "open_samples": [],
            "minimums": MINIMUMS[mode],
        }
        self.up_samples: list[tuple[float, dict[str, bool]]] = []
        self.rss_samples: list[tuple[float, int]] = []

    # -- processes (blocking, before the reactor runs)

    def start(self) -> None:
        for upstream in self.upstreams:
            upstream.start()
        self.by_url = {u.url: u for u in self.upstreams}
        config = self.workdir / "soak.cfg"
        urls = {k: " ".join(u.url for u in self.upstreams if u.kind == k) for k in ("chat", "echo")}
        config.write_text(CONFIG.format(secret=SECRET, **SETTINGS, **urls))
        self.log = self.workdir / "gateway.log"
        twistd = Gateway.twistd()
        if self.trace_memory or self.probe_memory:
            os.environ["SOAK_MEMORY_DIR"] = str(self.workdir)
            os.environ["SOAK_MEMORY_MODE"] = "trace" if self.trace_memory else "probe"
            twistd = [sys.executable, str(BENCH / "soak_memory.py")]
        command = [*twistd, "--logger", "twisted_gateway.logs.json_observer", "-n", "--pidfile="]
        self.gateway = spawn([*command, "wsgateway", "--config", str(config)], self.workdir, log=self.log)

        def listening(line: str) -> int | None:
            try:
                event = json.loads(line)
            except ValueError:
                return None
            return event.get("port") if event.get("event") == "listening" else None

        self.port = wait_for_log(self.log, self.gateway, listening, 60)

    # -- reading the gateway

    async def get(self, path: str) -> bytes:
        response = await within(self.agent.request(b"GET", f"http://127.0.0.1:{self.port}{path}".encode()), 15)
        return await within(read_body(response), 15)

    async def metrics(self) -> dict[str, Any]:
        text = (await self.get("/metrics")).decode()
        out: dict[str, Any] = {"http": {}, "handshakes": {}, "failures": {}, "up": {}, "messages": 0,
                               "closes": 0, "open": 0}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                name, labels, value = s.name, s.labels, int(s.value)
                if name == "wsgateway_http_requests_total":
                    key = f"{labels['route']} {labels['status']}"
                    out["http"][key] = out["http"].get(key, 0) + value
                elif name == "wsgateway_ws_handshakes_total":
                    out["handshakes"][labels["outcome"]] = out["handshakes"].get(labels["outcome"], 0) + value
                elif name == "wsgateway_ws_messages_total":
                    out["messages"] += value
                elif name == "wsgateway_ws_closes_total":
                    out["closes"] += value
                elif name == "wsgateway_ws_open":
                    out["open"] += value
                elif name == "wsgateway_upstream_up":
                    out["up"][labels["upstream"]] = bool(value)
                elif name == "wsgateway_upstream_failures_total":
                    key = f"{self.by_url[labels['upstream']].name} {labels['reason']}"
                    out["failures"][key] = out["failures"].get(key, 0) + value
                elif name in ("wsgateway_reactor_delayed_calls", "wsgateway_http_in_flight",
                              "wsgateway_ws_handshakes_in_progress"):
                    out[name.removeprefix("wsgateway_").replace("reactor_", "")] = value
        return out

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.gateway.pid}/fd"))

    def rss(self) -> int:
        return memory(self.gateway.pid)["VmRSS"]

    async def state(self) -> dict[str, int]:
        """The gateway's holdings now: the smallest of a few samples (a health check may be in flight)."""
        samples = []
        for _ in range(5):
            m = json.loads(await self.get("/healthz"))
            g = await self.metrics()
            samples.append({
                "pairs": m["websockets"],
                "handshakes": m["handshakes"],
                "handshakes_in_progress": g["ws_handshakes_in_progress"],
                "http_in_flight": g["http_in_flight"],
                "delayed_calls": g["delayed_calls"],
                "fds": self.fds(),
                "rss": self.rss(),
            })
            await sleep(0.4)
        return {key: min(s[key] for s in samples) for key in samples[0]}

    # -- the run

    async def run(self) -> None:
        await sleep(3)  # health checks have run, the upstreams are up
        self.record["baseline"] = await self.state()
        instances = {k: [u.name for u in self.upstreams if u.kind == k] for k in ("chat", "echo")}
        faults = schedule(self.seed, self.storm_s, instances, per_minute=3.0 if self.mode == "full" else 6.0)
        self.record["faults"] = [f.as_dict() for f in faults]
        load = Load(self.port, SECRET, FULL if self.mode == "full" else QUICK, Limits(
            max_message=int(SETTINGS["max_message"]),
            ping_interval=SETTINGS["ping_interval"],
            ping_timeout=SETTINGS["ping_timeout"],
            request_timeout=SETTINGS["request_timeout"],
        ), self.seed)
        start = time.time()
        self.record["storm"] = {"start": start, "end": start + self.storm_s}
        load.start(ramp=min(10.0, self.storm_s / 6))
        calls = [reactor.callLater(f.at, self.inject, load, f) for f in faults]
        sampling = Deferred.fromCoroutine(self.sample(start + self.storm_s, start + min(10.0, self.storm_s / 6)))
        await sleep(self.storm_s)
        for call in calls:
            if call.active():
                call.cancel()
        await sampling
        self.record["storm"]["end"] = time.time()
        if self.trace_memory:  # at the same load as the mid-storm snapshot
            self.record["memory"] = await self.memory_evidence()
        self.record["tasks_left"] = await load.stop()
        await self.finish_kills()
        # Quiet: the upstreams close idle pooled connections after 2 s; health checks go on.
        for _ in range(60):
            held = json.loads(await self.get("/healthz"))
            if held["websockets"] == 0 and held["handshakes"] == 0:
                break
            await sleep(0.5)
        await sleep(5)
        self.record["final"] = await self.state()
        mid = self.record["storm"]["start"] + self.storm_s / 2
        self.record["rss"] = {
            "mid": min((abs(t - mid), r) for t, r in self.rss_samples)[1] if self.rss_samples else 0,
            "end": self.record["final"]["rss"],
            "samples": self.rss_samples[:: max(1, len(self.rss_samples) // 120)],
        }
        self.record["metrics"] = await self.metrics()
        self.record["tally"] = load.tally.as_dict()
        if self.probe_memory:
            (self.workdir / "collect").touch()
            self.probe()
            await sleep(1)
            path = self.workdir / "memory.jsonl"
            self.record["memory_probe"] = [json.loads(x) for x in path.read_text().splitlines()]

    def probe(self) -> None:
        """Ask the gateway for a memory probe line (``--probe-memory``)."""
        os.kill(self.gateway.pid, signal.SIGUSR2)

    async def memory_evidence(self) -> dict[str, Any]:
        """The storm's last tracemalloc snapshot (RSS trimmed after it) against mid-storm's."""
        import tracemalloc

        (self.workdir / "trim").touch()
        os.kill(self.gateway.pid, signal.SIGUSR2)
        lines: list[dict] = []
        for _ in range(240):
            path = self.workdir / "memory.jsonl"
            lines = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
            if len(lines) >= 2:
                break
            await sleep(0.5)
        if len(lines) < 2:
            return {"error": "no memory snapshots"}
        mid, end = (tracemalloc.Snapshot.load(str(self.workdir / f"snapshot-{n}")) for n in (0, 1))
        growth = sorted(end.compare_to(mid, "lineno"), key=lambda stat: -stat.size_diff)[:12]
        return {
            "mid": lines[0],
            "end": lines[1],
            "top_growth": [[str(stat.traceback), stat.size_diff, stat.size, stat.count_diff] for stat in growth],
        }

    async def sample(self, until: float, ramped: float) -> None:
        """Every 0.5 s: open pairs, which instances are up, RSS (and a memory snapshot at mid-storm)."""
        mid = self.record["storm"]["start"] + self.storm_s / 2
        while time.time() < until:
            now = time.time()
            if self.trace_memory and now >= mid:
                os.kill(self.gateway.pid, signal.SIGUSR2)
                mid = float("inf")
            try:
                m = await self.metrics()
            except Exception:
                m = None
            if m is not None:
                if now >= ramped:
                    self.record["open_samples"].append(m["open"])
                self.up_samples.append((now, {self.by_url[u].name: up for u, up in m["up"].items()}))
                self.note_back(now, m["up"])
            self.rss_samples.append((now, self.rss()))
            if self.probe_memory and len(self.rss_samples) % 10 == 0:
                self.probe()
            await sleep(0.5)

    def note_back(self, now: float, up: dict[str, bool]) -> None:
        for kill in self.record["kills"]:
            if kill.get("restarted_at") and kill.get("back_at") is None:
                if all(up.get(u.url) for u in self.upstreams if u.name == kill["target"]):
                    kill["back_at"] = now

    def inject(self, load: Load, fault) -> None:
        if fault.kind == "kill":
            Deferred.fromCoroutine(self.kill(fault))
        elif fault.kind == "slow_answer":
            self.record["slow_answers"].append({"at": time.time()})
            load.spawn(load.slow_answer())
        else:
            load.inject(fault.kind)

    async def kill(self, fault) -> None:
        upstream = next(u for u in self.upstreams if u.name == fault.target)
        entry = {"target": upstream.name, "route": upstream.route, "killed_at": time.time(), "down_for": fault.down_for}
        self.record["kills"].append(entry)
        upstream.kill()
        await sleep(fault.down_for)
        await deferToThread(upstream.start)
        entry["restarted_at"] = time.time()

    async def finish_kills(self) -> None:
        """Wait (a bounded time) for instances restarted near the end to be seen back in service."""
        for _ in range(40):
            if all(k.get("back_at") for k in self.record["kills"]):
                return
            self.note_back(time.time(), (await self.metrics())["up"])
            await sleep(0.5)

    def stop(self) -> None:
        """SIGTERM the gateway, stop the upstreams, read the gateway's log."""
        self.record["gateway_exit"] = stop_process(self.gateway, timeout=30)
        for upstream in self.upstreams:
            stop_process(upstream.proc, timeout=5)
        problems, count, ejections = [], 0, []
        names = {u.url: u.name for u in self.upstreams}
        for line in self.log.read_text(errors="replace").splitlines():
            count += 1
            if any(bad in line for bad in soak_checks.BAD_LOG_TEXT):
                problems.append(line)
            if '"is down' not in line and "is down:" not in line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            reason = event.get("reason", "")
            causes = []
            if "health check" in reason:
                causes.append("health_check")
            elif "(" in reason:
                for part in reason.split("(", 1)[1].split(")", 1)[0].split(","):
                    causes.append(part.strip().rsplit(" x", 1)[0].replace(" ", "_"))
            at = datetime.datetime.fromisoformat(event["time"]).timestamp()
            ejections.append({"time": at, "instance": names.get(event.get("url"), event.get("url")),
                              "reason": reason, "causes": causes})
        self.record.update(log_problems=problems, log_lines=count, ejections=ejections)


def write_report(record: dict[str, Any]) -> bool:
    checks = soak_checks.run_checks(record)
    text = soak_checks.markdown(record, checks)
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    data = json.dumps(soak_checks.as_json(record, checks), indent=1, default=str)
    for name in (f"soak-{record['mode']}-{stamp}", f"soak-{record['mode']}-latest"):
        (RESULTS / f"{name}.md").write_text(text)
        (RESULTS / f"{name}.json").write_text(data)
    print(text)
    print(f"report: {RESULTS / ('soak-' + record['mode'] + '-latest.md')}")
    return all(c.ok for c in checks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/soak.py", description=__doc__.split("\n")[1])
    parser.add_argument("--quick", action="store_true", help="about 90 s instead of about 10 minutes")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--storm", type=float, help="seconds of load and faults (default: 540, quick 60)")
    parser.add_argument("--trace-memory", action="store_true",
                        help="run the gateway under tracemalloc; compare mid-storm and end (slower)")
    parser.add_argument("--probe-memory", action="store_true",
                        help="sample the gateway's malloc, Python blocks and objects by type every 5 s (cheap)")
    parser.add_argument("--checks", type=Path, metavar="RECORD", help="only check a saved record.json again")
    args = parser.parse_args(argv)
    if args.checks:
        return 0 if write_report(json.loads(args.checks.read_text())) else 1
    mode = "quick" if args.quick else "full"
    storm = args.storm or (60.0 if args.quick else 540.0)
    workdir = Path(tempfile.mkdtemp(prefix="soak-"))
    harness = Harness(mode, args.seed, storm, workdir, args.trace_memory, args.probe_memory)
    outcome: dict[str, Any] = {}

    def done(result):
        if hasattr(result, "getTraceback"):
            outcome["error"] = result.getTraceback()
        reactor.stop()

    try:
        harness.start()
        print(f"soak ({mode}, seed {args.seed}): gateway on port {harness.port}, storm {storm:g} s", flush=True)
        reactor.callWhenRunning(lambda: Deferred.fromCoroutine(harness.run()).addBoth(done))
        reactor.run()
        harness.stop()
        (workdir / "record.json").write_text(json.dumps(harness.record, default=str))
        if "error" in outcome:
            print(outcome["error"], file=sys.stderr)
            print(f"gateway log: {harness.log}", file=sys.stderr)
            return 2
        return 0 if write_report(harness.record) else 1
    except Exception:
        traceback.print_exc()
        return 2
    finally:
        stop_all()


if __name__ == "__main__":
    raise SystemExit(main())
