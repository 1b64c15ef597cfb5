"""
The processes of a benchmark run: the backend, the proxies in front of it, the load.

``run.py`` compares four ways to reach one backend: ``direct`` (no proxy, the
floor), ``nginx``, ``aiohttp`` (the seed's design, ``aiohttp_gateway.py``) and
``gateway`` (``twistd -n wsgateway``). Each proxy is a
foreground child with its own config in a temporary directory, pinned to its
own CPU where ``taskset`` exists, and is measured through ``/proc``: the CPU
time (utime + stime) and the memory (VmRSS, VmHWM) of its whole process tree.
Every child is registered so that nothing outlives the run, whatever happens.
"""

from __future__ import annotations

import collections
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
LOOPBACK = "127.0.0.1"
KiB = 1024

#: The message of the notice printed when nginx cannot be found.
NGINX_MISSING = "nginx not found"
#: ... and when no Python with aiohttp can be found (the ``bench`` extra).
AIOHTTP_MISSING = "aiohttp not installed"

#: Every child started by this run; ``stop_all`` kills what is still alive.
_CHILDREN: list[subprocess.Popen] = []


# -- /proc -------------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants, read from /proc."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        children[ppid].append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, ()))
    return sorted(tree)


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of one process, in bytes."""
    found = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0]) * KiB
    return found


def tree_rss(pids: list[int]) -> int:
    return sum(memory(pid)["VmRSS"] for pid in pids)


def reset_peak(pids: list[int]) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False if not allowed."""
    try:
        for pid in pids:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")
        return True
    except OSError:
        return False


def cpu_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total


def kernel_cpu_lines() -> list[str]:
    with open("/proc/stat") as f:
        return [line.rstrip("\n") for line in f if line.startswith("cpu")]


def listen_overflows() -> int:
    """The kernel's count of SYNs dropped at a full listen queue (TcpExt ListenOverflows)."""
    with open("/proc/net/netstat") as f:
        lines = [line.split() for line in f if line.startswith("TcpExt:")]
    names, values = lines[0], lines[1]
    return int(values[names.index("ListenOverflows")])


def load_average() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


class RssSampler:
    """Samples the summed VmRSS of a process tree every ``interval`` seconds; keeps the max."""

    def __init__(self, pids: list[int], interval: float = 0.005) -> None:
        self.pids, self.interval = pids, interval
        self.max_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.max_rss = max(self.max_rss, tree_rss(self.pids))
            except (OSError, KeyError):
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self.max_rss = tree_rss(self.pids)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


# -- CPU placement -------------------------------------------------------------


class Placement:
    """Which CPUs the proxy gets and which the backend and the load share."""

    def __init__(self, pin: bool = True) -> None:
        cpus = sorted(os.sched_getaffinity(0))
        self.taskset = shutil.which("taskset")
        self.notice = None
        if not pin:
            self.proxy_cpus = self.load_cpus = cpus
            self.notice = "pinning disabled (--no-pin): proxy and load share every CPU"
        elif self.taskset is None or len(cpus) < 2:
            self.proxy_cpus = self.load_cpus = cpus
            why = "taskset not found" if self.taskset is None else "only one CPU"
            self.notice = f"not pinned ({why}): proxy and load share every CPU"
            self.taskset = None
        else:
            self.proxy_cpus, self.load_cpus = cpus[-1:], cpus[:-1]

    def _prefix(self, cpus: list[int]) -> list[str]:
        if self.taskset is None:
            return []
        return [self.taskset, "-c", ",".join(map(str, cpus))]

    def proxy(self) -> list[str]:
        return self._prefix(self.proxy_cpus)

    def load(self) -> list[str]:
        return self._prefix(self.load_cpus)

    def pin_self(self) -> None:
        """Keep this orchestrating process off the proxy's CPU too."""
        if self.taskset is not None:
            os.sched_setaffinity(0, self.load_cpus)

    def describe(self) -> dict[str, Any]:
        return {
            "proxy_cpus": self.proxy_cpus,
            "load_cpus": self.load_cpus,
            "pinned": self.taskset is not None,
            "notice": self.notice,
        }


# -- children --------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)
    return env


def spawn(
    command: list[str], cwd: Path, *, stdin: bool = False, log: Path | None = None
) -> subprocess.Popen:
    """
    Start a child. With ``log``, its output goes straight to that file: a proxy
    writing its logs must never wait for this process to read a pipe.
    """
    out = open(log, "ab") if log is not None else subprocess.PIPE
    try:
        proc = subprocess.Popen(
            command,
            cwd=cwd,
            env=_env(),
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
    finally:
        if log is not None:
            out.close()
    _CHILDREN.append(proc)
    return proc


def _listening(who: str) -> Callable[[str], int | None]:
    """Finds the port in ``WHO listening on HOST (port N)`` (the gateway's and the aiohttp peer's line)."""

    def match(line: str) -> int | None:
        if f"{who} listening on" in line and "(port " in line:
            return int(line.rsplit("(port ", 1)[1].split(")", 1)[0])
        return None

    return match


def wait_for_log(log: Path, proc: subprocess.Popen, match: Callable[[str], Any], timeout: float) -> Any:
    """Poll a child's log file until a line matches; the file's tail in the error."""
    deadline = time.monotonic() + timeout
    seen = 0
    while True:
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        for line in lines[seen:]:
            found = match(line)
            if found:
                return found
        seen = len(lines)
        if proc.poll() is not None or time.monotonic() > deadline:
            why = f"exited with {proc.returncode}" if proc.returncode is not None else f"nothing in {timeout}s"
            raise RuntimeError(f"{why}:\n" + "\n".join(lines[-40:]))
        time.sleep(0.05)


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


def stop_all() -> None:
    """Kill every child still alive (the run's last cleanup)."""
    for proc in _CHILDREN:
        if proc.poll() is None:
            proc.kill()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass


class Lines:
    """A child's output lines, read in a thread; the last ones kept for error messages."""

    def __init__(self, proc: subprocess.Popen, keep: int = 200) -> None:
        self.tail: collections.deque[str] = collections.deque(maxlen=keep)
        self._queue: queue.Queue[str | None] = queue.Queue()
        assert proc.stdout is not None
        threading.Thread(target=self._read, args=(proc.stdout,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            line = line.rstrip("\n")
            self.tail.append(line)
            self._queue.put(line)
        self._queue.put(None)

    def next(self, timeout: float) -> str | None:
        """The next line; None at end of output. Raises ``TimeoutError``."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no output for {timeout}s") from None

    def wait_for(self, match: Callable[[str], Any], timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"not seen within {timeout}s")
            line = self.next(left)
            if line is None:
                raise RuntimeError("the process exited:\n" + "\n".join(self.tail))
            found = match(line)
            if found:
                return found



def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} not listening within {timeout}s")


def node_command() -> str:
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node not found: the backend and the load generator need Node.js")
    return node


def ensure_node_modules() -> None:
    """Install bench/package.json's dependencies (``ws``) into bench/node_modules once."""
    if (BENCH / "node_modules" / "ws" / "package.json").exists():
        return
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm not found: needed once to install `ws` into bench/node_modules")
    subprocess.run(
        [npm, "install", "--silent", "--no-audit", "--no-fund", "--no-package-lock"],
        cwd=BENCH,
        check=True,
        timeout=300,
    )


# -- the backend ------------------------------------------------------------------


class Backend:
    """``node bench/backend.js``: WebSocket echo and a 64-byte HTTP answer, one port."""

    def __init__(self, placement: Placement, workdir: Path) -> None:
        self.placement, self.workdir = placement, workdir
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def start(self) -> None:
        command = [*self.placement.load(), node_command(), str(BENCH / "backend.js")]
        self.proc = spawn(command, self.workdir, stdin=True)
        self.lines = Lines(self.proc)
        event = self.lines.wait_for(_json_event("listening"), 15)
        self.port = event["port"]

    def pids(self) -> list[int]:
        assert self.proc is not None
        return process_tree(self.proc.pid)

    def websockets(self) -> int:
        """How many WebSockets the backend holds open now."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write("count\n")
        self.proc.stdin.flush()
        return self.lines.wait_for(_json_event("count"), 10)["websockets"]

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None and self.proc.stdin is not None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
            except OSError:
                pass
        return stop_process(self.proc, timeout=5)


def _json_event(name: str) -> Callable[[str], dict | None]:
    def match(line: str) -> dict | None:
        if not line.startswith("{"):
            return None
        try:
            event = json.loads(line)
        except ValueError:
            return None
        return event if event.get("event") == name else None

    return match


# -- the targets ------------------------------------------------------------------


class Target:
    """One way to reach the backend. ``lifecycle`` records every start and stop."""

    name = "target"
    is_proxy = True

    def __init__(self, backend: Backend, placement: Placement, workdir: Path) -> None:
        self.backend, self.placement, self.workdir = backend, placement, workdir
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.lifecycle: list[dict[str, Any]] = []

    def start(self) -> None:
        started = time.monotonic()
        self._start()
        self.lifecycle.append(
            {
                "target": self.name,
                "pid": self.proc.pid if self.proc else None,
                "pids": self.pids(),
                "port": self.port,
                "start_s": round(time.monotonic() - started, 3),
                "stopped": False,
                "returncode": None,
            }
        )

    def stop(self) -> None:
        returncode = self._stop()
        if self.lifecycle and not self.lifecycle[-1]["stopped"]:
            self.lifecycle[-1].update(stopped=True, returncode=returncode)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def pids(self) -> list[int]:
        return process_tree(self.proc.pid) if self.proc is not None else []

    def url(self, scheme: str, path: str) -> str:
        return f"{scheme}://{LOOPBACK}:{self.port}{path}"

    def _start(self) -> None:
        raise NotImplementedError

    def _stop(self) -> int | None:
        if self.proc is None:
            return None
        return stop_process(self.proc)


class Direct(Target):
    """Client -> backend: no proxy at all; the floor of the wall-clock figures."""

    name = "direct"
    is_proxy = False

    def _start(self) -> None:
        self.port = self.backend.port


class Nginx(Target):
    """nginx in the foreground: 1 worker, WebSocket upgrade, keep-alive upstream."""

    name = "nginx"
    CONFIG = """\
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile {nofile};
pid {prefix}/nginx.pid;
error_log stderr warn;

events {{
    worker_connections {connections};
}}

http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;

    upstream backend {{
        server {loopback}:{backend_port};
        keepalive 32;
    }}

    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      '';
    }}

    server {{
        listen {loopback}:{port} backlog=4096;

        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }}
    }}
}}
"""

    def __init__(self, binary: str, *args: Any) -> None:
        super().__init__(*args)
        self.binary = binary

    @staticmethod
    def find(explicit: str | None) -> str | None:
        """The nginx binary: ``--nginx PATH``, else on PATH, else /usr/sbin/nginx."""
        candidates = [explicit] if explicit else [shutil.which("nginx"), "/usr/sbin/nginx"]
        for candidate in candidates:
            if candidate and os.access(candidate, os.X_OK):
                return candidate
        return None

    def version(self) -> str:
        out = subprocess.run([self.binary, "-v"], capture_output=True, text=True, timeout=10)
        return (out.stderr or out.stdout).strip()

    def _start(self) -> None:
        prefix = self.workdir / "nginx"
        prefix.mkdir(exist_ok=True)
        for attempt in range(3):
            self.port = free_port()
            config = prefix / "nginx.conf"
            config.write_text(
                self.CONFIG.format(
                    prefix=prefix,
                    nofile=65536,
                    connections=16384,
                    loopback=LOOPBACK,
                    backend_port=self.backend.port,
                    port=self.port,
                )
            )
            command = [*self.placement.proxy(), self.binary, "-p", str(prefix), "-c", str(config)]
            command += ["-e", "stderr"]
            log = prefix / "error.log"
            self.proc = spawn(command, prefix, log=log)
            try:
                wait_port(self.port, self.proc, 15)
            except RuntimeError:
                if attempt == 2:
                    raise RuntimeError("nginx did not start:\n" + log.read_text(errors="replace"))
                continue  # the free port was taken meanwhile: try another
            # One master and its one worker, both up.
            deadline = time.monotonic() + 10
            while len(self.pids()) < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            return

    def _stop(self) -> int | None:
        if self.proc is None:
            return None
        return stop_process(self.proc, signal.SIGQUIT)


class Aiohttp(Target):
    """The seed's design, ``bench/aiohttp_gateway.py``: aiohttp server and ClientSession."""

    name = "aiohttp"

    def __init__(self, python: str, *args: Any) -> None:
        super().__init__(*args)
        self.python = python

    @staticmethod
    def find() -> str | None:
        """A Python that can import aiohttp: the venv's, else this one; None if neither can."""
        for candidate in (ROOT / ".venv" / "bin" / "python", Path(sys.executable)):
            if candidate.exists() and subprocess.run(
                [str(candidate), "-c", "import aiohttp"], capture_output=True, timeout=60
            ).returncode == 0:
                return str(candidate)
        return None

    def version(self) -> str:
        out = subprocess.run([self.python, "-c", "import aiohttp; print(aiohttp.__version__)"],
                             capture_output=True, text=True, timeout=60)
        return f"aiohttp {out.stdout.strip()}"

    def _start(self) -> None:
        command = [*self.placement.proxy(), self.python, str(BENCH / "aiohttp_gateway.py")]
        command += ["--upstream", f"http://{LOOPBACK}:{self.backend.port}"]
        self.log = self.workdir / f"aiohttp-{len(self.lifecycle)}.log"
        self.proc = spawn(command, self.workdir, log=self.log)

        try:
            self.port = wait_for_log(self.log, self.proc, _listening("aiohttp gateway"), 60)
        except RuntimeError as e:
            raise RuntimeError(f"the aiohttp gateway did not start: {e}") from None


def gateway_lines(keys: Iterable[str], workdir: Path) -> str:
    """``KEY=VALUE`` items as ``[gateway]`` lines; ``{workdir}`` in a value is the run's directory."""
    lines = []
    for item in keys:
        key, _, value = item.partition("=")
        lines.append(f"{key.strip()} = {value.strip().replace('{workdir}', str(workdir))}\n")
    return "".join(lines)


class Gateway(Target):
    """``twistd -n --pidfile= wsgateway --config FILE``, ready when it logs its port."""

    name = "gateway"
    SECRET = "bench-secret-0123456789-0123456789-abcdef"
    CONFIG = """\
[gateway]
listen = tcp:0:interface={loopback}{listen_arguments}
ws_max_message_size = {max_size}
drain_timeout = 2
{gateway_keys}

[auth]
algorithms = HS256
secret = {secret}
query_param = token

; Figure 3's auth = required variant; everything else goes through route:echo.
[route:auth]
prefix = /auth
upstream = http://{loopback}:{backend_port}
websocket = true
auth = required

[route:echo]
prefix = /
upstream = http://{loopback}:{backend_port}
websocket = true
auth = none
{cluster}"""

    #: With ``--cluster``: the per-user cap below is counted in Redis, one call per handshake.
    CLUSTER = """
[cluster]
redis = {redis_url}
node_id = bench-gateway
"""
    #: With ``--cluster`` or ``--cap``: figure 3's per-user cap variant.
    CAPPED = """
[route:capped]
prefix = /capped
upstream = http://{loopback}:{backend_port}
websocket = true
auth = required
max_websockets_per_user = 1000000
"""

    def __init__(
        self,
        *args: Any,
        twistd: str | None = None,
        backlog: int | None = None,
        redis_url: str | None = None,
        gateway_keys: Iterable[str] = (),
        capped: bool = False,
        variant: str = "",
    ) -> None:
        """``variant``: a suffix for the config and log file names, when a run has several gateways."""
        super().__init__(*args)
        self.redis_url = redis_url
        self.command = [twistd] if twistd else self.twistd()
        #: None: the gateway's default (the system's maximum); else an explicit listen backlog.
        self.backlog = backlog
        self.variant = variant + ("" if backlog is None else f"-backlog{backlog}")
        self.config = self.workdir / f"gateway{self.variant}.cfg"
        self.config.write_text(
            self.CONFIG.format(
                listen_arguments="" if backlog is None else f":backlog={backlog}",
                loopback=LOOPBACK,
                max_size=32 * 1024 * 1024,
                secret=self.SECRET,
                backend_port=self.backend.port,
                gateway_keys=gateway_lines(gateway_keys, self.workdir),
                cluster=(self.CLUSTER.format(redis_url=redis_url) if redis_url else "")
                + (self.CAPPED.format(loopback=LOOPBACK, backend_port=self.backend.port)
                   if redis_url or capped else ""),
            )
        )

    @staticmethod
    def twistd() -> list[str]:
        for candidate in (ROOT / ".venv" / "bin" / "twistd", Path(sys.executable).with_name("twistd")):
            if candidate.exists():
                return [str(candidate)]
        return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]

    def token(self) -> str:
        """A token for the ``/auth`` route, minted as an operator would."""
        out = subprocess.run(
            [sys.executable, "-m", "twisted_gateway.token", "--config", str(self.config)]
            + ["--sub", "bench", "--ttl", "3600"],
            capture_output=True,
            text=True,
            cwd=self.workdir,
            env=_env(),
            timeout=60,
            check=True,
        )
        return out.stdout.strip()

    def _start(self) -> None:
        command = [*self.placement.proxy(), *self.command, "-n", "--pidfile=", "wsgateway"]
        command += ["--config", str(self.config)]
        self.log = self.workdir / f"gateway{self.variant}-{len(self.lifecycle)}.log"
        self.proc = spawn(command, self.workdir, log=self.log)

        try:
            self.port = wait_for_log(self.log, self.proc, _listening("wsgateway"), 60)
        except RuntimeError as e:
            raise RuntimeError(f"the gateway did not start: {e}") from None


# -- the load generator -----------------------------------------------------------


class Load:
    """One run of ``node bench/load.js CONFIG``: its JSON events, and replies on stdin."""

    def __init__(self, placement: Placement, workdir: Path, config: dict[str, Any]) -> None:
        command = [*placement.load(), node_command(), str(BENCH / "load.js"), json.dumps(config)]
        self.proc = spawn(command, workdir, stdin=True)
        self.lines = Lines(self.proc)
        self.timeout = float(config.get("timeout_s", 60)) + 15

    def events(self) -> Iterator[dict[str, Any]]:
        deadline = time.monotonic() + self.timeout
        try:
            while True:
                line = self.lines.next(max(0.1, deadline - time.monotonic()))
                if line is None:
                    raise RuntimeError(
                        f"the load generator exited ({self.proc.wait(5)}) without a result:\n"
                        + "\n".join(self.lines.tail)
                    )
                if not line.startswith("{"):
                    continue
                event = json.loads(line)
                if event.get("event") == "error":
                    raise RuntimeError(f"the load generator failed: {event.get('error')}")
                yield event
                if event.get("event") == "result":
                    return
        finally:
            stop_process(self.proc, timeout=10)

    def reply(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
