"""JWT authentication of WebSocket handshakes, through a real gateway on loopback."""

from __future__ import annotations

import base64
import json

import jwt
import pytest
import pytest_twisted
from twisted.internet import reactor, task

from tests.support import Upstream, hs256_config, http_error, listen, raw_connect, start_gateway, ws_connect
from twisted_gateway.auth import Authenticator
from twisted_gateway.config import parse_config

SECRET = "demo-secret-for-tests-0123456789abcdef"

UPGRADE = (
    "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
    "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    "Sec-WebSocket-Version: 13\r\n{extra}\r\n"
)


def _config(port: int, mode: str = "required", route: str = "") -> str:
    return hs256_config(SECRET, port, route=f"auth = {mode}\n{route}")


def _token(**claims) -> str:
    now = reactor.seconds()
    body = {"sub": "alice", "exp": now + 3600, **claims}
    return jwt.encode(body, SECRET, algorithm="HS256")


async def _gateway(mode: str = "required", clock=None, route: str = ""):
    upstream = Upstream()
    up_port = await listen(upstream)
    text = _config(up_port.getHost().port, mode, route)
    settings = parse_config(text)
    authenticator = Authenticator(settings.auth, clock or reactor)
    gw = await start_gateway(text, clock=clock, authenticator=authenticator)
    return upstream, up_port, gw


async def _refusal(gw, path: str, extra: str = "") -> tuple[int, dict, bytes]:
    raw = await raw_connect(gw.number)
    raw.transport.write(UPGRADE.format(path=path, extra=extra).encode())
    data = await raw.lost
    status, body = http_error(data)
    return status, body, data


async def _close(gw, up_port) -> None:
    await gw.close()
    await up_port.stopListening()


REFUSALS = [
    ("", "missing_token"),
    ("?token=not.a.jwt", "invalid_token"),
    ("?token=" + jwt.encode({"sub": "a", "exp": 4102444800}, "wrong-secret-0123456789abcdef0123", algorithm="HS256"), "invalid_token"),
    ("?token=" + jwt.encode({"sub": "a", "exp": 1}, SECRET, algorithm="HS256"), "invalid_token"),
    ("?token=" + jwt.encode({"sub": "a"}, SECRET, algorithm="HS256"), "invalid_token"),
    ("?token=" + jwt.encode({"sub": "a", "exp": 4102444800}, SECRET, algorithm="HS512"), "invalid_token"),
]


@pytest.mark.parametrize("query, error", REFUSALS)
@pytest_twisted.ensureDeferred
async def test_refused_handshake_is_401_json_with_www_authenticate(query, error):
    """Missing, malformed, forged, expired, exp-less or wrong-alg tokens: 401, never upgraded, upstream untouched."""
    upstream, up_port, gw = await _gateway()
    status, body, raw = await _refusal(gw, "/v1/chat/ws" + query)
    assert status == 401
    assert body["error"] == error
    assert body["detail"]
    assert b'www-authenticate: bearer realm="wsgateway"' in raw.lower()
    assert upstream.handshakes == []
    await _close(gw, up_port)


@pytest_twisted.ensureDeferred
async def test_valid_token_passes_and_identity_reaches_the_upstream():
    """A valid token upgrades; the upstream gets X-Auth-Subject and X-Auth-Claims, never a spoofed one."""
    upstream, up_port, gw = await _gateway()
    client = await ws_connect(
        gw.url("/v1/chat/ws?room=a"),
        headers={"Authorization": f"Bearer {_token(room='a')}", "X-Auth-Subject": "mallory"},
    )
    headers = upstream.handshakes[-1].headers
    assert headers["x-auth-subject"] == "alice"
    claims_b64 = headers["x-auth-claims"]
    claims = json.loads(base64.urlsafe_b64decode(claims_b64 + "=" * (-len(claims_b64) % 4)))
    assert claims["sub"] == "alice" and claims["room"] == "a"
    client.sendMessage(b"hi")
    assert await client.next_message() == (b"hi", False)
    client.sendClose(1000)
    await client.closed
    await _close(gw, up_port)


@pytest_twisted.ensureDeferred
async def test_optional_auth_lets_anonymous_in_but_refuses_bad_tokens():
    """auth = optional: no token passes without identity; a bad token is still 401."""
    upstream, up_port, gw = await _gateway("optional")
    client = await ws_connect(gw.url("/v1/chat/ws"), headers={"X-Auth-Subject": "mallory"})
    assert "x-auth-subject" not in upstream.handshakes[-1].headers
    client.sendClose(1000)
    await client.closed
    status, body, _ = await _refusal(gw, "/v1/chat/ws?token=garbage")
    assert (status, body["error"]) == (401, "invalid_token")
    await _close(gw, up_port)


@pytest_twisted.ensureDeferred
async def test_websocket_is_closed_1008_when_its_token_expires():
    """No WebSocket outlives its token: both legs get 1008 "token expired" at exp."""
    clock = task.Clock()
    clock.advance(reactor.seconds())
    upstream, up_port, gw = await _gateway(clock=clock)
    token = jwt.encode({"sub": "bob", "exp": clock.seconds() + 60}, SECRET, algorithm="HS256")
    client = await ws_connect(gw.url(f"/v1/chat/ws?token={token}"))
    server = upstream.connected[-1]
    clock.advance(59)
    client.sendMessage(b"still valid")
    assert await client.next_message() == (b"still valid", False)
    clock.advance(1)
    assert await client.closed == (1008, "token expired")
    assert (await server.closed)[0] == 1008
    await _close(gw, up_port)


@pytest_twisted.ensureDeferred
async def test_a_token_without_the_routes_scope_or_role_is_403_insufficient_scope():
    """
    require_scope and require_claim are checked after the signature: a good
    token without them is 403 insufficient_scope (RFC 6750), on HTTP and on a
    handshake, and the upstream never sees it; claims_header narrows X-Auth-Claims.
    """
    route = "require_scope = chat:write\nrequire_claim = realm_access.roles:member\nclaims_header = sub"
    upstream, up_port, gw = await _gateway(route=route)
    reader = _token(scope="chat:read", realm_access={"roles": ["member"]})
    outsider = _token(scope="chat:write", realm_access={"roles": ["guest"]})
    for token, detail in ((reader, "needs scope chat:write"),
                          (outsider, "needs claim realm_access.roles to hold member")):
        status, body, raw = await _refusal(gw, f"/v1/chat/ws?token={token}")
        assert (status, body["error"], body["detail"]) == (403, "insufficient_scope", detail)
        assert b'error="insufficient_scope"' in raw
        http = await raw_connect(gw.number)
        http.transport.write(f"GET /v1/chat/x?token={token} HTTP/1.0\r\nHost: a\r\n\r\n".encode())
        status, body = http_error(await http.lost)
        assert (status, body["error"]) == (403, "insufficient_scope")
    assert upstream.handshakes == []
    writer = _token(scope="chat:read chat:write", realm_access={"roles": ["member"]}, email="a@b")
    client = await ws_connect(gw.url(f"/v1/chat/ws?token={writer}"))
    claims_b64 = upstream.handshakes[-1].headers["x-auth-claims"]
    assert json.loads(base64.urlsafe_b64decode(claims_b64 + "=" * (-len(claims_b64) % 4))) == {"sub": "alice"}
    client.sendClose(1000)
    await client.closed
    await _close(gw, up_port)
