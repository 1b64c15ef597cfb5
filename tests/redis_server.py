"""
A real ``redis-server`` for the cluster tests: Debian's package, on a free
loopback port, persistence off, stopped (or killed and restarted) by its PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess

import pytest

from tests.processes import free_port
from tests.support import settle_blocking

#: Only against a server that never comes up; no speed expectation.
GUARD = 30


class RedisServer:
    """One redis-server process; :meth:`kill` and :meth:`start` again keep its port."""

    def __init__(
        self, directory: str, tls: tuple[str, str, str] | None = None, client: tuple[str, str] | None = None
    ) -> None:
        self.port = free_port()
        self.directory = directory
        #: (certificate, key, CA) PEM paths: TLS only (``rediss://``)
        self.tls = tls
        #: (certificate, key) of a client the CA issued: clients must show one; without, they need none
        self.client = client
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        ports = ["--port", str(self.port)]
        if self.tls is not None:
            cert, key, ca = self.tls
            ports = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", cert,
                     "--tls-key-file", key, "--tls-ca-cert-file", ca,
                     "--tls-auth-clients", "yes" if self.client else "no"]
        self.process = subprocess.Popen(
            [binary, *ports, "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.directory, "--loglevel", "warning"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        settle_blocking(self._started, f"redis-server answering on port {self.port}", GUARD)

    def _started(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"redis-server exited with {self.process.returncode}")
        try:
            return self._pong()
        except OSError:
            return False

    def _pong(self) -> bool:
        return self.command("PING").startswith(b"+PONG")

    def command(self, *words: str) -> bytes:
        """One inline command on a connection of its own: the start of the reply (``:20\\r\\n``)."""
        s = socket.create_connection(("127.0.0.1", self.port), timeout=1)
        if self.tls is not None:
            context = ssl.create_default_context(cafile=self.tls[2])
            if self.client is not None:
                context.load_cert_chain(*self.client)
            s = context.wrap_socket(s, server_hostname="127.0.0.1")
        with s:
            s.sendall(" ".join(words).encode() + b"\r\n")
            return s.recv(256)

    def kill(self) -> None:
        """SIGKILL, as a crash: nothing is saved, every connection drops."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(GUARD)
        self.process = None


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(str(tmp_path))
    server.start()
    try:
        yield server
    finally:
        server.kill()
