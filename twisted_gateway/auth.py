"""
JWT authentication at the edge: a token is checked once here, and only the
verified identity travels on, in headers the upstream can trust.

Token extraction and claim-time checks are pure functions (keeping tokens
out of logs is :mod:`twisted_gateway.logs`' rule).
:class:`Authenticator` verifies signatures with PyJWT, pins the algorithms,
reads time from the injected clock (never the wall clock), and takes the
keys of a ``jwks_url`` from a :class:`twisted_gateway.jwks.KeySet`, which
tells an identity provider's outage (503) from a token nobody signed (401).
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import replace
from typing import Any, Coroutine, Mapping, NoReturn, Sequence
from urllib.parse import urlsplit
from warnings import warn

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.algorithms import get_default_algorithms
from jwt.types import Options
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from twisted_gateway.errors import GatewayError
from twisted_gateway.headers import cookie_value
from twisted_gateway.identity import Identity
from twisted_gateway.interfaces import IAuthenticator
from twisted_gateway.jwks import FetchFailed, KeySet, parse_jwks
from twisted_gateway.routing import query_fields, query_value
from twisted_gateway.schema import (
    HMAC_ALGORITHMS,
    PublicKey,
    AuthSettings,
    ConfigError,
    RouteSettings,
    Settings,
    read_section,
)
from twisted_gateway.verified_tokens import VerifiedTokens

Headers = Sequence[tuple[bytes, bytes]]
#: What a signature is checked with: the HMAC secret, the configured public key, a JWKS key.
VerificationKey = bytes | PublicKeyTypes


# -- where the token comes from (pure) ----------------------------------------


def extract_token(
    headers: Headers, query: bytes, *, query_param: str, cookie: str | None
) -> str | None:
    """
    The token a request carries; first found wins: ``Authorization: Bearer``,
    then ``query_param`` in the raw query (form-decoded), then the cookie.
    An ``Authorization`` header of another scheme is not a source.
    """
    for name, header in headers:
        if len(name) != 13 or name.lower() != b"authorization":  # (the length first: no copy per header)
            continue
        scheme, _, credentials = header.strip().partition(b" ")
        if scheme.lower() == b"bearer":
            credentials = credentials.strip()
            if credentials:
                return credentials.decode("latin-1")
    value = query_value(query, query_param) if query else None
    if value is None and cookie:
        value = cookie_value(headers, cookie)
    return value.decode("latin-1") if value is not None else None


def strip_query_param(query: bytes, param: str) -> bytes:
    """The raw query without any ``param`` field; the rest is kept byte for byte."""
    wanted = param.encode("utf-8")
    return b"&".join(raw for raw, name, _ in query_fields(query) if name != wanted)


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


class AuthUnavailable(GatewayError):
    """
    No key is known for the token's ``kid`` because the JWKS could not be
    fetched: the token may well be good, so the client is told to retry, never
    to throw it away (no ``invalid_token`` challenge).
    """

    status = 503
    error = "auth_unavailable"

    def __init__(self, retry_after: int) -> None:
        detail = "the identity provider's keys cannot be fetched; retry later"
        super().__init__(detail, headers=[(b"Retry-After", b"%d" % retry_after)])


class InsufficientScope(GatewayError):
    """A good token without what the route requires: 403 (RFC 6750 3.1), not 401."""

    status = 403
    error = "insufficient_scope"

    def __init__(self, detail: str, scope: Sequence[str] = ()) -> None:
        challenge = 'Bearer realm="wsgateway", error="insufficient_scope"'
        if scope:
            challenge += f', scope="{" ".join(scope)}"'
        super().__init__(detail, headers=[(b"WWW-Authenticate", challenge.encode("ascii", "replace"))])


def _claim_at(claims: Mapping[str, object], dotted: str) -> object:
    """The claim a dotted name reaches (``realm_access.roles``), or None."""
    value: object = claims
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def check_requirements(
    claims: Mapping[str, object],
    scopes: Sequence[str],
    required: Sequence[tuple[str, str]],
) -> None:
    """
    Any one of ``scopes`` in the space-separated ``scope`` (or ``scp``, string
    or array) claim, and every ``(name, value)`` in a string or array claim;
    raises :class:`InsufficientScope`.
    """
    if scopes:
        granted = claims.get("scope", claims.get("scp"))
        if isinstance(granted, str):
            granted = granted.split()
        if not isinstance(granted, list) or not set(scopes) & {g for g in granted if isinstance(g, str)}:
            raise InsufficientScope(f"needs scope {' or '.join(scopes)}", scopes)
    for name, wanted in required:
        value = _claim_at(claims, name)
        values = value if isinstance(value, list) else [value]
        if wanted not in [v for v in values if isinstance(v, str)]:
            raise InsufficientScope(f"needs claim {name} to hold {wanted}")


def check_claim_times(claims: Mapping[str, object], now: float, leeway: float) -> float | None:
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


def _same_typ(given: object, wanted: str) -> bool:
    """RFC 8725 3.11: ``typ`` compares case-insensitively, with or without ``application/``."""
    if not isinstance(given, str):
        return False

    def strip(t: str) -> str:
        return t.lower().removeprefix("application/")

    return strip(given) == strip(wanted)


def auth_warnings(settings: Settings) -> list[str]:
    """Valid but risky ``[auth]`` choices, one line each (start-up log and ``--check``)."""
    auth, where = settings.auth, f"{settings.source}: [auth]"
    if auth is None:
        return []
    warnings = []
    guarded = [r.name for r in settings.routes if r.auth != "none"]
    if guarded and not auth.audience:
        warnings.append(
            f"{where} audience: not set, so a token the identity provider issued for any other"
            f" API or client (an id_token, another resource's token) passes on [route:{guarded[0]}]"
        )
    for key in ("jwks_url", "oidc_issuer"):
        url = getattr(auth, key)
        if url is not None and urlsplit(url).scheme == "http" and not _loopback(urlsplit(url).hostname):
            warnings.append(
                f"{where} {key}: fetched over plain http from {urlsplit(url).hostname}: anyone on"
                " the path can swap the keys and sign tokens"
            )
    return warnings


def _loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


#: The keys that say where the verification keys come from, by field.
_KEY_SOURCES = {
    "secret_source": "secret",
    "public_key_source": "public_key",
    "jwks_file": "jwks_file",
    "jwks_url": "jwks_url",
    "oidc_issuer": "oidc_issuer",
}


def parse_auth_section(source: str, values: Mapping[str, str]) -> AuthSettings:
    """
    Validate ``[auth]`` (pure: a literal secret is taken as it stands, key
    material behind ``env:``/``file:`` is left to :func:`with_key_material`).
    """
    if "secret" in values and not values["secret"].strip():
        raise ConfigError(source, "auth", "secret", "is empty")
    read = read_section(source, "auth", values, AuthSettings)
    hmac = [a for a in read["algorithms"] if a in HMAC_ALGORITHMS]
    public = [a for a in read["algorithms"] if a not in HMAC_ALGORITHMS]
    if hmac and public:
        reason = f"mixes HMAC ({hmac[0]}) and public-key ({public[0]}) algorithms"
        raise ConfigError(source, "auth", "algorithms", reason)
    given = [k for f, k in _KEY_SOURCES.items() if read.get(f) is not None]
    if not given:
        raise ConfigError(
            source, "auth", None, "needs secret, public_key, jwks_file, jwks_url or oidc_issuer"
        )
    if hmac and given[0] != "secret":
        reason = f"{hmac[0]} is an HMAC algorithm: it verifies with secret, not {given[0]}"
        raise ConfigError(source, "auth", given[0], reason)
    if public and given[0] == "secret":
        reason = f"{public[0]} verifies with public_key, jwks_file or jwks_url, not a secret"
        raise ConfigError(source, "auth", "secret", reason)
    if len(given) > 1:
        raise ConfigError(source, "auth", given[1], f"set only one of {', '.join(given)}")
    if read.get("ca_file") is not None and given[0] not in ("jwks_url", "oidc_issuer"):
        raise ConfigError(source, "auth", "ca_file", "is only for the fetches of jwks_url or oidc_issuer")
    if given[0] == "oidc_issuer":
        # tokens must come from the issuer whose keys are used
        if read.get("issuer") is not None and read["issuer"] != read["oidc_issuer"]:
            reason = f"is {read['issuer']!r} but oidc_issuer is {read['oidc_issuer']!r}; leave it out"
            raise ConfigError(source, "auth", "issuer", reason)
        read["issuer"] = read["oidc_issuer"]
    return AuthSettings(**read)


def key_material_source(settings: AuthSettings) -> tuple[str, str] | None:
    """``(key, text)`` of the key naming key material not loaded yet (secret, public_key, jwks_file)."""
    if settings.secret is not None or settings.public_key is not None or settings.jwks:
        return None
    for name, text in (
        ("secret", settings.secret_source),
        ("public_key", settings.public_key_source),
        ("jwks_file", settings.jwks_file),
    ):
        if text is not None:
            return name, text
    return None


def with_key_material(source: str, settings: AuthSettings, name: str, data: bytes) -> AuthSettings:
    """The settings with the bytes their ``secret``, ``public_key`` or ``jwks_file`` (``name``) gave."""
    if name == "secret":
        if b"-----BEGIN" in data:
            raise ConfigError(source, "auth", "secret", "is a PEM key, not an HMAC secret")
        strongest = max(settings.algorithms, key=lambda a: int(a[2:]))
        if len(data) < int(strongest[2:]) // 8:  # RFC 7518 3.2: at least the hash's size
            reason = f"is shorter than the {int(strongest[2:]) // 8} bytes {strongest} needs"
            raise ConfigError(source, "auth", "secret", reason)
        return replace(settings, secret=data)
    if name == "public_key":
        try:
            key = load_pem_public_key(data)
        except (ValueError, UnsupportedAlgorithm):
            raise ConfigError(source, "auth", "public_key", "not a PEM public key") from None
        for alg in settings.algorithms:
            try:
                get_default_algorithms()[alg].prepare_key(key)
            except (jwt.PyJWTError, TypeError, ValueError):
                reason = f"holds an {type(key).__name__}, which cannot verify {alg}"
                raise ConfigError(source, "auth", "public_key", reason) from None
        return replace(settings, public_key=key)
    try:
        return replace(settings, jwks=parse_jwks(data))
    except FetchFailed as e:
        raise ConfigError(source, "auth", "jwks_file", str(e)) from None


# -- verification -----------------------------------------------------------


async def _anonymous() -> None:
    """What :meth:`Authenticator.authenticate` awaits to no identity (auth = none, optional without a token)."""
    return None


async def _refused(error: GatewayError) -> NoReturn:
    """What :meth:`Authenticator.authenticate` awaits to a refusal found before any verification."""
    raise error


_REASONS: Mapping[type, str] = {
    jwt.InvalidSignatureError: "bad signature",
    jwt.InvalidAlgorithmError: "algorithm not allowed",
    jwt.InvalidAudienceError: "wrong audience",
    jwt.InvalidIssuerError: "wrong issuer",
    jwt.InvalidKeyError: "the key does not fit the token's algorithm",
    jwt.DecodeError: "malformed token",
}


def _why_refused(error: Exception) -> str:
    """Which check failed, in words that never quote the token."""
    if isinstance(error, jwt.MissingRequiredClaimError):
        return f"missing required claim {error.claim}"
    return next((_REASONS[k] for k in type(error).__mro__ if k in _REASONS), "invalid token")


@implementer(IAuthenticator)
class Authenticator:
    """Verifies tokens for one ``[auth]`` section and owns the :class:`KeySet` of a ``jwks_url``."""

    def __init__(
        self,
        settings: AuthSettings,
        clock: IReactorTime,
        http_client: HTTPClient | None = None,
        *,
        wait_limit: float = 5.0,
    ) -> None:
        fetched = settings.jwks_url or settings.oidc_issuer
        if fetched is not None and http_client is None:
            raise ValueError("an Authenticator with a jwks_url or oidc_issuer needs an http_client")
        unread = key_material_source(settings)
        if unread is not None:  # else every token would be refused
            raise ValueError(f"[auth] {unread[0]} is not loaded yet: see config.load_settings")
        self.settings = settings
        self._clock = clock
        self.keyset: KeySet | None = None
        if fetched is not None and http_client is not None:
            self.keyset = KeySet(
                fetched,
                clock,
                http_client,
                refresh=settings.jwks_refresh,
                timeout=settings.jwks_timeout,
                wait_limit=wait_limit,
                discovery=settings.oidc_issuer,
            )
        #: exp, nbf and iat are checked against the injected clock, not by PyJWT
        self._claim_checks: Options = {
            "verify_signature": False,  # verified in _signed_claims, with the key the header names
            "verify_exp": False,
            "verify_nbf": False,
            "verify_iat": False,
            "verify_iss": True,
            "verify_sub": True,
            "verify_jti": True,
            "verify_aud": bool(settings.audience),
            "require": list(settings.require),
        }
        self._verified: VerifiedTokens[Identity] = VerifiedTokens(settings.token_cache)
        #: the JWKS keys the cached tokens were verified with
        self._verified_with: object = None

    def start(self) -> None:
        """With a ``jwks_url``: fetch it now, and keep it fresh."""
        if self.keyset is not None:
            self.keyset.start()

    def stop(self) -> Deferred[None]:
        """Cancel the JWKS fetch in flight and its timer; the Deferred fires when all is done."""
        return self.keyset.stop() if self.keyset is not None else succeed(None)

    def ready(self) -> bool:
        """False until a ``jwks_url`` has been fetched once (``/readyz``)."""
        return self.keyset is None or self.keyset.loaded

    def key_counts(self) -> tuple[int, Mapping[str, int]]:
        """The number of known keys and the failed JWKS fetches by reason (metrics)."""
        keys = self.keyset.keys if self.keyset is not None else self.settings.jwks
        failures = self.keyset.failures if self.keyset is not None else {}
        return sum(len(k) for k in keys.values()), failures

    def upstream_query(self, query: bytes) -> bytes:
        """The query sent upstream: without the token when ``strip_token`` says so."""
        if self.settings.strip_token:
            return strip_query_param(query, self.settings.query_param)
        return query

    def authenticate(
        self, mode: str, headers: Headers, query: bytes, route: RouteSettings | None = None
    ) -> Coroutine[Any, Any, Identity | None]:
        """
        The identity a request proves under a route's ``auth`` mode, holding
        what the route requires (``require_scope``, ``require_claim``); raises
        AuthError (401) or InsufficientScope (403). A request with a token
        gets :meth:`verify`'s coroutine itself, not one more around it.
        """
        if mode != "none":
            s = self.settings
            token = extract_token(headers, query, query_param=s.query_param, cookie=s.cookie)
            if token is not None:
                return self.verify(token, route)
            if mode != "optional":
                return _refused(AuthError.missing())
        return _anonymous()

    async def verify(self, token: str, route: RouteSettings | None = None) -> Identity:
        """
        Check a token's algorithm, signature, claims and times (and what
        ``route`` requires); raises AuthError or InsufficientScope. A token
        verified before with the current keys is taken from the cache until its
        ``exp``, without awaiting another coroutine.
        """
        keys = self.keyset.keys if self.keyset is not None else None
        if keys is not self._verified_with:
            # a fetched JWKS replaces the keys: a key may have been withdrawn
            self._verified.clear()
            self._verified_with = keys
        identity = self._verified.get(token, self._clock.seconds()) or await self._verify_and_keep(token)
        if route is not None and (route.require_scope or route.require_claim):
            check_requirements(identity.claims, route.require_scope, route.require_claim)
        return identity

    async def _verify_and_keep(self, token: str) -> Identity:
        """:meth:`_verify`, the identity then kept until the token's ``exp`` if the keys are the same."""
        keys = self._verified_with
        identity = await self._verify(token)
        if self._verified_with is keys:
            # the raw exp, not exp + leeway: never kept past the token's own expiry
            self._verified.put(token, identity, identity.claims.get("exp"), self._clock.seconds())
        return identity

    async def _verify(self, token: str) -> Identity:
        s = self.settings
        if len(token) > s.max_token_size:  # before any parsing
            raise AuthError("token larger than max_token_size")
        decoded: dict[str, Any] | None  # PyJWT's: the header, the claims (JSON) and the signature
        try:
            # The one parse of a good token: header, signature bytes, and the claims
            # PyJWT checks that hold no time (aud, iss, require, sub and jti types).
            decoded = jwt.decode_complete(
                token,
                options=self._claim_checks,
                audience=list(s.audience) or None,
                issuer=s.issuer,
            )
            header = decoded["header"]
        except jwt.PyJWTError:
            # A refused token is parsed again, to be refused for the first check it
            # fails in the order header, key, signature, claims (so that a key the
            # identity provider cannot give stays a 503, whatever the claims).
            decoded = None
            try:
                header = jwt.get_unverified_header(token)
            except jwt.PyJWTError:
                raise AuthError("malformed token") from None
        if s.typ is not None and not _same_typ(header.get("typ"), s.typ):
            raise AuthError(f"token type is not {s.typ}")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in s.algorithms:
            raise AuthError("algorithm not allowed")
        keys = await self._keys_for(alg, header.get("kid"))
        errors: list[Exception] = []
        for key in keys:  # several keys may share a kid: the first that verifies wins
            try:
                claims = self._signed_claims(token, decoded, alg, key)
                break
            except (jwt.PyJWTError, TypeError, ValueError) as e:
                errors.append(e)
        else:
            raise AuthError(_why_refused(errors[0])) from None
        expires_at = check_claim_times(claims, self._clock.seconds(), s.leeway)
        subject = claims.get("sub")
        if subject is not None and re.search(r"[\x00-\x1f\x7f]", subject):
            raise AuthError("the sub claim contains control characters")
        return Identity(subject=subject, claims=claims, expires_at=expires_at)

    # (``decoded`` as _verify's; the claims are JSON as the token carries them)
    def _signed_claims(self, token: str, decoded: dict[str, Any] | None, alg: str, key: VerificationKey) -> dict[str, Any]:
        """
        The claims, once the signature verifies with ``key``; raises PyJWT's
        error. Without ``decoded`` (a claim failed), PyJWT's decode says which.
        """
        if decoded is None:
            s = self.settings
            return jwt.decode(
                token,
                key,  # type: ignore[arg-type]  # a public_key PyJWT cannot use was refused when loaded
                algorithms=[alg],
                audience=list(s.audience) or None,
                issuer=s.issuer,
                options={**self._claim_checks, "verify_signature": True},
            )
        algorithm = jwt.get_algorithm_by_name(alg)  # with the names schema registers
        prepared = algorithm.prepare_key(key)
        too_short = algorithm.check_key_length(prepared)
        if too_short:
            warn(too_short, jwt.InsecureKeyLengthWarning, stacklevel=3)
        if not algorithm.verify(token.encode("utf-8").rpartition(b".")[0], prepared, decoded["signature"]):
            raise jwt.InvalidSignatureError("Signature verification failed")
        claims: dict[str, Any] = decoded["payload"]  # (as jwt.decode's)
        return claims

    async def _keys_for(self, alg: str, kid: str | None) -> Sequence[VerificationKey]:
        """
        The keys to try, in order. HMAC algorithms only ever get the secret, and
        the others only public keys, each serving the algorithms it may.
        """
        if alg in HMAC_ALGORITHMS:
            if self.settings.secret is None:
                raise AuthError("algorithm not allowed")
            return [self.settings.secret]
        if self.settings.public_key is not None:
            return [self.settings.public_key]
        keyset = self.keyset
        candidates = self._candidates(kid)
        if not candidates and keyset is not None:
            await keyset.refetch_for_unknown_kid()  # the kid may be a new key
            candidates = self._candidates(kid)
            if not candidates and (keyset.failing or not keyset.loaded):
                raise AuthUnavailable(keyset.retry_after())
        if not candidates:
            raise AuthError("unknown key id (kid)" if kid else "token has no key id (kid)")
        serving = [k.key for k in candidates if k.serves(alg)]
        if not serving:
            raise AuthError("algorithm not allowed")
        return serving

    def _candidates(self, kid: str | None) -> list[PublicKey]:
        """The keys published under ``kid``; without one, the only signing key if there is one."""
        keys = self.keyset.keys if self.keyset is not None else self.settings.jwks
        if kid is None and None not in keys:
            every = [key for same_kid in keys.values() for key in same_kid]
            return every if len(every) == 1 else []
        return list(keys.get(kid, ()))
