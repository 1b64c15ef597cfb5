"""
A real twistd gateway in front of a certified OpenID provider (npm
``oidc-provider``, tests/oidc/provider.mjs), found through its discovery
document: RFC 9068 access tokens from client_credentials with resource
indicators in every algorithm, keys with and without ``alg``, key rotation
while the gateway runs, and the provider's tokens that are not for this API
(an id_token from its login pages, another API's access token) refused.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import http.cookiejar
import json
import re
import secrets
import shutil
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from websockets.sync.client import connect as ws_connect

from tests.e2e.test_operations_e2e import LISTENING, _gateway
from tests.processes import GUARD, Process, aiohttp_upstream, free_port
from tests.support import settle_blocking


PROVIDER_DIR = Path(__file__).parents[1] / "oidc"
CLIENT_SECRET = "test-client-secret-0123456789abcdef0123456789"
CHAT = "https://chat.example.com/"
BILLING = "https://billing.example.com/"
CALLBACK = "http://127.0.0.1/callback"
ALGORITHMS = ("RS256", "PS256", "ES256", "EdDSA", "Ed25519")
#: oidc-provider's default: keys published without ``alg``.
KEYS_WITHOUT_ALG = [{"kid": "rsa-1", "kty": "RSA"}, {"kid": "ec-1", "kty": "EC"}, {"kid": "ed-1", "kty": "OKP"}]
#: One key per algorithm, each bound to it by ``alg``.
KEYS_WITH_ALG = [
    {"kid": "rs", "kty": "RSA", "alg": "RS256"},
    {"kid": "ps", "kty": "RSA", "alg": "PS256"},
    {"kid": "es", "kty": "EC", "alg": "ES256"},
    {"kid": "eddsa", "kty": "OKP", "alg": "EdDSA"},
    {"kid": "ed25519", "kty": "OKP", "alg": "Ed25519"},
]


class Provider:
    """oidc-provider on a free loopback port, stopped by its PID."""

    def __init__(self, tmp_path: Path, keys: list[dict], port: int = 0) -> None:
        node = shutil.which("node")
        assert node, "node is needed (make test installs it with the test tools)"
        assert (PROVIDER_DIR / "node_modules" / "oidc-provider").is_dir(), "run make test: it installs tests/oidc"
        self.process = Process([node, str(PROVIDER_DIR / "provider.mjs"), json.dumps(keys), str(port)], tmp_path, stderr_apart=True)
        self.port = int(self.process.out.wait_for(r"^PORT (\d+)").group(1))
        self.issuer = f"http://127.0.0.1:{self.port}"
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def stop(self) -> None:
        self.process.stop()

    def rotate(self, keys: list[dict]) -> None:
        """Replace the provider's keys while it runs (the first that fits an algorithm signs)."""
        request = urllib.request.Request(f"{self.issuer}/_test/keys", json.dumps({"keys": keys}).encode(), method="POST")
        assert self._opener.open(request, timeout=GUARD).status == 204

    def break_jwks(self, answer: str | None) -> None:
        """Make the JWKS endpoint answer 500, an HTML page or nothing ("hang"); None mends it."""
        request = urllib.request.Request(f"{self.issuer}/_test/jwks", json.dumps({"answer": answer}).encode(), method="POST")
        assert self._opener.open(request, timeout=GUARD).status == 204

    def serve(self, keys: list[dict], jwks_answer: str | None = None) -> Provider:
        """Sign with ``keys`` and answer the JWKS as ``jwks_answer`` says, whatever an earlier test left."""
        self.rotate(keys)
        self.break_jwks(jwks_answer)
        return self

    def access_token(self, alg: str = "RS256", resource: str = CHAT, scope: str = "chat:read chat:write") -> str:
        """An RFC 9068 access token from client_credentials with a resource indicator."""
        form = {"grant_type": "client_credentials", "resource": resource, "scope": scope}
        return self._token(f"svc-{alg}", form)["access_token"]

    def id_token(self) -> str:
        """An id_token through the authorization code flow and the provider's own login pages."""
        opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()), _StopAtCallback(), urllib.request.ProxyHandler({})
        )
        verifier = secrets.token_urlsafe(32)
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        query = urllib.parse.urlencode({
            "client_id": "web", "response_type": "code", "scope": "openid", "redirect_uri": CALLBACK,
            "code_challenge": challenge, "code_challenge_method": "S256", "nonce": secrets.token_urlsafe(8),
        })
        try:
            page = opener.open(f"{self.issuer}/auth?{query}", timeout=GUARD)
            for form in ({"prompt": "login", "login": "alice", "password": "any"}, {"prompt": "consent"}):
                action = re.search(r'action="([^"]+)"', page.read().decode()).group(1)
                page = opener.open(urllib.parse.urljoin(page.url, action), urllib.parse.urlencode(form).encode(), timeout=GUARD)
        except _Callback as callback:
            code = urllib.parse.parse_qs(urllib.parse.urlsplit(callback.url).query)["code"][0]
        else:
            raise AssertionError("the login pages never redirected to the client")
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": CALLBACK, "code_verifier": verifier}
        return self._token("web", form)["id_token"]

    def _token(self, client_id: str, form: dict) -> dict:
        basic = base64.b64encode(f"{client_id}:{CLIENT_SECRET}".encode()).decode()
        request = urllib.request.Request(
            f"{self.issuer}/token", urllib.parse.urlencode(form).encode(), {"Authorization": f"Basic {basic}"}
        )
        return json.loads(self._opener.open(request, timeout=GUARD).read())


class _Callback(Exception):
    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.url = url


class _StopAtCallback(urllib.request.HTTPRedirectHandler):
    """Follow the provider's redirects, but hand back the one to the client's callback."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if newurl.startswith(CALLBACK):
            raise _Callback(newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class Stack:
    """A twistd gateway with ``oidc_issuer`` in front of the file's aiohttp upstream."""

    def __init__(
        self,
        tmp_path: Path,
        upstream_port: int,
        provider: Provider | None,
        *,
        issuer_suffix: str = "",
        jwks_refresh: float = 600,
        jwks_timeout: float = 10,
    ) -> None:
        """
        With ``provider`` None no provider runs yet: :meth:`start_provider`
        starts one later, on the port of the issuer the gateway was given.
        """
        self._tmp_path = tmp_path
        self._processes: list[Process] = []
        self.provider_port = 0
        if provider is None:
            self.provider_port = free_port()
            issuer = f"http://127.0.0.1:{self.provider_port}"
        else:
            self.provider = provider
            issuer = provider.issuer
        try:
            config = _config(upstream_port, issuer + issuer_suffix, jwks_refresh, jwks_timeout)
            self.gateway = _gateway(tmp_path, config)
            self._processes.append(self.gateway)
            self.port = int(self.gateway.out.wait_for(LISTENING).group(1))
        except BaseException:
            self.stop()
            raise

    def start_provider(self, keys: list[dict]) -> None:
        self.provider = Provider(self._tmp_path, keys, self.provider_port)
        self._processes.append(self.provider.process)

    def stop(self) -> None:
        """The gateway, and the provider :meth:`start_provider` started (a provider passed in is its owner's)."""
        for process in reversed(self._processes):
            process.stop()

    def get(self, path: str, token: str) -> tuple[int, dict, http.client.HTTPResponse]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=GUARD)
        try:
            connection.request("GET", path, headers={"Authorization": f"Bearer {token}"})
            response = connection.getresponse()
            return response.status, json.loads(response.read()), response
        finally:
            connection.close()

    def logged(self, pattern: str) -> re.Match[str]:
        """A gateway log line matching ``pattern``, already printed or still to come."""
        for line in self.gateway.out.seen:
            if match := re.search(pattern, line):
                return match
        return self.gateway.out.wait_for(pattern)

    def wait_ready(self) -> None:
        settle_blocking(lambda: self.get("/readyz", "")[0] == 200, "the gateway ready")


def _config(upstream_port: int, issuer: str, jwks_refresh: float, jwks_timeout: float) -> str:
    return f"""
[gateway]
listen = tcp:0:interface=127.0.0.1

[auth]
algorithms = {" ".join(ALGORITHMS)}
oidc_issuer = {issuer}
audience = {CHAT}
typ = at+jwt
jwks_refresh = {jwks_refresh:g}
jwks_timeout = {jwks_timeout:g}

[route:api]
prefix = /v1/api
upstream = http://127.0.0.1:{upstream_port}
websocket = false
auth = required

[route:admin]
prefix = /v1/api/admin
upstream = http://127.0.0.1:{upstream_port}
websocket = false
auth = required
require_scope = chat:write

[route:chat]
prefix = /v1/chat
upstream = http://127.0.0.1:{upstream_port}
auth = required
"""


@pytest.fixture(scope="module")
def upstream_port(tmp_path_factory) -> Iterator[int]:
    """One aiohttp upstream for the file's gateways: it answers and echoes, and keeps nothing."""
    upstream, port = aiohttp_upstream(tmp_path_factory.mktemp("upstream"))
    try:
        yield port
    finally:
        upstream.stop()


def _provider(tmp_path_factory) -> Iterator[Provider]:
    provider = Provider(tmp_path_factory.mktemp("provider"), KEYS_WITHOUT_ALG)
    try:
        yield provider
    finally:
        provider.stop()


@pytest.fixture(scope="module")
def stack_provider(tmp_path_factory) -> Iterator[Provider]:
    """The provider of the shared gateway :func:`stack` (its keys never change)."""
    yield from _provider(tmp_path_factory)


@pytest.fixture(scope="module")
def provider(tmp_path_factory) -> Iterator[Provider]:
    """
    The provider of the tests that start their own gateway: each sets the keys
    and JWKS answer it needs (:meth:`Provider.serve`) before its gateway reads them.
    """
    yield from _provider(tmp_path_factory)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, upstream_port, stack_provider) -> Iterator[Stack]:
    stack = Stack(tmp_path_factory.mktemp("oidc"), upstream_port, stack_provider)
    try:
        stack.wait_ready()
        yield stack
    finally:
        stack.stop()


def test_keys_come_through_the_providers_discovery_document(stack):
    """The gateway read /.well-known/openid-configuration and fetched the jwks_uri it names."""
    found = stack.logged(r"JWKS from (\S+): (\d+) keys")
    assert found.groups() == (f"{stack.provider.issuer}/jwks", str(len(KEYS_WITHOUT_ALG)))


@pytest.mark.parametrize("alg", ALGORITHMS)
def test_an_access_token_of_each_algorithm_from_keys_without_alg(stack, alg):
    token = stack.provider.access_token(alg)
    assert jwt.get_unverified_header(token)["typ"] == "at+jwt"
    assert stack.get("/v1/api/admin/me", token)[:2] == (200, {"pong": "/v1/api/admin/me"})
    with ws_connect(f"ws://127.0.0.1:{stack.port}/v1/chat/ws", additional_headers={"Authorization": f"Bearer {token}"},
                    open_timeout=GUARD) as ws:
        ws.send("hello")
        assert ws.recv(timeout=GUARD) == "hello"


def test_an_id_token_from_the_login_pages_is_refused(stack):
    token = stack.provider.id_token()
    assert jwt.decode(token, options={"verify_signature": False})["aud"] == "web"
    status, body, response = stack.get("/v1/api/me", token)
    assert (status, body["error"]) == (401, "invalid_token")
    assert 'error="invalid_token"' in response.getheader("WWW-Authenticate")


def test_an_access_token_for_another_api_of_the_provider_is_refused(stack):
    token = stack.provider.access_token(resource=BILLING)
    assert jwt.decode(token, options={"verify_signature": False})["aud"] == BILLING
    status, body, _ = stack.get("/v1/api/me", token)
    assert (status, body["error"], body["detail"]) == (401, "invalid_token", "wrong audience")


def test_a_token_without_the_routes_scope_gets_403(stack):
    token = stack.provider.access_token(scope="chat:read")
    assert stack.get("/v1/api/me", token)[0] == 200
    status, body, response = stack.get("/v1/api/admin/me", token)
    assert (status, body["error"]) == (403, "insufficient_scope")
    assert 'error="insufficient_scope"' in response.getheader("WWW-Authenticate")


def test_an_access_token_of_each_algorithm_from_keys_bound_by_alg(tmp_path, upstream_port, provider):
    stack = Stack(tmp_path, upstream_port, provider.serve(KEYS_WITH_ALG))
    try:
        stack.wait_ready()
        for alg, key in zip(ALGORITHMS, KEYS_WITH_ALG):
            token = stack.provider.access_token(alg)
            assert jwt.get_unverified_header(token)["kid"] == key["kid"]
            assert stack.get("/v1/api/me", token)[:2] == (200, {"pong": "/v1/api/me"}), alg
    finally:
        stack.stop()


def test_an_issuer_that_differs_from_the_documents_is_an_outage_not_a_source_of_keys(tmp_path, upstream_port, provider):
    """A trailing slash the provider does not write: 503 auth_unavailable, never ready, never its keys."""
    stack = Stack(tmp_path, upstream_port, provider.serve(KEYS_WITHOUT_ALG), issuer_suffix="/")
    try:
        stack.logged(r"JWKS fetch from \S+ failed: discovery document names issuer")
        status, body, response = stack.get("/v1/api/me", stack.provider.access_token())
        assert (status, body["error"]) == (503, "auth_unavailable")
        assert int(response.getheader("Retry-After")) >= 1
        assert stack.get("/readyz", "")[0] == 503
    finally:
        stack.stop()


def test_key_rotation_while_the_gateway_runs(tmp_path, upstream_port, provider):
    """
    The provider signs with a new key, of another type, at once (accepted from
    the next fetch), then drops the old one (refused from the next fetch after that).
    """
    old = {"kid": "rsa-old", "kty": "RSA"}
    new = {"kid": "ec-new", "kty": "EC"}
    stack = Stack(tmp_path, upstream_port, provider.serve([old]), jwks_refresh=1)
    try:
        stack.wait_ready()
        old_token = stack.provider.access_token()
        assert stack.get("/v1/api/me", old_token)[0] == 200

        stack.provider.rotate([new, old])
        new_token = stack.provider.access_token("ES256")
        assert jwt.get_unverified_header(new_token)["kid"] == "ec-new"
        settle_blocking(lambda: stack.get("/v1/api/me", new_token)[0] == 200, "the new key accepted")
        assert stack.get("/v1/api/me", old_token)[0] == 200

        stack.provider.rotate([new])
        settle_blocking(lambda: stack.get("/v1/api/me", old_token)[0] == 401, "the old key refused")
        status, body, _ = stack.get("/v1/api/me", old_token)
        assert body["error"] == "invalid_token"
        assert stack.get("/v1/api/me", new_token)[0] == 200
    finally:
        stack.stop()


def test_a_provider_down_at_start_up_is_an_outage_then_recovers_without_client_traffic(tmp_path, upstream_port):
    """
    The gateway starts while the provider is not listening: 503 auth_unavailable
    with Retry-After and /readyz 503, never 401; once the provider is up, its
    retries (1, 2, 4 ... s) find the keys with no request needed.
    """
    stack = Stack(tmp_path, upstream_port, None)
    try:
        stack.logged(r"JWKS fetch from \S+ failed: .*refused")
        key = ec.generate_private_key(ec.SECP256R1())
        claims = {"sub": "alice", "aud": CHAT, "iss": f"http://127.0.0.1:{stack.provider_port}", "exp": time.time() + 60}
        unknown = jwt.encode(claims, key, algorithm="ES256", headers={"kid": "ec-unknown", "typ": "at+jwt"})
        status, body, response = stack.get("/v1/api/me", unknown)
        assert (status, body["error"]) == (503, "auth_unavailable")
        assert response.getheader("WWW-Authenticate") is None
        assert int(response.getheader("Retry-After")) >= 1
        assert stack.get("/readyz", "")[0] == 503

        stack.start_provider(KEYS_WITHOUT_ALG)
        stack.logged(r"JWKS from \S+: 3 keys, after \d+ failed fetches")
        assert stack.get("/readyz", "")[0] == 200
        assert stack.get("/v1/api/me", stack.provider.access_token("ES256"))[0] == 200
        assert stack.get("/v1/api/me", unknown)[0] == 401  # a key the provider does not have
    finally:
        stack.stop()


@pytest.mark.parametrize(
    ("answer", "reason"), [("500", "HTTP 500"), ("html", "not a JSON document"), ("hang", "timed out after 2 s")]
)
def test_a_broken_jwks_at_start_up_is_an_outage_then_recovers_without_client_traffic(
    tmp_path, upstream_port, provider, answer, reason
):
    """
    The provider issues tokens but its JWKS answers 500, HTML or nothing: its
    good tokens get 503 auth_unavailable (never a 401 telling clients to drop
    them), /readyz 503, one log line naming the reason; mended, the retries
    alone find the keys.
    """
    # An unanswered fetch gives up after jwks_timeout: 2 s instead of the default 10 s.
    stack = Stack(
        tmp_path, upstream_port, provider.serve(KEYS_WITHOUT_ALG, jwks_answer=answer), jwks_timeout=2 if answer == "hang" else 10
    )
    try:
        token = stack.provider.access_token()
        status, body, response = stack.get("/v1/api/me", token)
        assert (status, body["error"]) == (503, "auth_unavailable")
        assert response.getheader("WWW-Authenticate") is None
        assert int(response.getheader("Retry-After")) >= 1
        assert stack.get("/readyz", "")[0] == 503
        stack.logged(rf"JWKS fetch from \S+/jwks failed: {reason}")

        stack.provider.break_jwks(None)
        stack.logged(r"JWKS from \S+: 3 keys, after \d+ failed fetches")
        assert stack.get("/readyz", "")[0] == 200
        assert stack.get("/v1/api/me", token)[:2] == (200, {"pong": "/v1/api/me"})
    finally:
        stack.stop()
