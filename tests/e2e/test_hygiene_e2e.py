"""
Hostile requests and a misbehaving upstream against one real ``twistd wsgateway``.

The upstream is a raw Twisted process that records every request head it
receives, byte for byte, and serves an app that decodes before normalising
(``served``: what a WSGI or PHP app would serve). Some of its paths break
HTTP on purpose: a body on a HEAD, a second response, a late response, a bare
CR in the reason phrase. Clients are raw sockets, so every hostile byte goes
out exactly as written. Every process is killed in a ``finally``; timeouts
only stop a hung process from hanging the run.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import sys
import time

import jwt
import pytest

from tests.e2e.test_twistd import _start_up_fails
from tests.processes import GUARD, Process, twistd_gateway

SECRET = "e2e-hygiene-secret-0123456789abcdef0123456789"
LISTENING = re.compile(r"\bwsgateway listening on \S+ \(port (\d+)\)")
STRAY = re.compile(r"upstream \S+ sent (\d+) bytes after a complete response")
APP_ORIGIN = "https://app.example"

#: The recording, partly hostile upstream (see the module docstring).
UPSTREAM_SCRIPT = r"""
import base64, hashlib, json, posixpath
from urllib.parse import unquote
from twisted.internet import protocol, reactor

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
HIJACK = b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nhijack!"

class Upstream(protocol.Protocol):
    count = 0

    def connectionMade(self):
        Upstream.count += 1
        self.id = Upstream.count
        self.buffer = b""
        self.upgraded = False

    def dataReceived(self, data):
        if self.upgraded:
            return
        self.buffer += data
        while b"\r\n\r\n" in self.buffer and not self.upgraded:
            head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            self.answer(head)

    def answer(self, head):
        method, target, _ = head.split(b"\r\n")[0].split(b" ", 2)
        path = target.partition(b"?")[0].decode("latin-1")
        seen = {
            "conn": self.id,
            "method": method.decode(),
            "target": target.decode("latin-1"),
            "served": posixpath.normpath(unquote(path).replace("\\", "/")),
            "head": base64.b64encode(head).decode(),
        }
        print(json.dumps(seen), flush=True)
        headers = {}
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        write = self.transport.write
        if headers.get(b"upgrade", b"").lower() == b"websocket":
            accept = base64.b64encode(hashlib.sha1(headers[b"sec-websocket-key"] + GUID).digest())
            write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                  b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
            self.upgraded = True
            return
        conn = b"X-Conn: %d\r\n" % self.id
        if path.endswith("/head-body"):
            write(b"HTTP/1.1 200 OK\r\n" + conn + b"Content-Length: 5\r\n\r\nhello")
        elif path.endswith("/second"):
            write(b"HTTP/1.1 200 OK\r\n" + conn + b"Content-Length: 5\r\n\r\nfirst" + HIJACK)
        elif path.endswith("/late"):
            write(b"HTTP/1.1 200 OK\r\n" + conn + b"Content-Length: 5\r\n\r\nfirst")
            reactor.callLater(0.2, write, HIJACK)
        elif path.endswith("/phrase"):
            write(b"HTTP/1.1 200 OK\rX-Injected: 1\r\n" + conn + b"Content-Length: 2\r\n\r\nok")
        else:
            body = json.dumps(seen).encode()
            write(b"HTTP/1.1 200 OK\r\n" + conn + b"Content-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)

factory = protocol.Factory.forProtocol(Upstream)
port = reactor.listenTCP(0, factory, interface="127.0.0.1")
print("PORT", port.getHost().port, flush=True)
reactor.run()
"""


def _config(upstream: int) -> str:
    base = f"http://127.0.0.1:{upstream}"
    return f"""
[gateway]
listen = tcp:0:interface=127.0.0.1

[auth]
algorithms = HS256
secret = {SECRET}

[route:public]
prefix = /v1/public
upstream = {base}
auth = none

[route:api]
prefix = /v1/api
upstream = {base}
auth = required

[route:app]
prefix = /v1/app
upstream = {base}
auth = optional
allowed_origins = {APP_ORIGIN}

[route:legacy]
prefix = /v1/legacy
upstream = {base}
auth = none
underscores_in_headers = true

[route:strict]
prefix = /v1/strict
upstream = {base}
auth = none
escaped_slashes = reject
"""


class _Upstream(Process):
    def request(self, marker: str) -> dict:
        """The recorded request whose target contains ``marker`` (head as bytes)."""
        line = self.out.wait_for_line(lambda line: line.startswith("{") and marker in json.loads(line)["target"])
        seen = json.loads(line)
        seen["head"] = base64.b64decode(seen["head"])
        return seen

    def recorded(self) -> list[dict]:
        return [json.loads(line) for line in self.out.seen if line.startswith("{")]


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    """One upstream and one ``twistd wsgateway`` for the whole module."""
    tmp = tmp_path_factory.mktemp("hygiene")
    (tmp / "upstream.py").write_text(UPSTREAM_SCRIPT)
    upstream = _Upstream([sys.executable, str(tmp / "upstream.py")], tmp)
    gateway = None
    try:
        port = int(upstream.wait_for(r"^PORT (\d+)").group(1))
        gateway = twistd_gateway(tmp, _config(port))
        yield int(gateway.wait_for(LISTENING).group(1)), upstream, gateway
    finally:
        if gateway is not None:
            gateway.stop()
        upstream.stop()


# -- raw clients -------------------------------------------------------------------


def _exchange(port: int, head: bytes) -> tuple[bytes, list[tuple[bytes, bytes]], bytes]:
    """Send ``head`` (a request head without its blank line) and read the answer to EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=GUARD) as s:
        s.sendall(head + b"\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head_bytes, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head_bytes.split(b"\r\n")
    headers = [(name.strip().lower(), value.strip()) for name, _, value in (l.partition(b":") for l in lines)]
    return status, headers, body


def _get(port: int, target: str, *headers: str, method: str = "GET", host: str = "gw.example"):
    lines = [f"{method} {target} HTTP/1.1"]
    if host:
        lines.append(f"Host: {host}")
    lines += [*headers, "Connection: close"]
    return _exchange(port, "\r\n".join(lines).encode("utf-8"))


def _upgrade(port: int, target: str, *headers: str, version: int = 13) -> bytes:
    """A WebSocket opening handshake; the gateway's status line (the socket is then dropped)."""
    lines = [
        f"GET {target} HTTP/1.1",
        "Host: gw.example",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        f"Sec-WebSocket-Version: {version}",
        *headers,
    ]
    with socket.create_connection(("127.0.0.1", port), timeout=GUARD) as s:
        s.sendall("\r\n".join(lines).encode("utf-8") + b"\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return data.partition(b"\r\n")[0]


def _status(line: bytes) -> int:
    return int(line.split(b" ", 2)[1])


def _header_lines(head: bytes) -> list[bytes]:
    return head.split(b"\r\n")[1:]


def _values(head: bytes, name: bytes) -> list[bytes]:
    """Values of header ``name`` exactly as received (names compared case-insensitively)."""
    out = []
    for line in _header_lines(head):
        key, _, value = line.partition(b":")
        if key.lower() == name.lower():
            out.append(value.strip())
    return out


def _token(sub: str) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 3600}, SECRET, algorithm="HS256")


# -- 1. identity through header-name aliases ----------------------------------------

ALIASES = [
    "X_Auth_Subject: admin",
    "X-Auth_Subject: admin",
    "x_auth_claims: eyJzdWIiOiJhZG1pbiJ9",
    "X-AUTH-SUBJECT: admin",
    "X_Custom_Role: admin",
]


def test_header_name_aliases_never_reach_the_upstream_as_an_identity_over_http(running):
    """Without a token the app sees no subject; with alice's it sees exactly alice."""
    port, upstream, _ = running
    status, _, _ = _get(port, "/v1/public/echo?case=alias-anon", *ALIASES)
    assert _status(status) == 200
    head = upstream.request("case=alias-anon")["head"]
    assert all(b"_" not in line.partition(b":")[0] for line in _header_lines(head)), head
    assert _values(head, b"x-auth-subject") == [] and _values(head, b"x-auth-claims") == []

    status, _, _ = _get(
        port, "/v1/api/echo?case=alias-alice", *ALIASES, f"Authorization: Bearer {_token('alice')}"
    )
    assert _status(status) == 200
    head = upstream.request("case=alias-alice")["head"]
    assert _values(head, b"x-auth-subject") == [b"alice"]
    assert len(_values(head, b"x-auth-claims")) == 1
    assert all(b"_" not in line.partition(b":")[0] for line in _header_lines(head)), head


def test_header_name_aliases_never_reach_the_upstream_as_an_identity_over_websocket(running):
    port, upstream, _ = running
    status = _upgrade(port, "/v1/api/ws?case=alias-ws", *ALIASES, f"Authorization: Bearer {_token('alice')}")
    assert _status(status) == 101
    head = upstream.request("case=alias-ws")["head"]
    assert _values(head, b"x-auth-subject") == [b"alice"]
    assert all(b"_" not in line.partition(b":")[0] for line in _header_lines(head)), head


def test_a_route_allowing_underscores_forwards_them_but_never_an_identity_alias(running):
    port, upstream, _ = running
    status, _, _ = _get(port, "/v1/legacy/echo?case=legacy", "X_Custom_Role: reader", "X_Auth_Subject: admin")
    assert _status(status) == 200
    head = upstream.request("case=legacy")["head"]
    assert _values(head, b"x_custom_role") == [b"reader"]
    assert _values(head, b"x_auth_subject") == [] and _values(head, b"x-auth-subject") == []


# -- 2. non-ASCII values byte for byte on both paths -------------------------------


def test_a_non_ascii_subject_and_header_reach_the_upstream_with_the_same_bytes_over_http_and_websocket(running):
    port, upstream, _ = running
    auth = f"Authorization: Bearer {_token('élise')}"
    status, _, _ = _get(port, "/v1/api/echo?case=utf8-http", auth, "X-Note: café")
    assert _status(status) == 200
    http_head = upstream.request("case=utf8-http")["head"]
    assert _status(_upgrade(port, "/v1/api/ws?case=utf8-ws", auth, "X-Note: café")) == 101
    ws_head = upstream.request("case=utf8-ws")["head"]
    for name in (b"x-auth-subject", b"x-note", b"x-auth-claims"):
        assert _values(ws_head, name) == _values(http_head, name), name
    assert _values(ws_head, b"x-auth-subject") == ["élise".encode("utf-8")]
    assert _values(ws_head, b"x-note") == ["café".encode("utf-8")]


# -- 3. Host and Origin --------------------------------------------------------------


@pytest.mark.parametrize(
    "hosts",
    [(), ("gw.example", "evil.example"), ("gw@evil.example/x?y",), ("a.example, b.example",), ("gw example",)],
    ids=["missing", "two", "userinfo-and-path", "list", "space"],
)
def test_a_missing_repeated_or_malformed_host_is_refused_with_400(running, hosts):
    port, upstream, _ = running
    status, headers, body = _get(port, "/v1/public/echo?case=host", *(f"Host: {h}" for h in hosts), host="")
    assert _status(status) == 400
    assert (b"content-type", b"application/json") in headers
    assert json.loads(body)["error"] == "bad_request"


def test_x_forwarded_host_carries_the_one_validated_host(running):
    port, upstream, _ = running
    status, _, _ = _get(port, "/v1/public/echo?case=xfh", host="gw.example:8443")
    assert _status(status) == 200
    head = upstream.request("case=xfh")["head"]
    assert _values(head, b"x-forwarded-host") == [b"gw.example:8443"]
    # every request refused above never reached the upstream
    assert not [seen for seen in upstream.recorded() if "case=host" in seen["target"]]


def test_two_origin_headers_on_an_upgrade_are_refused_with_403(running):
    port, upstream, _ = running
    status = _upgrade(port, "/v1/app/ws?case=two-origins", "Origin: https://evil.com", f"Origin: {APP_ORIGIN}")
    assert _status(status) == 403
    assert _status(_upgrade(port, "/v1/app/ws?case=one-origin", f"Origin: {APP_ORIGIN}")) == 101
    head = upstream.request("case=one-origin")["head"]
    assert _values(head, b"origin") == [APP_ORIGIN.encode()]
    assert not [seen for seen in upstream.recorded() if "case=two-origins" in seen["target"]]


def test_sec_websocket_origin_is_never_taken_or_forwarded_as_the_origin(running):
    """A hybi-08 client's ``Sec-WebSocket-Origin`` is not an origin: the upstream gets none."""
    port, upstream, _ = running
    status = _upgrade(port, "/v1/public/ws?case=v8", "Sec-WebSocket-Origin: https://evil.com", version=8)
    assert _status(status) == 101
    head = upstream.request("case=v8")["head"]
    assert _values(head, b"origin") == [] and _values(head, b"sec-websocket-origin") == []


# -- 4. escaped slashes --------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "/v1/public/..%2fapi/secret",
        "/v1/public/..%2Fapi/secret",
        "/v1/public/..%5capi/secret",
        "/v1/public/..\\api/secret",
        "/v1/public/..;/api/secret",
        "/v1/public/%2e%2e%2fapi/secret",
        "/v1/strict/a%2Fb",
    ],
)
def test_a_path_whose_decoded_form_leaves_its_route_is_refused_with_400(running, target):
    port, upstream, _ = running
    status, _, body = _get(port, target)
    assert _status(status) == 400, body
    assert json.loads(body)["error"] == "bad_request"


def test_an_escaped_slash_inside_its_route_still_reaches_the_upstream_encoded(running):
    port, upstream, _ = running
    status, _, _ = _get(port, "/v1/public/a%2Fb?case=inside")
    assert _status(status) == 200
    seen = upstream.request("case=inside")
    assert seen["target"] == "/v1/public/a%2Fb?case=inside"
    # nothing ever made the decoding upstream serve the auth-required route without a token
    assert not [s for s in upstream.recorded() if s["served"].startswith("/v1/api/secret")]


# -- 6. a misbehaving upstream -------------------------------------------------------


@pytest.mark.parametrize("method, path", [("HEAD", "head-body"), ("GET", "second"), ("GET", "late")])
def test_stray_upstream_bytes_close_the_connection_and_never_answer_the_next_client(running, method, path):
    """The next client gets its own answer on a new upstream connection; one log line names the upstream."""
    port, upstream, gateway = running
    status, headers, body = _get(port, f"/v1/public/{path}", method=method)
    assert _status(status) == 200
    assert body == (b"" if method == "HEAD" else b"first")
    hostile = int(dict(headers)[b"x-conn"])
    line = gateway.wait_for(STRAY).string
    assert "127.0.0.1:" in line

    status, headers, body = _get(port, f"/v1/public/echo?case=after-{path}")
    assert _status(status) == 200
    seen = json.loads(body)
    assert seen["target"] == f"/v1/public/echo?case=after-{path}"
    assert seen["conn"] != hostile


def test_a_bare_cr_in_the_upstreams_reason_phrase_never_reaches_the_client(running):
    port, _, _ = running
    status, headers, body = _get(port, "/v1/public/phrase")
    assert status == b"HTTP/1.1 200 OK X-Injected: 1"
    assert b"x-injected" not in dict(headers)
    assert body == b"ok"


# -- 7. client-set address and routing headers ------------------------------------

CLIENT_SET = [
    "X-Real-IP: 10.0.0.1",
    "True-Client-IP: 10.0.0.2",
    "CF-Connecting-IP: 10.0.0.3",
    "X-Original-URL: /v1/api/secret",
    "X-Rewrite-URL: /v1/api/secret",
]


def test_client_set_address_and_routing_headers_are_stripped_over_http_and_websocket(running):
    port, upstream, _ = running
    assert _status(_get(port, "/v1/public/echo?case=strip-http", *CLIENT_SET)[0]) == 200
    assert _status(_upgrade(port, "/v1/public/ws?case=strip-ws", *CLIENT_SET)) == 101
    for marker in ("case=strip-http", "case=strip-ws"):
        head = upstream.request(marker)["head"]
        for header in CLIENT_SET:
            name = header.partition(":")[0].lower().encode()
            assert _values(head, name) == [], (marker, name)


# -- 5. cookie authentication and cross-site WebSockets ------------------------------


def test_a_cookie_authenticated_websocket_route_open_to_every_origin_stops_start_up(tmp_path):
    config = tmp_path / "gateway.cfg"
    config.write_text(
        f"[auth]\nalgorithms = HS256\nsecret = {SECRET}\ncookie = session\n\n"
        "[route:chat]\nprefix = /v1/chat\nupstream = http://127.0.0.1:9\n"
    )
    line = _start_up_fails(["--config", str(config)], tmp_path)
    assert f"{config}: [route:chat] allowed_origins: must list the allowed origins" in line
