"""An identity provider that cannot be reached, as clients and operators see it through the gateway."""

from __future__ import annotations

import jwt
import pytest_twisted
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet import reactor

from tests.support import UPGRADE, Upstream, http_error, listen, raw_connect, settle, start_gateway
from tests.test_auth import JwksServer, jwks_document

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _config(upstream_port: int, jwks_url: str) -> str:
    return f"""
[auth]
algorithms = RS256
jwks_url = {jwks_url}
[route:chat]
prefix = /v1/chat
upstream = http://127.0.0.1:{upstream_port}
"""


def _token() -> str:
    claims = {"sub": "alice", "exp": reactor.seconds() + 3600}
    return jwt.encode(claims, KEY, algorithm="RS256", headers={"kid": "one"})


async def _ask(port: int, request: str) -> bytes:
    raw = await raw_connect(port)
    raw.transport.write(request.encode())
    return await raw.wait_for(b"\r\n\r\n")


async def _get(port: int, path: str) -> tuple[int, bytes]:
    head = await _ask(port, f"GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    return int(head.split(b" ")[1]), head


@pytest_twisted.ensureDeferred
async def test_outage_is_503_with_retry_after_until_the_idp_is_back():
    """
    JWKS answering 500 at start-up: /readyz is 503, HTTP requests and WebSocket
    handshakes get 503 auth_unavailable with Retry-After (never a 401 that makes
    a client drop its token), the metrics count the failures; once the JWKS
    answers, the gateway notices by itself within seconds and tokens work.
    """
    jwks = JwksServer()
    await jwks.start()
    jwks.status = 500
    upstream = Upstream()
    up_port = await listen(upstream)
    gw = await start_gateway(_config(up_port.getHost().port, jwks.url))
    gw.gateway.startService()
    try:
        await settle(lambda: gw.gateway.authenticator.keyset.failing, "a failed fetch")
        status, _ = await _get(gw.number, "/readyz")
        assert status == 503
        token = _token()
        raw = await raw_connect(gw.number)
        raw.transport.write(
            f"GET /v1/chat/x HTTP/1.0\r\nHost: a\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
        )
        data = await raw.lost
        status, body = http_error(data)
        assert (status, body["error"]) == (503, "auth_unavailable")
        assert b"retry-after: " in data.lower() and b"www-authenticate" not in data.lower()
        raw = await raw_connect(gw.number)
        raw.transport.write(UPGRADE.format(path=f"/v1/chat/ws?token={token}").encode())
        data = await raw.lost
        status, body = http_error(data)
        assert (status, body["error"]) == (503, "auth_unavailable")
        assert upstream.handshakes == []
        raw_metrics = await raw_connect(gw.number)
        raw_metrics.transport.write(b"GET /metrics HTTP/1.0\r\nHost: a\r\n\r\n")
        metrics = (await raw_metrics.lost).decode()
        assert "wsgateway_jwks_keys 0.0" in metrics
        assert 'wsgateway_jwks_fetch_failures_total{reason="http_status"}' in metrics
        assert 'wsgateway_ws_handshakes_total{outcome="auth_unavailable",route="chat"} 1.0' in metrics

        jwks.status = 200
        jwks.document = jwks_document(one=KEY)
        await settle(lambda: gw.gateway.authenticator.ready(), "the JWKS fetched without traffic")
        status, _ = await _get(gw.number, "/readyz")
        assert status == 200
        verified = await gw.gateway.authenticator.verify(token)
        assert verified.subject == "alice"
    finally:
        await gw.gateway.stopService()
        await gw.close()
        await up_port.stopListening()
        await jwks.stop()
