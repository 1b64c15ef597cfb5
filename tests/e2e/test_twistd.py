"""
``twistd wsgateway`` as an operator runs it: a real process, a real config
file, the demo chat-service behind it and ``wscat`` as the client.

These are plain pytest functions driving subprocesses; every process is killed
in a ``finally``. Timeouts here only stop a hung process from hanging the run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import urllib.request
from pathlib import Path

import pytest

from tests.processes import GUARD, TWISTD, Process, child_env, free_port, twistd_gateway
from tests.support import settle_blocking


REPO = Path(__file__).resolve().parents[2]
LISTENING = re.compile(r"\bwsgateway listening on (\S+) \(port (\d+)\)")
DEMO_LISTENING = re.compile(r"\bdemo chat-service listening on \S+ \(port (\d+)\)")

#: Loopback requests never go through an HTTP proxy from the environment.
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))

ROUTE = """
[route:chat]
prefix = /v1/chat
upstream = http://127.0.0.1:9001
"""


def _wscat_path() -> str:
    found = shutil.which("wscat") or str(REPO / ".tools" / "node_modules" / ".bin" / "wscat")
    if not os.access(found, os.X_OK):
        pytest.fail("wscat is missing: run `make .tools/node_modules/.bin/wscat` (make test does)")
    return found


# -- packaging -----------------------------------------------------------------------


def test_twistd_help_lists_wsgateway():
    """After ``make``'s install step (editable_mode=compat) ``twistd --help`` offers wsgateway."""
    assert TWISTD.exists(), f"{TWISTD} is missing: install the project into this venv"
    # From / and without PYTHONPATH, only the installed package can provide the plugin.
    result = subprocess.run(
        [str(TWISTD), "--help"], capture_output=True, text=True, timeout=GUARD, env=child_env(), cwd="/"
    )
    assert result.returncode == 0, result.stderr
    commands = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("    ")]
    assert "wsgateway" in commands, result.stdout


def test_wsgateway_help_describes_its_options():
    """``twistd wsgateway --help`` names --config and --listen."""
    result = subprocess.run(
        [str(TWISTD), "wsgateway", "--help"], capture_output=True, text=True, timeout=GUARD, env=child_env(), cwd="/"
    )
    assert result.returncode == 0, result.stderr
    assert "--config" in result.stdout and "--listen" in result.stdout


# -- a bad config --------------------------------------------------------------------

#: (case, config text, section, key, a fragment of the reason): one case for each way a
#: bad config reaches twistd's one line (a ConfigError of the parse, an endpoint Twisted
#: cannot parse, an endpoint's file that cannot be read). Every kind of mistake has its
#: row in tests/test_config.py and tests/test_tls.py, through the functions the options call.
BAD_CONFIGS = [
    ("unknown section", "[gatway]\nlisten = tcp:8080\n" + ROUTE, "gatway", None, "unknown section"),
    ("bad endpoint type", "[gateway]\nlisten = tpc:8080\n" + ROUTE, "gateway", "listen", "'tpc:8080'"),
    ("TLS endpoint whose key file is missing", "[gateway]\nlisten = ssl:0:privateKey=missing.pem\n" + ROUTE,
     "gateway", "listen", "missing.pem"),
]


def _start_up_fails(args: list[str], cwd: Path) -> str:
    """Run twistd expecting it to refuse to start; return the line saying why."""
    result = subprocess.run(
        [str(TWISTD), "-n", "--pidfile=", "wsgateway", *args],
        capture_output=True,
        text=True,
        timeout=GUARD,
        env=child_env(),
        cwd=cwd,
    )
    return refusal_line(result)


def refusal_line(result: subprocess.CompletedProcess) -> str:
    """
    twistd's answer to a bad config (a ``usage.UsageError``): exit 1, no
    traceback, nothing on stderr, and on stdout the options' usage, then one
    line ``twistd -n: FILE: [SECTION] KEY: REASON``; that line is returned.
    """
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output, output
    assert result.stderr == "", output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Usage: twistd") and "--config=" in result.stdout, output
    assert lines[-1].startswith(f"{TWISTD} -n: "), output
    return lines[-1]


@pytest.mark.parametrize(
    "text, section, key, reason",
    [case[1:] for case in BAD_CONFIGS],
    ids=[case[0] for case in BAD_CONFIGS],
)
def test_a_bad_config_stops_start_up_with_one_line(tmp_path, text, section, key, reason):
    """Non-zero exit, one stderr line naming file, [section], key and reason, no traceback."""
    config = tmp_path / "gateway.cfg"
    config.write_text(text)
    line = _start_up_fails(["--config", str(config)], tmp_path)
    where = f"{config}: [{section}]" + (f" {key}:" if key else ":")
    assert where in line, line
    assert reason in line.split(where, 1)[1], line


def test_a_missing_config_file_stops_start_up_with_one_line(tmp_path):
    """``--config`` naming no file is one line with the path and the reason."""
    missing = tmp_path / "nowhere.cfg"
    line = _start_up_fails(["--config", str(missing)], tmp_path)
    assert f"{missing}: cannot read: No such file or directory" in line


def test_the_default_config_is_tap_cfg_in_the_current_directory(tmp_path):
    """Without --config, ./tap.cfg is read (here absent: one line naming tap.cfg)."""
    line = _start_up_fails([], tmp_path)
    assert "tap.cfg: cannot read" in line


def test_a_bad_listen_option_stops_start_up_with_one_line(tmp_path):
    """``--listen tpc:0`` is one line naming the option and the endpoint."""
    config = tmp_path / "gateway.cfg"
    config.write_text(ROUTE)
    line = _start_up_fails(["--config", str(config), "--listen", "tpc:0"], tmp_path)
    assert "--listen" in line and "'tpc:0'" in line


# -- the gateway running -------------------------------------------------------------


class _Running:
    """A twistd wsgateway process serving the demo chat-service on loopback."""

    def __init__(self, tmp_path: Path) -> None:
        self.chat_port = free_port()
        self.never = tmp_path / "never.sock"
        config = f"""
[gateway]
; replaced by --listen: this socket must never be created
listen = unix:{self.never}

[route:chat]
prefix = /v1/chat
upstream = http://127.0.0.1:{self.chat_port}

[demo]
chat_service = tcp:{self.chat_port}:interface=127.0.0.1
"""
        self.running = twistd_gateway(tmp_path, config, options=("--listen", "tcp:0:interface=127.0.0.1"))
        self.process, self.log = self.running.process, self.running.out
        self.port = 0

    def wait_until_listening(self) -> None:
        # The demo chat-service is started first, the gateway's listener second.
        assert int(self.log.wait_for(DEMO_LISTENING).group(1)) == self.chat_port
        endpoint, port = self.log.wait_for(LISTENING).groups()
        assert endpoint == "tcp:0:interface=127.0.0.1"
        self.port = int(port)
        assert self.port != 0
        # Listeners start before the reactor runs (and installs its SIGTERM
        # handler): an answer proves the reactor is running.
        assert self.get_json("/healthz")["status"] == "ok"

    def url(self, path: str, scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def get_json(self, path: str) -> dict:
        with _NO_PROXY.open(self.url(path), timeout=GUARD) as response:
            assert response.headers["content-type"].startswith("application/json")
            return json.loads(response.read())

    def terminate(self) -> tuple[int, str]:
        """SIGTERM; then the exit status and the whole log once the process is gone."""
        self.process.send_signal(signal.SIGTERM)
        status = self.process.wait(GUARD)
        return status, self.log.rest()


def _wscat(url: str, *args: str) -> Process:
    """A wscat client that stays connected (-w -1; its stdin is kept open) and prints what it receives."""
    return Process([_wscat_path(), "--no-color", "-c", url, *args, "-w", "-1"])


def _members(gateway: _Running, room: str) -> int:
    rooms = gateway.get_json("/v1/chat/rooms")["rooms"]
    return next((r["members"] for r in rooms if r["room"] == room), 0)


def _wait_for_members(gateway: _Running, room: str, count: int) -> None:
    """Poll the chat-service's room list through the gateway."""
    settle_blocking(lambda: _members(gateway, room) == count, f"room {room!r} with {count} members")


def test_wscat_chats_through_the_gateway_and_sigterm_shuts_it_down_in_order(tmp_path):
    """
    The README's tour: the gateway logs its bound port, two wscat clients in one
    room both receive the broadcast JSON through it, and SIGTERM shuts it down
    without a traceback (the exit status has a test of its own below).
    """
    gateway = _Running(tmp_path)
    clients: list[Process] = []
    try:
        gateway.wait_until_listening()
        assert not gateway.never.exists(), "--listen must replace [gateway] listen"

        listener = _wscat(gateway.url("/v1/chat/ws?room=e2e", "ws"))
        clients.append(listener)
        _wait_for_members(gateway, "e2e", 1)

        sender = _wscat(gateway.url("/v1/chat/ws?room=e2e", "ws"), "-x", "hello through the gateway")
        clients.append(sender)
        json_line = re.compile(r"\{.*\}")
        for client in (sender, listener):
            message = json.loads(client.wait_for(json_line).group(0))
            assert message["room"] == "e2e"
            assert message["from"] == "anonymous"
            assert message["text"] == "hello through the gateway"
            assert isinstance(message["ts"], float)

        for client in clients:
            client.process.terminate()
            client.process.wait(GUARD)
        _wait_for_members(gateway, "e2e", 0)

        _, log = gateway.terminate()
        assert "Traceback" not in log and "Unhandled" not in log, log
        assert "Server Shut Down." in log
    finally:
        for client in clients:
            client.stop()
        gateway.running.stop()


def test_a_token_in_the_query_never_reaches_the_gateways_log(tmp_path):
    """``?token=`` is a credential: neither the access log nor any other line shows it."""
    secret = "e2e-secret-token-4711"
    gateway = _Running(tmp_path)
    try:
        gateway.wait_until_listening()
        assert gateway.get_json(f"/v1/chat/rooms?token={secret}") == {"rooms": []}
        _, log = gateway.terminate()
        assert "/v1/chat/rooms" in log  # the request was logged...
        assert secret not in log, log  # ...without its token
    finally:
        gateway.running.stop()


def test_sigterm_stops_the_gateway_with_exit_status_0(tmp_path):
    """
    A service manager's SIGTERM is a normal stop: an orderly shutdown and exit
    status 0, so supervisors and ``make run`` do not report a failure.
    """
    gateway = _Running(tmp_path)
    try:
        gateway.wait_until_listening()
        status, log = gateway.terminate()
        assert "Server Shut Down." in log
        assert status == 0, f"exit status {status}"
    finally:
        gateway.running.stop()
