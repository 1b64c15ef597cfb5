"""
Reading ``tap.cfg`` into settings, in two steps.

:func:`parse_config` turns the text into :class:`~twisted_gateway.schema.Settings`
as the schema declares it and checks the keys against each other: pure (no
file, no environment variable is read), so it is tested on strings. A secret
written in the file itself is taken as it stands. :func:`load_settings` then
reads what the settings point at: secrets behind ``env:``/``file:``, PEM and
JWKS files, the files of ``ssl:`` listeners, the access log's directory.
Both fail with one line naming the file, the section, the key and the reason
(:class:`~twisted_gateway.schema.ConfigError`); :func:`load_config` does both
for a file.
"""

from __future__ import annotations

import configparser
import os
from dataclasses import replace
from typing import Any, Callable, Mapping

from twisted_gateway.auth import auth_warnings, key_material_source, parse_auth_section, with_key_material
from twisted_gateway.cluster import default_node_id, parse_cluster_section, with_redis_url
from twisted_gateway.headers import parse_host_header
from twisted_gateway.routing import validate_prefix
from twisted_gateway.schema import (
    EVENTS,
    OFF,
    ROUTE_SECTION,
    SECTIONS,
    STDOUT,
    AdminSettings,
    AuthSettings,
    ConfigError,
    DemoSettings,
    GatewaySettings,
    RouteSettings,
    Settings,
    read_section,
    section_keys,
)
from twisted_gateway.tls import (
    TLSFileError,
    TLSKeyError,
    TLSKeys,
    check_shared_upstreams,
    check_tls_files,
    check_tls_keys,
    listen_backlog,
    load_certificates,
    server_endpoint,
    system_listen_backlog,
)
from twisted_gateway.upstreams import PoolKeyError, check_pool_keys

__all__ = [
    "ConfigError",
    "GatewaySettings",
    "RouteSettings",
    "DemoSettings",
    "AdminSettings",
    "AuthSettings",
    "Settings",
    "parse_config",
    "load_settings",
    "load_config",
    "with_listen",
    "check_server_endpoint",
    "config_warnings",
    "describe_settings",
]


def check_server_endpoint(description: str) -> str:
    """Parse the endpoint as twistd will (certificate files are read here), without listening."""
    from twisted.internet.testing import MemoryReactor

    from twisted_gateway._compat import systemd_listen_fds

    if description.split(":", 1)[0] == "systemd" and not systemd_listen_fds().inheritedDescriptors():
        # No socket handed over here: a worker (its supervisor holds the socket and passes it
        # on) or --check outside systemd. Nothing to check it against.
        return description
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


#: Route keys whose rule lives with its concern, applied to the text the schema read.
_ROUTE_RULES: Mapping[str, Callable[[str], str]] = {
    "prefix": validate_prefix,
    "host_header": parse_host_header,
}


def parse_config(text: str, source: str = "<string>") -> Settings:
    """Parse the INI text of a config file into :class:`Settings` (pure)."""
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

    sections: dict[str, Any] = {}  # Settings' keyword arguments: each section's settings object
    route_values: list[tuple[str, dict[str, str]]] = []
    for section in parser.sections():
        values = dict(parser.items(section))
        name = section[len(ROUTE_SECTION) :].strip() if section.startswith(ROUTE_SECTION) else ""
        if section == "auth":
            sections[section] = parse_auth_section(source, values)
        elif section == "cluster":
            sections[section] = parse_cluster_section(source, values)
        elif section in SECTIONS:
            settings_type = SECTIONS[section]
            sections[section] = settings_type(**read_section(source, section, values, settings_type))
        elif name:
            route_values.append((name, values))
        else:
            raise ConfigError(source, section, None, "unknown section")

    names = [name for name, _ in route_values]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(source, f"route:{name}", None, "a route of this name appears twice")
    auth = sections.get("auth")
    routes = tuple(_parse_route(source, name, values, auth) for name, values in route_values)
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
    settings = Settings(routes=routes, source=source, **sections)
    return _with_secrets(settings, _literal_secret)


def _parse_route(
    source: str, name: str, values: Mapping[str, str], auth: AuthSettings | None
) -> RouteSettings:
    section = f"route:{name}"
    read = read_section(source, section, values, RouteSettings)
    for key, rule in _ROUTE_RULES.items():
        if key in read:
            try:
                read[key] = rule(read[key])
            except ValueError as e:
                raise ConfigError(source, section, key, str(e)) from None
    if "auth" not in read:
        read["auth"] = "required" if auth is not None else "none"
    elif read["auth"] != "none" and auth is None:
        raise ConfigError(source, section, "auth", "needs an [auth] section")
    route = RouteSettings(name=name, **read)
    try:
        check_pool_keys(route.balance, route.hash_key)
        check_tls_keys(route.client_cert, route.client_key)
    except (PoolKeyError, TLSKeyError) as e:
        raise ConfigError(source, section, e.key, str(e)) from None
    for key in ("require_scope", "require_claim"):
        if getattr(route, key) and route.auth != "required":
            raise ConfigError(source, section, key, "needs auth = required")
    if auth is not None and auth.cookie and route.auth != "none" and route.websocket:
        if "*" in route.allowed_origins:
            raise ConfigError(
                source,
                section,
                "allowed_origins",
                f"must list the allowed origins: [auth] cookie = {auth.cookie} would let"
                " any site open this route's WebSockets with a visitor's cookie",
            )
    return route


# -- the second step: what the settings point at --------------------------------

#: ``(source, section, key, text)`` -> the secret's bytes, or None when not read yet.
_Resolve = Callable[[str, str, str, str], "bytes | None"]


def _literal_secret(source: str, section: str, key: str, text: str) -> bytes | None:
    """A secret written in the file itself; None for ``env:``/``file:``, read when loaded."""
    if text.startswith(("env:", "file:")):
        return None
    return _read_secret(source, section, key, text)


def _read_secret(source: str, section: str, key: str, text: str) -> bytes:
    """The bytes behind ``literal | env:NAME | file:PATH``; errors never quote the value."""
    if text.startswith("env:"):
        if text[4:] not in os.environ:
            raise ConfigError(source, section, key, f"environment variable {text[4:]} is not set")
        data = os.environ[text[4:]].encode("utf-8")
    elif text.startswith("file:"):  # relative to the config file
        path = os.path.join(os.path.dirname(source), os.path.expanduser(text[5:]))
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ConfigError(source, section, key, f"cannot read {path}: {e.strerror}") from None
    else:
        data = text.encode("utf-8")
    if not data.strip():
        raise ConfigError(source, section, key, "is empty")
    return data.rstrip(b"\r\n")


def _with_secrets(settings: Settings, resolve: _Resolve) -> Settings:
    """The settings with the secrets ``resolve`` gives: the auth keys, the admin token, the Redis URL."""
    source, auth, admin, cluster = settings.source, settings.auth, settings.admin, settings.cluster
    found = key_material_source(auth) if auth is not None else None
    if auth is not None and found is not None:
        data = resolve(source, "auth", *found)
        if data is not None:
            auth = with_key_material(source, auth, found[0], data)
    if admin.token_source is not None and admin.token is None:
        data = resolve(source, "admin", "token", admin.token_source)
        if data is not None:
            if len(data) < 16:  # long enough to resist guessing
                raise ConfigError(source, "admin", "token", "must be at least 16 bytes")
            admin = replace(admin, token=data)
    if cluster is not None and not cluster.redis:
        data = resolve(source, "cluster", "redis", cluster.redis_source)
        if data is not None:
            cluster = with_redis_url(source, cluster, data.decode("utf-8"))
    return replace(settings, auth=auth, admin=admin, cluster=cluster)


def check_access_log(value: str) -> None:
    """A file named by ``access_log`` can be written: its directory exists and lets us in."""
    if value in (EVENTS, OFF, STDOUT):
        return
    path = os.path.abspath(value)
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise ValueError(f"the directory {directory} does not exist")
    if not os.access(path if os.path.exists(path) else directory, os.W_OK):
        raise ValueError(f"{path} cannot be written")


def load_settings(settings: Settings) -> Settings:
    """
    Read what parsed settings point at (secrets, PEM and JWKS files, the files
    of ``ssl:`` listeners, the access log's directory), as start-up would, and
    name this node (``[cluster] node_id``'s default, ``hostname-pid``).
    """
    settings = _with_secrets(settings, _read_secret)
    source = settings.source
    if settings.cluster is not None and not settings.cluster.node_id:
        settings = replace(settings, cluster=replace(settings.cluster, node_id=default_node_id()))
    endpoints = [("gateway", "listen", d) for d in settings.gateway.listen]
    endpoints += [("admin", "listen", d) for d in settings.admin.listen]
    if settings.demo.chat_service is not None:
        endpoints.append(("demo", "chat_service", settings.demo.chat_service))
    for section, key, description in endpoints:
        try:
            check_server_endpoint(description)
        except ValueError as e:
            raise ConfigError(source, section, key, str(e)) from None
    try:
        check_access_log(settings.gateway.access_log)
    except ValueError as e:
        raise ConfigError(source, "gateway", "access_log", str(e)) from None
    tls_sections: list[tuple[str, TLSKeys]] = [(f"route:{r.name}", r) for r in settings.routes]
    if settings.cluster is not None:
        tls_sections.append(("cluster", settings.cluster))
    for section, keys in tls_sections:
        try:
            check_tls_files(keys)
        except TLSKeyError as e:
            raise ConfigError(source, section, e.key, str(e)) from None
    if settings.auth is not None and settings.auth.ca_file is not None:
        try:
            load_certificates("ca_file", settings.auth.ca_file)
        except TLSFileError as e:
            raise ConfigError(source, "auth", "ca_file", f"{e.path}: {e.reason}") from None
    return settings


def load_config(path: str) -> Settings:
    """Read, parse and load a config file; a missing or unreadable file is a ConfigError."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(path, None, None, f"cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(path, None, None, "not UTF-8 text") from None
    return load_settings(parse_config(text, source=path))


def with_listen(settings: Settings, listen: list[str]) -> Settings:
    """The settings with ``[gateway] listen`` replaced (the ``--listen`` option)."""
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
    return warnings + auth_warnings(settings)


#: Keys that name key material: shown as "(set)", never printed.
_SECRET_KEYS = frozenset({"secret", "public_key", "jwks_file", "client_key", "token", "redis"})


def describe_settings(settings: Settings) -> str:
    """The effective configuration as INI text, secrets masked (for ``--check``)."""
    from twisted_gateway.admin import where_served

    def section(title: str, values: object) -> list[str]:
        lines = [f"[{title}]"]
        for name, spec in section_keys(type(values)).items():
            value = getattr(values, spec.name)
            if name in _SECRET_KEYS:
                text = "(set)" if value else ""
            elif isinstance(value, (tuple, list)):
                text = " ".join(str(v) for v in value)
            elif value is None:
                text = "off" if name == "tcp_keepalive" else ""
            else:
                text = str(value).lower() if isinstance(value, bool) else str(value)
            lines.append(f"{name} = {text}".rstrip())
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
    if settings.admin.token_source is None:
        out.insert(-1, "; [admin] token is not set: the /admin API is not served")
    if settings.auth is not None:
        out += section("auth", settings.auth)
    if settings.cluster is not None:
        out += section("cluster", settings.cluster)
    for route in settings.routes:
        out += section(f"route:{route.name}", route)
    if settings.demo.chat_service:
        out += section("demo", settings.demo)
    return "\n".join(out)
