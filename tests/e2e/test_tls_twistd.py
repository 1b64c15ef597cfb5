"""
``twistd wsgateway`` with TLS, as an operator runs it: a bad certificate path
stops start-up with one line; an ``ssl:`` listener serves HTTPS and agrees to
``http/1.1`` only through ALPN.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest

from tests.certs import Authority
from tests.e2e.test_twistd import LISTENING, _start_up_fails
from tests.processes import GUARD, twistd_gateway


ROUTE = """
[route:chat]
prefix = /v1/chat
upstream = https://127.0.0.1:9443
"""


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("pki")
    ca = Authority("e2e-ca")
    cert, key = ca.issue("gateway", ips=("127.0.0.1",)).write(directory)
    return {"ca": ca.write(directory), "cert": cert, "key": key, "missing": directory / "missing.pem"}


#: One case for each place start-up reads a certificate file (a listener's, a route's); every
#: kind of bad file has its row in tests/test_tls.py, through the functions the options call.
@pytest.mark.parametrize(
    "config, section, key, fragment",
    [
        (
            "[gateway]\nlisten = ssl:0:privateKey={key}:certKey={missing}\n" + ROUTE,
            "gateway", "listen", "certKey {missing}: No such file or directory",
        ),
        (ROUTE + "ca_file = {missing}\n", "route:chat", "ca_file", "{missing}: No such file or directory"),
    ],
    ids=["missing-cert-file", "missing-ca-file"],
)
def test_a_bad_certificate_path_stops_start_up_with_one_line(tmp_path, pki, config, section, key, fragment):
    """Non-zero exit; one stderr line naming file, [section], key and the certificate problem."""
    path = tmp_path / "gateway.cfg"
    path.write_text(config.format(**pki))
    line = _start_up_fails(["--config", str(path)], tmp_path)
    where = f"{path}: [{section}] {key}:"
    assert where in line, line
    assert fragment.format(**pki) in line.split(where, 1)[1], line


def test_an_ssl_listener_serves_https_with_http_1_1_over_alpn(tmp_path, pki):
    """A client offering h2 first is answered over http/1.1; SIGTERM still stops it cleanly."""
    listen = f"ssl:0:interface=127.0.0.1:privateKey={pki['key']}:certKey={pki['cert']}"
    gateway = twistd_gateway(tmp_path, ROUTE, options=("--listen", listen))
    try:
        port = int(gateway.wait_for(LISTENING).group(2))
        context = ssl.create_default_context(cafile=str(pki["ca"]))
        context.set_alpn_protocols(["h2", "http/1.1"])
        with socket.create_connection(("127.0.0.1", port), timeout=GUARD) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                assert tls.selected_alpn_protocol() == "http/1.1"
                tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n")
                answer = b""
                while chunk := tls.recv(65536):
                    answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        assert b'"status": "ok"' in answer
        gateway.process.terminate()
        assert gateway.process.wait(GUARD) == 0
        assert "Traceback" not in gateway.out.rest()
    finally:
        gateway.stop()
