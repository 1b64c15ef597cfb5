"""
Reading ``tap.cfg`` into immutable settings.

Every key is declared once in a table (``_GATEWAY_KEYS``, ``_ROUTE_KEYS``, ...):
adding a key is one line. A bad file fails at start-up with one line naming
the file, the section, the key and the reason (:class:`ConfigError`).
"""

from __future__ import annotations

import configparser
import ipaddress
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

from twisted.python import usage

from twisted_gateway.access_log import FORMATS as ACCESS_LOG_FORMATS
from twisted_gateway.access_log import parse_access_log
from twisted_gateway.admin import DEFAULT_ADMIN_ALLOW
from twisted_gateway.parsers import (
    parse_bool,
    parse_non_negative_float,
    parse_non_negative_int,
    parse_positive_float,
    parse_positive_int,
    parse_words,
)
from twisted_gateway.headers import DEFAULT_STRIPPED, parse_host_header
from twisted_gateway.routing import ESCAPED_SLASHES, validate_prefix
from twisted_gateway.sockets import DEFAULT_KEEPALIVE, TCPKeepalive, parse_tcp_keepalive
from twisted_gateway.upstreams import ROUTE_POOL_KEYS, PoolKeyError, check_pool_keys
from twisted_gateway.tls import (
    ROUTE_TLS_KEYS,
    TLSFileError,
    TLSKeyError,
    check_shared_upstreams,
    check_tls_keys,
    listen_backlog,
    server_endpoint,
    system_listen_backlog,
)


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


def parse_endpoints(text: str) -> tuple[str, ...]:
    """Whitespace-separated Twisted server endpoint strings, checked for form."""
    endpoints = parse_words(text)
    for description in endpoints:
        check_server_endpoint(description)
    return endpoints


def check_server_endpoint(description: str) -> str:
    """Parse the endpoint as twistd will (certificate files are read here), without listening."""
    from twisted.internet.testing import MemoryReactor

    try:
        server_endpoint(MemoryReactor(), description)
    except TLSFileError as e:
        raise ValueError(f"endpoint {description!r}: {e}") from None
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"not a valid endpoint {description!r}: {e}") from None
    except OSError as e:
        raise ValueError(f"endpoint {description!r}: {e.strerror or e}: {e.filename or ''}".rstrip(": ")) from None
    except Exception as e:  # e.g. OpenSSL errors for an unreadable key
        raise ValueError(f"endpoint {description!r}: {e}") from None
    return description


def parse_auto_or_positive_int(text: str) -> int | str:
    """``auto`` (the gateway works it out at start) or a number above 0."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return parse_positive_int(text)
    except ValueError:
        raise ValueError(f"expected auto or a whole number > 0, got {text!r}") from None


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


def parse_cidrs(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    nets = []
    for word in text.split():
        try:
            nets.append(ipaddress.ip_network(word, strict=False))
        except ValueError:
            raise ValueError(f"{word!r} is not an address or CIDR") from None
    return tuple(nets)


def parse_cidrs_or_none(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
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


def parse_prefix(text: str) -> str:
    return validate_prefix(text.strip())


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


def one_of(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {text!r}")
        return value

    return parse


@dataclass(frozen=True)
class Key:
    """One config key: its parser, and its default (``REQUIRED`` if none)."""

    parse: Callable[[str], Any]
    default: Any


REQUIRED = object()


# -- the settings -----------------------------------------------------------


@dataclass(frozen=True)
class GatewaySettings:
    listen: tuple[str, ...] = ("tcp:8080",)
    connect_timeout: float = 5.0
    ws_open_timeout: float = 10.0
    ws_max_message_size: int = 16 * 1024 * 1024
    ws_compression: bool = True
    request_timeout: float = 30.0
    max_body_size: int = 10 * 1024 * 1024
    upstream_keepalive: int = 32
    trusted_proxies: tuple[Any, ...] = ()
    drain_timeout: float = 10.0
    drain_spread: float = 0.0
    drain_delay: float = 0.0
    max_connections: int = 0
    max_header_size: int = 16384
    ws_max_message_size_upstream: int | None = None
    ws_ping_interval: float = 25.0
    ws_ping_timeout: float = 10.0
    strip_request_headers: tuple[str, ...] = DEFAULT_STRIPPED
    max_client_connections: int | str = "auto"
    max_open_files: int | None = None
    client_header_timeout: float = 60.0
    client_body_timeout: float = 60.0
    keepalive_timeout: float = 75.0
    tcp_keepalive: TCPKeepalive | None = DEFAULT_KEEPALIVE
    ws_send_timeout: float = 60.0
    ws_rate_limit: float = 0.0
    ws_rate_burst: int = 0
    #: seconds after which a WebSocket is closed with 1001, ±10 % (0: never; ageing.py)
    ws_max_age: float = 0.0
    max_websockets_per_user: int = 0
    #: worker processes sharing the listeners (``auto``: one per CPU this process may use)
    workers: int | str = 1
    #: HTTP access lines: ``events`` (twisted.logger), ``off``, ``stdout`` or a file (access_log.py)
    access_log: str = "events"
    access_log_format: str = "text"


@dataclass(frozen=True)
class RouteSettings:
    name: str
    prefix: str
    upstream: tuple[str, ...]
    websocket: bool = True
    ws_compression: bool | None = None
    auth: str = "none"
    balance: str | None = None
    hash_key: str | None = None
    max_fails: int = 1
    fail_timeout: float = 10.0
    health_check: str | None = None
    health_interval: float = 5.0
    max_websockets: int = 0
    allowed_origins: tuple[str, ...] = ("*",)
    allow_null_origin: bool | None = None
    ca_file: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    tls_verify: bool = True
    underscores_in_headers: bool = False
    escaped_slashes: str = "check"
    host_header: str = "client"
    #: None: the gateway's ``request_timeout``
    request_timeout: float | None = None
    #: None: the gateway's ``ws_rate_limit`` / ``ws_rate_burst``
    ws_rate_limit: float | None = None
    ws_rate_burst: int | None = None
    #: None: the gateway's ``ws_max_age``
    ws_max_age: float | None = None
    max_websockets_per_user: int = 0
    #: False: request bodies are streamed to the upstream as they arrive
    request_buffering: bool = True
    #: any one of these scopes (``scope``/``scp`` claim), else 403 insufficient_scope
    require_scope: tuple[str, ...] = ()
    #: every ``(dotted claim name, value)`` must hold, else 403 insufficient_scope
    require_claim: tuple[tuple[str, str], ...] = ()
    #: which verified claims reach the upstream in ``X-Auth-Claims``: "full", "none" or names
    claims_header: str | tuple[str, ...] = "full"


@dataclass(frozen=True)
class DemoSettings:
    chat_service: str | None = None


@dataclass(frozen=True)
class AdminSettings:
    listen: tuple[str, ...] = ()
    #: who may read /metrics and /status on the public listener (without ``listen``)
    admin_allow: tuple[Any, ...] = DEFAULT_ADMIN_ALLOW
    #: the bearer secret of the /admin API (None: the API is not served)
    token: bytes | None = None


@dataclass(frozen=True)
class Settings:
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    routes: tuple[RouteSettings, ...] = ()
    demo: DemoSettings = field(default_factory=DemoSettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    auth: Any = None  # auth.AuthSettings when there is an [auth] section
    cluster: Any = None  # cluster.ClusterSettings when there is a [cluster] section
    source: str = "<settings>"


_GATEWAY_KEYS: Mapping[str, Key] = {
    "listen": Key(parse_endpoints, ("tcp:8080",)),
    "connect_timeout": Key(parse_positive_float, 5.0),
    "ws_open_timeout": Key(parse_positive_float, 10.0),
    "ws_max_message_size": Key(parse_positive_int, 16 * 1024 * 1024),
    "ws_compression": Key(parse_bool, True),
    "request_timeout": Key(parse_positive_float, 30.0),
    "max_body_size": Key(parse_positive_int, 10 * 1024 * 1024),
    "upstream_keepalive": Key(parse_positive_int, 32),
    "trusted_proxies": Key(parse_cidrs, ()),
    "drain_timeout": Key(parse_positive_float, 10.0),
    "drain_spread": Key(parse_non_negative_float, 0.0),
    "drain_delay": Key(parse_non_negative_float, 0.0),
    "max_connections": Key(parse_non_negative_int, 0),
    "max_header_size": Key(parse_positive_int, 16384),
    "ws_max_message_size_upstream": Key(parse_positive_int, None),
    "ws_ping_interval": Key(parse_non_negative_float, 25.0),
    "ws_ping_timeout": Key(parse_positive_float, 10.0),
    "strip_request_headers": Key(parse_header_names, DEFAULT_STRIPPED),
    "max_client_connections": Key(parse_auto_or_positive_int, "auto"),
    "max_open_files": Key(parse_positive_int, None),
    "client_header_timeout": Key(parse_positive_float, 60.0),
    "client_body_timeout": Key(parse_positive_float, 60.0),
    "keepalive_timeout": Key(parse_positive_float, 75.0),
    "tcp_keepalive": Key(parse_tcp_keepalive, DEFAULT_KEEPALIVE),
    "ws_send_timeout": Key(parse_non_negative_float, 60.0),
    "ws_rate_limit": Key(parse_non_negative_float, 0.0),
    "ws_rate_burst": Key(parse_non_negative_int, 0),
    "ws_max_age": Key(parse_non_negative_float, 0.0),
    "max_websockets_per_user": Key(parse_non_negative_int, 0),
    "workers": Key(parse_auto_or_positive_int, 1),
    "access_log": Key(parse_access_log, "events"),
    "access_log_format": Key(one_of(*ACCESS_LOG_FORMATS), "text"),
}

_ROUTE_KEYS: Mapping[str, Key] = {
    "prefix": Key(parse_prefix, REQUIRED),
    "upstream": Key(parse_upstreams, REQUIRED),
    "websocket": Key(parse_bool, True),
    "ws_compression": Key(parse_bool, None),
    # default: "required" when there is an [auth] section, "none" otherwise
    "auth": Key(one_of("required", "optional", "none"), None),
    **{name: Key(parse, default) for name, (parse, default) in ROUTE_POOL_KEYS.items()},
    **{name: Key(parse, default) for name, (parse, default) in ROUTE_TLS_KEYS.items()},
    "max_websockets": Key(parse_non_negative_int, 0),
    "allowed_origins": Key(parse_origins, ("*",)),
    "allow_null_origin": Key(parse_bool, None),
    "underscores_in_headers": Key(parse_bool, False),
    "escaped_slashes": Key(one_of(*ESCAPED_SLASHES), "check"),
    "host_header": Key(parse_host_header, "client"),
    "request_timeout": Key(parse_positive_float, None),
    "ws_rate_limit": Key(parse_non_negative_float, None),
    "ws_rate_burst": Key(parse_non_negative_int, None),
    "ws_max_age": Key(parse_non_negative_float, None),
    "max_websockets_per_user": Key(parse_non_negative_int, 0),
    "request_buffering": Key(parse_bool, True),
    "require_scope": Key(parse_words, ()),
    "require_claim": Key(parse_claim_requirements, ()),
    "claims_header": Key(parse_claims_header, "full"),
}

_ADMIN_KEYS: Mapping[str, Key] = {
    "listen": Key(parse_endpoints, ()),
    "admin_allow": Key(parse_cidrs_or_none, DEFAULT_ADMIN_ALLOW),
    "token": Key(str.strip, None),  # resolved (env:/file:) in parse_config
}

_DEMO_KEYS: Mapping[str, Key] = {
    "chat_service": Key(check_server_endpoint, None),
}


def _read_section(
    source: str, section: str, values: Mapping[str, str], keys: Mapping[str, Key]
) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key in values:
        if key not in keys:
            raise ConfigError(source, section, key, "unknown key")
    for key, spec in keys.items():
        if key in values and values[key].strip() != "":
            try:
                result[key] = spec.parse(values[key])
            except ValueError as e:
                raise ConfigError(source, section, key, str(e)) from None
        elif spec.default is REQUIRED:
            raise ConfigError(source, section, key, "missing required key")
        else:
            result[key] = spec.default
    return result


def parse_config(text: str, source: str = "<string>") -> Settings:
    """Parse the INI text of a config file into :class:`Settings`."""
    parser = configparser.ConfigParser(
        interpolation=None,
        inline_comment_prefixes=(";", "#"),
        default_section="\x00no-defaults",
    )
    try:
        parser.read_string(text, source=source)
    except configparser.DuplicateSectionError as e:
        raise ConfigError(source, e.section, None, "section appears twice") from None
    except configparser.DuplicateOptionError as e:
        raise ConfigError(source, e.section, e.option, "key appears twice") from None
    except configparser.Error as e:
        reason = str(e).splitlines()[0]
        raise ConfigError(source, None, None, f"not a valid INI file: {reason}") from None

    from twisted_gateway.auth import parse_auth_section

    gateway = GatewaySettings()
    demo = DemoSettings()
    admin = AdminSettings()
    auth = None
    cluster = None
    route_values: list[tuple[str, dict[str, Any]]] = []
    for section in parser.sections():
        values = dict(parser.items(section))
        if section == "auth":
            auth = parse_auth_section(source, values)
        elif section == "gateway":
            gateway = GatewaySettings(**_read_section(source, section, values, _GATEWAY_KEYS))
        elif section == "admin":
            admin_values = _read_section(source, section, values, _ADMIN_KEYS)
            if admin_values["token"]:
                admin_values["token"] = _admin_token(source, admin_values["token"])
            admin = AdminSettings(**admin_values)
        elif section == "cluster":
            from twisted_gateway.cluster import parse_cluster_section

            cluster = parse_cluster_section(source, values)
        elif section == "demo":
            demo = DemoSettings(**_read_section(source, section, values, _DEMO_KEYS))
        elif section.startswith("route:") and section[len("route:") :].strip():
            name = section[len("route:") :].strip()
            route_values.append((name, _read_section(source, section, values, _ROUTE_KEYS)))
        else:
            raise ConfigError(source, section, None, "unknown section")

    names = [name for name, _ in route_values]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(source, f"route:{name}", None, "a route of this name appears twice")
    routes: list[RouteSettings] = []
    for name, route in route_values:
        if route["auth"] is None:
            route["auth"] = "required" if auth is not None else "none"
        elif route["auth"] != "none" and auth is None:
            raise ConfigError(source, f"route:{name}", "auth", "needs an [auth] section")
        try:
            check_pool_keys(route["balance"], route["hash_key"])
        except PoolKeyError as e:
            raise ConfigError(source, f"route:{name}", e.key, str(e)) from None
        try:
            check_tls_keys(route["client_cert"], route["client_key"])
        except TLSKeyError as e:
            raise ConfigError(source, f"route:{name}", e.key, str(e)) from None
        for key in ("require_scope", "require_claim"):
            if route[key] and route["auth"] != "required":
                raise ConfigError(source, f"route:{name}", key, "needs auth = required")
        if auth is not None and auth.cookie and route["auth"] != "none" and route["websocket"]:
            if "*" in route["allowed_origins"]:
                raise ConfigError(
                    source,
                    f"route:{name}",
                    "allowed_origins",
                    f"must list the allowed origins: [auth] cookie = {auth.cookie} would let"
                    " any site open this route's WebSockets with a visitor's cookie",
                )
        routes.append(RouteSettings(name=name, **route))
    try:
        check_shared_upstreams(routes)
    except TLSKeyError as e:
        raise ConfigError(source, f"route:{e.route}", e.key, str(e)) from None

    seen: dict[str, str] = {}
    for route in routes:
        if route.prefix in seen:
            raise ConfigError(
                source,
                f"route:{route.name}",
                "prefix",
                f"{route.prefix!r} is already the prefix of [route:{seen[route.prefix]}]",
            )
        seen[route.prefix] = route.name
    if not routes:
        raise ConfigError(source, None, None, "no [route:NAME] section")
    return Settings(
        gateway=gateway,
        routes=tuple(routes),
        demo=demo,
        admin=admin,
        auth=auth,
        cluster=cluster,
        source=source,
    )


def _admin_token(source: str, text: str) -> bytes:
    """``[admin] token``: a bearer secret, ``env:NAME`` or ``file:PATH``, long enough to resist guessing."""
    from twisted_gateway.auth import resolve_secret

    token = resolve_secret(source, "token", text, section="admin")
    if len(token) < 16:
        raise ConfigError(source, "admin", "token", "must be at least 16 bytes")
    return token


def load_config(path: str) -> Settings:
    """Read and parse a config file; a missing or unreadable file is a ConfigError."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(path, None, None, f"cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(path, None, None, "not UTF-8 text") from None
    return parse_config(text, source=path)


def with_listen(settings: Settings, listen: list[str]) -> Settings:
    """The settings with ``[gateway] listen`` replaced (the ``--listen`` option)."""
    from dataclasses import replace

    for description in listen:
        try:
            check_server_endpoint(description)
        except ValueError as e:
            raise ConfigError("--listen", None, None, str(e)) from None
    return replace(settings, gateway=replace(settings.gateway, listen=tuple(listen)))


#: A ping timeout below this drops healthy clients on slow, lossy links (3G: 1 s delays are common).
MIN_SAFE_PING_TIMEOUT = 5.0


def config_warnings(settings: Settings) -> list[str]:
    """
    Risky but valid combinations, one line each naming the file, section and
    key (``--check`` prints them, start-up logs them): the gateway runs anyway.
    """
    gateway, where = settings.gateway, f"{settings.source}: [gateway]"
    warnings = []
    if gateway.ws_ping_interval and gateway.ws_ping_timeout < MIN_SAFE_PING_TIMEOUT:
        warnings.append(
            f"{where} ws_ping_timeout: {gateway.ws_ping_timeout:g} s is under"
            f" {MIN_SAFE_PING_TIMEOUT:g} s: clients on slow or lossy links miss it and are"
            " dropped while healthy (they see 1006)"
        )
    if not gateway.ws_ping_interval and gateway.tcp_keepalive is None:
        warnings.append(
            f"{where} ws_ping_interval: 0 with tcp_keepalive = off: a peer that vanishes"
            " without a FIN keeps its pair open forever"
        )
    if settings.auth is not None:
        from twisted_gateway.auth import auth_warnings

        warnings += auth_warnings(settings)
    return warnings


#: Settings fields that hold key material: shown as "(set)", never printed.
_SECRET_FIELDS = frozenset({"secret", "public_key", "jwks", "client_key", "token", "redis"})


def describe_settings(settings: Settings) -> str:
    """The effective configuration as INI text, secrets masked (for ``--check``)."""
    from dataclasses import fields

    from twisted_gateway.admin import where_served

    def section(title: str, values: Any, skip: tuple[str, ...] = ()) -> list[str]:
        lines = [f"[{title}]"]
        for f in fields(values):
            if f.name in skip:
                continue
            value = getattr(values, f.name)
            if f.name in _SECRET_FIELDS:
                text = "(set)" if value else ""
            elif isinstance(value, (tuple, list)):
                text = " ".join(str(v) for v in value)
            elif value is None:
                text = "off" if f.name == "tcp_keepalive" else ""
            else:
                text = str(value).lower() if isinstance(value, bool) else str(value)
            lines.append(f"{f.name} = {text}".rstrip())
        return lines + [""]

    out = [f"; effective configuration of {settings.source}"]
    system_backlog = system_listen_backlog()
    for description in (*settings.gateway.listen, *settings.admin.listen):
        backlog = listen_backlog(description, system_backlog)
        shown = backlog if backlog is not None else "of the inherited socket"
        out.append(f"; {description}: listen backlog {shown}")
    out.append(f"; {where_served(settings)}")
    out.append("")
    out += section("gateway", settings.gateway)
    out += section("admin", settings.admin)
    if settings.admin.token is None:
        out.insert(-1, "; [admin] token is not set: the /admin API is not served")
    if settings.auth is not None:
        out += section("auth", settings.auth)
    if settings.cluster is not None:
        out += section("cluster", settings.cluster)
    for route in settings.routes:
        out += section(f"route:{route.name}", route, skip=("name",))
    if settings.demo.chat_service:
        out += section("demo", settings.demo)
    return "\n".join(out)
