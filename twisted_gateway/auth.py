"""
JWT authentication at the edge: a token is checked once here, and only the
verified identity travels on, in headers the upstream can trust.

Token extraction and claim-time checks are pure functions (keeping tokens
out of logs is :mod:`twisted_gateway.logs`' rule).
:class:`Authenticator` verifies signatures with PyJWT, pins the algorithms,
reads time from the injected clock (never the wall clock), and owns the
background refresh of a ``jwks_url``, fetched with treq.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence
from urllib.parse import unquote_to_bytes, urlsplit

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.algorithms import get_default_algorithms
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from twisted_gateway.config import REQUIRED, ConfigError, Key, _read_section, parse_bool
from twisted_gateway.config import parse_non_negative_float, parse_positive_float, parse_words
from twisted_gateway.errors import GatewayError

Headers = Sequence[tuple[bytes, bytes]]

#: The values of a route's ``auth`` key.
AUTH_MODES = ("required", "optional", "none")
MAX_TOKEN_LENGTH = 8 * 1024
JWKS_REFETCH_INTERVAL = 60.0
JWKS_FETCH_TIMEOUT = 10.0
HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
SUPPORTED_ALGORITHMS = frozenset(get_default_algorithms()) - {"none"}


# -- where the token comes from (pure) ----------------------------------------


def _query_fields(query: bytes) -> list[tuple[bytes, bytes, bytes]]:
    """``(raw field, decoded name, decoded value)`` for each ``&``-separated field."""
    fields = []
    for raw in query.split(b"&") if query else []:
        name, _, value = raw.partition(b"=")
        fields.append((raw, unquote_to_bytes(name), unquote_to_bytes(value)))
    return fields


def extract_token(
    headers: Headers, query: bytes, *, query_param: str, cookie: str | None
) -> str | None:
    """
    The token a request carries; first found wins: ``Authorization: Bearer``,
    then ``query_param`` in the raw query (percent-decoded), then the cookie.
    An ``Authorization`` header of another scheme is not a source.
    """
    for name, value in headers:
        scheme, _, credentials = value.strip().partition(b" ")
        if name.lower() == b"authorization" and scheme.lower() == b"bearer":
            if credentials.strip():
                return credentials.strip().decode("latin-1")
    for _, name, value in _query_fields(query):
        if name == query_param.encode("utf-8") and value:
            return value.decode("latin-1")
    cookies = [v for n, v in headers if n.lower() == b"cookie"] if cookie else []
    for pair in b";".join(cookies).split(b";"):
        key, _, value = pair.strip().partition(b"=")
        if key.decode("latin-1") == cookie and value.strip(b'"'):
            return value.strip(b'"').decode("latin-1")
    return None


def strip_query_param(query: bytes, param: str) -> bytes:
    """The raw query without any ``param`` field; the rest is kept byte for byte."""
    wanted = param.encode("utf-8")
    return b"&".join(raw for raw, name, _ in _query_fields(query) if name != wanted)


# -- outcomes ---------------------------------------------------------------


class AuthError(GatewayError):
    """A refused token: 401, ``missing_token`` or ``invalid_token``, with a Bearer challenge."""

    status = 401
    error = "invalid_token"

    def __init__(self, detail: str, *, error: str = "invalid_token") -> None:
        challenge = 'Bearer realm="wsgateway"'
        if error != "missing_token":  # RFC 6750 3.1: no error code when no token came
            description = re.sub(r"[^ !#-\[\]-~]", "", detail)  # the characters it allows
            challenge += f', error="{error}", error_description="{description}"'
        headers = [(b"WWW-Authenticate", challenge.encode("ascii"))]
        super().__init__(detail, error=error, headers=headers)

    @classmethod
    def missing(cls) -> AuthError:
        return cls("no bearer token in the request", error="missing_token")


@dataclass(frozen=True)
class Identity:
    """Who a verified token says the caller is, and until when."""

    subject: str | None
    claims: dict[str, Any] = field(hash=False)
    #: ``exp`` + leeway, when a live connection must be closed; None without ``exp``.
    expires_at: float | None = None

    def upstream_headers(self) -> list[tuple[bytes, bytes]]:
        """``X-Auth-Subject`` (when there is a ``sub``) and ``X-Auth-Claims``."""
        claims = json.dumps(self.claims, separators=(",", ":"), sort_keys=True).encode("utf-8")
        encoded = (b"X-Auth-Claims", base64.urlsafe_b64encode(claims).rstrip(b"="))
        if self.subject is None:
            return [encoded]
        return [(b"X-Auth-Subject", self.subject.encode("utf-8")), encoded]


def check_claim_times(claims: Mapping[str, Any], now: float, leeway: float) -> float | None:
    """Check ``exp``, ``nbf`` and ``iat`` against ``now``; return ``exp + leeway`` or None."""
    times: dict[str, float] = {}
    for name in ("exp", "nbf", "iat"):
        value = claims.get(name)
        if value is None:
            continue
        # ``not abs(value) < 1e15`` also catches NaN and infinities, which JSON allows.
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) < 1e15:
            raise AuthError(f"the {name} claim is not a timestamp")
        times[name] = float(value)
    if now >= times.get("exp", math.inf) + leeway:
        raise AuthError("token expired")
    if now < times.get("nbf", -math.inf) - leeway:
        raise AuthError("token not yet valid (nbf)")
    if now < times.get("iat", -math.inf) - leeway:
        raise AuthError("token issued in the future (iat)")
    return times["exp"] + leeway if "exp" in times else None


# -- settings ---------------------------------------------------------------


@dataclass(frozen=True)
class AuthSettings:
    """The ``[auth]`` section, with secrets resolved and key files already parsed."""

    algorithms: tuple[str, ...]
    secret: bytes | None = field(default=None, repr=False)
    public_key: Any = None  # a ``cryptography`` public key
    jwks: Mapping[str | None, jwt.PyJWK] = field(default_factory=dict, hash=False)
    jwks_url: str | None = None
    jwks_refresh: float = 600.0
    audience: tuple[str, ...] = ()
    issuer: str | None = None
    require: tuple[str, ...] = ("exp",)
    leeway: float = 30.0
    query_param: str = "token"
    cookie: str | None = None
    strip_token: bool = False


def parse_algorithms(text: str) -> tuple[str, ...]:
    algorithms = parse_words(text)
    for name in algorithms:
        if name.lower() == "none":
            raise ValueError('"none" is refused: tokens must be signed')
        if name not in SUPPORTED_ALGORITHMS:
            raise ValueError(f"unknown algorithm {name!r}")
    return algorithms


def parse_http_url(text: str) -> str:
    parts = urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL, got {text.strip()!r}")
    return text.strip()


_KEY_SOURCES = ("secret", "public_key", "jwks_file", "jwks_url")

_AUTH_KEYS: Mapping[str, Key] = {
    "algorithms": Key(parse_algorithms, REQUIRED),
    "secret": Key(str, None),  # resolved later, by code that never quotes it
    "public_key": Key(str, None),
    "jwks_file": Key(str, None),
    "jwks_url": Key(parse_http_url, None),
    "jwks_refresh": Key(parse_positive_float, 600.0),
    "audience": Key(parse_words, ()),
    "issuer": Key(str.strip, None),
    "require": Key(parse_words, ("exp",)),
    "leeway": Key(parse_non_negative_float, 30.0),
    "query_param": Key(str.strip, "token"),
    "cookie": Key(str.strip, None),
    "strip_token": Key(parse_bool, False),
}


def _resolve(source: str, key: str, text: str) -> bytes:
    """The bytes behind ``literal | env:NAME | file:PATH``; errors never quote the value."""
    text = text.strip()
    if text.startswith("env:"):
        if text[4:] not in os.environ:
            raise ConfigError(source, "auth", key, f"environment variable {text[4:]} is not set")
        data = os.environ[text[4:]].encode("utf-8")
    elif text.startswith("file:"):  # relative to the config file
        path = os.path.join(os.path.dirname(source), os.path.expanduser(text[5:]))
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ConfigError(source, "auth", key, f"cannot read {path}: {e.strerror}") from None
    else:
        data = text.encode("utf-8")
    if not data.strip():
        raise ConfigError(source, "auth", key, "is empty")
    return data.rstrip(b"\r\n")


def parse_jwks(data: bytes) -> dict[str | None, jwt.PyJWK]:
    """The public signing keys of a JWKS document by ``kid``; other keys are skipped."""
    try:
        document = json.loads(data)
    except ValueError:
        raise ValueError("not a JSON document") from None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError('not a JWKS document (no "keys" list)')
    keys: dict[str | None, jwt.PyJWK] = {}
    for jwk in document["keys"]:
        if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig" or jwk.get("kty") == "oct":
            continue
        try:
            keys.setdefault(jwk.get("kid"), jwt.PyJWK(jwk))
        except (jwt.PyJWTError, ValueError, TypeError, NotImplementedError):
            continue
    if not keys:
        raise ValueError("no usable signing key")
    return keys


def parse_auth_section(source: str, values: Mapping[str, str]) -> AuthSettings:
    """Validate ``[auth]`` and load its key material; a problem is a :class:`ConfigError`."""
    if "secret" in values and not values["secret"].strip():
        raise ConfigError(source, "auth", "secret", "is empty")
    read = _read_section(source, "auth", values, _AUTH_KEYS)
    hmac = [a for a in read["algorithms"] if a in HMAC_ALGORITHMS]
    public = [a for a in read["algorithms"] if a not in HMAC_ALGORITHMS]
    if hmac and public:
        reason = f"mixes HMAC ({hmac[0]}) and public-key ({public[0]}) algorithms"
        raise ConfigError(source, "auth", "algorithms", reason)
    given = [k for k in _KEY_SOURCES if read[k] is not None]
    if not given:
        raise ConfigError(source, "auth", None, "needs secret, public_key, jwks_file or jwks_url")
    if hmac and given[0] != "secret":
        reason = f"{hmac[0]} is an HMAC algorithm: it verifies with secret, not {given[0]}"
        raise ConfigError(source, "auth", given[0], reason)
    if public and given[0] == "secret":
        reason = f"{public[0]} verifies with public_key, jwks_file or jwks_url, not a secret"
        raise ConfigError(source, "auth", "secret", reason)
    if len(given) > 1:
        raise ConfigError(source, "auth", given[1], f"set only one of {', '.join(given)}")

    text = read[given[0]]
    if given[0] == "secret":
        read["secret"] = secret = _resolve(source, "secret", text)
        if b"-----BEGIN" in secret:
            raise ConfigError(source, "auth", "secret", "is a PEM key, not an HMAC secret")
        strongest = max(hmac, key=lambda a: int(a[2:]))
        if len(secret) < int(strongest[2:]) // 8:  # RFC 7518 3.2: at least the hash's size
            reason = f"is shorter than the {int(strongest[2:]) // 8} bytes {strongest} needs"
            raise ConfigError(source, "auth", "secret", reason)
    elif given[0] == "public_key":
        try:
            read["public_key"] = key = load_pem_public_key(_resolve(source, "public_key", text))
        except (ValueError, UnsupportedAlgorithm):
            raise ConfigError(source, "auth", "public_key", "not a PEM public key") from None
        for alg in public:
            try:
                get_default_algorithms()[alg].prepare_key(key)
            except (jwt.PyJWTError, TypeError, ValueError):
                reason = f"holds an {type(key).__name__}, which cannot verify {alg}"
                raise ConfigError(source, "auth", "public_key", reason) from None
    elif given[0] == "jwks_file":
        try:
            read["jwks"] = parse_jwks(_resolve(source, "jwks_file", text))
        except ValueError as e:
            raise ConfigError(source, "auth", "jwks_file", str(e)) from None
    del read["jwks_file"]  # parsed into ``jwks``
    return AuthSettings(**read)


# -- verification -----------------------------------------------------------

_REASONS: Mapping[type, str] = {
    jwt.InvalidSignatureError: "bad signature",
    jwt.InvalidAlgorithmError: "algorithm not allowed",
    jwt.InvalidAudienceError: "wrong audience",
    jwt.InvalidIssuerError: "wrong issuer",
    jwt.InvalidKeyError: "the key does not fit the token's algorithm",
    jwt.DecodeError: "malformed token",
}


def _describe(error: Exception) -> str:
    """Which check failed, in words that never quote the token."""
    if isinstance(error, jwt.MissingRequiredClaimError):
        return f"missing required claim {error.claim}"
    return next((_REASONS[k] for k in type(error).__mro__ if k in _REASONS), "invalid token")


class Authenticator:
    """Verifies tokens for one ``[auth]`` section and owns the JWKS refresh, if any."""

    _log = Logger()

    def __init__(
        self, settings: AuthSettings, clock: IReactorTime, http_client: HTTPClient | None = None
    ) -> None:
        if settings.jwks_url is not None and http_client is None:
            raise ValueError("an Authenticator with a jwks_url needs an http_client")
        self.settings = settings
        self._clock = clock
        self._http = http_client
        self._jwks: Mapping[str | None, jwt.PyJWK] = settings.jwks
        self._loop: LoopingCall | None = None
        self._loop_done: Deferred[Any] | None = None
        self._fetching: Deferred[None] | None = None
        self._last_fetch = -math.inf

    def start(self) -> None:
        """With a ``jwks_url``: fetch it now, then every ``jwks_refresh`` seconds."""
        if self.settings.jwks_url is not None and self._loop is None:
            self._loop = LoopingCall(self._shared_fetch)
            self._loop.clock = self._clock
            self._loop_done = self._loop.start(self.settings.jwks_refresh, now=True)

    def stop(self) -> Deferred[None] | None:
        """Cancel the fetch in flight and the refresh; the Deferred fires when all is done."""
        if self._fetching is not None:
            self._fetching.cancel()
        loop, done = self._loop, self._loop_done
        self._loop = self._loop_done = None
        if loop is None or done is None:
            return None
        if loop.running:
            loop.stop()
        return done.addCallback(lambda _: None)

    def upstream_query(self, query: bytes) -> bytes:
        """The query sent upstream: without the token when ``strip_token`` says so."""
        if self.settings.strip_token:
            return strip_query_param(query, self.settings.query_param)
        return query

    async def authenticate(self, mode: str, headers: Headers, query: bytes) -> Identity | None:
        """The identity a request proves under a route's ``auth`` mode; raises AuthError."""
        if mode == "none":
            return None
        s = self.settings
        token = extract_token(headers, query, query_param=s.query_param, cookie=s.cookie)
        if token is None:
            if mode == "optional":
                return None
            raise AuthError.missing()
        return await self.verify(token)

    async def verify(self, token: str) -> Identity:
        """Check a token's algorithm, signature, claims and times; raises AuthError."""
        if len(token) > MAX_TOKEN_LENGTH:
            raise AuthError("malformed token (longer than 8 KiB)")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("malformed token") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.settings.algorithms:
            raise AuthError("algorithm not allowed")
        key = await self._key_for(alg, header.get("kid"))
        s = self.settings
        options = {  # exp, nbf and iat are checked against the injected clock below
            **dict.fromkeys(("verify_exp", "verify_nbf", "verify_iat"), False),
            "verify_aud": bool(s.audience),
            "require": list(s.require),
        }
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=list(s.algorithms),
                audience=list(s.audience) or None,
                issuer=s.issuer,
                options=options,  # type: ignore[arg-type]
            )
        except (jwt.PyJWTError, TypeError, ValueError) as e:
            raise AuthError(_describe(e)) from None
        expires_at = check_claim_times(claims, self._clock.seconds(), s.leeway)
        subject = claims.get("sub")
        if subject is not None and re.search(r"[\x00-\x1f\x7f]", subject):
            raise AuthError("the sub claim contains control characters")
        return Identity(subject=subject, claims=claims, expires_at=expires_at)

    async def _key_for(self, alg: str, kid: str | None) -> Any:
        """HMAC algorithms only ever get the secret, and the others only public keys."""
        if alg in HMAC_ALGORITHMS:
            if self.settings.secret is None:
                raise AuthError("algorithm not allowed")
            return self.settings.secret
        if self.settings.public_key is not None:
            return self.settings.public_key
        if kid not in self._jwks and self.settings.jwks_url is not None:
            # An unknown kid may be a new key: join the fetch in flight, or start one
            # if the last one began a minute ago or more.
            since = self._clock.seconds() - self._last_fetch
            if self._fetching is not None or since >= JWKS_REFETCH_INTERVAL:
                await self._shared_fetch()
        if kid not in self._jwks:
            raise AuthError("unknown key id (kid)" if kid else "token has no key id (kid)")
        return self._jwks[kid]

    def _shared_fetch(self) -> Deferred[None]:
        """Wait for the JWKS fetch in flight, starting one if none is; never fails."""
        fetching = self._fetching
        if fetching is None:
            fetching = self._fetching = Deferred.fromCoroutine(self._fetch_jwks())
            fetching.addBoth(self._fetch_finished)
        # Each caller gets its own Deferred: cancelling one leaves the fetch running.
        waiter: Deferred[None] = Deferred()

        def wake(result: object) -> object:
            if not waiter.called:
                waiter.callback(None)
            return result

        fetching.addBoth(wake)
        return waiter

    def _fetch_finished(self, result: object) -> None:
        """Forget the fetch; a cancelled one ends here too, so its failure is not logged."""
        self._fetching = None

    async def _fetch_jwks(self) -> None:
        url = self.settings.jwks_url
        self._last_fetch = self._clock.seconds()
        try:
            download = Deferred.fromCoroutine(self._download(url))
            keys = parse_jwks(await download.addTimeout(JWKS_FETCH_TIMEOUT, self._clock))
        except CancelledError:
            raise
        except Exception as e:
            self._log.warn(
                "JWKS fetch from {url} failed, keeping {count} known keys: {reason}",
                url=url,
                count=len(self._jwks),
                reason=str(e) or type(e).__name__,
            )
            return
        self._jwks = keys
        self._log.info("JWKS from {url}: {count} keys", url=url, count=len(keys))

    async def _download(self, url: str | None) -> bytes:
        assert self._http is not None and url is not None
        response = await self._http.get(url, headers={b"Accept": [b"application/json"]})
        body = await response.content()
        if response.code != 200:
            raise ValueError(f"HTTP status {response.code}")
        return body
