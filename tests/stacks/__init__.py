"""
Servers and clients nobody here wrote (socket.io on Node, FastAPI under
uvicorn), started on free loopback ports for the tests that check the
gateway is transparent in front of them. ``make test`` installs them
(npm into ``.tools``, pip through the ``test`` extra).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.processes import free_port
from tests.support import settle_blocking

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
NODE_MODULES = REPO / ".tools" / "node_modules"


def node_env() -> dict[str, str]:
    if not (NODE_MODULES / "socket.io").is_dir() or not (NODE_MODULES / "socket.io-client").is_dir():
        pytest.fail("socket.io is missing: run `make .tools/node_modules/socket.io-client` (make test does)")
    return dict(os.environ, NODE_PATH=str(NODE_MODULES))


def wait_for_port(process: subprocess.Popen, port: int, seconds: float = 30.0) -> None:
    """Until ``port`` accepts connections; a guard against a hang, not a speed limit."""

    def accepting() -> bool:
        if process.poll() is not None:
            pytest.fail(f"{process.args} exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        except OSError:
            return False
        return True

    settle_blocking(accepting, f"{process.args} listening on {port}", seconds)


def start(args: list[str], port: int, env: dict[str, str] | None = None) -> subprocess.Popen:
    process = subprocess.Popen(
        args, cwd=HERE, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_for_port(process, port)
    return process


def socketio_server(name: str, ping_interval_ms: int = 25000) -> tuple[subprocess.Popen, int]:
    port = free_port()
    return start(["node", "socketio_server.js", str(port), name, str(ping_interval_ms)], port, node_env()), port


def uvicorn_server(ws: str = "websockets") -> tuple[subprocess.Popen, int]:
    """``fastapi_app:app`` under uvicorn with the given WebSocket backend."""
    port = free_port()
    args = [sys.executable, "-m", "uvicorn", "fastapi_app:app", "--host", "127.0.0.1",
            "--port", str(port), "--ws", ws, "--log-level", "warning"]
    return start(args, port), port


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
