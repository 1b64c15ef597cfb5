"""
What ``tap.cfg`` may say: every section, key, type and default, declared once.

Each settings class is a frozen dataclass whose config keys are the fields made
with :func:`key`: the field's type and default are the key's, and its parser
turns the text into the value or raises ``ValueError`` with a short reason,
which :func:`read_section` makes one line naming the file, the section and the
key (:class:`ConfigError`). Parsers here are pure: what a value points at
(files, environment variables) is read by :func:`twisted_gateway.config.load_settings`.

This module imports nothing of the package, so that every module may import it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, TypeVar, Union, overload
from urllib.parse import unquote, urlsplit

import jwt
from jwt.algorithms import AllowedPublicKeys, OKPAlgorithm, get_default_algorithms
from twisted.python import usage

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


class ConfigError(usage.UsageError):
    """A config file problem: ``file: [section] key: reason``."""

    def __init__(self, source: str, section: str | None, key: str | None, reason: str):
        where = source
        if section is not None:
            where += f": [{section}]"
        if key is not None:
            where += f" {key}"
        super().__init__(f"{where}: {reason}")
        self.source, self.section, self.key, self.reason = source, section, key, reason


_T = TypeVar("_T")
_D = TypeVar("_D")


@overload
def key(parse: Callable[[str], _T], *, name: str | None = None, secret: bool = False) -> _T: ...
@overload
def key(parse: Callable[[str], _T], default: _D, *, name: str | None = None, secret: bool = False) -> _T | _D: ...
def key(
    parse: Callable[[str], object], default: object = dataclasses.MISSING, *, name: str | None = None,
    secret: bool = False,
) -> object:
    """
    A settings field that is a config key: ``parse`` reads its text, ``default``
    (none: required) is its value when absent; ``name`` is the key when the
    field is named otherwise; a ``secret`` is left out of the ``repr``.
    """
    return field(default=default, metadata={"parse": parse, "key": name}, repr=not secret)


def section_keys(settings_type: type) -> dict[str, dataclasses.Field[object]]:
    """The config keys of a settings class, by key name."""
    return {
        f.metadata["key"] or f.name: f for f in dataclasses.fields(settings_type) if "parse" in f.metadata
    }


def read_section(source: str, section: str, values: Mapping[str, str], settings_type: type) -> dict[str, Any]:
    """
    The keys a section gives, parsed, by field name (absent ones are left to
    the defaults): keyword arguments for ``settings_type``, each value its
    field's parser's, which ``key`` checked against the field's annotation.
    """
    keys = section_keys(settings_type)
    for name in values:
        if name not in keys:
            raise ConfigError(source, section, name, "unknown key")
    result: dict[str, Any] = {}  # (as returned)
    for name, spec in keys.items():
        text = values.get(name, "")
        if text.strip():
            try:
                result[spec.name] = spec.metadata["parse"](text)
            except ValueError as e:
                raise ConfigError(source, section, name, str(e)) from None
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise ConfigError(source, section, name, "missing required key")
    return result


# -- values: text in, value out, ValueError with a short reason ---------------


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "yes", "true", "on"):
        return True
    if lowered in ("0", "no", "false", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"expected a number of seconds, got {text!r}") from None


def parse_positive_float(text: str) -> float:
    value = _seconds(text)
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"expected a positive number, got {text!r}")
    return value


def parse_non_negative_float(text: str) -> float:
    value = _seconds(text)
    if value < 0 or value != value or value == float("inf"):
        raise ValueError(f"expected a number >= 0, got {text!r}")
    return value


def _whole_number(text: str) -> int:
    try:
        return int(text.strip().replace("_", ""))
    except ValueError:
        raise ValueError(f"expected a whole number, got {text!r}") from None


def parse_positive_int(text: str) -> int:
    value = _whole_number(text)
    if value <= 0:
        raise ValueError(f"expected a number > 0, got {text!r}")
    return value


def parse_non_negative_int(text: str) -> int:
    value = _whole_number(text)
    if value < 0:
        raise ValueError(f"expected a number >= 0, got {text!r}")
    return value


def parse_words(text: str) -> tuple[str, ...]:
    words = tuple(text.split())
    if not words:
        raise ValueError("expected at least one value")
    return words


def parse_auto_or_positive_int(text: str) -> int | str:
    """``auto`` (the gateway works it out at start) or a number above 0."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return parse_positive_int(text)
    except ValueError:
        raise ValueError(f"expected auto or a whole number > 0, got {text!r}") from None


def one_of(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {text!r}")
        return value

    return parse


def parse_path(text: str) -> str:
    """A file name (the file is read when the settings are loaded)."""
    return text.strip()


def parse_upstreams(text: str) -> tuple[str, ...]:
    """One or more ``http://`` or ``https://`` base URLs, without query or fragment."""
    urls = []
    for url in parse_words(text):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"{url!r} must start with http:// or https://")
        if not parts.hostname:
            raise ValueError(f"{url!r} has no host")
        try:
            parts.port
        except ValueError:
            raise ValueError(f"{url!r} has a bad port") from None
        if parts.query or parts.fragment:
            raise ValueError(f"{url!r} must not carry a query or fragment")
        urls.append(parts.scheme + url[len(parts.scheme) :].rstrip("/"))
    return tuple(urls)


def parse_http_url(text: str) -> str:
    parts = urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL, got {text.strip()!r}")
    return text.strip()


def parse_cidrs(text: str) -> tuple[IPNetwork, ...]:
    nets = []
    for word in text.split():
        try:
            nets.append(ipaddress.ip_network(word, strict=False))
        except ValueError:
            raise ValueError(f"{word!r} is not an address or CIDR") from None
    return tuple(nets)


def parse_cidrs_or_none(text: str) -> tuple[IPNetwork, ...]:
    """Addresses or CIDRs, or ``none`` for nobody."""
    if text.strip().lower() == "none":
        return ()
    return parse_cidrs(text)


def parse_origins(text: str) -> tuple[str, ...]:
    """Exact origins (``https://chat.example.com``), ``https://*.example.com`` patterns, or ``*``."""
    origins = parse_words(text)
    for origin in origins:
        if origin == "*":
            continue
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("",):
            raise ValueError(f"{origin!r} is not an origin like https://chat.example.com")
    return tuple(o.lower() for o in origins)


_TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz")


def parse_header_names(text: str) -> tuple[str, ...]:
    """Header names (RFC 9110 tokens), lower-cased; ``none`` for none."""
    names = tuple(word.lower() for word in parse_words(text))
    if names == ("none",):
        return ()
    for name in names:
        if not set(name) <= _TOKEN:
            raise ValueError(f"{name!r} is not a header name")
    return names


def parse_claim_requirements(text: str) -> tuple[tuple[str, str], ...]:
    """``NAME:VALUE ...`` (dotted names reach nested claims), e.g. ``realm_access.roles:admin``."""
    requirements = []
    for word in parse_words(text):
        name, colon, value = word.partition(":")
        if not colon or not name or not value:
            raise ValueError(f"expected NAME:VALUE, got {word!r}")
        requirements.append((name, value))
    return tuple(requirements)


def parse_claims_header(text: str) -> str | tuple[str, ...]:
    """``full``, ``none`` or a comma-separated list of claim names."""
    value = text.strip()
    if value.lower() in ("full", "none"):
        return value.lower()
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    if not names:
        raise ValueError(f"expected full, none or claim names, got {text!r}")
    return names


@dataclass(frozen=True)
class TCPKeepalive:
    """``SO_KEEPALIVE`` with its timers: a silent peer is dropped after ``bound`` seconds."""

    idle: int
    interval: int
    count: int

    def __str__(self) -> str:
        return f"{self.idle} {self.interval} {self.count}"

    @property
    def bound(self) -> int:
        """Seconds from the peer's last sign of life until the connection ends."""
        return self.idle + self.interval * self.count


#: ``[gateway] tcp_keepalive``'s default: nginx's and HAProxy's usual idle of a minute.
DEFAULT_KEEPALIVE = TCPKeepalive(60, 10, 6)


def parse_tcp_keepalive(text: str) -> TCPKeepalive | None:
    """``IDLE INTERVAL COUNT`` (seconds, seconds, probes), or ``off``."""
    words = text.split()
    if [w.lower() for w in words] == ["off"]:
        return None
    try:
        numbers = [int(w) for w in words]
    except ValueError:
        numbers = []
    if len(numbers) != 3 or min(numbers) < 1:
        raise ValueError(f"expected off or three whole numbers > 0 (idle interval count), got {text!r}")
    return TCPKeepalive(*numbers)


#: ``[gateway] access_log`` values that are not a file name.
EVENTS, OFF, STDOUT = "events", "off", "stdout"
#: ``[gateway] access_log_format`` values.
ACCESS_LOG_FORMATS = ("text", "json")


def parse_access_log(text: str) -> str:
    """``events``, ``off``, ``stdout`` or the name of a file (its directory is checked when loaded)."""
    value = text.strip()
    if not value:
        raise ValueError("expected events, off, stdout or a file name")
    return value


#: Client-sent headers dropped by default (``strip_request_headers``): addresses and
#: URLs that upstream frameworks trust, which only the gateway may set.
DEFAULT_STRIPPED = (
    "x-real-ip",
    "true-client-ip",
    "cf-connecting-ip",
    "x-original-url",
    "x-rewrite-url",
)

#: ``admin_allow`` when the config names none: loopback only.
DEFAULT_ADMIN_ALLOW: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("127.0.0.1/32"),
    ipaddress.ip_network("::1/128"),
)

#: ``escaped_slashes`` values: forward as received; refuse any escaped slash;
#: refuse only the paths whose decoded form leaves the route (the default).
ESCAPED_SLASHES = ("check", "keep", "reject")

#: The values of a route's ``auth`` key.
AUTH_MODES = ("required", "optional", "none")


# -- upstream pools ----------------------------------------------------------

BALANCE_POLICIES = ("round_robin", "least_connections", "hash")
HASH_KEY_SOURCES = ("query", "header", "claim", "cookie")


parse_balance = one_of(*BALANCE_POLICIES)


def parse_hash_key(text: str) -> str:
    """
    ``ip | query:NAME | header:NAME | claim:NAME | cookie:NAME``; header names
    are lower-cased. ``ip`` is the client's address (after ``trusted_proxies``),
    as nginx's ``ip_hash``: what engine.io's sessions need, whose first request
    carries no session id yet.
    """
    if text.strip().lower() == "ip":
        return "ip"
    source, sep, name = text.strip().partition(":")
    source = source.strip().lower()
    name = name.strip()
    if not sep or source not in HASH_KEY_SOURCES or not name or any(c.isspace() for c in name):
        raise ValueError(
            "expected ip, query:NAME, header:NAME, claim:NAME or cookie:NAME,"
            f" got {text.strip()!r}"
        )
    return f"{source}:{name.lower() if source == 'header' else name}"


def parse_health_check(text: str) -> str:
    """An HTTP path (``/health``) or a WebSocket path (``ws:/health``)."""
    value = text.strip()
    if not (value.startswith("/") or value.startswith("ws:/")) or any(c.isspace() for c in value):
        raise ValueError(f"expected a path such as /health or ws:/health, got {value!r}")
    return value


# -- [auth] ------------------------------------------------------------------

MAX_TOKEN_SIZE = 16 * 1024
HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
# RFC 9864's name for EdDSA over Ed25519, which providers now emit: PyJWT learns it here.
try:
    jwt.register_algorithm("Ed25519", OKPAlgorithm())
except ValueError:  # already known
    pass
SUPPORTED_ALGORITHMS = (frozenset(get_default_algorithms()) | {"Ed25519"}) - {"none"}


def parse_algorithms(text: str) -> tuple[str, ...]:
    algorithms = parse_words(text)
    for name in algorithms:
        if name.lower() == "none":
            raise ValueError('"none" is refused: tokens must be signed')
        if name not in SUPPORTED_ALGORITHMS:
            raise ValueError(f"unknown algorithm {name!r}")
    return algorithms


def parse_secret(text: str) -> str:
    """``literal | env:NAME | file:PATH`` (a file relative to the config file), read when loaded."""
    if not text.strip():
        raise ValueError("is empty")
    return text.strip()


# -- [cluster] ---------------------------------------------------------------

ON_REDIS_DOWN = ("open", "closed")


@dataclass(frozen=True)
class RedisAddress:
    host: str
    port: int
    db: int
    username: str | None
    password: str | None
    tls: bool


def parse_redis_url(url: str) -> RedisAddress:
    """``redis://[user:password@]host[:port][/db]`` or ``rediss://`` (TLS); errors never quote it."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError("must start with redis:// or rediss://")
    if not parts.hostname:
        raise ValueError("has no host")
    try:
        port = parts.port or 6379
    except ValueError:
        raise ValueError("has a bad port") from None
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError("the database (the path) must be a number")
    return RedisAddress(
        host=parts.hostname,
        port=port,
        db=int(path or 0),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        tls=parts.scheme == "rediss",
    )


def parse_on_redis_down(text: str) -> str:
    policy = text.strip().lower()
    if policy not in ON_REDIS_DOWN:
        raise ValueError(f"expected open or closed, got {policy!r}")
    return policy


def parse_node_id(text: str) -> str:
    node_id = text.strip()
    if any(c.isspace() or c in "|/" for c in node_id):
        raise ValueError("must not contain spaces, '|' or '/'")
    return node_id


# -- the settings ------------------------------------------------------------


@dataclass(frozen=True)
class GatewaySettings:
    listen: tuple[str, ...] = key(parse_words, ("tcp:8080",))
    connect_timeout: float = key(parse_positive_float, 5.0)
    ws_open_timeout: float = key(parse_positive_float, 10.0)
    ws_max_message_size: int = key(parse_positive_int, 16 * 1024 * 1024)
    ws_compression: bool = key(parse_bool, True)
    request_timeout: float = key(parse_positive_float, 30.0)
    max_body_size: int = key(parse_positive_int, 10 * 1024 * 1024)
    upstream_keepalive: int = key(parse_positive_int, 32)
    trusted_proxies: tuple[IPNetwork, ...] = key(parse_cidrs, ())
    drain_timeout: float = key(parse_positive_float, 10.0)
    drain_spread: float = key(parse_non_negative_float, 0.0)
    drain_delay: float = key(parse_non_negative_float, 0.0)
    max_connections: int = key(parse_non_negative_int, 0)
    max_header_size: int = key(parse_positive_int, 16384)
    ws_max_message_size_upstream: int | None = key(parse_positive_int, None)
    ws_ping_interval: float = key(parse_non_negative_float, 25.0)
    ws_ping_timeout: float = key(parse_positive_float, 10.0)
    strip_request_headers: tuple[str, ...] = key(parse_header_names, DEFAULT_STRIPPED)
    max_client_connections: int | str = key(parse_auto_or_positive_int, "auto")
    max_open_files: int | None = key(parse_positive_int, None)
    client_header_timeout: float = key(parse_positive_float, 60.0)
    client_body_timeout: float = key(parse_positive_float, 60.0)
    keepalive_timeout: float = key(parse_positive_float, 75.0)
    tcp_keepalive: TCPKeepalive | None = key(parse_tcp_keepalive, DEFAULT_KEEPALIVE)
    ws_send_timeout: float = key(parse_non_negative_float, 60.0)
    ws_rate_limit: float = key(parse_non_negative_float, 0.0)
    ws_rate_burst: int = key(parse_non_negative_int, 0)
    #: seconds after which a WebSocket is closed with 1001, ±10 % (0: never; ageing.py)
    ws_max_age: float = key(parse_non_negative_float, 0.0)
    max_websockets_per_user: int = key(parse_non_negative_int, 0)
    #: worker processes sharing the listeners (``auto``: one per CPU this process may use)
    workers: int | str = key(parse_auto_or_positive_int, 1)
    #: HTTP access lines: ``events`` (twisted.logger), ``off``, ``stdout`` or a file (access_log.py)
    access_log: str = key(parse_access_log, EVENTS)
    access_log_format: str = key(one_of(*ACCESS_LOG_FORMATS), "text")


@dataclass(frozen=True)
class RouteSettings:
    name: str
    prefix: str = key(str.strip)
    upstream: tuple[str, ...] = key(parse_upstreams)
    websocket: bool = key(parse_bool, True)
    ws_compression: bool | None = key(parse_bool, None)
    #: when the section does not say: ``required`` with an ``[auth]`` section, else ``none``
    auth: str = key(one_of(*AUTH_MODES), "none")
    #: None: ``least_connections`` for WebSocket routes, else ``round_robin``
    balance: str | None = key(parse_balance, None)
    hash_key: str | None = key(parse_hash_key, None)
    max_fails: int = key(parse_non_negative_int, 1)
    fail_timeout: float = key(parse_positive_float, 10.0)
    health_check: str | None = key(parse_health_check, None)
    health_interval: float = key(parse_positive_float, 5.0)
    max_websockets: int = key(parse_non_negative_int, 0)
    allowed_origins: tuple[str, ...] = key(parse_origins, ("*",))
    allow_null_origin: bool | None = key(parse_bool, None)
    ca_file: str | None = key(parse_path, None)
    client_cert: str | None = key(parse_path, None)
    client_key: str | None = key(parse_path, None)
    tls_verify: bool = key(parse_bool, True)
    underscores_in_headers: bool = key(parse_bool, False)
    escaped_slashes: str = key(one_of(*ESCAPED_SLASHES), "check")
    host_header: str = key(str.strip, "client")
    #: None: the gateway's ``request_timeout``
    request_timeout: float | None = key(parse_positive_float, None)
    #: None: the gateway's ``ws_rate_limit`` / ``ws_rate_burst``
    ws_rate_limit: float | None = key(parse_non_negative_float, None)
    ws_rate_burst: int | None = key(parse_non_negative_int, None)
    #: None: the gateway's ``ws_max_age``
    ws_max_age: float | None = key(parse_non_negative_float, None)
    max_websockets_per_user: int = key(parse_non_negative_int, 0)
    #: False: request bodies are streamed to the upstream as they arrive
    request_buffering: bool = key(parse_bool, True)
    #: any one of these scopes (``scope``/``scp`` claim), else 403 insufficient_scope
    require_scope: tuple[str, ...] = key(parse_words, ())
    #: every ``(dotted claim name, value)`` must hold, else 403 insufficient_scope
    require_claim: tuple[tuple[str, str], ...] = key(parse_claim_requirements, ())
    #: which verified claims reach the upstream in ``X-Auth-Claims``: "full", "none" or names
    claims_header: str | tuple[str, ...] = key(parse_claims_header, "full")


@dataclass(frozen=True)
class DemoSettings:
    chat_service: str | None = key(str.strip, None)


@dataclass(frozen=True)
class AdminSettings:
    listen: tuple[str, ...] = key(parse_words, ())
    #: who may read /metrics and /status on the public listener (without ``listen``)
    admin_allow: tuple[IPNetwork, ...] = key(parse_cidrs_or_none, DEFAULT_ADMIN_ALLOW)
    #: how the file gives the /admin API's bearer secret (literal, ``env:NAME``, ``file:PATH``)
    token_source: str | None = key(parse_secret, None, name="token", secret=True)
    #: that secret, once loaded (None: the API is not served)
    token: bytes | None = field(default=None, repr=False)



_RSA = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_CURVES = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512", "secp256k1": "ES256K"}


@dataclass(frozen=True)
class PublicKey:
    """
    One verification key. A JWK with ``alg`` serves only that algorithm; one
    without (many providers' default) every algorithm its key type can verify.
    """

    key: AllowedPublicKeys
    algorithms: frozenset[str]

    @classmethod
    def from_jwk(cls, jwk: Mapping[str, Any]) -> PublicKey:  # (a JWK: JSON as fetched, checked by PyJWK)
        alg = jwk.get("alg")
        if alg == "Ed25519":  # RFC 9864's name for EdDSA over Ed25519
            jwk, alg = {**jwk, "alg": "EdDSA"}, "EdDSA"
        key = jwt.PyJWK(dict(jwk)).key
        if alg is not None:
            if alg == "EdDSA" and jwk.get("crv") == "Ed25519":
                return cls(key, frozenset({"EdDSA", "Ed25519"}))
            return cls(key, frozenset({alg}))
        if jwk.get("kty") == "RSA":
            return cls(key, _RSA)
        if jwk.get("kty") == "EC":
            return cls(key, frozenset({_EC_CURVES[jwk["crv"]]}))
        if jwk.get("crv") == "Ed25519":
            return cls(key, frozenset({"EdDSA", "Ed25519"}))
        return cls(key, frozenset({"EdDSA"}))  # Ed448

    def serves(self, alg: str) -> bool:
        return alg in self.algorithms


@dataclass(frozen=True)
class AuthSettings:
    """The ``[auth]`` section; ``secret``, ``public_key`` and ``jwks`` are filled when loaded."""

    algorithms: tuple[str, ...] = key(parse_algorithms)
    #: how the file gives the HMAC secret or the PEM public key: literal, ``env:NAME`` or ``file:PATH``
    secret_source: str | None = key(parse_secret, None, name="secret", secret=True)
    public_key_source: str | None = key(parse_secret, None, name="public_key", secret=True)
    jwks_file: str | None = key(parse_secret, None, secret=True)
    jwks_url: str | None = key(parse_http_url, None)
    jwks_refresh: float = key(parse_positive_float, 600.0)
    #: a JWKS fetch (with its discovery document) not done after this long has failed
    jwks_timeout: float = key(parse_positive_float, 10.0)
    audience: tuple[str, ...] = key(parse_words, ())
    issuer: str | None = key(str.strip, None)
    require: tuple[str, ...] = key(parse_words, ("exp",))
    leeway: float = key(parse_non_negative_float, 30.0)
    query_param: str = key(str.strip, "token")
    cookie: str | None = key(str.strip, None)
    strip_token: bool = key(parse_bool, False)
    #: how many verified tokens are kept (each until its ``exp``); 0: none
    token_cache: int = key(parse_non_negative_int, 4096)
    typ: str | None = key(str.strip, None)
    max_token_size: int = key(parse_positive_int, MAX_TOKEN_SIZE)
    #: an OpenID provider whose discovery document names the ``jwks_uri``
    oidc_issuer: str | None = key(parse_http_url, None)
    #: CA certificates (PEM) trusted for the JWKS and discovery fetches; else the system's
    ca_file: str | None = key(parse_path, None)
    #: the key material, once loaded
    secret: bytes | None = field(default=None, repr=False)
    public_key: PublicKeyTypes | None = None
    jwks: Mapping[str | None, list[PublicKey]] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class ClusterSettings:
    """``[cluster]``: the Redis URL (secret: it may carry a password), this worker's name, the policy."""

    #: how the file gives the Redis URL: literal, ``env:NAME`` or ``file:PATH``
    redis_source: str = key(parse_secret, name="redis", secret=True)
    #: empty: ``hostname-pid`` (cluster.default_node_id), filled when loaded
    node_id: str = key(parse_node_id, "")
    on_redis_down: str = key(parse_on_redis_down, "open")
    #: CAs trusted for ``rediss://`` (PEM); default: the system's trust store
    ca_file: str | None = key(parse_path, None)
    #: the client certificate (and key) shown to a Redis that asks for one (``tls-auth-clients``)
    client_cert: str | None = key(parse_path, None)
    client_key: str | None = key(parse_path, None)
    #: the Redis URL, once loaded
    redis: str = field(default="", repr=False)
    #: the Redis server's certificate is always checked (UpstreamTLS.for_route reads this)
    tls_verify = True


@dataclass(frozen=True)
class Settings:
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    routes: tuple[RouteSettings, ...] = ()
    demo: DemoSettings = field(default_factory=DemoSettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    auth: AuthSettings | None = None
    cluster: ClusterSettings | None = None
    source: str = "<settings>"


#: The sections besides ``[route:NAME]`` (:class:`RouteSettings`), by name.
SECTIONS: Mapping[str, type] = {
    "gateway": GatewaySettings,
    "admin": AdminSettings,
    "demo": DemoSettings,
    "auth": AuthSettings,
    "cluster": ClusterSettings,
}
ROUTE_SECTION = "route:"
