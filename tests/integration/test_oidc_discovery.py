"""
``[auth] oidc_issuer``: the gateway finds the provider's keys through its
discovery document, over HTTPS from a provider behind a private CA
(``[auth] ca_file``), and treats a document that names another issuer as an
outage of the provider (503), never as a reason to trust its keys.
"""

from __future__ import annotations

import json

import jwt
import pytest_twisted
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests.certs import Authority
from tests.support import Upstream, http_error, listen, raw_connect, settle, start_gateway
from tests.test_auth import jwks_document

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


class Provider(Resource):
    """An OpenID provider's two documents, at ``/realms/chat``, over TLS."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.issuer = ""
        self.named_issuer: str | None = None  # what the discovery document claims
        self.paths: list[bytes] = []

    def render_GET(self, request):
        self.paths.append(request.path)
        request.setHeader(b"content-type", b"application/json")
        if request.path == b"/realms/chat/.well-known/openid-configuration":
            issuer = self.named_issuer or self.issuer
            return json.dumps({"issuer": issuer, "jwks_uri": self.issuer + "/protocol/certs"}).encode()
        if request.path == b"/realms/chat/protocol/certs":
            return jwks_document(one=KEY)
        request.setResponseCode(404)
        return b"{}"

    async def start(self, ca: Authority):
        site = Site(self)
        site.noisy = False
        leaf = ca.issue("idp", ips=("127.0.0.1",))
        self.port = reactor.listenSSL(0, site, leaf.server_options(), interface="127.0.0.1")
        self.issuer = f"https://127.0.0.1:{self.port.getHost().port}/realms/chat"
        return self


def _config(upstream_port: int, issuer: str, ca_file: str | None) -> str:
    ca = f"ca_file = {ca_file}" if ca_file else ""
    return f"""
[auth]
algorithms = RS256
oidc_issuer = {issuer}
audience = chat
{ca}
[route:chat]
prefix = /v1/chat
upstream = http://127.0.0.1:{upstream_port}
"""


def _token(issuer: str) -> str:
    claims = {"sub": "alice", "aud": "chat", "iss": issuer, "exp": reactor.seconds() + 3600}
    return jwt.encode(claims, KEY, algorithm="RS256", headers={"kid": "one"})


async def _status(port: int, token: str) -> tuple[int, dict]:
    raw = await raw_connect(port)
    raw.transport.write(f"GET /v1/chat/x HTTP/1.0\r\nHost: a\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
    return http_error(await raw.lost)


async def _run(tmp_path, *, named_issuer=None, trust=True):
    ca = Authority("idp-ca")
    provider = await Provider().start(ca)
    provider.named_issuer = named_issuer
    upstream = Upstream()
    up_port = await listen(upstream)
    ca_file = str(ca.write(tmp_path)) if trust else None
    gw = await start_gateway(_config(up_port.getHost().port, provider.issuer, ca_file))
    gw.gateway.startService()

    async def stop():
        await gw.gateway.stopService()
        await gw.close()
        await up_port.stopListening()
        await provider.port.stopListening()

    return provider, gw, stop


@pytest_twisted.ensureDeferred
async def test_keys_are_found_through_discovery_over_https_with_a_private_ca(tmp_path):
    provider, gw, stop = await _run(tmp_path)
    try:
        keyset = gw.gateway.authenticator.keyset
        await settle(lambda: keyset.loaded, "the keys, found through discovery")
        assert provider.paths[:2] == [b"/realms/chat/.well-known/openid-configuration", b"/realms/chat/protocol/certs"]
        assert keyset.url == provider.issuer + "/protocol/certs"
        identity = await gw.gateway.authenticator.verify(_token(provider.issuer))
        assert identity.subject == "alice"
        status, body = await _status(gw.number, _token("https://elsewhere.example/realms/chat"))
        assert (status, body["error"]) == (401, "invalid_token")
    finally:
        await stop()


@pytest_twisted.ensureDeferred
async def test_a_document_naming_another_issuer_is_an_outage_not_a_source_of_keys(tmp_path):
    provider, gw, stop = await _run(tmp_path, named_issuer="https://evil.example/realms/chat")
    try:
        keyset = gw.gateway.authenticator.keyset
        await settle(lambda: keyset.failing, "a failed discovery")
        assert keyset.failures == {"discovery": 1} and not keyset.loaded
        assert b"/realms/chat/protocol/certs" not in provider.paths
        status, body = await _status(gw.number, _token(provider.issuer))
        assert (status, body["error"]) == (503, "auth_unavailable")
    finally:
        await stop()


@pytest_twisted.ensureDeferred
async def test_without_ca_file_a_private_ca_is_not_trusted(tmp_path):
    provider, gw, stop = await _run(tmp_path, trust=False)
    try:
        keyset = gw.gateway.authenticator.keyset
        await settle(lambda: keyset.failing, "a failed fetch")
        assert set(keyset.failures) == {"tls"}
        assert provider.paths == []
    finally:
        await stop()
