"""
``[gateway] workers = N``: one ``twistd wsgateway`` on every core.

A small supervisor binds the listening sockets and runs N worker processes,
each a whole gateway that adopts them (``IReactorSocket.adoptStreamPort``);
traffic never passes through the supervisor. Each worker has its own *slot*:
TCP listeners get one ``SO_REUSEPORT`` socket per slot, all bound to the same
address, so the kernel spreads new connections over the workers by hash
instead of waking every worker for every connection (one shared queue fills
the busiest worker first). The supervisor keeps every slot's sockets open: a
worker that dies leaves its queue to its replacement, which adopts the same
sockets, and no connection waiting in it is reset. ``unix:`` and ``systemd:``
listeners are one socket shared by every slot.

A worker that dies is replaced at once; :data:`CRASH_LOOP` failed starts of
one slot in a row stop the gateway with one line (a crash loop must not
spin). A failed start is a worker that died before it was ready, however long
it took (as systemd and supervisord count start failures: a loaded machine
slows a failing start down, it does not make it a success), or one that died
within :data:`QUICK_DEATH` s of starting.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, Sequence

from twisted.internet import fdesc
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger

from twisted.internet import tcp
from twisted.internet.defer import succeed
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IProcessTransport,
    IProtocolFactory,
    IReactorSocket,
    IStreamServerEndpoint,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_gateway._bases import Service
from twisted_gateway.deferreds import when_done
from twisted_gateway.tls import (
    listen_backlog,
    listener_tls,
    parse_tls_listener,
    split_description,
    system_listen_backlog,
)

if TYPE_CHECKING:
    from twisted_gateway.worker_hub import Hub

log = Logger()


class SupervisorReactor(Protocol):
    """What the supervisor asks of its reactor: time, processes, a signal's thread hop, stopping."""

    def seconds(self) -> float: ...

    def callLater(self, delay: float, callable: Callable[..., object], *args: object) -> IDelayedCall: ...

    def callFromThread(self, callable: Callable[..., object], *args: object) -> None: ...

    def spawnProcess(
        self,
        processProtocol: ProcessProtocol,
        executable: str,
        args: Sequence[str],
        env: Mapping[str, str] | None = None,
        path: str | None = None,
        uid: int | None = None,
        gid: int | None = None,
        usePTY: bool = False,
        childFDs: Mapping[int, int | str] | None = None,
    ) -> IProcessTransport: ...

    def addSystemEventTrigger(
        self, phase: str, eventType: str, callable: Callable[..., object], *args: object
    ) -> object: ...

    def stop(self) -> None: ...

#: Environment of a worker: its number, the inherited listening descriptors
#: (in the order of ``[gateway] listen`` then ``[admin] listen``), the
#: descriptor it reports readiness on, and how many workers there are.
WORKER_ENV = "WSGATEWAY_WORKER"
LISTEN_FDS_ENV = "WSGATEWAY_LISTEN_FDS"
CONTROL_FD_ENV = "WSGATEWAY_CONTROL_FD"
CHANNEL_FD_ENV = "WSGATEWAY_CHANNEL_FD"
WORKERS_ENV = "WSGATEWAY_WORKERS"
STATE_DIR_ENV = "WSGATEWAY_STATE_DIR"
#: The worker's end of its control pipe; inherited listeners follow it.
CONTROL_FD = 3
#: A worker that dies this soon after starting, ready or not, counts towards a crash loop.
QUICK_DEATH = 5.0
#: This many failed starts in a row of one slot stop the gateway.
CRASH_LOOP = 5
#: Seconds before a dead worker is replaced (well under the promised 1 s).
RESPAWN_DELAY = 0.1
#: Seconds a rolling restart's new worker has to become ready before it is given up.
READY_TIMEOUT = 30.0
#: The line a finished rolling restart logs.
RESTART_DONE = "rolling restart done: {count} new workers"


def worker_count(setting: int | str) -> int:
    """``[gateway] workers``: a number, or ``auto``: one per CPU this process may run on."""
    if setting == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not Linux
            return max(1, os.cpu_count() or 1)
    return int(setting)


def is_worker() -> bool:
    """Whether this process is a worker started by a supervisor."""
    return WORKER_ENV in os.environ


@dataclass(frozen=True)
class WorkerEnvironment:
    """What a worker learns from its supervisor."""

    number: int
    workers: int
    listen_fds: tuple[int, ...]
    control_fd: int
    #: the worker's end of its link to the supervisor's hub (worker_hub), if any
    channel_fd: int | None = None
    #: where the workers publish their metrics and the supervisor its state (``worker_stats.py``)
    state_dir: str | None = None


def worker_environment(environ: Mapping[str, str] | None = None) -> WorkerEnvironment | None:
    """This process's :class:`WorkerEnvironment`, or None outside a supervisor."""
    if environ is None:
        environ = os.environ
    if WORKER_ENV not in environ:
        return None
    fds = environ.get(LISTEN_FDS_ENV, "")
    return WorkerEnvironment(
        number=int(environ[WORKER_ENV]),
        workers=int(environ.get(WORKERS_ENV, "1")),
        listen_fds=tuple(int(fd) for fd in fds.split(",") if fd),
        control_fd=int(environ.get(CONTROL_FD_ENV, CONTROL_FD)),
        channel_fd=int(environ[CHANNEL_FD_ENV]) if environ.get(CHANNEL_FD_ENV) else None,
        state_dir=environ.get(STATE_DIR_ENV),
    )


def report_ready(env: WorkerEnvironment) -> None:
    """Tell the supervisor this worker accepts connections."""
    try:
        os.write(env.control_fd, b"ready\n")
    except OSError:
        pass  # the supervisor is gone; PR_SET_PDEATHSIG ends this worker


def die_with_supervisor() -> None:
    """SIGTERM this worker when its supervisor dies (Linux), so no worker is left orphaned."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# -- the sockets ------------------------------------------------------------


def bind_listener(description: str, port: int | None = None) -> socket.socket:
    """
    A listening socket for one endpoint description, ``SO_REUSEPORT`` for
    TCP (``port`` overrides the description's: the second slot of ``tcp:0``
    binds the port the first one got). ``systemd:`` returns the inherited
    socket.
    """
    args, kwargs = split_description(description)
    kind = args[0]
    if kind == "ssl":
        listener = parse_tls_listener(description)
        assert listener is not None
        return _tcp(listener.interface, listener.port if port is None else port, listen_backlog(description, system_listen_backlog()))
    if kind in ("tcp", "tcp6"):
        number = int(args[1] if len(args) > 1 else kwargs["port"])
        interface = kwargs.get("interface", "::" if kind == "tcp6" else "")
        return _tcp(interface, number if port is None else port, listen_backlog(description, system_listen_backlog()))
    if kind == "unix":
        path = args[1] if len(args) > 1 else kwargs["address"]
        if os.path.exists(path) and not os.path.isdir(path):
            os.unlink(path)  # a socket left by a previous run, as Twisted's unix: does
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        if "mode" in kwargs:
            os.chmod(path, int(kwargs["mode"], 8))
        sock.listen(int(kwargs.get("backlog", system_listen_backlog() or 50)))
        return sock
    if kind == "systemd":
        from twisted_gateway._compat import systemd_listen_fds

        fds = systemd_listen_fds()
        if "name" in kwargs:
            fd = fds.inheritedNamedDescriptors()[kwargs["name"]]
        else:
            fd = fds.inheritedDescriptors()[int(kwargs.get("index", 0))]
        return socket.socket(fileno=os.dup(fd))
    raise ValueError(f"endpoint {description!r}: {kind}: is not supported with workers > 1")


def _tcp(interface: str, port: int, backlog: int | None) -> socket.socket:
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((interface, port))
    sock.listen(backlog or 50)
    sock.setblocking(False)
    return sock


def shares_one_socket(description: str) -> bool:
    """``unix:`` and ``systemd:`` listeners are one socket for every worker."""
    return split_description(description)[0][0] in ("unix", "systemd")


def bind_slots(descriptions: list[str], count: int) -> list[list[socket.socket]]:
    """``count`` lists of listening sockets, one per description, the slots of the workers."""
    slots: list[list[socket.socket]] = [[] for _ in range(count)]
    for description in descriptions:
        first = bind_listener(description)
        slots[0].append(first)
        port = first.getsockname()[1] if first.family != socket.AF_UNIX else None
        for slot in slots[1:]:
            slot.append(first if shares_one_socket(description) else bind_listener(description, port))
    return slots


@implementer(IStreamServerEndpoint)
class AdoptedEndpoint:
    """
    A worker's listener: the socket its supervisor bound for ``description``
    (inherited as ``fd``), with TLS added for ``ssl:`` as ``tls.server_endpoint`` does.
    """

    def __init__(
        self,
        reactor: IReactorSocket,
        description: str,
        fd: int,
        wrap: Callable[[IProtocolFactory], IProtocolFactory] | None = None,
    ) -> None:
        self.reactor, self.description, self.fd = reactor, description, fd
        self.wrap = wrap if wrap is not None else (lambda factory: factory)
        listener = parse_tls_listener(description)
        self.tls = listener_tls(listener) if listener is not None else None

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        from twisted.protocols.tls import TLSMemoryBIOFactory

        if self.tls is not None:
            factory = TLSMemoryBIOFactory(self.tls, False, factory)
        probe = socket.socket(fileno=os.dup(self.fd))
        family = probe.family
        probe.close()
        # A blocking socket shared by workers would hang one in accept() when another took
        # the connection (unix: and systemd: sockets come blocking); as Twisted's own
        # AdoptedStreamServerEndpoint does. adoptStreamPort duplicates the descriptor: the
        # inherited one can go.
        fdesc.setNonBlocking(self.fd)
        # (typed for a ServerFactory; any factory serves)
        port = self.reactor.adoptStreamPort(self.fd, family, self.wrap(factory))  # type: ignore[arg-type]
        os.close(self.fd)
        if family == socket.AF_UNIX:  # the supervisor's socket file: the next worker's too
            from twisted_gateway._compat import keep_listening_socket

            assert isinstance(port, tcp.Port)  # a unix.Port
            keep_listening_socket(port)
        return succeed(port)


# -- the supervisor ----------------------------------------------------------


class WorkerProcess(ProcessProtocol):
    """One worker: its readiness on the control pipe, its end reported to the supervisor."""

    def __init__(
        self, slot: int, on_ready: Callable[[WorkerProcess], None], on_end: Callable[[WorkerProcess, Failure], None]
    ) -> None:
        self.slot = slot
        self.pid: int | None = None
        self.ready = False
        self.started_at = 0.0
        self.stopping = False
        self.candidate = False
        #: fired when it reports ready (a rolling restart waits on it)
        self.on_ready_once: Deferred[WorkerProcess] | None = None
        self.ended: Deferred[None] = Deferred()
        self._on_ready, self._on_end = on_ready, on_end

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.pid = self.transport.pid

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if b"ready" in data and not self.ready:
            self.ready = True
            self._on_ready(self)
            if self.on_ready_once is not None:
                self.on_ready_once.callback(self)

    def processEnded(self, reason: Failure) -> None:
        self._on_end(self, reason)
        self.ended.callback(None)


def death_reason(reason: Failure) -> str:
    """Why a worker ended, in words (exit status or signal)."""
    value = reason.value
    if isinstance(value, ProcessDone):
        return "exited with status 0"
    if isinstance(value, ProcessTerminated):
        if value.signal is not None:
            try:
                name = signal.Signals(value.signal).name
            except ValueError:
                name = str(value.signal)
            hint = " (SIGKILL: killed by an operator or the out-of-memory killer)" if value.signal == signal.SIGKILL else ""
            return f"killed by {name}{hint}"
        return f"exited with status {value.exitCode}"
    return str(value)


class Supervisor(Service):
    """
    Binds the listeners, keeps ``count`` workers running, and stops them all
    (each drains as a single gateway does on SIGTERM) when it stops.
    """

    def __init__(
        self,
        reactor: SupervisorReactor,
        descriptions: list[str],
        count: int,
        command: list[str],
        stop_timeout: float,
        environ: Mapping[str, str] | None = None,
        hub: Hub | None = None,
        reload: Callable[[], object] | None = None,
        slots: list[list[socket.socket]] | None = None,
    ) -> None:
        """
        ``reload``: on SIGHUP, validates the config the new workers will read
        (raises ``usage.UsageError`` to refuse the restart). ``slots``: sockets
        already listening (a single gateway handing over, ``worker_handover.py``):
        nothing is bound and no worker starts before :meth:`take_over`.
        """
        self.reactor = reactor
        self.descriptions = descriptions
        self.count = count
        self.command = command
        self.stop_timeout = stop_timeout
        self.environ = dict(os.environ if environ is None else environ)
        #: worker_hub.Hub: links the workers when they act as one gateway without Redis
        self.hub = hub
        self.slots: list[list[socket.socket]] = slots or []
        self.adopting = slots is not None
        #: the drain of a single gateway that handed over to this supervisor (:meth:`take_over`)
        self.handing_over: Deferred[None] | None = None
        self.workers: dict[int, WorkerProcess] = {}
        self.failed_starts = [0] * count
        self.restarts = 0
        self._stopping = False
        self._respawns: list[IDelayedCall] = []
        self.state_dir = ""
        self.reload = reload
        self.restarting: Deferred[None] | None = None
        #: every worker process not yet reaped, old ones of a rolling restart included
        self.live: set[WorkerProcess] = set()

    def privilegedStartService(self) -> None:
        if not self.adopting:
            self._bind()
        import tempfile

        self.state_dir = tempfile.mkdtemp(prefix="wsgateway-")
        self._publish()
        super().privilegedStartService()

    @property
    def stopping(self) -> bool:
        return self._stopping

    def _bind(self) -> None:
        try:
            self.slots = bind_slots(self.descriptions, self.count)
        except (OSError, ValueError) as e:
            sys.stderr.write(f"wsgateway: cannot listen with {self.count} workers: {e}\n")
            raise SystemExit(1)
        for description, sock in zip(self.descriptions, self.slots[0]):
            address = sock.getsockname()
            log.info(
                "wsgateway listening on {endpoint} (port {port}), shared by {count} workers",
                endpoint=description,
                port=address[1] if isinstance(address, tuple) else None,
                count=self.count,
                event="listening_shared",
            )

    def _publish(self) -> None:
        """The supervisor's own metrics and how many workers are ready, for the workers' pages."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from twisted_gateway.worker_stats import SUPERVISOR_FILE, families_as_json, write_atomically

        ready = sum(1 for w in self.workers.values() if w.ready and not w.stopping)
        families = [
            CounterMetricFamily(
                "wsgateway_worker_restarts", "Workers that died and were replaced.", value=self.restarts
            ),
            GaugeMetricFamily("wsgateway_workers", "Worker processes configured.", value=self.count),
            GaugeMetricFamily("wsgateway_workers_ready", "Worker processes accepting connections.", value=ready),
        ]
        data = {"worker": "supervisor", "workers": self.count, "ready": ready, "families": families_as_json(families)}
        try:
            write_atomically(os.path.join(self.state_dir, SUPERVISOR_FILE), data)
        except OSError:
            pass

    def startService(self) -> None:
        super().startService()
        if self.adopting:
            return
        for slot in range(self.count):
            self.spawn(slot)
        self.handle_sighup()

    def handle_sighup(self) -> None:
        """SIGHUP is a rolling restart from now on (if the config can be re-read)."""
        if self.reload is not None:
            signal.signal(signal.SIGHUP, lambda signum, frame: self.reactor.callFromThread(self.on_sighup))

    async def take_over(self, drain: Callable[[], Deferred[None]]) -> bool:
        """
        A single gateway hands over (``worker_handover.py``): a worker starts
        on its sockets; once it is ready ``drain`` stops the gateway and this
        supervisor goes on. False if the worker never became ready (the
        gateway keeps serving; stop this supervisor).
        """
        log.info("SIGHUP: starting a new gateway process on the listening sockets", event="rolling_restart")
        if await self.start_successor(0) is None:
            return False
        self.handle_sighup()
        self.handing_over = drain()
        await self.handing_over
        self.handing_over = None
        log.info(RESTART_DONE, count=self.count, event="rolling_restart_done")
        return True

    def on_sighup(self) -> None:
        """SIGHUP: check the config, then replace the workers one at a time."""
        if self._stopping or not sighup_allowed(self.restarting is not None, self.reload, "the workers keep"):
            return
        self.restarting = Deferred.fromCoroutine(self.rolling_restart())
        self.restarting.addErrback(lambda f: log.failure("rolling restart failed", f))
        self.restarting.addBoth(lambda _: setattr(self, "restarting", None))

    async def rolling_restart(self) -> None:
        """
        Slot by slot: a new worker adopts the slot's sockets (both accept from
        the same queues meanwhile, so no connection is refused) and becomes
        ready; then the old one drains (WebSockets get 1012) and exits.
        """
        log.info("SIGHUP: replacing {count} workers one at a time", count=self.count, event="rolling_restart")
        for slot in range(self.count):
            old = self.workers.get(slot)
            if self._stopping or await self.start_successor(slot) is None:
                return
            if old is not None and old.pid is not None:
                old.stopping = True
                self._publish()
                log.info("worker {slot} (pid {pid}) replaced: draining it (1012)", slot=slot, pid=old.pid, event="rolling_restart")
                _signal(old, signal.SIGUSR1)
                # at most its drain (as on SIGTERM to the supervisor), then it is killed
                kill = self.reactor.callLater(self.stop_timeout, _signal, old, signal.SIGKILL)
                await old.ended
                if kill.active():
                    kill.cancel()
        log.info(RESTART_DONE, count=self.count, event="rolling_restart_done")

    async def start_successor(self, slot: int) -> WorkerProcess | None:
        """
        A new worker in ``slot``, on the slot's sockets, once it is ready (it
        takes the slot then); None if it died or was not ready within
        :data:`READY_TIMEOUT` (it is killed, and the one in the slot keeps serving).
        """
        new = self.spawn(slot, candidate=True)
        ready: Deferred[WorkerProcess] = Deferred()
        new.on_ready_once = ready
        # A new worker that is neither ready nor dead in time is stopped: no wait hangs the restart.
        late = self.reactor.callLater(READY_TIMEOUT, _signal, new, signal.SIGKILL)
        waits: list[Deferred[Any]] = [ready, new.ended]  # (DeferredList takes Deferreds of one result type)
        await DeferredList(waits, fireOnOneCallback=True)
        if late.active():
            late.cancel()
        if self._stopping:
            return None
        if not new.ready:
            log.error(
                "rolling restart stopped: the new worker {slot} did not become ready (it died, or"
                " {timeout:g} s passed); the old ones keep serving",
                slot=slot,
                timeout=READY_TIMEOUT,
                event="rolling_restart",
            )
            return None
        new.candidate = False
        self.workers[slot] = new
        self._publish()
        return new

    def spawn(self, slot: int, candidate: bool = False) -> WorkerProcess:
        """
        Start a worker in ``slot``; a ``candidate`` (a rolling restart's) takes
        the slot only once ready, and is not replaced if it dies before.
        """
        worker = WorkerProcess(slot, self._ready, self._ended)
        worker.candidate = candidate
        sockets = self.slots[slot]
        child_fds: dict[int, int | str] = {0: 0, 1: 1, 2: 2, CONTROL_FD: "r"}
        listen_fds = []
        for i, sock in enumerate(sockets):
            fd = CONTROL_FD + 1 + i
            child_fds[fd] = sock.fileno()
            listen_fds.append(str(fd))
        env = dict(
            self.environ,
            **{
                WORKER_ENV: str(slot),
                WORKERS_ENV: str(self.count),
                LISTEN_FDS_ENV: ",".join(listen_fds),
                CONTROL_FD_ENV: str(CONTROL_FD),
                STATE_DIR_ENV: self.state_dir,
            },
        )
        for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
            env.pop(name, None)
        ours = theirs = None
        if self.hub is not None:
            ours, theirs = socket.socketpair()
            channel_fd = CONTROL_FD + 1 + len(sockets)
            child_fds[channel_fd] = theirs.fileno()
            env[CHANNEL_FD_ENV] = str(channel_fd)
        worker.started_at = self.reactor.seconds()
        self.reactor.spawnProcess(worker, self.command[0], self.command, env=env, childFDs=child_fds)
        if ours is not None and theirs is not None and self.hub is not None:
            theirs.close()
            self.hub.attach(ours)
        self.live.add(worker)
        if not candidate:
            self.workers[slot] = worker
        log.info("worker {slot} started (pid {pid})", slot=slot, pid=worker.pid, event="worker_started")
        return worker

    def _ready(self, worker: WorkerProcess) -> None:
        log.info("worker {slot} ready (pid {pid})", slot=worker.slot, pid=worker.pid, event="worker_ready")
        self._publish()

    def _ended(self, worker: WorkerProcess, reason: Failure) -> None:
        from twisted_gateway.worker_stats import retire

        why = death_reason(reason)
        self.live.discard(worker)
        if self.workers.get(worker.slot) is worker:
            del self.workers[worker.slot]
        if worker.pid is not None and self.state_dir:
            retire(self.state_dir, worker.pid)
        self._publish()
        if self._stopping or worker.stopping:
            log.info("worker {slot} (pid {pid}) stopped: {why}", slot=worker.slot, pid=worker.pid, why=why, event="worker_stopped")
            return
        if worker.candidate:
            log.error("new worker {slot} (pid {pid}) {why} before it was ready", slot=worker.slot, pid=worker.pid, why=why)
            return
        lived = self.reactor.seconds() - worker.started_at
        if not worker.ready or lived < QUICK_DEATH:
            self.failed_starts[worker.slot] += 1
        else:
            self.failed_starts[worker.slot] = 0
        self.restarts += 1
        self._publish()
        log.error(
            "worker {slot} (pid {pid}) died after {lived:.1f} s: {why}; starting a new one",
            slot=worker.slot,
            pid=worker.pid,
            lived=lived,
            why=why,
            event="worker_died",
        )
        if self.failed_starts[worker.slot] >= CRASH_LOOP:
            # twistd sends sys.stderr to the log once running: this line is for the operator.
            stderr = sys.__stderr__
            assert stderr is not None  # a supervisor runs with one
            stderr.write(
                f"wsgateway: worker {worker.slot} died before it was ready or within {QUICK_DEATH:g} s of "
                f"starting {CRASH_LOOP} times in a row (last: {why}): stopping the gateway\n"
            )
            stderr.flush()
            self.reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
            self.reactor.callLater(0, self.reactor.stop)
            return
        self._respawns.append(self.reactor.callLater(RESPAWN_DELAY, self.spawn, worker.slot))

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        """SIGTERM every worker (each drains), wait for them, SIGKILL what is left after the timeout."""
        self._stopping = True
        for call in self._respawns:
            if call.active():
                call.cancel()
        workers = list(self.live)
        for worker in workers:
            worker.stopping = True
            _signal(worker, signal.SIGTERM)
        waiting = DeferredList([w.ended for w in workers])

        def kill_all() -> None:
            for w in workers:
                _signal(w, signal.SIGKILL)

        timer = self.reactor.callLater(self.stop_timeout, kill_all)
        await waiting
        if timer.active():
            timer.cancel()
        if self.handing_over is not None:  # the gateway that handed over is still draining: let it finish
            await when_done(self.handing_over)
        for description, sock in zip(self.descriptions, self.slots[0] if self.slots else []):
            if split_description(description)[0][0] == "unix":  # its file, as a single gateway removes it
                try:
                    os.unlink(sock.getsockname())
                except (OSError, TypeError):
                    pass
        for slot in self.slots:
            for sock in slot:
                if sock.fileno() != -1:
                    sock.close()
        if self.state_dir:
            import shutil

            shutil.rmtree(self.state_dir, ignore_errors=True)
        stopped = super().stopService()  # Service's returns None: nothing to wait for
        if stopped is not None:
            await stopped


def sighup_allowed(busy: bool, reload: Callable[[], object] | None, who_keep: str) -> bool:
    """
    Whether a SIGHUP may start a rolling restart: none is running, and the
    config re-reads without an error (else one line: ``who_keep`` serving as they are).
    """
    from twisted.python import usage

    if busy:
        log.warn("SIGHUP: a rolling restart is already running", event="rolling_restart")
        return False
    try:
        if reload is not None:
            reload()
    except usage.UsageError as e:
        log.error(
            "SIGHUP refused: {error}; {who_keep} serving with the config they started with",
            error=str(e),
            who_keep=who_keep,
            event="reload_refused",
        )
        return False
    return True


def _signal(worker: WorkerProcess, signum: int) -> None:
    try:
        worker.transport.signalProcess(signum)  # type: ignore[union-attr]  # None: AttributeError, caught
    except Exception:
        pass  # already gone


def worker_command(argv: list[str]) -> list[str]:
    """
    The command line of a worker: this twistd's own, in the foreground and
    without a pidfile (the supervisor owns those).
    """
    program, rest = argv[0], []
    skip = False
    for i, word in enumerate(argv[1:], 1):
        if skip:
            skip = False
            continue
        if word in ("--pidfile",):
            skip = True
            continue
        if word.startswith("--pidfile="):
            continue
        rest.append(word)
    return [sys.executable, program, "-n", "--pidfile=", *rest]
