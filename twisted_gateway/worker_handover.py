"""
SIGHUP with ``workers = 1``: the gateway starts a new process on its own
listening sockets and, once that one is ready, drains itself and stays on as
its supervisor.

A single process has no parent to start its replacement. Replacing it in
place (a re-exec) would either drop the connections it still serves or change
the pid that systemd, a pidfile and a terminal know. So the first SIGHUP
turns the process into what ``workers = N`` runs, with one worker: a
:class:`~twisted_gateway.workers.Supervisor` is given duplicates of the
listening sockets, starts a worker on them (old and new accept from the same
queues, so no connection is refused), and once the worker is ready the old
gateway drains as on SIGTERM but with 1012 "service restart". The process
keeps its pid and from then on is a supervisor: later SIGHUPs are the
supervisor's rolling restarts, a dead worker is replaced. The demo
chat-service, if any, stays in this process, as with ``workers = N``.
"""

from __future__ import annotations

import os
import signal
import socket
from typing import Callable, TypeVar

from twisted.application.service import IService, MultiService
from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from twisted_gateway import logs
from twisted_gateway._compat import keep_listening_socket
from twisted_gateway.config import Settings
from twisted_gateway.service import SERVICE_RESTART, GatewayService, ListeningService
from twisted_gateway.workers import Supervisor, SupervisorReactor, sighup_allowed

log = Logger()
_T = TypeVar("_T")


class Handover:
    """SIGHUP to a single gateway: hand over to a new process, then supervise it."""

    def __init__(
        self, reactor: SupervisorReactor, gateway: GatewayService, command: list[str], reload: Callable[[], Settings]
    ) -> None:
        """``reload``: the config the new process will read (raises ``usage.UsageError`` to refuse)."""
        self.reactor, self.gateway, self.command, self.reload = reactor, gateway, command, reload
        self.supervisor: Supervisor | None = None
        self.ports: list[tcp.Port] = []
        logs.label_process(None)  # its lines name no writer until it is a supervisor

    def install(self) -> None:
        signal.signal(signal.SIGHUP, lambda signum, frame: self.reactor.callFromThread(self.on_sighup))

    def on_sighup(self) -> None:
        if not sighup_allowed(self.supervisor is not None, self.reload, "the gateway's processes keep"):
            return
        ports = listening_ports(self.gateway)
        if ports is None:
            log.error("SIGHUP refused: the gateway is not listening yet", event="reload_refused")
            return
        self.ports = ports
        sockets = [socket.socket(fileno=os.dup(port.fileno())) for port in ports]
        Deferred.fromCoroutine(self.hand_over(sockets)).addErrback(
            lambda failure: log.failure("rolling restart failed", failure)
        )

    async def hand_over(self, sockets: list[socket.socket]) -> None:
        settings = self.gateway.settings.gateway
        parent = self.gateway.parent
        assert isinstance(parent, MultiService)
        self.supervisor = supervisor = Supervisor(
            self.reactor,
            [*settings.listen, *self.gateway.settings.admin.listen],
            1,
            self.command,
            stop_timeout=settings.drain_delay + settings.drain_timeout + 5,
            reload=self.reload,
            slots=[sockets],
        )
        for demo in [s for s in self.gateway if isinstance(s, ListeningService) and s.role == "demo chat-service"]:
            _move_running(demo, parent)  # the new process is a worker: the demo stays here, listening
        service: IService = supervisor
        service.setServiceParent(parent)
        if await supervisor.take_over(self.drain):
            return
        self.supervisor = None
        if not supervisor.stopping:  # the gateway keeps serving; the next SIGHUP tries again
            stopped: Deferred[None] = service.disownServiceParent()
            await stopped

    def drain(self) -> Deferred[None]:
        """The old gateway stops as on SIGTERM, saying 1012 to its WebSockets; the process goes on."""
        for port in self.ports:  # they close here; the sockets go on in the new process
            keep_listening_socket(port)
        self.gateway.close_code = SERVICE_RESTART
        gateway: IService = self.gateway
        stopped: Deferred[None] | None = gateway.disownServiceParent()
        assert stopped is not None  # its parent is running: this is its stopService
        return stopped.addBoth(self._cut_what_is_left).addBoth(_now_a_supervisor)

    def _cut_what_is_left(self, result: _T) -> _T:
        """
        What outlived the drain (a client that never answered its close) is
        cut, as the end of the process cuts it when a worker drains.
        """
        for pair in list(self.gateway.gateway.registry.pairs):  # the service's Gateway holds them
            for leg in pair.legs():
                if leg.transport is not None:
                    leg.transport.abortConnection()
        self.gateway.site.close_all()
        return result


def _now_a_supervisor(result: _T) -> _T:
    logs.label_process("supervisor")
    return result


def listening_ports(gateway: GatewayService) -> list[tcp.Port] | None:
    """
    The gateway's listening ports, ``[gateway] listen`` then ``[admin] listen``
    (the order a worker adopts their sockets in); None before they all listen.
    """
    admin = [s for s in gateway if isinstance(s, ListeningService) and s.role == "admin"]
    ports: list[IListeningPort] = []
    for listener in [*gateway.listeners, *admin]:
        listener.when_listening().addCallback(ports.append)  # at once when it listens
    sockets = [port for port in ports if isinstance(port, tcp.Port)]  # unix.Port and ssl's are too
    return sockets if len(sockets) == len(gateway.listeners) + len(admin) else None


def _move_running(service: IService, to: MultiService) -> None:
    """
    Give a running service another parent without stopping it
    (``setServiceParent`` would stop and start it, closing its port between).
    """
    old = service.parent
    assert isinstance(old, MultiService)
    old.services.remove(service)
    service.parent = to
    to.services.append(service)
