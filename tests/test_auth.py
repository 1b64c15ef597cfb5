"""
Tests for ``twisted_gateway.auth`` and the ``twisted_gateway.token`` helper.

Pure rules are tables; the Authenticator runs on a ``Clock``; the JWKS URL is
served by a real loopback twisted.web server and fetched with treq.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import subprocess
import sys
import time
from typing import Any, AsyncIterator

import jwt
import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from treq.client import HTTPClient
from twisted.internet import endpoints
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.protocols.policies import WrappingFactory
from twisted.logger import formatEvent
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from tests.certs import Authority
from tests.support import LogEvents, selectables, settle
from twisted_gateway.auth import (
    AuthError,
    Authenticator,
    AuthSettings,
    AuthUnavailable,
    Identity,
    InsufficientScope,
    auth_warnings,
    check_requirements,
    check_claim_times,
    extract_token,
    parse_auth_section,
    parse_jwks,
    strip_query_param,
)
from twisted_gateway.config import ConfigError, Settings, load_settings
from twisted_gateway.jwks import FetchFailed, discovery_url, parse_discovery

NOW = 1_700_000_000
SECRET = b"0123456789abcdef" * 4  # 64 bytes: long enough for every HS* algorithm
CLAIMS = {"sub": "alice", "iat": NOW, "exp": NOW + 3600}
#: where the key set logs (a class-level Logger takes its class's name)
KEYSET_LOG = "twisted_gateway.jwks.KeySet"
#: Every test here ends what it started before it returns, Twisted's own timers too.
pytestmark = pytest.mark.cleans_up_at_once


# -- helpers and fixtures ---------------------------------------------------


def _reactor():
    from twisted.internet import reactor

    return reactor


@pytest.fixture(scope="module")
def rsa_keys() -> list[rsa.RSAPrivateKey]:
    return [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(3)]


def public_pem(private_key: rsa.RSAPrivateKey) -> bytes:
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def jwks_document(**keys: rsa.RSAPrivateKey) -> bytes:
    """A JWKS publishing the public half of each key under its kid."""
    jwks = [dict(RSAAlgorithm.to_jwk(k.public_key(), as_dict=True), kid=kid, use="sig")
            for kid, k in keys.items()]
    return json.dumps({"keys": jwks}).encode("utf-8")


def hs_token(claims: dict[str, Any] = CLAIMS, key: bytes = SECRET, alg: str = "HS256") -> str:
    return jwt.encode(claims, key, algorithm=alg)


def rs_token(key: rsa.RSAPrivateKey, kid: str | None = None, claims=CLAIMS) -> str:
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": kid} if kid else None)


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def handmade_token(header: dict[str, Any], claims: dict[str, Any], hmac_key: bytes | None) -> str:
    """A token PyJWT would refuse to sign: unsigned, or HMAC-signed with any bytes."""
    signing_input = _b64(json.dumps(header).encode()) + b"." + _b64(json.dumps(claims).encode())
    signature = b""
    if hmac_key is not None:
        signature = _b64(hmac.new(hmac_key, signing_input, hashlib.sha256).digest())
    return (signing_input + b"." + signature).decode("ascii")


def result_of(coroutine) -> Any:
    """The outcome of a coroutine that does no I/O: its value, or its exception raised."""
    outcome: list[Any] = []
    Deferred.fromCoroutine(coroutine).addBoth(outcome.append)
    assert outcome, "the coroutine is still waiting"
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]


def refused(authenticator: Authenticator, token: str) -> AuthError:
    with pytest.raises(AuthError) as caught:
        result_of(authenticator.verify(token))
    return caught.value


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(NOW)
    yield clock
    assert clock.getDelayedCalls() == []


def hs_authenticator(clock: Clock, **settings: Any) -> Authenticator:
    return Authenticator(AuthSettings(algorithms=("HS256",), secret=SECRET, **settings), clock)


# -- extract_token ----------------------------------------------------------

BEARER = [(b"Authorization", b"Bearer from-header")]

EXTRACT = [
    pytest.param(BEARER, b"token=from-query", None, "from-header", id="bearer header wins"),
    pytest.param([(b"authorization", b"bearer  lower")], b"", None, "lower", id="scheme any case"),
    pytest.param([(b"Authorization", b"Basic dTpw")], b"token=q", None, "q", id="basic ignored"),
    pytest.param([(b"Authorization", b"Bearer ")], b"token=q", None, "q", id="empty bearer"),
    pytest.param([], b"a=1&token=from-query&b=2", None, "from-query", id="query parameter"),
    pytest.param([], b"token=a%2Eb%2ec", None, "a.b.c", id="query value percent-decoded"),
    pytest.param([], b"%74oken=q", None, "q", id="query name percent-decoded"),
    pytest.param([], b"token=a+b%2Bc", None, "a b+c", id="query form-decoded (RFC 6750 2.3)"),
    pytest.param([], b"token=&token=q", None, "q", id="first non-empty query value"),
    pytest.param([], b"tokens=q&my_token=q&token", None, None, id="other names ignored"),
    pytest.param([], b"token=", None, None, id="empty query value is no token"),
    pytest.param([(b"Cookie", b"a=1; jwt=c")], b"token=q", "jwt", "q", id="query wins on cookie"),
    pytest.param([(b"Cookie", b"a=1; jwt=c")], b"", "jwt", "c", id="cookie when configured"),
    pytest.param([(b"Cookie", b'jwt="c"')], b"", "jwt", "c", id="quoted cookie"),
    pytest.param([(b"Cookie", b'a={"x": 1}; jwt=c')], b"", "jwt", "c", id="after a JSON cookie"),
    pytest.param([(b"Cookie", b"a=1"), (b"cookie", b"jwt=c")], b"", "jwt", "c", id="second cookie"),
    pytest.param([(b"Cookie", b"jwt=c")], b"", None, None, id="cookie ignored unless configured"),
    pytest.param([(b"X-Token", b"x")], b"", "jwt", None, id="nothing found"),
]


@pytest.mark.parametrize("headers, query, cookie, expected", EXTRACT)
def test_extract_token(headers, query, cookie, expected):
    """The token comes from the bearer header, the query parameter or the cookie, in that order."""
    assert extract_token(headers, query, query_param="token", cookie=cookie) == expected


def test_extract_token_custom_query_param():
    """The query parameter's name is configurable."""
    query = b"token=no&access_token=yes"
    assert extract_token([], query, query_param="access_token", cookie=None) == "yes"


# -- strip_query_param -----------------------------------------------------------

STRIP = [
    pytest.param(b"token=abc", b"", id="alone"),
    pytest.param(b"a=1&token=abc&b=%41", b"a=1&b=%41", id="others byte-identical"),
    pytest.param(b"token=1&%74oken=2&x", b"x", id="every copy"),
    pytest.param(b"tokens=1&token", b"tokens=1", id="bare name stripped too"),
    pytest.param(b"", b"", id="empty query"),
]


@pytest.mark.parametrize("query, expected", STRIP)
def test_strip_query_param(query, expected):
    """With strip_token the upstream gets the URL without the token parameter."""
    assert strip_query_param(query, "token") == expected


# -- parse_auth_section -----------------------------------------------------

LONG = "a-demo-secret-that-is-32-bytes-or-longer"


def load_auth(source: str, values: dict[str, str]) -> AuthSettings:
    """``[auth]`` as start-up reads it: parsed, then its key material loaded."""
    return load_settings(Settings(auth=parse_auth_section(source, values), source=source)).auth


@pytest.fixture
def config_dir(tmp_path, rsa_keys, monkeypatch):
    """Key files next to a config file, as ``file:`` paths name them."""
    (tmp_path / "rsa.pem").write_bytes(public_pem(rsa_keys[0]))
    (tmp_path / "garbage.pem").write_bytes(b"-----BEGIN PUBLIC KEY-----\nnot base64\n")
    (tmp_path / "jwks.json").write_bytes(jwks_document(one=rsa_keys[0], two=rsa_keys[1]))
    (tmp_path / "no-keys.json").write_bytes(b'{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}')
    (tmp_path / "secret.txt").write_bytes(LONG.encode() + b"\n")
    Authority("test-ca").write(tmp_path)  # test-ca.pem
    monkeypatch.chdir(tmp_path)  # ca_file is read as a route's is: from the working directory
    monkeypatch.setenv("GATEWAY_TEST_SECRET", LONG)
    monkeypatch.setenv("GATEWAY_TEST_EMPTY", "")
    monkeypatch.delenv("GATEWAY_TEST_UNSET", raising=False)
    return tmp_path


BAD_CONFIGS = [
    pytest.param({"secret": LONG}, "algorithms", "missing required key", id="no algorithms"),
    pytest.param({"algorithms": "none", "secret": LONG}, "algorithms", '"none" is refused',
                 id="alg none refused"),
    pytest.param({"algorithms": "HS256 NONE"}, "algorithms", '"none" is refused',
                 id="alg none refused in any case"),
    pytest.param({"algorithms": "RS257"}, "algorithms", "unknown algorithm", id="unknown alg"),
    pytest.param({"algorithms": "HS256 RS256", "secret": LONG}, "algorithms", "mixes HMAC",
                 id="HMAC mixed with public-key algorithm"),
    pytest.param({"algorithms": "HS256", "public_key": "file:rsa.pem"}, "public_key",
                 "verifies with secret", id="HMAC algorithm with a public key"),
    pytest.param({"algorithms": "HS256", "jwks_url": "https://a.example/jwks"}, "jwks_url",
                 "verifies with secret", id="HMAC algorithm with a JWKS"),
    pytest.param({"algorithms": "RS256", "secret": LONG}, "secret", "not a secret",
                 id="public-key algorithm with a secret"),
    pytest.param({"algorithms": "HS256", "secret": " "}, "secret", "is empty", id="empty secret"),
    pytest.param({"algorithms": "HS256", "secret": "env:GATEWAY_TEST_EMPTY"}, "secret",
                 "is empty", id="empty secret from env"),
    pytest.param({"algorithms": "HS256", "secret": "env:GATEWAY_TEST_UNSET"}, "secret",
                 "GATEWAY_TEST_UNSET is not set", id="unset env"),
    pytest.param({"algorithms": "HS256", "secret": "file:missing.txt"}, "secret",
                 "cannot read", id="missing secret file"),
    pytest.param({"algorithms": "HS256", "secret": "tiny"}, "secret", "shorter than the 32",
                 id="secret too short for HS256"),
    pytest.param({"algorithms": "HS512 HS256", "secret": LONG}, "secret", "64 bytes HS512",
                 id="secret too short for HS512"),
    pytest.param({"algorithms": "HS256", "secret": "file:rsa.pem"}, "secret", "PEM key",
                 id="PEM as HMAC secret"),
    pytest.param({"algorithms": "RS256", "public_key": "file:garbage.pem"}, "public_key",
                 "not a PEM public key", id="key file does not parse"),
    pytest.param({"algorithms": "ES256", "public_key": "file:rsa.pem"}, "public_key",
                 "cannot verify ES256", id="key of the wrong type"),
    pytest.param({"algorithms": "RS256", "jwks_file": "file:garbage.pem"}, "jwks_file",
                 "not a JSON document", id="JWKS file does not parse"),
    pytest.param({"algorithms": "RS256", "jwks_file": "file:no-keys.json"}, "jwks_file",
                 "no usable signing key", id="JWKS without public signing keys"),
    pytest.param({"algorithms": "RS256"}, None, "needs secret, public_key", id="no key"),
    pytest.param({"algorithms": "RS256", "public_key": "file:rsa.pem",
                  "jwks_url": "https://a.example/jwks"}, "jwks_url", "set only one",
                 id="two key sources"),
    pytest.param({"algorithms": "RS256", "jwks_url": "ftp://a.example/jwks"}, "jwks_url",
                 "http:// or https://", id="JWKS URL not HTTP"),
    pytest.param({"algorithms": "RS256", "jwks_url": "https://a.example/jwks",
                  "oidc_issuer": "https://a.example/"}, "oidc_issuer", "set only one",
                 id="JWKS URL and OIDC issuer"),
    pytest.param({"algorithms": "RS256", "oidc_issuer": "https://a.example/realms/chat",
                  "issuer": "https://b.example/"}, "issuer", "leave it out", id="issuer not the OIDC one"),
    pytest.param({"algorithms": "RS256", "public_key": "file:rsa.pem", "ca_file": "test-ca.pem"},
                 "ca_file", "only for the fetches", id="ca_file without a fetch"),
    pytest.param({"algorithms": "RS256", "oidc_issuer": "https://a.example/", "ca_file": "missing.pem"},
                 "ca_file", "missing.pem", id="ca_file unreadable"),
    pytest.param({"algorithms": "HS256", "secret": LONG, "leeway": "-1"}, "leeway", ">= 0",
                 id="negative leeway"),
    pytest.param({"algorithms": "HS256", "secret": LONG, "colour": "blue"}, "colour",
                 "unknown key", id="unknown key"),
]


@pytest.mark.parametrize("values, key, reason", BAD_CONFIGS)
def test_bad_auth_section_fails_start_up(config_dir, values, key, reason):
    """A bad [auth] section stops start-up with one line naming file, section, key, reason."""
    source = str(config_dir / "tap.cfg")
    with pytest.raises(ConfigError) as caught:
        load_auth(source, values)
    error = caught.value
    assert (error.section, error.key) == ("auth", key)
    assert reason in error.reason
    assert str(error).startswith(f"{source}: [auth]") and "\n" not in str(error)
    assert LONG not in str(error)


def test_secret_never_appears_in_errors(config_dir):
    """Even a rejected secret is not printed."""
    with pytest.raises(ConfigError) as caught:
        load_auth("tap.cfg", {"algorithms": "HS256", "secret": "hunter2-hunter2"})
    assert "hunter2" not in str(caught.value)


def test_defaults_are_secure(config_dir):
    """Without more keys: exp is required, 30 s leeway, ?token=, no cookie, no stripping."""
    settings = load_auth("tap.cfg", {"algorithms": "HS256", "secret": LONG})
    assert settings.require == ("exp",)
    assert (settings.leeway, settings.query_param, settings.cookie) == (30.0, "token", None)
    assert (settings.strip_token, settings.jwks_refresh, settings.jwks_timeout) == (False, 600.0, 10.0)
    assert (settings.audience, settings.issuer) == ((), None)
    assert LONG not in repr(settings)


@pytest.mark.parametrize("reference", ["env:GATEWAY_TEST_SECRET", "file:secret.txt", LONG])
def test_secret_sources(config_dir, reference):
    """The secret is a literal, an environment variable or a file next to the config."""
    source = str(config_dir / "tap.cfg")
    settings = load_auth(source, {"algorithms": "HS256", "secret": reference})
    assert settings.secret == LONG.encode()


def test_key_files_are_loaded_at_start_up(config_dir, rsa_keys):
    """A PEM public key and a JWKS file are parsed once, when the config is read."""
    source = str(config_dir / "tap.cfg")
    pem = load_auth(source, {"algorithms": "RS256", "public_key": "file:rsa.pem"})
    assert pem.public_key.public_numbers() == rsa_keys[0].public_key().public_numbers()
    jwks = load_auth(source, {"algorithms": "RS256", "jwks_file": "file:jwks.json"})
    assert sorted(jwks.jwks) == ["one", "two"]


def test_parse_jwks_skips_keys_it_cannot_use(rsa_keys):
    """Encryption keys, symmetric keys and unknown types in a JWKS are skipped."""
    usable = json.loads(jwks_document(sig=rsa_keys[0]))["keys"][0]
    document = {"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"}, {"kty": "XYZ"},
                         dict(usable, kid="enc", use="enc"), usable]}
    assert sorted(parse_jwks(json.dumps(document).encode())) == ["sig"]


# -- claim times ------------------------------------------------------------

TIMES = [
    pytest.param({"exp": NOW - 31}, "token expired", id="expired beyond leeway"),
    pytest.param({"exp": NOW - 30}, "token expired", id="expired at exp plus leeway"),
    pytest.param({"nbf": NOW + 31}, "not yet valid", id="nbf beyond leeway"),
    pytest.param({"iat": NOW + 31}, "issued in the future", id="iat beyond leeway"),
    pytest.param({"exp": "tomorrow"}, "not a timestamp", id="exp not a number"),
    pytest.param({"exp": True}, "not a timestamp", id="exp a boolean"),
    pytest.param({"exp": float("nan")}, "not a timestamp", id="exp NaN"),
    pytest.param({"exp": float("inf")}, "not a timestamp", id="exp infinite"),
]


@pytest.mark.parametrize("claims, detail", TIMES)
def test_claim_times_refused(claims, detail):
    """exp, nbf and iat are checked against the gateway's clock, with leeway."""
    with pytest.raises(AuthError, match=detail):
        check_claim_times(claims, NOW, 30)


def test_claim_times_within_leeway():
    """Clock skew up to the leeway is tolerated; the identity expires at exp + leeway."""
    claims = {"exp": NOW - 29, "nbf": NOW + 29, "iat": NOW + 29}
    assert check_claim_times(claims, NOW, 30) == NOW + 1
    assert check_claim_times({}, NOW, 30) is None


# -- Authenticator: verification ---------------------------------------------


def test_valid_token_gives_identity_for_upstream(clock):
    """A valid token yields the subject, the claims and exp + leeway, sent upstream as headers."""
    identity = result_of(hs_authenticator(clock).verify(hs_token()))
    assert identity == Identity("alice", dict(CLAIMS), expires_at=NOW + 3600 + 30)
    headers = dict(identity.upstream_headers())
    assert headers[b"X-Auth-Subject"] == b"alice"
    encoded = headers[b"X-Auth-Claims"]
    assert b"=" not in encoded
    assert json.loads(base64.urlsafe_b64decode(encoded + b"=" * (-len(encoded) % 4))) == CLAIMS


def test_identity_without_sub_sends_only_claims():
    """No sub claim: no X-Auth-Subject header at all."""
    assert [name for name, _ in Identity(None, {}).upstream_headers()] == [b"X-Auth-Claims"]


def test_expiry_follows_the_injected_clock(clock):
    """A token valid now is refused once the clock passes exp + leeway."""
    authenticator = hs_authenticator(clock)
    token = hs_token(dict(CLAIMS, exp=NOW + 10))
    assert result_of(authenticator.verify(token)).expires_at == NOW + 40
    clock.advance(39)
    assert result_of(authenticator.verify(token)).subject == "alice"
    clock.advance(1)
    assert refused(authenticator, token).detail == "token expired"


REFUSED = [
    pytest.param(dict(CLAIMS, exp=NOW - 31), {}, "token expired", id="expired"),
    pytest.param(dict(CLAIMS, nbf=NOW + 60), {}, "token not yet valid (nbf)", id="nbf in future"),
    pytest.param(dict(CLAIMS, iat=NOW + 60), {}, "token issued in the future (iat)",
                 id="iat in future"),
    pytest.param(dict(CLAIMS, aud="other"), {"audience": ("chat",)}, "wrong audience",
                 id="wrong audience"),
    pytest.param(CLAIMS, {"audience": ("chat",)}, "missing required claim aud", id="no aud"),
    pytest.param(dict(CLAIMS, iss="evil"), {"issuer": "good"}, "wrong issuer", id="wrong issuer"),
    pytest.param({"sub": "alice"}, {}, "missing required claim exp", id="missing exp"),
    pytest.param(CLAIMS, {"require": ("exp", "jti")}, "missing required claim jti",
                 id="missing configured claim"),
    pytest.param(dict(CLAIMS, sub="a\r\nX-Admin: 1"), {},
                 "the sub claim contains control characters", id="sub with control characters"),
    pytest.param(dict(CLAIMS, sub=42), {}, "invalid token", id="sub not a string"),
]


@pytest.mark.parametrize("claims, settings, detail", REFUSED)
def test_refused_claims(clock, claims, settings, detail):
    """Each failed claim check is a 401 invalid_token saying which check failed."""
    error = refused(hs_authenticator(clock, **settings), hs_token(claims))
    assert (error.status, error.error, error.detail) == (401, "invalid_token", detail)


def test_audience_and_issuer_accepted_when_they_match(clock):
    """Matching aud and iss pass; without an audience setting, aud is not checked."""
    claims = dict(CLAIMS, aud=["chat", "other"], iss="good")
    strict = hs_authenticator(clock, audience=("chat",), issuer="good")
    assert result_of(strict.verify(hs_token(claims))).subject == "alice"
    assert result_of(hs_authenticator(clock).verify(hs_token(claims))).subject == "alice"


def test_bad_signature(clock):
    """A token signed with another secret is refused."""
    token = hs_token(key=b"another-secret-" * 5)
    assert refused(hs_authenticator(clock), token).detail == "bad signature"


@pytest.mark.parametrize("header", [{"alg": "none"}, {"alg": "None"}, {"typ": "JWT"}])
def test_alg_none_is_refused(clock, header):
    """An unsigned token (alg none, or no alg at all) is refused."""
    token = handmade_token(header, CLAIMS, None)
    assert refused(hs_authenticator(clock), token).detail == "algorithm not allowed"


def test_algorithm_outside_the_configured_list_is_refused(clock):
    """HS512 with the right secret is still refused when only HS256 is configured."""
    token = hs_token(alg="HS512")
    assert refused(hs_authenticator(clock), token).detail == "algorithm not allowed"


def test_key_confusion_hs256_signed_with_the_rsa_public_key(clock, rsa_keys):
    """HS256 HMAC-signed with the RS256 public key PEM (which anyone has) is refused."""
    pem = public_pem(rsa_keys[0])
    token = handmade_token({"alg": "HS256", "typ": "JWT"}, CLAIMS, pem)
    rs256 = Authenticator(AuthSettings(algorithms=("RS256",), public_key=rsa_keys[0].public_key()),
                          clock)
    assert refused(rs256, token).detail == "algorithm not allowed"
    # Even a PEM given as the HMAC secret in code (parse_auth_section refuses it) does
    # not verify: PyJWT will not use a PEM as an HMAC key.
    confused = Authenticator(AuthSettings(algorithms=("HS256",), secret=pem), clock)
    assert refused(confused, token).detail == "the key does not fit the token's algorithm"
    with pytest.raises(jwt.InvalidKeyError):
        jwt.decode(token, pem, algorithms=["HS256"])


def test_oversized_token_rejected_without_parsing(clock, monkeypatch):
    """A token over max_token_size (default 16 KiB) is refused, and is not even parsed."""
    monkeypatch.setattr(jwt, "decode_complete", pytest.fail)
    error = refused(hs_authenticator(clock), "A" * (16 * 1024 + 1))
    assert error.detail == "token larger than max_token_size"
    error = refused(hs_authenticator(clock, max_token_size=100), "A" * 101)
    assert error.detail == "token larger than max_token_size"


def test_a_token_with_300_roles_fits_the_default_size(clock):
    """A Keycloak-style token with 300 roles (about 10 KB) is accepted by default."""
    roles = [f"application-role-number-{i:04d}" for i in range(300)]
    token = hs_token(dict(CLAIMS, realm_access={"roles": roles}))
    assert 8 * 1024 < len(token) < 16 * 1024
    assert result_of(hs_authenticator(clock).verify(token)).subject == "alice"


TYPES = [
    pytest.param("at+jwt", True, id="at+jwt"),
    pytest.param("application/at+JWT", True, id="application/at+jwt, any case"),
    pytest.param("JWT", False, id="an id_token's JWT"),
    pytest.param("dpop+jwt", False, id="a DPoP proof"),
    pytest.param(None, False, id="no typ"),
]


@pytest.mark.parametrize("typ, accepted", TYPES)
def test_typ_at_jwt_refuses_what_is_not_an_access_token(clock, typ, accepted):
    """[auth] typ = at+jwt (RFC 9068 4): id_tokens and DPoP proofs are not access tokens."""
    headers = {"typ": typ} if typ else {"typ": None}
    token = jwt.encode(CLAIMS, SECRET, algorithm="HS256", headers=headers)
    authenticator = hs_authenticator(clock, typ="at+jwt")
    if accepted:
        assert result_of(authenticator.verify(token)).subject == "alice"
    else:
        assert refused(authenticator, token).detail == "token type is not at+jwt"
    assert result_of(hs_authenticator(clock).verify(token)).subject == "alice"  # off by default


REQUIREMENTS = [
    pytest.param({"scope": "chat:read chat:write"}, ("chat:write",), (), None, id="scope string"),
    pytest.param({"scp": ["chat:write"]}, ("admin", "chat:write"), (), None, id="scp array, any of"),
    pytest.param({"scope": "chat:read"}, ("chat:write",), (), "needs scope chat:write", id="no scope"),
    pytest.param({}, ("chat:write",), (), "needs scope chat:write", id="no scope claim"),
    pytest.param({"realm_access": {"roles": ["user", "admin"]}}, (),
                 (("realm_access.roles", "admin"),), None, id="nested array claim"),
    pytest.param({"tenant": "acme"}, (), (("tenant", "acme"),), None, id="string claim"),
    pytest.param({"realm_access": {"roles": ["user"]}}, (), (("realm_access.roles", "admin"),),
                 "needs claim realm_access.roles to hold admin", id="role missing"),
    pytest.param({"realm_access": "admin"}, (), (("realm_access.roles", "admin"),),
                 "needs claim realm_access.roles to hold admin", id="not an object"),
]


@pytest.mark.parametrize("claims, scopes, required, detail", REQUIREMENTS)
def test_route_requirements(claims, scopes, required, detail):
    """require_scope (any of) and require_claim (all): a good token without them is 403."""
    if detail is None:
        check_requirements(claims, scopes, required)
        return
    with pytest.raises(InsufficientScope) as caught:
        check_requirements(claims, scopes, required)
    assert (caught.value.status, caught.value.error, caught.value.detail) == (
        403, "insufficient_scope", detail)
    challenge = dict(caught.value.headers)[b"WWW-Authenticate"]
    assert b'error="insufficient_scope"' in challenge


def _claims_of(headers: dict[bytes, bytes]) -> dict:
    encoded = headers[b"X-Auth-Claims"]
    return json.loads(base64.urlsafe_b64decode(encoded + b"=" * (-len(encoded) % 4)))


def test_claims_header_is_utf8_json_and_can_be_narrowed():
    """
    X-Auth-Claims is base64url of UTF-8 JSON (a CJK name is not tripled by
    escapes); claims_header = none or a list of names sends less.
    """
    claims = {"sub": "alice", "name": "山田太郎" * 200, "roles": ["a", "b"]}
    identity = Identity("alice", claims)
    full = dict(identity.upstream_headers())
    assert _claims_of(full) == claims
    escaped = base64.urlsafe_b64encode(json.dumps(claims, separators=(",", ":")).encode())
    assert len(full[b"X-Auth-Claims"]) < 0.6 * len(escaped)
    assert dict(identity.upstream_headers("none")) == {b"X-Auth-Subject": b"alice"}
    assert _claims_of(dict(identity.upstream_headers(("sub", "roles", "absent")))) == {
        "sub": "alice", "roles": ["a", "b"]}


@pytest.mark.parametrize("token", ["garbage", "a.b.c", "e30", "e30.e30", "é" * 10])
def test_malformed_token(clock, token):
    """Text that is not a JWT is a 401 malformed token."""
    assert refused(hs_authenticator(clock), token).detail == "malformed token"


def test_rs256_with_public_key(clock, rsa_keys):
    """With a PEM public key, tokens signed by its private key pass and others do not."""
    settings = AuthSettings(algorithms=("RS256",), public_key=rsa_keys[0].public_key())
    authenticator = Authenticator(settings, clock)
    assert result_of(authenticator.verify(rs_token(rsa_keys[0]))).subject == "alice"
    assert refused(authenticator, rs_token(rsa_keys[1])).detail == "bad signature"


def test_jwks_file_chooses_the_key_by_kid(clock, rsa_keys):
    """A JWKS file with two keys: each kid verifies with its own key; unknown kids fail."""
    settings = AuthSettings(algorithms=("RS256",),
                            jwks=parse_jwks(jwks_document(one=rsa_keys[0], two=rsa_keys[1])))
    authenticator = Authenticator(settings, clock)
    assert result_of(authenticator.verify(rs_token(rsa_keys[0], "one"))).subject == "alice"
    assert result_of(authenticator.verify(rs_token(rsa_keys[1], "two"))).subject == "alice"
    assert refused(authenticator, rs_token(rsa_keys[1], "one")).detail == "bad signature"
    assert refused(authenticator, rs_token(rsa_keys[2], "three")).detail == "unknown key id (kid)"
    assert refused(authenticator, rs_token(rsa_keys[0])).detail == "token has no key id (kid)"


# -- Authenticator: modes and the 401 it raises -----------------------------


def test_required_mode_without_token(clock):
    """auth = required and no token: 401 missing_token with a bare Bearer challenge."""
    with pytest.raises(AuthError) as caught:
        result_of(hs_authenticator(clock).authenticate("required", [], b""))
    error = caught.value
    assert (error.status, error.error) == (401, "missing_token")
    assert json.loads(error.body())["error"] == "missing_token"
    assert error.headers == ((b"WWW-Authenticate", b'Bearer realm="wsgateway"'),)


def test_invalid_token_challenge_names_the_failed_check(clock):
    """An invalid token's 401 carries error="invalid_token" and the detail in the challenge."""
    query = b"token=" + hs_token(dict(CLAIMS, exp=NOW - 60)).encode()
    with pytest.raises(AuthError) as caught:
        result_of(hs_authenticator(clock).authenticate("required", [], query))
    assert json.loads(caught.value.body()) == {"error": "invalid_token", "detail": "token expired"}
    challenge = b'Bearer realm="wsgateway", error="invalid_token", ' \
        b'error_description="token expired"'
    assert caught.value.headers == ((b"WWW-Authenticate", challenge),)


def test_optional_mode(clock):
    """auth = optional: no token passes anonymously, a valid one identifies, a bad one is 401."""
    authenticator = hs_authenticator(clock, cookie="jwt")
    assert result_of(authenticator.authenticate("optional", [], b"")) is None
    cookie = [(b"Cookie", b"jwt=" + hs_token().encode())]
    assert result_of(authenticator.authenticate("optional", cookie, b"")).subject == "alice"
    with pytest.raises(AuthError):
        result_of(authenticator.authenticate("optional", [], b"token=garbage"))


def test_none_mode_checks_nothing(clock):
    """auth = none: not even an invalid token is looked at."""
    authenticator = hs_authenticator(clock)
    assert result_of(authenticator.authenticate("none", BEARER, b"token=garbage")) is None


# -- JWKS URL over loopback -------------------------------------------------


class JwksServer(Resource):
    """A loopback JWKS endpoint whose document the test changes, and that can hang."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.document = b'{"keys": []}'
        self.requests = 0
        self.hang = False
        self.status = 200
        self.url = ""
        self.user_agents: list[bytes] = []

    def render_GET(self, request):
        self.requests += 1
        self.user_agents.append(request.getHeader(b"user-agent"))
        if self.hang:
            return NOT_DONE_YET
        request.setResponseCode(self.status)
        request.setHeader(b"content-type", b"application/json")
        return self.document

    async def start(self) -> None:
        reactor = _reactor()
        self._baseline = selectables()
        self._factory = WrappingFactory(Site(self))
        endpoint = endpoints.serverFromString(reactor, "tcp:0:interface=127.0.0.1")
        self._port = await endpoint.listen(self._factory)
        self.url = f"http://127.0.0.1:{self._port.getHost().port}/jwks.json"

    @property
    def open_connections(self) -> int:
        return len(self._factory.protocols)

    async def stop(self) -> None:
        """Stop listening, drop the connections, and wait until every socket is closed."""
        if self._port is not None:
            await self._port.stopListening()
            self._port = None
        for protocol in list(self._factory.protocols):
            protocol.transport.abortConnection()
        await settle(lambda: not self._factory.protocols and selectables() <= self._baseline, "every socket closed")


@pytest_twisted.async_yield_fixture
async def jwks_server():
    server = JwksServer()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def http_client() -> HTTPClient:
    """A treq client that keeps no connection open between requests."""
    reactor = _reactor()
    return HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))


def jwks_authenticator(clock: Clock, url: str, http_client: HTTPClient, timeout: float = 10.0) -> Authenticator:
    settings = AuthSettings(algorithms=("RS256",), jwks_url=url, jwks_timeout=timeout)
    return Authenticator(settings, clock, http_client)


@contextlib.asynccontextmanager
async def started(authenticator: Authenticator) -> AsyncIterator[Authenticator]:
    """The authenticator started, then stopped (its fetch in flight ended) on the way out."""
    authenticator.start()
    try:
        yield authenticator
    finally:
        await authenticator.stop()


@pytest_twisted.ensureDeferred
async def test_jwks_url_new_key_accepted_after_refetch(clock, jwks_server, http_client, rsa_keys):
    """A key published after start-up works once the JWKS is refetched (at most once a minute)."""
    jwks_server.document = jwks_document(one=rsa_keys[0])
    async with started(jwks_authenticator(clock, jwks_server.url, http_client)) as authenticator:
        assert (await authenticator.verify(rs_token(rsa_keys[0], "one"))).subject == "alice"
        jwks_server.document = jwks_document(one=rsa_keys[0], two=rsa_keys[1])
        new = rs_token(rsa_keys[1], "two")
        clock.advance(59)
        with pytest.raises(AuthError, match="unknown key id"):
            await authenticator.verify(new)
        assert jwks_server.requests == 1, "refetched sooner than a minute after the last fetch"
        clock.advance(1)
        assert (await authenticator.verify(new)).subject == "alice"
        assert jwks_server.requests == 2


@pytest_twisted.ensureDeferred
async def test_jwks_url_refreshed_in_the_background(clock, jwks_server, http_client, rsa_keys):
    """Every jwks_refresh seconds the JWKS is fetched again, and removed keys stop working."""
    jwks_server.document = jwks_document(one=rsa_keys[0])
    async with started(jwks_authenticator(clock, jwks_server.url, http_client)) as authenticator:
        await authenticator.verify(rs_token(rsa_keys[0], "one"))
        jwks_server.document = jwks_document(two=rsa_keys[1])
        clock.advance(600)
        # Both tokens join the refresh now in flight; neither starts a fetch of its own.
        verifications = [Deferred.fromCoroutine(authenticator.verify(rs_token(k, kid)))
                         for k, kid in ((rsa_keys[1], "two"), (rsa_keys[1], "two"))]
        identities = [await d for d in verifications]
        assert [i.subject for i in identities] == ["alice", "alice"]
        assert jwks_server.requests == 2
        with pytest.raises(AuthError, match="unknown key id"):
            await authenticator.verify(rs_token(rsa_keys[0], "one"))


@pytest_twisted.ensureDeferred
async def test_jwks_url_known_keys_work_while_server_is_down(clock, jwks_server, http_client, rsa_keys):
    """
    While the JWKS URL cannot be fetched, the keys already known keep working,
    and a token with a new kid is told to come back (503), not that it is bad.
    """
    jwks_server.document = jwks_document(one=rsa_keys[0])
    async with started(jwks_authenticator(clock, jwks_server.url, http_client)) as authenticator:
        known = rs_token(rsa_keys[0], "one")
        await authenticator.verify(known)
        await jwks_server.stop()
        clock.advance(600)  # the background refresh fails
        await settle(lambda: authenticator.keyset.failing)
        with pytest.raises(AuthUnavailable):
            await authenticator.verify(rs_token(rsa_keys[1], "two"))
        assert (await authenticator.verify(known)).subject == "alice"
        assert authenticator.ready(), "it was fetched once: the gateway stays ready"


OUTAGES = [
    pytest.param("down", "connect", "connection refused", id="connection refused"),
    pytest.param("500", "http_status", "HTTP 500", id="HTTP 500"),
    pytest.param("html", "not_json", "not a JSON document", id="an HTML page"),
    pytest.param("hang", "timeout", "timed out after 8 s", id="no answer"),
]


async def start_outage(server: JwksServer, kind: str, clock: Clock) -> None:
    if kind == "down":
        await server.stop()
    elif kind == "500":
        server.status = 500
    elif kind == "html":
        server.document = b"<html><body>Service Unavailable</body></html>"
    else:
        server.hang = True


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("kind, reason, line", OUTAGES)
async def test_idp_outage_at_start_up_is_503_not_401(clock, jwks_server, http_client, rsa_keys,
                                                     kind, reason, line):
    """
    The JWKS cannot be fetched at start-up: tokens get 503 auth_unavailable with
    Retry-After (never invalid_token, which makes clients drop a good token),
    the gateway is not ready, and the log says why in one readable line.
    """
    await start_outage(jwks_server, kind, clock)
    with LogEvents(KEYSET_LOG) as log:
        async with started(jwks_authenticator(clock, jwks_server.url, http_client, timeout=8)) as authenticator:
            token = rs_token(rsa_keys[0], "one")
            if kind == "hang":
                await settle(lambda: jwks_server.requests == 1)
                waiting = Deferred.fromCoroutine(authenticator.verify(token))
                clock.advance(5)  # the request waits no longer than connect_timeout
                with pytest.raises(AuthUnavailable):
                    await waiting
                clock.advance(2.9)
                assert not authenticator.keyset.failing, "the fetch gave up before jwks_timeout"
                clock.advance(0.1)  # the fetch itself gives up after jwks_timeout
            await settle(lambda: authenticator.keyset.failing)
            with pytest.raises(AuthUnavailable) as caught:
                await authenticator.verify(token)
            error = caught.value
            assert (error.status, error.error) == (503, "auth_unavailable")
            headers = dict(error.headers)
            assert b"WWW-Authenticate" not in headers
            assert int(headers[b"Retry-After"]) >= 1
            assert not authenticator.ready()
            assert authenticator.key_counts() == (0, {reason: 1})
            warnings = [e for e in log.events if e["log_level"].name == "warn"]
            assert len(warnings) == 1
            assert line in formatEvent(warnings[0])


@pytest_twisted.ensureDeferred
async def test_idp_back_is_noticed_without_traffic(clock, jwks_server, http_client, rsa_keys):
    """
    Failed fetches are retried after 1, 2, 4 ... s with no request asking, and
    one line is logged for the whole outage; tokens work as soon as one succeeds.
    """
    jwks_server.status = 500
    with LogEvents(KEYSET_LOG) as log:
        async with started(jwks_authenticator(clock, jwks_server.url, http_client)) as authenticator:
            keyset = authenticator.keyset
            for n, wait in ((1, 1), (2, 2), (3, 4), (4, 8)):
                await settle(lambda: jwks_server.requests == n and sum(keyset.failures.values()) == n)
                assert keyset.retry_after() == wait
                if n < 4:
                    clock.advance(wait)
            jwks_server.status = 200
            jwks_server.document = jwks_document(one=rsa_keys[0])
            clock.advance(8)
            await settle(lambda: authenticator.ready())
            assert (await authenticator.verify(rs_token(rsa_keys[0], "one"))).subject == "alice"
            assert [e["log_level"].name for e in log.events] == ["warn", "info"]
            assert "after 4 failed fetches" in formatEvent(log.events[-1])
            assert jwks_server.user_agents[-1].startswith(b"twisted_gateway")


@pytest_twisted.ensureDeferred
async def test_unknown_kid_retries_a_failing_jwks_at_once(clock, jwks_server, http_client, rsa_keys):
    """While the JWKS is failing, a token's new kid does not wait for the minute's rate limit."""
    jwks_server.status = 500
    async with started(jwks_authenticator(clock, jwks_server.url, http_client)) as authenticator:
        await settle(lambda: authenticator.keyset.failing)
        jwks_server.status = 200
        jwks_server.document = jwks_document(one=rsa_keys[0])
        clock.advance(1.5)  # the backoff's first retry, earlier than a minute
        assert (await authenticator.verify(rs_token(rsa_keys[0], "one"))).subject == "alice"
        # Fetched and lacking the kid: that token is refused (401) and the next refetch waits.
        with pytest.raises(AuthError, match="unknown key id"):
            await authenticator.verify(rs_token(rsa_keys[1], "two"))


@pytest_twisted.ensureDeferred
async def test_stop_cancels_a_hanging_fetch(jwks_server, http_client, rsa_keys):
    """stop() ends a JWKS fetch the server never answers, and the refresh timer."""
    clock = Clock()
    jwks_server.hang = True
    authenticator = jwks_authenticator(clock, jwks_server.url, http_client)
    authenticator.start()
    waiting = Deferred.fromCoroutine(authenticator.verify(rs_token(rsa_keys[0], "one")))
    # The request reaches the server after the agent's name lookup, which runs in
    # the reactor's thread pool: wait for it, not for a number of reactor turns.
    await settle(lambda: jwks_server.requests, "the fetch reaches the server")
    waiting.cancel()  # a client that goes away does not cancel the shared fetch
    with pytest.raises(Exception):
        await waiting
    assert jwks_server.open_connections == 1, "the fetch ended with the client"
    await authenticator.stop()
    await settle(lambda: not jwks_server.open_connections, "the cancelled fetch closes its connection")
    assert clock.getDelayedCalls() == []


# -- the token helper -------------------------------------------------------


def run_token_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "twisted_gateway.token", *args],
        capture_output=True, text=True, timeout=60,
    )


def test_token_cli_mints_a_token_the_gateway_accepts(tmp_path):
    """`python -m twisted_gateway.token` prints only a token that passes the config's checks."""
    config = tmp_path / "tap.cfg"
    config.write_text(
        "[auth]\nalgorithms = HS256\nsecret = file:secret.txt ; next to the config\n"
        "audience = chat\nissuer = https://gw.example\n"
        "[route:chat]\nprefix = /chat\nupstream = http://127.0.0.1:9000\n"
    )
    (tmp_path / "secret.txt").write_text(LONG + "\n")
    done = run_token_cli("--config", str(config), "--sub", "alice", "--ttl", "3600")
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    assert done.stdout == token + "\n"
    settings = load_auth(str(config), {"algorithms": "HS256", "secret": LONG,
                                       "audience": "chat", "issuer": "https://gw.example"})
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 3600
    clock = Clock()
    clock.advance(claims["iat"])
    identity = result_of(Authenticator(settings, clock).verify(token))
    assert (identity.subject, identity.claims["aud"]) == ("alice", "chat")
    assert abs(claims["iat"] - time.time()) < 3600  # minted now, not at some fixed time


@pytest.mark.parametrize(
    "config_text, message",
    [
        pytest.param("[auth]\nalgorithms = RS256\npublic_key = file:rsa.pem\n",
                     "cannot mint tokens", id="public-key config"),
        pytest.param("[route:chat]\nprefix = /chat\n", "[auth]", id="no auth section"),
        pytest.param("[auth]\nalgorithms = HS256\nsecret = tiny\n", "secret", id="bad secret"),
    ],
)
def test_token_cli_refuses_with_one_line(tmp_path, rsa_keys, config_text, message):
    """Without an HMAC secret to sign with, the helper prints one line and exits 2."""
    (tmp_path / "rsa.pem").write_bytes(public_pem(rsa_keys[0]))
    route = "[route:chat]\nprefix = /chat\nupstream = http://127.0.0.1:9000\nauth = none\n"
    if "[route:chat]" in config_text:
        config_text = route
    (tmp_path / "tap.cfg").write_text(config_text + route if "[auth]" in config_text else config_text)
    done = run_token_cli("--config", str(tmp_path / "tap.cfg"), "--sub", "alice")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.count("\n") == 1 and message in done.stderr


def test_an_oidc_issuer_is_the_issuer_tokens_must_name(config_dir):
    settings = parse_auth_section(
        "tap.cfg", {"algorithms": "RS256", "oidc_issuer": "https://idp.example/realms/chat"}
    )
    assert (settings.oidc_issuer, settings.issuer) == ("https://idp.example/realms/chat",) * 2


@pytest.mark.parametrize("issuer, url", [
    ("https://idp.example/realms/chat", "https://idp.example/realms/chat/.well-known/openid-configuration"),
    ("https://tenant.auth0.com/", "https://tenant.auth0.com/.well-known/openid-configuration"),
])
def test_the_discovery_document_is_under_the_issuer(issuer, url):
    assert discovery_url(issuer) == url


ISSUER = "https://idp.example/realms/chat"


@pytest.mark.parametrize("document, reason", [
    ({"issuer": ISSUER, "jwks_uri": ISSUER + "/certs"}, None),
    ({"issuer": ISSUER + "/", "jwks_uri": ISSUER + "/certs"}, "names issuer 'https://idp.example/realms/chat/'"),
    ({"issuer": "https://evil.example", "jwks_uri": ISSUER + "/certs"}, "not 'https://idp.example"),
    ({"issuer": ISSUER}, "no http(s) jwks_uri"),
    ({"issuer": ISSUER, "jwks_uri": "file:///etc/keys"}, "no http(s) jwks_uri"),
    ({"issuer": ISSUER, "jwks_uri": "http://idp.example/certs"}, "plain http for an https issuer"),
    ([], "not a JSON object"),
    ("<html>", "not JSON"),
])
def test_a_discovery_document_must_name_the_issuer_and_a_jwks_uri(document, reason):
    data = document.encode() if isinstance(document, str) else json.dumps(document).encode()
    if reason is None:
        assert parse_discovery(data, ISSUER) == ISSUER + "/certs"
        return
    with pytest.raises(FetchFailed) as caught:
        parse_discovery(data, ISSUER)
    assert reason in str(caught.value)


def test_a_plain_http_oidc_issuer_is_warned_about(config_dir):
    from types import SimpleNamespace

    auth = parse_auth_section("tap.cfg", {"algorithms": "RS256", "oidc_issuer": "http://idp.example/",
                                          "audience": "chat"})
    settings = SimpleNamespace(auth=auth, source="tap.cfg", routes=[])
    assert any("oidc_issuer: fetched over plain http" in w for w in auth_warnings(settings))
