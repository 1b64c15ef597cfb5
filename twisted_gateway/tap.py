"""
``twistd wsgateway``: command-line options and ``makeService``.

The only module that touches the global reactor and the process's limits
(``RLIMIT_NOFILE`` is raised here, by :mod:`twisted_gateway.limits`' rules).
A bad config raises :class:`~twisted_gateway.schema.ConfigError`, a
``usage.UsageError``: twistd prints the options' usage and then one line
(file, section, key, reason) and exits 1, never with a traceback.
"""

from __future__ import annotations

import gc
import sys
from typing import TYPE_CHECKING

from twisted.logger import Logger

from twisted_gateway import _bases, logs
from twisted_gateway.config import Settings, config_warnings, load_config
from twisted_gateway.limits import (
    LOW_OPEN_FILES,
    UNLIMITED_CEILING,
    fallback,
    plan_open_files,
    websocket_room,
)

if TYPE_CHECKING:
    from types import FrameType

    from twisted.application.service import IService
    from twisted.internet.interfaces import IReactorCore, IReactorFromThreads, IReactorProcess, IReactorTCP

    from twisted_gateway.service import GatewayService, ServingReactor
    from twisted_gateway.workers import WorkerEnvironment

    class ProcessReactor(ServingReactor, IReactorCore, IReactorTCP, IReactorProcess, IReactorFromThreads):
        """The process's reactor as this module uses it: every reactor ``twistd`` installs provides all of these."""

log = Logger()


class Options(_bases.Options):
    synopsis = "[options]"
    longdesc = "Run the gateway configured by an INI file (default ./tap.cfg)."
    optParameters = [["config", "c", "tap.cfg", "Path to the config file."]]
    optFlags = [
        ["check", None, "Validate the config, print it (secrets masked) and exit, like nginx -t."]
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, description: str) -> None:
        """Listen on this endpoint (repeatable; replaces [gateway] listen)."""
        self["listen"].append(description)

    def postOptions(self) -> None:
        """Load the config; a bad one raises ConfigError, a ``usage.UsageError`` twistd reports."""
        settings = load_config(self["config"])
        if self["listen"]:
            from twisted_gateway.config import with_listen

            settings = with_listen(settings, self["listen"])
        if self["check"]:
            from twisted_gateway.config import describe_settings

            sys.stdout.write(describe_settings(settings) + "\n")
            for warning in config_warnings(settings):
                sys.stdout.write(f"wsgateway: warning: {warning}\n")
            sys.stdout.write(f"wsgateway: {self['config']}: configuration OK\n")
            raise SystemExit(0)
        self["settings"] = settings


def makeService(options: Options) -> IService:
    from twisted.internet import reactor as installed

    # twisted.internet types its reactor with the interfaces every reactor has in common only
    reactor: ProcessReactor = installed  # type: ignore[assignment]

    from twisted_gateway import allocator, workers
    from twisted_gateway.gateway import build_gateway
    from twisted_gateway.service import GatewayService

    settings: Settings = options["settings"]
    # twistd's text log: the same lines, made for a fraction of the access event's cost
    reactor.callWhenRunning(_speed_up_log)
    env = workers.worker_environment()
    if env is None and workers.worker_count(settings.gateway.workers) > 1:
        return _supervisor(settings, reactor)
    if env is None:
        for warning in config_warnings(settings):
            log.warn("{warning}", warning=warning, event="config_warning")
    open_files = _raise_open_files(settings.gateway.max_open_files)
    # The real parts: the forwarder, the upstream connector and the authenticator on this reactor.
    gateway = build_gateway(settings, reactor)
    service = GatewayService(
        gateway, reactor, open_files=open_files, inherited_fds=env.listen_fds if env else None
    )
    if env is None:  # one process: SIGHUP hands over to a new one (worker_handover.py)
        from twisted_gateway.worker_handover import Handover

        Handover(reactor, service, workers.worker_command(sys.argv), lambda: _reload(settings)).install()
    else:
        logs.label_process(env.number)
        workers.die_with_supervisor()
        if env.channel_fd is not None:
            gateway.cluster.join_workers(env.channel_fd)
        _share_worker_stats(service, env, reactor)
        reactor.callWhenRunning(_report_ready, service, env)
    log.info(
        "open files limit {limit}: room for about {room} WebSockets (2 descriptors each); "
        "max_client_connections {cap}",
        limit=open_files,
        room=websocket_room(open_files, service.reserved_files),
        cap=service.front_door.limits.cap,
        event="open_files",
    )
    if open_files < LOW_OPEN_FILES:
        log.warn(
            "the open files limit {limit} is below {low}: raise the hard limit "
            "(LimitNOFILE= in a systemd unit, ulimit -Hn) to hold more WebSockets",
            limit=open_files,
            low=LOW_OPEN_FILES,
        )
    reactor.callWhenRunning(_handle_sigterm, reactor, service if env is not None else None)
    # Everything alive once started (modules, settings, the resource tree) lives
    # as long as the process: leave it out of the collector's full passes, which
    # otherwise rescan it all (tens of ms each, a pause for every connection).
    reactor.callWhenRunning(gc.freeze)
    allocator.fix_mmap_threshold()
    trimmer = allocator.Trimmer.for_glibc(reactor)
    if trimmer is not None:
        reactor.callWhenRunning(trimmer.start)
        reactor.addSystemEventTrigger("before", "shutdown", trimmer.stop)
    return service


def _supervisor(settings: Settings, reactor: ProcessReactor) -> IService:
    """``workers > 1``: a supervisor that binds the listeners and runs the workers."""
    from twisted.application.service import MultiService

    from twisted_gateway import workers
    from twisted_gateway.service import ListeningService
    from twisted_gateway.worker_hub import Hub

    logs.label_process("supervisor")
    for warning in config_warnings(settings):
        log.warn("{warning}", warning=warning, event="config_warning")
    top = MultiService()
    if settings.demo.chat_service:
        from twisted_gateway.demo.chat import build_chat_site

        ListeningService(
            reactor, settings.demo.chat_service, build_chat_site(reactor), "demo chat-service"
        ).setServiceParent(top)
    gateway = settings.gateway
    workers.Supervisor(
        reactor,
        [*gateway.listen, *settings.admin.listen],
        workers.worker_count(gateway.workers),
        workers.worker_command(sys.argv),
        stop_timeout=gateway.drain_delay + gateway.drain_timeout + 5,
        hub=Hub(reactor) if settings.cluster is None else None,
        reload=lambda: _reload(settings),
    ).setServiceParent(top)
    reactor.callWhenRunning(_handle_sigterm, reactor)
    return top


def _speed_up_log() -> None:
    from twisted.logger import globalLogPublisher

    from twisted_gateway._compat import log_observers
    from twisted_gateway.access_log import speed_up_text_observers

    speed_up_text_observers(log_observers(globalLogPublisher))


def _share_worker_stats(service: GatewayService, env: WorkerEnvironment, reactor: ProcessReactor) -> None:
    """A worker's /metrics, /healthz and /readyz answer for every worker (``worker_stats.py``)."""
    from twisted_gateway.metrics import GatewayCollector
    from twisted_gateway.worker_stats import WorkerStats

    if env.state_dir is None:
        return
    gateway = service.gateway
    stats = WorkerStats(env.state_dir, env.number, env.workers, GatewayCollector(gateway.metrics), reactor)
    stats.setServiceParent(gateway)
    gateway.worker_stats = stats
    service.resource.metrics_page.registry = stats.registry()


def _reload(running: Settings) -> Settings:
    """
    The config as a SIGHUP finds it (raises ConfigError): what the new
    workers will read. The listeners and the worker count stay as started.
    """
    settings = load_config(running.source)
    for name in ("listen", "workers"):
        if getattr(settings.gateway, name) != getattr(running.gateway, name):
            log.warn(
                "SIGHUP: [gateway] {key} changed: it takes effect at the next full restart",
                key=name,
                event="reload_warning",
            )
    if settings.admin.listen != running.admin.listen:
        log.warn("SIGHUP: [admin] listen changed: it takes effect at the next full restart", event="reload_warning")
    return settings


def _report_ready(service: GatewayService, env: WorkerEnvironment) -> None:
    from twisted.internet.defer import DeferredList

    from twisted_gateway.workers import report_ready

    ports = [listener.when_listening() for listener in service.listeners]
    DeferredList(ports).addCallback(lambda _: report_ready(env))


def _raise_open_files(wanted: int | None) -> int:
    """
    Raise the soft ``RLIMIT_NOFILE`` to the hard limit (or to ``wanted``,
    ``[gateway] max_open_files``, where the system allows it); the limit in force.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    plan = plan_open_files(soft, hard, wanted, resource.RLIM_INFINITY)
    for attempt in (plan, fallback(plan, hard, resource.RLIM_INFINITY)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (attempt.soft, attempt.hard))
        except (ValueError, OSError):
            continue
        if attempt.note is not None:
            log.warn("{note}", note=attempt.note)
        break
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else UNLIMITED_CEILING


def _handle_sigterm(reactor: ProcessReactor, service: GatewayService | None = None) -> None:
    """
    SIGTERM drains and exits 0 (twistd's own handler re-raises the signal, so
    the exit status would be -15); a second SIGTERM exits at once. A worker's
    SIGUSR1 (its supervisor's rolling restart) drains the same way but closes
    WebSockets with 1012 "service restart"; a SIGTERM during that drain lets
    it finish.
    """
    import os
    import signal

    from twisted_gateway.service import SERVICE_RESTART

    received: list[int] = []

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        if received and received[0] == signal.SIGUSR1:
            return
        if received:
            os._exit(0)
        received.append(signum)
        reactor.callFromThread(reactor.stop)

    signal.signal(signal.SIGTERM, on_sigterm)
    if service is None:
        return
    serving = service

    def on_sigusr1(signum: int, frame: FrameType | None) -> None:
        if received:
            return
        received.append(signum)
        serving.close_code = SERVICE_RESTART
        reactor.callFromThread(reactor.stop)

    signal.signal(signal.SIGUSR1, on_sigusr1)
