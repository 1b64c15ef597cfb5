"""
Every file in deploy/ checked by the tool that will read it: promtool for the alert
rules (and their unit test), haproxy -c for the balancer, systemd-analyze for the units,
and ``twistd wsgateway --check`` for the config, started the way systemd starts it
(an inherited listening socket on fd 3, LISTEN_FDS and LISTEN_PID set).
The HAProxy config also runs end to end in tests/deploy/test_haproxy_e2e.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import twisted_gateway
from twisted_gateway.metrics import GatewayCollector, Metrics

DEPLOY = Path(__file__).parents[1] / "deploy"
PACKAGE = Path(twisted_gateway.__file__).parent
TWISTD = str(Path(sys.executable).parent / "twistd")
TIMEOUT = 60  # a guard against a hang, not a limit


def _run(*command: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, **kwargs)


def test_alert_rules_are_valid_and_pass_their_promtool_tests():
    checked = _run("promtool", "check", "rules", str(DEPLOY / "alerts.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = _run("promtool", "test", "rules", "alerts_test.yml", cwd=DEPLOY)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def _exposed_names() -> set[str]:
    """Every metric family the gateway defines, as its samples are named on /metrics."""
    families = set(re.findall(r'"(wsgateway_[a-z_]+)"', "".join(
        path.read_text() for path in PACKAGE.glob("*.py"))))
    assert {family.name for family in GatewayCollector(Metrics()).describe()} <= families
    suffixes = ("", "_total", "_bucket", "_sum", "_count", "_created")
    return {name + suffix for name in families for suffix in suffixes}


def test_every_metric_an_alert_names_is_one_the_gateway_exposes():
    rules = (DEPLOY / "alerts.yml").read_text()
    named = set(re.findall(r"\bwsgateway_[a-z_]+", rules))
    assert named, "the alert rules name no gateway metric"
    assert named - _exposed_names() == set()


def test_the_haproxy_config_is_valid():
    checked = _run(shutil.which("haproxy") or "/usr/sbin/haproxy", "-c", "-f", str(DEPLOY / "haproxy.cfg"))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_systemd_units_verify(tmp_path):
    """systemd-analyze verify, with ExecStart pointed at this checkout's twistd."""
    for name in ("wsgateway.socket", "wsgateway.service"):
        text = (DEPLOY / name).read_text().replace("/opt/wsgateway/.venv/bin/twistd", TWISTD)
        (tmp_path / name).write_text(text)
    service = (tmp_path / "wsgateway.service").read_text()
    assert f"ExecStart={TWISTD} -n --pidfile= wsgateway --config /etc/wsgateway/tap.cfg" in service
    verified = _run("systemd-analyze", "verify", "wsgateway.socket", "wsgateway.service", cwd=tmp_path)
    assert verified.returncode == 0, verified.stdout + verified.stderr


#: Runs twistd as systemd 227+ would: a listening socket on fd 3, LISTEN_FDS, LISTEN_FDNAMES
#: (the socket unit's name) and LISTEN_PID = its own pid.
ACTIVATE = """
import os, socket, sys
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen()
os.dup2(listener.fileno(), 3)
os.set_inheritable(3, True)  # dup2 onto itself (the listener got fd 3) keeps close-on-exec
os.environ.update(LISTEN_FDS="1", LISTEN_FDNAMES="wsgateway.socket", LISTEN_PID=str(os.getpid()))
os.execv(sys.argv[1], sys.argv[1:])
"""


def test_the_deployed_config_passes_check_under_socket_activation():
    env = {
        "PATH": "/usr/bin:/bin",
        "GATEWAY_JWT_SECRET": "s" * 40,
        "WSGATEWAY_ADMIN_TOKEN": "t" * 32,
    }
    checked = _run(
        sys.executable, "-c", ACTIVATE, TWISTD, "wsgateway", "--config", str(DEPLOY / "tap.cfg"), "--check",
        env=env,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "listen = systemd:domain=INET:index=0" in checked.stdout
    assert "workers = auto" in checked.stdout
    assert "s" * 40 not in checked.stdout and "t" * 32 not in checked.stdout
