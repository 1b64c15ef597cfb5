"""
No token value of any kind reaches a log line of a real ``twistd wsgateway``:
with the default text observer and with ``twisted_gateway.logs.json_observer``,
on routes with ``auth = required``, ``optional`` and ``none``, for a valid JWT,
an invalid one and an opaque value, carried in the configured query parameter
(any separator, a percent-encoded name), as ``?token=``, in ``Authorization``
and in the auth cookie, for plain HTTP requests and WebSocket upgrades; and
with the access log the gateway writes itself (``[gateway] access_log``), to
a file as text and to stdout as JSON.
"""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import jwt
import pytest

from tests.e2e.test_operations_e2e import _gateway, _script
from tests.processes import GUARD, Process


SECRET = "e2e-redaction-secret-0123456789abcdef0123456789"
LISTENING = re.compile(r"\bwsgateway listening on \S+ \(port (\d+)\)")

#: A plain HTTP upstream that answers everything with 200 and prints its port.
UPSTREAM_SCRIPT = """
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Answer(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = b"ok"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

server = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
print("PORT", server.server_address[1], flush=True)
server.serve_forever()
"""


def _config(upstream_port: int, gateway: str = "") -> str:
    upstream = f"http://127.0.0.1:{upstream_port}"
    return f"""
[gateway]
listen = tcp:0:interface=127.0.0.1
{gateway}

[auth]
algorithms = HS256
secret = {SECRET}
query_param = access_token
cookie = session

[route:required]
prefix = /v1/required
upstream = {upstream}
auth = required
; a cookie-authenticated WebSocket route must name its origins
allowed_origins = https://chat.example.com

[route:optional]
prefix = /v1/optional
upstream = {upstream}
auth = optional
; a cookie-authenticated WebSocket route must name its origins
allowed_origins = https://chat.example.com

[route:none]
prefix = /v1/none
upstream = {upstream}
auth = none
"""


def _tokens() -> dict[str, str]:
    claims = {"sub": "alice", "exp": int(time.time()) + 3600}
    return {
        "valid": jwt.encode(claims, SECRET, algorithm="HS256"),
        "invalid": jwt.encode(claims, "not-the-secret-" + "x" * 40, algorithm="HS256"),
        "opaque": "opaque-credential-4711-zz",
    }


def _requests(token: str) -> list[tuple[str, dict[str, str]]]:
    """``(target, headers)`` for every way a token travels."""
    return [
        (f"?access_token={token}", {}),
        (f"?a=1;access_token={token}", {}),
        (f"?a=1&%61ccess_token={token}&b=2", {}),
        (f"?a=1;token={token}", {}),
        (f"?token={token}", {}),
        ("", {"Authorization": f"Bearer {token}"}),
        ("", {"Cookie": f"theme=dark; session={token}"}),
    ]


def _exchange(port: int, method_line: str, headers: dict[str, str]) -> int:
    """One request on a connection of its own; the status (raw, so upgrades go as written)."""
    lines = [method_line, "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    with socket.create_connection(("127.0.0.1", port), timeout=GUARD) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        while b"\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1])


UPGRADE_HEADERS = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version": "13",
}


@pytest.mark.parametrize(
    "logger, access_log",
    [("text", None), ("json", None), ("text", "file"), ("json", "stdout")],
)
def test_no_token_of_any_kind_reaches_the_log(tmp_path: Path, logger: str, access_log: str | None) -> None:
    tokens = _tokens()
    processes: list[Process] = []
    try:
        upstream = _script(tmp_path, "upstream.py", UPSTREAM_SCRIPT)
        processes.append(upstream)
        upstream_port = int(upstream.out.wait_for(r"^PORT (\d+)").group(1))
        args = ["--logger", "twisted_gateway.logs.json_observer"] if logger == "json" else []
        access_file = tmp_path / "access.log"
        own = {
            None: "",
            "file": f"access_log = {access_file}",
            "stdout": "access_log = stdout\naccess_log_format = json",
        }[access_log]
        gateway = _gateway(tmp_path, _config(upstream_port, own), *args)
        processes.append(gateway)
        port = int(gateway.out.wait_for(LISTENING).group(1))

        statuses: dict[tuple[str, str, str], int] = {}
        for route in ("required", "optional", "none"):
            for kind, token in tokens.items():
                for query, headers in _requests(token):
                    status = _exchange(port, f"GET /v1/{route}/files/a{query} HTTP/1.1", headers)
                    statuses[route, kind, query[:12] or next(iter(headers))] = status
                    upgrade = {**headers, **UPGRADE_HEADERS}
                    _exchange(port, f"GET /v1/{route}/ws{query} HTTP/1.1", upgrade)
        # the requests were served or refused as the route says (so each was logged)
        assert {s for (route, _, _), s in statuses.items() if route == "none"} == {200}
        assert statuses["required", "valid", "?access_toke"] == 200
        assert statuses["required", "valid", "Authorization"] == 200
        assert statuses["required", "valid", "Cookie"] == 200
        assert statuses["required", "opaque", "?access_toke"] == 401
        assert statuses["optional", "invalid", "Authorization"] == 401
        _exchange(port, "GET /healthz?last=1 HTTP/1.1", {})

        assert gateway.terminate() == 0
        out, err = gateway.out.rest(), gateway.err.rest()
    finally:
        for process in reversed(processes):
            process.stop()

    text = out + err
    if access_log == "file":
        # the gateway's own lines, written as it stopped, and only there
        lines = access_file.read_text()
        assert "/v1/none/files/a" in lines and "/v1/none/files/a" not in text
        assert "[twisted_gateway.access#info] GET /v1/required/files/a?access_token=REDACTED 200" in lines
        text += lines
    assert "/v1/required/files/a" in text and "/v1/none/files/a" in text, text  # logged...
    for kind, token in tokens.items():
        parts = [token] + (token.split(".")[1:] if kind != "opaque" else [])
        for part in parts:
            assert part not in text, (kind, part, text)  # ...without any token
    assert SECRET not in text
    if logger == "text":
        assert "access_token=REDACTED" in text and "token=REDACTED" in text
